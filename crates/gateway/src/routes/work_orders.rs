//! `GET /api/v1/work-orders`, `GET /api/v1/work-orders/{number}`,
//! `GET /api/v1/work-orders/{number}/summary`.

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use mes_proto::v1 as pb;

use crate::AppState;
use crate::auth::{OPERATOR, PLANNER, Principal, QUALITY, SUPERVISOR};
use crate::clients::{SCAN_INGEST, TRACE_QUERY};
use crate::input::{Params, path_ident};
use crate::problem::Problem;
use crate::routes::{opt, time};

pub const STATUSES: &[&str] = &[
    "released",
    "in_progress",
    "completed",
    "closed",
    "cancelled",
];

#[derive(Debug, Serialize, ToSchema)]
pub struct Operation {
    pub step: u32,
    pub station: String,
    pub description: String,
    /// `pending` | `in_progress` | `completed`.
    pub status: String,
    pub good_quantity: String,
    pub scrap_quantity: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Component {
    pub material: String,
    pub quantity_per_unit: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkOrder {
    #[schema(example = "WO-1000")]
    pub number: String,
    pub material: String,
    pub planned_quantity: String,
    /// `released` | `in_progress` | `completed` | `closed` | `cancelled`.
    pub status: String,
    pub operations: Vec<Operation>,
    pub components: Vec<Component>,
    pub produced_quantity: String,
    pub scrap_quantity: String,
}

impl From<pb::WorkOrder> for WorkOrder {
    fn from(w: pb::WorkOrder) -> Self {
        let zero = |s: String| if s.is_empty() { "0".to_owned() } else { s };
        Self {
            number: w.number,
            material: w.material,
            planned_quantity: zero(w.planned_quantity),
            status: w.status,
            operations: w
                .operations
                .into_iter()
                .map(|o| Operation {
                    step: o.step,
                    station: o.station,
                    description: o.description,
                    status: o.status,
                    good_quantity: zero(o.good_quantity),
                    scrap_quantity: zero(o.scrap_quantity),
                })
                .collect(),
            components: w
                .components
                .into_iter()
                .map(|c| Component {
                    material: c.material,
                    quantity_per_unit: c.quantity_per_unit,
                })
                .collect(),
            produced_quantity: zero(w.produced_quantity),
            scrap_quantity: zero(w.scrap_quantity),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkOrderPage {
    pub items: Vec<WorkOrder>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct WorkOrderQuery {
    /// Only orders with an operation at this station.
    station: Option<String>,
    /// `released` | `in_progress` | `completed` | `closed` | `cancelled`.
    status: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// List work orders
///
/// Roles: operator, supervisor, quality, admin.
#[utoipa::path(
    get, path = "/api/v1/work-orders", operation_id = "listWorkOrders", tag = "work-orders",
    params(WorkOrderQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of work orders", body = WorkOrderPage),
        (status = 400, description = "`validation_failed` naming the parameter", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<WorkOrderPage>, Problem> {
    principal.require(&[OPERATOR, SUPERVISOR, QUALITY])?;
    let mut p = Params::new(query);
    let station = p.ident("station").unwrap_or_default();
    let status = p.one_of("status", STATUSES).unwrap_or_default();
    let limit = p.integer("limit", 1, 500).unwrap_or(50);
    let cursor = p.get("cursor").unwrap_or_default();
    if cursor.len() > 512 || cursor.chars().any(char::is_control) {
        p.errors.push(crate::problem::FieldError::new(
            "cursor",
            "is not a cursor returned by this API",
        ));
    }
    p.finish()?;
    let page = state
        .backends
        .call(
            SCAN_INGEST,
            "ListWorkOrders",
            &principal.caller,
            pb::ListWorkOrdersRequest {
                station,
                status,
                limit: u32::try_from(limit).unwrap_or(50),
                cursor,
            },
            |req| {
                let mut client = state.backends.scan_ingest();
                async move { client.list_work_orders(req).await }
            },
        )
        .await?;
    Ok(Json(WorkOrderPage {
        items: page.items.into_iter().map(WorkOrder::from).collect(),
        next_cursor: opt(page.next_cursor),
    }))
}

/// Get a work order
///
/// Roles: operator, supervisor, quality, admin.
#[utoipa::path(
    get, path = "/api/v1/work-orders/{number}", operation_id = "getWorkOrder", tag = "work-orders",
    params(("number" = String, Path, description = "Work order number", example = "WO-1000")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The work order", body = WorkOrder),
        (status = 400, description = "`validation_failed`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(number): Path<String>,
) -> Result<Json<WorkOrder>, Problem> {
    principal.require(&[OPERATOR, SUPERVISOR, QUALITY])?;
    let number = path_ident("number", &number)?;
    let wo = state
        .backends
        .call(
            SCAN_INGEST,
            "GetWorkOrder",
            &principal.caller,
            pb::GetWorkOrderRequest { number },
            |req| {
                let mut client = state.backends.scan_ingest();
                async move { client.get_work_order(req).await }
            },
        )
        .await?;
    Ok(Json(wo.into()))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OperationSummary {
    pub step: u32,
    pub station: String,
    pub good_quantity: String,
    pub scrap_quantity: String,
    pub first_scan_at: Option<String>,
    pub last_scan_at: Option<String>,
    pub mean_cycle_seconds: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkOrderSummary {
    pub work_order: String,
    pub planned_quantity: String,
    pub produced_quantity: String,
    pub operations: Vec<OperationSummary>,
}

/// Work-order summary
///
/// Yield and scrap per operation, cycle times (from trace-query). Roles: operator,
/// supervisor, quality, planner, admin.
#[utoipa::path(
    get, path = "/api/v1/work-orders/{number}/summary", operation_id = "getWorkOrderSummary", tag = "work-orders",
    params(("number" = String, Path, description = "Work order number", example = "WO-1000")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The summary", body = WorkOrderSummary),
        (status = 400, description = "`validation_failed`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn summary(
    State(state): State<AppState>,
    principal: Principal,
    Path(number): Path<String>,
) -> Result<Json<WorkOrderSummary>, Problem> {
    principal.require(&[OPERATOR, SUPERVISOR, QUALITY, PLANNER])?;
    let work_order = path_ident("number", &number)?;
    let s = state
        .backends
        .call(
            TRACE_QUERY,
            "GetWorkOrderSummary",
            &principal.caller,
            pb::WorkOrderSummaryRequest { work_order },
            |req| {
                let mut client = state.backends.trace_query();
                async move { client.get_work_order_summary(req).await }
            },
        )
        .await?;
    Ok(Json(WorkOrderSummary {
        work_order: s.work_order,
        planned_quantity: s.planned_quantity,
        produced_quantity: s.produced_quantity,
        operations: s
            .operations
            .into_iter()
            .map(|o| OperationSummary {
                step: o.step,
                station: o.station,
                good_quantity: o.good_quantity,
                scrap_quantity: o.scrap_quantity,
                first_scan_at: time(o.first_scan_at),
                last_scan_at: time(o.last_scan_at),
                mean_cycle_seconds: if o.mean_cycle_seconds.is_finite() {
                    o.mean_cycle_seconds
                } else {
                    0.0
                },
            })
            .collect(),
    }))
}
