//! Reading a REST scan batch: its JSON into protobuf scans, then the contract's rules
//! (`mes_domain::scan::validate_batch`), errors named as the client wrote the fields.

use std::collections::HashSet;

use serde_json::Value;

use mes_proto::v1 as pb;

use crate::input::{Fields, MAX_TEXT};
use crate::problem::{FieldError, Problem};
use crate::routes::timestamp;

pub const MAX_SCANS: usize = mes_domain::scan::MAX_BATCH;

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
use mes_domain::scan::FIELDS as SCAN_FIELDS;

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
