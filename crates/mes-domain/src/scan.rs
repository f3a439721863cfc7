//! Scans: the kinds and their wire names, inspection results, the shape of a valid scan, and
//! what a valid scan asks for, typed per kind ([`ScanCommand`]).
//!
//! [`validate_batch`] is the one place the shape rules live (which fields each kind needs,
//! identifiers, quantities, the time window, attributes). The gateway runs it on a REST batch
//! before forwarding it; scan-ingest runs it on every batch it receives. What a scan *does*
//! (work order state, inventory) is scan-ingest's business, not this crate's.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use mes_proto::v1 as pb;
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::FieldViolation;
use crate::ident::{IDENT_RULE, is_ident};
use crate::quantity::parse_quantity;

/// The fields of a scan, in the contract's order (the order its errors are listed in).
pub const FIELDS: [&str; 14] = [
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

/// Scans in one batch at most.
pub const MAX_BATCH: usize = 500;
/// Serialised attributes at most, in bytes.
pub const MAX_ATTRIBUTES: usize = 4096;
/// The highest routing step number.
pub const MAX_OPERATION: u32 = 1_000_000;

/// What a scan records. The names are the wire names of the REST API, the event feed's
/// payloads and every database (`scans.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScanKind {
    StartOperation,
    Consume,
    Produce,
    CompleteOperation,
    Scrap,
    Move,
    Inspect,
    /// Made by the void operation only, never submitted.
    Void,
}

impl ScanKind {
    /// Every kind, in the protobuf enum's order.
    pub const ALL: [ScanKind; 8] = [
        ScanKind::StartOperation,
        ScanKind::Consume,
        ScanKind::Produce,
        ScanKind::CompleteOperation,
        ScanKind::Scrap,
        ScanKind::Move,
        ScanKind::Inspect,
        ScanKind::Void,
    ];

    /// The kinds a client may submit, as a field error lists them.
    pub const SUBMITTABLE: &'static str =
        "start_operation, consume, produce, complete_operation, scrap, move, inspect";

    pub fn as_str(self) -> &'static str {
        match self {
            ScanKind::StartOperation => "start_operation",
            ScanKind::Consume => "consume",
            ScanKind::Produce => "produce",
            ScanKind::CompleteOperation => "complete_operation",
            ScanKind::Scrap => "scrap",
            ScanKind::Move => "move",
            ScanKind::Inspect => "inspect",
            ScanKind::Void => "void",
        }
    }

    /// The kind of a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn from_proto(k: i32) -> Option<Self> {
        Some(match pb::ScanKind::try_from(k).ok()? {
            pb::ScanKind::StartOperation => ScanKind::StartOperation,
            pb::ScanKind::Consume => ScanKind::Consume,
            pb::ScanKind::Produce => ScanKind::Produce,
            pb::ScanKind::CompleteOperation => ScanKind::CompleteOperation,
            pb::ScanKind::Scrap => ScanKind::Scrap,
            pb::ScanKind::Move => ScanKind::Move,
            pb::ScanKind::Inspect => ScanKind::Inspect,
            pb::ScanKind::Void => ScanKind::Void,
            pb::ScanKind::Unspecified => return None,
        })
    }

    pub fn to_proto(self) -> pb::ScanKind {
        match self {
            ScanKind::StartOperation => pb::ScanKind::StartOperation,
            ScanKind::Consume => pb::ScanKind::Consume,
            ScanKind::Produce => pb::ScanKind::Produce,
            ScanKind::CompleteOperation => pb::ScanKind::CompleteOperation,
            ScanKind::Scrap => pb::ScanKind::Scrap,
            ScanKind::Move => pb::ScanKind::Move,
            ScanKind::Inspect => pb::ScanKind::Inspect,
            ScanKind::Void => pb::ScanKind::Void,
        }
    }

    /// The wire name of a protobuf kind number; empty for an unknown or unspecified one.
    pub fn name_of(k: i32) -> &'static str {
        Self::from_proto(k).map(Self::as_str).unwrap_or("")
    }

    /// Kinds that name a lot.
    pub fn needs_lot(self) -> bool {
        matches!(
            self,
            ScanKind::Consume
                | ScanKind::Produce
                | ScanKind::Scrap
                | ScanKind::Move
                | ScanKind::Inspect
        )
    }

    /// Kinds that carry a quantity.
    pub fn needs_quantity(self) -> bool {
        matches!(
            self,
            ScanKind::Consume | ScanKind::Produce | ScanKind::Scrap | ScanKind::Move
        )
    }

    /// Kinds that name their routing step.
    pub fn needs_operation(self) -> bool {
        matches!(self, ScanKind::StartOperation | ScanKind::CompleteOperation)
    }

    /// Kinds booked on a work order (all but `move`).
    pub fn needs_work_order(self) -> bool {
        self != ScanKind::Move
    }
}

