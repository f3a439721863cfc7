//! Under fire: the four real binaries under a tablet-like load over REST while their processes
//! are killed and their dependencies crash, stall and reset. Each scenario ends with a set
//! check straight from the databases (Jepsen-style): every acknowledged scan is stored exactly
//! once, inventory equals the initial quantity minus the stored consumes, and trace-query's read
//! model and erp-sync's production rows hold exactly scan-ingest's set, and the ERP booked
//! each completed operation once with the MES's quantity. No client ever sees a 500; a 503
//! always carries `Retry-After`.
//!
//! Where a crash must land at an exact spot (between scan-ingest's commit and its answer,
//! between the ERP's booking and erp-sync's record of it), the services run built with their
//! fail points (`make failpoint-bins`) and `FAILPOINTS` says where they exit.
//!
//! `make test-faults` runs these alone; `make test` runs them with the rest.

#[path = "../crates/erp-sync/tests/support/erp_double.rs"]
#[allow(dead_code)]
mod erp_double;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use erp_double::ErpDouble;
use mes_common::identity::CallerKey;
use mes_e2e::{Fault, FaultProxy, Options, PrivatePostgres, PrivateRedis, System};
use mes_proto::v1 as pb;
use mes_proto::v1::master_data_client::MasterDataClient;
use mes_proto::v1::scan_ingest_client::ScanIngestClient;
use serde_json::{Value, json};
use sqlx::Connection;
use uuid::Uuid;

/// Tablets submitting at once; each has its own work order, station and raw lot.
const TABLETS: usize = 6;
/// Each raw lot's initial quantity.
const RAW_QUANTITY: i64 = 1_000_000;
/// How long a tablet keeps retrying one scan before the scenario fails: the recovery bound.
const GIVE_UP: Duration = Duration::from_secs(60);
const JWT_SECRET: &str = "under-fire-jwt-secret-of-at-least-32-bytes";

fn wo(i: usize) -> String {
    format!("FIRE-WO-{i}")
}
/// Tablet `i`'s `k`-th work order, when tablets work through a sequence of them.
fn cycle_wo(i: usize, k: usize) -> String {
    format!("FIRE-WO-{i}-{k}")
}
/// Work orders released per tablet when tablets work through a sequence of them: 800 (a
/// tablet completes 3-4 a second in a debug build), more for a soak (`MES_FIRE_SOAK_SECONDS`).
fn cycle_work_orders() -> usize {
    let soak = std::env::var("MES_FIRE_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(0);
    800.max(soak * 10)
}
fn station(i: usize) -> String {
    format!("FIRE-ST-{i}")
}
fn raw_lot(i: usize) -> String {
    format!("FIRE-RAW-{i}")
}
fn device(i: usize) -> String {
    format!("FIRE-TAB-{i}")
}

/// Services settings for every scenario: a fixed token key (so a restarted gateway accepts the
/// tablets' tokens), no per-user rate limit in the way of six tablets of one operator.
const ENV: &[(&str, &str)] = &[
    ("MES_GATEWAY_JWT_SECRET", JWT_SECRET),
    ("MES_GATEWAY_RATE_LIMIT_PER_MINUTE_USER", "1000000"),
    ("MES_GATEWAY_RATE_LIMIT_PER_MINUTE_DEVICE", "1000000"),
];

/// What the tablets do.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// Consumes and produces on one work order each, started by the seed.
    OneOrder,
    /// A sequence of work orders each: start the operation, this many consumes and produces,
    /// complete it (so erp-sync confirms every work order to the ERP), on to the next.
    Cycle(u64),
}

/// The fire plant: a station, raw lot and enrolled tablet per tablet, and its work orders (op
/// 10): one, started, or a sequence ([`Shape::Cycle`]) that the tablet starts itself. Returns
/// each tablet's device secret.
async fn seed(sys: &System, shape: Shape) -> anyhow::Result<Vec<String>> {
    let url = format!("http://127.0.0.1:{}", sys.grpc["scan-ingest"]);
    let channel = tonic::transport::Channel::from_shared(url)?
        .connect()
        .await?;
    let channel = mes_common::grpc::signed(channel, CallerKey::from_config(&sys.internal_key));
    let mut md = MasterDataClient::new(channel.clone());
    md.upsert_materials(pb::UpsertMaterialsRequest {
        items: ["FIRE-RAW", "FIRE-OUT"]
            .iter()
            .map(|m| pb::Material {
                number: (*m).into(),
                description: format!("fault suite {m}"),
                tracking: "lot".into(),
                unit: "pcs".into(),
            })
            .collect(),
    })
    .await?;
    md.upsert_stations(pb::UpsertStationsRequest {
        items: (0..TABLETS)
            .map(|i| pb::Station {
                id: station(i),
                name: format!("fire station {i}"),
            })
            .collect(),
    })
    .await?;
    md.upsert_received_lots(pb::UpsertReceivedLotsRequest {
        items: (0..TABLETS)
            .map(|i| pb::ReceivedLot {
                lot: raw_lot(i),
                material: "FIRE-RAW".into(),
                quantity: RAW_QUANTITY.to_string(),
                supplier: "Fire Supplier".into(),
                supplier_lot: format!("FS-{i}"),
                received_at: None,
            })
            .collect(),
    })
    .await?;
    let numbers: Vec<(usize, String)> = match shape {
        Shape::OneOrder => (0..TABLETS).map(|i| (i, wo(i))).collect(),
        Shape::Cycle(_) => (0..TABLETS)
            .flat_map(|i| (0..cycle_work_orders()).map(move |k| (i, cycle_wo(i, k))))
            .collect(),
    };
    for chunk in numbers.chunks(200) {
        md.upsert_work_orders(work_orders(chunk)).await?;
    }
    if let Shape::Cycle(_) = shape {
        return enrol(sys);
    }
    let mut si = ScanIngestClient::new(channel);
    for i in 0..TABLETS {
        let mut req = tonic::Request::new(pb::SubmitScansRequest {
            scans: vec![pb::Scan {
                scan_id: Uuid::new_v4().to_string(),
                kind: pb::ScanKind::StartOperation as i32,
                work_order: wo(i),
                operation: 10,
                station: station(i),
                scanned_at: Some(prost_types::Timestamp {
                    seconds: chrono::Utc::now().timestamp(),
                    nanos: 0,
                }),
                ..Default::default()
            }],
        });
        req.metadata_mut().insert(
            "x-mes-user",
            tonic::metadata::MetadataValue::from_static("op1"),
        );
        req.metadata_mut().insert(
            "x-mes-roles",
            tonic::metadata::MetadataValue::from_static("operator"),
        );
        let results = si.submit_scans(req).await?.into_inner().results;
        anyhow::ensure!(
            results
                .iter()
                .all(|r| r.status == pb::ScanStatus::Accepted as i32),
            "start refused: {results:?}"
        );
    }
    enrol(sys)
}

