//! Configuration: built-in defaults, then an optional TOML file, then `MES_` environment
//! variables (service-specific `MES_<SERVICE>_` variables win over plain `MES_` ones, so one
//! shell can configure four services).

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// A secret string: serialised as is (figment needs it), never printed by `Debug`.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str("Secret(<empty>)")
        } else {
            f.write_str("Secret(<redacted>)")
        }
    }
}

impl Secret {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Settings every service has. Service crates flatten this into their own `Settings`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceSettings {
    /// PostgreSQL URL of the service's own database (created if missing).
    pub database_url: String,
    /// Maximum connections in the pool.
    pub database_max_connections: u32,
    /// Redis URL.
    pub redis_url: String,
    /// Prefix of every Redis key this service writes (lets tests and tenants share a Redis).
    pub redis_prefix: String,
    /// Main listen address (gRPC for the three back-end services, REST for the gateway).
    pub listen_addr: String,
    /// Listen address of `/metrics` (empty: no separate metrics listener).
    pub metrics_addr: String,
    /// OTLP/gRPC endpoint for spans (e.g. `http://127.0.0.1:4317`); empty disables export.
    pub otlp_endpoint: String,
    /// `json` (default) or `pretty`.
    pub log_format: String,
    /// `tracing` filter directive, e.g. `info,sqlx=warn`.
    pub log_level: String,
    /// Seconds to drain in-flight requests and streams after SIGTERM.
    pub shutdown_grace_seconds: u64,
    /// Demo mode: seeds demo users/devices (gateway) — never on in production config.
    pub demo: bool,
    /// The key the four services share to sign and check the caller identity of internal gRPC
    /// calls (`MES_INTERNAL_KEY`, at least 32 bytes). Empty: identities are not signed and the
    /// services trust any caller that reaches their port (single host, demo).
    #[serde(default)]
    pub internal_key: Secret,
}

impl ServiceSettings {
    /// The internal key, when one is configured.
    pub fn caller_key(&self) -> Option<crate::identity::CallerKey> {
        crate::identity::CallerKey::from_config(self.internal_key.expose())
    }

    /// Refuses a key too short to be a real secret.
    pub fn validate_internal_key(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.internal_key.is_empty() || self.internal_key.expose().len() >= 32,
            "internal_key (MES_INTERNAL_KEY) must be at least 32 bytes"
        );
        Ok(())
    }
}

impl ServiceSettings {
    /// Developer-machine defaults for `service` (database `mes_<service>`, its own ports).
    pub fn defaults_for(service: &str) -> Self {
        let (listen, metrics) = match service {
            "gateway" => ("0.0.0.0:8080", ""),
            "scan-ingest" => ("0.0.0.0:50051", "0.0.0.0:9091"),
            "trace-query" => ("0.0.0.0:50052", "0.0.0.0:9092"),
            "erp-sync" => ("0.0.0.0:50053", "0.0.0.0:9093"),
            _ => ("0.0.0.0:0", ""),
        };
        Self {
            database_url: format!(
                "postgres://postgres@127.0.0.1:5432/mes_{}",
                service.replace('-', "_")
            ),
            database_max_connections: 16,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_prefix: format!("mes:{service}:"),
            listen_addr: listen.into(),
            metrics_addr: metrics.into(),
            otlp_endpoint: String::new(),
            log_format: "json".into(),
            log_level: "info,sqlx=warn,h2=warn,tower=warn,hyper=warn".into(),
            shutdown_grace_seconds: 20,
            demo: false,
            internal_key: Secret::default(),
        }
    }
}

/// The environment-variable prefix specific to `service`: `scan-ingest` → `MES_SCAN_INGEST_`.
pub fn service_env_prefix(service: &str) -> String {
    format!("MES_{}_", service.to_uppercase().replace('-', "_"))
}

