//! gRPC clients of the three services: lazy channels with a short connect timeout (a service
//! that is down answers at once), the trace context on every call, and the caller identity in
//! the metadata.

use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;

/// The answer of [`Backends::health_of`] for a health name the service does not report.
pub const NOT_REPORTED: &str = "not reported";
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::Instrument;

use mes_common::grpc::Signed;
use mes_common::identity::Caller;
use mes_proto::v1::erp_sync_client::ErpSyncClient;
use mes_proto::v1::scan_ingest_client::ScanIngestClient;
use mes_proto::v1::trace_query_client::TraceQueryClient;

use crate::problem::{self, Problem};

pub type Traced = Signed<Channel>;

pub const SCAN_INGEST: &str = "scan-ingest";
pub const TRACE_QUERY: &str = "trace-query";
pub const ERP_SYNC: &str = "erp-sync";

#[derive(Clone)]
pub struct Backends {
    scan_ingest: Channel,
    trace_query: Channel,
    erp_sync: Channel,
    retry_after: u64,
    /// Signs the caller identity of every call (None: not signed).
    key: Option<mes_common::identity::CallerKey>,
}

impl Backends {
    pub fn new(settings: &crate::Settings) -> anyhow::Result<Self> {
        let connect = Duration::from_millis(settings.grpc_connect_timeout_ms);
        let request = Duration::from_millis(settings.grpc_request_timeout_ms);
        let ch = |url: &str| mes_common::grpc::channel(url, connect, request);
        Ok(Self {
            scan_ingest: ch(&settings.scan_ingest_url)?,
            trace_query: ch(&settings.trace_query_url)?,
            erp_sync: ch(&settings.erp_sync_url)?,
            retry_after: settings.retry_after_seconds,
            key: settings.service.caller_key(),
        })
    }

    pub fn scan_ingest(&self) -> ScanIngestClient<Traced> {
        ScanIngestClient::new(self.traced(self.scan_ingest.clone()))
    }

    pub fn trace_query(&self) -> TraceQueryClient<Traced> {
        TraceQueryClient::new(self.traced(self.trace_query.clone()))
    }

    pub fn erp_sync(&self) -> ErpSyncClient<Traced> {
        ErpSyncClient::new(self.traced(self.erp_sync.clone()))
    }

    /// `channel` with the trace context and signed calls (method, identity, body).
    fn traced(&self, channel: Channel) -> Traced {
        mes_common::grpc::signed(channel, self.key.clone())
    }

    fn channel_of(&self, service: &str) -> Option<Channel> {
        match service {
            SCAN_INGEST => Some(self.scan_ingest.clone()),
            TRACE_QUERY => Some(self.trace_query.clone()),
            ERP_SYNC => Some(self.erp_sync.clone()),
            _ => None,
        }
    }

    /// Runs one call in a `grpc.client` span (so the trace context flows on), with the caller
    /// identity in the metadata; a non-OK status becomes a problem.
    ///
    /// An idempotent call ([`IDEMPOTENT`]) whose connection failed under it (an instance
    /// shutting down closed the connection, a reset) is tried once more at once on a new
    /// connection, so a rolling restart of a service costs its clients nothing. A service's
    /// own UNAVAILABLE (its database is down) is not retried here: the client is told
    /// 503 with `Retry-After`.
    pub async fn call<M, R, F, Fut>(
        &self,
        service: &'static str,
        method: &'static str,
        caller: &Caller,
        message: M,
        f: F,
    ) -> Result<R, Problem>
    where
        M: Clone,
        F: Fn(tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let retry = IDEMPOTENT.contains(&method).then(|| message.clone());
        match self.call_once(service, method, caller, message, &f).await {
            Err(status) if problem::connection_failed(&status) => match retry {
                Some(message) => {
                    metrics::counter!("gateway_grpc_retries_total",
                        "service" => service, "method" => method)
                    .increment(1);
                    tracing::info!(service, method, error = %status, "connection failed under an idempotent call; trying once more");
                    self.call_once(service, method, caller, message, &f)
                        .await
                        .map_err(|status| problem::from_status(service, &status, self.retry_after))
                }
                None => Err(problem::from_status(service, &status, self.retry_after)),
            },
            other => {
                other.map_err(|status| problem::from_status(service, &status, self.retry_after))
            }
        }
    }

    async fn call_once<M, R, F, Fut>(
        &self,
        service: &'static str,
        method: &'static str,
        caller: &Caller,
        message: M,
        f: &F,
    ) -> Result<R, tonic::Status>
    where
        F: Fn(tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = %format!("{service}/{method}"),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let start = Instant::now();
        let mut request = tonic::Request::new(message);
        caller.write_to(request.metadata_mut());
        let result = f(request).instrument(span.clone()).await;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        span.record("rpc.grpc.status_code", code as i32);
        metrics::histogram!("grpc_client_request_duration_seconds",
            "service" => service, "method" => method, "code" => format!("{code:?}"))
        .record(start.elapsed().as_secs_f64());
        result.map(tonic::Response::into_inner)
    }

    /// grpc.health.v1 Check of a service: `Ok(latency)` when SERVING.
    pub async fn health(&self, service: &str, timeout: Duration) -> Result<Duration, String> {
        self.health_of(service, "", timeout).await
    }

    /// grpc.health.v1 Check of one health name a service reports (`""`: the service itself);
    /// a name the service does not report is `Err("not reported")`.
    pub async fn health_of(
        &self,
        service: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let channel = self
            .channel_of(service)
            .ok_or_else(|| "unknown service".to_owned())?;
        let mut client = HealthClient::new(self.traced(channel));
        let start = Instant::now();
        let check = client.check(HealthCheckRequest {
            service: name.to_owned(),
        });
        match tokio::time::timeout(timeout, check).await {
            Ok(Ok(res)) => {
                let status = res.into_inner().status();
                if status == ServingStatus::Serving {
                    Ok(start.elapsed())
                } else {
                    Err(status.as_str_name().to_lowercase())
                }
            }
            Ok(Err(status)) => Err(match status.code() {
                tonic::Code::Unavailable => "unreachable".to_owned(),
                tonic::Code::DeadlineExceeded => "no answer in time".to_owned(),
                tonic::Code::NotFound => NOT_REPORTED.to_owned(),
                c => format!("health check failed ({c:?})"),
            }),
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        }
    }
}

/// Calls that may be sent twice with the same effect as once: scans (idempotent by scan id)
/// and every read.
pub const IDEMPOTENT: &[&str] = &[
    "SubmitScans",
    "GetScan",
    "GetLot",
    "GetWorkOrder",
    "ListWorkOrders",
    "GetGenealogy",
    "GetLotHistory",
    "GetWorkOrderSummary",
    "GetProductionReport",
    "GetStatus",
];
