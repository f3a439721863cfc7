//! Corrections next to a `done` production order (which Tryton cannot undo): reversals of
//! scans voided after their confirmation, and confirmations of an order that is done already
//! (follow-ups, a second confirmation after a void and redo, an order closed by hand).
//!
//! With the locations of the production order (its `location`, its warehouse's
//! `storage_location`):
//! - into storage (a voided consume; production booked after the order was done): a
//!   `stock.move` of the lot from the production location to storage (priced at the corrected
//!   move's cost), with an `ir.note` on it whose message is the idempotency key (stock.move has
//!   no text field of its own), then `do`;
//! - out of storage (a voided produce; consumption booked after the order was done): Tryton
//!   takes stock out of storage only through an assignment, which its API offers on documents,
//!   not on a lone move (`do` is read-only on a draft move that needs one): the lot goes back
//!   to the production location as the input move of a correction production (no product, no
//!   outputs, `reference` = `erp-sync <key>`, created with its move in one call), run through
//!   `wait`, `assign_try`/`assign_force`, `run`, `do`. Correction productions are left out of
//!   pulls; reconciliation counts them (their moves' `origin` is the order's move they correct).
//!
//! Exactly once: before creating, the adapter looks for the key (the note, the reference) and
//! answers `AlreadyThere` when the correction is done, or finishes it when a stopped attempt
//! left it undone; a keyless draft move identical to the one to create (an attempt stopped
//! between the move and its note) is adopted rather than doubled.
//!
//! What cannot be posted lands in the dead letters with the quantities to book by hand
//! (`erp_reversals_manual_total`): scrap (never posted), an order that is not `done`, an
//! unknown product or lot, an order without a move of that product.

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::{Value, json};

use super::CORRECTION_PREFIX;
use super::confirm::{find_lot, lot_id, product_id, production, production_state};
use super::rpc::Rpc;
use super::values::{
    Company, Context, CorrectedMove, Found, MoveState, Note, Production, ProductionState, Side,
    StateOf, resource, tagged_decimal,
};
use crate::adapter::{AdapterError, Posted};
use crate::domain::{Confirmation, LotQuantity, Reversal};

/// One correction next to a done production: `quantity` of `code` (lot `lot`) into storage
/// (a voided consume, a produce confirmed after the order was done) or out of storage into
/// the production location (a voided produce, a consume confirmed after the order was done).
#[derive(Debug, Clone, PartialEq)]
struct ReversalLine {
    /// The product's code; `None`: the production order's own product.
    code: Option<String>,
    lot: Option<String>,
    quantity: Decimal,
    to_storage: bool,
    /// The side of the order whose move it corrects: the move it names as its origin (and
    /// takes unit and cost from) is on that side.
    corrects: Side,
    /// Whether the lot may be new (produced late): it is created then.
    new_lot_ok: bool,
}

/// Why a reversal cannot be posted: `Ok(Err(reason))` is for the dead letters (by hand),
/// `Err` is a Tryton failure mapped as usual.
type Postable<T> = Result<Result<T, String>, AdapterError>;

/// Posts the reversal of a scan voided after its confirmation; what cannot be posted is
/// `Rejected` with what to book by hand.
pub async fn post(
    rpc: &Rpc,
    reversal: &Reversal,
    idempotency_key: &str,
) -> Result<Posted, AdapterError> {
    match post_reversal_moves(rpc, reversal, idempotency_key).await? {
        Ok(posted) => {
            metrics::counter!("erp_reversals_posted_total", "adapter" => "tryton").increment(1);
            tracing::info!(idempotency_key, ?posted, "tryton reversal posted");
            Ok(posted)
        }
        Err(why) => {
            metrics::counter!("erp_reversals_manual_total", "adapter" => "tryton").increment(1);
            Err(AdapterError::Rejected(manual_reversal(
                reversal,
                idempotency_key,
                &why,
            )))
        }
    }
}

