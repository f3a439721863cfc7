//! The bench plant: connections to the services, scans, the seeded write lanes and genealogy
//! chain, the generated plant of the scale runs, and scratch databases.

use std::time::{Duration, Instant};

use anyhow::ensure;
use mes_common::identity::CallerKey;
use mes_e2e::System;
use mes_proto::v1 as pb;
use mes_proto::v1::master_data_client::MasterDataClient;
use mes_proto::v1::scan_ingest_client::ScanIngestClient;
use sqlx::Connection;
use tonic::transport::Channel;

use crate::Settings;

/// A channel whose calls carry the trace context and are signed with the system's internal
/// key, as the services' own clients do.
pub type Signed = mes_common::grpc::Signed<Channel>;

pub async fn connect(sys: &System, service: &str) -> anyhow::Result<Signed> {
    let url = format!("http://127.0.0.1:{}", sys.grpc[service]);
    let channel = Channel::from_shared(url)?.connect().await?;
    Ok(mes_common::grpc::signed(
        channel,
        CallerKey::from_config(&sys.internal_key),
    ))
}

/// Genealogy levels seeded for the small read runs: `BM-0` (received) → … → `BM-LEVELS`.
pub const LEVELS: usize = 4;

fn now() -> Option<prost_types::Timestamp> {
    let n = chrono::Utc::now();
    Some(prost_types::Timestamp {
        seconds: n.timestamp(),
        nanos: n.timestamp_subsec_nanos() as i32,
    })
}

pub fn scan(kind: pb::ScanKind, wo: &str, station: &str) -> pb::Scan {
    pb::Scan {
        scan_id: uuid::Uuid::new_v4().to_string(),
        kind: kind as i32,
        work_order: wo.into(),
        operation: 10,
        station: station.into(),
        scanned_at: now(),
        ..Default::default()
    }
}

pub fn with_lot(mut s: pb::Scan, lot: &str, quantity: &str) -> pb::Scan {
    s.lot = lot.into();
    s.quantity = quantity.into();
    s
}

pub fn with_role<T>(msg: T, role: &'static str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "x-mes-user",
        tonic::metadata::MetadataValue::from_static("bench"),
    );
    r.metadata_mut().insert(
        "x-mes-roles",
        tonic::metadata::MetadataValue::from_static(role),
    );
    r
}

async fn submit(si: &mut ScanIngestClient<Signed>, scans: Vec<pb::Scan>) -> anyhow::Result<()> {
    let results = si
        .submit_scans(with_role(pb::SubmitScansRequest { scans }, "operator"))
        .await?
        .into_inner()
        .results;
    for r in results {
        ensure!(
            r.status == pb::ScanStatus::Accepted as i32,
            "seed scan refused: {r:?}"
        );
    }
    Ok(())
}

pub fn wo_write(i: usize) -> String {
    format!("BENCH-WO-{i}")
}
pub fn raw_lot(i: usize) -> String {
    format!("BENCH-RAW-{i}")
}
pub fn station(i: usize) -> String {
    format!("BENCH-ST-{i}")
}

