//! `make bench`: the whole stack measured side by side with baselines taken in the same run on
//! the same machine.
//!
//! - **write**: concurrent tablets each submitting one `consume` scan per request, through
//!   scan-ingest's gRPC API and through the gateway's REST API, against `pgbench` running the
//!   same SQL (the same idempotency check, row locks, scan insert, inventory update and event
//!   append) one scan per transaction on a database of the same schema;
//! - **read**: a cached backward genealogy through trace-query's gRPC API against
//!   `redis-benchmark` GETting a value of the same size (the cache's floor), and against `pgbench`
//!   running trace-query's own genealogy statement (what every query would cost without the cache);
//! - **memory**: the peak resident set of each service after the runs.
//!
//! Settings (environment): `MES_BENCH_CLIENTS` (32), `MES_BENCH_SECONDS` (15 per run),
//! `MES_BENCH_WORK_ORDERS` (8: the write load is spread over this many work orders and lots).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use mes_common::grpc::TracePropagation;
use mes_common::identity::CallerKey;
use mes_e2e::System;
use mes_proto::v1 as pb;
use mes_proto::v1::master_data_client::MasterDataClient;
use mes_proto::v1::scan_ingest_client::ScanIngestClient;
use mes_proto::v1::trace_query_client::TraceQueryClient;
use sqlx::Connection;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A channel whose calls carry the trace context and a caller identity signed with the
/// system's internal key, as the services' own clients do.
type Signed = InterceptedService<Channel, TracePropagation>;

async fn connect(sys: &System, service: &str) -> anyhow::Result<Signed> {
    let url = format!("http://127.0.0.1:{}", sys.grpc[service]);
    let channel = Channel::from_shared(url)?.connect().await?;
    Ok(InterceptedService::new(
        channel,
        TracePropagation::signing(CallerKey::from_config(&sys.internal_key)),
    ))
}

/// Genealogy levels seeded for the read runs: `BM-0` (received) → `BM-1` → … → `BM-LEVELS`.
const LEVELS: usize = 4;

struct Settings {
    clients: usize,
    seconds: u64,
    work_orders: usize,
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        let var = |k: &str, default: u64| -> anyhow::Result<u64> {
            match std::env::var(k) {
                Ok(v) => v
                    .parse()
                    .with_context(|| format!("{k}: not a positive integer: {v:?}")),
                Err(_) => Ok(default),
            }
        };
        let s = Self {
            clients: var("MES_BENCH_CLIENTS", 32)? as usize,
            seconds: var("MES_BENCH_SECONDS", 15)?,
            work_orders: var("MES_BENCH_WORK_ORDERS", 8)? as usize,
        };
        ensure!(
            s.clients > 0 && s.seconds > 0 && s.work_orders > 0,
            "MES_BENCH_* must be > 0"
        );
        Ok(s)
    }
}

/// What one run measured.
#[derive(Default)]
struct Figures {
    ops: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u64>,
    /// The first failure, to say why when there are errors.
    first_error: Option<String>,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us.sort_unstable();
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }

    fn summary(&mut self, unit: &str) -> String {
        format!(
            "{:>9.0} {unit}/s  p50 {:>6.2} ms  p99 {:>6.2} ms{}",
            self.rate(),
            self.percentile_ms(0.50),
            self.percentile_ms(0.99),
            if self.errors > 0 {
                format!(
                    "  ({} errors; first: {})",
                    self.errors,
                    self.first_error.as_deref().unwrap_or("?")
                )
            } else {
                String::new()
            }
        )
    }
}

/// Runs `clients` copies of `op` for `seconds`; each call says whether it succeeded.
async fn drive<F, Fut>(clients: usize, seconds: u64, op: F) -> Figures
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut f = Figures::default();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match op(c, n).await {
                        Ok(()) => {
                            f.ops += 1;
                            f.latencies_us.push(t.elapsed().as_micros() as u64);
                        }
                        Err(e) => {
                            f.errors += 1;
                            f.first_error.get_or_insert(e);
                        }
                    }
                    n += 1;
                }
                f
            })
        })
        .collect();
    let mut all = Figures::default();
    for t in tasks {
        let f = t.await.expect("bench task");
        all.ops += f.ops;
        all.errors += f.errors;
        all.latencies_us.extend(f.latencies_us);
        if all.first_error.is_none() {
            all.first_error = f.first_error;
        }
    }
    all.elapsed = start.elapsed();
    all
}

