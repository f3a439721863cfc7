//! Retries and races that try to break "an acknowledged scan is booked once and answered
//! truthfully when it is retried": retries queued behind their first attempt, double voids,
//! a slow (not down) Redis, and what a client is told when the outcome is unknown.

mod common;

use std::time::Duration;

use common::*;
use mes_common::testing::proxy::Proxy;
use mes_proto::v1 as pb;
use pb::ScanKind as K;
use pb::ScanStatus as S;

/// Backends of this test's database that wait for a row lock (another transaction's row, or
/// the tuple lock of the queue in front of it; advisory-lock waits do not count).
async fn lock_waiters(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'
           AND wait_event IN ('transactionid', 'tuple')",
    )
    .fetch_one(&app.pool)
    .await
    .expect("pg_stat_activity")
}

async fn wait_for_lock_waiters(app: &TestApp, n: i64) {
    assert!(
        wait_for(Duration::from_secs(10), || async {
            lock_waiters(app).await >= n
        })
        .await,
        "expected {n} requests waiting on the held row lock"
    );
}

fn submit_task(
    app: &TestApp,
    scan: pb::Scan,
) -> tokio::task::JoinHandle<Result<Vec<pb::ScanResult>, tonic::Status>> {
    let client = app.scans();
    tokio::spawn(async move {
        let mut client = client;
        let mut req = tonic::Request::new(pb::SubmitScansRequest { scans: vec![scan] });
        operator().write_to(req.metadata_mut());
        client
            .submit_scans(req)
            .await
            .map(|r| r.into_inner().results)
    })
}

/// The first attempt of a scan waits on a busy work order; the client gives up and resends the
/// same scan, which queues behind the first on the same lock. When the lock is released the
/// first commits and the retry must be answered `duplicate` — not re-judged by the business
/// rules against the state its own first attempt produced (`insufficient_quantity`,
/// `invalid_operation`), which would make the operator scan it again under a new id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_queued_behind_its_first_attempt_is_answered_duplicate() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    accepted(
        &app.submit(vec![scan(K::StartOperation, "WO-1000", 10, "ST-10")])
            .await,
    );
    // Each of these would be refused if applied a second time.
    let cases = [
        (
            "consume the whole lot",
            with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "STEEL-L1", "100"),
        ),
        (
            "complete the operation",
            scan(K::CompleteOperation, "WO-1000", 10, "ST-10"),
        ),
    ];
    for (what, s) in cases {
        let mut side = app.pool.begin().await.expect("side transaction");
        sqlx::query("SELECT 1 FROM work_orders WHERE number = 'WO-1000' FOR UPDATE")
            .execute(&mut *side)
            .await
            .expect("hold the work order");
        let waiting = lock_waiters(&app).await;
        let first = submit_task(&app, s.clone());
        wait_for_lock_waiters(&app, waiting + 1).await;
        let retry = submit_task(&app, s.clone());
        wait_for_lock_waiters(&app, waiting + 2).await;
        side.rollback().await.expect("release the work order");

        let mut answers = Vec::new();
        for t in [first, retry] {
            let results = t.await.expect("task").expect("submit");
            answers.push(status(&results[0]));
        }
        answers.sort_by_key(|(s, _)| *s as i32);
        assert_eq!(
            answers,
            vec![(S::Accepted, String::new()), (S::Duplicate, String::new())],
            "{what}: the first attempt and its retry"
        );
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM scans WHERE scan_id = $1")
            .bind(uuid::Uuid::parse_str(&s.scan_id).unwrap())
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(stored, 1, "{what}: stored once");
    }
    assert_eq!(app.lot("STEEL-L1").await.quantity_on_hand, "0");
    assert_eq!(app.work_order("WO-1000").await.status, "completed");
    app.stop().await;
}

