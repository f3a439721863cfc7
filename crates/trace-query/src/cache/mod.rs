//! The query cache (Redis, cache-aside), as docs/architecture.md's read path describes:
//!
//! - **Reads**: one round trip asks the membership filter (for lot queries), the cached
//!   "not found" and the cached answer together. A miss goes through single-flight (identical
//!   concurrent misses of this replica share one computation, [`flight`]) and a Redis lock
//!   (`SET NX PX`) across replicas: a replica that finds the lock held waits a bounded time for
//!   the holder's answer to appear, then asks the database itself (never hangs).
//! - **Writes**: answers get a TTL with random jitter (no synchronized expiry); "not found" a
//!   short one.
//! - **Invalidation**: the projection commits a batch together with the list of keys it made
//!   stale (table `cache_invalidations`), then gives each key a new random version and
//!   deletes the key, then deletes the row. Every store is conditional on the version read *before* the loader
//!   asked the database (one Lua script), so a loader that began before a commit and finishes
//!   after its deletions can never store its older answer. A second plain delete
//!   `cache_second_delete_ms` later stays as a belt and braces.
//! - **Staleness bound**: with Redis up, a cached answer is gone once the batch that made it
//!   stale has run its deletions (right after its commit, within milliseconds). If the replica
//!   dies between its commit and its deletions, any replica's watchdog replays rows older than
//!   [`ABANDONED_AFTER`] within about one more second ([`STALENESS_BOUND`] in all). A hash of
//!   genealogy depths keeps the TTL of its first store (a later depth never extends it).
//! - **Penetration**: the membership filter ([`filter`]) and short-lived "not found" entries.
//! - **Pre-warming**: the backward genealogy of freshly produced lots is computed in the
//!   background (after the second delete, so it is not thrown away).
//! - **Redis down**: every Redis call has a short timeout; a failure closes the gate and
//!   requests go straight to PostgreSQL. A watchdog reopens it once Redis answers again and the
//!   deletions owed in `cache_invalidations` were replayed (or, if too many, the whole cache
//!   purged), so a recovered Redis never serves an answer the projection meanwhile made stale. A Redis that
//!   restarted empty is detected by the filter's sentinel bit, and the filter rebuilt.

pub mod filter;
pub mod flight;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::bytes::Bytes;
use fred::interfaces::{ClientLike, KeysInterface};
use fred::types::{Expiration, SetOptions, Value};
use mes_common::Shutdown;
use mes_common::cache::{Redis, Script};
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};

use crate::config::Settings;
use crate::domain::Invalidation;
use crate::error::Error;
use crate::stats::{CacheResult, Query, Stats};
use filter::BloomParams;
use flight::Flights;

/// Owed invalidation rows beyond which recovery purges the whole cache instead of replaying.
const MAX_PENDING_ROWS: i64 = 10_000;
/// Keys per DEL command (and per invalidation script).
const DELETE_CHUNK: usize = 500;
/// An owed invalidation row this old was abandoned by its replica (which deletes its own rows
/// milliseconds after its commit): any replica replays it.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(2);
/// The longest a cached answer outlives the commit that made it stale while Redis answers,
/// whatever replica crashes: abandoned rows are replayed by the watchdog's next round.
pub const STALENESS_BOUND: Duration = Duration::from_secs(4);
/// How long a key's version outlives its last invalidation (well beyond any loader's run).
const VERSION_TTL_MS: i64 = 3_600_000;
const RELEASE_LOCK: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";
/// Stores an answer only if the key's version is still the one read before the load.
/// KEYS: data key, version key. ARGV: expected version ('' = none), value, TTL ms, hash field
/// ('' for a string key). A hash keeps the TTL of its first field.
const STORE_IF_CURRENT: &str = "
local v = redis.call('get', KEYS[2]) or ''
if v ~= ARGV[1] then return 0 end
if ARGV[4] == '' then
  redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('hset', KEYS[1], ARGV[4], ARGV[2])
  if redis.call('pttl', KEYS[1]) < 0 then redis.call('pexpire', KEYS[1], ARGV[3]) end
end
return 1";
/// Gives each key a new version, then deletes the key. KEYS: data key, version key, pairwise.
/// ARGV: version TTL ms, the new version — a random token, never a counter: a version that
/// expired (or a Redis that restarted empty) must not come back with a value a reader saw.
const INVALIDATE: &str = "
for i = 1, #KEYS, 2 do
  redis.call('set', KEYS[i + 1], ARGV[2], 'PX', ARGV[1])
  redis.call('unlink', KEYS[i])
