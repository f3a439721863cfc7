//! Reconciliation reports.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use crate::domain::Difference;

/// A stored reconciliation.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub at: DateTime<Utc>,
    pub differences: Vec<Difference>,
}

pub async fn insert(
    pool: &PgPool,
    trigger: &str,
    instance: &str,
    differences: &[Difference],
) -> Result<Report, sqlx::Error> {
    let details = serde_json::to_value(differences).map_err(|e| sqlx::Error::Encode(e.into()))?;
    let at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO reconciliations (trigger, instance, differences, details)
         VALUES ($1, $2, $3, $4) RETURNING at",
    )
    .bind(trigger)
    .bind(instance)
    .bind(i32::try_from(differences.len()).unwrap_or(i32::MAX))
    .bind(details)
    .fetch_one(pool)
    .await?;
    Ok(Report {
        at,
        differences: differences.to_vec(),
    })
}

pub async fn latest(pool: &PgPool) -> Result<Option<Report>, sqlx::Error> {
    let row = sqlx::query("SELECT at, details FROM reconciliations ORDER BY id DESC LIMIT 1")
        .fetch_optional(pool)
        .await?;
    Ok(row.map(|r| Report {
        at: r.get("at"),
        differences: serde_json::from_value(r.get("details")).unwrap_or_default(),
    }))
}
