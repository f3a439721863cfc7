//! trace-query settings: the common ones plus the read model's own.

use mes_common::ServiceSettings;
use serde::{Deserialize, Serialize};

pub const SERVICE: &str = "trace-query";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    #[serde(flatten)]
    pub service: ServiceSettings,
    /// scan-ingest, whose event feed the read model is built from
    /// (`MES_TRACE_QUERY_SCAN_INGEST_URL`).
    pub scan_ingest_url: String,
    /// The name this read model's feed cursor is stored under (and sent to the feed for its logs).
    pub feed_consumer: String,
    /// Events applied in one transaction at most.
    pub feed_batch: usize,
    /// First and longest delay between attempts to resubscribe to the feed.
    pub feed_retry_initial_ms: u64,
    pub feed_retry_max_ms: u64,
    /// How often a replica that does not project tries to take the projection lease (one
    /// replica projects the feed at a time; the others serve reads), in milliseconds.
    pub projection_lease_retry_ms: u64,
    /// TTL of cached query answers (each one gets a random jitter of ± `cache_ttl_jitter_percent`).
    pub cache_ttl_seconds: u64,
    /// TTL of cached "not found" answers.
    pub cache_negative_ttl_ms: u64,
    pub cache_ttl_jitter_percent: u64,
    /// Delay of the second delete of invalidated keys (against readers that refilled a key from
    /// a snapshot older than the change).
    pub cache_second_delete_ms: u64,
    /// Upper bound of one Redis round trip; slower counts as Redis being unavailable.
    pub cache_command_timeout_ms: u64,
    /// Cross-replica lock of a cache miss (SET NX PX): how long it is held at most, and how long
    /// another replica waits for the holder's answer before it asks the database itself.
    pub cache_lock_ttl_ms: u64,
    pub cache_lock_wait_ms: u64,
    /// The membership filter of known lots (a Bloom filter on a Redis bitmap): the number of lots
    /// it is sized for and the false-positive rate at that size.
    pub lot_filter_capacity: u64,
    pub lot_filter_false_positive_rate: f64,
    /// Backward genealogy of freshly produced lots is computed and cached in the background.
    pub prewarm: bool,
    /// Depth of the pre-warmed genealogy (the gateway's default depth is 20).
    pub prewarm_depth: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            service: ServiceSettings::defaults_for(SERVICE),
            scan_ingest_url: "http://127.0.0.1:50051".into(),
            feed_consumer: SERVICE.into(),
            feed_batch: 500,
            feed_retry_initial_ms: 200,
            feed_retry_max_ms: 5_000,
            projection_lease_retry_ms: 2_000,
            cache_ttl_seconds: 600,
            cache_negative_ttl_ms: 5_000,
            cache_ttl_jitter_percent: 20,
            cache_second_delete_ms: 500,
            cache_command_timeout_ms: 250,
            cache_lock_ttl_ms: 5_000,
            cache_lock_wait_ms: 300,
            lot_filter_capacity: 2_000_000,
            lot_filter_false_positive_rate: 0.01,
            prewarm: true,
            prewarm_depth: crate::domain::DEFAULT_DEPTH,
        }
    }
}

impl Settings {
    /// Defaults → optional TOML → `MES_` / `MES_TRACE_QUERY_` environment.
    pub fn load() -> anyhow::Result<Self> {
        mes_common::config::load(SERVICE, &Self::default())
    }
}
