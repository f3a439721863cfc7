//! `GET /api/v1/reports/production` (JSON, or CSV with `Accept: text/csv`).

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::{Duration, Utc};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

use mes_proto::v1 as pb;

use crate::AppState;
use crate::auth::{PLANNER, Principal, QUALITY};
use crate::clients::TRACE_QUERY;
use crate::input::Params;
use crate::problem::{FieldError, Problem};
use crate::routes::timestamp;

#[derive(Debug, Serialize, ToSchema)]
pub struct ReportRow {
    /// The hour (RFC 3339), station, material or work order.
    pub key: String,
    /// Good quantity (decimal string).
    pub good: String,
    /// Scrapped quantity (decimal string).
    pub scrap: String,
    pub scans: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProductionReport {
    pub rows: Vec<ReportRow>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ReportQuery {
    /// Start (RFC 3339, inclusive); default 24 hours before `to`.
    from: Option<String>,
    /// End (RFC 3339, exclusive); default now.
    to: Option<String>,
    /// `hour` (default) | `station` | `material` | `work_order`.
    group_by: Option<String>,
}

fn csv_field(s: &str) -> String {
    // Quote, and neutralise spreadsheet formulas.
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// Production report
///
/// Good and scrap quantities and scan counts grouped by hour, station, material or work
/// order. Send `Accept: text/csv` for CSV. Roles: planner, quality, admin.
#[utoipa::path(
    get, path = "/api/v1/reports/production", operation_id = "getProductionReport", tag = "reports",
    params(ReportQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The report", content(
            (ProductionReport = "application/json"),
            (String = "text/csv", example = "key,good,scrap,scans\nST-10,10,0,4\n"),
        )),
        (status = 400, description = "`validation_failed` naming the parameter", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn production(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Response, Problem> {
    principal.require(&[PLANNER, QUALITY])?;
    let mut p = Params::new(query);
    let to = p.time("to");
    let from = p.time("from");
    let group_by = match p
        .one_of("group_by", &["hour", "station", "material", "work_order"])
        .as_deref()
    {
        Some("station") => pb::GroupBy::Station,
        Some("material") => pb::GroupBy::Material,
        Some("work_order") => pb::GroupBy::WorkOrder,
        _ => pb::GroupBy::Hour,
    };
    let to = to.unwrap_or_else(Utc::now);
    let from = from.unwrap_or(to - Duration::hours(24));
    if from >= to {
        p.errors.push(FieldError::new("from", "must be before to"));
    }
    p.finish()?;
    let report = state
        .backends
        .call(
            TRACE_QUERY,
            "GetProductionReport",
            &principal.caller,
            pb::ProductionReportRequest {
                from: Some(timestamp(from)),
                to: Some(timestamp(to)),
                group_by: group_by as i32,
            },
            |req| {
                let mut client = state.backends.trace_query();
                async move { client.get_production_report(req).await }
            },
        )
        .await?;
    let rows: Vec<ReportRow> = report
        .rows
        .into_iter()
        .map(|r| ReportRow {
            key: r.key,
            good: if r.good.is_empty() {
                "0".into()
            } else {
                r.good
            },
            scrap: if r.scrap.is_empty() {
                "0".into()
            } else {
                r.scrap
            },
            scans: r.scans,
        })
        .collect();
    let wants_csv = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/csv"));
    if wants_csv {
        let mut out = String::from("key,good,scrap,scans\n");
        for r in &rows {
            out.push_str(&format!(
                "{},{},{},{}\n",
                csv_field(&r.key),
                csv_field(&r.good),
                csv_field(&r.scrap),
                r.scans
            ));
        }
        let mut res = out.into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        return Ok(res);
    }
    Ok(Json(ProductionReport { rows }).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formula_safe() {
        assert_eq!(csv_field("ST-10"), "ST-10");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("=SUM(A1)"), "'=SUM(A1)");
        assert_eq!(csv_field("say \"hi\","), "\"say \"\"hi\"\",\"");
    }
}
