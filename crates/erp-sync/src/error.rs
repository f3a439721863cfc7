//! erp-sync's request errors and their gRPC status. Internal details go to the log, never to
//! the caller.

use mes_common::errors::{Failure, ServiceError};
use tonic::Status;

use crate::adapter::AdapterError;
use crate::pull::SyncError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// A dependency (the ERP, scan-ingest, the database) does not answer: retry later.
    #[error("{what} unavailable")]
    Unavailable {
        what: &'static str,
        #[source]
        source: anyhow::Error,
    },
    /// The ERP's data cannot be used as a whole (e.g. the plant file is not JSON).
    #[error("the erp's data does not follow the contract")]
    ErpContract(#[source] anyhow::Error),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if let Some(message) = mes_common::errors::bad_input(&e) {
            return Self::InvalidArgument(message);
        }
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Self::Unavailable {
                    what: "database",
                    source: e.into(),
                }
            }
            _ => Self::Internal(e.into()),
        }
    }
}

impl From<SyncError> for Error {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::Erp(AdapterError::Unreadable(m)) => Self::ErpContract(anyhow::anyhow!(m)),
            SyncError::Erp(e) => Self::Unavailable {
                what: "erp",
                source: e.into(),
            },
            SyncError::Mes(s) => Self::Unavailable {
                what: "scan-ingest",
                source: anyhow::anyhow!("{}: {}", s.code(), s.message()),
            },
            SyncError::Db(e) => e.into(),
        }
    }
}

impl ServiceError for Error {
    fn failure(&self) -> Failure<'_> {
        match self {
            Error::PermissionDenied(m) => Failure::PermissionDenied(m),
            Error::InvalidArgument(m) => Failure::BadRequest(m),
            Error::Unavailable { what, source } => Failure::Unavailable {
                what,
                cause: source,
            },
            Error::ErpContract(_) => {
                Failure::FailedPrecondition("the erp's data does not follow the contract")
            }
            Error::Internal(cause) => Failure::Internal { cause },
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        if let Error::ErpContract(source) = &e {
            tracing::warn!(error = %format!("{source:#}"), "erp data unusable");
        }
        e.to_status()
    }
}
