//! Production confirmations out: a confirmation completes its production order, and the
//! lookups of orders, products, lots and moves that corrections share.
//!
//! A confirmation completes the order: consumed quantities and lots on the input moves
//! (`wait` first when needed), `assign_try` (or `assign_force`), `run`, the output `stock.lot`
//! created, quantity and lot on the output moves, an `ir.note` on the order whose message is
//! the idempotency key, `do`.
//!
//! Idempotency: each step checks the order's state, so a post interrupted half-way is finished
//! by the retry; the key goes on the order before `do`, so a `done` order that carries the key
//! is this confirmation (`AlreadyThere`). A confirmation of an order that is `done` without its
//! key — a follow-up (production booked after the operation's confirmation), a second
//! confirmation after a void and redo, an order closed by hand in Tryton — is booked next to it
//! as keyed corrections ([`super::reversal::post_confirmation_corrections`]), never dropped.
//! Scrap is not posted (base Tryton production has no scrap moves).

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::{Value, json};

use super::OPERATION_STEP;
use super::reversal::post_confirmation_corrections;
use super::rpc::Rpc;
use super::values::{Context, Found, Move, Production, ProductionState, Side, StateOf, resource};
use crate::adapter::{AdapterError, Posted};
use crate::domain::{Confirmation, LotQuantity};

/// Lots per product code, each with its quantity, in the confirmation's order.
type LotsByCode = BTreeMap<String, Vec<(String, Decimal)>>;

/// Posts a production confirmation (see the module's description).
pub async fn post(
    rpc: &Rpc,
    confirmation: &Confirmation,
    idempotency_key: &str,
) -> Result<Posted, AdapterError> {
    if confirmation.operation != OPERATION_STEP {
        return Err(AdapterError::Rejected(format!(
            "tryton production orders have one operation ({OPERATION_STEP}), not {}",
            confirmation.operation
        )));
    }
    if confirmation.is_follow_up() {
        // Late production: the order is done (its confirmation went first).
        return post_confirmation_corrections(rpc, confirmation, idempotency_key).await;
    }
    let (ctx, _) = rpc.ctx().await?;
    let production = production(rpc, &confirmation.work_order, &ctx).await?;
    let id = production.id;
    let keyed = production_keyed(rpc, id, idempotency_key, &ctx).await?;
    let waiting = match production.state {
        // This confirmation did it (a retry after Tryton took it).
        ProductionState::Done if keyed => return Ok(Posted::AlreadyThere),
        // Done by another confirmation (a void and redo) or by hand: this one's quantities
        // are booked next to it, keyed, rather than dropped.
        ProductionState::Done => {
            return post_confirmation_corrections(rpc, confirmation, idempotency_key).await;
        }
        ProductionState::Cancelled => {
            return Err(AdapterError::Rejected(format!(
                "production order {} is cancelled in tryton",
                confirmation.work_order
            )));
        }
        ProductionState::Request | ProductionState::Draft | ProductionState::Assigned => {
            // Quantities are read-only on assigned moves: back to waiting first.
            rpc.button("production", "wait", id, &ctx).await?;
            true
        }
        ProductionState::Waiting => true,
        // Running: the inputs are booked (an attempt stopped after `run`).
        ProductionState::Running => false,
    };
    if waiting {
        apply_lots(
            rpc,
            &production,
            Side::Inputs,
            &by_code(&confirmation.consumed_lots),
            &ctx,
        )
        .await?;
        rpc.button("production", "assign_try", id, &ctx).await?;
        if production_state(rpc, id, &ctx).await? != Some(ProductionState::Assigned) {
            rpc.button("production", "assign_force", id, &ctx).await?;
        }
        rpc.button("production", "run", id, &ctx).await?;
    }
    let mut outputs = by_code(&confirmation.produced_lots);
    if outputs.is_empty() {
        // Nothing lot-tracked produced: the good quantity on the main output, no lot.
        let moves = moves(rpc, id, Side::Outputs, &ctx).await?;
        if let Some(m) = moves.first() {
            outputs.insert(
                m.code().to_owned(),
                vec![(String::new(), confirmation.good_quantity)],
            );
        }
    }
    apply_lots(rpc, &production, Side::Outputs, &outputs, &ctx).await?;
    if !keyed {
        // The key goes on the order before `do`: a retry after `do` finds it (and answers
        // `AlreadyThere`), a retry before `do` finishes the order.
        rpc.create(
            "ir.note",
            json!({"resource": resource("production", id), "message": idempotency_key}),
            &ctx,
        )
        .await?;
    }
    rpc.button("production", "do", id, &ctx).await?;
    tracing::info!(
        idempotency_key,
        production = id,
        "tryton production order done"
    );
    Ok(Posted::New)
}

