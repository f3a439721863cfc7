//! scan-ingest's errors and their gRPC status.

use mes_common::errors::{Failure, ServiceError};
use tonic::Status;

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

impl ServiceError for Error {
    fn failure(&self) -> Failure<'_> {
        match self {
            Error::Invalid(violations) => Failure::Invalid(
                violations
                    .iter()
                    .map(|v| (v.field.as_str(), v.message.as_str()))
                    .collect(),
            ),
            Error::NotFound(what) => Failure::NotFound(what),
            Error::Conflict(m) => Failure::Conflict(m),
            Error::FailedPrecondition(m) => Failure::FailedPrecondition(m),
            Error::PermissionDenied(m) => Failure::PermissionDenied(m),
            Error::Unauthenticated => Failure::Unauthenticated,
            Error::Unavailable(cause) => Failure::Unavailable {
                what: "database",
                cause,
            },
            Error::Internal(cause) => Failure::Internal { cause },
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        e.to_status()
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use tonic::Code;

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
