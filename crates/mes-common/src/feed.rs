//! The event-feed consumer that trace-query (its projection) and erp-sync (its outbound) both
//! run: it follows scan-ingest's feed from a cursor stored in the consumer's own database and
//! hands each batch to the consumer's [`Apply`].
//!
//! - **Cursor.** The loop reads the stored cursor ([`Apply::position`]) and subscribes after it.
//!   [`Apply::apply`] locks the cursor (creating it at 0 the first time), applies the events
//!   after it and moves it, in one transaction of the consumer's database, so each event takes
//!   effect once however often the feed is replayed.
//! - **Batches.** A batch is the first event the stream yields and whatever is ready behind it,
//!   [`Settings::batch`] at most. It is applied under a `feed.apply` span whose parent is the
//!   trace of the last event that carries one (its `traceparent`): the consumer's work joins the
//!   trace of the request that caused it, and is linked to every other event's request.
//! - **Reconnects.** When the stream ends or breaks (scan-ingest restarted, network) or a batch
//!   fails, the loop resubscribes from the stored cursor after [`backoff`] (exponential from
//!   [`Settings::retry_initial`] to [`Settings::retry_max`], equal jitter). It resubscribes at
//!   once on [`Consumer::resubscribe`], and when, while the feed is idle, it finds the stored
//!   cursor behind its own (both: a rebuild reset it).
//! - **Stalls.** An event the consumer cannot read stops it in front of that event
//!   ([`Outcome::stopped`]): an error log once per event, `event_feed_stalled{consumer}` 1,
//!   `event_feed_stalled_position{consumer}`, and [`Consumer::stalled`] for the health service.
//!   The loop retries with backoff until the event is passed (an upgrade, or `feed_skips`).
//! - **Halt.** [`Failure::Halt`] (erp-sync: another replica took the lease) ends the loop.
//!
//! Metrics, each with the `consumer` label: `event_feed_position` (last applied position),
//! `event_feed_events_applied_total`, `event_feed_lag_events` (events the feed had sequenced when
//! it sent the batch and the consumer has not applied: each event carries the feed's head),
//! `event_feed_lag_seconds` (age of the last applied event while more are waiting; 0 when caught
//! up), `event_feed_failures_total`, `event_feed_stalled`, `event_feed_stalled_position`.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use mes_proto::v1 as pb;
use mes_proto::v1::event_feed_client::EventFeedClient;
use rand::Rng;
use tokio::sync::Notify;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::Shutdown;
use crate::grpc::{self, Signed};
use crate::identity::{Caller, CallerKey};

/// While the feed is idle, how often the loop compares the stored cursor with its own.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// The events of one subscription, in position order.
pub type Events = BoxStream<'static, Result<pb::Event, tonic::Status>>;

/// Where the events come from: scan-ingest's feed ([`EventFeed`]), or a test's stream.
pub trait Source: Send + Sync {
    /// The events after position `after`, then each new one as the feed sequences it.
    fn subscribe(&self, after: u64) -> impl Future<Output = Result<Events, tonic::Status>> + Send;
}

/// scan-ingest's `EventFeed.Subscribe`, called as the system caller named after the consumer.
#[derive(Clone)]
pub struct EventFeed {
    client: EventFeedClient<Signed<Channel>>,
    consumer: String,
}

impl EventFeed {
    /// A lazy channel (building never blocks on scan-ingest) without a per-request timeout: the
    /// feed is a long-lived stream.
    pub fn new(url: &str, key: Option<CallerKey>, consumer: &str) -> anyhow::Result<Self> {
        let channel = grpc::channel(
            url,
            Duration::from_secs(3),
            Duration::from_secs(365 * 86_400),
        )?;
        Ok(Self {
            client: EventFeedClient::new(grpc::signed(channel, key)),
            consumer: consumer.to_owned(),
        })
    }
}

impl Source for EventFeed {
    async fn subscribe(&self, after: u64) -> Result<Events, tonic::Status> {
        let mut req = tonic::Request::new(pb::SubscribeRequest {
            after_position: after,
            consumer: self.consumer.clone(),
        });
        Caller::system(&self.consumer).write_to(req.metadata_mut());
        Ok(self
            .client
            .clone()
            .subscribe(req)
            .await?
            .into_inner()
            .boxed())
    }
}

