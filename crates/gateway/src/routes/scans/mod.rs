//! `POST /api/v1/scans`, `GET /api/v1/scans/{scan_id}`, `POST /api/v1/scans/{scan_id}/void`:
//! the handlers here, the REST shapes in [`schema`], reading a batch in [`parse`].

mod parse;
mod schema;

pub use parse::{MAX_SCANS, parse_batch};
pub use schema::*;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use serde_json::Value;

use mes_proto::v1 as pb;

use crate::AppState;
use crate::auth::{ADMIN, OPERATOR, PLANNER, Principal, QUALITY, SUPERVISOR};
use crate::clients::SCAN_INGEST;
use crate::input::{Fields, MAX_TEXT, json_body};
use crate::problem::Problem;
use crate::routes::{opt, time};

/// Who may submit which scan: supervisors and admins anywhere, operators at the station of
/// their device, quality staff `inspect` scans; and a token bound to a station only ever at
/// that station.
pub fn authorize(principal: &Principal, scans: &[pb::Scan]) -> Result<(), Problem> {
    let bound = principal.claims.station.as_deref();
    let anywhere = principal.has(SUPERVISOR) || principal.has(ADMIN);
    for (i, scan) in scans.iter().enumerate() {
        if let Some(station) = bound
            && scan.station != station
        {
            return Err(Problem::forbidden(format!(
                "scans[{i}].station: this device is bound to station {station}"
            )));
        }
        let operator_here = principal.has(OPERATOR) && bound.is_some();
        let inspector = principal.has(QUALITY) && scan.kind == pb::ScanKind::Inspect as i32;
        if !(anywhere || operator_here || inspector) {
            let why = if principal.has(OPERATOR) {
                "operators scan from a device enrolled at their station (log in with device_id)"
            } else if principal.has(QUALITY) {
                "quality staff may submit inspect scans only"
            } else {
                "this role may not submit scans"
            };
            return Err(Problem::forbidden(format!("scans[{i}]: {why}")));
        }
    }
    Ok(())
}

fn status_name(status: i32) -> &'static str {
    match pb::ScanStatus::try_from(status) {
        Ok(pb::ScanStatus::Accepted) => "accepted",
        Ok(pb::ScanStatus::Duplicate) => "duplicate",
        _ => "rejected",
    }
}

/// Submit a batch of scans
///
/// Validates every scan (errors name the field, e.g. `scans[3].quantity`) and forwards the
/// batch to scan-ingest, which commits it durably. Roles: operator (at the station of their
/// device), supervisor, quality (`inspect` only), admin. A token bound to a station may only
/// submit scans for that station.
#[utoipa::path(
    post, path = "/api/v1/scans", operation_id = "submitScans", tag = "scans",
    request_body = ScanBatch,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One result per scan, in request order", body = ScanResults),
        (status = 400, description = "`malformed_json` or `validation_failed` (naming each field)", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: role, or a station other than the device's", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn submit(
    State(state): State<AppState>,
    principal: Principal,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ScanResults>, Problem> {
    principal.require(&[OPERATOR, SUPERVISOR, QUALITY])?;
    let value = json_body(body, state.settings.max_body_bytes)?;
    let scans = parse_batch(&value)?;
    authorize(&principal, &scans)?;
    let count = scans.len();
    let response = state
        .backends
        .call(
            SCAN_INGEST,
            "SubmitScans",
            &principal.caller,
            pb::SubmitScansRequest { scans },
            |req| {
                let mut client = state.backends.scan_ingest();
                async move { client.submit_scans(req).await }
            },
        )
        .await?;
    if response.results.len() != count {
        tracing::error!(
            sent = count,
            received = response.results.len(),
            "scan-ingest answered a different number of results"
        );
    }
    let results = response
        .results
        .into_iter()
        .map(|r| ScanResult {
            scan_id: r.scan_id,
            status: status_name(r.status).to_owned(),
            error: r.error.and_then(|e| {
                (!e.code.is_empty() || !e.message.is_empty()).then_some(ScanError {
                    code: e.code,
                    message: e.message,
                })
            }),
        })
        .collect();
    Ok(Json(ScanResults { results }))
}

fn scan_id_path(raw: &str) -> Result<String, Problem> {
    uuid::Uuid::parse_str(raw)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| Problem::field("scan_id", "must be a UUID"))
}

