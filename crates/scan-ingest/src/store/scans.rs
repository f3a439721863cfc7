//! The write path: one transaction per batch applies the scans, the inventory, the work-order
//! progress and the event log; rows a batch touches are locked in a fixed order (work orders,
//! then lots, each sorted) so concurrent batches queue instead of deadlocking or failing.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use mes_common::identity::Caller;
use mes_proto::v1 as pb;
use rust_decimal::Decimal;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::domain::{LotState, OperationState, ScanInput, WorkOrderState, World};
use crate::error::Error;
use crate::refcache::RefCache;
use crate::store::{events, timestamp};

const MAX_ATTEMPTS: usize = 8;

/// One request's share of a (possibly grouped) transaction.
#[derive(Debug, Clone)]
pub struct Request {
    pub inputs: Vec<ScanInput>,
    pub caller: Caller,
    pub traceparent: String,
}

struct Accepted<'a> {
    input: &'a ScanInput,
    material: String,
    operation: i32,
    request: &'a Request,
}

/// Commits a validated batch; returns one result per input, in order. Acknowledged = committed.
pub async fn submit(
    pool: &PgPool,
    cache: &RefCache,
    inputs: &[ScanInput],
    caller: &Caller,
) -> Result<Vec<pb::ScanResult>, Error> {
    let request = Request {
        inputs: inputs.to_vec(),
        caller: caller.clone(),
        traceparent: mes_common::propagation::current_traceparent(),
    };
    let mut out = submit_group(pool, cache, std::slice::from_ref(&request)).await?;
    Ok(out.pop().unwrap_or_default())
}

/// Commits the scans of several requests in one transaction (group commit); returns each
/// request's results. Requests are applied in order, each scan in its request's order.
pub async fn submit_group(
    pool: &PgPool,
    cache: &RefCache,
    requests: &[Request],
) -> Result<Vec<Vec<pb::ScanResult>>, Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_submit(pool, cache, requests).await {
            Err(e) if attempt < MAX_ATTEMPTS && is_retryable(&e) => {
                metrics::counter!("scan_batch_retries_total").increment(1);
                tracing::debug!(attempt, error = %e, "retrying batch");
                tokio::time::sleep(std::time::Duration::from_millis(2 * attempt as u64)).await;
            }
            other => return other.map_err(Error::from),
        }
    }
}

/// Deadlocks, serialization failures, and unique violations from a concurrent insert of the
/// same scan id or new lot (the retry then sees the committed row: duplicate, or an existing lot).
fn is_retryable(e: &sqlx::Error) -> bool {
    super::is_retryable(e)
        || e.as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|c| c == "23505")
}

const CONFLICT: &str = "this scan_id was already used with different content";

