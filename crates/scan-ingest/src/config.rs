//! scan-ingest settings: the common ones plus the write path's own.

use mes_common::ServiceSettings;
use serde::{Deserialize, Serialize};

pub const SERVICE: &str = "scan-ingest";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    #[serde(flatten)]
    pub service: ServiceSettings,
    /// How often the feed sequencer looks for committed, unsequenced events when not woken.
    pub sequencer_interval_ms: u64,
    /// Seconds between ledger checks (on-hand = sum of scan effects); 0 disables.
    pub ledger_check_interval_seconds: u64,
    /// Commit workers taking turns at the group-commit queue.
    pub group_commit_workers: usize,
    /// How long a worker waits for more requests to join its transaction (0: only coalesce
    /// requests already queued, so an idle system adds no latency).
    pub group_commit_max_wait_us: u64,
    /// Upper bound of scans in one group transaction.
    pub group_commit_max_scans: usize,
    /// TTL of hot reference data (work-order status, material tracking, station bindings) in Redis.
    pub reference_cache_ttl_seconds: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            service: ServiceSettings::defaults_for(SERVICE),
            sequencer_interval_ms: 200,
            ledger_check_interval_seconds: 300,
            reference_cache_ttl_seconds: 300,
            group_commit_workers: 4,
            group_commit_max_wait_us: 0,
            group_commit_max_scans: 2000,
        }
    }
}

impl Settings {
    /// Defaults → optional TOML → `MES_` / `MES_SCAN_INGEST_` environment.
    pub fn load() -> anyhow::Result<Self> {
        mes_common::config::load(SERVICE, &Self::default())
    }
}
