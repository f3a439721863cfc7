//! Reconciliation: compares the MES's quantities (produced per work order, on hand per
//! received lot) with the ERP's books and records the differences — periodically on the
//! scheduler replica, and on demand (`ErpSync.Reconcile`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

use crate::adapter::{AdapterError, ErpAdapter};
use crate::domain;
use crate::mes::Mes;
use crate::pull::SyncError;
use crate::store::reconciliations::{self, Report};

pub struct Reconciler {
    pool: PgPool,
    adapter: Arc<dyn ErpAdapter>,
    mes: Mes,
    instance: String,
    call_timeout: Duration,
    running: tokio::sync::Mutex<()>,
}

impl Reconciler {
    pub fn new(
        pool: PgPool,
        adapter: Arc<dyn ErpAdapter>,
        mes: Mes,
        instance: String,
        call_timeout: Duration,
    ) -> Self {
        Self {
            pool,
            adapter,
            mes,
            instance,
            call_timeout,
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// Compares now; `trigger` is `scheduled` or `manual`.
    #[tracing::instrument(name = "erp.reconcile", skip(self))]
    pub async fn run(&self, trigger: &'static str) -> Result<Report, SyncError> {
        let _one_at_a_time = self.running.lock().await;
        let erp = match tokio::time::timeout(self.call_timeout, self.adapter.quantities()).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(AdapterError::Timeout(self.call_timeout.as_millis() as u64).into());
            }
        };
        let mut mes_work_orders = BTreeMap::new();
        for number in erp.work_orders.keys() {
            if let Some(q) = self
                .mes
                .produced_quantity(number)
                .await
                .map_err(SyncError::Mes)?
            {
                mes_work_orders.insert(number.clone(), q);
            }
        }
        let mut mes_lots = BTreeMap::new();
        for lot in erp.lots.keys() {
            if let Some(q) = self.mes.on_hand(lot).await.map_err(SyncError::Mes)? {
                mes_lots.insert(lot.clone(), q);
            }
        }
        let differences = domain::reconcile(&erp, &mes_work_orders, &mes_lots);
        let report =
            reconciliations::insert(&self.pool, trigger, &self.instance, &differences).await?;
        metrics::gauge!("erp_reconciliation_differences").set(differences.len() as f64);
        if differences.is_empty() {
            tracing::info!("reconciliation: the mes and the erp agree");
        } else {
            for d in &differences {
                tracing::warn!(entity = %d.entity, key = %d.key,
                    mes = %d.mes_quantity.map(|q| q.to_string()).unwrap_or_else(|| "unknown".into()),
                    erp = %d.erp_quantity, "reconciliation difference");
            }
        }
        Ok(report)
    }
}

/// Reconciles every `interval` (never when zero) until `stop`.
pub async fn schedule(reconciler: Arc<Reconciler>, interval: Duration, stop: mes_common::Shutdown) {
    if interval.is_zero() {
        stop.wait().await;
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait() => return,
        }
        if let Err(e) = reconciler.run("scheduled").await {
            tracing::warn!(error = %e, "reconciliation failed");
        }
    }
}
