//! The inbound contract: the canonical JSON shape of master-data records (the file adapter's
//! plant file and the generic REST/JSON contract). Every record is checked against it; records
//! that break it are rejected with the reasons (they go to the dead-letter table), unknown
//! fields are noted (interface-drift monitoring) without rejecting the record.

use std::collections::BTreeSet;
use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use crate::domain::{
    ComponentSpec, Material, OperationSpec, OrderStatus, ReceivedLot, Station, Tracking, WorkOrder,
};

const MAX_ID_LEN: usize = 128;

/// How a payload departs from the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DriftKind {
    /// A required field is absent (or null).
    MissingField,
    /// A field has another JSON type than the contract's (e.g. a number for a decimal string).
    WrongType,
    /// The type is right, the value is not (an empty id, a negative quantity, an unknown status).
    InvalidValue,
    /// A field the contract does not know: noted, the record is still used.
    UnknownField,
    /// The record had the right shape but the MES refused it (e.g. an unknown material).
    RejectedByMes,
    /// The whole document could not be read (not JSON, not an object).
    Unreadable,
}

impl DriftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::MissingField => "missing_field",
            DriftKind::WrongType => "wrong_type",
            DriftKind::InvalidValue => "invalid_value",
            DriftKind::UnknownField => "unknown_field",
            DriftKind::RejectedByMes => "rejected_by_mes",
            DriftKind::Unreadable => "unreadable",
        }
    }

    /// Whether the record is unusable.
    pub fn rejects(self) -> bool {
        !matches!(self, DriftKind::UnknownField)
    }
}

impl fmt::Display for DriftKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One departure from the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub kind: DriftKind,
    /// The field's path in the record (`operations[1].station`); empty for the whole record.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.kind, self.message)
        } else {
            write!(f, "{} {}: {}", self.kind, self.field, self.message)
        }
    }
}

/// The result of checking one record.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked<T> {
    /// The record, when no drift rejects it.
    pub record: Option<T>,
    /// Its key (the identifying field, or `#<index>` when that is unusable).
    pub key: String,
    /// Every departure found (unknown fields included).
    pub drifts: Vec<Drift>,
    /// The record as received (kept for the dead-letter table).
    pub payload: Value,
}

/// Reads the fields of one JSON object, collecting drifts and the fields it knows.
struct Reader<'v, 'd> {
    obj: Option<&'v Map<String, Value>>,
    prefix: String,
    known: BTreeSet<&'static str>,
    drifts: &'d mut Vec<Drift>,
}

impl<'v, 'd> Reader<'v, 'd> {
    fn new(value: &'v Value, prefix: String, drifts: &'d mut Vec<Drift>) -> Self {
        let obj = value.as_object();
        if obj.is_none() {
            drifts.push(Drift {
                kind: DriftKind::WrongType,
                field: prefix.trim_end_matches('.').to_owned(),
                message: format!("must be an object, not {}", type_name(value)),
            });
        }
        Self {
            obj,
            prefix,
            known: BTreeSet::new(),
            drifts,
        }
    }

    fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn push(&mut self, kind: DriftKind, name: &str, message: impl Into<String>) {
        let field = self.path(name);
        self.drifts.push(Drift {
            kind,
            field,
            message: message.into(),
        });
    }

    /// The field's value; `None` when absent or null.
    fn get(&mut self, name: &'static str) -> Option<&'v Value> {
        self.known.insert(name);
        self.obj?.get(name).filter(|v| !v.is_null())
    }

    fn string(&mut self, name: &'static str, required: bool) -> Option<String> {
        let obj_ok = self.obj.is_some();
        match self.get(name) {
            None => {
                if required && obj_ok {
                    self.push(DriftKind::MissingField, name, "is required");
                }
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                let t = type_name(other);
                self.push(
                    DriftKind::WrongType,
                    name,
                    format!("must be a string, not {t}"),
                );
                None
            }
        }
    }

    /// A required identifier: non-empty, at most 128 characters, no surrounding spaces.
    fn id(&mut self, name: &'static str) -> Option<String> {
        let s = self.string(name, true)?;
        if s.trim().is_empty() {
            self.push(DriftKind::InvalidValue, name, "must not be empty");
            return None;
        }
        if s.len() > MAX_ID_LEN || s.trim() != s || s.chars().any(char::is_control) {
            self.push(
                DriftKind::InvalidValue,
                name,
                "must be at most 128 characters without surrounding spaces or control characters",
            );
            return None;
        }
        Some(s)
    }

    /// An optional free text (absent: empty).
    fn text(&mut self, name: &'static str) -> Option<String> {
        match self.get(name) {
            None => Some(String::new()),
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                let t = type_name(other);
                self.push(
                    DriftKind::WrongType,
                    name,
                    format!("must be a string, not {t}"),
                );
                None
            }
        }
    }

