//! Black-box tests: trace-query started on :0 against a fresh database.

use std::time::Duration;

use mes_common::Shutdown;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};
use trace_query::{Application, Settings};

struct TestApp {
    channel: Channel,
    database_url: String,
    shutdown: Shutdown,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestApp {
    /// Stops the service and drops its database.
    async fn stop(self) {
        self.shutdown.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server).await;
        mes_common::db::drop_database(&self.database_url)
            .await
            .expect("drop test database");
    }
}

async fn spawn_app() -> TestApp {
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let mut settings = Settings::default();
    settings.service.database_url =
        format!("postgres://postgres@127.0.0.1:5432/test_trace_query_{unique}");
    settings.service.listen_addr = "127.0.0.1:0".into();
    settings.service.metrics_addr = String::new();
    settings.service.redis_prefix = format!("test:trace-query:{unique}:");
    settings.service.shutdown_grace_seconds = 2;
    let database_url = settings.service.database_url.clone();
    let app = Application::build(settings).await.expect("build app");
    let port = app.port();
    let shutdown = Shutdown::new();
    let server = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("url")
        .connect_lazy();
    TestApp {
        channel,
        database_url,
        shutdown,
        server,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_and_reflection_lists_trace_query() {
    let app = spawn_app().await;

    // Health turns SERVING once the database probe has answered.
    let mut health = HealthClient::new(app.channel.clone());
    let mut status = ServingStatus::Unknown;
    for _ in 0..50 {
        if let Ok(r) = health
            .check(HealthCheckRequest {
                service: "mes.v1.TraceQuery".into(),
            })
            .await
        {
            status = r.into_inner().status();
            if status == ServingStatus::Serving {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, ServingStatus::Serving);

    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection call")
        .into_inner();
    let response = responses
        .next()
        .await
        .expect("one response")
        .expect("reflection answer");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "mes.v1.TraceQuery"),
        "services: {names:?}"
    );
    assert!(
        names.iter().any(|n| n == "grpc.health.v1.Health"),
        "{names:?}"
    );

    // Until the projection exists, the queries answer UNIMPLEMENTED (never a crash).
    let mut client = mes_proto::v1::trace_query_client::TraceQueryClient::new(app.channel.clone());
    let err = client
        .get_lot_history(mes_proto::v1::LotHistoryRequest {
            lot: "STEEL-L1".into(),
        })
        .await
        .expect_err("not implemented yet");
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    app.stop().await;
}
