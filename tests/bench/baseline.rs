//! The baselines, run in the same process on the same machine: `pgbench` running the service's
//! own statements (writes: scan-ingest's; reads: trace-query's genealogy statement) and
//! `redis-benchmark` GETting a value of an answer's size (the cache's floor).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use sqlx::Connection;

use crate::Settings;
use crate::measure::{Figures, Progress};
use crate::plant::{raw_lot, scale_plan, scratch_database, station, wo_write};

/// A baseline's figures and pgbench's per-statement latencies (`-r`; empty for Redis).
pub struct Baseline {
    pub figures: Figures,
    pub statements: Vec<String>,
}

/// pgbench running `script` with `s.clients` clients for `s.seconds`.
pub async fn pgbench(
    label: &str,
    db_url: &str,
    script: &str,
    s: &Settings,
    vars: &[(&str, String)],
) -> anyhow::Result<Baseline> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("script.sql");
    std::fs::write(&file, script)?;
    let mut cmd = tokio::process::Command::new("pgbench");
    cmd.current_dir(dir.path())
        .args(["-n", "-M", "prepared", "-r", "-l", "--log-prefix=tx"])
        .args(["-c", &s.clients.to_string(), "-j", "2"])
        .args(["-T", &s.seconds.to_string()])
        .arg("-f")
        .arg(&file);
    for (k, v) in vars {
        cmd.arg("-D").arg(format!("{k}={v}"));
    }
    let progress = Progress::start(label, s.seconds, None);
    let out = cmd
        .arg(db_url)
        .output()
        .await
        .context("pgbench (install postgresql-client)");
    progress.finish().await;
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "pgbench failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let processed = field("number of transactions actually processed:")
        .with_context(|| format!("pgbench printed no transaction count:\n{text}"))?;
    let tps = field("tps =").with_context(|| format!("pgbench printed no tps:\n{text}"))?;
    let failed = field("number of failed transactions:").unwrap_or(0.0) as u64;
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
    // `-r`: the per-statement latencies, kept so a bad baseline plan is visible.
    let mut statements = Vec::new();
    if let Some(at) = text.find("statement latencies in milliseconds") {
        for line in text[at..].lines().skip(1) {
            let line = line.trim();
            if line.is_empty() || line.starts_with('\\') {
                continue;
            }
            statements.push(line.chars().take(120).collect::<String>());
        }
    }
    Ok(Baseline {
        figures: Figures {
            ops: processed as u64,
            errors: failed,
            elapsed: Duration::from_secs_f64(processed / tps.max(1e-9)),
            latencies_us,
            first_error: None,
        },
        statements,
    })
}

