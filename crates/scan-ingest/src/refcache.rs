//! Hot reference data in Redis: known stations (and material tracking modes), read on every
//! batch before its transaction begins, so a slow Redis never stretches a row lock. The write
//! path reads the output material's tracking mode with the work order it locks. Cache-aside: the database is the truth; master-data upserts delete the keys after
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

/// What [`RefCache::lookup`] found.
pub struct Reference {
    pub materials: HashMap<String, Option<String>>,
    pub stations: HashMap<String, Option<String>>,
    /// The invalidation generation at lookup time; `None` when Redis did not answer.
    pub generation: Option<String>,
}

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

    fn generation_key(&self) -> String {
        self.redis.key("ref:generation")
    }

    /// Looks up materials (tracking mode) and stations (`"1"` known, `"-"` known missing);
    /// `None` entries are misses. The answer carries the invalidation generation read in the
    /// same round trip, which [`RefCache::fill`] needs.
    pub async fn lookup(&self, materials: &[String], stations: &[String]) -> Reference {
        let keys: Vec<String> = materials
            .iter()
            .map(|m| self.material_key(m))
            .chain(stations.iter().map(|s| self.station_key(s)))
            .chain([self.generation_key()])
            .collect();
        let mut values = self.get_many(keys).await;
        let generation = values
            .as_mut()
            .and_then(Vec::pop)
            .map(|g| g.unwrap_or_else(|| "0".into()));
        let mut values = values
            .unwrap_or_default()
            .into_iter()
            .chain(std::iter::repeat(None));
        let mut take = |names: &[String]| -> HashMap<String, Option<String>> {
            names
                .iter()
                .map(|name| {
                    let v = values.next().flatten();
                    let label = if v.is_some() { "hit" } else { "miss" };
                    metrics::counter!("reference_cache_lookups_total", "result" => label)
                        .increment(1);
                    (name.clone(), v)
                })
                .collect()
        };
        let materials = take(materials);
        let stations = take(stations);
        Reference {
            materials,
            stations,
            generation,
        }
    }

    /// Stores what the database said after a [`RefCache::lookup`] (materials: tracking or
    /// `None` for unknown; stations: whether known), with the TTL. The fill runs off the
    /// commit path and may land after a master-data upsert invalidated these keys; the
    /// upsert bumps the generation before it deletes, so a fill that sees the generation moved
    /// since its lookup deletes what it just wrote instead of leaving an old answer for a TTL.
    pub async fn fill(
        &self,
        generation: &str,
        materials: &[(String, Option<String>)],
        stations: &[(String, bool)],
    ) {
        let entries: Vec<(String, String)> = materials
            .iter()
            .map(|(m, t)| {
                (
                    self.material_key(m),
                    t.clone().unwrap_or_else(|| MISSING.into()),
                )
            })
            .chain(stations.iter().map(|(s, known)| {
                (
                    self.station_key(s),
                    if *known { "1".into() } else { MISSING.into() },
                )
            }))
            .collect();
        if entries.is_empty() {
            return;
        }
        let ttl = self.ttl.as_secs().max(1) as i64;
        let keys: Vec<String> = entries.iter().map(|(k, _)| k.clone()).collect();
        let client = self.redis.client();
        let pipeline = client.pipeline();
        for (k, v) in entries {
            let _: () = pipeline
                .set(k, v, Some(Expiration::EX(ttl)), None, false)
                .await
                .unwrap_or(());
        }
        let _: () = pipeline.get(self.generation_key()).await.unwrap_or(());
        let now = match pipeline.all::<Vec<Option<String>>>().await {
            Ok(mut replies) => replies.pop().flatten().unwrap_or_else(|| "0".into()),
            Err(e) => {
                metrics::counter!("reference_cache_errors_total").increment(1);
                tracing::debug!(error = %e, "reference cache fill failed");
                return;
            }
        };
        if now != generation {
            metrics::counter!("reference_cache_fills_discarded_total").increment(1);
            if let Err(e) = client.del::<i64, _>(keys).await {
                metrics::counter!("reference_cache_errors_total").increment(1);
                tracing::warn!(error = %e, "reference cache: a stale fill could not be deleted; it expires with its TTL");
            }
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
        let generation = self.generation_key();
        tokio::spawn(async move {
            // First the generation, so a fill racing with this sees it moved (see `fill`).
            if let Err(e) = client.incr::<i64, _>(&generation).await {
                metrics::counter!("reference_cache_errors_total").increment(1);
                tracing::warn!(error = %e, "reference cache generation not bumped");
            }
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
