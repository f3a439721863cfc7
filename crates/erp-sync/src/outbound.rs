//! Outbound, first half: follows scan-ingest's event feed from the cursor stored in erp-sync's
//! database and turns completed operations into confirmations in the outbox, and voids of
//! scans already confirmed into reversals — in the same transaction as the cursor, so each
//! event takes effect exactly once.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use mes_common::Shutdown;
use mes_proto::v1 as pb;
use mes_proto::v1::event::Payload;
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::Instrument;
use uuid::Uuid;

use crate::domain::{Completion, ProductionKind, ProductionLine};
use crate::mes::{self, Mes};
use crate::store::outbound::{self, Fact, FeedEvent};

/// Events applied in one transaction at most.
const BATCH: usize = 200;

/// What an event of the feed means for erp-sync.
pub fn fact_of(event: &pb::Event) -> Fact {
    match &event.payload {
        Some(Payload::ScanAccepted(pb::ScanAccepted { scan: Some(stored) })) => scan_fact(stored),
        Some(Payload::ScanVoided(v)) => {
            let original = v
                .original
                .as_ref()
                .and_then(|o| o.scan.as_ref())
                .map(|s| s.scan_id.as_str())
                .or_else(|| v.void_scan.as_ref().map(|s| s.voids.as_str()))
                .and_then(|id| Uuid::parse_str(id).ok());
            match original {
                Some(original) => {
                    let void = v.void_scan.as_ref();
                    let void_scan = void.and_then(|s| s.scan.as_ref());
                    Fact::Voided {
                        original,
                        void_scan: void_scan.map(|s| s.scan_id.clone()).unwrap_or_default(),
                        voided_by: void.map(|s| s.operator.clone()).unwrap_or_default(),
                        reason: void.map(|s| s.reason.clone()).unwrap_or_default(),
                        voided_at: void_scan
                            .and_then(|s| time(s.scanned_at.as_ref()))
                            .or_else(|| void.and_then(|s| time(s.received_at.as_ref())))
                            .or_else(|| time(event.occurred_at.as_ref()))
                            .unwrap_or_else(Utc::now),
                    }
                }
                None => {
                    tracing::warn!(
                        position = event.position,
                        "scan.voided event without a scan id"
                    );
                    Fact::Other
                }
            }
        }
        _ => Fact::Other,
    }
}

