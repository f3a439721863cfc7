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

    // A consume voided after the order is done: erp-sync posts the reversal to Tryton as a
    // done stock move of the lot from the production location back to storage.
    assert_eq!(erp.lot_quantity_in_storage("STL-L1").await, 81.0);
    let void = support::void_scan(&mut si, &consume_id, "counted twice").await;
    let delivered = wait_for(Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, String>(
            "SELECT status FROM outbox WHERE idempotency_key LIKE 'reversal:%'",
        )
        .fetch_optional(&app.pool)
        .await
        .ok()
        .flatten()
        .is_some_and(|s| s == "delivered")
    })
    .await;
    let rows: Vec<(String, String, i32, String)> = sqlx::query_as(
        "SELECT idempotency_key, status, attempts, last_error FROM outbox \
         WHERE idempotency_key LIKE 'reversal:%'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(delivered, "the reversal is delivered to tryton: {rows:?}");
    let (reversal_key, payload): (String, serde_json::Value) = sqlx::query_as(
        "SELECT idempotency_key, payload FROM outbox WHERE idempotency_key LIKE 'reversal:%'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(reversal_key, erp_sync::domain::reversal_key(&void));
    let moves = erp.moves_with_note(&reversal_key).await;
    assert_eq!(moves.len(), 1, "one reversal move: {moves:?}");
    let production = erp.production(&number).await;
    assert_eq!(moves[0]["state"], "done", "{moves:?}");
    assert_eq!(moves[0]["quantity"], 19.0, "{moves:?}");
    assert_eq!(moves[0]["lot."]["number"], "STL-L1", "{moves:?}");
    assert_eq!(
        moves[0]["from_location"], production["location"],
        "{moves:?}"
    );
    assert_eq!(moves[0]["to_location"], erp.storage(), "{moves:?}");
    assert_eq!(
        erp.lot_quantity_in_storage("STL-L1").await,
        100.0,
        "the 19 plates are back in storage"
    );
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0, "the reversal is no dead letter");

    // Exactly once: erp-sync retries the same reversal (it stopped after Tryton took it and
    // before marking it delivered): Tryton already has it, nothing moves twice.
    let reversal: erp_sync::domain::Reversal = serde_json::from_value(payload).unwrap();
    let adapter = erp_sync::adapter::tryton::TrytonAdapter::new(
        erp_sync::adapter::tryton::TrytonSettings {
            url: erp.url.clone(),
            database: tryton::DATABASE.into(),
            user: "admin".into(),
            password: tryton::PASSWORD.into(),
            company: erp.company,
            station: STATION.into(),
        },
        Duration::from_secs(20),
    )
    .unwrap();
    use erp_sync::adapter::{ErpAdapter, Posted};
    for _ in 0..2 {
        assert_eq!(
            adapter
                .post_reversal(&reversal, &reversal_key)
                .await
                .expect("the retry is accepted"),
            Posted::AlreadyThere
        );
    }
    assert_eq!(erp.moves_with_note(&reversal_key).await.len(), 1);
    assert_eq!(erp.lot_quantity_in_storage("STL-L1").await, 100.0);

    // A new reversal posted twice: booked by the first post only.
    let mut again = reversal.clone();
    again.void_scan = "void-direct".into();
    again.consumed_lots[0].quantity = Decimal::from(-1);
    let key = again.idempotency_key();
    assert_eq!(
        adapter.post_reversal(&again, &key).await.expect("posted"),
        Posted::New
    );
    assert_eq!(
        adapter.post_reversal(&again, &key).await.expect("retried"),
        Posted::AlreadyThere
    );
    assert_eq!(erp.moves_with_note(&key).await.len(), 1);
    assert_eq!(erp.lot_quantity_in_storage("STL-L1").await, 101.0);

    // A reversal stopped half-way (the move created and keyed, not done): the retry finishes
    // that move instead of making another.
    let mut half = reversal.clone();
    half.void_scan = "void-half".into();
    half.consumed_lots[0].quantity = Decimal::from(-2);
    let key = half.idempotency_key();
    erp.half_posted_reversal(&key, 2.0).await;
    assert_eq!(erp.lot_quantity_in_storage("STL-L1").await, 101.0);
    assert_eq!(
        adapter.post_reversal(&half, &key).await.expect("finished"),
        Posted::New
    );
    let moves = erp.moves_with_note(&key).await;
    assert_eq!(moves.len(), 1, "{moves:?}");
    assert_eq!(moves[0]["state"], "done", "{moves:?}");
    assert_eq!(erp.lot_quantity_in_storage("STL-L1").await, 103.0);

    // A reversal Tryton cannot take (an unknown lot) is a dead letter to book by hand.
    let mut unknown = reversal.clone();
    unknown.void_scan = "void-unknown-lot".into();
    unknown.consumed_lots[0].lot = "NO-SUCH-LOT".into();
    let key = unknown.idempotency_key();
    let refused = adapter
        .post_reversal(&unknown, &key)
        .await
        .expect_err("refused");
    assert!(!refused.is_transient(), "{refused}");
    assert!(
        refused.to_string().contains(&format!(
            "reversal of {confirmation_key} must be booked in Tryton by hand: "
        )),
        "{refused}"
    );
    assert!(
        refused
            .to_string()
            .contains("consumed -19 STL of lot NO-SUCH-LOT"),
        "{refused}"
    );
    // A voided produce: the widgets go from storage back to the production location, and
    // Tryton's books (as erp-sync reconciles them) count one widget less for the order.
    assert_eq!(erp.lot_quantity_in_storage("WID-L1").await, 10.0);
    let mut produce = reversal.clone();
    produce.void_scan = "void-produce".into();
    produce.voided_kind = "produce".into();
    produce.consumed_lots.clear();
    produce.produced_lots = vec![erp_sync::domain::LotQuantity {
        lot: "WID-L1".into(),
        material: "WID".into(),
        quantity: Decimal::from(-1),
    }];
    produce.good_quantity = Decimal::from(-1);
    let key = produce.idempotency_key();
    for expected in [Posted::New, Posted::AlreadyThere] {
        assert_eq!(
            adapter.post_reversal(&produce, &key).await.expect("posted"),
            expected
        );
    }
    // Tryton takes stock out of storage only through an assignment, offered on documents, not
    // on a lone move: the move is the input of a correction production keyed by the reversal.
    let corrections = erp
        .productions_with_reference(&format!(
            "{}{key}",
            erp_sync::adapter::tryton::CORRECTION_PREFIX
        ))
        .await;
    assert_eq!(corrections.len(), 1, "{corrections:?}");
    let c = &corrections[0];
    assert_eq!(c["state"], "done", "{c}");
    assert_eq!(c["outputs"], serde_json::json!([]), "{c}");
    let inputs = c["inputs."].as_array().unwrap();
    assert_eq!(inputs.len(), 1, "{c}");
    assert_eq!(inputs[0]["state"], "done", "{c}");
    assert_eq!(inputs[0]["quantity"], 1.0, "{c}");
    assert_eq!(inputs[0]["lot."]["number"], "WID-L1", "{c}");
    assert_eq!(inputs[0]["from_location"], erp.storage(), "{c}");
    assert_eq!(inputs[0]["to_location"], production["location"], "{c}");
    assert_eq!(erp.lot_quantity_in_storage("WID-L1").await, 9.0);
    let books = adapter.quantities().await.expect("tryton's books");
    assert_eq!(books.work_orders[&number], Decimal::from(9), "{books:?}");

    let metrics = mes_common::metrics::install().render();
    assert!(metrics.contains("erp_reversals_posted_total"), "{metrics}");
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

    // A later pull sees the order closed and the steel lot's new quantity; nothing breaks.
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
    assert_eq!(status.dead_letters, 0);

    app.stop().await;
    env.stop().await;
    drop(erp);
}

