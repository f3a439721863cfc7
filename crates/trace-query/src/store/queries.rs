//! The read queries. Each answer is one SQL statement (one consistent snapshot, one round trip).

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mes_proto::v1 as pb;
use rust_decimal::Decimal;
use sqlx::{PgPool, Row};

use crate::domain::{self, CycleFacts, Direction, GroupBy, Window, timestamp};
use crate::store::decimal;

/// Backward genealogy as one statement: the walk (a recursive CTE over the edges: `UNION`
/// deduplicates (lot, depth) pairs, so a cycle adds at most one row per lot and level and the
/// depth limit ends it), then the nodes (each lot at its shortest depth), the edges walked, and a
/// `t` row when the depth limit cut the walk short.
pub const BACKWARD: &str = "
WITH RECURSIVE walk(lot, depth) AS (
    SELECT $1::text, 0
  UNION
    SELECT e.from_lot, w.depth + 1
    FROM walk w JOIN genealogy_edges e ON e.to_lot = w.lot
    WHERE w.depth < $2
),
reached AS (SELECT lot, min(depth) AS depth FROM walk GROUP BY lot),
walked AS (
    SELECT e.* FROM genealogy_edges e JOIN reached r ON e.to_lot = r.lot WHERE r.depth < $2
)
SELECT 'n' AS row_kind, r.lot AS a, '' AS b, r.depth, l.lot IS NOT NULL AS known,
       COALESCE(l.material, wm.material, '') AS material,
       COALESCE(l.work_order, wm.work_order, '') AS work_order,
       l.quantity, l.produced_at AS at, COALESCE(l.supplier, '') AS supplier,
       COALESCE(l.supplier_lot, '') AS supplier_lot, '' AS station, '' AS operator
FROM reached r
LEFT JOIN lots l ON l.lot = r.lot
LEFT JOIN LATERAL (
    SELECT e.work_order, w.material FROM genealogy_edges e
    LEFT JOIN work_orders w ON w.number = e.work_order
    WHERE l.lot IS NULL AND e.to_lot = r.lot LIMIT 1
) wm ON true
UNION ALL
SELECT 'e', w.from_lot, w.to_lot, 0, true, '', w.work_order, w.quantity, w.at, '', '',
       w.station, w.operator
FROM walked w
UNION ALL
SELECT 't', '', '', 0, true, '', '', NULL, NULL, '', '', '', ''
WHERE EXISTS (
    SELECT 1 FROM reached r JOIN genealogy_edges e ON e.to_lot = r.lot WHERE r.depth = $2
)";

/// Forward genealogy: [`BACKWARD`] with the edges followed the other way.
pub const FORWARD: &str = "
WITH RECURSIVE walk(lot, depth) AS (
    SELECT $1::text, 0
  UNION
    SELECT e.to_lot, w.depth + 1
    FROM walk w JOIN genealogy_edges e ON e.from_lot = w.lot
    WHERE w.depth < $2
),
reached AS (SELECT lot, min(depth) AS depth FROM walk GROUP BY lot),
walked AS (
    SELECT e.* FROM genealogy_edges e JOIN reached r ON e.from_lot = r.lot WHERE r.depth < $2
)
SELECT 'n' AS row_kind, r.lot AS a, '' AS b, r.depth, l.lot IS NOT NULL AS known,
       COALESCE(l.material, wm.material, '') AS material,
       COALESCE(l.work_order, wm.work_order, '') AS work_order,
       l.quantity, l.produced_at AS at, COALESCE(l.supplier, '') AS supplier,
       COALESCE(l.supplier_lot, '') AS supplier_lot, '' AS station, '' AS operator
FROM reached r
LEFT JOIN lots l ON l.lot = r.lot
LEFT JOIN LATERAL (
    SELECT e.work_order, w.material FROM genealogy_edges e
    LEFT JOIN work_orders w ON w.number = e.work_order
    WHERE l.lot IS NULL AND e.to_lot = r.lot LIMIT 1
) wm ON true
UNION ALL
SELECT 'e', w.from_lot, w.to_lot, 0, true, '', w.work_order, w.quantity, w.at, '', '',
       w.station, w.operator
FROM walked w
UNION ALL
SELECT 't', '', '', 0, true, '', '', NULL, NULL, '', '', '', ''
WHERE EXISTS (
    SELECT 1 FROM reached r JOIN genealogy_edges e ON e.from_lot = r.lot WHERE r.depth = $2
)";