/// Work orders of 1,000,000,000 FIRE-OUT from FIRE-RAW, one operation at the tablet's station.
fn work_orders(numbers: &[(usize, String)]) -> pb::UpsertWorkOrdersRequest {
    pb::UpsertWorkOrdersRequest {
        items: numbers
            .iter()
            .map(|(i, number)| pb::WorkOrderSpec {
                number: number.clone(),
                material: "FIRE-OUT".into(),
                planned_quantity: "1000000000".into(),
                status: "released".into(),
                operations: vec![pb::OperationSpec {
                    step: 10,
                    station: station(*i),
                    description: "fire".into(),
                }],
                components: vec![pb::Component {
                    material: "FIRE-RAW".into(),
                    quantity_per_unit: "1".into(),
                }],
            })
            .collect(),
    }
}

/// Enrols each tablet at its station (`gateway device enrol`): the device secrets.
fn enrol(sys: &System) -> anyhow::Result<Vec<String>> {
    (0..TABLETS)
        .map(|i| {
            let out = sys.gateway_admin(&[
                "device",
                "enrol",
                "--id",
                &device(i),
                "--station",
                &station(i),
            ])?;
            out.lines()
                .find_map(|l| l.strip_prefix("device secret: "))
                .map(|s| s.trim().to_owned())
                .ok_or_else(|| anyhow::anyhow!("no device secret in {out:?}"))
        })
        .collect()
}

/// What a scan did, as its tablet knows it.
#[derive(Debug, Clone)]
struct Sent {
    kind: &'static str,
    work_order: String,
    /// Empty for starts and completions.
    lot: String,
    quantity: i64,
}

impl Sent {
    /// Whether the scan moves material (what the set checks compare).
    fn moves_material(&self) -> bool {
        matches!(self.kind, "consume" | "produce")
    }
}

/// Everything the tablets saw.
#[derive(Default)]
struct Ledger {
    /// Scans answered `accepted` or `duplicate`: durably stored, the API says.
    acked: HashMap<Uuid, (usize, Sent)>,
    /// Every answer by kind: `200 accepted`, `503`, `connection error`...
    answers: BTreeMap<String, u64>,
    /// What must never happen: a 500, a 503 without `Retry-After`, a rejected scan, a scan
    /// given up on.
    violations: Vec<String>,
    /// The longest time one scan took from its first try to its acknowledgement.
    longest_outage: Duration,
    /// The first 429/503/504 answers, whole (what an operator would read).
    refusals: Vec<String>,
    /// Lots produced: (tablet, lot, when the produce was acknowledged).
    produced: Vec<(usize, String, Instant)>,
}

impl Ledger {
    fn answer(&mut self, what: impl Into<String>) {
        *self.answers.entry(what.into()).or_default() += 1;
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
    tablets: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
    /// The faults injected, each with when (since the load started).
    faults: Vec<String>,
}

/// A load that ended: what the tablets saw, for how long, under which faults.
struct Finished {
    ledger: Ledger,
    held: Duration,
    faults: Vec<String>,
}

async fn login(http: &reqwest::Client, gateway: &str, i: usize, secret: &str) -> Option<String> {
    let r = http
        .post(format!("{gateway}/api/v1/auth/token"))
        .json(&json!({
            "username": "op1",
            "password": "demo-op1",
            "device_id": device(i),
            "device_secret": secret,
        }))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    let v: Value = r.json().await.ok()?;
    v["access_token"].as_str().map(str::to_owned)
}

/// Starts the tablets: each submits one scan at a time (a consume of 1 to 3 from its raw lot,
/// every fifth a produce of a new lot; with [`Shape::Cycle`], operations started and
/// completed around them), and retries the same scan id on 503, 504, 429 and connection
/// errors with a capped backoff, as docs/api.md tells clients to.
fn start_load(gateway: &str, secrets: &[String], shape: Shape) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let tablets = (0..TABLETS)
        .map(|i| {
            let (stop, ledger, gateway) = (stop.clone(), ledger.clone(), gateway.to_owned());
            let secret = secrets[i].clone();
            tokio::spawn(async move { tablet(i, &secret, &gateway, &stop, &ledger, shape).await })
        })
        .collect();
    Load {
        stop,
        ledger,
        tablets,
        started: Instant::now(),
        faults: Vec::new(),
    }
}