/// One batch of events, in position order. It may begin with events the stored cursor already
/// covers (a replay): [`Apply::apply`] skips those.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub events: Vec<pb::Event>,
    /// The batch holds all the stream had ready (it was not cut at [`Settings::batch`]): the
    /// consumer has probably caught up with the feed.
    pub caught_up: bool,
}

/// What applying a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The stored cursor after the batch.
    pub position: i64,
    /// The event the batch stopped in front of (this build cannot apply it), if any.
    pub stopped: Option<Stop>,
}

/// An event the consumer cannot apply: its cursor stays in front of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub position: i64,
    pub kind: String,
    pub reason: String,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "event {} ({}) cannot be applied: {}",
            self.position, self.kind, self.reason
        )
    }
}

impl std::error::Error for Stop {}

/// Why a step of the consumer failed.
#[derive(Debug)]
pub enum Failure {
    /// Retried, from the stored cursor, after [`backoff`].
    Retry(anyhow::Error),
    /// The consumer must stop for good (erp-sync: another replica leads its jobs).
    Halt(anyhow::Error),
}

impl Failure {
    pub fn retry(e: impl Into<anyhow::Error>) -> Self {
        Failure::Retry(e.into())
    }
}

/// What a consumer does with the feed. Its cursor lives in its own database, with the effects.
pub trait Apply: Send + Sync {
    /// Runs before the consumer first subscribes, retried with [`backoff`] until it succeeds
    /// (erp-sync: late production an older build left unreported). Nothing by default.
    fn prepare(&self) -> impl Future<Output = Result<(), Failure>> + Send {
        async { Ok(()) }
    }

    /// The stored cursor: the position of the last event applied (0 before the first).
    fn position(&self) -> impl Future<Output = anyhow::Result<i64>> + Send;

    /// Applies `batch` and moves the cursor over it, in one transaction that locks the cursor:
    /// events at or before the stored cursor are skipped, a hole in the positions is an error,
    /// an event this build cannot apply ends the batch in front of it ([`Outcome::stopped`]).
    /// Effects outside the transaction (cache deletions, wake-ups) follow its commit; all of it
    /// runs in the batch's span.
    fn apply(&self, batch: &Batch) -> impl Future<Output = Result<Outcome, Failure>> + Send;
}

/// How a consumer follows the feed.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The consumer's name: its cursor's key, the `consumer` label of its metrics, the caller it
    /// subscribes as.
    pub consumer: String,
    /// Events applied in one transaction at most.
    pub batch: usize,
    /// The first delay before a retry ...
    pub retry_initial: Duration,
    /// ... doubled on each failure in a row, up to this.
    pub retry_max: Duration,
}

/// The follow loop of one consumer, and what it reports. Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct Consumer {
    settings: Arc<Settings>,
    resubscribe: Arc<Notify>,
    stalled: Arc<Mutex<Option<Stop>>>,
}

/// How a subscription ended, other than quietly (the stream ended, shutdown, a resubscription).
enum Break {
    /// Stopped in front of an event it cannot apply (reported already).
    Stalled,
    Failed(Failure),
}

impl From<Failure> for Break {
    fn from(f: Failure) -> Self {
        Break::Failed(f)
    }
}

impl From<anyhow::Error> for Break {
    fn from(e: anyhow::Error) -> Self {
        Break::Failed(Failure::Retry(e))
    }
}

impl From<tonic::Status> for Break {
    fn from(s: tonic::Status) -> Self {
        Break::Failed(Failure::Retry(s.into()))
    }
}

