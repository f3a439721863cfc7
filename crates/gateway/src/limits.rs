//! Redis-backed state shared by every replica: per-user and per-device rate limits (a fixed
//! window that starts at the first request: INCR, PEXPIRE NX, PTTL in one pipeline) and the
//! token revocation list.
//!
//! Failure policy when Redis is down: rate limits and revocation checks fail open (logged and
//! counted in `gateway_redis_failures_total`) so the shop floor keeps working; tokens are
//! short-lived. Logout fails closed: it answers 503 `unavailable`, because the client must not
//! believe a token is revoked when it is not.

use std::time::Duration;

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
}

/// Which quota a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    User(&'a str),
    Device(&'a str),
    /// Failed logins of a username (brute-force guard; the per-user limit).
    FailedLogin(&'a str),
}

impl Subject<'_> {
    fn key(&self) -> String {
        match self {
            Subject::User(u) => format!("rl:user:{u}"),
            Subject::Device(d) => format!("rl:device:{d}"),
            Subject::FailedLogin(u) => format!("rl:login:{u}"),
        }
    }
    fn label(&self) -> &'static str {
        match self {
            Subject::User(_) => "user",
            Subject::Device(_) => "device",
            Subject::FailedLogin(_) => "login",
        }
    }
}

fn redis_failed(op: &'static str, e: &dyn std::fmt::Display) {
    metrics::counter!("gateway_redis_failures_total", "op" => op).increment(1);
    tracing::warn!(op, error = %e, "redis unavailable; failing open");
}

impl Limits {
    pub fn new(redis: Redis, per_user: u32, per_device: u32, retry_after: u64) -> Self {
        Self {
            redis,
            per_user,
            per_device,
            retry_after,
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn limit_of(&self, s: Subject<'_>) -> u32 {
        match s {
            Subject::User(_) | Subject::FailedLogin(_) => self.per_user,
            Subject::Device(_) => self.per_device,
        }
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

    /// Whether `subject` is already over its limit (does not count).
    pub async fn exceeded(&self, subject: Subject<'_>) -> Option<u64> {
        let key = self.redis.key(&subject.key());
        let count: Option<i64> = match self.redis.client().get(&key).await {
            Ok(c) => c,
            Err(e) => {
                redis_failed("rate_limit", &e);
                return None;
            }
        };
        if count.unwrap_or(0) < i64::from(self.limit_of(subject)) {
            return None;
        }
        let pttl: i64 = self.redis.client().pttl(&key).await.unwrap_or(WINDOW_MS);
        Some(if pttl > 0 {
            (pttl as u64).div_ceil(1000)
        } else {
            60
        })
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