/// The genealogy of `lot`, `None` when the lot is unknown.
///
/// Nodes come ordered by depth then lot; edges by time, then lots. One edge per consume scan
/// (two consumes of the same lot give two edges, each with its quantity, station, operator and
/// time). A lot named by a consume's `into_lot` but not produced yet appears as a node with the
/// work order's material and quantity 0.
#[tracing::instrument(skip(pool), fields(direction = direction.as_str()))]
pub async fn genealogy(
    pool: &PgPool,
    lot: &str,
    direction: Direction,
    max_depth: u32,
) -> Result<Option<pb::Genealogy>, sqlx::Error> {
    let sql = match direction {
        Direction::Backward => BACKWARD,
        Direction::Forward => FORWARD,
    };
    let rows = sqlx::query(sql)
        .bind(lot)
        .bind(max_depth as i32)
        .fetch_all(pool)
        .await?;
    let mut g = pb::Genealogy {
        root: lot.to_owned(),
        direction: direction.to_proto() as i32,
        ..Default::default()
    };
    let mut root_known = false;
    for r in rows {
        let at: Option<DateTime<Utc>> = r.get("at");
        let quantity: Option<Decimal> = r.get("quantity");
        match r.get::<&str, _>("row_kind") {
            "n" => {
                let node_lot: String = r.get("a");
                let depth: i32 = r.get("depth");
                if depth == 0 && node_lot == lot {
                    root_known = r.get("known");
                }
                g.nodes.push(pb::GenealogyNode {
                    lot: node_lot,
                    material: r.get("material"),
                    work_order: r.get("work_order"),
                    // A lot named by into_lot but not produced yet holds nothing so far.
                    quantity: decimal(quantity.unwrap_or_default()),
                    produced_at: at.map(timestamp),
                    depth: u32::try_from(depth).unwrap_or(0),
                    supplier: r.get("supplier"),
                    supplier_lot: r.get("supplier_lot"),
                });
            }
            "e" => g.edges.push(pb::GenealogyEdge {
                from: r.get("a"),
                to: r.get("b"),
                work_order: r.get("work_order"),
                quantity: quantity.map(decimal).unwrap_or_default(),
                station: r.get("station"),
                operator: r.get("operator"),
                at: at.map(timestamp),
            }),
            _ => g.truncated = true,
        }
    }
    if !root_known {
        return Ok(None);
    }
    g.nodes
        .sort_by(|a, b| (a.depth, &a.lot).cmp(&(b.depth, &b.lot)));
    g.edges.sort_by(|a, b| {
        let key = |e: &pb::GenealogyEdge| {
            (
                e.at.as_ref().map(|t| (t.seconds, t.nanos)),
                e.from.clone(),
                e.to.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    Ok(Some(g))
}

/// Every scan that touched `lot` (as its lot, or as the `into_lot` of a consume), voided ones
/// and the voids themselves included, ordered by `scanned_at`, then `received_at`, then feed
/// position. `None` when the lot is unknown.
#[tracing::instrument(skip(pool))]
pub async fn history(pool: &PgPool, lot: &str) -> Result<Option<pb::LotHistory>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT s.scan_id, s.kind, s.work_order, s.station, s.operator, s.quantity, s.scanned_at,
                s.received_at, s.trace_id
         FROM (SELECT lot FROM lots WHERE lot = $1) l
         LEFT JOIN LATERAL (
             SELECT * FROM scans WHERE lot = $1
             UNION
             SELECT * FROM scans WHERE into_lot = $1
         ) s ON true
         ORDER BY s.scanned_at, s.received_at, s.position",
    )
    .bind(lot)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut h = pb::LotHistory {
        lot: lot.to_owned(),
        events: Vec::new(),
    };
    for r in rows {
        let Some(scan_id) = r.get::<Option<uuid::Uuid>, _>("scan_id") else {
            continue;
        };
        let quantity: Option<Decimal> = r.get("quantity");
        h.events.push(pb::LotEvent {
            scan_id: scan_id.to_string(),
            kind: r.get("kind"),
            work_order: r.get("work_order"),
            station: r.get("station"),
            operator: r.get("operator"),
            quantity: quantity.map(decimal).unwrap_or_default(),
            scanned_at: Some(timestamp(r.get("scanned_at"))),
            received_at: Some(timestamp(r.get("received_at"))),
            trace_id: r.get("trace_id"),
        });
    }
    Ok(Some(h))
}

/// Per operation of the routing: good (produce) and scrap quantities, first and last scan, mean
/// cycle seconds ([`domain::mean_cycle_seconds`]); voided scans and voids do not count.
/// `None` when the work order is unknown.
#[tracing::instrument(skip(pool))]
pub async fn work_order_summary(
    pool: &PgPool,
    work_order: &str,
) -> Result<Option<pb::WorkOrderSummary>, sqlx::Error> {
    let rows = sqlx::query(
        "WITH agg AS (
             SELECT operation AS step,
                    COALESCE(sum(quantity) FILTER (WHERE kind = 'produce'), 0) AS good,
                    COALESCE(sum(quantity) FILTER (WHERE kind = 'scrap'), 0) AS scrap,
                    min(scanned_at) AS first_at, max(scanned_at) AS last_at,
                    count(*) FILTER (WHERE kind = 'produce') AS produces,
                    min(scanned_at) FILTER (WHERE kind = 'produce') AS first_produce,
                    max(scanned_at) FILTER (WHERE kind = 'produce') AS last_produce,
                    min(scanned_at) FILTER (WHERE kind = 'start_operation') AS started,
                    max(scanned_at) FILTER (WHERE kind = 'complete_operation') AS completed
             FROM scans WHERE work_order = $1 AND kind <> 'void' AND voided_by IS NULL
             GROUP BY operation)
         SELECT w.planned_quantity, (SELECT COALESCE(sum(good), 0) FROM agg) AS produced,
                o.step, o.station, a.good, a.scrap, a.first_at, a.last_at, a.produces,
                a.first_produce, a.last_produce, a.started, a.completed
         FROM work_orders w
         LEFT JOIN work_order_operations o ON o.work_order = w.number
         LEFT JOIN agg a ON a.step = o.step
         WHERE w.number = $1
         ORDER BY o.step",
    )
    .bind(work_order)
    .fetch_all(pool)
    .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let mut s = pb::WorkOrderSummary {
        work_order: work_order.to_owned(),
        planned_quantity: decimal(first.get("planned_quantity")),
        produced_quantity: decimal(first.get("produced")),
        operations: Vec::new(),
    };
    for r in &rows {
        let Some(step) = r.get::<Option<i32>, _>("step") else {
            continue;
        };
        let facts = CycleFacts {
            produces: r.get::<Option<i64>, _>("produces").unwrap_or(0),
            first_produce: r.get("first_produce"),
            last_produce: r.get("last_produce"),
            started: r.get("started"),
            completed: r.get("completed"),
        };
        let first_at: Option<DateTime<Utc>> = r.get("first_at");
        let last_at: Option<DateTime<Utc>> = r.get("last_at");
        s.operations.push(pb::OperationSummary {
            step: u32::try_from(step).unwrap_or(0),
            station: r.get::<Option<String>, _>("station").unwrap_or_default(),
            good_quantity: decimal(r.get::<Option<Decimal>, _>("good").unwrap_or_default()),
            scrap_quantity: decimal(r.get::<Option<Decimal>, _>("scrap").unwrap_or_default()),
            first_scan_at: first_at.map(timestamp),
            last_scan_at: last_at.map(timestamp),
            mean_cycle_seconds: domain::mean_cycle_seconds(&facts),
        });
    }
    Ok(Some(s))
}

/// Good (produce) and scrap quantities and the number of scans (voided scans and voids not
/// counted) with `scanned_at` in `[from, to)`, grouped, ordered by key. Whole hours come from
/// the hourly rollup, the partial hours at the ends from the scans.
#[tracing::instrument(skip(pool))]
pub async fn production_report(
    pool: &PgPool,
    window: Window,
    group_by: GroupBy,
) -> Result<pb::ProductionReport, sqlx::Error> {
    let (start, end) = window.whole_hours();
    let rows = sqlx::query(
        "WITH parts AS (
             SELECT hour, station, material, work_order, good, scrap, scans
             FROM production_hourly WHERE hour >= $3 AND hour < $4
           UNION ALL
             SELECT date_trunc('hour', scanned_at, 'UTC'), station, material, work_order,
                    CASE WHEN kind = 'produce' THEN COALESCE(quantity, 0) ELSE 0 END,
                    CASE WHEN kind = 'scrap' THEN COALESCE(quantity, 0) ELSE 0 END,
                    1
             FROM scans
             WHERE kind <> 'void' AND voided_by IS NULL
               AND ((scanned_at >= $1 AND scanned_at < $3) OR (scanned_at >= $4 AND scanned_at < $2))
         ),
         keyed AS (
             SELECT CASE $5 WHEN 'station' THEN station
                            WHEN 'material' THEN material
                            WHEN 'work_order' THEN work_order
                            ELSE '' END AS key,
                    hour, good, scrap, scans
             FROM parts
         )
         SELECT key, min(hour) AS hour, sum(good) AS good, sum(scrap) AS scrap,
                sum(scans)::bigint AS scans
         FROM keyed
         GROUP BY key, CASE WHEN $5 = 'hour' THEN hour END
         HAVING sum(scans) > 0
         ORDER BY 2, 1",
    )
    .bind(window.from)
    .bind(window.to)
    .bind(start)
    .bind(end)
    .bind(group_by.as_str())
    .fetch_all(pool)
    .await?;
    let mut out: Vec<pb::ReportRow> = rows
        .into_iter()
        .map(|r| {
            let key = match group_by {
                GroupBy::Hour => domain::hour_key(r.get("hour")),
                _ => r.get("key"),
            };
            pb::ReportRow {
                key,
                good: decimal(r.get("good")),
                scrap: decimal(r.get("scrap")),
                scans: u64::try_from(r.get::<i64, _>("scans")).unwrap_or(0),
            }
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(pb::ProductionReport { rows: out })
}

/// Streams every known lot to `f` (the membership filter is rebuilt from it).
pub async fn each_lot(pool: &PgPool, mut f: impl FnMut(&str)) -> Result<u64, sqlx::Error> {
    let mut rows = sqlx::query_scalar::<_, String>("SELECT lot FROM lots").fetch(pool);
    let mut n = 0;
    while let Some(lot) = rows.try_next().await? {
        f(&lot);
        n += 1;
    }
    Ok(n)
}
