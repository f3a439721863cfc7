//! `POST /api/v1/auth/token`, `POST /api/v1/auth/logout`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::{Principal, verify_password};
use crate::input::{Fields, json_body};
use crate::limits::Subject;
use crate::problem::Problem;
use crate::routes::db_error;
use crate::store;

/// Credentials; `device_id`, when given, must be an enrolled device and binds the token to
/// that device's station.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TokenRequest {
    #[schema(example = "op1", max_length = 64)]
    username: String,
    #[schema(example = "demo-op1", max_length = 256)]
    password: String,
    #[schema(example = "TAB-10")]
    device_id: Option<String>,
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
/// Exchanges credentials for a bearer token (HS256 JWT). Failed logins of one username are
/// limited like requests (429 `rate_limited` after too many).
#[utoipa::path(
    post, path = "/api/v1/auth/token", operation_id = "login", tag = "auth",
    request_body = TokenRequest,
    responses(
        (status = 200, description = "The access token", body = TokenResponse),
        (status = 400, description = "`malformed_json` or `validation_failed`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "`unauthenticated`: bad credentials, or a device that is not enrolled", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`: too many failed logins", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn token(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenResponse>, Problem> {
    let value = json_body(body, state.settings.max_body_bytes)?;
    let mut f = Fields::new(&value, "");
    let username = f.string("username", true, 64);
    let password = f.string("password", true, 256);
    let device_id = f.ident("device_id", false);
    let errors = f.finish();
    let (Some(username), Some(password)) = (username, password) else {
        return Err(Problem::validation(errors));
    };
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    tracing::Span::current().record("user", username.as_str());
    if let Some(retry) = state.limits.exceeded(Subject::FailedLogin(&username)).await {
        return Err(Problem::rate_limited(retry));
    }
    let retry_after = state.settings.retry_after_seconds;
    let user = store::find_user(&state.pool, &username)
        .await
        .map_err(|e| db_error(e, retry_after))?;
    let (hash, usable) = match &user {
        Some(u) if u.active => (u.password_hash.clone(), true),
        _ => (state.dummy_hash.clone(), false),
    };
    let verified = verify_password(password, hash).await;
    let Some(user) = user.filter(|_| usable && verified) else {
        metrics::counter!("gateway_auth_failures_total", "reason" => "credentials").increment(1);
        tracing::info!("login refused: bad credentials");
        let _ = state.limits.hit(&[Subject::FailedLogin(&username)]).await;
        return Err(Problem::unauthenticated("invalid username or password"));
    };
    let (device, station) = match device_id {
        None => (None, None),
        Some(id) => match store::find_device(&state.pool, &id)
            .await
            .map_err(|e| db_error(e, retry_after))?
        {
            Some(d) if d.active => (Some(d.device_id), Some(d.station)),
            _ => {
                metrics::counter!("gateway_auth_failures_total", "reason" => "device").increment(1);
                tracing::info!(device = %id, "login refused: device not enrolled");
                return Err(Problem::unauthenticated(format!(
                    "device {id} is not enrolled"
                )));
            }
        },
    };
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
