//! What a run measured: throughput, latencies, errors; the load driver with its progress line;
//! CPU time of processes from `/proc/<pid>/stat`.

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

/// The processes whose CPU time each run accounts for: the four services and this driver.
#[derive(Clone)]
pub struct CpuMeter {
    procs: Vec<(String, u32)>,
    ticks: f64,
}

/// CPU seconds used by each process since a [`CpuMeter::snapshot`].
#[derive(Clone, Default)]
pub struct CpuUse(pub Vec<(String, f64)>);

pub struct CpuSnapshot(Vec<f64>);

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
        CpuSnapshot(
            self.procs
                .iter()
                .map(|(_, p)| cpu_seconds(*p, self.ticks))
                .collect(),
        )
    }

    pub fn since(&self, before: &CpuSnapshot) -> CpuUse {
        let now = self.snapshot();
        CpuUse(
            self.procs
                .iter()
                .zip(now.0.iter().zip(&before.0))
                .map(|((n, _), (a, b))| (n.clone(), a - b))
                .collect(),
        )
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
