//! `make bench` / `make bench-quick`: the whole stack measured side by side with baselines
//! taken in the same run on the same machine.
//!
//! - **write** (`write.rs`): concurrent tablets submitting `consume` scans, one per request or
//!   in 20-scan batches, through scan-ingest's gRPC API and the gateway's REST API, both
//!   **uncontended** (one work order and lot per client: the physical limit) and
//!   **contended** (`MES_BENCH_WORK_ORDERS` work orders), against `pgbench` running the same
//!   statements one transaction per request on a database of the same schema
//!   (`baseline.rs`); with the **feed lag** (acknowledged → applied in trace-query) p50/p99;
//! - **read** (`read.rs`): cached backward genealogies through gRPC and REST, of a small answer
//!   (a 5-lot chain) and a large one (a top-level lot of the generated plant: 1,365 nodes,
//!   ~57 KB of JSON), against `redis-benchmark` GETting a value of the answer's size (the
//!   cache's floor) and `pgbench` running trace-query's own genealogy statement (what every
//!   query would cost without the cache); cold genealogies (each request a lot nobody asked
//!   before) of the generated plant (depth 5, fan-in 4) against `pgbench` running the same
//!   statement on random lots of the same level;
//! - with each line, the **CPU time per request** of every service, of this driver, of
//!   PostgreSQL and Redis (`/proc/<pid>/stat`), and of the rest of the machine (`other`, from
//!   `/proc/stat`: e.g. builds sharing it), so ratios can be explained; the memory of each
//!   service after the runs.
//!
//! The table (load, stack, baseline, ratio, goal of issue 10, met/missed) is printed and
//! written to `target/bench/results.json` and `results.md` with the machine's description.
//!
//! Settings (environment): `MES_BENCH_QUICK` (1: 3 s runs and a 12,000-lot plant unless set
//! otherwise), `MES_BENCH_CLIENTS` (32), `MES_BENCH_SECONDS` (15 per run),
//! `MES_BENCH_WORK_ORDERS` (8: the contended write load), `MES_BENCH_BATCH` (20),
//! `MES_BENCH_LOTS` (120,000: the generated plant; at least 6,144 for 1,365-node answers),
//! `MES_BENCH_OUT` (the results directory; `target/bench`), `MES_BENCH_ONLY` (the groups of lines
//! to run, comma-separated: `write`, `batch`, `cached`, `cold`; all when unset).

mod baseline;
mod measure;
mod plant;
mod read;
mod report;
mod write;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, ensure};
use mes_e2e::System;

use crate::baseline::{Baseline, pgbench, pgbench_write_db, redis_get};
use crate::measure::{CpuMeter, Figures};
use crate::report::{Goal, Line, Machine};
use crate::write::{FeedWatch, Transport};

pub struct Settings {
    quick: bool,
    clients: usize,
    seconds: u64,
    work_orders: usize,
    batch: usize,
    /// Lots of the generated plant of the scale runs (depth 5, fan-in 4).
    lots: u64,
    out: PathBuf,
    /// `MES_BENCH_ONLY`: the groups to run (`write`, `batch`, `cached`, `cold`; comma-separated;
    /// all when unset), so one path can be measured again while it is being worked on.
    only: Vec<String>,
}

