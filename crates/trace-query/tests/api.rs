//! Black-box tests: a real scan-ingest (the typical run of docs/demo-plant.md via SubmitScans)
//! and trace-query started in-process on :0 against fresh databases, queried over real gRPC.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mes_proto::v1 as pb;
use pb::Direction::{Backward, Forward};
use support::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use trace_query::stats::{CacheResult, Query};

fn node<'a>(g: &'a pb::Genealogy, lot: &str) -> &'a pb::GenealogyNode {
    g.nodes
        .iter()
        .find(|n| n.lot == lot)
        .unwrap_or_else(|| panic!("no node {lot} in {:?}", node_depths(g)))
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_owned(), b.to_owned())
}

async fn health(app: &TraceQueryApp) -> ServingStatus {
    health_of(app, "mes.v1.TraceQuery").await
}

async fn health_of(app: &TraceQueryApp, service: &str) -> ServingStatus {
    HealthClient::new(app.channel())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status())
        .unwrap_or(ServingStatus::Unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_run_is_traceable_backward_and_forward() {
    let env = TestEnv::new().await;
    let app = env.spawn_trace_query(TqOptions::default()).await;
    env.typical_run().await;
    env.settled(&app).await;

    // docs/demo-plant.md, typical run step 3: where did BIKE-S0001 come from?
    let g = app
        .genealogy("BIKE-S0001", Backward, 0)
        .await
        .expect("backward");
    assert_eq!(g.root, "BIKE-S0001");
    assert_eq!(g.direction, Backward as i32);
    assert!(!g.truncated);
    assert_eq!(
        node_depths(&g),
        vec![
            ("BIKE-S0001".into(), 0),
            ("BOLT-L1".into(), 1),
            ("FRAME-L1".into(), 1),
            ("WHEEL-L1".into(), 1),
            ("STEEL-L1".into(), 2),
        ]
    );
    let steel = node(&g, "STEEL-L1");
    assert_eq!(
        (steel.supplier.as_str(), steel.supplier_lot.as_str()),
        ("Acme Steel", "AS-7781")
    );
    assert_eq!(steel.material, "STEEL-500");
    assert_eq!(steel.quantity, "100");
    let bike = node(&g, "BIKE-S0001");
    assert_eq!(
        (
            bike.material.as_str(),
            bike.work_order.as_str(),
            bike.quantity.as_str()
        ),
        ("BIKE-100", "WO-1001", "1")
    );
    assert!(bike.produced_at.is_some());
    let frame = node(&g, "FRAME-L1");
    assert_eq!(
        (frame.work_order.as_str(), frame.quantity.as_str()),
        ("WO-1000", "10")
    );
    assert_eq!(node(&g, "WHEEL-L1").supplier_lot, "RF-2231");
    assert_eq!(
        edge_pairs(&g),
        vec![
            pair("BOLT-L1", "BIKE-S0001"),
            pair("FRAME-L1", "BIKE-S0001"),
            pair("STEEL-L1", "FRAME-L1"),
            pair("WHEEL-L1", "BIKE-S0001"),
        ]
    );
    let steel_edge = g.edges.iter().find(|e| e.from == "STEEL-L1").unwrap();
    assert_eq!(
        (
            steel_edge.work_order.as_str(),
            steel_edge.quantity.as_str(),
            steel_edge.station.as_str(),
            steel_edge.operator.as_str()
        ),
        ("WO-1000", "25", "ST-10", "op1")
    );
    assert!(steel_edge.at.is_some());
    let bolt_edge = g.edges.iter().find(|e| e.from == "BOLT-L1").unwrap();
    assert_eq!(
        (bolt_edge.quantity.as_str(), bolt_edge.station.as_str()),
        ("8", "ST-20")
    );

    // Where did STEEL-L1 go?
    let f = app
        .genealogy("STEEL-L1", Forward, 0)
        .await
        .expect("forward");
    assert_eq!(f.direction, Forward as i32);
    assert_eq!(
        node_depths(&f),
        vec![
            ("STEEL-L1".into(), 0),
            ("FRAME-L1".into(), 1),
            ("BIKE-S0001".into(), 2),
        ]
    );
    assert_eq!(
        edge_pairs(&f),
        vec![pair("FRAME-L1", "BIKE-S0001"), pair("STEEL-L1", "FRAME-L1")]
    );

    // Depth limits cut the walk and say so.
    let short = app
        .genealogy("BIKE-S0001", Backward, 1)
        .await
        .expect("depth 1");
    assert!(short.truncated);
    assert!(short.nodes.iter().all(|n| n.depth <= 1));
    assert!(!edge_pairs(&short).contains(&pair("STEEL-L1", "FRAME-L1")));
    let exact = app
        .genealogy("BIKE-S0001", Backward, 2)
        .await
        .expect("depth 2");
    assert!(!exact.truncated, "nothing lies beyond depth 2");

    // A second identical request is served from the cache.
    let hits = app.state.stats.cache_results(CacheResult::Hit);
    let again = app
        .genealogy("STEEL-L1", Forward, 0)
        .await
        .expect("forward again");
    assert_eq!(again, f);
    assert_eq!(app.state.stats.cache_results(CacheResult::Hit), hits + 1);

    app.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_summary_and_report_of_the_demo_run() {
    let env = TestEnv::new().await;
    let app = env.spawn_trace_query(TqOptions::default()).await;
    let started = chrono::Utc::now() - chrono::TimeDelta::seconds(1);
    // A traced request: the history shows its trace id.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = operator(pb::SubmitScansRequest {
        scans: vec![scan(pb::ScanKind::StartOperation, "WO-1000", 10, "ST-10")],
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    env.scans().submit_scans(req).await.expect("traced scan");
    env.typical_run().await;
    env.caught_up(&app).await;
    let mut client = app.client();
    // The projection adds new lots to the membership filter just after it commits the cursor
    // `caught_up` waits for: until then a new lot may still be filtered out (not cached).
    for lot in ["FRAME-L1", "BIKE-S0001"] {
        let known = wait_for(Duration::from_secs(10), || async {
            app.client()
                .get_lot_history(pb::LotHistoryRequest { lot: lot.into() })
                .await
                .is_ok()
        })
        .await;
        assert!(known, "{lot} is known to trace-query");
    }

    let h = client
        .get_lot_history(pb::LotHistoryRequest {
            lot: "FRAME-L1".into(),
        })
        .await
        .expect("history")
        .into_inner();
    let kinds: Vec<&str> = h.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, vec!["produce", "consume"]);
    assert!(h.events.iter().all(|e| e.operator == "op1"
        && e.received_at.is_some()
        && e.scanned_at.is_some()
        && !e.scan_id.is_empty()));
    assert_eq!(h.events[0].quantity, "10");
    assert_eq!(h.events[1].work_order, "WO-1001");
    let bike = client
        .get_lot_history(pb::LotHistoryRequest {
            lot: "BIKE-S0001".into(),
        })
        .await
        .expect("bike history")
        .into_inner();
    let kinds: Vec<&str> = bike.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        vec!["consume", "consume", "consume", "produce", "inspect"]
    );

    // The traced request's trace id travels with the scan into the history.
    let steel_trace = client
        .get_lot_history(pb::LotHistoryRequest {
            lot: "STEEL-L1".into(),
        })
        .await
        .expect("steel history")
        .into_inner();
    assert_eq!(steel_trace.events.len(), 1);
    let mut traced = pb::Scan {
        lot: "STEEL-L2".into(),
        quantity: "5".into(),
        ..scan(pb::ScanKind::Consume, "WO-1000", 10, "ST-10")
    };
    traced.kind = pb::ScanKind::Move as i32;
    traced.location = "rack-2".into();
    traced.work_order.clear();
    traced.operation = 0;
    let mut req = operator(pb::SubmitScansRequest {
        scans: vec![traced],
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    env.scans().submit_scans(req).await.expect("traced move");
    env.caught_up(&app).await;
    let moved = client
        .get_lot_history(pb::LotHistoryRequest {
            lot: "STEEL-L2".into(),
        })
        .await
        .expect("moved history")
        .into_inner();
    assert_eq!(moved.events.len(), 1);
    assert_eq!(moved.events[0].kind, "move");
    assert_eq!(moved.events[0].trace_id, trace_id);

    let s = client
        .get_work_order_summary(pb::WorkOrderSummaryRequest {
            work_order: "WO-1001".into(),
        })
        .await
        .expect("summary")
        .into_inner();
    assert_eq!(
        (s.planned_quantity.as_str(), s.produced_quantity.as_str()),
        ("10", "1")
    );
    assert_eq!(s.operations.len(), 2);
    let (op10, op20) = (&s.operations[0], &s.operations[1]);
    assert_eq!((op10.step, op10.station.as_str()), (10, "ST-20"));
    assert_eq!(
        (op10.good_quantity.as_str(), op10.scrap_quantity.as_str()),
        ("1", "0")
    );
    assert_eq!(
        (
            op20.step,
            op20.station.as_str(),
            op20.good_quantity.as_str()
        ),
        (20, "ST-30", "0")
    );
    assert!(op10.first_scan_at.is_some() && op10.last_scan_at.is_some());
    assert!(op10.mean_cycle_seconds >= 0.0 && op10.mean_cycle_seconds < 60.0);
    let wo1000 = client
        .get_work_order_summary(pb::WorkOrderSummaryRequest {
            work_order: "WO-1000".into(),
        })
        .await
        .expect("summary 1000")
        .into_inner();
    assert_eq!(wo1000.produced_quantity, "10");
    assert_eq!(wo1000.operations[0].good_quantity, "10");

    let ts = |t: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    };
    let report = |group_by: pb::GroupBy| {
        let mut client = app.client();
        let from = started;
        async move {
            client
                .get_production_report(pb::ProductionReportRequest {
                    from: Some(ts(from - chrono::TimeDelta::hours(3))),
                    to: Some(ts(chrono::Utc::now() + chrono::TimeDelta::seconds(5))),
                    group_by: group_by as i32,
                })
                .await
                .expect("report")
                .into_inner()
                .rows
        }
    };
    let by_station = report(pb::GroupBy::Station).await;
    let row = |rows: &[pb::ReportRow], key: &str| {
        rows.iter()
            .find(|r| r.key == key)
            .map(|r| (r.good.clone(), r.scrap.clone(), r.scans))
            .unwrap_or_else(|| panic!("no row {key} in {rows:?}"))
    };
    // ST-10: 2 starts, consume, produce 10, complete, the move; ST-20: start, 3 consumes, produce, complete.
    assert_eq!(row(&by_station, "ST-10"), ("10".into(), "0".into(), 6));
    assert_eq!(row(&by_station, "ST-20"), ("1".into(), "0".into(), 6));
    assert_eq!(row(&by_station, "ST-30"), ("0".into(), "0".into(), 3));
    let by_wo = report(pb::GroupBy::WorkOrder).await;
    assert_eq!(row(&by_wo, "WO-1000").0, "10");
    assert_eq!(row(&by_wo, "WO-1001").0, "1");
    let by_material = report(pb::GroupBy::Material).await;
    assert_eq!(row(&by_material, "FRAME-200").0, "10");
    let by_hour = report(pb::GroupBy::Hour).await;
    let total: u64 = by_hour.iter().map(|r| r.scans).sum();
    assert_eq!(total, 15, "{by_hour:?}");
    assert!(
        by_hour.iter().all(|r| r.key.ends_with(":00:00Z")),
        "{by_hour:?}"
    );

    app.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_argument_and_unknown_lots_not_found() {
    let env = TestEnv::new().await;
    let app = env.spawn_trace_query(TqOptions::default()).await;
    env.caught_up(&app).await;
    let mut client = app.client();
    let field = |s: &tonic::Status| s.message().split(':').next().unwrap_or_default().to_owned();

    let e = app.genealogy("", Backward, 0).await.unwrap_err();
    assert_eq!((e.code(), field(&e)), (Code::InvalidArgument, "lot".into()));
    let e = app.genealogy("STEEL-L1", Backward, 51).await.unwrap_err();
    assert_eq!(
        (e.code(), field(&e)),
        (Code::InvalidArgument, "max_depth".into())
    );
    let e = client
        .get_genealogy(pb::GenealogyRequest {
            lot: "STEEL-L1".into(),
            direction: 9,
            max_depth: 3,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e)),
        (Code::InvalidArgument, "direction".into())
    );
    let e = client
        .get_lot_history(pb::LotHistoryRequest { lot: " x".into() })
        .await
        .unwrap_err();
    assert_eq!((e.code(), field(&e)), (Code::InvalidArgument, "lot".into()));
    let e = client
        .get_work_order_summary(pb::WorkOrderSummaryRequest {
            work_order: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e)),
        (Code::InvalidArgument, "work_order".into())
    );
    let t = |s: i64| {
        Some(prost_types::Timestamp {
            seconds: s,
            nanos: 0,
        })
    };
    for (from, to, group_by, name) in [
        (t(2000), t(1000), 1, "from"),
        (None, t(1000), 1, "from"),
        (t(1000), None, 1, "to"),
        (t(1000), t(2000), 42, "group_by"),
    ] {
        let e = client
            .get_production_report(pb::ProductionReportRequest { from, to, group_by })
            .await
            .unwrap_err();
        assert_eq!((e.code(), field(&e)), (Code::InvalidArgument, name.into()));
    }

    // Unknown lots and work orders: NOT_FOUND (cached for a short while, and again NOT_FOUND).
    for _ in 0..2 {
        let e = app.genealogy("NO-SUCH-LOT", Forward, 0).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e = client
            .get_lot_history(pb::LotHistoryRequest {
                lot: "NO-SUCH-LOT".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e = client
            .get_work_order_summary(pb::WorkOrderSummaryRequest {
                work_order: "WO-9999".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    // A lot that becomes known is found at once, though "not found" was cached.
    let e = app.genealogy("STEEL-L9", Backward, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    env.master()
        .upsert_received_lots(admin(pb::UpsertReceivedLotsRequest {
            items: vec![pb::ReceivedLot {
                lot: "STEEL-L9".into(),
                material: "STEEL-500".into(),
                quantity: "50".into(),
                supplier: "Acme Steel".into(),
                supplier_lot: "AS-9999".into(),
                received_at: None,
            }],
        }))
        .await
        .expect("receive");
    env.caught_up(&app).await;
    let found = wait_for(Duration::from_secs(1), || async {
        app.genealogy("STEEL-L9", Backward, 0).await.is_ok()
    })
    .await;
    assert!(found, "a newly received lot is found within 1 s");
    let g = app.genealogy("STEEL-L9", Backward, 0).await.unwrap();
    assert_eq!(g.nodes[0].supplier_lot, "AS-9999");
    // Health is published by a background probe loop.
    assert!(
        wait_for(Duration::from_secs(10), || async {
            health(&app).await == ServingStatus::Serving
        })
        .await
    );

    app.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_of_identical_cold_requests_queries_the_database_once() {
    let env = TestEnv::new().await;
    // Two replicas on one database and one Redis: single-flight within each, the Redis lock
    // across them.
    // The replica that finds the lock taken waits for the holder's answer; under load the
    // holder's query can outlast the default 300 ms wait, and the waiter would ask too.
    let options = TqOptions {
        prewarm: Some(false),
        cache_lock_wait_ms: Some(3_000),
        ..Default::default()
    };
    let a = env.spawn_trace_query(options.clone()).await;
    let b = env.spawn_trace_query(options).await;
    env.typical_run().await;
    env.settled(&a).await;
    env.settled(&b).await;
    let before = a.state.stats.db_queries(Query::GenealogyBackward)
        + b.state.stats.db_queries(Query::GenealogyBackward);
    let (misses, coalesced, hits) = {
        let count =
            |r: CacheResult| a.state.stats.cache_results(r) + b.state.stats.cache_results(r);
        (
            count(CacheResult::Miss),
            count(CacheResult::Coalesced),
            count(CacheResult::Hit),
        )
    };

    let mut calls = Vec::new();
    for i in 0..200 {
        let app = if i % 2 == 0 { &a } else { &b };
        let mut client = app.client();
        calls.push(async move {
            client
                .get_genealogy(pb::GenealogyRequest {
                    lot: "BIKE-S0001".into(),
                    direction: Backward as i32,
                    max_depth: 20,
                })
                .await
                .map(|r| r.into_inner())
        });
    }
    let answers = futures::future::join_all(calls).await;
    let first = answers[0].as_ref().expect("answer").clone();
    assert_eq!(first.nodes.len(), 5);
    for r in &answers {
        assert_eq!(r.as_ref().expect("every request is answered"), &first);
    }
    let after = a.state.stats.db_queries(Query::GenealogyBackward)
        + b.state.stats.db_queries(Query::GenealogyBackward);
    assert_eq!(
        after - before,
        1,
        "200 identical cold requests, one database query"
    );
    let count = |r: CacheResult| a.state.stats.cache_results(r) + b.state.stats.cache_results(r);
    assert_eq!(count(CacheResult::Miss) - misses, 1);
    assert_eq!(
        count(CacheResult::Coalesced) - coalesced + count(CacheResult::Hit) - hits,
        199,
        "every other request shared the one answer (in flight, or cached)"
    );

    a.stop().await;
    b.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_unknown_lots_never_reach_the_database() {
    let env = TestEnv::new().await;
    // No pre-warming: every database query counted here is a request's.
    let app = env
        .spawn_trace_query(TqOptions {
            prewarm: Some(false),
            ..Default::default()
        })
        .await;
    env.typical_run().await;
    env.caught_up(&app).await;
    let warm = wait_for(Duration::from_secs(10), || async {
        app.state.cache.filter_ready().await
    })
    .await;
    assert!(warm, "the membership filter is built");
    // Known lots still pass the filter (new lots are added to it just after the projection
    // commits the cursor `caught_up` waits for: poll).
    for (lot, direction) in [("BIKE-S0001", Backward), ("STEEL-L1", Forward)] {
        let known = wait_for(Duration::from_secs(10), || async {
            app.genealogy(lot, direction, 0).await.is_ok()
        })
        .await;
        assert!(known, "known lot {lot} passes the filter");
    }

    let db_before = app.state.stats.all_db_queries();
    let rejected_before = app.state.stats.cache_results(CacheResult::FilterRejected);
    let client = app.client();
    let not_found = futures::stream::iter(0..10_000)
        .map(|i| {
            let mut client = client.clone();
            async move {
                let lot = format!("GHOST-{}", uuid::Uuid::new_v4().simple());
                let code = if i % 2 == 0 {
                    client
                        .get_genealogy(pb::GenealogyRequest {
                            lot,
                            direction: (if i % 4 == 0 { Backward } else { Forward }) as i32,
                            max_depth: 0,
                        })
                        .await
                        .map(|_| ())
                } else {
                    client
                        .get_lot_history(pb::LotHistoryRequest { lot })
                        .await
                        .map(|_| ())
                };
                code.err().map(|s| s.code())
            }
        })
        .buffer_unordered(64)
        .filter(|c| std::future::ready(*c == Some(Code::NotFound)))
        .count()
        .await;
    assert_eq!(not_found, 10_000);
    assert_eq!(
        app.state.stats.all_db_queries() - db_before,
        0,
        "no request for an unknown lot reached PostgreSQL ({} redis errors)",
        app.state.stats.redis_errors()
    );
    assert_eq!(
        app.state.stats.cache_results(CacheResult::FilterRejected) - rejected_before,
        10_000
    );

    app.stop().await;
    env.stop().await;
}

/// Polls `lot`'s genealogy until `check` holds; returns how long that took.
async fn visible_within(
    app: &TraceQueryApp,
    lot: &str,
    direction: pb::Direction,
    since: Instant,
    check: impl Fn(&pb::Genealogy) -> bool,
) -> Duration {
    loop {
        if let Ok(g) = app.genealogy(lot, direction, 0).await
            && check(&g)
        {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "{lot} {direction:?}: change not visible after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_edge_is_visible_within_a_second_in_a_cached_trace() {
    let env = TestEnv::new().await;
    let app = env.spawn_trace_query(TqOptions::default()).await;
    env.typical_run().await;
    env.frame_l2_from_steel_l2().await;
    env.settled(&app).await;

    // Cache both traces and check they are served from the cache.
    let back = app.genealogy("FRAME-L2", Backward, 0).await.expect("frame");
    assert_eq!(edge_pairs(&back), vec![pair("STEEL-L2", "FRAME-L2")]);
    let fwd = app.genealogy("STEEL-L1", Forward, 0).await.expect("steel");
    assert!(!fwd.nodes.iter().any(|n| n.lot == "FRAME-L2"));
    let hits = app.state.stats.cache_results(CacheResult::Hit);
    app.genealogy("FRAME-L2", Backward, 0).await.unwrap();
    app.genealogy("STEEL-L1", Forward, 0).await.unwrap();
    assert_eq!(app.state.stats.cache_results(CacheResult::Hit), hits + 2);

    // A consume after the produce links the consumed lot to the lot already produced.
    let consume = with_lot(
        scan(pb::ScanKind::Consume, "WO-2000", 0, "ST-10"),
        "STEEL-L1",
        "5",
    );
    let consume_id = consume.scan_id.clone();
    env.submit(vec![consume]).await;
    let t0 = Instant::now();
    let d1 = visible_within(&app, "FRAME-L2", Backward, t0, |g| {
        edge_pairs(g).contains(&pair("STEEL-L1", "FRAME-L2"))
    })
    .await;
    let d2 = visible_within(&app, "STEEL-L1", Forward, t0, |g| {
        g.nodes.iter().any(|n| n.lot == "FRAME-L2" && n.depth == 1)
    })
    .await;
    assert!(
        d1 < Duration::from_secs(1) && d2 < Duration::from_secs(1),
        "{d1:?} {d2:?}"
    );

    // A lot the work order produces later gets every earlier input too.
    env.settled(&app).await;
    app.genealogy("STEEL-L1", Forward, 0).await.unwrap();
    let hits = app.state.stats.cache_results(CacheResult::Hit);
    app.genealogy("STEEL-L1", Forward, 0).await.unwrap();
    assert_eq!(
        app.state.stats.cache_results(CacheResult::Hit),
        hits + 1,
        "cached again"
    );
    env.submit(vec![with_lot(
        scan(pb::ScanKind::Produce, "WO-2000", 0, "ST-10"),
        "FRAME-L3",
        "2",
    )])
    .await;
    let t0 = Instant::now();
    let d = visible_within(&app, "STEEL-L1", Forward, t0, |g| {
        g.nodes.iter().any(|n| n.lot == "FRAME-L3")
    })
    .await;
    assert!(d < Duration::from_secs(1), "{d:?}");
    let g = app.genealogy("FRAME-L3", Backward, 0).await.unwrap();
    assert_eq!(
        edge_pairs(&g),
        vec![pair("STEEL-L1", "FRAME-L3"), pair("STEEL-L2", "FRAME-L3")]
    );

    // A voided consume removes its edges, also from cached traces.
    app.genealogy("FRAME-L2", Backward, 0).await.unwrap();
    env.void(&consume_id).await;
    let t0 = Instant::now();
    let d = visible_within(&app, "STEEL-L1", Forward, t0, |g| {
        !g.nodes
            .iter()
            .any(|n| n.lot == "FRAME-L2" || n.lot == "FRAME-L3")
    })
    .await;
    assert!(d < Duration::from_secs(1), "{d:?}");
    let g = app.genealogy("FRAME-L2", Backward, 0).await.unwrap();
    assert_eq!(edge_pairs(&g), vec![pair("STEEL-L2", "FRAME-L2")]);

    // A voided produce removes the work order's edges into that lot.
    let produce = with_lot(
        scan(pb::ScanKind::Produce, "WO-2000", 0, "ST-10"),
        "FRAME-L4",
        "1",
    );
    let produce_id = produce.scan_id.clone();
    env.submit(vec![produce]).await;
    env.caught_up(&app).await;
    let g = app.genealogy("STEEL-L2", Forward, 0).await.unwrap();
    assert!(g.nodes.iter().any(|n| n.lot == "FRAME-L4"));
    env.void(&produce_id).await;
    let d = visible_within(&app, "STEEL-L2", Forward, Instant::now(), |g| {
        !g.nodes.iter().any(|n| n.lot == "FRAME-L4")
    })
    .await;
    assert!(d < Duration::from_secs(1), "{d:?}");

    app.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_keep_answering_with_redis_stopped_and_recover() {
    let mut redis = RedisServer::start().await;
    let env = TestEnv::new().await;
    let app = env
        .spawn_trace_query(TqOptions {
            redis_url: Some(redis.url()),
            redis_timeout_ms: Some(250),
            ..Default::default()
        })
        .await;
    env.typical_run().await;
    env.add_frame_work_order("WO-2000").await;
    env.settled(&app).await;
    let g = app
        .genealogy("STEEL-L1", Forward, 0)
        .await
        .expect("forward");
    let hits = app.state.stats.cache_results(CacheResult::Hit);
    assert_eq!(app.genealogy("STEEL-L1", Forward, 0).await.unwrap(), g);
    assert_eq!(app.state.stats.cache_results(CacheResult::Hit), hits + 1);

    // Redis dies: every query is still answered, promptly, from PostgreSQL.
    redis.kill().await;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        let started = Instant::now();
        let answer = app.genealogy("STEEL-L1", Forward, 0).await;
        assert_eq!(answer.expect("answered without redis"), g);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        app.genealogy("NO-SUCH-LOT", Backward, 0)
            .await
            .expect_err("unknown lots are still not found");
    }
    assert!(
        !app.state.cache.redis_available(),
        "redis is reported unavailable"
    );
    assert_eq!(
        health(&app).await,
        ServingStatus::Serving,
        "health stays SERVING"
    );
    // Changes keep flowing into the answers.
    env.submit(vec![
        scan(pb::ScanKind::StartOperation, "WO-2000", 10, "ST-10"),
        with_lot(
            scan(pb::ScanKind::Consume, "WO-2000", 0, "ST-10"),
            "STEEL-L1",
            "10",
        ),
        with_lot(
            scan(pb::ScanKind::Produce, "WO-2000", 0, "ST-10"),
            "FRAME-L2",
            "4",
        ),
    ])
    .await;
    env.caught_up(&app).await;
    let g = app.genealogy("STEEL-L1", Forward, 0).await.unwrap();
    assert!(g.nodes.iter().any(|n| n.lot == "FRAME-L2"));

    // Redis comes back (empty): the cache is used again, automatically.
    redis.restart().await;
    let back = wait_for(Duration::from_secs(10), || async {
        app.state.cache.redis_available()
    })
    .await;
    assert!(back, "the cache is used again once redis answers");
    let serving = wait_for(Duration::from_secs(10), || async {
        health_of(&app, trace_query::REDIS_HEALTH).await == ServingStatus::Serving
    })
    .await;
    assert!(serving, "the cache is reported healthy again");
    env.settled(&app).await;
    assert_eq!(app.genealogy("STEEL-L1", Forward, 0).await.unwrap(), g);
    let hits = app.state.stats.cache_results(CacheResult::Hit);
    assert_eq!(app.genealogy("STEEL-L1", Forward, 0).await.unwrap(), g);
    assert_eq!(app.state.stats.cache_results(CacheResult::Hit), hits + 1);
    let rebuilt = wait_for(Duration::from_secs(10), || async {
        app.state.cache.filter_ready().await
    })
    .await;
    assert!(rebuilt, "the membership filter is rebuilt in the new redis");

    // Redis freezes (connections open, no answers) while a change is applied: the deletion
    // that could not happen is replayed before the cache is used again, so no stale answer.
    redis.signal("-STOP");
    env.submit(vec![with_lot(
        scan(pb::ScanKind::Produce, "WO-2000", 0, "ST-10"),
        "FRAME-L3",
        "2",
    )])
    .await;
    env.caught_up(&app).await;
    let g3 = app
        .genealogy("STEEL-L1", Forward, 0)
        .await
        .expect("answered");
    assert!(g3.nodes.iter().any(|n| n.lot == "FRAME-L3"));
    redis.signal("-CONT");
    let back = wait_for(Duration::from_secs(10), || async {
        app.state.cache.redis_available()
    })
    .await;
    assert!(back);
    let g = app.genealogy("STEEL-L1", Forward, 0).await.unwrap();
    assert!(
        g.nodes.iter().any(|n| n.lot == "FRAME-L3"),
        "no stale answer after recovery"
    );

    app.stop().await;
    env.stop().await;
    redis.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_from_zero_gives_the_same_read_model() {
    let env = TestEnv::new().await;
    let app = env.spawn_trace_query(TqOptions::default()).await;
    env.typical_run().await;
    env.add_frame_work_order("WO-2000").await;
    let consume = with_lot(
        scan(pb::ScanKind::Consume, "WO-2000", 0, "ST-10"),
        "STEEL-L2",
        "7.5",
    );
    let consume_id = consume.scan_id.clone();
    env.submit(vec![
        scan(pb::ScanKind::StartOperation, "WO-2000", 10, "ST-10"),
        consume,
        with_lot(
            scan(pb::ScanKind::Consume, "WO-2000", 0, "ST-10"),
            "STEEL-L1",
            "5",
        ),
        with_lot(
            scan(pb::ScanKind::Produce, "WO-2000", 0, "ST-10"),
            "FRAME-L2",
            "3",
        ),
        {
            let mut s = with_lot(
                scan(pb::ScanKind::Scrap, "WO-2000", 0, "ST-10"),
                "FRAME-L2",
                "1",
            );
            s.defect_code = "D-1".into();
            s
        },
    ])
    .await;
    env.void(&consume_id).await;
    let head = env.caught_up(&app).await;
    let pool = app.state.pool.clone();
    let before = read_model(&pool).await;
    assert!(
        before.iter().all(|(_, rows)| !rows.is_empty()),
        "{before:?}"
    );
    let answer = app.genealogy("BIKE-S0001", Backward, 0).await.unwrap();

    app.state.projection.rebuild().await.expect("rebuild");
    assert!(app.state.projection.position().await.unwrap() < head);
    env.caught_up(&app).await;
    let after = read_model(&pool).await;
    for ((table, a), (_, b)) in before.iter().zip(&after) {
        assert_eq!(a, b, "table {table} differs after the rebuild");
    }
    assert_eq!(
        app.genealogy("BIKE-S0001", Backward, 0).await.unwrap(),
        answer
    );

    app.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_reconnects_after_scan_ingest_restarts_without_loss_or_duplication() {
    let mut env = TestEnv::new().await;
    let app = env.spawn_trace_query(TqOptions::default()).await;
    env.demo_step_1().await;
    env.caught_up(&app).await;

    // scan-ingest restarts on the same database and port.
    env.stop_scan_ingest().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.start_scan_ingest().await;
    env.demo_step_2().await;
    env.caught_up(&app).await;

    // trace-query restarts too, and scans keep coming.
    app.stop().await;
    env.frame_l2_from_steel_l2().await;
    let app = env.spawn_trace_query(TqOptions::default()).await;
    let head = env.caught_up(&app).await;
    assert_eq!(app.state.projection.position().await.unwrap(), head);

    // Exactly the scans scan-ingest stored, each once, with their effects once.
    let si_scans: BTreeSet<uuid::Uuid> = sqlx::query_scalar("SELECT scan_id FROM scans")
        .fetch_all(env.si_pool())
        .await
        .unwrap()
        .into_iter()
        .collect();
    let tq_scans: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT scan_id FROM scans")
        .fetch_all(&app.state.pool)
        .await
        .unwrap();
    assert_eq!(tq_scans.len(), si_scans.len());
    assert_eq!(tq_scans.into_iter().collect::<BTreeSet<_>>(), si_scans);
    let counted: i64 =
        sqlx::query_scalar("SELECT COALESCE(sum(scans), 0)::bigint FROM production_hourly")
            .fetch_one(&app.state.pool)
            .await
            .unwrap();
    assert_eq!(counted as usize, si_scans.len(), "each scan counted once");
    let mut client = app.client();
    let wo = client
        .get_work_order_summary(pb::WorkOrderSummaryRequest {
            work_order: "WO-1000".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        wo.produced_quantity, "10",
        "the produce of FRAME-L1 counted once"
    );
    let g = app.genealogy("BIKE-S0001", Backward, 0).await.unwrap();
    assert_eq!(g.edges.len(), 4, "each edge once: {:?}", edge_pairs(&g));
    let f = app.genealogy("STEEL-L2", Forward, 0).await.unwrap();
    assert_eq!(edge_pairs(&f), vec![pair("STEEL-L2", "FRAME-L2")]);

    app.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_and_reflection_lists_trace_query() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let env = TestEnv::new().await;
    let app = env.spawn_trace_query(TqOptions::default()).await;
    let serving = wait_for(Duration::from_secs(10), || async {
        health(&app).await == ServingStatus::Serving
    })
    .await;
    assert!(serving);
    let mut reflection = ServerReflectionClient::new(app.channel());
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .expect("reflection call")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == "mes.v1.TraceQuery"), "{names:?}");
    assert!(
        names.iter().any(|n| n == "grpc.health.v1.Health"),
        "{names:?}"
    );
    app.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_plant_loads_identically_in_bulk_and_through_the_projection() {
    use mes_datagen::{self as datagen, Plan};
    let unique = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let urls = [
        format!("postgres://postgres@127.0.0.1:5432/test_tq_bulk_{unique}"),
        format!("postgres://postgres@127.0.0.1:5432/test_tq_events_{unique}"),
    ];
    let _guards: Vec<DbGuard> = urls.iter().map(|u| DbGuard { url: u.clone() }).collect();
    let mut pools = Vec::new();
    for url in &urls {
        pools.push(
            mes_common::db::prepare(url, 4, &trace_query::MIGRATOR, Duration::from_secs(30))
                .await
                .expect("database"),
        );
    }
    let plan = Plan {
        lots: 62,
        depth: 5,
        fan_in: 4,
        extra_scans: 1,
        seed: 7,
        start: Some(chrono::Utc::now() - chrono::TimeDelta::days(40)),
    };
    let mut quiet = |_: u64, _: u64| {};
    let n = datagen::load_bulk(&pools[0], &plan, "mes-datagen", &mut quiet)
        .await
        .expect("bulk load");
    let m = datagen::load_events(&pools[1], &plan, "mes-datagen", &mut quiet)
        .await
        .expect("event load");
    assert_eq!(n, m);
    let (bulk, events) = (read_model(&pools[0]).await, read_model(&pools[1]).await);
    for ((table, a), (_, b)) in bulk.iter().zip(&events) {
        assert_eq!(a, b, "table {table}: bulk load differs from the projection");
    }
    let scans = bulk.iter().find(|(t, _)| t == "scans").unwrap().1.len() as u64;
    assert_eq!(scans, 50 * plan.scans_per_order());

    // The top lots trace back over every level, each order to its fan-in of inputs.
    let g = trace_query::store::queries::genealogy(
        &pools[0],
        &plan.lot_name(5, 0),
        trace_query::domain::Direction::Backward,
        50,
    )
    .await
    .expect("query")
    .expect("known lot");
    assert_eq!(g.nodes.iter().map(|n| n.depth).max(), Some(5));
    assert!(!g.truncated);
    for n in g.nodes.iter().filter(|n| n.depth < 5) {
        let inputs = g.edges.iter().filter(|e| e.to == n.lot).count();
        assert_eq!(inputs, 4, "{} has {inputs} inputs", n.lot);
    }
    assert!(
        g.nodes
            .iter()
            .filter(|n| n.depth == 5)
            .all(|n| n.lot.starts_with("RAW-") && !n.supplier_lot.is_empty())
    );
    for p in pools {
        p.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_plant_loads_through_scan_ingest_and_is_traced_to_full_depth() {
    use mes_datagen::{self as datagen, Plan};
    let env = TestEnv::new().await;
    let app = env.spawn_trace_query(TqOptions::default()).await;
    let plan = Plan {
        lots: 40,
        depth: 3,
        fan_in: 3,
        extra_scans: 0,
        seed: 11,
        start: Some(chrono::Utc::now() - chrono::TimeDelta::days(40)),
    };
    let url = format!("http://127.0.0.1:{}", env.si.as_ref().unwrap().port);
    let caller = mes_common::identity::Caller::system("mes-datagen");
    // Signed with the internal key the harness gives the services.
    let key = mes_common::identity::CallerKey::from_config(mes_common::testing::INTERNAL_KEY);
    let mut quiet = |_: u64, _: u64| {};
    datagen::load_grpc(&url, &plan, &caller, key.clone(), &mut quiet)
        .await
        .expect("load through scan-ingest");
    // Loading again changes nothing: the same scan ids come back as duplicates.
    datagen::load_grpc(&url, &plan, &caller, key, &mut quiet)
        .await
        .expect("reload");
    env.caught_up(&app).await;
    let orders: u64 = (1..=3).map(|l| plan.level_size(l)).sum();
    let scans: i64 = sqlx::query_scalar("SELECT count(*) FROM scans")
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
    assert_eq!(scans as u64, orders * plan.scans_per_order());
    // The lots of the last batch enter the membership filter just after the cursor commit.
    for (lot, direction) in [
        (plan.lot_name(3, 0), Backward),
        (plan.lot_name(0, 0), Forward),
    ] {
        let known = wait_for(Duration::from_secs(10), || async {
            app.genealogy(&lot, direction, 0).await.is_ok()
        })
        .await;
        assert!(known, "{lot} is known to trace-query");
    }
    let g = app
        .genealogy(&plan.lot_name(3, 0), Backward, 0)
        .await
        .expect("top lot");
    assert_eq!(g.nodes.iter().map(|n| n.depth).max(), Some(3));
    let f = app
        .genealogy(&plan.lot_name(0, 0), Forward, 0)
        .await
        .expect("raw lot");
    assert_eq!(f.nodes.iter().map(|n| n.depth).max(), Some(3));
    app.stop().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_are_sent_as_stored_and_equal_the_database_ones() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_trace_query(TqOptions {
            prewarm: Some(false),
            ..Default::default()
        })
        .await;
    env.typical_run().await;
    env.settled(&app).await;
    let pool = app.state.pool.clone();
    let hits = || app.state.stats.cache_results(CacheResult::Hit);
    let mut client = app.client();

    // Genealogy, both directions: the first answer is loaded (and stored), the second is the
    // cached bytes as they are; both equal the database's answer.
    for (lot, direction) in [("BIKE-S0001", Backward), ("STEEL-L1", Forward)] {
        let request = pb::GenealogyRequest {
            lot: lot.into(),
            direction: direction as i32,
            max_depth: 0,
        };
        let loaded = client.get_genealogy(request.clone()).await.unwrap();
        let before = hits();
        let cached = client.get_genealogy(request).await.unwrap();
        assert_eq!(
            hits(),
            before + 1,
            "{lot}: the second answer is a cache hit"
        );
        let direction = trace_query::domain::Direction::from_proto(direction as i32).unwrap();
        let truth = trace_query::store::queries::genealogy(
            &pool,
            lot,
            direction,
            trace_query::domain::DEFAULT_DEPTH,
        )
        .await
        .unwrap()
        .expect("known lot");
        assert!(truth.nodes.len() > 1, "{lot}: {truth:?}");
        assert_eq!(loaded.into_inner(), truth, "{lot}: loaded answer");
        assert_eq!(cached.into_inner(), truth, "{lot}: cached answer");
    }

    // History and work-order summary: the cached answer equals the loaded one and the database's.
    let request = pb::LotHistoryRequest {
        lot: "FRAME-L1".into(),
    };
    let loaded = client.get_lot_history(request.clone()).await.unwrap();
    let before = hits();
    let cached = client.get_lot_history(request).await.unwrap();
    assert_eq!(hits(), before + 1);
    let truth = trace_query::store::queries::history(&pool, "FRAME-L1")
        .await
        .unwrap()
        .expect("known lot");
    assert!(!truth.events.is_empty());
    assert_eq!(loaded.into_inner(), truth);
    assert_eq!(cached.into_inner(), truth);

    let request = pb::WorkOrderSummaryRequest {
        work_order: "WO-1000".into(),
    };
    let loaded = client
        .get_work_order_summary(request.clone())
        .await
        .unwrap();
    let before = hits();
    let cached = client.get_work_order_summary(request).await.unwrap();
    assert_eq!(hits(), before + 1);
    let truth = trace_query::store::queries::work_order_summary(&pool, "WO-1000")
        .await
        .unwrap()
        .expect("known work order");
    assert_eq!(loaded.into_inner(), truth);
    assert_eq!(cached.into_inner(), truth);

    // Errors still come as statuses: an unknown lot, a cached "not found", a bad request.
    for _ in 0..2 {
        let e = client
            .get_genealogy(pb::GenealogyRequest {
                lot: "NO-SUCH-LOT".into(),
                direction: Backward as i32,
                max_depth: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    }
    let e = client
        .get_lot_history(pb::LotHistoryRequest { lot: "".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    app.stop().await;
    env.stop().await;
}
