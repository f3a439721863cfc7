//! W3C trace context (`traceparent`/`tracestate`) in HTTP headers and gRPC metadata.
//!
//! The global propagator is set by [`crate::telemetry::init`]; these helpers use it.

use opentelemetry::global;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Injects into gRPC metadata.
pub struct MetadataInjector<'a>(pub &'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Extracts from gRPC metadata.
pub struct MetadataExtractor<'a>(pub &'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The OpenTelemetry context carried by HTTP headers (gRPC requests are HTTP/2 requests too).
pub fn extract_http(headers: &http::HeaderMap) -> opentelemetry::Context {
    global::get_text_map_propagator(|p| p.extract(&opentelemetry_http::HeaderExtractor(headers)))
}

/// Writes `cx` into HTTP headers.
pub fn inject_http(cx: &opentelemetry::Context, headers: &mut http::HeaderMap) {
    global::get_text_map_propagator(|p| {
        p.inject_context(cx, &mut opentelemetry_http::HeaderInjector(headers))
    });
}

/// Writes the current span's context into gRPC metadata.
pub fn inject_current(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(metadata)));
}

/// The OpenTelemetry context carried by gRPC metadata.
pub fn extract_metadata(metadata: &tonic::metadata::MetadataMap) -> opentelemetry::Context {
    global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)))
}

/// `traceparent` of a context, empty when it has no valid span.
pub fn traceparent_of(cx: &opentelemetry::Context) -> String {
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return String::new();
    }
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// `traceparent` of the current `tracing` span (empty when there is none).
pub fn current_traceparent() -> String {
    traceparent_of(&tracing::Span::current().context())
}

/// Trace id (32 lowercase hex) of the current `tracing` span, empty when there is none.
pub fn current_trace_id() -> String {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    if sc.is_valid() {
        sc.trace_id().to_string()
    } else {
        String::new()
    }
}

/// The context described by a stored `traceparent` string (e.g. from an event-feed record),
/// so asynchronous work joins the original trace.
pub fn context_from_traceparent(traceparent: &str) -> opentelemetry::Context {
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(traceparent) {
        headers.insert("traceparent", v);
    }
    extract_http(&headers)
}

/// Links `span` to the span a stored `traceparent` names (when it names one): work done for
/// several requests at once (a group commit) belongs to one trace and is linked from the others.
pub fn add_link(span: &tracing::Span, traceparent: &str) {
    let cx = context_from_traceparent(traceparent);
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// Makes `span` a child of the remote context `cx` (when `cx` carries a valid span).
pub fn set_parent(span: &tracing::Span, cx: opentelemetry::Context) {
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Tests of this crate that look at the spans they produce (links, parents).
#[cfg(test)]
pub(crate) mod recorded {
    use std::sync::{Arc, Mutex};

    use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};
    use tracing_subscriber::layer::SubscriberExt;

    /// Keeps the spans that end.
    #[derive(Debug, Default, Clone)]
    struct Ended(Arc<Mutex<Vec<SpanData>>>);

    impl SpanProcessor for Ended {
        fn on_start(&self, _: &mut Span, _: &opentelemetry::Context) {}
        fn on_end(&self, span: SpanData) {
            self.0.lock().unwrap().push(span);
        }
        fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(
            &self,
            _: std::time::Duration,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            Ok(())
        }
    }

    /// The spans that ended while `f` ran, with OpenTelemetry contexts and W3C propagation.
    pub(crate) fn spans(f: impl FnOnce()) -> Vec<SpanData> {
        crate::telemetry::set_propagator();
        let ended = Ended::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_span_processor(ended.clone())
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "test");
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
        tracing::subscriber::with_default(subscriber, f);
        std::mem::take(&mut *ended.0.lock().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn with_otel<R>(f: impl FnOnce() -> R) -> R {
        crate::telemetry::set_propagator();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "test");
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
        tracing::subscriber::with_default(subscriber, f)
    }

    #[test]
    fn http_extract_then_inject_keeps_the_trace_id() {
        let mut incoming = http::HeaderMap::new();
        incoming.insert("traceparent", TP.parse().unwrap());
        let cx = with_otel(|| extract_http(&incoming));
        assert_eq!(traceparent_of(&cx), TP);
        let mut outgoing = http::HeaderMap::new();
        with_otel(|| inject_http(&cx, &mut outgoing));
        assert_eq!(outgoing.get("traceparent").unwrap(), TP);
    }

    #[test]
    fn grpc_metadata_round_trip_continues_the_trace_with_a_new_span() {
        with_otel(|| {
            let mut md = tonic::metadata::MetadataMap::new();
            md.insert("traceparent", TP.parse().unwrap());
            let remote = extract_metadata(&md);
            let span = tracing::info_span!("handler");
            set_parent(&span, remote);
            let _g = span.enter();
            let mut out = tonic::metadata::MetadataMap::new();
            inject_current(&mut out);
            let sent = out.get("traceparent").unwrap().to_str().unwrap().to_owned();
            assert!(
                sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{sent}"
            );
            assert_ne!(
                sent, TP,
                "the child span id must differ from the remote parent's"
            );
            assert_eq!(current_trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        });
    }

    #[test]
    fn a_span_is_linked_to_the_span_a_stored_traceparent_names() {
        let spans = recorded::spans(|| {
            let span = tracing::info_span!("scan.group_commit");
            add_link(&span, TP);
            add_link(&span, "not a traceparent");
            drop(span);
        });
        let commit = spans
            .iter()
            .find(|s| s.name == "scan.group_commit")
            .expect("the span ended");
        let linked: Vec<String> = commit
            .links
            .iter()
            .map(|l| format!("{}-{}", l.span_context.trace_id(), l.span_context.span_id()))
            .collect();
        assert_eq!(
            linked,
            ["4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"]
        );
    }

    #[test]
    fn malformed_traceparent_gives_no_parent() {
        let cx = with_otel(|| context_from_traceparent("00-zz-yy-01"));
        assert_eq!(traceparent_of(&cx), "");
        let cx = with_otel(|| context_from_traceparent(TP));
        assert_eq!(traceparent_of(&cx), TP);
    }
}
