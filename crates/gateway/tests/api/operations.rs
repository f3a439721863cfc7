//! Operational endpoints, the OpenAPI document, graceful shutdown.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread")]
async fn liveness_readiness_and_metrics() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz", None).await.status(), 200);
    assert_eq!(app.get("/readyz", None).await.status(), 200);
    let _ = app.get("/api/v1/nope", None).await;
    let res = app.get("/metrics", None).await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(text.contains("http_server_requests_total"), "{text}");
    assert!(
        text.contains("http_server_request_duration_seconds"),
        "{text}"
    );
    assert!(text.contains("route=\"/healthz\""), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_is_3_1_and_covers_every_route_and_error() {
    let app = spawn_app().await;
    let res = app.get("/openapi.json", None).await;
    assert_eq!(res.status(), 200);
    let doc: Value = res.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/api/v1/auth/token",
        "/api/v1/auth/logout",
        "/api/v1/scans",
        "/api/v1/scans/{scan_id}",
        "/api/v1/scans/{scan_id}/void",
        "/api/v1/work-orders",
        "/api/v1/work-orders/{number}",
        "/api/v1/work-orders/{number}/summary",
        "/api/v1/lots/{lot}",
        "/api/v1/lots/{lot}/hold",
        "/api/v1/lots/{lot}/release",
        "/api/v1/lots/{lot}/genealogy",
        "/api/v1/lots/{lot}/history",
        "/api/v1/reports/production",
        "/api/v1/erp/status",
        "/api/v1/erp/sync",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/api/v1/health",
    ] {
        assert!(paths.contains_key(p), "{p} missing");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    for schema in [
        "ProblemBody",
        "FieldError",
        "ScanBatch",
        "ScanResults",
        "WorkOrder",
        "Lot",
        "Genealogy",
    ] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
    }
    // Every `$ref` points at something in the document (the scan kinds and inspection results
    // are built from mes-domain's names by hand, not derived).
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x.as_str()) {
                        ("$ref", Some(r)) => out.push(r),
                        _ => refs(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let target = r.strip_prefix('#').and_then(|p| doc.pointer(p));
        assert!(target.is_some_and(Value::is_object), "dangling {r}");
    }
    assert_eq!(
        doc["components"]["schemas"]["ScanKind"]["enum"],
        serde_json::json!([
            "start_operation",
            "consume",
            "produce",
            "complete_operation",
            "scrap",
            "move",
            "inspect"
        ])
    );
    assert_eq!(
        doc["components"]["schemas"]["InspectResult"]["enum"],
        serde_json::json!(["pass", "fail"])
    );
    let mut ids = std::collections::BTreeSet::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().expect("operationId").to_owned();
            assert!(ids.insert(id), "duplicate operationId at {method} {path}");
            let responses = op["responses"].as_object().unwrap();
            assert!(responses.contains_key("500"), "{method} {path}");
            if op["security"].as_array().is_some_and(|s| !s.is_empty()) {
                assert!(
                    responses.contains_key("401") && responses.contains_key("429"),
                    "{method} {path}"
                );
            }
            for (status, r) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert!(
                        r["content"]["application/problem+json"].is_object(),
                        "{method} {path} {status}"
                    );
                }
                assert!(
                    r["headers"]["x-trace-id"].is_object(),
                    "{method} {path} {status}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_turns_false_first_on_shutdown_then_the_server_stops() {
    let mut settings = test_settings();
    // Long enough for the checks below to run before the listener closes on a loaded machine.
    settings.shutdown_readiness_delay_ms = 3_000;
    let mut app = spawn_with(settings).await;
    assert_eq!(app.get("/readyz", None).await.status(), 200);
    app.shutdown.trigger();
    // The server's shutdown task marks it draining: poll for it rather than sleep.
    let deadline = std::time::Instant::now() + Duration::from_millis(2_000);
    let res = loop {
        let res = app.get("/readyz", None).await;
        if res.status() != 200 || std::time::Instant::now() >= deadline {
            break res;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_problem(res, 503, "unavailable").await;
    assert_eq!(app.get("/healthz", None).await.status(), 200);
    app.stop().await;
    let refused = app.client.get(app.url("/healthz")).send().await;
    assert!(refused.is_err(), "the listener is closed after draining");
}
