//! The read loads: backward genealogies through trace-query's gRPC API and through the
//! gateway's REST API, cached (the same lot again and again) and cold (each request a lot
//! nobody asked before).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use mes_e2e::System;
use mes_proto::v1 as pb;
use mes_proto::v1::trace_query_client::TraceQueryClient;

use crate::Settings;
use crate::measure::{Figures, drive};
use crate::plant::{Signed, connect, scale_plan, with_role};
use crate::write::Transport;

async fn genealogy(
    tq: &mut TraceQueryClient<Signed>,
    lot: &str,
) -> Result<pb::Genealogy, tonic::Status> {
    let r = with_role(
        pb::GenealogyRequest {
            lot: lot.into(),
            direction: pb::Direction::Backward as i32,
            max_depth: 0,
        },
        "quality",
    );
    tq.get_genealogy(r).await.map(|r| r.into_inner())
}

/// A quality engineer's REST session.
#[derive(Clone)]
pub struct Rest {
    http: reqwest::Client,
    token: String,
    base: String,
}

impl Rest {
    pub async fn login(sys: &System, s: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(s.clients)
                .build()?,
            token: sys.token("qa1", None).await,
            base: sys.gateway.clone(),
        })
    }

    fn request(&self, lot: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!(
                "{}/api/v1/lots/{lot}/genealogy?direction=backward",
                self.base
            ))
            .bearer_auth(&self.token)
    }
}

/// The size of one answer: protobuf bytes (gRPC) and JSON bytes (REST), and its nodes.
#[derive(Clone, Copy)]
pub struct Answer {
    pub proto_bytes: usize,
    pub json_bytes: usize,
    pub nodes: usize,
}

/// Waits until trace-query shows `lot`'s genealogy with at least `nodes` nodes; returns its
/// sizes (and has put it in the cache).
pub async fn settle(sys: &System, rest: &Rest, lot: &str, nodes: usize) -> anyhow::Result<Answer> {
    let mut tq = TraceQueryClient::new(connect(sys, "trace-query").await?);
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        match genealogy(&mut tq, lot).await {
            Ok(g) if g.nodes.len() >= nodes => break g,
            _ if Instant::now() > deadline => bail!("trace-query never showed {lot}'s genealogy"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let r = rest.request(lot).send().await?;
    let status = r.status();
    let body = r.bytes().await?;
    if !status.is_success() {
        bail!("GET genealogy of {lot}: {status}");
    }
    Ok(Answer {
        proto_bytes: prost::Message::encoded_len(&answer),
        json_bytes: body.len(),
        nodes: answer.nodes.len(),
    })
}

/// The same lot's genealogy again and again.
pub async fn cached(
    sys: &System,
    s: &Settings,
    rest: &Rest,
    label: &str,
    transport: Transport,
    lot: &str,
) -> anyhow::Result<Figures> {
    let lot = lot.to_owned();
    Ok(match transport {
        Transport::Grpc => {
            let channel = connect(sys, "trace-query").await?;
            drive(label, s.clients, s.seconds, move |_, _| {
                let mut tq = TraceQueryClient::new(channel.clone());
                let lot = lot.clone();
                async move {
                    genealogy(&mut tq, &lot)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
            })
            .await
        }
        Transport::Rest => {
            let rest = Arc::new(rest.clone());
            drive(label, s.clients, s.seconds, move |_, _| {
                let req = rest.request(&lot);
                async move { fetch(req).await.map(drop) }
            })
            .await
        }
    })
}

async fn fetch(req: reqwest::RequestBuilder) -> Result<usize, String> {
    let r = req.send().await.map_err(|e| e.to_string())?;
    let status = r.status();
    let body = r.bytes().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(body.len())
    } else {
        Err(format!("{status}"))
    }
}

/// Cold backward genealogies of the generated plant's top level, from its lot `first` on:
/// every request asks a lot nobody asked before. Returns the figures and the mean answer size
/// (nodes for gRPC, bytes for REST).
pub async fn cold(
    sys: &System,
    s: &Settings,
    rest: &Rest,
    label: &str,
    transport: Transport,
    first: u64,
) -> anyhow::Result<(Figures, f64)> {
    let plan = Arc::new(scale_plan(s));
    let top = plan.level_size(plan.depth).max(1);
    let next = Arc::new(AtomicU64::new(first));
    let total = Arc::new(AtomicU64::new(0));
    let (p, t) = (plan.clone(), total.clone());
    let channel = connect(sys, "trace-query").await?;
    let http = Arc::new(rest.clone());
    let f = drive(label, s.clients, s.seconds, move |_, _| {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let lot = p.lot_name(p.depth, i % top);
        let t = t.clone();
        let mut tq = TraceQueryClient::new(channel.clone());
        let req = http.request(&lot);
        async move {
            let size = match transport {
                Transport::Grpc => {
                    let g = genealogy(&mut tq, &lot).await.map_err(|e| e.to_string())?;
                    if g.nodes.len() < 2 {
                        return Err(format!("{lot}: {} nodes", g.nodes.len()));
                    }
                    g.nodes.len()
                }
                Transport::Rest => fetch(req).await?,
            };
            t.fetch_add(size as u64, Ordering::Relaxed);
            Ok(())
        }
    })
    .await;
    if f.ops + f.errors > top - first.min(top) {
        println!(
            "  (the {label} run asked more lots than it had fresh: later requests were cached)"
        );
    }
    let mean = total.load(Ordering::Relaxed) as f64 / f.ops.max(1) as f64;
    Ok((f, mean))
}