fn by_code(lots: &[LotQuantity]) -> LotsByCode {
    let mut m = LotsByCode::new();
    for l in lots {
        m.entry(l.material.clone())
            .or_default()
            .push((l.lot.clone(), l.quantity));
    }
    m
}

/// The production order numbered `number` (`Rejected` when Tryton has none).
pub async fn production(
    rpc: &Rpc,
    number: &str,
    ctx: &Context,
) -> Result<Production, AdapterError> {
    let found: Vec<Production> = rpc
        .search_read(
            "production",
            json!([["number", "=", number]]),
            Production::FIELDS,
            ctx,
        )
        .await?;
    found
        .into_iter()
        .next()
        .ok_or_else(|| AdapterError::Rejected(format!("tryton has no production order {number:?}")))
}

/// The state of production order `id` (`None`: gone).
pub async fn production_state(
    rpc: &Rpc,
    id: i64,
    ctx: &Context,
) -> Result<Option<ProductionState>, AdapterError> {
    let read: Option<StateOf<ProductionState>> =
        rpc.read("production", id, &["state"], ctx).await?;
    Ok(read.map(|r| r.state))
}

/// Whether the production order `id` carries the confirmation key `key` (an `ir.note`).
async fn production_keyed(
    rpc: &Rpc,
    id: i64,
    key: &str,
    ctx: &Context,
) -> Result<bool, AdapterError> {
    let notes: Vec<Found> = rpc
        .search_read(
            "ir.note",
            json!([
                ["message", "=", key],
                ["resource", "=", resource("production", id)]
            ]),
            &["id"],
            ctx,
        )
        .await?;
    Ok(!notes.is_empty())
}

/// The moves of one side of production `production`.
async fn moves(
    rpc: &Rpc,
    production: i64,
    side: Side,
    ctx: &Context,
) -> Result<Vec<Move>, AdapterError> {
    let rows: Vec<Move> = rpc
        .search_read(
            "stock.move",
            json!([[side.move_field(), "=", production]]),
            Move::FIELDS,
            ctx,
        )
        .await?;
    // A move without a product cannot be a template (nor carry lots).
    Ok(rows.into_iter().filter(|m| m.product.is_some()).collect())
}

/// The product's id (`Rejected` when Tryton has none with that code).
pub async fn product_id(rpc: &Rpc, code: &str, ctx: &Context) -> Result<i64, AdapterError> {
    let found: Vec<Found> = rpc
        .search_read(
            "product.product",
            json!([["code", "=", code]]),
            &["code"],
            ctx,
        )
        .await?;
    found
        .first()
        .map(|p| p.id)
        .ok_or_else(|| AdapterError::Rejected(format!("tryton has no product {code:?}")))
}

/// The lot's id, if Tryton knows it.
pub async fn find_lot(
    rpc: &Rpc,
    number: &str,
    product: i64,
    ctx: &Context,
) -> Result<Option<i64>, AdapterError> {
    let found: Vec<Found> = rpc
        .search_read(
            "stock.lot",
            json!([["number", "=", number], ["product", "=", product]]),
            &["number"],
            ctx,
        )
        .await?;
    Ok(found.first().map(|l| l.id))
}

/// The lot's id, created when Tryton does not know it yet.
pub async fn lot_id(
    rpc: &Rpc,
    number: &str,
    product: i64,
    ctx: &Context,
) -> Result<i64, AdapterError> {
    if let Some(id) = find_lot(rpc, number, product, ctx).await? {
        return Ok(id);
    }
    rpc.create(
        "stock.lot",
        json!({"number": number, "product": product}),
        ctx,
    )
    .await
}

