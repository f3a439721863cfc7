//! The projection applies a feed batch set-based (runs of consecutive `scan.accepted` events
//! with a few statements each): whatever the batch boundaries, it must build the same read
//! model and report the same changes as applying the events one by one. Generated event
//! sequences are applied one per batch and in batches of various sizes, and compared.
//!
//! `a_batch_of_consumes_costs_a_few_statements_whatever_its_size` counts the statements of
//! applying 20,000 consume events in batches of 500 and of 20 (speed is measured by `make bench`).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use mes_proto::v1 as pb;
use pb::event::Payload;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use support::DbGuard;
use trace_query::domain::Changes;
use trace_query::store::apply;

const CONSUMER: &str = "trace-query";
const WORK_ORDERS: [&str; 5] = ["WO-1", "WO-2", "WO-3", "WO-4", ""];
const STATIONS: [&str; 3] = ["ST-1", "ST-2", "ST-3"];
const RECEIVED: [&str; 5] = ["R-1", "R-2", "R-3", "R-4", "R-5"];
const PRODUCED: [&str; 7] = ["P-1", "P-2", "P-3", "P-4", "P-5", "P-6", "P-7"];
const QUANTITIES: [&str; 6] = ["", "1", "2.5", "3.00", "10", "0.125"];
const MATERIALS: [&str; 4] = ["", "M-1", "M-2", "M-3"];

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from[rng.random_range(0..from.len())]
}

/// A generator of plausible (and some implausible) feed events over a small plant, so that
/// lots, work orders and scans collide often.
struct Feed {
    rng: StdRng,
    t0: DateTime<Utc>,
    events: Vec<pb::Event>,
    /// Accepted scans so far (to void or to send again).
    scans: Vec<pb::StoredScan>,
    /// Positions of events this build cannot read, passed through `feed_skips`.
    skips: Vec<i64>,
}

