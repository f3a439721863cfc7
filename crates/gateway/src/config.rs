//! The gateway's settings: defaults, then the optional TOML file, then `MES_` / `MES_GATEWAY_`
//! environment variables (see [`mes_common::config`]). Lists in the environment use figment's
//! array syntax: `MES_GATEWAY_CORS_ALLOWED_ORIGINS='[https://tablet.example, http://localhost:5173]'`.

use serde::{Deserialize, Serialize};

use mes_common::ServiceSettings;

pub use mes_common::config::Secret;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    #[serde(flatten)]
    pub service: ServiceSettings,
    /// gRPC URL of scan-ingest.
    pub scan_ingest_url: String,
    /// gRPC URL of trace-query.
    pub trace_query_url: String,
    /// gRPC URL of erp-sync.
    pub erp_sync_url: String,
    /// HS256 signing secret of access tokens (at least 32 bytes). Required unless demo mode is
    /// on; in demo mode an empty secret is replaced by a random per-process one.
    pub jwt_secret: Secret,
    /// A second secret (at least 32 bytes) whose tokens still verify, never used to sign: the
    /// other secret of a rotation (README "Rotating the JWT secret").
    pub jwt_secret_previous: Secret,
    /// `iss` and `aud` of the access tokens.
    pub jwt_issuer: String,
    /// Lifetime of an access token.
    pub token_ttl_seconds: u64,
    /// Origins allowed by CORS (exact match, e.g. `https://tablets.plant.example`).
    pub cors_allowed_origins: Vec<String>,
    /// Requests per minute per authenticated user, shared by every replica through Redis.
    pub rate_limit_per_minute_user: u32,
    /// Requests per minute per enrolled device, shared by every replica through Redis.
    pub rate_limit_per_minute_device: u32,
    /// Password checks (argon2id, 19 MiB of memory each) that may run at once; `0`: the number
    /// of CPUs, at most 4. Bounds the memory logins can take (and so a login flood).
    pub login_max_concurrent_hashes: usize,
    /// How long a login waits for a free password check before it is refused with 503
    /// `unavailable` and `Retry-After`.
    pub login_hash_wait_ms: u64,
    /// Login attempts per username per window that may fail (429 `rate_limited` after);
    /// unknown usernames count the same. An attempt counts before its password is checked, so
    /// parallel guesses cannot pass the limit; a successful login does not count.
    pub login_attempts_per_user: u32,
    /// Failed login attempts per client address per window (429 after), whatever usernames.
    pub login_attempts_per_ip: u32,
    /// The window of both login limits (starts at the first attempt).
    pub login_window_seconds: u64,
    /// How long a login waits for Redis to count its attempt; slower (or down), the attempt is
    /// counted by this replica alone (the limits still hold, per replica).
    pub login_redis_timeout_ms: u64,
    /// The most usernames and client addresses whose login attempts this replica counts in
    /// process (a few dozen bytes each). When full, the oldest counts are forgotten first
    /// (Redis, when reachable, still holds the shared ones).
    pub login_local_keys_max: usize,
    /// Request header holding the client address, when the gateway runs behind a proxy that
    /// sets it (e.g. `x-forwarded-for`: its last entry, the one the proxy added, is used).
    /// Empty: the TCP peer address. Only set it behind such a proxy: clients could forge it.
    pub client_ip_header: String,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Whole-request timeout.
    pub request_timeout_ms: u64,
    /// Time a client has to send a request's whole header section (slowloris protection).
    pub header_read_timeout_ms: u64,
    /// TCP connect timeout to a service: a service that is down answers 503 at once.
    pub grpc_connect_timeout_ms: u64,
    /// Per-call timeout of a gRPC call to a service.
    pub grpc_request_timeout_ms: u64,
    /// Timeout of each probe of `GET /api/v1/health` and `/readyz`.
    pub health_timeout_ms: u64,
    /// `Retry-After` seconds sent with 503 `unavailable`.
    pub retry_after_seconds: u64,
    /// After a shutdown signal, how long `/readyz` answers 503 before the listener closes
    /// (lets load balancers notice); then in-flight requests drain.
    pub shutdown_readiness_delay_ms: u64,
    /// Disk space below which the `disk` health component is `degraded`.
    pub disk_min_free_bytes: u64,
}

impl Settings {
    pub fn defaults() -> Self {
        Self {
            service: ServiceSettings::defaults_for("gateway"),
            scan_ingest_url: "http://127.0.0.1:50051".into(),
            trace_query_url: "http://127.0.0.1:50052".into(),
            erp_sync_url: "http://127.0.0.1:50053".into(),
            jwt_secret: Secret::default(),
            jwt_secret_previous: Secret::default(),
            jwt_issuer: "mes-gateway".into(),
            token_ttl_seconds: 900,
            cors_allowed_origins: Vec::new(),
            rate_limit_per_minute_user: 600,
            rate_limit_per_minute_device: 600,
            login_max_concurrent_hashes: 0,
            login_hash_wait_ms: 2_000,
            login_attempts_per_user: 10,
            login_attempts_per_ip: 50,
            login_window_seconds: 300,
            login_redis_timeout_ms: 250,
            login_local_keys_max: 100_000,
            client_ip_header: String::new(),
            max_body_bytes: 1024 * 1024,
            request_timeout_ms: 15_000,
            header_read_timeout_ms: 10_000,
            grpc_connect_timeout_ms: 1_000,
            grpc_request_timeout_ms: 10_000,
            health_timeout_ms: 1_000,
            retry_after_seconds: 2,
            shutdown_readiness_delay_ms: 0,
            disk_min_free_bytes: 1024 * 1024 * 1024,
        }
    }

