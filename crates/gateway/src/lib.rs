//! The gateway: the only public edge of the MES. REST/JSON for tablets (see `docs/api.md`), JWT
//! bearer auth with roles and device-to-station binding, per-user and per-device rate limits in
//! Redis, token revocation, CORS allow-list, request-size limits and timeouts, problem+json
//! errors carrying the trace id, OpenAPI 3.1 at `/openapi.json`; every call forwarded to
//! scan-ingest, trace-query or erp-sync over gRPC inside the request's trace.
//!
//! - [`config`]: the [`Settings`].
//! - [`routes`]: one module per area (auth, scans, work orders, lots, trace, reports, erp, health).
//! - [`auth`]: passwords, tokens, the [`auth::Principal`] extractor; [`limits`]: Redis limits
//!   and revocation; [`store`]: users and devices; [`clients`]: the services.
//! - [`problem`]: errors; [`trace`]: the per-request span, headers and metrics; [`openapi`].

pub mod auth;
pub mod cli;
pub mod clients;
pub mod config;
pub mod input;
pub mod limits;
pub mod openapi;
pub mod problem;
pub mod routes;
pub mod store;
pub mod trace;

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, header};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use mes_common::Shutdown;
use mes_common::cache::Redis;

pub use config::Settings;

use crate::auth::Tokens;
use crate::clients::Backends;
use crate::limits::Limits;

/// Every password hash or check takes a 19 MiB argon2 work area. glibc raises its mmap threshold
/// after the first such block is freed, so later ones come from the heap arenas and stay there:
/// the gateway idled at ~140 MiB after a burst of logins. A fixed threshold keeps large blocks
/// mmapped, and freeing them returns the memory (~24 MiB idle). Called first thing by `main`.
pub fn return_large_allocations_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning, is thread-safe in glibc (it takes the arena
    // locks), and M_MMAP_THRESHOLD accepts any value up to 32 MiB.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Shared by every request.
pub struct Inner {
    pub settings: Settings,
    pub pool: PgPool,
    pub limits: Limits,
    pub tokens: Tokens,
    pub backends: Backends,
    /// Verified against for unknown users (equal login timing).
    pub dummy_hash: String,
    /// Bounds the password checks running at once.
    pub hashes: auth::HashPool,
    /// True from the shutdown signal on: `/readyz` answers 503.
    pub draining: AtomicBool,
    /// The served OpenAPI document.
    pub openapi: OnceLock<String>,
}

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The router and the OpenAPI document, built from the same list of handlers.
pub fn api() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    use routes::{auth, erp, health, lots, reports, scans, trace, work_orders};
    let (router, mut doc) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::health))
        .routes(routes!(health::openapi_json))
        .routes(routes!(auth::token))
        .routes(routes!(auth::logout))
        .routes(routes!(scans::submit))
        .routes(routes!(scans::get_scan))
        .routes(routes!(scans::void_scan))
        .routes(routes!(work_orders::list))
        .routes(routes!(work_orders::get))
        .routes(routes!(work_orders::summary))
        .routes(routes!(lots::get))
        .routes(routes!(lots::hold))
        .routes(routes!(lots::release))
        .routes(routes!(trace::genealogy))
        .routes(routes!(trace::history))
        .routes(routes!(reports::production))
        .routes(routes!(erp::status))
        .routes(routes!(erp::sync))
        .split_for_parts();
    openapi::complete(&mut doc);
    (router, doc)
}

fn cors(settings: &Settings) -> CorsLayer {
    let origins: Vec<HeaderValue> = settings
        .cors_allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            HeaderName::from_static("traceparent"),
            HeaderName::from_static("tracestate"),
        ])
        .expose_headers([
            HeaderName::from_static("traceparent"),
            HeaderName::from_static("x-trace-id"),
            header::RETRY_AFTER,
        ])
        .max_age(Duration::from_secs(600))
}

pub struct Application {
    listener: TcpListener,
    port: u16,
    router: axum::Router,
    state: AppState,
}

