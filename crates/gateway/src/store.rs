//! The gateway's database: users (argon2 password hashes, roles) and enrolled devices bound to
//! stations. Bound parameters only.

use std::time::Duration;

use sqlx::PgPool;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Creates the database if missing, migrates it, and returns a lazy pool.
pub async fn prepare(settings: &mes_common::ServiceSettings) -> anyhow::Result<PgPool> {
    mes_common::db::prepare(
        &settings.database_url,
        settings.database_max_connections,
        &MIGRATOR,
        Duration::from_secs(15),
    )
    .await
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct User {
    pub username: String,
    pub password_hash: String,
    pub roles: Vec<String>,
    pub active: bool,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Device {
    pub device_id: String,
    pub station: String,
    pub active: bool,
    /// `sha256:<hex>` of the device's enrolment secret (None: enrolled before secrets existed;
    /// it cannot bind a login until enrolled again).
    pub secret_hash: Option<String>,
}

#[tracing::instrument(skip(pool))]
pub async fn find_user(pool: &PgPool, username: &str) -> sqlx::Result<Option<User>> {
    sqlx::query_as::<_, User>(
        "SELECT username, password_hash, roles, active FROM users WHERE username = $1",
    )
    .bind(username)
    .fetch_optional(pool)
    .await
}

/// Creates the user or replaces its password hash and roles (and re-activates it).
#[tracing::instrument(skip(pool, password_hash))]
pub async fn upsert_user(
    pool: &PgPool,
    username: &str,
    password_hash: &str,
    roles: &[String],
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO users (username, password_hash, roles) VALUES ($1, $2, $3)
         ON CONFLICT (username) DO UPDATE
           SET password_hash = EXCLUDED.password_hash, roles = EXCLUDED.roles,
               active = true, updated_at = now()",
    )
    .bind(username)
    .bind(password_hash)
    .bind(roles)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deactivates a user (their tokens stop working at expiry; logins fail at once).
#[tracing::instrument(skip(pool))]
pub async fn disable_user(pool: &PgPool, username: &str) -> sqlx::Result<bool> {
    let r = sqlx::query("UPDATE users SET active = false, updated_at = now() WHERE username = $1")
        .bind(username)
        .execute(pool)
        .await?;
    Ok(r.rows_affected() > 0)
}

#[tracing::instrument(skip(pool))]
pub async fn find_device(pool: &PgPool, device_id: &str) -> sqlx::Result<Option<Device>> {
    sqlx::query_as::<_, Device>(
        "SELECT device_id, station, active, secret_hash FROM devices WHERE device_id = $1",
    )
    .bind(device_id)
    .fetch_optional(pool)
    .await
}

/// Enrols a device at a station (or moves it there, re-activating it) with the digest of its
/// enrolment secret (replacing any previous one).
#[tracing::instrument(skip(pool, secret_hash))]
pub async fn enrol_device(
    pool: &PgPool,
    device_id: &str,
    station: &str,
    secret_hash: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO devices (device_id, station, secret_hash) VALUES ($1, $2, $3)
         ON CONFLICT (device_id) DO UPDATE
           SET station = EXCLUDED.station, secret_hash = EXCLUDED.secret_hash,
               active = true, updated_at = now()",
    )
    .bind(device_id)
    .bind(station)
    .bind(secret_hash)
    .execute(pool)
    .await?;
    Ok(())
}

/// Withdraws a device: logins naming it fail from now on.
#[tracing::instrument(skip(pool))]
pub async fn withdraw_device(pool: &PgPool, device_id: &str) -> sqlx::Result<bool> {
    let r =
        sqlx::query("UPDATE devices SET active = false, updated_at = now() WHERE device_id = $1")
            .bind(device_id)
            .execute(pool)
            .await?;
    Ok(r.rows_affected() > 0)
}

/// The demo users and devices of docs/demo-plant.md (only ever seeded in demo mode).
pub const DEMO_USERS: &[(&str, &str, &str)] = &[
    ("admin", "demo-admin", "admin"),
    ("sup1", "demo-sup1", "supervisor"),
    ("op1", "demo-op1", "operator"),
    ("qa1", "demo-qa1", "quality"),
    ("plan1", "demo-plan1", "planner"),
];

/// Demo devices and their stations; a demo device's enrolment secret is `demo-<device>`.
pub const DEMO_DEVICES: &[(&str, &str)] = &[
    ("TAB-10", "ST-10"),
    ("TAB-20", "ST-20"),
    ("TAB-30", "ST-30"),
];

/// Seeds the demo users and devices; idempotent (a user whose stored hash already verifies the
/// demo password and whose roles match is left untouched).
pub async fn seed_demo(pool: &PgPool) -> anyhow::Result<()> {
    // Hash in parallel: argon2 is deliberately slow.
    let seeded = DEMO_USERS
        .iter()
        .map(|&(username, password, role)| async move {
            let roles = vec![role.to_owned()];
            if let Some(existing) = find_user(pool, username).await?
                && existing.active
                && existing.roles == roles
                && crate::auth::verify_password(password.to_owned(), existing.password_hash).await
            {
                return Ok(());
            }
            let hash = crate::auth::hash_password(password.to_owned()).await?;
            upsert_user(pool, username, &hash, &roles).await?;
            anyhow::Ok(())
        });
    futures::future::try_join_all(seeded).await?;
    for &(device, station) in DEMO_DEVICES {
        let secret = crate::auth::device_secret_hash(&format!("demo-{device}"));
        enrol_device(pool, device, station, &secret).await?;
    }
    tracing::warn!(
        users = DEMO_USERS.len(),
        devices = DEMO_DEVICES.len(),
        "demo mode: demo users and devices with well-known passwords and secrets are enabled; never use in production"
    );
    Ok(())
}