    /// A required positive decimal, as a JSON string (`"12.5"`), never a JSON number.
    fn decimal(&mut self, name: &'static str) -> Option<Decimal> {
        let obj_ok = self.obj.is_some();
        match self.get(name) {
            None => {
                if obj_ok {
                    self.push(DriftKind::MissingField, name, "is required");
                }
                None
            }
            Some(Value::String(s)) => match parse_quantity(s) {
                Ok(d) => Some(d.normalize()),
                Err(m) => {
                    self.push(DriftKind::InvalidValue, name, m);
                    None
                }
            },
            Some(other) => {
                let t = type_name(other);
                self.push(
                    DriftKind::WrongType,
                    name,
                    format!("must be a decimal string such as \"12.5\", not {t}"),
                );
                None
            }
        }
    }

    /// A required positive integer (a JSON number).
    fn step(&mut self, name: &'static str) -> Option<u32> {
        let obj_ok = self.obj.is_some();
        match self.get(name) {
            None => {
                if obj_ok {
                    self.push(DriftKind::MissingField, name, "is required");
                }
                None
            }
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if (1..=1_000_000).contains(&v) => u32::try_from(v).ok(),
                _ => {
                    self.push(
                        DriftKind::InvalidValue,
                        name,
                        "must be an integer from 1 to 1000000",
                    );
                    None
                }
            },
            Some(other) => {
                let t = type_name(other);
                self.push(
                    DriftKind::WrongType,
                    name,
                    format!("must be an integer, not {t}"),
                );
                None
            }
        }
    }

    /// An optional RFC 3339 time.
    fn time(&mut self, name: &'static str) -> Result<Option<DateTime<Utc>>, ()> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => match DateTime::parse_from_rfc3339(s) {
                Ok(t) => Ok(Some(t.with_timezone(&Utc))),
                Err(_) => {
                    self.push(DriftKind::InvalidValue, name, "must be an RFC 3339 time");
                    Err(())
                }
            },
            Some(other) => {
                let t = type_name(other);
                self.push(
                    DriftKind::WrongType,
                    name,
                    format!("must be an RFC 3339 string, not {t}"),
                );
                Err(())
            }
        }
    }

    /// A required array.
    fn array(&mut self, name: &'static str) -> Option<&'v Vec<Value>> {
        let obj_ok = self.obj.is_some();
        match self.get(name) {
            None => {
                if obj_ok {
                    self.push(DriftKind::MissingField, name, "is required");
                }
                None
            }
            Some(Value::Array(a)) => Some(a),
            Some(other) => {
                let t = type_name(other);
                self.push(
                    DriftKind::WrongType,
                    name,
                    format!("must be an array, not {t}"),
                );
                None
            }
        }
    }

    /// Notes every field the reader was not asked for.
    fn finish(self) {
        let Some(obj) = self.obj else { return };
        for key in obj.keys() {
            if !self.known.contains(key.as_str()) {
                self.drifts.push(Drift {
                    kind: DriftKind::UnknownField,
                    field: format!("{}{key}", self.prefix),
                    message: "is not part of the contract".into(),
                });
            }
        }
    }
}

/// The JSON type of a value, for messages (the gateway's words too).
pub use mes_common::errors::json_type as type_name;

/// A quantity from the ERP: the contract's one rule (`mes_domain::quantity`), so nothing is
/// pulled that scan-ingest would refuse.
pub use mes_domain::parse_quantity;

/// The record's key for logs and dead letters: its identifying field when it is a string.
fn key_of(value: &Value, field: &str, index: usize) -> String {
    value
        .get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= MAX_ID_LEN)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("#{index}"))
}

fn checked<T>(value: &Value, key: String, drifts: Vec<Drift>, build: Option<T>) -> Checked<T> {
    let record = if drifts.iter().any(|d| d.kind.rejects()) {
        None
    } else {
        build
    };
    Checked {
        record,
        key,
        drifts,
        payload: value.clone(),
    }
}

