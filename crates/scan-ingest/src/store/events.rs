//! Appending to the event log inside the writer's transaction.

use mes_proto::v1 as pb;
use prost::Message;
use sqlx::{Postgres, Transaction};

/// Appends `events` (their `position` is assigned later by the sequencer).
pub async fn append(
    tx: &mut Transaction<'_, Postgres>,
    events: &[pb::Event],
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let kinds: Vec<String> = events.iter().map(|e| e.kind.clone()).collect();
    let payloads: Vec<Vec<u8>> = events.iter().map(|e| e.encode_to_vec()).collect();
    let traceparents: Vec<String> = events.iter().map(|e| e.traceparent.clone()).collect();
    sqlx::query(
        "INSERT INTO event_log (kind, payload, traceparent)
         SELECT * FROM UNNEST($1::text[], $2::bytea[], $3::text[])",
    )
    .bind(&kinds)
    .bind(&payloads)
    .bind(&traceparents)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A new event stamped with now and the current trace context.
pub fn event(kind: &str, payload: pb::event::Payload) -> pb::Event {
    pb::Event {
        position: 0,
        kind: kind.to_owned(),
        occurred_at: Some(crate::store::timestamp(chrono::Utc::now())),
        traceparent: mes_common::propagation::current_traceparent(),
        // Set by the feed when it sends the event.
        head_position: 0,
        payload: Some(payload),
    }
}
