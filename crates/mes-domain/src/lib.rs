//! The MES contract's types and rules, parsed once and shared by every service.
//!
//! - [`ident`]: what a plant identifier (work order, lot, station, material…) may be.
//! - [`quantity`]: the one decimal rule for quantities.
//! - [`scan`]: scan kinds with their wire names, inspection results, and the shape of a valid
//!   scan ([`scan::validate_batch`]): the gateway checks a REST batch with it before forwarding,
//!   scan-ingest checks every gRPC batch with it again.
//! - [`time`]: protobuf ↔ `chrono` times.
//!
//! No service defines any of these rules or name tables itself.

pub mod ident;
pub mod quantity;
pub mod scan;
pub mod time;

pub use ident::{IDENT_MAX, IDENT_RULE, is_ident};
pub use quantity::parse_quantity;
pub use scan::{InspectResult, ScanCommand, ScanInput, ScanKind};

/// One invalid field of a request: `field` as the client wrote it (`scans[2].quantity`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub message: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}