impl Feed {
    fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            t0: "2026-03-02T06:00:00Z".parse().expect("time"),
            events: Vec::new(),
            scans: Vec::new(),
            skips: Vec::new(),
        }
    }

    fn id(&mut self) -> String {
        uuid::Builder::from_random_bytes(self.rng.random())
            .into_uuid()
            .to_string()
    }

    fn at(&mut self) -> DateTime<Utc> {
        self.t0 + TimeDelta::seconds(self.rng.random_range(0..5 * 3600))
    }

    fn push(&mut self, kind: &str, payload: Option<Payload>) {
        let position = self.events.len() as u64 + 1;
        let at = self.t0 + TimeDelta::seconds(position as i64);
        self.events.push(pb::Event {
            position,
            kind: kind.into(),
            occurred_at: Some(ts(at)),
            traceparent: String::new(),
            head_position: position,
            payload,
        });
    }

    fn work_order(&mut self, number: &str) -> pb::WorkOrderSpec {
        let mut operations = vec![
            pb::OperationSpec {
                step: 10,
                station: "ST-1".into(),
                description: "cut".into(),
            },
            pb::OperationSpec {
                step: 20,
                station: pick(&mut self.rng, &STATIONS).into(),
                description: "weld".into(),
            },
        ];
        if self.rng.random_bool(0.6) {
            operations.push(pb::OperationSpec {
                step: 30,
                station: pick(&mut self.rng, &STATIONS).into(),
                description: "paint".into(),
            });
        }
        pb::WorkOrderSpec {
            number: number.into(),
            material: pick(&mut self.rng, &MATERIALS).into(),
            planned_quantity: pick(&mut self.rng, &QUANTITIES).into(),
            status: pick(&mut self.rng, &["released", "in_progress", "completed"]).into(),
            operations,
            components: Vec::new(),
        }
    }

    fn stored(&mut self, scan: pb::Scan) -> pb::StoredScan {
        let received = scan.scanned_at.as_ref().map(|t| prost_types::Timestamp {
            seconds: t.seconds + 1,
            nanos: t.nanos,
        });
        pb::StoredScan {
            scan: Some(scan),
            operator: pick(&mut self.rng, &["op-1", "op-2"]).into(),
            device: String::new(),
            received_at: received,
            status: "active".into(),
            material: pick(&mut self.rng, &MATERIALS).into(),
            traceparent: String::new(),
            ..Default::default()
        }
    }

    fn scan(&mut self, kind: pb::ScanKind) -> pb::Scan {
        let at = self.at();
        let rng = &mut self.rng;
        pb::Scan {
            scan_id: String::new(),
            kind: kind as i32,
            work_order: if rng.random_bool(0.95) {
                pick(rng, &WORK_ORDERS[..4]).into()
            } else {
                String::new()
            },
            operation: *[0u32, 0, 10, 20, 30]
                .get(rng.random_range(0..5))
                .unwrap_or(&0),
            station: pick(rng, &STATIONS).into(),
            material: pick(rng, &MATERIALS).into(),
            quantity: pick(rng, &QUANTITIES).into(),
            scanned_at: Some(ts(at)),
            ..Default::default()
        }
    }

    fn accepted(&mut self, stored: pb::StoredScan) {
        self.scans.push(stored.clone());
        self.push(
            "scan.accepted",
            Some(Payload::ScanAccepted(pb::ScanAccepted {
                scan: Some(stored),
            })),
        );
    }

    fn next_event(&mut self) {
        let roll = self.rng.random_range(0..100);
        use pb::ScanKind as K;
        match roll {
            // Consumes, half of them naming the lot they go into.
            0..=34 => {
                let mut s = self.scan(K::Consume);
                s.scan_id = self.id();
                s.lot = if self.rng.random_bool(0.6) {
                    pick(&mut self.rng, &RECEIVED).into()
                } else {
                    pick(&mut self.rng, &PRODUCED).into()
                };
                if self.rng.random_bool(0.35) {
                    s.into_lot = pick(&mut self.rng, &PRODUCED).into();
                }
                let stored = self.stored(s);
                self.accepted(stored);
            }
            35..=49 => {
                let mut s = self.scan(K::Produce);
                s.scan_id = self.id();
                s.lot = pick(&mut self.rng, &PRODUCED).into();
                let stored = self.stored(s);
                self.accepted(stored);
            }
            50..=64 => {
                let kind = *[
                    K::Inspect,
                    K::Move,
                    K::Scrap,
                    K::StartOperation,
                    K::CompleteOperation,
                    K::CompleteOperation,
                ]
                .get(self.rng.random_range(0..6))
                .unwrap_or(&K::Inspect);
                let mut s = self.scan(kind);
                s.scan_id = self.id();
                if matches!(kind, K::Inspect | K::Move | K::Scrap) {
                    s.lot = pick(&mut self.rng, &PRODUCED).into();
                }
                if kind == K::Inspect {
                    s.result = self.rng.random_range(0..3);
                    s.defect_code = pick(&mut self.rng, &["", "D-1"]).into();
                }
                let stored = self.stored(s);
                self.accepted(stored);
            }
            // The same scan sent again (a replay of a scan the feed already carried).
            65..=69 if !self.scans.is_empty() => {
                let i = self.rng.random_range(0..self.scans.len());
                let stored = self.scans[i].clone();
                self.accepted(stored);
            }
            // Voids: of a known scan (original given, or only its id), of an unknown one.
            70..=78 if !self.scans.is_empty() => {
                let i = self.rng.random_range(0..self.scans.len());
                let original = self.scans[i].clone();
                let o = original.scan.clone().unwrap_or_default();
                let at = self.at();
                let void_scan = pb::Scan {
                    scan_id: self.id(),
                    kind: K::Void as i32,
                    work_order: o.work_order.clone(),
                    station: o.station.clone(),
                    lot: o.lot.clone(),
                    scanned_at: Some(ts(at)),
                    ..Default::default()
                };
                let mut void = self.stored(void_scan);
                let (voids, original) = match self.rng.random_range(0..4) {
                    0 => (o.scan_id.clone(), None),
                    1 => (String::new(), Some(original)),
                    2 if self.rng.random_bool(0.3) => (self.id(), None),
                    _ => (o.scan_id.clone(), Some(original)),
                };
                void.voids = voids;
                self.push(
                    "scan.voided",
                    Some(Payload::ScanVoided(pb::ScanVoided {
                        void_scan: Some(void),
                        original,
                    })),
                );
            }
            79..=85 => {
                let lot = if self.rng.random_bool(0.8) {
                    pick(&mut self.rng, &RECEIVED)
                } else {
                    pick(&mut self.rng, &PRODUCED)
                };
                let at = self.at();
                let l = pb::ReceivedLot {
                    lot: lot.into(),
                    material: pick(&mut self.rng, &MATERIALS).into(),
                    quantity: pick(&mut self.rng, &QUANTITIES).into(),
                    supplier: "ACME".into(),
                    supplier_lot: self.id()[..8].to_owned(),
                    received_at: if self.rng.random_bool(0.8) {
                        Some(ts(at))
                    } else {
                        None
                    },
                };
                self.push("lot.received", Some(Payload::LotReceived(l)));
            }
            86..=91 => {
                let number = pick(&mut self.rng, &WORK_ORDERS[..4]);
                let w = self.work_order(number);
                self.push("work_order.upserted", Some(Payload::WorkOrder(w)));
            }
            92 => {
                let m = pb::Material {
                    number: pick(&mut self.rng, &MATERIALS[1..]).into(),
                    description: self.id()[..6].to_owned(),
                    tracking: "lot".into(),
                    unit: "pcs".into(),
                };
                self.push("material.upserted", Some(Payload::Material(m)));
            }
            93 => {
                let s = pb::Station {
                    id: pick(&mut self.rng, &STATIONS).into(),
                    name: self.id()[..6].to_owned(),
                };
                self.push("station.upserted", Some(Payload::Station(s)));
            }
            94 => {
                // A kind of a newer scan-ingest: passed through feed_skips.
                self.skips.push(self.events.len() as i64 + 1);
                self.push("lot.split", None);
            }
            95 => {
                let lot = pick(&mut self.rng, &PRODUCED).into();
                self.push(
                    "lot.status_changed",
                    Some(Payload::LotStatusChanged(pb::LotStatusChanged {
                        lot,
                        ..Default::default()
                    })),
                );
            }
            // A burst of consumes and produces of one work order, so runs hold both orders.
            _ => {
                let wo = pick(&mut self.rng, &WORK_ORDERS[..4]);
                for _ in 0..self.rng.random_range(2..12) {
                    let kind = if self.rng.random_bool(0.7) {
                        K::Consume
                    } else {
                        K::Produce
                    };
                    let mut s = self.scan(kind);
                    s.scan_id = self.id();
                    s.work_order = wo.into();
                    s.lot = if kind == K::Consume {
                        pick(&mut self.rng, &RECEIVED).into()
                    } else {
                        pick(&mut self.rng, &PRODUCED).into()
                    };
                    let stored = self.stored(s);
                    self.accepted(stored);
                }
            }
        }
    }

    /// About `n` events: master data first, then the generated mix.
    fn generate(seed: u64, n: usize) -> Self {
        let mut f = Self::new(seed);
        for number in &WORK_ORDERS[..3] {
            let w = f.work_order(number);
            f.push("work_order.upserted", Some(Payload::WorkOrder(w)));
        }
        for lot in &RECEIVED[..3] {
            let l = pb::ReceivedLot {
                lot: (*lot).into(),
                material: "M-1".into(),
                quantity: "100".into(),
                supplier: "ACME".into(),
                supplier_lot: format!("S-{lot}"),
                received_at: Some(ts(f.t0)),
            };
            f.push("lot.received", Some(Payload::LotReceived(l)));
        }
        while f.events.len() < n {
            f.next_event();
        }
        f
    }
}

