//! One trace, shown (issue 12): a scan sent over REST with a known `traceparent` completes an
//! operation, and the OTLP receiver then holds, under that one trace id, every hop from the
//! tablet to the ERP:
//!
//! ```text
//! tablet (traceparent 00-<trace>-<caller>-01)
//! └─ gateway      POST /api/v1/scans                  (http.request, server)
//!    └─ gateway   ScanIngest/SubmitScans              (grpc.client)
//!       └─ scan-ingest  .../SubmitScans              (grpc.request, server)
//!          └─ scan-ingest submit_scans                (the batch)
//!             ├─ scan-ingest scan.validate            (the contract's shape rules)
//!             ├─ scan-ingest scan.group_commit        (the commit; linked from the traces of
//!             │                                        the other requests it committed)
//!             ├─ trace-query feed.apply               (the projection, asynchronous, via the feed)
//!             ├─ erp-sync    feed.apply               (the confirmation queued, via the feed)
//!             └─ erp-sync    erp.post_confirmation    (the post to the ERP, from the outbox)
//! ```
//!
//! The asynchronous hops (the feed and the outbox) carry the `traceparent` stored with each
//! event, and the consumers make it their span's parent (`mes_common::propagation::set_parent`):
//! they join the trace (same trace id, parent = scan-ingest's span), they are not span links.

use std::time::Duration;

use mes_e2e::{ReceivedSpan, System};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::{Value, json};

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

