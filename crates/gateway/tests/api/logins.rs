//! Logins under attack: the password checks (argon2id, 19 MiB each) are bounded, attempts are
//! counted before they are checked (parallel guesses cannot pass the limit), per username
//! (known or not) and per client address, and the limits hold without Redis.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

/// Resident memory of this process (the gateway runs in it), from /proc.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

async fn login(app: &TestApp, username: &str, password: &str) -> reqwest::Response {
    app.post_json(
        "/api/v1/auth/token",
        None,
        &json!({"username": username, "password": password}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn forty_concurrent_bad_logins_keep_password_checks_and_memory_bounded() {
    gateway::return_large_allocations_to_the_os();
    let mut settings = test_settings();
    settings.login_max_concurrent_hashes = 2;
    // Limits out of the way: the bound on password checks is what is tested.
    settings.login_attempts_per_user = 1000;
    settings.login_attempts_per_ip = 1000;
    let app = spawn_with(settings).await;
    // Warm up (connections, the first hash's allocations).
    assert_eq!(login(&app, "op1", "wrong").await.status(), 401);
    let baseline = rss_bytes();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(baseline));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(), std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let logins = (0..40).map(|i| {
        let app = &app;
        async move {
            // Known users with wrong passwords and unknown users alike.
            let user = if i % 2 == 0 {
                "op1".to_owned()
            } else {
                format!("nobody-{i}")
            };
            let res = login(app, &user, "guess").await;
            let status = res.status().as_u16();
            if status == 503 || status == 429 {
                assert!(res.headers().contains_key("retry-after"), "{status}");
            }
            status
        }
    });
    let statuses = futures::future::join_all(logins).await;
    sampler.abort();
    let grown = peak
        .load(std::sync::atomic::Ordering::SeqCst)
        .saturating_sub(baseline);
    eprintln!(
        "40 concurrent bad logins: RSS {} MiB before, peak +{} MiB; statuses {statuses:?}",
        baseline >> 20,
        grown >> 20
    );
    for s in &statuses {
        assert!([401, 429, 503].contains(s), "never 500: {statuses:?}");
    }
    assert!(statuses.contains(&401), "{statuses:?}");
    assert!(
        app.state.hashes.peak() <= 2,
        "{} password checks ran at once",
        app.state.hashes.peak()
    );
    // Two 19 MiB work areas at a time, and some slack; 40 at once would be ~760 MiB. Only
    // meaningful when this test has its process to itself (nextest; `cargo test` runs the other
    // tests, and their gateways' hashes, in the same process).
    if std::env::var("NEXTEST_EXECUTION_MODE").as_deref() == Ok("process-per-test") {
        assert!(grown < 160 << 20, "RSS grew by {} MiB", grown >> 20);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_parallel_wrong_passwords_get_exactly_the_limit_of_401s_then_429() {
    let mut settings = test_settings();
    settings.login_attempts_per_user = 5;
    settings.login_attempts_per_ip = 1000;
    // Long enough for 2 × 20 logins even on a loaded machine (`cargo test` runs every test in
    // one process): a window ending mid-batch would rightly let 5 more attempts through.
    settings.login_window_seconds = 10;
    settings.login_hash_wait_ms = 30_000;
    let app = spawn_with(settings).await;
    // A known user, and an unknown one limited the same.
    for user in ["op1", "nobody"] {
        let statuses = futures::future::join_all(
            (0..20).map(|_| async { login(&app, user, "guess").await.status().as_u16() }),
        )
        .await;
        let unauthenticated = statuses.iter().filter(|&&s| s == 401).count();
        let limited = statuses.iter().filter(|&&s| s == 429).count();
        assert_eq!((unauthenticated, limited), (5, 15), "{user}: {statuses:?}");
    }
    // The right password is refused too until the window passes.
    let res = login(&app, "op1", "demo-op1").await;
    let retry: u64 = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=10).contains(&retry), "{retry}");
    assert_problem(res, 429, "rate_limited").await;
    let back = mes_common::testing::wait_for(Duration::from_secs(30), || async {
        let status = login(&app, "op1", "demo-op1").await.status().as_u16();
        assert!(status == 200 || status == 429, "{status}");
        status == 200
    })
    .await;
    assert!(back, "the right password works again after the window");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_logins_are_limited_per_client_address_whatever_the_usernames() {
    let mut settings = test_settings();
    settings.login_attempts_per_user = 100;
    settings.login_attempts_per_ip = 4;
    settings.client_ip_header = "x-forwarded-for".into();
    let app = spawn_with(settings).await;
    let from = |ip: &'static str, user: String, password: &'static str| {
        app.client
            .post(app.url("/api/v1/auth/token"))
            .header("x-forwarded-for", format!("203.0.113.9, {ip}"))
            .json(&json!({"username": user, "password": password}))
            .send()
    };
    for i in 0..4 {
        let res = from("10.0.0.1", format!("user-{i}"), "guess")
            .await
            .unwrap();
        assert_problem(res, 401, "unauthenticated").await;
    }
    let res = from("10.0.0.1", "user-9".into(), "guess").await.unwrap();
    assert_problem(res, 429, "rate_limited").await;
    let res = from("10.0.0.1", "op1".into(), "demo-op1").await.unwrap();
    assert_problem(res, 429, "rate_limited").await;
    // Another client is not affected; a success from it does not count.
    for _ in 0..6 {
        let res = from("10.0.0.2", "op1".into(), "demo-op1").await.unwrap();
        assert_eq!(res.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_redis_login_limits_still_hold_in_process() {
    let mut settings = test_settings();
    settings.service.redis_url = format!("redis://127.0.0.1:{}", closed_port());
    settings.login_attempts_per_user = 3;
    let app = spawn_with(settings).await;
    let statuses = futures::future::join_all(
        (0..8).map(|_| async { login(&app, "op1", "guess").await.status().as_u16() }),
    )
    .await;
    assert_eq!(
        statuses.iter().filter(|&&s| s == 401).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        5,
        "{statuses:?}"
    );
    let res = login(&app, "op1", "demo-op1").await;
    assert_problem(res, 429, "rate_limited").await;
    // Other users still log in: the gateway does not fail closed.
    assert_eq!(login(&app, "qa1", "demo-qa1").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn logins_beyond_the_password_checks_wait_then_get_503_with_retry_after() {
    let mut settings = test_settings();
    settings.login_max_concurrent_hashes = 1;
    settings.login_hash_wait_ms = 1;
    let app = spawn_with(settings).await;
    let statuses = futures::future::join_all((0..10).map(|_| async {
        let res = login(&app, "op1", "guess").await;
        let status = res.status().as_u16();
        if status == 503 {
            assert!(res.headers().contains_key("retry-after"));
            assert_problem(res, 503, "unavailable").await;
        }
        status
    }))
    .await;
    assert!(statuses.contains(&503), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| [401, 503].contains(s)),
        "{statuses:?}"
    );
    // Attempts refused before their check were given back: 10 attempts are the default limit,
    // yet the right password still gets in.
    assert_eq!(app.settings.login_attempts_per_user, 10);
    assert_eq!(login(&app, "op1", "demo-op1").await.status(), 200);
}

/// A TCP proxy to the test Redis whose answers can be delayed (a slow, not down, Redis).
struct SlowRedis {
    port: u16,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

async fn slow_redis() -> SlowRedis {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let delay = delay_ms.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(redis) = tokio::net::TcpStream::connect("127.0.0.1:6379").await else {
                continue;
            };
            let delay = delay.clone();
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut redis_rx, mut redis_tx) = redis.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_rx, &mut redis_tx).await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = redis_rx.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let ms = delay.load(std::sync::atomic::Ordering::SeqCst);
                    if ms > 0 {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    if client_tx.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    SlowRedis { port, delay_ms }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_slow_login_limits_hold_and_logins_do_not_wait_for_it() {
    let redis = slow_redis().await;
    let mut settings = test_settings();
    settings.service.redis_url = format!("redis://127.0.0.1:{}", redis.port);
    settings.login_attempts_per_user = 3;
    settings.login_redis_timeout_ms = 250;
    let app = spawn_with(settings).await;
    assert_eq!(login(&app, "qa1", "demo-qa1").await.status(), 200);
    // Redis now answers after 3 s.
    redis
        .delay_ms
        .store(3_000, std::sync::atomic::Ordering::SeqCst);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let started = std::time::Instant::now();
        statuses.push(login(&app, "op1", "guess").await.status().as_u16());
        assert!(
            started.elapsed() < Duration::from_millis(1_500),
            "a login waited {:?} for Redis",
            started.elapsed()
        );
    }
    assert_eq!(statuses, vec![401, 401, 401, 429, 429]);
    let res = login(&app, "op1", "demo-op1").await;
    assert_problem(res, 429, "rate_limited").await;
}

/// A login from `ip` behind a proxy that appends it to `x-forwarded-for`.
async fn login_from(app: &TestApp, ip: &str, username: &str, password: &str) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/auth/token"))
        .header("x-forwarded-for", format!("203.0.113.9, {ip}"))
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spray_of_refused_logins_from_one_address_does_not_lock_out_other_clients() {
    let mut settings = test_settings();
    settings.login_attempts_per_user = 100;
    settings.login_attempts_per_ip = 4;
    settings.login_local_keys_max = 20;
    settings.client_ip_header = "x-forwarded-for".into();
    let app = spawn_with(settings).await;
    // One client sprays random usernames, well past the in-process capacity; every attempt
    // after its fourth is refused before its password is checked.
    let mut statuses = Vec::new();
    for _ in 0..60 {
        let user = format!("spray-{}", uuid::Uuid::new_v4().simple());
        statuses.push(
            login_from(&app, "10.0.0.1", &user, "guess")
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses[..4], [401; 4], "{statuses:?}");
    assert!(statuses[4..].iter().all(|&s| s == 429), "{statuses:?}");
    // A tablet from another address logs in, with Redis healthy.
    let res = login_from(&app, "10.0.0.2", "op1", "demo-op1").await;
    assert_eq!(
        res.status(),
        200,
        "{}",
        res.text().await.unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_in_process_counts_are_full_the_oldest_are_forgotten_not_every_new_login_refused()
{
    let mut settings = test_settings();
    settings.login_attempts_per_user = 100;
    settings.login_attempts_per_ip = 100;
    settings.login_local_keys_max = 8;
    settings.client_ip_header = "x-forwarded-for".into();
    let app = spawn_with(settings).await;
    // Twelve clients, each with its own username: 24 counts, three times the capacity, every
    // one under its limit.
    for i in 0..12 {
        let res = login_from(
            &app,
            &format!("10.0.1.{i}"),
            &format!("nobody-{i}"),
            "guess",
        )
        .await;
        assert_problem(res, 401, "unauthenticated").await;
    }
    let res = login_from(&app, "10.0.2.1", "op1", "demo-op1").await;
    assert_eq!(
        res.status(),
        200,
        "{}",
        res.text().await.unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn attempts_refused_for_their_address_do_not_count_against_the_username() {
    let mut settings = test_settings();
    settings.login_attempts_per_user = 3;
    settings.login_attempts_per_ip = 2;
    settings.client_ip_header = "x-forwarded-for".into();
    let app = spawn_with(settings).await;
    for _ in 0..2 {
        let res = login_from(&app, "10.0.0.1", "qa1", "guess").await;
        assert_problem(res, 401, "unauthenticated").await;
    }
    // Refused for the address before the username is counted.
    for _ in 0..10 {
        let res = login_from(&app, "10.0.0.1", "qa1", "guess").await;
        assert_problem(res, 429, "rate_limited").await;
    }
    // One address cannot spend more of a user's attempts than its own limit.
    let res = login_from(&app, "10.0.0.2", "qa1", "demo-qa1").await;
    assert_eq!(
        res.status(),
        200,
        "{}",
        res.text().await.unwrap_or_default()
    );
}

/// The login limit straight on [`gateway::limits::Limits`], without password hashing in
/// between: hundreds of attempts on four worker threads, so that the in-process count and Redis
/// see them in different orders. Exactly `limit` attempts must pass, never fewer (taking the
/// larger of two differently ordered counts refused some attempts under the limit) nor more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_the_limit_of_parallel_attempts_passes_however_they_interleave() {
    let prefix = format!("test:gateway:{}:", uuid::Uuid::new_v4().simple());
    let redis = mes_common::cache::Redis::connect(REDIS, &prefix, Duration::from_secs(5))
        .await
        .expect("redis");
    let _cleanup = mes_common::testing::RedisGuard {
        url: REDIS.into(),
        prefix: prefix.clone(),
    };
    let limit = 50;
    let limits = gateway::limits::Limits::new(
        redis,
        1000,
        1000,
        1,
        gateway::limits::LoginLimits::new(
            limit,
            1_000_000,
            Duration::from_secs(60),
            Duration::from_secs(5),
            1000,
        ),
    );
    for round in 0..10 {
        let user = format!("user-{round}");
        let tasks: Vec<_> = (0..400)
            .map(|_| {
                let limits = limits.clone();
                let user = user.clone();
                tokio::spawn(async move { limits.reserve_login(&user, "10.0.0.1").await.is_ok() })
            })
            .collect();
        let mut passed = 0;
        for t in tasks {
            passed += usize::from(t.await.unwrap());
        }
        assert_eq!(passed, limit as usize, "round {round}");
    }
}
