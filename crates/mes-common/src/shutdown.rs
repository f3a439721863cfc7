//! Graceful shutdown: a cloneable signal triggered by SIGTERM/SIGINT (or by tests).

use tokio::sync::watch;

/// A cloneable shutdown signal. Cheap to clone; every clone sees the trigger.
#[derive(Clone)]
pub struct Shutdown {
    tx: std::sync::Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Self {
            tx: std::sync::Arc::new(tx),
            rx,
        }
    }

    /// A shutdown that fires on SIGTERM or SIGINT.
    pub fn on_signals() -> Self {
        let s = Self::new();
        let trigger = s.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received, draining");
            trigger.trigger();
        });
        s
    }

    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown has been triggered.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|v| *v).await;
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Ends the process at once, as a crash at this spot would: no graceful shutdown, no answer
/// to requests in flight, no flush of anything but this line. The fault suite's fail points
/// call it (`fail::fail_point!(name, |_| mes_common::shutdown::crash(name))`, compiled in
/// only with a service's `failpoints` feature).
pub fn crash(point: &str) -> ! {
    eprintln!(
        "{{\"level\":\"ERROR\",\"fields\":{{\"message\":\"fail point {point}: exiting as a crash here would\"}}}}"
    );
    std::process::exit(86)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_trigger() {
        let s = Shutdown::new();
        let c = s.clone();
        let waiter = tokio::spawn(async move { c.wait().await });
        assert!(!s.is_triggered());
        s.trigger();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(s.is_triggered());
        // Waiting after the trigger returns at once.
        tokio::time::timeout(std::time::Duration::from_millis(50), s.wait())
            .await
            .unwrap();
    }
}