    /// The number of password checks that may run at once.
    pub fn concurrent_hashes(&self) -> usize {
        if self.login_max_concurrent_hashes > 0 {
            return self.login_max_concurrent_hashes;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4)
    }

    /// Loads the settings (defaults → file → environment); [`Settings::validate`] runs when
    /// the server is built (admin commands need no JWT secret).
    pub fn load() -> anyhow::Result<Self> {
        mes_common::config::load("gateway", &Self::defaults())
    }

    /// Rejects settings the gateway cannot run safely with.
    pub fn validate(&self) -> anyhow::Result<()> {
        // It signs its calls to the services: the internal key is required outside demo mode.
        self.service.validate_internal_key()?;
        if !self.service.demo {
            anyhow::ensure!(
                !self.jwt_secret.is_empty(),
                "jwt_secret is required (MES_GATEWAY_JWT_SECRET) unless demo mode is on"
            );
        }
        anyhow::ensure!(
            self.jwt_secret.is_empty() || self.jwt_secret.expose().len() >= 32,
            "jwt_secret must be at least 32 bytes"
        );
        anyhow::ensure!(
            self.jwt_secret_previous.is_empty() || self.jwt_secret_previous.expose().len() >= 32,
            "jwt_secret_previous must be at least 32 bytes"
        );
        anyhow::ensure!(
            self.jwt_secret_previous.is_empty() || !self.jwt_secret.is_empty(),
            "jwt_secret_previous needs a jwt_secret to sign with"
        );
        anyhow::ensure!(self.token_ttl_seconds > 0, "token_ttl_seconds must be > 0");
        anyhow::ensure!(self.max_body_bytes > 0, "max_body_bytes must be > 0");
        anyhow::ensure!(
            self.header_read_timeout_ms > 0,
            "header_read_timeout_ms must be > 0"
        );
        anyhow::ensure!(
            self.rate_limit_per_minute_user > 0 && self.rate_limit_per_minute_device > 0,
            "rate limits must be > 0"
        );
        anyhow::ensure!(
            self.login_attempts_per_user > 0 && self.login_attempts_per_ip > 0,
            "login_attempts_per_user and login_attempts_per_ip must be > 0"
        );
        anyhow::ensure!(
            self.login_local_keys_max >= 2,
            "login_local_keys_max must be at least 2 (a login counts a username and an address)"
        );
        anyhow::ensure!(
            self.login_window_seconds > 0,
            "login_window_seconds must be > 0"
        );
        anyhow::ensure!(
            self.client_ip_header.is_empty()
                || http::HeaderName::from_bytes(self.client_ip_header.as_bytes()).is_ok(),
            "client_ip_header: {:?} is not a header name",
            self.client_ip_header
        );
        for origin in &self.cors_allowed_origins {
            anyhow::ensure!(
                http::HeaderValue::from_str(origin).is_ok() && origin != "*",
                "cors_allowed_origins: {origin:?} is not an exact origin"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_in_demo_mode_only() {
        let mut s = Settings::defaults();
        assert!(s.validate().is_err(), "no secret outside demo mode");
        s.service.demo = true;
        s.validate().unwrap();
        s.jwt_secret = Secret("short".into());
        assert!(s.validate().is_err());
        s.jwt_secret = Secret("x".repeat(32));
        s.service.demo = false;
        let err = s.validate().expect_err("no internal key outside demo mode");
        assert!(err.to_string().contains("MES_INTERNAL_KEY"), "{err}");
        s.service.internal_key = Secret("k".repeat(32));
        s.validate().unwrap();
    }

    #[test]
    fn secrets_are_not_printed() {
        let mut s = Settings::defaults();
        s.jwt_secret = Secret("super-secret-value-of-32-bytes-or-more".into());
        assert!(!format!("{s:?}").contains("super-secret"));
    }

    #[test]
    fn defaults_match_the_documented_ports() {
        let s = Settings::defaults();
        assert_eq!(s.service.listen_addr, "0.0.0.0:8080");
        assert_eq!(s.scan_ingest_url, "http://127.0.0.1:50051");
        assert_eq!(s.trace_query_url, "http://127.0.0.1:50052");
        assert_eq!(s.erp_sync_url, "http://127.0.0.1:50053");
        assert_eq!(s.token_ttl_seconds, 900);
        assert_eq!(s.max_body_bytes, 1024 * 1024);
    }
}
