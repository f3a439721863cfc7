//! Calls to the services: identity and trace context forwarded, answers mapped, outages 503.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fakes::start_scan_ingest;
use crate::helpers::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_service_that_is_down_answers_503_quickly_with_retry_after() {
    let app = spawn_app().await;
    let token = app.demo_token("admin", None).await;
    for path in [
        "/api/v1/work-orders",
        "/api/v1/lots/STEEL-L1/genealogy",
        "/api/v1/erp/status",
    ] {
        let start = Instant::now();
        let res = app.get(path, Some(&token)).await;
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{path} took {:?}",
            start.elapsed()
        );
        assert!(res.headers().contains_key("retry-after"), "{path}");
        let p = assert_problem(res, 503, "unavailable").await;
        assert!(!p["detail"].as_str().unwrap().contains("127.0.0.1"), "{p}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn scans_are_forwarded_with_identity_and_trace_and_results_mapped() {
    let fake = start_scan_ingest().await;
    let mut settings = test_settings();
    settings.scan_ingest_url = fake.url.clone();
    let app = spawn_with(settings).await;
    let token = app.demo_token("op1", Some("TAB-10")).await;
    let mut held = scan("ST-10");
    held["lot"] = json!("HELD-1");
    let first = scan("ST-10");
    let body = json!({"scans": [first, held]});
    let res = app
        .client
        .post(app.url("/api/v1/scans"))
        .bearer_auth(&token)
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["x-trace-id"],
        "0af7651916cd43dd8448eb211c80319c"
    );
    let out: Value = res.json().await.unwrap();
    assert_eq!(
        out,
        json!({"results": [
            {"scan_id": body["scans"][0]["scan_id"], "status": "accepted"},
            {"scan_id": body["scans"][1]["scan_id"], "status": "rejected",
             "error": {"code": "lot_on_hold", "message": "lot HELD-1 is on hold"}}
        ]})
    );
    let calls = fake.fake.calls();
    let call = calls
        .iter()
        .find(|c| c.method == "SubmitScans")
        .expect("call");
    assert_eq!(call.user.as_deref(), Some("op1"));
    assert_eq!(call.roles.as_deref(), Some("operator"));
    assert_eq!(call.station.as_deref(), Some("ST-10"));
    let tp = call.traceparent.clone().expect("traceparent forwarded");
    assert!(
        tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "{tp}"
    );
    assert!(
        !tp.contains("b7ad6b7169203331"),
        "a child span of the gateway's: {tp}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn service_answers_are_mapped_to_json_and_problems() {
    let fake = start_scan_ingest().await;
    let mut settings = test_settings();
    settings.scan_ingest_url = fake.url.clone();
    let app = spawn_with(settings).await;
    let token = app.demo_token("qa1", None).await;

    let res = app.get("/api/v1/work-orders/WO-1000", Some(&token)).await;
    assert_eq!(res.status(), 200);
    let wo: Value = res.json().await.unwrap();
    assert_eq!(
        wo,
        json!({"number": "WO-1000", "material": "FRAME-200", "planned_quantity": "10",
            "status": "released",
            "operations": [{"step": 10, "station": "ST-10", "description": "welding",
                "status": "pending", "good_quantity": "0", "scrap_quantity": "0"}],
            "components": [{"material": "STEEL-500", "quantity_per_unit": "2.5"}],
            "produced_quantity": "0", "scrap_quantity": "0"})
    );
    let res = app.get("/api/v1/work-orders/WO-9999", Some(&token)).await;
    let p = assert_problem(res, 404, "not_found").await;
    assert_eq!(p["detail"], "work order WO-9999 not found");

    let res = app
        .get("/api/v1/work-orders?status=released", Some(&token))
        .await;
    assert_eq!(res.status(), 200);
    let page: Value = res.json().await.unwrap();
    assert_eq!(page, json!({"items": [], "next_cursor": null}));

    // INVALID_ARGUMENT with field violations.
    let res = app
        .get("/api/v1/work-orders?cursor=bad", Some(&token))
        .await;
    let p = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(error_fields(&p), vec!["cursor"]);

    // INTERNAL: the text stays in the log.
    let res = app
        .get("/api/v1/work-orders?cursor=boom", Some(&token))
        .await;
    let p = assert_problem(res, 500, "internal").await;
    assert!(!p["detail"].as_str().unwrap().contains("relation"), "{p}");

    // UNIMPLEMENTED (the fake has no GetLot) → 501.
    let res = app.get("/api/v1/lots/STEEL-L1", Some(&token)).await;
    assert_problem(res, 501, "not_implemented").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_shows_each_service() {
    let app = spawn_app().await;
    let started = Instant::now();
    let health: Value = app.get("/api/v1/health", None).await.json().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(health["status"], "down", "{health}");
    for c in ["scan-ingest", "trace-query", "erp-sync"] {
        assert_eq!(health["components"][c]["status"], "down", "{c}: {health}");
    }
    assert_eq!(health["components"]["erp"]["status"], "unknown");
    assert_eq!(health["components"]["database"]["status"], "up");
    assert!(health["components"]["database"]["latency_ms"].is_number());
    assert_eq!(health["components"]["redis"]["status"], "up");
    assert!(
        health["components"]["disk"]["free_bytes"].is_u64(),
        "{health}"
    );
    assert!(
        health["components"]["memory"]["total_bytes"].is_u64(),
        "{health}"
    );

    let fake = start_scan_ingest().await;
    let mut settings = test_settings();
    settings.scan_ingest_url = fake.url.clone();
    let app = spawn_with(settings).await;
    let health: Value = app.get("/api/v1/health", None).await.json().await.unwrap();
    assert_eq!(
        health["components"]["scan-ingest"]["status"], "up",
        "{health}"
    );
    assert!(health["components"]["scan-ingest"]["latency_ms"].is_number());
    assert_eq!(health["status"], "degraded", "{health}");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_services_and_slow_requests_time_out_with_504() {
    let fake = start_scan_ingest().await;
    let mut settings = test_settings();
    settings.scan_ingest_url = fake.url.clone();
    settings.grpc_request_timeout_ms = 300;
    let app = spawn_with(settings).await;
    let token = app.demo_token("qa1", None).await;
    let start = Instant::now();
    let res = app
        .get("/api/v1/work-orders?cursor=slow", Some(&token))
        .await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(res.headers().contains_key("retry-after"));
    assert_problem(res, 504, "timeout").await;

    let mut settings = test_settings();
    settings.scan_ingest_url = fake.url.clone();
    settings.request_timeout_ms = 300;
    let app = spawn_with(settings).await;
    let token = app.demo_token("qa1", None).await;
    let start = Instant::now();
    let res = app
        .get("/api/v1/work-orders?cursor=slow", Some(&token))
        .await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_problem(res, 504, "timeout").await;
}
