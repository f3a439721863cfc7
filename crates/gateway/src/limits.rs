//! Redis-backed state shared by every replica: per-user and per-device rate limits (a fixed
//! window that starts at the first request: INCR, PEXPIRE NX, PTTL in one pipeline) and the
//! token revocation list.
//!
//! Login attempts are limited per username and per client address: an attempt is counted
//! (reserved) before its password is checked, so parallel guesses cannot get past the limit,
//! and refunded when the login succeeds. Each attempt is counted both in Redis (shared by the
//! replicas) and in this process; the larger count decides. Login limits never fail open:
//! when Redis is slow or down, the in-process counts alone decide (the limits hold per
//! replica), and logins keep working.
//!
//! Failure policy when Redis is down: rate limits and revocation checks fail open (logged and
//! counted in `gateway_redis_failures_total`) so the shop floor keeps working; tokens are
//! short-lived. Logout fails closed: it answers 503 `unavailable`, because the client must not
//! believe a token is revoked when it is not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::ExpireOptions;

use mes_common::cache::Redis;

use crate::problem::Problem;

const WINDOW_MS: i64 = 60_000;

#[derive(Clone)]
pub struct Limits {
    redis: Redis,
    per_user: u32,
    per_device: u32,
    retry_after: u64,
    login: Arc<LoginLimits>,
}

/// Which quota a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    User(&'a str),
    Device(&'a str),
}

impl Subject<'_> {
    fn key(&self) -> String {
        match self {
            Subject::User(u) => format!("rl:user:{u}"),
            Subject::Device(d) => format!("rl:device:{d}"),
        }
    }
    fn label(&self) -> &'static str {
        match self {
            Subject::User(_) => "user",
            Subject::Device(_) => "device",
        }
    }
}

fn redis_failed(op: &'static str, e: &dyn std::fmt::Display) {
    metrics::counter!("gateway_redis_failures_total", "op" => op).increment(1);
    tracing::warn!(op, error = %e, "redis unavailable; failing open");
}

