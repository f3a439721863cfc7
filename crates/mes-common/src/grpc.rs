//! gRPC plumbing: the server builder (telemetry layer, health, reflection) and client channels
//! that propagate the trace context and have timeouts.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint, Server};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::identity::{self, CallerKey, NotAdmitted, Refused, ReplayCache, Signature};
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

/// The most a signed request body may be: tonic's default limit of a decoded message (4 MiB)
/// and its 5-byte frame header. Larger ones are refused (RESOURCE_EXHAUSTED) as soon as the
/// limit is passed, as tonic would refuse them after reading them whole. Only bodies of calls
/// whose signature verified are read at all.
pub const MAX_SIGNED_BODY: usize = 4 * 1024 * 1024 + 5;

/// How long a server waits for the whole body of a call whose signature verified (MES calls
/// send one small message at once; a body still arriving after this is refused CANCELLED).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Tower layer for gRPC servers: with an internal key, refuses (UNAUTHENTICATED) every call but
/// health and reflection whose signature is missing, wrong, stale or already used (see
/// [`identity`]); without one, passes everything (demo mode only).
#[derive(Clone)]
pub struct CallerAuthLayer {
    key: Option<CallerKey>,
    seen: Arc<ReplayCache>,
    body_timeout: Duration,
}

impl CallerAuthLayer {
    pub fn new(key: Option<CallerKey>) -> Self {
        Self {
            key,
            seen: Arc::new(ReplayCache::new()),
            body_timeout: BODY_READ_TIMEOUT,
        }
    }

    /// The same layer with another body-read timeout (tests).
    #[cfg(test)]
    fn with_body_timeout(mut self, timeout: Duration) -> Self {
        self.body_timeout = timeout;
        self
    }
}

impl<S> Layer<S> for CallerAuthLayer {
    type Service = CallerAuth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CallerAuth {
            inner,
            key: self.key.clone(),
            seen: self.seen.clone(),
            body_timeout: self.body_timeout,
        }
    }
}

#[derive(Clone)]
pub struct CallerAuth<S> {
    inner: S,
    key: Option<CallerKey>,
    seen: Arc<ReplayCache>,
    body_timeout: Duration,
}

