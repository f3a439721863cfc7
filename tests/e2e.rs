//! End-to-end: the four binaries, PostgreSQL, Redis and an OTLP receiver.

use std::time::Duration;

use mes_e2e::System;
use serde_json::{Value, json};

fn scan(kind: &str, wo: &str, op: u32, station: &str) -> Value {
    json!({
        "scan_id": uuid::Uuid::new_v4().to_string(),
        "kind": kind,
        "work_order": wo,
        "operation": op,
        "station": station,
        "scanned_at": chrono::Utc::now().to_rfc3339(),
    })
}

fn with(mut s: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

async fn post_scans(sys: &System, token: &str, scans: Vec<Value>) -> Value {
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/scans", sys.gateway))
        .bearer_auth(token)
        .json(&json!({ "scans": scans }))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

fn all_accepted(body: &Value) {
    for r in body["results"].as_array().unwrap() {
        assert_eq!(r["status"], "accepted", "{body}");
    }
}

async fn get(sys: &System, token: &str, path: &str) -> Value {
    let r = reqwest::Client::new()
        .get(format!("{}{path}", sys.gateway))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.unwrap()
}

/// Whether `spans` hold every span the trace test checks: a gateway span continuing the
/// caller's, and scan-ingest's SubmitScans server span under a gateway span, with a child.
fn trace_complete(spans: &[mes_e2e::ReceivedSpan], caller_span: &str) -> bool {
    let gateway: Vec<_> = spans.iter().filter(|s| s.service == "gateway").collect();
    let ingest: Vec<_> = spans
        .iter()
        .filter(|s| s.service == "scan-ingest")
        .collect();
    let gateway_ids: Vec<String> = gateway.iter().map(|s| s.span_id()).collect();
    let Some(server) = ingest.iter().find(|s| s.span.name.contains("SubmitScans")) else {
        return false;
    };
    gateway.iter().any(|s| s.parent_span_id() == caller_span)
        && gateway_ids.contains(&server.parent_span_id())
        && ingest
            .iter()
            .any(|s| s.parent_span_id() == server.span_id())
}

/// A REST scan sent with a `traceparent` yields spans from the gateway and scan-ingest under that
/// trace id, with scan-ingest's server span a child of a gateway span, and log lines carrying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_scan_from_the_tablet_into_scan_ingest() {
    let sys = System::start().await.expect("system");
    let token = sys.token("op1", Some("TAB-10")).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/scans", sys.gateway))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&json!({ "scans": [scan("start_operation", "WO-1000", 10, "ST-10")] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-trace-id"], trace_id);
    assert!(
        r.headers()["traceparent"]
            .to_str()
            .unwrap()
            .starts_with(&format!("00-{trace_id}-"))
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["results"][0]["status"], "accepted", "{body}");

    // Spans arrive in batches, and the spans of one request can be split over several (a span
    // is exported when it ends, parents after their children): wait for every span checked
    // below, not just for a first span of each service.
    let mut spans = Vec::new();
    for _ in 0..200 {
        spans = sys.otlp.spans_of_trace(trace_id);
        if trace_complete(&spans, caller_span) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gateway: Vec<_> = spans.iter().filter(|s| s.service == "gateway").collect();
    let ingest: Vec<_> = spans
        .iter()
        .filter(|s| s.service == "scan-ingest")
        .collect();
    assert!(
        !gateway.is_empty(),
        "no gateway span in trace {trace_id}: {spans:#?}"
    );
    assert!(
        !ingest.is_empty(),
        "no scan-ingest span in trace {trace_id}: {spans:#?}"
    );
    // The gateway's request span continues the caller's span.
    assert!(
        gateway.iter().any(|s| s.parent_span_id() == caller_span),
        "gateway root is not a child of the caller: {gateway:#?}"
    );
    // scan-ingest's server span is a child of a gateway span.
    let server = ingest
        .iter()
        .find(|s| s.span.name.contains("SubmitScans"))
        .expect("scan-ingest SubmitScans span");
    let gateway_ids: Vec<String> = gateway.iter().map(|s| s.span_id()).collect();
    assert!(
        gateway_ids.contains(&server.parent_span_id()),
        "scan-ingest span's parent {} is not a gateway span {gateway_ids:?}",
        server.parent_span_id()
    );
    // Spans below the server span (e.g. the handler) stay in the trace.
    assert!(
        ingest
            .iter()
            .any(|s| s.parent_span_id() == server.span_id()),
        "no child span under the server span: {ingest:#?}"
    );

    // Log lines carry the trace id.
    for service in ["gateway", "scan-ingest"] {
        let log = sys.log(service);
        let carrying = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["trace_id"] == trace_id)
            .count();
        assert!(
            carrying > 0,
            "{service} logged no line with trace_id {trace_id}:\n{log}"
        );
    }
}

