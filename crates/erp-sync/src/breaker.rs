//! The circuit breaker in front of the ERP, and the retry delays of failed deliveries.
//!
//! Closed: calls go through; `threshold` consecutive failures open it. Open: no calls for
//! `open_for`; then half-open: one trial call — success closes it, failure opens it again.
//! Time is passed in, so the state machine is tested without sleeping.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    HalfOpen,
    Open,
}

impl State {
    /// `closed`, `half_open` or `open` (the status API's words).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }

    /// The `erp_breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::HalfOpen => 1.0,
            State::Open => 2.0,
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    state: State,
    failures: u32,
    threshold: u32,
    open_for: Duration,
    opened_at: Option<Instant>,
    trial_in_flight: bool,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            state: State::Closed,
            failures: 0,
            threshold: threshold.max(1),
            open_for,
            opened_at: None,
            trial_in_flight: false,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Failed calls since the last success (0: the last call succeeded, or none was made).
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// When an open breaker lets a trial call through.
    pub fn retry_at(&self) -> Option<Instant> {
        match self.state {
            State::Open => self.opened_at.map(|t| t + self.open_for),
            _ => None,
        }
    }

    /// Whether a call may go out now (half-open lets one trial through at a time).
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open => {
                if self.retry_at().is_some_and(|t| now >= t) {
                    self.state = State::HalfOpen;
                    self.trial_in_flight = true;
                    true
                } else {
                    false
                }
            }
            State::HalfOpen => {
                if self.trial_in_flight {
                    false
                } else {
                    self.trial_in_flight = true;
                    true
                }
            }
        }
    }

    pub fn on_success(&mut self) {
        self.state = State::Closed;
        self.failures = 0;
        self.opened_at = None;
        self.trial_in_flight = false;
    }

    pub fn on_failure(&mut self, now: Instant) {
        self.trial_in_flight = false;
        match self.state {
            State::Closed => {
                self.failures += 1;
                if self.failures >= self.threshold {
                    self.open(now);
                }
            }
            State::HalfOpen | State::Open => self.open(now),
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open;
        self.opened_at = Some(now);
    }
}

/// The delay before retry number `attempt` (1 = first retry): exponential from `initial`,
/// capped at `max`, with "equal jitter" (half fixed, half random) so that many queued
/// deliveries do not retry in lockstep. The one backoff policy, shared with the feed consumer.
pub use mes_common::feed::backoff;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_half_opens_and_closes_on_success() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            assert!(b.allow(t0));
            b.on_failure(t0);
            assert_eq!(b.state(), State::Closed);
        }
        assert!(b.allow(t0));
        b.on_failure(t0);
        assert_eq!(b.state(), State::Open);
        assert!(!b.allow(t0 + Duration::from_secs(9)));
        // After the open period: one trial call, and only one.
        assert!(b.allow(t0 + Duration::from_secs(10)));
        assert_eq!(b.state(), State::HalfOpen);
        assert!(!b.allow(t0 + Duration::from_secs(10)));
        b.on_success();
        assert_eq!(b.state(), State::Closed);
        assert!(b.allow(t0 + Duration::from_secs(11)));
    }

    #[test]
    fn a_failed_trial_opens_again() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_secs(5));
        b.on_failure(t0);
        assert_eq!(b.state(), State::Open);
        let t1 = t0 + Duration::from_secs(5);
        assert!(b.allow(t1));
        b.on_failure(t1);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.retry_at(), Some(t1 + Duration::from_secs(5)));
        assert_eq!(State::Open.gauge(), 2.0);
        assert_eq!(State::HalfOpen.as_str(), "half_open");
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 1..40 {
            let d = backoff(attempt, initial, max);
            let cap = initial
                .saturating_mul(2u32.saturating_pow((attempt - 1).min(30)))
                .min(max);
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} vs cap {cap:?}"
            );
        }
    }
}
