//! Outbound, second half: posts the outbox to the ERP, in queue order per work order, with the
//! idempotency key, a per-call timeout, exponential backoff with jitter, and a circuit breaker
//! (`erp_breaker_state`: 0 closed, 1 half-open, 2 open). `erp_outbox_depth` is the number of
//! confirmations and reversals waiting.
//!
//! - A row the ERP refuses for good, or one whose transient failures counted `erp.max_attempts`
//!   times (a poison row: the ERP keeps answering 500 for it while it takes other rows), leaves
//!   the queue as a dead letter (entity `outbox`, in `GetStatus.dead_letters`,
//!   `erp_outbox_dead_lettered_total`, an error log), which `ErpSync.ReplayDeadLetters`
//!   re-queues with fresh attempts.
//! - Which failures count (an ERP outage must not turn every work order's head into a dead
//!   letter): a transient failure (unavailable, timeout) counts toward `erp.max_attempts` only
//!   while the ERP takes other traffic, i.e. the breaker was closed before the call and is
//!   still closed after it. The failure that opens the breaker (the
//!   `breaker_failure_threshold`-th in a row) and every failed half-open trial are the ERP's,
//!   not the row's: the row is rescheduled (backoff by its counted attempts; the breaker paces
//!   the calls) and counts nothing (`erp_delivery_failures_uncounted_total`, `counted = false`
//!   in the log). An outage of any length therefore counts at most threshold − 1 failures, at
//!   its onset, spread over the heads (erp-sync refuses to start unless the threshold is below
//!   `max_attempts`; the breaker lives in memory, so a restart during an outage may count as
//!   many again), and makes no dead letters; the queue drains when the ERP returns. With
//!   threshold 1 (every failure opens the breaker) a failure right after a success counts.
//! - A poison row alone in the queue cannot be told from an outage: its failures open the
//!   breaker and stop counting; it is retried once per `breaker_open_ms` (the breaker reads
//!   open though the ERP is fine: the row's `last_error` says why) and holds only its own work
//!   order (another work order's row gets the next half-open trial, or the one after). Each
//!   delivery of another row closes the breaker, and the poison row's next failures count
//!   again (up to threshold − 1 each time), so with other traffic it still ends as a dead
//!   letter.
//! - Other work orders go on; the later rows of a work order whose confirmation is a dead
//!   letter are held behind it (`erp_outbox_held`; they stay in `queue_depth`) until the
//!   replay delivers it.
//! - An ERP shedding load (429, or 503 with `Retry-After`: [`AdapterError::Throttled`]) is up
//!   and busy, which says nothing about the row: such an answer never counts toward
//!   `erp.max_attempts` (`erp_delivery_throttled_total`), and the row's next try waits the
//!   `Retry-After` asked (at most `erp.retry_max_ms`, at least the backoff). It still feeds the
//!   breaker, so an ERP refusing everything is paced by it.
//! - A timed-out call may still be running inside the ERP (the timeout drops erp-sync's side
//!   only): the row's next try waits at least `erp.retry_after_timeout_ms` (default 60 s),
//!   whatever the backoff, so that the retry's idempotency-key lookup (Tryton: search, then
//!   create, as separate calls) comes after the first request committed. Exactly-once with an
//!   ERP that checks keys by lookup relies on that setting exceeding the longest time the ERP
//!   keeps working on a request.
//! - Refused credentials (401/403, a refused login) are an operator's problem, not the row's:
//!   `erp_auth_failed` is 1 and `erp_auth_failures_total` counts, an error is logged, the
//!   delivery pauses `erp.auth_retry_ms` and no attempt is counted (the breaker is not fed).
//! - Every step runs in a transaction fenced by the scheduler's lease token
//!   ([`crate::store::lease`]): a deposed leader neither posts nor marks anything.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mes_common::Shutdown;
use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::adapter::{AdapterError, ErpAdapter, Posted};
use crate::breaker::{self, Breaker, State};
use crate::domain::{Confirmation, Reversal};
use crate::store::lease::{FenceError, Fenced};
use crate::store::outbound::{OutboxKind, OutboxRow};
use crate::store::{self, inbound, outbound};

