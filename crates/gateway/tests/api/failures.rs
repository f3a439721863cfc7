//! Failures between the gateway and a service reach the tablet as the right class: anything
//! whose outcome is unknown (a connection cut mid-call) or that is not the tablet's fault (the
//! service refusing the gateway's own caller signature) is 503 `unavailable` with
//! `Retry-After` (retrying with the same scan_id is safe), never 500 or 401.

use std::time::Duration;

use serde_json::{Value, json};

use crate::fakes::{SIGNATURE_REFUSALS, start_scan_ingest, start_scan_ingest_keyed};
use crate::helpers::*;

fn retry_after(res: &reqwest::Response) -> Option<u64> {
    res.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_dying_mid_scan_is_503_with_retry_after_and_the_retry_is_booked() {
    let fake = start_scan_ingest().await;
    let mut settings = test_settings();
    settings.scan_ingest_url = fake.url.clone();
    let app = spawn_with(settings).await;
    let token = app.demo_token("op1", Some("TAB-10")).await;
    // A first call opens the connection the crash will cut.
    let res = app
        .post_json(
            "/api/v1/scans",
            Some(&token),
            &json!({"scans": [scan("ST-10")]}),
        )
        .await;
    assert_eq!(res.status(), 200);

    let mut dying = scan("ST-10");
    dying["lot"] = json!("DIE");
    let body = json!({"scans": [dying]});
    let res = app.post_json("/api/v1/scans", Some(&token), &body).await;
    assert!(
        fake.fake.died.load(std::sync::atomic::Ordering::SeqCst),
        "the scan reached the fake"
    );
    assert_eq!(retry_after(&res), Some(app.settings.retry_after_seconds));
    let p = assert_problem(res, 503, "unavailable").await;
    assert!(
        p["detail"].as_str().unwrap().contains("retrying is safe"),
        "{p}"
    );

    // The service comes back; the tablet resends the same scan_id and it is booked.
    let _ = fake.fake.kill.as_ref().unwrap().send(false);
    let booked = mes_common::testing::wait_for(Duration::from_secs(10), || async {
        let res = app.post_json("/api/v1/scans", Some(&token), &body).await;
        let status = res.status().as_u16();
        assert!(
            status == 200 || status == 503,
            "a retry during the restart is 200 or 503, got {status}"
        );
        status == 200
    })
    .await;
    assert!(booked, "the retried scan was never booked");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_refusing_the_gateways_signature_is_503_not_401() {
    let fake = start_scan_ingest().await;
    let mut settings = test_settings();
    settings.scan_ingest_url = fake.url.clone();
    let app = spawn_with(settings).await;
    let token = app.demo_token("op1", Some("TAB-10")).await;
    for (lot, message) in SIGNATURE_REFUSALS {
        let mut s = scan("ST-10");
        s["lot"] = json!(lot);
        let res = app
            .post_json("/api/v1/scans", Some(&token), &json!({"scans": [s]}))
            .await;
        assert!(!res.headers().contains_key("www-authenticate"), "{lot}");
        assert_eq!(
            retry_after(&res),
            Some(app.settings.retry_after_seconds),
            "{lot}"
        );
        let p: Value = assert_problem(res, 503, "unavailable").await;
        let detail = p["detail"].as_str().unwrap();
        assert!(
            !detail.contains("signature"),
            "{message} is logged, not shown: {p}"
        );
    }
    // The token itself still works: the tablet was not at fault.
    let res = app
        .post_json(
            "/api/v1/scans",
            Some(&token),
            &json!({"scans": [scan("ST-10")]}),
        )
        .await;
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_services_own_role_refusal_stays_403_and_its_own_internal_error_500() {
    let fake = start_scan_ingest().await;
    let mut settings = test_settings();
    settings.scan_ingest_url = fake.url.clone();
    let app = spawn_with(settings).await;
    let token = app.demo_token("op1", Some("TAB-10")).await;
    let mut s = scan("ST-10");
    s["lot"] = json!("NOT-YOURS");
    let res = app
        .post_json("/api/v1/scans", Some(&token), &json!({"scans": [s]}))
        .await;
    let p = assert_problem(res, 403, "forbidden").await;
    assert_eq!(
        p["detail"],
        "the caller's roles do not allow this operation"
    );
    let mut s = scan("ST-10");
    s["lot"] = json!("BOOM");
    let res = app
        .post_json("/api/v1/scans", Some(&token), &json!({"scans": [s]}))
        .await;
    let p = assert_problem(res, 500, "internal").await;
    assert!(!p["detail"].as_str().unwrap().contains("relation"), "{p}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_signature_check_refusing_the_gateway_is_503_not_401() {
    // The service runs with another deployment's key (a rotation gone wrong).
    let other = mes_common::identity::CallerKey::from_config(
        "another deployment's internal key, 32+ bytes",
    );
    let fake = start_scan_ingest_keyed(other.clone()).await;
    // Signed with the wrong key, and not signed at all (demo gateway without a key).
    for key in [mes_common::testing::internal_key(), Default::default()] {
        let mut settings = test_settings();
        settings.scan_ingest_url = fake.url.clone();
        settings.service.internal_key = key;
        let app = spawn_with(settings).await;
        let token = app.demo_token("op1", Some("TAB-10")).await;
        let res = app
            .post_json(
                "/api/v1/scans",
                Some(&token),
                &json!({"scans": [scan("ST-10")]}),
            )
            .await;
        assert_eq!(retry_after(&res), Some(app.settings.retry_after_seconds));
        assert_problem(res, 503, "unavailable").await;
    }
    assert!(fake.fake.calls().is_empty(), "refused before the handler");
}
