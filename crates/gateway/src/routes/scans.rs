//! `POST /api/v1/scans`, `GET /api/v1/scans/{scan_id}`, `POST /api/v1/scans/{scan_id}/void`.

use std::collections::HashSet;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use mes_proto::v1 as pb;

use crate::AppState;
use crate::auth::{ADMIN, OPERATOR, PLANNER, Principal, QUALITY, SUPERVISOR};
use crate::clients::SCAN_INGEST;
use crate::input::{Fields, MAX_TEXT, json_body};
use crate::problem::{FieldError, Problem};
use crate::routes::{opt, time, timestamp};

pub const MAX_SCANS: usize = mes_domain::scan::MAX_BATCH;

/// Scan kinds a client may submit (`void` is created by the void operation only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum ScanKind {
    StartOperation,
    Consume,
    Produce,
    CompleteOperation,
    Scrap,
    Move,
    Inspect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum InspectResult {
    Pass,
    Fail,
}

/// One scan. Required fields depend on `kind`: `work_order` for all but `move`; `operation`
/// for `start_operation` and `complete_operation`; `lot` for `consume`, `produce`, `scrap`,
/// `move`, `inspect`; `quantity` for `consume`, `produce`, `scrap`, `move`; `location` for
/// `move`; `result` for `inspect`; `defect_code` for `scrap` and failed `inspect`.
/// Identifiers are 1 to 64 characters of letters, digits and `. _ : / # + -`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ScanInput {
    /// Client-generated idempotency key.
    #[schema(format = Uuid, example = "0f8fad5b-d9cb-469f-a165-70867728950e")]
    scan_id: String,
    kind: ScanKind,
    #[schema(example = "WO-1000")]
    work_order: Option<String>,
    /// Routing step number.
    #[schema(minimum = 1, example = 10)]
    operation: Option<u32>,
    #[schema(example = "ST-10")]
    station: String,
    #[schema(example = "STEEL-L1")]
    lot: Option<String>,
    /// For `produce` of a new lot (for `consume` it is known from the lot).
    material: Option<String>,
    /// Decimal string > 0.
    #[schema(pattern = r"^[0-9]+(\.[0-9]+)?$", example = "25")]
    quantity: Option<String>,
    /// For `consume`: the output lot or serial this component went into.
    into_lot: Option<String>,
    /// For `move`: the destination.
    location: Option<String>,
    result: Option<InspectResult>,
    defect_code: Option<String>,
    /// Device clock, RFC 3339 with offset.
    #[schema(format = DateTime, example = "2025-03-01T08:15:30Z")]
    scanned_at: String,
    /// Free key/values, at most 4 KiB serialised.
    #[schema(value_type = Option<Object>)]
    attributes: Option<Value>,
}

/// 1 to 500 scans; each stands alone.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ScanBatch {
    #[schema(min_items = 1, max_items = 500)]
    scans: Vec<ScanInput>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ScanError {
    /// `conflict`, `unknown_work_order`, `work_order_closed`, `unknown_lot`,
    /// `insufficient_quantity`, `not_in_bom`, `wrong_station`, `invalid_operation`,
    /// `lot_on_hold`, `wrong_material`, …
    pub code: String,
    pub message: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ScanResult {
    pub scan_id: String,
    /// `accepted` | `duplicate` | `rejected`; accepted and duplicate mean durably stored.
    #[schema(example = "accepted")]
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ScanError>,
}

/// Results in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScanResults {
    pub results: Vec<ScanResult>,
}

/// A stored scan.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoredScan {
    pub scan_id: String,
    /// A submitted kind, or `void` for the compensating record of an undo.
    pub kind: String,
    pub work_order: Option<String>,
    pub operation: Option<u32>,
    pub station: Option<String>,
    pub lot: Option<String>,
    pub material: Option<String>,
    pub quantity: Option<String>,
    pub into_lot: Option<String>,
    pub location: Option<String>,
    pub result: Option<String>,
    pub defect_code: Option<String>,
    pub scanned_at: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<Value>,
    pub received_at: Option<String>,
    /// `active` | `voided`.
    pub status: String,
    /// The void scan's id, when voided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voided_by: Option<String>,
    /// For a void scan: the scan it reverses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voids: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The user who submitted it.
    pub operator: Option<String>,
    pub device: Option<String>,
    /// Trace id of the request that stored it.
    pub trace_id: Option<String>,
}