impl Application {
    /// Validates the settings, prepares the database (created if missing, migrated; demo users
    /// seeded in demo mode only), connects Redis in the background, and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        // W3C trace context in and out, even when the caller did not initialise telemetry.
        mes_common::telemetry::set_propagator();
        let secret = if settings.jwt_secret.is_empty() {
            tracing::warn!("demo mode: no jwt_secret set, using a random per-process secret");
            let mut bytes = [0u8; 32];
            rand::Rng::fill(&mut rand::rng(), &mut bytes[..]);
            bytes.to_vec()
        } else {
            settings.jwt_secret.expose().as_bytes().to_vec()
        };
        let metrics = mes_common::metrics::install();
        let pool = store::prepare(&settings.service).await?;
        let seed = async {
            if settings.service.demo {
                store::seed_demo(&pool).await
            } else {
                Ok(())
            }
        };
        let (seeded, dummy_hash) = tokio::join!(seed, auth::dummy_hash());
        seeded?;
        let dummy_hash = dummy_hash?;
        let redis = Redis::connect(
            &settings.service.redis_url,
            &settings.service.redis_prefix,
            Duration::from_secs(1),
        )
        .await?;
        let limits = Limits::new(
            redis,
            settings.rate_limit_per_minute_user,
            settings.rate_limit_per_minute_device,
            settings.retry_after_seconds,
            limits::LoginLimits::new(
                settings.login_attempts_per_user,
                settings.login_attempts_per_ip,
                Duration::from_secs(settings.login_window_seconds),
                Duration::from_millis(settings.login_redis_timeout_ms),
                settings.login_local_keys_max,
            ),
        );
        let hashes = auth::HashPool::new(
            settings.concurrent_hashes(),
            Duration::from_millis(settings.login_hash_wait_ms),
        );
        tracing::info!(
            concurrent = hashes.size(),
            "password checks of logins bounded"
        );
        let previous = settings.jwt_secret_previous.expose().as_bytes();
        let tokens = Tokens::rotating(
            &secret,
            (!previous.is_empty()).then_some(previous),
            &settings.jwt_issuer,
            settings.token_ttl_seconds,
        );
        let backends = Backends::new(&settings)?;
        let listener = mes_common::grpc::bind(&settings.service.listen_addr).await?;
        let port = listener.local_addr()?.port();

        let state = AppState(Arc::new(Inner {
            dummy_hash,
            hashes,
            settings,
            pool,
            limits,
            tokens,
            backends,
            draining: AtomicBool::new(false),
            openapi: OnceLock::new(),
        }));
        let (router, doc) = api();
        let _ = state.openapi.set(doc.to_json()?);
        let http = trace::HttpLayer {
            request_timeout: Duration::from_millis(state.settings.request_timeout_ms),
            retry_after: state.settings.retry_after_seconds,
        };
        let router = router
            .with_state(state.clone())
            .merge(mes_common::metrics::router(metrics))
            .fallback(trace::not_found)
            .layer(CatchPanicLayer::custom(trace::panic_response))
            .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
            .layer(cors(&state.settings))
            .layer(axum::middleware::from_fn_with_state(http, trace::layer));
        tracing::info!(port, "gateway listening");
        Ok(Self {
            listener,
            port,
            router,
            state,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` fires: readiness turns false first, then (after the configured
    /// delay) the listener closes and in-flight requests drain for up to the grace period.
    pub async fn run_until_stopped(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let state = self.state.clone();
        let delay = Duration::from_millis(state.settings.shutdown_readiness_delay_ms);
        let grace = Duration::from_secs(state.settings.service.shutdown_grace_seconds);

        let pool_metrics = {
            let pool = state.pool.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    mes_common::db::record_pool_metrics(&pool);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                        _ = shutdown.wait() => return,
                    }
                }
            })
        };

        let stop = {
            let state = state.clone();
            let shutdown = shutdown.clone();
            async move {
                shutdown.wait().await;
                state.draining.store(true, Ordering::SeqCst);
                tracing::info!("shutting down: not ready any more, draining");
                tokio::time::sleep(delay).await;
            }
        };
        let server = serve(
            self.listener,
            self.router,
            Duration::from_millis(state.settings.header_read_timeout_ms),
            stop,
        );
        let deadline = async {
            shutdown.wait().await;
            tokio::time::sleep(delay + grace).await;
        };
        tokio::select! {
            result = server => result?,
            () = deadline => tracing::warn!("grace period over: closing the remaining connections"),
        }
        pool_metrics.abort();
        state.limits.redis().quit().await;
        state.pool.close().await;
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// Serves `router` on `listener` until `stop` completes, then lets open connections finish
/// their requests. Each connection gets the peer address (the client address of the login
/// limits, see `client_ip_header`), TCP_NODELAY (small JSON responses go at once, no Nagle wait
/// for the client's delayed ACK) and a deadline for a request's header section: a client that
/// trickles its headers (slowloris) is cut off after `header_read_timeout` instead of holding a
/// connection forever (axum::serve sets no timer, so hyper applied none).
async fn serve(
    listener: TcpListener,
    router: axum::Router,
    header_read_timeout: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt as _;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let mut stop = std::pin::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let service = router
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)))
            .map_request(|req: hyper::Request<hyper::body::Incoming>| {
                req.map(axum::body::Body::new)
            });
        let connection = builder
            .serve_connection_with_upgrades(
                TokioIo::new(tcp),
                hyper_util::service::TowerToHyperService::new(service),
            )
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
