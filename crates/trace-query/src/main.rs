//! `trace-query` serves the read model; `trace-query rebuild` empties it and resets the feed
//! cursor, so the (running or next) service replays scan-ingest's feed from position 0.

use std::time::Duration;

use trace_query::{Application, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => {}
        Some("rebuild") => return rebuild(settings).await,
        Some(other) => {
            anyhow::bail!("unknown command {other:?}; usage: trace-query [serve|rebuild]")
        }
    }
    let telemetry = mes_common::telemetry::init("trace-query", &settings.service)?;
    let app = Application::build(settings).await?;
    let result = app
        .run_until_stopped(mes_common::Shutdown::on_signals())
        .await;
    telemetry.shutdown().await;
    result
}

async fn rebuild(settings: Settings) -> anyhow::Result<()> {
    let s = &settings.service;
    let pool = mes_common::db::prepare(
        &s.database_url,
        2,
        &trace_query::MIGRATOR,
        Duration::from_secs(30),
    )
    .await?;
    trace_query::store::apply::reset(&pool, &settings.feed_consumer).await?;
    let redis =
        mes_common::cache::Redis::connect(&s.redis_url, &s.redis_prefix, Duration::from_secs(2))
            .await?;
    let cache = trace_query::cache::QueryCache::new(
        redis.clone(),
        pool.clone(),
        Default::default(),
        std::sync::Arc::new(settings.clone()),
    );
    let purged = cache.purge_answers().await;
    redis.quit().await;
    println!(
        "read model emptied, feed cursor of {:?} at 0 (running instances replay the feed within \
         seconds){}",
        settings.feed_consumer,
        if purged {
            "; cached answers purged"
        } else {
            "; redis unavailable: cached answers expire with their TTL"
        }
    );
    Ok(())
}
