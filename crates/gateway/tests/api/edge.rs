//! CORS and trace headers.

use serde_json::Value;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread")]
async fn cors_preflight_from_an_allowed_origin_is_answered() {
    let app = spawn_app().await;
    let res = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/api/v1/scans"))
        .header("origin", ALLOWED_ORIGIN)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, traceparent",
        )
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], ALLOWED_ORIGIN);
    let methods = h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(methods.contains("post"), "{methods}");
    let headers = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        headers.contains("authorization") && headers.contains("traceparent"),
        "{headers}"
    );
    assert!(h.contains_key("x-trace-id") && h.contains_key("traceparent"));
    // Simple requests from the allowed origin see the trace id.
    let res = app
        .client
        .get(app.url("/healthz"))
        .header("origin", ALLOWED_ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], ALLOWED_ORIGIN);
    let exposed = res.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(exposed.contains("x-trace-id"), "{exposed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn other_origins_get_no_allow_header() {
    let app = spawn_app().await;
    let res = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/api/v1/scans"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    let res = app
        .client
        .get(app.url("/healthz"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(!res.headers().contains_key("access-control-allow-origin"));
}

fn trace_headers(res: &reqwest::Response) -> (String, String) {
    let tid = res.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let tp = res.headers()["traceparent"].to_str().unwrap().to_owned();
    (tid, tp)
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_response_carries_trace_headers() {
    let app = spawn_app().await;
    let token = app.demo_token("qa1", None).await;
    let responses = vec![
        app.get("/healthz", None).await,
        app.get("/readyz", None).await,
        app.get("/metrics", None).await,
        app.get("/openapi.json", None).await,
        app.get("/api/v1/health", None).await,
        app.get("/api/v1/nope", None).await,
        app.get("/api/v1/work-orders", None).await,
        app.get("/api/v1/work-orders", Some(&token)).await,
        app.get("/api/v1/reports/production", Some("bad")).await,
        app.post_raw("/api/v1/auth/token", None, "{").await,
    ];
    let mut seen = std::collections::BTreeSet::new();
    for res in responses {
        let (tid, tp) = trace_headers(&res);
        assert!(is_hex(&tid, 32), "{tid}");
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1], tid);
        assert!(is_hex(parts[2], 16));
        seen.insert(tid);
    }
    assert_eq!(seen.len(), 10, "each request has its own trace");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_incoming_traceparent_is_continued() {
    let app = spawn_app().await;
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let res = app
        .client
        .get(app.url("/api/v1/work-orders"))
        .header("traceparent", incoming)
        .send()
        .await
        .unwrap();
    let (tid, tp) = trace_headers(&res);
    assert_eq!(tid, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert_ne!(tp, incoming, "the gateway's own span id");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    // A malformed traceparent starts a new trace.
    let res = app
        .client
        .get(app.url("/healthz"))
        .header("traceparent", "00-zz-yy-01")
        .send()
        .await
        .unwrap();
    let (tid, _) = trace_headers(&res);
    assert!(is_hex(&tid, 32) && tid != "4bf92f3577b34da6a3ce929d0e0e4736");
}