fn refuse(
    refused: Refused,
    method: &str,
    headers: &http::HeaderMap,
) -> http::Response<tonic::body::Body> {
    metrics::counter!("grpc_server_callers_refused_total", "reason" => refused.as_str())
        .increment(1);
    let user = headers
        .get(identity::USER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::warn!(
        method,
        reason = refused.as_str(),
        user,
        "call refused: it is not signed with this deployment's internal key, or it was replayed"
    );
    tonic::Status::unauthenticated(format!(
        "{}: internal calls must be signed with the deployment's internal key (MES_INTERNAL_KEY)",
        refused.as_str()
    ))
    .into_http()
}

impl<S> Service<http::Request<tonic::body::Body>> for CallerAuth<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let exempt = method.starts_with("/grpc.health.") || method.starts_with("/grpc.reflection.");
        let Some(key) = self.key.clone().filter(|_| !exempt) else {
            return Box::pin(self.inner.call(req));
        };
        // Everything that authenticates the caller is in the headers (the signature carries
        // the digest of the body it signed): format, time, HMAC and nonce are checked before a
        // single byte of the body is read, so a caller without the key cannot make the server
        // buffer anything, and only verified nonces enter the replay cache.
        let sig = match Signature::parse(req.headers(), chrono::Utc::now().timestamp())
            .and_then(|sig| key.verify(&sig, &method, req.headers()).map(|()| sig))
        {
            Ok(sig) => sig,
            Err(refused) => {
                let res = refuse(refused, &method, req.headers());
                return Box::pin(std::future::ready(Ok(res)));
            }
        };
        // The nonce is used from here on, whatever the body turns out to be: a signed request
        // was seen, its signature is not accepted again (with this body or another).
        match self.seen.admit(&sig, chrono::Utc::now().timestamp()) {
            Ok(()) => {}
            Err(NotAdmitted::Replayed) => {
                let res = refuse(Refused::Replayed, &method, req.headers());
                return Box::pin(std::future::ready(Ok(res)));
            }
            Err(NotAdmitted::Full) => {
                metrics::counter!("grpc_server_replay_cache_full_total").increment(1);
                tracing::warn!(
                    method,
                    "call refused: the replay cache is full of signatures of the last window"
                );
                let status = tonic::Status::unavailable(
                    "too many signed calls in the replay window; retry shortly",
                );
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        }
        // The inner service was made ready for this call: take it, leave a clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let body_timeout = self.body_timeout;
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            // Unary and server-streaming calls send one message, then end the body: read it
            // whole, within the size limit and the read timeout.
            let read = http_body_util::Limited::new(body, MAX_SIGNED_BODY).collect();
            let body = match tokio::time::timeout(body_timeout, read).await {
                Ok(Ok(b)) => b.to_bytes(),
                Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                    let status = tonic::Status::resource_exhausted(format!(
                        "request body larger than {MAX_SIGNED_BODY} bytes"
                    ));
                    return Ok(status.into_http());
                }
                Ok(Err(e)) => {
                    let status =
                        tonic::Status::cancelled(format!("request body not received: {e}"));
                    return Ok(status.into_http());
                }
                Err(_) => {
                    metrics::counter!("grpc_server_body_read_timeouts_total").increment(1);
                    tracing::warn!(
                        method,
                        timeout_ms = body_timeout.as_millis() as u64,
                        "call refused: its request body did not arrive in time"
                    );
                    let status = tonic::Status::cancelled(format!(
                        "request body not received within {} ms",
                        body_timeout.as_millis()
                    ));
                    return Ok(status.into_http());
                }
            };
            if let Err(refused) = sig.check_body(&body) {
                return Ok(refuse(refused, &method, &parts.headers));
            }
            let body = tonic::body::Body::new(http_body_util::Full::new(body));
            inner.call(http::Request::from_parts(parts, body)).await
        })
    }
}

/// A server builder with the telemetry layer (outermost, so refused calls are logged and
/// counted too), the caller-signature check (with its own replay cache) and HTTP/2
/// keep-alives. Add [`standard_services`] first, then serve it [`incoming`] connections.
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
        .layer(CallerAuthLayer::new(key))
}

/// What every service serves besides its own API: `health`, and reflection over every MES
/// contract in both versions of the protocol (`v1`, and `v1alpha` for grpcurl 1.8 and other
/// older clients). `grpc::server(..).add_routes(grpc::standard_services(health)?)`.
pub fn standard_services(
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> anyhow::Result<tonic::service::Routes> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(mes_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok(tonic::service::Routes::new(health)
        .add_service(builder().build_v1()?)
        .add_service(builder().build_v1alpha()?))
}

/// The reflection service (`v1` only) over every MES contract; servers use
/// [`standard_services`], which also serves `v1alpha`.
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

/// Adds the current span's trace context to every outgoing call. (Signing is done by
/// [`Signed`], which also propagates the trace context.)
#[derive(Clone, Default)]
pub struct TracePropagation;

impl Interceptor for TracePropagation {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        propagation::inject_current(req.metadata_mut());
        Ok(req)
    }
}

/// A client of another service: adds the current span's trace context to every call and, with
/// the deployment's internal key, signs it (method, identity headers, body, time and a nonce;
/// see [`identity`]). Generated clients take it as they take a channel:
/// `ScanIngestClient::new(grpc::signed(channel, key))`. For unary and server-streaming calls
/// (every MES call): the request body is read whole before it is sent.
#[derive(Clone)]
pub struct Signed<S = Channel> {
    inner: S,
    key: Option<CallerKey>,
}

