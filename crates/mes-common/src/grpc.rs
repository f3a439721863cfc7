//! gRPC plumbing: the server builder (telemetry layer, health, reflection) and client channels
//! that propagate the trace context and have timeouts.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint, Server};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::identity::{self, CallerKey};
use crate::propagation;

/// Tower layer for gRPC servers: continues the caller's W3C trace in a `grpc.request` span and
/// records `grpc_server_requests_total` and `grpc_server_request_duration_seconds`.
#[derive(Clone, Copy)]
pub struct GrpcTelemetryLayer {
    service: &'static str,
}

impl GrpcTelemetryLayer {
    pub fn new(service: &'static str) -> Self {
        Self { service }
    }
}

impl<S> Layer<S> for GrpcTelemetryLayer {
    type Service = GrpcTelemetry<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcTelemetry {
            inner,
            service: self.service,
        }
    }
}

#[derive(Clone)]
pub struct GrpcTelemetry<S> {
    inner: S,
    service: &'static str,
}

impl<S, B, R> Service<http::Request<B>> for GrpcTelemetry<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let quiet = method.starts_with("/grpc.health.") || method.starts_with("/grpc.reflection.");
        let span = if quiet {
            tracing::debug_span!("grpc.request", otel.name = %method, rpc.system = "grpc", otel.kind = "server")
        } else {
            tracing::info_span!(
                "grpc.request",
                otel.name = %method,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = self.service,
                rpc.method = %method,
                rpc.grpc.status_code = tracing::field::Empty,
            )
        };
        propagation::set_parent(&span, propagation::extract_http(req.headers()));
        let fut = span.in_scope(|| self.inner.call(req));
        let service = self.service;
        Box::pin(
            async move {
                let start = Instant::now();
                let res = fut.await;
                let code = match &res {
                    // Errors come as trailers-only responses: the status is in the headers.
                    Ok(r) => r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .unwrap_or(0),
                    Err(_) => 13,
                };
                let code_name = format!("{:?}", tonic::Code::from_i32(code));
                tracing::Span::current().record("rpc.grpc.status_code", code);
                if !quiet {
                    // The access log: one line per call, carrying its trace id.
                    let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
                    if code == 0 {
                        tracing::info!(code = %code_name, latency_ms, "rpc served");
                    } else {
                        tracing::warn!(code = %code_name, latency_ms, "rpc failed");
                    }
                    metrics::counter!("grpc_server_requests_total", "service" => service, "method" => method.clone(), "code" => code_name)
                        .increment(1);
                    metrics::histogram!("grpc_server_request_duration_seconds", "service" => service, "method" => method)
                        .record(start.elapsed().as_secs_f64());
                }
                res
            }
            .instrument(span),
        )
    }
}

/// Tower layer for gRPC servers: with an internal key, refuses (UNAUTHENTICATED) every call but
/// health and reflection whose caller signature is missing, wrong or stale; without one, passes
/// everything (a single-host or demo installation).
#[derive(Clone)]
pub struct CallerAuthLayer {
    key: Option<CallerKey>,
}

impl<S> Layer<S> for CallerAuthLayer {
    type Service = CallerAuth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CallerAuth {
            inner,
            key: self.key.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CallerAuth<S> {
    inner: S,
    key: Option<CallerKey>,
}

impl<S, B> Service<http::Request<B>> for CallerAuth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path();
        let exempt = method.starts_with("/grpc.health.") || method.starts_with("/grpc.reflection.");
        if let (Some(key), false) = (&self.key, exempt) {
            let headers = req.headers();
            let get = |k: &str| {
                headers
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            if let Err(refused) = key.verify(method, &get, chrono::Utc::now().timestamp()) {
                metrics::counter!("grpc_server_callers_refused_total", "reason" => refused.as_str())
                    .increment(1);
                tracing::warn!(
                    method,
                    reason = refused.as_str(),
                    user = get(identity::USER).unwrap_or_default(),
                    "call refused: its caller identity is not signed with this deployment's internal key"
                );
                let status = tonic::Status::unauthenticated(format!(
                    "{}: internal calls must be signed with the deployment's internal key (MES_INTERNAL_KEY)",
                    refused.as_str()
                ));
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        }
        Box::pin(self.inner.call(req))
    }
}

/// A server builder with the telemetry layer (outermost, so refused calls are logged and
/// counted too), the caller-signature check and HTTP/2 keep-alives. Serve it
/// [`incoming`] connections.
pub fn server(
    service: &'static str,
    key: Option<CallerKey>,
) -> Server<
    tower::layer::util::Stack<
        CallerAuthLayer,
        tower::layer::util::Stack<GrpcTelemetryLayer, tower::layer::util::Identity>,
    >,
> {
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .tcp_nodelay(true)
        .layer(GrpcTelemetryLayer::new(service))
        .layer(CallerAuthLayer { key })
}

/// The reflection service over every MES contract.
pub fn reflection() -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(mes_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?)
}

/// Adds the current span's trace context to every outgoing call and, with the deployment's
/// internal key, signs the caller identity the call carries (see [`identity`]).
#[derive(Clone, Default)]
pub struct TracePropagation {
    key: Option<CallerKey>,
}

impl TracePropagation {
    /// Propagation, and signing when `key` is set.
    pub fn signing(key: Option<CallerKey>) -> Self {
        Self { key }
    }
}

impl Interceptor for TracePropagation {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        propagation::inject_current(req.metadata_mut());
        if let Some(key) = &self.key {
            let method = req
                .extensions()
                .get::<tonic::GrpcMethod<'static>>()
                .map(|m| format!("/{}/{}", m.service(), m.method()))
                .unwrap_or_default();
            key.sign(&method, req.metadata_mut());
        }
        Ok(req)
    }
}

/// A channel to another service: lazy (never blocks start-up), with connect and per-call
/// timeouts. Wrap clients with [`TracePropagation`].
pub fn channel(
    url: &str,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// The accepted connections of a bound listener, with `TCP_NODELAY` (a builder's
/// `tcp_nodelay` only applies to the listeners it binds itself: without it, a response written in
/// two segments waits for the client's delayed ACK, ~40 ms) and TCP keep-alive.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}

/// Binds `addr` (port 0 picks a free port, for tests).
pub async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}
