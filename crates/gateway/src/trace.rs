//! The per-request layer: an `http.request` span continuing the caller's W3C trace, the
//! `traceparent` / `x-trace-id` response headers, request metrics by route and status, the
//! request timeout, and problem+json for every error response (even those axum makes itself).

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;
use tracing::field::Empty;

use mes_common::propagation;

use crate::problem::{self, Problem};

/// The ids of the current request's span.
#[derive(Debug, Clone)]
pub struct TraceIds {
    pub trace_id: String,
    pub traceparent: String,
}

tokio::task_local! {
    static CURRENT: TraceIds;
}

/// Trace id of the request being served (32 lowercase hex), empty outside a request.
pub fn trace_id() -> String {
    CURRENT
        .try_with(|ids| ids.trace_id.clone())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(propagation::current_trace_id)
}

/// The ids of the current span; when no OpenTelemetry layer is installed (a library user's own
/// subscriber), ids are still produced: the incoming trace id is kept, or a new one is drawn.
fn ids_for(parent: &opentelemetry::Context) -> TraceIds {
    let own = propagation::current_traceparent();
    if let Some(trace_id) = trace_id_of(&own) {
        return TraceIds {
            trace_id,
            traceparent: own,
        };
    }
    let incoming = propagation::traceparent_of(parent);
    let (trace_id, flags) = match trace_id_of(&incoming) {
        Some(t) => (t, incoming.rsplit('-').next().unwrap_or("01").to_owned()),
        None => (random_hex(16), "01".to_owned()),
    };
    let traceparent = format!("00-{trace_id}-{}-{flags}", random_hex(8));
    TraceIds {
        trace_id,
        traceparent,
    }
}

/// The trace id of a well-formed `traceparent`.
fn trace_id_of(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.split('-');
    let (_, id) = (parts.next()?, parts.next()?);
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id != "0".repeat(32))
        .then(|| id.to_ascii_lowercase())
}

/// `bytes` (at most 16) random bytes in hex, not all zero.
fn random_hex(bytes: usize) -> String {
    use rand::Rng as _;
    let mut rng = rand::rng();
    let mut buf = [0u8; 16];
    let buf = &mut buf[..bytes.min(16)];
    loop {
        rng.fill(&mut buf[..]);
        if buf.iter().any(|&b| b != 0) {
            return crate::auth::hex(buf);
        }
    }
}

/// Settings of [`layer`].
#[derive(Clone, Copy)]
pub struct HttpLayer {
    pub request_timeout: Duration,
    pub retry_after: u64,
}

/// The outermost middleware of every route.
pub async fn layer(State(cfg): State<HttpLayer>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().clone();
    let parent = propagation::extract_http(req.headers());
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = Empty,
        otel.status_code = Empty,
        user = Empty,
        device = Empty,
    );
    propagation::set_parent(&span, parent.clone());
    let ids = span.in_scope(|| ids_for(&parent));
    let start = Instant::now();

    let timeout = cfg.request_timeout;
    let retry_after = cfg.retry_after;
    let inner = CURRENT.scope(ids.clone(), async move {
        match tokio::time::timeout(timeout, next.run(req)).await {
            Ok(res) => ensure_problem(res),
            Err(_) => {
                tracing::warn!(timeout_ms = timeout.as_millis() as u64, "request timed out");
                Problem::timeout(retry_after).into_response()
            }
        }
    });
    let mut res = inner.instrument(span.clone()).await;

    let status = res.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    {
        let _g = span.enter();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), route = %route, "request failed");
        } else if matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics") {
            tracing::debug!(status = status.as_u16(), route = %route, "request served");
        } else {
            // The access log: one line per request, carrying its trace id.
            let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(status = status.as_u16(), route = %route, method = %method, latency_ms, "request served");
        }
    }
    let headers = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&ids.traceparent) {
        headers.insert("traceparent", v);
    }
    if let Ok(v) = HeaderValue::from_str(&ids.trace_id) {
        headers.insert("x-trace-id", v);
    }
    let status_label = status.as_u16().to_string();
    metrics::counter!("http_server_requests_total",
        "route" => route.clone(), "method" => method.to_string(), "status" => status_label.clone())
    .increment(1);
    metrics::histogram!("http_server_request_duration_seconds",
        "route" => route, "method" => method.to_string(), "status" => status_label)
    .record(start.elapsed().as_secs_f64());
    res
}

/// Every 4xx/5xx is `application/problem+json`: responses made by axum itself (405, unmatched
/// paths) or by layers are rewritten; the status and `Retry-After` are kept.
fn ensure_problem(res: Response) -> Response {
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_problem = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(problem::CONTENT_TYPE));
    if is_problem {
        return res;
    }
    let (code, detail) = match status {
        StatusCode::NOT_FOUND => ("not_found", "no such resource"),
        StatusCode::METHOD_NOT_ALLOWED => {
            ("method_not_allowed", "method not allowed on this resource")
        }
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large"),
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => {
            ("timeout", "the request did not complete in time")
        }
        StatusCode::TOO_MANY_REQUESTS => ("rate_limited", "too many requests, retry later"),
        StatusCode::SERVICE_UNAVAILABLE => ("unavailable", "temporarily unavailable"),
        StatusCode::UNAUTHORIZED => ("unauthenticated", "authentication required"),
        StatusCode::FORBIDDEN => ("forbidden", "not allowed"),
        s if s.is_client_error() => ("validation_failed", "the request is not valid"),
        _ => ("internal", "internal error; quote the trace id to support"),
    };
    let retry_after = res.headers().get(header::RETRY_AFTER).cloned();
    let allow = res.headers().get(header::ALLOW).cloned();
    let mut out = Problem::new(status, code, detail).into_response();
    if let Some(v) = retry_after {
        out.headers_mut().insert(header::RETRY_AFTER, v);
    }
    if let Some(v) = allow {
        out.headers_mut().insert(header::ALLOW, v);
    }
    out
}

/// Fallback of unmatched paths.
pub async fn not_found() -> Problem {
    Problem::not_found("no such resource")
}

/// Response of a panic caught in a handler (the panic is logged, never shown).
pub fn panic_response(_err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    Problem::internal(&"handler panicked").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_of_traceparents() {
        assert_eq!(
            trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id_of(""), None);
        assert_eq!(trace_id_of("00-zz-yy-01"), None);
        assert_eq!(
            trace_id_of("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(random_hex(16).len(), 32);
        assert_eq!(random_hex(8).len(), 16);
        assert!(random_hex(16).bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
