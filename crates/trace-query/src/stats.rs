//! Counters of one trace-query instance: exported as Prometheus metrics, and kept per instance
//! too so tests (several instances in one process) can read their own.

use std::sync::atomic::{AtomicU64, Ordering};

/// The queries answered from the database (`trace_db_queries_total{query}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Query {
    GenealogyBackward,
    GenealogyForward,
    LotHistory,
    WorkOrderSummary,
    ProductionReport,
}

impl Query {
    pub const ALL: [Query; 5] = [
        Query::GenealogyBackward,
        Query::GenealogyForward,
        Query::LotHistory,
        Query::WorkOrderSummary,
        Query::ProductionReport,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Query::GenealogyBackward => "genealogy_backward",
            Query::GenealogyForward => "genealogy_forward",
            Query::LotHistory => "lot_history",
            Query::WorkOrderSummary => "work_order_summary",
            Query::ProductionReport => "production_report",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How the cache answered a request (`trace_cache_requests_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheResult {
    /// From Redis.
    Hit,
    /// From the database (this request asked it).
    Miss,
    /// The answer of an identical request already in flight (here or on another replica).
    Coalesced,
    /// A cached "not found".
    NegativeHit,
    /// The membership filter knows the lot does not exist.
    FilterRejected,
}

impl CacheResult {
    pub const ALL: [CacheResult; 5] = [
        CacheResult::Hit,
        CacheResult::Miss,
        CacheResult::Coalesced,
        CacheResult::NegativeHit,
        CacheResult::FilterRejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Coalesced => "coalesced",
            CacheResult::NegativeHit => "negative_hit",
            CacheResult::FilterRejected => "filter_rejected",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    db_queries: [AtomicU64; 5],
    cache: [AtomicU64; 5],
    redis_errors: AtomicU64,
}

impl Stats {
    pub fn db_query(&self, q: Query) {
        self.db_queries[q.index()].fetch_add(1, Ordering::Relaxed);
        metrics::counter!("trace_db_queries_total", "query" => q.as_str()).increment(1);
    }

    pub fn cache(&self, r: CacheResult) {
        self.cache[r.index()].fetch_add(1, Ordering::Relaxed);
        metrics::counter!("trace_cache_requests_total", "result" => r.as_str()).increment(1);
    }

    pub fn redis_error(&self) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("trace_cache_errors_total").increment(1);
    }

    /// Database queries of kind `q` so far.
    pub fn db_queries(&self, q: Query) -> u64 {
        self.db_queries[q.index()].load(Ordering::Relaxed)
    }

    /// Database queries of every kind so far.
    pub fn all_db_queries(&self) -> u64 {
        Query::ALL.iter().map(|q| self.db_queries(*q)).sum()
    }

    pub fn cache_results(&self, r: CacheResult) -> u64 {
        self.cache[r.index()].load(Ordering::Relaxed)
    }

    pub fn redis_errors(&self) -> u64 {
        self.redis_errors.load(Ordering::Relaxed)
    }
}
