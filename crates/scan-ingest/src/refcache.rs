//! Hot reference data in Redis: material tracking modes and known stations, read on every
//! batch. Cache-aside: the database is the truth; master-data upserts delete the keys after
//! commit (and once more shortly after, against a reader that refilled from an older snapshot).
//! A Redis failure never blocks a scan: it counts as a miss and the database answers.

use std::collections::HashMap;
use std::time::Duration;

use fred::prelude::*;
use fred::types::Expiration;
use mes_common::cache::Redis;

#[derive(Clone)]
pub struct RefCache {
    redis: Redis,
    ttl: Duration,
}

const MISSING: &str = "-";

impl RefCache {
    pub fn new(redis: Redis, ttl: Duration) -> Self {
        Self { redis, ttl }
    }

    fn material_key(&self, m: &str) -> String {
        self.redis.key(&format!("ref:material:{m}"))
    }

    fn station_key(&self, s: &str) -> String {
        self.redis.key(&format!("ref:station:{s}"))
    }

    async fn get_many(&self, keys: Vec<String>) -> Option<Vec<Option<String>>> {
        if keys.is_empty() {
            return Some(Vec::new());
        }
        match self
            .redis
            .client()
            .mget::<Vec<Option<String>>, _>(keys)
            .await
        {
            Ok(v) => Some(v),
            Err(e) => {
                metrics::counter!("reference_cache_errors_total").increment(1);
                tracing::debug!(error = %e, "reference cache unavailable");
                None
            }
        }
    }

    /// Tracking mode per material for those cached; `None` entries are misses.
    pub async fn materials(&self, numbers: &[String]) -> HashMap<String, Option<String>> {
        let keys = numbers.iter().map(|m| self.material_key(m)).collect();
        self.lookup(numbers, keys).await
    }

    /// `Some("1")` known station, `Some("-")` known missing, `None` miss.
    pub async fn stations(&self, ids: &[String]) -> HashMap<String, Option<String>> {
        let keys = ids.iter().map(|s| self.station_key(s)).collect();
        self.lookup(ids, keys).await
    }

    async fn lookup(&self, names: &[String], keys: Vec<String>) -> HashMap<String, Option<String>> {
        let values = self
            .get_many(keys)
            .await
            .unwrap_or_else(|| vec![None; names.len()]);
        let mut out = HashMap::new();
        for (name, v) in names.iter().zip(values) {
            let label = if v.is_some() { "hit" } else { "miss" };
            metrics::counter!("reference_cache_lookups_total", "result" => label).increment(1);
            out.insert(name.clone(), v);
        }
        out
    }

    /// Stores what the database said (`None`: does not exist), with the TTL.
    pub async fn fill_materials(&self, entries: &[(String, Option<String>)]) {
        for (m, tracking) in entries {
            self.set(
                self.material_key(m),
                tracking.clone().unwrap_or_else(|| MISSING.into()),
            )
            .await;
        }
    }

    pub async fn fill_stations(&self, entries: &[(String, bool)]) {
        for (s, exists) in entries {
            self.set(
                self.station_key(s),
                if *exists { "1".into() } else { MISSING.into() },
            )
            .await;
        }
    }

    async fn set(&self, key: String, value: String) {
        let ttl = self.ttl.as_secs().max(1) as i64;
        if let Err(e) = self
            .redis
            .client()
            .set::<(), _, _>(key, value, Some(Expiration::EX(ttl)), None, false)
            .await
        {
            metrics::counter!("reference_cache_errors_total").increment(1);
            tracing::debug!(error = %e, "reference cache fill failed");
        }
    }

    /// Deletes the keys now and again after a short delay (delayed double delete).
    pub fn invalidate(&self, materials: Vec<String>, stations: Vec<String>) {
        let keys: Vec<String> = materials
            .iter()
            .map(|m| self.material_key(m))
            .chain(stations.iter().map(|s| self.station_key(s)))
            .collect();
        if keys.is_empty() {
            return;
        }
        let client = self.redis.client().clone();
        tokio::spawn(async move {
            for delay in [Duration::ZERO, Duration::from_millis(500)] {
                tokio::time::sleep(delay).await;
                if let Err(e) = client.del::<i64, _>(keys.clone()).await {
                    metrics::counter!("reference_cache_errors_total").increment(1);
                    tracing::warn!(error = %e, "reference cache invalidation failed; entries expire with their TTL");
                }
            }
        });
    }

    pub fn is_missing(value: &str) -> bool {
        value == MISSING
    }
}