fn trace_id_of(traceparent: &str) -> Option<String> {
    let id = traceparent.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

/// Get a stored scan
///
/// Roles: operator, supervisor, quality, planner, admin.
#[utoipa::path(
    get, path = "/api/v1/scans/{scan_id}", operation_id = "getScan", tag = "scans",
    params(("scan_id" = String, Path, format = Uuid, description = "The scan's id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The stored scan", body = StoredScan),
        (status = 400, description = "`validation_failed`: not a UUID", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn get_scan(
    State(state): State<AppState>,
    principal: Principal,
    Path(scan_id): Path<String>,
) -> Result<Json<StoredScan>, Problem> {
    principal.require(&[OPERATOR, SUPERVISOR, QUALITY, PLANNER])?;
    let scan_id = scan_id_path(&scan_id)?;
    let stored = state
        .backends
        .call(
            SCAN_INGEST,
            "GetScan",
            &principal.caller,
            pb::GetScanRequest { scan_id },
            |req| {
                let mut client = state.backends.scan_ingest();
                async move { client.get_scan(req).await }
            },
        )
        .await?;
    let scan = stored.scan.unwrap_or_default();
    let kind = pb::ScanKind::try_from(scan.kind).unwrap_or(pb::ScanKind::Unspecified);
    let result = match pb::InspectResult::try_from(scan.result) {
        Ok(pb::InspectResult::Pass) => Some("pass".to_owned()),
        Ok(pb::InspectResult::Fail) => Some("fail".to_owned()),
        _ => None,
    };
    let attributes = (!scan.attributes_json.is_empty())
        .then(|| serde_json::from_str::<Value>(&scan.attributes_json).ok())
        .flatten();
    Ok(Json(StoredScan {
        scan_id: scan.scan_id,
        kind: mes_domain::ScanKind::name_of(kind as i32).to_owned(),
        work_order: opt(scan.work_order),
        operation: (scan.operation > 0).then_some(scan.operation),
        station: opt(scan.station),
        lot: opt(scan.lot),
        material: opt(scan.material).or_else(|| opt(stored.material)),
        quantity: opt(scan.quantity),
        into_lot: opt(scan.into_lot),
        location: opt(scan.location),
        result,
        defect_code: opt(scan.defect_code),
        scanned_at: time(scan.scanned_at),
        attributes,
        received_at: time(stored.received_at),
        status: opt(stored.status).unwrap_or_else(|| "active".to_owned()),
        voided_by: opt(stored.voided_by),
        voids: opt(stored.voids),
        reason: opt(stored.reason),
        operator: opt(stored.operator),
        device: opt(stored.device),
        trace_id: trace_id_of(&stored.traceparent),
    }))
}

fn effects(list: Vec<pb::Effect>) -> Vec<Effect> {
    list.into_iter()
        .map(|e| Effect {
            kind: e.kind,
            target: e.target,
            delta: opt(e.delta),
            description: e.description,
        })
        .collect()
}

/// Void (undo) a scan
///
/// Supervisor only (and admin). Without `confirm` (or with `confirm: false`) previews the
/// reversal and changes nothing; with `confirm: true` applies it as a new `void` scan, or
/// answers 409 `conflict` when the reversal would break consistency (explained in `detail`).
#[utoipa::path(
    post, path = "/api/v1/scans/{scan_id}/void", operation_id = "voidScan", tag = "scans",
    params(("scan_id" = String, Path, format = Uuid, description = "The scan to void")),
    request_body = VoidRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Preview (`confirm: false`) or the applied void (`confirm: true`)", body = VoidOutcome),
        (status = 400, description = "`malformed_json` or `validation_failed`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: supervisors only", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`conflict`: the reversal would break consistency", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    )
)]
pub async fn void_scan(
    State(state): State<AppState>,
    principal: Principal,
    Path(scan_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<VoidOutcome>, Problem> {
    principal.require(&[SUPERVISOR])?;
    let scan_id = scan_id_path(&scan_id)?;
    let value = json_body(body, state.settings.max_body_bytes)?;
    let mut f = Fields::new(&value, "");
    let reason = f.string("reason", true, MAX_TEXT);
    let confirm = f.boolean("confirm", false).unwrap_or(false);
    let errors = f.finish();
    let Some(reason) = reason.filter(|_| errors.is_empty()) else {
        return Err(Problem::validation(errors));
    };
    let response = state
        .backends
        .call(
            SCAN_INGEST,
            "VoidScan",
            &principal.caller,
            pb::VoidScanRequest {
                scan_id,
                reason,
                confirm,
            },
            |req| {
                let mut client = state.backends.scan_ingest();
                async move { client.void_scan(req).await }
            },
        )
        .await
        .map_err(|p| {
            // A refused confirmed reversal is a conflict with the current state.
            if confirm && p.code == "validation_failed" && p.errors.is_empty() {
                Problem::conflict(p.detail)
            } else {
                p
            }
        })?;
    if !confirm {
        return Ok(Json(VoidOutcome::Preview(VoidPreview {
            effects: effects(response.effects),
            allowed: response.allowed,
            why: opt(response.why),
        })));
    }
    if response.void_scan_id.is_empty() {
        return Err(Problem::conflict(opt(response.why).unwrap_or_else(|| {
            "the reversal would break consistency".to_owned()
        })));
    }
    Ok(Json(VoidOutcome::Applied(VoidApplied {
        void_scan_id: response.void_scan_id,
        effects: effects(response.effects),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scan(extra: Value) -> Value {
        // A new scan id each time: the same id twice in a batch is refused.
        let mut base = json!({
            "scan_id": uuid::Uuid::new_v4().to_string(),
            "kind": "consume", "work_order": "WO-1000", "station": "ST-10",
            "lot": "STEEL-L1", "quantity": "25", "scanned_at": "2025-03-01T08:15:30Z"
        });
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        base
    }

    fn fields(p: Problem) -> Vec<String> {
        p.errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_valid_scan_becomes_a_proto_scan() {
        let scans =
            parse_batch(&json!({"scans": [scan(json!({"attributes": {"shift": "A"}}))]})).unwrap();
        assert_eq!(scans[0].kind, pb::ScanKind::Consume as i32);
        assert_eq!(scans[0].quantity, "25");
        assert_eq!(scans[0].attributes_json, r#"{"shift":"A"}"#);
        assert_eq!(scans[0].scanned_at.as_ref().unwrap().seconds, 1_740_816_930);
    }

    #[test]
    fn errors_name_the_field_of_the_scan() {
        let body = json!({"scans": [scan(json!({})), scan(json!({"quantity": "0"})),
            scan(json!({"quantity": 5, "scan_id": "nope", "bogus": 1}))]});
        let f = fields(parse_batch(&body).unwrap_err());
        assert_eq!(
            f,
            vec![
                "scans[1].quantity",
                "scans[2].scan_id",
                "scans[2].quantity",
                "scans[2].bogus"
            ]
        );
    }

    #[test]
    fn required_fields_depend_on_the_kind() {
        let mv = json!({"scans": [{"scan_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
            "kind": "move", "station": "ST-10", "scanned_at": "2025-03-01T08:15:30Z"}]});
        assert_eq!(
            fields(parse_batch(&mv).unwrap_err()),
            vec!["scans[0].lot", "scans[0].quantity", "scans[0].location"]
        );
        let inspect = json!({"scans": [scan(json!({"kind": "inspect", "result": "fail", "quantity": null}))]});
        assert_eq!(
            fields(parse_batch(&inspect).unwrap_err()),
            vec!["scans[0].defect_code"]
        );
        let start = json!({"scans": [scan(json!({"kind": "start_operation", "lot": null, "quantity": null}))]});
        assert_eq!(
            fields(parse_batch(&start).unwrap_err()),
            vec!["scans[0].operation"]
        );
    }

    #[test]
    fn batch_shape_is_checked() {
        assert_eq!(fields(parse_batch(&json!({})).unwrap_err()), vec!["scans"]);
        assert_eq!(
            fields(parse_batch(&json!({"scans": []})).unwrap_err()),
            vec!["scans"]
        );
        assert_eq!(fields(parse_batch(&json!([1])).unwrap_err()), vec!["body"]);
        let many: Vec<Value> = (0..501).map(|_| scan(json!({}))).collect();
        assert_eq!(
            fields(parse_batch(&json!({"scans": many})).unwrap_err()),
            vec!["scans"]
        );
        let big = json!({"x": "y".repeat(5000)});
        assert_eq!(
            fields(parse_batch(&json!({"scans": [scan(json!({"attributes": big}))]})).unwrap_err()),
            vec!["scans[0].attributes"]
        );
    }
}

#[cfg(test)]
mod proptests;
