//! `POST /api/v1/auth/token`, `POST /api/v1/auth/logout`.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::{Busy, Principal, device_secret_matches};
use crate::input::{Fields, json_body};
use crate::problem::{FieldError, Problem};
use crate::routes::db_error;
use crate::store;

/// Credentials; `device_id`, when given, must be an enrolled device, proven by its
/// `device_secret` (issued at enrolment), and binds the token to that device's station.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TokenRequest {
    #[schema(example = "op1", max_length = 64)]
    username: String,
    #[schema(example = "demo-op1", max_length = 256)]
    password: String,
    #[schema(example = "TAB-10")]
    device_id: Option<String>,
    /// The device's enrolment secret (printed by `gateway device enrol`; `demo-<device>` for
    /// the demo tablets). Required with `device_id` outside demo mode (in demo mode, where the
    /// demo secrets are public, it is checked when given); refused without `device_id`.
    #[schema(example = "demo-TAB-10", max_length = 256)]
    device_secret: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    #[schema(example = "Bearer")]
    pub token_type: String,
    /// Seconds until the token expires.
    #[schema(example = 900)]
    pub expires_in: u64,
    /// Any of `operator`, `supervisor`, `quality`, `planner`, `admin`.
    pub roles: Vec<String>,
    /// The station the token is bound to (when logged in with a device).
    #[schema(example = "ST-10")]
    pub station: Option<String>,
}

/// Log in
///
/// Exchanges credentials for a bearer token (HS256 JWT). Failed login attempts are limited
/// per username (known or not) and per client address (429 `rate_limited` with `Retry-After`
/// after too many in the window, even with the right password); an attempt counts before its
/// password is checked. Password checks run a few at a time: when all are busy for too long
/// the login is refused with 503 `unavailable` and `Retry-After`.
#[utoipa::path(
    post, path = "/api/v1/auth/token", operation_id = "login", tag = "auth",
    request_body = TokenRequest,
    responses(
        (status = 200, description = "The access token", body = TokenResponse),
        (status = 400, description = "`malformed_json` or `validation_failed`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "`unauthenticated`: bad credentials, or a device that is not enrolled or whose `device_secret` does not match", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`: too many failed logins of this username or from this address", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: too many logins at once, or the database is unreachable; retry after `Retry-After`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn token(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenResponse>, Problem> {
    let value = json_body(body, state.settings.max_body_bytes)?;
    let mut f = Fields::new(&value, "");
    let username = f.string("username", true, 64);
    let password = f.string("password", true, 256);
    let device_id = f.ident("device_id", false);
    let device_secret = f.string("device_secret", false, 256);
    let mut errors = f.finish();
    // Demo mode: the demo tablets' secrets are published (README), so a login that names a
    // device without its secret is accepted there, as docs/api.md documents; outside
    // demo mode a station binding needs the device's enrolment secret.
    let demo = state.settings.service.demo;
    match (&device_id, &device_secret) {
        (Some(_), None) if !demo && !errors.iter().any(|e| e.field == "device_secret") => {
            errors.push(FieldError::new(
                "device_secret",
                "is required with device_id",
            ));
        }
        (None, Some(_)) if !errors.iter().any(|e| e.field == "device_id") => {
            errors.push(FieldError::new("device_secret", "needs a device_id"));
        }
        _ => {}
    }
    let (Some(username), Some(password)) = (username, password) else {
        return Err(Problem::validation(errors));
    };
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    tracing::Span::current().record("user", username.as_str());
    let client = client_address(&state, peer.map(|Extension(ConnectInfo(a))| a), &headers);
    // Counted before the password is checked (parallel guesses cannot pass the limit);
    // unknown usernames count the same.
    let attempt = state.limits.reserve_login(&username, &client).await?;
    let retry_after = state.settings.retry_after_seconds;
    let user = match store::find_user(&state.pool, &username).await {
        Ok(user) => user,
        Err(e) => {
            state.limits.refund_login(attempt).await;
            return Err(db_error(e, retry_after));
        }
    };
    let (hash, usable) = match &user {
        Some(u) if u.active => (u.password_hash.clone(), true),
        // The same argon2 parameters: an unknown user costs the same time and memory.
        _ => (state.dummy_hash.clone(), false),
    };
    let verified = match state.hashes.verify(password, hash).await {
        Ok(v) => v,
        Err(Busy) => {
            // Not checked: the attempt is given back.
            state.limits.refund_login(attempt).await;
            tracing::warn!("login refused: every password check is busy");
            return Err(Problem::unavailable(
                "too many logins at once; retry shortly",
                retry_after,
            ));
        }
    };
    let Some(user) = user.filter(|_| usable && verified) else {
        metrics::counter!("gateway_auth_failures_total", "reason" => "credentials").increment(1);
        tracing::info!(client = %client, "login refused: bad credentials");
        return Err(Problem::unauthenticated("invalid username or password"));
    };
    let (device, station) = match device_id {
        None => (None, None),
        Some(id) => match store::find_device(&state.pool, &id).await {
            Err(e) => {
                state.limits.refund_login(attempt).await;
                return Err(db_error(e, retry_after));
            }
            Ok(Some(d))
                if d.active
                    && match device_secret.as_deref() {
                        Some(secret) => d
                            .secret_hash
                            .as_deref()
                            .is_some_and(|h| device_secret_matches(h, secret)),
                        None => demo,
                    } =>
            {
                if device_secret.is_none() {
                    tracing::warn!(device = %d.device_id, "demo mode: device named without its secret; station binding not proven");
                }
                (Some(d.device_id), Some(d.station))
            }
            Ok(_) => {
                // The attempt stays counted: device secrets cannot be guessed either.
                metrics::counter!("gateway_auth_failures_total", "reason" => "device").increment(1);
                tracing::info!(device = %id, "login refused: device not enrolled or wrong device secret");
                return Err(Problem::unauthenticated(format!(
                    "device {id} is not enrolled, or its device_secret does not match"
                )));
            }
        },
    };
    state.limits.refund_login(attempt).await;
    let (access_token, claims) = state
        .tokens
        .issue(&user.username, user.roles.clone(), device, station)
        .map_err(|e| Problem::internal(&e))?;
    tracing::info!(
        device = claims.device.as_deref().unwrap_or(""),
        station = claims.station.as_deref().unwrap_or(""),
        "login"
    );
    Ok(Json(TokenResponse {
        access_token,
        token_type: "Bearer".to_owned(),
        expires_in: state.tokens.ttl(),
        roles: claims.roles,
        station: claims.station,
    }))
}

/// The client address of a login: the configured proxy header's last entry, else the TCP
/// peer.
fn client_address(state: &AppState, peer: Option<SocketAddr>, headers: &HeaderMap) -> String {
    let header = state.settings.client_ip_header.as_str();
    if !header.is_empty()
        && let Some(last) = headers
            .get_all(header)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|v| !v.is_empty())
    {
        return last.chars().take(64).collect();
    }
    peer.map(|a| a.ip().to_string())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Log out
///
/// Revokes the presented token until it would have expired (later use → 401). Answers 503
/// `unavailable` when the revocation list (Redis) cannot be written: retry the logout.
#[utoipa::path(
    post, path = "/api/v1/auth/logout", operation_id = "logout", tag = "auth",
    security(("bearer" = [])),
    responses(
        (status = 204, description = "The token is revoked"),
        (status = 503, description = "`unavailable`: the token could not be revoked now", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn logout(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<StatusCode, Problem> {
    state
        .limits
        .revoke(&principal.claims.jti, principal.claims.remaining())
        .await?;
    tracing::info!("logout");
    Ok(StatusCode::NO_CONTENT)
}
