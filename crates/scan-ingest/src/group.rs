//! Group commit: the scans of concurrent requests are coalesced into one transaction, within a
//! bounded wait, and each request is acknowledged only after that transaction committed.
//!
//! `workers` tasks take turns at the queue: a worker takes the first waiting request, then
//! whatever else arrives within `max_wait` (or is already queued) up to `max_scans`, releases
//! the queue to the next worker and commits its group. With `max_wait = 0` nothing waits: only
//! requests that are already queued are coalesced, so an idle system adds no latency.

use std::sync::Arc;
use std::time::Duration;

use mes_proto::v1 as pb;
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::Instrument;

use crate::error::Error;
use crate::refcache::RefCache;
use crate::store::scans::{self, Request};

type Reply = oneshot::Sender<Result<Vec<pb::ScanResult>, Error>>;

struct Job {
    request: Request,
    span: tracing::Span,
    reply: Reply,
}

#[derive(Clone)]
pub struct GroupCommitter {
    tx: mpsc::Sender<Job>,
}

#[derive(Debug, Clone, Copy)]
pub struct GroupSettings {
    pub workers: usize,
    pub max_wait: Duration,
    pub max_scans: usize,
}

impl GroupCommitter {
    pub fn start(pool: PgPool, cache: RefCache, settings: GroupSettings) -> Self {
        let (tx, rx) = mpsc::channel::<Job>(4096);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..settings.workers.max(1) {
            tokio::spawn(worker(rx.clone(), pool.clone(), cache.clone(), settings));
        }
        Self { tx }
    }

    /// Queues `request` and waits until its scans are committed (or rejected).
    pub async fn submit(&self, request: Request) -> Result<Vec<pb::ScanResult>, Error> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            request,
            span: tracing::Span::current(),
            reply,
        };
        self.tx
            .send(job)
            .await
            .map_err(|_| Error::Unavailable(anyhow::anyhow!("the commit queue is closed")))?;
        // A worker that stopped (shutdown) may or may not have committed: retrying is safe.
        rx.await
            .map_err(|_| Error::Unavailable(anyhow::anyhow!("the commit worker stopped")))?
    }
}

async fn worker(
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    pool: PgPool,
    cache: RefCache,
    s: GroupSettings,
) {
    loop {
        let jobs = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { return };
            let mut scans = first.request.inputs.len();
            let mut jobs = vec![first];
            let deadline = tokio::time::Instant::now() + s.max_wait;
            while scans < s.max_scans {
                let next = match rx.try_recv() {
                    Ok(job) => Some(job),
                    Err(mpsc::error::TryRecvError::Empty) if !s.max_wait.is_zero() => {
                        tokio::time::timeout_at(deadline, rx.recv())
                            .await
                            .ok()
                            .flatten()
                    }
                    Err(_) => None,
                };
                match next {
                    Some(job) => {
                        scans += job.request.inputs.len();
                        jobs.push(job);
                    }
                    None => break,
                }
            }
            jobs
        };
        commit(&pool, &cache, jobs).await;
    }
}

async fn commit(pool: &PgPool, cache: &RefCache, jobs: Vec<Job>) {
    let scans: usize = jobs.iter().map(|j| j.request.inputs.len()).sum();
    metrics::histogram!("scan_group_requests").record(jobs.len() as f64);
    let span = tracing::info_span!(parent: &jobs[0].span, "scan.group_commit", requests = jobs.len(), scans);
    // One commit for several requests: a child of the first request's span, linked to each
    // other request's trace, and each of those linked back to it, so every request's trace
    // leads to the commit that stored its scans.
    if jobs.len() > 1 {
        let commit_traceparent = span.in_scope(mes_common::propagation::current_traceparent);
        for job in &jobs[1..] {
            mes_common::propagation::add_link(&span, &job.request.traceparent);
            mes_common::propagation::add_link(&job.span, &commit_traceparent);
        }
    }
    let requests: Vec<Request> = jobs.iter().map(|j| j.request.clone()).collect();
    let start = std::time::Instant::now();
    let outcome = scans::submit_group(pool, cache, &requests)
        .instrument(span.clone())
        .await;
    metrics::histogram!("scan_commit_duration_seconds").record(start.elapsed().as_secs_f64());
    match outcome {
        Ok(results) => {
            for (job, r) in jobs.into_iter().zip(results) {
                let _ = job.reply.send(Ok(r));
            }
        }
        Err(e) if jobs.len() > 1 => {
            // One request must not fail the others: commit each on its own.
            tracing::warn!(parent: &span, error = %e, "group commit failed, committing requests one by one");
            for job in jobs {
                let r = scans::submit_group(pool, cache, std::slice::from_ref(&job.request))
                    .instrument(job.span.clone())
                    .await
                    .map(|mut v| v.pop().unwrap_or_default());
                let _ = job.reply.send(r);
            }
        }
        Err(e) => {
            // The error as it is: an unreachable database stays UNAVAILABLE (retrying is safe)
            // whether the group held one request or many.
            // (This arm holds exactly one request.)
            if let Some(job) = jobs.into_iter().next() {
                let _ = job.reply.send(Err(e));
            }
        }
    }
}
