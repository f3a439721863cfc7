//! `GET /api/v1/erp/status`, `POST /api/v1/erp/sync`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use mes_proto::v1 as pb;

use crate::AppState;
use crate::auth::{Principal, QUALITY};
use crate::clients::ERP_SYNC;
use crate::problem::Problem;
use crate::routes::time;

#[derive(Debug, Serialize, ToSchema)]
pub struct LastReconciliation {
    pub at: Option<String>,
    pub differences: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErpStatus {
    /// `file`, `tryton`, `rest`, …
    pub adapter: String,
    /// Entity (`materials`, `lots`, `work_orders`, `stations`) → time of the last successful pull.
    pub last_pull: BTreeMap<String, String>,
    pub queue_depth: u64,
    pub oldest_pending_seconds: f64,
    /// `closed` | `open` | `half_open`.
    pub breaker: String,
    pub dead_letters: u64,
    pub last_reconciliation: Option<LastReconciliation>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SyncStarted {
    pub started: bool,
    /// Records upserted, when the pull ran synchronously.
    pub upserted: u32,
}

/// ERP integration status
///
/// Roles: quality, admin.
#[utoipa::path(
    get, path = "/api/v1/erp/status", operation_id = "getErpStatus", tag = "erp",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The ERP integration's state", body = ErpStatus),
        (status = 403, description = "`forbidden`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn status(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<ErpStatus>, Problem> {
    principal.require(&[QUALITY])?;
    let s = state
        .backends
        .call(
            ERP_SYNC,
            "GetStatus",
            &principal.caller,
            pb::GetErpStatusRequest {},
            |req| {
                let mut client = state.backends.erp_sync();
                async move { client.get_status(req).await }
            },
        )
        .await?;
    Ok(Json(ErpStatus {
        adapter: s.adapter,
        last_pull: s
            .last_pull
            .into_iter()
            .filter_map(|(k, v)| time(Some(v)).map(|t| (k, t)))
            .collect(),
        queue_depth: s.queue_depth,
        oldest_pending_seconds: if s.oldest_pending_seconds.is_finite() {
            s.oldest_pending_seconds
        } else {
            0.0
        },
        breaker: s.breaker,
        dead_letters: s.dead_letters,
        last_reconciliation: s.last_reconciliation.map(|r| LastReconciliation {
            at: time(r.at),
            differences: r.differences,
        }),
    }))
}

/// Trigger an ERP pull now
///
/// Admin only.
#[utoipa::path(
    post, path = "/api/v1/erp/sync", operation_id = "triggerErpSync", tag = "erp",
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The pull is scheduled", body = SyncStarted),
        (status = 403, description = "`forbidden`: admin only", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn sync(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<(StatusCode, Json<SyncStarted>), Problem> {
    principal.require(&[])?;
    let r = state
        .backends
        .call(
            ERP_SYNC,
            "TriggerPull",
            &principal.caller,
            pb::TriggerPullRequest {},
            |req| {
                let mut client = state.backends.erp_sync();
                async move { client.trigger_pull(req).await }
            },
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(SyncStarted {
            started: r.started,
            upserted: r.upserted,
        }),
    ))
}