end
return #KEYS / 2";

/// The read of a request: the membership filter (for lot queries), the cached "not found" and
/// the cached answer, in one command. KEYS: the answer's key, the "not found" key when
/// ARGV[2] is '1', then the filter when filter positions follow. ARGV: the hash field ('' for a
/// string key), '1'/'0', then the lot's bit positions in the filter. Returns {3} when the filter
/// knows the lot is not there (only once the filter is built: its sentinel bit 0 is set),
/// {2} for a cached "not found", {1, answer} for a cached answer, {0} for a miss.
static PROBE: Script = Script::new(
    "local k = 2
if ARGV[2] == '1' then k = 3 end
if #ARGV > 2 and redis.call('getbit', KEYS[k], 0) == 1 then
  for i = 3, #ARGV do
    if redis.call('getbit', KEYS[k], ARGV[i]) == 0 then return {3} end
  end
end
if ARGV[2] == '1' and redis.call('exists', KEYS[2]) == 1 then return {2} end
local v
if ARGV[1] == '' then v = redis.call('get', KEYS[1]) else v = redis.call('hget', KEYS[1], ARGV[1]) end
if v then return {1, v} end
return {0}",
);

/// Where an answer is cached.
#[derive(Debug, Clone)]
pub enum Slot {
    /// A string key.
    Key(String),
    /// A field of a hash (all depths of a lot's genealogy in one key, deleted together).
    Field { key: String, field: String },
}

/// One cacheable request.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub query: Query,
    pub slot: Slot,
    /// Key of the cached "not found", if the answer can be one.
    pub negative: Option<String>,
    /// The lot to ask the membership filter about.
    pub filter_lot: Option<String>,
    /// Identity of the computation (single-flight, cross-replica lock).
    pub flight: String,
    /// What is not found (`lot X`).
    pub what: String,
}

/// A loader's answer: the encoded response, or `None` for "not found".
pub type Loaded = Result<Option<Vec<u8>>, Error>;

type Shared = Result<Option<Bytes>, Arc<Error>>;

struct Inner {
    redis: Redis,
    stats: Arc<Stats>,
    pool: PgPool,
    settings: Arc<Settings>,
    up: AtomicBool,
    /// Set when the service stopped: background work (second deletes, pre-warming) ends.
    closed: AtomicBool,
    wake: Notify,
    flights: Flights<(Shared, CacheResult)>,
    bloom: BloomParams,
    filter_key: String,
    /// Whether a deletion or filter update failed since the last replay of
    /// `cache_invalidations` (the gate then stays closed until one more replay).
    pending: Mutex<Pending>,
    prewarm: Arc<Semaphore>,
    /// Delayed deletes and pre-warmings not finished yet.
    background: Arc<AtomicUsize>,
}

/// Counts a background task while it lives.
pub struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
struct Pending {
    /// An invalidation failed: its row in `cache_invalidations` must be replayed.
    failed: bool,
    /// The cache must be purged (a rebuild while Redis was down).
    purge: bool,
}

#[derive(Clone)]
pub struct QueryCache {
    inner: Arc<Inner>,
}

fn bytes_of(v: Value) -> Option<Bytes> {
    match v {
        Value::Bytes(b) => Some(b),
        Value::String(s) => Some(s.inner().clone()),
        _ => None,
    }
}

impl QueryCache {
    pub fn new(redis: Redis, pool: PgPool, stats: Arc<Stats>, settings: Arc<Settings>) -> Self {
        let bloom = BloomParams::for_capacity(
            settings.lot_filter_capacity,
            settings.lot_filter_false_positive_rate,
        );
        let filter_key = redis.key(&format!("lots:filter:{}:{}", bloom.bits, bloom.hashes));
        Self {
            inner: Arc::new(Inner {
                redis,
                stats,
                pool,
                settings,
                up: AtomicBool::new(true),
                closed: AtomicBool::new(false),
                wake: Notify::new(),
                flights: Flights::default(),
                bloom,
                filter_key,
                pending: Mutex::new(Pending::default()),
                prewarm: Arc::new(Semaphore::new(2)),
                background: Arc::new(AtomicUsize::new(0)),
            }),
        }
    }

    pub fn key(&self, k: &str) -> String {
        self.inner.redis.key(k)
    }

