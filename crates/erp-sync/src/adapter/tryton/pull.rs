//! Master data in: materials (`product.product`), the configured station, received lots
//! (`stock.lot`) and work orders (`production`), in the contract's shape.
//!
//! Each record is mapped to the contract's JSON and checked there ([`crate::contract`]), so a
//! record that departs from it is one dead letter with its fields named, not a failed pull:
//! that is why the records stay `serde_json::Value`s here.
//!
//! Incremental pulls ask for records created or written since the cursor (the newest
//! `create_date`/`write_date` seen, minus a few seconds of overlap: Tryton stamps the start of
//! its transactions); upserts on the MES side are idempotent.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::rpc::Rpc;
use super::values::{
    Context, ProductionState, code, datetime, decimal, quantity_string, tagged_datetime,
};
use super::{OPERATION_STEP, not_correction};
use crate::adapter::{AdapterError, Pulled};
use crate::contract::{self, Checked};
use crate::domain::{Material, ReceivedLot, Station, WorkOrder};

/// Overlap of incremental pulls (transaction-start timestamps commit late).
const OVERLAP_SECONDS: i64 = 5;

/// What an incremental pull reads.
struct Query<'a> {
    model: &'a str,
    domain: Vec<Value>,
    /// Date fields ORed into the "changed since" filter besides the record's own.
    extra_since: &'a [&'a str],
    fields: &'a [&'a str],
    ctx: Context,
}

/// `product.product` of type goods: `code` → number, `name` → description, default unit
/// symbol → unit; tracking is `lot` (Tryton has lots, no serial numbers).
pub async fn materials(rpc: &Rpc, since: Option<&str>) -> Result<Pulled<Material>, AdapterError> {
    let (ctx, _) = rpc.ctx().await?;
    let query = Query {
        model: "product.product",
        domain: vec![json!(["type", "=", "goods"])],
        extra_since: &[],
        fields: &["code", "name", "default_uom.symbol"],
        ctx,
    };
    pull_with(
        rpc,
        query,
        since,
        |row| {
            Some(json!({
                "number": row.get("code").cloned().unwrap_or(Value::Null),
                "description": row.get("name").cloned().unwrap_or(Value::Null),
                "tracking": "lot",
                "unit": row.get("default_uom.").and_then(|u| u.get("symbol")).cloned()
                    .unwrap_or(Value::Null),
            }))
        },
        contract::material,
    )
    .await
}

/// The base modules have no work centers the adapter uses: one configured station.
pub fn stations(station: &str, since: Option<&str>) -> Pulled<Station> {
    let station = json!({"id": station, "name": "Tryton production"});
    Pulled {
        items: vec![contract::station(&station, 0)],
        notes: Vec::new(),
        cursor: since.map(str::to_owned),
    }
}

/// `stock.lot` of non-producible products with their quantity in the warehouse's storage
/// location; lots at zero are skipped.
pub async fn received_lots(
    rpc: &Rpc,
    since: Option<&str>,
) -> Result<Pulled<ReceivedLot>, AdapterError> {
    let (ctx, session) = rpc.ctx().await?;
    let ctx = ctx.counted_in(session.storage);
    let query = Query {
        model: "stock.lot",
        domain: vec![json!(["product.producible", "=", false])],
        extra_since: &[],
        fields: &["number", "product.code", "quantity"],
        ctx,
    };
    pull_with(
        rpc,
        query,
        since,
        |row| {
            // A lot with nothing in stock is not material the shop floor can use.
            if row
                .get("quantity")
                .and_then(decimal)
                .is_some_and(|q| q <= Decimal::ZERO)
            {
                return None;
            }
            Some(json!({
                "lot": row.get("number").cloned().unwrap_or(Value::Null),
                "material": code(row, "product."),
                "quantity": row.get("quantity").map(quantity_string).unwrap_or(Value::Null),
                "received_at": row.get("create_date").and_then(datetime)
                    .map(|t| t.and_utc().to_rfc3339()),
            }))
        },
        contract::received_lot,
    )
    .await
}

/// `production` orders from `waiting` on, correction productions left out.
pub async fn work_orders(
    rpc: &Rpc,
    station: &str,
    since: Option<&str>,
) -> Result<Pulled<WorkOrder>, AdapterError> {
    let (ctx, _) = rpc.ctx().await?;
    let query = Query {
        model: "production",
        domain: vec![
            json!([
                "state",
                "in",
                ProductionState::domain(&ProductionState::FOR_THE_MES)
            ]),
            not_correction(),
        ],
        extra_since: &["inputs.write_date"],
        fields: &[
            "number",
            "state",
            "quantity",
            "product.code",
            "inputs.product.code",
            "inputs.quantity",
            "bom.inputs.product.code",
            "bom.inputs.quantity",
            "bom.outputs.product.code",
            "bom.outputs.quantity",
        ],
        ctx,
    };
    pull_with(
        rpc,
        query,
        since,
        |row| work_order_json(row, station),
        contract::work_order,
    )
    .await
}