impl Consumer {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings: Arc::new(settings),
            resubscribe: Arc::new(Notify::new()),
            stalled: Arc::new(Mutex::new(None)),
        }
    }

    /// The consumer's name ([`Settings::consumer`]).
    pub fn name(&self) -> &str {
        &self.settings.consumer
    }

    /// The event the consumer is stopped in front of, if any.
    pub fn stalled(&self) -> Option<Stop> {
        self.stalled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes the consumer resubscribe from the stored cursor now (after a rebuild reset it).
    pub fn resubscribe(&self) {
        self.resubscribe.notify_one();
    }

    /// Follows the feed from `source` into `apply` until `stop` fires or `apply` halts.
    pub async fn follow(&self, apply: &impl Apply, source: &impl Source, stop: &Shutdown) {
        let metrics = Metrics::new(self.name());
        metrics
            .stalled
            .set(if self.stalled().is_some() { 1.0 } else { 0.0 });
        let mut failures = 0u32;
        loop {
            match apply.prepare().await {
                Ok(()) => break,
                Err(Failure::Halt(e)) => return halted(&e),
                Err(Failure::Retry(e)) => {
                    failures += 1;
                    metrics.failures.increment(1);
                    report(failures, &e);
                }
            }
            if !self.pause(failures, stop).await {
                return;
            }
        }
        failures = 0;
        while !stop.is_triggered() {
            match self.follow_once(apply, source, stop, &metrics).await {
                Ok(()) if stop.is_triggered() => return,
                Ok(()) => {
                    tracing::info!("event feed ended; resubscribing");
                    failures = 0;
                }
                Err(Break::Failed(Failure::Halt(e))) => return halted(&e),
                Err(Break::Stalled) => {
                    failures += 1;
                    metrics.failures.increment(1);
                }
                Err(Break::Failed(Failure::Retry(e))) => {
                    failures += 1;
                    metrics.failures.increment(1);
                    report(failures, &e);
                }
            }
            if !self.pause(failures, stop).await {
                return;
            }
        }
    }

    /// Waits [`backoff`] before the next attempt (less on a resubscription); false once `stop`
    /// fired.
    async fn pause(&self, failures: u32, stop: &Shutdown) -> bool {
        let delay = backoff(
            failures.max(1),
            self.settings.retry_initial,
            self.settings.retry_max,
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.resubscribe.notified() => true,
            _ = stop.wait() => false,
        }
    }

    /// One subscription, from the stored cursor until the stream ends or breaks.
    async fn follow_once(
        &self,
        apply: &impl Apply,
        source: &impl Source,
        stop: &Shutdown,
        metrics: &Metrics,
    ) -> Result<(), Break> {
        let mut position = apply.position().await?;
        let mut stream = source
            .subscribe(u64::try_from(position).unwrap_or(0))
            .await?;
        tracing::info!(after = position, "following the event feed");
        let max = self.settings.batch.max(1);
        loop {
            let first = tokio::select! {
                m = stream.next() => m,
                _ = stop.wait() => return Ok(()),
                _ = self.resubscribe.notified() => return Ok(()),
                _ = tokio::time::sleep(IDLE_CHECK) => {
                    // A rebuild by another process resets the stored cursor.
                    if apply.position().await? < position {
                        return Ok(());
                    }
                    continue;
                }
            };
            let first = match first {
                Some(Ok(event)) => event,
                Some(Err(status)) => return Err(status.into()),
                None => return Ok(()),
            };
            let (batch, broken) = gather(first, &mut stream, max);
            let before = position;
            let outcome = apply.apply(&batch).instrument(batch_span(&batch)).await?;
            position = outcome.position;
            metrics.applied(&batch, before, position, SystemTime::now());
            self.passed(position, metrics);
            if let Some(stop) = outcome.stopped {
                self.stall(stop, metrics);
                return Err(Break::Stalled);
            }
            if let Some(status) = broken {
                return Err(status.into());
            }
        }
    }

    /// The consumer applied the events up to `position`: a stall in front of one of them is over.
    fn passed(&self, position: i64, metrics: &Metrics) {
        let mut stalled = self.stalled.lock().unwrap_or_else(|p| p.into_inner());
        if stalled.as_ref().is_some_and(|s| position >= s.position) {
            metrics.stalled.set(0.0);
            tracing::info!(position, "event feed no longer stalled");
            *stalled = None;
        }
    }

    /// The consumer stopped in front of `stop`: logged once per event (each retry stops there
    /// again until it is passed).
    fn stall(&self, stop: Stop, metrics: &Metrics) {
        metrics.stalled.set(1.0);
        metrics.stalled_position.set(stop.position as f64);
        let mut stalled = self.stalled.lock().unwrap_or_else(|p| p.into_inner());
        if stalled.as_ref() != Some(&stop) {
            tracing::error!(
                position = stop.position,
                kind = %stop.kind,
                reason = %stop.reason,
                "event feed stalled: this {} cannot apply the event; upgrade it, or record the position in feed_skips to pass it",
                self.name()
            );
            *stalled = Some(stop);
        }
    }
}

fn halted(e: &anyhow::Error) {
    tracing::error!(error = %format!("{e:#}"), "the feed consumer stops");
}