/// The typical run of docs/demo-plant.md through the REST API, then what each step left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_typical_run_works_end_to_end_over_rest() {
    let sys = System::start().await.expect("system");
    let t10 = sys.token("op1", Some("TAB-10")).await;
    let step1 = vec![
        scan("start_operation", "WO-1000", 10, "ST-10"),
        with(
            scan("consume", "WO-1000", 10, "ST-10"),
            json!({"lot": "STEEL-L1", "quantity": "25"}),
        ),
        with(
            scan("produce", "WO-1000", 10, "ST-10"),
            json!({"lot": "FRAME-L1", "quantity": "10", "material": "FRAME-200"}),
        ),
        scan("complete_operation", "WO-1000", 10, "ST-10"),
    ];
    let first_id = step1[1]["scan_id"].as_str().unwrap().to_owned();
    all_accepted(&post_scans(&sys, &t10, step1.clone()).await);
    // A retry of the whole batch is a duplicate, never a second effect.
    let again = post_scans(&sys, &t10, step1).await;
    for r in again["results"].as_array().unwrap() {
        assert_eq!(r["status"], "duplicate");
    }

    let t20 = sys.token("op1", Some("TAB-20")).await;
    let into = |lot: &str, q: &str| {
        with(
            scan("consume", "WO-1001", 10, "ST-20"),
            json!({"lot": lot, "quantity": q, "into_lot": "BIKE-S0001"}),
        )
    };
    all_accepted(
        &post_scans(
            &sys,
            &t20,
            vec![
                scan("start_operation", "WO-1001", 10, "ST-20"),
                into("FRAME-L1", "1"),
                into("WHEEL-L1", "2"),
                into("BOLT-L1", "8"),
                with(
                    scan("produce", "WO-1001", 10, "ST-20"),
                    json!({"lot": "BIKE-S0001", "quantity": "1"}),
                ),
                scan("complete_operation", "WO-1001", 10, "ST-20"),
            ],
        )
        .await,
    );
    let t30 = sys.token("op1", Some("TAB-30")).await;
    all_accepted(
        &post_scans(
            &sys,
            &t30,
            vec![
                scan("start_operation", "WO-1001", 20, "ST-30"),
                with(
                    scan("inspect", "WO-1001", 20, "ST-30"),
                    json!({"lot": "BIKE-S0001", "result": "pass"}),
                ),
                scan("complete_operation", "WO-1001", 20, "ST-30"),
            ],
        )
        .await,
    );

    let wo = get(&sys, &t10, "/api/v1/work-orders/WO-1000").await;
    assert_eq!(wo["status"], "completed", "{wo}");
    assert_eq!(wo["produced_quantity"], "10");
    assert_eq!(wo["operations"][0]["good_quantity"], "10");
    assert_eq!(
        get(&sys, &t10, "/api/v1/work-orders/WO-1001").await["status"],
        "completed"
    );
    let stored = get(&sys, &t10, &format!("/api/v1/scans/{first_id}")).await;
    assert_eq!(stored["status"], "active", "{stored}");
    assert_eq!(stored["quantity"], "25", "{stored}");

    // Step 3: qa1 traces the bike backward to the steel's supplier lot, and the steel forward.
    let qa = sys.token("qa1", None).await;
    let mut backward = Value::Null;
    for _ in 0..100 {
        // The read model is eventually consistent: until the projection applied step 2 the bike
        // may still be unknown there (404).
        let r = reqwest::Client::new()
            .get(format!(
                "{}/api/v1/lots/BIKE-S0001/genealogy?direction=backward",
                sys.gateway
            ))
            .bearer_auth(&qa)
            .send()
            .await
            .unwrap();
        if r.status() == 404 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(r.status(), 200);
        backward = r.json().await.unwrap();
        let reached = backward["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["lot"] == "STEEL-L1"));
        if reached {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nodes = backward["nodes"].as_array().expect("nodes");
    let node = |lot: &str| {
        nodes
            .iter()
            .find(|n| n["lot"] == lot)
            .unwrap_or_else(|| panic!("{lot} missing: {backward}"))
    };
    assert_eq!(node("STEEL-L1")["depth"], 2, "{backward}");
    assert_eq!(node("STEEL-L1")["supplier_lot"], "AS-7781");
    for lot in ["FRAME-L1", "WHEEL-L1", "BOLT-L1"] {
        assert_eq!(node(lot)["depth"], 1, "{backward}");
    }
    let forward = get(
        &sys,
        &qa,
        "/api/v1/lots/STEEL-L1/genealogy?direction=forward",
    )
    .await;
    let lots: Vec<&str> = forward["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["lot"].as_str())
        .collect();
    assert!(
        lots.contains(&"FRAME-L1") && lots.contains(&"BIKE-S0001"),
        "{forward}"
    );

    // Step 4: the confirmation of WO-1000 reaches the file adapter's outbound file, once.
    let mut confirmations = Vec::new();
    for _ in 0..100 {
        let text = std::fs::read_to_string(&sys.outbox).unwrap_or_default();
        confirmations = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["work_order"] == "WO-1000")
            .collect();
        if !confirmations.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        confirmations.len(),
        1,
        "WO-1000 confirmations: {confirmations:?}"
    );
    assert_eq!(
        confirmations[0]["good_quantity"], "10",
        "{}",
        confirmations[0]
    );

    // The projection's lag is the distance to the feed's head: 0 once it applied everything
    // scan-ingest sequenced.
    let mut caught_up = None;
    for _ in 0..100 {
        let head = sys.metric("scan-ingest", "feed_head_position").await;
        let applied = sys
            .metric(
                "trace-query",
                "event_feed_position{consumer=\"trace-query\"}",
            )
            .await;
        let lag = sys
            .metric(
                "trace-query",
                "event_feed_lag_events{consumer=\"trace-query\"}",
            )
            .await;
        if head.is_some() && head == applied && lag == Some(0.0) {
            caught_up = head;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        caught_up.is_some_and(|h| h > 0.0),
        "trace-query reports no lag once at the head"
    );

    // A cancelled order rejects scans; a station-bound token cannot scan elsewhere.
    let closed = post_scans(
        &sys,
        &t10,
        vec![scan("start_operation", "WO-1002", 10, "ST-10")],
    )
    .await;
    assert_eq!(closed["results"][0]["status"], "rejected");
    assert_eq!(closed["results"][0]["error"]["code"], "work_order_closed");
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/scans", sys.gateway))
        .bearer_auth(&t10)
        .json(&json!({ "scans": [scan("start_operation", "WO-1001", 10, "ST-20")] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

/// Every gRPC service answers grpc.health.v1 and server reflection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_answers_health_and_reflection() {
    let sys = System::start().await.expect("system");
    for (service, name) in [
        ("scan-ingest", "mes.v1.ScanIngest"),
        ("trace-query", "mes.v1.TraceQuery"),
        ("erp-sync", "mes.v1.ErpSync"),
    ] {
        let channel = sys.channel(service).await;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let mut serving = false;
        for _ in 0..50 {
            if let Ok(r) = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                && r.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                serving = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(serving, "{service} is not SERVING");
        // Both versions of the reflection protocol (grpcurl 1.8 and older clients: v1alpha).
        for v1alpha in [false, true] {
            let services = mes_common::testing::reflection_services(channel.clone(), v1alpha)
                .await
                .unwrap_or_else(|e| panic!("{service} reflection (v1alpha: {v1alpha}): {e:?}"));
            assert!(
                services.iter().any(|s| s == name),
                "{service} reflection lists {services:?}"
            );
            assert!(
                services.iter().any(|s| s == "grpc.health.v1.Health"),
                "{service}: {services:?}"
            );
        }
    }
    let health = reqwest::get(format!("{}/api/v1/health", sys.gateway))
        .await
        .unwrap();
    let body: Value = health.json().await.unwrap();
    for c in [
        "scan-ingest",
        "trace-query",
        "erp-sync",
        "database",
        "redis",
    ] {
        assert_eq!(body["components"][c]["status"], "up", "{c}: {body}");
    }
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["components"]["ledger"]["status"], "up", "{body}");
}

/// The services check the caller identity again for sensitive operations; that check means
/// something only if the identity cannot be forged. With the internal key set (as in every
/// System run), the gateway, erp-sync and trace-query sign their calls and the servers refuse
/// anything unsigned, signed with another key, or tampered with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_internal_calls_are_refused_and_signed_ones_pass() {
    use mes_common::grpc;
    use mes_common::identity::{Caller, CallerKey};
    use mes_proto::v1 as pb;
    use pb::scan_ingest_client::ScanIngestClient;

    // Everything below went through signed internal calls: erp-sync loaded the plant into
    // scan-ingest and the gateway reads it back.
    let sys = System::start().await.expect("system");
    let channel = sys.channel("scan-ingest").await;
    let supervisor = Caller {
        user: "mallory".into(),
        roles: vec!["supervisor".into()],
        device: None,
        station: None,
    };
    let hold = |c: &Caller| {
        let mut r = tonic::Request::new(pb::LotStatusRequest {
            lot: "STEEL-L1".into(),
            reason: "forged hold".into(),
        });
        c.write_to(r.metadata_mut());
        r
    };
    let refused = |r: Result<tonic::Response<pb::Lot>, tonic::Status>, what: &str| {
        let status = r.expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{what}: {status:?}"
        );
    };

    // Unsigned: refused.
    let mut plain = ScanIngestClient::new(channel.clone());
    refused(plain.hold_lot(hold(&supervisor)).await, "unsigned");
    // Signed with another key: refused.
    let other = CallerKey::from_config("not the key of this deployment, at all");
    let mut wrong = ScanIngestClient::new(grpc::signed(channel.clone(), other));
    refused(wrong.hold_lot(hold(&supervisor)).await, "wrong key");
    // Signed as an operator, then the role changed on the way: refused.
    let key = CallerKey::from_config(&sys.internal_key).expect("key");
    let tamper = tower::service_fn(move |mut req: http::Request<tonic::body::Body>| {
        req.headers_mut()
            .insert("x-mes-roles", http::HeaderValue::from_static("supervisor"));
        let mut ch = channel.clone();
        async move {
            use tower::{Service, ServiceExt};
            ch.ready().await?.call(req).await
        }
    });
    let operator = Caller {
        roles: vec!["operator".into()],
        ..supervisor.clone()
    };
    let mut tampered = ScanIngestClient::new(grpc::signed(tamper, Some(key.clone())));
    refused(tampered.hold_lot(hold(&operator)).await, "tampered role");
    // None of it changed the lot.
    let log = sys.log("scan-ingest");
    assert!(
        log.contains("call refused") && log.contains("caller signature does not match"),
        "the refusals are logged with their reason"
    );

    // Signed with the deployment's key: the service's own role check applies as usual.
    let channel = sys.channel("scan-ingest").await;
    let mut signed = ScanIngestClient::new(grpc::signed(channel, Some(key)));
    let denied = signed
        .hold_lot(hold(&operator))
        .await
        .expect_err("operator");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let mut get = tonic::Request::new(pb::GetLotRequest {
        lot: "STEEL-L1".into(),
    });
    operator.write_to(get.metadata_mut());
    let lot = signed.get_lot(get).await.expect("signed read").into_inner();
    assert_eq!(lot.status, "active", "the forged holds changed nothing");
    let held = signed
        .hold_lot(hold(&supervisor))
        .await
        .expect("a signed supervisor may hold")
        .into_inner();
    assert_eq!(held.status, "on_hold");
}

/// Schema-driven fuzzing (schemathesis) of every route of the served OpenAPI document, as an
/// admin: no input a client can send produces a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_survives_schema_driven_fuzzing() {
    let bin = mes_e2e::python_tool("schemathesis", &["schemathesis==4.32.5"])
        .expect("install schemathesis");
    let sys = System::start_with(&[
        ("MES_GATEWAY_RATE_LIMIT_PER_MINUTE_USER", "1000000"),
        ("MES_GATEWAY_RATE_LIMIT_PER_MINUTE_DEVICE", "1000000"),
    ])
    .await
    .expect("system");
    let token = sys.token("admin", None).await;
    let gateway = sys.gateway.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin.join("st"))
            .args(["run", &format!("{gateway}/openapi.json")])
            .args(["--checks", "not_a_server_error"])
            .args(["--header", &format!("Authorization: Bearer {token}")])
            // Logging out would revoke the token the rest of the run uses.
            .args(["--exclude-path", "/api/v1/auth/logout"])
            .args([
                "--phases",
                "examples,coverage,fuzzing",
                // ~5,000 generated requests on two cores.
                "--max-time",
                "100",
                "--workers",
                "2",
            ])
            .args(["--seed", "20261125"])
            .env("SCHEMATHESIS_TELEMETRY", "false")
            .output()
            .expect("run schemathesis")
    })
    .await
    .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // schemathesis's own summary (test cases generated, passed, failures) for the report.
    let summary: Vec<&str> = report
        .lines()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("test cases") || l.contains("passed") || l.contains("failed")
        })
        .take(20)
        .collect();
    mes_e2e::reliability_record(
        "REST fuzzing (schemathesis)",
        &json!({
            "scenario": "REST fuzzing (schemathesis)",
            "checks": "not_a_server_error",
            "summary": summary,
            "passed": out.status.success(),
        }),
    );
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}"
    );
    assert!(report.contains("passed"), "{report}");
}