/// Books a confirmation of a `done` order as keyed corrections (see [`post_corrections`]).
pub async fn post_confirmation_corrections(
    rpc: &Rpc,
    c: &Confirmation,
    key: &str,
) -> Result<Posted, AdapterError> {
    let lines = confirmation_lines(c);
    if lines.is_empty() {
        tracing::info!(
            idempotency_key = key,
            "nothing in the confirmation that tryton books (scrap is not posted)"
        );
        return Ok(Posted::New);
    }
    match post_corrections(rpc, &c.work_order, &lines, key).await? {
        Ok(posted) => {
            metrics::counter!("erp_confirmation_corrections_posted_total", "adapter" => "tryton")
                .increment(1);
            tracing::info!(idempotency_key = key, ?posted, follows = ?c.follows,
                "tryton: confirmation of a done order booked as corrections");
            Ok(posted)
        }
        Err(why) => Err(AdapterError::Rejected(format!(
            "confirmation {key} of production order {} must be booked in Tryton by hand: {why}; \
             produced {:?}, consumed {:?}",
            c.work_order, c.produced_lots, c.consumed_lots
        ))),
    }
}

/// The corrections that book a confirmation of an order that is `done` already (a follow-up,
/// or a second confirmation after a void and redo): produced lots into storage, consumed lots
/// out of it. Scrap is not posted (as for any confirmation).
fn confirmation_lines(c: &Confirmation) -> Vec<ReversalLine> {
    // A produced line goes into storage and corrects the order's output (its lot may be new);
    // a consumed one comes out of storage.
    let line = |code: Option<String>, lot: Option<String>, quantity: Decimal, produced: bool| {
        ReversalLine {
            code,
            lot,
            quantity,
            to_storage: produced,
            corrects: if produced {
                Side::Outputs
            } else {
                Side::Inputs
            },
            new_lot_ok: produced,
        }
    };
    let of_lots = |lots: &[LotQuantity], produced: bool| {
        lots.iter()
            .filter(|l| l.quantity > Decimal::ZERO)
            .map(|l| {
                let lot = (!l.lot.is_empty()).then(|| l.lot.clone());
                line(Some(l.material.clone()), lot, l.quantity, produced)
            })
            .collect::<Vec<_>>()
    };
    let mut lines = of_lots(&c.produced_lots, true);
    if c.produced_lots.is_empty() && c.good_quantity > Decimal::ZERO {
        // Produced without a lot: the order's own product.
        lines.push(line(None, None, c.good_quantity, true));
    }
    lines.extend(of_lots(&c.consumed_lots, false));
    lines
}

/// The moves a reversal books in Tryton, or why it cannot be posted (booked by hand).
fn reversal_lines(r: &Reversal) -> Result<Vec<ReversalLine>, String> {
    if !r.scrapped_lots.is_empty() || !r.scrap_quantity.is_zero() {
        return Err("scrap is not posted to tryton (base production has no scrap moves)".into());
    }
    let mut lines = Vec::new();
    for (lots, to_storage) in [(&r.consumed_lots, true), (&r.produced_lots, false)] {
        for l in lots {
            if l.quantity >= Decimal::ZERO {
                return Err(format!(
                    "a reversal takes quantities back, not {} of lot {}",
                    l.quantity, l.lot
                ));
            }
            lines.push(ReversalLine {
                code: Some(l.material.clone()),
                lot: (!l.lot.is_empty()).then(|| l.lot.clone()),
                quantity: -l.quantity,
                to_storage,
                // A consume taken back corrects an input, a produce an output.
                corrects: if to_storage {
                    Side::Inputs
                } else {
                    Side::Outputs
                },
                new_lot_ok: false,
            });
        }
    }
    if r.produced_lots.is_empty() && r.good_quantity < Decimal::ZERO {
        // Produced without a lot: the order's own product.
        lines.push(ReversalLine {
            code: None,
            lot: None,
            quantity: -r.good_quantity,
            to_storage: false,
            corrects: Side::Outputs,
            new_lot_ok: false,
        });
    }
    if lines.is_empty() {
        return Err("the reversal has no quantity to take back".into());
    }
    Ok(lines)
}

/// Posts a reversal as done stock moves, one `ir.note` carrying the idempotency key on each.
async fn post_reversal_moves(rpc: &Rpc, r: &Reversal, key: &str) -> Postable<Posted> {
    let lines = match reversal_lines(r) {
        Ok(l) => l,
        Err(why) => return Ok(Err(why)),
    };
    post_corrections(rpc, &r.work_order, &lines, key).await
}