/// The groups of lines `MES_BENCH_ONLY` can pick: one-scan writes, batch writes, cached reads,
/// cold reads.
const GROUPS: [&str; 4] = ["write", "batch", "cached", "cold"];

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
        let quick = var("MES_BENCH_QUICK", 0)? != 0;
        let target = std::env::current_exe()?
            .parent()
            .and_then(|p| p.parent())
            .map(|t| t.join("bench"))
            .unwrap_or_else(|| PathBuf::from("target/bench"));
        let s = Self {
            quick,
            clients: var("MES_BENCH_CLIENTS", 32)? as usize,
            seconds: var("MES_BENCH_SECONDS", if quick { 3 } else { 15 })?,
            work_orders: var("MES_BENCH_WORK_ORDERS", 8)? as usize,
            batch: var("MES_BENCH_BATCH", 20)? as usize,
            lots: var("MES_BENCH_LOTS", if quick { 12_000 } else { 120_000 })?,
            out: std::env::var_os("MES_BENCH_OUT").map_or(target, PathBuf::from),
            only: std::env::var("MES_BENCH_ONLY")
                .unwrap_or_default()
                .split(',')
                .map(|g| g.trim().to_owned())
                .filter(|g| !g.is_empty())
                .collect(),
        };
        for g in &s.only {
            ensure!(
                GROUPS.contains(&g.as_str()),
                "MES_BENCH_ONLY: unknown group {g:?} (known: {})",
                GROUPS.join(", ")
            );
        }
        ensure!(
            s.clients > 0 && s.seconds > 0 && s.work_orders > 0 && s.batch > 0 && s.lots >= 6,
            "MES_BENCH_* must be > 0 (MES_BENCH_LOTS at least 6)"
        );
        Ok(s)
    }

    /// Whether the group `g` of [`GROUPS`] runs.
    fn runs(&self, g: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == g)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "quick": self.quick, "clients": self.clients, "seconds_per_run": self.seconds,
            "contended_work_orders": self.work_orders, "batch": self.batch, "plant_lots": self.lots,
            "only": self.only,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let s = Settings::from_env()?;
    let machine = Machine::describe().await;
    println!("mes bench on {}", machine.text());
    println!(
        "{} concurrent clients, {} s per run{}; services, PostgreSQL, Redis and the load \
         generators share this machine",
        s.clients,
        s.seconds,
        if s.quick { " (quick)" } else { "" }
    );
    let tq_url = plant::scale_read_model(&s).await?;
    let result = run(&s, &tq_url, &machine).await;
    plant::drop_scratch(&tq_url).await;
    result
}

async fn run(s: &Settings, tq_url: &str, machine: &Machine) -> anyhow::Result<()> {
    let sys = System::start_with(&[
        ("MES_TRACE_QUERY_DATABASE_URL", tq_url),
        ("MES_LOG_LEVEL", "warn"),
        ("MES_SCAN_INGEST_DATABASE_MAX_CONNECTIONS", "16"),
        ("MES_TRACE_QUERY_DATABASE_MAX_CONNECTIONS", "16"),
        ("MES_GATEWAY_RATE_LIMIT_PER_MINUTE_USER", "100000000"),
        ("MES_GATEWAY_RATE_LIMIT_PER_MINUTE_DEVICE", "100000000"),
    ])
    .await?;
    let lanes = s.clients.max(s.work_orders);
    let root = plant::seed(&sys, lanes).await?;
    let si_url = sys
        .database_url("scan-ingest")
        .context("scan-ingest database")?
        .to_owned();
    let cpu = CpuMeter::new(sys.pids());
    let base_db = pgbench_write_db(&si_url, lanes).await?;
    let mut lines = Vec::new();
    let result = async {
        writes(&sys, s, tq_url, &base_db, &cpu, &mut lines).await?;
        reads(&sys, s, tq_url, &root, &cpu, &mut lines).await
    }
    .await;
    plant::drop_scratch(&base_db).await;
    result?;

    let memory: Vec<(String, f64, f64)> = sys
        .pids()
        .into_iter()
        .map(|(service, pid)| {
            let (rss, hwm) = memory_of(pid);
            (service.to_owned(), rss, hwm)
        })
        .collect();
    println!("\nmemory after the runs (resident / peak resident)");
    for (service, rss, hwm) in &memory {
        println!("  {service:<12} {rss:>7.1} MiB / {hwm:>7.1} MiB");
    }
    println!("\nmes bench on {}", machine.text());
    report::finish(&mut lines, machine, &s.json(), &memory, &s.out)
}

