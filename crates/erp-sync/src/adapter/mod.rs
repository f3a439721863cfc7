//! The ERP side of erp-sync: one trait, one implementation per ERP.
//!
//! An adapter maps its ERP's documents to the MES's records (checked against the inbound
//! contract, see [`crate::contract`]) and posts production confirmations and reversals (of
//! scans voided after their confirmation) with an idempotency key, so that a retried post has
//! its effect once on the ERP side.
//!
//! - [`file`]: the embedded default — a plant in a JSON file, confirmations appended to a
//!   JSON-lines file — so the whole system runs without an ERP.
//! - [`rest`]: the generic REST/JSON contract (`deploy/erp/rest-adapter.openapi.yaml`) that a
//!   bridge to any ERP implements.
//! - [`tryton`]: Tryton 8.2 over JSON-RPC.

pub mod file;
pub mod rest;
pub mod tryton;

use std::sync::Arc;

use crate::config::{Adapter, ErpSettings};
use crate::contract::{Checked, Drift};
use crate::domain::{
    Confirmation, ErpQuantities, Material, ReceivedLot, Reversal, Station, WorkOrder,
};

/// What one pull of one entity returned.
#[derive(Debug, Clone)]
pub struct Pulled<T> {
    /// Every record the ERP returned, each checked against the contract.
    pub items: Vec<Checked<T>>,
    /// Departures of the document as a whole (a missing section, an unknown top-level key).
    pub notes: Vec<Drift>,
    /// The ERP's position after this pull, to pass as `since` next time (`None`: no cursor).
    pub cursor: Option<String>,
}

/// The result of posting a confirmation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    /// The ERP took it now.
    New,
    /// The ERP already had this idempotency key: nothing changed there.
    AlreadyThere,
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The ERP cannot be reached or failed: retry later.
    #[error("erp unavailable: {0}")]
    Unavailable(String),
    /// The ERP did not answer in time: retry later (idempotency keys make that safe).
    #[error("erp call timed out after {0} ms")]
    Timeout(u64),
    /// The ERP refused the request itself: retrying the same request cannot help.
    #[error("erp rejected the request: {0}")]
    Rejected(String),
    /// The ERP's answer as a whole does not follow the contract (e.g. not JSON).
    #[error("erp document unreadable: {0}")]
    Unreadable(String),
    /// The ERP refused erp-sync's credentials (401/403, a refused login): an operator must fix
    /// the token or password. Retried later, but it says nothing about the request itself.
    #[error("erp refused the credentials: {0}")]
    Unauthorized(String),
    /// The ERP is up but sheds load (429, or 503 with `Retry-After`): retry later, after
    /// `retry_after` when it said so; never the row's failure (counts no attempt).
    #[error("erp asks to slow down: {message}")]
    Throttled {
        message: String,
        retry_after: Option<std::time::Duration>,
    },
}

impl AdapterError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            AdapterError::Unavailable(_)
                | AdapterError::Timeout(_)
                | AdapterError::Unauthorized(_)
                | AdapterError::Throttled { .. }
        )
    }
}

/// One ERP. Pulls return every record changed since `since` (the cursor the previous pull
/// returned; `None` for a full pull) with the ERP's new cursor.
#[async_trait::async_trait]
pub trait ErpAdapter: Send + Sync {
    /// The adapter's name (`file`, `tryton`, `rest`).
    fn name(&self) -> &'static str;

    /// Checks that the ERP answers.
    async fn ping(&self) -> Result<(), AdapterError>;

    async fn pull_materials(&self, since: Option<&str>) -> Result<Pulled<Material>, AdapterError>;

    async fn pull_stations(&self, since: Option<&str>) -> Result<Pulled<Station>, AdapterError>;

    async fn pull_received_lots(
        &self,
        since: Option<&str>,
    ) -> Result<Pulled<ReceivedLot>, AdapterError>;

    async fn pull_work_orders(
        &self,
        since: Option<&str>,
    ) -> Result<Pulled<WorkOrder>, AdapterError>;

    /// Posts a production confirmation; the ERP applies one key once.
    async fn post_confirmation(
        &self,
        confirmation: &Confirmation,
        idempotency_key: &str,
    ) -> Result<Posted, AdapterError>;

    /// Posts the reversal of a scan voided after its confirmation; the ERP applies one key
    /// once. An ERP that cannot take reversals answers `Rejected` (the reversal lands in the
    /// dead letters, to be booked by hand).
    async fn post_reversal(
        &self,
        reversal: &Reversal,
        idempotency_key: &str,
    ) -> Result<Posted, AdapterError>;

    /// The ERP's books, for reconciliation: confirmed good quantity per work order, and on-hand
    /// quantity per received lot.
    async fn quantities(&self) -> Result<ErpQuantities, AdapterError>;
}

/// The adapter the settings name, built from its own settings (an unknown name never gets
/// here: loading the settings refuses it).
pub fn from_settings(settings: &ErpSettings) -> anyhow::Result<Arc<dyn ErpAdapter>> {
    let timeout = std::time::Duration::from_millis(settings.call_timeout_ms.max(1));
    Ok(match &settings.adapter {
        Adapter::File(f) => Arc::new(file::FileAdapter::new(&f.plant_file, &f.outbox_file)),
        Adapter::Rest(r) => Arc::new(rest::RestAdapter::new(
            &r.rest_base_url,
            r.rest_token.expose(),
            timeout,
        )?),
        Adapter::Tryton(t) => Arc::new(tryton::TrytonAdapter::new(
            tryton::TrytonSettings::from_erp(t),
            timeout,
        )?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_adapter_comes_from_the_settings() {
        let mut s = ErpSettings::default();
        assert_eq!(from_settings(&s).unwrap().name(), "file");
        s.adapter = Adapter::Rest(Default::default());
        assert_eq!(from_settings(&s).unwrap().name(), "rest");
        s.adapter = Adapter::Tryton(Default::default());
        assert_eq!(from_settings(&s).unwrap().name(), "tryton");
        // An adapter's own settings reach it: a bad URL is refused when it is built.
        s.adapter = Adapter::Rest(crate::config::RestErp {
            rest_base_url: "ftp://bridge".into(),
            ..Default::default()
        });
        let e = from_settings(&s).err().expect("not http").to_string();
        assert!(e.contains("erp.rest_base_url"), "{e}");
    }
}
