//! `GET /healthz`, `GET /readyz`, `GET /api/v1/health`, `GET /openapi.json` (and the
//! documentation of `GET /metrics`, served by `mes_common::metrics`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use mes_proto::v1 as pb;

use crate::AppState;
use crate::clients::{ERP_SYNC, SCAN_INGEST, TRACE_QUERY};
use crate::problem::Problem;

#[derive(Debug, Serialize, ToSchema)]
pub struct Alive {
    #[schema(example = "ok")]
    pub status: String,
}

/// Liveness
///
/// 200 while the process runs (no dependency checks).
#[utoipa::path(get, path = "/healthz", operation_id = "liveness", tag = "operations",
    responses((status = 200, description = "The process is alive", body = Alive)))]
pub async fn healthz() -> Json<Alive> {
    Json(Alive {
        status: "ok".into(),
    })
}

/// Readiness
///
/// 200 when the gateway can serve (its database answers); 503 `unavailable` otherwise and as
/// soon as shutdown starts.
#[utoipa::path(get, path = "/readyz", operation_id = "readiness", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Alive),
        (status = 503, description = "`unavailable`: shutting down or the database is down", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    ))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Alive>, Problem> {
    let retry = state.settings.retry_after_seconds;
    if state.draining.load(Ordering::SeqCst) {
        return Err(Problem::unavailable("shutting down", retry));
    }
    let timeout = Duration::from_millis(state.settings.health_timeout_ms);
    match tokio::time::timeout(timeout, mes_common::db::ping(&state.pool)).await {
        Ok(Ok(_)) => Ok(Json(Alive {
            status: "ready".into(),
        })),
        Ok(Err(e)) => {
            tracing::warn!(error = %format!("{e:#}"), "not ready: database");
            Err(Problem::unavailable(
                "the gateway database is unavailable",
                retry,
            ))
        }
        Err(_) => {
            tracing::warn!("not ready: database does not answer");
            Err(Problem::unavailable(
                "the gateway database does not answer",
                retry,
            ))
        }
    }
}

/// One component of the health report: `status` and either `latency_ms` or figures.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Component {
    /// `up` | `degraded` | `down` | `unknown`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Why the component is not up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `erp`: the ERP's reachability as last seen by erp-sync (`up` | `down` | `unknown`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reachable: Option<String>,
    /// `erp`: the circuit breaker (`closed` | `open` | `half_open`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<String>,
    /// `disk`: the file system holding the working directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    /// `disk`, `memory`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// `disk`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// `memory`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_bytes: Option<u64>,
    /// `memory`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
}

impl Component {
    fn up(latency: Duration) -> Self {
        Self {
            status: "up".into(),
            latency_ms: Some((latency.as_secs_f64() * 1000.0 * 100.0).round() / 100.0),
            ..Default::default()
        }
    }
    fn down(error: impl Into<String>) -> Self {
        Self {
            status: "down".into(),
            error: Some(error.into()),
            ..Default::default()
        }
    }
    fn is_up(&self) -> bool {
        self.status == "up"
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthReport {
    /// `ok` (everything up), `degraded` (scans are taken but something is impaired), `down`
    /// (scans cannot be taken: the gateway database or scan-ingest is down).
    pub status: String,
    /// `scan-ingest`, `trace-query`, `erp-sync`, `database`, `redis`, `erp`, `ledger` (scan-ingest's ledger check), `disk`, `memory`.
    pub components: BTreeMap<String, Component>,
}

fn disk_component(min_free: u64) -> Component {
    let disks = sysinfo::Disks::new_with_refreshed_list();
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let best = disks
        .list()
        .iter()
        .filter(|d| cwd.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len());
    match best {
        Some(d) => {
            let free = d.available_space();
            Component {
                status: if free >= min_free { "up" } else { "degraded" }.into(),
                error: (free < min_free).then(|| "low disk space".to_owned()),
                mount_point: Some(d.mount_point().display().to_string()),
                total_bytes: Some(d.total_space()),
                free_bytes: Some(free),
                ..Default::default()
            }
        }
        None => Component {
            status: "unknown".into(),
            error: Some("no disk found for the working directory".into()),
            ..Default::default()
        },
    }
}

fn memory_component() -> Component {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    let total = sys.total_memory();
    let available = sys.available_memory();
    let low = total > 0 && available.saturating_mul(20) < total;
    Component {
        status: if low { "degraded" } else { "up" }.into(),
        error: low.then(|| "less than 5% of memory available".to_owned()),
        total_bytes: Some(total),
        available_bytes: Some(available),
        used_bytes: Some(sys.used_memory()),
        ..Default::default()
    }
}

/// Detailed health
///
/// Each service (gRPC health), the gateway's database, Redis, the ERP (as erp-sync sees it),
/// disk and memory. Always 200; read `status`.
#[utoipa::path(get, path = "/api/v1/health", operation_id = "getHealth", tag = "operations",
    responses((status = 200, description = "The health report", body = HealthReport)))]
