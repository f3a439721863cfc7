//! Tracing set-up: JSON logs with `trace_id`/`span_id`, spans exported over OTLP when an
//! endpoint is configured, and the W3C propagator installed globally (first).

use std::fmt;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, format::Writer};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::ServiceSettings;

/// Installs the W3C trace-context propagator globally.
pub fn set_propagator() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

/// Owns the tracer provider; [`TelemetryGuard::shutdown`] flushes pending spans.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl TelemetryGuard {
    /// Flushes and stops the exporter (blocking work runs off the async threads).
    pub async fn shutdown(self) {
        let provider = self.provider;
        let _ = tokio::task::spawn_blocking(move || {
            let _ = provider.force_flush();
            let _ = provider.shutdown();
        })
        .await;
    }
}

/// Builds the tracer provider; must be called inside a Tokio runtime when exporting.
pub fn tracer_provider(service: &str, otlp_endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if !otlp_endpoint.is_empty() {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(otlp_endpoint)
            .with_timeout(std::time::Duration::from_secs(3))
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// Initialises logging and tracing for `service`. Call once, first thing in `main`.
pub fn init(service: &'static str, settings: &ServiceSettings) -> anyhow::Result<TelemetryGuard> {
    set_propagator();
    let provider = tracer_provider(service, &settings.otlp_endpoint)?;
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer(service);

    let filter = EnvFilter::try_new(&settings.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    // The exporter's own transport must not trace itself into a loop.
    let otel_filter = EnvFilter::new("info,h2=off,hyper=off,tonic=off,tower=off,opentelemetry=off");
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(otel_filter);
    let fmt_layer = if settings.log_format == "pretty" {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .event_format(JsonWithTrace { service })
            .with_writer(std::io::stdout)
            .boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(fmt_layer)
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

/// One JSON object per line: `timestamp`, `level`, `service`, `target`, `message`, the event's
/// fields, the span path, and the OpenTelemetry `trace_id` and `span_id` of the current span.
pub struct JsonWithTrace {
    pub service: &'static str,
}

struct FieldsVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for FieldsVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The full cause chain, for operators.
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        self.0.insert(field.name().to_owned(), Value::from(text));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::from(format!("{value:?}")));
    }
}

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut obj = Map::new();
        obj.insert(
            "timestamp".into(),
            Value::from(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        obj.insert(
            "level".into(),
            Value::from(meta.level().as_str().to_lowercase()),
        );
        obj.insert("service".into(), Value::from(self.service));
        obj.insert("target".into(), Value::from(meta.target()));
        let mut fields = Map::new();
        event.record(&mut FieldsVisitor(&mut fields));
        if let Some(m) = fields.remove("message") {
            obj.insert("message".into(), m);
        }
        if !fields.is_empty() {
            obj.insert("fields".into(), Value::Object(fields));
        }
        if let Some(scope) = ctx.event_scope() {
            let names: Vec<Value> = scope.from_root().map(|s| Value::from(s.name())).collect();
            obj.insert("spans".into(), Value::Array(names));
        }
        // The span's OpenTelemetry context is attached while the span is entered.
        let cx = opentelemetry::Context::current();
        let span = cx.span();
        let sc = span.span_context();
        if sc.is_valid() {
            obj.insert("trace_id".into(), Value::from(sc.trace_id().to_string()));
            obj.insert("span_id".into(), Value::from(sc.span_id().to_string()));
        }
        let mut line = serde_json::to_string(&Value::Object(obj)).map_err(|_| fmt::Error)?;
        line.push('\n');
        writer.write_str(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_log_lines_carry_the_trace_id_of_the_current_span() {
        set_propagator();
        let provider = SdkTracerProvider::builder().build();
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")))
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonWithTrace { service: "test" })
                    .with_writer(move || writer.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request");
            crate::propagation::set_parent(
                &span,
                crate::propagation::context_from_traceparent(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            );
            let _g = span.enter();
            tracing::info!(lot = "STEEL-L1", "scan accepted");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let line: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["span_id"].as_str().unwrap().len(), 16);
        assert_eq!(line["message"], "scan accepted");
        assert_eq!(line["fields"]["lot"], "STEEL-L1");
        assert_eq!(line["level"], "info");
    }
}