/// The write lines: one scan and `batch` scans per request, gRPC and REST, uncontended and
/// contended, each pair against pgbench with the same lanes.
async fn writes(
    sys: &System,
    s: &Settings,
    tq_url: &str,
    base_db: &str,
    cpu: &CpuMeter,
    lines: &mut Vec<Line>,
) -> anyhow::Result<()> {
    let uncontended = s.clients;
    let cases: [(usize, usize, [Option<Goal>; 2]); 3] = [
        (
            1,
            uncontended,
            [
                Some(Goal::ratio(1.5)),
                Some(Goal {
                    p99_within_baseline: true,
                    ..Goal::ratio(1.0)
                }),
            ],
        ),
        (1, s.work_orders, [None, Some(Goal::ratio(1.0))]),
        (s.batch, uncontended, [None, None]),
    ];
    let mut baselines: HashMap<(usize, usize), (Figures, Vec<String>)> = HashMap::new();
    for (batch, lanes, goals) in cases {
        if !s.runs(if batch == 1 { "write" } else { "batch" }) {
            continue;
        }
        let what = if batch == 1 {
            "1 scan/request".to_owned()
        } else {
            format!("{batch}-scan batches")
        };
        let spread = if lanes == uncontended {
            format!("{lanes} WO (uncontended)")
        } else {
            format!("{lanes} WO (contended)")
        };
        println!("\nwrite: {what}, {spread}");
        let mut stack = Vec::new();
        for (transport, goal) in [Transport::Grpc, Transport::Rest].into_iter().zip(goals) {
            let label = format!("write {what} {} {spread}", transport.name());
            let watch = FeedWatch::start(tq_url).await?;
            let before = cpu.snapshot();
            let f =
                write::write(sys, s, &label, transport, lanes, batch, watch.acked.clone()).await?;
            let lag = watch.finish(Duration::from_secs(60)).await?;
            let used = cpu.since(&before);
            stack.push((label, f, lag, used, goal));
        }
        let key = (batch, lanes);
        if let std::collections::hash_map::Entry::Vacant(e) = baselines.entry(key) {
            let script = baseline::pgbench_write(batch);
            let Baseline {
                figures,
                statements,
            } = pgbench(
                &format!("pgbench {what}, {lanes} lanes"),
                base_db,
                &script,
                s,
                &[("lanes", lanes.to_string())],
            )
            .await?;
            e.insert((figures, statements));
        }
        let (base, statements) = baselines[&key].clone();
        for (i, (label, f, lag, used, goal)) in stack.into_iter().enumerate() {
            let mut line = Line {
                load: label,
                unit: "scans",
                cpu_us: used.per_request_us(f.ops),
                stack: f,
                stack_per_op: batch as f64,
                baseline_name: if batch == 1 {
                    "pgbench, same SQL, 1 scan/tx".into()
                } else {
                    format!("pgbench, same SQL, {batch} scans/tx")
                },
                baseline: base.clone(),
                baseline_per_op: batch as f64,
                goal,
                lag: Some(lag),
                statements: if i == 0 {
                    statements.clone()
                } else {
                    Vec::new()
                },
                note: String::new(),
            };
            line.print();
            lines.push(line);
        }
    }
    Ok(())
}

