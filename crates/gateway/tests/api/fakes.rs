//! Small real gRPC servers with canned answers, standing in for the services.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use mes_proto::v1 as pb;
use pb::scan_ingest_server::{ScanIngest, ScanIngestServer};
use prost::Message as _;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// What a fake saw of one call.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: &'static str,
    pub user: Option<String>,
    pub roles: Option<String>,
    pub station: Option<String>,
    pub traceparent: Option<String>,
}

#[derive(Clone, Default)]
pub struct FakeScanIngest {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Set to `true` to cut every open connection at once (as if the process died); set back
    /// to `false` to "restart" it.
    pub kill: Option<tokio::sync::watch::Sender<bool>>,
    /// Whether a `DIE` scan already killed the fake (it dies once).
    pub died: Arc<std::sync::atomic::AtomicBool>,
}

/// What the services answer when a call's caller signature is refused (mes-common's
/// `CallerAuth` layer), one per refusal reason.
pub const SIGNATURE_REFUSALS: &[(&str, &str)] = &[
    (
        "UNSIGNED",
        "missing caller signature: internal calls must be signed with the deployment's internal key (MES_INTERNAL_KEY)",
    ),
    (
        "SKEWED",
        "caller signature outside the allowed clock skew: internal calls must be signed with the deployment's internal key (MES_INTERNAL_KEY)",
    ),
    (
        "FORGED",
        "caller signature does not match: internal calls must be signed with the deployment's internal key (MES_INTERNAL_KEY)",
    ),
];

