//! trace-query's errors and their gRPC status.

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

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
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
        match e {
            Error::Invalid { field, message } => {
                Status::invalid_argument(format!("{field}: {message}"))
            }
            Error::NotFound(what) => Status::not_found(format!("{what} not found")),
            Error::Unavailable(source) => {
                tracing::error!(
                    error = &source as &dyn std::error::Error,
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