/// The outcome of an inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InspectResult {
    Pass,
    Fail,
}

impl InspectResult {
    pub fn as_str(self) -> &'static str {
        match self {
            InspectResult::Pass => "pass",
            InspectResult::Fail => "fail",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pass" => Some(InspectResult::Pass),
            "fail" => Some(InspectResult::Fail),
            _ => None,
        }
    }

    /// `None` for unspecified or unknown numbers.
    pub fn from_proto(r: i32) -> Option<Self> {
        match pb::InspectResult::try_from(r).ok()? {
            pb::InspectResult::Pass => Some(InspectResult::Pass),
            pb::InspectResult::Fail => Some(InspectResult::Fail),
            pb::InspectResult::Unspecified => None,
        }
    }

    pub fn to_proto(self) -> pb::InspectResult {
        match self {
            InspectResult::Pass => pb::InspectResult::Pass,
            InspectResult::Fail => pb::InspectResult::Fail,
        }
    }
}

/// A scan that passed shape validation, as it is stored. Optional identifiers are empty when
/// absent; [`ScanInput::command`] gives the kind's fields typed.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanInput {
    pub scan_id: Uuid,
    pub kind: ScanKind,
    pub work_order: String,
    /// 0 when not given.
    pub operation: i32,
    pub station: String,
    pub lot: String,
    pub material: String,
    pub quantity: Option<Decimal>,
    pub into_lot: String,
    pub location: String,
    pub result: Option<InspectResult>,
    pub defect_code: String,
    pub scanned_at: DateTime<Utc>,
    pub attributes: String,
}

impl ScanInput {
    /// What the scan asks for, with exactly its kind's fields. `Some` for every scan
    /// [`validate_batch`] returns; `None` for a `void` scan (made by the void operation, never
    /// submitted) and for a `ScanInput` built by hand without a field its kind requires.
    pub fn command(&self) -> Option<ScanCommand> {
        let given = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let work_order = given(&self.work_order);
        let operation = (self.operation != 0).then_some(self.operation);
        let lot = given(&self.lot);
        Some(match self.kind {
            ScanKind::StartOperation => ScanCommand::Start(Start {
                work_order: work_order?,
                operation: operation?,
            }),
            ScanKind::CompleteOperation => ScanCommand::Complete(Complete {
                work_order: work_order?,
                operation: operation?,
            }),
            ScanKind::Consume => ScanCommand::Consume(Consume {
                work_order: work_order?,
                operation,
                lot: lot?,
                quantity: self.quantity?,
                material: given(&self.material),
                into_lot: given(&self.into_lot),
            }),
            ScanKind::Produce => ScanCommand::Produce(Produce {
                work_order: work_order?,
                operation,
                lot: lot?,
                quantity: self.quantity?,
                material: given(&self.material),
            }),
            ScanKind::Scrap => ScanCommand::Scrap(Scrap {
                work_order: work_order?,
                operation,
                lot: lot?,
                quantity: self.quantity?,
                defect_code: given(&self.defect_code)?,
            }),
            ScanKind::Move => ScanCommand::Move(Move {
                work_order,
                operation,
                lot: lot?,
                quantity: self.quantity?,
                location: given(&self.location)?,
            }),
            ScanKind::Inspect => ScanCommand::Inspect(Inspect {
                work_order: work_order?,
                operation,
                lot: lot?,
                verdict: match self.result? {
                    InspectResult::Pass => Verdict::Pass {
                        defect_code: given(&self.defect_code),
                    },
                    InspectResult::Fail => Verdict::Fail {
                        defect_code: given(&self.defect_code)?,
                    },
                },
            }),
            ScanKind::Void => return None,
        })
    }