fn now() -> Option<prost_types::Timestamp> {
    let n = chrono::Utc::now();
    Some(prost_types::Timestamp {
        seconds: n.timestamp(),
        nanos: n.timestamp_subsec_nanos() as i32,
    })
}

fn scan(kind: pb::ScanKind, wo: &str, station: &str) -> pb::Scan {
    pb::Scan {
        scan_id: uuid::Uuid::new_v4().to_string(),
        kind: kind as i32,
        work_order: wo.into(),
        operation: 10,
        station: station.into(),
        scanned_at: now(),
        ..Default::default()
    }
}

fn with_lot(mut s: pb::Scan, lot: &str, quantity: &str) -> pb::Scan {
    s.lot = lot.into();
    s.quantity = quantity.into();
    s
}

fn as_operator<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("x-mes-user", "bench".parse().unwrap());
    r.metadata_mut()
        .insert("x-mes-roles", "operator".parse().unwrap());
    r
}

async fn submit(si: &mut ScanIngestClient<Signed>, scans: Vec<pb::Scan>) -> anyhow::Result<()> {
    let results = si
        .submit_scans(as_operator(pb::SubmitScansRequest { scans }))
        .await?
        .into_inner()
        .results;
    for r in results {
        ensure!(
            r.status == pb::ScanStatus::Accepted as i32,
            "seed scan refused: {r:?}"
        );
    }
    Ok(())
}

fn wo_write(i: usize) -> String {
    format!("BENCH-WO-{i}")
}
fn raw_lot(i: usize) -> String {
    format!("BENCH-RAW-{i}")
}
fn station(i: usize) -> String {
    format!("BENCH-ST-{i}")
}

/// The bench plant: materials `BM-0..=BM-LEVELS`, one work order, station and huge raw lot per
/// write lane, and a genealogy chain `BENCH-G-0` → … → `BENCH-G-LEVELS` for the read runs.
async fn seed(sys: &System, s: &Settings) -> anyhow::Result<String> {
    let channel = connect(sys, "scan-ingest").await?;
    let mut md = MasterDataClient::new(channel.clone());
    let mut si = ScanIngestClient::new(channel);
    md.upsert_materials(pb::UpsertMaterialsRequest {
        items: (0..=LEVELS)
            .map(|l| pb::Material {
                number: format!("BM-{l}"),
                description: format!("bench material level {l}"),
                tracking: "lot".into(),
                unit: "pcs".into(),
            })
            .collect(),
    })
    .await?;
    let lanes = s.work_orders.max(LEVELS + 1);
    md.upsert_stations(pb::UpsertStationsRequest {
        items: (0..lanes)
            .map(|i| pb::Station {
                id: station(i),
                name: format!("bench station {i}"),
            })
            .collect(),
    })
    .await?;
    let mut lots: Vec<pb::ReceivedLot> = (0..s.work_orders)
        .map(|i| pb::ReceivedLot {
            lot: raw_lot(i),
            material: "BM-0".into(),
            quantity: "1000000000".into(),
            supplier: "Bench Supplier".into(),
            supplier_lot: format!("BS-{i}"),
            received_at: None,
        })
        .collect();
    lots.push(pb::ReceivedLot {
        lot: "BENCH-G-0".into(),
        material: "BM-0".into(),
        quantity: "10".into(),
        supplier: "Bench Supplier".into(),
        supplier_lot: "BS-G".into(),
        received_at: None,
    });
    md.upsert_received_lots(pb::UpsertReceivedLotsRequest { items: lots })
        .await?;
    let order = |number: String, material: &str, component: &str, st: String| pb::WorkOrderSpec {
        number,
        material: material.into(),
        planned_quantity: "1000000000".into(),
        status: "released".into(),
        operations: vec![pb::OperationSpec {
            step: 10,
            station: st,
            description: "bench".into(),
        }],
        components: vec![pb::Component {
            material: component.into(),
            quantity_per_unit: "1".into(),
        }],
    };
    let mut wos: Vec<pb::WorkOrderSpec> = (0..s.work_orders)
        .map(|i| order(wo_write(i), "BM-1", "BM-0", station(i)))
        .collect();
    for l in 1..=LEVELS {
        wos.push(order(
            format!("BENCH-GWO-{l}"),
            &format!("BM-{l}"),
            &format!("BM-{}", l - 1),
            station(l),
        ));
    }
    md.upsert_work_orders(pb::UpsertWorkOrdersRequest { items: wos })
        .await?;

    for i in 0..s.work_orders {
        submit(
            &mut si,
            vec![scan(
                pb::ScanKind::StartOperation,
                &wo_write(i),
                &station(i),
            )],
        )
        .await?;
    }
    for l in 1..=LEVELS {
        let wo = format!("BENCH-GWO-{l}");
        let st = station(l);
        let mut produce = with_lot(
            scan(pb::ScanKind::Produce, &wo, &st),
            &format!("BENCH-G-{l}"),
            "1",
        );
        produce.material = format!("BM-{l}");
        submit(
            &mut si,
            vec![
                scan(pb::ScanKind::StartOperation, &wo, &st),
                with_lot(
                    scan(pb::ScanKind::Consume, &wo, &st),
                    &format!("BENCH-G-{}", l - 1),
                    "1",
                ),
                produce,
            ],
        )
        .await?;
    }
    Ok(format!("BENCH-G-{LEVELS}"))
}

