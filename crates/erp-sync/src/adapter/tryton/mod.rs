//! The `tryton` adapter: Tryton 8.2 (`production` and `stock_lot` modules) over JSON-RPC.
//!
//! Mapping (Tryton → MES), one module each:
//! - `pull`: materials are `product.product` of type goods (`code` → number, `name` →
//!   description, default unit symbol → unit, tracking `lot`: Tryton has lots, no serial
//!   numbers; products without a code break the contract and go to the dead letters);
//!   stations: the base modules have none (`production_work` work centers are not used), so
//!   the adapter reports one configured station (`erp.tryton_station`) and every work order
//!   has one operation, step [`OPERATION_STEP`], there; received lots are `stock.lot` of
//!   non-producible products with their quantity in the warehouse's storage location (lots at
//!   zero are skipped); work orders are `production` from `waiting` on
//!   (`waiting|assigned|running` → released, `done` → closed, `cancelled` → cancelled),
//!   components per unit from the BOM (or from the planned input moves without a BOM).
//! - `confirm`: a confirmation completes the order, keyed by an `ir.note` on it; a
//!   confirmation of an order that is `done` without its key (a follow-up, a void and redo, an
//!   order closed by hand) is booked next to it as keyed corrections, never dropped.
//! - `reversal`: reversals (scans voided after their confirmation) and those corrections, as
//!   inventory corrections next to the `done` order, exactly once; what cannot be posted is a
//!   dead letter saying what to book by hand.
//! - `reconcile`: Tryton's books (good quantity per order, corrections included; lots on
//!   hand).
//! - `rpc`: the JSON-RPC transport, session and error mapping; `values`: the typed records
//!   and states Tryton sends.

mod confirm;
mod pull;
mod reconcile;
mod reversal;
mod rpc;
mod values;

use std::time::Duration;

use serde_json::{Value, json};

use super::{AdapterError, ErpAdapter, Posted, Pulled};
use crate::config::TrytonErp;
use crate::domain::{
    Confirmation, ErpQuantities, Material, ReceivedLot, Reversal, Station, WorkOrder,
};

/// The `reference` prefix of the correction productions that book reversed produce scans and
/// consumption confirmed after the order was done (not work orders: left out of pulls and
/// reconciliation).
pub const CORRECTION_PREFIX: &str = "erp-sync ";

/// The single operation of a Tryton production order.
pub const OPERATION_STEP: u32 = 10;

/// Productions that are not correction productions (`reference` may be empty).
fn not_correction() -> Value {
    json!([
        "OR",
        ["reference", "=", null],
        ["reference", "not like", format!("{CORRECTION_PREFIX}%")]
    ])
}

#[derive(Debug, Clone)]
pub struct TrytonSettings {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
    pub company: i64,
    pub station: String,
}

impl TrytonSettings {
    pub fn from_erp(s: &TrytonErp) -> Self {
        Self {
            url: s.tryton_url.clone(),
            database: s.tryton_database.clone(),
            user: s.tryton_user.clone(),
            password: s.tryton_password.expose().to_owned(),
            company: s.tryton_company,
            station: s.tryton_station.clone(),
        }
    }
}

pub struct TrytonAdapter {
    /// The one station every work order's operation is at.
    station: String,
    rpc: rpc::Rpc,
}

impl TrytonAdapter {
    pub fn new(settings: TrytonSettings, timeout: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            rpc: rpc::Rpc::new(&settings, timeout)?,
            station: settings.station,
        })
    }
}

#[async_trait::async_trait]
impl ErpAdapter for TrytonAdapter {
    fn name(&self) -> &'static str {
        "tryton"
    }

    async fn ping(&self) -> Result<(), AdapterError> {
        self.rpc.ping().await
    }

    #[tracing::instrument(name = "erp.tryton.pull_materials", skip(self))]
    async fn pull_materials(&self, since: Option<&str>) -> Result<Pulled<Material>, AdapterError> {
        pull::materials(&self.rpc, since).await
    }

    async fn pull_stations(&self, since: Option<&str>) -> Result<Pulled<Station>, AdapterError> {
        Ok(pull::stations(&self.station, since))
    }

    #[tracing::instrument(name = "erp.tryton.pull_received_lots", skip(self))]
    async fn pull_received_lots(
        &self,
        since: Option<&str>,
    ) -> Result<Pulled<ReceivedLot>, AdapterError> {
        pull::received_lots(&self.rpc, since).await
    }

    #[tracing::instrument(name = "erp.tryton.pull_work_orders", skip(self))]
    async fn pull_work_orders(
        &self,
        since: Option<&str>,
    ) -> Result<Pulled<WorkOrder>, AdapterError> {
        pull::work_orders(&self.rpc, &self.station, since).await
    }

    #[tracing::instrument(name = "erp.tryton.post_confirmation", skip(self, confirmation),
        fields(work_order = %confirmation.work_order))]
    async fn post_confirmation(
        &self,
        confirmation: &Confirmation,
        idempotency_key: &str,
    ) -> Result<Posted, AdapterError> {
        confirm::post(&self.rpc, confirmation, idempotency_key).await
    }

    async fn post_reversal(
        &self,
        reversal: &Reversal,
        idempotency_key: &str,
    ) -> Result<Posted, AdapterError> {
        reversal::post(&self.rpc, reversal, idempotency_key).await
    }

    async fn quantities(&self) -> Result<ErpQuantities, AdapterError> {
        reconcile::quantities(&self.rpc).await
    }
}