/// Books `lines` next to the `done` production order `work_order`, each keyed by `key`
/// (`key#n` when there are several): a move into storage is a lone done move with an
/// `ir.note` carrying the key, a move out of storage the input of a correction production
/// whose reference carries it. Posted before: `AlreadyThere`.
async fn post_corrections(
    rpc: &Rpc,
    work_order: &str,
    lines: &[ReversalLine],
    key: &str,
) -> Postable<Posted> {
    let (ctx, _) = rpc.ctx().await?;
    let production = match production(rpc, work_order, &ctx).await {
        Ok(p) => p,
        Err(AdapterError::Rejected(why)) => return Ok(Err(why)),
        Err(e) => return Err(e),
    };
    if production.state != ProductionState::Done {
        return Ok(Err(format!(
            "production order {work_order} is {} in tryton, not done",
            production.state
        )));
    }
    let (Some(location), Some(storage)) = (production.location, production.storage()) else {
        return Ok(Err(format!(
            "production order {work_order} has no production or storage location"
        )));
    };
    let mut posted = Posted::AlreadyThere;
    for (i, line) in lines.iter().enumerate() {
        let note_key = if lines.len() == 1 {
            key.to_owned()
        } else {
            format!("{key}#{}", i + 1)
        };
        let done = if line.to_storage {
            post_reversal_line(rpc, &production, line, location, storage, &note_key, &ctx).await?
        } else {
            post_correction_production(rpc, &production, line, &note_key, &ctx).await?
        };
        match done {
            Ok(Posted::New) => posted = Posted::New,
            Ok(Posted::AlreadyThere) => {}
            Err(why) => return Ok(Err(why)),
        }
    }
    Ok(Ok(posted))
}

/// The move that carries `note_key` (an `ir.note` on it), if any.
async fn keyed_move(rpc: &Rpc, note_key: &str, ctx: &Context) -> Result<Option<i64>, AdapterError> {
    let notes: Vec<Note> = rpc
        .search_read(
            "ir.note",
            json!([
                ["message", "=", note_key],
                ["resource", "like", "stock.move,%"]
            ]),
            &["resource"],
            ctx,
        )
        .await?;
    Ok(notes
        .iter()
        .filter_map(|n| n.resource.as_deref())
        .find_map(|r| r.strip_prefix("stock.move,")?.parse::<i64>().ok()))
}

/// A move from the production location into storage (`from` → `to`), keyed by an `ir.note`.
async fn post_reversal_line(
    rpc: &Rpc,
    production: &Production,
    line: &ReversalLine,
    from: i64,
    to: i64,
    note_key: &str,
    ctx: &Context,
) -> Postable<Posted> {
    // Posted before (perhaps not done yet: erp-sync stopped between the steps)?
    if let Some(id) = keyed_move(rpc, note_key, ctx).await? {
        let state: Option<StateOf<MoveState>> = rpc.read("stock.move", id, &["state"], ctx).await?;
        return match state.map(|s| s.state) {
            Some(MoveState::Done) => Ok(Ok(Posted::AlreadyThere)),
            Some(MoveState::Draft | MoveState::Assigned | MoveState::Staging) => {
                rpc.call("model.stock.move.do", json!([[id], ctx])).await?;
                Ok(Ok(Posted::New))
            }
            other => Ok(Err(format!(
                "the reversal's stock move {id} is {} in tryton",
                other.map_or("gone", MoveState::as_str)
            ))),
        };
    }
    let (product, lot, original) = match reversal_target(rpc, production, line, ctx).await? {
        Ok(t) => t,
        Err(why) => return Ok(Err(why)),
    };
    let quantity = line.quantity.to_f64().unwrap_or(0.0);
    let mut vals = json!({
        "product": product,
        "lot": lot,
        "quantity": quantity,
        "from_location": from,
        "to_location": to,
        "origin": resource("stock.move", original.id),
    });
    for (f, v) in [("unit", original.unit), ("company", original.company)] {
        if let Some(v) = v {
            vals[f] = json!(v);
        }
    }
    if line.to_storage {
        // From production into storage Tryton wants a price: the cost it left at.
        let currency = match original.currency {
            Some(c) => Some(c),
            None => company_currency(rpc, &original, ctx).await?,
        };
        vals["unit_price"] = tagged_decimal(original.price());
        vals["currency"] = json!(currency);
    }
    // A move created by an attempt that stopped before its note: adopt it.
    let id = match orphan_move(rpc, &vals, ctx).await? {
        Some(id) => id,
        None => rpc.create("stock.move", vals, ctx).await?,
    };
    rpc.create(
        "ir.note",
        json!({"resource": resource("stock.move", id), "message": note_key}),
        ctx,
    )
    .await?;
    rpc.call("model.stock.move.do", json!([[id], ctx])).await?;
    Ok(Ok(Posted::New))
}

