//! The REST surface, one module per area. Each handler authenticates (the [`Principal`]
//! extractor), checks the caller's roles, validates its input, and calls one service.
//!
//! [`Principal`]: crate::auth::Principal

pub mod auth;
pub mod erp;
pub mod health;
pub mod lots;
pub mod reports;
pub mod scans;
pub mod trace;
pub mod work_orders;

use crate::problem::Problem;

/// An empty proto string is an absent value.
pub(crate) fn opt(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// A proto timestamp as RFC 3339 (UTC, `Z`).
pub(crate) fn time(ts: Option<prost_types::Timestamp>) -> Option<String> {
    mes_domain::time::to_rfc3339(&ts?)
}

pub(crate) use mes_domain::time::to_proto as timestamp;

/// A database failure: 503 when the database cannot be reached, 500 otherwise (logged).
pub(crate) fn db_error(e: sqlx::Error, retry_after: u64) -> Problem {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            tracing::error!(error = %e, "database unavailable");
            Problem::unavailable(
                "the gateway database is unavailable; retrying is safe",
                retry_after,
            )
        }
        other => Problem::internal(&other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};

    #[test]
    fn timestamps_round_trip_as_rfc3339() {
        let t = DateTime::parse_from_rfc3339("2025-03-01T08:15:30.250+01:00")
            .unwrap()
            .with_timezone(&Utc);
        let ts = timestamp(t);
        assert_eq!(time(Some(ts)).as_deref(), Some("2025-03-01T07:15:30.250Z"));
        assert_eq!(time(None), None);
        assert_eq!(opt(String::new()), None);
    }
}
