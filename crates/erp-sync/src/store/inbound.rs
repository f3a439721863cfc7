//! Inbound bookkeeping: cursors, pull runs, dead letters, contract drift.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};

use crate::domain::Entity;

/// Created / updated / unchanged / rejected records.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub created: u32,
    pub updated: u32,
    pub unchanged: u32,
    /// Dead-lettered (by the contract check or by the MES).
    pub rejected: u32,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.created += other.created;
        self.updated += other.updated;
        self.unchanged += other.unchanged;
        self.rejected += other.rejected;
    }

    /// Records the MES created or changed.
    pub fn upserted(&self) -> u32 {
        self.created + self.updated
    }
}

pub async fn cursor(pool: &PgPool, entity: Entity) -> Result<Option<String>, sqlx::Error> {
    Ok(
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT cursor FROM sync_cursors WHERE entity = $1",
        )
        .bind(entity.as_str())
        .fetch_optional(pool)
        .await?
        .flatten(),
    )
}

/// Records a successful pull of `entity`.
pub async fn save_cursor(
    pool: &PgPool,
    entity: Entity,
    cursor: Option<&str>,
    counts: Counts,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sync_cursors (entity, cursor, last_pull_at, created, updated, unchanged, rejected)
         VALUES ($1, $2, now(), $3, $4, $5, $6)
         ON CONFLICT (entity) DO UPDATE SET cursor = EXCLUDED.cursor, last_pull_at = now(),
             created = EXCLUDED.created, updated = EXCLUDED.updated,
             unchanged = EXCLUDED.unchanged, rejected = EXCLUDED.rejected",
    )
    .bind(entity.as_str())
    .bind(cursor)
    .bind(i64::from(counts.created))
    .bind(i64::from(counts.updated))
    .bind(i64::from(counts.unchanged))
    .bind(i64::from(counts.rejected))
    .execute(pool)
    .await?;
    Ok(())
}

/// Entity → time of its last successful pull.
pub async fn last_pulls(pool: &PgPool) -> Result<BTreeMap<String, DateTime<Utc>>, sqlx::Error> {
    let rows = sqlx::query("SELECT entity, last_pull_at FROM sync_cursors")
        .fetch_all(pool)
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get("entity"), r.get("last_pull_at")))
        .collect())
}

pub async fn start_run(pool: &PgPool, instance: &str, trigger: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("INSERT INTO pull_runs (instance, trigger) VALUES ($1, $2) RETURNING id")
        .bind(instance)
        .bind(trigger)
        .fetch_one(pool)
        .await
}

pub async fn finish_run(
    pool: &PgPool,
    id: i64,
    counts: Counts,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE pull_runs SET finished_at = now(), status = $2, created = $3, updated = $4,
             unchanged = $5, rejected = $6, error = $7
         WHERE id = $1",
    )
    .bind(id)
    .bind(if error.is_some() {
        "failed"
    } else {
        "succeeded"
    })
    .bind(counts.created as i32)
    .bind(counts.updated as i32)
    .bind(counts.unchanged as i32)
    .bind(counts.rejected as i32)
    .bind(error.unwrap_or_default())
    .execute(pool)
    .await?;
    Ok(())
}

/// Stores a record that could not be used (once per distinct payload; later sightings count).
pub async fn dead_letter<'e>(
    exec: impl sqlx::PgExecutor<'e>,
    entity: &str,
    record_key: &str,
    kind: &str,
    reason: &str,
    payload: &Value,
) -> Result<(), sqlx::Error> {
    let canonical = payload.to_string();
    let hash: String = Sha256::digest(canonical.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    sqlx::query(
        "INSERT INTO dead_letters (entity, record_key, kind, reason, payload, payload_hash)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (entity, record_key, payload_hash) DO UPDATE SET
             occurrences = dead_letters.occurrences + 1, last_seen_at = now(),
             kind = EXCLUDED.kind, reason = EXCLUDED.reason,
             resolved_at = NULL, resolved_by = ''",
    )
    .bind(entity)
    .bind(record_key)
    .bind(kind)
    .bind(reason)
    .bind(payload)
    .bind(hash)
    .execute(exec)
    .await?;
    Ok(())
}

/// Unresolved dead letters (replayed ones are kept as history, resolved).
pub async fn dead_letter_count(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE resolved_at IS NULL")
        .fetch_one(pool)
        .await
}

/// An unresolved dead letter, to replay.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: i64,
    pub entity: String,
    pub record_key: String,
    pub payload: Value,
}

/// Unresolved dead letters, oldest first: all of them, or those of `ids`.
pub async fn unresolved_dead_letters(
    pool: &PgPool,
    ids: Option<&[i64]>,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, entity, record_key, payload FROM dead_letters
         WHERE resolved_at IS NULL AND ($1::bigint[] IS NULL OR id = ANY($1))
         ORDER BY id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| DeadLetter {
            id: r.get("id"),
            entity: r.get("entity"),
            record_key: r.get("record_key"),
            payload: r.get("payload"),
        })
        .collect())
}

/// Marks a dead letter resolved by a replay (kept, not deleted).
pub async fn resolve_dead_letter(pool: &PgPool, id: i64, by: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE dead_letters SET resolved_at = now(), resolved_by = $2
         WHERE id = $1 AND resolved_at IS NULL",
    )
    .bind(id)
    .bind(by)
    .execute(pool)
    .await?;
    Ok(())
}

/// A replay failed again: the dead letter stays, with this attempt's reason.
pub async fn note_replay_failure(pool: &PgPool, id: i64, reason: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE dead_letters SET reason = $2, last_seen_at = now() WHERE id = $1")
        .bind(id)
        .bind(reason)
        .execute(pool)
        .await?;
    Ok(())
}

/// Notes one departure from the contract.
pub async fn note_drift(
    pool: &PgPool,
    entity: &str,
    kind: &str,
    field: &str,
    sample_key: &str,
    message: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO contract_drift (entity, kind, field, sample_key, message) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (entity, kind, field) DO UPDATE SET occurrences = contract_drift.occurrences + 1,
             last_seen_at = now(), sample_key = EXCLUDED.sample_key, message = EXCLUDED.message",
    )
    .bind(entity)
    .bind(kind)
    .bind(field)
    .bind(sample_key)
    .bind(message)
    .execute(pool)
    .await?;
    Ok(())
}