/// A database of scan-ingest's schema (its own migrations) holding `lanes` write lanes.
pub async fn pgbench_write_db(base_url: &str, lanes: usize) -> anyhow::Result<String> {
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
    for i in 0..lanes {
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

/// What scan-ingest locks and reads first for a batch on one lane (work order with routing,
/// BOM and its material's tracking mode; the lot), in its order.
const LOCK_LANE: &str = r"
SELECT w.number, w.material, w.status, w.planned_quantity, w.produced_quantity, w.scrap_quantity, m.tracking FROM work_orders w LEFT JOIN materials m ON m.number = w.material WHERE w.number = ANY(ARRAY['BENCH-WO-' || :i]) ORDER BY w.number FOR UPDATE OF w;
SELECT work_order, step, station, status, good_quantity, scrap_quantity FROM work_order_operations WHERE work_order = ANY(ARRAY['BENCH-WO-' || :i]);
SELECT work_order, material, quantity_per_unit FROM work_order_components WHERE work_order = ANY(ARRAY['BENCH-WO-' || :i]);
SELECT lot, material, quantity_on_hand, status, location, origin_kind, work_order FROM lots WHERE lot = ANY(ARRAY['BENCH-RAW-' || :i]) ORDER BY lot FOR UPDATE;
";

/// `batch` `consume` scans per transaction, statement for statement what scan-ingest runs for
/// a batch of them on one lane (crates/scan-ingest/src/store/scans.rs), in its order: the work
/// order and the lot locked ([`LOCK_LANE`]), the idempotency look-up of the batch's scan ids
/// (after the locks, as the service does), the scans inserted, the inventory decremented once,
/// one event per scan appended. (The station is a reference-cache hit in Redis before `BEGIN`,
/// so it is no statement here.)
///
/// Every predicate gets a bound value with the service's plan shape: the scan ids are stable
/// functions of pgbench variables (`md5(...)::uuid`), never a volatile function such as
/// `gen_random_uuid()` inside `= ANY(...)`, which makes PostgreSQL scan the whole growing
/// `scans` table instead of using its primary key (an earlier version of this script did, and
/// flattered the stack 6×). pgbench runs with `-r`: each statement's latency is reported, so a
/// bad plan shows.
pub fn pgbench_write(batch: usize) -> String {
    let id = |k: &str| format!("md5(:client_id || ':' || :r || ':' || {k})::uuid");
    let ids: Vec<String> = (1..=batch).map(|k| id(&format!("'{k}'"))).collect();
    let (insert, event) = if batch == 1 {
        (
            format!(
                "INSERT INTO scans (scan_id, kind, work_order, operation, station, lot, material, quantity, scanned_at, content_hash, operator, device, traceparent) VALUES ({}, 'consume', 'BENCH-WO-' || :i, 10, 'BENCH-ST-' || :i, 'BENCH-RAW-' || :i, 'BM-0', 1, now(), md5(:r::text), 'bench', '', '');",
                ids[0]
            ),
            "INSERT INTO event_log (kind, payload, traceparent) VALUES ('scan.accepted', decode(repeat('ab', 400), 'hex'), '');".to_owned(),
        )
    } else {
        (
            format!(
                "INSERT INTO scans (scan_id, kind, work_order, operation, station, lot, material, quantity, scanned_at, content_hash, operator, device, traceparent) SELECT {}, 'consume', 'BENCH-WO-' || :i, 10, 'BENCH-ST-' || :i, 'BENCH-RAW-' || :i, 'BM-0', 1, now(), md5(:r || ':' || g), 'bench', '', '' FROM generate_series(1, {batch}) g;",
                id("g")
            ),
            format!(
                "INSERT INTO event_log (kind, payload, traceparent) SELECT 'scan.accepted', decode(repeat('ab', 400), 'hex'), '' FROM generate_series(1, {batch});"
            ),
        )
    };
    format!(
        "\\set i :client_id % :lanes\n\\set r random(1, 9000000000000000)\nBEGIN;{LOCK_LANE}\
         SELECT scan_id, content_hash FROM scans WHERE scan_id = ANY(ARRAY[{}]);\n\
         {insert}\n\
         UPDATE lots SET quantity_on_hand = quantity_on_hand - {batch}, updated_at = now() WHERE lot = 'BENCH-RAW-' || :i;\n\
         {event}\nEND;\n",
        ids.join(", ")
    )
}

/// trace-query's backward genealogy statement on the lot in variable `lot`.
pub fn pgbench_genealogy_of() -> String {
    format!(
        "{};\n",
        trace_query::store::queries::BACKWARD
            .trim()
            .replace("$1", ":lot")
            .replace("$2", ":depth")
    )
}

/// trace-query's backward genealogy statement on random top-level lots of the generated plant.
pub fn pgbench_genealogy_random(s: &Settings) -> String {
    let plan = scale_plan(s);
    format!(
        "\\set i random(0, {})\n{};\n",
        plan.level_size(plan.depth) - 1,
        trace_query::store::queries::BACKWARD
            .trim()
            .replace(
                "$1::text",
                &format!("('L{}-' || lpad(:i::text, 7, '0'))", plan.depth)
            )
            .replace("$2", "20")
    )
}

fn redis_benchmark(clients: usize, requests: u64) -> anyhow::Result<(f64, f64, f64)> {
    let out = std::process::Command::new("redis-benchmark")
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
        .args(["-c", &clients.to_string(), "-n", &requests.to_string()])
        .args(["-t", "get"])
        .output()
        .context("redis-benchmark (install redis-tools)")?;
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
    Ok((cols[0], cols[3], cols[5]))
}

/// redis-benchmark GETs of a value of `size` bytes (in a database number of its own), for
/// about `s.seconds` (a short probe sizes the request count).
pub async fn redis_get(label: &str, s: &Settings, size: usize) -> anyhow::Result<Baseline> {
    let key = "key:__rand_int__";
    let mut set = std::process::Command::new("redis-cli")
        .args(["-n", "15", "-x", "SET", key])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("redis-cli (install redis-tools)")?;
    if let Some(mut stdin) = set.stdin.take() {
        std::io::Write::write_all(&mut stdin, &vec![b'x'; size])?;
    }
    ensure!(set.wait()?.success(), "redis-cli SET failed");
    let progress = Progress::start(label, s.seconds, None);
    let clients = s.clients;
    let seconds = s.seconds;
    let run = tokio::task::spawn_blocking(move || {
        let (probe, _, _) = redis_benchmark(clients, 5_000)?;
        let requests = ((probe * seconds as f64) as u64).max(5_000);
        redis_benchmark(clients, requests).map(|r| (requests, r))
    })
    .await;
    progress.finish().await;
    let _ = std::process::Command::new("redis-cli")
        .args(["-n", "15", "DEL", key])
        .output();
    let (requests, (rps, p50, p99)) = run??;
    Ok(Baseline {
        figures: Figures {
            ops: requests,
            errors: 0,
            elapsed: Duration::from_secs_f64(requests as f64 / rps.max(1e-9)),
            // Synthetic points carrying redis-benchmark's own percentiles.
            latencies_us: vec![(p50 * 1000.0) as u64; 98]
                .into_iter()
                .chain([(p99 * 1000.0) as u64; 2])
                .collect(),
            first_error: None,
        },
        statements: Vec::new(),
    })
}
