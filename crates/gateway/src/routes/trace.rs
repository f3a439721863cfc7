//! `GET /api/v1/lots/{lot}/genealogy`, `GET /api/v1/lots/{lot}/history`.

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use mes_proto::v1 as pb;

use crate::AppState;
use crate::auth::{OPERATOR, PLANNER, Principal, QUALITY, SUPERVISOR};
use crate::clients::TRACE_QUERY;
use crate::input::{Params, path_ident};
use crate::problem::Problem;
use crate::routes::{opt, time};

pub const READERS: &[&str] = &[OPERATOR, SUPERVISOR, QUALITY, PLANNER];

#[derive(Debug, Serialize, ToSchema)]
pub struct GenealogyNode {
    pub lot: String,
    pub material: String,
    pub work_order: Option<String>,
    pub quantity: String,
    pub produced_at: Option<String>,
    pub depth: u32,
    pub supplier: Option<String>,
    pub supplier_lot: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GenealogyEdge {
    /// The input lot.
    pub from: String,
    /// The output lot.
    pub to: String,
    pub work_order: Option<String>,
    pub quantity: String,
    pub station: Option<String>,
    pub operator: Option<String>,
    pub at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Genealogy {
    pub root: String,
    /// `backward` | `forward`.
    pub direction: String,
    pub nodes: Vec<GenealogyNode>,
    pub edges: Vec<GenealogyEdge>,
    /// True when `max_depth` cut the walk short.
    pub truncated: bool,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct GenealogyQuery {
    /// `backward` (default: where did it come from?) or `forward` (where did it go?).
    direction: Option<String>,
    /// 1 to 50 (default 20).
    #[param(minimum = 1, maximum = 50)]
    max_depth: Option<u32>,
}

/// Lot genealogy
///
/// Backward walks from a product to its inputs; forward walks from an input to every product
/// that contains it. Roles: operator, supervisor, quality, planner, admin.
#[utoipa::path(
    get, path = "/api/v1/lots/{lot}/genealogy", operation_id = "getGenealogy", tag = "traceability",
    params(("lot" = String, Path, description = "Lot or serial barcode", example = "BIKE-S0001"), GenealogyQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The genealogy graph", body = Genealogy),
        (status = 400, description = "`validation_failed`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: unknown lot", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn genealogy(
    State(state): State<AppState>,
    principal: Principal,
    Path(lot): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Genealogy>, Problem> {
    principal.require(READERS)?;
    let lot = path_ident("lot", &lot)?;
    let mut p = Params::new(query);
    let direction = match p.one_of("direction", &["backward", "forward"]).as_deref() {
        Some("forward") => pb::Direction::Forward,
        _ => pb::Direction::Backward,
    };
    let max_depth = p.integer("max_depth", 1, 50).unwrap_or(20);
    p.finish()?;
    let g = state
        .backends
        .call(
            TRACE_QUERY,
            "GetGenealogy",
            &principal.caller,
            pb::GenealogyRequest {
                lot,
                direction: direction as i32,
                max_depth: u32::try_from(max_depth).unwrap_or(20),
            },
            |req| {
                let mut client = state.backends.trace_query();
                async move { client.get_genealogy(req).await }
            },
        )
        .await?;
    let direction = match pb::Direction::try_from(g.direction) {
        Ok(pb::Direction::Forward) => "forward",
        Ok(pb::Direction::Backward) => "backward",
        _ => direction_name(direction),
    };
    Ok(Json(Genealogy {
        root: g.root,
        direction: direction.to_owned(),
        nodes: g
            .nodes
            .into_iter()
            .map(|n| GenealogyNode {
                lot: n.lot,
                material: n.material,
                work_order: opt(n.work_order),
                quantity: n.quantity,
                produced_at: time(n.produced_at),
                depth: n.depth,
                supplier: opt(n.supplier),
                supplier_lot: opt(n.supplier_lot),
            })
            .collect(),
        edges: g
            .edges
            .into_iter()
            .map(|e| GenealogyEdge {
                from: e.from,
                to: e.to,
                work_order: opt(e.work_order),
                quantity: e.quantity,
                station: opt(e.station),
                operator: opt(e.operator),
                at: time(e.at),
            })
            .collect(),
        truncated: g.truncated,
    }))
}

fn direction_name(d: pb::Direction) -> &'static str {
    if d == pb::Direction::Forward {
        "forward"
    } else {
        "backward"
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LotEvent {
    pub scan_id: String,
    pub kind: String,
    pub work_order: Option<String>,
    pub station: Option<String>,
    pub operator: Option<String>,
    pub quantity: Option<String>,
    pub scanned_at: Option<String>,
    pub received_at: Option<String>,
    /// Trace id of the request that stored the scan.
    pub trace_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LotHistory {
    pub lot: String,
    /// In time order.
    pub events: Vec<LotEvent>,
}

/// Lot history
///
/// Every scan that touched the lot, in time order. Roles: operator, supervisor, quality,
/// planner, admin.
#[utoipa::path(
    get, path = "/api/v1/lots/{lot}/history", operation_id = "getLotHistory", tag = "traceability",
    params(("lot" = String, Path, description = "Lot or serial barcode")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The lot's history", body = LotHistory),
        (status = 400, description = "`validation_failed`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn history(
    State(state): State<AppState>,
    principal: Principal,
    Path(lot): Path<String>,
) -> Result<Json<LotHistory>, Problem> {
    principal.require(READERS)?;
    let lot = path_ident("lot", &lot)?;
    let h = state
        .backends
        .call(
            TRACE_QUERY,
            "GetLotHistory",
            &principal.caller,
            pb::LotHistoryRequest { lot },
            |req| {
                let mut client = state.backends.trace_query();
                async move { client.get_lot_history(req).await }
            },
        )
        .await?;
    Ok(Json(LotHistory {
        lot: h.lot,
        events: h
            .events
            .into_iter()
            .map(|e| LotEvent {
                scan_id: e.scan_id,
                kind: e.kind,
                work_order: opt(e.work_order),
                station: opt(e.station),
                operator: opt(e.operator),
                quantity: opt(e.quantity),
                scanned_at: time(e.scanned_at),
                received_at: time(e.received_at),
                trace_id: opt(e.trace_id),
            })
            .collect(),
    }))
}