/// The bench plant: materials `BM-0..=BM-LEVELS`, one work order, station and huge raw lot per
/// write lane (`lanes`: enough for one per client), and a genealogy chain `BENCH-G-0` → … →
/// `BENCH-G-LEVELS` for the small read runs. Returns the chain's top lot.
pub async fn seed(sys: &System, lanes: usize) -> anyhow::Result<String> {
    let channel = connect(sys, "scan-ingest").await?;
    let mut md = MasterDataClient::new(channel.clone());
    let mut si = ScanIngestClient::new(channel);
    md.upsert_materials(pb::UpsertMaterialsRequest {
        items: (0..=LEVELS)
            .map(|l| pb::Material {
                number: format!("BM-{l}"),
                description: format!("bench material level {l}"),
                tracking: "lot".into(),
                unit: "pcs".into(),
            })
            .collect(),
    })
    .await?;
    md.upsert_stations(pb::UpsertStationsRequest {
        items: (0..lanes.max(LEVELS + 1))
            .map(|i| pb::Station {
                id: station(i),
                name: format!("bench station {i}"),
            })
            .collect(),
    })
    .await?;
    let mut lots: Vec<pb::ReceivedLot> = (0..lanes)
        .map(|i| pb::ReceivedLot {
            lot: raw_lot(i),
            material: "BM-0".into(),
            quantity: "1000000000".into(),
            supplier: "Bench Supplier".into(),
            supplier_lot: format!("BS-{i}"),
            received_at: None,
        })
        .collect();
    lots.push(pb::ReceivedLot {
        lot: "BENCH-G-0".into(),
        material: "BM-0".into(),
        quantity: "10".into(),
        supplier: "Bench Supplier".into(),
        supplier_lot: "BS-G".into(),
        received_at: None,
    });
    md.upsert_received_lots(pb::UpsertReceivedLotsRequest { items: lots })
        .await?;
    let order = |number: String, material: &str, component: &str, st: String| pb::WorkOrderSpec {
        number,
        material: material.into(),
        planned_quantity: "1000000000".into(),
        status: "released".into(),
        operations: vec![pb::OperationSpec {
            step: 10,
            station: st,
            description: "bench".into(),
        }],
        components: vec![pb::Component {
            material: component.into(),
            quantity_per_unit: "1".into(),
        }],
    };
    let mut wos: Vec<pb::WorkOrderSpec> = (0..lanes)
        .map(|i| order(wo_write(i), "BM-1", "BM-0", station(i)))
        .collect();
    for l in 1..=LEVELS {
        wos.push(order(
            format!("BENCH-GWO-{l}"),
            &format!("BM-{l}"),
            &format!("BM-{}", l - 1),
            station(l),
        ));
    }
    md.upsert_work_orders(pb::UpsertWorkOrdersRequest { items: wos })
        .await?;

    for i in 0..lanes {
        submit(
            &mut si,
            vec![scan(
                pb::ScanKind::StartOperation,
                &wo_write(i),
                &station(i),
            )],
        )
        .await?;
    }
    for l in 1..=LEVELS {
        let wo = format!("BENCH-GWO-{l}");
        let st = station(l);
        let mut produce = with_lot(
            scan(pb::ScanKind::Produce, &wo, &st),
            &format!("BENCH-G-{l}"),
            "1",
        );
        produce.material = format!("BM-{l}");
        submit(
            &mut si,
            vec![
                scan(pb::ScanKind::StartOperation, &wo, &st),
                with_lot(
                    scan(pb::ScanKind::Consume, &wo, &st),
                    &format!("BENCH-G-{}", l - 1),
                    "1",
                ),
                produce,
            ],
        )
        .await?;
    }
    Ok(format!("BENCH-G-{LEVELS}"))
}

/// The generated plant of the scale runs (depth 5, fan-in 4: a top-level lot's backward
/// genealogy has 1,365 nodes once every level holds at least 1,024 lots).
pub fn scale_plan(s: &Settings) -> mes_datagen::Plan {
    mes_datagen::Plan {
        lots: s.lots,
        depth: 5,
        fan_in: 4,
        extra_scans: 0,
        ..Default::default()
    }
}

/// A trace-query database holding the generated plant, loaded in bulk before the service
/// starts on it (so its membership filter is built from it at start).
pub async fn scale_read_model(s: &Settings) -> anyhow::Result<String> {
    let url = scratch_database(
        "postgres://postgres@127.0.0.1:5432/postgres",
        "mes_bench_tq",
    )
    .await?;
    let pool =
        mes_common::db::prepare(&url, 4, &trace_query::MIGRATOR, Duration::from_secs(30)).await?;
    let started = Instant::now();
    let mut quiet = |_: u64, _: u64| {};
    let plan = scale_plan(s);
    let items = mes_datagen::load_bulk(&pool, &plan, "mes-datagen", &mut quiet).await?;
    pool.close().await;
    println!(
        "generated plant: {} lots, depth {}, fan-in {} ({items} rows in {:.0} s)",
        plan.lots,
        plan.depth,
        plan.fan_in,
        started.elapsed().as_secs_f64()
    );
    Ok(url)
}

pub async fn scratch_database(base_url: &str, prefix: &str) -> anyhow::Result<String> {
    let name = format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let admin_url = replace_database(base_url, "postgres");
    let mut conn = sqlx::PgConnection::connect(&admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(replace_database(base_url, &name))
}

pub async fn drop_scratch(url: &str) {
    let name = url.rsplit('/').next().unwrap_or_default().to_owned();
    if let Ok(mut conn) = sqlx::PgConnection::connect(&replace_database(url, "postgres")).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}

fn replace_database(url: &str, db: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => url.to_owned(),
    }
}
