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
    /// Which adapter talks to the ERP, with that adapter's own settings: `adapter` and its
    /// keys sit beside the common ones below (`[erp-sync.erp]`, `MES_ERP_SYNC_ERP__ADAPTER`,
    /// `MES_ERP_SYNC_ERP__REST_BASE_URL`, ...). Another adapter's keys are ignored.
    #[serde(flatten)]
    pub adapter: Adapter,
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
}

/// The ERP adapter, named by `adapter`, with only its own settings. A key the chosen adapter
/// does not have is ignored (the file adapter's paths may stay set when `adapter = "rest"`);
/// one it has but that is not set takes the default below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "adapter", rename_all = "lowercase")]
pub enum Adapter {
    /// The embedded default: the plant from a JSON file, confirmations to a JSON-lines file (no
    /// ERP needed).
    File(FileErp),
    /// The generic REST/JSON contract (`deploy/erp/rest-adapter.openapi.yaml`).
    Rest(RestErp),
    /// Tryton 8.2 over JSON-RPC.
    Tryton(TrytonErp),
}

impl Adapter {
    /// The names `adapter` takes, as serde reads them.
    pub const NAMES: [&str; 3] = ["file", "rest", "tryton"];

    /// This adapter's name (`file`, `rest`, `tryton`).
    pub fn name(&self) -> &'static str {
        match self {
            Adapter::File(_) => "file",
            Adapter::Rest(_) => "rest",
            Adapter::Tryton(_) => "tryton",
        }
    }
}

impl Default for Adapter {
    fn default() -> Self {
        Adapter::File(FileErp::default())
    }
}

/// `adapter = "file"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FileErp {
    /// The plant (materials, stations, lots, work orders) as JSON.
    pub plant_file: String,
    /// Confirmations are appended here as JSON lines, once per idempotency key.
    pub outbox_file: String,
}

impl Default for FileErp {
    fn default() -> Self {
        Self {
            plant_file: "deploy/demo/plant.json".into(),
            outbox_file: "var/erp-confirmations.jsonl".into(),
        }
    }
}

/// `adapter = "rest"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RestErp {
    /// The bridge's base URL (`{base}/materials`, `{base}/confirmations`, ...).
    pub rest_base_url: String,
    /// Bearer token (empty: no `Authorization` header). Set it from the environment
    /// (`MES_ERP_SYNC_ERP__REST_TOKEN`) or a mounted secret, never in a TOML file.
    pub rest_token: Secret,
}

impl Default for RestErp {
    fn default() -> Self {
        Self {
            rest_base_url: "http://127.0.0.1:8070/erp/v1".into(),
            rest_token: Secret::default(),
        }
    }
}

/// `adapter = "tryton"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrytonErp {
    /// The server (`{url}/{database}/rpc/`).
    pub tryton_url: String,
    /// The database name.
    pub tryton_database: String,
    /// The login.
    pub tryton_user: String,
    /// The password (environment or secret only: `MES_ERP_SYNC_ERP__TRYTON_PASSWORD`).
    pub tryton_password: Secret,
    /// The company id put in every call's context (0: the user's company).
    pub tryton_company: i64,
    /// Base Tryton has no stations; every production order gets one operation (step 10) at
    /// this station, which the adapter also reports as the only station.
    pub tryton_station: String,
}

impl Default for TrytonErp {
    fn default() -> Self {
        Self {
            tryton_url: "http://127.0.0.1:8000".into(),
            tryton_database: "tryton".into(),
            tryton_user: "admin".into(),
            tryton_password: Secret::default(),
            tryton_company: 0,
            tryton_station: "TRYTON-PROD".into(),
        }
    }
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
            adapter: Adapter::default(),
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
        let figment = mes_common::config::figment(SERVICE, &Self::default());
        // An unknown adapter, in the settings' words rather than serde's (which would name
        // only the `erp` table, the adapter's keys being flattened into it).
        if let Ok(name) = figment.extract_inner::<String>("erp.adapter") {
            anyhow::ensure!(
                Adapter::NAMES.contains(&name.as_str()),
                "unknown erp adapter {name:?} in erp.adapter (known: {})",
                Adapter::NAMES.join(", ")
            );
        }
        Ok(figment.extract()?)
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
            assert_eq!(
                s.erp.adapter,
                Adapter::File(FileErp {
                    plant_file: "deploy/demo/plant.json".into(),
                    outbox_file: "var/erp-confirmations.jsonl".into(),
                }),
                "the file adapter is the default"
            );
            assert_eq!(s.erp.pull_interval_seconds, 60);
            // A timed-out call may still run inside the ERP for a while (see crate::delivery).
            assert_eq!(s.erp.retry_after_timeout_ms, 60_000);

