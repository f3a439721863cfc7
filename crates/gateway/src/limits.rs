//! Redis-backed state shared by every replica: per-user and per-device rate limits (a fixed
//! window that starts at the first request: INCR, PEXPIRE NX, PTTL) and the token revocation
//! list. An authenticated request costs one Redis command ([`Limits::admit`]: a script that
//! checks the revocation list, then counts the request against its limits).
//!
//! Login attempts are limited per client address and per username: an attempt is counted
//! (reserved) before its password is checked, so parallel guesses cannot get past the limit,
//! and refunded when the login succeeds. The address is counted first: an attempt it refuses
//! is not counted against the username. The in-process counts are bounded
//! (`login_local_keys_max`): when full, the oldest are forgotten, never a new login refused.
//! Each attempt is counted both in Redis (shared by the replicas) and in this process, which
//! also remembers how many of its attempts Redis did not count. While Redis answers, its
//! count plus those unseen attempts decides: exactly `limit` attempts get their password
//! checked, however many run at once (the two counters see parallel attempts in different
//! orders, so taking the larger of them would refuse some attempts under the limit). Login
//! limits never fail open: when Redis is slow or down, the in-process count alone decides
//! (the limits hold per replica), and logins keep working. An increment that timed out may
//! still land in Redis later; it is then counted twice, which only errs on the safe side.
//!
//! Failure policy when Redis is down: rate limits and revocation checks fail open (logged and
//! counted in `gateway_redis_failures_total`) so the shop floor keeps working; tokens are
//! short-lived. Logout fails closed: it answers 503 `unavailable`, because the client must not
//! believe a token is revoked when it is not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::ExpireOptions;

use mes_common::cache::{Redis, Script};

use crate::problem::Problem;

const WINDOW_MS: i64 = 60_000;