async fn try_submit(
    pool: &PgPool,
    cache: &RefCache,
    requests: &[Request],
) -> Result<Vec<Vec<pb::ScanResult>>, sqlx::Error> {
    let all: Vec<&ScanInput> = requests.iter().flat_map(|r| r.inputs.iter()).collect();
    // Reference data first, outside the transaction: a slow Redis never stretches the time
    // the batch holds its row locks.
    let reference = lookup_reference(cache, &all).await;
    let mut tx = pool.begin().await?;
    let mut world = load_world(&mut tx, &all).await?;
    complete_reference(&mut tx, cache, &mut world, reference).await?;
    // Only now, holding the locks, look for scans already stored: a first attempt of one of
    // these scans that held the same rows has committed before we got them, and this read (a
    // new snapshot under READ COMMITTED) sees it. Looked up before the locks, a retry queued
    // behind its own first attempt would be re-judged by the rules against the state that
    // attempt produced and answered `rejected` although the scan is stored.
    let ids: Vec<Uuid> = all.iter().map(|s| s.scan_id).collect();
    // Planned for each call (`persistent(false)`, as for the lots below): a prepared statement
    // switches to PostgreSQL's generic plan after five executions, and one built while `scans`
    // was nearly empty (a new plant, a new database) seq-scans the table on every batch from
    // then on (7.8 ms per call at 40,000 scans in `make bench`, growing) until an ANALYZE.
    let existing: HashMap<Uuid, String> =
        sqlx::query("SELECT scan_id, content_hash FROM scans WHERE scan_id = ANY($1)")
            .persistent(false)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|r| (r.get("scan_id"), r.get("content_hash")))
            .collect();

    let received_at = Utc::now();
    // Scans accepted earlier in this same group (concurrent retries of one scan).
    let mut in_group: HashMap<Uuid, String> = HashMap::new();
    let mut accepted: Vec<Accepted> = Vec::new();
    let mut all_results = Vec::with_capacity(requests.len());
    for request in requests {
        let mut results = Vec::with_capacity(request.inputs.len());
        for s in &request.inputs {
            let id = s.scan_id.to_string();
            if let Some(hash) = existing
                .get(&s.scan_id)
                .or_else(|| in_group.get(&s.scan_id))
            {
                if *hash == s.content_hash() {
                    results.push(result(id, pb::ScanStatus::Duplicate, None));
                } else {
                    results.push(result(
                        id,
                        pb::ScanStatus::Rejected,
                        Some(("conflict", CONFLICT.into())),
                    ));
                }
                continue;
            }
            match world.apply(s, request.caller.station.as_deref()) {
                Ok(applied) => {
                    in_group.insert(s.scan_id, s.content_hash());
                    accepted.push(Accepted {
                        input: s,
                        material: applied.material,
                        operation: applied.operation,
                        request,
                    });
                    results.push(result(id, pb::ScanStatus::Accepted, None));
                }
                Err(r) => {
                    metrics::counter!("scans_total", "kind" => s.kind.as_str(), "status" => "rejected", "code" => r.code).increment(1);
                    results.push(result(
                        id,
                        pb::ScanStatus::Rejected,
                        Some((r.code, r.message)),
                    ));
                }
            }
        }
        all_results.push(results);
    }

    if !accepted.is_empty() {
        insert_scans(&mut tx, &accepted, received_at).await?;
        write_world(&mut tx, &world).await?;
        let evs: Vec<pb::Event> = accepted
            .iter()
            .map(|a| {
                let tp = &a.request.traceparent;
                let mut stored =
                    stored_scan(a.input, &a.material, &a.request.caller, received_at, tp);
                if let Some(scan) = stored.scan.as_mut() {
                    scan.operation = a.operation as u32;
                }
                let mut e = events::event(
                    "scan.accepted",
                    pb::event::Payload::ScanAccepted(pb::ScanAccepted { scan: Some(stored) }),
                );
                e.traceparent = tp.clone();
                e
            })
            .collect();
        events::append(&mut tx, &evs).await?;
    }
    tx.commit().await?;
    // The fault suite's crash between the commit and the answer (tests/under_fire.rs): the
    // scans are stored, the clients never hear so, and their retries must come back duplicates.
    fail::fail_point!("scan-ingest::after-commit", |_| {
        mes_common::shutdown::crash("scan-ingest::after-commit")
    });
    for a in &accepted {
        metrics::counter!("scans_total", "kind" => a.input.kind.as_str(), "status" => "accepted", "code" => "").increment(1);
    }
    Ok(all_results)
}

fn result(
    scan_id: String,
    status: pb::ScanStatus,
    error: Option<(&str, String)>,
) -> pb::ScanResult {
    pb::ScanResult {
        scan_id,
        status: status as i32,
        error: error.map(|(code, message)| pb::ScanError {
            code: code.to_owned(),
            message,
        }),
    }
}

/// The stored form of an accepted scan (also the event payload).
pub fn stored_scan(
    s: &ScanInput,
    material: &str,
    caller: &Caller,
    received_at: DateTime<Utc>,
    traceparent: &str,
) -> pb::StoredScan {
    pb::StoredScan {
        scan: Some(pb::Scan {
            scan_id: s.scan_id.to_string(),
            kind: s.kind.to_proto() as i32,
            work_order: s.work_order.clone(),
            operation: s.operation as u32,
            station: s.station.clone(),
            lot: s.lot.clone(),
            material: s.material.clone(),
            quantity: s
                .quantity
                .map(|q| q.normalize().to_string())
                .unwrap_or_default(),
            into_lot: s.into_lot.clone(),
            location: s.location.clone(),
            result: s.result.map_or(0, |r| r.to_proto() as i32),
            defect_code: s.defect_code.clone(),
            scanned_at: Some(timestamp(s.scanned_at)),
            attributes_json: s.attributes.clone(),
        }),
        operator: caller.user.clone(),
        device: caller.device.clone().unwrap_or_default(),
        received_at: Some(timestamp(received_at)),
        status: "active".into(),
        voided_by: String::new(),
        voids: String::new(),
        reason: String::new(),
        material: material.to_owned(),
        traceparent: traceparent.to_owned(),
    }
}

