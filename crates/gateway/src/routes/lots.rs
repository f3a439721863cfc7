//! `GET /api/v1/lots/{lot}`, `POST /api/v1/lots/{lot}/hold`, `POST /api/v1/lots/{lot}/release`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use serde::Serialize;
use utoipa::ToSchema;

use mes_proto::v1 as pb;

use crate::AppState;
use crate::auth::{OPERATOR, PLANNER, Principal, QUALITY, SUPERVISOR};
use crate::clients::SCAN_INGEST;
use crate::input::{Fields, MAX_TEXT, json_body, path_ident};
use crate::problem::Problem;
use crate::routes::opt;

#[derive(Debug, Serialize, ToSchema)]
pub struct LotOrigin {
    /// `received` | `produced`.
    pub kind: String,
    pub supplier: Option<String>,
    pub supplier_lot: Option<String>,
    pub work_order: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Lot {
    #[schema(example = "STEEL-L1")]
    pub lot: String,
    pub material: String,
    pub quantity_on_hand: String,
    /// `active` | `on_hold` | `consumed` | `scrapped`.
    pub status: String,
    pub location: Option<String>,
    pub origin: Option<LotOrigin>,
}

impl From<pb::Lot> for Lot {
    fn from(l: pb::Lot) -> Self {
        Self {
            lot: l.lot,
            material: l.material,
            quantity_on_hand: if l.quantity_on_hand.is_empty() {
                "0".to_owned()
            } else {
                l.quantity_on_hand
            },
            status: l.status,
            location: opt(l.location),
            origin: l.origin.map(|o| LotOrigin {
                kind: o.kind,
                supplier: opt(o.supplier),
                supplier_lot: opt(o.supplier_lot),
                work_order: opt(o.work_order),
            }),
        }
    }
}

/// Why a lot is held or released.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct LotStatusChange {
    #[schema(max_length = 500, example = "suspected porosity, see NCR-77")]
    reason: String,
}

/// Get a lot
///
/// Roles: operator, supervisor, quality, planner, admin.
#[utoipa::path(
    get, path = "/api/v1/lots/{lot}", operation_id = "getLot", tag = "lots",
    params(("lot" = String, Path, description = "Lot or serial barcode", example = "STEEL-L1")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The lot", body = Lot),
        (status = 400, description = "`validation_failed`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(lot): Path<String>,
) -> Result<Json<Lot>, Problem> {
    principal.require(&[OPERATOR, SUPERVISOR, QUALITY, PLANNER])?;
    let lot = path_ident("lot", &lot)?;
    let l = state
        .backends
        .call(
            SCAN_INGEST,
            "GetLot",
            &principal.caller,
            pb::GetLotRequest { lot },
            |req| {
                let mut client = state.backends.scan_ingest();
                async move { client.get_lot(req).await }
            },
        )
        .await?;
    Ok(Json(l.into()))
}

async fn change_status(
    state: AppState,
    principal: Principal,
    lot: String,
    body: Result<Bytes, BytesRejection>,
    hold: bool,
) -> Result<Json<Lot>, Problem> {
    principal.require(&[QUALITY, SUPERVISOR])?;
    let lot = path_ident("lot", &lot)?;
    let value = json_body(body, state.settings.max_body_bytes)?;
    let mut f = Fields::new(&value, "");
    let reason = f.string("reason", true, MAX_TEXT);
    let errors = f.finish();
    let Some(reason) = reason.filter(|_| errors.is_empty()) else {
        return Err(Problem::validation(errors));
    };
    let request = pb::LotStatusRequest { lot, reason };
    let backends = state.backends.clone();
    let l = if hold {
        backends
            .call(SCAN_INGEST, "HoldLot", &principal.caller, request, |req| {
                let mut client = state.backends.scan_ingest();
                async move { client.hold_lot(req).await }
            })
            .await?
    } else {
        backends
            .call(
                SCAN_INGEST,
                "ReleaseLot",
                &principal.caller,
                request,
                |req| {
                    let mut client = state.backends.scan_ingest();
                    async move { client.release_lot(req).await }
                },
            )
            .await?
    };
    Ok(Json(l.into()))
}

/// Put a lot on hold
///
/// A held lot cannot be consumed or moved (such scans are rejected with `lot_on_hold`).
/// Roles: quality, supervisor, admin.
#[utoipa::path(
    post, path = "/api/v1/lots/{lot}/hold", operation_id = "holdLot", tag = "lots",
    params(("lot" = String, Path, description = "Lot or serial barcode")),
    request_body = LotStatusChange,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The lot, now on hold", body = Lot),
        (status = 400, description = "`malformed_json` or `validation_failed`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`conflict`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn hold(
    State(state): State<AppState>,
    principal: Principal,
    Path(lot): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Lot>, Problem> {
    change_status(state, principal, lot, body, true).await
}

/// Release a held lot
///
/// Roles: quality, supervisor, admin.
#[utoipa::path(
    post, path = "/api/v1/lots/{lot}/release", operation_id = "releaseLot", tag = "lots",
    params(("lot" = String, Path, description = "Lot or serial barcode")),
    request_body = LotStatusChange,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The lot, released", body = Lot),
        (status = 400, description = "`malformed_json` or `validation_failed`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`conflict`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn release(
    State(state): State<AppState>,
    principal: Principal,
    Path(lot): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Lot>, Problem> {
    change_status(state, principal, lot, body, false).await
}
