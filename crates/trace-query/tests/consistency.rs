//! Tests that try to make trace-query answer from a state it should have left behind: a cache
//! store racing a projection commit, a replica that dies before its cache deletions, a hash of
//! genealogy depths whose TTL keeps growing, and a feed event this build cannot read.

mod support;

use std::time::{Duration, Instant};

use fred::interfaces::ClientLike;
use mes_proto::v1 as pb;
use pb::Direction::Forward;
use prost::Message;
use support::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use trace_query::cache::{Lookup, Slot};
use trace_query::stats::Query;

/// The consume that links STEEL-L1 to FRAME-L2 (after `frame_l2_from_steel_l2`).
fn steel_l1_into_frame_l2() -> pb::Scan {
    with_lot(
        scan(pb::ScanKind::Consume, "WO-2000", 0, "ST-10"),
        "STEEL-L1",
        "5",
    )
}

fn reaches_frame_l2(g: &pb::Genealogy) -> bool {
    g.nodes.iter().any(|n| n.lot == "FRAME-L2")
}

type Reader =
    tokio::task::JoinHandle<Result<fred::bytes::Bytes, std::sync::Arc<trace_query::error::Error>>>;

/// A reader of STEEL-L1's forward trace (depth 20) that has read the database and waits before
/// it stores its answer, until the returned sender fires.
async fn paused_reader(app: &TraceQueryApp) -> (Reader, tokio::sync::oneshot::Sender<()>) {
    let cache = app.state.cache.clone();
    let lookup = Lookup {
        query: Query::GenealogyForward,
        slot: Slot::Field {
            key: cache.key("g:f:STEEL-L1"),
            field: "20".into(),
        },
        negative: Some(cache.key("nf:lot:STEEL-L1")),
        filter_lot: Some("STEEL-L1".into()),
        flight: "g:f:20:STEEL-L1".into(),
        what: "lot STEEL-L1".into(),
    };
    let (loaded_tx, loaded) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let pool = app.state.pool.clone();
    let reader = tokio::spawn(async move {
        cache
            .fetch(lookup, move || async move {
                let g = trace_query::store::queries::genealogy(
                    &pool,
                    "STEEL-L1",
                    trace_query::domain::Direction::Forward,
                    20,
                )
                .await?;
                let _ = loaded_tx.send(());
                let _ = released.await;
                Ok(g.map(|g| g.encode_to_vec()))
            })
            .await
    });
    loaded.await.expect("the reader read the database");
    // (Another depth: the same one would wait for this very reader, single-flight.)
    let old = app.genealogy("STEEL-L1", Forward, 19).await.expect("trace");
    assert!(!reaches_frame_l2(&old), "the edge is new");
    (reader, release)
}

/// Lets `reader` store what it read, then checks the cache does not serve that old answer.
async fn release_and_check(
    app: &TraceQueryApp,
    reader: Reader,
    release: tokio::sync::oneshot::Sender<()>,
) {
    release.send(()).expect("reader waits");
    let _ = reader.await.expect("reader");
    let g = app.genealogy("STEEL-L1", Forward, 20).await.expect("trace");
    assert!(
        reaches_frame_l2(&g),
        "the cache serves the answer read before the commit"
    );
}

/// A reader that asked the database before a projection commit and stores its answer after
/// that commit's deletions (both of them) must not leave the old answer cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_that_straddles_a_commit_never_stores_its_old_answer() {
    let env = TestEnv::new().await;
    let app = env.spawn_trace_query(TqOptions::default()).await;
    env.typical_run().await;
    env.frame_l2_from_steel_l2().await;
    env.settled(&app).await;

    let (reader, release) = paused_reader(&app).await;
    // A batch commits a new edge and runs both deletions before the reader stores.
    env.submit(vec![steel_l1_into_frame_l2()]).await;
    env.settled(&app).await;
    release_and_check(&app, reader, release).await;
    app.stop().await;
    env.stop().await;
}

