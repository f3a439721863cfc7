//! `spawn_app()`: the gateway on 127.0.0.1:0 against a fresh PostgreSQL database and a unique
//! Redis key prefix (both removed when the `TestApp` is dropped), demo mode on, and the
//! services at closed local ports unless a test starts a fake one.

use std::sync::OnceLock;
use std::time::Duration;

use gateway::config::Secret;
use gateway::{Application, Settings};
use mes_common::Shutdown;
use reqwest::StatusCode;
use serde_json::{Value, json};

pub const TEST_SECRET: &str = "gateway-tests-secret-0123456789abcdef";
pub const ALLOWED_ORIGIN: &str = "https://tablets.plant.example";
pub const PG: &str = "postgres://postgres@127.0.0.1:5432";
pub const REDIS: &str = "redis://127.0.0.1:6379";

/// Real OpenTelemetry spans (no exporter), so trace ids come from the real path.
pub fn init_tracing() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::{EnvFilter, Layer};
        mes_common::telemetry::set_propagator();
        let provider =
            mes_common::telemetry::tracer_provider("gateway-tests", "").expect("tracer provider");
        let tracer = provider.tracer("gateway-tests");
        let filter = EnvFilter::try_from_env("TEST_LOG").unwrap_or_else(|_| EnvFilter::new("off"));
        let _ = tracing_subscriber::registry()
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(filter),
            )
            .try_init();
    });
}

/// A local port nothing listens on: 1 (tcpmux), privileged and never handed out by a bind to
/// port 0. (A port bound to port 0 and released could be handed to another test's listener
/// meanwhile, and a "down" service would then answer as some other server.)
pub fn closed_port() -> u16 {
    1
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub shutdown: Shutdown,
    pub settings: Settings,
    /// The running gateway's shared state (its password-check pool, its limits).
    pub state: gateway::AppState,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    owns_storage: bool,
}

/// Test settings: fresh database, unique Redis prefix, demo mode, closed service ports.
pub fn test_settings() -> Settings {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut s = Settings::defaults();
    s.service.database_url = format!("{PG}/gateway_test_{id}");
    s.service.database_max_connections = 4;
    s.service.redis_url = REDIS.into();
    s.service.redis_prefix = format!("test:gateway:{id}:");
    s.service.listen_addr = "127.0.0.1:0".into();
    s.service.demo = true;
    s.service.internal_key = mes_common::testing::internal_key();
    s.service.shutdown_grace_seconds = 2;
    s.jwt_secret = Secret(TEST_SECRET.into());
    s.cors_allowed_origins = vec![ALLOWED_ORIGIN.into()];
    s.scan_ingest_url = format!("http://127.0.0.1:{}", closed_port());
    s.trace_query_url = format!("http://127.0.0.1:{}", closed_port());
    s.erp_sync_url = format!("http://127.0.0.1:{}", closed_port());
    s.request_timeout_ms = 10_000;
    s
}

pub async fn spawn_app() -> TestApp {
    spawn_with(test_settings()).await
}

pub async fn spawn_with(settings: Settings) -> TestApp {
    spawn_inner(settings, true).await
}

/// A second instance sharing `first`'s database and Redis prefix (cleaned up by `first`).
pub async fn spawn_replica(first: &TestApp) -> TestApp {
    spawn_inner(first.settings.clone(), false).await
}

/// An instance with other `settings` on `first`'s database and Redis prefix (cleaned up by
/// `first`), e.g. the same plant outside demo mode.
pub async fn spawn_with_storage_of(first: &TestApp, mut settings: Settings) -> TestApp {
    settings.service.database_url = first.settings.service.database_url.clone();
    settings.service.redis_prefix = first.settings.service.redis_prefix.clone();
    spawn_inner(settings, false).await
}

async fn spawn_inner(settings: Settings, owns_storage: bool) -> TestApp {
    init_tracing();
    let app = Application::build(settings.clone())
        .await
        .expect("gateway builds");
    let port = app.port();
    let state = app.state().clone();
    let shutdown = Shutdown::new();
    let server = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client"),
        shutdown,
        settings,
        state,
        server: Some(server),
        owns_storage,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// Logs in, returning the token (panics unless 200). A device logs in with its demo
    /// enrolment secret (`demo-<device>`).
    pub async fn login(&self, username: &str, password: &str, device: Option<&str>) -> String {
        let mut body = json!({"username": username, "password": password});
        if let Some(d) = device {
            body["device_id"] = json!(d);
            body["device_secret"] = json!(format!("demo-{d}"));
        }
        let res = self
            .client
            .post(self.url("/api/v1/auth/token"))
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), StatusCode::OK, "login of {username}");
        let v: Value = res.json().await.expect("json");
        v["access_token"].as_str().expect("token").to_owned()
    }

    /// Logs in a demo user by name (password `demo-<name>`).
    pub async fn demo_token(&self, user: &str, device: Option<&str>) -> String {
        self.login(user, &format!("demo-{user}"), device).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut r = self.client.get(self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.expect("request")
    }

    pub async fn post_json(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut r = self.client.post(self.url(path)).json(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.expect("request")
    }

    pub async fn post_raw(
        &self,
        path: &str,
        token: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut r = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.expect("request")
    }

    /// Triggers shutdown and waits for the server to finish.
    pub async fn stop(&mut self) {
        self.shutdown.trigger();
        if let Some(h) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(h) = self.server.take() {
            h.abort();
        }
        if !self.owns_storage {
            return;
        }
        // Works even while a test is panicking (the guards clean up on a runtime of their own).
        drop(mes_common::testing::DbGuard {
            url: self.settings.service.database_url.clone(),
        });
        drop(mes_common::testing::RedisGuard {
            url: self.settings.service.redis_url.clone(),
            prefix: self.settings.service.redis_prefix.clone(),
        });
    }
}

/// Asserts a problem+json response with `status` and `code`; returns the body.
pub async fn assert_problem(res: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status().as_u16(), status, "status of {}", res.url());
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        ct.starts_with("application/problem+json"),
        "content-type {ct:?}"
    );
    let trace_header = res
        .headers()
        .get("x-trace-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = res.json().await.expect("problem body is JSON");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["trace_id"], trace_header.as_str(), "{body}");
    assert!(
        body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("/problems/"))
    );
    assert!(body["title"].is_string() && body["detail"].is_string());
    body
}

/// The `field`s of a problem's `errors`.
pub fn error_fields(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["field"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A valid scan for `station`.
pub fn scan(station: &str) -> Value {
    json!({
        "scan_id": uuid::Uuid::new_v4().to_string(),
        "kind": "consume",
        "work_order": "WO-1000",
        "station": station,
        "lot": "STEEL-L1",
        "quantity": "25",
        "scanned_at": "2025-03-01T08:15:30Z"
    })
}

/// base64url without padding (to forge tokens).
pub fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}