/// The read lines: cached genealogies (small and large answers, gRPC and REST) against Redis
/// GETs of the answer's size and against their uncached SQL; cold genealogies against pgbench.
async fn reads(
    sys: &System,
    s: &Settings,
    tq_url: &str,
    root: &str,
    cpu: &CpuMeter,
    lines: &mut Vec<Line>,
) -> anyhow::Result<()> {
    let rest = read::Rest::login(sys, s).await?;
    let plan = plant::scale_plan(s);
    let top = plan.level_size(plan.depth);
    let large = plan.lot_name(plan.depth, top.saturating_sub(1));
    let cached = if s.runs("cached") {
        vec![
            (root.to_owned(), plant::LEVELS + 1, "small"),
            (large, 2, "large"),
        ]
    } else {
        Vec::new()
    };
    for (lot, min_nodes, size_name) in cached {
        let answer = read::settle(sys, &rest, &lot, min_nodes).await?;
        println!(
            "\nread: cached backward genealogy of {lot} ({} nodes; {} B protobuf, {} B JSON)",
            answer.nodes, answer.proto_bytes, answer.json_bytes
        );
        let mut rest_line = None;
        for transport in [Transport::Grpc, Transport::Rest] {
            let label = format!(
                "cached genealogy {size_name} ({} nodes) {}",
                answer.nodes,
                transport.name()
            );
            let before = cpu.snapshot();
            let f = read::cached(sys, s, &rest, &label, transport, &lot).await?;
            let used = cpu.since(&before);
            let size = match transport {
                Transport::Grpc => answer.proto_bytes,
                Transport::Rest => answer.json_bytes,
            };
            let redis = redis_get(&format!("redis-benchmark GET {size} B"), s, size).await?;
            let goal = (size_name == "small" && transport == Transport::Rest).then_some(Goal {
                p99_max_ms: Some(5.0),
                ..Goal::ratio(0.25)
            });
            let mut line = Line {
                load: label,
                unit: "queries",
                cpu_us: used.per_request_us(f.ops),
                stack: f,
                stack_per_op: 1.0,
                baseline_name: format!("redis-benchmark GET {size} B"),
                baseline: redis.figures,
                baseline_per_op: 1.0,
                goal,
                lag: None,
                statements: Vec::new(),
                note: String::new(),
            };
            line.print();
            if transport == Transport::Rest {
                rest_line = Some((line.load.clone(), line.stack.clone(), line.cpu_us.clone()));
            }
            lines.push(line);
        }
        if let Some((label, f, cpu_us)) = rest_line {
            let sql = pgbench(
                &format!("pgbench genealogy of {lot}"),
                tq_url,
                &baseline::pgbench_genealogy_of(),
                s,
                &[("lot", lot.clone()), ("depth", "20".into())],
            )
            .await?;
            let mut line = Line {
                load: label,
                unit: "queries",
                cpu_us,
                stack: f,
                stack_per_op: 1.0,
                baseline_name: "pgbench, trace-query's SQL (uncached)".into(),
                baseline: sql.figures,
                baseline_per_op: 1.0,
                goal: None,
                lag: None,
                statements: sql.statements,
                note: String::new(),
            };
            line.print();
            lines.push(line);
        }
    }

    if !s.runs("cold") {
        return Ok(());
    }
    println!(
        "\nread at scale: cold backward genealogy of a level-{} lot ({} lots, fan-in {})",
        plan.depth, plan.lots, plan.fan_in
    );
    let sql = pgbench(
        "pgbench cold genealogies",
        tq_url,
        &baseline::pgbench_genealogy_random(s),
        s,
        &[],
    )
    .await?;
    for (transport, first, goal) in [
        (Transport::Grpc, 0, Some(Goal::ratio(0.8))),
        (Transport::Rest, top / 2, None),
    ] {
        let label = format!("cold genealogy (1,365-node plant) {}", transport.name());
        let before = cpu.snapshot();
        let (f, mean) = read::cold(sys, s, &rest, &label, transport, first).await?;
        let used = cpu.since(&before);
        let mut line = Line {
            load: label,
            unit: "queries",
            cpu_us: used.per_request_us(f.ops),
            stack: f,
            stack_per_op: 1.0,
            baseline_name: "pgbench, same SQL, random lots".into(),
            baseline: sql.figures.clone(),
            baseline_per_op: 1.0,
            goal,
            lag: None,
            statements: if transport == Transport::Grpc {
                sql.statements.clone()
            } else {
                Vec::new()
            },
            note: match transport {
                Transport::Grpc => format!("{mean:.0} nodes per answer"),
                Transport::Rest => format!("{mean:.0} B per answer"),
            },
        };
        line.print();
        lines.push(line);
    }
    Ok(())
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