/// A move out of storage: the input of a correction production (no product, no outputs)
/// whose `reference` carries the key, created with its move in one call and then run through
/// `wait`, `assign_try`/`assign_force`, `run`, `do` (each step checks the state, so a retry
/// finishes what a stopped attempt began).
async fn post_correction_production(
    rpc: &Rpc,
    production: &Production,
    line: &ReversalLine,
    note_key: &str,
    ctx: &Context,
) -> Postable<Posted> {
    let reference = format!("{CORRECTION_PREFIX}{note_key}");
    let found: Vec<StateOf<ProductionState>> = rpc
        .search_read(
            "production",
            json!([["reference", "=", reference]]),
            &["state"],
            ctx,
        )
        .await?;
    let (id, mut state) = match found.first() {
        Some(p) => (p.id, p.state),
        None => {
            let (product, lot, original) = match reversal_target(rpc, production, line, ctx).await?
            {
                Ok(t) => t,
                Err(why) => return Ok(Err(why)),
            };
            let mut input = json!({
                "product": product,
                "lot": lot,
                "quantity": line.quantity.to_f64().unwrap_or(0.0),
                "from_location": production.storage(),
                "to_location": production.location,
                "origin": resource("stock.move", original.id),
            });
            for (f, v) in [("unit", original.unit), ("company", original.company)] {
                if let Some(v) = v {
                    input[f] = json!(v);
                }
            }
            let mut vals = json!({
                "reference": reference,
                "location": production.location,
                "warehouse": production.warehouse,
                "inputs": [["create", [input]]],
            });
            if let Some(c) = production.company {
                vals["company"] = json!(c);
            }
            (
                rpc.create("production", vals, ctx).await?,
                ProductionState::Draft,
            )
        }
    };
    match state {
        ProductionState::Done if !found.is_empty() => return Ok(Ok(Posted::AlreadyThere)),
        ProductionState::Cancelled => {
            return Ok(Err(format!(
                "the correction production {reference:?} is cancelled in tryton"
            )));
        }
        ProductionState::Request | ProductionState::Draft => {
            rpc.button("production", "wait", id, ctx).await?;
            state = ProductionState::Waiting;
        }
        _ => {}
    }
    if state == ProductionState::Waiting {
        rpc.button("production", "assign_try", id, ctx).await?;
        if production_state(rpc, id, ctx).await? != Some(ProductionState::Assigned) {
            rpc.button("production", "assign_force", id, ctx).await?;
        }
        state = ProductionState::Assigned;
    }
    if state == ProductionState::Assigned {
        rpc.button("production", "run", id, ctx).await?;
        state = ProductionState::Running;
    }
    if state == ProductionState::Running {
        rpc.button("production", "do", id, ctx).await?;
    }
    Ok(Ok(Posted::New))
}