/// `confirm: false` (default) previews; `confirm: true` applies the reversal.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct VoidRequest {
    #[schema(max_length = 500)]
    reason: String,
    confirm: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Effect {
    /// `inventory` | `work_order` | `lot_status` | `operation_status`.
    pub kind: String,
    pub target: String,
    /// Signed decimal change, when the effect is a quantity.
    pub delta: Option<String>,
    pub description: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VoidPreview {
    pub effects: Vec<Effect>,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VoidApplied {
    pub void_scan_id: String,
    pub effects: Vec<Effect>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum VoidOutcome {
    Preview(VoidPreview),
    Applied(VoidApplied),
}

/// Reads one scan's JSON into its protobuf form, refusing only what JSON itself gets wrong
/// (types, a `scan_id` that is no UUID, an unknown kind or result, a time that is no RFC 3339,
/// unknown fields); the contract's rules (which fields each kind needs, identifiers,
/// quantities, the time window) are `mes_domain::scan::validate_batch`'s, run on the whole
/// batch by [`parse_batch`]. Errors name `scans[i].field`; a field in error is left empty.
fn parse_scan(value: &Value, index: usize, errors: &mut Vec<FieldError>) -> pb::Scan {
    let mut f = Fields::new(value, &format!("scans[{index}]"));

    let scan_id = match f.string("scan_id", true, 64) {
        Some(s) => match uuid::Uuid::parse_str(&s) {
            Ok(u) => Some(u.hyphenated().to_string()),
            Err(_) => {
                f.error("scan_id", "must be a UUID");
                None
            }
        },
        None => None,
    };
    let kind = match f.string("kind", true, 64) {
        Some(k) => match mes_domain::ScanKind::parse(&k) {
            Some(mes_domain::ScanKind::Void) => {
                f.error(
                    "kind",
                    "void scans are created with POST /api/v1/scans/{scan_id}/void",
                );
                None
            }
            Some(kind) => Some(kind),
            None => {
                f.error(
                    "kind",
                    format!("must be one of: {}", mes_domain::ScanKind::SUBMITTABLE),
                );
                None
            }
        },
        None => None,
    };
    let text = |f: &mut Fields, name: &'static str| f.string(name, false, MAX_TEXT);
    let work_order = text(&mut f, "work_order");
    let operation = f.integer(
        "operation",
        false,
        1,
        u64::from(mes_domain::scan::MAX_OPERATION),
    );
    let station = text(&mut f, "station");
    let lot = text(&mut f, "lot");
    let material = text(&mut f, "material");
    let quantity = text(&mut f, "quantity");
    let into_lot = text(&mut f, "into_lot");
    let location = text(&mut f, "location");
    let result = match f.string("result", false, 16) {
        Some(r) => match mes_domain::InspectResult::parse(&r) {
            Some(r) => Some(r),
            None => {
                f.error("result", "must be pass or fail");
                None
            }
        },
        None => None,
    };
    let defect_code = text(&mut f, "defect_code");
    let scanned_at = match f.string("scanned_at", true, 64) {
        Some(s) => match chrono::DateTime::parse_from_rfc3339(&s) {
            Ok(t) => Some(timestamp(t.with_timezone(&chrono::Utc))),
            Err(_) => {
                f.error(
                    "scanned_at",
                    "must be an RFC 3339 time with offset, e.g. 2025-03-01T08:15:30Z",
                );
                None
            }
        },
        None => None,
    };
    let attributes_json = match f.raw("attributes") {
        None => String::new(),
        Some(v @ Value::Object(_)) => serde_json::to_string(v).unwrap_or_default(),
        Some(other) => {
            f.error(
                "attributes",
                format!("must be an object, not {}", crate::input::type_name(other)),
            );
            String::new()
        }
    };

    errors.extend(f.finish());
    pb::Scan {
        scan_id: scan_id.unwrap_or_default(),
        kind: kind.map_or(0, |k| k.to_proto() as i32),
        work_order: work_order.unwrap_or_default(),
        operation: operation.and_then(|o| u32::try_from(o).ok()).unwrap_or(0),
        station: station.unwrap_or_default(),
        lot: lot.unwrap_or_default(),
        material: material.unwrap_or_default(),
        quantity: quantity.unwrap_or_default(),
        into_lot: into_lot.unwrap_or_default(),
        location: location.unwrap_or_default(),
        result: result.map_or(0, |r| r.to_proto() as i32),
        defect_code: defect_code.unwrap_or_default(),
        scanned_at,
        attributes_json,
    }
}

/// The fields of a scan in the contract's order: errors are listed in it.
const SCAN_FIELDS: [&str; 14] = [
    "scan_id",
    "kind",
    "work_order",
    "operation",
    "station",
    "lot",
    "material",
    "quantity",
    "into_lot",
    "location",
    "result",
    "defect_code",
    "scanned_at",
    "attributes",
];

/// Where an error goes in the list: the batch's own first, then by scan, then by field in
/// the contract's order, unknown fields last.
fn field_order(field: &str) -> (usize, usize) {
    let Some((index, rest)) = field
        .strip_prefix("scans[")
        .and_then(|r| r.split_once(']'))
        .and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest)))
    else {
        return (0, 0);
    };
    let rank = match rest.strip_prefix('.') {
        None => 0,
        Some(name) => SCAN_FIELDS
            .iter()
            .position(|f| *f == name)
            .map_or(SCAN_FIELDS.len() + 1, |p| p + 1),
    };
    (index + 1, rank)
}

