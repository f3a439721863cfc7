//! The write loads (one scan or a 20-scan batch per request, over gRPC or REST, on as many
//! lanes — work order + lot + station — as asked) and the feed lag they cause: the time from a
//! scan's acknowledgement to trace-query having applied it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use mes_e2e::System;
use mes_proto::v1 as pb;
use mes_proto::v1::scan_ingest_client::ScanIngestClient;
use sqlx::{Connection, Row};
use uuid::Uuid;

use crate::Settings;
use crate::measure::{Figures, drive};
use crate::plant::{connect, raw_lot, scan, station, with_lot, with_role, wo_write};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Rest,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Grpc => "gRPC",
            Transport::Rest => "REST",
        }
    }
}

/// Scans acknowledged as accepted, with when the client saw the answer.
pub type Acked = Arc<Mutex<Vec<(Uuid, Instant)>>>;

/// `clients` tablets, client `c` on lane `c % lanes`, each request `batch` consume scans of
/// quantity 1.
pub async fn write(
    sys: &System,
    s: &Settings,
    label: &str,
    transport: Transport,
    lanes: usize,
    batch: usize,
    acked: Acked,
) -> anyhow::Result<Figures> {
    match transport {
        Transport::Grpc => write_grpc(sys, s, label, lanes, batch, acked).await,
        Transport::Rest => write_rest(sys, s, label, lanes, batch, acked).await,
    }
}

async fn write_grpc(
    sys: &System,
    s: &Settings,
    label: &str,
    lanes: usize,
    batch: usize,
    acked: Acked,
) -> anyhow::Result<Figures> {
    let channel = connect(sys, "scan-ingest").await?;
    Ok(drive(label, s.clients, s.seconds, move |c, _| {
        let mut si = ScanIngestClient::new(channel.clone());
        let acked = acked.clone();
        let i = c % lanes;
        async move {
            let scans: Vec<pb::Scan> = (0..batch)
                .map(|_| {
                    with_lot(
                        scan(pb::ScanKind::Consume, &wo_write(i), &station(i)),
                        &raw_lot(i),
                        "1",
                    )
                })
                .collect();
            let ids: Vec<Uuid> = scans
                .iter()
                .filter_map(|s| s.scan_id.parse().ok())
                .collect();
            let r = si
                .submit_scans(with_role(pb::SubmitScansRequest { scans }, "operator"))
                .await
                .map_err(|e| e.to_string())?;
            let results = &r.get_ref().results;
            if results.len() != batch
                || results
                    .iter()
                    .any(|r| r.status != pb::ScanStatus::Accepted as i32)
            {
                return Err(format!("{:?}", results.first()));
            }
            record(&acked, &ids);
            Ok(())
        }
    })
    .await)
}

async fn write_rest(
    sys: &System,
    s: &Settings,
    label: &str,
    lanes: usize,
    batch: usize,
    acked: Acked,
) -> anyhow::Result<Figures> {
    // Operators must scan from a device enrolled at their station; supervisors may scan anywhere.
    let token = sys.token("sup1", None).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(s.clients)
        .build()?;
    let url = format!("{}/api/v1/scans", sys.gateway);
    Ok(drive(label, s.clients, s.seconds, move |c, _| {
        let i = c % lanes;
        let ids: Vec<Uuid> = (0..batch).map(|_| Uuid::new_v4()).collect();
        let scans: Vec<serde_json::Value> = ids
            .iter()
            .map(|id| {
                serde_json::json!({
                    "scan_id": id.to_string(),
                    "kind": "consume",
                    "work_order": wo_write(i),
                    "operation": 10,
                    "station": station(i),
                    "lot": raw_lot(i),
                    "quantity": "1",
                    "scanned_at": chrono::Utc::now().to_rfc3339(),
                })
            })
            .collect();
        let req = http
            .post(&url)
            .bearer_auth(&token)
            .json(&serde_json::json!({ "scans": scans }));
        let acked = acked.clone();
        async move {
            let r = req.send().await.map_err(|e| e.to_string())?;
            let status = r.status();
            let body: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
            let results = body["results"].as_array().map_or(&[][..], Vec::as_slice);
            if status.is_success()
                && results.len() == batch
                && results.iter().all(|r| r["status"] == "accepted")
            {
                record(&acked, &ids);
                Ok(())
            } else {
                Err(format!(
                    "{status}: {}",
                    body.to_string().chars().take(300).collect::<String>()
                ))
            }
        }
    })
    .await)
}

