//! CORS, trace headers, and clients too slow to finish a request.

use std::time::Duration;

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

/// Writes `head` then one more byte of `trickle` every `every`, until the gateway closes the
/// connection or answers (`Some`: how long it held on, and what it answered) or `patience` ends
/// (`None`).
async fn trickle(
    app: &TestApp,
    head: &str,
    trickle: &[u8],
    every: Duration,
    patience: Duration,
) -> Option<(Duration, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    tcp.write_all(head.as_bytes()).await.expect("head");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    for byte in trickle.iter().cycle() {
        if started.elapsed() > patience {
            return None;
        }
        tokio::select! {
            read = tcp.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    return Some((started.elapsed(), String::from_utf8_lossy(&answer).into_owned()));
                }
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            },
            () = tokio::time::sleep(every) => {
                if tcp.write_all(&[*byte]).await.is_err() {
                    return Some((started.elapsed(), String::from_utf8_lossy(&answer).into_owned()));
                }
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_sending_its_headers_byte_by_byte_is_cut_off() {
    let app = spawn_with(test_settings()).await;
    // Slowloris: a request line, then header bytes one every 200 ms, never the blank line.
    let cut = trickle(
        &app,
        "GET /healthz HTTP/1.1\r\nHost: gateway\r\n",
        b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaa\r\n",
        Duration::from_millis(200),
        Duration::from_secs(60),
    )
    .await;
    let (after, _) = cut.expect("the gateway kept a never-ending header section open for 60 s");
    assert!(
        after < Duration::from_secs(45),
        "cut off only after {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_sending_its_body_byte_by_byte_gets_an_answer_within_the_request_timeout() {
    let mut settings = test_settings();
    settings.request_timeout_ms = 2_000;
    let app = spawn_with(settings).await;
    let cut = trickle(
        &app,
        "POST /api/v1/auth/token HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
        b"{\"username\": \"op1\", \"password\": \"",
        Duration::from_millis(100),
        Duration::from_secs(30),
    )
    .await;
    let (after, answer) = cut.expect("the gateway waited 30 s for a trickling body");
    assert!(
        after < Duration::from_secs(10),
        "answered only after {after:?}: {answer}"
    );
}
