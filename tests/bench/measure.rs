//! What a run measured: throughput, latencies, errors; the load driver with its progress line;
//! CPU time of processes from `/proc/<pid>/stat`.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What one run measured.
#[derive(Default, Clone)]
pub struct Figures {
    /// Requests (or transactions) that succeeded.
    pub ops: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latencies_us: Vec<u64>,
    /// The first failure, to say why when there are errors.
    pub first_error: Option<String>,
}

impl Figures {
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us.sort_unstable();
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }

    pub fn error_note(&self) -> String {
        if self.errors > 0 {
            format!(
                " ({} errors; first: {})",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            )
        } else {
            String::new()
        }
    }
}

/// A progress line on stderr while a run goes (rewritten in place on a terminal; one line when
/// stderr is a file), cleared when the run ends.
pub struct Progress {
    done: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
    tty: bool,
}

impl Progress {
    /// Starts the line for a run of about `seconds`; `ops` counts what has been done (when known).
    pub fn start(label: &str, seconds: u64, ops: Option<Arc<AtomicU64>>) -> Self {
        let tty = std::io::stderr().is_terminal();
        let done = Arc::new(AtomicBool::new(false));
        if !tty {
            eprintln!("  .. {label} ({seconds} s)");
            return Self {
                done,
                task: None,
                tty,
            };
        }
        let (d, label) = (done.clone(), label.to_owned());
        let task = tokio::spawn(async move {
            let start = Instant::now();
            while !d.load(Ordering::Relaxed) {
                let t = start.elapsed().as_secs_f64();
                let count = ops
                    .as_ref()
                    .map(|o| format!(", {} done", o.load(Ordering::Relaxed)))
                    .unwrap_or_default();
                eprint!("\r\x1b[K  .. {label}: {t:.0}/{seconds} s{count}");
                let _ = std::io::stderr().flush();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Self {
            done,
            task: Some(task),
            tty,
        }
    }

    pub async fn finish(mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        if self.tty {
            eprint!("\r\x1b[K");
            let _ = std::io::stderr().flush();
        }
    }
}

/// Runs `clients` copies of `op` for `seconds`, with a progress line; each call says whether
/// it succeeded.
pub async fn drive<F, Fut>(label: &str, clients: usize, seconds: u64, op: F) -> Figures
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let op = Arc::new(op);
    let count = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(label, seconds, Some(count.clone()));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (op, count) = (op.clone(), count.clone());
            tokio::spawn(async move {
                let mut f = Figures::default();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match op(c, n).await {
                        Ok(()) => {
                            f.ops += 1;
                            f.latencies_us.push(t.elapsed().as_micros() as u64);
                            count.fetch_add(1, Ordering::Relaxed);
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
    progress.finish().await;
    all
}

/// Clock ticks per second of `/proc/<pid>/stat`'s times.
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds a process has used so far.
fn cpu_seconds(pid: u32, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) start with the state (field 3):
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() == 2 {
        (f[0] + f[1]) / ticks
    } else {
        f64::NAN
    }
}

/// The CPU time each run accounts for: the four services and this driver (by pid), PostgreSQL
/// and Redis (every process named `postgres` / `redis-server`), and the rest of the machine
/// (`other`: all busy CPU time of `/proc/stat` not in those, such as other builds sharing the
/// machine, which make a run's figures lower than the machine can do).
#[derive(Clone)]
pub struct CpuMeter {
    procs: Vec<(String, u32)>,
    ticks: f64,
}

/// CPU seconds used by each process (or group) since a [`CpuMeter::snapshot`].
#[derive(Clone, Default)]
pub struct CpuUse(pub Vec<(String, f64)>);

pub struct CpuSnapshot {
    procs: Vec<f64>,
    /// pid → (group, CPU seconds) of the PostgreSQL and Redis processes.
    groups: HashMap<u32, (&'static str, f64)>,
    /// Busy CPU seconds of the whole machine.
    busy: f64,
}

/// The group a process belongs to by its command name, if it is one the meter sums.
fn group_of(comm: &str) -> Option<&'static str> {
    match comm {
        "postgres" => Some("postgres"),
        c if c.starts_with("redis-server") => Some("redis"),
        _ => None,
    }
}

fn groups(ticks: f64) -> HashMap<u32, (&'static str, f64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let comm = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map_or("", |(c, _)| c);
        if let Some(g) = group_of(comm) {
            out.insert(pid, (g, cpu_seconds(pid, ticks)));
        }
    }
    out
}

/// Busy (not idle, not waiting for I/O) CPU seconds of the machine since boot.
fn machine_busy(ticks: f64) -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …
    let busy: f64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| ![3, 4].contains(i) && *i < 8)
        .map(|(_, v)| v)
        .sum();
    busy / ticks
}

impl CpuMeter {
    pub fn new(services: Vec<(&'static str, u32)>) -> Self {
        let mut procs: Vec<(String, u32)> = services
            .into_iter()
            .map(|(n, p)| (n.to_owned(), p))
            .collect();
        procs.push(("mes-bench".into(), std::process::id()));
        Self {
            procs,
            ticks: clock_ticks(),
        }
    }

    pub fn snapshot(&self) -> CpuSnapshot {
        CpuSnapshot {
            procs: self
                .procs
                .iter()
                .map(|(_, p)| cpu_seconds(*p, self.ticks))
                .collect(),
            groups: groups(self.ticks),
            busy: machine_busy(self.ticks),
        }
    }

    pub fn since(&self, before: &CpuSnapshot) -> CpuUse {
        let now = self.snapshot();
        let mut out: Vec<(String, f64)> = self
            .procs
            .iter()
            .zip(now.procs.iter().zip(&before.procs))
            .map(|((n, _), (a, b))| (n.clone(), a - b))
            .collect();
        for g in ["postgres", "redis"] {
            // Processes started during the run count from zero; those that ended are lost
            // (they fall into `other`).
            let used: f64 = now
                .groups
                .iter()
                .filter(|(_, (group, _))| *group == g)
                .map(|(pid, (_, t))| t - before.groups.get(pid).map_or(0.0, |(_, b)| *b))
                .sum();
            out.push((g.to_owned(), used));
        }
        let accounted: f64 = out.iter().map(|(_, t)| t).sum();
        out.push((
            "other".to_owned(),
            (now.busy - before.busy - accounted).max(0.0),
        ));
        CpuUse(out)
    }
}

impl CpuUse {
    /// CPU microseconds per request of each process.
    pub fn per_request_us(&self, requests: u64) -> Vec<(String, f64)> {
        self.0
            .iter()
            .map(|(n, s)| (n.clone(), s * 1e6 / requests.max(1) as f64))
            .collect()
    }
}