async fn database(name: &str) -> (DbGuard, PgPool) {
    let unique = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let url = format!("postgres://postgres@127.0.0.1:5432/test_tq_{name}_{unique}");
    let guard = DbGuard { url: url.clone() };
    let pool = mes_common::db::prepare(&url, 2, &trace_query::MIGRATOR, Duration::from_secs(30))
        .await
        .expect("database");
    (guard, pool)
}

/// Every table of the read model as text (see `support::read_model`), except that the hourly
/// rollup's figures are compared by value: a batch sums them in memory before adding them to
/// the table, so 3.00 - 3.00 may be written as 0.00 where single events leave 0 (the API
/// prints both as "0").
async fn read_model(pool: &PgPool) -> Vec<(String, Vec<String>)> {
    let mut model = support::read_model(pool).await;
    for (table, rows) in &mut model {
        if table == "production_hourly" {
            *rows = sqlx::query_scalar(
                "SELECT (hour, station, material, work_order, trim_scale(good), trim_scale(scrap),
                         scans)::text AS t
                 FROM production_hourly ORDER BY t",
            )
            .fetch_all(pool)
            .await
            .expect("production_hourly");
        }
    }
    model
}

/// Records the positions of the feed's unreadable events in `feed_skips`.
async fn allow_skips(pool: &PgPool, skips: &[i64]) {
    for position in skips {
        sqlx::query("INSERT INTO feed_skips (consumer, position, reason) VALUES ($1, $2, 'test')")
            .bind(CONSUMER)
            .bind(position)
            .execute(pool)
            .await
            .expect("feed_skips");
    }
}

