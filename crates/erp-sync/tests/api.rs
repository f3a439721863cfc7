//! Black-box tests of erp-sync: each starts a real scan-ingest and one or more erp-sync
//! instances in-process on :0, against fresh databases that are dropped at the end.

mod support;

use std::time::Duration;

use mes_proto::v1 as pb;
use serde_json::{Value, json};
use support::{ErpOptions, TestEnv, admin, operator, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_plant_lands_in_scan_ingest_and_a_second_pull_changes_nothing() {
    let env = TestEnv::new().await;
    let erp = env.spawn_erp_sync(ErpOptions::default()).await;
    erp.wait_for_successful_pulls(1).await;
    support::assert_serving_with_reflection(&erp).await;

    let mut si = env.scan_ingest_client();
    let wo = si
        .get_work_order(pb::GetWorkOrderRequest {
            number: "WO-1001".into(),
        })
        .await
        .expect("WO-1001 upserted")
        .into_inner();
    assert_eq!(wo.operations.len(), 2);
    assert_eq!(wo.components.len(), 3);
    assert_eq!(wo.material, "BIKE-100");
    let lot = si
        .get_lot(pb::GetLotRequest {
            lot: "STEEL-L1".into(),
        })
        .await
        .expect("STEEL-L1 upserted")
        .into_inner();
    assert_eq!(lot.origin.as_ref().unwrap().supplier_lot, "AS-7781");
    assert_eq!(lot.quantity_on_hand, "100");
    let cancelled = si
        .get_work_order(pb::GetWorkOrderRequest {
            number: "WO-1002".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.status, "cancelled");

    // The second pull: every record is reported unchanged by scan-ingest.
    let mut client = erp.client();
    let r = client
        .trigger_pull(admin(pb::TriggerPullRequest {}))
        .await
        .expect("admin may trigger a pull")
        .into_inner();
    assert!(r.started);
    assert_eq!(r.upserted, 0);
    let (created, updated, unchanged, rejected): (i32, i32, i32, i32) = sqlx::query_as(
        "SELECT created, updated, unchanged, rejected FROM pull_runs
         WHERE trigger = 'manual' AND status = 'succeeded' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&erp.pool)
    .await
    .unwrap();
    assert_eq!((created, updated, unchanged, rejected), (0, 0, 15, 0));

    let status = client
        .get_status(pb::GetErpStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.adapter, "file");
    let mut entities: Vec<&String> = status.last_pull.keys().collect();
    entities.sort();
    assert_eq!(entities, ["lots", "materials", "stations", "work_orders"]);
    assert_eq!(status.breaker, "closed");
    assert_eq!(status.dead_letters, 0);
    assert_eq!(status.queue_depth, 0);
    assert_eq!(status.erp_reachable, "up");

    erp.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drifted_records_go_to_dead_letters_while_the_rest_syncs() {
    let env = TestEnv::new().await;
    let mut plant = support::demo_plant();
    // A work order without its material, a lot whose quantity is a JSON number, an unknown
    // field, and a well-formed work order that scan-ingest refuses (unknown material).
    plant["work_orders"][1]
        .as_object_mut()
        .unwrap()
        .remove("material");
    plant["lots"][1]["quantity"] = json!(100);
    plant["materials"][0]["colour"] = json!("grey");
    plant["work_orders"].as_array_mut().unwrap().push(json!({
        "number": "WO-1900", "material": "NO-SUCH-MATERIAL", "planned_quantity": "1",
        "status": "released", "operations": [{"step": 10, "station": "ST-10"}], "components": []
    }));
    let plant_file = env.write_file("plant.json", &plant);
    let erp = env
        .spawn_erp_sync(ErpOptions {
            plant_file: Some(plant_file),
            ..Default::default()
        })
        .await;
    erp.wait_for_successful_pulls(1).await;

    let mut dead: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT entity, record_key, kind, reason FROM dead_letters ORDER BY entity, record_key",
    )
    .fetch_all(&erp.pool)
    .await
    .unwrap();
    dead.sort();
    let summary: Vec<(&str, &str, &str)> = dead
        .iter()
        .map(|(e, k, kind, _)| (e.as_str(), k.as_str(), kind.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("lots", "STEEL-L2", "wrong_type"),
            ("work_orders", "WO-1001", "missing_field"),
            ("work_orders", "WO-1900", "rejected_by_mes"),
        ]
    );
    assert!(dead[0].3.contains("quantity"), "{}", dead[0].3);
    assert!(dead[1].3.contains("material"), "{}", dead[1].3);
    let payload: Value =
        sqlx::query_scalar("SELECT payload FROM dead_letters WHERE record_key = 'STEEL-L2'")
            .fetch_one(&erp.pool)
            .await
            .unwrap();
    assert_eq!(
        payload["quantity"],
        json!(100),
        "the payload is kept as received"
    );

    // The unknown field is noted without rejecting its record.
    let noted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM contract_drift
         WHERE entity = 'materials' AND kind = 'unknown_field' AND field = 'colour'",
    )
    .fetch_one(&erp.pool)
    .await
    .unwrap();
    assert_eq!(noted, 1);
    let metrics = mes_common::metrics::install().render();
    assert!(
        metrics.contains(r#"erp_contract_drift_total{entity="work_orders",kind="missing_field"}"#),
        "{metrics}"
    );

    // Everything else synced.
    let mut si = env.scan_ingest_client();
    assert!(
        si.get_work_order(pb::GetWorkOrderRequest {
            number: "WO-1000".into()
        })
        .await
        .is_ok()
    );
    assert!(
        si.get_lot(pb::GetLotRequest {
            lot: "STEEL-L1".into()
        })
        .await
        .is_ok()
    );
    // (STEEL-L1 needs STEEL-500, the material with the unknown field: it synced too.)
    for missing in ["WO-1001", "WO-1900"] {
        let err = si
            .get_work_order(pb::GetWorkOrderRequest {
                number: missing.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{missing}");
    }
    let err = si
        .get_lot(pb::GetLotRequest {
            lot: "STEEL-L2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // A later pull sees the same bad records again: counted, not duplicated.
    erp.client()
        .trigger_pull(admin(pb::TriggerPullRequest {}))
        .await
        .unwrap();
    let (rows, occurrences): (i64, i64) =
        sqlx::query_as("SELECT count(*), sum(occurrences)::bigint FROM dead_letters")
            .fetch_one(&erp.pool)
            .await
            .unwrap();
    assert_eq!((rows, occurrences), (3, 6));
    let status = erp
        .client()
        .get_status(pb::GetErpStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.dead_letters, 3);

    erp.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_pull_needs_the_admin_role() {
    let env = TestEnv::new().await;
    let erp = env.spawn_erp_sync(ErpOptions::default()).await;
    let mut client = erp.client();
    let err = client
        .trigger_pull(operator(pb::TriggerPullRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = client
        .trigger_pull(pb::TriggerPullRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let manual: i64 = sqlx::query_scalar("SELECT count(*) FROM pull_runs WHERE trigger = 'manual'")
        .fetch_one(&erp.pool)
        .await
        .unwrap();
    assert_eq!(manual, 0, "a refused trigger starts nothing");
    assert!(
        client
            .trigger_pull(admin(pb::TriggerPullRequest {}))
            .await
            .unwrap()
            .into_inner()
            .started
    );
    erp.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_instances_only_one_runs_the_scheduled_pull() {
    let env = TestEnv::new().await;
    let options = ErpOptions {
        pull_interval_seconds: 1,
        ..Default::default()
    };
    let a = env.spawn_erp_sync(options.clone()).await;
    let b = env.spawn_erp_sync(options.clone()).await;
    // The lock is taken on a timer and the pulls run every second: wait (both instances
    // running meanwhile) until the scheduler has run three pulls, rather than for a fixed time.
    let ran = wait_for(Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COALESCE(max(n), 0) FROM (SELECT count(*) AS n FROM pull_runs
             WHERE trigger IN ('startup', 'scheduled') GROUP BY instance) r",
        )
        .fetch_one(&a.pool)
        .await
        .unwrap_or(0)
            >= 3
    })
    .await;
    assert!(ran, "no scheduler ran three pulls within 20 s");

    let runners: Vec<(String, i64)> = sqlx::query_as(
        "SELECT instance, count(*) FROM pull_runs WHERE trigger IN ('startup', 'scheduled')
         GROUP BY instance",
    )
    .fetch_all(&a.pool)
    .await
    .unwrap();
    assert_eq!(runners.len(), 1, "one scheduler at a time: {runners:?}");
    let (leader, runs) = runners[0].clone();
    assert!(
        runs >= 3,
        "startup and scheduled pulls every second: {runs}"
    );
    assert!(leader == a.instance || leader == b.instance);

    // When the scheduler stops, the other instance takes over.
    let (gone, stays) = if leader == a.instance { (a, b) } else { (b, a) };
    gone.stop().await;
    let took_over = wait_for(Duration::from_secs(10), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pull_runs WHERE instance = $1 AND status = 'succeeded'",
        )
        .bind(&stays.instance)
        .fetch_one(&stays.pool)
        .await
        .unwrap_or(0);
        n >= 2
    })
    .await;
    assert!(took_over, "the second instance took over the schedule");
    stays.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_operation_is_confirmed_once_in_the_erp_across_restarts() {
    let env = TestEnv::new().await;
    let outbox_file = env.path("erp/confirmations.jsonl");
    let options = ErpOptions {
        outbox_file: Some(outbox_file.clone()),
        ..Default::default()
    };
    let first = env.spawn_erp_sync(options.clone()).await;
    first.wait_for_successful_pulls(1).await;

    let mut si = env.scan_ingest_client();
    let scans = vec![
        support::scan(pb::ScanKind::StartOperation, "WO-1000", 10, "ST-10"),
        support::Scan::new(pb::ScanKind::Consume, "WO-1000", 10, "ST-10")
            .lot("STEEL-L1")
            .quantity("25")
            .build(),
        support::Scan::new(pb::ScanKind::Produce, "WO-1000", 10, "ST-10")
            .lot("FRAME-L1")
            .material("FRAME-200")
            .quantity("10")
            .build(),
    ];
    support::submit_all(&mut si, scans).await;
    // erp-sync has seen the production scans...
    assert!(
        wait_for(Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM production_scans")
                .fetch_one(&first.pool)
                .await
                .unwrap_or(0)
                == 2
        })
        .await
    );
    // ...and stops before the operation completes.
    first.stop().await;
    let complete = support::scan(pb::ScanKind::CompleteOperation, "WO-1000", 10, "ST-10");
    let complete_id = complete.scan_id.clone();
    support::submit_all(&mut si, vec![complete]).await;

    let second = env.spawn_erp_sync(options.clone()).await;
    let key = format!("WO-1000:10:{complete_id}");
    assert!(
        wait_for(Duration::from_secs(15), || async {
            support::lines_with_key(&outbox_file, &key).len() == 1
        })
        .await,
        "the confirmation reached the erp"
    );
    let line = support::lines_with_key(&outbox_file, &key).remove(0);
    assert_eq!(line["type"], "production_confirmation");
    assert_eq!(line["work_order"], "WO-1000");
    assert_eq!(line["operation"], 10);
    assert_eq!(line["good_quantity"], "10");
    assert_eq!(line["scrap_quantity"], "0");
    assert_eq!(
        line["consumed_lots"],
        json!([{"lot": "STEEL-L1", "material": "STEEL-500", "quantity": "25"}])
    );
    assert_eq!(
        line["produced_lots"],
        json!([{"lot": "FRAME-L1", "material": "FRAME-200", "quantity": "10"}])
    );
    assert_eq!(line["completed_by"], "op1");

    // A crash between the post and its bookkeeping, and a full replay of the feed: the
    // confirmation is posted again, and the erp still has it once.
    assert!(
        wait_for(Duration::from_secs(5), || async {
            sqlx::query_scalar::<_, String>("SELECT status FROM outbox")
                .fetch_one(&second.pool)
                .await
                .is_ok_and(|s| s == "delivered")
        })
        .await
    );
    second.stop().await;
    // Where the feed was: the replay below must get at least this far before counting.
    let replayed_to: i64 =
        sqlx::query_scalar("SELECT position FROM feed_cursor WHERE consumer = 'erp-sync'")
            .fetch_one(&env.erp_pool().await)
            .await
            .unwrap();
    sqlx::query("UPDATE outbox SET status = 'pending', delivered_at = NULL")
        .execute(&env.erp_pool().await)
        .await
        .unwrap();
    sqlx::query("UPDATE feed_cursor SET position = 0")
        .execute(&env.erp_pool().await)
        .await
        .unwrap();
    let third = env.spawn_erp_sync(options).await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            let (pending, cursor): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM outbox WHERE status <> 'delivered'),
                        (SELECT position FROM feed_cursor WHERE consumer = 'erp-sync')",
            )
            .fetch_one(&third.pool)
            .await
            .unwrap_or((1, 0));
            // The replayed feed went past the completion again (not just started).
            pending == 0 && cursor >= replayed_to
        })
        .await
    );
    let outbox_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&third.pool)
        .await
        .unwrap();
    assert_eq!(outbox_rows, 1, "a replayed feed queues nothing twice");
    assert_eq!(support::lines_with_key(&outbox_file, &key).len(), 1);
    assert_eq!(support::all_lines(&outbox_file).len(), 1);
    let delivered_again: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE status = 'delivered' AND attempts = 2",
    )
    .fetch_one(&third.pool)
    .await
    .unwrap();
    assert_eq!(delivered_again, 1);

    third.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erp_outage_opens_the_breaker_and_the_queue_drains_when_it_returns() {
    let env = TestEnv::new().await;
    // The "ERP" is down: the outbox file's directory cannot be created (a file is in the way).
    let blocker = env.path("down");
    std::fs::write(&blocker, "not a directory").unwrap();
    let outbox_file = blocker.join("confirmations.jsonl");
    let erp = env
        .spawn_erp_sync(ErpOptions {
            outbox_file: Some(outbox_file.clone()),
            breaker_failure_threshold: 2,
            breaker_open_ms: 300,
            retry_ms: (20, 100),
            ..Default::default()
        })
        .await;
    erp.wait_for_successful_pulls(1).await;
    let mut si = env.scan_ingest_client();
    let complete = support::scan(pb::ScanKind::CompleteOperation, "WO-1000", 10, "ST-10");
    let key = format!("WO-1000:10:{}", complete.scan_id);
    support::submit_all(
        &mut si,
        vec![
            support::scan(pb::ScanKind::StartOperation, "WO-1000", 10, "ST-10"),
            complete,
        ],
    )
    .await;

    let mut client = erp.client();
    let mut seen_open = false;
    for _ in 0..300 {
        let s = client
            .get_status(pb::GetErpStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        // GetStatus reads the queue, then the breaker (not one snapshot): with 20 ms retries the
        // confirmation can be queued and fail twice between the two reads, so wait for a
        // status that shows both.
        if s.breaker == "open" && s.queue_depth == 1 {
            seen_open = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        seen_open,
        "failed posts open the breaker while the confirmation stays queued"
    );
    let (attempts, last_error): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM outbox")
            .fetch_one(&erp.pool)
            .await
            .unwrap();
    // Threshold 2: the first failure counts; the one that opened the breaker and the
    // half-open trials are the outage's and count none.
    assert_eq!(attempts, 1, "an outage burns no attempts");
    assert!(last_error.contains("unavailable"), "{last_error}");
    let metrics = mes_common::metrics::install().render();
    assert!(metrics.contains("erp_breaker_state"), "{metrics}");
    assert!(metrics.contains("erp_outbox_depth"), "{metrics}");

    // The ERP comes back: the queue drains, once.
    std::fs::remove_file(&blocker).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || async {
            support::lines_with_key(&outbox_file, &key).len() == 1
        })
        .await
    );
    assert!(
        wait_for(Duration::from_secs(5), || async {
            let s = erp
                .client()
                .get_status(pb::GetErpStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            s.breaker == "closed" && s.queue_depth == 0
        })
        .await
    );
    assert_eq!(support::all_lines(&outbox_file).len(), 1);

    erp.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_reports_production_the_erp_has_not_seen_yet() {
    let env = TestEnv::new().await;
    let outbox_file = env.path("confirmations.jsonl");
    let erp = env
        .spawn_erp_sync(ErpOptions {
            outbox_file: Some(outbox_file.clone()),
            ..Default::default()
        })
        .await;
    erp.wait_for_successful_pulls(1).await;
    let mut client = erp.client();
    let err = client
        .reconcile(operator(pb::ReconcileRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let clean = client
        .reconcile(admin(pb::ReconcileRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(clean.differences, 0, "{:?}", clean.details);

    let mut si = env.scan_ingest_client();
    support::submit_all(
        &mut si,
        vec![
            support::scan(pb::ScanKind::StartOperation, "WO-1000", 10, "ST-10"),
            support::Scan::new(pb::ScanKind::Consume, "WO-1000", 10, "ST-10")
                .lot("STEEL-L1")
                .quantity("25")
                .build(),
            support::Scan::new(pb::ScanKind::Produce, "WO-1000", 10, "ST-10")
                .lot("FRAME-L1")
                .quantity("10")
                .build(),
        ],
    )
    .await;
    // Produced and consumed in the MES, not confirmed to the ERP yet.
    let open = client
        .reconcile(admin(pb::ReconcileRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut details: Vec<(String, String, String, String)> = open
        .details
        .iter()
        .map(|d| {
            (
                d.entity.clone(),
                d.key.clone(),
                d.mes_quantity.clone(),
                d.erp_quantity.clone(),
            )
        })
        .collect();
    details.sort();
    assert_eq!(
        details,
        [
            ("lot".into(), "STEEL-L1".into(), "75".into(), "100".into()),
            (
                "work_order".into(),
                "WO-1000".into(),
                "10".into(),
                "0".into()
            ),
        ]
    );

    // Once the operation is confirmed to the ERP, the books agree.
    support::submit_all(
        &mut si,
        vec![support::scan(
            pb::ScanKind::CompleteOperation,
            "WO-1000",
            10,
            "ST-10",
        )],
    )
    .await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            !support::all_lines(&outbox_file).is_empty()
        })
        .await
    );
    let agreed = client
        .reconcile(admin(pb::ReconcileRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agreed.differences, 0, "{:?}", agreed.details);
    let status = client
        .get_status(pb::GetErpStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let last = status.last_reconciliation.expect("last reconciliation");
    assert_eq!(last.differences, 0);
    assert_eq!(last.at, agreed.at);

    erp.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_void_after_the_confirmation_is_reversed_once_across_restarts() {
    let env = TestEnv::new().await;
    let outbox_file = env.path("erp/confirmations.jsonl");
    let options = ErpOptions {
        outbox_file: Some(outbox_file.clone()),
        ..Default::default()
    };
    let first = env.spawn_erp_sync(options.clone()).await;
    first.wait_for_successful_pulls(1).await;

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
            support::Scan::new(pb::ScanKind::Produce, "WO-1000", 10, "ST-10")
                .lot("FRAME-L1")
                .material("FRAME-200")
                .quantity("10")
                .build(),
            complete,
        ],
    )
    .await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            support::lines_with_key(&outbox_file, &confirmation_key).len() == 1
        })
        .await,
        "the confirmation reached the erp"
    );

    // The consume is voided after it was confirmed: the erp gets a reversal.
    let void_id = support::void_scan(&mut si, &consume_id, "wrong lot scanned").await;
    let reversal_key = format!("reversal:{void_id}");
    assert!(
        wait_for(Duration::from_secs(15), || async {
            support::lines_with_key(&outbox_file, &reversal_key).len() == 1
        })
        .await,
        "the reversal reached the erp"
    );
    let line = support::lines_with_key(&outbox_file, &reversal_key).remove(0);
    assert_eq!(line["type"], "production_reversal");
    assert_eq!(line["work_order"], "WO-1000");
    assert_eq!(line["operation"], 10);
    assert_eq!(line["reverses"], confirmation_key.as_str());
    assert_eq!(line["voided_scan"], consume_id.as_str());
    assert_eq!(line["voided_kind"], "consume");
    assert_eq!(line["voided_by"], "sup1");
    assert_eq!(line["reason"], "wrong lot scanned");
    assert_eq!(line["good_quantity"], "0");
    assert_eq!(
        line["consumed_lots"],
        json!([{"lot": "STEEL-L1", "material": "STEEL-500", "quantity": "-25"}])
    );
    assert_eq!(line["produced_lots"], json!([]));
    let metrics = mes_common::metrics::install().render();
    assert!(metrics.contains("erp_reversals_total"), "{metrics}");
    // The erp's books follow: the lot is back to its received quantity.
    let agreed = first
        .client()
        .reconcile(admin(pb::ReconcileRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agreed.differences, 0, "{:?}", agreed.details);

    // A crash before the bookkeeping and a full replay of the feed: still one reversal.
    assert!(
        wait_for(Duration::from_secs(5), || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM outbox WHERE status = 'delivered' AND kind = 'reversal'",
            )
            .fetch_one(&first.pool)
            .await
            .unwrap_or(0)
                == 1
        })
        .await
    );
    first.stop().await;
    let pool = env.erp_pool().await;
    // Where the feed was: the replay below must get at least this far before counting.
    let replayed_to: i64 =
        sqlx::query_scalar("SELECT position FROM feed_cursor WHERE consumer = 'erp-sync'")
            .fetch_one(&pool)
            .await
            .unwrap();
    sqlx::query(
        "UPDATE outbox SET status = 'pending', delivered_at = NULL WHERE kind = 'reversal'",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE feed_cursor SET position = 0")
        .execute(&pool)
        .await
        .unwrap();
    let second = env.spawn_erp_sync(options).await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            let (pending, cursor): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM outbox WHERE status <> 'delivered'),
                        (SELECT position FROM feed_cursor WHERE consumer = 'erp-sync')",
            )
            .fetch_one(&second.pool)
            .await
            .unwrap_or((1, 0));
            // The replayed feed went past the void again (not just started).
            pending == 0 && cursor >= replayed_to
        })
        .await
    );
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT kind, idempotency_key FROM outbox ORDER BY id")
            .fetch_all(&second.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            ("confirmation".to_owned(), confirmation_key.clone()),
            ("reversal".to_owned(), reversal_key.clone()),
        ]
    );
    assert_eq!(
        support::lines_with_key(&outbox_file, &reversal_key).len(),
        1
    );
    assert_eq!(support::all_lines(&outbox_file).len(), 2);

    second.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_void_before_completion_is_left_out_of_the_confirmation_and_not_reversed() {
    let env = TestEnv::new().await;
    let outbox_file = env.path("confirmations.jsonl");
    let erp = env
        .spawn_erp_sync(ErpOptions {
            outbox_file: Some(outbox_file.clone()),
            ..Default::default()
        })
        .await;
    erp.wait_for_successful_pulls(1).await;

    let mut si = env.scan_ingest_client();
    let scrap = support::Scan::new(pb::ScanKind::Scrap, "WO-1000", 10, "ST-10")
        .lot("STEEL-L1")
        .quantity("5")
        .defect("D-01")
        .build();
    let scrap_id = scrap.scan_id.clone();
    support::submit_all(
        &mut si,
        vec![
            support::scan(pb::ScanKind::StartOperation, "WO-1000", 10, "ST-10"),
            support::Scan::new(pb::ScanKind::Consume, "WO-1000", 10, "ST-10")
                .lot("STEEL-L1")
                .quantity("25")
                .build(),
            scrap,
        ],
    )
    .await;
    support::void_scan(&mut si, &scrap_id, "scrapped the wrong lot").await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, bool>("SELECT voided FROM production_scans WHERE scan_id = $1")
                .bind(uuid::Uuid::parse_str(&scrap_id).unwrap())
                .fetch_one(&erp.pool)
                .await
                .unwrap_or(false)
        })
        .await,
        "erp-sync saw the void"
    );
    let complete = support::scan(pb::ScanKind::CompleteOperation, "WO-1000", 10, "ST-10");
    let key = format!("WO-1000:10:{}", complete.scan_id);
    support::submit_all(&mut si, vec![complete]).await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            support::lines_with_key(&outbox_file, &key).len() == 1
        })
        .await
    );
    let line = support::lines_with_key(&outbox_file, &key).remove(0);
    assert_eq!(line["scrap_quantity"], "0");
    assert_eq!(line["scrapped_lots"], json!([]));
    assert_eq!(
        line["consumed_lots"],
        json!([{"lot": "STEEL-L1", "material": "STEEL-500", "quantity": "25"}])
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reversals: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE kind = 'reversal'")
        .fetch_one(&erp.pool)
        .await
        .unwrap();
    assert_eq!(reversals, 0);
    assert_eq!(support::all_lines(&outbox_file).len(), 1);

    erp.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_dead_letter_is_replayed_once_and_kept_as_history() {
    let env = TestEnv::new().await;
    let mut plant = support::demo_plant();
    plant["work_orders"][1]
        .as_object_mut()
        .unwrap()
        .remove("material");
    let plant_file = env.write_file("plant.json", &plant);
    let erp = env
        .spawn_erp_sync(ErpOptions {
            plant_file: Some(plant_file),
            ..Default::default()
        })
        .await;
    erp.wait_for_successful_pulls(1).await;
    let mut client = erp.client();
    let status = client
        .get_status(pb::GetErpStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.dead_letters, 1);
    let id: i64 = sqlx::query_scalar("SELECT id FROM dead_letters WHERE record_key = 'WO-1001'")
        .fetch_one(&erp.pool)
        .await
        .unwrap();

    // Admins only; something must be named.
    let err = client
        .replay_dead_letters(operator(pb::ReplayDeadLettersRequest {
            ids: vec![],
            all: true,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = client
        .replay_dead_letters(admin(pb::ReplayDeadLettersRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Still broken in the erp: the replay fails and the dead letter stays.
    let r = client
        .replay_dead_letters(admin(pb::ReplayDeadLettersRequest {
            ids: vec![id],
            all: false,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.replayed, r.still_failing), (0, 1));
    assert!(r.errors[0].contains("material"), "{:?}", r.errors);

    // The erp's record is fixed: the replay upserts it into scan-ingest.
    env.write_file("plant.json", &support::demo_plant());
    let r = client
        .replay_dead_letters(admin(pb::ReplayDeadLettersRequest {
            ids: vec![],
            all: true,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.replayed, r.still_failing), (1, 0), "{:?}", r.errors);
    let wo = env
        .scan_ingest_client()
        .get_work_order(pb::GetWorkOrderRequest {
            number: "WO-1001".into(),
        })
        .await
        .expect("WO-1001 reached scan-ingest")
        .into_inner();
    assert_eq!(wo.material, "BIKE-100");
    let status = client
        .get_status(pb::GetErpStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.dead_letters, 0);
    let (rows, resolved_by): (i64, String) = sqlx::query_as(
        "SELECT count(*), max(resolved_by) FROM dead_letters WHERE resolved_at IS NOT NULL",
    )
    .fetch_one(&erp.pool)
    .await
    .unwrap();
    assert_eq!(
        (rows, resolved_by.as_str()),
        (1, "admin"),
        "kept as history"
    );

    // A second replay changes nothing.
    let r = client
        .replay_dead_letters(admin(pb::ReplayDeadLettersRequest {
            ids: vec![],
            all: true,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.replayed, r.still_failing), (0, 0));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let r = client
        .replay_dead_letters(admin(pb::ReplayDeadLettersRequest {
            ids: vec![id],
            all: false,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.replayed, r.still_failing), (0, 0));
    assert!(r.errors[0].contains("resolved already"), "{:?}", r.errors);
    let resolved_at_unchanged: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE resolved_at IS NOT NULL")
            .fetch_one(&erp.pool)
            .await
            .unwrap();
    assert_eq!(resolved_at_unchanged, 1);

    erp.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_production_is_a_follow_up_in_the_file_and_a_replayed_feed_adds_nothing() {
    let env = TestEnv::new().await;
    let outbox_file = env.path("erp/confirmations.jsonl");
    let options = ErpOptions {
        outbox_file: Some(outbox_file.clone()),
        ..Default::default()
    };
    let first = env.spawn_erp_sync(options.clone()).await;
    first.wait_for_successful_pulls(1).await;
    let mut si = env.scan_ingest_client();
    let bike = |serial: &str| {
        support::Scan::new(pb::ScanKind::Produce, "WO-1001", 10, "ST-20")
            .lot(serial)
            .material("BIKE-100")
            .quantity("1")
            .build()
    };
    let wheels = |q: &str| {
        support::Scan::new(pb::ScanKind::Consume, "WO-1001", 10, "ST-20")
            .lot("WHEEL-L1")
            .quantity(q)
            .build()
    };
    let complete = support::scan(pb::ScanKind::CompleteOperation, "WO-1001", 10, "ST-20");
    let key = format!("WO-1001:10:{}", complete.scan_id);
    support::submit_all(
        &mut si,
        vec![
            support::scan(pb::ScanKind::StartOperation, "WO-1001", 10, "ST-20"),
            wheels("10"),
            bike("BIKE-1"),
            bike("BIKE-2"),
            complete,
        ],
    )
    .await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            support::lines_with_key(&outbox_file, &key).len() == 1
        })
        .await
    );
    // Late: 3 more bikes and their wheels, after the operation was completed.
    let late = bike("BIKE-3");
    let follow_up_key = format!("WO-1001:10:followup:{}", late.scan_id);
    support::submit_all(
        &mut si,
        vec![late, bike("BIKE-4"), bike("BIKE-5"), wheels("6")],
    )
    .await;
    let booked = wait_for(Duration::from_secs(15), || async {
        !all_follow_ups(&outbox_file).is_empty()
            && all_follow_ups(&outbox_file)
                .iter()
                .map(|l| {
                    l["good_quantity"]
                        .as_str()
                        .unwrap_or("0")
                        .parse::<f64>()
                        .unwrap()
                })
                .sum::<f64>()
                == 3.0
    })
    .await;
    assert!(booked, "{:?}", support::all_lines(&outbox_file));
    let line = support::lines_with_key(&outbox_file, &follow_up_key).remove(0);
    assert_eq!(line["type"], "production_confirmation");
    assert_eq!(line["follows"], key.as_str());
    assert_eq!(line["good_quantity"], "3");
    let agreed = first
        .client()
        .reconcile(admin(pb::ReconcileRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agreed.differences, 0, "{:?}", agreed.details);

    // The whole feed is replayed from the start (a restored cursor): nothing is booked twice.
    first.stop().await;
    let pool = env.erp_pool().await;
    let outbox_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE feed_cursor SET position = 0")
        .execute(&pool)
        .await
        .unwrap();
    let second = env.spawn_erp_sync(options).await;
    let head: i64 = sqlx::query_scalar("SELECT max(position) FROM production_scans")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(15), || async {
            sqlx::query_scalar::<_, i64>("SELECT position FROM feed_cursor")
                .fetch_one(&pool)
                .await
                .unwrap_or(0)
                >= head
        })
        .await
    );
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(after, outbox_rows, "a replayed feed queues nothing new");
    let lines = support::all_lines(&outbox_file);
    let mut keys: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["idempotency_key"].as_str())
        .collect();
    let n = keys.len();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), n, "each key once in the erp: {keys:?}");

    second.stop().await;
    env.stop().await;
}

fn all_follow_ups(path: &std::path::Path) -> Vec<serde_json::Value> {
    support::all_lines(path)
        .into_iter()
        .filter(|l| l["follows"].is_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_can_neither_post_nor_mark_with_its_old_lease_token() {
    use erp_sync::delivery::{Delivery, StepError};
    use erp_sync::store::lease::{self, FenceError, Fenced};

    let env = TestEnv::new().await;
    let outbox_file = env.path("erp/confirmations.jsonl");
    let options = ErpOptions {
        outbox_file: Some(outbox_file.clone()),
        ..Default::default()
    };
    // An instance leads (lease token 1), and confirms an operation.
    let app = env.spawn_erp_sync(options.clone()).await;
    app.wait_for_successful_pulls(1).await;
    let complete = support::scan(pb::ScanKind::CompleteOperation, "WO-1000", 10, "ST-10");
    let key = format!("WO-1000:10:{}", complete.scan_id);
    support::submit_all(
        &mut env.scan_ingest_client(),
        vec![
            support::scan(pb::ScanKind::StartOperation, "WO-1000", 10, "ST-10"),
            complete,
        ],
    )
    .await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            support::lines_with_key(&outbox_file, &key).len() == 1
        })
        .await
    );
    app.stop().await;
    let pool = env.erp_pool().await;
    let first = lease::current(&pool).await.unwrap();
    assert!(first >= 1, "the leader took a lease: {first}");

    // A confirmation waits in the queue. Replica A takes the lease, then B takes it from A.
    let payload: Value = sqlx::query_scalar("SELECT payload FROM outbox LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut payload = payload;
    payload["completion_scan"] = json!("late-leader-test");
    let queued = "WO-1000:10:late-leader-test";
    sqlx::query(
        "INSERT INTO outbox (idempotency_key, work_order, operation, payload)
         VALUES ($1, 'WO-1000', 10, $2)",
    )
    .bind(queued)
    .bind(&payload)
    .execute(&pool)
    .await
    .unwrap();
    let a = lease::take(&pool, "replica-a").await.unwrap();
    let b = lease::take(&pool, "replica-b").await.unwrap();
    assert!(b > a && a > first, "tokens grow: {first} < {a} < {b}");

    let delivery = |token: i64| Delivery {
        pool: pool.clone(),
        adapter: std::sync::Arc::new(erp_sync::adapter::file::FileAdapter::new(
            support::demo_plant_path(),
            &outbox_file,
        )),
        breaker: std::sync::Arc::new(std::sync::Mutex::new(erp_sync::breaker::Breaker::new(
            5,
            Duration::from_secs(1),
        ))),
        wake: std::sync::Arc::new(tokio::sync::Notify::new()),
        call_timeout: Duration::from_secs(3),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
        max_attempts: 3,
        auth_retry: Duration::from_secs(1),
        retry_after_timeout: Duration::from_millis(100),
        token,
    };
    // A wakes up still believing it leads: refused before it posts anything.
    let refused = delivery(a).step().await;
    assert!(
        matches!(refused, Err(StepError::Fenced(_))),
        "A is fenced: {refused:?}"
    );
    assert!(support::lines_with_key(&outbox_file, queued).is_empty());
    // Nor can it mark a row, or apply the feed, with its old token.
    let marking = Fenced::begin(&pool, a, Duration::from_secs(5)).await;
    assert!(matches!(
        marking,
        Err(FenceError::Fenced { held, current }) if held == a && current == b
    ));
    let applying = erp_sync::store::outbound::apply(&pool, "erp-sync", a, &[]).await;
    assert!(
        matches!(
            applying,
            Err(erp_sync::store::outbound::ApplyError::Fenced(_))
        ),
        "{applying:?}"
    );
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM outbox WHERE idempotency_key = $1")
            .bind(queued)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts), ("pending", 0));

    // B, the current leader, delivers it once.
    assert!(delivery(b).step().await.is_ok());
    assert_eq!(support::lines_with_key(&outbox_file, queued).len(), 1);
    let status: String = sqlx::query_scalar("SELECT status FROM outbox WHERE idempotency_key = $1")
        .bind(queued)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "delivered");

    // A new leader waits for the old one's fenced step (ERP call included) to end.
    let mut holding = Fenced::begin(&pool, b, Duration::from_secs(5))
        .await
        .unwrap();
    let taking = tokio::spawn({
        let pool = pool.clone();
        async move { lease::take(&pool, "replica-c").await }
    });
    let waits = wait_for(Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap_or(0)
            >= 1
    })
    .await;
    assert!(
        waits && !taking.is_finished(),
        "the lease is not taken over a step in flight"
    );
    erp_sync::store::outbound::mark_delivered(holding.conn(), 0)
        .await
        .unwrap();
    holding.commit().await.unwrap();
    let c = taking.await.unwrap().unwrap();
    assert_eq!(c, b + 1);

    env.stop().await;
}

