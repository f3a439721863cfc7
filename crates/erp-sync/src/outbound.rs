//! Outbound, first half: follows scan-ingest's event feed from the cursor stored in erp-sync's
//! database (the services' one feed consumer, [`mes_common::feed`], with its backoff, batch
//! span, metrics and stall alarm) and turns completed operations into confirmations in the
//! outbox, and voids of scans already confirmed into reversals — in the same transaction as the
//! cursor, so each event takes effect exactly once. Before following the feed, each new leader
//! queues as follow-ups the late production an older build left unreported below the cursor
//! ([`outbound::queue_stranded_follow_ups`]).
//!
//! An event this build cannot read and that may carry production (an unknown kind from a newer
//! scan-ingest, a `scan.accepted` without its scan, a production scan with an unreadable id,
//! quantity or scan kind, a `scan.voided` without a scan id) stops the consumer in front of it
//! ([`Fact::Unreadable`], see [`crate::store::outbound`]): an error log naming its position,
//! kind and reason, `event_feed_stalled{consumer}` 1 and `event_feed_stalled_position{consumer}`,
//! the gRPC health service [`crate::FEED_HEALTH`] NOT_SERVING; the consumer retries with
//! backoff and passes only once erp-sync is upgraded or the position is recorded in
//! `feed_skips` (the same procedure as trace-query's). Known events without effect here
//! (holds, master data, other scan kinds) pass.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use mes_common::Shutdown;
use mes_common::feed::{self, Batch, Failure, Outcome};
use mes_proto::v1 as pb;
use mes_proto::v1::event::Payload;
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::domain::{Completion, ProductionKind, ProductionLine};
use crate::mes::{self, Mes};
use crate::store::outbound::{self, Fact, FeedEvent};

/// Events applied in one transaction at most.
const BATCH: usize = 200;

fn unreadable(reason: impl Into<String>) -> Fact {
    Fact::Unreadable {
        reason: reason.into(),
    }
}

/// What an event of the feed means for erp-sync.
pub fn fact_of(event: &pb::Event) -> Fact {
    match &event.payload {
        // prost decodes a oneof variant this build does not know as no payload at all.
        None => unreadable("unknown event kind (is scan-ingest newer than this erp-sync?)"),
        Some(Payload::ScanAccepted(pb::ScanAccepted { scan: Some(stored) })) => scan_fact(stored),
        Some(Payload::ScanAccepted(pb::ScanAccepted { scan: None })) => {
            unreadable("scan.accepted without its scan")
        }
        Some(Payload::ScanVoided(v)) => {
            // The voided scan: the original's id, else the one the void scan names.
            let original = v
                .original
                .as_ref()
                .and_then(|o| o.scan.as_ref())
                .and_then(|s| Uuid::parse_str(&s.scan_id).ok())
                .or_else(|| {
                    v.void_scan
                        .as_ref()
                        .and_then(|s| Uuid::parse_str(&s.voids).ok())
                });
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
                None => unreadable("scan.voided without a readable id of the voided scan"),
            }
        }
        Some(
            Payload::LotStatusChanged(_)
            | Payload::Material(_)
            | Payload::Station(_)
            | Payload::LotReceived(_)
            | Payload::WorkOrder(_),
        ) => Fact::Other,
    }
}