/// The domain of records changed since the cursor (extra terms ORed in).
fn since_domain(since: Option<&str>, extra: &[&str]) -> Option<Value> {
    let t = since
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())?
        .with_timezone(&Utc)
        - chrono::Duration::seconds(OVERLAP_SECONDS);
    let t = tagged_datetime(t.naive_utc());
    let mut or = vec![
        json!("OR"),
        json!(["write_date", ">=", t]),
        json!(["create_date", ">=", t]),
    ];
    for f in extra {
        or.push(json!([f, ">=", t]));
    }
    Some(Value::Array(or))
}

/// Records of `query` changed since the cursor, mapped to the contract's shape by `map`
/// (`None`: skipped) and checked by `check`.
async fn pull_with<T>(
    rpc: &Rpc,
    query: Query<'_>,
    since: Option<&str>,
    map: impl Fn(&Value) -> Option<Value>,
    check: fn(&Value, usize) -> Checked<T>,
) -> Result<Pulled<T>, AdapterError> {
    let Query {
        model,
        mut domain,
        extra_since,
        fields,
        ctx,
    } = query;
    if let Some(d) = since_domain(since, extra_since) {
        domain.push(d);
    }
    let mut all_fields: Vec<&str> = fields.to_vec();
    all_fields.extend(["write_date", "create_date"]);
    let rows = rpc
        .search_read_values(model, Value::Array(domain), &all_fields, &ctx)
        .await?;
    let mut newest: Option<NaiveDateTime> = None;
    let mut items = Vec::new();
    for row in &rows {
        for f in ["write_date", "create_date"] {
            if let Some(t) = row.get(f).and_then(datetime) {
                newest = Some(newest.map_or(t, |n| n.max(t)));
            }
        }
        if let Some(canonical) = map(row) {
            let i = items.len();
            items.push(check(&canonical, i));
        }
    }
    let cursor = newest
        .map(|t| {
            t.and_utc()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        })
        .or_else(|| since.map(str::to_owned));
    Ok(Pulled {
        items,
        notes: Vec::new(),
        cursor,
    })
}

