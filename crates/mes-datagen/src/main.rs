//! `mes-datagen`: realistic data volumes for trace-query (see the `mes_datagen` library).
//!
//! ```text
//! mes-datagen [--mode bulk|events|grpc|bench] [--lots N] [--depth D] [--fan-in F]
//!             [--extra-scans S] [--seed N] [--database-url URL] [--scan-ingest-url URL]
//!             [--trace-query-url URL] [--requests N] [--concurrency C] [--spread N]
//! ```
//!
//! - `bulk` (default): straight into trace-query's database (`--database-url`, default the
//!   service's `MES_TRACE_QUERY_DATABASE_URL` or `postgres://postgres@127.0.0.1:5432/mes_trace_query`),
//!   which must hold an empty read model; e.g. `--lots 1000000 --depth 5 --fan-in 4
//!   --extra-scans 5` gives 1 M lots and about 10 M scans.
//! - `events`: the same data applied as feed events through the projection (slower).
//! - `grpc`: through scan-ingest's real write path (`--scan-ingest-url`, default
//!   `http://127.0.0.1:50051`) as the system user `mes-datagen`; trace-query follows the feed.
//!
//! - `bench`: genealogy requests at a running trace-query (`--trace-query-url`, default
//!   `http://127.0.0.1:50052`) for lots of the same plan (same `--lots/--depth/--fan-in`):
//!   `--requests` (10000) with `--concurrency` (32), lots picked among the first `--spread`
//!   (1000) of the top and bottom levels; prints throughput and latency percentiles.
//!
//! A database loaded with `bulk` or `events` is meant to be served by a trace-query whose feed
//! does not add other data (e.g. `MES_TRACE_QUERY_SCAN_INGEST_URL` pointing at an empty
//! scan-ingest); its cursor is stored as consumer `mes-datagen`.

use std::time::Instant;

use mes_common::identity::Caller;
use mes_datagen::{self as datagen, Plan};

const USAGE: &str = "usage: mes-datagen [--mode bulk|events|grpc|bench] [--lots N] [--depth D] \
[--fan-in F] [--extra-scans S] [--seed N] [--database-url URL] [--scan-ingest-url URL] \
[--trace-query-url URL] [--requests N] [--concurrency C] [--spread N]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut plan = Plan::default();
    let mut mode = "bulk".to_owned();
    let settings = trace_query::Settings::load()?;
    let mut database_url = settings.service.database_url.clone();
    let mut scan_ingest_url = settings.scan_ingest_url.clone();
    let mut trace_query_url = "http://127.0.0.1:50052".to_owned();
    let (mut requests, mut concurrency, mut spread) = (10_000u64, 32usize, 1_000u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            return Ok(());
        }
        let value = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value\n{USAGE}"))?;
        let number = || -> anyhow::Result<u64> {
            value
                .parse()
                .map_err(|_| anyhow::anyhow!("{flag}: {value:?} is not a number"))
        };
        match flag.as_str() {
            "--mode" => mode = value.clone(),
            "--lots" => plan.lots = number()?,
            "--depth" => plan.depth = u32::try_from(number()?)?,
            "--fan-in" => plan.fan_in = u32::try_from(number()?)?,
            "--extra-scans" => plan.extra_scans = u32::try_from(number()?)?,
            "--seed" => plan.seed = number()?,
            "--database-url" => database_url = value.clone(),
            "--scan-ingest-url" => scan_ingest_url = value.clone(),
            "--trace-query-url" => trace_query_url = value.clone(),
            "--requests" => requests = number()?,
            "--concurrency" => concurrency = usize::try_from(number()?)?,
            "--spread" => spread = number()?,
            other => anyhow::bail!("unknown option {other}\n{USAGE}"),
        }
    }
    plan.validate()?;
    if mode == "bench" {
        let report = datagen::bench(
            &trace_query_url,
            settings.service.caller_key(),
            &plan,
            requests,
            concurrency,
            spread,
        )
        .await?;
        println!("{report}");
        return Ok(());
    }
    let started = Instant::now();
    let mut last = Instant::now();
    let mut progress = |done: u64, total: u64| {
        if last.elapsed().as_secs() >= 5 || done == total {
            last = Instant::now();
            eprintln!(
                "{done}/{total} items ({:.0}%), {:.0} s",
                done as f64 * 100.0 / total.max(1) as f64,
                started.elapsed().as_secs_f64()
            );
        }
    };
    let items = match mode.as_str() {
        "bulk" | "events" => {
            let pool = mes_common::db::prepare(
                &database_url,
                4,
                &trace_query::MIGRATOR,
                std::time::Duration::from_secs(30),
            )
            .await?;
            if mode == "bulk" {
                datagen::load_bulk(&pool, &plan, "mes-datagen", &mut progress).await?
            } else {
                datagen::load_events(&pool, &plan, "mes-datagen", &mut progress).await?
            }
        }
        "grpc" => {
            datagen::load_grpc(
                &scan_ingest_url,
                &plan,
                &Caller::system("mes-datagen"),
                settings.service.caller_key(),
                &mut progress,
            )
            .await?
        }
        other => anyhow::bail!("unknown mode {other}\n{USAGE}"),
    };
    let orders: u64 = (1..=plan.depth).map(|l| plan.level_size(l)).sum();
    println!(
        "{items} items: {} lots, {} work orders, {} scans, depth {}, fan-in {} in {:.1} s ({mode})",
        plan.lots,
        orders,
        orders * plan.scans_per_order(),
        plan.depth,
        plan.fan_in,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