    /// A stable hash of the client-supplied content (idempotency: same id and hash =
    /// duplicate). Stored with every scan: its canonical form must never change.
    pub fn content_hash(&self) -> String {
        let q = self
            .quantity
            .map(|q| q.normalize().to_string())
            .unwrap_or_default();
        let canonical = [
            self.scan_id.to_string(),
            self.kind.as_str().to_owned(),
            self.work_order.clone(),
            self.operation.to_string(),
            self.station.clone(),
            self.lot.clone(),
            self.material.clone(),
            q,
            self.into_lot.clone(),
            self.location.clone(),
            self.result
                .map(InspectResult::as_str)
                .unwrap_or("")
                .to_owned(),
            self.defect_code.clone(),
            self.scanned_at.timestamp_micros().to_string(),
            self.attributes.clone(),
        ];
        let mut h = Sha256::new();
        for part in canonical {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What a scan asks for, one variant per submittable kind, each holding exactly the fields its
/// kind gives meaning to: a field the kind requires is there (no empty string, no `Option`), an
/// optional one is an `Option`. Made from a validated scan by [`ScanInput::command`]; the rules
/// of each kind (scan-ingest) take it instead of re-reading strings.
///
/// Fields the contract allows on any scan but no rule reads (a lot on a `start_operation`, the
/// attributes, the device time) stay on the [`ScanInput`], which is what is stored.
#[derive(Debug, Clone, PartialEq)]
pub enum ScanCommand {
    Start(Start),
    Consume(Consume),
    Produce(Produce),
    Complete(Complete),
    Scrap(Scrap),
    Move(Move),
    Inspect(Inspect),
}

/// `start_operation`: a routing step of a work order begins.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    pub work_order: String,
    /// The routing step (never 0).
    pub operation: i32,
}

/// `complete_operation`: a routing step of a work order ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Complete {
    pub work_order: String,
    /// The routing step (never 0).
    pub operation: i32,
}

/// `consume`: a quantity of a component lot goes into a work order (into `into_lot`, one of
/// its output lots, when given).
#[derive(Debug, Clone, PartialEq)]
pub struct Consume {
    pub work_order: String,
    /// `None`: the work order's operation at the scan's station.
    pub operation: Option<i32>,
    pub lot: String,
    pub quantity: Decimal,
    /// The material the operator expects the lot to be.
    pub material: Option<String>,
    pub into_lot: Option<String>,
}

/// `produce`: a quantity of the work order's output, into a new or its own lot (a serial: 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Produce {
    pub work_order: String,
    /// `None`: the work order's operation at the scan's station.
    pub operation: Option<i32>,
    pub lot: String,
    pub quantity: Decimal,
    /// The material the operator expects the order to produce.
    pub material: Option<String>,
}

/// `scrap`: a quantity of a lot is scrapped on a work order, with its defect.
#[derive(Debug, Clone, PartialEq)]
pub struct Scrap {
    pub work_order: String,
    /// `None`: the work order's operation at the scan's station.
    pub operation: Option<i32>,
    pub lot: String,
    pub quantity: Decimal,
    pub defect_code: String,
}

/// `move`: a lot goes to another location, on a work order or none.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub work_order: Option<String>,
    /// `None`: the work order's operation at the scan's station, or none without an order.
    pub operation: Option<i32>,
    pub lot: String,
    pub quantity: Decimal,
    pub location: String,
}

/// `inspect`: a lot passed or failed an inspection.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspect {
    pub work_order: String,
    /// `None`: the work order's operation at the scan's station.
    pub operation: Option<i32>,
    pub lot: String,
    pub verdict: Verdict,
}

/// An inspection's outcome: a failed one always names its defect.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass { defect_code: Option<String> },
    Fail { defect_code: String },
}

impl Verdict {
    pub fn result(&self) -> InspectResult {
        match self {
            Verdict::Pass { .. } => InspectResult::Pass,
            Verdict::Fail { .. } => InspectResult::Fail,
        }
    }
}

impl ScanCommand {
    pub fn kind(&self) -> ScanKind {
        match self {
            ScanCommand::Start(_) => ScanKind::StartOperation,
            ScanCommand::Consume(_) => ScanKind::Consume,
            ScanCommand::Produce(_) => ScanKind::Produce,
            ScanCommand::Complete(_) => ScanKind::CompleteOperation,
            ScanCommand::Scrap(_) => ScanKind::Scrap,
            ScanCommand::Move(_) => ScanKind::Move,
            ScanCommand::Inspect(_) => ScanKind::Inspect,
        }
    }
}

