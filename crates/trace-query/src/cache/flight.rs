//! Single-flight within a replica: concurrent identical misses share one computation.
//!
//! The first caller of a key becomes the leader: its work runs as a task of its own (a caller
//! that gives up does not cancel it for the others) and the entry is removed when the work is
//! done. Later callers of the same key await the same shared result.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

type SharedResult<T> = Shared<BoxFuture<'static, Option<T>>>;
/// Key → (flight id, its shared result).
type InFlight<T> = Arc<Mutex<HashMap<String, (u64, SharedResult<T>)>>>;

pub struct Flights<T: Clone + Send + Sync + 'static> {
    inflight: InFlight<T>,
    next_id: AtomicU64,
}

impl<T: Clone + Send + Sync + 'static> Default for Flights<T> {
    fn default() -> Self {
        Self {
            inflight: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(0),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// Runs `work` unless an identical one is in flight; returns its result and whether this
    /// caller led. `None` only when the work panicked.
    pub async fn run<F, Fut>(&self, key: &str, work: F) -> (Option<T>, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let (fut, leader) = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, f)) = map.get(key) {
                (f.clone(), false)
            } else {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let inflight = self.inflight.clone();
                let owned_key = key.to_owned();
                let work = work();
                let task = tokio::spawn(async move {
                    let out = work.await;
                    let mut map = inflight.lock().unwrap_or_else(|p| p.into_inner());
                    if map.get(&owned_key).is_some_and(|(i, _)| *i == id) {
                        map.remove(&owned_key);
                    }
                    out
                });
                let shared = async move { task.await.ok() }.boxed().shared();
                map.insert(key.to_owned(), (id, shared.clone()));
                (shared, true)
            }
        };
        (fut.await, leader)
    }

    /// Keys in flight (tests, diagnostics).
    pub fn len(&self) -> usize {
        self.inflight.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_identical_calls_run_once() {
        let flights: Arc<Flights<u32>> = Arc::new(Flights::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..100 {
            let flights = flights.clone();
            let runs = runs.clone();
            handles.push(tokio::spawn(async move {
                flights
                    .run("k", move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        7
                    })
                    .await
            }));
        }
        let mut leaders = 0;
        for h in handles {
            let (v, leader) = h.await.unwrap();
            assert_eq!(v, Some(7));
            leaders += usize::from(leader);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        assert!(flights.is_empty(), "the entry is removed when done");
        // Later calls run again.
        let (v, leader) = flights.run("k", || async { 8 }).await;
        assert_eq!((v, leader), (Some(8), true));
    }

    #[tokio::test]
    async fn a_cancelled_leader_does_not_cancel_the_work() {
        let flights: Arc<Flights<u32>> = Arc::new(Flights::default());
        let f = flights.clone();
        let leader = tokio::spawn(async move {
            f.run("k", || async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                1
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        leader.abort();
        let (v, led) = flights.run("k", || async { 2 }).await;
        assert_eq!((v, led), (Some(1), false));
    }
}