/// The revocation check and the rate-limit counters of one request, in one command.
/// KEYS: the token's revocation key, then one counter per subject. ARGV: the window (ms).
/// Returns `{1}` when the token was revoked (nothing counted), else `{0, count, pttl, ...}`
/// (INCR, PEXPIRE NX and PTTL of each counter: a fixed window from the first request).
static ADMIT: Script = Script::new(
    "if redis.call('exists', KEYS[1]) == 1 then return {1} end
local out = {0}
for i = 2, #KEYS do
  out[#out + 1] = redis.call('incr', KEYS[i])
  redis.call('pexpire', KEYS[i], ARGV[1], 'NX')
  out[#out + 1] = redis.call('pttl', KEYS[i])
end
return out",
);

/// Whether an authenticated request may go on (see [`Limits::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Its token was revoked (logout).
    Revoked,
}

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
    ///
    /// The client address is counted first; an attempt it refuses counts nothing against the
    /// username, so one client spraying usernames neither fills the in-process counts nor
    /// locks other users out.
    #[tracing::instrument(skip(self))]
    pub async fn reserve_login(&self, username: &str, client: &str) -> Result<Attempt, Problem> {
        let login = &self.login;
        let ip = (format!("rl:login:ip:{client}"), login.per_ip);
        let user = (format!("rl:login:user:{username}"), login.per_user);
        let deadline = tokio::time::Instant::now() + login.redis_timeout;
        let mut redis_up = true;
        let mut counted_by_redis = [false; 2];
        for (i, ((key, limit), label)) in [(&ip, "login_ip"), (&user, "login_user")]
            .into_iter()
            .enumerate()
        {
            let (count, remaining) = self.count_login(key, deadline, &mut redis_up).await;
            counted_by_redis[i] = redis_up;
            if count > u64::from(*limit) {
                metrics::counter!("gateway_rate_limited_total", "subject" => label).increment(1);
                let retry_after = remaining.as_millis().div_ceil(1000).max(1) as u64;
                tracing::info!(
                    retry_after,
                    subject = label,
                    "login refused: too many attempts"
                );
                return Err(Problem::rate_limited(retry_after));
            }
        }
        let [ip_seen, user_seen] = counted_by_redis;
        Ok(Attempt {
            keys: [(user.0, user_seen), (ip.0, ip_seen)],
        })
    }

    /// Counts one attempt against `key` in this process and in Redis (until `deadline`; after
    /// a Redis failure, in this process alone): the count that decides and its time left.
    /// `redis_up` is cleared when Redis did not count this attempt.
    async fn count_login(
        &self,
        key: &str,
        deadline: tokio::time::Instant,
        redis_up: &mut bool,
    ) -> (u64, Duration) {
        let local = self.login.count_locally(key);
        if *redis_up {
            let shared = tokio::time::timeout_at(deadline, self.count_in_redis(key))
                .await
                .unwrap_or_else(|_| Err("timed out".to_owned()));
            match shared {
                // Redis counted every attempt it saw, in the order it saw them; add the ones
                // of this process it never saw.
                Ok((count, remaining)) => {
                    return (count + self.login.unseen_by_redis(key), remaining);
                }
                Err(e) => {
                    *redis_up = false;
                    metrics::counter!("gateway_redis_failures_total", "op" => "login_limit")
                        .increment(1);
                    tracing::warn!(error = %e, "redis unavailable: login attempts limited by this replica alone");
                }
            }
        }
        self.login.mark_unseen_by_redis(key);
        local
    }

    /// Gives a reserved attempt back (a successful login, or one whose password was never
    /// checked). Best effort: a refund that does not reach Redis expires with the window.
    pub async fn refund_login(&self, attempt: Attempt) {
        self.login.refund_locally(&attempt.keys);
        if attempt.keys.iter().all(|(_, seen)| !seen) {
            return;
        }
        let pipeline = self.redis.client().pipeline();
        let window = self.login.window.as_millis() as i64;
        let queued: Result<(), Error> = async {
            // Only what Redis counted is given back there.
            for (key, _) in attempt.keys.iter().filter(|(_, seen)| *seen) {
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

    /// INCR, PEXPIRE NX and PTTL of a key in one pipeline: the count and time left.
    async fn count_in_redis(&self, key: &str) -> Result<(u64, Duration), String> {
        let window = self.login.window.as_millis() as i64;
        let pipeline = self.redis.client().pipeline();
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
        let values: Vec<i64> = pipeline.all().await.map_err(|e| e.to_string())?;
        let (Some(&count), Some(&pttl)) = (values.first(), values.get(2)) else {
            return Err("short pipeline reply".to_owned());
        };
        let remaining = if pttl > 0 {
            Duration::from_millis(pttl as u64)
        } else {
            self.login.window
        };
        Ok((count.max(0) as u64, remaining))
    }

    /// Admits one authenticated request in one Redis round trip ([`ADMIT`]): refused when its
    /// token (`jti`) was revoked (the request then counts against no limit), else counted
    /// against every subject and `Err(429)` when any is over its limit. Fails open when Redis
    /// cannot tell (both failures counted in `gateway_redis_failures_total`).
    pub async fn admit(&self, jti: &str, subjects: &[Subject<'_>]) -> Result<Admission, Problem> {
        let mut keys = Vec::with_capacity(1 + subjects.len());
        keys.push(Value::from(self.revoked_key(jti)));
        keys.extend(
            subjects
                .iter()
                .map(|s| Value::from(self.redis.key(&s.key()))),
        );
        let reply: Result<Vec<i64>, Error> = ADMIT
            .run(self.redis.client(), keys, vec![Value::Integer(WINDOW_MS)])
            .await;
        let values = match reply {
            Ok(v) if v.first() == Some(&1) => return Ok(Admission::Revoked),
            Ok(v) if v.len() == 1 + 2 * subjects.len() => v,
            Ok(_) => {
                redis_failed("revocation_check", &"short script reply");
                redis_failed("rate_limit", &"short script reply");
                return Ok(Admission::Admitted);
            }
            Err(e) => {
                redis_failed("revocation_check", &e);
                redis_failed("rate_limit", &e);
                return Ok(Admission::Admitted);
            }
        };
        let mut retry_after = 0u64;
        for (s, pair) in subjects.iter().zip(values[1..].chunks_exact(2)) {
            let (count, pttl) = (pair[0], pair[1]);
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
            Ok(Admission::Admitted)
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
}

/// A reserved login attempt (see [`Limits::reserve_login`]).
#[derive(Debug)]
pub struct Attempt {
    /// Each counted key, and whether Redis counted it too.
    keys: [(String, bool); 2],
}

/// One key's attempts in this process during its window.
struct LocalCount {
    attempts: u64,
    /// Of `attempts`, those Redis did not count (it was slow or down).
    unseen_by_redis: u64,
    end: Instant,
}

/// Settings and in-process counts of the login limits.
pub struct LoginLimits {
    per_user: u32,
    per_ip: u32,
    window: Duration,
    redis_timeout: Duration,
    max_local_keys: usize,
    local: Mutex<HashMap<String, LocalCount>>,
}

impl LoginLimits {
    pub fn new(
        per_user: u32,
        per_ip: u32,
        window: Duration,
        redis_timeout: Duration,
        max_local_keys: usize,
    ) -> Self {
        Self {
            max_local_keys,
            per_user,
            per_ip,
            window,
            redis_timeout,
            local: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one attempt against `key` in this process: the count and time left.
    fn count_locally(&self, key: &str) -> (u64, Duration) {
        let now = Instant::now();
        let mut local = self.counts();
        if !local.contains_key(key) && local.len() >= self.max_local_keys {
            self.make_room(&mut local, now);
        }
        let entry = local.entry(key.to_owned()).or_insert(LocalCount {
            attempts: 0,
            unseen_by_redis: 0,
            end: now + self.window,
        });
        if entry.end <= now {
            *entry = LocalCount {
                attempts: 0,
                unseen_by_redis: 0,
                end: now + self.window,
            };
        }
        entry.attempts += 1;
        (entry.attempts, entry.end.saturating_duration_since(now))
    }

    /// Records that Redis did not count the attempt just counted against `key`.
    fn mark_unseen_by_redis(&self, key: &str) {
        if let Some(entry) = self.counts().get_mut(key) {
            entry.unseen_by_redis = (entry.unseen_by_redis + 1).min(entry.attempts);
        }
    }

    /// How many of this window's attempts against `key` Redis did not count.
    fn unseen_by_redis(&self, key: &str) -> u64 {
        let now = Instant::now();
        self.counts()
            .get(key)
            .filter(|entry| entry.end > now)
            .map_or(0, |entry| entry.unseen_by_redis)
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, LocalCount>> {
        // A panic elsewhere while holding the lock leaves counts that are still counts.
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Frees room for a new key: drops the ended windows, and when every count is still live
    /// (a flood of usernames or addresses), forgets the oldest tenth at once (one pass per
    /// tenth of the capacity, not one per new key). Memory stays bounded and new logins are
    /// never refused for lack of room; Redis, when reachable, still holds the shared counts.
    fn make_room(&self, local: &mut HashMap<String, LocalCount>, now: Instant) {
        local.retain(|_, count| count.end > now);
        if local.len() < self.max_local_keys {
            return;
        }
        let forget = (self.max_local_keys / 10).clamp(1, local.len());
        let mut ends: Vec<Instant> = local.values().map(|count| count.end).collect();
        let (_, &mut cutoff, _) = ends.select_nth_unstable(forget - 1);
        let before = local.len();
        local.retain(|_, count| count.end > cutoff);
        let forgotten = before - local.len();
        metrics::counter!("gateway_login_counts_forgotten_total").increment(forgotten as u64);
        tracing::warn!(
            forgotten,
            capacity = self.max_local_keys,
            "in-process login counts full: the oldest forgotten"
        );
    }

    fn refund_locally(&self, keys: &[(String, bool)]) {
        let mut local = self.counts();
        for (key, seen_by_redis) in keys {
            if let Some(entry) = local.get_mut(key) {
                entry.attempts = entry.attempts.saturating_sub(1);
                if !seen_by_redis {
                    entry.unseen_by_redis = entry.unseen_by_redis.saturating_sub(1);
                }
                entry.unseen_by_redis = entry.unseen_by_redis.min(entry.attempts);
            }
        }
    }
}