/// `inner` (a [`Channel`]) with trace propagation and, when `key` is set, signed calls.
pub fn signed<S>(inner: S, key: Option<CallerKey>) -> Signed<S> {
    Signed { inner, key }
}

impl<S, RB> Service<http::Request<tonic::body::Body>> for Signed<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<RB>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<RB>;
    type Error = tonic::codegen::StdError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        // In the caller's span (after an await it would no longer be current).
        propagation::inject_http(
            &tracing_opentelemetry::OpenTelemetrySpanExt::context(&tracing::Span::current()),
            req.headers_mut(),
        );
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(key) = self.key.clone() else {
            let fut = inner.call(req);
            return Box::pin(async move { fut.await.map_err(Into::into) });
        };
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let body = body.collect().await?.to_bytes();
            key.sign(parts.uri.path(), &mut parts.headers, &body);
            let body = tonic::body::Body::new(http_body_util::Full::new(body));
            inner
                .call(http::Request::from_parts(parts, body))
                .await
                .map_err(Into::into)
        })
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;
    use mes_proto::v1 as pb;
    use pb::event_feed_client::EventFeedClient;
    use pb::event_feed_server::{EventFeed, EventFeedServer};
    use tonic::codegen::Bytes;
    use tower::ServiceExt;

    use super::*;
    use crate::identity::Caller;

    const KEY: &str = "the internal key of this test deployment, 32+ bytes";

    /// A real EventFeed: answers one event naming the caller and echoing the request.
    struct Echo;

    type Events = tonic::codegen::BoxStream<pb::Event>;

    #[tonic::async_trait]
    impl EventFeed for Echo {
        async fn subscribe(
            &self,
            req: tonic::Request<pb::SubscribeRequest>,
        ) -> Result<tonic::Response<Events>, tonic::Status> {
            let user = Caller::from_metadata(req.metadata())
                .map(|c| c.user)
                .unwrap_or_default();
            let r = req.into_inner();
            let event = pb::Event {
                position: r.after_position,
                kind: format!("{user}:{}", r.consumer),
                ..Default::default()
            };
            Ok(tonic::Response::new(Box::pin(tokio_stream::iter(vec![
                Ok(event),
            ]))))
        }
    }

    /// A server with `key` on a free loopback port; stops when the returned sender drops.
    async fn serve(key: Option<CallerKey>) -> (u16, tokio::sync::oneshot::Sender<()>) {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (_, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            server("test", key)
                .add_routes(standard_services(health).unwrap())
                .add_service(EventFeedServer::new(Echo))
                .serve_with_incoming_shutdown(incoming(listener), async {
                    let _ = stopped.await;
                }),
        );
        (port, stop)
    }

    fn plain(port: u16) -> Channel {
        Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy()
    }

    fn subscribe(after: u64, consumer: &str, user: &str) -> tonic::Request<pb::SubscribeRequest> {
        let mut req = tonic::Request::new(pb::SubscribeRequest {
            after_position: after,
            consumer: consumer.into(),
        });
        Caller::system(user).write_to(req.metadata_mut());
        req
    }

    async fn first_event<T>(
        client: &mut EventFeedClient<T>,
        req: tonic::Request<pb::SubscribeRequest>,
    ) -> Result<pb::Event, tonic::Status>
    where
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::Error: Into<tonic::codegen::StdError>,
        T::ResponseBody: tonic::codegen::Body<Data = Bytes> + Send + 'static,
        <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    {
        let mut stream = client.subscribe(req).await?.into_inner();
        Ok(stream.message().await?.expect("one event"))
    }

    /// What went over the wire: the headers and body bytes of the last request.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Option<(http::HeaderMap, Bytes)>>>);

    /// Passes requests to `port`, recording each one in `captured`.
    fn recording(
        port: u16,
        captured: Captured,
    ) -> impl tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = tonic::codegen::StdError,
        Future = impl Send,
    > + Clone {
        let channel = plain(port);
        tower::service_fn(move |req: http::Request<tonic::body::Body>| {
            let channel = channel.clone();
            let captured = captured.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect().await?.to_bytes();
                *captured.0.lock().unwrap() = Some((parts.headers.clone(), bytes.clone()));
                let req = http::Request::from_parts(
                    parts,
                    tonic::body::Body::new(http_body_util::Full::new(bytes)),
                );
                let res = channel.oneshot(req).await?;
                Ok::<_, tonic::codegen::StdError>(res.map(tonic::body::Body::new))
            }
        })
    }

    /// Sends requests to `port` with the captured headers in place of their own (an attacker
    /// replaying a captured call, with its own body or the captured one).
    fn replaying(
        port: u16,
        captured: Captured,
    ) -> impl tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = tonic::codegen::StdError,
        Future = impl Send,
    > + Clone {
        let channel = plain(port);
        tower::service_fn(move |mut req: http::Request<tonic::body::Body>| {
            let channel = channel.clone();
            let (headers, _) = captured.0.lock().unwrap().clone().expect("a captured call");
            *req.headers_mut() = headers;
            async move {
                let res = channel.oneshot(req).await?;
                Ok::<_, tonic::codegen::StdError>(res.map(tonic::body::Body::new))
            }
        })
    }

    fn assert_refused(r: Result<pb::Event, tonic::Status>, what: &str) {
        let status = r.expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{what}: {status:?}"
        );
    }

    #[tokio::test]
    async fn a_captured_call_replayed_with_another_body_is_refused() {
        let key = CallerKey::from_config(KEY);
        let (port, _stop) = serve(key.clone()).await;
        let captured = Captured::default();
        let mut caller =
            EventFeedClient::new(signed(recording(port, captured.clone()), key.clone()));
        let event = first_event(&mut caller, subscribe(7, "trace-query", "sys"))
            .await
            .expect("a signed call is served");
        assert_eq!(
            (event.position, event.kind.as_str()),
            (7, "sys:trace-query")
        );

        // Same signed headers, another message: refused.
        let mut attacker = EventFeedClient::new(replaying(port, captured.clone()));
        assert_refused(
            first_event(&mut attacker, subscribe(0, "mallory", "sys")).await,
            "replayed with another body",
        );
    }

    #[tokio::test]
    async fn a_captured_call_replayed_verbatim_is_refused() {
        let key = CallerKey::from_config(KEY);
        let (port, _stop) = serve(key.clone()).await;
        let captured = Captured::default();
        let mut caller =
            EventFeedClient::new(signed(recording(port, captured.clone()), key.clone()));
        first_event(&mut caller, subscribe(7, "trace-query", "sys"))
            .await
            .expect("a signed call is served");

        // The same headers and the same message (the same bytes): refused as a replay.
        let mut attacker = EventFeedClient::new(replaying(port, captured.clone()));
        assert_refused(
            first_event(&mut attacker, subscribe(7, "trace-query", "sys")).await,
            "replayed verbatim",
        );
        // Fresh signatures keep working (a retry by the real caller is a new call).
        first_event(&mut caller, subscribe(7, "trace-query", "sys"))
            .await
            .expect("a new signed call is served");
    }

    #[tokio::test]
    async fn a_signed_body_over_the_limit_is_refused_and_the_next_call_served() {
        let key = CallerKey::from_config(KEY);
        let (port, _stop) = serve(key.clone()).await;
        let mut caller = EventFeedClient::new(signed(plain(port), key));
        let huge = "x".repeat(MAX_SIGNED_BODY);
        let status = first_event(&mut caller, subscribe(1, &huge, "sys"))
            .await
            .expect_err("too large");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        first_event(&mut caller, subscribe(1, "small", "sys"))
            .await
            .expect("the next call is served");
    }

    const SUBSCRIBE: &str = "/mes.v1.EventFeed/Subscribe";

    /// The caller-signature layer around a service that records whether a call reached it.
    fn guarded(
        layer: &CallerAuthLayer,
    ) -> (
        impl tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        let served = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reached = served.clone();
        let inner = tower::service_fn(move |_req: http::Request<tonic::body::Body>| {
            reached.store(true, std::sync::atomic::Ordering::SeqCst);
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                tonic::body::Body::empty(),
            )))
        });
        (layer.layer(inner), served)
    }

    /// Identity headers of a system caller, signed with `key` over `body`.
    fn signed_headers(key: &CallerKey, body: &[u8]) -> http::HeaderMap {
        let mut md = tonic::metadata::MetadataMap::new();
        Caller::system("sys").write_to(&mut md);
        let mut headers = md.into_headers();
        key.sign(SUBSCRIBE, &mut headers, body);
        headers
    }

    fn request(
        headers: &http::HeaderMap,
        body: tonic::body::Body,
    ) -> http::Request<tonic::body::Body> {
        let mut req = http::Request::post(SUBSCRIBE).body(body).unwrap();
        *req.headers_mut() = headers.clone();
        req
    }

    /// A request body that never ends (a caller trickling or holding its stream open), and
    /// whether anything polled it.
    fn endless_body() -> (tonic::body::Body, Arc<std::sync::atomic::AtomicBool>) {
        let polled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = polled.clone();
        let frames = futures::stream::poll_fn(move |_| {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            Poll::<Option<Result<hyper::body::Frame<Bytes>, tonic::Status>>>::Pending
        });
        (
            tonic::body::Body::new(http_body_util::StreamBody::new(frames)),
            polled,
        )
    }

    /// Calls `svc` once; the answer must come within 5 s. Returns its gRPC status.
    async fn status_of<S>(svc: &mut S, req: http::Request<tonic::body::Body>) -> tonic::Status
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            >,
    {
        let call = async { svc.ready().await.unwrap().call(req).await.unwrap() };
        let res = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("answered promptly, without waiting for the body");
        tonic::Status::from_header_map(res.headers()).unwrap_or_else(|| tonic::Status::ok(""))
    }

    #[tokio::test]
    async fn a_forged_signature_is_refused_without_reading_the_body() {
        let layer = CallerAuthLayer::new(CallerKey::from_config(KEY));
        let (mut svc, served) = guarded(&layer);
        // Valid format and time (a real signature), but made with a key the server does not have.
        let forger =
            CallerKey::from_config("not the deployment's key, but 32+ bytes long").unwrap();
        let headers = signed_headers(&forger, b"anything");
        let (body, polled) = endless_body();
        let status = status_of(&mut svc, request(&headers, body)).await;
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(
            !polled.load(std::sync::atomic::Ordering::SeqCst),
            "the body of an unauthenticated caller was read"
        );
        assert!(!served.load(std::sync::atomic::Ordering::SeqCst));
        assert!(layer.seen.is_empty(), "a forged nonce was remembered");
    }

    #[tokio::test]
    async fn a_signed_call_with_another_body_than_the_signed_one_is_refused_and_uses_its_nonce() {
        let key = CallerKey::from_config(KEY).unwrap();
        let layer = CallerAuthLayer::new(Some(key.clone()));
        let (mut svc, served) = guarded(&layer);
        let signed_body = Bytes::from_static(b"\0\0\0\0\x05hello");
        let headers = signed_headers(&key, &signed_body);
        let other = tonic::body::Body::new(http_body_util::Full::new(Bytes::from_static(
            b"\0\0\0\0\x05hellO",
        )));
        let status = status_of(&mut svc, request(&headers, other)).await;
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(
            status
                .message()
                .starts_with("caller signature does not match the body"),
            "{status:?}"
        );
        assert!(!served.load(std::sync::atomic::Ordering::SeqCst));
        // The signed request was seen: the same signature with its own body is a replay now.
        let own = tonic::body::Body::new(http_body_util::Full::new(signed_body.clone()));
        let status = status_of(&mut svc, request(&headers, own)).await;
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(
            status
                .message()
                .starts_with("caller signature already used"),
            "{status:?}"
        );
        assert!(!served.load(std::sync::atomic::Ordering::SeqCst));
        // A fresh signature over the same body is served.
        let fresh = signed_headers(&key, &signed_body);
        let own = tonic::body::Body::new(http_body_util::Full::new(signed_body));
        let status = status_of(&mut svc, request(&fresh, own)).await;
        assert_eq!(status.code(), tonic::Code::Ok, "{status:?}");
        assert!(served.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_signed_call_whose_body_never_ends_is_refused_after_the_read_timeout() {
        let key = CallerKey::from_config(KEY).unwrap();
        let layer =
            CallerAuthLayer::new(Some(key.clone())).with_body_timeout(Duration::from_millis(200));
        let (mut svc, served) = guarded(&layer);
        let headers = signed_headers(&key, b"");
        let (body, polled) = endless_body();
        let status = status_of(&mut svc, request(&headers, body)).await;
        assert_eq!(status.code(), tonic::Code::Cancelled, "{status:?}");
        assert!(polled.load(std::sync::atomic::Ordering::SeqCst));
        assert!(!served.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// Settings as an operator writes them, through the real configuration loader.
    #[allow(clippy::result_large_err)]
    fn settings_from_env(vars: &[(&str, &str)]) -> crate::ServiceSettings {
        let mut out = None;
        figment::Jail::expect_with(|jail| {
            for (k, v) in vars {
                jail.set_env(k, v);
            }
            out = Some(
                crate::config::load(
                    "scan-ingest",
                    &crate::ServiceSettings::defaults_for("scan-ingest"),
                )
                .unwrap(),
            );
            Ok(())
        });
        out.unwrap()
    }

    #[tokio::test]
    async fn a_call_signed_with_the_previous_key_is_accepted_only_while_it_is_configured() {
        const NEW: &str = "the new internal key after the rotation, 32+ bytes";
        let rotating = settings_from_env(&[
            ("MES_INTERNAL_KEY", NEW),
            ("MES_INTERNAL_KEY_PREVIOUS", KEY),
        ]);
        let (port, stop) = serve(rotating.caller_key()).await;
        // A caller not yet restarted still signs with the old key; one restarted, with the new.
        let mut old = EventFeedClient::new(signed(plain(port), CallerKey::from_config(KEY)));
        let mut new = EventFeedClient::new(signed(plain(port), CallerKey::from_config(NEW)));
        first_event(&mut old, subscribe(1, "old", "sys"))
            .await
            .expect("the previous key is accepted during the rotation");
        first_event(&mut new, subscribe(1, "new", "sys"))
            .await
            .expect("the current key is accepted");
        drop(stop);

        // Rotation finished: the previous key is removed.
        let rotated = settings_from_env(&[("MES_INTERNAL_KEY", NEW)]);
        let (port, _stop) = serve(rotated.caller_key()).await;
        let mut old = EventFeedClient::new(signed(plain(port), CallerKey::from_config(KEY)));
        let mut new = EventFeedClient::new(signed(plain(port), CallerKey::from_config(NEW)));
        assert_refused(
            first_event(&mut old, subscribe(1, "old", "sys")).await,
            "the previous key after its removal",
        );
        first_event(&mut new, subscribe(1, "new", "sys"))
            .await
            .expect("the current key is accepted");
    }

    #[tokio::test]
    async fn reflection_answers_v1alpha_clients_too() {
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let (port, _stop) = serve(CallerKey::from_config(KEY)).await;
        let mut client = ServerReflectionClient::new(plain(port));
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .expect("v1alpha reflection is served")
            .into_inner();
        let resp = stream.message().await.expect("an answer").expect("one");
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("not a service list: {resp:?}");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.iter().any(|n| n == "mes.v1.EventFeed"), "{names:?}");
    }
}