    /// Stops every Redis call of this instance (at shutdown: late background work must not
    /// write after the service stopped).
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
    }

    /// Whether Redis is in use right now (false: answering from PostgreSQL only).
    pub fn redis_available(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    /// Marks a projection batch in progress until the guard drops: taken before the batch
    /// commits and dropped after [`Cache::applied`], so [`Cache::settled`] is never true between
    /// the commit and the first deletes.
    pub fn batch_in_progress(&self) -> Busy {
        Busy::new(&self.inner.background)
    }

    /// Whether no projection batch, delayed delete or pre-warming is pending (tests wait for it
    /// before they count cache hits).
    pub fn settled(&self) -> bool {
        self.inner.background.load(Ordering::Acquire) == 0
    }

    /// Whether the membership filter is built and readable (tests wait for it).
    pub async fn filter_ready(&self) -> bool {
        self.inner.filter_sentinel().await == Some(true)
    }

    /// Answers `lookup` from the cache, or from `load` (the database) on a miss.
    pub async fn fetch<F, Fut>(&self, lookup: Lookup, load: F) -> Result<Bytes, Arc<Error>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Loaded> + Send + 'static,
    {
        let inner = &self.inner;
        match inner.probe(&lookup).await {
            Probe::Found(b) => {
                inner.stats.cache(CacheResult::Hit);
                return Ok(b);
            }
            Probe::Negative => {
                inner.stats.cache(CacheResult::NegativeHit);
                return Err(Arc::new(Error::NotFound(lookup.what)));
            }
            Probe::Rejected => {
                inner.stats.cache(CacheResult::FilterRejected);
                return Err(Arc::new(Error::NotFound(lookup.what)));
            }
            Probe::Miss => {}
        }
        let what = lookup.what.clone();
        let flight = lookup.flight.clone();
        let leader_inner = inner.clone();
        // Boxed: the miss path's state is large, and a hit's future need not carry it.
        let (out, leader) = Box::pin(inner.flights.run(&flight, move || async move {
            leader_inner.lead(lookup, load).await
        }))
        .await;
        let (result, outcome) = out.unwrap_or_else(|| {
            (
                Err(Arc::new(Error::Internal(anyhow::anyhow!(
                    "query computation panicked"
                )))),
                CacheResult::Miss,
            )
        });
        inner.stats.cache(if leader {
            outcome
        } else {
            CacheResult::Coalesced
        });
        match result {
            Ok(Some(b)) => Ok(b),
            Ok(None) => Err(Arc::new(Error::NotFound(what))),
            Err(e) => Err(e),
        }
    }

    /// After the projection committed a batch: known lots into the filter, stale keys
    /// invalidated (a new version, key deleted) now and deleted once more after
    /// `cache_second_delete_ms`, the batch's `cache_invalidations` row (`pending`) removed once
    /// all that succeeded, pre-warming of produced lots when the consumer is caught up (`warm`).
    pub async fn applied(&self, inv: &Invalidation, warm: bool, pending: Option<i64>) {
        let inner = &self.inner;
        let c = &inv.changes;
        let mut done = true;
        if !c.new_lots.is_empty() {
            done &= inner.filter_add(c.new_lots.iter().cloned().collect()).await;
        }
        let keys: Vec<String> = inv.keys().iter().map(|k| self.key(k)).collect();
        if !keys.is_empty() {
            done &= inner.invalidate(&keys).await;
        }
        if let Some(id) = pending
            && done
        {
            inner.forget(&[id]).await;
        }
        if keys.is_empty() {
            return;
        }
        let delayed = inner.clone();
        let delay = Duration::from_millis(inner.settings.cache_second_delete_ms);
        let busy = Busy::new(&inner.background);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            delayed.delete(keys).await;
            drop(busy);
        });
        if warm && inner.settings.prewarm {
            for lot in c.produced.iter().take(64) {
                self.prewarm(lot.clone(), delay + Duration::from_millis(100));
            }
        }
    }

    fn prewarm(&self, lot: String, after: Duration) {
        // At most two pre-warmings at a time: a burst of produce scans cannot pile up tasks.
        let Ok(permit) = self.inner.prewarm.clone().try_acquire_owned() else {
            metrics::counter!("trace_prewarm_skipped_total").increment(1);
            return;
        };
        let cache = self.clone();
        let busy = Busy::new(&self.inner.background);
        tokio::spawn(async move {
            let _busy = busy;
            tokio::time::sleep(after).await;
            if cache.inner.closed.load(Ordering::Acquire) {
                return;
            }
            let depth = crate::domain::depth(cache.inner.settings.prewarm_depth)
                .unwrap_or(crate::domain::DEFAULT_DEPTH);
            let result = crate::reads::genealogy(
                &cache,
                &cache.inner.pool,
                &lot,
                crate::domain::Direction::Backward,
                depth,
            )
            .await;
            match result {
                Ok(_) => metrics::counter!("trace_prewarmed_total").increment(1),
                Err(e) => tracing::debug!(lot, error = %e, "pre-warming failed"),
            }
            drop(permit);
        });
    }

    /// Deletes every cached answer (not the filter): after a rebuild, or when too many
    /// deletions failed while Redis was down.
    pub async fn purge_answers(&self) -> bool {
        self.inner.purge_answers().await
    }

    /// Rebuilds the membership filter from the read model.
    pub async fn rebuild_filter(&self) -> anyhow::Result<u64> {
        self.inner.rebuild_filter().await
    }

    /// Watches Redis: reopens the gate when it answers again (after replaying failed deletions),
    /// rebuilds the filter at start and whenever Redis lost it.
    pub async fn watchdog(self, shutdown: Shutdown) {
        let inner = &self.inner;
        let mut filter_built = false;
        loop {
            if !inner.up.load(Ordering::Acquire) {
                inner.try_recover().await;
            }
            if inner.up.load(Ordering::Acquire) {
                // Deletions owed by a replica that died between its commit and its deletions.
                match inner.replay(Some(ABANDONED_AFTER)).await {
                    Ok(true) => {}
                    Ok(false) => inner.note_failure(),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "owed cache invalidations not read")
                    }
                }
            }
            if inner.up.load(Ordering::Acquire) {
                let sentinel = inner.filter_sentinel().await;
                if !filter_built || sentinel == Some(false) {
                    match inner.rebuild_filter().await {
                        Ok(n) => {
                            filter_built = true;
                            tracing::info!(lots = n, "lot membership filter built");
                        }
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "lot membership filter rebuild failed")
                        }
                    }
                }
            }
            let wait = if inner.up.load(Ordering::Acquire) && filter_built {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(200)
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = inner.wake.notified() => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}