pub async fn health(State(state): State<AppState>) -> Json<HealthReport> {
    let timeout = Duration::from_millis(state.settings.health_timeout_ms);
    let service = |name: &'static str| {
        let backends = state.backends.clone();
        async move {
            match backends.health(name, timeout).await {
                Ok(latency) => Component::up(latency),
                Err(e) => Component::down(e),
            }
        }
    };
    let database = async {
        match tokio::time::timeout(timeout, mes_common::db::ping(&state.pool)).await {
            Ok(Ok(latency)) => Component::up(latency),
            Ok(Err(_)) => Component::down("unreachable"),
            Err(_) => Component::down("no answer in time"),
        }
    };
    let redis = async {
        match tokio::time::timeout(timeout, state.limits.redis().ping()).await {
            Ok(Ok(latency)) => Component::up(latency),
            Ok(Err(_)) => Component::down("unreachable"),
            Err(_) => Component::down("no answer in time"),
        }
    };
    let erp = async {
        let caller = mes_common::identity::Caller::system("gateway-health");
        let call = state.backends.call(
            ERP_SYNC,
            "GetStatus",
            &caller,
            pb::GetErpStatusRequest {},
            |req| {
                let mut client = state.backends.erp_sync();
                async move { client.get_status(req).await }
            },
        );
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(s)) => {
                let reachable = if s.erp_reachable.is_empty() {
                    "unknown".to_owned()
                } else {
                    s.erp_reachable
                };
                let status = match (reachable.as_str(), s.breaker.as_str()) {
                    ("down", _) | (_, "open") => "down",
                    ("up", "closed" | "") => "up",
                    ("up", _) => "degraded",
                    _ => "unknown",
                };
                Component {
                    status: status.into(),
                    reachable: Some(reachable),
                    breaker: (!s.breaker.is_empty()).then_some(s.breaker),
                    ..Default::default()
                }
            }
            _ => Component {
                status: "unknown".into(),
                error: Some("erp-sync does not answer".into()),
                ..Default::default()
            },
        }
    };
    // scan-ingest's ledger check (on-hand = sum of scan effects), as its "ledger" health name.
    let ledger = async {
        match state.backends.health_of(SCAN_INGEST, "ledger", timeout).await {
            Ok(_) => Component {
                status: "up".into(),
                ..Default::default()
            },
            Err(e) if e == crate::clients::NOT_REPORTED => Component {
                status: "unknown".into(),
                error: Some("the ledger check is off or has not run yet".into()),
                ..Default::default()
            },
            Err(e) if e == "not_serving" => Component {
                status: "down".into(),
                error: Some("the ledger check found mismatches (see scan-ingest's ledger_mismatches metric and logs)".into()),
                ..Default::default()
            },
            Err(e) => Component {
                status: "unknown".into(),
                error: Some(e),
                ..Default::default()
            },
        }
    };
    let min_free = state.settings.disk_min_free_bytes;
    let figures =
        tokio::task::spawn_blocking(move || (disk_component(min_free), memory_component()));
    let (scan, trace, sync, database, redis, erp, ledger, figures) = tokio::join!(
        service(SCAN_INGEST),
        service(TRACE_QUERY),
        service(ERP_SYNC),
        database,
        redis,
        erp,
        ledger,
        figures
    );
    let (disk, memory) = figures.unwrap_or_else(|_| {
        (
            Component::down("probe failed"),
            Component::down("probe failed"),
        )
    });
    let status = if !database.is_up() || !scan.is_up() {
        "down"
    } else if [&trace, &sync, &redis, &disk, &memory]
        .iter()
        .any(|c| !c.is_up())
        || erp.status == "down"
        || erp.status == "degraded"
        || ledger.status == "down"
    {
        "degraded"
    } else {
        "ok"
    };
    for (name, c) in [
        ("scan-ingest", &scan),
        ("trace-query", &trace),
        ("erp-sync", &sync),
        ("database", &database),
        ("redis", &redis),
    ] {
        metrics::gauge!("dependency_up", "dependency" => name).set(if c.is_up() {
            1.0
        } else {
            0.0
        });
    }
    let components = BTreeMap::from([
        ("scan-ingest".to_owned(), scan),
        ("trace-query".to_owned(), trace),
        ("erp-sync".to_owned(), sync),
        ("database".to_owned(), database),
        ("redis".to_owned(), redis),
        ("erp".to_owned(), erp),
        ("ledger".to_owned(), ledger),
        ("disk".to_owned(), disk),
        ("memory".to_owned(), memory),
    ]);
    Json(HealthReport {
        status: status.into(),
        components,
    })
}

/// OpenAPI document
///
/// This document (OpenAPI 3.1), generated from the code.
#[utoipa::path(get, path = "/openapi.json", operation_id = "getOpenApi", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object)))]
pub async fn openapi_json(State(state): State<AppState>) -> Response {
    let mut res = state
        .openapi
        .get()
        .cloned()
        .unwrap_or_default()
        .into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// Prometheus metrics
///
/// Request rate, errors and latency by route and status, gRPC client latency, rate-limit and
/// Redis failure counters, database pool usage.
#[utoipa::path(get, path = "/metrics", operation_id = "getMetrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
#[allow(dead_code)]
pub async fn metrics_doc() {}
