//! scan-ingest's errors and their gRPC status.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A field that failed validation, named as the client sent it (`scans[3].quantity`): the
/// contract's type, shared with the gateway.
pub use mes_domain::FieldViolation;

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
        if let Some(message) = mes_common::errors::bad_input(&e) {
            Self::invalid("request", message)
        } else if is_unavailable(&e) {
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
            // statement timeout), 58 system error, 55P03 lock not available, 25006 read-only
            // transaction (connected to a demoted primary or a standby during a failover),
            // 25P03/25P04 idle-in-transaction and transaction timeouts.
            ["08", "40", "53", "57", "58"].contains(&&c[..c.len().min(2)])
                || ["55P03", "25006", "25P03", "25P04"].contains(&c.as_ref())
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
        use mes_common::errors::bounded;
        match e {
            Error::Invalid(violations) => {
                let mut details = ErrorDetails::new();
                for v in violations.iter().take(100) {
                    details.add_bad_request_violation(
                        bounded(v.field.clone()),
                        bounded(v.message.clone()),
                    );
                }
                let message = violations
                    .first()
                    .map(|v| bounded(format!("{}: {}", v.field, v.message)))
                    .unwrap_or_else(|| "invalid request".into());
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::NotFound(what) => Status::not_found(bounded(format!("{what} not found"))),
            Error::Conflict(m) => Status::aborted(bounded(m)),
            Error::FailedPrecondition(m) => Status::failed_precondition(bounded(m)),
            Error::PermissionDenied(m) => Status::permission_denied(bounded(m)),
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

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A database error with a SQLSTATE, as PostgreSQL reports it.
    #[derive(Debug)]
    struct Pg(&'static str);

    impl std::fmt::Display for Pg {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "sqlstate {}", self.0)
        }
    }

    impl std::error::Error for Pg {}

    impl sqlx::error::DatabaseError for Pg {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn code_of(sqlstate: &'static str) -> Code {
        Status::from(Error::from(sqlx::Error::Database(Box::new(Pg(sqlstate))))).code()
    }

    #[test]
    fn a_database_that_cannot_serve_now_is_unavailable_never_internal() {
        for sqlstate in [
            "08006", // connection failure
            "40001", // serialization failure (after the retries)
            "40P01", // deadlock (after the retries)
            "53300", // too many connections
            "57P01", // admin shutdown
            "57014", // statement timeout
            "55P03", // lock not available
            "25006", // read-only transaction: a failover in progress
        ] {
            assert_eq!(code_of(sqlstate), Code::Unavailable, "{sqlstate}");
        }
        assert_eq!(
            Status::from(Error::from(sqlx::Error::PoolTimedOut)).code(),
            Code::Unavailable
        );
    }

    #[test]
    fn values_the_database_cannot_hold_are_invalid_arguments() {
        // A NUL character in text, a number out of range: the caller's values, not a bug.
        for sqlstate in ["22021", "22003"] {
            assert_eq!(code_of(sqlstate), Code::InvalidArgument, "{sqlstate}");
        }
    }

    #[test]
    fn a_bug_stays_internal() {
        for sqlstate in ["42601", "42P01", "23514", "22P02"] {
            assert_eq!(code_of(sqlstate), Code::Internal, "{sqlstate}");
        }
    }
}