impl Limits {
    pub fn new(
        redis: Redis,
        per_user: u32,
        per_device: u32,
        retry_after: u64,
        login: LoginLimits,
    ) -> Self {
        Self {
            redis,
            per_user,
            per_device,
            retry_after,
            login: Arc::new(login),
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn limit_of(&self, s: Subject<'_>) -> u32 {
        match s {
            Subject::User(_) => self.per_user,
            Subject::Device(_) => self.per_device,
        }
    }

    /// Counts one login attempt of `username` from `client` before its password is checked:
    /// `Err(429)` when either is over its limit (the attempt is not checked at all). Refund
    /// it with [`Limits::refund_login`] when the login succeeds or is not attempted.
    #[tracing::instrument(skip(self))]
    pub async fn reserve_login(&self, username: &str, client: &str) -> Result<Attempt, Problem> {
        let login = &self.login;
        let attempt = Attempt {
            keys: [
                (format!("rl:login:user:{username}"), login.per_user),
                (format!("rl:login:ip:{client}"), login.per_ip),
            ],
        };
        let local = login.count_locally(&attempt.keys);
        let shared = tokio::time::timeout(login.redis_timeout, self.count_in_redis(&attempt.keys))
            .await
            .unwrap_or_else(|_| Err("timed out".to_owned()));
        let shared = match shared {
            Ok(counts) => counts,
            Err(e) => {
                metrics::counter!("gateway_redis_failures_total", "op" => "login_limit")
                    .increment(1);
                tracing::warn!(error = %e, "redis unavailable: login attempts limited by this replica alone");
                vec![None; attempt.keys.len()]
            }
        };
        let mut retry_after = 0u64;
        for (i, ((_, limit), (count, remaining))) in attempt.keys.iter().zip(local).enumerate() {
            let (count, remaining) = match shared.get(i).copied().flatten() {
                Some((c, r)) if c >= count => (c, r),
                _ => (count, remaining),
            };
            if count > u64::from(*limit) {
                let label = if i == 0 { "login_user" } else { "login_ip" };
                metrics::counter!("gateway_rate_limited_total", "subject" => label).increment(1);
                retry_after = retry_after.max(remaining.as_millis().div_ceil(1000) as u64);
            }
        }
        if retry_after > 0 {
            tracing::info!(retry_after, "login refused: too many attempts");
            return Err(Problem::rate_limited(retry_after));
        }
        Ok(attempt)
    }

    /// Gives a reserved attempt back (a successful login, or one whose password was never
    /// checked). Best effort: a refund that does not reach Redis expires with the window.
    pub async fn refund_login(&self, attempt: Attempt) {
        self.login.refund_locally(&attempt.keys);
        let pipeline = self.redis.client().pipeline();
        let window = self.login.window.as_millis() as i64;
        let queued: Result<(), Error> = async {
            for (key, _) in &attempt.keys {
                let key = self.redis.key(key);
                let () = pipeline.decr(&key).await?;
                // Had the window just ended, DECR made a new key: it must expire too.
                let () = pipeline
                    .pexpire(&key, window, Some(ExpireOptions::NX))
                    .await?;
            }
            Ok(())
        }
        .await;
        let sent = async {
            queued?;
            pipeline.all::<Vec<i64>>().await.map(|_| ())
        };
        match tokio::time::timeout(self.login.redis_timeout, sent).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => redis_failed("login_refund", &e),
            Err(_) => redis_failed("login_refund", &"timed out"),
        }
    }

    /// INCR, PEXPIRE NX and PTTL of each key in one pipeline: the count and time left.
    async fn count_in_redis(
        &self,
        keys: &[(String, u32)],
    ) -> Result<Vec<Option<(u64, Duration)>>, String> {
        let window = self.login.window.as_millis() as i64;
        let pipeline = self.redis.client().pipeline();
        for (key, _) in keys {
            let key = self.redis.key(key);
            let queued: Result<(), Error> = async {
                let () = pipeline.incr(&key).await?;
                let () = pipeline
                    .pexpire(&key, window, Some(ExpireOptions::NX))
                    .await?;
                let () = pipeline.pttl(&key).await?;
                Ok(())
            }
            .await;
            queued.map_err(|e| e.to_string())?;
        }
        let values: Vec<i64> = pipeline.all().await.map_err(|e| e.to_string())?;
        Ok((0..keys.len())
            .map(|i| {
                let count = values.get(i * 3).copied()?;
                let pttl = values.get(i * 3 + 2).copied()?;
                let remaining = if pttl > 0 {
                    Duration::from_millis(pttl as u64)
                } else {
                    self.login.window
                };
                Some((count.max(0) as u64, remaining))
            })
            .collect())
    }

    /// Counts one request against every subject; `Err(429)` when any is over its limit.
    pub async fn hit(&self, subjects: &[Subject<'_>]) -> Result<(), Problem> {
        if subjects.is_empty() {
            return Ok(());
        }
        let pipeline = self.redis.client().pipeline();
        let mut keys = Vec::with_capacity(subjects.len());
        for s in subjects {
            let key = self.redis.key(&s.key());
            let queued: Result<(), Error> = async {
                let () = pipeline.incr(&key).await?;
                let () = pipeline
                    .pexpire(&key, WINDOW_MS, Some(ExpireOptions::NX))
                    .await?;
                let () = pipeline.pttl(&key).await?;
                Ok(())
            }
            .await;
            if let Err(e) = queued {
                redis_failed("rate_limit", &e);
                return Ok(());
            }
            keys.push(key);
        }
        let values: Vec<i64> = match pipeline.all().await {
            Ok(v) => v,
            Err(e) => {
                redis_failed("rate_limit", &e);
                return Ok(());
            }
        };
        let mut retry_after = 0u64;
        for (i, s) in subjects.iter().enumerate() {
            let (Some(&count), Some(&pttl)) = (values.get(i * 3), values.get(i * 3 + 2)) else {
                redis_failed("rate_limit", &"short pipeline reply");
                return Ok(());
            };
            if count > i64::from(self.limit_of(*s)) {
                metrics::counter!("gateway_rate_limited_total", "subject" => s.label())
                    .increment(1);
                let secs = if pttl > 0 {
                    (pttl as u64).div_ceil(1000)
                } else {
                    (WINDOW_MS as u64) / 1000
                };
                retry_after = retry_after.max(secs);
            }
        }
        if retry_after > 0 {
            Err(Problem::rate_limited(retry_after))
        } else {
            Ok(())
        }
    }

    fn revoked_key(&self, jti: &str) -> String {
        self.redis.key(&format!("revoked:{jti}"))
    }

    /// Adds a token id to the revocation list until the token would expire anyway.
    pub async fn revoke(&self, jti: &str, remaining: Duration) -> Result<(), Problem> {
        let secs = remaining.as_secs().max(1) as i64;
        let r: Result<(), Error> = self
            .redis
            .client()
            .set(
                self.revoked_key(jti),
                "1",
                Some(Expiration::EX(secs)),
                None,
                false,
            )
            .await;
        r.map_err(|e| {
            metrics::counter!("gateway_redis_failures_total", "op" => "revoke").increment(1);
            tracing::error!(error = %e, "cannot revoke token: redis unavailable");
            Problem::unavailable(
                "the token could not be revoked now; retry the logout",
                self.retry_after,
            )
        })
    }

    /// Whether a token id was revoked (false when Redis cannot tell: fail open).
    pub async fn is_revoked(&self, jti: &str) -> bool {
        match self
            .redis
            .client()
            .exists::<i64, _>(self.revoked_key(jti))
            .await
        {
            Ok(n) => n > 0,
            Err(e) => {
                redis_failed("revocation_check", &e);
                false
            }
        }
    }
}

/// A reserved login attempt (see [`Limits::reserve_login`]).
#[derive(Debug)]
pub struct Attempt {
    keys: [(String, u32); 2],
}

/// The most usernames and addresses counted in process; past it (a spray of usernames while
/// Redis is down), new ones are refused until their windows end: the limits fail closed.
const MAX_LOCAL_KEYS: usize = 100_000;

/// Settings and in-process counts of the login limits.
pub struct LoginLimits {
    per_user: u32,
    per_ip: u32,
    window: Duration,
    redis_timeout: Duration,
    local: Mutex<HashMap<String, (u64, Instant)>>,
}

impl LoginLimits {
    pub fn new(per_user: u32, per_ip: u32, window: Duration, redis_timeout: Duration) -> Self {
        Self {
            per_user,
            per_ip,
            window,
            redis_timeout,
            local: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one attempt against each key in this process: the count and time left of each.
    fn count_locally(&self, keys: &[(String, u32)]) -> Vec<(u64, Duration)> {
        let now = Instant::now();
        let Ok(mut local) = self.local.lock() else {
            return keys.iter().map(|_| (u64::MAX, self.window)).collect();
        };
        if local.len() >= MAX_LOCAL_KEYS {
            local.retain(|_, (_, end)| *end > now);
        }
        keys.iter()
            .map(|(key, _)| {
                if !local.contains_key(key) && local.len() >= MAX_LOCAL_KEYS {
                    return (u64::MAX, self.window);
                }
                let entry = local.entry(key.clone()).or_insert((0, now + self.window));
                if entry.1 <= now {
                    *entry = (0, now + self.window);
                }
                entry.0 += 1;
                (entry.0, entry.1.saturating_duration_since(now))
            })
            .collect()
    }

    fn refund_locally(&self, keys: &[(String, u32)]) {
        if let Ok(mut local) = self.local.lock() {
            for (key, _) in keys {
                if let Some(entry) = local.get_mut(key) {
                    entry.0 = entry.0.saturating_sub(1);
                }
            }
        }
    }
}
