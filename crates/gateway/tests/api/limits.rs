//! Rate limits shared by replicas through Redis.

use fred::interfaces::ClientLike as _;
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

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_token_is_refused_and_counts_against_no_limit() {
    let mut settings = test_settings();
    settings.rate_limit_per_minute_user = 4;
    let app = spawn_with(settings).await;
    let revoked = app.demo_token("qa1", None).await;
    // The logout is the user's first request of the window.
    let res = app
        .client
        .post(app.url("/api/v1/auth/logout"))
        .bearer_auth(&revoked)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    for _ in 0..6 {
        let res = app.get("/api/v1/lots/STEEL-L1", Some(&revoked)).await;
        let p = assert_problem(res, 401, "unauthenticated").await;
        assert!(p["detail"].as_str().unwrap().contains("revoked"), "{p}");
    }
    // The refused requests were not counted: the user's other token has the rest of the window.
    let token = app.demo_token("qa1", None).await;
    for i in 0..3 {
        let res = app.get("/api/v1/lots/STEEL-L1", Some(&token)).await;
        assert_eq!(res.status(), 503, "request {i} is within the limit");
    }
    let res = app.get("/api/v1/lots/STEEL-L1", Some(&token)).await;
    assert_problem(res, 429, "rate_limited").await;
}

/// A throwaway `redis-server` on a free port (no persistence); killed when dropped.
struct OwnRedis {
    port: u16,
    _child: tokio::process::Child,
}

impl OwnRedis {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed");
        let up = mes_common::testing::wait_for(std::time::Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(up, "redis-server did not start on {port}");
        Self {
            port,
            _child: child,
        }
    }
}

/// Calls of each command Redis ran since its start (`INFO commandstats`).
async fn command_calls(app: &TestApp) -> std::collections::BTreeMap<String, u64> {
    let info: String = app
        .state
        .limits
        .redis()
        .client()
        .custom(fred::cmd!("INFO"), vec!["commandstats"])
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, stats) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_authenticated_request_costs_one_redis_command_and_survives_a_script_flush() {
    let redis = OwnRedis::start().await;
    let mut settings = test_settings();
    settings.service.redis_url = format!("redis://127.0.0.1:{}", redis.port);
    settings.rate_limit_per_minute_user = 5;
    let app = spawn_with(settings).await;
    let token = app.demo_token("qa1", Some("TAB-10")).await;
    assert_eq!(
        app.get("/api/v1/lots/STEEL-L1", Some(&token))
            .await
            .status(),
        503
    );
    let before = command_calls(&app).await;
    for _ in 0..2 {
        assert_eq!(
            app.get("/api/v1/lots/STEEL-L1", Some(&token))
                .await
                .status(),
            503
        );
    }
    let after = command_calls(&app).await;
    let ran: Vec<(String, u64)> = after
        .iter()
        .map(|(name, calls)| (name.clone(), calls - before.get(name).copied().unwrap_or(0)))
        .filter(|(name, calls)| *calls > 0 && name != "info")
        .collect();
    // One command per request (EVALSHA); Redis also counts the commands the script ran: the
    // revocation check and both counters (user and device), nothing else.
    let expected = [
        ("evalsha", 2),
        ("exists", 2),
        ("incr", 4),
        ("pexpire", 4),
        ("pttl", 4),
    ];
    assert_eq!(
        ran,
        expected
            .map(|(name, calls)| (name.to_owned(), calls))
            .to_vec()
    );

    // Redis forgot its scripts (a restart, SCRIPT FLUSH): requests are still counted.
    let () = app
        .state
        .limits
        .redis()
        .client()
        .custom(fred::cmd!("SCRIPT"), vec!["FLUSH"])
        .await
        .unwrap();
    for i in 0..2 {
        let res = app.get("/api/v1/lots/STEEL-L1", Some(&token)).await;
        assert_eq!(res.status(), 503, "request {} is within the limit", i + 4);
    }
    let res = app.get("/api/v1/lots/STEEL-L1", Some(&token)).await;
    assert_problem(res, 429, "rate_limited").await;
}
