//! Clean-up guards for tests (feature `testing`): each test gets its own databases and Redis
//! key prefix, and these remove them when the test ends, also when it fails or panics. The
//! work runs on a thread with a runtime of its own, because `Drop` may run inside the test's
//! runtime (or after it is gone).

use std::time::Duration;

/// Drops the database of `url` when dropped.
pub struct DbGuard {
    pub url: String,
}

impl Drop for DbGuard {
    fn drop(&mut self) {
        let url = self.url.clone();
        on_own_runtime(async move {
            if let Err(e) = crate::db::drop_database(&url).await {
                eprintln!("cannot drop test database {url}: {e:#}");
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

/// A channel to a service on a loopback `port`, connecting on first use.
pub fn lazy_channel(port: u16) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("url")
        .connect_lazy()
}

/// The demo plant of DEMO.md, as erp-sync's file adapter reads it.
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
