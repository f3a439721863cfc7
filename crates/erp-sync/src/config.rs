//! erp-sync settings: the common ones, the MES it feeds, and the ERP it talks to.

use mes_common::ServiceSettings;
use serde::{Deserialize, Serialize};

pub const SERVICE: &str = "erp-sync";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    #[serde(flatten)]
    pub service: ServiceSettings,
    /// scan-ingest: master-data upserts and the event feed (`MES_ERP_SYNC_SCAN_INGEST_URL`).
    pub scan_ingest_url: String,
    /// Timeout of one call to scan-ingest, in milliseconds.
    pub scan_ingest_timeout_ms: u64,
    /// This replica's name in logs and in the `pull_runs` table (default: `$HOSTNAME` plus a
    /// random suffix, so replicas of one pod template differ).
    pub instance_id: String,
    /// How often a replica that is not the scheduler tries to become it, in milliseconds.
    pub leader_retry_ms: u64,
    /// The ERP side (`[erp-sync.erp]` in the TOML file, `MES_ERP_SYNC_ERP__<KEY>` variables).
    pub erp: ErpSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErpSettings {
    /// Which adapter talks to the ERP: `file` (the embedded default, no ERP needed), `rest`
    /// (the generic REST/JSON contract, `deploy/erp/rest-adapter.openapi.yaml`) or `tryton`
    /// (Tryton 8.2 over JSON-RPC).
    pub adapter: String,
    /// File adapter: the plant (materials, stations, lots, work orders) as JSON.
    pub plant_file: String,
    /// File adapter: confirmations are appended here as JSON lines, once per idempotency key.
    pub outbox_file: String,
    /// Seconds between two scheduled pulls (0: only at start-up and on demand).
    pub pull_interval_seconds: u64,
    /// Timeout of one call to the ERP, in milliseconds.
    pub call_timeout_ms: u64,
    /// First retry delay of a failed delivery, in milliseconds (doubles each attempt, with jitter).
    pub retry_initial_ms: u64,
    /// Longest retry delay of a failed delivery, in milliseconds.
    pub retry_max_ms: u64,
    /// Delivery attempts of one outbox row before it becomes a dead letter (its work order's
    /// later rows wait behind it; other work orders go on). With the default backoff, 30
    /// attempts are about 25 minutes of retrying. Refused credentials burn no attempt.
    pub max_attempts: u32,
    /// How long the delivery pauses after the ERP refused erp-sync's credentials (401/403, a
    /// refused login), in milliseconds: an operator must act; no attempt is counted.
    pub auth_retry_ms: u64,
    /// Shortest wait before a row whose ERP call timed out is tried again, in milliseconds: the
    /// timed-out request may still be running inside the ERP, and the retry's idempotency-key
    /// lookup must see its commit (exactly-once with Tryton relies on it). Set it above the
    /// longest time the ERP can keep working on a request it was sent.
    pub retry_after_timeout_ms: u64,
    /// Consecutive failed calls that open the circuit breaker.
    pub breaker_failure_threshold: u32,
    /// How long the breaker stays open before one trial call (half-open), in milliseconds.
    pub breaker_open_ms: u64,
    /// Seconds between two scheduled reconciliations (0: only on demand).
    pub reconcile_interval_seconds: u64,
    /// REST adapter: the bridge's base URL (`{base}/materials`, `{base}/confirmations`, ...).
    pub rest_base_url: String,
    /// REST adapter: bearer token (empty: no `Authorization` header). Set it from the
    /// environment (`MES_ERP_SYNC_ERP__REST_TOKEN`) or a mounted secret, never in a TOML file.
    pub rest_token: Secret,
    /// Tryton adapter: the server (`{url}/{database}/rpc/`).
    pub tryton_url: String,
    /// Tryton adapter: the database name.
    pub tryton_database: String,
    /// Tryton adapter: the login.
    pub tryton_user: String,
    /// Tryton adapter: the password (environment or secret only:
    /// `MES_ERP_SYNC_ERP__TRYTON_PASSWORD`).
    pub tryton_password: Secret,
    /// Tryton adapter: the company id put in every call's context (0: the user's company).
    pub tryton_company: i64,
    /// Tryton adapter: base Tryton has no stations; every production order gets one operation
    /// (step 10) at this station, which the adapter also reports as the only station.
    pub tryton_station: String,
}

