//! trace-query's errors and their gRPC status.

use mes_common::errors::{Failure, ServiceError};
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {field} {message}")]
    Invalid { field: String, message: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl ServiceError for Error {
    fn failure(&self) -> Failure<'_> {
        match self {
            Error::Invalid { field, message } => Failure::Invalid(vec![(field, message)]),
            Error::NotFound(what) => Failure::NotFound(what),
            Error::Unavailable(cause) => Failure::Unavailable {
                what: "database",
                cause,
            },
            Error::Internal(cause) => Failure::Internal { cause },
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if let Some(message) = mes_common::errors::bad_input(&e) {
            return Self::invalid("request", message);
        }
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Self::Unavailable(e)
            }
            _ => Self::Internal(e.into()),
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
    use super::*;
    use tonic::Code;
    use tonic_types::StatusExt;

    #[test]
    fn invalid_argument_names_the_field() {
        let s = Error::invalid("max_depth", "must be between 1 and 50").to_status();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().starts_with("max_depth:"), "{}", s.message());
        let details = s.get_error_details();
        let v = &details.bad_request().expect("bad request").field_violations[0];
        assert_eq!(v.field, "max_depth");
    }

    #[test]
    fn internal_errors_do_not_leak() {
        let s = Error::Internal(anyhow::anyhow!("secret connection string")).to_status();
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("secret"));
    }
}