/// Loads and locks what `scans` touch: work orders (with routing, BOM and the output material's
/// tracking mode) and lots. Stations come from [`complete_reference`].
pub async fn load_world(
    tx: &mut Transaction<'_, Postgres>,
    scans: &[&ScanInput],
) -> Result<World, sqlx::Error> {
    let mut world = World::default();
    let wo_numbers: Vec<String> = scans
        .iter()
        .filter(|s| !s.work_order.is_empty())
        .map(|s| s.work_order.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let lot_names: Vec<String> = scans
        .iter()
        .flat_map(|s| [s.lot.clone(), s.into_lot.clone()])
        .filter(|l| !l.is_empty())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    if !wo_numbers.is_empty() {
        for r in sqlx::query(
            "SELECT w.number, w.material, w.status, w.planned_quantity, w.produced_quantity,
                    w.scrap_quantity, m.tracking
             FROM work_orders w LEFT JOIN materials m ON m.number = w.material
             WHERE w.number = ANY($1) ORDER BY w.number FOR UPDATE OF w",
        )
        .bind(&wo_numbers)
        .fetch_all(&mut **tx)
        .await?
        {
            let number: String = r.get("number");
            if let Some(tracking) = r.get::<Option<String>, _>("tracking") {
                world.materials.insert(r.get("material"), tracking);
            }
            world.work_orders.insert(
                number.clone(),
                WorkOrderState {
                    number,
                    material: r.get("material"),
                    status: r.get("status"),
                    planned: r.get("planned_quantity"),
                    produced: r.get("produced_quantity"),
                    scrap: r.get("scrap_quantity"),
                    operations: Default::default(),
                    components: Default::default(),
                    dirty: false,
                },
            );
        }
        for r in sqlx::query(
            "SELECT work_order, step, station, status, good_quantity, scrap_quantity
             FROM work_order_operations WHERE work_order = ANY($1)",
        )
        .bind(&wo_numbers)
        .fetch_all(&mut **tx)
        .await?
        {
            let wo: String = r.get("work_order");
            if let Some(w) = world.work_orders.get_mut(&wo) {
                let step: i32 = r.get("step");
                w.operations.insert(
                    step,
                    OperationState {
                        step,
                        station: r.get("station"),
                        status: r.get("status"),
                        good: r.get("good_quantity"),
                        scrap: r.get("scrap_quantity"),
                    },
                );
            }
        }
        for r in sqlx::query("SELECT work_order, material, quantity_per_unit FROM work_order_components WHERE work_order = ANY($1)")
            .bind(&wo_numbers)
            .fetch_all(&mut **tx)
            .await?
        {
            let wo: String = r.get("work_order");
            if let Some(w) = world.work_orders.get_mut(&wo) {
                w.components.insert(r.get("material"), r.get("quantity_per_unit"));
            }
        }
    }
    if !lot_names.is_empty() {
        for r in sqlx::query(
            "SELECT lot, material, quantity_on_hand, status, location, origin_kind, work_order
             FROM lots WHERE lot = ANY($1) ORDER BY lot FOR UPDATE",
        )
        .persistent(false) // a growing table: see the scan-id look-up in `try_submit`
        .bind(&lot_names)
        .fetch_all(&mut **tx)
        .await?
        {
            let lot: String = r.get("lot");
            world.lots.insert(
                lot.clone(),
                LotState {
                    lot,
                    material: r.get("material"),
                    on_hand: r.get("quantity_on_hand"),
                    status: r.get("status"),
                    location: r.get("location"),
                    origin_kind: r.get("origin_kind"),
                    work_order: r.get("work_order"),
                    is_new: false,
                    dirty: false,
                },
            );
        }
    }
    Ok(world)
}

async fn insert_scans(
    tx: &mut Transaction<'_, Postgres>,
    accepted: &[Accepted<'_>],
    received_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let n = accepted.len();
    let mut ids = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut wos = Vec::with_capacity(n);
    let mut ops = Vec::with_capacity(n);
    let mut stations = Vec::with_capacity(n);
    let mut lots = Vec::with_capacity(n);
    let mut materials = Vec::with_capacity(n);
    let mut quantities: Vec<Option<Decimal>> = Vec::with_capacity(n);
    let mut into_lots = Vec::with_capacity(n);
    let mut locations = Vec::with_capacity(n);
    let mut results = Vec::with_capacity(n);
    let mut defects = Vec::with_capacity(n);
    let mut scanned = Vec::with_capacity(n);
    let mut attributes = Vec::with_capacity(n);
    let mut hashes = Vec::with_capacity(n);
    let mut operators = Vec::with_capacity(n);
    let mut devices = Vec::with_capacity(n);
    let mut traceparents = Vec::with_capacity(n);
    for a in accepted {
        let s = a.input;
        ids.push(s.scan_id);
        kinds.push(s.kind.as_str().to_owned());
        wos.push(s.work_order.clone());
        ops.push(a.operation);
        stations.push(s.station.clone());
        lots.push(s.lot.clone());
        materials.push(a.material.clone());
        quantities.push(s.quantity);
        into_lots.push(s.into_lot.clone());
        locations.push(s.location.clone());
        results.push(s.result.map_or("", |r| r.as_str()));
        defects.push(s.defect_code.clone());
        scanned.push(s.scanned_at);
        attributes.push(s.attributes.clone());
        hashes.push(s.content_hash());
        operators.push(a.request.caller.user.clone());
        devices.push(a.request.caller.device.clone().unwrap_or_default());
        traceparents.push(a.request.traceparent.clone());
    }
    sqlx::query(
        "INSERT INTO scans (scan_id, kind, work_order, operation, station, lot, material, quantity, into_lot,
                            location, result, defect_code, scanned_at, attributes, content_hash,
                            operator, device, traceparent, received_at)
         SELECT u.*, $19
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int[], $5::text[], $6::text[], $7::text[],
                     $8::numeric[], $9::text[], $10::text[], $11::text[], $12::text[], $13::timestamptz[],
                     $14::text[], $15::text[], $16::text[], $17::text[], $18::text[]) AS u",
    )
    .bind(&ids)
    .bind(&kinds)
    .bind(&wos)
    .bind(&ops)
    .bind(&stations)
    .bind(&lots)
    .bind(&materials)
    .bind(&quantities)
    .bind(&into_lots)
    .bind(&locations)
    .bind(&results)
    .bind(&defects)
    .bind(&scanned)
    .bind(&attributes)
    .bind(&hashes)
    .bind(&operators)
    .bind(&devices)
    .bind(&traceparents)
    .bind(received_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Writes back every changed work order, operation and lot of `world`.
pub async fn write_world(
    tx: &mut Transaction<'_, Postgres>,
    world: &World,
) -> Result<(), sqlx::Error> {
    let dirty_lots: Vec<&LotState> = world.lots.values().filter(|l| l.dirty).collect();
    let (new_lots, old_lots): (Vec<&LotState>, Vec<&LotState>) =
        dirty_lots.into_iter().partition(|l| l.is_new);
    if !new_lots.is_empty() {
        sqlx::query(
            "INSERT INTO lots (lot, material, quantity_on_hand, status, location, origin_kind, work_order)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::numeric[], $4::text[], $5::text[], $6::text[], $7::text[])",
        )
        .bind(new_lots.iter().map(|l| l.lot.clone()).collect::<Vec<_>>())
        .bind(new_lots.iter().map(|l| l.material.clone()).collect::<Vec<_>>())
        .bind(new_lots.iter().map(|l| l.on_hand).collect::<Vec<_>>())
        .bind(new_lots.iter().map(|l| l.status.clone()).collect::<Vec<_>>())
        .bind(new_lots.iter().map(|l| l.location.clone()).collect::<Vec<_>>())
        .bind(new_lots.iter().map(|l| l.origin_kind.clone()).collect::<Vec<_>>())
        .bind(new_lots.iter().map(|l| l.work_order.clone()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    if !old_lots.is_empty() {
        sqlx::query(
            "UPDATE lots SET quantity_on_hand = u.q, status = u.status, location = u.location, updated_at = now()
             FROM UNNEST($1::text[], $2::numeric[], $3::text[], $4::text[]) AS u(lot, q, status, location)
             WHERE lots.lot = u.lot",
        )
        .bind(old_lots.iter().map(|l| l.lot.clone()).collect::<Vec<_>>())
        .bind(old_lots.iter().map(|l| l.on_hand).collect::<Vec<_>>())
        .bind(old_lots.iter().map(|l| l.status.clone()).collect::<Vec<_>>())
        .bind(old_lots.iter().map(|l| l.location.clone()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    let wos: Vec<&WorkOrderState> = world.work_orders.values().filter(|w| w.dirty).collect();
    if !wos.is_empty() {
        sqlx::query(
            "UPDATE work_orders SET status = u.status, produced_quantity = u.produced, scrap_quantity = u.scrap, updated_at = now()
             FROM UNNEST($1::text[], $2::text[], $3::numeric[], $4::numeric[]) AS u(number, status, produced, scrap)
             WHERE work_orders.number = u.number",
        )
        .bind(wos.iter().map(|w| w.number.clone()).collect::<Vec<_>>())
        .bind(wos.iter().map(|w| w.status.clone()).collect::<Vec<_>>())
        .bind(wos.iter().map(|w| w.produced).collect::<Vec<_>>())
        .bind(wos.iter().map(|w| w.scrap).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        let ops: Vec<(&String, &OperationState)> = wos
            .iter()
            .flat_map(|w| w.operations.values().map(move |o| (&w.number, o)))
            .collect();
        sqlx::query(
            "UPDATE work_order_operations o SET status = u.status, good_quantity = u.good, scrap_quantity = u.scrap
             FROM UNNEST($1::text[], $2::int[], $3::text[], $4::numeric[], $5::numeric[]) AS u(wo, step, status, good, scrap)
             WHERE o.work_order = u.wo AND o.step = u.step",
        )
        .bind(ops.iter().map(|(w, _)| (*w).clone()).collect::<Vec<_>>())
        .bind(ops.iter().map(|(_, o)| o.step).collect::<Vec<_>>())
        .bind(ops.iter().map(|(_, o)| o.status.clone()).collect::<Vec<_>>())
        .bind(ops.iter().map(|(_, o)| o.good).collect::<Vec<_>>())
        .bind(ops.iter().map(|(_, o)| o.scrap).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Stations named by a batch, as far as the reference cache knows them.
pub struct Reference {
    /// station → known (`Some`), or a cache miss (`None`).
    stations: Vec<(String, Option<bool>)>,
    /// The cache's invalidation generation at lookup time (`None`: Redis did not answer).
    generation: Option<String>,
}

/// Asks the reference cache about the stations `scans` name. Called before the transaction.
pub async fn lookup_reference(cache: &RefCache, scans: &[&ScanInput]) -> Reference {
    let stations: Vec<String> = scans
        .iter()
        .map(|s| s.station.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let found = cache.lookup(&[], &stations).await;
    Reference {
        stations: stations
            .into_iter()
            .map(|s| {
                let known = found
                    .stations
                    .get(&s)
                    .cloned()
                    .flatten()
                    .map(|v| !RefCache::is_missing(&v));
                (s, known)
            })
            .collect(),
        generation: found.generation,
    }
}

/// Adds the stations of `reference` to `world`: cache hits as they are, misses from the
/// database (then cached, off the commit path).
pub async fn complete_reference(
    tx: &mut Transaction<'_, Postgres>,
    cache: &RefCache,
    world: &mut World,
    reference: Reference,
) -> Result<(), sqlx::Error> {
    let mut missing = Vec::new();
    for (station, known) in reference.stations {
        match known {
            Some(true) => {
                world.stations.insert(station);
            }
            Some(false) => {}
            None => missing.push(station),
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let known: Vec<String> = sqlx::query_scalar("SELECT id FROM stations WHERE id = ANY($1)")
        .bind(&missing)
        .fetch_all(&mut **tx)
        .await?;
    let fill: Vec<(String, bool)> = missing
        .iter()
        .map(|s| (s.clone(), known.contains(s)))
        .collect();
    world.stations.extend(known);
    if let Some(generation) = reference.generation {
        let cache = cache.clone();
        tokio::spawn(async move { cache.fill(&generation, &[], &fill).await });
    }
    Ok(())
}