/// A secret setting: read like any other, never shown by `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl Default for ErpSettings {
    fn default() -> Self {
        Self {
            adapter: "file".into(),
            plant_file: "deploy/demo/plant.json".into(),
            outbox_file: "var/erp-confirmations.jsonl".into(),
            pull_interval_seconds: 60,
            call_timeout_ms: 5_000,
            retry_initial_ms: 500,
            retry_max_ms: 60_000,
            max_attempts: 30,
            auth_retry_ms: 60_000,
            retry_after_timeout_ms: 60_000,
            breaker_failure_threshold: 5,
            breaker_open_ms: 30_000,
            reconcile_interval_seconds: 3_600,
            rest_base_url: "http://127.0.0.1:8070/erp/v1".into(),
            rest_token: Secret::default(),
            tryton_url: "http://127.0.0.1:8000".into(),
            tryton_database: "tryton".into(),
            tryton_user: "admin".into(),
            tryton_password: Secret::default(),
            tryton_company: 0,
            tryton_station: "TRYTON-PROD".into(),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.trim().is_empty())
            .unwrap_or_else(|| SERVICE.into());
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        Self {
            service: ServiceSettings::defaults_for(SERVICE),
            scan_ingest_url: "http://127.0.0.1:50051".into(),
            scan_ingest_timeout_ms: 10_000,
            instance_id: format!("{host}-{}", &suffix[..8]),
            leader_retry_ms: 5_000,
            erp: ErpSettings::default(),
        }
    }
}

impl Settings {
    /// Defaults → optional TOML → `MES_` / `MES_ERP_SYNC_` environment.
    pub fn load() -> anyhow::Result<Self> {
        mes_common::config::load(SERVICE, &Self::default())
    }

    /// Rejects settings erp-sync cannot run safely with (checked when the service is built).
    pub fn validate(&self) -> anyhow::Result<()> {
        // The failures before the breaker opens count as attempts (see `crate::delivery`): an
        // outage's onset counts up to threshold - 1 of them on a row, so with a threshold at or
        // above max_attempts the first failures of an outage could dead-letter rows. Both are
        // read as at least 1, as the delivery and the breaker do.
        let threshold = self.erp.breaker_failure_threshold.max(1);
        let max_attempts = self.erp.max_attempts.max(1);
        anyhow::ensure!(
            threshold < max_attempts,
            "erp.breaker_failure_threshold ({threshold}, MES_ERP_SYNC_ERP__BREAKER_FAILURE_THRESHOLD) \
             must be below erp.max_attempts ({max_attempts}, MES_ERP_SYNC_ERP__MAX_ATTEMPTS): \
             otherwise the first failures of an erp outage, before the breaker opens, could \
             dead-letter confirmations"
        );
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn a_breaker_threshold_at_or_above_max_attempts_is_refused() {
        let mut s = Settings::default();
        s.validate().expect("the defaults are valid");
        for (threshold, max_attempts) in [(3, 3), (5, 3), (1, 1), (0, 0)] {
            s.erp.breaker_failure_threshold = threshold;
            s.erp.max_attempts = max_attempts;
            let err = s.validate().expect_err("an outage could dead-letter rows");
            let msg = err.to_string();
            assert!(
                msg.contains("erp.breaker_failure_threshold") && msg.contains("erp.max_attempts"),
                "the error names both settings: {msg}"
            );
        }
        s.erp.breaker_failure_threshold = 2;
        s.erp.max_attempts = 3;
        s.validate().expect("threshold below max_attempts");
        s.erp.breaker_failure_threshold = 1;
        s.erp.max_attempts = 2;
        s.validate().expect("threshold below max_attempts");
    }

    #[test]
    fn erp_settings_come_from_nested_environment_keys() {
        Jail::expect_with(|jail| {
            let s = Settings::load().expect("defaults load");
            assert_eq!(s.service.listen_addr, "0.0.0.0:50053");
            assert_eq!(s.service.metrics_addr, "0.0.0.0:9093");
            assert_eq!(
                s.service.database_url,
                "postgres://postgres@127.0.0.1:5432/mes_erp_sync"
            );
            assert_eq!(s.scan_ingest_url, "http://127.0.0.1:50051");
            assert_eq!(s.erp.adapter, "file");
            assert_eq!(s.erp.plant_file, "deploy/demo/plant.json");
            assert_eq!(s.erp.outbox_file, "var/erp-confirmations.jsonl");
            assert_eq!(s.erp.pull_interval_seconds, 60);
            // A timed-out call may still run inside the ERP for a while (see crate::delivery).
            assert_eq!(s.erp.retry_after_timeout_ms, 60_000);

            jail.set_env("MES_ERP_SYNC_SCAN_INGEST_URL", "http://si:1");
            jail.set_env("MES_ERP_SYNC_ERP__PLANT_FILE", "/plant.json");
            jail.set_env("MES_ERP_SYNC_ERP__PULL_INTERVAL_SECONDS", "5");
            let s = Settings::load().expect("env loads");
            assert_eq!(s.scan_ingest_url, "http://si:1");
            assert_eq!(s.erp.plant_file, "/plant.json");
            assert_eq!(s.erp.pull_interval_seconds, 5);
            assert_eq!(s.erp.outbox_file, "var/erp-confirmations.jsonl");

            jail.set_env("MES_ERP_SYNC_ERP__ADAPTER", "rest");
            jail.set_env("MES_ERP_SYNC_ERP__REST_TOKEN", "s3cret");
            let s = Settings::load().expect("env loads");
            assert_eq!(s.erp.adapter, "rest");
            assert_eq!(s.erp.rest_token.expose(), "s3cret");
            assert!(
                !format!("{s:?}").contains("s3cret"),
                "secrets stay out of logs"
            );
            Ok(())
        });
    }
}