/// `{"number", "description"?, "tracking": "lot"|"serial", "unit"?}`
pub fn material(value: &Value, index: usize) -> Checked<Material> {
    let mut drifts = Vec::new();
    let mut r = Reader::new(value, String::new(), &mut drifts);
    let number = r.id("number");
    let description = r.text("description");
    let tracking = match r.string("tracking", true).as_deref() {
        Some("lot") => Some(Tracking::Lot),
        Some("serial") => Some(Tracking::Serial),
        Some(_) => {
            r.push(DriftKind::InvalidValue, "tracking", "must be lot or serial");
            None
        }
        None => None,
    };
    let unit = r.text("unit");
    r.finish();
    let build = (|| {
        Some(Material {
            number: number?,
            description: description?,
            tracking: tracking?,
            unit: match unit? {
                u if u.is_empty() => "pcs".to_owned(),
                u => u,
            },
        })
    })();
    checked(value, key_of(value, "number", index), drifts, build)
}

/// `{"id", "name"?}`
pub fn station(value: &Value, index: usize) -> Checked<Station> {
    let mut drifts = Vec::new();
    let mut r = Reader::new(value, String::new(), &mut drifts);
    let id = r.id("id");
    let name = r.text("name");
    r.finish();
    let build = (|| {
        Some(Station {
            id: id?,
            name: name?,
        })
    })();
    checked(value, key_of(value, "id", index), drifts, build)
}

/// `{"lot", "material", "quantity": "100", "supplier"?, "supplier_lot"?, "received_at"?}`
pub fn received_lot(value: &Value, index: usize) -> Checked<ReceivedLot> {
    let mut drifts = Vec::new();
    let mut r = Reader::new(value, String::new(), &mut drifts);
    let lot = r.id("lot");
    let material = r.id("material");
    let quantity = r.decimal("quantity");
    let supplier = r.text("supplier");
    let supplier_lot = r.text("supplier_lot");
    let received_at = r.time("received_at");
    r.finish();
    let build = (|| {
        Some(ReceivedLot {
            lot: lot?,
            material: material?,
            quantity: quantity?,
            supplier: supplier?,
            supplier_lot: supplier_lot?,
            received_at: received_at.ok()?,
        })
    })();
    checked(value, key_of(value, "lot", index), drifts, build)
}