/// `entity` of outbound dead letters (outbox rows the ERP refused for good).
pub const OUTBOX_ENTITY: &str = "outbox";

/// What an outbox row asks the ERP to do.
enum Document {
    Confirmation(Confirmation),
    Reversal(Reversal),
}

impl Document {
    fn read(row: &OutboxRow) -> Result<Self, serde_json::Error> {
        Ok(match row.kind {
            OutboxKind::Confirmation => {
                Self::Confirmation(serde_json::from_value(row.payload.clone())?)
            }
            OutboxKind::Reversal => Self::Reversal(serde_json::from_value(row.payload.clone())?),
        })
    }

    fn work_order(&self) -> &str {
        match self {
            Self::Confirmation(c) => &c.work_order,
            Self::Reversal(r) => &r.work_order,
        }
    }
}

/// How often an idle loop looks at the queue (new rows also wake it).
const IDLE_POLL: Duration = Duration::from_secs(2);

/// Key of the breaker state in `erp_state`.
pub const BREAKER_KEY: &str = "breaker";

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Another replica took the lease: this delivery must stop.
    #[error("{0}")]
    Fenced(FenceError),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<FenceError> for StepError {
    fn from(e: FenceError) -> Self {
        match e {
            FenceError::Db(e) => StepError::Db(e),
            fenced => StepError::Fenced(fenced),
        }
    }
}

pub struct Delivery {
    pub pool: PgPool,
    pub adapter: Arc<dyn ErpAdapter>,
    pub breaker: Arc<Mutex<Breaker>>,
    pub wake: Arc<Notify>,
    pub call_timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Attempts before a row becomes a dead letter (at least 1).
    pub max_attempts: u32,
    /// The pause after refused credentials.
    pub auth_retry: Duration,
    /// The shortest wait before retrying a row whose call timed out (`erp.retry_after_timeout_ms`).
    pub retry_after_timeout: Duration,
    /// The scheduler's lease token this delivery holds.
    pub token: i64,
}