/// The product and lot a reversal line takes back, and the production's own move of them
/// (its unit and cost, and the reversal's origin: the move it corrects).
async fn reversal_target(
    rpc: &Rpc,
    production: &Production,
    line: &ReversalLine,
    ctx: &Context,
) -> Postable<(i64, Option<i64>, CorrectedMove)> {
    let product = match &line.code {
        Some(code) => match product_id(rpc, code, ctx).await {
            Ok(p) => p,
            Err(AdapterError::Rejected(why)) => return Ok(Err(why)),
            Err(e) => return Err(e),
        },
        None => match production.product {
            Some(p) => p,
            None => return Ok(Err("the production order has no product".into())),
        },
    };
    let lot = match &line.lot {
        Some(number) if line.new_lot_ok => Some(lot_id(rpc, number, product, ctx).await?),
        Some(number) => match find_lot(rpc, number, product, ctx).await? {
            Some(id) => Some(id),
            None => return Ok(Err(format!("tryton has no lot {number:?}"))),
        },
        None => None,
    };
    // The production's own move of that product (and lot, unless the lot is new): its
    // unit and cost, and the correction's origin (the move it corrects).
    let side = line.corrects.move_field();
    let mut originals: Vec<CorrectedMove> = Vec::new();
    if let (Some(l), false) = (lot, line.new_lot_ok) {
        originals = rpc
            .search_read(
                "stock.move",
                json!([
                    [side, "=", production.id],
                    ["product", "=", product],
                    ["lot", "=", l]
                ]),
                CorrectedMove::FIELDS,
                ctx,
            )
            .await?;
    }
    if originals.is_empty() {
        // A new lot, or one the order got in a correction (a late scan, then voided): the
        // order's move of that product.
        originals = rpc
            .search_read(
                "stock.move",
                json!([[side, "=", production.id], ["product", "=", product]]),
                CorrectedMove::FIELDS,
                ctx,
            )
            .await?;
    }
    let Some(original) = originals.into_iter().next() else {
        return Ok(Err(format!(
            "production order has no {} move of that product to correct",
            match line.corrects {
                Side::Outputs => "output",
                Side::Inputs => "input",
            }
        )));
    };
    Ok(Ok((product, lot, original)))
}

/// The currency of the corrected move's company.
async fn company_currency(
    rpc: &Rpc,
    original: &CorrectedMove,
    ctx: &Context,
) -> Result<Option<i64>, AdapterError> {
    let Some(company) = original.company else {
        return Ok(None);
    };
    let read: Option<Company> = rpc
        .read("company.company", company, &["currency"], ctx)
        .await?;
    Ok(read.and_then(|c| c.currency))
}

/// A draft move exactly like `vals` that no note claims.
async fn orphan_move(rpc: &Rpc, vals: &Value, ctx: &Context) -> Result<Option<i64>, AdapterError> {
    let mut domain = vec![json!(["state", "=", "draft"])];
    for f in [
        "product",
        "lot",
        "from_location",
        "to_location",
        "origin",
        "quantity",
    ] {
        domain.push(json!([f, "=", vals.get(f).cloned().unwrap_or(Value::Null)]));
    }
    let candidates: Vec<Found> = rpc
        .search_read("stock.move", Value::Array(domain), &["id"], ctx)
        .await?;
    for c in &candidates {
        let notes: Vec<Found> = rpc
            .search_read(
                "ir.note",
                json!([["resource", "=", resource("stock.move", c.id)]]),
                &["id"],
                ctx,
            )
            .await?;
        if notes.is_empty() {
            return Ok(Some(c.id));
        }
    }
    Ok(None)
}