impl FakeScanIngest {
    fn record<T>(&self, method: &'static str, req: &Request<T>) {
        let md = req.metadata();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(Seen {
                method,
                user: get("x-mes-user"),
                roles: get("x-mes-roles"),
                station: get("x-mes-station"),
                traceparent: get("traceparent"),
            });
        }
    }

    pub fn calls(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

fn bad_request(field: &str, description: &str) -> Status {
    #[derive(Clone, PartialEq, prost::Message)]
    struct RpcStatus {
        #[prost(int32, tag = "1")]
        code: i32,
        #[prost(string, tag = "2")]
        message: String,
        #[prost(message, repeated, tag = "3")]
        details: Vec<prost_types::Any>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct BadRequest {
        #[prost(message, repeated, tag = "1")]
        field_violations: Vec<FieldViolation>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct FieldViolation {
        #[prost(string, tag = "1")]
        field: String,
        #[prost(string, tag = "2")]
        description: String,
    }
    let br = BadRequest {
        field_violations: vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }],
    };
    let st = RpcStatus {
        code: tonic::Code::InvalidArgument as i32,
        message: "invalid request".into(),
        details: vec![prost_types::Any {
            type_url: "type.googleapis.com/google.rpc.BadRequest".into(),
            value: br.encode_to_vec(),
        }],
    };
    Status::with_details(
        tonic::Code::InvalidArgument,
        "invalid request",
        st.encode_to_vec().into(),
    )
}

#[tonic::async_trait]
impl ScanIngest for FakeScanIngest {
    async fn submit_scans(
        &self,
        request: Request<pb::SubmitScansRequest>,
    ) -> Result<Response<pb::SubmitScansResponse>, Status> {
        self.record("SubmitScans", &request);
        let lot = request
            .get_ref()
            .scans
            .first()
            .map(|s| s.lot.clone())
            .unwrap_or_default();
        if let Some((_, message)) = SIGNATURE_REFUSALS.iter().find(|(l, _)| *l == lot) {
            return Err(Status::unauthenticated(*message));
        }
        match lot.as_str() {
            "NOT-YOURS" => {
                return Err(Status::permission_denied(
                    "the caller's roles do not allow this operation",
                ));
            }
            "BOOM" => return Err(Status::internal("relation \"scans\" does not exist")),
            "DIE" if !self.died.swap(true, std::sync::atomic::Ordering::SeqCst) => {
                // The process dies mid-request: every connection is cut, no answer is sent.
                if let Some(kill) = &self.kill {
                    let _ = kill.send(true);
                }
                std::future::pending::<()>().await;
            }
            _ => {}
        }
        let results = request
            .into_inner()
            .scans
            .into_iter()
            .map(|s| {
                if s.lot == "HELD-1" {
                    pb::ScanResult {
                        scan_id: s.scan_id,
                        status: pb::ScanStatus::Rejected as i32,
                        error: Some(pb::ScanError {
                            code: "lot_on_hold".into(),
                            message: "lot HELD-1 is on hold".into(),
                        }),
                    }
                } else {
                    pb::ScanResult {
                        scan_id: s.scan_id,
                        status: pb::ScanStatus::Accepted as i32,
                        error: None,
                    }
                }
            })
            .collect();
        Ok(Response::new(pb::SubmitScansResponse { results }))
    }

    async fn get_work_order(
        &self,
        request: Request<pb::GetWorkOrderRequest>,
    ) -> Result<Response<pb::WorkOrder>, Status> {
        self.record("GetWorkOrder", &request);
        let number = request.into_inner().number;
        if number != "WO-1000" {
            return Err(Status::not_found(format!("work order {number} not found")));
        }
        Ok(Response::new(pb::WorkOrder {
            number,
            material: "FRAME-200".into(),
            planned_quantity: "10".into(),
            status: "released".into(),
            operations: vec![pb::Operation {
                step: 10,
                station: "ST-10".into(),
                description: "welding".into(),
                status: "pending".into(),
                good_quantity: "0".into(),
                scrap_quantity: "0".into(),
            }],
            components: vec![pb::Component {
                material: "STEEL-500".into(),
                quantity_per_unit: "2.5".into(),
            }],
            produced_quantity: "0".into(),
            scrap_quantity: "0".into(),
            updated_at: None,
        }))
    }

    async fn list_work_orders(
        &self,
        request: Request<pb::ListWorkOrdersRequest>,
    ) -> Result<Response<pb::ListWorkOrdersResponse>, Status> {
        self.record("ListWorkOrders", &request);
        if request.get_ref().cursor == "bad" {
            return Err(bad_request("cursor", "is not a valid cursor"));
        }
        if request.get_ref().cursor == "slow" {
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        }
        if request.get_ref().cursor == "boom" {
            return Err(Status::internal("relation \"work_orders\" does not exist"));
        }
        Ok(Response::new(pb::ListWorkOrdersResponse {
            items: vec![],
            next_cursor: String::new(),
        }))
    }
}

/// A running fake scan-ingest (with gRPC health SERVING); stops when dropped.
pub struct FakeServer {
    pub url: String,
    pub fake: FakeScanIngest,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn start_scan_ingest() -> FakeServer {
    start_scan_ingest_keyed(None).await
}

/// A fake scan-ingest behind the services' real caller-signature check, with `key` as its
/// deployment's internal key.
pub async fn start_scan_ingest_keyed(key: Option<mes_common::identity::CallerKey>) -> FakeServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let (kill, killed) = tokio::sync::watch::channel(false);
    let fake = FakeScanIngest {
        kill: Some(kill),
        ..FakeScanIngest::default()
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<ScanIngestServer<FakeScanIngest>>()
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let svc = ScanIngestServer::new(fake.clone());
    tokio::spawn(async move {
        let _ = mes_common::grpc::server("fake-scan-ingest", key)
            .add_service(health)
            .add_service(svc)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener)
                    .map(move |tcp| tcp.map(|tcp| Killable::new(tcp, killed.clone()))),
                async {
                    let _ = rx.await;
                },
            )
            .await;
    });
    FakeServer {
        url: format!("http://{addr}"),
        fake,
        stop: Some(tx),
    }
}

/// An accepted connection that fails (and is closed) once the kill switch is set: what a
/// client sees when the server process dies (the kernel closes its sockets, no HTTP/2 GOAWAY,
/// no gRPC status).
struct Killable {
    tcp: tokio::net::TcpStream,
    killed: Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
}

impl Killable {
    fn new(tcp: tokio::net::TcpStream, mut rx: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            tcp,
            killed: Box::pin(async move {
                let _ = rx.wait_for(|k| *k).await;
            }),
        }
    }

    fn dead(&mut self, cx: &mut Context<'_>) -> bool {
        self.killed.as_mut().poll(cx).is_ready()
    }
}

fn reset() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "the fake died")
}

impl tokio::io::AsyncRead for Killable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.dead(cx) {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Killable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.dead(cx) {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.dead(cx) {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Killable {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}
