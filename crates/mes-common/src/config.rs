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
/// `Debug` shows URLs without their passwords and secrets not at all.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
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
    /// The key the four services share to sign and check internal gRPC calls
    /// (`MES_INTERNAL_KEY`, at least 32 bytes). Required unless demo mode is on; empty in demo
    /// mode: calls are not signed and the services trust any caller that reaches their port.
    #[serde(default)]
    pub internal_key: Secret,
    /// A second key accepted on incoming calls, never used to sign (`MES_INTERNAL_KEY_PREVIOUS`):
    /// the previous key while a rotation is under way (see the README's rotation procedure).
    #[serde(default)]
    pub internal_key_previous: Secret,
}

impl std::fmt::Debug for ServiceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceSettings")
            .field("database_url", &redact_url(&self.database_url))
            .field("database_max_connections", &self.database_max_connections)
            .field("redis_url", &redact_url(&self.redis_url))
            .field("redis_prefix", &self.redis_prefix)
            .field("listen_addr", &self.listen_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("otlp_endpoint", &redact_url(&self.otlp_endpoint))
            .field("log_format", &self.log_format)
            .field("log_level", &self.log_level)
            .field("shutdown_grace_seconds", &self.shutdown_grace_seconds)
            .field("demo", &self.demo)
            .field("internal_key", &self.internal_key)
            .field("internal_key_previous", &self.internal_key_previous)
            .finish()
    }
}

impl ServiceSettings {
    /// The internal key (with the previous one, when set), when one is configured.
    pub fn caller_key(&self) -> Option<crate::identity::CallerKey> {
        crate::identity::CallerKey::from_config(self.internal_key.expose())
            .map(|k| k.accepting(self.internal_key_previous.expose()))
    }

    /// Outside demo mode, requires the internal key (as the gateway requires its JWT secret);
    /// refuses keys too short to be real secrets. In demo mode without a key, warns loudly.
    pub fn validate_internal_key(&self) -> anyhow::Result<()> {
        if self.internal_key.is_empty() {
            anyhow::ensure!(
                self.demo,
                "internal_key (MES_INTERNAL_KEY) is required unless demo mode is on (MES_DEMO=true): \
                 set the same random key of at least 32 bytes on all four services, e.g. \
                 `head -c 32 /dev/urandom | base64`"
            );
            anyhow::ensure!(
                self.internal_key_previous.is_empty(),
                "internal_key_previous (MES_INTERNAL_KEY_PREVIOUS) is set but internal_key \
                 (MES_INTERNAL_KEY) is not"
            );
            tracing::warn!(
                "demo mode without an internal key (MES_INTERNAL_KEY): internal calls are not \
                 signed, so anything that reaches a service port can act as any user; never \
                 run like this outside a developer machine"
            );
            return Ok(());
        }
        anyhow::ensure!(
            self.internal_key.expose().len() >= 32,
            "internal_key (MES_INTERNAL_KEY) must be at least 32 bytes"
        );
        anyhow::ensure!(
            self.internal_key_previous.is_empty()
                || self.internal_key_previous.expose().len() >= 32,
            "internal_key_previous (MES_INTERNAL_KEY_PREVIOUS) must be at least 32 bytes"
        );
        Ok(())
    }
}

/// `url` fit for logs and health output: the password of its user info (`user:***@host`) and
/// `password=` query parameters replaced by `***`. Text that is not a URL comes back as is.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.to_ascii_lowercase().contains("password") => {
                        format!("{k}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
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
            internal_key_previous: Secret::default(),
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
    fn outside_demo_mode_a_service_needs_an_internal_key() {
        let mut s = ServiceSettings::defaults_for("scan-ingest");
        let err = s
            .validate_internal_key()
            .expect_err("no key outside demo mode")
            .to_string();
        assert!(err.contains("MES_INTERNAL_KEY"), "names the setting: {err}");
        s.demo = true;
        s.validate_internal_key()
            .expect("demo mode runs without a key (with a warning)");
        s.demo = false;
        s.internal_key = Secret("k".repeat(32));
        s.validate_internal_key().expect("a key of 32 bytes");
        s.internal_key = Secret("short".into());
        assert!(s.validate_internal_key().is_err(), "too short");
    }

    #[test]
    fn redacted_urls_keep_everything_but_passwords() {
        for (url, shown) in [
            ("redis://:pw@cache:6379", "redis://:***@cache:6379"),
            ("redis://u:p:w@h/0?x=1", "redis://u:***@h/0?x=1"),
            ("rediss://u:p%40ss@h:1/2", "rediss://u:***@h:1/2"),
            (
                "postgres://postgres@127.0.0.1:5432/mes",
                "postgres://postgres@127.0.0.1:5432/mes",
            ),
            (
                "postgres://u@h/db?sslmode=require&password=pw",
                "postgres://u@h/db?sslmode=require&password=***",
            ),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("not a url", "not a url"),
            ("", ""),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn urls_with_passwords_are_not_printed() {
        let mut s = ServiceSettings::defaults_for("scan-ingest");
        s.redis_url = "redis://mes:redis-pw-123@cache:6379/0".into();
        s.database_url = "postgres://mes:pg-pw-456@db:5432/mes".into();
        let shown = format!("{s:?}");
        assert!(!shown.contains("redis-pw-123"), "{shown}");
        assert!(!shown.contains("pg-pw-456"), "{shown}");
        assert!(shown.contains("redis://mes:***@cache:6379/0"), "{shown}");
        assert!(shown.contains("postgres://mes:***@db:5432/mes"), "{shown}");
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