/// Whether `t` is an acceptable device time: after 2000-01-01 and at most a day ahead of `now`.
pub fn scanned_at_in_range(t: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    t <= now + chrono::Duration::hours(24) && t.timestamp() > 946_684_800
}

/// What a device time must be, as a field error says it.
pub const SCANNED_AT_RULE: &str = "must be a time between 2000 and one day from now";

fn check_id(violations: &mut Vec<FieldViolation>, field: String, value: &str, required: bool) {
    if value.is_empty() {
        if required {
            violations.push(FieldViolation::new(field, "is required"));
        }
    } else if !is_ident(value) {
        violations.push(FieldViolation::new(field, IDENT_RULE));
    }
}

/// Validates the shape of every scan of a batch; field names are `scans[i].<field>`.
pub fn validate_batch(
    scans: &[pb::Scan],
    now: DateTime<Utc>,
) -> Result<Vec<ScanInput>, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    if scans.is_empty() {
        violations.push(FieldViolation::new(
            "scans",
            "must contain at least one scan",
        ));
    }
    if scans.len() > MAX_BATCH {
        violations.push(FieldViolation::new(
            "scans",
            format!("must contain at most {MAX_BATCH} scans"),
        ));
        return Err(violations);
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(scans.len());
    for (i, s) in scans.iter().enumerate() {
        let before = violations.len();
        if let Some(scan) = validate_scan(s, i, now, &mut seen, &mut violations)
            && violations.len() == before
        {
            // The shape rules above are what makes a scan its kind's command.
            debug_assert!(scan.command().is_some(), "{scan:?}");
            out.push(scan);
        }
    }
    if violations.is_empty() {
        Ok(out)
    } else {
        Err(violations)
    }
}