impl Delivery {
    /// Delivers until `stop`, or until another replica took the lease.
    pub async fn run(self, stop: Shutdown) {
        let state = self.breaker_state();
        self.publish_breaker(state).await;
        let mut held = -1;
        loop {
            if stop.is_triggered() {
                return;
            }
            let wait = match self.step().await {
                Ok(wait) => wait,
                Err(StepError::Fenced(e)) => {
                    tracing::error!(error = %e, "another replica leads the erp jobs; delivery stops");
                    return;
                }
                Err(StepError::Db(e)) => {
                    tracing::warn!(error = %e, "outbox delivery cannot reach its database");
                    Some(IDLE_POLL)
                }
            };
            held = self.publish_depth(held).await;
            if let Some(wait) = wait {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.wake.notified() => {}
                    _ = stop.wait() => return,
                }
            }
        }
    }

    fn breaker_state(&self) -> State {
        self.breaker
            .lock()
            .map(|b| b.state())
            .unwrap_or(State::Closed)
    }

    async fn publish_breaker(&self, state: State) {
        metrics::gauge!("erp_breaker_state").set(state.gauge());
        if let Err(e) = store::set_state(&self.pool, BREAKER_KEY, state.as_str()).await {
            tracing::warn!(error = %e, "cannot record the breaker state");
        }
    }

    /// Publishes the queue's depth and the held rows; logs when the number held changes.
    async fn publish_depth(&self, held_before: i64) -> i64 {
        if let Ok((depth, oldest)) = outbound::depth(&self.pool).await {
            metrics::gauge!("erp_outbox_depth").set(depth as f64);
            metrics::gauge!("erp_outbox_oldest_pending_seconds").set(oldest);
        }
        match outbound::held(&self.pool).await {
            Ok(held) => {
                metrics::gauge!("erp_outbox_held").set(held as f64);
                if held != held_before && held > 0 {
                    tracing::warn!(
                        held,
                        "outbox rows held behind a dead-lettered confirmation of their work order; replay it"
                    );
                }
                held
            }
            Err(_) => held_before,
        }
    }

    /// Tries the next due row (see [`outbound::next_pending`]); returns how long to wait
    /// before the next step (`None`: go on at once). Refused with [`StepError::Fenced`], before
    /// any ERP call or outbox change, once another replica took the lease.
    pub async fn step(&self) -> Result<Option<Duration>, StepError> {
        let Some(row) = outbound::next_pending(&self.pool).await? else {
            return Ok(Some(IDLE_POLL));
        };
        let now = chrono::Utc::now();
        if row.next_attempt_at > now {
            let wait = (row.next_attempt_at - now).to_std().unwrap_or(IDLE_POLL);
            return Ok(Some(wait));
        }
        // The whole step (the ERP call included) holds the lease: a new leader waits for it.
        let hold_for = self.call_timeout + Duration::from_secs(5);
        let mut fenced = Fenced::begin(&self.pool, self.token, hold_for).await?;
        let document = match Document::read(&row) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(idempotency_key = %row.idempotency_key, error = %e,
                    "unreadable outbox row; set aside");
                set_aside(
                    &mut fenced,
                    &row,
                    "unreadable_payload",
                    &format!("unreadable payload: {e}"),
                    false,
                )
                .await?;
                fenced.commit().await?;
                return Ok(None);
            }
        };

        let before = self.breaker_state();
        // Ok: the call may go out, with the failed calls since the last success.
        let allowed = match self.breaker.lock() {
            Ok(mut b) => {
                if b.allow(Instant::now()) {
                    Ok(b.consecutive_failures())
                } else {
                    Err(b.retry_at())
                }
            }
            Err(_) => Ok(0),
        };
        let failures_before = match allowed {
            Ok(failures) => failures,
            Err(retry_at) => {
                let wait = retry_at
                    .map(|t| t.saturating_duration_since(Instant::now()))
                    .unwrap_or(IDLE_POLL)
                    .max(Duration::from_millis(10));
                return Ok(Some(wait));
            }
        };
        let during = self.breaker_state();
        if during != before {
            tracing::info!(
                breaker = during.as_str(),
                "erp breaker half-open: trying one call"
            );
            self.publish_breaker(during).await;
        }

        let span = tracing::info_span!("erp.post_confirmation",
            idempotency_key = %row.idempotency_key, work_order = %document.work_order(),
            kind = row.kind.as_str(), attempt = row.attempts + 1, otel.kind = "client");
        if !row.traceparent.is_empty() {
            // The asynchronous hop joins the trace of the scan that completed the operation.
            mes_common::propagation::set_parent(
                &span,
                mes_common::propagation::context_from_traceparent(&row.traceparent),
            );
        }
        let started = Instant::now();
        let post = async {
            match &document {
                Document::Confirmation(c) => {
                    self.adapter
                        .post_confirmation(c, &row.idempotency_key)
                        .await
                }
                Document::Reversal(r) => self.adapter.post_reversal(r, &row.idempotency_key).await,
            }
        };
        let result = match tokio::time::timeout(self.call_timeout, post.instrument(span)).await {
            Ok(r) => r,
            Err(_) => Err(AdapterError::Timeout(self.call_timeout.as_millis() as u64)),
        };
        metrics::histogram!("erp_call_duration_seconds", "call" => "post_confirmation")
            .record(started.elapsed().as_secs_f64());
        // Whether the ERP took erp-sync's credentials (`None`: it did not answer).
        let credentials_refused = match &result {
            Err(AdapterError::Unauthorized(_)) => Some(true),
            Ok(_) => Some(false),
            Err(e) if !e.is_transient() => Some(false),
            Err(_) => None,
        };

        let (wait, after) = match result {
            Ok(posted) => {
                // The fault suite's crash after the ERP booked a document and before the
                // outbox knows (tests/under_fire.rs): the repost must not book it twice.
                fail::fail_point!("erp-sync::after-erp-accepted", |_| {
                    mes_common::shutdown::crash("erp-sync::after-erp-accepted")
                });
                let state = self.on_result(true);
                outbound::mark_delivered(fenced.conn(), row.id).await?;
                fenced.commit().await?;
                let how = match posted {
                    Posted::New => "new",
                    Posted::AlreadyThere => "already_there",
                };
                match row.kind {
                    OutboxKind::Confirmation => {
                        metrics::counter!("erp_confirmations_delivered_total", "result" => how)
                            .increment(1);
                    }
                    OutboxKind::Reversal => {
                        metrics::counter!("erp_reversals_delivered_total", "result" => how)
                            .increment(1);
                    }
                }
                tracing::info!(idempotency_key = %row.idempotency_key, result = how,
                    kind = row.kind.as_str(), "delivered to the erp");
                (None, state)
            }
            Err(AdapterError::Unauthorized(e)) => {
                // An operator must fix the credentials: pause, alarm, count no attempt, and
                // leave the breaker alone (the ERP itself may be fine).
                let next = chrono::Utc::now()
                    + chrono::Duration::from_std(self.auth_retry)
                        .unwrap_or(chrono::Duration::seconds(60));
                let error = format!("erp refused the credentials: {e}");
                outbound::reschedule(fenced.conn(), row.id, next, &error, false).await?;
                fenced.commit().await?;
                metrics::counter!("erp_auth_failures_total").increment(1);
                tracing::error!(idempotency_key = %row.idempotency_key, error = %e,
                    retry_in_ms = self.auth_retry.as_millis() as u64,
                    "the erp refused erp-sync's credentials; fix the token or password (delivery paused, no attempt counted)");
                (Some(self.auth_retry), self.breaker_state())
            }
            Err(e) if !e.is_transient() => {
                // The ERP answered: the link is fine, this confirmation is not.
                let state = self.on_result(true);
                set_aside(&mut fenced, &row, "rejected_by_erp", &e.to_string(), true).await?;
                fenced.commit().await?;
                match row.kind {
                    OutboxKind::Confirmation => {
                        metrics::counter!("erp_confirmations_failed_total").increment(1);
                    }
                    OutboxKind::Reversal => {
                        metrics::counter!("erp_reversals_failed_total").increment(1);
                    }
                }
                tracing::error!(idempotency_key = %row.idempotency_key, error = %e,
                    kind = row.kind.as_str(), "erp refused it; set aside in the dead letters");
                (None, state)
            }
            Err(e) => {
                let state = self.on_result(false);
                // An ERP shedding load (429, 503 with Retry-After) is up: not the row's failure.
                let throttled = matches!(e, AdapterError::Throttled { .. });
                let counted = !throttled && counts_as_attempt(during, state, failures_before);
                let attempt = u32::try_from(row.attempts + 1).unwrap_or(u32::MAX);
                metrics::counter!("erp_delivery_failures_total").increment(1);
                if counted && attempt >= self.max_attempts.max(1) {
                    // A poison row: it must not stall its work order's queue, nor the others.
                    let error = format!("gave up after {attempt} attempts: {e}");
                    set_aside(&mut fenced, &row, "attempts_exhausted", &error, true).await?;
                    fenced.commit().await?;
                    metrics::counter!("erp_outbox_dead_lettered_total", "kind" => row.kind.as_str())
                        .increment(1);
                    tracing::error!(idempotency_key = %row.idempotency_key, error = %e, attempt,
                        work_order = %document.work_order(), kind = row.kind.as_str(),
                        "delivery attempts exhausted; dead letter (replay it once the erp takes it; later rows of its work order wait)");
                    (None, state)
                } else {
                    let delay = self.retry_delay(&e, attempt);
                    let next = chrono::Utc::now()
                        + chrono::Duration::from_std(delay)
                            .unwrap_or(chrono::Duration::seconds(60));
                    outbound::reschedule(fenced.conn(), row.id, next, &e.to_string(), counted)
                        .await?;
                    fenced.commit().await?;
                    if !counted {
                        metrics::counter!("erp_delivery_failures_uncounted_total").increment(1);
                    }
                    if throttled {
                        metrics::counter!("erp_delivery_throttled_total").increment(1);
                    }
                    tracing::warn!(idempotency_key = %row.idempotency_key, error = %e, attempt,
                        counted, breaker = state.as_str(), retry_in_ms = delay.as_millis() as u64,
                        "confirmation delivery failed");
                    // Other work orders' rows may be due before this one.
                    (None, state)
                }
            }
        };
        if let Some(refused) = credentials_refused {
            metrics::gauge!("erp_auth_failed").set(if refused { 1.0 } else { 0.0 });
        }
        if after != during {
            tracing::info!(breaker = after.as_str(), "erp breaker changed");
            self.publish_breaker(after).await;
        }
        Ok(wait)
    }

    /// When a row that failed with `e` (its `attempt`-th counted try) is tried next: the
    /// backoff, or the `Retry-After` an ERP shedding load asked for (at most `retry_max`), and
    /// after a timeout at least `retry_after_timeout` (the request may still be running in the
    /// ERP: the retry's key lookup must come after its commit).
    fn retry_delay(&self, e: &AdapterError, attempt: u32) -> Duration {
        let backoff = breaker::backoff(attempt, self.retry_initial, self.retry_max);
        match e {
            AdapterError::Timeout(_) => backoff.max(self.retry_after_timeout),
            AdapterError::Throttled {
                retry_after: Some(asked),
                ..
            } => (*asked).min(self.retry_max).max(backoff),
            _ => backoff,
        }
    }

    fn on_result(&self, ok: bool) -> State {
        match self.breaker.lock() {
            Ok(mut b) => {
                if ok {
                    b.on_success();
                } else {
                    b.on_failure(Instant::now());
                }
                b.state()
            }
            Err(_) => State::Closed,
        }
    }
}

