//! trace-query's errors and their gRPC status.

use mes_common::errors::bounded;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

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

    /// The gRPC status (internal causes go to the log, never to the caller).
    pub fn to_status(&self) -> Status {
        match self {
            Error::Invalid { field, message } => {
                let mut details = ErrorDetails::new();
                details.add_bad_request_violation(bounded(field.clone()), bounded(message.clone()));
                Status::with_error_details(
                    Code::InvalidArgument,
                    bounded(format!("{field}: {message}")),
                    details,
                )
            }
            Error::NotFound(what) => Status::not_found(bounded(format!("{what} not found"))),
            Error::Unavailable(source) => {
                tracing::error!(
                    error = source as &dyn std::error::Error,
                    "database unavailable"
                );
                Status::unavailable("database unavailable, retry")
            }
            Error::Internal(source) => {
                tracing::error!(error = %format!("{source:#}"), "internal error");
                Status::internal("internal error")
            }
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
