//! The `tryton` adapter against a real Tryton 8.2 that the harness installs and starts
//! (tests/support/tryton.rs): a production order created in Tryton becomes a work order in
//! the MES, and the scans that complete it come back to Tryton as a done production with the
//! consumed and produced quantities and lots.

mod support;

use std::time::Duration;

use mes_proto::v1 as pb;
use rust_decimal::Decimal;
use support::tryton::{self, Tryton};
use support::{ErpOptions, TestEnv, TrytonOptions, wait_for};

const STATION: &str = "TRYTON-PROD";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tryton_production_order_is_produced_in_the_mes_and_done_in_tryton() {
    let mut erp = Tryton::start().await;
    let number = erp.seed().await;

    let env = TestEnv::new().await;
    let app = env
        .spawn_erp_sync(ErpOptions {
            adapter: "tryton".into(),
            call_timeout_ms: 20_000,
            tryton: Some(TrytonOptions {
                url: erp.url.clone(),
                database: tryton::DATABASE.into(),
                user: "admin".into(),
                password: tryton::PASSWORD.into(),
                station: STATION.into(),
            }),
            ..Default::default()
        })
        .await;
    app.wait_for_successful_pulls(1).await;
    let status = app
        .client()
        .get_status(pb::GetErpStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.adapter, "tryton");
    assert_eq!(status.erp_reachable, "up");
    assert_eq!(status.dead_letters, 0);

    // The production order is a work order in the MES, with its BOM per unit.
    let mut si = env.scan_ingest_client();
    let wo = si
        .get_work_order(pb::GetWorkOrderRequest {
            number: number.clone(),
        })
        .await
        .expect("the production order was pulled")
        .into_inner();
    assert_eq!(wo.material, "WID");
    assert_eq!(wo.operations.len(), 1);
    assert_eq!(wo.operations[0].station, STATION);
    assert_eq!(wo.components.len(), 1);
    assert_eq!(wo.components[0].material, "STL");
    assert_eq!(
        wo.components[0]
            .quantity_per_unit
            .parse::<Decimal>()
            .unwrap(),
        Decimal::from(2)
    );
    let lot = si
        .get_lot(pb::GetLotRequest {
            lot: "STL-L1".into(),
        })
        .await
        .expect("the received lot was pulled")
        .into_inner();
    assert_eq!(
        lot.quantity_on_hand.parse::<Decimal>().unwrap(),
        Decimal::from(100)
    );

    // Tryton forgets erp-sync's session (idle timeout, restart): the adapter logs in again.
    erp.expire_sessions().await;

    // The shop floor produces it.
    let consume = support::Scan::new(pb::ScanKind::Consume, &number, 10, STATION)
        .lot("STL-L1")
        .quantity("19")
        .build();
    let consume_id = consume.scan_id.clone();
    let complete = support::scan(pb::ScanKind::CompleteOperation, &number, 10, STATION);
    let confirmation_key = format!("{number}:10:{}", complete.scan_id);
    support::submit_all(
        &mut si,
        vec![
            support::scan(pb::ScanKind::StartOperation, &number, 10, STATION),
            consume,
            support::Scan::new(pb::ScanKind::Produce, &number, 10, STATION)
                .lot("WID-L1")
                .material("WID")
                .quantity("10")
                .build(),
            complete,
        ],
    )
    .await;

    // Tryton shows the order done, with what was consumed and produced.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let mut last = erp.production(&number).await;
    while last["state"] != "done" && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        last = erp.production(&number).await;
    }
    let done = last["state"] == "done";
    let outbox: Vec<(String, i32, String)> =
        sqlx::query_as("SELECT status, attempts, last_error FROM outbox")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert!(
        done,
        "the production is done in tryton: {last}; outbox: {outbox:?}"
    );
    let inputs = last["inputs."].as_array().unwrap();
    assert_eq!(inputs.len(), 1, "{last}");
    assert_eq!(inputs[0]["quantity"], 19.0);
    assert_eq!(inputs[0]["lot."]["number"], "STL-L1");
    let outputs = last["outputs."].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "{last}");
    assert_eq!(outputs[0]["quantity"], 10.0);
    assert_eq!(outputs[0]["lot."]["number"], "WID-L1");
    assert!(
        wait_for(Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, String>("SELECT status FROM outbox")
                .fetch_one(&app.pool)
                .await
                .is_ok_and(|s| s == "delivered")
        })
        .await
    );

    let metrics = mes_common::metrics::install().render();
    let logins = metrics
        .lines()
        .find(|l| l.starts_with("erp_tryton_logins_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        logins >= 2.0,
        "a new login after the session expired: {logins}"
    );

    // The books agree: 10 widgets made, 100 - 19 plates left, in both systems.
    let reconciliation = app
        .client()
        .reconcile(support::admin(pb::ReconcileRequest {}))
        .await
        .expect("reconcile")
        .into_inner();
    assert_eq!(
        reconciliation.differences, 0,
        "{:?}",
        reconciliation.details
    );

    // A consume voided after the order is done: tryton cannot take the reversal through its
    // API, so it lands in the dead letters for an operator to book by hand.
    support::void_scan(&mut si, &consume_id, "counted twice").await;
    let refused = wait_for(Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, String>(
            "SELECT reason FROM dead_letters WHERE entity = 'outbox' AND resolved_at IS NULL",
        )
        .fetch_optional(&app.pool)
        .await
        .ok()
        .flatten()
        .is_some()
    })
    .await;
    assert!(refused, "the reversal is a dead letter");
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM dead_letters WHERE entity = 'outbox'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(
        reason.contains(&format!(
            "reversal of {confirmation_key} must be booked in Tryton by hand: "
        )),
        "{reason}"
    );
    assert!(
        reason.contains("consumed -19 STL of lot STL-L1"),
        "{reason}"
    );
    let metrics = mes_common::metrics::install().render();
    assert!(metrics.contains("erp_reversals_manual_total"), "{metrics}");

    // A confirmation interrupted half-way (erp-sync stopped after `run`): the retry finishes
    // the order without doing the first half twice.
    let second = erp.create_order().await;
    app.client()
        .trigger_pull(support::admin(pb::TriggerPullRequest {}))
        .await
        .expect("pull of the second order");
    erp.run_half_way(&second, 20.0).await;
    support::submit_all(
        &mut si,
        vec![
            support::scan(pb::ScanKind::StartOperation, &second, 10, STATION),
            support::Scan::new(pb::ScanKind::Consume, &second, 10, STATION)
                .lot("STL-L1")
                .quantity("20")
                .build(),
            support::Scan::new(pb::ScanKind::Produce, &second, 10, STATION)
                .lot("WID-L2")
                .material("WID")
                .quantity("9")
                .build(),
            support::scan(pb::ScanKind::CompleteOperation, &second, 10, STATION),
        ],
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let mut last = erp.production(&second).await;
    while last["state"] != "done" && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        last = erp.production(&second).await;
    }
    assert_eq!(last["state"], "done", "{last}");
    assert_eq!(last["inputs."].as_array().map(Vec::len), Some(1), "{last}");
    assert_eq!(last["inputs."][0]["quantity"], 20.0);
    assert_eq!(last["outputs."][0]["quantity"], 9.0);
    assert_eq!(last["outputs."][0]["lot."]["number"], "WID-L2");

    // A later pull sees the order closed and the steel lot's new quantity; nothing breaks (the
    // one dead letter is the reversal to book by hand).
    app.client()
        .trigger_pull(support::admin(pb::TriggerPullRequest {}))
        .await
        .expect("second pull");
    let status = app
        .client()
        .get_status(pb::GetErpStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.dead_letters, 1);

    app.stop().await;
    env.stop().await;
    drop(erp);
}