fn time(ts: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let ts = ts?;
    DateTime::<Utc>::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

fn scan_fact(stored: &pb::StoredScan) -> Fact {
    let Some(scan) = &stored.scan else {
        return Fact::Other;
    };
    if scan.work_order.is_empty() {
        return Fact::Other;
    }
    let kind = match pb::ScanKind::try_from(scan.kind) {
        Ok(pb::ScanKind::Produce) => ProductionKind::Produce,
        Ok(pb::ScanKind::Consume) => ProductionKind::Consume,
        Ok(pb::ScanKind::Scrap) => ProductionKind::Scrap,
        Ok(pb::ScanKind::CompleteOperation) => {
            return Fact::Completed(Completion {
                work_order: scan.work_order.clone(),
                operation: scan.operation,
                station: scan.station.clone(),
                completed_at: time(scan.scanned_at.as_ref())
                    .or_else(|| time(stored.received_at.as_ref()))
                    .unwrap_or_else(Utc::now),
                completed_by: stored.operator.clone(),
                scan_id: scan.scan_id.clone(),
            });
        }
        _ => return Fact::Other,
    };
    let (Ok(scan_id), Ok(quantity)) = (
        Uuid::parse_str(&scan.scan_id),
        scan.quantity.parse::<Decimal>(),
    ) else {
        tracing::warn!(scan_id = %scan.scan_id, quantity = %scan.quantity,
            "production scan with an unreadable id or quantity; not confirmed");
        return Fact::Other;
    };
    if quantity <= Decimal::ZERO {
        return Fact::Other;
    }
    Fact::Production {
        scan_id,
        work_order: scan.work_order.clone(),
        operation: i32::try_from(scan.operation).unwrap_or(0),
        station: scan.station.clone(),
        line: ProductionLine {
            kind,
            lot: scan.lot.clone(),
            material: if stored.material.is_empty() {
                scan.material.clone()
            } else {
                stored.material.clone()
            },
            quantity,
        },
        operator: stored.operator.clone(),
        scanned_at: time(scan.scanned_at.as_ref())
            .or_else(|| time(stored.received_at.as_ref()))
            .unwrap_or_else(Utc::now),
    }
}

/// Follows the feed until `stop`; reconnects with backoff (from the stored cursor) when the
/// stream breaks. `queued` is woken when confirmations were queued.
/// Every batch is applied under the scheduler's lease `token`; once another replica took the
/// lease, the consumer stops.
pub async fn follow(pool: PgPool, mes: Mes, queued: Arc<Notify>, token: i64, stop: Shutdown) {
    let mut failures = 0u32;
    loop {
        match follow_once(&pool, &mes, &queued, token, &stop).await {
            Ok(()) if stop.is_triggered() => return,
            Err(e)
                if matches!(
                    e.downcast_ref::<outbound::ApplyError>(),
                    Some(outbound::ApplyError::Fenced(_))
                ) =>
            {
                tracing::error!(error = %format!("{e:#}"), "another replica leads the erp jobs; the feed consumer stops");
                return;
            }
            Ok(()) => {
                tracing::info!("event feed ended; resubscribing");
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %format!("{e:#}"), failures, "event feed consumer failed");
            }
        }
        let delay = crate::breaker::backoff(
            failures.max(1),
            Duration::from_millis(200),
            Duration::from_secs(10),
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait() => return,
        }
    }
}

async fn follow_once(
    pool: &PgPool,
    mes: &Mes,
    queued: &Notify,
    token: i64,
    stop: &Shutdown,
) -> anyhow::Result<()> {
    let after = outbound::feed_position(pool, mes::CALLER).await?;
    let mut stream = mes.subscribe(u64::try_from(after).unwrap_or(0)).await?;
    tracing::info!(after, "following the event feed");
    loop {
        let first = tokio::select! {
            m = stream.message() => m?,
            _ = stop.wait() => return Ok(()),
        };
        let Some(first) = first else { return Ok(()) };
        let mut batch = vec![first];
        let mut broken = None;
        while batch.len() < BATCH {
            match stream.message().now_or_never() {
                Some(Ok(Some(e))) => batch.push(e),
                Some(Err(status)) => {
                    broken = Some(status);
                    break;
                }
                Some(Ok(None)) | None => break,
            }
        }
        let events: Vec<FeedEvent> = batch
            .iter()
            .map(|e| FeedEvent {
                position: i64::try_from(e.position).unwrap_or(i64::MAX),
                traceparent: e.traceparent.clone(),
                fact: fact_of(e),
            })
            .collect();
        let span = tracing::info_span!("feed.apply", events = events.len());
        if let Some(tp) = batch
            .iter()
            .rev()
            .map(|e| &e.traceparent)
            .find(|t| !t.is_empty())
        {
            mes_common::propagation::set_parent(
                &span,
                mes_common::propagation::context_from_traceparent(tp),
            );
        }
        let applied = outbound::apply(pool, mes::CALLER, token, &events)
            .instrument(span)
            .await?;
        metrics::gauge!("erp_feed_position").set(applied.position as f64);
        if applied.reversals > 0 {
            metrics::counter!("erp_reversals_total").increment(applied.reversals as u64);
        }
        if applied.follow_ups > 0 {
            metrics::counter!("erp_follow_ups_total").increment(applied.follow_ups as u64);
        }
        if applied.confirmations > 0 || applied.reversals > 0 || applied.follow_ups > 0 {
            queued.notify_one();
        }
        if let Some(status) = broken {
            return Err(status.into());
        }
    }
}