/// With trace-query stopped, trace routes answer 503 quickly (with Retry-After) and health
/// shows it down while the rest keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_routes_answer_503_quickly_when_trace_query_is_down() {
    let mut sys = System::start().await.expect("system");
    let token = sys.token("qa1", None).await;
    assert!(sys.stop_service("trace-query").is_some());
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    let r = http
        .get(format!(
            "{}/api/v1/lots/STEEL-L1/genealogy?direction=forward",
            sys.gateway
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["code"], "unavailable");
    assert_eq!(problem["trace_id"].as_str().map(str::len), Some(32));
    let health: Value = http
        .get(format!("{}/api/v1/health", sys.gateway))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        health["components"]["trace-query"]["status"], "down",
        "{health}"
    );
    assert_ne!(health["status"], "ok", "{health}");
    // The write path does not depend on it.
    assert_eq!(
        get(&sys, &token, "/api/v1/lots/STEEL-L1").await["quantity_on_hand"],
        "100"
    );
}

/// scan-ingest's rules, voids and holds through the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_rules_voids_and_holds_work_over_rest() {
    let sys = System::start().await.expect("system");
    let http = reqwest::Client::new();
    let sup = sys.token("sup1", None).await;
    let qa = sys.token("qa1", None).await;
    let hold = http
        .post(format!("{}/api/v1/lots/STEEL-L2/hold", sys.gateway))
        .bearer_auth(&qa)
        .json(&json!({"reason": "supplier complaint"}))
        .send()
        .await
        .unwrap();
    assert_eq!(hold.status(), 200);
    let cases = vec![
        (
            scan("start_operation", "WO-9999", 10, "ST-10"),
            "unknown_work_order",
        ),
        (
            scan("start_operation", "WO-1002", 10, "ST-10"),
            "work_order_closed",
        ),
        (
            with(
                scan("consume", "WO-1000", 10, "ST-10"),
                json!({"lot": "NOPE", "quantity": "1"}),
            ),
            "unknown_lot",
        ),
        (
            with(
                scan("consume", "WO-1000", 10, "ST-10"),
                json!({"lot": "STEEL-L1", "quantity": "101"}),
            ),
            "insufficient_quantity",
        ),
        (
            with(
                scan("consume", "WO-1000", 10, "ST-10"),
                json!({"lot": "WHEEL-L1", "quantity": "1"}),
            ),
            "not_in_bom",
        ),
        (
            scan("start_operation", "WO-1000", 99, "ST-10"),
            "invalid_operation",
        ),
        (
            with(
                scan("consume", "WO-1000", 10, "ST-10"),
                json!({"lot": "STEEL-L2", "quantity": "1"}),
            ),
            "lot_on_hold",
        ),
    ];
    let consume = with(
        scan("consume", "WO-1000", 10, "ST-10"),
        json!({"lot": "STEEL-L1", "quantity": "4"}),
    );
    let mut batch: Vec<Value> = cases.iter().map(|(s, _)| s.clone()).collect();
    batch.push(consume.clone());
    let body = post_scans(&sys, &sup, batch).await;
    let results = body["results"].as_array().unwrap();
    for (r, (_, code)) in results.iter().zip(&cases) {
        assert_eq!(r["status"], "rejected", "{r}");
        assert_eq!(r["error"]["code"], *code, "{r}");
    }
    assert_eq!(results.last().unwrap()["status"], "accepted");
    assert_eq!(
        get(&sys, &sup, "/api/v1/lots/STEEL-L1").await["quantity_on_hand"],
        "96"
    );

    // Void: preview changes nothing, confirm reverses, operators may not.
    let id = consume["scan_id"].as_str().unwrap();
    let void = |token: &str, confirm: bool| {
        http.post(format!("{}/api/v1/scans/{id}/void", sys.gateway))
            .bearer_auth(token)
            .json(&json!({"reason": "wrong lot", "confirm": confirm}))
            .send()
    };
    let op = sys.token("op1", Some("TAB-10")).await;
    assert_eq!(void(&op, false).await.unwrap().status(), 403);
    let preview: Value = void(&sup, false).await.unwrap().json().await.unwrap();
    assert_eq!(preview["allowed"], true, "{preview}");
    assert_eq!(
        get(&sys, &sup, "/api/v1/lots/STEEL-L1").await["quantity_on_hand"],
        "96"
    );
    let done = void(&sup, true).await.unwrap();
    assert_eq!(done.status(), 200);
    let done: Value = done.json().await.unwrap();
    assert!(done["void_scan_id"].is_string(), "{done}");
    assert_eq!(
        get(&sys, &sup, "/api/v1/lots/STEEL-L1").await["quantity_on_hand"],
        "100"
    );
    let stored = get(&sys, &sup, &format!("/api/v1/scans/{id}")).await;
    assert_eq!(stored["status"], "voided", "{stored}");
    assert_eq!(stored["voided_by"], done["void_scan_id"], "{stored}");
    let again = void(&sup, true).await.unwrap();
    assert_eq!(again.status(), 409);
    let problem: Value = again.json().await.unwrap();
    assert_eq!(problem["code"], "conflict");
}
