//! The gRPC surface of trace-query: request validation, then the answer ([`crate::reads`]).
//!
//! Answers are served as they are encoded ([`crate::reads::Encoded`]): [`Service`] answers the
//! four queries itself with a codec that decodes the request and writes the encoded answer
//! as it is, so a cache hit is sent as the bytes Redis returned, with no protobuf decode and
//! encode in between. Anything else goes to the generated `TraceQueryServer` ([`Api`]
//! implements the generated trait too, with the same answers decoded).

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use fred::bytes::{BufMut, Bytes};
use mes_common::errors::ServiceError;
use mes_proto::v1 as pb;
use mes_proto::v1::trace_query_server::{TraceQuery, TraceQueryServer};
use prost::Message;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

use crate::AppState;
use crate::domain::{self, Direction, GroupBy, Window};
use crate::error::Error;
use crate::reads::{self, Encoded};

/// The query handlers (cheap to clone: one per call).
#[derive(Clone)]
pub struct Api {
    state: Arc<AppState>,
}

impl Api {
    pub fn new(state: AppState) -> Self {
        Self {
            state: Arc::new(state),
        }
    }

    #[tracing::instrument(name = "get_genealogy", skip_all, fields(lot = %r.lot, direction = r.direction, max_depth = r.max_depth))]
    pub async fn genealogy(
        &self,
        r: &pb::GenealogyRequest,
    ) -> Result<Encoded<pb::Genealogy>, Status> {
        let started = Instant::now();
        let lot = domain::identifier("lot", &r.lot)?;
        let depth = domain::depth(r.max_depth)?;
        let direction = Direction::from_proto(r.direction)?;
        let s = &self.state;
        finish(
            "genealogy",
            started,
            reads::genealogy(&s.cache, &s.pool, &lot, direction, depth).await,
        )
    }

    #[tracing::instrument(name = "get_lot_history", skip_all, fields(lot = %r.lot))]
    pub async fn lot_history(
        &self,
        r: &pb::LotHistoryRequest,
    ) -> Result<Encoded<pb::LotHistory>, Status> {
        let started = Instant::now();
        let lot = domain::identifier("lot", &r.lot)?;
        let s = &self.state;
        finish(
            "lot_history",
            started,
            reads::lot_history(&s.cache, &s.pool, &lot).await,
        )
    }

    #[tracing::instrument(name = "get_work_order_summary", skip_all, fields(work_order = %r.work_order))]
    pub async fn work_order_summary(
        &self,
        r: &pb::WorkOrderSummaryRequest,
    ) -> Result<Encoded<pb::WorkOrderSummary>, Status> {
        let started = Instant::now();
        let wo = domain::identifier("work_order", &r.work_order)?;
        let s = &self.state;
        finish(
            "work_order_summary",
            started,
            reads::work_order_summary(&s.cache, &s.pool, &wo).await,
        )
    }

    #[tracing::instrument(name = "get_production_report", skip_all, fields(group_by = r.group_by))]
    pub async fn production_report(
        &self,
        r: &pb::ProductionReportRequest,
    ) -> Result<Encoded<pb::ProductionReport>, Status> {
        let started = Instant::now();
        let window = Window::parse(r.from.as_ref(), r.to.as_ref())?;
        let group_by = GroupBy::from_proto(r.group_by)?;
        let s = &self.state;
        finish(
            "production_report",
            started,
            reads::production_report(&s.cache, &s.pool, window, group_by).await,
        )
    }

    /// The gRPC service to serve: [`Service`] in front of the generated server.
    pub fn service(self) -> Service {
        Service {
            generated: TraceQueryServer::new(self.clone()),
            api: self,
        }
    }
}

fn finish<T>(query: &'static str, started: Instant, r: Result<T, Arc<Error>>) -> Result<T, Status> {
    metrics::histogram!("trace_query_duration_seconds", "query" => query)
        .record(started.elapsed().as_secs_f64());
    r.map_err(|e| e.to_status())
}

fn decoded<M: Message + Default>(
    answer: Result<Encoded<M>, Status>,
) -> Result<Response<M>, Status> {
    answer?
        .decode()
        .map(Response::new)
        .map_err(|e| e.to_status())
}

#[tonic::async_trait]
impl TraceQuery for Api {
    async fn get_genealogy(
        &self,
        req: Request<pb::GenealogyRequest>,
    ) -> Result<Response<pb::Genealogy>, Status> {
        decoded(self.genealogy(req.get_ref()).await)
    }