fn record(acked: &Acked, ids: &[Uuid]) {
    let at = Instant::now();
    if let Ok(mut a) = acked.lock() {
        a.extend(ids.iter().map(|id| (*id, at)));
    }
}

/// Feed lag of one write run: acknowledgement → applied in trace-query's read model.
#[derive(Clone, Copy, Default)]
pub struct Lag {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Acknowledged scans measured.
    pub scans: usize,
    /// Acknowledged scans trace-query had not applied when the watch gave up.
    pub missing: usize,
}

/// How often trace-query's feed cursor is read: the resolution of the lag figures.
pub const CURSOR_POLL: Duration = Duration::from_millis(5);

/// Follows trace-query's feed cursor during a write run. Every acknowledged scan's position
/// is looked up in trace-query's `scans` afterwards; its lag is the time of the first cursor
/// reading at or past that position minus the time its acknowledgement arrived (readings every
/// [`CURSOR_POLL`], each stamped when its answer arrived: an upper bound within one poll).
pub struct FeedWatch {
    tq_url: String,
    pub acked: Acked,
    stop: Arc<AtomicBool>,
    sampler: tokio::task::JoinHandle<anyhow::Result<Vec<(Instant, i64)>>>,
}

impl FeedWatch {
    pub async fn start(tq_url: &str) -> anyhow::Result<Self> {
        let mut conn = sqlx::PgConnection::connect(tq_url).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let sampler = tokio::spawn(async move {
            let mut readings = Vec::new();
            let mut tick = tokio::time::interval(CURSOR_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                let p: Option<i64> = sqlx::query_scalar(
                    "SELECT position FROM feed_cursor WHERE consumer = 'trace-query'",
                )
                .fetch_optional(&mut conn)
                .await?;
                readings.push((Instant::now(), p.unwrap_or(0)));
            }
            conn.close().await?;
            Ok(readings)
        });
        Ok(Self {
            tq_url: tq_url.to_owned(),
            acked: Arc::default(),
            stop,
            sampler,
        })
    }

    /// Waits (at most `patience`) until trace-query has applied every acknowledged scan, then
    /// computes the lags.
    pub async fn finish(self, patience: Duration) -> anyhow::Result<Lag> {
        let acked: Vec<(Uuid, Instant)> = self
            .acked
            .lock()
            .map(|mut a| std::mem::take(&mut *a))
            .unwrap_or_default();
        let mut waiting: Vec<Uuid> = acked.iter().map(|(id, _)| *id).collect();
        let mut conn = sqlx::PgConnection::connect(&self.tq_url).await?;
        let deadline = Instant::now() + patience;
        // Each poll asks only for the scans not seen yet, so waiting for the catch-up adds
        // little work to the database whose CPU this window measures.
        let mut positions: std::collections::HashMap<Uuid, i64> =
            std::collections::HashMap::with_capacity(waiting.len());
        loop {
            let rows = sqlx::query("SELECT scan_id, position FROM scans WHERE scan_id = ANY($1)")
                .persistent(false)
                .bind(&waiting)
                .fetch_all(&mut conn)
                .await?;
            for r in rows {
                positions.insert(r.get("scan_id"), r.get("position"));
            }
            waiting.retain(|id| !positions.contains_key(id));
            if waiting.is_empty() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        conn.close().await?;
        // One more reading after the last scan was seen applied.
        tokio::time::sleep(CURSOR_POLL * 2).await;
        self.stop.store(true, Ordering::Relaxed);
        let readings = self.sampler.await.context("feed cursor sampler")??;
        let mut lags_us: Vec<u64> = acked
            .iter()
            .filter_map(|(id, at)| {
                let p = positions.get(id)?;
                let i = readings.partition_point(|(_, pos)| pos < p);
                let (seen, _) = readings.get(i)?;
                Some(seen.saturating_duration_since(*at).as_micros() as u64)
            })
            .collect();
        lags_us.sort_unstable();
        let pick = |q: f64| {
            if lags_us.is_empty() {
                f64::NAN
            } else {
                lags_us[((lags_us.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0
            }
        };
        Ok(Lag {
            p50_ms: pick(0.5),
            p99_ms: pick(0.99),
            max_ms: pick(1.0),
            scans: lags_us.len(),
            missing: acked.len() - lags_us.len(),
        })
    }
}
