//! The ledger check: every lot's on-hand must equal the sum of its effects (received quantity,
//! produced, consumed, scrapped, voids), and every work order's counters the sum of its scans.
//! Mismatches are exported as `ledger_mismatches{kind}` and logged.

use std::time::Duration;

use rust_decimal::Decimal;
use sqlx::{PgPool, Row};

#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub kind: &'static str,
    pub key: String,
    pub recorded: Decimal,
    pub expected: Decimal,
}

/// Runs the check once.
pub async fn check(pool: &PgPool) -> Result<Vec<Mismatch>, sqlx::Error> {
    // Effect of each active scan on its lot; a void cancels its original's effect.
    let lots = sqlx::query(
        "WITH effects AS (
             SELECT s.lot, CASE s.kind WHEN 'produce' THEN s.quantity
                                       WHEN 'consume' THEN -s.quantity
                                       WHEN 'scrap' THEN -s.quantity ELSE 0 END AS delta
             FROM scans s
             WHERE s.kind IN ('produce', 'consume', 'scrap')
               AND NOT EXISTS (SELECT 1 FROM scans v WHERE v.voids = s.scan_id))
         SELECT l.lot, l.quantity_on_hand AS recorded,
                l.initial_quantity + COALESCE((SELECT sum(delta) FROM effects e WHERE e.lot = l.lot), 0) AS expected
         FROM lots l
         WHERE l.quantity_on_hand <> l.initial_quantity + COALESCE((SELECT sum(delta) FROM effects e WHERE e.lot = l.lot), 0)",
    )
    .fetch_all(pool)
    .await?;
    let wos = sqlx::query(
        "WITH active AS (
             SELECT s.* FROM scans s WHERE s.kind IN ('produce', 'scrap')
               AND NOT EXISTS (SELECT 1 FROM scans v WHERE v.voids = s.scan_id)),
         sums AS (
             SELECT w.number, w.produced_quantity, w.scrap_quantity,
                    COALESCE((SELECT sum(quantity) FROM active a WHERE a.work_order = w.number AND a.kind = 'produce'), 0) AS produced,
                    COALESCE((SELECT sum(quantity) FROM active a WHERE a.work_order = w.number AND a.kind = 'scrap'), 0) AS scrapped
             FROM work_orders w)
         SELECT number, produced_quantity, scrap_quantity, produced, scrapped FROM sums
         WHERE produced_quantity <> produced OR scrap_quantity <> scrapped",
    )
    .fetch_all(pool)
    .await?;
    let mut out: Vec<Mismatch> = lots
        .iter()
        .map(|r| Mismatch {
            kind: "lot",
            key: r.get("lot"),
            recorded: r.get("recorded"),
            expected: r.get("expected"),
        })
        .collect();
    for r in &wos {
        let key: String = r.get("number");
        let (p, ps): (Decimal, Decimal) = (r.get("produced_quantity"), r.get("produced"));
        if p != ps {
            out.push(Mismatch {
                kind: "work_order_produced",
                key: key.clone(),
                recorded: p,
                expected: ps,
            });
        }
        let (s, ss): (Decimal, Decimal) = (r.get("scrap_quantity"), r.get("scrapped"));
        if s != ss {
            out.push(Mismatch {
                kind: "work_order_scrap",
                key,
                recorded: s,
                expected: ss,
            });
        }
    }
    Ok(out)
}

/// Runs [`check`] and publishes the figures.
pub async fn check_and_report(pool: &PgPool) -> Result<Vec<Mismatch>, sqlx::Error> {
    let found = check(pool).await?;
    for kind in ["lot", "work_order_produced", "work_order_scrap"] {
        let n = found.iter().filter(|m| m.kind == kind).count();
        metrics::gauge!("ledger_mismatches", "kind" => kind).set(n as f64);
    }
    for m in &found {
        tracing::error!(kind = m.kind, key = %m.key, recorded = %m.recorded, expected = %m.expected, "ledger mismatch");
    }
    Ok(found)
}

/// The gRPC health service name under which the ledger check reports: SERVING while the last
/// check found no mismatch, NOT_SERVING otherwise (the service itself keeps serving).
pub const HEALTH_NAME: &str = "ledger";

pub async fn run_periodically(
    pool: PgPool,
    every: Duration,
    reporter: tonic_health::server::HealthReporter,
    shutdown: mes_common::Shutdown,
) {
    loop {
        match check_and_report(&pool).await {
            Ok(found) => {
                let status = if found.is_empty() {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status(HEALTH_NAME, status).await;
            }
            Err(e) => tracing::warn!(error = %e, "ledger check failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return,
        }
    }
}