/// Builds the layered figment for `service` on top of `defaults`.
///
/// Order (later wins): `defaults`, the TOML file named by `MES_CONFIG` (if set; `mes.toml` in
/// the working directory otherwise, when it exists) with its `[default]` and `[<service>]`
/// tables, `MES_*`, then `MES_<SERVICE>_*`. Nested keys use `__` (`MES_ERP__ADAPTER`).
pub fn figment<T: Serialize>(service: &str, defaults: &T) -> Figment {
    let file = std::env::var("MES_CONFIG").unwrap_or_else(|_| "mes.toml".into());
    let prefix = service_env_prefix(service);
    let own_prefix = prefix.clone();
    let others: Vec<String> = ["scan-ingest", "trace-query", "erp-sync", "gateway"]
        .iter()
        .map(|s| service_env_prefix(s))
        .collect();
    Figment::from(Serialized::defaults(defaults))
        .merge(Toml::file(&file).nested())
        .select(service)
        .merge(
            // Plain MES_ variables, but not those meant for one service in particular.
            Env::prefixed("MES_")
                .filter(move |key| {
                    let upper = format!("MES_{}", key.as_str().to_uppercase());
                    key.as_str() != "config" && !others.iter().any(|p| upper.starts_with(p))
                })
                .split("__")
                .global(),
        )
        .merge(Env::prefixed(&own_prefix).split("__").global())
}

/// Loads the settings of `service`, see [`figment`].
pub fn load<T: Serialize + DeserializeOwned>(service: &str, defaults: &T) -> anyhow::Result<T> {
    Ok(figment(service, defaults).extract()?)
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Settings {
        #[serde(flatten)]
        service: ServiceSettings,
        batch_wait_ms: u64,
    }

    fn defaults() -> Settings {
        Settings {
            service: ServiceSettings::defaults_for("scan-ingest"),
            batch_wait_ms: 2,
        }
    }

    #[test]
    fn defaults_work_on_a_developer_machine() {
        Jail::expect_with(|_jail| {
            let s: Settings = load("scan-ingest", &defaults()).unwrap();
            assert_eq!(
                s.service.database_url,
                "postgres://postgres@127.0.0.1:5432/mes_scan_ingest"
            );
            assert_eq!(s.service.listen_addr, "0.0.0.0:50051");
            assert_eq!(s.service.metrics_addr, "0.0.0.0:9091");
            assert_eq!(s.batch_wait_ms, 2);
            Ok(())
        });
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "mes.toml",
                r#"
                [default]
                redis_url = "redis://file:6379"
                batch_wait_ms = 7
                [scan-ingest]
                listen_addr = "127.0.0.1:6000"
                [gateway]
                listen_addr = "127.0.0.1:7000"
                "#,
            )?;
            let s: Settings = load("scan-ingest", &defaults()).unwrap();
            assert_eq!(s.service.redis_url, "redis://file:6379");
            assert_eq!(s.service.listen_addr, "127.0.0.1:6000");
            assert_eq!(s.batch_wait_ms, 7);

            jail.set_env("MES_BATCH_WAIT_MS", "9");
            jail.set_env("MES_REDIS_URL", "redis://env:6379");
            let s: Settings = load("scan-ingest", &defaults()).unwrap();
            assert_eq!(s.batch_wait_ms, 9);
            assert_eq!(s.service.redis_url, "redis://env:6379");
            Ok(())
        });
    }

    #[test]
    fn service_specific_env_wins_and_does_not_leak_to_other_services() {
        Jail::expect_with(|jail| {
            jail.set_env("MES_DATABASE_URL", "postgres://shared/db");
            jail.set_env("MES_SCAN_INGEST_DATABASE_URL", "postgres://own/db");
            jail.set_env("MES_SCAN_INGEST_DEMO", "true");
            let s: Settings = load("scan-ingest", &defaults()).unwrap();
            assert_eq!(s.service.database_url, "postgres://own/db");
            assert!(s.service.demo);

            let g: ServiceSettings =
                load("gateway", &ServiceSettings::defaults_for("gateway")).unwrap();
            assert_eq!(g.database_url, "postgres://shared/db");
            assert!(!g.demo, "MES_SCAN_INGEST_DEMO must not reach the gateway");
            Ok(())
        });
    }

    #[test]
    fn wrong_types_are_reported_with_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("MES_BATCH_WAIT_MS", "soon");
            let err = load("scan-ingest", &defaults()).unwrap_err().to_string();
            assert!(err.to_lowercase().contains("batch_wait_ms"), "{err}");
            Ok(())
        });
    }
}
