//! The gRPC surface of trace-query.
//!
//! The read model (genealogy, lot history, work-order summaries, production reports) is built
//! from scan-ingest's event feed in a later step; until then every `TraceQuery` RPC keeps the
//! generated default, which answers `UNIMPLEMENTED`.

use mes_proto::v1::trace_query_server::TraceQuery;

use crate::AppState;

#[derive(Clone)]
pub struct Api {
    #[allow(dead_code)] // read by the query handlers once the projection exists
    state: AppState,
}

impl Api {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl TraceQuery for Api {}
