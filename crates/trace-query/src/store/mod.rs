//! SQL of trace-query's own database (migrations in `migrations/`).
//!
//! - [`apply`]: the projection — events of the feed into the read model, with the cursor, in
//!   one transaction per batch; the expansion of a batch's changes into stale cache entries.
//! - [`queries`]: genealogy (recursive CTEs), lot history, work-order summary, reports.

pub mod apply;
pub mod queries;

use rust_decimal::Decimal;

/// A decimal as the API writes it (`"12.5"`, never `"12.50"`).
pub fn decimal(d: Decimal) -> String {
    d.normalize().to_string()
}

/// Every table of the read model (truncated by a rebuild, compared by the rebuild test).
pub const READ_MODEL_TABLES: &[&str] = &[
    "materials",
    "stations",
    "work_orders",
    "work_order_operations",
    "lots",
    "scans",
    "genealogy_edges",
    "production_hourly",
];