fn time(ts: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let ts = ts?;
    DateTime::<Utc>::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

fn scan_fact(stored: &pb::StoredScan) -> Fact {
    let Some(scan) = &stored.scan else {
        return unreadable("scan.accepted without its scan");
    };
    if scan.work_order.is_empty() {
        return Fact::Other;
    }
    let Ok(scan_kind) = pb::ScanKind::try_from(scan.kind) else {
        // A scan kind added by a newer scan-ingest may book production.
        return unreadable(format!(
            "unknown scan kind {} (is scan-ingest newer than this erp-sync?)",
            scan.kind
        ));
    };
    let kind = match scan_kind {
        pb::ScanKind::Produce => ProductionKind::Produce,
        pb::ScanKind::Consume => ProductionKind::Consume,
        pb::ScanKind::Scrap => ProductionKind::Scrap,
        pb::ScanKind::CompleteOperation => {
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
        // No quantity for the ERP.
        pb::ScanKind::Unspecified
        | pb::ScanKind::StartOperation
        | pb::ScanKind::Move
        | pb::ScanKind::Inspect
        | pb::ScanKind::Void => return Fact::Other,
    };
    let (Ok(scan_id), Ok(quantity)) = (
        Uuid::parse_str(&scan.scan_id),
        scan.quantity.parse::<Decimal>(),
    ) else {
        return unreadable(format!(
            "production scan with an unreadable id {:?} or quantity {:?}",
            scan.scan_id, scan.quantity
        ));
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

/// Follows the feed until `stop` ([`feed::Consumer::follow`]: reconnects with backoff from the
/// stored cursor when the stream breaks). `queued` is woken when confirmations were queued.
/// Every batch is applied under the scheduler's lease `token`; once another replica took the
/// lease, the consumer stops.
pub async fn follow(pool: PgPool, mes: Mes, queued: Arc<Notify>, token: i64, stop: Shutdown) {
    let consumer = feed::Consumer::new(feed::Settings {
        consumer: mes::CALLER.into(),
        batch: BATCH,
        retry_initial: Duration::from_millis(200),
        retry_max: Duration::from_secs(10),
    });
    let outbound = Outbound {
        pool,
        queued,
        token,
    };
    consumer.follow(&outbound, &mes, &stop).await;
}

/// erp-sync's side of the feed consumer: the outbox, under the scheduler's lease.
struct Outbound {
    pool: PgPool,
    queued: Arc<Notify>,
    token: i64,
}

/// A lost lease ends the consumer; anything else is retried.
fn failure(e: outbound::ApplyError) -> Failure {
    match e {
        outbound::ApplyError::Fenced(_) => {
            Failure::Halt(anyhow::Error::new(e).context("another replica leads the erp jobs"))
        }
        e => Failure::retry(e),
    }
}

impl feed::Apply for Outbound {
    /// Once per leadership, before following the feed: late production an older build left
    /// unreported below the cursor becomes follow-ups.
    async fn prepare(&self) -> Result<(), Failure> {
        let n = outbound::queue_stranded_follow_ups(&self.pool, mes::CALLER, self.token)
            .await
            .map_err(|e| match failure(e) {
                Failure::Retry(e) => {
                    Failure::Retry(e.context("cannot look for unreported late production"))
                }
                halt => halt,
            })?;
        if n > 0 {
            tracing::warn!(
                follow_ups = n,
                "late production left unreported by an older build queued as follow-ups"
            );
            metrics::counter!("erp_follow_ups_total").increment(n as u64);
            self.queued.notify_one();
        }
        Ok(())
    }

    async fn position(&self) -> anyhow::Result<i64> {
        Ok(outbound::feed_position(&self.pool, mes::CALLER).await?)
    }

    async fn apply(&self, batch: &Batch) -> Result<Outcome, Failure> {
        let events: Vec<FeedEvent> = batch
            .events
            .iter()
            .map(|e| FeedEvent {
                position: i64::try_from(e.position).unwrap_or(i64::MAX),
                kind: e.kind.clone(),
                traceparent: e.traceparent.clone(),
                fact: fact_of(e),
            })
            .collect();
        let applied = outbound::apply(&self.pool, mes::CALLER, self.token, &events)
            .await
            .map_err(failure)?;
        metrics::gauge!("erp_feed_position").set(applied.position as f64);
        if applied.reversals > 0 {
            metrics::counter!("erp_reversals_total").increment(applied.reversals as u64);
        }
        if applied.follow_ups > 0 {
            metrics::counter!("erp_follow_ups_total").increment(applied.follow_ups as u64);
        }
        if applied.confirmations > 0 || applied.reversals > 0 || applied.follow_ups > 0 {
            self.queued.notify_one();
        }
        Ok(Outcome {
            position: applied.position,
            stopped: applied.stopped.map(|s| feed::Stop {
                position: s.position,
                kind: s.kind,
                reason: s.reason,
            }),
        })
    }
}

impl feed::Source for Mes {
    async fn subscribe(&self, after: u64) -> Result<feed::Events, tonic::Status> {
        Ok(Mes::subscribe(self, after).await?.boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(payload: Option<Payload>) -> pb::Event {
        pb::Event {
            position: 7,
            kind: "scan.accepted".into(),
            payload,
            ..Default::default()
        }
    }

    fn accepted(kind: i32, scan_id: &str, quantity: &str) -> pb::Event {
        event(Some(Payload::ScanAccepted(pb::ScanAccepted {
            scan: Some(pb::StoredScan {
                scan: Some(pb::Scan {
                    scan_id: scan_id.into(),
                    kind,
                    work_order: "WO-1000".into(),
                    operation: 10,
                    station: "ST-10".into(),
                    lot: "FRAME-L1".into(),
                    quantity: quantity.into(),
                    ..Default::default()
                }),
                operator: "op1".into(),
                ..Default::default()
            }),
        })))
    }

    fn is_unreadable(fact: &Fact) -> bool {
        matches!(fact, Fact::Unreadable { .. })
    }

    #[test]
    fn events_that_may_carry_production_but_cannot_be_read_are_unreadable() {
        let id = Uuid::new_v4().to_string();
        // A kind from a newer scan-ingest: prost leaves the payload empty.
        assert!(is_unreadable(&fact_of(&event(None))));
        // A scan.accepted without its scan, or without the scan inside.
        assert!(is_unreadable(&fact_of(&event(Some(
            Payload::ScanAccepted(pb::ScanAccepted { scan: None })
        )))));
        assert!(is_unreadable(&fact_of(&event(Some(
            Payload::ScanAccepted(pb::ScanAccepted {
                scan: Some(pb::StoredScan::default())
            })
        )))));
        // Production scans with an unreadable id or quantity.
        let produce = pb::ScanKind::Produce as i32;
        assert!(is_unreadable(&fact_of(&accepted(produce, "nope", "10"))));
        assert!(is_unreadable(&fact_of(&accepted(produce, &id, "ten"))));
        assert!(is_unreadable(&fact_of(&accepted(
            pb::ScanKind::Scrap as i32,
            &id,
            ""
        ))));
        // A scan kind from a newer scan-ingest.
        assert!(is_unreadable(&fact_of(&accepted(99, &id, "10"))));
        // A void naming no readable scan.
        assert!(is_unreadable(&fact_of(&event(Some(Payload::ScanVoided(
            pb::ScanVoided {
                void_scan: Some(pb::StoredScan {
                    voids: "not-a-uuid".into(),
                    ..Default::default()
                }),
                original: None,
            }
        ))))));
        assert!(is_unreadable(&fact_of(&event(Some(Payload::ScanVoided(
            pb::ScanVoided::default()
        ))))));
    }

    #[test]
    fn known_events_without_effect_here_pass_and_production_is_read() {
        let id = Uuid::new_v4().to_string();
        for payload in [
            Payload::LotStatusChanged(pb::LotStatusChanged {
                lot: "FRAME-L1".into(),
                status: "on_hold".into(),
                ..Default::default()
            }),
            Payload::Material(Default::default()),
            Payload::Station(Default::default()),
            Payload::LotReceived(Default::default()),
            Payload::WorkOrder(Default::default()),
        ] {
            assert_eq!(fact_of(&event(Some(payload))), Fact::Other);
        }
        for kind in [pb::ScanKind::StartOperation, pb::ScanKind::Move] {
            assert_eq!(fact_of(&accepted(kind as i32, &id, "")), Fact::Other);
        }
        assert!(matches!(
            fact_of(&accepted(pb::ScanKind::Produce as i32, &id, "10")),
            Fact::Production { line, .. } if line.quantity == Decimal::TEN
        ));
        assert!(matches!(
            fact_of(&accepted(pb::ScanKind::CompleteOperation as i32, &id, "")),
            Fact::Completed(_)
        ));
        // A void of a readable scan, by the void scan's `voids` when the original is missing.
        let void = event(Some(Payload::ScanVoided(pb::ScanVoided {
            void_scan: Some(pb::StoredScan {
                voids: id.clone(),
                ..Default::default()
            }),
            original: None,
        })));
        assert!(matches!(
            fact_of(&void),
            Fact::Voided { original, .. } if original.to_string() == id
        ));
    }
}