async fn tablet(
    i: usize,
    secret: &str,
    gateway: &str,
    stop: &AtomicBool,
    ledger: &Mutex<Ledger>,
    shape: Shape,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");
    let mut token = None;
    let mut n = 0u64;
    // With [`Shape::Cycle`]: the work order worked on, and its scans acknowledged so far.
    let (mut order, mut on_order) = (0usize, 0u64);
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let scan_id = Uuid::new_v4();
        let work_order = match shape {
            Shape::OneOrder => wo(i),
            Shape::Cycle(_) if order >= cycle_work_orders() => {
                ledger.lock().unwrap().violations.push(format!(
                    "tablet {i} completed all its {} work orders: release more",
                    cycle_work_orders()
                ));
                return;
            }
            Shape::Cycle(_) => cycle_wo(i, order),
        };
        let bookend = |kind| Sent {
            kind,
            work_order: work_order.clone(),
            lot: String::new(),
            quantity: 0,
        };
        let sent = match shape {
            Shape::Cycle(_) if on_order == 0 => bookend("start_operation"),
            Shape::Cycle(per_order) if on_order > per_order => bookend("complete_operation"),
            _ if n.is_multiple_of(5) => Sent {
                kind: "produce",
                work_order: work_order.clone(),
                lot: format!("FIRE-OUT-{i}-{n}"),
                quantity: 1,
            },
            _ => Sent {
                kind: "consume",
                work_order: work_order.clone(),
                lot: raw_lot(i),
                quantity: (n % 3 + 1) as i64,
            },
        };
        let mut body = json!({
            "scan_id": scan_id,
            "kind": sent.kind,
            "work_order": sent.work_order,
            "operation": 10,
            "station": station(i),
            "scanned_at": chrono::Utc::now().to_rfc3339(),
        });
        if sent.moves_material() {
            body["lot"] = sent.lot.clone().into();
            body["quantity"] = sent.quantity.to_string().into();
        }
        if sent.kind == "produce" {
            body["material"] = "FIRE-OUT".into();
        }
        let first_try = Instant::now();
        let mut backoff = Duration::from_millis(50);
        // The same scan until it is acknowledged, whatever happens (stopping waits for it).
        loop {
            if first_try.elapsed() > GIVE_UP {
                ledger.lock().unwrap().violations.push(format!(
                    "scan {scan_id} not acknowledged within {GIVE_UP:?}"
                ));
                return;
            }
            if token.is_none() {
                token = login(&http, gateway, i, secret).await;
                if token.is_none() {
                    ledger.lock().unwrap().answer("login failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            }
            let res = http
                .post(format!("{gateway}/api/v1/scans"))
                .bearer_auth(token.as_deref().unwrap_or_default())
                .json(&json!({ "scans": [body] }))
                .send()
                .await;
            let res = match res {
                Ok(res) => res,
                Err(e) => {
                    let what = if e.is_timeout() {
                        "client timeout"
                    } else {
                        "connection error"
                    };
                    ledger.lock().unwrap().answer(what);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let status = res.status().as_u16();
            let retry_after = res
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let text = res.text().await.unwrap_or_default();
            match status {
                200 => {
                    let v: Value = serde_json::from_str(&text).unwrap_or_default();
                    let result = &v["results"][0];
                    let outcome = result["status"].as_str().unwrap_or("?").to_owned();
                    let mut l = ledger.lock().unwrap();
                    l.answer(format!("200 {outcome}"));
                    if outcome == "accepted" || outcome == "duplicate" {
                        l.longest_outage = l.longest_outage.max(first_try.elapsed());
                        if sent.kind == "complete_operation" {
                            (order, on_order) = (order + 1, 0);
                        } else {
                            on_order += 1;
                        }
                        if sent.kind == "produce" {
                            l.produced.push((i, sent.lot.clone(), Instant::now()));
                        }
                        l.acked.insert(scan_id, (i, sent));
                    } else {
                        l.violations
                            .push(format!("scan {scan_id} answered {outcome}: {result}"));
                    }
                    break;
                }
                401 => {
                    ledger.lock().unwrap().answer("401");
                    token = None;
                }
                429 | 503 | 504 => {
                    {
                        let mut l = ledger.lock().unwrap();
                        l.answer(status.to_string());
                        if l.refusals.len() < 10 {
                            l.refusals.push(format!("{status}: {text}"));
                        }
                        if status != 504 && retry_after.is_none() {
                            l.violations
                                .push(format!("{status} without Retry-After: {text}"));
                        }
                    }
                    let wait = retry_after
                        .map(Duration::from_secs)
                        .unwrap_or(backoff)
                        .min(Duration::from_secs(2));
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                other => {
                    // A 500, or a client error that retrying cannot heal: the tablet stops.
                    let mut l = ledger.lock().unwrap();
                    l.answer(other.to_string());
                    l.violations
                        .push(format!("scan {scan_id}: {other}: {text}"));
                    return;
                }
            }
        }
    }
}

impl Load {
    /// Records a fault injected now.
    fn fault(&mut self, what: impl std::fmt::Display) {
        let at = format!("{what} at {:.1} s", self.started.elapsed().as_secs_f64());
        eprintln!("{at}");
        self.faults.push(at);
    }

    /// Stops the tablets after their current scan and returns what they saw. With
    /// `MES_FIRE_SOAK_SECONDS` set, the load is first held until it has run that long (a
    /// soak: `MES_FIRE_SOAK_SECONDS=3600 make test-faults`).
    async fn finish(self) -> Finished {
        let soak = std::env::var("MES_FIRE_SOAK_SECONDS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or_default();
        if let Some(left) = soak.checked_sub(self.started.elapsed()) {
            eprintln!("soak: holding the load {left:?} more");
            tokio::time::sleep(left).await;
        }
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tablets {
            t.await.expect("tablet panicked");
        }
        let ledger = std::mem::take(&mut *self.ledger.lock().unwrap());
        let held = self.started.elapsed();
        eprintln!(
            "load held {held:?}: {} scans acknowledged; answers {:?}; longest scan {:?}",
            ledger.acked.len(),
            ledger.answers,
            ledger.longest_outage
        );
        Finished {
            ledger,
            held,
            faults: self.faults,
        }
    }

    fn acked(&self) -> usize {
        self.ledger.lock().unwrap().acked.len()
    }

    /// Waits until `more` scans more than now were acknowledged (the load is really flowing).
    async fn wait_progress(&self, more: usize, within: Duration) {
        let target = self.acked() + more;
        let deadline = Instant::now() + within;
        while self.acked() < target {
            if Instant::now() > deadline {
                let l = self.ledger.lock().unwrap();
                panic!(
                    "the load made no progress: {} of {target} acknowledged; answers {:?}; violations {:?}",
                    l.acked.len(),
                    l.answers,
                    l.violations
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn connect(url: &str) -> sqlx::PgConnection {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match sqlx::PgConnection::connect(url).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for {url}: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("connect {url}: {e}"),
        }
    }
}

/// Scan ids stored in `table` of `service`'s database for the fire work orders.
async fn stored_ids(sys: &System, service: &str, table: &str) -> Vec<Uuid> {
    let mut db = connect(sys.database_url(service).expect("database")).await;
    let sql = match table {
        "scans" => {
            "SELECT scan_id FROM scans WHERE work_order LIKE 'FIRE-WO-%' AND kind IN ('consume', 'produce')"
        }
        "production_scans" => {
            "SELECT scan_id FROM production_scans WHERE work_order LIKE 'FIRE-WO-%' AND kind IN ('consume', 'produce')"
        }
        other => panic!("no such table {other}"),
    };
    sqlx::query_scalar(sql)
        .fetch_all(&mut db)
        .await
        .unwrap_or_else(|e| panic!("{service} {table}: {e}"))
}

/// The Jepsen-style check, straight from the databases (and, given the ERP double, from the
/// ERP's books); its figures go to the reliability report (`make reliability-report`) before
/// anything is asserted.
async fn check_sets(sys: &System, scenario: &str, run: Finished, erp: Option<&ErpDouble>) {
    let Finished {
        ledger,
        held,
        faults,
    } = run;
    let mut problems: Vec<String> = ledger.violations.clone();
    if ledger.acked.is_empty() {
        problems.push("nothing was acknowledged".into());
    }
    // The scans that move material: what scan-ingest's, trace-query's and erp-sync's scan
    // tables are compared on.
    let acked: HashSet<Uuid> = ledger
        .acked
        .iter()
        .filter(|(_, (_, s))| s.moves_material())
        .map(|(id, _)| *id)
        .collect();

    // scan-ingest: every acknowledged scan stored once, nothing else stored (every scan sent
    // was acknowledged in the end: tablets never give up on one).
    let stored = stored_ids(sys, "scan-ingest", "scans").await;
    let stored_set: HashSet<Uuid> = stored.iter().copied().collect();
    let mut duplicated = stored.len() - stored_set.len();
    let lost: Vec<_> = acked.difference(&stored_set).collect();
    let extra: Vec<_> = stored_set.difference(&acked).collect();
    if !lost.is_empty() || !extra.is_empty() || duplicated > 0 {
        problems.push(format!(
            "scan-ingest: {} acknowledged scans lost ({lost:?}), {} stored never acknowledged \
             ({extra:?}), {duplicated} stored twice",
            lost.len(),
            extra.len()
        ));
    }

    // Inventory is the ledger: initial minus the acknowledged consumes, each exactly once.
    let mut db = connect(sys.database_url("scan-ingest").unwrap()).await;
    let mut inventory_wrong = 0;
    for i in 0..TABLETS {
        let consumed: i64 = ledger
            .acked
            .values()
            .filter(|(t, s)| *t == i && s.kind == "consume")
            .map(|(_, s)| s.quantity)
            .sum();
        let on_hand: String =
            sqlx::query_scalar("SELECT quantity_on_hand::text FROM lots WHERE lot = $1")
                .bind(raw_lot(i))
                .fetch_one(&mut db)
                .await
                .expect("raw lot");
        if on_hand.parse::<f64>().ok() != Some((RAW_QUANTITY - consumed) as f64) {
            inventory_wrong += 1;
            problems.push(format!(
                "{}: on hand {on_hand}, the ledger says {RAW_QUANTITY} - {consumed}",
                raw_lot(i)
            ));
        }
    }
    let produced = ledger
        .acked
        .values()
        .filter(|(_, s)| s.kind == "produce")
        .count() as i64;
    let produced_lots: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM lots WHERE lot LIKE 'FIRE-OUT-%' AND quantity_on_hand = 1",
    )
    .fetch_one(&mut db)
    .await
    .expect("produced lots");
    if produced_lots != produced {
        inventory_wrong += 1;
        problems.push(format!(
            "{produced_lots} produced lots hold 1, {produced} produces were acknowledged"
        ));
    }

    // The feed's consumers converge on exactly the same set, each scan applied once.
    let mut consumers = serde_json::Map::new();
    for (service, table) in [("trace-query", "scans"), ("erp-sync", "production_scans")] {
        let deadline = Instant::now() + Duration::from_secs(90);
        let converged = Instant::now();
        loop {
            let ids = stored_ids(sys, service, table).await;
            let set: HashSet<Uuid> = ids.iter().copied().collect();
            let twice = ids.len() - set.len();
            let foreign = set.difference(&acked).count();
            let missing = acked.difference(&set).count();
            if set == acked && twice == 0 || Instant::now() > deadline {
                duplicated += twice;
                if set != acked || twice > 0 {
                    problems.push(format!(
                        "{service}: {missing} acknowledged scans missing after 90 s, \
                         {foreign} never acknowledged, {twice} applied twice"
                    ));
                }
                consumers.insert(
                    service.into(),
                    json!({
                        "missing": missing,
                        "foreign": foreign,
                        "applied_twice": twice,
                        "converged_after_load_s": converged.elapsed().as_secs_f64(),
                    }),
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    let erp_books = match erp {
        Some(double) => {
            let (record, found) = check_erp_books(double, &ledger).await;
            duplicated += record["booked_twice"].as_u64().unwrap_or(0) as usize;
            problems.extend(found);
            record
        }
        None => Value::Null,
    };

    let server_errors: u64 = ledger
        .answers
        .iter()
        .filter(|(k, _)| k.starts_with('5') && k.as_str() != "503")
        .map(|(_, n)| n)
        .sum();
    mes_e2e::reliability_record(
        scenario,
        &json!({
            "scenario": scenario,
            "tablets": TABLETS,
            "load_held_s": held.as_secs_f64(),
            "faults": faults,
            "acknowledged": acked.len(),
            "lost": lost.len(),
            "duplicated": duplicated,
            "stored_never_acknowledged": extra.len(),
            "inventory_mismatches": inventory_wrong,
            "consumers": consumers,
            "erp": erp_books,
            "longest_client_visible_outage_s": ledger.longest_outage.as_secs_f64(),
            "answers": ledger.answers,
            "server_errors_other_than_503": server_errors,
            "passed": problems.is_empty(),
            "problems": problems.iter().take(20).collect::<Vec<_>>(),
        }),
    );
    assert!(
        problems.is_empty(),
        "{scenario}: {} problems:\n{}",
        problems.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The ERP's side of exactly once: every acknowledged completion's confirmation (key
/// `{work order}:10:{completing scan}`) booked once, with the good quantity the MES counted
/// (the produces acknowledged on that work order), and nothing else booked. Waits up to 90 s
/// for erp-sync's outbox to drain. The figures for the report, and the problems found.
async fn check_erp_books(double: &ErpDouble, ledger: &Ledger) -> (Value, Vec<String>) {
    let mut expected: BTreeMap<String, (String, rust_decimal::Decimal)> = BTreeMap::new();
    for (id, (_, sent)) in &ledger.acked {
        if sent.kind != "complete_operation" {
            continue;
        }
        let good = ledger
            .acked
            .values()
            .filter(|(_, s)| s.kind == "produce" && s.work_order == sent.work_order)
            .map(|(_, s)| rust_decimal::Decimal::from(s.quantity))
            .sum();
        expected.insert(
            format!("{}:10:{id}", sent.work_order),
            (sent.work_order.clone(), good),
        );
    }
    let waited = Instant::now();
    let deadline = waited + Duration::from_secs(90);
    let counts = loop {
        let counts = double.confirmation_counts();
        if expected.keys().all(|k| counts.contains_key(k)) || Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut problems = Vec::new();
    if expected.is_empty() {
        problems.push("no operation was completed: the ERP was not exercised".into());
    }
    let lost: Vec<&String> = expected
        .keys()
        .filter(|k| !counts.contains_key(*k))
        .collect();
    let foreign: Vec<&String> = counts
        .keys()
        .filter(|k| k.starts_with("FIRE-") && !expected.contains_key(*k))
        .collect();
    let booked_twice: usize = counts.values().map(|n| n.saturating_sub(1)).sum();
    let mut wrong = Vec::new();
    for (key, (work_order, good)) in &expected {
        let booked = double
            .confirmation(key)
            .and_then(|c| c["good_quantity"].as_str().map(str::to_owned))
            .and_then(|q| q.parse::<rust_decimal::Decimal>().ok());
        if booked.is_some_and(|b| b != *good) {
            wrong.push(format!("{key}: booked {booked:?}, the MES counted {good}"));
        }
        let total = double.good_quantities().get(work_order).copied();
        if total.is_some_and(|t| t != *good) {
            wrong.push(format!(
                "{work_order}: the ERP's books say {total:?}, the MES {good}"
            ));
        }
    }
    if !lost.is_empty() {
        problems.push(format!(
            "the ERP never booked {} confirmations after 90 s, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        ));
    }
    if !foreign.is_empty() {
        problems.push(format!(
            "the ERP booked {} confirmations no completion asked for, e.g. {:?}",
            foreign.len(),
            &foreign[..foreign.len().min(5)]
        ));
    }
    if booked_twice > 0 {
        problems.push(format!("the ERP booked {booked_twice} confirmations twice"));
    }
    problems.extend(wrong.iter().take(10).cloned());
    let retried: usize = double
        .posts()
        .iter()
        .filter(|(k, posts)| k.starts_with("FIRE-") && posts.len() > 1)
        .count();
    let record = json!({
        "confirmations_expected": expected.len(),
        "booked": counts.keys().filter(|k| k.starts_with("FIRE-")).count(),
        "lost": lost.len(),
        "booked_twice": booked_twice,
        "foreign": foreign.len(),
        "quantity_mismatches": wrong.len(),
        "keys_posted_more_than_once": retried,
        "drained_after_load_s": waited.elapsed().as_secs_f64(),
    });
    eprintln!("ERP books: {record}");
    (record, problems)
}

/// trace-query's read model, after whatever happened to it, equals the one a fresh instance
/// builds from position 0 of the same feed into a new database: every table, row for row.
async fn read_model_equals_a_rebuild(sys: &mut System) {
    let original = sys
        .database_url("trace-query")
        .expect("database")
        .to_owned();
    let fresh = format!("{original}_rebuild");
    let _drop_fresh = mes_common::testing::DbGuard { url: fresh.clone() };
    let prefix = format!("fire-rebuild:{}:", Uuid::new_v4().simple());
    let port = sys
        .start_instance_with(
            "trace-query",
            &[
                ("MES_TRACE_QUERY_DATABASE_URL", &fresh),
                ("MES_TRACE_QUERY_REDIS_PREFIX", &prefix),
            ],
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let _drop_keys = mes_common::testing::RedisGuard {
        url: mes_e2e::REDIS_URL.into(),
        prefix,
    };
    let cursor = "SELECT coalesce(max(position), 0) FROM feed_cursor";
    let mut a = connect(&original).await;
    let mut b = connect(&fresh).await;
    let head: i64 = sqlx::query_scalar(cursor)
        .fetch_one(&mut a)
        .await
        .expect("cursor");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let at: i64 = sqlx::query_scalar(cursor)
            .fetch_one(&mut b)
            .await
            .unwrap_or(0);
        if at >= head {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rebuild reached position {at} of {head} in 90 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (table, sql) in [
        (
            "materials",
            "SELECT row_to_json(t)::text FROM materials t ORDER BY 1",
        ),
        (
            "stations",
            "SELECT row_to_json(t)::text FROM stations t ORDER BY 1",
        ),
        (
            "work_orders",
            "SELECT row_to_json(t)::text FROM work_orders t ORDER BY 1",
        ),
        (
            "work_order_operations",
            "SELECT row_to_json(t)::text FROM work_order_operations t ORDER BY 1",
        ),
        ("lots", "SELECT row_to_json(t)::text FROM lots t ORDER BY 1"),
        (
            "scans",
            "SELECT row_to_json(t)::text FROM scans t ORDER BY 1",
        ),
        (
            "genealogy_edges",
            "SELECT row_to_json(t)::text FROM genealogy_edges t ORDER BY 1",
        ),
        (
            "production_hourly",
            "SELECT row_to_json(t)::text FROM production_hourly t ORDER BY 1",
        ),
    ] {
        let rows_a: Vec<String> = sqlx::query_scalar(sql)
            .fetch_all(&mut a)
            .await
            .expect(table);
        let rows_b: Vec<String> = sqlx::query_scalar(sql)
            .fetch_all(&mut b)
            .await
            .expect(table);
        let first_difference = rows_a
            .iter()
            .zip(&rows_b)
            .find(|(x, y)| x != y)
            .map(|(x, y)| format!("\n  kept:    {x}\n  rebuilt: {y}"));
        eprintln!(
            "trace-query {table}: {} rows, rebuilt {}",
            rows_a.len(),
            rows_b.len()
        );
        if ["scans", "lots", "genealogy_edges", "production_hourly"].contains(&table) {
            assert!(
                !rows_a.is_empty(),
                "trace-query {table} is empty: nothing compared"
            );
        }
        assert!(
            rows_a == rows_b,
            "trace-query {table}: {} rows kept, {} rebuilt from the feed{}",
            rows_a.len(),
            rows_b.len(),
            first_difference.unwrap_or_default()
        );
    }
    sys.stop_instance("trace-query", port);
}

/// The system, on the fire plant, with the tablets' load started.
async fn start(options: Options<'_>) -> (System, Load) {
    start_shaped(options, Shape::OneOrder).await
}

async fn start_shaped(options: Options<'_>, shape: Shape) -> (System, Load) {
    let sys = System::start_opts(options).await.expect("system");
    let secrets = seed(&sys, shape).await.expect("seed");
    let load = start_load(&sys.gateway, &secrets, shape);
    load.wait_progress(50, Duration::from_secs(30)).await;
    (sys, load)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_every_service_under_load_loses_and_duplicates_nothing() {
    let (mut sys, mut load) = start(Options {
        env: ENV,
        ..Options::default()
    })
    .await;
    // scan-ingest (the system of record) three times, each other service twice; trace-query
    // and erp-sync are killed mid-projection, the gateway with requests in flight.
    for service in [
        "scan-ingest",
        "trace-query",
        "gateway",
        "erp-sync",
        "scan-ingest",
        "trace-query",
        "erp-sync",
        "gateway",
        "scan-ingest",
    ] {
        sys.kill_service(service);
        load.fault(format!("kill -9 {service}"));
        tokio::time::sleep(Duration::from_millis(700)).await;
        sys.restart_service(service, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        load.wait_progress(30, Duration::from_secs(60)).await;
    }
    check_sets(&sys, "kill -9 of every service", load.finish().await, None).await;
    // trace-query was killed mid-projection twice: its read model is still exactly the one a
    // rebuild from the feed makes.
    read_model_equals_a_rebuild(&mut sys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_crash_mid_load_costs_only_503s_and_the_services_recover_by_themselves() {
    let pg = PrivatePostgres::start().expect("private PostgreSQL");
    let (mut sys, mut load) = start(Options {
        env: ENV,
        postgres: pg.addr(),
        ..Options::default()
    })
    .await;
    for round in 0..2 {
        pg.crash().expect("crash");
        load.fault("PostgreSQL crash (pg_ctl stop -m immediate), 3 s down");
        tokio::time::sleep(Duration::from_secs(3)).await;
        pg.start_again().expect("start again");
        let back = Instant::now();
        load.wait_progress(30, Duration::from_secs(60)).await;
        eprintln!(
            "round {round}: scans acknowledged again {:?} after PostgreSQL was back",
            back.elapsed()
        );
    }
    for service in mes_e2e::SERVICES {
        assert!(
            !sys.exited(service),
            "{service} died with PostgreSQL:\n{}",
            sys.log(service)
        );
    }
    check_sets(
        &sys,
        "PostgreSQL crash and restart",
        load.finish().await,
        None,
    )
    .await;
}

/// How stale a trace may be: a lot's produce acknowledged this long ago must be in every
/// genealogy answer. trace-query's cache bound (`STALENESS_BOUND`, 4 s: a replica that died
/// between its commit and its deletions) plus 1 s for the feed to reach the projection.
const TRACE_BOUND: Duration = Duration::from_secs(5);

/// What a reader of traces saw.
#[derive(Default)]
struct Reads {
    /// Every answer by kind (`200`, `503`, `connection error`...).
    answers: BTreeMap<String, u64>,
    /// Answers missing a lot produced more than [`TRACE_BOUND`] before they were asked, and
    /// any answer other than 200/503/504.
    violations: Vec<String>,
    /// The oldest produce an answer did not show yet (age at the time it was asked).
    stalest: Duration,
    /// 200 answers after the last fault was lifted.
    fresh_after_faults: u64,
}

/// A quality engineer's screen: asks, over and over, for the forward genealogy of each
/// tablet's raw lot (every lot produced from it), and checks each answer against what the
/// tablets were acknowledged: a lot produced more than [`TRACE_BOUND`] before the question
/// must be in the answer.
fn start_reader(
    gateway: String,
    token: String,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    faults_over: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Reads> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("http client");
        let mut reads = Reads::default();
        while !stop.load(Ordering::SeqCst) {
            for i in 0..TABLETS {
                let after_faults = faults_over.load(Ordering::SeqCst);
                let asked = Instant::now();
                let expected: Vec<(String, Instant)> = ledger
                    .lock()
                    .unwrap()
                    .produced
                    .iter()
                    .filter(|(t, _, _)| *t == i)
                    .map(|(_, lot, at)| (lot.clone(), *at))
                    .collect();
                let res = http
                    .get(format!(
                        "{gateway}/api/v1/lots/{}/genealogy?direction=forward&max_depth=1",
                        raw_lot(i)
                    ))
                    .bearer_auth(&token)
                    .send()
                    .await;
                let res = match res {
                    Ok(r) => r,
                    Err(e) => {
                        let what = if e.is_timeout() {
                            "client timeout"
                        } else {
                            "connection error"
                        };
                        *reads.answers.entry(what.into()).or_default() += 1;
                        continue;
                    }
                };
                let status = res.status().as_u16();
                *reads.answers.entry(status.to_string()).or_default() += 1;
                let text = res.text().await.unwrap_or_default();
                match status {
                    200 => {
                        let v: Value = serde_json::from_str(&text).unwrap_or_default();
                        let shown: HashSet<&str> = v["nodes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|n| n["lot"].as_str())
                            .collect();
                        for (lot, at) in &expected {
                            if shown.contains(lot.as_str()) {
                                continue;
                            }
                            let age = asked.duration_since(*at);
                            reads.stalest = reads.stalest.max(age);
                            if age > TRACE_BOUND && reads.violations.len() < 20 {
                                reads.violations.push(format!(
                                    "{}'s genealogy lacks {lot}, produced {age:?} before it was asked",
                                    raw_lot(i)
                                ));
                            }
                        }
                        if after_faults {
                            reads.fresh_after_faults += 1;
                        }
                    }
                    503 | 504 => {}
                    other => {
                        if reads.violations.len() < 20 {
                            reads.violations.push(format!("genealogy: {other}: {text}"));
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        reads
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_blackholed_reset_slow_then_killed_never_stops_scans_nor_serves_stale_traces() {
    let mut redis = PrivateRedis::start().expect("private Redis");
    let proxy = FaultProxy::start(("127.0.0.1", redis.port))
        .await
        .expect("proxy");
    let (sys, mut load) = start(Options {
        env: ENV,
        redis: format!("redis://{}", proxy.addr()),
        ..Options::default()
    })
    .await;
    let faults_over = Arc::new(AtomicBool::new(false));
    let reader = start_reader(
        sys.gateway.clone(),
        sys.token("qa1", None).await,
        load.ledger.clone(),
        load.stop.clone(),
        faults_over.clone(),
    );
    // Traces are served, and cached, before anything fails.
    load.wait_progress(20, Duration::from_secs(30)).await;
    for (fault, hold) in [
        (Fault::Blackhole, Duration::from_secs(5)),
        (Fault::Reset, Duration::from_secs(3)),
        (
            Fault::Latency(Duration::from_millis(300)),
            Duration::from_secs(3),
        ),
    ] {
        proxy.set(fault);
        load.fault(format!("Redis {fault:?} for {hold:?}"));
        // Scans keep being acknowledged while Redis misbehaves.
        load.wait_progress(20, hold.max(Duration::from_secs(30)))
            .await;
        tokio::time::sleep(hold).await;
        proxy.set(Fault::Pass);
        load.wait_progress(20, Duration::from_secs(30)).await;
    }
    // Killed: it comes back empty (the cache and trace-query's membership filter are gone).
    redis.kill();
    load.fault("Redis killed (SIGKILL), 3 s down, restarted empty");
    load.wait_progress(20, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.start_again().expect("Redis again");
    load.wait_progress(20, Duration::from_secs(30)).await;
    // Traces recover: fresh answers keep coming for a while after the last fault.
    faults_over.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let run = load.finish().await;
    let reads = reader.await.expect("reader");
    eprintln!(
        "trace reads: {:?}; stalest answer lacked a lot produced {:?} before; {} fresh answers after the faults",
        reads.answers, reads.stalest, reads.fresh_after_faults
    );
    mes_e2e::reliability_record(
        "Redis faults: trace reads",
        &json!({
            "scenario": "Redis blackhole, reset, latency, kill",
            "reads": reads.answers,
            "staleness_bound_s": TRACE_BOUND.as_secs_f64(),
            "stalest_answer_s": reads.stalest.as_secs_f64(),
            "stale_answers": reads.violations.len(),
            "fresh_answers_after_faults": reads.fresh_after_faults,
            "passed": reads.violations.is_empty() && reads.fresh_after_faults > 0,
        }),
    );
    assert!(
        reads.violations.is_empty(),
        "trace answers staler than {TRACE_BOUND:?} or failing:\n{}",
        reads.violations.join("\n")
    );
    assert!(
        reads.fresh_after_faults >= 10,
        "traces did not recover after the faults: {:?}",
        reads.answers
    );
    check_sets(&sys, "Redis blackhole, reset, latency, kill", run, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_and_resets_between_the_gateway_and_the_services_cost_only_retries() {
    let (sys, mut load) = start(Options {
        env: ENV,
        proxy_backends: true,
        ..Options::default()
    })
    .await;
    let proxy = sys.backend_proxy("scan-ingest").expect("proxy");
    for (fault, hold) in [
        (
            Fault::Latency(Duration::from_millis(200)),
            Duration::from_secs(4),
        ),
        (Fault::Reset, Duration::from_secs(2)),
        (Fault::Blackhole, Duration::from_secs(3)),
    ] {
        proxy.set(fault);
        load.fault(format!("gateway -> scan-ingest {fault:?} for {hold:?}"));
        tokio::time::sleep(hold).await;
        proxy.set(Fault::Pass);
        load.wait_progress(30, Duration::from_secs(60)).await;
    }
    check_sets(
        &sys,
        "gateway to scan-ingest latency, reset, blackhole",
        load.finish().await,
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_two_instances_of_each_back_end_fails_no_scan() {
    let (mut sys, mut load) = start(Options {
        env: ENV,
        proxy_backends: true,
        ..Options::default()
    })
    .await;
    for service in ["scan-ingest", "trace-query", "erp-sync"] {
        // Two instances behind the service's address, as a Deployment with two replicas.
        let first = sys.grpc[service];
        let second = sys
            .start_instance(service, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let mut running = vec![first, second];
        sys.backend_proxy(service)
            .expect("proxy")
            .set_upstreams(&running);
        load.wait_progress(20, Duration::from_secs(60)).await;
        // `kubectl rollout restart`: each old instance in turn replaced by a new one that
        // serves first; the old one leaves the endpoints, then gets SIGTERM.
        for old in [first, second] {
            let new = sys
                .start_instance(service, Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| panic!("{e:#}"));
            running.retain(|p| *p != old);
            running.push(new);
            sys.backend_proxy(service)
                .expect("proxy")
                .set_upstreams(&running);
            load.fault(format!(
                "rolling restart: {service} :{old} replaced by :{new}"
            ));
            let status = sys.stop_instance(service, old);
            assert!(
                status.is_some_and(|s| s.success()),
                "{service} :{old} did not shut down cleanly: {status:?}"
            );
            load.wait_progress(20, Duration::from_secs(60)).await;
        }
    }
    let failed: u64 = {
        let l = load.ledger.lock().unwrap();
        for r in &l.refusals {
            eprintln!("refused: {r}");
        }
        let ids: Vec<String> = l
            .refusals
            .iter()
            .filter_map(|r| r.split("\"trace_id\":\"").nth(1))
            .map(|t| t[..32.min(t.len())].to_owned())
            .collect();
        for line in sys
            .log("gateway")
            .lines()
            .chain(sys.log("scan-ingest").lines())
            .filter(|l| ids.iter().any(|id| l.contains(id.as_str())))
        {
            eprintln!("gateway: {}", &line[..line.len().min(600)]);
        }
        l.answers
            .iter()
            .filter(|(k, _)| !k.starts_with("200"))
            .map(|(_, n)| *n)
            .sum()
    };
    check_sets(
        &sys,
        "rolling restart of every back-end",
        load.finish().await,
        None,
    )
    .await;
    assert_eq!(
        failed, 0,
        "requests that failed during the rolling restarts"
    );
}

/// Restarts `service` each time it exits, as a Deployment's restart policy would, until it has
/// exited `crashes` times at its fail point `point` (within `within`): the crashes seen.
async fn supervise(
    sys: &mut System,
    load: &mut Load,
    service: &'static str,
    point: &str,
    crashes: usize,
    within: Duration,
) -> usize {
    let deadline = Instant::now() + within;
    let mut seen = 0;
    while seen < crashes {
        assert!(
            Instant::now() < deadline,
            "{service} exited {seen} times at {point} in {within:?}, not {crashes}:\n{}",
            sys.log(service)
        );
        if !sys.exited(service) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        seen += 1;
        load.fault(format!("{service} exited at fail point {point}, restarted"));
        // It may reach its fail point again before it reports serving: then it is restarted
        // on the next turn.
        if let Err(e) = sys.restart_service(service, Duration::from_secs(60)).await {
            assert!(sys.exited(service), "{service} did not come back: {e:#}");
        }
    }
    let logged = sys
        .log(service)
        .matches(&format!("fail point {point}:"))
        .count();
    assert!(
        logged >= seen,
        "{service} exited {seen} times but only {logged} at its fail point {point}"
    );
    seen
}

/// Arms `service`'s fail points with `failpoints` (`None`: disarms them) by restarting it
/// gracefully with that `FAILPOINTS`.
async fn arm(sys: &mut System, load: &mut Load, service: &'static str, failpoints: Option<&str>) {
    sys.set_env(service, "FAILPOINTS", failpoints);
    sys.stop_service(service);
    sys.restart_service(service, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    load.fault(format!(
        "{service} restarted with FAILPOINTS={failpoints:?}"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_scan_ingests_commit_and_its_answer_is_healed_by_the_retry() {
    const POINT: &str = "scan-ingest::after-commit";
    let (mut sys, mut load) = start(Options {
        env: ENV,
        failpoints: true,
        ..Options::default()
    })
    .await;
    // Every 25th committed batch of scans is never answered: scan-ingest exits right after
    // its commit. The tablets' retries must find their scans stored (`duplicate`), once.
    let armed = format!("{POINT}=25*off->return");
    arm(&mut sys, &mut load, "scan-ingest", Some(&armed)).await;
    let crashes = supervise(
        &mut sys,
        &mut load,
        "scan-ingest",
        POINT,
        4,
        Duration::from_secs(180),
    )
    .await;
    arm(&mut sys, &mut load, "scan-ingest", None).await;
    load.wait_progress(30, Duration::from_secs(60)).await;
    let run = load.finish().await;
    let duplicates = run
        .ledger
        .answers
        .get("200 duplicate")
        .copied()
        .unwrap_or(0);
    eprintln!("{crashes} crashes after commit; {duplicates} retries answered duplicate");
    // Each crash left at least the scan whose commit it followed unanswered; its retry is
    // answered `duplicate` (stored before, not stored again).
    assert!(
        duplicates > 0,
        "no retry was answered duplicate: the crashes did not land between commit and answer"
    );
    check_sets(
        &sys,
        "scan-ingest crashing between commit and answer",
        run,
        None,
    )
    .await;
}

const ERP_TOKEN: &str = "under-fire-erp-bearer-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_erp_down_flapping_slow_throttling_and_crashes_after_booking_lose_and_duplicate_no_confirmation()
 {
    const POINT: &str = "erp-sync::after-erp-accepted";
    let double = ErpDouble::start(mes_common::testing::demo_plant(), Some(ERP_TOKEN)).await;
    let base = double.base_url();
    // A short call timeout and retry/breaker cadence, so each fault is met many times; the
    // attempts are not limited, so an outage makes no dead letter.
    let mut env: Vec<(&str, &str)> = ENV.to_vec();
    env.extend([
        ("MES_ERP_SYNC_ERP__ADAPTER", "rest"),
        ("MES_ERP_SYNC_ERP__REST_BASE_URL", base.as_str()),
        ("MES_ERP_SYNC_ERP__REST_TOKEN", ERP_TOKEN),
        ("MES_ERP_SYNC_ERP__CALL_TIMEOUT_MS", "500"),
        ("MES_ERP_SYNC_ERP__RETRY_INITIAL_MS", "50"),
        ("MES_ERP_SYNC_ERP__RETRY_MAX_MS", "1000"),
        ("MES_ERP_SYNC_ERP__RETRY_AFTER_TIMEOUT_MS", "1000"),
        ("MES_ERP_SYNC_ERP__BREAKER_FAILURE_THRESHOLD", "3"),
        ("MES_ERP_SYNC_ERP__BREAKER_OPEN_MS", "1000"),
        ("MES_ERP_SYNC_ERP__MAX_ATTEMPTS", "100000"),
    ]);
    let (mut sys, mut load) = start_shaped(
        Options {
            env: &env,
            failpoints: true,
            ..Options::default()
        },
        Shape::Cycle(10),
    )
    .await;
    let booked = |d: &ErpDouble| {
        d.confirmation_counts()
            .keys()
            .filter(|k| k.starts_with("FIRE-"))
            .count()
    };
    // The ERP books confirmations again after each fault (erp-sync recovered by itself).
    async fn erp_progress(double: &ErpDouble, booked: impl Fn(&ErpDouble) -> usize) {
        let target = booked(double) + 3;
        let deadline = Instant::now() + Duration::from_secs(60);
        while booked(double) < target {
            assert!(
                Instant::now() < deadline,
                "the ERP booked nothing new for 60 s after the fault was lifted"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    erp_progress(&double, booked).await;

    // Down (500s): the breaker opens, and erp-sync stops hammering the ERP.
    double.set_fault(erp_double::Fault::ServerError);
    load.fault("ERP answers 500 for 5 s");
    let mut breaker_opened = false;
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(5) {
        breaker_opened |= sys.metric("erp-sync", "erp_breaker_state").await == Some(2.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    double.set_fault(erp_double::Fault::None);
    assert!(
        breaker_opened,
        "the breaker never opened during a 5 s ERP outage"
    );
    erp_progress(&double, booked).await;

    for (fault, hold) in [
        // Slower than erp-sync's call timeout: the ERP books what erp-sync gives up on.
        (
            erp_double::Fault::Slow(Duration::from_millis(800)),
            Duration::from_secs(4),
        ),
        (erp_double::Fault::Reset, Duration::from_secs(3)),
        (erp_double::Fault::Throttle(3), Duration::from_secs(4)),
    ] {
        double.set_fault(fault);
        load.fault(format!("ERP {fault:?} for {hold:?}"));
        tokio::time::sleep(hold).await;
        double.set_fault(erp_double::Fault::None);
        erp_progress(&double, booked).await;
    }
    load.fault("ERP flapping: 500s and answers every 300 ms for 6 s");
    for _ in 0..10 {
        double.set_fault(erp_double::Fault::ServerError);
        tokio::time::sleep(Duration::from_millis(300)).await;
        double.set_fault(erp_double::Fault::None);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    erp_progress(&double, booked).await;

    // erp-sync exits after every third booking, before its outbox records it: the repost
    // finds the ERP's booking (409 duplicate) and books nothing twice.
    let armed = format!("{POINT}=2*off->return");
    arm(&mut sys, &mut load, "erp-sync", Some(&armed)).await;
    supervise(
        &mut sys,
        &mut load,
        "erp-sync",
        POINT,
        3,
        Duration::from_secs(180),
    )
    .await;
    arm(&mut sys, &mut load, "erp-sync", None).await;
    erp_progress(&double, booked).await;

    check_sets(
        &sys,
        "ERP down, flapping, slow, throttling; erp-sync crashing after the ERP booked",
        load.finish().await,
        Some(&double),
    )
    .await;
    // The reposts after each crash found their bookings.
    let reposted = double
        .posts()
        .iter()
        .filter(|(k, p)| k.starts_with("FIRE-") && p.len() > 1)
        .count();
    assert!(
        reposted > 0,
        "no confirmation was ever posted twice: the faults did not bite"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_resets_and_a_blackhole_between_the_services_and_postgresql_cost_only_retries() {
    let pg = FaultProxy::start(("127.0.0.1", 5432)).await.expect("proxy");
    let (sys, mut load) = start(Options {
        env: ENV,
        postgres: pg.addr(),
        ..Options::default()
    })
    .await;
    for (fault, hold) in [
        (
            Fault::Latency(Duration::from_millis(50)),
            Duration::from_secs(4),
        ),
        (Fault::Reset, Duration::from_secs(2)),
        (Fault::Blackhole, Duration::from_secs(3)),
    ] {
        pg.set(fault);
        load.fault(format!("services -> PostgreSQL {fault:?} for {hold:?}"));
        tokio::time::sleep(hold).await;
        pg.set(Fault::Pass);
        load.wait_progress(30, Duration::from_secs(60)).await;
    }
    check_sets(
        &sys,
        "services to PostgreSQL latency, reset, blackhole",
        load.finish().await,
        None,
    )
    .await;
}
