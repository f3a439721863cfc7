//! The result lines, the table (stack, baseline, ratio, goal, met/missed) with the CPU and
//! feed-lag figures that explain each ratio, the machine's description, and the files
//! `results.json` and `results.md`.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;
use sqlx::Connection;

use crate::measure::Figures;
use crate::write::{CURSOR_POLL, Lag};

/// A goal of issue 10: the stack's rate at least `min_ratio` of the baseline's, and optionally
/// a p99 bound (absolute, or the baseline's own p99).
#[derive(Clone, Copy)]
pub struct Goal {
    pub min_ratio: f64,
    pub p99_max_ms: Option<f64>,
    pub p99_within_baseline: bool,
}

impl Goal {
    pub fn ratio(min_ratio: f64) -> Self {
        Self {
            min_ratio,
            p99_max_ms: None,
            p99_within_baseline: false,
        }
    }

    fn text(&self) -> String {
        let mut t = format!("≥ {:.2}×", self.min_ratio);
        if let Some(ms) = self.p99_max_ms {
            let _ = write!(t, ", p99 ≤ {ms} ms");
        }
        if self.p99_within_baseline {
            t.push_str(", p99 ≤ baseline p99");
        }
        t
    }
}

/// One line of the table: a load through the stack against its baseline.
pub struct Line {
    pub load: String,
    /// What the rate counts (`scans`, `queries`, …).
    pub unit: &'static str,
    pub stack: Figures,
    /// Units per request of the stack (20 for a 20-scan batch).
    pub stack_per_op: f64,
    pub baseline_name: String,
    pub baseline: Figures,
    pub baseline_per_op: f64,
    pub goal: Option<Goal>,
    /// CPU microseconds per stack request, per process.
    pub cpu_us: Vec<(String, f64)>,
    pub lag: Option<Lag>,
    /// pgbench's per-statement latencies.
    pub statements: Vec<String>,
    pub note: String,
}

/// A line with its figures worked out.
struct Row {
    rate: f64,
    p50: f64,
    p99: f64,
    base_rate: f64,
    base_p50: f64,
    base_p99: f64,
    ratio: f64,
    met: Option<bool>,
}

impl Line {
    fn row(&mut self) -> Row {
        let rate = self.stack.rate() * self.stack_per_op;
        let base_rate = self.baseline.rate() * self.baseline_per_op;
        let ratio = rate / base_rate.max(1e-9);
        let (p50, p99) = (
            self.stack.percentile_ms(0.5),
            self.stack.percentile_ms(0.99),
        );
        let (base_p50, base_p99) = (
            self.baseline.percentile_ms(0.5),
            self.baseline.percentile_ms(0.99),
        );
        let met = self.goal.map(|g| {
            ratio >= g.min_ratio
                && g.p99_max_ms.is_none_or(|ms| p99 <= ms)
                && (!g.p99_within_baseline || p99 <= base_p99)
                && self.stack.errors == 0
        });
        Row {
            rate,
            p50,
            p99,
            base_rate,
            base_p50,
            base_p99,
            ratio,
            met,
        }
    }

    /// The line as printed right after its runs.
    pub fn print(&mut self) {
        let r = self.row();
        println!(
            "  {:<46} {:>9} {}/s  p50 {:>7.2} ms  p99 {:>7.2} ms{}",
            self.load,
            thousands(r.rate),
            self.unit,
            r.p50,
            r.p99,
            self.stack.error_note()
        );
        println!(
            "  {:<46} {:>9} {}/s  p50 {:>7.2} ms  p99 {:>7.2} ms{}   ratio {:.2}×",
            format!("  vs {}", self.baseline_name),
            thousands(r.base_rate),
            self.unit,
            r.base_p50,
            r.base_p99,
            self.baseline.error_note(),
            r.ratio
        );
        println!("      CPU per request: {}", cpu_text(&self.cpu_us));
        if let Some(l) = &self.lag {
            println!("      feed lag: {}", lag_text(l));
        }
        for s in &self.statements {
            println!("      pgbench {s}");
        }
        if !self.note.is_empty() {
            println!("      {}", self.note);
        }
    }
}

fn cpu_text(cpu: &[(String, f64)]) -> String {
    cpu.iter()
        .map(|(n, us)| format!("{n} {us:.0} µs"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn lag_text(l: &Lag) -> String {
    let mut t = format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} scans (cursor read every {} ms)",
        l.p50_ms,
        l.p99_ms,
        l.max_ms,
        l.scans,
        CURSOR_POLL.as_millis()
    );
    if l.missing > 0 {
        let _ = write!(t, "; {} acknowledged scans not applied in time", l.missing);
    }
    t
}

fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let digits = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn met_text(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "missed",
        None => "-",
    }
}

/// The machine the run was on.
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub postgres: String,
    pub redis: String,
    pub commit: String,
}

