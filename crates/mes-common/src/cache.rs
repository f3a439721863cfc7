//! The Redis client (fred). Cache failures never block a request: commands time out quickly
//! and fail fast while disconnected, and the client reconnects in the background.

use std::time::Duration;

use fred::prelude::*;

/// A Redis client with the service's key prefix.
#[derive(Clone)]
pub struct Redis {
    client: Client,
    prefix: String,
}

impl Redis {
    /// Connects in the background; returns at once even when Redis is down (waits up to
    /// `initial_wait` for the first connection so a healthy start is ready immediately).
    pub async fn connect(url: &str, prefix: &str, initial_wait: Duration) -> anyhow::Result<Self> {
        let mut config = Config::from_url(url).map_err(|e| {
            anyhow::anyhow!("invalid redis url {}: {e}", crate::config::redact_url(url))
        })?;
        config.fail_fast = true;
        let client = Builder::from_config(config)
            .with_performance_config(|p| p.default_command_timeout = Duration::from_millis(500))
            .with_connection_config(|c| {
                // Small pipelined commands from many tasks share one connection: without
                // TCP_NODELAY, Nagle's algorithm holds them back until the delayed ACK (~40 ms).
                c.tcp = TcpConfig {
                    nodelay: Some(true),
                    ..Default::default()
                };
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
                c.max_command_attempts = 1;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .build()?;
        client.connect();
        let error = match tokio::time::timeout(initial_wait, client.wait_for_connect()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "no connection within {} ms",
                initial_wait.as_millis()
            )),
        };
        if let Some(error) = error {
            tracing::warn!(
                redis = %crate::config::redact_url(url),
                error,
                "redis not reachable yet; continuing without it and reconnecting"
            );
        }
        Ok(Self {
            client,
            prefix: prefix.to_owned(),
        })
    }

    /// The key `k` under this service's prefix.
    pub fn key(&self, k: &str) -> String {
        format!("{}{}", self.prefix, k)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Deletes every key under this client's prefix (SCAN and UNLINK, page by page); returns
    /// how many went. For tests, and for retiring a tenant that shared a Redis. An empty prefix
    /// is refused: it would mean the whole database.
    pub async fn delete_prefixed(&self) -> anyhow::Result<u64> {
        anyhow::ensure!(
            !self.prefix.is_empty(),
            "refusing to delete every key of the database"
        );
        let mut pattern = String::with_capacity(self.prefix.len() + 1);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        let mut cursor = "0".to_owned();
        let mut deleted = 0u64;
        loop {
            let (next, keys): (String, Vec<String>) = self
                .client
                .scan_page(cursor.as_str(), pattern.as_str(), Some(500), None)
                .await?;
            if !keys.is_empty() {
                deleted += self.client.unlink::<u64, _>(keys).await?;
            }
            if next == "0" {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// PING round-trip time.
    pub async fn ping(&self) -> anyhow::Result<Duration> {
        let start = std::time::Instant::now();
        let _: String = self.client.ping(None).await?;
        Ok(start.elapsed())
    }

    pub async fn quit(&self) {
        let _ = self.client.quit().await;
    }
}

/// A Lua script run as one `EVALSHA` command: one write and one reply on the connection, where
/// a pipeline of plain commands costs one socket write per command (the client flushes each
/// pipelined command when nothing else is queued). The script is loaded (`SCRIPT LOAD`) on its
/// first run; when Redis answers `NOSCRIPT` (it restarted or its script cache was flushed), the
/// call is made again with `EVAL`, which also puts the script back in Redis's cache.
pub struct Script {
    body: &'static str,
    /// `SCRIPT LOAD`'s answer (the script's SHA-1), once known.
    sha: std::sync::OnceLock<Value>,
}

impl Script {
    pub const fn new(body: &'static str) -> Self {
        Self {
            body,
            sha: std::sync::OnceLock::new(),
        }
    }

    /// Runs the script: `keys` are its `KEYS`, `args` its `ARGV`.
    pub async fn run<R: FromValue>(
        &self,
        client: &Client,
        keys: Vec<Value>,
        args: Vec<Value>,
    ) -> Result<R, Error> {
        let sha = match self.sha.get() {
            Some(sha) => sha.clone(),
            None => {
                let sha: String = client
                    .custom(
                        fred::cmd!("SCRIPT"),
                        vec![Value::from("LOAD"), Value::from(self.body)],
                    )
                    .await?;
                self.sha.get_or_init(|| Value::from(sha)).clone()
            }
        };
        let mut call = Vec::with_capacity(2 + keys.len() + args.len());
        call.push(sha);
        call.push(Value::Integer(keys.len() as i64));
        call.extend(keys);
        call.extend(args);
        match client.custom(fred::cmd!("EVALSHA"), call.clone()).await {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                call[0] = Value::from(self.body);
                client.custom(fred::cmd!("EVAL"), call).await
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_logged_without_its_password() {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::WARN)
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        // Nothing listens on port 1: the client logs that Redis is not reachable yet.
        let redis = Redis::connect(
            "redis://mes:redis-pw-123@127.0.0.1:1/0",
            "test:",
            Duration::from_millis(50),
        )
        .await
        .unwrap();
        redis.quit().await;
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("redis not reachable"), "{text}");
        assert!(!text.contains("redis-pw-123"), "{text}");
        assert!(text.contains("mes:***@127.0.0.1:1"), "{text}");
    }
}
