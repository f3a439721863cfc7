//! Test support (feature `testing`): the test internal key and signed channels, and clean-up
//! guards: each test gets its own databases and Redis key prefix, and these remove them when the test ends, also when it fails or panics. The
//! work runs on a thread with a runtime of its own, because `Drop` may run inside the test's
//! runtime (or after it is gone).

use std::time::Duration;

pub mod proxy;

/// Drops the database of `url` when dropped.
pub struct DbGuard {
    pub url: String,
}

impl Drop for DbGuard {
    fn drop(&mut self) {
        let url = self.url.clone();
        on_own_runtime(async move {
            if let Err(e) = crate::db::drop_database(&url).await {
                eprintln!(
                    "cannot drop test database {}: {e:#}",
                    crate::config::redact_url(&url)
                );
            }
        });
    }
}

/// Deletes every Redis key under `prefix` when dropped. Waits a little for the connection and
/// retries a few times: a test may have stopped Redis and restarted it just before.
pub struct RedisGuard {
    pub url: String,
    pub prefix: String,
}

impl Drop for RedisGuard {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        on_own_runtime(async move {
            let Ok(redis) =
                crate::cache::Redis::connect(&url, &prefix, Duration::from_secs(3)).await
            else {
                return;
            };
            if redis.ping().await.is_err() {
                // Nothing answers there (a test of Redis being down): nothing was written.
                return;
            }
            for attempt in 1..=10 {
                match redis.delete_prefixed().await {
                    Ok(_) => return,
                    Err(e) if attempt == 10 => {
                        eprintln!("cannot delete the test's Redis keys {prefix}*: {e:#}")
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
        });
    }
}

fn on_own_runtime(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(work);
        }
    })
    .join();
}

/// Polls `check` every 25 ms until it holds or `timeout` passes; says whether it held.
pub async fn wait_for<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The internal key every test harness gives its services (`MES_INTERNAL_KEY`).
pub const INTERNAL_KEY: &str = "mes-tests-internal-key-0123456789abcdef";

/// [`INTERNAL_KEY`] as settings hold it.
pub fn internal_key() -> crate::config::Secret {
    crate::config::Secret(INTERNAL_KEY.to_owned())
}

/// A channel whose calls are signed with [`INTERNAL_KEY`], as the services sign theirs.
pub type Channel = crate::grpc::Signed<tonic::transport::Channel>;

/// `channel`, its calls signed with [`INTERNAL_KEY`].
pub fn signed(channel: tonic::transport::Channel) -> Channel {
    crate::grpc::signed(
        channel,
        crate::identity::CallerKey::from_config(INTERNAL_KEY),
    )
}

/// A channel to a service on a loopback `port`, connecting on first use, its calls signed
/// with [`INTERNAL_KEY`].
pub fn lazy_channel(port: u16) -> Channel {
    signed(unsigned_channel(port))
}

/// A channel to a service on a loopback `port`, connecting on first use, not signing.
pub fn unsigned_channel(port: u16) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("url")
        .connect_lazy()
}

/// The demo plant of docs/demo-plant.md, as erp-sync's file adapter reads it.
pub fn demo_plant_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/demo/plant.json")
}

pub fn demo_plant() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(demo_plant_path()).expect("demo plant")).expect("json")
}

/// `message` sent as `caller` (identity in the metadata, as the gateway sends it).
pub fn with_caller<T>(message: T, caller: crate::identity::Caller) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    caller.write_to(req.metadata_mut());
    req
}

/// The services a server lists through gRPC reflection, asked in the protocol's `v1alpha`
/// version (grpcurl 1.8 and other older clients) or in `v1`.
pub async fn reflection_services(
    channel: tonic::transport::Channel,
    v1alpha: bool,
) -> Result<Vec<String>, tonic::Status> {
    macro_rules! list {
        ($v:ident) => {{
            use tonic_reflection::pb::$v::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut stream = ServerReflectionClient::new(channel)
                .server_reflection_info(tokio_stream::iter(vec![req]))
                .await?
                .into_inner();
            match stream.message().await?.and_then(|r| r.message_response) {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    Ok(list.service.into_iter().map(|s| s.name).collect())
                }
                other => Err(tonic::Status::internal(format!(
                    "not a list of services: {other:?}"
                ))),
            }
        }};
    }
    if v1alpha { list!(v1alpha) } else { list!(v1) }
}

/// Counts the SQL statements sqlx executes while it is the default subscriber of the current
/// thread (sqlx reports each as a `sqlx::query` event): how many statements a piece of work
/// costs, without any PostgreSQL extension. Run the work on a current-thread runtime.
#[derive(Clone, Default)]
pub struct StatementCounter(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl StatementCounter {
    /// Starts counting on this thread until the guard is dropped.
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        use tracing_subscriber::layer::SubscriberExt as _;
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }

    /// Statements counted so far.
    pub fn count(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for StatementCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() == "sqlx::query" {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