/// The same race when the key's version was lost meanwhile (it expired, or Redis restarted
/// empty): the next invalidation must not recreate the very version the reader saw (a counter
/// starting again at 1 would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_version_is_never_recreated_with_the_value_a_reader_saw() {
    let env = TestEnv::new().await;
    let app = env.spawn_trace_query(TqOptions::default()).await;
    env.typical_run().await;
    env.frame_l2_from_steel_l2().await;
    env.settled(&app).await;
    let redis =
        mes_common::cache::Redis::connect("redis://127.0.0.1:6379", "", Duration::from_millis(500))
            .await
            .expect("redis");
    let version = app.state.cache.key("ver:g:f:STEEL-L1");
    let set = |v: Option<&'static str>| {
        let (client, version) = (redis.client().clone(), version.clone());
        async move {
            match v {
                Some(v) => {
                    client
                        .custom::<fred::types::Value, _>(fred::cmd!("SET"), vec![version, v.into()])
                        .await
                }
                None => {
                    client
                        .custom::<fred::types::Value, _>(fred::cmd!("DEL"), vec![version])
                        .await
                }
            }
        }
    };
    // One invalidation long ago: the reader sees its version...
    set(Some("1")).await.expect("version");
    let (reader, release) = paused_reader(&app).await;
    // ...which then expires, before a batch commits a new edge.
    set(None).await.expect("version expires");
    env.submit(vec![steel_l1_into_frame_l2()]).await;
    env.settled(&app).await;
    release_and_check(&app, reader, release).await;
    redis.quit().await;
    app.stop().await;
    env.stop().await;
}

/// A replica commits a batch while Redis does not answer, so its deletions fail, and it dies
/// before Redis comes back. Another replica must not serve the answer that batch made stale
/// (for a TTL): the deletions owed are in the database, and replayed within the stated bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_owed_by_a_replica_that_died_are_replayed_by_another() {
    let env = TestEnv::new().await;
    // The first replica reaches Redis through a proxy the test can cut.
    let redis = mes_common::testing::proxy::Proxy::start("127.0.0.1:6379").await;
    let redis_url = "redis://127.0.0.1:6379";
    let first = env
        .spawn_trace_query(TqOptions {
            redis_url: Some(format!("redis://127.0.0.1:{}", redis.port)),
            redis_timeout_ms: Some(300),
            ..TqOptions::default()
        })
        .await;
    env.typical_run().await;
    env.frame_l2_from_steel_l2().await;
    env.settled(&first).await;
    // Cached, and served from the cache.
    assert!(!reaches_frame_l2(
        &first.genealogy("STEEL-L1", Forward, 0).await.unwrap()
    ));
    let key = first.state.cache.key("g:f:STEEL-L1");
    assert!(
        wait_for(Duration::from_secs(5), || async {
            redis_keys(redis_url, &key).await == 1
        })
        .await,
        "the forward trace is cached"
    );

    // Cut, not frozen: a frozen Redis would still run the buffered deletions when it thaws.
    redis.cut();
    env.submit(vec![steel_l1_into_frame_l2()]).await;
    env.caught_up(&first).await;
    assert!(
        wait_for(Duration::from_secs(5), || async {
            !first.state.cache.redis_available()
        })
        .await,
        "the failed deletion closes the cache"
    );
    first.stop().await;

    let second = env.spawn_trace_query(TqOptions::default()).await;
    let started = Instant::now();
    loop {
        let g = second
            .genealogy("STEEL-L1", Forward, 0)
            .await
            .expect("trace");
        if reaches_frame_l2(&g) {
            break;
        }
        assert!(
            started.elapsed() < trace_query::cache::STALENESS_BOUND,
            "still serving the stale trace after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.stop().await;
    env.stop().await;
}

/// Storing one more depth of a lot's genealogy must not extend the TTL of the depths already
/// cached in the same hash (they would outlive their TTL as long as someone asks new depths).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_depth_does_not_extend_the_ttl_of_the_cached_ones() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_trace_query(TqOptions {
            ttl_jitter_percent: Some(0),
            prewarm: Some(false),
            ..TqOptions::default()
        })
        .await;
    env.typical_run().await;
    env.settled(&app).await;
    let redis =
        mes_common::cache::Redis::connect("redis://127.0.0.1:6379", "", Duration::from_millis(500))
            .await
            .expect("redis");
    let key = app.state.cache.key("g:f:STEEL-L1");
    let pttl = || async {
        redis
            .client()
            .custom::<i64, _>(fred::cmd!("PTTL"), vec![key.clone()])
            .await
            .expect("pttl")
    };
    app.genealogy("STEEL-L1", Forward, 1).await.unwrap();
    let first = pttl().await;
    assert!(first > 0, "cached with a TTL ({first})");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.genealogy("STEEL-L1", Forward, 2).await.unwrap();
    let after = pttl().await;
    assert!(
        after <= first - 1000,
        "the second depth extended the hash's TTL: {first} ms, then {after} ms"
    );
    redis.quit().await;
    app.stop().await;
    env.stop().await;
}

async fn feed_health(app: &TraceQueryApp) -> ServingStatus {
    HealthClient::new(app.channel())
        .check(HealthCheckRequest {
            service: trace_query::FEED_HEALTH.into(),
        })
        .await
        .map(|r| r.into_inner().status())
        .unwrap_or(ServingStatus::Unknown)
}