/// One scan of a batch (`i`); `seen` holds the scan ids before it in the batch.
fn validate_scan(
    s: &pb::Scan,
    i: usize,
    now: DateTime<Utc>,
    seen: &mut HashSet<Uuid>,
    violations: &mut Vec<FieldViolation>,
) -> Option<ScanInput> {
    let f = |name: &str| format!("scans[{i}].{name}");
    let scan_id = match Uuid::parse_str(&s.scan_id) {
        Ok(id) if !id.is_nil() => {
            if !seen.insert(id) {
                violations.push(FieldViolation::new(
                    f("scan_id"),
                    "appears twice in the batch",
                ));
            }
            id
        }
        _ => {
            violations.push(FieldViolation::new(f("scan_id"), "must be a UUID"));
            Uuid::nil()
        }
    };
    let kind = match ScanKind::from_proto(s.kind) {
        Some(ScanKind::Void) => {
            violations.push(FieldViolation::new(
                f("kind"),
                "void scans are created by the void operation",
            ));
            None
        }
        Some(k) => Some(k),
        None => {
            violations.push(FieldViolation::new(
                f("kind"),
                format!("must be one of {}", ScanKind::SUBMITTABLE),
            ));
            None
        }
    };
    // What the kind requires is checked only for a kind that is one.
    let needs = |what: fn(ScanKind) -> bool| kind.is_some_and(what);
    let is = |k: ScanKind| kind == Some(k);
    let kind = kind.unwrap_or(ScanKind::Void);
    // In the contract's field order: a client reads the errors in the order it wrote the fields.
    check_id(
        violations,
        f("work_order"),
        &s.work_order,
        needs(ScanKind::needs_work_order),
    );
    if needs(ScanKind::needs_operation) && s.operation == 0 {
        violations.push(FieldViolation::new(f("operation"), "is required"));
    }
    if s.operation > MAX_OPERATION {
        violations.push(FieldViolation::new(
            f("operation"),
            format!("must be at most {MAX_OPERATION}"),
        ));
    }
    check_id(violations, f("station"), &s.station, true);
    check_id(violations, f("lot"), &s.lot, needs(ScanKind::needs_lot));
    check_id(violations, f("material"), &s.material, false);
    let quantity = if s.quantity.is_empty() {
        if needs(ScanKind::needs_quantity) {
            violations.push(FieldViolation::new(f("quantity"), "is required"));
        }
        None
    } else {
        match parse_quantity(&s.quantity) {
            Ok(q) => Some(q),
            Err(m) => {
                violations.push(FieldViolation::new(f("quantity"), m));
                None
            }
        }
    };
    // One error per field: a misplaced `into_lot` is misplaced, whatever it holds.
    if !s.into_lot.is_empty() && needs(|k| k != ScanKind::Consume) {
        violations.push(FieldViolation::new(
            f("into_lot"),
            "is only allowed on consume",
        ));
    } else {
        check_id(violations, f("into_lot"), &s.into_lot, false);
    }
    check_id(violations, f("location"), &s.location, is(ScanKind::Move));
    let result = InspectResult::from_proto(s.result);
    if is(ScanKind::Inspect) && result.is_none() {
        violations.push(FieldViolation::new(f("result"), "must be pass or fail"));
    }
    if needs(|k| k != ScanKind::Inspect) && result.is_some() {
        violations.push(FieldViolation::new(
            f("result"),
            "is only allowed on inspect",
        ));
    }
    check_id(violations, f("defect_code"), &s.defect_code, false);
    if s.defect_code.is_empty()
        && (is(ScanKind::Scrap) || (is(ScanKind::Inspect) && result == Some(InspectResult::Fail)))
    {
        violations.push(FieldViolation::new(
            f("defect_code"),
            "is required for scrap and failed inspections",
        ));
    }
    let scanned_at = match s.scanned_at.as_ref() {
        Some(ts) => match ts
            .nanos
            .clamp(0, 999_999_999)
            .try_into()
            .ok()
            .and_then(|n| DateTime::<Utc>::from_timestamp(ts.seconds, n))
        {
            Some(t) if scanned_at_in_range(t, now) => t,
            _ => {
                violations.push(FieldViolation::new(f("scanned_at"), SCANNED_AT_RULE));
                now
            }
        },
        None => {
            violations.push(FieldViolation::new(f("scanned_at"), "is required"));
            now
        }
    };
    if s.attributes_json.len() > MAX_ATTRIBUTES {
        violations.push(FieldViolation::new(
            f("attributes"),
            "must be at most 4 KiB serialised",
        ));
    } else if !s.attributes_json.is_empty()
        && !serde_json::from_str::<serde_json::Value>(&s.attributes_json)
            .is_ok_and(|v| v.is_object())
    {
        violations.push(FieldViolation::new(
            f("attributes"),
            "must be a JSON object",
        ));
    }
    Some(ScanInput {
        scan_id,
        kind,
        work_order: s.work_order.clone(),
        operation: s.operation as i32,
        station: s.station.clone(),
        lot: s.lot.clone(),
        material: s.material.clone(),
        quantity,
        into_lot: s.into_lot.clone(),
        location: s.location.clone(),
        result,
        defect_code: s.defect_code.clone(),
        scanned_at,
        attributes: s.attributes_json.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-06-01T12:00:00Z")
            .unwrap()
            .to_utc()
    }

    fn scan(kind: pb::ScanKind) -> pb::Scan {
        pb::Scan {
            scan_id: Uuid::new_v4().to_string(),
            kind: kind as i32,
            work_order: "WO-1".into(),
            operation: 10,
            station: "ST-10".into(),
            scanned_at: Some(crate::time::to_proto(now())),
            ..Default::default()
        }
    }

    fn fields(r: Result<Vec<ScanInput>, Vec<FieldViolation>>) -> Vec<String> {
        r.err()
            .unwrap_or_default()
            .into_iter()
            .map(|v| format!("{}: {}", v.field, v.message))
            .collect()
    }

    fn command(s: pb::Scan) -> Option<ScanCommand> {
        let mut ok = validate_batch(&[s], now()).unwrap();
        ok.pop().unwrap().command()
    }

    #[test]
    fn a_valid_scan_is_its_kinds_command_with_exactly_its_fields() {
        let mut start = scan(pb::ScanKind::StartOperation);
        start.lot = "L-1".into(); // allowed, stored, but no part of a start
        start.quantity = "3".into();
        assert_eq!(
            command(start),
            Some(ScanCommand::Start(Start {
                work_order: "WO-1".into(),
                operation: 10,
            }))
        );
        let mut consume = scan(pb::ScanKind::Consume);
        consume.operation = 0;
        consume.lot = "L-1".into();
        consume.quantity = "2.5".into();
        consume.into_lot = "L-2".into();
        assert_eq!(
            command(consume.clone()),
            Some(ScanCommand::Consume(Consume {
                work_order: "WO-1".into(),
                operation: None,
                lot: "L-1".into(),
                quantity: Decimal::new(25, 1),
                material: None,
                into_lot: Some("L-2".into()),
            }))
        );
        let mut produce = consume.clone();
        produce.kind = pb::ScanKind::Produce as i32;
        produce.into_lot.clear();
        produce.material = "FRAME".into();
        assert_eq!(
            command(produce),
            Some(ScanCommand::Produce(Produce {
                work_order: "WO-1".into(),
                operation: None,
                lot: "L-1".into(),
                quantity: Decimal::new(25, 1),
                material: Some("FRAME".into()),
            }))
        );
        let mut scrap = scan(pb::ScanKind::Scrap);
        scrap.lot = "L-1".into();
        scrap.quantity = "1".into();
        scrap.defect_code = "CRACK".into();
        assert_eq!(
            command(scrap),
            Some(ScanCommand::Scrap(Scrap {
                work_order: "WO-1".into(),
                operation: Some(10),
                lot: "L-1".into(),
                quantity: Decimal::ONE,
                defect_code: "CRACK".into(),
            }))
        );
        let mut mv = scan(pb::ScanKind::Move);
        mv.work_order.clear();
        mv.operation = 0;
        mv.lot = "L-1".into();
        mv.quantity = "1".into();
        mv.location = "RACK-1".into();
        assert_eq!(
            command(mv),
            Some(ScanCommand::Move(Move {
                work_order: None,
                operation: None,
                lot: "L-1".into(),
                quantity: Decimal::ONE,
                location: "RACK-1".into(),
            }))
        );
        let mut inspect = scan(pb::ScanKind::Inspect);
        inspect.lot = "L-1".into();
        inspect.result = pb::InspectResult::Fail as i32;
        inspect.defect_code = "SCRATCH".into();
        let want = Verdict::Fail {
            defect_code: "SCRATCH".into(),
        };
        assert_eq!(want.result(), InspectResult::Fail);
        assert_eq!(
            command(inspect),
            Some(ScanCommand::Inspect(Inspect {
                work_order: "WO-1".into(),
                operation: Some(10),
                lot: "L-1".into(),
                verdict: want,
            }))
        );
        let complete = scan(pb::ScanKind::CompleteOperation);
        let c = command(complete).unwrap();
        assert_eq!(c.kind(), ScanKind::CompleteOperation);
    }

    #[test]
    fn a_void_or_a_scan_without_its_kinds_fields_is_no_command() {
        let mut s =
            validate_batch(&[scan(pb::ScanKind::StartOperation)], now()).unwrap()[0].clone();
        assert!(s.command().is_some());
        s.kind = ScanKind::Void;
        assert_eq!(s.command(), None);
        s.kind = ScanKind::StartOperation;
        s.operation = 0;
        assert_eq!(s.command(), None);
        s.kind = ScanKind::Consume;
        s.operation = 10;
        s.lot = "L-1".into();
        assert_eq!(s.command(), None, "no quantity");
        s.kind = ScanKind::Inspect;
        s.result = Some(InspectResult::Fail);
        assert_eq!(s.command(), None, "a failed inspection without its defect");
        s.result = Some(InspectResult::Pass);
        assert!(s.command().is_some());
    }

    #[test]
    fn kinds_round_trip_through_their_wire_names_and_numbers() {
        for k in ScanKind::ALL {
            assert_eq!(ScanKind::parse(k.as_str()), Some(k));
            assert_eq!(ScanKind::from_proto(k.to_proto() as i32), Some(k));
            assert_eq!(ScanKind::name_of(k.to_proto() as i32), k.as_str());
        }
        assert_eq!(ScanKind::parse("Consume"), None);
        assert_eq!(ScanKind::from_proto(0), None);
        assert_eq!(ScanKind::name_of(99), "");
        for r in [InspectResult::Pass, InspectResult::Fail] {
            assert_eq!(InspectResult::parse(r.as_str()), Some(r));
            assert_eq!(InspectResult::from_proto(r.to_proto() as i32), Some(r));
        }
    }

    #[test]
    fn each_kind_needs_its_own_fields() {
        let mut consume = scan(pb::ScanKind::Consume);
        assert_eq!(
            fields(validate_batch(std::slice::from_ref(&consume), now())),
            [
                "scans[0].lot: is required",
                "scans[0].quantity: is required"
            ]
        );
        consume.lot = "L-1".into();
        consume.quantity = "2.5".into();
        let ok = validate_batch(&[consume], now()).unwrap();
        assert_eq!(ok[0].quantity, Some(Decimal::new(25, 1)));

        let mut mv = scan(pb::ScanKind::Move);
        mv.work_order.clear();
        mv.lot = "L-1".into();
        mv.quantity = "1".into();
        assert_eq!(
            fields(validate_batch(std::slice::from_ref(&mv), now())),
            ["scans[0].location: is required"]
        );
        mv.location = "RACK-1".into();
        assert!(validate_batch(&[mv], now()).is_ok());

        let mut inspect = scan(pb::ScanKind::Inspect);
        inspect.lot = "L-1".into();
        inspect.result = pb::InspectResult::Fail as i32;
        assert_eq!(
            fields(validate_batch(std::slice::from_ref(&inspect), now())),
            ["scans[0].defect_code: is required for scrap and failed inspections"]
        );
        let mut start = scan(pb::ScanKind::StartOperation);
        start.operation = 0;
        start.result = pb::InspectResult::Pass as i32;
        start.into_lot = "L-2".into();
        assert_eq!(
            fields(validate_batch(&[start], now())),
            [
                "scans[0].operation: is required",
                "scans[0].into_lot: is only allowed on consume",
                "scans[0].result: is only allowed on inspect",
            ]
        );
    }

    #[test]
    fn batch_rules_ids_times_and_attributes() {
        assert_eq!(
            fields(validate_batch(&[], now())),
            ["scans: must contain at least one scan"]
        );
        let many = vec![scan(pb::ScanKind::StartOperation); MAX_BATCH + 1];
        assert_eq!(
            fields(validate_batch(&many, now())),
            ["scans: must contain at most 500 scans"]
        );
        let a = scan(pb::ScanKind::StartOperation);
        let mut nil = a.clone();
        nil.scan_id = Uuid::nil().to_string();
        nil.station = "ST 10".into();
        nil.scanned_at = Some(crate::time::to_proto(now() + chrono::Duration::hours(25)));
        nil.attributes_json = "[1]".into();
        nil.kind = pb::ScanKind::Void as i32;
        assert_eq!(
            fields(validate_batch(&[a.clone(), a.clone(), nil], now())),
            [
                "scans[1].scan_id: appears twice in the batch".to_owned(),
                "scans[2].scan_id: must be a UUID".into(),
                "scans[2].kind: void scans are created by the void operation".into(),
                format!("scans[2].station: {IDENT_RULE}"),
                format!("scans[2].scanned_at: {SCANNED_AT_RULE}"),
                "scans[2].attributes: must be a JSON object".into(),
            ]
        );
    }

    #[test]
    fn the_content_hash_is_the_one_scans_were_stored_with() {
        // Pinned: scans stored by earlier versions must still be recognised as duplicates.
        let s = ScanInput {
            scan_id: Uuid::parse_str("0f8fad5b-d9cb-469f-a165-70867728950e").unwrap(),
            kind: ScanKind::Inspect,
            work_order: "WO-1".into(),
            operation: 10,
            station: "ST-10".into(),
            lot: "L-1".into(),
            material: String::new(),
            quantity: None,
            into_lot: String::new(),
            location: String::new(),
            result: Some(InspectResult::Pass),
            defect_code: String::new(),
            scanned_at: now(),
            attributes: String::new(),
        };
        let mut h = Sha256::new();
        for part in [
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "inspect",
            "WO-1",
            "10",
            "ST-10",
            "L-1",
            "",
            "",
            "",
            "",
            "pass",
            "",
            &now().timestamp_micros().to_string(),
            "",
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let want: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(s.content_hash(), want);
    }
}
