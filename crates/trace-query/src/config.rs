//! trace-query settings: the common ones plus the read model's own.

use mes_common::ServiceSettings;
use serde::{Deserialize, Serialize};

pub const SERVICE: &str = "trace-query";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    #[serde(flatten)]
    pub service: ServiceSettings,
    /// scan-ingest, whose event feed the read model is built from.
    pub scan_ingest_url: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            service: ServiceSettings::defaults_for(SERVICE),
            scan_ingest_url: "http://127.0.0.1:50051".into(),
        }
    }
}

impl Settings {
    /// Defaults → optional TOML → `MES_` / `MES_TRACE_QUERY_` environment.
    pub fn load() -> anyhow::Result<Self> {
        mes_common::config::load(SERVICE, &Self::default())
    }
}