/// Every failure while scan-ingest is down would flood the log: the first three, then every
/// twelfth (about one a minute at the usual cap) are warnings, the others debug lines.
fn report(failures: u32, e: &anyhow::Error) {
    if loud(failures) {
        tracing::warn!(error = %format!("{e:#}"), failures, "event feed consumer failed");
    } else {
        tracing::debug!(error = %format!("{e:#}"), failures, "event feed consumer failed");
    }
}

fn loud(failures: u32) -> bool {
    failures <= 3 || failures.is_multiple_of(12)
}

/// The delay before retry number `attempt` (1 = the first): `initial · 2^(attempt−1)`, capped
/// at `max`, with equal jitter — half of it fixed, half random — so that consumers and replicas
/// do not retry in lockstep, and no delay is longer than the cap.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(30)));
    let cap = exp.min(max).max(Duration::from_millis(1));
    let half = cap / 2;
    let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
    half + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
}

/// The stored cursor of `consumer` in the service's own `feed_cursor` table (`consumer` text
/// key, `position` bigint; 0: nothing applied yet). Read outside a batch: what
/// [`Apply::position`] answers.
pub async fn stored_position(pool: &sqlx::PgPool, consumer: &str) -> Result<i64, sqlx::Error> {
    Ok(
        sqlx::query_scalar("SELECT position FROM feed_cursor WHERE consumer = $1")
            .bind(consumer)
            .fetch_optional(pool)
            .await?
            .unwrap_or(0),
    )
}