/// Two supervisors (or one double-tapping) confirm the same void at once: one void is applied,
/// the other is told the scan is already voided (409), never a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_double_void_applies_once_and_answers_conflict() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    let consume = with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "STEEL-L1", "10");
    accepted(
        &app.submit(vec![
            scan(K::StartOperation, "WO-1000", 10, "ST-10"),
            consume.clone(),
        ])
        .await,
    );
    // Both voids queue behind a held lot row, so both read "not voided yet" before either commits.
    let mut side = app.pool.begin().await.expect("side transaction");
    sqlx::query("SELECT 1 FROM lots WHERE lot = 'STEEL-L1' FOR UPDATE")
        .execute(&mut *side)
        .await
        .expect("hold the lot");
    let waiting = lock_waiters(&app).await;
    let void = |n: u32| {
        let client = app.scans();
        let id = consume.scan_id.clone();
        tokio::spawn(async move {
            let mut client = client;
            let req = mes_common::testing::with_caller(
                pb::VoidScanRequest {
                    scan_id: id,
                    reason: format!("double tap {n}"),
                    confirm: true,
                },
                supervisor(),
            );
            client.void_scan(req).await.map(|r| r.into_inner())
        })
    };
    let first = void(1);
    wait_for_lock_waiters(&app, waiting + 1).await;
    let second = void(2);
    wait_for_lock_waiters(&app, waiting + 2).await;
    side.rollback().await.expect("release the lot");

    let mut codes = Vec::new();
    for t in [first, second] {
        match t.await.expect("task") {
            Ok(r) => {
                assert!(!r.void_scan_id.is_empty());
                codes.push(tonic::Code::Ok);
            }
            Err(status) => codes.push(status.code()),
        }
    }
    codes.sort_by_key(|c| *c as i32);
    assert_eq!(
        codes,
        vec![tonic::Code::Ok, tonic::Code::Aborted],
        "one void applies, the other is a conflict (409)"
    );
    assert_eq!(app.lot("STEEL-L1").await.quantity_on_hand, "100");
    let voids: i64 = sqlx::query_scalar("SELECT count(*) FROM scans WHERE kind = 'void'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(voids, 1);
    app.stop().await;
}

/// A slow Redis (answering, but late) must not stretch the time a batch holds its work-order
/// and lot row locks: the reference lookup happens before the transaction takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_never_holds_row_locks() {
    let redis = Proxy::start("127.0.0.1:6379").await;
    let app = spawn_app_with(|s| {
        s.service.redis_url = format!("redis://127.0.0.1:{}", redis.port);
    })
    .await;
    load_demo_plant(&app).await;
    accepted(
        &app.submit(vec![scan(K::StartOperation, "WO-1000", 10, "ST-10")])
            .await,
    );
    // The scan gives up on Redis after its command timeout (500 ms) and then goes on without
    // it: a check that takes longer than a fraction of that says nothing, so it is repeated.
    for attempt in 1..=5 {
        // From now on Redis "answers" only when the test says so.
        redis.hold();
        let pending = submit_task(
            &app,
            with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "STEEL-L1", "1"),
        );
        assert!(
            wait_for(Duration::from_secs(10), || async { redis.holds("MGET") }).await,
            "the scan asks Redis for its reference data"
        );
        let seen = std::time::Instant::now();
        // While the scan waits for Redis, its rows are free.
        let mut side = app.pool.begin().await.unwrap();
        let wo =
            sqlx::query("SELECT 1 FROM work_orders WHERE number = 'WO-1000' FOR UPDATE NOWAIT")
                .execute(&mut *side)
                .await;
        let lot = sqlx::query("SELECT 1 FROM lots WHERE lot = 'STEEL-L1' FOR UPDATE NOWAIT")
            .execute(&mut *side)
            .await;
        side.rollback().await.unwrap();
        let conclusive = seen.elapsed() < Duration::from_millis(300);
        redis.release();
        let results = pending.await.unwrap().expect("submit");
        accepted(&results);
        if !conclusive && attempt < 5 {
            continue; // too slow to tell (a loaded machine): the scan may have given up on Redis
        }
        assert!(
            wo.is_ok(),
            "the work order was locked while waiting for Redis: {wo:?}"
        );
        assert!(
            lot.is_ok(),
            "the lot was locked while waiting for Redis: {lot:?}"
        );
        break;
    }
    app.stop().await;
}

/// The database goes away under a single-scan request: the client must hear UNAVAILABLE
/// ("retry the same scan"), never INTERNAL, whether or not its request shared a group commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_is_unavailable_not_internal() {
    let db = Proxy::start("127.0.0.1:5432").await;
    let port = db.port;
    // The service reaches PostgreSQL only through the proxy (the harness drops the database
    // directly, whatever the proxy does).
    let app = spawn_app_with(move |s| {
        s.service.database_url = s
            .service
            .database_url
            .replace(":5432/", &format!(":{port}/"));
    })
    .await;
    load_demo_plant(&app).await;
    accepted(
        &app.submit(vec![scan(K::StartOperation, "WO-1000", 10, "ST-10")])
            .await,
    );
    db.cut();
    let err = app
        .submit_as(
            &operator(),
            vec![with_lot(
                scan(K::Consume, "WO-1000", 10, "ST-10"),
                "STEEL-L1",
                "1",
            )],
        )
        .await
        .expect_err("the database is gone");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    db.release();
    app.stop().await;
}