/// A production order in the contract's shape (`None`: not for the MES, e.g. a draft).
///
/// `waiting|assigned|running` → released, `done` → closed, `cancelled` → cancelled; one
/// operation ([`OPERATION_STEP`]) at `station`; components per unit from the BOM, or from the
/// planned input moves when the order has no BOM. A state this adapter does not know goes to
/// the contract as it is (the record becomes a dead letter that names its status).
fn work_order_json(row: &Value, station: &str) -> Option<Value> {
    let state = row.get("state").and_then(Value::as_str);
    let status = match state.map(str::parse::<ProductionState>) {
        Some(Ok(state)) => Value::from(state.work_order_status()?),
        Some(Err(unknown)) => {
            tracing::warn!(number = ?row.get("number"), error = %unknown,
                "tryton production order in a state this adapter does not know");
            Value::from(unknown.state)
        }
        None => Value::from(""),
    };
    let quantity = row.get("quantity").and_then(decimal);
    let product_code = code(row, "product.");
    let mut per_product: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut bad = Vec::new();
    // The BOM's quantities per unit of the output, or the planned inputs per ordered unit.
    let bom = row.get("bom.").filter(|b| b.is_object());
    let bom_output = bom
        .and_then(|b| b.get("outputs."))
        .and_then(Value::as_array)
        .and_then(|outs| {
            outs.iter()
                .find(|o| code(o, "product.") == product_code)
                .and_then(|o| o.get("quantity"))
                .and_then(decimal)
        });
    let (lines, per) = match (bom, bom_output) {
        (Some(b), Some(out)) if out > Decimal::ZERO => (b.get("inputs."), Some(out)),
        _ => (row.get("inputs."), quantity),
    };
    for line in lines.and_then(Value::as_array).into_iter().flatten() {
        let c = code(line, "product.");
        let q = line.get("quantity").and_then(decimal);
        // Checked arithmetic: absurd quantities make a dead letter, not a panic.
        let summed = match (c.as_str(), q, per) {
            (Some(code), Some(q), Some(per)) if per > Decimal::ZERO => q
                .checked_div(per)
                .and_then(|v| {
                    per_product
                        .get(code)
                        .copied()
                        .unwrap_or_default()
                        .checked_add(v)
                })
                .map(|sum| (code.to_owned(), sum)),
            _ => None,
        };
        match summed {
            Some((code, sum)) => {
                per_product.insert(code, sum);
            }
            None => bad.push(json!({"material": c, "quantity_per_unit": line.get("quantity")})),
        }
    }
    let mut components: Vec<Value> = per_product
        .into_iter()
        .map(|(m, q)| json!({"material": m, "quantity_per_unit": q.round_dp(6).normalize().to_string()}))
        .collect();
    components.extend(bad);
    Some(json!({
        "number": row.get("number").cloned().unwrap_or(Value::Null),
        "material": product_code,
        "planned_quantity": row.get("quantity").map(quantity_string).unwrap_or(Value::Null),
        "status": status,
        "operations": [{"step": OPERATION_STEP, "station": station, "description": "Production"}],
        "components": components,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_production_order_becomes_a_work_order() {
        let row = json!({"id": 1, "number": "1", "state": "waiting", "quantity": 10.0,
            "product.": {"id": 1, "code": "WID"},
            "inputs.": [{"quantity": 20.0, "product.": {"code": "STL"}}],
            "bom.": {"id": 1, "inputs.": [{"quantity": 2.0, "product.": {"code": "STL"}},
                                          {"quantity": 4.0, "product.": {"code": "BLT"}}],
                     "outputs.": [{"quantity": 1.0, "product.": {"code": "WID"}}]}});
        let c = contract::work_order(&work_order_json(&row, "ST").unwrap(), 0);
        assert!(c.drifts.is_empty(), "{:?}", c.drifts);
        let wo = c.record.unwrap();
        assert_eq!(wo.components.len(), 2);
        assert_eq!(wo.components[0].material, "BLT");
        assert_eq!(wo.components[0].quantity_per_unit, Decimal::from(4));
        assert_eq!(wo.operations[0].station, "ST");
        // Without a BOM: the planned inputs per ordered unit.
        let mut no_bom = row.clone();
        no_bom["bom."] = Value::Null;
        let wo = contract::work_order(&work_order_json(&no_bom, "ST").unwrap(), 0)
            .record
            .unwrap();
        assert_eq!(wo.components[0].quantity_per_unit, Decimal::from(2));
        // Drafts are not released; a product without a code is a dead letter.
        let mut draft = row.clone();
        draft["state"] = json!("draft");
        assert!(work_order_json(&draft, "ST").is_none());
        let mut nocode = row;
        nocode["product."] = json!({"id": 1, "code": null});
        assert!(
            contract::work_order(&work_order_json(&nocode, "ST").unwrap(), 0)
                .record
                .is_none()
        );
    }

    #[test]
    fn each_tryton_state_is_a_work_order_status_or_left_out() {
        let row = |state: Value| {
            json!({"id": 1, "number": "MO/1", "state": state, "quantity": 1.0,
                   "product.": {"id": 1, "code": "WID"}, "inputs.": [], "bom.": null})
        };
        let status =
            |state: &str| work_order_json(&row(json!(state)), "ST").map(|wo| wo["status"].clone());
        assert_eq!(status("request"), None);
        assert_eq!(status("draft"), None);
        for released in ["waiting", "assigned", "running"] {
            assert_eq!(status(released), Some(json!("released")), "{released}");
        }
        assert_eq!(status("done"), Some(json!("closed")));
        assert_eq!(status("cancelled"), Some(json!("cancelled")));
        // A state this adapter does not know is not skipped: the record is a dead letter.
        let unknown = work_order_json(&row(json!("finished")), "ST").unwrap();
        assert_eq!(unknown["status"], json!("finished"));
        let checked = contract::work_order(&unknown, 0);
        assert!(checked.record.is_none());
        assert!(!checked.drifts.is_empty());
        // No state at all: the contract reports the missing status.
        let missing = work_order_json(&row(Value::Null), "ST").unwrap();
        assert!(contract::work_order(&missing, 0).record.is_none());
    }

    #[test]
    fn incremental_pulls_overlap_the_cursor_by_a_few_seconds() {
        assert_eq!(since_domain(None, &[]), None);
        assert_eq!(since_domain(Some("not a time"), &[]), None);
        let d = since_domain(Some("2026-11-25T11:37:30Z"), &["inputs.write_date"]).unwrap();
        let t = json!({"__class__": "datetime", "year": 2026, "month": 11, "day": 25,
                       "hour": 11, "minute": 37, "second": 25, "microsecond": 0});
        assert_eq!(
            d,
            json!([
                "OR",
                ["write_date", ">=", t],
                ["create_date", ">=", t],
                ["inputs.write_date", ">=", t]
            ])
        );
    }
}