/// A newer scan-ingest (rolling upgrade) writes an event kind this erp-sync does not know; it
/// may carry production. The consumer must not skip it and move on (production lost for the
/// ERP for good): it stops in front of it, says so, and goes on only when an operator records
/// the position in `feed_skips` — then the production after it is confirmed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_this_build_cannot_read_stops_the_feed_consumer_until_skipped() {
    use tonic_health::pb::health_check_response::ServingStatus;

    let env = TestEnv::new().await;
    let outbox_file = env.path("erp/confirmations.jsonl");
    let erp = env
        .spawn_erp_sync(ErpOptions {
            outbox_file: Some(outbox_file.clone()),
            ..Default::default()
        })
        .await;
    erp.wait_for_successful_pulls(1).await;
    let head = env.feed_head().await;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            erp.feed_cursor().await >= head
        })
        .await,
        "erp-sync follows the master data of the pull"
    );

    // An event of a kind added later: `Event { kind: "lot.split" }` with its payload in a
    // oneof field this build does not know (field 31, length 2: {1: 1}), so it decodes with
    // `payload: None`. Encoded by hand: field 2 (kind), then the unknown field.
    let mut payload = vec![0x12, 9];
    payload.extend_from_slice(b"lot.split");
    payload.extend([0xfa, 0x01, 0x02, 0x08, 0x01]);
    let si_pool = env.scan_ingest_pool().await;
    sqlx::query("INSERT INTO event_log (kind, payload) VALUES ('lot.split', $1)")
        .bind(payload)
        .execute(&si_pool)
        .await
        .expect("newer event");
    let unknown_at = env.feed_head().await;
    assert_eq!(unknown_at, head + 1);

    // Production after it: an operation started, produced and completed.
    let mut si = env.scan_ingest_client();
    let complete = support::scan(pb::ScanKind::CompleteOperation, "WO-1000", 10, "ST-10");
    let key = format!("WO-1000:10:{}", complete.scan_id);
    support::submit_all(
        &mut si,
        vec![
            support::scan(pb::ScanKind::StartOperation, "WO-1000", 10, "ST-10"),
            support::Scan::new(pb::ScanKind::Produce, "WO-1000", 10, "ST-10")
                .lot("FRAME-L1")
                .material("FRAME-200")
                .quantity("10")
                .build(),
            complete,
        ],
    )
    .await;
    let last = env.feed_head().await;
    assert!(last > unknown_at);

    // The consumer stops in front of the event (the batch up to it applied) and says so.
    assert!(
        wait_for(Duration::from_secs(15), || async {
            erp.feed_cursor().await >= unknown_at - 1
                && (erp.health(erp_sync::FEED_HEALTH).await == ServingStatus::NotServing
                    || erp.feed_cursor().await >= last)
        })
        .await,
        "erp-sync neither reported a stall nor followed the feed"
    );
    assert_eq!(
        erp.feed_cursor().await,
        unknown_at - 1,
        "the cursor stays in front of the event it cannot read"
    );
    assert_eq!(
        erp.health(erp_sync::FEED_HEALTH).await,
        ServingStatus::NotServing
    );
    assert_eq!(
        erp.health("mes.v1.ErpSync").await,
        ServingStatus::Serving,
        "the service itself still serves"
    );
    let metrics = mes_common::metrics::install().render();
    assert!(
        metrics.contains(r#"event_feed_stalled{consumer="erp-sync"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            r#"event_feed_stalled_position{{consumer="erp-sync"}} {unknown_at}"#
        )),
        "{metrics}"
    );
    // Nothing after it was applied: no production seen, no confirmation queued or sent.
    let (scans, rows): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM production_scans), (SELECT count(*) FROM outbox)",
    )
    .fetch_one(&erp.pool)
    .await
    .unwrap();
    assert_eq!((scans, rows), (0, 0));
    assert!(support::all_lines(&outbox_file).is_empty());

    // An operator records the position: the consumer passes it (stamping the skip as used)
    // and confirms the production after it, once.
    sqlx::query(
        "INSERT INTO feed_skips (consumer, position, reason)
         VALUES ('erp-sync', $1, 'test: an event from the future')",
    )
    .bind(unknown_at)
    .execute(&erp.pool)
    .await
    .expect("feed_skips");
    assert!(
        wait_for(Duration::from_secs(20), || async {
            support::lines_with_key(&outbox_file, &key).len() == 1
                && erp.feed_cursor().await >= last
        })
        .await,
        "the production after the skipped event reached the erp"
    );
    let line = support::lines_with_key(&outbox_file, &key).remove(0);
    assert_eq!(line["good_quantity"], "10");
    assert_eq!(
        line["produced_lots"],
        json!([{"lot": "FRAME-L1", "material": "FRAME-200", "quantity": "10"}])
    );
    assert!(
        wait_for(Duration::from_secs(10), || async {
            erp.health(erp_sync::FEED_HEALTH).await == ServingStatus::Serving
        })
        .await,
        "health shows the feed flowing again"
    );
    assert!(
        mes_common::metrics::install()
            .render()
            .contains(r#"event_feed_stalled{consumer="erp-sync"} 0"#)
    );
    let skipped: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT skipped_at FROM feed_skips WHERE consumer = 'erp-sync' AND position = $1",
    )
    .bind(unknown_at)
    .fetch_one(&erp.pool)
    .await
    .unwrap();
    assert!(skipped.is_some(), "the skip is recorded as used");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&erp.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    assert_eq!(support::all_lines(&outbox_file).len(), 1, "confirmed once");

    si_pool.close().await;
    erp.stop().await;
    env.stop().await;
}