/// The cursor of `consumer`, locked for the batch's transaction (no other batch of this
/// consumer runs beside it) and created at 0 the first time. The batch then moves it in the
/// same transaction as its effects: each event takes effect once.
pub async fn lock_cursor(
    conn: &mut sqlx::PgConnection,
    consumer: &str,
) -> Result<i64, sqlx::Error> {
    const LOCK: &str = "SELECT position FROM feed_cursor WHERE consumer = $1 FOR UPDATE";
    if let Some(position) = sqlx::query_scalar(LOCK)
        .bind(consumer)
        .fetch_optional(&mut *conn)
        .await?
    {
        return Ok(position);
    }
    sqlx::query(
        "INSERT INTO feed_cursor (consumer, position) VALUES ($1, 0) ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .execute(&mut *conn)
    .await?;
    sqlx::query_scalar(LOCK)
        .bind(consumer)
        .fetch_one(&mut *conn)
        .await
}

/// `first` and whatever `stream` has ready behind it, `max` events at most; and the error that
/// broke the stream, if one did (the events before it are applied first).
fn gather(first: pb::Event, stream: &mut Events, max: usize) -> (Batch, Option<tonic::Status>) {
    let mut events = vec![first];
    let mut broken = None;
    while events.len() < max {
        match stream.next().now_or_never() {
            Some(Some(Ok(event))) => events.push(event),
            Some(Some(Err(status))) => {
                broken = Some(status);
                break;
            }
            Some(None) | None => break,
        }
    }
    let caught_up = events.len() < max;
    (Batch { events, caught_up }, broken)
}

/// The batch's span: `feed.apply`, in the trace of the last event that carries one, and
/// linked to the span of every other event's request (OpenTelemetry's batch pattern), so each
/// request's trace leads to the batch that applied its events.
fn batch_span(batch: &Batch) -> tracing::Span {
    let span = tracing::info_span!("feed.apply", events = batch.events.len());
    let parent = parent_of(&batch.events);
    if let Some(traceparent) = parent {
        crate::propagation::set_parent(
            &span,
            crate::propagation::context_from_traceparent(traceparent),
        );
    }
    let mut linked = std::collections::HashSet::new();
    for e in &batch.events {
        if !e.traceparent.is_empty()
            && Some(e.traceparent.as_str()) != parent
            && linked.len() < MAX_LINKS
            && linked.insert(e.traceparent.as_str())
        {
            crate::propagation::add_link(&span, &e.traceparent);
        }
    }
    span
}

/// Links of one batch span at most (a batch of 500 events from 500 requests: the first 127
/// others; OpenTelemetry's default span limit is 128 links).
const MAX_LINKS: usize = 127;

fn parent_of(events: &[pb::Event]) -> Option<&str> {
    events
        .iter()
        .rev()
        .map(|e| e.traceparent.as_str())
        .find(|t| !t.is_empty())
}

/// The age of the event at `position` (the last one applied) when the batch was full, in
/// seconds at millisecond resolution; 0 when the consumer caught up or applied nothing new.
fn lag_seconds(batch: &Batch, position: i64, applied: bool, now: SystemTime) -> f64 {
    if batch.caught_up || !applied {
        return 0.0;
    }
    let Some(at) = batch
        .events
        .iter()
        .rev()
        .find(|e| i64::try_from(e.position) == Ok(position))
        .and_then(|e| e.occurred_at.as_ref())
    else {
        return 0.0;
    };
    let (Ok(seconds), Ok(nanos)) = (u64::try_from(at.seconds), u32::try_from(at.nanos)) else {
        return 0.0;
    };
    let at = UNIX_EPOCH + Duration::new(seconds, nanos);
    now.duration_since(at)
        .map(|d| d.as_millis() as f64 / 1e3)
        .unwrap_or(0.0)
}

/// The consumer's metrics, registered once per [`Consumer::follow`].
struct Metrics {
    position: metrics::Gauge,
    applied: metrics::Counter,
    lag_seconds: metrics::Gauge,
    lag_events: metrics::Gauge,
    failures: metrics::Counter,
    stalled: metrics::Gauge,
    stalled_position: metrics::Gauge,
}

impl Metrics {
    fn new(consumer: &str) -> Self {
        let c = || consumer.to_owned();
        Self {
            position: metrics::gauge!("event_feed_position", "consumer" => c()),
            applied: metrics::counter!("event_feed_events_applied_total", "consumer" => c()),
            lag_seconds: metrics::gauge!("event_feed_lag_seconds", "consumer" => c()),
            lag_events: metrics::gauge!("event_feed_lag_events", "consumer" => c()),
            failures: metrics::counter!("event_feed_failures_total", "consumer" => c()),
            stalled: metrics::gauge!("event_feed_stalled", "consumer" => c()),
            stalled_position: metrics::gauge!("event_feed_stalled_position", "consumer" => c()),
        }
    }

    /// A batch moved the cursor from `before` to `after`.
    fn applied(&self, batch: &Batch, before: i64, after: i64, now: SystemTime) {
        let events = u64::try_from(after.saturating_sub(before)).unwrap_or(0);
        self.position.set(after as f64);
        self.applied.increment(events);
        self.lag_seconds
            .set(lag_seconds(batch, after, events > 0, now));
        // Behind by what the feed had sequenced when it sent this batch (never negative).
        let head = batch
            .events
            .iter()
            .map(|e| e.head_position)
            .max()
            .unwrap_or(0);
        self.lag_events
            .set(head.saturating_sub(u64::try_from(after).unwrap_or(0)) as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    fn event(position: u64) -> pb::Event {
        pb::Event {
            position,
            head_position: 10,
            kind: "scan.accepted".into(),
            ..Default::default()
        }
    }

    fn settings(batch: usize) -> Settings {
        Settings {
            consumer: "test".into(),
            batch,
            retry_initial: Duration::from_millis(1),
            retry_max: Duration::from_millis(5),
        }
    }

    /// A feed of events 1..=`last` that stays open after them; a subscription breaks after as
    /// many events as the next entry of `breaks` says.
    struct Feed {
        last: u64,
        breaks: Mutex<VecDeque<usize>>,
        subscriptions: Mutex<Vec<u64>>,
        refuse: bool,
    }

    impl Feed {
        fn new(last: u64, breaks: &[usize]) -> Self {
            Self {
                last,
                breaks: Mutex::new(breaks.iter().copied().collect()),
                subscriptions: Mutex::new(Vec::new()),
                refuse: false,
            }
        }

        fn subscriptions(&self) -> Vec<u64> {
            self.subscriptions.lock().unwrap().clone()
        }
    }

    impl Source for Feed {
        async fn subscribe(&self, after: u64) -> Result<Events, tonic::Status> {
            self.subscriptions.lock().unwrap().push(after);
            if self.refuse {
                return Err(tonic::Status::unavailable("scan-ingest is down"));
            }
            let mut items: Vec<Result<pb::Event, tonic::Status>> =
                (after + 1..=self.last).map(|p| Ok(event(p))).collect();
            if let Some(n) = self.breaks.lock().unwrap().pop_front() {
                items.truncate(n);
                items.push(Err(tonic::Status::unavailable("connection reset")));
            }
            Ok(futures::stream::iter(items)
                .chain(futures::stream::pending())
                .boxed())
        }
    }

    /// A consumer's database: the cursor, what was applied, in which batches.
    #[derive(Default)]
    struct Store {
        cursor: Mutex<i64>,
        applied: Mutex<Vec<u64>>,
        batches: Mutex<Vec<usize>>,
        /// The position this build cannot read, while set.
        unreadable: Mutex<Option<u64>>,
        /// Failures of `prepare` before it succeeds.
        prepare_failures: Mutex<u32>,
        prepared: Mutex<bool>,
        halt: bool,
    }

    impl Store {
        fn cursor(&self) -> i64 {
            *self.cursor.lock().unwrap()
        }

        fn applied(&self) -> Vec<u64> {
            self.applied.lock().unwrap().clone()
        }
    }

    impl Apply for Store {
        async fn prepare(&self) -> Result<(), Failure> {
            let mut left = self.prepare_failures.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return Err(Failure::retry(anyhow::anyhow!("database down")));
            }
            *self.prepared.lock().unwrap() = true;
            Ok(())
        }

        async fn position(&self) -> anyhow::Result<i64> {
            Ok(self.cursor())
        }

        async fn apply(&self, batch: &Batch) -> Result<Outcome, Failure> {
            if self.halt {
                return Err(Failure::Halt(anyhow::anyhow!("fenced")));
            }
            let mut cursor = self.cursor.lock().unwrap();
            let mut stopped = None;
            self.batches.lock().unwrap().push(batch.events.len());
            for e in &batch.events {
                let position = e.position as i64;
                if position <= *cursor {
                    continue;
                }
                if position != *cursor + 1 {
                    return Err(Failure::retry(anyhow::anyhow!("gap at {position}")));
                }
                if *self.unreadable.lock().unwrap() == Some(e.position) {
                    stopped = Some(Stop {
                        position,
                        kind: e.kind.clone(),
                        reason: "unknown".into(),
                    });
                    break;
                }
                self.applied.lock().unwrap().push(e.position);
                *cursor = position;
            }
            Ok(Outcome {
                position: *cursor,
                stopped,
            })
        }
    }

    async fn until(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn spawn(
        consumer: &Consumer,
        store: &Arc<Store>,
        feed: &Arc<Feed>,
        stop: &Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let (consumer, store, feed, stop) =
            (consumer.clone(), store.clone(), feed.clone(), stop.clone());
        tokio::spawn(async move { consumer.follow(&*store, &*feed, &stop).await })
    }

    async fn ends(task: tokio::task::JoinHandle<()>) {
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the loop ends")
            .expect("no panic");
    }

    #[test]
    fn backoff_doubles_from_initial_up_to_the_cap_and_jitters_below_it() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        // Nominal delays: 100, 200, 400, 800, 1600 ms, then 2 s for good.
        let nominal = [100u64, 200, 400, 800, 1600, 2000, 2000];
        for (attempt, nominal) in (1..).zip(nominal) {
            let cap = Duration::from_millis(nominal);
            for _ in 0..50 {
                let d = backoff(attempt, initial, max);
                assert!(
                    d >= cap / 2 && d <= cap,
                    "attempt {attempt}: {d:?} outside [{:?}, {cap:?}]",
                    cap / 2
                );
            }
        }
        // Many failures in a row neither overflow nor exceed the cap.
        for attempt in [40, 1_000, u32::MAX] {
            assert!(backoff(attempt, initial, max) <= max);
        }
        // A zero initial delay still waits (no busy loop).
        assert!(backoff(1, Duration::ZERO, Duration::ZERO) >= Duration::from_micros(500));
    }

    #[test]
    fn backoff_spreads_retries() {
        let delays: std::collections::BTreeSet<Duration> = (0..200)
            .map(|_| backoff(5, Duration::from_millis(100), Duration::from_secs(10)))
            .collect();
        // 800 ms .. 1.6 s in whole milliseconds: 200 draws give well over 100 distinct delays.
        assert!(delays.len() > 100, "{} distinct delays", delays.len());
        let spread = *delays.last().unwrap() - *delays.first().unwrap();
        assert!(spread > Duration::from_millis(400), "{spread:?}");
    }

    #[test]
    fn failures_are_logged_loud_at_first_then_every_twelfth() {
        let loud: Vec<u32> = (1..=40).filter(|&f| loud(f)).collect();
        assert_eq!(loud, [1, 2, 3, 12, 24, 36]);
    }

    #[test]
    fn a_batch_takes_what_is_ready_up_to_the_limit_and_keeps_the_break() {
        let ready = |items: Vec<Result<pb::Event, tonic::Status>>| -> Events {
            futures::stream::iter(items)
                .chain(futures::stream::pending())
                .boxed()
        };
        let mut stream = ready((2..=5).map(|p| Ok(event(p))).collect());
        let (batch, broken) = gather(event(1), &mut stream, 3);
        let positions: Vec<u64> = batch.events.iter().map(|e| e.position).collect();
        assert_eq!(positions, [1, 2, 3]);
        assert!(!batch.caught_up && broken.is_none());
        let next = stream.next().now_or_never().flatten().unwrap().unwrap();
        let (batch, broken) = gather(next, &mut stream, 3);
        let positions: Vec<u64> = batch.events.iter().map(|e| e.position).collect();
        assert_eq!(positions, [4, 5]);
        assert!(batch.caught_up && broken.is_none());

        let mut stream = ready(vec![Ok(event(2)), Err(tonic::Status::unavailable("reset"))]);
        let (batch, broken) = gather(event(1), &mut stream, 10);
        assert_eq!(batch.events.len(), 2);
        assert_eq!(broken.map(|s| s.code()), Some(tonic::Code::Unavailable));
    }

    #[test]
    fn the_batch_span_follows_the_last_event_with_a_trace() {
        let with = |p: u64, tp: &str| pb::Event {
            traceparent: tp.into(),
            ..event(p)
        };
        let a = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let b = "00-1bf7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01";
        assert_eq!(parent_of(&[with(1, a), with(2, b), with(3, "")]), Some(b));
        assert_eq!(parent_of(&[with(1, ""), with(2, "")]), None);
    }

    #[test]
    fn the_batch_span_is_linked_to_every_other_events_request() {
        let with = |p: u64, tp: &str| pb::Event {
            traceparent: tp.into(),
            ..event(p)
        };
        let a = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let b = "00-1bf7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01";
        let c = "00-2cf7651916cd43dd8448eb211c80319c-d7ad6b7169203331-01";
        let batch = Batch {
            events: vec![with(1, a), with(2, b), with(3, a), with(4, ""), with(5, c)],
            caught_up: true,
        };
        let spans = crate::propagation::recorded::spans(|| drop(batch_span(&batch)));
        let span = spans
            .iter()
            .find(|s| s.name == "feed.apply")
            .expect("ended");
        assert_eq!(
            span.span_context.trace_id().to_string(),
            "2cf7651916cd43dd8448eb211c80319c",
            "in the last event's trace"
        );
        let mut linked: Vec<String> = span
            .links
            .iter()
            .map(|l| l.span_context.trace_id().to_string())
            .collect();
        linked.sort();
        assert_eq!(
            linked,
            [
                "0af7651916cd43dd8448eb211c80319c",
                "1bf7651916cd43dd8448eb211c80319c"
            ],
            "each other request once"
        );
    }

    #[test]
    fn lag_is_the_age_of_the_last_applied_event_while_more_wait() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let at = |p: u64, secs: i64| {
            let mut e = event(p);
            let occurred_at = e.occurred_at.insert(Default::default());
            occurred_at.seconds = secs;
            occurred_at.nanos = 500_000_000;
            e
        };
        let full = Batch {
            events: vec![at(1, 900), at(2, 990), at(3, 995)],
            caught_up: false,
        };
        // Event 3 could not be applied (a stop): the lag is event 2's.
        assert_eq!(lag_seconds(&full, 2, true, now), 9.5);
        assert_eq!(lag_seconds(&full, 3, true, now), 4.5);
        assert_eq!(lag_seconds(&full, 2, false, now), 0.0);
        let caught_up = Batch {
            caught_up: true,
            ..full.clone()
        };
        assert_eq!(lag_seconds(&caught_up, 3, true, now), 0.0);
        // An event from the future (clock skew) is not negative lag.
        assert_eq!(lag_seconds(&full, 3, true, UNIX_EPOCH), 0.0);
    }

    #[tokio::test]
    async fn each_event_is_applied_once_across_a_broken_stream() {
        let store = Arc::new(Store {
            prepare_failures: Mutex::new(2),
            ..Default::default()
        });
        let feed = Arc::new(Feed::new(10, &[4]));
        let consumer = Consumer::new(settings(3));
        let stop = Shutdown::new();
        let task = spawn(&consumer, &store, &feed, &stop);
        until("all applied", || store.cursor() == 10).await;
        assert!(*store.prepared.lock().unwrap());
        assert_eq!(store.applied(), (1..=10).collect::<Vec<_>>());
        // The first subscription broke after event 4: the next one starts from the cursor.
        assert_eq!(feed.subscriptions(), [0, 4]);
        assert!(store.batches.lock().unwrap().iter().all(|&n| n <= 3));
        stop.trigger();
        ends(task).await;
    }

    #[tokio::test]
    async fn a_resubscription_starts_from_the_stored_cursor() {
        let store = Arc::new(Store::default());
        let feed = Arc::new(Feed::new(5, &[]));
        let consumer = Consumer::new(settings(100));
        let stop = Shutdown::new();
        let task = spawn(&consumer, &store, &feed, &stop);
        until("caught up", || store.cursor() == 5).await;
        // A rebuild: the cursor back to 0, then the consumer told.
        *store.cursor.lock().unwrap() = 0;
        consumer.resubscribe();
        until("replayed", || store.applied().len() == 10).await;
        assert_eq!(feed.subscriptions(), [0, 0]);
        stop.trigger();
        ends(task).await;
    }

    #[tokio::test]
    async fn a_stall_is_reported_until_the_event_is_passed() {
        let store = Arc::new(Store {
            unreadable: Mutex::new(Some(3)),
            ..Default::default()
        });
        let feed = Arc::new(Feed::new(5, &[]));
        let consumer = Consumer::new(settings(100));
        let stop = Shutdown::new();
        let task = spawn(&consumer, &store, &feed, &stop);
        until("stalled", || consumer.stalled().is_some()).await;
        let stalled = consumer.stalled().unwrap();
        assert_eq!(
            (stalled.position, stalled.kind.as_str()),
            (3, "scan.accepted")
        );
        assert_eq!(store.cursor(), 2, "the cursor stays in front of the event");
        // It retries (resubscribing from the cursor) and stays in front of it.
        until("retried", || feed.subscriptions().len() >= 3).await;
        assert_eq!(store.cursor(), 2);
        assert!(consumer.stalled().is_some());
        // An upgrade (or feed_skips) lets it pass.
        *store.unreadable.lock().unwrap() = None;
        until("passed", || store.cursor() == 5).await;
        until("cleared", || consumer.stalled().is_none()).await;
        stop.trigger();
        ends(task).await;
    }

    #[tokio::test]
    async fn the_loop_ends_on_shutdown_while_following_and_while_backing_off() {
        // Following an idle feed.
        let store = Arc::new(Store::default());
        let feed = Arc::new(Feed::new(2, &[]));
        let consumer = Consumer::new(settings(100));
        let stop = Shutdown::new();
        let task = spawn(&consumer, &store, &feed, &stop);
        until("caught up", || store.cursor() == 2).await;
        stop.trigger();
        ends(task).await;

        // Waiting a minute before the next attempt while scan-ingest is down.
        let feed = Arc::new(Feed {
            refuse: true,
            ..Feed::new(2, &[])
        });
        let consumer = Consumer::new(Settings {
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(60),
            ..settings(100)
        });
        let stop = Shutdown::new();
        let task = spawn(&consumer, &store, &feed, &stop);
        until("refused once", || feed.subscriptions().len() == 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!task.is_finished());
        stop.trigger();
        ends(task).await;
        assert_eq!(feed.subscriptions().len(), 1, "no attempt after shutdown");
    }

    #[tokio::test]
    async fn a_halt_ends_the_loop_for_good() {
        let store = Arc::new(Store {
            halt: true,
            ..Default::default()
        });
        let feed = Arc::new(Feed::new(3, &[]));
        let consumer = Consumer::new(settings(100));
        let stop = Shutdown::new();
        ends(spawn(&consumer, &store, &feed, &stop)).await;
        assert!(!stop.is_triggered());
        assert_eq!(feed.subscriptions(), [0]);
    }
}