enum Probe {
    Found(Bytes),
    Negative,
    Rejected,
    Miss,
}

impl Inner {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.settings.cache_command_timeout_ms.max(1))
    }

    fn ttl_ms(&self, base_ms: u64) -> i64 {
        let pct = self.settings.cache_ttl_jitter_percent.min(90);
        let spread = base_ms * pct / 100;
        let ms = if spread == 0 {
            base_ms
        } else {
            rand::rng().random_range(base_ms - spread..=base_ms + spread)
        };
        i64::try_from(ms.max(1)).unwrap_or(i64::MAX)
    }

    /// Runs a Redis call unless the gate is closed; a failure or timeout closes it.
    async fn call<T, Fut>(&self, fut: Fut) -> Option<T>
    where
        Fut: Future<Output = Result<T, fred::error::Error>>,
    {
        if !self.up.load(Ordering::Acquire) || self.closed.load(Ordering::Acquire) {
            return None;
        }
        match tokio::time::timeout(self.timeout(), fut).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed("timed out");
                None
            }
        }
    }

    fn failed(&self, error: &str) {
        self.stats.redis_error();
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(error, "redis unavailable; answering from the database");
            metrics::gauge!("trace_cache_available").set(0.0);
        }
        self.wake.notify_one();
    }

    fn bitfield_args(&self, offsets: &[u64], set: bool) -> Vec<Value> {
        let mut args: Vec<Value> = vec![self.filter_key.clone().into()];
        for o in offsets {
            args.push(if set { "SET" } else { "GET" }.into());
            args.push("u1".into());
            args.push(Value::Integer(i64::try_from(*o).unwrap_or(0)));
            if set {
                args.push(Value::Integer(1));
            }
        }
        args
    }

    /// Filter, "not found" and answer in one command ([`PROBE`]).
    async fn probe(&self, lookup: &Lookup) -> Probe {
        if !self.up.load(Ordering::Acquire) || self.closed.load(Ordering::Acquire) {
            return Probe::Miss;
        }
        let (key, field) = match &lookup.slot {
            Slot::Key(k) => (k.as_str(), ""),
            Slot::Field { key, field } => (key.as_str(), field.as_str()),
        };
        let mut keys = vec![Value::from(key)];
        let mut args = vec![Value::from(field)];
        if let Some(neg) = &lookup.negative {
            keys.push(Value::from(neg.as_str()));
            args.push(Value::from("1"));
        } else {
            args.push(Value::from("0"));
        }
        if let Some(lot) = &lookup.filter_lot {
            keys.push(Value::from(self.filter_key.as_str()));
            let positions = self.bloom.positions(lot);
            args.reserve(positions.len());
            args.extend(
                positions
                    .into_iter()
                    .map(|o| Value::Integer(i64::try_from(o).unwrap_or(0))),
            );
        }
        let reply: Option<Vec<Value>> = self.call(PROBE.run(self.redis.client(), keys, args)).await;
        let Some(reply) = reply else {
            return Probe::Miss;
        };
        let mut reply = reply.into_iter();
        match reply.next().and_then(|v| v.as_i64()) {
            Some(1) => reply
                .next()
                .and_then(bytes_of)
                .map_or(Probe::Miss, Probe::Found),
            Some(2) => Probe::Negative,
            Some(3) => Probe::Rejected,
            _ => Probe::Miss,
        }
    }

    /// The answer or a cached "not found", if either is there now.
    async fn peek(&self, lookup: &Lookup) -> Option<Option<Bytes>> {
        if let Some(neg) = &lookup.negative
            && self
                .call(self.redis.client().exists::<i64, _>(neg.as_str()))
                .await
                .unwrap_or(0)
                > 0
        {
            return Some(None);
        }
        let v: Option<Value> = match &lookup.slot {
            Slot::Key(k) => self.call(self.redis.client().get(k.as_str())).await,
            Slot::Field { key, field } => {
                self.call(fred::interfaces::HashesInterface::hget(
                    self.redis.client(),
                    key.as_str(),
                    field.as_str(),
                ))
                .await
            }
        };
        v.and_then(bytes_of).map(Some)
    }

    /// The single-flight leader: checks again (a previous flight may just have filled the key),
    /// takes the cross-replica lock or waits a bounded time for its holder, asks the database,
    /// stores the answer.
    async fn lead<F, Fut>(self: Arc<Self>, lookup: Lookup, load: F) -> (Shared, CacheResult)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Loaded> + Send + 'static,
    {
        if let Some(found) = self.peek(&lookup).await {
            return (Ok(found), CacheResult::Hit);
        }
        let lock_key = self.redis.key(&format!("lock:{}", lookup.flight));
        let token = uuid::Uuid::new_v4().to_string();
        let lock_ttl = i64::try_from(self.settings.cache_lock_ttl_ms.max(1)).unwrap_or(5_000);
        let acquired: Option<Option<String>> = self
            .call(self.redis.client().set(
                lock_key.as_str(),
                token.as_str(),
                Some(Expiration::PX(lock_ttl)),
                Some(SetOptions::NX),
                false,
            ))
            .await;
        let holds_lock = matches!(acquired, Some(Some(_)));
        if holds_lock {
            // The previous holder may have stored the answer between our check and the lock.
            if let Some(found) = self.peek(&lookup).await {
                self.release(&lock_key, &token).await;
                return (Ok(found), CacheResult::Hit);
            }
        } else if acquired == Some(None) {
            // Another replica is computing it: wait (bounded) for its answer.
            let deadline = tokio::time::Instant::now()
                + Duration::from_millis(self.settings.cache_lock_wait_ms);
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(15)).await;
                if let Some(found) = self.peek(&lookup).await {
                    return (Ok(found), CacheResult::Coalesced);
                }
                if !self.up.load(Ordering::Acquire) {
                    break;
                }
            }
        }
        // The versions before the database is asked: an invalidation committed after this
        // point replaces them, and the store below is then refused.
        let versions = self.versions(&lookup).await;
        let started = std::time::Instant::now();
        self.stats.db_query(lookup.query);
        let loaded = load().await;
        metrics::histogram!("trace_db_query_duration_seconds", "query" => lookup.query.as_str())
            .record(started.elapsed().as_secs_f64());
        let result = match loaded {
            Ok(Some(bytes)) => {
                let bytes = Bytes::from(bytes);
                if let Some((version, _)) = &versions {
                    let ttl = self.ttl_ms(self.settings.cache_ttl_seconds.saturating_mul(1000));
                    self.store(&lookup.slot, version, Value::Bytes(bytes.clone()), ttl)
                        .await;
                }
                Ok(Some(bytes))
            }
            Ok(None) => {
                if let (Some(neg), Some((_, Some(version)))) = (&lookup.negative, &versions) {
                    let ttl = self.ttl_ms(self.settings.cache_negative_ttl_ms);
                    self.store(&Slot::Key(neg.clone()), version, Value::from("1"), ttl)
                        .await;
                }
                Ok(None)
            }
            Err(e) => Err(Arc::new(e)),
        };
        if holds_lock {
            self.release(&lock_key, &token).await;
        }
        (result, CacheResult::Miss)
    }

    /// Releases the lock if it is still ours (compare and delete, atomically).
    async fn release(&self, lock_key: &str, token: &str) {
        let _: Option<i64> = self
            .call(self.redis.client().custom(
                fred::cmd!("EVAL"),
                vec![
                    Value::from(RELEASE_LOCK),
                    Value::Integer(1),
                    Value::from(lock_key),
                    Value::from(token),
                ],
            ))
            .await;
    }

    /// Where the version of a cached `key` lives (`<prefix>ver:<key without prefix>`).
    fn version_key(&self, key: &str) -> String {
        let prefix = self.redis.prefix();
        let logical = key.strip_prefix(prefix).unwrap_or(key);
        format!("{prefix}ver:{logical}")
    }

    /// The current versions of the lookup's answer key and of its "not found" key (`""`
    /// when never invalidated); `None` when Redis did not answer (nothing is stored then).
    async fn versions(&self, lookup: &Lookup) -> Option<(String, Option<String>)> {
        let slot_key = match &lookup.slot {
            Slot::Key(k) => k,
            Slot::Field { key, .. } => key,
        };
        let mut keys = vec![self.version_key(slot_key)];
        if let Some(neg) = &lookup.negative {
            keys.push(self.version_key(neg));
        }
        let values: Vec<Option<String>> = self.call(self.redis.client().mget(keys)).await?;
        let mut values = values.into_iter().map(Option::unwrap_or_default);
        let slot = values.next().unwrap_or_default();
        Some((slot, lookup.negative.as_ref().and(values.next())))
    }

    /// Stores `value` at `slot` if the key's version is still `version` (see
    /// [`STORE_IF_CURRENT`]); a refused store is counted.
    async fn store(&self, slot: &Slot, version: &str, value: Value, ttl_ms: i64) {
        let (key, field) = match slot {
            Slot::Key(k) => (k.as_str(), ""),
            Slot::Field { key, field } => (key.as_str(), field.as_str()),
        };
        let stored: Option<i64> = self
            .call(self.redis.client().custom(
                fred::cmd!("EVAL"),
                vec![
                    Value::from(STORE_IF_CURRENT),
                    Value::Integer(2),
                    Value::from(key),
                    Value::from(self.version_key(key)),
                    Value::from(version),
                    value,
                    Value::Integer(ttl_ms),
                    Value::from(field),
                ],
            ))
            .await;
        if stored == Some(0) {
            metrics::counter!("trace_cache_stale_stores_refused_total").increment(1);
        }
    }

    /// The arguments of [`INVALIDATE`] for `keys`: each key with its version key.
    fn invalidate_args(&self, keys: &[String]) -> Vec<Value> {
        let mut args = vec![
            Value::from(INVALIDATE),
            Value::Integer(2 * keys.len() as i64),
        ];
        for k in keys {
            args.push(Value::from(k.as_str()));
            args.push(Value::from(self.version_key(k)));
        }
        args.push(Value::Integer(VERSION_TTL_MS));
        args.push(Value::from(uuid::Uuid::new_v4().simple().to_string()));
        args
    }

    /// Bumps the versions of `keys` and deletes them; false (and the gate closed, the failure
    /// noted for the next replay) if Redis did not do it all.
    async fn invalidate(&self, keys: &[String]) -> bool {
        for chunk in keys.chunks(DELETE_CHUNK) {
            let done: Option<i64> = self
                .call(
                    self.redis
                        .client()
                        .custom(fred::cmd!("EVAL"), self.invalidate_args(chunk)),
                )
                .await;
            if done.is_none() {
                self.note_failure();
                return false;
            }
        }
        true
    }

    /// Deletes `keys` (the delayed second delete); a failure is noted like an invalidation's.
    async fn delete(&self, keys: Vec<String>) {
        for chunk in keys.chunks(DELETE_CHUNK) {
            let done: Option<i64> = self
                .call(self.redis.client().unlink::<i64, _>(chunk.to_vec()))
                .await;
            if done.is_none() {
                self.note_failure();
                return;
            }
        }
    }

    /// An invalidation did not reach Redis: keep the gate closed until the owed rows were
    /// replayed once more after this (see [`Inner::try_recover`]).
    fn note_failure(&self) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        p.failed = true;
        // Closed again under the lock: a recovery that replayed the rows just before cannot
        // reopen the cache over this failure.
        self.up.store(false, Ordering::Release);
    }

    /// Deletes owed invalidation rows once their deletions are done.
    async fn forget(&self, ids: &[i64]) {
        if let Err(e) = sqlx::query("DELETE FROM cache_invalidations WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await
        {
            // Replayed later by a watchdog: deletions are idempotent.
            tracing::warn!(error = %e, "owed cache invalidations not cleared");
        }
    }

    /// Replays owed invalidations (`older_than`: only rows abandoned that long ago) with
    /// direct Redis calls (the gate may be closed); true if every row was replayed and cleared.
    async fn replay(&self, older_than: Option<Duration>) -> anyhow::Result<bool> {
        let age_ms = older_than.map(|d| d.as_millis() as i64).unwrap_or(-1);
        let owed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM cache_invalidations
             WHERE $1 < 0 OR created_at < now() - make_interval(secs => $1 / 1000.0)",
        )
        .bind(age_ms)
        .fetch_one(&self.pool)
        .await?;
        if owed == 0 {
            return Ok(true);
        }
        if owed > MAX_PENDING_ROWS && older_than.is_none() {
            let last: i64 =
                sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM cache_invalidations")
                    .fetch_one(&self.pool)
                    .await?;
            if !self.purge_answers_unchecked().await || self.rebuild_filter().await.is_err() {
                return Ok(false);
            }
            sqlx::query("DELETE FROM cache_invalidations WHERE id <= $1")
                .bind(last)
                .execute(&self.pool)
                .await?;
            tracing::warn!(
                rows = owed,
                "too many owed cache invalidations: cache purged"
            );
            return Ok(true);
        }
        let client = self.redis.client();
        let mut after = 0i64;
        loop {
            let rows: Vec<(i64, Vec<String>, Vec<String>)> = sqlx::query_as(
                "SELECT id, keys, lots FROM cache_invalidations
                 WHERE id > $1 AND ($2 < 0 OR created_at < now() - make_interval(secs => $2 / 1000.0))
                 ORDER BY id LIMIT 200",
            )
            .bind(after)
            .bind(age_ms)
            .fetch_all(&self.pool)
            .await?;
            let Some(last) = rows.last().map(|r| r.0) else {
                return Ok(true);
            };
            for (_, keys, lots) in &rows {
                let keys: Vec<String> = keys.iter().map(|k| self.redis.key(k)).collect();
                for chunk in keys.chunks(DELETE_CHUNK) {
                    let r = tokio::time::timeout(
                        self.timeout(),
                        client.custom::<Value, Value>(
                            fred::cmd!("EVAL"),
                            self.invalidate_args(chunk),
                        ),
                    )
                    .await;
                    if !matches!(r, Ok(Ok(_))) {
                        return Ok(false);
                    }
                }
                for chunk in lots.chunks(64) {
                    let offsets: Vec<u64> =
                        chunk.iter().flat_map(|l| self.bloom.positions(l)).collect();
                    let r = tokio::time::timeout(
                        self.timeout(),
                        client.custom::<Value, Value>(
                            fred::cmd!("BITFIELD"),
                            self.bitfield_args(&offsets, true),
                        ),
                    )
                    .await;
                    if !matches!(r, Ok(Ok(_))) {
                        return Ok(false);
                    }
                }
            }
            let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
            sqlx::query("DELETE FROM cache_invalidations WHERE id = ANY($1)")
                .bind(&ids)
                .execute(&self.pool)
                .await?;
            metrics::counter!("trace_cache_invalidations_replayed_total")
                .increment(ids.len() as u64);
            after = last;
        }
    }

    /// Adds `lots` to the membership filter; false (failure noted) if Redis did not.
    async fn filter_add(&self, lots: Vec<String>) -> bool {
        for chunk in lots.chunks(64) {
            let offsets: Vec<u64> = chunk.iter().flat_map(|l| self.bloom.positions(l)).collect();
            let done: Option<Value> = self
                .call(
                    self.redis
                        .client()
                        .custom(fred::cmd!("BITFIELD"), self.bitfield_args(&offsets, true)),
                )
                .await;
            if done.is_none() {
                self.note_failure();
                return false;
            }
        }
        true
    }

    /// `Some(true)` when the filter is built, `Some(false)` when not (e.g. Redis restarted
    /// empty), `None` when Redis does not answer.
    async fn filter_sentinel(&self) -> Option<bool> {
        let v: Value = self
            .call(self.redis.client().custom(
                fred::cmd!("GETBIT"),
                vec![self.filter_key.clone(), "0".into()],
            ))
            .await?;
        Some(v.as_i64() == Some(1))
    }

    async fn rebuild_filter(&self) -> anyhow::Result<u64> {
        anyhow::ensure!(!self.closed.load(Ordering::Acquire), "stopped");
        let mut bitmap = self.bloom.empty_bitmap();
        let n = crate::store::queries::each_lot(&self.pool, |lot| {
            for o in self.bloom.positions(lot) {
                filter::set_bit(&mut bitmap, o);
            }
        })
        .await?;
        filter::set_bit(&mut bitmap, 0);
        let tmp = self.redis.key(&format!(
            "lots:filter:build:{}",
            uuid::Uuid::new_v4().simple()
        ));
        let client = self.redis.client();
        let slow = Duration::from_secs(10);
        let result: anyhow::Result<()> = async {
            tokio::time::timeout(
                slow,
                client.set::<(), _, _>(
                    tmp.as_str(),
                    Value::Bytes(Bytes::from(bitmap)),
                    Some(Expiration::EX(300)),
                    None,
                    false,
                ),
            )
            .await??;
            // OR, never overwrite: bits the projection set meanwhile stay set.
            tokio::time::timeout(
                slow,
                client.custom::<Value, Value>(
                    fred::cmd!("BITOP"),
                    vec![
                        "OR".into(),
                        self.filter_key.clone().into(),
                        self.filter_key.clone().into(),
                        tmp.clone().into(),
                    ],
                ),
            )
            .await??;
            Ok(())
        }
        .await;
        let _ = tokio::time::timeout(slow, client.unlink::<i64, _>(tmp.as_str())).await;
        result?;
        Ok(n)
    }

    async fn try_recover(&self) {
        let ping = tokio::time::timeout(self.timeout(), self.redis.ping()).await;
        if !matches!(ping, Ok(Ok(_))) {
            return;
        }
        let purge = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            p.failed = false;
            std::mem::replace(&mut p.purge, false)
        };
        let restore = |purge: bool| {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            p.failed = true;
            p.purge |= purge;
        };
        if purge && !self.purge_answers_unchecked().await {
            restore(true);
            return;
        }
        match self.replay(None).await {
            Ok(true) => {}
            Ok(false) => return restore(false),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "owed cache invalidations not replayed");
                return restore(false);
            }
        }
        {
            // Reopen only if nothing failed meanwhile: an invalidation that failed after the
            // replay read the table is noted, and the next round replays it.
            let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if p.failed || p.purge {
                return;
            }
            self.up.store(true, Ordering::Release);
        }
        metrics::gauge!("trace_cache_available").set(1.0);
        tracing::info!("redis available again; cache in use");
    }

    async fn purge_answers(&self) -> bool {
        if !self.up.load(Ordering::Acquire) {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            p.purge = true;
            return false;
        }
        self.purge_answers_unchecked().await
    }

    /// SCANs this service's keys and deletes every cached answer (the filter stays).
    async fn purge_answers_unchecked(&self) -> bool {
        let client = self.redis.client();
        let pattern = format!("{}*", glob_escape(self.redis.prefix()));
        let filter_prefix = self.redis.key("lots:filter:");
        // Versions stay (a new one never repeats an old one), so a loader that read one before
        // the purge still cannot store.
        let version_prefix = self.redis.key("ver:");
        let mut cursor = "0".to_owned();
        loop {
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                client.custom::<Value, Value>(
                    fred::cmd!("SCAN"),
                    vec![
                        cursor.clone().into(),
                        "MATCH".into(),
                        pattern.clone().into(),
                        "COUNT".into(),
                        Value::Integer(1000),
                    ],
                ),
            )
            .await;
            let Ok(Ok(v)) = r else {
                return false;
            };
            let mut parts = v.into_array().into_iter();
            let next = parts
                .next()
                .and_then(|c| c.as_bytes_str().map(|s| s.to_string()))
                .unwrap_or_else(|| "0".into());
            let keys: Vec<String> = parts
                .next()
                .map(|k| k.into_array())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|k| k.as_bytes_str().map(|s| s.to_string()))
                .filter(|k| !k.starts_with(&filter_prefix) && !k.starts_with(&version_prefix))
                .collect();
            if !keys.is_empty()
                && !matches!(
                    tokio::time::timeout(Duration::from_secs(5), client.unlink::<i64, _>(keys))
                        .await,
                    Ok(Ok(_))
                )
            {
                return false;
            }
            if next == "0" {
                return true;
            }
            cursor = next;
        }
    }
}

/// Escapes Redis glob characters.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("test:a*b?[c]\\"), "test:a\\*b\\?\\[c\\]\\\\");
    }
}
