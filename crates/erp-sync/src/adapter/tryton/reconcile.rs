//! Tryton's books for reconciliation: the good quantity per production order (its done
//! outputs of its own product, with the corrections booked next to it) and the on-hand
//! quantity per received lot in the warehouse's storage location.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde_json::json;

use super::not_correction;
use super::rpc::Rpc;
use super::values::{BookedMove, BookedProduction, LotQuantity, ProductionState, resource};
use crate::adapter::AdapterError;
use crate::domain::ErpQuantities;

/// The ERP's books: confirmed good quantity per work order, on-hand quantity per received lot.
pub async fn quantities(rpc: &Rpc) -> Result<ErpQuantities, AdapterError> {
    let mut q = ErpQuantities::default();
    let (ctx, session) = rpc.ctx().await?;
    let productions: Vec<BookedProduction> = rpc
        .search_read(
            "production",
            json!([
                [
                    "state",
                    "in",
                    ProductionState::domain(&ProductionState::BOOKED)
                ],
                not_correction()
            ]),
            BookedProduction::FIELDS,
            &ctx,
        )
        .await?;
    let origins = correction_origins(&productions);
    let corrections: Vec<BookedMove> = if origins.is_empty() {
        Vec::new()
    } else {
        rpc.search_read(
            "stock.move",
            json!([["state", "=", "done"], ["origin", "in", origins]]),
            BookedMove::CORRECTION_FIELDS,
            &ctx,
        )
        .await?
    };
    q.work_orders = good_quantities(&productions, &corrections);
    let lot_ctx = ctx.counted_in(session.storage);
    let lots: Vec<LotQuantity> = rpc
        .search_read(
            "stock.lot",
            json!([["product.producible", "=", false]]),
            LotQuantity::FIELDS,
            &lot_ctx,
        )
        .await?;
    for l in lots {
        if let (Some(n), Some(quantity)) = (l.number, l.quantity) {
            q.lots.insert(n, quantity);
        }
    }
    Ok(q)
}

/// The output moves of the done orders, as the `origin` their corrections name.
fn correction_origins(productions: &[BookedProduction]) -> Vec<String> {
    let mut origins: Vec<String> = productions
        .iter()
        .filter(|p| p.state == ProductionState::Done)
        .flat_map(BookedProduction::outputs)
        .filter_map(|o| Some(resource("stock.move", o.id?)))
        .collect();
    origins.sort();
    origins.dedup();
    origins
}

/// The good quantity per order number: a done order's outputs of its own product, less the
/// corrections of them back into the production location (reversals), plus those out of it
/// (production confirmed after the order was done). Orders not done count zero.
fn good_quantities(
    productions: &[BookedProduction],
    corrections: &[BookedMove],
) -> BTreeMap<String, Decimal> {
    let mut output_of: BTreeMap<String, &BookedProduction> = BTreeMap::new();
    for p in productions {
        if p.state != ProductionState::Done {
            continue;
        }
        for o in p.outputs() {
            if let Some(id) = o.id {
                output_of.insert(resource("stock.move", id), p);
            }
        }
    }
    let mut reversed: BTreeMap<i64, Decimal> = BTreeMap::new();
    for m in corrections {
        let Some(p) = m.origin.as_ref().and_then(|o| output_of.get(o)) else {
            continue;
        };
        if m.product == p.product {
            let q = m.quantity.unwrap_or_default();
            let back = m.to_location == p.location;
            let e = reversed.entry(p.id).or_default();
            *e = if back {
                e.checked_add(q)
            } else {
                e.checked_sub(q)
            }
            .unwrap_or(Decimal::MAX);
        }
    }
    let mut good_of = BTreeMap::new();
    for p in productions {
        let Some(number) = &p.number else {
            continue;
        };
        let mut good = Decimal::ZERO;
        if p.state == ProductionState::Done {
            for o in p.outputs() {
                if o.product == p.product {
                    let q = o.quantity.unwrap_or_default();
                    good = good.checked_add(q).unwrap_or(Decimal::MAX);
                }
            }
        }
        if let Some(back) = reversed.get(&p.id) {
            good -= *back;
        }
        good_of.insert(number.clone(), good);
    }
    good_of
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn production(id: i64, number: &str, state: &str, outputs: Value) -> BookedProduction {
        serde_json::from_value(json!({"id": id, "number": number, "state": state,
            "product": 3, "location": 9, "outputs.": outputs}))
        .unwrap()
    }

    fn correction(origin: &str, product: i64, quantity: f64, to_location: i64) -> BookedMove {
        serde_json::from_value(json!({"id": 100, "origin": origin, "product": product,
            "quantity": quantity, "to_location": to_location}))
        .unwrap()
    }

    #[test]
    fn a_done_order_counts_its_own_outputs_and_their_corrections() {
        let productions = vec![
            production(
                1,
                "MO/1",
                "done",
                json!([{"id": 11, "product": 3, "quantity": 10.0},
                       {"id": 12, "product": 3, "quantity": 2.0},
                       {"id": 13, "product": 4, "quantity": 7.0}]),
            ),
            production(
                2,
                "MO/2",
                "running",
                json!([{"id": 21, "product": 3, "quantity": 5.0}]),
            ),
        ];
        // Only done orders' outputs are origins of corrections.
        assert_eq!(
            correction_origins(&productions),
            vec!["stock.move,11", "stock.move,12", "stock.move,13"]
        );
        let corrections = vec![
            // A late produce into storage (out of the production location): +3.
            correction("stock.move,11", 3, 3.0, 5),
            // A voided produce back into the production location: -1.
            correction("stock.move,12", 3, 1.0, 9),
            // Another product, an unknown origin, an order that is not done: not counted.
            correction("stock.move,13", 4, 7.0, 9),
            correction("stock.move,99", 3, 50.0, 9),
            correction("stock.move,21", 3, 5.0, 9),
        ];
        let good = good_quantities(&productions, &corrections);
        assert_eq!(good["MO/1"], Decimal::from(14));
        // Not done: nothing booked yet.
        assert_eq!(good["MO/2"], Decimal::ZERO);
        assert_eq!(good.len(), 2);
    }

    #[test]
    fn an_order_without_a_number_is_left_out() {
        let mut p = production(1, "MO/1", "done", json!([]));
        p.number = None;
        assert!(good_quantities(&[p], &[]).is_empty());
    }
}