impl Machine {
    pub async fn describe() -> Self {
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
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
        let postgres = match sqlx::PgConnection::connect(
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .await
        {
            Ok(mut c) => {
                let v: Option<String> = sqlx::query_scalar("SHOW server_version")
                    .fetch_one(&mut c)
                    .await
                    .ok();
                let _ = c.close().await;
                v.unwrap_or_else(|| "unknown".into())
            }
            Err(_) => "unknown".into(),
        };
        let output = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let redis = output("redis-cli", &["INFO", "server"])
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map_or_else(|| "unknown".into(), |v| v.trim().to_owned());
        let commit = output("git", &["rev-parse", "--short", "HEAD"])
            .trim()
            .to_owned();
        Self {
            cpu,
            cores,
            memory_gib,
            postgres,
            redis,
            commit,
        }
    }

    pub fn text(&self) -> String {
        format!(
            "{}, {} cores, {:.0} GiB; PostgreSQL {}, Redis {}",
            self.cpu, self.cores, self.memory_gib, self.postgres, self.redis
        )
    }
}

/// Prints the table and writes `results.json` and `results.md` into `dir`.
pub fn finish(
    lines: &mut [Line],
    machine: &Machine,
    settings: &serde_json::Value,
    memory: &[(String, f64, f64)],
    dir: &Path,
) -> anyhow::Result<()> {
    let rows: Vec<Row> = lines.iter_mut().map(Line::row).collect();
    let cell =
        |rate: f64, unit: &str, p99: f64| format!("{} {unit}/s, p99 {p99:.1} ms", thousands(rate));

    let cells: Vec<[String; 6]> = lines
        .iter()
        .zip(&rows)
        .map(|(l, r)| {
            [
                l.load.clone(),
                cell(r.rate, l.unit, r.p99),
                format!(
                    "{}: {}",
                    l.baseline_name,
                    cell(r.base_rate, l.unit, r.base_p99)
                ),
                format!("{:.2}×", r.ratio),
                l.goal.map_or("-".into(), |g| g.text()),
                met_text(r.met).to_owned(),
            ]
        })
        .collect();
    let head = ["load", "stack", "baseline", "ratio", "goal", "met"].map(str::to_owned);
    let widths: Vec<usize> = (0..6)
        .map(|i| {
            cells
                .iter()
                .chain([&head])
                .map(|c| c[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let text_row = |c: &[String; 6]| {
        c.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!("\n{}", text_row(&head));
    println!("{}", "-".repeat(widths.iter().sum::<usize>() + 3 * 5));
    let mut md = String::new();
    let _ = writeln!(md, "# mes bench results\n");
    let _ = writeln!(md, "Machine: {}  ", machine.text());
    let _ = writeln!(md, "Commit: {}  ", machine.commit);
    let _ = writeln!(md, "Settings: {settings}\n");
    let _ = writeln!(md, "| load | stack | baseline | ratio | goal | met |");
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for c in &cells {
        println!("{}", text_row(c));
        let _ = writeln!(md, "| {} |", c.join(" | "));
    }
    let _ = writeln!(md, "\n## CPU per request and feed lag\n");
    let _ = writeln!(
        md,
        "| load | CPU µs per request | feed lag (ack → applied in trace-query) |"
    );
    let _ = writeln!(md, "|---|---|---|");
    println!("\nCPU per request (user + system, /proc/<pid>/stat) and feed lag");
    for l in lines.iter() {
        let lag = l.lag.as_ref().map_or("-".into(), lag_text);
        println!("  {:<46} {}", l.load, cpu_text(&l.cpu_us));
        if l.lag.is_some() {
            println!("  {:<46} feed lag {lag}", "");
        }
        let _ = writeln!(md, "| {} | {} | {lag} |", l.load, cpu_text(&l.cpu_us));
    }
    let _ = writeln!(md, "\n## pgbench per-statement latencies (ms, failures)\n");
    for l in lines.iter().filter(|l| !l.statements.is_empty()) {
        let _ = writeln!(md, "{} ({}):\n```", l.load, l.baseline_name);
        for s in &l.statements {
            let _ = writeln!(md, "{s}");
        }
        let _ = writeln!(md, "```");
    }
    let _ = writeln!(
        md,
        "\n## Memory after the runs (resident / peak resident)\n"
    );
    for (svc, rss, hwm) in memory {
        let _ = writeln!(md, "- {svc}: {rss:.1} MiB / {hwm:.1} MiB");
    }

    let json_lines: Vec<serde_json::Value> = lines
        .iter()
        .zip(&rows)
        .map(|(l, r)| {
            json!({
                "load": l.load,
                "unit": format!("{}/s", l.unit),
                "stack": {
                    "rate": r.rate, "p50_ms": r.p50, "p99_ms": r.p99,
                    "requests": l.stack.ops, "errors": l.stack.errors,
                    "units_per_request": l.stack_per_op,
                },
                "baseline": {
                    "name": l.baseline_name, "rate": r.base_rate,
                    "p50_ms": r.base_p50, "p99_ms": r.base_p99, "errors": l.baseline.errors,
                    "per_statement": l.statements,
                },
                "ratio": r.ratio,
                "goal": l.goal.map(|g| g.text()),
                "met": r.met,
                "cpu_us_per_request": l.cpu_us.iter().map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "feed_lag_ms": l.lag.map(|g| json!({
                    "p50": g.p50_ms, "p99": g.p99_ms, "max": g.max_ms,
                    "scans": g.scans, "not_applied": g.missing,
                    "resolution_ms": CURSOR_POLL.as_millis() as u64,
                })),
                "note": l.note,
            })
        })
        .collect();
    let doc = json!({
        "machine": {
            "cpu": machine.cpu, "cores": machine.cores, "memory_gib": machine.memory_gib,
            "postgresql": machine.postgres, "redis": machine.redis, "commit": machine.commit,
        },
        "settings": settings,
        "lines": json_lines,
        "memory_mib": memory.iter().map(|(s, rss, hwm)| json!({"service": s, "resident": rss, "peak": hwm})).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    std::fs::write(dir.join("results.md"), md)?;
    println!(
        "\nwritten: {} and {}",
        dir.join("results.json").display(),
        dir.join("results.md").display()
    );
    Ok(())
}
