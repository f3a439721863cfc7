//! Black-box tests of scan-ingest over real gRPC against a fresh PostgreSQL database.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use mes_proto::v1 as pb;
use pb::ScanKind as K;
use pb::ScanStatus as S;
use tonic_types::StatusExt;

/// The typical run of docs/demo-plant.md, steps 1–2, through the gRPC API.
async fn typical_run(app: &TestApp) {
    accepted(
        &app.submit(vec![
            scan(K::StartOperation, "WO-1000", 10, "ST-10"),
            with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "STEEL-L1", "25"),
            {
                let mut s = with_lot(scan(K::Produce, "WO-1000", 10, "ST-10"), "FRAME-L1", "10");
                s.material = "FRAME-200".into();
                s
            },
            scan(K::CompleteOperation, "WO-1000", 10, "ST-10"),
        ])
        .await,
    );
    let into = |lot: &str, q: &str| {
        let mut s = with_lot(scan(K::Consume, "WO-1001", 10, "ST-20"), lot, q);
        s.into_lot = "BIKE-S0001".into();
        s
    };
    accepted(
        &app.submit(vec![
            scan(K::StartOperation, "WO-1001", 10, "ST-20"),
            into("FRAME-L1", "1"),
            into("WHEEL-L1", "2"),
            into("BOLT-L1", "8"),
            with_lot(scan(K::Produce, "WO-1001", 10, "ST-20"), "BIKE-S0001", "1"),
            scan(K::CompleteOperation, "WO-1001", 10, "ST-20"),
            scan(K::StartOperation, "WO-1001", 20, "ST-30"),
            {
                let mut s = scan(K::Inspect, "WO-1001", 20, "ST-30");
                s.lot = "BIKE-S0001".into();
                s.result = pb::InspectResult::Pass as i32;
                s
            },
            scan(K::CompleteOperation, "WO-1001", 20, "ST-30"),
        ])
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typical_run_moves_inventory_and_drives_work_order_status() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    assert_eq!(app.work_order("WO-1000").await.status, "released");
    typical_run(&app).await;

    let wo = app.work_order("WO-1000").await;
    assert_eq!(wo.status, "completed");
    assert_eq!(wo.produced_quantity, "10");
    assert_eq!(wo.operations[0].status, "completed");
    assert_eq!(wo.operations[0].good_quantity, "10");
    assert_eq!(app.lot("STEEL-L1").await.quantity_on_hand, "75");
    assert_eq!(app.lot("FRAME-L1").await.quantity_on_hand, "9");
    assert_eq!(app.lot("WHEEL-L1").await.quantity_on_hand, "38");
    assert_eq!(app.lot("BOLT-L1").await.quantity_on_hand, "992");
    let bike = app.lot("BIKE-S0001").await;
    assert_eq!(
        (bike.material.as_str(), bike.quantity_on_hand.as_str()),
        ("BIKE-100", "1")
    );
    assert_eq!(bike.origin.unwrap().work_order, "WO-1001");
    let wo = app.work_order("WO-1001").await;
    assert_eq!(wo.status, "completed");
    assert!(
        scan_ingest::store::ledger::check(&app.pool)
            .await
            .unwrap()
            .is_empty()
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_is_duplicate_and_reuse_with_other_content_is_conflict() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    let first = with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "STEEL-L1", "5");
    accepted(&app.submit(vec![first.clone()]).await);
    let again = app.submit(vec![first.clone()]).await;
    assert_eq!(status(&again[0]), (S::Duplicate, String::new()));
    let mut changed = first.clone();
    changed.quantity = "6".into();
    assert_eq!(
        status(&app.submit(vec![changed]).await[0]),
        (S::Rejected, "conflict".into())
    );
    assert_eq!(
        app.lot("STEEL-L1").await.quantity_on_hand,
        "95",
        "replays must not consume again"
    );
    let stored = app
        .scans()
        .get_scan(pb::GetScanRequest {
            scan_id: first.scan_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.status, "active");
    assert_eq!(stored.operator, "op1");
    assert_eq!(stored.scan.unwrap().quantity, "5");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_business_rule_rejects_alone_and_changes_nothing() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    let mut hold = tonic::Request::new(pb::LotStatusRequest {
        lot: "STEEL-L2".into(),
        reason: "suspect".into(),
    });
    quality().write_to(hold.metadata_mut());
    app.scans().hold_lot(hold).await.unwrap();

    let cases: Vec<(pb::Scan, &str)> = vec![
        (
            scan(K::StartOperation, "WO-9999", 10, "ST-10"),
            "unknown_work_order",
        ),
        (
            scan(K::StartOperation, "WO-1002", 10, "ST-10"),
            "work_order_closed",
        ),
        (
            with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "NOPE-L1", "1"),
            "unknown_lot",
        ),
        (
            with_lot(
                scan(K::Consume, "WO-1000", 10, "ST-10"),
                "STEEL-L1",
                "100.5",
            ),
            "insufficient_quantity",
        ),
        (
            with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "WHEEL-L1", "1"),
            "not_in_bom",
        ),
        (
            scan(K::StartOperation, "WO-1000", 10, "ST-20"),
            "wrong_station",
        ),
        (
            scan(K::StartOperation, "WO-1000", 99, "ST-10"),
            "invalid_operation",
        ),
        (
            {
                let mut s = with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "STEEL-L1", "1");
                s.material = "BOLT-400".into();
                s
            },
            "wrong_material",
        ),
        (
            with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "STEEL-L2", "1"),
            "lot_on_hold",
        ),
        (
            {
                let mut s = with_lot(scan(K::Produce, "WO-1001", 10, "ST-20"), "BIKE-X", "2");
                s.material = "BIKE-100".into();
                s
            },
            "invalid_quantity",
        ),
    ];
    let good = with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "STEEL-L1", "1");
    let mut batch: Vec<pb::Scan> = cases.iter().map(|(s, _)| s.clone()).collect();
    batch.push(good);
    let results = app.submit(batch).await;
    for (r, (_, code)) in results.iter().zip(&cases) {
        assert_eq!(status(r), (S::Rejected, code.to_string()), "{r:?}");
        assert!(!r.error.as_ref().unwrap().message.is_empty());
    }
    assert_eq!(
        status(results.last().unwrap()).0,
        S::Accepted,
        "a rejection must not block the others"
    );
    assert_eq!(app.lot("STEEL-L1").await.quantity_on_hand, "99");
    assert_eq!(app.lot("STEEL-L2").await.quantity_on_hand, "100");
    assert_eq!(app.work_order("WO-1002").await.status, "cancelled");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM scans")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 1, "only the accepted scan is stored");

    // A serial is unique.
    let mk = || {
        let mut s = with_lot(scan(K::Produce, "WO-1001", 10, "ST-20"), "BIKE-S0009", "1");
        s.material = "BIKE-100".into();
        s
    };
    accepted(&app.submit(vec![mk()]).await);
    assert_eq!(
        status(&app.submit(vec![mk()]).await[0]),
        (S::Rejected, "duplicate_serial".into())
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_fields_fail_the_batch_naming_the_field_and_store_nothing() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    let ok = with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "STEEL-L1", "1");
    let cases: Vec<(pb::Scan, &str)> = vec![
        (
            with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "STEEL-L1", "0"),
            "scans[1].quantity",
        ),
        (
            with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "STEEL-L1", "-1"),
            "scans[1].quantity",
        ),
        (
            with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "STEEL-L1", "1e3"),
            "scans[1].quantity",
        ),
        (
            with_lot(
                scan(K::Consume, "WO-1000", 10, "ST-10"),
                "STEEL-L1",
                "'; DROP TABLE scans; --",
            ),
            "scans[1].quantity",
        ),
        (
            with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "", "1"),
            "scans[1].lot",
        ),
        (
            {
                let mut s = ok.clone();
                s.scan_id = "not-a-uuid".into();
                s
            },
            "scans[1].scan_id",
        ),
        (
            {
                let mut s = scan(K::StartOperation, "WO-1000", 10, "ST-10");
                s.scanned_at = None;
                s
            },
            "scans[1].scanned_at",
        ),
        (
            scan(K::Unspecified, "WO-1000", 10, "ST-10"),
            "scans[1].kind",
        ),
        (
            scan(K::StartOperation, "WO-1000", 0, "ST-10"),
            "scans[1].operation",
        ),
        (
            {
                let mut s = ok.clone();
                s.scan_id = uuid::Uuid::new_v4().to_string();
                s.attributes_json = "[1,2]".into();
                s
            },
            "scans[1].attributes",
        ),
        (
            with_lot(scan(K::Scrap, "WO-1000", 10, "ST-10"), "STEEL-L1", "1"),
            "scans[1].defect_code",
        ),
    ];
    for (bad, field) in cases {
        let first = with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "STEEL-L1", "1");
        let err = app
            .submit_as(&operator(), vec![first, bad])
            .await
            .expect_err("must fail");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        let details = err.get_details_bad_request().expect("field violations");
        assert!(
            details.field_violations.iter().any(|v| v.field == field),
            "{field}: {details:?}"
        );
    }
    let too_many: Vec<pb::Scan> = (0..501)
        .map(|_| scan(K::StartOperation, "WO-1000", 10, "ST-10"))
        .collect();
    assert_eq!(
        app.submit_as(&operator(), too_many)
            .await
            .unwrap_err()
            .code(),
        tonic::Code::InvalidArgument
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM scans")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    assert_eq!(app.lot("STEEL-L1").await.quantity_on_hand, "100");
    // No identity, no scan.
    let mut c = app.scans();
    let err = c
        .submit_scans(pb::SubmitScansRequest { scans: vec![ok] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_consumers_never_overconsume() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let channel = app.channel.clone();
        tasks.push(tokio::spawn(async move {
            let q = ["3", "7", "4.5", "9"][i % 4];
            let mut req = tonic::Request::new(pb::SubmitScansRequest {
                scans: vec![with_lot(
                    scan(K::Consume, "WO-1000", 10, "ST-10"),
                    "STEEL-L1",
                    q,
                )],
            });
            operator().write_to(req.metadata_mut());
            let r = pb::scan_ingest_client::ScanIngestClient::new(channel)
                .submit_scans(req)
                .await
                .expect("no error under contention");
            let r = r.into_inner().results.remove(0);
            (q.parse::<rust_decimal::Decimal>().unwrap(), status(&r))
        }));
    }
    let mut sum = rust_decimal::Decimal::ZERO;
    let mut accepted_n = 0;
    for t in tasks {
        let (q, (s, code)) = t.await.unwrap();
        match s {
            S::Accepted => {
                sum += q;
                accepted_n += 1;
            }
            S::Rejected => assert_eq!(code, "insufficient_quantity"),
            other => panic!("unexpected {other:?}"),
        }
    }
    let on_hand: rust_decimal::Decimal =
        app.lot("STEEL-L1").await.quantity_on_hand.parse().unwrap();
    assert_eq!(on_hand, rust_decimal::Decimal::from(100) - sum);
    assert!(on_hand >= rust_decimal::Decimal::ZERO);
    assert!(
        accepted_n > 0 && accepted_n < 32,
        "the lot should run out part way: {accepted_n}"
    );
    assert!(
        scan_ingest::store::ledger::check(&app.pool)
            .await
            .unwrap()
            .is_empty()
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_refuses_negative_inventory_whatever_the_code_does() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    let err = sqlx::query("UPDATE lots SET quantity_on_hand = -1 WHERE lot = 'STEEL-L1'")
        .execute(&app.pool)
        .await
        .unwrap_err();
    assert_eq!(
        err.as_database_error().unwrap().code().as_deref(),
        Some("23514")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_a_client_timeout_never_duplicates() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    let batch: Vec<pb::Scan> = (0..50)
        .map(|_| with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "BOLT-L1", "1"))
        .collect();
    let mut batch_wo = batch.clone();
    for s in &mut batch_wo {
        s.work_order = "WO-1001".into();
        s.station = "ST-20".into();
    }
    // Give up on the client side almost at once; the server may or may not have committed.
    let impatient = mes_common::grpc::channel(
        &format!("http://127.0.0.1:{}", app.port),
        Duration::from_secs(1),
        Duration::from_millis(1),
    )
    .unwrap();
    for _ in 0..3 {
        let mut req = tonic::Request::new(pb::SubmitScansRequest {
            scans: batch_wo.clone(),
        });
        operator().write_to(req.metadata_mut());
        let _ = pb::scan_ingest_client::ScanIngestClient::new(impatient.clone())
            .submit_scans(req)
            .await;
    }
    // Concurrent retries of the same batch, then a final one that must see duplicates.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let ch = app.channel.clone();
        let b = batch_wo.clone();
        tasks.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(pb::SubmitScansRequest { scans: b });
            operator().write_to(req.metadata_mut());
            pb::scan_ingest_client::ScanIngestClient::new(ch)
                .submit_scans(req)
                .await
                .unwrap()
                .into_inner()
                .results
        }));
    }
    for t in tasks {
        for r in t.await.unwrap() {
            assert!(matches!(status(&r).0, S::Accepted | S::Duplicate), "{r:?}");
        }
    }
    for r in app.submit(batch_wo.clone()).await {
        assert_eq!(status(&r).0, S::Duplicate);
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM scans")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, 50);
    assert_eq!(app.lot("BOLT-L1").await.quantity_on_hand, "950");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn void_previews_applies_and_refuses_what_cannot_be_reversed() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    typical_run(&app).await;
    // Both demo orders are completed now: a new order from the ERP.
    app.master()
        .upsert_work_orders(pb::UpsertWorkOrdersRequest {
            items: vec![pb::WorkOrderSpec {
                number: "WO-2000".into(),
                material: "BIKE-100".into(),
                planned_quantity: "2".into(),
                status: "released".into(),
                operations: vec![pb::OperationSpec {
                    step: 10,
                    station: "ST-20".into(),
                    description: "Assembly".into(),
                }],
                components: vec![pb::Component {
                    material: "WHEEL-300".into(),
                    quantity_per_unit: "2".into(),
                }],
            }],
        })
        .await
        .unwrap();
    let consume = with_lot(scan(K::Consume, "WO-2000", 10, "ST-20"), "WHEEL-L1", "4");
    accepted(&app.submit(vec![consume.clone()]).await);
    assert_eq!(app.lot("WHEEL-L1").await.quantity_on_hand, "34");

    let void = |id: &str, confirm: bool, who: mes_common::identity::Caller| {
        let mut req = tonic::Request::new(pb::VoidScanRequest {
            scan_id: id.into(),
            reason: "wrong lot".into(),
            confirm,
        });
        who.write_to(req.metadata_mut());
        let mut c = app.scans();
        async move { c.void_scan(req).await }
    };
    // Operators may not void.
    assert_eq!(
        void(&consume.scan_id, false, operator())
            .await
            .unwrap_err()
            .code(),
        tonic::Code::PermissionDenied
    );
    // Preview changes nothing.
    let preview = void(&consume.scan_id, false, supervisor())
        .await
        .unwrap()
        .into_inner();
    assert!(preview.allowed);
    assert_eq!(preview.effects[0].delta, "4");
    assert_eq!(app.lot("WHEEL-L1").await.quantity_on_hand, "34");
    // Confirm applies a new void scan.
    let done = void(&consume.scan_id, true, supervisor())
        .await
        .unwrap()
        .into_inner();
    assert!(!done.void_scan_id.is_empty());
    assert_eq!(app.lot("WHEEL-L1").await.quantity_on_hand, "38");
    let original = app
        .scans()
        .get_scan(pb::GetScanRequest {
            scan_id: consume.scan_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (original.status.as_str(), original.voided_by.as_str()),
        ("voided", done.void_scan_id.as_str())
    );
    // Twice is a conflict.
    assert_eq!(
        void(&consume.scan_id, true, supervisor())
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Aborted
    );

    // FRAME-L1 was produced (10) and 1 consumed downstream into the bike: its produce cannot be voided.
    let produce_id: uuid::Uuid =
        sqlx::query_scalar("SELECT scan_id FROM scans WHERE kind = 'produce' AND lot = 'FRAME-L1'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let preview = void(&produce_id.to_string(), false, supervisor())
        .await
        .unwrap()
        .into_inner();
    assert!(!preview.allowed);
    assert!(preview.why.contains("downstream"), "{}", preview.why);
    let err = void(&produce_id.to_string(), true, supervisor())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted);
    assert!(err.message().contains("downstream"));
    assert_eq!(app.lot("FRAME-L1").await.quantity_on_hand, "9");
    assert!(
        scan_ingest::store::ledger::check(&app.pool)
            .await
            .unwrap()
            .is_empty()
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_lots_cannot_be_consumed_or_moved_until_released() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    let call = |hold: bool, who: mes_common::identity::Caller, reason: &str| {
        let mut req = tonic::Request::new(pb::LotStatusRequest {
            lot: "WHEEL-L1".into(),
            reason: reason.into(),
        });
        who.write_to(req.metadata_mut());
        let mut c = app.scans();
        async move {
            if hold {
                c.hold_lot(req).await
            } else {
                c.release_lot(req).await
            }
        }
    };
    assert_eq!(
        call(true, operator(), "x").await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        call(true, quality(), " ").await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        call(true, quality(), "supplier recall")
            .await
            .unwrap()
            .into_inner()
            .status,
        "on_hold"
    );
    let mut mv = with_lot(scan(K::Move, "", 0, "ST-20"), "WHEEL-L1", "40");
    mv.location = "QA-CAGE".into();
    let consume = with_lot(scan(K::Consume, "WO-1001", 10, "ST-20"), "WHEEL-L1", "2");
    let r = app.submit(vec![mv.clone(), consume]).await;
    assert_eq!(status(&r[0]), (S::Rejected, "lot_on_hold".into()));
    assert_eq!(status(&r[1]), (S::Rejected, "lot_on_hold".into()));
    assert_eq!(
        call(false, supervisor(), "cleared")
            .await
            .unwrap()
            .into_inner()
            .status,
        "active"
    );
    accepted(&app.submit(vec![mv]).await);
    assert_eq!(app.lot("WHEEL-L1").await.location, "QA-CAGE");
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM event_log WHERE kind = 'lot.status_changed'")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(kinds.len(), 2, "hold and release are events");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_check_reports_a_corrupted_row() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    typical_run(&app).await;
    assert!(
        scan_ingest::store::ledger::check(&app.pool)
            .await
            .unwrap()
            .is_empty()
    );
    sqlx::query("UPDATE lots SET quantity_on_hand = quantity_on_hand + 1 WHERE lot = 'STEEL-L1'")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE work_orders SET produced_quantity = 3 WHERE number = 'WO-1000'")
        .execute(&app.pool)
        .await
        .unwrap();
    let found = scan_ingest::store::ledger::check_and_report(&app.pool)
        .await
        .unwrap();
    let keys: HashSet<(&str, &str)> = found.iter().map(|m| (m.kind, m.key.as_str())).collect();
    assert!(keys.contains(&("lot", "STEEL-L1")), "{found:?}");
    assert!(
        keys.contains(&("work_order_produced", "WO-1000")),
        "{found:?}"
    );
    assert_eq!(found.len(), 2, "{found:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_data_upserts_are_idempotent() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    load_demo_plant(&app).await;
    let again: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(events, again, "an unchanged upsert publishes nothing");
    let r = app
        .master()
        .upsert_materials(pb::UpsertMaterialsRequest {
            items: vec![pb::Material {
                number: "BOLT-400".into(),
                description: "Bolt M6x20".into(),
                tracking: "lot".into(),
                unit: "pcs".into(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.created, r.updated, r.unchanged), (0, 1, 0));
    let err = app
        .master()
        .upsert_materials(pb::UpsertMaterialsRequest {
            items: vec![pb::Material {
                number: "X".into(),
                tracking: "bulk".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.get_details_bad_request().unwrap().field_violations[0].field == "items[0].tracking"
    );
    app.stop().await;
}

/// 16 writers commit events with random delays inside their transactions (so positions are
/// claimed in one order and committed in another); a subscriber must receive every committed
/// event exactly once, in position order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_never_skips_or_repeats_an_event_that_commits_late() {
    use rand::Rng;
    let app = spawn_app().await;
    const WRITERS: usize = 16;
    const PER_WRITER: usize = 64;
    const PER_TX: usize = 10; // 16 * 64 * 10 = 10,240 events
    let mut stream = app
        .feed_client()
        .subscribe(pb::SubscribeRequest {
            after_position: 0,
            consumer: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let collector = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < WRITERS * PER_WRITER * PER_TX {
            match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
                Ok(Ok(Some(e))) => got.push(e),
                other => panic!("feed stopped early after {} events: {other:?}", got.len()),
            }
        }
        got
    });
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let pool = app.pool.clone();
        let feed = app.feed.clone();
        writers.push(tokio::spawn(async move {
            for t in 0..PER_WRITER {
                let mut tx = pool.begin().await.unwrap();
                let events: Vec<pb::Event> = (0..PER_TX)
                    .map(|i| pb::Event {
                        kind: "test.event".into(),
                        traceparent: format!("{w}/{t}/{i}"),
                        ..Default::default()
                    })
                    .collect();
                scan_ingest::store::events::append(&mut tx, &events)
                    .await
                    .unwrap();
                let delay = rand::rng().random_range(0..8);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                tx.commit().await.unwrap();
                feed.committed();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let got = collector.await.unwrap();
    let positions: Vec<u64> = got.iter().map(|e| e.position).collect();
    let expected: Vec<u64> = (1..=(WRITERS * PER_WRITER * PER_TX) as u64).collect();
    assert_eq!(positions, expected, "positions are gap-free and in order");
    let ids: HashSet<&str> = got.iter().map(|e| e.traceparent.as_str()).collect();
    assert_eq!(
        ids.len(),
        WRITERS * PER_WRITER * PER_TX,
        "every committed event exactly once"
    );
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(committed as usize, ids.len());

    // Resuming from a cursor continues without repeats.
    let mut again = app
        .feed_client()
        .subscribe(pb::SubscribeRequest {
            after_position: 10_000,
            consumer: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let next = again.message().await.unwrap().unwrap();
    assert_eq!(next.position, 10_001);
    // Each event says how far the feed's head is: here, every committed event is sequenced.
    assert_eq!(next.head_position, committed as u64);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_events_reach_the_feed_with_their_payload() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    // No operation named: it is resolved from the station and published.
    let s = with_lot(scan(K::Consume, "WO-1000", 0, "ST-10"), "STEEL-L1", "25");
    accepted(&app.submit(vec![s.clone()]).await);
    let mut stream = app
        .feed_client()
        .subscribe(pb::SubscribeRequest {
            after_position: 0,
            consumer: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(pb::event::Payload::ScanAccepted(a)) = e.payload {
            let stored = a.scan.unwrap();
            let published = stored.scan.unwrap();
            assert_eq!(published.scan_id, s.scan_id);
            assert_eq!(published.operation, 10);
            assert_eq!(stored.material, "STEEL-500");
            assert_eq!(stored.operator, "op1");
            break;
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving_with_its_database() {
    let app = spawn_app().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    let mut serving = false;
    for _ in 0..50 {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "mes.v1.ScanIngest".into(),
            })
            .await;
        if r.is_ok_and(|r| {
            r.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        }) {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(serving);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_are_accepted_with_redis_down() {
    // Nothing listens on port 1: every cache call fails fast.
    let app = spawn_app_with(|s| s.service.redis_url = "redis://127.0.0.1:1".into()).await;
    load_demo_plant(&app).await;
    accepted(
        &app.submit(vec![
            scan(K::StartOperation, "WO-1000", 10, "ST-10"),
            with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "STEEL-L1", "2.5"),
        ])
        .await,
    );
    assert_eq!(app.lot("STEEL-L1").await.quantity_on_hand, "97.5");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_cache_is_invalidated_by_master_data_upserts() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    // ST-40 is unknown, and that answer gets cached.
    let at40 = || with_lot(scan(K::Move, "", 0, "ST-40"), "BOLT-L1", "1");
    let mut mv = at40();
    mv.location = "LINE-4".into();
    assert_eq!(
        status(&app.submit(vec![mv]).await[0]),
        (S::Rejected, "unknown_station".into())
    );
    // The cache is filled off the commit path, and invalidated by a background task after the
    // upsert: wait for each (instead of fixed sleeps) so the negative entry is really cached
    // before the upsert, and really gone before the next scan.
    let cached = || app.cached("ref:station:ST-40");
    assert!(
        wait_for(Duration::from_secs(10), || async {
            cached().await.as_deref() == Some("-")
        })
        .await,
        "the unknown station is cached"
    );
    app.master()
        .upsert_stations(pb::UpsertStationsRequest {
            items: vec![pb::Station {
                id: "ST-40".into(),
                name: "Line 4".into(),
            }],
        })
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || async {
            cached().await.is_none()
        })
        .await,
        "the upsert invalidates the cached station"
    );
    let mut mv = at40();
    mv.location = "LINE-4".into();
    accepted(&app.submit(vec![mv]).await);
    app.stop().await;
}

/// A reference-cache fill runs off the commit path, so it can land after the upsert that made
/// its answer stale has already deleted the key (both deletes). It must not leave that answer
/// cached for a whole TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reference_fill_never_outlives_the_invalidation() {
    let app = spawn_app().await;
    let cache = app.refcache.clone();
    let cached = || app.cached("ref:station:ST-77");
    let stations = ["ST-77".to_owned()];

    // A scan's lookup misses and reads "ST-77 does not exist" from the database...
    let before = cache.lookup(&[], &stations).await;
    assert_eq!(before.stations["ST-77"], None);
    let generation = before.generation.expect("Redis answers");
    // ...meanwhile ST-77 is created and the upsert's invalidation runs to the end...
    cache.invalidate(vec![], stations.to_vec());
    assert!(
        wait_for(Duration::from_secs(10), || async {
            cache.lookup(&[], &stations).await.generation.as_ref() != Some(&generation)
        })
        .await,
        "the invalidation bumps the generation"
    );
    tokio::time::sleep(Duration::from_millis(800)).await; // past the second delete
    // ...and only then does the scan's fill arrive: it must not stay.
    cache
        .fill(&generation, &[], &[("ST-77".to_owned(), false)])
        .await;
    assert_eq!(cached().await, None, "a stale fill was left in the cache");

    // A fill from a lookup after the invalidation is kept.
    let after = cache.lookup(&[], &stations).await;
    cache
        .fill(
            after.generation.as_deref().unwrap(),
            &[],
            &[("ST-77".to_owned(), true)],
        )
        .await;
    assert_eq!(cached().await.as_deref(), Some("1"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_coalesces_concurrent_requests_and_acknowledges_after_commit() {
    let app = spawn_app_with(|s| {
        s.group_commit_workers = 1;
        s.group_commit_max_wait_us = 20_000;
    })
    .await;
    load_demo_plant(&app).await;
    let same = with_lot(scan(K::Consume, "WO-1000", 10, "ST-10"), "BOLT-L1", "1");
    let same = pb::Scan {
        work_order: "WO-1001".into(),
        station: "ST-20".into(),
        ..same
    };
    let mut tasks = Vec::new();
    for i in 0..24 {
        let ch = app.channel.clone();
        // Two requests carry the same scan: one is accepted, the other is its duplicate.
        let s = if i < 2 {
            same.clone()
        } else {
            pb::Scan {
                scan_id: uuid::Uuid::new_v4().to_string(),
                ..same.clone()
            }
        };
        tasks.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(pb::SubmitScansRequest { scans: vec![s] });
            operator().write_to(req.metadata_mut());
            pb::scan_ingest_client::ScanIngestClient::new(ch)
                .submit_scans(req)
                .await
                .unwrap()
                .into_inner()
                .results
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(status(&t.await.unwrap()[0]).0);
    }
    assert_eq!(statuses.iter().filter(|s| **s == S::Accepted).count(), 23);
    assert_eq!(statuses.iter().filter(|s| **s == S::Duplicate).count(), 1);
    // Acknowledged means committed: every accepted scan is there, each once.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM scans")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, 23);
    assert_eq!(app.lot("BOLT-L1").await.quantity_on_hand, "977");
    // Scans of one group transaction share its received_at: fewer transactions than requests.
    let transactions: i64 = sqlx::query_scalar("SELECT count(DISTINCT received_at) FROM scans")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(
        transactions < 23,
        "no request was coalesced ({transactions} transactions)"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_mismatch_shows_in_health() {
    let app = spawn_app_with(|s| s.ledger_check_interval_seconds = 1).await;
    load_demo_plant(&app).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    let ledger = || tonic_health::pb::HealthCheckRequest {
        service: "ledger".into(),
    };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let mut wait_for = async |want_serving: bool| {
        for _ in 0..50 {
            if let Ok(r) = health.check(ledger()).await
                && (r.into_inner().status == serving) == want_serving
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    assert!(wait_for(true).await, "ledger never reported healthy");
    sqlx::query("UPDATE lots SET quantity_on_hand = quantity_on_hand - 1 WHERE lot = 'WHEEL-L1'")
        .execute(&app.pool)
        .await
        .unwrap();
    assert!(wait_for(false).await, "the mismatch never showed in health");
    // The service itself keeps serving.
    let overall = tonic_health::pb::health_client::HealthClient::new(app.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(overall, serving);
    app.stop().await;
}
