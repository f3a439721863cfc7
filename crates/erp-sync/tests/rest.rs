//! The `rest` adapter against an HTTP ERP double (tests/support/erp_double.rs) with faults:
//! outages lose and duplicate nothing, the breaker opens, stays quiet, probes and closes, and
//! drifted records are dead-lettered while the rest syncs.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mes_proto::v1 as pb;
use support::erp_double::{ErpDouble, Fault};
use support::{ErpOptions, TestEnv, admin, wait_for};

const TOKEN: &str = "test-bearer-token";

fn rest_options(double: &ErpDouble) -> ErpOptions {
    ErpOptions {
        adapter: "rest".into(),
        rest_base_url: double.base_url(),
        rest_token: TOKEN.into(),
        ..Default::default()
    }
}

async fn status(app: &support::ErpSyncApp) -> pb::ErpStatus {
    app.client()
        .get_status(pb::GetErpStatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

/// Starts and completes one operation; returns the confirmation's idempotency key.
async fn complete_operation(
    env: &TestEnv,
    work_order: &str,
    operation: u32,
    station: &str,
) -> String {
    let complete = support::scan(
        pb::ScanKind::CompleteOperation,
        work_order,
        operation,
        station,
    );
    let key = format!("{work_order}:{operation}:{}", complete.scan_id);
    support::submit_all(
        &mut env.scan_ingest_client(),
        vec![
            support::scan(pb::ScanKind::StartOperation, work_order, operation, station),
            complete,
        ],
    )
    .await;
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_confirmation_is_lost_or_duplicated_across_an_erp_outage() {
    let env = TestEnv::new().await;
    let double = ErpDouble::start(support::demo_plant(), Some(TOKEN)).await;
    let erp = env
        .spawn_erp_sync(ErpOptions {
            breaker_failure_threshold: 3,
            breaker_open_ms: 200,
            retry_ms: (20, 100),
            call_timeout_ms: 300,
            ..rest_options(&double)
        })
        .await;
    erp.wait_for_successful_pulls(1).await;
    let s = status(&erp).await;
    assert_eq!(s.adapter, "rest");
    assert_eq!(s.erp_reachable, "up");
    let wo = env
        .scan_ingest_client()
        .get_work_order(pb::GetWorkOrderRequest {
            number: "WO-1001".into(),
        })
        .await
        .expect("WO-1001 pulled over rest")
        .into_inner();
    assert_eq!(wo.operations.len(), 2);

    // The ERP fails in every way while three operations complete.
    double.set_fault(Fault::ServerError);
    let mut keys = vec![complete_operation(&env, "WO-1000", 10, "ST-10").await];
    assert!(
        wait_for(Duration::from_secs(10), || async {
            double.requests("RESET").is_empty() && double.requests("POST").len() >= 2
        })
        .await
    );
    double.set_fault(Fault::Reset);
    keys.push(complete_operation(&env, "WO-1001", 10, "ST-20").await);
    assert!(
        wait_for(Duration::from_secs(10), || async {
            double.requests("RESET POST").len() >= 2
        })
        .await,
        "dropped connections were retried"
    );
    // Slow answers: the ERP takes the confirmation after erp-sync gave up waiting; the retry
    // must count as the same confirmation (409), not a second one.
    double.set_fault(Fault::Slow(Duration::from_millis(500)));
    keys.push(complete_operation(&env, "WO-1001", 20, "ST-30").await);
    assert!(
        wait_for(Duration::from_secs(10), || async {
            !double.confirmation_counts().is_empty()
        })
        .await,
        "a slow erp took a confirmation after the caller's timeout"
    );
    let still_pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status <> 'delivered'")
            .fetch_one(&erp.pool)
            .await
            .unwrap();
    assert!(
        still_pending >= 1,
        "nothing was delivered during the outage"
    );

    // The ERP recovers: the queue drains.
    double.set_fault(Fault::None);
    assert!(
        wait_for(Duration::from_secs(20), || async {
            let s = status(&erp).await;
            s.queue_depth == 0 && double.confirmation_counts().len() == keys.len()
        })
        .await,
        "the queue drained: {:?}",
        double.confirmation_counts()
    );
    let counts = double.confirmation_counts();
    let expected: BTreeMap<String, usize> = keys.iter().map(|k| (k.clone(), 1)).collect();
    assert_eq!(
        counts, expected,
        "each confirmation exactly once in the erp"
    );
    let delivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'delivered'")
            .fetch_one(&erp.pool)
            .await
            .unwrap();
    assert_eq!(delivered, 3, "one confirmation per completed operation");
    let body = double.confirmation(&keys[0]).unwrap();
    assert_eq!(body["work_order"], "WO-1000");
    assert_eq!(body["operation"], 10);
    let posts = double.requests("confirmations").len();
    assert!(posts > 3, "the outage made erp-sync retry: {posts} posts");
    let metrics = mes_common::metrics::install().render();
    assert!(metrics.contains("erp_delivery_failures_total"), "{metrics}");
    // The late answer's retry met a 409: the same confirmation, already done.
    assert!(
        metrics.contains(r#"erp_confirmations_delivered_total{result="already_there"}"#),
        "{metrics}"
    );

    erp.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_stays_quiet_probes_half_open_and_closes() {
    let env = TestEnv::new().await;
    let double = ErpDouble::start(support::demo_plant(), Some(TOKEN)).await;
    // Wide enough that a loaded machine still checks "quiet" and switches the fault to `Slow`
    // inside the open window (the probe must meet the slow erp, not the failing one).
    let open_ms = 3_000;
    let erp = env
        .spawn_erp_sync(ErpOptions {
            breaker_failure_threshold: 2,
            breaker_open_ms: open_ms,
            retry_ms: (10, 30),
            call_timeout_ms: 2_000,
            ..rest_options(&double)
        })
        .await;
    erp.wait_for_successful_pulls(1).await;
    double.set_fault(Fault::ServerError);
    let key = complete_operation(&env, "WO-1000", 10, "ST-10").await;

    let mut seen: Vec<String> = vec![status(&erp).await.breaker];
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.last().map(String::as_str) != Some("open") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let b = status(&erp).await.breaker;
        if seen.last() != Some(&b) {
            seen.push(b);
        }
    }
    assert_eq!(seen.last().map(String::as_str), Some("open"), "{seen:?}");
    let opened_seen = Instant::now();
    let failed = double.requests("confirmations").len();
    assert!(failed >= 2, "the threshold was reached: {failed}");

    // Open: no calls at all for most of the open window.
    tokio::time::sleep(Duration::from_millis(open_ms / 2)).await;
    assert_eq!(
        double.requests("confirmations").len(),
        failed,
        "an open breaker does not call the erp"
    );
    assert_eq!(status(&erp).await.breaker, "open");

    // The ERP is back but slow: the half-open trial is visible while it runs (long enough for
    // a status poll to land in it; still well within the call timeout).
    double.set_fault(Fault::Slow(Duration::from_millis(800)));
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.last().map(String::as_str) != Some("closed") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let b = status(&erp).await.breaker;
        if seen.last() != Some(&b) {
            seen.push(b);
        }
    }
    let tail: Vec<&str> = seen
        .iter()
        .map(String::as_str)
        .skip_while(|s| *s != "open")
        .collect();
    assert_eq!(
        tail,
        ["open", "half_open", "closed"],
        "transitions: {seen:?}"
    );
    let after_open: Vec<_> = double
        .requests("confirmations")
        .into_iter()
        .skip(failed)
        .collect();
    assert_eq!(
        after_open.len(),
        1,
        "one probe in half-open: {after_open:?}"
    );
    assert!(
        after_open[0].at >= opened_seen,
        "the probe came after the open window"
    );
    assert_eq!(double.confirmation_counts().get(&key), Some(&1));
    assert!(
        wait_for(Duration::from_secs(5), || async {
            status(&erp).await.queue_depth == 0
        })
        .await
    );
    let metrics = mes_common::metrics::install().render();
    assert!(metrics.contains("erp_breaker_state"), "{metrics}");

    erp.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_fields_are_dead_lettered_with_an_alarm_and_the_rest_syncs() {
    let env = TestEnv::new().await;
    let double = ErpDouble::start(support::demo_plant(), Some(TOKEN)).await;
    // The ERP's interface changed for two records.
    double.rename(
        "work_orders",
        "WO-1001",
        "planned_quantity",
        "plannedQuantity",
    );
    double.rename("lots", "STEEL-L2", "quantity", "qty");
    let erp = env.spawn_erp_sync(rest_options(&double)).await;
    erp.wait_for_successful_pulls(1).await;

    let mut letters: Vec<(String, String, String)> =
        sqlx::query_as("SELECT entity, record_key, kind FROM dead_letters")
            .fetch_all(&erp.pool)
            .await
            .unwrap();
    letters.sort();
    assert_eq!(
        letters,
        [
            ("lots".into(), "STEEL-L2".into(), "missing_field".into()),
            (
                "work_orders".into(),
                "WO-1001".into(),
                "missing_field".into()
            ),
        ]
    );
    let drift: Vec<(String, String)> = sqlx::query_as(
        "SELECT kind, field FROM contract_drift WHERE entity = 'work_orders' ORDER BY kind",
    )
    .fetch_all(&erp.pool)
    .await
    .unwrap_or_default();
    let metrics = mes_common::metrics::install().render();
    assert!(
        metrics.contains(r#"erp_contract_drift_total{entity="work_orders",kind="unknown_field"}"#)
            && metrics.contains(r#"erp_dead_letters_total{entity="lots"}"#),
        "{drift:?} {metrics}"
    );
    assert_eq!(status(&erp).await.dead_letters, 2);

    let mut si = env.scan_ingest_client();
    for wo in ["WO-1000", "WO-1002"] {
        assert!(
            si.get_work_order(pb::GetWorkOrderRequest { number: wo.into() })
                .await
                .is_ok(),
            "{wo} synced"
        );
    }
    assert!(
        si.get_lot(pb::GetLotRequest {
            lot: "STEEL-L1".into()
        })
        .await
        .is_ok()
    );
    let missing = si
        .get_work_order(pb::GetWorkOrderRequest {
            number: "WO-1001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // Once the bridge is fixed, the next pull brings the records in.
    double.clear_renames();
    erp.client()
        .trigger_pull(admin(pb::TriggerPullRequest {}))
        .await
        .unwrap();
    assert!(
        si.get_work_order(pb::GetWorkOrderRequest {
            number: "WO-1001".into()
        })
        .await
        .is_ok()
    );
    assert!(
        si.get_lot(pb::GetLotRequest {
            lot: "STEEL-L2".into()
        })
        .await
        .is_ok()
    );

    erp.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reversal_is_a_dead_letter_that_replays_once_the_bridge_takes_it() {
    let env = TestEnv::new().await;
    let double = ErpDouble::start(support::demo_plant(), Some(TOKEN)).await;
    // An older bridge: no /reversals yet.
    double.accept_reversals(false);
    let app = env.spawn_erp_sync(rest_options(&double)).await;
    app.wait_for_successful_pulls(1).await;

    let mut si = env.scan_ingest_client();
    let consume = support::Scan::new(pb::ScanKind::Consume, "WO-1000", 10, "ST-10")
        .lot("STEEL-L1")
        .quantity("25")
        .build();
    let consume_id = consume.scan_id.clone();
    let complete = support::scan(pb::ScanKind::CompleteOperation, "WO-1000", 10, "ST-10");
    let confirmation_key = format!("WO-1000:10:{}", complete.scan_id);
    support::submit_all(
        &mut si,
        vec![
            support::scan(pb::ScanKind::StartOperation, "WO-1000", 10, "ST-10"),
            consume,
            complete,
        ],
    )
    .await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            double.confirmation(&confirmation_key).is_some()
        })
        .await
    );
    let void_id = support::void_scan(&mut si, &consume_id, "wrong lot").await;
    let reversal_key = format!("reversal:{void_id}");

    // 404: permanent; the reversal is set aside where an operator sees it.
    assert!(
        wait_for(Duration::from_secs(15), || async {
            status(&app).await.dead_letters == 1
        })
        .await,
        "the refused reversal is a dead letter"
    );
    let (entity, key, reason): (String, String, String) =
        sqlx::query_as("SELECT entity, record_key, reason FROM dead_letters")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        (entity.as_str(), key.as_str()),
        ("outbox", reversal_key.as_str())
    );
    assert!(
        reason.contains("404") || reason.contains("rejected"),
        "{reason}"
    );
    assert!(double.confirmation(&reversal_key).is_none());

    // The bridge learns reversals; the replay queues it again and it is booked once.
    double.accept_reversals(true);
    let r = app
        .client()
        .replay_dead_letters(admin(pb::ReplayDeadLettersRequest {
            ids: vec![],
            all: true,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.replayed, r.still_failing), (1, 0), "{:?}", r.errors);
    assert!(
        wait_for(Duration::from_secs(15), || async {
            double.confirmation(&reversal_key).is_some()
        })
        .await,
        "the replayed reversal reached the erp"
    );
    let booked = double.confirmation(&reversal_key).unwrap();
    assert_eq!(booked["reverses"], confirmation_key.as_str());
    assert_eq!(booked["consumed_lots"][0]["quantity"], "-25");
    // The double records the booking before erp-sync hears the answer and marks the
    // outbox row done, so the queue empties a moment after.
    assert!(
        wait_for(Duration::from_secs(15), || async {
            let s = status(&app).await;
            (s.dead_letters, s.queue_depth) == (0, 0)
        })
        .await,
        "the replayed reversal leaves neither a dead letter nor a queued row"
    );
    assert_eq!(double.confirmation_counts()[&reversal_key], 1);

    app.stop().await;
    env.stop().await;
}

/// `n` produce scans of one bike each (serials `BIKE-<tag>-<i>`) on WO-1001, operation 10.
fn bikes(tag: &str, n: usize) -> Vec<pb::Scan> {
    (1..=n)
        .map(|i| {
            support::Scan::new(pb::ScanKind::Produce, "WO-1001", 10, "ST-20")
                .lot(&format!("BIKE-{tag}-{i}"))
                .material("BIKE-100")
                .quantity("1")
                .build()
        })
        .collect()
}

async fn mes_produced(env: &TestEnv, work_order: &str) -> rust_decimal::Decimal {
    env.scan_ingest_client()
        .get_work_order(pb::GetWorkOrderRequest {
            number: work_order.into(),
        })
        .await
        .expect("work order")
        .into_inner()
        .produced_quantity
        .parse()
        .expect("decimal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_booked_after_the_confirmation_reaches_the_erp_as_follow_ups() {
    let env = TestEnv::new().await;
    let double = ErpDouble::start(support::demo_plant(), Some(TOKEN)).await;
    let erp = env.spawn_erp_sync(rest_options(&double)).await;
    erp.wait_for_successful_pulls(1).await;
    let mut si = env.scan_ingest_client();

    // Operation 10 completes with 5 good: confirmed once.
    let complete = support::scan(pb::ScanKind::CompleteOperation, "WO-1001", 10, "ST-20");
    let key = format!("WO-1001:10:{}", complete.scan_id);
    let mut scans = vec![support::scan(
        pb::ScanKind::StartOperation,
        "WO-1001",
        10,
        "ST-20",
    )];
    scans.extend(bikes("A", 5));
    scans.push(complete);
    support::submit_all(&mut si, scans).await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            double.confirmation(&key).is_some()
        })
        .await,
        "the confirmation reached the erp"
    );
    assert_eq!(double.confirmation(&key).unwrap()["good_quantity"], "5");

    // A tablet delivers production late, after the operation was completed: 3 good, then 1
    // good and 4 wheels consumed; that 1 is voided afterwards.
    support::submit_all(&mut si, bikes("B", 3)).await;
    let late = bikes("C", 1).remove(0);
    let late_id = late.scan_id.clone();
    support::submit_all(
        &mut si,
        vec![
            late,
            support::Scan::new(pb::ScanKind::Consume, "WO-1001", 10, "ST-20")
                .lot("WHEEL-L1")
                .quantity("4")
                .build(),
        ],
    )
    .await;
    assert_eq!(mes_produced(&env, "WO-1001").await.to_string(), "9");
    // Voided once erp-sync has reported it in a follow-up (a void that reaches erp-sync before
    // that leaves the scan out instead; the books agree either way).
    let late_uuid = uuid::Uuid::parse_str(&late_id).unwrap();
    assert!(
        wait_for(Duration::from_secs(15), || async {
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT confirmation_key FROM production_scans WHERE scan_id = $1",
            )
            .bind(late_uuid)
            .fetch_optional(&erp.pool)
            .await
            .ok()
            .flatten()
            .flatten()
            .is_some()
        })
        .await,
        "the late scan was reported"
    );
    let void_id = support::void_scan(&mut si, &late_id, "counted twice").await;
    assert_eq!(mes_produced(&env, "WO-1001").await.to_string(), "8");

    // The erp ends with what the mes shows: 5 + 3 + 1 - 1 = 8.
    let eight: rust_decimal::Decimal = "8".parse().unwrap();
    let agreed = wait_for(Duration::from_secs(20), || async {
        double.good_quantities().get("WO-1001") == Some(&eight)
            && status(&erp).await.queue_depth == 0
    })
    .await;
    assert!(
        agreed,
        "the erp has {:?} for WO-1001, the mes 8; erp keys: {:?}",
        double.good_quantities().get("WO-1001"),
        double.confirmation_counts()
    );
    let counts = double.confirmation_counts();
    assert!(
        counts.values().all(|n| *n == 1),
        "each key once: {counts:?}"
    );
    // Follow-ups carry their own key, name the confirmation they follow and only the delta.
    let follow_ups: Vec<serde_json::Value> = counts
        .keys()
        .filter(|k| k.starts_with("WO-1001:10:followup:"))
        .map(|k| double.confirmation(k).unwrap())
        .collect();
    assert!(!follow_ups.is_empty(), "{counts:?}");
    let mut good = rust_decimal::Decimal::ZERO;
    let mut consumed = rust_decimal::Decimal::ZERO;
    for f in &follow_ups {
        assert_eq!(f["follows"], key.as_str(), "{f}");
        assert_eq!(f["operation"], 10, "{f}");
        good += f["good_quantity"]
            .as_str()
            .unwrap()
            .parse::<rust_decimal::Decimal>()
            .unwrap();
        for l in f["consumed_lots"].as_array().unwrap() {
            consumed += l["quantity"]
                .as_str()
                .unwrap()
                .parse::<rust_decimal::Decimal>()
                .unwrap();
        }
    }
    assert_eq!(
        (good.to_string(), consumed.to_string()),
        ("4".into(), "4".into())
    );
    // The void reverses the follow-up that reported the scan.
    let reversal = double
        .confirmation(&format!("reversal:{void_id}"))
        .expect("the reversal reached the erp");
    assert!(
        reversal["reverses"]
            .as_str()
            .is_some_and(|r| r.starts_with("WO-1001:10:followup:")),
        "{reversal}"
    );
    // Nothing stays unreported in erp-sync's books.
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM production_scans WHERE confirmation_key IS NULL AND NOT voided",
    )
    .fetch_one(&erp.pool)
    .await
    .unwrap();
    assert_eq!(open, 0);
    // And the reconciliation agrees.
    let r = erp
        .client()
        .reconcile(admin(pb::ReconcileRequest {}))
        .await
        .expect("reconcile")
        .into_inner();
    assert!(
        !r.details.iter().any(|d| d.key == "WO-1001"),
        "{:?}",
        r.details
    );

    erp.stop().await;
    env.stop().await;
}

fn metric(name: &str) -> Option<f64> {
    mes_common::metrics::install()
        .render()
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_the_erp_keeps_refusing_is_dead_lettered_and_blocks_only_its_work_order() {
    let env = TestEnv::new().await;
    let double = ErpDouble::start(support::demo_plant(), Some(TOKEN)).await;
    let erp = env
        .spawn_erp_sync(ErpOptions {
            retry_ms: (10, 40),
            // Threshold 1 (every failure opens the breaker; one right after a success counts):
            // the refused row's first failure counts, and its next one after the other work
            // order's confirmation went through (closing the breaker) counts too.
            max_attempts: 2,
            breaker_failure_threshold: 1,
            breaker_open_ms: 100,
            ..rest_options(&double)
        })
        .await;
    erp.wait_for_successful_pulls(1).await;

    // The erp answers 500 to every confirmation of WO-1001, forever.
    double.refuse_work_order(Some("WO-1001"));
    let poison = complete_operation(&env, "WO-1001", 10, "ST-20").await;
    let other = complete_operation(&env, "WO-1000", 10, "ST-10").await;
    assert!(
        wait_for(Duration::from_secs(20), || async {
            double.confirmation(&other).is_some()
        })
        .await,
        "another work order's confirmation reached the erp: {:?}",
        double.confirmation_counts()
    );
    let dead = wait_for(Duration::from_secs(20), || async {
        status(&erp).await.dead_letters == 1
    })
    .await;
    let rows: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT idempotency_key, status, attempts FROM outbox ORDER BY id")
            .fetch_all(&erp.pool)
            .await
            .unwrap();
    assert!(dead, "the refused confirmation is a dead letter: {rows:?}");
    let (status_of_poison, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM outbox WHERE idempotency_key = $1")
            .bind(&poison)
            .fetch_one(&erp.pool)
            .await
            .unwrap();
    assert_eq!((status_of_poison.as_str(), attempts), ("failed", 2));
    let (kind, record): (String, String) =
        sqlx::query_as("SELECT kind, record_key FROM dead_letters WHERE resolved_at IS NULL")
            .fetch_one(&erp.pool)
            .await
            .unwrap();
    assert_eq!(
        (kind.as_str(), record.as_str()),
        ("attempts_exhausted", poison.as_str())
    );

    // A later confirmation of the same work order waits behind the dead letter (held, never
    // tried), and the hold is visible.
    let later = complete_operation(&env, "WO-1001", 20, "ST-30").await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            metric("erp_outbox_held") == Some(1.0)
        })
        .await,
        "the held confirmation is counted"
    );
    let (held_status, held_attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM outbox WHERE idempotency_key = $1")
            .bind(&later)
            .fetch_one(&erp.pool)
            .await
            .unwrap();
    assert_eq!((held_status.as_str(), held_attempts), ("pending", 0));
    assert_eq!(status(&erp).await.queue_depth, 1);
    assert!(metric("erp_outbox_dead_lettered_total").is_some_and(|n| n >= 1.0));

    // The erp recovers; the replay delivers the dead letter once, then the held one.
    double.refuse_work_order(None);
    let r = erp
        .client()
        .replay_dead_letters(admin(pb::ReplayDeadLettersRequest {
            ids: vec![],
            all: true,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.replayed, r.still_failing), (1, 0), "{:?}", r.errors);
    assert!(
        wait_for(Duration::from_secs(20), || async {
            let s = status(&erp).await;
            (s.queue_depth, s.dead_letters) == (0, 0) && double.confirmation(&later).is_some()
        })
        .await,
        "{:?}",
        double.confirmation_counts()
    );
    let counts = double.confirmation_counts();
    assert_eq!(
        (counts.get(&poison), counts.get(&later), counts.get(&other)),
        (Some(&1), Some(&1), Some(&1))
    );
    let order: Vec<String> = sqlx::query_scalar(
        "SELECT idempotency_key FROM outbox WHERE work_order = 'WO-1001' ORDER BY delivered_at",
    )
    .fetch_all(&erp.pool)
    .await
    .unwrap();
    assert_eq!(order, [poison, later], "per work order, queue order");
    assert_eq!(metric("erp_outbox_held"), Some(0.0));

    erp.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_alarm_and_pause_without_burning_attempts() {
    let env = TestEnv::new().await;
    let double = ErpDouble::start(support::demo_plant(), Some(TOKEN)).await;
    let erp = env
        .spawn_erp_sync(ErpOptions {
            retry_ms: (10, 40),
            max_attempts: 2,
            // (Below max_attempts, as erp-sync requires; refused credentials feed no breaker.)
            breaker_failure_threshold: 1,
            auth_retry_ms: 300,
            ..rest_options(&double)
        })
        .await;
    erp.wait_for_successful_pulls(1).await;

    // The bridge's token was rotated and erp-sync still has the old one: 401 on every call.
    double.set_token(Some("rotated-token"));
    let started = Instant::now();
    let key = complete_operation(&env, "WO-1000", 10, "ST-10").await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            double.requests("POST").len() >= 4
        })
        .await,
        "erp-sync keeps trying, slowly"
    );
    let posts = double.requests("POST").len() as f64;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        posts <= elapsed / 0.3 + 2.0,
        "no tight loop: {posts} posts in {elapsed:.1} s"
    );
    let (row_status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM outbox WHERE idempotency_key = $1")
            .bind(&key)
            .fetch_one(&erp.pool)
            .await
            .unwrap();
    assert_eq!(
        (row_status.as_str(), attempts),
        ("pending", 0),
        "an operator problem burns no attempts and makes no dead letter"
    );
    assert_eq!(status(&erp).await.dead_letters, 0);
    assert!(metric("erp_auth_failures_total").is_some_and(|n| n >= 4.0));
    assert_eq!(metric("erp_auth_failed"), Some(1.0));

    // The operator fixes the token: delivered once, the alarm clears.
    double.set_token(Some(TOKEN));
    assert!(
        wait_for(Duration::from_secs(15), || async {
            double.confirmation(&key).is_some() && status(&erp).await.queue_depth == 0
        })
        .await
    );
    assert_eq!(double.confirmation_counts()[&key], 1);
    assert_eq!(metric("erp_auth_failed"), Some(0.0));

    erp.stop().await;
    env.stop().await;
}

/// `(status, attempts)` of the outbox row with this key.
async fn outbox_row(pool: &sqlx::PgPool, key: &str) -> (String, i32) {
    sqlx::query_as("SELECT status, attempts FROM outbox WHERE idempotency_key = $1")
        .bind(key)
        .fetch_one(pool)
        .await
        .expect("outbox row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erp_outage_far_longer_than_max_attempts_dead_letters_nothing_and_drains_exactly_once() {
    let env = TestEnv::new().await;
    let double = ErpDouble::start(support::demo_plant(), Some(TOKEN)).await;
    let max_attempts = 3;
    let erp = env
        .spawn_erp_sync(ErpOptions {
            max_attempts,
            // An outage's first failures (before the breaker opens) still count: at most
            // threshold - 1 of them, below max_attempts.
            breaker_failure_threshold: 2,
            breaker_open_ms: 50,
            retry_ms: (10, 40),
            call_timeout_ms: 500,
            ..rest_options(&double)
        })
        .await;
    erp.wait_for_successful_pulls(1).await;

    // The ERP goes down as a whole (500 to everything) while three operations of two work
    // orders complete: two heads retry, the third row waits behind its work order's first.
    double.set_fault(Fault::ServerError);
    let keys = [
        complete_operation(&env, "WO-1000", 10, "ST-10").await,
        complete_operation(&env, "WO-1001", 10, "ST-20").await,
        complete_operation(&env, "WO-1001", 20, "ST-30").await,
    ];
    // The outage lasts many times max_attempts retry cycles of each head; a dead letter ends
    // the wait at once (that is the failure this test is about).
    let cycles = 8 * max_attempts as usize;
    let outlasted = |what: &'static str, n: usize| {
        let double = double.clone();
        let erp = &erp;
        async move {
            wait_for(Duration::from_secs(30), || async {
                double.requests(what).len() >= n || status(erp).await.dead_letters > 0
            })
            .await
        }
    };
    assert!(
        outlasted("POST /erp/v1/confirmations", 2 * cycles).await,
        "erp-sync keeps retrying during the outage"
    );
    let s = status(&erp).await;
    let rows: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT idempotency_key, status, attempts FROM outbox ORDER BY id")
            .fetch_all(&erp.pool)
            .await
            .unwrap();
    assert_eq!(
        s.dead_letters,
        0,
        "an outage of {} posts made dead letters: {rows:?}",
        double.requests("POST").len()
    );
    // Then it refuses connections for a while (the bridge is gone).
    double.set_fault(Fault::Reset);
    assert!(
        outlasted("RESET POST /erp/v1/confirmations", cycles).await,
        "erp-sync keeps retrying while connections are refused"
    );
    let rows: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT idempotency_key, status, attempts FROM outbox ORDER BY id")
            .fetch_all(&erp.pool)
            .await
            .unwrap();
    assert_eq!(status(&erp).await.dead_letters, 0, "{rows:?}");
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (key, row_status, attempts) in &rows {
        assert_eq!(row_status, "pending", "{key}: {rows:?}");
        assert!(
            *attempts < max_attempts as i32,
            "{key}: the outage burnt its attempts: {rows:?}"
        );
    }
    assert!(
        double.confirmation_counts().is_empty(),
        "nothing got through"
    );

    // The ERP recovers: the queue drains, each confirmation once, nothing dead-lettered.
    double.set_fault(Fault::None);
    assert!(
        wait_for(Duration::from_secs(20), || async {
            let s = status(&erp).await;
            s.queue_depth == 0 && double.confirmation_counts().len() == keys.len()
        })
        .await,
        "the queue drained: {:?}",
        double.confirmation_counts()
    );
    let expected: BTreeMap<String, usize> = keys.iter().map(|k| (k.clone(), 1)).collect();
    assert_eq!(
        double.confirmation_counts(),
        expected,
        "each confirmation exactly once in the erp"
    );
    let s = status(&erp).await;
    assert_eq!((s.dead_letters, s.breaker.as_str()), (0, "closed"));
    let statuses: Vec<String> = sqlx::query_scalar("SELECT status FROM outbox ORDER BY id")
        .fetch_all(&erp.pool)
        .await
        .unwrap();
    assert_eq!(statuses, ["delivered", "delivered", "delivered"]);
    let order: Vec<String> = sqlx::query_scalar(
        "SELECT idempotency_key FROM outbox WHERE work_order = 'WO-1001' ORDER BY delivered_at",
    )
    .fetch_all(&erp.pool)
    .await
    .unwrap();
    assert_eq!(order, keys[1..], "per work order, queue order");

    erp.stop().await;
    env.stop().await;
}

/// The demo plant with `n` more work orders like WO-1000 (`WO-2000`, `WO-2001`, …; one
/// operation, 10, at ST-10).
fn plant_with_more_work_orders(n: usize) -> serde_json::Value {
    let mut plant = support::demo_plant();
    let orders = plant["work_orders"].as_array_mut().expect("work orders");
    let template = orders
        .iter()
        .find(|w| w["number"] == "WO-1000")
        .cloned()
        .expect("WO-1000");
    for i in 0..n {
        let mut wo = template.clone();
        wo["number"] = format!("WO-{}", 2000 + i).into();
        orders.push(wo);
    }
    plant
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_confirmation_that_opens_the_breaker_counts_again_once_other_work_orders_go_through()
 {
    let env = TestEnv::new().await;
    let double = ErpDouble::start(plant_with_more_work_orders(4), Some(TOKEN)).await;
    let erp = env
        .spawn_erp_sync(ErpOptions {
            max_attempts: 3,
            breaker_failure_threshold: 2,
            breaker_open_ms: 50,
            retry_ms: (10, 40),
            ..rest_options(&double)
        })
        .await;
    erp.wait_for_successful_pulls(1).await;

    // Alone in the queue, a confirmation the ERP keeps refusing cannot be told from an
    // outage: its first failure counts, the one that opens the breaker and the half-open
    // trials do not. It is retried at the breaker's pace and stays in the queue.
    double.refuse_work_order(Some("WO-1001"));
    let poison = complete_operation(&env, "WO-1001", 10, "ST-20").await;
    assert!(
        wait_for(Duration::from_secs(20), || async {
            double.requests("POST /erp/v1/confirmations").len() >= 10
                || status(&erp).await.dead_letters > 0
        })
        .await
    );
    assert_eq!(outbox_row(&erp.pool, &poison).await, ("pending".into(), 1));
    assert_eq!(status(&erp).await.dead_letters, 0);

    // Other work orders' confirmations go through (the breaker closes): each time, the
    // refused one's next failure counts again, until it is a dead letter.
    let mut others = Vec::new();
    for i in 0..4 {
        let attempts = outbox_row(&erp.pool, &poison).await.1;
        if attempts >= 3 {
            break;
        }
        let key = complete_operation(&env, &format!("WO-{}", 2000 + i), 10, "ST-10").await;
        assert!(
            wait_for(Duration::from_secs(20), || async {
                double.confirmation(&key).is_some()
                    && outbox_row(&erp.pool, &poison).await.1 > attempts
            })
            .await,
            "{key} delivered, then {poison} failed once more and counted: {:?}",
            outbox_row(&erp.pool, &poison).await
        );
        others.push(key);
    }
    assert!(
        wait_for(Duration::from_secs(20), || async {
            status(&erp).await.dead_letters == 1
        })
        .await
    );
    assert_eq!(outbox_row(&erp.pool, &poison).await, ("failed".into(), 3));
    assert_eq!(
        others.len(),
        2,
        "one counted failure per success in between"
    );
    let (kind, record): (String, String) =
        sqlx::query_as("SELECT kind, record_key FROM dead_letters WHERE resolved_at IS NULL")
            .fetch_one(&erp.pool)
            .await
            .unwrap();
    assert_eq!(
        (kind.as_str(), record.as_str()),
        ("attempts_exhausted", poison.as_str())
    );
    let counts = double.confirmation_counts();
    for key in &others {
        assert_eq!(counts.get(key), Some(&1), "{counts:?}");
    }
    assert!(!counts.contains_key(&poison));

    erp.stop().await;
    env.stop().await;
}

/// Follow-up keys the outbox holds for `work_order` and operation `operation`.
async fn follow_up_keys(pool: &sqlx::PgPool, prefix: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT idempotency_key FROM outbox WHERE idempotency_key LIKE $1 || '%' ORDER BY id",
    )
    .bind(prefix)
    .fetch_all(pool)
    .await
    .expect("outbox")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_production_stranded_by_an_older_build_is_followed_up_once_at_leader_start() {
    let env = TestEnv::new().await;
    let double = ErpDouble::start(support::demo_plant(), Some(TOKEN)).await;
    let erp = env.spawn_erp_sync(rest_options(&double)).await;
    erp.wait_for_successful_pulls(1).await;
    let mut si = env.scan_ingest_client();

    // Operation 10 completes with 5 good: confirmed once.
    let complete = support::scan(pb::ScanKind::CompleteOperation, "WO-1001", 10, "ST-20");
    let key = format!("WO-1001:10:{}", complete.scan_id);
    let mut scans = vec![support::scan(
        pb::ScanKind::StartOperation,
        "WO-1001",
        10,
        "ST-20",
    )];
    scans.extend(bikes("A", 5));
    scans.push(complete);
    support::submit_all(&mut si, scans).await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            double.confirmation(&key).is_some() && status(&erp).await.queue_depth == 0
        })
        .await,
        "the confirmation reached the erp"
    );
    let pool = env.erp_pool().await;
    erp.stop().await;

    // What a build before follow-ups left behind: 3 good booked late were stored with the
    // cursor that covers them and never reported (confirmation_key NULL below the cursor).
    let late = bikes("LATE", 3);
    support::submit_all(&mut si, late.clone()).await;
    let head = env.feed_head().await;
    for scan in &late {
        sqlx::query(
            "INSERT INTO production_scans (scan_id, position, work_order, operation, station, kind,
                 lot, material, quantity, operator, scanned_at)
             VALUES ($1, $2, 'WO-1001', 10, 'ST-20', 'produce', $3, 'BIKE-100', 1, 'op1', now())",
        )
        .bind(uuid::Uuid::parse_str(&scan.scan_id).unwrap())
        .bind(head)
        .bind(&scan.lot)
        .execute(&pool)
        .await
        .expect("stranded scan");
    }
    sqlx::query("UPDATE feed_cursor SET position = $1 WHERE consumer = 'erp-sync'")
        .bind(head)
        .execute(&pool)
        .await
        .expect("cursor");

    // The upgraded build, at leader start, reports them as one follow-up of the confirmation.
    let prefix = "WO-1001:10:followup:";
    let erp = env.spawn_erp_sync(rest_options(&double)).await;
    let delivered = wait_for(Duration::from_secs(15), || async {
        double
            .confirmation_counts()
            .keys()
            .any(|k| k.starts_with(prefix))
            && status(&erp).await.queue_depth == 0
    })
    .await;
    assert!(
        delivered,
        "the stranded production reached the erp: {:?}",
        double.confirmation_counts()
    );
    let keys = follow_up_keys(&pool, prefix).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let follow_up = double.confirmation(&keys[0]).expect("follow-up");
    assert_eq!(follow_up["follows"], key.as_str(), "{follow_up}");
    assert_eq!(follow_up["good_quantity"], "3", "{follow_up}");
    erp.stop().await;

    // A second restart queues nothing again; new work still flows (so the leader ran).
    let posts_before = double.requests("POST /erp/v1/confirmations").len();
    let erp = env.spawn_erp_sync(rest_options(&double)).await;
    let next = complete_operation(&env, "WO-1000", 10, "ST-10").await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            double.confirmation(&next).is_some() && status(&erp).await.queue_depth == 0
        })
        .await,
        "the next confirmation reached the erp"
    );
    assert_eq!(follow_up_keys(&pool, prefix).await, keys);
    assert_eq!(
        double.requests("POST /erp/v1/confirmations").len(),
        posts_before + 1,
        "only the new confirmation was posted"
    );
    let counts = double.confirmation_counts();
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM production_scans WHERE confirmation_key IS NULL AND NOT voided",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(open, 0);

    pool.close().await;
    erp.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erp_shedding_load_with_429_and_503_dead_letters_nothing_and_its_retry_after_is_honoured()
 {
    let env = TestEnv::new().await;
    let orders = 10;
    let double = ErpDouble::start(plant_with_more_work_orders(orders), Some(TOKEN)).await;
    let max_attempts = 4;
    let erp = env
        .spawn_erp_sync(ErpOptions {
            max_attempts,
            // Two refusals in a row at most: the breaker stays closed (the ERP takes traffic).
            breaker_failure_threshold: 3,
            retry_ms: (10, 2_000),
            ..rest_options(&double)
        })
        .await;
    erp.wait_for_successful_pulls(1).await;

    // The ERP takes one post in three; the others get 429 or 503, each with Retry-After: 1.
    double.set_fault(Fault::Throttle(3));
    let mut keys = Vec::new();
    for i in 0..orders {
        keys.push(complete_operation(&env, &format!("WO-{}", 2000 + i), 10, "ST-10").await);
    }
    let done = wait_for(Duration::from_secs(60), || async {
        let s = status(&erp).await;
        s.dead_letters > 0 || double.confirmation_counts().len() == keys.len()
    })
    .await;
    let rows: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT idempotency_key, status, attempts FROM outbox ORDER BY id")
            .fetch_all(&erp.pool)
            .await
            .unwrap();
    assert!(done, "the queue drained under throttling: {rows:?}");
    assert_eq!(status(&erp).await.dead_letters, 0, "dead letters: {rows:?}");
    // Once it stops throttling, everything is delivered exactly once.
    double.set_fault(Fault::None);
    assert!(
        wait_for(Duration::from_secs(20), || async {
            status(&erp).await.queue_depth == 0
        })
        .await
    );
    let expected: BTreeMap<String, usize> = keys.iter().map(|k| (k.clone(), 1)).collect();
    assert_eq!(double.confirmation_counts(), expected);
    assert!(
        double.requests("POST /erp/v1/confirmations").len() > keys.len(),
        "the erp refused some posts"
    );
    // Each retry of a row waited for the Retry-After (1 s) it was given.
    for (key, at) in double.posts() {
        for pair in at.windows(2) {
            let waited = pair[1] - pair[0];
            assert!(
                waited >= Duration::from_millis(950),
                "{key} was retried after {waited:?}, before its Retry-After of 1 s"
            );
        }
    }

    erp.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_saying_the_key_is_still_in_progress_is_retried_not_taken_as_delivered() {
    let env = TestEnv::new().await;
    let double = ErpDouble::start(support::demo_plant(), Some(TOKEN)).await;
    let erp = env
        .spawn_erp_sync(ErpOptions {
            retry_ms: (10, 40),
            ..rest_options(&double)
        })
        .await;
    erp.wait_for_successful_pulls(1).await;

    // The bridge is still working on the key (IETF Idempotency-Key draft: 409), twice; then
    // it books it (200).
    double.answer_in_progress(2);
    let key = complete_operation(&env, "WO-1000", 10, "ST-10").await;
    let delivered = wait_for(Duration::from_secs(15), || async {
        double.confirmation(&key).is_some() && status(&erp).await.queue_depth == 0
    })
    .await;
    let row = outbox_row(&erp.pool, &key).await;
    assert!(
        delivered,
        "the confirmation reached the erp after the 409s (outbox row {row:?}, erp {:?})",
        double.confirmation_counts()
    );
    assert_eq!(double.posts()[&key].len(), 3, "two 409s, then booked");
    assert_eq!(row.0, "delivered");
    assert_eq!(double.confirmation_counts()[&key], 1);
    // A 409 saying the key is booked already is done: a repost finds nothing to do.
    let s = status(&erp).await;
    assert_eq!(s.dead_letters, 0);

    erp.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_call_timed_out_is_retried_no_sooner_than_retry_after_timeout() {
    let env = TestEnv::new().await;
    let double = ErpDouble::start(support::demo_plant(), Some(TOKEN)).await;
    let wait_ms = 2_000;
    let erp = env
        .spawn_erp_sync(ErpOptions {
            retry_ms: (10, 40),
            call_timeout_ms: 300,
            retry_after_timeout_ms: wait_ms,
            ..rest_options(&double)
        })
        .await;
    erp.wait_for_successful_pulls(1).await;

    // The ERP books the confirmation but answers after erp-sync gave up on the call (as if it
    // were still working on it): the retry must leave it time to commit first.
    double.set_fault(Fault::Slow(Duration::from_millis(800)));
    let key = complete_operation(&env, "WO-1000", 10, "ST-10").await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            double.posts().get(&key).is_some_and(|p| !p.is_empty())
        })
        .await,
        "the confirmation was posted"
    );
    double.set_fault(Fault::None);
    assert!(
        wait_for(Duration::from_secs(15), || async {
            status(&erp).await.queue_depth == 0
        })
        .await,
        "the retry delivered it"
    );
    let posts = double.posts()[&key].clone();
    assert!(posts.len() >= 2, "a timeout, then a retry: {posts:?}");
    let waited = posts[1] - posts[0];
    assert!(
        waited >= Duration::from_millis(wait_ms),
        "retried {waited:?} after a timed-out call, before erp.retry_after_timeout_ms ({wait_ms} ms)"
    );
    assert_eq!(double.confirmation_counts()[&key], 1);
    assert_eq!(outbox_row(&erp.pool, &key).await.0, "delivered");

    erp.stop().await;
    env.stop().await;
}