/// Validates the whole body: `{"scans": [1..=500 scans]}`.
pub fn parse_batch(body: &Value) -> Result<Vec<pb::Scan>, Problem> {
    let mut f = Fields::new(body, "");
    if !body.is_object() {
        return Err(Problem::validation(f.finish()));
    }
    let scans = f.raw("scans");
    let mut errors = Vec::new();
    let mut out = Vec::new();
    match scans {
        None => f.error("scans", "is required"),
        Some(Value::Array(items)) if items.is_empty() => {
            f.error("scans", "must hold at least one scan")
        }
        Some(Value::Array(items)) if items.len() > MAX_SCANS => f.error(
            "scans",
            format!("must hold at most {MAX_SCANS} scans, not {}", items.len()),
        ),
        Some(Value::Array(items)) => {
            // Each item's JSON first, then the contract's rules over the whole batch; a field
            // whose JSON was wrong, or an item that is no object, is named once, for that.
            out = items
                .iter()
                .enumerate()
                .map(|(i, item)| parse_scan(item, i, &mut errors))
                .collect();
            if let Err(violations) = mes_domain::scan::validate_batch(&out, chrono::Utc::now()) {
                let named: HashSet<String> = errors.iter().map(|e| e.field.clone()).collect();
                errors.extend(
                    violations
                        .into_iter()
                        .filter(|v| {
                            !named.contains(&v.field)
                                && !v
                                    .field
                                    .split_once('.')
                                    .is_some_and(|(item, _)| named.contains(item))
                        })
                        .map(|v| FieldError::new(v.field, v.message)),
                );
            }
            errors.sort_by_key(|e| field_order(&e.field));
        }
        Some(other) => f.error(
            "scans",
            format!("must be an array, not {}", crate::input::type_name(other)),
        ),
    }
    let mut all = f.finish();
    all.extend(errors);
    if all.is_empty() {
        Ok(out)
    } else {
        Err(Problem::validation(all))
    }
}

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