fn tryton_adapter(erp: &Tryton) -> erp_sync::adapter::tryton::TrytonAdapter {
    erp_sync::adapter::tryton::TrytonAdapter::new(
        erp_sync::adapter::tryton::TrytonSettings {
            url: erp.url.clone(),
            database: tryton::DATABASE.into(),
            user: "admin".into(),
            password: tryton::PASSWORD.into(),
            company: erp.company,
            station: STATION.into(),
        },
        Duration::from_secs(20),
    )
    .unwrap()
}

fn lots(entries: &[(&str, &str, i64)]) -> Vec<erp_sync::domain::LotQuantity> {
    entries
        .iter()
        .map(|(lot, material, q)| erp_sync::domain::LotQuantity {
            lot: (*lot).into(),
            material: (*material).into(),
            quantity: Decimal::from(*q),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_confirmation_is_keyed_in_tryton_so_a_done_order_still_takes_later_ones() {
    use erp_sync::adapter::{ErpAdapter, Posted};
    use erp_sync::domain::Confirmation;

    let mut erp = Tryton::start().await;
    let number = erp.seed().await;
    let adapter = tryton_adapter(&erp);
    let confirmation =
        |scan: &str, good: i64, produced, consumed, follows: Option<String>| Confirmation {
            work_order: number.clone(),
            operation: 10,
            station: STATION.into(),
            good_quantity: Decimal::from(good),
            scrap_quantity: Decimal::ZERO,
            produced_lots: produced,
            consumed_lots: consumed,
            scrapped_lots: vec![],
            completed_at: chrono::Utc::now(),
            completed_by: "op1".into(),
            completion_scan: scan.into(),
            follows,
        };

    // The operation's confirmation: the order is done, once.
    let first = confirmation(
        "c1",
        10,
        lots(&[("WID-L1", "WID", 10)]),
        lots(&[("STL-L1", "STL", 19)]),
        None,
    );
    let first_key = first.idempotency_key();
    assert_eq!(
        adapter.post_confirmation(&first, &first_key).await.unwrap(),
        Posted::New
    );
    assert_eq!(erp.production(&number).await["state"], "done");
    assert_eq!(
        adapter.post_confirmation(&first, &first_key).await.unwrap(),
        Posted::AlreadyThere
    );
    assert_eq!(erp.lot_quantity_in_storage("WID-L1").await, 10.0);
    assert_eq!(erp.lot_quantity_in_storage("STL-L1").await, 81.0);

    // A second confirmation of the done order (a void and redo, an order closed by hand):
    // its quantities are booked, under its own key, once.
    let second = confirmation(
        "c2",
        2,
        lots(&[("WID-L1", "WID", 2)]),
        lots(&[("STL-L1", "STL", 4)]),
        None,
    );
    let second_key = second.idempotency_key();
    assert_eq!(
        adapter
            .post_confirmation(&second, &second_key)
            .await
            .unwrap(),
        Posted::New,
        "a second confirmation of a done order is booked, not dropped"
    );
    assert_eq!(
        adapter
            .post_confirmation(&second, &second_key)
            .await
            .unwrap(),
        Posted::AlreadyThere
    );
    assert_eq!(erp.lot_quantity_in_storage("WID-L1").await, 12.0);
    assert_eq!(erp.lot_quantity_in_storage("STL-L1").await, 77.0);

    // A follow-up (late production, a new lot): the delta only, once.
    let follow_up = confirmation(
        "late-1",
        3,
        lots(&[("WID-L9", "WID", 3)]),
        lots(&[("STL-L1", "STL", 6)]),
        Some(first_key.clone()),
    );
    let key = follow_up.idempotency_key();
    for expected in [Posted::New, Posted::AlreadyThere] {
        assert_eq!(
            adapter.post_confirmation(&follow_up, &key).await.unwrap(),
            expected
        );
    }
    assert_eq!(erp.lot_quantity_in_storage("WID-L9").await, 3.0);
    assert_eq!(erp.lot_quantity_in_storage("STL-L1").await, 71.0);

    // One of the late widgets is voided: reversed against the follow-up, in Tryton too.
    let reversal = erp_sync::domain::Reversal {
        work_order: number.clone(),
        operation: 10,
        station: STATION.into(),
        reverses: key.clone(),
        voided_scan: "late-1".into(),
        voided_kind: "produce".into(),
        void_scan: "void-late-1".into(),
        good_quantity: Decimal::from(-1),
        scrap_quantity: Decimal::ZERO,
        produced_lots: lots(&[("WID-L9", "WID", -1)]),
        consumed_lots: vec![],
        scrapped_lots: vec![],
        voided_at: chrono::Utc::now(),
        voided_by: "sup1".into(),
        reason: "counted twice".into(),
    };
    let reversal_key = reversal.idempotency_key();
    for expected in [Posted::New, Posted::AlreadyThere] {
        assert_eq!(
            adapter
                .post_reversal(&reversal, &reversal_key)
                .await
                .expect("reversed"),
            expected
        );
    }
    assert_eq!(erp.lot_quantity_in_storage("WID-L9").await, 2.0);

    // Tryton's books, as erp-sync reconciles them, count every confirmation, follow-up and
    // reversal (10 + 2 + 3 - 1); the corrections are not work orders.
    let books = adapter.quantities().await.expect("tryton's books");
    assert_eq!(books.work_orders[&number], Decimal::from(14), "{books:?}");
    assert_eq!(books.work_orders.len(), 1, "{books:?}");
    let pulled = adapter.pull_work_orders(None).await.expect("pull");
    assert!(
        pulled.items.iter().all(|c| c.key == number),
        "{:?}",
        pulled.items.iter().map(|c| &c.key).collect::<Vec<_>>()
    );
    drop(erp);
}
