//! Dependency probes that drive the gRPC health service: SERVING only while every dependency
//! answers; NOT_SERVING as soon as shutdown starts (readiness turns false first).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::Shutdown;

type ProbeFn =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = anyhow::Result<Duration>> + Send>> + Send + Sync>;

/// A named dependency check; `required` ones decide SERVING.
#[derive(Clone)]
pub struct Probe {
    pub name: &'static str,
    pub required: bool,
    check: ProbeFn,
}

impl Probe {
    pub fn new<F, Fut>(name: &'static str, required: bool, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Duration>> + Send + 'static,
    {
        Self {
            name,
            required,
            check: Arc::new(move || Box::pin(f())),
        }
    }

    /// Runs the probe with a timeout.
    pub async fn run(&self, timeout: Duration) -> Result<Duration, String> {
        match tokio::time::timeout(timeout, (self.check)()).await {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        }
    }
}

/// Re-evaluates `probes` every `interval` and publishes the result for `""` and `services`.
pub async fn watch(
    reporter: HealthReporter,
    services: Vec<&'static str>,
    probes: Vec<Probe>,
    interval: Duration,
    shutdown: Shutdown,
) {
    let mut last: Option<bool> = None;
    loop {
        if shutdown.is_triggered() {
            set_all(&reporter, &services, ServingStatus::NotServing).await;
            return;
        }
        let mut ok = true;
        for p in &probes {
            let result = p.run(Duration::from_secs(2)).await;
            metrics::gauge!("dependency_up", "dependency" => p.name).set(if result.is_ok() {
                1.0
            } else {
                0.0
            });
            if let Err(e) = &result {
                if last != Some(false) || p.required {
                    tracing::warn!(dependency = p.name, error = %e, "dependency check failed");
                }
                ok &= !p.required;
            }
        }
        if last != Some(ok) {
            tracing::info!(serving = ok, "health changed");
            let status = if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_all(&reporter, &services, status).await;
            last = Some(ok);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait() => {}
        }
    }
}

async fn set_all(reporter: &HealthReporter, services: &[&'static str], status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for s in services {
        reporter.set_service_status(*s, status).await;
    }
}
