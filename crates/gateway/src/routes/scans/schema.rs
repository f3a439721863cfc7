//! The REST shapes of scans, for the OpenAPI document and the answers.

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};

/// Scan kinds a client may submit (`void` is created by the void operation only), as the
/// OpenAPI document lists them: the contract's names (`mes_domain::ScanKind`), not a copy.
pub struct ScanKind;

impl utoipa::PartialSchema for ScanKind {
    fn schema() -> RefOr<Schema> {
        let names = mes_domain::ScanKind::ALL
            .into_iter()
            .filter(|k| *k != mes_domain::ScanKind::Void)
            .map(mes_domain::ScanKind::as_str);
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "Scan kinds a client may submit (`void` is created by the void operation only).",
            ))
            .enum_values(Some(names))
            .into()
    }
}

impl ToSchema for ScanKind {}

/// The outcome of an inspection (`mes_domain::InspectResult`).
pub struct InspectResult;

impl utoipa::PartialSchema for InspectResult {
    fn schema() -> RefOr<Schema> {
        let names = [
            mes_domain::InspectResult::Pass,
            mes_domain::InspectResult::Fail,
        ]
        .map(mes_domain::InspectResult::as_str);
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(names))
            .into()
    }
}

impl ToSchema for InspectResult {}

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