/// Why a reversal is refused, with what the operator must book in Tryton.
fn manual_reversal(r: &Reversal, key: &str, why: &str) -> String {
    let lots = |what: &str, lots: &[LotQuantity]| {
        lots.iter()
            .map(|l| format!("{what} {} {} of lot {}", l.quantity, l.material, l.lot))
            .collect::<Vec<_>>()
    };
    let mut changes = lots("produced", &r.produced_lots);
    changes.extend(lots("consumed", &r.consumed_lots));
    changes.extend(lots("scrapped", &r.scrapped_lots));
    format!(
        "reversal of {} must be booked in Tryton by hand: {why}; production order {}: {} \
         (voided scan {}, {key}, by {}: {})",
        r.reverses,
        r.work_order,
        changes.join(", "),
        r.voided_scan,
        r.voided_by,
        r.reason
    )
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    fn reversal_of(kind: crate::domain::ProductionKind, lot: &str, material: &str) -> Reversal {
        let void = crate::domain::VoidOf {
            work_order: "MO/0001".into(),
            operation: 10,
            station: "ST-10".into(),
            reverses: "MO/0001:10:c1".into(),
            voided_scan: "s1".into(),
            void_scan: "v1".into(),
            voided_at: Utc::now(),
            voided_by: "sup1".into(),
            reason: "wrong lot".into(),
        };
        let line = crate::domain::ProductionLine {
            kind,
            lot: lot.into(),
            material: material.into(),
            quantity: "25".parse().unwrap(),
        };
        crate::domain::build_reversal(&void, &line)
    }

    #[test]
    fn reversals_become_moves_back_and_scrap_is_booked_by_hand() {
        use crate::domain::ProductionKind;
        let consume = reversal_lines(&reversal_of(ProductionKind::Consume, "L1", "STL")).unwrap();
        assert_eq!(
            consume,
            vec![ReversalLine {
                code: Some("STL".into()),
                lot: Some("L1".into()),
                quantity: Decimal::from(25),
                to_storage: true,
                corrects: Side::Inputs,
                new_lot_ok: false,
            }]
        );
        let produce = reversal_lines(&reversal_of(ProductionKind::Produce, "W1", "WID")).unwrap();
        assert_eq!(produce.len(), 1);
        assert!(!produce[0].to_storage);
        assert_eq!(produce[0].quantity, Decimal::from(25));
        assert_eq!(produce[0].corrects, Side::Outputs);
        let mut no_lot = reversal_of(ProductionKind::Produce, "", "WID");
        no_lot.produced_lots.clear();
        let lines = reversal_lines(&no_lot).unwrap();
        assert_eq!(lines[0].code, None);
        assert!(!lines[0].to_storage);
        let scrap = reversal_lines(&reversal_of(ProductionKind::Scrap, "W1", "WID"));
        assert!(scrap.unwrap_err().contains("scrap"));
    }

    #[test]
    fn a_confirmation_of_a_done_order_books_produced_into_and_consumed_out_of_storage() {
        let lot = |lot: &str, material: &str, q: i64| LotQuantity {
            lot: lot.into(),
            material: material.into(),
            quantity: Decimal::from(q),
        };
        let mut c = Confirmation {
            work_order: "MO/0001".into(),
            operation: 10,
            station: "ST-10".into(),
            good_quantity: Decimal::from(3),
            scrap_quantity: Decimal::from(1),
            produced_lots: vec![lot("W1", "WID", 3)],
            consumed_lots: vec![lot("L1", "STL", 6), lot("L0", "STL", 0)],
            scrapped_lots: vec![lot("W2", "WID", 1)],
            completed_at: Utc::now(),
            completed_by: "op1".into(),
            completion_scan: "c2".into(),
            follows: Some("MO/0001:10:c1".into()),
        };
        let lines = confirmation_lines(&c);
        assert_eq!(
            lines,
            vec![
                ReversalLine {
                    code: Some("WID".into()),
                    lot: Some("W1".into()),
                    quantity: Decimal::from(3),
                    to_storage: true,
                    corrects: Side::Outputs,
                    new_lot_ok: true,
                },
                // Nothing consumed from L0: no line; scrap is not posted.
                ReversalLine {
                    code: Some("STL".into()),
                    lot: Some("L1".into()),
                    quantity: Decimal::from(6),
                    to_storage: false,
                    corrects: Side::Inputs,
                    new_lot_ok: false,
                },
            ]
        );
        // Produced without a lot: the order's own product.
        c.produced_lots.clear();
        c.consumed_lots.clear();
        let lines = confirmation_lines(&c);
        assert_eq!(lines.len(), 1);
        assert_eq!(
            (lines[0].code.as_deref(), lines[0].lot.as_deref()),
            (None, None)
        );
        assert!(lines[0].to_storage);
        c.good_quantity = Decimal::ZERO;
        assert!(confirmation_lines(&c).is_empty());
    }

    #[test]
    fn a_reversal_that_cannot_be_posted_says_what_to_book_by_hand() {
        let r = reversal_of(
            crate::domain::ProductionKind::Consume,
            "STEEL-L1",
            "STEEL-500",
        );
        let why = manual_reversal(
            &r,
            &r.idempotency_key(),
            "production order MO/0001 is running",
        );
        assert!(
            why.starts_with("reversal of MO/0001:10:c1 must be booked in Tryton by hand: "),
            "{why}"
        );
        assert!(
            why.contains("consumed -25 STEEL-500 of lot STEEL-L1"),
            "{why}"
        );
        assert!(why.contains("reversal:v1"), "{why}");
        let e = AdapterError::Rejected(why);
        assert!(!e.is_transient());
    }
}
