//! Rate limits shared by replicas through Redis.

use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_per_user_limit_is_shared_by_two_instances() {
    let mut settings = test_settings();
    settings.rate_limit_per_minute_user = 5;
    let a = spawn_with(settings).await;
    let b = spawn_replica(&a).await;
    let token = a.demo_token("qa1", None).await;
    for i in 0..5 {
        let app = if i % 2 == 0 { &a } else { &b };
        let res = app.get("/api/v1/lots/STEEL-L1", Some(&token)).await;
        assert_eq!(res.status(), 503, "request {i} is within the limit");
    }
    for app in [&a, &b] {
        let res = app.get("/api/v1/lots/STEEL-L1", Some(&token)).await;
        let retry: u64 = res
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("Retry-After");
        assert!((1..=60).contains(&retry), "{retry}");
        assert_problem(res, 429, "rate_limited").await;
    }
    // Another user is not affected.
    let other = b.demo_token("plan1", None).await;
    assert_eq!(
        b.get("/api/v1/lots/STEEL-L1", Some(&other)).await.status(),
        503
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_per_device_limit_spans_users() {
    let mut settings = test_settings();
    settings.rate_limit_per_minute_device = 4;
    let a = spawn_with(settings).await;
    let b = spawn_replica(&a).await;
    let op = a.demo_token("op1", Some("TAB-10")).await;
    let sup = b.demo_token("sup1", Some("TAB-10")).await;
    for (app, token) in [(&a, &op), (&b, &sup), (&a, &sup), (&b, &op)] {
        assert_eq!(
            app.get("/api/v1/work-orders", Some(token)).await.status(),
            503
        );
    }
    let res = a.get("/api/v1/work-orders", Some(&sup)).await;
    assert_problem(res, 429, "rate_limited").await;
    // The same users without the device still get through.
    let sup_desk = a.demo_token("sup1", None).await;
    assert_eq!(
        a.get("/api/v1/work-orders", Some(&sup_desk)).await.status(),
        503
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_failed_logins_are_rate_limited() {
    let mut settings = test_settings();
    settings.login_attempts_per_user = 3;
    let app = spawn_with(settings).await;
    for _ in 0..3 {
        let res = app
            .post_json(
                "/api/v1/auth/token",
                None,
                &json!({"username": "op1", "password": "guess"}),
            )
            .await;
        assert_problem(res, 401, "unauthenticated").await;
    }
    let res = app
        .post_json(
            "/api/v1/auth/token",
            None,
            &json!({"username": "op1", "password": "demo-op1"}),
        )
        .await;
    assert!(res.headers().contains_key("retry-after"));
    assert_problem(res, 429, "rate_limited").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_redis_limits_fail_open_and_logout_is_503() {
    let mut settings = test_settings();
    settings.service.redis_url = format!("redis://127.0.0.1:{}", closed_port());
    settings.rate_limit_per_minute_user = 1;
    let app = spawn_with(settings).await;
    let token = app.demo_token("qa1", None).await;
    for _ in 0..3 {
        let res = app.get("/api/v1/lots/STEEL-L1", Some(&token)).await;
        assert_problem(res, 503, "unavailable").await;
    }
    let res = app
        .client
        .post(app.url("/api/v1/auth/logout"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(res.headers().contains_key("retry-after"));
    assert_problem(res, 503, "unavailable").await;
    let health: serde_json::Value = app.get("/api/v1/health", None).await.json().await.unwrap();
    assert_eq!(health["components"]["redis"]["status"], "down");
}