/// The changes of consecutive batches, as one batch reports them.
fn merge(into: &mut Changes, c: &Changes) {
    into.back_roots.extend(c.back_roots.iter().cloned());
    into.fwd_roots.extend(c.fwd_roots.iter().cloned());
    into.removed_edges.extend(c.removed_edges.iter().cloned());
    into.history.extend(c.history.iter().cloned());
    into.work_orders.extend(c.work_orders.iter().cloned());
    into.new_lots.extend(c.new_lots.iter().cloned());
    into.produced.extend(c.produced.iter().cloned());
    into.reports |= c.reports;
}

/// Batch sizes of a scheme: `size` each, or random ones up to `-size` when negative.
fn batches(events: &[pb::Event], size: i64, seed: u64) -> Vec<&[pb::Event]> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut out = Vec::new();
    let mut rest = events;
    while !rest.is_empty() {
        let n = if size > 0 {
            size as usize
        } else {
            rng.random_range(1..=(-size) as usize)
        };
        let (a, b) = rest.split_at(n.min(rest.len()));
        out.push(a);
        rest = b;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_any_size_build_the_same_read_model_and_changes_as_single_events() {
    let (_g1, singles) = database("single").await;
    let (_g2, batched) = database("batched").await;
    for seed in [1u64, 2, 3] {
        let feed = Feed::generate(seed, 700);
        let events = &feed.events;
        let last = events.len() as i64;
        apply::reset(&singles, CONSUMER).await.expect("reset");
        sqlx::query("TRUNCATE feed_skips")
            .execute(&singles)
            .await
            .expect("truncate");
        allow_skips(&singles, &feed.skips).await;
        // One event per batch: the changes each one makes, by position.
        let mut single: BTreeMap<i64, Changes> = BTreeMap::new();
        for e in events {
            let applied = apply::apply(&singles, CONSUMER, std::slice::from_ref(e))
                .await
                .expect("apply one");
            assert_eq!(applied.events, 1, "seed {seed}: event {}", e.position);
            assert_eq!(applied.stopped, None);
            single.insert(e.position as i64, applied.invalidation.changes);
        }
        let expected = read_model(&singles).await;
        assert_eq!(
            apply::cursor(&singles, CONSUMER).await.expect("cursor"),
            last
        );

        for size in [events.len() as i64, 500, 61, 7, -40, -3] {
            apply::reset(&batched, CONSUMER).await.expect("reset");
            sqlx::query("TRUNCATE feed_skips")
                .execute(&batched)
                .await
                .expect("truncate");
            allow_skips(&batched, &feed.skips).await;
            for batch in batches(events, size, seed) {
                let applied = apply::apply(&batched, CONSUMER, batch)
                    .await
                    .expect("apply batch");
                let (first, end) = (batch[0].position as i64, batch[batch.len() - 1].position);
                assert_eq!(applied.events, batch.len(), "seed {seed}, size {size}");
                assert_eq!(applied.position, end as i64);
                assert_eq!(applied.stopped, None);
                let mut want = Changes::default();
                for c in single.range(first..=end as i64).map(|(_, c)| c) {
                    merge(&mut want, c);
                }
                let mut got = applied.invalidation.changes;
                // (The edges a void deletes come back in the table's physical order.)
                got.removed_edges.sort();
                want.removed_edges.sort();
                assert_eq!(
                    got, want,
                    "seed {seed}, batches of {size}: changes of the batch at {first}..={end}"
                );
            }
            let got = read_model(&batched).await;
            for ((table, a), (_, b)) in expected.iter().zip(&got) {
                assert_eq!(
                    a, b,
                    "seed {seed}, batches of {size}: table {table} differs from one event per batch"
                );
            }
            // The whole feed again: all of it is behind the cursor, nothing changes.
            let again = apply::apply(&batched, CONSUMER, events)
                .await
                .expect("replay");
            assert_eq!((again.events, again.position), (0, last));
            assert_eq!(read_model(&batched).await, got);
        }
    }
    singles.close().await;
    batched.close().await;
}

/// Feed events of a busy plant: `orders` work orders that each produced a lot, then `consumes`
/// consume scans spread over them (each one an edge into its order's lot).
fn consume_feed(orders: usize, consumes: usize) -> Vec<pb::Event> {
    let mut f = Feed::new(42);
    for o in 0..orders {
        let number = format!("WO-{o}");
        let w = f.work_order(&number);
        f.push("work_order.upserted", Some(Payload::WorkOrder(w)));
        let mut s = f.scan(pb::ScanKind::Produce);
        s.scan_id = f.id();
        s.work_order = number;
        s.operation = 20;
        s.lot = format!("OUT-{o}");
        s.quantity = "100".into();
        let stored = f.stored(s);
        f.accepted(stored);
    }
    for i in 0..consumes {
        let mut s = f.scan(pb::ScanKind::Consume);
        s.scan_id = f.id();
        s.work_order = format!("WO-{}", i % orders);
        s.operation = 10;
        s.lot = format!("IN-{}", i % 997);
        s.quantity = "1".into();
        let stored = f.stored(s);
        f.accepted(stored);
    }
    f.events
}

/// The most statements a batch of consume events may cost, whatever its size (measured: 6).
const STATEMENTS_PER_BATCH: u64 = 8;

/// A batch of consume events costs a fixed, small number of statements, however many events it
/// holds (the projection applies runs of scan.accepted set-based): 20,000 events of 50 work
/// orders in batches of 500, then of 20.
#[tokio::test]
async fn a_batch_of_consumes_costs_a_few_statements_whatever_its_size() {
    for size in [500, 20] {
        let (_guard, pool) = database("statements").await;
        let setup = consume_feed(50, 0);
        let n = setup.len() as u64;
        apply::apply(&pool, CONSUMER, &setup).await.expect("setup");
        let mut events = consume_feed(50, 20_000);
        events.drain(..setup.len());
        for (i, e) in events.iter_mut().enumerate() {
            e.position = n + 1 + i as u64;
        }
        let counter = mes_common::testing::StatementCounter::default();
        let counting = counter.install();
        let mut batches = 0;
        for batch in events.chunks(size) {
            apply::apply(&pool, CONSUMER, batch).await.expect("apply");
            batches += 1;
        }
        drop(counting);
        let statements = counter.count();
        println!(
            "{} consume events in {batches} batches of {size}: {statements} statements",
            events.len()
        );
        assert!(statements >= batches, "the counter saw no statements");
        assert!(
            statements <= batches * STATEMENTS_PER_BATCH,
            "{statements} statements for {batches} batches of {size}; at most \
             {STATEMENTS_PER_BATCH} per batch expected"
        );
        pool.close().await;
    }
}