async fn write_grpc(sys: &System, s: &Settings) -> anyhow::Result<Figures> {
    let channel = connect(sys, "scan-ingest").await?;
    let lanes = s.work_orders;
    Ok(drive(s.clients, s.seconds, move |c, _| {
        let mut si = ScanIngestClient::new(channel.clone());
        let i = c % lanes;
        async move {
            let consume = with_lot(
                scan(pb::ScanKind::Consume, &wo_write(i), &station(i)),
                &raw_lot(i),
                "1",
            );
            let r = si
                .submit_scans(as_operator(pb::SubmitScansRequest {
                    scans: vec![consume],
                }))
                .await
                .map_err(|e| e.to_string())?;
            match r.get_ref().results.first() {
                Some(r) if r.status == pb::ScanStatus::Accepted as i32 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await)
}

async fn write_rest(sys: &System, s: &Settings) -> anyhow::Result<Figures> {
    // Operators must scan from a device enrolled at their station; supervisors may scan anywhere.
    let token = sys.token("sup1", None).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(s.clients)
        .build()?;
    let url = format!("{}/api/v1/scans", sys.gateway);
    let lanes = s.work_orders;
    Ok(drive(s.clients, s.seconds, move |c, _| {
        let i = c % lanes;
        let req = http
            .post(&url)
            .bearer_auth(&token)
            .json(&serde_json::json!({
                "scans": [{
                    "scan_id": uuid::Uuid::new_v4().to_string(),
                    "kind": "consume",
                    "work_order": wo_write(i),
                    "operation": 10,
                    "station": station(i),
                    "lot": raw_lot(i),
                    "quantity": "1",
                    "scanned_at": chrono::Utc::now().to_rfc3339(),
                }]
            }));
        async move {
            let r = req.send().await.map_err(|e| e.to_string())?;
            let status = r.status();
            let body: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
            if status.is_success() && body["results"][0]["status"] == "accepted" {
                Ok(())
            } else {
                Err(format!("{status}: {body}"))
            }
        }
    })
    .await)
}

async fn genealogy(
    tq: &mut TraceQueryClient<Signed>,
    lot: &str,
) -> Result<pb::Genealogy, tonic::Status> {
    let mut r = tonic::Request::new(pb::GenealogyRequest {
        lot: lot.into(),
        direction: pb::Direction::Backward as i32,
        max_depth: 0,
    });
    r.metadata_mut()
        .insert("x-mes-user", "bench".parse().unwrap());
    r.metadata_mut()
        .insert("x-mes-roles", "quality".parse().unwrap());
    tq.get_genealogy(r).await.map(|r| r.into_inner())
}

/// Waits until the projection shows the whole seeded chain, then measures cached answers.
async fn read_cached(sys: &System, s: &Settings, lot: &str) -> anyhow::Result<(Figures, usize)> {
    let channel = connect(sys, "trace-query").await?;
    let mut tq = TraceQueryClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        match genealogy(&mut tq, lot).await {
            Ok(g) if g.nodes.len() == LEVELS + 1 => break g,
            _ if Instant::now() > deadline => bail!("trace-query never showed {lot}'s genealogy"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let size = prost::Message::encoded_len(&answer);
    let lot = lot.to_owned();
    let f = drive(s.clients, s.seconds, move |_, _| {
        let mut tq = TraceQueryClient::new(channel.clone());
        let lot = lot.clone();
        async move {
            genealogy(&mut tq, &lot)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await;
    Ok((f, size))
}

/// What pgbench printed, and the latencies of its per-transaction log.
fn pgbench(
    db_url: &str,
    script: &str,
    s: &Settings,
    vars: &[(&str, String)],
) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("script.sql");
    std::fs::write(&file, script)?;
    let mut cmd = Command::new("pgbench");
    cmd.current_dir(dir.path())
        .args(["-n", "-M", "prepared", "-l", "--log-prefix=tx"])
        .args(["-c", &s.clients.to_string(), "-j", "2"])
        .args(["-T", &s.seconds.to_string()])
        .arg("-f")
        .arg(&file);
    for (k, v) in vars {
        cmd.arg("-D").arg(format!("{k}={v}"));
    }
    let out = cmd
        .arg(db_url)
        .output()
        .context("pgbench (install postgresql-client)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "pgbench failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("pgbench printed no {prefix:?}:\n{text}"))
    };
    let processed = field("number of transactions actually processed:")?;
    let failed = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("number of failed transactions:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let tps = field("tps =")?;
    // Log lines: client_id transaction_no latency_us script_no epoch epoch_us.
    let mut latencies_us = Vec::new();
    for entry in std::fs::read_dir(dir.path())? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("tx."))
        {
            for line in std::fs::read_to_string(&path)?.lines() {
                if let Some(us) = line.split_whitespace().nth(2).and_then(|v| v.parse().ok()) {
                    latencies_us.push(us);
                }
            }
        }
    }
    Ok(Figures {
        ops: processed as u64,
        errors: failed,
        elapsed: Duration::from_secs_f64(processed / tps.max(1e-9)),
        latencies_us,
        first_error: None,
    })
}

/// A database of scan-ingest's schema (its own migrations) holding the same write lanes.
async fn pgbench_write_db(base_url: &str, s: &Settings) -> anyhow::Result<String> {
    let url = scratch_database(base_url, "mes_bench_pgbench").await?;
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/scan-ingest/migrations");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    for f in files {
        let sql = std::fs::read_to_string(&f)?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await?;
    }
    sqlx::query("INSERT INTO materials (number, tracking) VALUES ('BM-0', 'lot'), ('BM-1', 'lot')")
        .execute(&mut conn)
        .await?;
    for i in 0..s.work_orders {
        sqlx::query("INSERT INTO stations (id) VALUES ($1)")
            .bind(station(i))
            .execute(&mut conn)
            .await?;
        sqlx::query(
            "INSERT INTO work_orders (number, material, planned_quantity, status) VALUES ($1, 'BM-1', 1000000000, 'in_progress')",
        )
        .bind(wo_write(i))
        .execute(&mut conn)
        .await?;
        sqlx::query(
            "INSERT INTO work_order_operations (work_order, step, station, status) VALUES ($1, 10, $2, 'in_progress')",
        )
        .bind(wo_write(i))
        .bind(station(i))
        .execute(&mut conn)
        .await?;
        sqlx::query("INSERT INTO work_order_components (work_order, material, quantity_per_unit) VALUES ($1, 'BM-0', 1)")
            .bind(wo_write(i))
            .execute(&mut conn)
            .await?;
        sqlx::query(
            "INSERT INTO lots (lot, material, quantity_on_hand, initial_quantity, origin_kind) VALUES ($1, 'BM-0', 1000000000, 1000000000, 'received')",
        )
        .bind(raw_lot(i))
        .execute(&mut conn)
        .await?;
    }
    conn.close().await?;
    Ok(url)
}

/// One `consume` per transaction, statement for statement what scan-ingest runs for it: the
/// idempotency look-up, the work order (with routing and BOM) and the lot locked, the scan
/// inserted, the inventory decremented, the event appended.
const PGBENCH_WRITE: &str = r"
\set i :client_id % :lanes
BEGIN;
SELECT scan_id, content_hash FROM scans WHERE scan_id = ANY(ARRAY[gen_random_uuid()]);
SELECT number, material, status, planned_quantity, produced_quantity, scrap_quantity FROM work_orders WHERE number = ANY(ARRAY['BENCH-WO-' || :i]) ORDER BY number FOR UPDATE;
SELECT work_order, step, station, status, good_quantity, scrap_quantity FROM work_order_operations WHERE work_order = ANY(ARRAY['BENCH-WO-' || :i]);
SELECT work_order, material, quantity_per_unit FROM work_order_components WHERE work_order = ANY(ARRAY['BENCH-WO-' || :i]);
SELECT lot, material, quantity_on_hand, status, location, origin_kind, work_order FROM lots WHERE lot = ANY(ARRAY['BENCH-RAW-' || :i]) ORDER BY lot FOR UPDATE;
INSERT INTO scans (scan_id, kind, work_order, operation, station, lot, material, quantity, scanned_at, content_hash, operator, device, traceparent) VALUES (gen_random_uuid(), 'consume', 'BENCH-WO-' || :i, 10, 'BENCH-ST-' || :i, 'BENCH-RAW-' || :i, 'BM-0', 1, now(), md5(random()::text), 'bench', '', '');
UPDATE lots SET quantity_on_hand = quantity_on_hand - 1, updated_at = now() WHERE lot = 'BENCH-RAW-' || :i;
INSERT INTO event_log (kind, payload, traceparent) VALUES ('scan.accepted', decode(repeat('ab', 400), 'hex'), '');
END;
";

async fn scratch_database(base_url: &str, prefix: &str) -> anyhow::Result<String> {
    let name = format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let admin_url = replace_database(base_url, "postgres");
    let mut conn = sqlx::PgConnection::connect(&admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(replace_database(base_url, &name))
}

async fn drop_scratch(url: &str) {
    let name = url.rsplit('/').next().unwrap_or_default().to_owned();
    if let Ok(mut conn) = sqlx::PgConnection::connect(&replace_database(url, "postgres")).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}

fn replace_database(url: &str, db: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => url.to_owned(),
    }
}

/// redis-benchmark GET of a value of `size` bytes, in a database number of its own.
fn redis_get(s: &Settings, size: usize) -> anyhow::Result<Figures> {
    let requests = 400_000u64;
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "6379",
            "--dbnum",
            "15",
            "-q",
            "--csv",
        ])
        .args(["-c", &s.clients.to_string(), "-n", &requests.to_string()])
        .args(["-d", &size.to_string(), "-t", "set,get"])
        .output()
        .context("redis-benchmark (install redis-tools)")?;
    let _ = Command::new("redis-cli")
        .args(["-n", "15", "DEL", "key:__rand_int__"])
        .output();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = text
        .lines()
        .find(|l| l.starts_with("\"GET\""))
        .with_context(|| format!("redis-benchmark printed no GET row:\n{text}"))?;
    let cols: Vec<f64> = row
        .split(',')
        .skip(1)
        .map(|c| c.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    // rps, avg, min, p50, p95, p99, max
    ensure!(cols.len() >= 6, "unexpected redis-benchmark row: {row}");
    let (rps, p50, p99) = (cols[0], cols[3], cols[5]);
    Ok(Figures {
        ops: requests,
        errors: 0,
        elapsed: Duration::from_secs_f64(requests as f64 / rps.max(1e-9)),
        // Two synthetic points carrying redis-benchmark's own percentiles.
        latencies_us: vec![(p50 * 1000.0) as u64; 98]
            .into_iter()
            .chain([(p99 * 1000.0) as u64; 2])
            .collect(),
        first_error: None,
    })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{cpu}, {cores} cores, {mem_gib:.0} GiB")
}

fn memory_of(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
            / 1024.0
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

fn ratio(ours: &Figures, base: &Figures) -> String {
    format!("{:.2}x", ours.rate() / base.rate().max(1e-9))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let s = Settings::from_env()?;
    println!("mes bench on {}", machine());
    println!(
        "{} concurrent clients, {} s per run, write load over {} work orders/lots; \
         services, PostgreSQL, Redis and the load generators share this machine",
        s.clients, s.seconds, s.work_orders
    );
    let sys = System::start_with(&[
        ("MES_LOG_LEVEL", "warn"),
        ("MES_SCAN_INGEST_DATABASE_MAX_CONNECTIONS", "16"),
        ("MES_TRACE_QUERY_DATABASE_MAX_CONNECTIONS", "16"),
        ("MES_GATEWAY_RATE_LIMIT_PER_MINUTE_USER", "100000000"),
        ("MES_GATEWAY_RATE_LIMIT_PER_MINUTE_DEVICE", "100000000"),
    ])
    .await?;
    let root = seed(&sys, &s).await?;
    let si_url = sys
        .database_url("scan-ingest")
        .context("scan-ingest database")?
        .to_owned();
    let tq_url = sys
        .database_url("trace-query")
        .context("trace-query database")?
        .to_owned();

    println!("\nwrite: one consume scan per request");
    let mut grpc = write_grpc(&sys, &s).await?;
    println!("  scan-ingest gRPC      {}", grpc.summary("scans"));
    let mut rest = write_rest(&sys, &s).await?;
    println!("  gateway REST          {}", rest.summary("scans"));
    let base_db = pgbench_write_db(&si_url, &s).await?;
    let base = pgbench(
        &base_db,
        PGBENCH_WRITE,
        &s,
        &[("lanes", s.work_orders.to_string())],
    );
    drop_scratch(&base_db).await;
    let mut base = base?;
    println!("  pgbench, same SQL     {}", base.summary("tx"));
    println!(
        "  ratio: gRPC {} and REST {} of pgbench's one-scan-per-transaction rate",
        ratio(&grpc, &base),
        ratio(&rest, &base)
    );

    println!("\nread: backward genealogy of {root} ({} levels)", LEVELS);
    let (mut cached, size) = read_cached(&sys, &s, &root).await?;
    println!("  trace-query gRPC (cached) {}", cached.summary("queries"));
    let mut redis = redis_get(&s, size)?;
    println!("  redis-benchmark GET {size} B {}", redis.summary("gets"));
    let mut sql = pgbench(
        &tq_url,
        &format!(
            "{};\n",
            trace_query::store::queries::BACKWARD
                .trim()
                .replace("$1", ":lot")
                .replace("$2", ":depth")
        ),
        &s,
        &[("lot", root.clone()), ("depth", "20".into())],
    )?;
    println!("  pgbench, same query   {}", sql.summary("queries"));
    println!(
        "  ratio: {} of raw Redis GETs; {} of the uncached SQL",
        ratio(&cached, &redis),
        ratio(&cached, &sql)
    );

    println!("\nmemory after the runs (resident / peak resident)");
    for (service, pid) in sys.pids() {
        let (rss, hwm) = memory_of(pid);
        println!("  {service:<12} {rss:>7.1} MiB / {hwm:>7.1} MiB");
    }
    Ok(())
}
