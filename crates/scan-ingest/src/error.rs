//! scan-ingest's errors and their gRPC status.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A field that failed validation, named as the client sent it (`scans[3].quantity`).
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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {}", .0.first().map(|v| format!("{} {}", v.field, v.message)).unwrap_or_default())]
    Invalid(Vec<FieldViolation>),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("the caller is not identified")]
    Unauthenticated,
    /// The database (or the commit pipeline) could not answer: nothing, or possibly everything,
    /// was committed. Scans are idempotent by `scan_id`, so the client retries the same request.
    #[error("database unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, message)])
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            Self::Unavailable(e.into())
        } else {
            Self::Internal(e.into())
        }
    }
}

/// Errors that say nothing about the request, only that the database could not serve it now
/// (or that the connection broke, so the outcome is unknown): the connection and its pool,
/// server shutdown and restart, exhausted resources, timeouts, and transaction conflicts that
/// outlived their retries. The client is told UNAVAILABLE — retrying the same scans is safe —
/// never INTERNAL.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| {
            // 08 connection exception, 40 transaction rollback (serialization, deadlock),
            // 53 insufficient resources, 57 operator intervention (shutdown, cancel,
            // statement timeout), 58 system error, 55P03 lock not available.
            ["08", "40", "53", "57", "58"].contains(&&c[..c.len().min(2)]) || c == "55P03"
        }),
        _ => false,
    }
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Self::Internal(e)
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(violations) => {
                let mut details = ErrorDetails::new();
                for v in &violations {
                    details.add_bad_request_violation(v.field.clone(), v.message.clone());
                }
                let message = violations
                    .first()
                    .map(|v| format!("{}: {}", v.field, v.message))
                    .unwrap_or_else(|| "invalid request".into());
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::NotFound(what) => Status::not_found(format!("{what} not found")),
            Error::Conflict(m) => Status::aborted(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::Unauthenticated => Status::unauthenticated("the caller is not identified"),
            Error::Unavailable(source) => {
                tracing::error!(error = %format!("{source:#}"), "database unavailable");
                Status::unavailable("database unavailable, retry")
            }
            Error::Internal(source) => {
                tracing::error!(error = %format!("{source:#}"), "internal error");
                Status::internal("internal error")
            }
        }
    }
}