/// Whether a transient failure counts toward `erp.max_attempts` (see the module doc): only
/// when the ERP was taking other traffic, i.e. the breaker was closed for the call (`during`)
/// and still is after it (`after`). A failure in half-open, or one that opens the breaker
/// after a run of failures, is the ERP's (an outage), not the row's. With
/// `breaker_failure_threshold` 1 every failure opens the breaker: there a failure right after
/// a success (`failures_before` 0) counts, so that a poison row still ends as a dead letter.
fn counts_as_attempt(during: State, after: State, failures_before: u32) -> bool {
    during == State::Closed && (after == State::Closed || failures_before == 0)
}

/// Takes a row out of the queue for good and records it as an outbound dead letter (the
/// operator sees it in `GetStatus.dead_letters` and can replay it), in the fenced transaction.
async fn set_aside(
    fenced: &mut Fenced,
    row: &OutboxRow,
    kind: &str,
    error: &str,
    attempted: bool,
) -> Result<(), sqlx::Error> {
    outbound::mark_failed(fenced.conn(), row.id, error, attempted).await?;
    metrics::counter!("erp_dead_letters_total", "entity" => OUTBOX_ENTITY).increment(1);
    inbound::dead_letter(
        fenced.conn(),
        OUTBOX_ENTITY,
        &row.idempotency_key,
        kind,
        error,
        &row.payload,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_while_the_erp_takes_other_traffic_count() {
        use State::{Closed, HalfOpen, Open};
        // Closed before and after: the ERP takes other calls, this row fails.
        assert!(counts_as_attempt(Closed, Closed, 0));
        assert!(counts_as_attempt(Closed, Closed, 3));
        // The failure that opens the breaker after a run of failures: an outage begins.
        assert!(!counts_as_attempt(Closed, Open, 4));
        // Half-open trials (failed: open again) are the outage's.
        assert!(!counts_as_attempt(HalfOpen, Open, 5));
        assert!(!counts_as_attempt(HalfOpen, Open, 0));
        // Threshold 1: a failure right after a success opens the breaker, and still counts.
        assert!(counts_as_attempt(Closed, Open, 0));
    }
}
