//! Prometheus metrics: one recorder per process, rendered at `/metrics`, followed by the
//! standard process metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...)
//! read from `/proc/self` on each scrape.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the global recorder once and returns its handle (idempotent).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("static buckets are valid");
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (tests): keep a private one for rendering.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// An axum router serving `GET /metrics`.
pub fn router(handle: PrometheusHandle) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                let mut body = handle.render();
                body.push_str(&process::render());
                (
                    [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    body,
                )
            }
        }),
    )
}

/// Serves `/metrics` on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: crate::Shutdown,
) -> anyhow::Result<()> {
    let app = router(install());
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await?;
    Ok(())
}

/// The process collector of the Prometheus client libraries, for Linux: the same names, types
/// and units, read from `/proc/self` when `/metrics` is scraped (nothing runs between scrapes).
/// Elsewhere (no `/proc`), or for a file it cannot read, it renders nothing for that metric.
pub mod process {
    use std::fmt::Write as _;

    /// Clock ticks per second of `/proc/<pid>/stat`'s times: `USER_HZ`, 100 on every Linux
    /// architecture (the Prometheus Go client assumes the same).
    const USER_HZ: f64 = 100.0;

    /// One reading of the process, each part `None` when its source could not be read.
    #[derive(Debug, Default, Clone, PartialEq)]
    pub struct Sample {
        pub cpu_seconds: Option<f64>,
        pub resident_memory_bytes: Option<u64>,
        pub virtual_memory_bytes: Option<u64>,
        pub open_fds: Option<u64>,
        pub max_fds: Option<u64>,
        pub start_time_seconds: Option<f64>,
        pub threads: Option<u64>,
    }

    /// Reads `/proc/self` now.
    pub fn sample() -> Sample {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let stat = read("/proc/self/stat").and_then(|s| parse_stat(&s));
        let status = read("/proc/self/status");
        let boot_time = read("/proc/stat").and_then(|s| parse_boot_time(&s));
        Sample {
            cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / USER_HZ),
            resident_memory_bytes: status.as_deref().and_then(|s| status_kib(s, "VmRSS:")),
            virtual_memory_bytes: status.as_deref().and_then(|s| status_kib(s, "VmSize:")),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|dir| dir.count() as u64),
            max_fds: read("/proc/self/limits").and_then(|s| parse_max_open_files(&s)),
            start_time_seconds: stat
                .zip(boot_time)
                .map(|(s, boot)| boot as f64 + s.start_ticks as f64 / USER_HZ),
            threads: stat.map(|s| s.threads),
        }
    }

    /// The exposition text of [`sample`].
    pub fn render() -> String {
        render_sample(&sample())
    }

    /// The exposition text of one sample (a `# HELP`/`# TYPE` pair and a value per known part).
    pub fn render_sample(s: &Sample) -> String {
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, value: Option<String>| {
            if let Some(v) = value {
                let _ = write!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n\n"
                );
            }
        };
        put(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            s.cpu_seconds.map(|v| v.to_string()),
        );
        put(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            s.resident_memory_bytes.map(|v| v.to_string()),
        );
        put(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            s.virtual_memory_bytes.map(|v| v.to_string()),
        );
        put(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            s.open_fds.map(|v| v.to_string()),
        );
        put(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            s.max_fds.map(|v| v.to_string()),
        );
        put(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            s.start_time_seconds.map(|v| v.to_string()),
        );
        put(
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            s.threads.map(|v| v.to_string()),
        );
        out
    }

    /// The fields of `/proc/<pid>/stat` the collector uses.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct Stat {
        pub utime: u64,
        pub stime: u64,
        pub threads: u64,
        pub start_ticks: u64,
    }

    /// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may hold
    /// spaces and parentheses itself, so the fields are counted from its last `)`.
    pub fn parse_stat(text: &str) -> Option<Stat> {
        let rest = &text[text.rfind(')')? + 1..];
        // rest starts at field 3 (state): field n is rest's (n - 3)th word.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            threads: field(20)?,
            start_ticks: field(22)?,
        })
    }

    /// A `kB` line of `/proc/<pid>/status` (`VmRSS:    1234 kB`), in bytes.
    pub fn status_kib(text: &str, key: &str) -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        let kib: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    }

    /// `btime` of `/proc/stat`: the boot time in seconds since the epoch.
    pub fn parse_boot_time(text: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()
    }

    /// The soft limit of `Max open files` in `/proc/<pid>/limits` (`None` when unlimited).
    pub fn parse_max_open_files(text: &str) -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn stat_fields_are_counted_after_the_last_parenthesis() {
            // A command name with a space and a parenthesis, as `prctl` allows.
            let line = "4242 (my (odd) svc) S 1 4242 4242 0 -1 4194560 1800 0 0 0 \
                        250 75 0 0 20 0 9 0 123456 104857600 2500 18446744073709551615";
            let stat = parse_stat(line).unwrap();
            assert_eq!(
                stat,
                Stat {
                    utime: 250,
                    stime: 75,
                    threads: 9,
                    start_ticks: 123456
                }
            );
        }

        #[test]
        fn status_limits_and_boot_time_parse() {
            let status = "Name:\tsvc\nVmSize:\t  204800 kB\nVmRSS:\t   10240 kB\n";
            assert_eq!(status_kib(status, "VmRSS:"), Some(10 * 1024 * 1024));
            assert_eq!(status_kib(status, "VmSize:"), Some(200 * 1024 * 1024));
            assert_eq!(status_kib(status, "VmSwap:"), None);
            let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                          Max open files            1024                 524288               files\n";
            assert_eq!(parse_max_open_files(limits), Some(1024));
            assert_eq!(
                parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"),
                Some(1_700_000_000)
            );
        }

        #[test]
        fn a_sample_renders_the_standard_names_and_types() {
            let text = render_sample(&Sample {
                cpu_seconds: Some(3.25),
                resident_memory_bytes: Some(10_485_760),
                start_time_seconds: Some(1_700_001_234.56),
                ..Sample::default()
            });
            assert!(text.contains(
                "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3.25\n"
            ));
            assert!(text.contains("process_resident_memory_bytes 10485760\n"));
            assert!(text.contains("process_start_time_seconds 1700001234.56\n"));
            assert!(
                !text.contains("process_open_fds"),
                "an unread part renders nothing"
            );
        }

        #[cfg(target_os = "linux")]
        #[test]
        fn this_process_is_read_from_proc() {
            let s = sample();
            assert!(s.resident_memory_bytes.unwrap() > 1024 * 1024);
            assert!(s.cpu_seconds.unwrap() >= 0.0);
            assert!(s.open_fds.unwrap() >= 3);
            assert!(s.threads.unwrap() >= 1);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            let started = s.start_time_seconds.unwrap();
            assert!(
                started <= now + 1.0 && started > now - 3600.0,
                "started {started}, now {now}"
            );
        }
    }
}
