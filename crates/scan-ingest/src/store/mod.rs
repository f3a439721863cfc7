//! SQL of scan-ingest's own database.

pub mod corrections;
pub mod events;
pub mod ledger;
pub mod master;
pub mod queries;
pub mod scans;

pub use mes_domain::time::to_proto as timestamp;

/// True for errors worth retrying the whole transaction (deadlock, serialization failure).
pub fn is_retryable(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "40P01" || c == "40001")
}