/// `{"number", "material", "planned_quantity": "10", "status": "released"|"closed"|"cancelled",
/// "operations": [{"step": 10, "station", "description"?}], "components": [{"material",
/// "quantity_per_unit": "2.5"}]}`
pub fn work_order(value: &Value, index: usize) -> Checked<WorkOrder> {
    let mut drifts = Vec::new();
    let mut r = Reader::new(value, String::new(), &mut drifts);
    let number = r.id("number");
    let material = r.id("material");
    let planned_quantity = r.decimal("planned_quantity");
    let status = match r.string("status", true).as_deref() {
        Some("released") => Some(OrderStatus::Released),
        Some("closed") => Some(OrderStatus::Closed),
        Some("cancelled") => Some(OrderStatus::Cancelled),
        Some(_) => {
            r.push(
                DriftKind::InvalidValue,
                "status",
                "must be released, closed or cancelled",
            );
            None
        }
        None => None,
    };
    let operations_raw = r.array("operations");
    let components_raw = r.array("components");
    r.finish();

    let mut operations = Vec::new();
    let mut ops_ok = operations_raw.is_some();
    if let Some(raw) = operations_raw {
        if raw.is_empty() {
            drifts.push(Drift {
                kind: DriftKind::InvalidValue,
                field: "operations".into(),
                message: "must have at least one operation".into(),
            });
            ops_ok = false;
        }
        let mut steps = BTreeSet::new();
        for (j, op) in raw.iter().enumerate() {
            let mut r = Reader::new(op, format!("operations[{j}]."), &mut drifts);
            let step = r.step("step");
            let station = r.id("station");
            let description = r.text("description");
            r.finish();
            match (step, station, description) {
                (Some(step), Some(station), Some(description)) => {
                    if !steps.insert(step) {
                        drifts.push(Drift {
                            kind: DriftKind::InvalidValue,
                            field: format!("operations[{j}].step"),
                            message: format!("step {step} appears twice"),
                        });
                        ops_ok = false;
                    }
                    operations.push(OperationSpec {
                        step,
                        station,
                        description,
                    });
                }
                _ => ops_ok = false,
            }
        }
    }
    let mut components = Vec::new();
    let mut comps_ok = components_raw.is_some();
    if let Some(raw) = components_raw {
        let mut seen = BTreeSet::new();
        for (j, c) in raw.iter().enumerate() {
            let mut r = Reader::new(c, format!("components[{j}]."), &mut drifts);
            let material = r.id("material");
            let quantity_per_unit = r.decimal("quantity_per_unit");
            r.finish();
            match (material, quantity_per_unit) {
                (Some(material), Some(quantity_per_unit)) => {
                    if !seen.insert(material.clone()) {
                        drifts.push(Drift {
                            kind: DriftKind::InvalidValue,
                            field: format!("components[{j}].material"),
                            message: format!("{material} appears twice"),
                        });
                        comps_ok = false;
                    }
                    components.push(ComponentSpec {
                        material,
                        quantity_per_unit,
                    });
                }
                _ => comps_ok = false,
            }
        }
    }
    let build = (|| {
        if !ops_ok || !comps_ok {
            return None;
        }
        Some(WorkOrder {
            number: number?,
            material: material?,
            planned_quantity: planned_quantity?,
            status: status?,
            operations,
            components,
        })
    })();
    checked(value, key_of(value, "number", index), drifts, build)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kinds<T>(c: &Checked<T>) -> Vec<(DriftKind, String)> {
        c.drifts.iter().map(|d| (d.kind, d.field.clone())).collect()
    }

    #[test]
    fn a_valid_work_order_passes() {
        let c = work_order(
            &json!({"number": "WO-1", "material": "FRAME-200", "planned_quantity": "10",
                    "status": "released",
                    "operations": [{"step": 10, "station": "ST-10", "description": "Welding"}],
                    "components": [{"material": "STEEL-500", "quantity_per_unit": "2.50"}]}),
            0,
        );
        assert!(c.drifts.is_empty(), "{:?}", c.drifts);
        let wo = c.record.unwrap();
        assert_eq!(wo.planned_quantity, Decimal::from(10));
        assert_eq!(wo.components[0].quantity_per_unit.to_string(), "2.5");
    }

    #[test]
    fn missing_material_and_numeric_quantity_reject_the_record() {
        let c = work_order(
            &json!({"number": "WO-9", "planned_quantity": 10, "status": "released",
                    "operations": [{"step": 10, "station": "ST-10"}], "components": []}),
            3,
        );
        assert!(c.record.is_none());
        assert_eq!(c.key, "WO-9");
        assert_eq!(
            kinds(&c),
            vec![
                (DriftKind::MissingField, "material".into()),
                (DriftKind::WrongType, "planned_quantity".into()),
            ]
        );
    }

    #[test]
    fn unknown_fields_are_noted_but_keep_the_record() {
        let c = material(
            &json!({"number": "M-1", "tracking": "lot", "unit": "pcs", "colour": "red"}),
            0,
        );
        assert!(c.record.is_some());
        assert_eq!(kinds(&c), vec![(DriftKind::UnknownField, "colour".into())]);
    }

    #[test]
    fn nested_drift_names_the_path() {
        let c = work_order(
            &json!({"number": "WO-2", "material": "M", "planned_quantity": "1", "status": "done",
                    "operations": [{"step": "10", "station": "ST-10", "extra": 1}],
                    "components": [{"material": "X", "quantity_per_unit": "-1"}]}),
            0,
        );
        assert!(c.record.is_none());
        assert_eq!(
            kinds(&c),
            vec![
                (DriftKind::InvalidValue, "status".into()),
                (DriftKind::WrongType, "operations[0].step".into()),
                (DriftKind::UnknownField, "operations[0].extra".into()),
                (
                    DriftKind::InvalidValue,
                    "components[0].quantity_per_unit".into()
                ),
            ]
        );
    }

    #[test]
    fn a_record_that_is_not_an_object_is_rejected_with_an_index_key() {
        let c = received_lot(&json!("STEEL-L1"), 4);
        assert!(c.record.is_none());
        assert_eq!(c.key, "#4");
        assert_eq!(c.drifts[0].kind, DriftKind::WrongType);
    }

    #[test]
    fn lots_need_a_decimal_string_quantity() {
        let ok = received_lot(
            &json!({"lot": "L1", "material": "M", "quantity": "100", "supplier": "Acme",
                    "supplier_lot": "A-1", "received_at": "2026-01-02T03:04:05Z"}),
            0,
        );
        assert!(ok.record.is_some(), "{:?}", ok.drifts);
        let bad = received_lot(&json!({"lot": "L1", "material": "M", "quantity": 100}), 0);
        assert_eq!(kinds(&bad), vec![(DriftKind::WrongType, "quantity".into())]);
        for q in ["", "0", "1e3", " 1", "1.", "1.0000001", "-2"] {
            assert!(parse_quantity(q).is_err(), "{q:?}");
        }
    }
}