            jail.set_env("MES_ERP_SYNC_SCAN_INGEST_URL", "http://si:1");
            jail.set_env("MES_ERP_SYNC_ERP__PLANT_FILE", "/plant.json");
            jail.set_env("MES_ERP_SYNC_ERP__PULL_INTERVAL_SECONDS", "5");
            let s = Settings::load().expect("env loads");
            assert_eq!(s.scan_ingest_url, "http://si:1");
            assert_eq!(
                s.erp.adapter,
                Adapter::File(FileErp {
                    plant_file: "/plant.json".into(),
                    outbox_file: "var/erp-confirmations.jsonl".into(),
                })
            );
            assert_eq!(s.erp.pull_interval_seconds, 5);

            jail.set_env("MES_ERP_SYNC_ERP__ADAPTER", "file");
            jail.set_env("MES_ERP_SYNC_ERP__OUTBOX_FILE", "/outbox.jsonl");
            let s = Settings::load().expect("env loads");
            assert_eq!(
                s.erp.adapter,
                Adapter::File(FileErp {
                    plant_file: "/plant.json".into(),
                    outbox_file: "/outbox.jsonl".into(),
                })
            );
            Ok(())
        });
    }

    #[test]
    fn the_rest_adapter_and_its_keys_come_from_the_environment() {
        Jail::expect_with(|jail| {
            // As compose and k8s do: the file adapter's paths stay set (ignored by rest).
            jail.set_env("MES_ERP_SYNC_ERP__PLANT_FILE", "/plant.json");
            jail.set_env("MES_ERP_SYNC_ERP__ADAPTER", "rest");
            let s = Settings::load().expect("env loads");
            assert_eq!(
                s.erp.adapter,
                Adapter::Rest(RestErp {
                    rest_base_url: "http://127.0.0.1:8070/erp/v1".into(),
                    rest_token: Secret::default(),
                }),
                "keys of the adapter that are not set take their defaults"
            );

            jail.set_env(
                "MES_ERP_SYNC_ERP__REST_BASE_URL",
                "http://bridge:8070/erp/v1",
            );
            jail.set_env("MES_ERP_SYNC_ERP__REST_TOKEN", "s3cret");
            jail.set_env("MES_ERP_SYNC_ERP__CALL_TIMEOUT_MS", "500");
            let s = Settings::load().expect("env loads");
            assert_eq!(
                s.erp.adapter,
                Adapter::Rest(RestErp {
                    rest_base_url: "http://bridge:8070/erp/v1".into(),
                    rest_token: Secret("s3cret".into()),
                })
            );
            assert_eq!(s.erp.adapter.name(), "rest");
            assert_eq!(s.erp.call_timeout_ms, 500, "the common keys beside them");
            assert_eq!(s.erp.pull_interval_seconds, 60);
            assert!(
                !format!("{s:?}").contains("s3cret"),
                "secrets stay out of logs"
            );
            Ok(())
        });
    }

    #[test]
    fn the_tryton_adapter_and_its_keys_come_from_the_environment() {
        Jail::expect_with(|jail| {
            jail.set_env("MES_ERP_SYNC_ERP__ADAPTER", "tryton");
            jail.set_env("MES_ERP_SYNC_ERP__TRYTON_URL", "http://tryton:8000");
            let s = Settings::load().expect("env loads");
            assert_eq!(
                s.erp.adapter,
                Adapter::Tryton(TrytonErp {
                    tryton_url: "http://tryton:8000".into(),
                    tryton_database: "tryton".into(),
                    tryton_user: "admin".into(),
                    tryton_password: Secret::default(),
                    tryton_company: 0,
                    tryton_station: "TRYTON-PROD".into(),
                })
            );

            jail.set_env("MES_ERP_SYNC_ERP__TRYTON_DATABASE", "plant");
            jail.set_env("MES_ERP_SYNC_ERP__TRYTON_USER", "mes");
            jail.set_env("MES_ERP_SYNC_ERP__TRYTON_PASSWORD", "pa55word");
            jail.set_env("MES_ERP_SYNC_ERP__TRYTON_COMPANY", "2");
            jail.set_env("MES_ERP_SYNC_ERP__TRYTON_STATION", "ST-1");
            jail.set_env("MES_ERP_SYNC_ERP__MAX_ATTEMPTS", "40");
            let s = Settings::load().expect("env loads");
            assert_eq!(
                s.erp.adapter,
                Adapter::Tryton(TrytonErp {
                    tryton_url: "http://tryton:8000".into(),
                    tryton_database: "plant".into(),
                    tryton_user: "mes".into(),
                    tryton_password: Secret("pa55word".into()),
                    tryton_company: 2,
                    tryton_station: "ST-1".into(),
                })
            );
            assert_eq!(s.erp.max_attempts, 40);
            assert!(
                !format!("{s:?}").contains("pa55word"),
                "secrets stay out of logs"
            );
            Ok(())
        });
    }

    #[test]
    fn the_adapter_and_its_keys_come_from_the_toml_file_and_the_environment_wins() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "mes.toml",
                r#"
                [erp-sync.erp]
                adapter = "tryton"
                tryton_url = "http://tryton:8000"
                tryton_database = "plant"
                tryton_company = 3
                pull_interval_seconds = 30
                "#,
            )?;
            let s = Settings::load().expect("the file loads");
            assert_eq!(
                s.erp.adapter,
                Adapter::Tryton(TrytonErp {
                    tryton_url: "http://tryton:8000".into(),
                    tryton_database: "plant".into(),
                    tryton_company: 3,
                    ..TrytonErp::default()
                })
            );
            assert_eq!(s.erp.pull_interval_seconds, 30);

            jail.create_file(
                "mes.toml",
                r#"
                [erp-sync.erp]
                adapter = "rest"
                rest_base_url = "http://bridge/erp/v1"
                plant_file = "/plant.json"
                "#,
            )?;
            let s = Settings::load().expect("the file loads");
            assert_eq!(
                s.erp.adapter,
                Adapter::Rest(RestErp {
                    rest_base_url: "http://bridge/erp/v1".into(),
                    rest_token: Secret::default(),
                })
            );

            // The environment wins over the file, the adapter's name as its keys.
            jail.set_env("MES_ERP_SYNC_ERP__REST_TOKEN", "s3cret");
            let s = Settings::load().expect("env loads");
            assert_eq!(
                s.erp.adapter,
                Adapter::Rest(RestErp {
                    rest_base_url: "http://bridge/erp/v1".into(),
                    rest_token: Secret("s3cret".into()),
                })
            );
            jail.set_env("MES_ERP_SYNC_ERP__ADAPTER", "file");
            let s = Settings::load().expect("env loads");
            assert_eq!(
                s.erp.adapter,
                Adapter::File(FileErp {
                    plant_file: "/plant.json".into(),
                    outbox_file: "var/erp-confirmations.jsonl".into(),
                })
            );
            Ok(())
        });
    }

    #[test]
    fn an_unknown_adapter_is_refused_by_name_and_every_known_name_loads() {
        Jail::expect_with(|jail| {
            jail.set_env("MES_ERP_SYNC_ERP__ADAPTER", "sap");
            let e = Settings::load().expect_err("unknown adapter").to_string();
            assert_eq!(
                e, "unknown erp adapter \"sap\" in erp.adapter (known: file, rest, tryton)",
                "{e}"
            );
            // Names are lowercase, as before.
            jail.set_env("MES_ERP_SYNC_ERP__ADAPTER", "Rest");
            let e = Settings::load().expect_err("unknown adapter").to_string();
            assert!(e.contains("\"Rest\""), "{e}");

            jail.clear_env();
            jail.create_file("mes.toml", "[erp-sync.erp]\nadapter = \"sap\"\n")?;
            let e = Settings::load().expect_err("unknown adapter").to_string();
            assert!(
                e.contains("\"sap\"") && e.contains("file, rest, tryton"),
                "{e}"
            );

            for name in Adapter::NAMES {
                jail.set_env("MES_ERP_SYNC_ERP__ADAPTER", name);
                let s = Settings::load().expect("a known adapter loads");
                assert_eq!(s.erp.adapter.name(), name);
            }
            Ok(())
        });
    }
}