    async fn get_lot_history(
        &self,
        req: Request<pb::LotHistoryRequest>,
    ) -> Result<Response<pb::LotHistory>, Status> {
        decoded(self.lot_history(req.get_ref()).await)
    }

    async fn get_work_order_summary(
        &self,
        req: Request<pb::WorkOrderSummaryRequest>,
    ) -> Result<Response<pb::WorkOrderSummary>, Status> {
        decoded(self.work_order_summary(req.get_ref()).await)
    }

    async fn get_production_report(
        &self,
        req: Request<pb::ProductionReportRequest>,
    ) -> Result<Response<pb::ProductionReport>, Status> {
        decoded(self.production_report(req.get_ref()).await)
    }
}

/// `mes.v1.TraceQuery` as served: the four queries answered with their encoded answers
/// ([`Passthrough`]), any other path by the generated server.
#[derive(Clone)]
pub struct Service {
    api: Api,
    generated: TraceQueryServer<Api>,
}

impl NamedService for Service {
    const NAME: &'static str = <TraceQueryServer<Api> as NamedService>::NAME;
}

/// One query: validates and answers a decoded request with its encoded answer.
struct Query<Req, F> {
    api: Api,
    answer: F,
    request: PhantomData<fn(Req)>,
}

impl<Req, F, Fut> UnaryService<Req> for Query<Req, F>
where
    F: Fn(Api, Req) -> Fut,
    Fut: Future<Output = Result<Bytes, Status>> + Send + 'static,
{
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>, Status>;

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        let answer = (self.answer)(self.api.clone(), request.into_inner());
        Box::pin(async move { answer.await.map(Response::new) })
    }
}

/// Serves one unary query of `api` with `answer`, as the generated server would (same codec
/// settings: no compression, default message size limits), but with the answer already
/// encoded.
async fn serve<Req, F, Fut>(api: Api, req: http::Request<Body>, answer: F) -> http::Response<Body>
where
    Req: Message + Default + Send + 'static,
    F: Fn(Api, Req) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Bytes, Status>> + Send + 'static,
{
    let query = Query {
        api,
        answer,
        request: PhantomData,
    };
    Grpc::new(Passthrough::<Req>::default())
        .unary(query, req)
        .await
}

impl tonic::codegen::Service<http::Request<Body>> for Service {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let api = self.api.clone();
        match req.uri().path() {
            "/mes.v1.TraceQuery/GetGenealogy" => Box::pin(async move {
                Ok(serve(api, req, |api, r: pb::GenealogyRequest| async move {
                    api.genealogy(&r).await.map(Encoded::into_bytes)
                })
                .await)
            }),
            "/mes.v1.TraceQuery/GetLotHistory" => Box::pin(async move {
                Ok(serve(api, req, |api, r: pb::LotHistoryRequest| async move {
                    api.lot_history(&r).await.map(Encoded::into_bytes)
                })
                .await)
            }),
            "/mes.v1.TraceQuery/GetWorkOrderSummary" => Box::pin(async move {
                Ok(
                    serve(api, req, |api, r: pb::WorkOrderSummaryRequest| async move {
                        api.work_order_summary(&r).await.map(Encoded::into_bytes)
                    })
                    .await,
                )
            }),
            "/mes.v1.TraceQuery/GetProductionReport" => Box::pin(async move {
                Ok(
                    serve(api, req, |api, r: pb::ProductionReportRequest| async move {
                        api.production_report(&r).await.map(Encoded::into_bytes)
                    })
                    .await,
                )
            }),
            _ => self.generated.call(req),
        }
    }
}

/// The codec of [`Service`]'s queries: requests decoded with prost, answers written as the
/// bytes they already are.
struct Passthrough<Req>(PhantomData<fn() -> Req>);

impl<Req> Default for Passthrough<Req> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

struct ProstDecoder<Req>(PhantomData<fn() -> Req>);

impl<Req: Message + Default> Decoder for ProstDecoder<Req> {
    type Item = Req;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Req>, Status> {
        // Only requests are decoded here (answers are stored bytes).
        Req::decode(src)
            .map(Some)
            .map_err(mes_proto::codec::invalid_request)
    }
}

impl<Req: Message + Default + Send + 'static> Codec for Passthrough<Req> {
    type Encode = Bytes;
    type Decode = Req;
    type Encoder = BytesEncoder;
    type Decoder = ProstDecoder<Req>;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> ProstDecoder<Req> {
        ProstDecoder(PhantomData)
    }
}