/// A newer scan-ingest (rolling upgrade) writes an event kind this trace-query does not know.
/// The projection must not skip it and move on: it stops in front of it, says so, and goes on
/// only when an operator records the position in `feed_skips`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_this_build_cannot_read_stops_the_projection_until_skipped() {
    let env = TestEnv::new().await;
    let app = env.spawn_trace_query(TqOptions::default()).await;
    env.caught_up(&app).await;

    // An event of a kind added later: its payload is a oneof field this build does not know.
    let future = pb::Event {
        kind: "lot.split".into(),
        occurred_at: Some(prost_types::Timestamp {
            seconds: chrono::Utc::now().timestamp(),
            nanos: 0,
        }),
        ..Default::default()
    };
    let mut payload = future.encode_to_vec();
    payload.extend([0xfa, 0x01, 0x02, 0x08, 0x01]); // field 31, length 2: {1: 1}
    sqlx::query("INSERT INTO event_log (kind, payload) VALUES ('lot.split', $1)")
        .bind(payload)
        .execute(env.si_pool())
        .await
        .expect("newer event");
    let unknown_at = env.feed_head().await;
    env.demo_step_1().await;
    let head = env.feed_head().await;
    assert!(head > unknown_at);

    assert!(
        wait_for(Duration::from_secs(10), || async {
            app.state.projection.stalled().is_some()
        })
        .await,
        "the projection reports the event it cannot apply"
    );
    let stop = app.state.projection.stalled().unwrap();
    assert_eq!(
        (stop.position, stop.kind.as_str()),
        (unknown_at, "lot.split")
    );
    assert_eq!(
        app.state.projection.position().await.unwrap(),
        unknown_at - 1,
        "the cursor stays in front of the event"
    );
    assert!(
        wait_for(Duration::from_secs(5), || async {
            feed_health(&app).await == ServingStatus::NotServing
        })
        .await,
        "health shows the stalled feed"
    );
    // Nothing after it was applied either.
    assert_eq!(
        app.genealogy("FRAME-L1", pb::Direction::Backward, 0)
            .await
            .expect_err("not applied")
            .code(),
        tonic::Code::NotFound
    );

    sqlx::query(
        "INSERT INTO feed_skips (consumer, position, reason) VALUES ('trace-query', $1, 'test: an event from the future')",
    )
    .bind(unknown_at)
    .execute(&app.state.pool)
    .await
    .unwrap();
    env.caught_up(&app).await;
    // (The stall is cleared just after the batch's commit, which `caught_up` sees.)
    assert!(
        wait_for(Duration::from_secs(5), || async {
            app.state.projection.stalled().is_none()
        })
        .await,
        "the stall is cleared once the projection passed the event"
    );
    assert!(
        wait_for(Duration::from_secs(5), || async {
            feed_health(&app).await == ServingStatus::Serving
        })
        .await
    );
    let skipped: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT skipped_at FROM feed_skips WHERE position = $1")
            .bind(unknown_at)
            .fetch_one(&app.state.pool)
            .await
            .unwrap();
    assert!(skipped.is_some(), "the skip is recorded as used");
    let g = app
        .genealogy("FRAME-L1", pb::Direction::Backward, 0)
        .await
        .expect("applied after the skip");
    assert!(g.nodes.iter().any(|n| n.lot == "STEEL-L1"));
    app.stop().await;
    env.stop().await;
}

/// Two replicas of one read model: one projects the feed (it holds the projection lease), the
/// other only serves reads; when the leader stops, the other takes the lease and projects
/// what came meanwhile, each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_projects_and_another_takes_over_when_it_stops() {
    let env = TestEnv::new().await;
    let first = env.spawn_trace_query(TqOptions::default()).await;
    assert!(
        wait_for(Duration::from_secs(5), || async {
            first.state.projection.leading()
        })
        .await,
        "the only replica takes the lease"
    );
    let second = env.spawn_trace_query(TqOptions::default()).await;
    env.typical_run().await;
    env.caught_up(&first).await;
    // Several of its lease retries later, the second replica still does not project.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(
        !second.state.projection.leading(),
        "two replicas project the feed at once"
    );
    // It serves reads from the read model the leader keeps.
    let g = second
        .genealogy("STEEL-L1", Forward, 0)
        .await
        .expect("the follower answers");
    assert!(!g.nodes.is_empty());

    first.stop().await;
    assert!(
        wait_for(Duration::from_secs(5), || async {
            second.state.projection.leading()
        })
        .await,
        "nobody took over the projection"
    );
    env.frame_l2_from_steel_l2().await;
    env.submit(vec![steel_l1_into_frame_l2()]).await;
    env.caught_up(&second).await;
    assert!(reaches_frame_l2(
        &second.genealogy("STEEL-L1", Forward, 0).await.unwrap()
    ));
}
