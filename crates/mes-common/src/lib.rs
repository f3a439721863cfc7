//! Plumbing shared by the four MES services. No business rules live here.
//!
//! - [`config`]: figment layering (defaults → optional TOML file → `MES_` environment).
//! - [`telemetry`]: tracing with JSON logs carrying `trace_id`/`span_id`, OTLP export.
//! - [`propagation`]: W3C trace context in HTTP headers and gRPC metadata.
//! - [`db`], [`cache`]: PostgreSQL pool (database created if missing) and the Redis client.
//! - [`grpc`]: server (health, reflection, tracing and metrics layers) and client channels.
//! - [`metrics`]: the Prometheus recorder and `/metrics` endpoint.
//! - [`health`]: dependency probes that drive gRPC health.
//! - [`shutdown`]: SIGTERM/SIGINT handling.
//! - [`identity`]: the caller identity the gateway forwards in gRPC metadata.
//! - [`feed`]: the event-feed consumer of trace-query and erp-sync (follow loop, backoff, batch
//!   span, metrics, stall alarm) over their [`feed::Apply`].

pub mod cache;
pub mod config;
pub mod db;
pub mod errors;
pub mod feed;
pub mod grpc;
pub mod health;
pub mod identity;
pub mod metrics;
pub mod propagation;
pub mod service;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::ServiceSettings;
pub use shutdown::Shutdown;