fn scan(kind: &str, extra: Value) -> Value {
    let mut s = json!({
        "scan_id": uuid::Uuid::new_v4().to_string(),
        "kind": kind,
        "work_order": "WO-1000",
        "operation": 10,
        "station": "ST-10",
        "scanned_at": chrono::Utc::now().to_rfc3339(),
    });
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

/// A string attribute of a span (integers rendered in decimal).
fn attr(s: &ReceivedSpan, key: &str) -> Option<String> {
    let a = s.span.attributes.iter().find(|a| a.key == key)?;
    match a.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(v) => Some(v.clone()),
        AnyValue::IntValue(v) => Some(v.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The hops of the trace, each `None` until its span has arrived.
#[derive(Debug, Default)]
struct Hops<'a> {
    gateway_request: Option<&'a ReceivedSpan>,
    ingest_server: Option<&'a ReceivedSpan>,
    ingest_validation: Option<&'a ReceivedSpan>,
    ingest_validate: Option<&'a ReceivedSpan>,
    ingest_commit: Option<&'a ReceivedSpan>,
    projection: Option<&'a ReceivedSpan>,
    erp_queue: Option<&'a ReceivedSpan>,
    erp_post: Option<&'a ReceivedSpan>,
}

impl<'a> Hops<'a> {
    fn of(spans: &'a [ReceivedSpan]) -> Self {
        let named = |service: &str, name: &str| {
            spans
                .iter()
                .find(|s| s.service == service && s.span.name == name)
        };
        Hops {
            gateway_request: spans
                .iter()
                .find(|s| s.service == "gateway" && s.parent_span_id() == CALLER_SPAN),
            ingest_server: spans
                .iter()
                .find(|s| s.service == "scan-ingest" && s.span.name.ends_with("/SubmitScans")),
            ingest_validation: named("scan-ingest", "submit_scans"),
            ingest_validate: named("scan-ingest", "scan.validate"),
            ingest_commit: named("scan-ingest", "scan.group_commit"),
            projection: named("trace-query", "feed.apply"),
            erp_queue: named("erp-sync", "feed.apply"),
            erp_post: spans.iter().find(|s| {
                s.service == "erp-sync"
                    && s.span.name == "erp.post_confirmation"
                    && attr(s, "kind").as_deref() == Some("confirmation")
            }),
        }
    }

    fn complete(&self) -> bool {
        self.gateway_request.is_some()
            && self.ingest_server.is_some()
            && self.ingest_validation.is_some()
            && self.ingest_validate.is_some()
            && self.ingest_commit.is_some()
            && self.projection.is_some()
            && self.erp_queue.is_some()
            && self.erp_post.is_some()
    }
}

/// The whole shape of one scan's trace, tablet to ERP, on the OTLP receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_holds_every_hop_from_the_tablet_to_the_erp() {
    let sys = System::start().await.expect("system");
    let token = sys.token("op1", Some("TAB-10")).await;
    let scans = vec![
        scan("start_operation", json!({})),
        scan("consume", json!({"lot": "STEEL-L1", "quantity": "25"})),
        scan(
            "produce",
            json!({"lot": "FRAME-L1", "quantity": "10", "material": "FRAME-200"}),
        ),
        scan("complete_operation", json!({})),
    ];
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/scans", sys.gateway))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .json(&json!({ "scans": scans }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // What a tablet (or its operator) reads off the answer to find the trace in Jaeger.
    assert_eq!(r.headers()["x-trace-id"], TRACE_ID);
    let body: Value = r.json().await.unwrap();
    for result in body["results"].as_array().unwrap() {
        assert_eq!(result["status"], "accepted", "{body}");
    }

    // The confirmation reaches the ERP (the file adapter's outbox) ...
    let mut confirmed = false;
    for _ in 0..300 {
        let text = std::fs::read_to_string(&sys.outbox).unwrap_or_default();
        confirmed = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|v| v["work_order"] == "WO-1000");
        if confirmed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(confirmed, "no confirmation of WO-1000 in {:?}", sys.outbox);

    // ... and every hop's span arrives under the trace id (spans are exported in batches, each
    // when it ends: wait for all of them, not for the first).
    let mut spans = Vec::new();
    for _ in 0..300 {
        spans = sys.otlp.spans_of_trace(TRACE_ID);
        if Hops::of(&spans).complete() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let names: Vec<String> = spans
        .iter()
        .map(|s| format!("{}: {}", s.service, s.span.name))
        .collect();
    let hops = Hops::of(&spans);
    let require = |span: Option<&ReceivedSpan>, what: &str| -> ReceivedSpan {
        span.unwrap_or_else(|| panic!("no {what} span in trace {TRACE_ID}; it holds {names:#?}"))
            .clone()
    };
    let gateway = require(
        hops.gateway_request,
        "gateway request (child of the caller)",
    );
    let server = require(hops.ingest_server, "scan-ingest SubmitScans server");
    let validation = require(
        hops.ingest_validation,
        "scan-ingest submit_scans (validation)",
    );
    let validate = require(hops.ingest_validate, "scan-ingest scan.validate");
    let commit = require(hops.ingest_commit, "scan-ingest scan.group_commit");
    let projection = require(hops.projection, "trace-query feed.apply (projection)");
    let queue = require(hops.erp_queue, "erp-sync feed.apply (confirmation queued)");
    let post = require(hops.erp_post, "erp-sync erp.post_confirmation");

    let id_of = |s: &ReceivedSpan| s.span_id();
    let parent_of = |s: &ReceivedSpan| s.parent_span_id();
    let service_of = |id: &str| {
        spans
            .iter()
            .find(|s| s.span_id() == id)
            .map(|s| format!("{}: {}", s.service, s.span.name))
            .unwrap_or_else(|| format!("{id} (not in the trace)"))
    };

    // The gateway continues the tablet's span, and it is the route of the request.
    assert_eq!(gateway.span.name, "POST /api/v1/scans");
    // scan-ingest's server span is a child of a gateway span (the gRPC client call).
    let gateway_client = spans
        .iter()
        .find(|s| s.span_id() == parent_of(&server))
        .unwrap_or_else(|| panic!("parent of {server:#?} is not in the trace"));
    assert_eq!(gateway_client.service, "gateway");
    assert_eq!(parent_of(gateway_client), id_of(&gateway));
    // submit_scans runs under the server span; the shape rules (scan.validate) and the commit
    // under it.
    assert_eq!(parent_of(&validation), id_of(&server));
    assert_eq!(parent_of(&validate), id_of(&validation));
    assert_eq!(attr(&validation, "scans").as_deref(), Some("4"));
    assert_eq!(
        parent_of(&commit),
        id_of(&validation),
        "commit's parent is {}",
        service_of(&parent_of(&commit))
    );
    // The feed hops: the events carry the traceparent of submit_scans, and each consumer's
    // span is its child (same trace, not a link).
    for (hop, span) in [
        ("trace-query projection", &projection),
        ("erp-sync queueing", &queue),
        ("erp-sync confirmation post", &post),
    ] {
        assert_eq!(
            parent_of(span),
            id_of(&validation),
            "{hop}'s parent is {}",
            service_of(&parent_of(span))
        );
    }
    // The post is the confirmation of this operation, to the ERP.
    assert_eq!(attr(&post, "work_order").as_deref(), Some("WO-1000"));
    assert!(
        attr(&post, "idempotency_key").is_some_and(|k| !k.is_empty()),
        "{post:#?}"
    );
    // All of them under the one trace id the tablet sent.
    for s in [
        &gateway,
        &server,
        &validation,
        &validate,
        &commit,
        &projection,
        &queue,
        &post,
    ] {
        assert_eq!(s.trace_id(), TRACE_ID);
    }
}