/// Writes `lots` (per product code) on one side's moves: existing moves of a product get the
/// lots in order, more lots get new moves, moves left over are removed.
async fn apply_lots(
    rpc: &Rpc,
    production: &Production,
    side: Side,
    lots: &LotsByCode,
    ctx: &Context,
) -> Result<(), AdapterError> {
    let pid = production.id;
    let moves = moves(rpc, pid, side, ctx).await?;
    let mut to_delete = Vec::new();
    let mut to_create = Vec::new();
    for (code, per_lot) in lots {
        let mine: Vec<&Move> = moves.iter().filter(|m| m.code() == code).collect();
        let product = match mine.first().and_then(|m| m.product) {
            Some(p) => p,
            None => product_id(rpc, code, ctx).await?,
        };
        for (i, (lot, quantity)) in per_lot.iter().enumerate() {
            let lot = if lot.is_empty() {
                Value::Null
            } else {
                json!(lot_id(rpc, lot, product, ctx).await?)
            };
            let q = quantity.to_f64().unwrap_or(0.0);
            match mine.get(i) {
                Some(m) => {
                    rpc.write("stock.move", m.id, json!({"quantity": q, "lot": lot}), ctx)
                        .await?
                }
                None => {
                    let template = mine.first().copied().or_else(|| moves.first());
                    let mut vals = match template {
                        Some(t) => t.values(),
                        None => default_move(production, side)?,
                    };
                    vals["product"] = json!(product);
                    vals["quantity"] = json!(q);
                    vals["lot"] = lot;
                    if template.is_none_or(|t| t.product != Some(product)) {
                        // The unit of another product may not fit: Tryton takes the default.
                        if let Some(o) = vals.as_object_mut() {
                            o.remove("unit");
                        }
                    }
                    to_create.push(vals);
                }
            }
        }
        to_delete.extend(mine.iter().skip(per_lot.len()).map(|m| m.id));
    }
    if !to_create.is_empty() || !to_delete.is_empty() {
        let mut ops = Vec::new();
        if !to_create.is_empty() {
            ops.push(json!(["create", to_create]));
        }
        if !to_delete.is_empty() {
            ops.push(json!(["delete", to_delete]));
        }
        rpc.write("production", pid, json!({ side.field(): ops }), ctx)
            .await?;
    }
    Ok(())
}

/// A new move of a production without moves on that side: storage ↔ production location.
fn default_move(production: &Production, side: Side) -> Result<Value, AdapterError> {
    match (production.location, production.storage()) {
        (Some(p), Some(s)) if side == Side::Inputs => {
            Ok(json!({"from_location": s, "to_location": p}))
        }
        (Some(p), Some(s)) => Ok(json!({"from_location": p, "to_location": s})),
        _ => Err(AdapterError::Rejected(
            "the production order has no locations to add a move".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn production(state: &str, location: Value, storage: Value) -> Production {
        serde_json::from_value(json!({"id": 1, "state": state, "location": location,
            "warehouse": 4, "warehouse.": {"id": 4, "storage_location": storage}}))
        .unwrap()
    }

    #[test]
    fn a_first_move_of_a_side_goes_between_storage_and_the_production_location() {
        let p = production("waiting", json!(9), json!(5));
        assert_eq!(
            default_move(&p, Side::Inputs).unwrap(),
            json!({"from_location": 5, "to_location": 9})
        );
        assert_eq!(
            default_move(&p, Side::Outputs).unwrap(),
            json!({"from_location": 9, "to_location": 5})
        );
        let e =
            default_move(&production("waiting", json!(9), Value::Null), Side::Inputs).unwrap_err();
        assert!(matches!(e, AdapterError::Rejected(_)), "{e:?}");
    }

    #[test]
    fn confirmed_lots_are_grouped_by_material_in_their_order() {
        let lot = |material: &str, lot: &str, q: i64| LotQuantity {
            material: material.into(),
            lot: lot.into(),
            quantity: Decimal::from(q),
        };
        let grouped = by_code(&[lot("STL", "L2", 3), lot("BLT", "", 1), lot("STL", "L1", 2)]);
        assert_eq!(
            grouped.into_iter().collect::<Vec<_>>(),
            vec![
                ("BLT".to_owned(), vec![(String::new(), Decimal::from(1))]),
                (
                    "STL".to_owned(),
                    vec![
                        ("L2".to_owned(), Decimal::from(3)),
                        ("L1".to_owned(), Decimal::from(2))
                    ]
                ),
            ]
        );
    }
}
