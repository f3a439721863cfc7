//! The MES-side records erp-sync moves between the ERP and scan-ingest, free of transport and
//! SQL: what an adapter must deliver inbound, and the production confirmation it posts outbound.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The master-data entities pulled from the ERP, in dependency order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entity {
    Materials,
    Stations,
    Lots,
    WorkOrders,
}

impl Entity {
    /// Upsert order: a lot needs its material, a work order its materials and stations.
    pub const ALL: [Entity; 4] = [
        Entity::Materials,
        Entity::Stations,
        Entity::Lots,
        Entity::WorkOrders,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Entity::Materials => "materials",
            Entity::Stations => "stations",
            Entity::Lots => "lots",
            Entity::WorkOrders => "work_orders",
        }
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `lot` or `serial`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    Lot,
    Serial,
}

impl Tracking {
    pub fn as_str(self) -> &'static str {
        match self {
            Tracking::Lot => "lot",
            Tracking::Serial => "serial",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Material {
    pub number: String,
    pub description: String,
    pub tracking: Tracking,
    pub unit: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Station {
    pub id: String,
    pub name: String,
}

/// A lot received from a supplier.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedLot {
    pub lot: String,
    pub material: String,
    pub quantity: Decimal,
    pub supplier: String,
    pub supplier_lot: String,
    pub received_at: Option<DateTime<Utc>>,
}

/// `released`, `closed` or `cancelled`: the ERP's part of a work order's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    Released,
    Closed,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Released => "released",
            OrderStatus::Closed => "closed",
            OrderStatus::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OperationSpec {
    pub step: u32,
    pub station: String,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ComponentSpec {
    pub material: String,
    pub quantity_per_unit: Decimal,
}

/// A work order with its routing and bill of materials.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkOrder {
    pub number: String,
    pub material: String,
    pub planned_quantity: Decimal,
    pub status: OrderStatus,
    pub operations: Vec<OperationSpec>,
    pub components: Vec<ComponentSpec>,
}

/// A quantity of one lot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LotQuantity {
    pub lot: String,
    pub material: String,
    pub quantity: Decimal,
}

/// A production confirmation: what one operation of a work order produced, scrapped and
/// consumed, reported to the ERP when the operation completes.
///
/// A **follow-up** (`follows` set) reports production booked after the operation's
/// confirmation (a tablet that delivers its scans late): only those scans' quantities (the
/// delta), under its own idempotency key `{work_order}:{operation}:followup:{first late scan}`.
/// Confirmation, follow-ups and reversals of one operation add up to what the MES shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    pub work_order: String,
    pub operation: u32,
    pub station: String,
    /// Good quantity produced by the operation (sum of its produce scans).
    pub good_quantity: Decimal,
    /// Scrapped quantity (sum of its scrap scans).
    pub scrap_quantity: Decimal,
    /// Output lots and what each received.
    pub produced_lots: Vec<LotQuantity>,
    /// Component lots consumed, per lot.
    pub consumed_lots: Vec<LotQuantity>,
    /// Lots scrapped, per lot.
    pub scrapped_lots: Vec<LotQuantity>,
    /// When the operation was completed (the completing scan's device time).
    pub completed_at: DateTime<Utc>,
    /// Who completed it.
    pub completed_by: String,
    /// The completing scan; for a follow-up, the first late scan it reports.
    pub completion_scan: String,
    /// For a follow-up: the idempotency key of the operation's confirmation it adds to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follows: Option<String>,
}

impl Confirmation {
    /// The idempotency key: one confirmation per completing scan, one follow-up per first
    /// late scan.
    pub fn idempotency_key(&self) -> String {
        if self.follows.is_some() {
            follow_up_key(&self.work_order, self.operation, &self.completion_scan)
        } else {
            format!(
                "{}:{}:{}",
                self.work_order, self.operation, self.completion_scan
            )
        }
    }

    pub fn is_follow_up(&self) -> bool {
        self.follows.is_some()
    }
}

/// The idempotency key of the follow-up whose first late scan is `first_scan`.
pub fn follow_up_key(work_order: &str, operation: u32, first_scan: &str) -> String {
    format!("{work_order}:{operation}:followup:{first_scan}")
}

/// A production reversal: a produce, consume or scrap scan that was already reported in a
/// confirmation has been voided in the MES; the ERP must take its quantities back. Quantities
/// are those of the voided scan, negated, in the same shape as a confirmation (so a reader that
/// sums confirmations and reversals gets the MES's figures).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reversal {
    pub work_order: String,
    pub operation: u32,
    pub station: String,
    /// The idempotency key of the confirmation that reported the voided scan.
    pub reverses: String,
    /// The voided scan and its kind (`produce`, `consume`, `scrap`).
    pub voided_scan: String,
    pub voided_kind: String,
    /// The void scan (the reversal's idempotency key is derived from it).
    pub void_scan: String,
    /// Negated good quantity (non-zero for a produce scan).
    pub good_quantity: Decimal,
    /// Negated scrap quantity (non-zero for a scrap scan).
    pub scrap_quantity: Decimal,
    pub produced_lots: Vec<LotQuantity>,
    pub consumed_lots: Vec<LotQuantity>,
    pub scrapped_lots: Vec<LotQuantity>,
    /// When and by whom the scan was voided, and why.
    pub voided_at: DateTime<Utc>,
    pub voided_by: String,
    pub reason: String,
}

impl Reversal {
    /// The idempotency key: one reversal per void scan.
    pub fn idempotency_key(&self) -> String {
        reversal_key(&self.void_scan)
    }
}

/// The idempotency key of the reversal a void scan triggers.
pub fn reversal_key(void_scan: &str) -> String {
    format!("reversal:{void_scan}")
}

/// What a void means for the ERP: the voided scan's line, negated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoidOf {
    pub work_order: String,
    pub operation: u32,
    pub station: String,
    pub reverses: String,
    pub voided_scan: String,
    pub void_scan: String,
    pub voided_at: DateTime<Utc>,
    pub voided_by: String,
    pub reason: String,
}

/// Builds the reversal of one voided line.
pub fn build_reversal(void: &VoidOf, line: &ProductionLine) -> Reversal {
    let negated = LotQuantity {
        lot: line.lot.clone(),
        material: line.material.clone(),
        quantity: (-line.quantity).normalize(),
    };
    let (mut produced, mut consumed, mut scrapped) = (Vec::new(), Vec::new(), Vec::new());
    let (mut good, mut scrap) = (Decimal::ZERO, Decimal::ZERO);
    match line.kind {
        ProductionKind::Produce => {
            good = negated.quantity;
            produced.push(negated);
        }
        ProductionKind::Consume => consumed.push(negated),
        ProductionKind::Scrap => {
            scrap = negated.quantity;
            scrapped.push(negated);
        }
    }
    Reversal {
        work_order: void.work_order.clone(),
        operation: void.operation,
        station: void.station.clone(),
        reverses: void.reverses.clone(),
        voided_scan: void.voided_scan.clone(),
        voided_kind: line.kind.as_str().to_owned(),
        void_scan: void.void_scan.clone(),
        good_quantity: good.normalize(),
        scrap_quantity: scrap.normalize(),
        produced_lots: produced,
        consumed_lots: consumed,
        scrapped_lots: scrapped,
        voided_at: void.voided_at,
        voided_by: void.voided_by.clone(),
        reason: void.reason.clone(),
    }
}

/// The scan kinds a confirmation reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProductionKind {
    Produce,
    Consume,
    Scrap,
}

impl ProductionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProductionKind::Produce => "produce",
            ProductionKind::Consume => "consume",
            ProductionKind::Scrap => "scrap",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "produce" => Some(ProductionKind::Produce),
            "consume" => Some(ProductionKind::Consume),
            "scrap" => Some(ProductionKind::Scrap),
            _ => None,
        }
    }
}

/// One produce, consume or scrap scan of the operation being confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductionLine {
    pub kind: ProductionKind,
    pub lot: String,
    pub material: String,
    pub quantity: Decimal,
}

/// The completion of an operation (from its `complete_operation` scan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub work_order: String,
    pub operation: u32,
    pub station: String,
    pub completed_at: DateTime<Utc>,
    pub completed_by: String,
    pub scan_id: String,
}

impl Completion {
    /// The idempotency key of the confirmation this completion triggers.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}:{}", self.work_order, self.operation, self.scan_id)
    }
}

/// Sums an operation's scans into its confirmation: good and scrap totals, and per lot what
/// was produced, consumed and scrapped (lots in name order).
pub fn build_confirmation(completion: &Completion, lines: &[ProductionLine]) -> Confirmation {
    let mut per_lot: [BTreeMap<(String, String), Decimal>; 3] = Default::default();
    let mut good = Decimal::ZERO;
    let mut scrap = Decimal::ZERO;
    for l in lines {
        let slot = match l.kind {
            ProductionKind::Produce => {
                good += l.quantity;
                0
            }
            ProductionKind::Consume => 1,
            ProductionKind::Scrap => {
                scrap += l.quantity;
                2
            }
        };
        *per_lot[slot]
            .entry((l.lot.clone(), l.material.clone()))
            .or_default() += l.quantity;
    }
    let lots = |m: &BTreeMap<(String, String), Decimal>| -> Vec<LotQuantity> {
        m.iter()
            .map(|((lot, material), q)| LotQuantity {
                lot: lot.clone(),
                material: material.clone(),
                quantity: q.normalize(),
            })
            .collect()
    };
    Confirmation {
        work_order: completion.work_order.clone(),
        operation: completion.operation,
        station: completion.station.clone(),
        good_quantity: good.normalize(),
        scrap_quantity: scrap.normalize(),
        produced_lots: lots(&per_lot[0]),
        consumed_lots: lots(&per_lot[1]),
        scrapped_lots: lots(&per_lot[2]),
        completed_at: completion.completed_at,
        completed_by: completion.completed_by.clone(),
        completion_scan: completion.scan_id.clone(),
        follows: None,
    }
}

/// The follow-up of the confirmation `follows`: the late scans' lines only. `last` is the
/// latest late scan (its time and operator), `first_scan` the earliest (it keys the follow-up).
pub fn build_follow_up(
    follows: &str,
    work_order: &str,
    operation: u32,
    station: &str,
    first_scan: &str,
    last: (DateTime<Utc>, &str),
    lines: &[ProductionLine],
) -> Confirmation {
    let completion = Completion {
        work_order: work_order.to_owned(),
        operation,
        station: station.to_owned(),
        completed_at: last.0,
        completed_by: last.1.to_owned(),
        scan_id: first_scan.to_owned(),
    };
    Confirmation {
        follows: Some(follows.to_owned()),
        ..build_confirmation(&completion, lines)
    }
}

/// The ERP's view of production and stock, for reconciliation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErpQuantities {
    /// Work order → good quantity the ERP has confirmations for.
    pub work_orders: BTreeMap<String, Decimal>,
    /// Received lot → quantity on hand by the ERP's books (received − confirmed use).
    pub lots: BTreeMap<String, Decimal>,
}

/// One quantity on which the MES and the ERP disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// `work_order` or `lot`.
    pub entity: String,
    pub key: String,
    /// `None`: the MES does not know the record.
    pub mes_quantity: Option<Decimal>,
    pub erp_quantity: Decimal,
}

/// Compares the ERP's quantities with the MES's (work orders: produced; lots: on hand), for
/// every record the ERP knows.
pub fn reconcile(
    erp: &ErpQuantities,
    mes_work_orders: &BTreeMap<String, Decimal>,
    mes_lots: &BTreeMap<String, Decimal>,
) -> Vec<Difference> {
    let mut out = Vec::new();
    for (entity, erp_side, mes_side) in [
        ("work_order", &erp.work_orders, mes_work_orders),
        ("lot", &erp.lots, mes_lots),
    ] {
        for (key, erp_quantity) in erp_side {
            let mes_quantity = mes_side.get(key).copied();
            if mes_quantity.map(|q| q.normalize()) != Some(erp_quantity.normalize()) {
                out.push(Difference {
                    entity: entity.to_owned(),
                    key: key.clone(),
                    mes_quantity: mes_quantity.map(|q| q.normalize()),
                    erp_quantity: erp_quantity.normalize(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(kind: ProductionKind, lot: &str, q: &str) -> ProductionLine {
        ProductionLine {
            kind,
            lot: lot.into(),
            material: "M".into(),
            quantity: q.parse().unwrap(),
        }
    }

    #[test]
    fn a_confirmation_sums_per_kind_and_lot() {
        let completion = Completion {
            work_order: "WO-1000".into(),
            operation: 10,
            station: "ST-10".into(),
            completed_at: Utc::now(),
            completed_by: "op1".into(),
            scan_id: "s9".into(),
        };
        let c = build_confirmation(
            &completion,
            &[
                line(ProductionKind::Consume, "STEEL-L1", "20"),
                line(ProductionKind::Consume, "STEEL-L1", "5.000"),
                line(ProductionKind::Produce, "FRAME-L1", "9"),
                line(ProductionKind::Produce, "FRAME-L2", "1"),
                line(ProductionKind::Scrap, "FRAME-L1", "0.5"),
            ],
        );
        assert_eq!(c.idempotency_key(), "WO-1000:10:s9");
        assert_eq!(c.good_quantity.to_string(), "10");
        assert_eq!(c.scrap_quantity.to_string(), "0.5");
        assert_eq!(c.consumed_lots.len(), 1);
        assert_eq!(c.consumed_lots[0].quantity.to_string(), "25");
        assert_eq!(c.produced_lots.len(), 2);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["consumed_lots"][0]["quantity"], "25");
    }

    #[test]
    fn a_reversal_negates_the_voided_line() {
        let void = VoidOf {
            work_order: "WO-1000".into(),
            operation: 10,
            station: "ST-10".into(),
            reverses: "WO-1000:10:s9".into(),
            voided_scan: "s2".into(),
            void_scan: "v1".into(),
            voided_at: Utc::now(),
            voided_by: "sup1".into(),
            reason: "wrong lot".into(),
        };
        let r = build_reversal(&void, &line(ProductionKind::Consume, "STEEL-L1", "5.000"));
        assert_eq!(r.idempotency_key(), "reversal:v1");
        assert_eq!(r.consumed_lots[0].quantity.to_string(), "-5");
        assert_eq!(r.good_quantity.to_string(), "0");
        assert!(r.produced_lots.is_empty() && r.scrapped_lots.is_empty());
        let r = build_reversal(&void, &line(ProductionKind::Scrap, "FRAME-L1", "0.5"));
        assert_eq!(r.scrap_quantity.to_string(), "-0.5");
        assert_eq!(r.scrapped_lots[0].quantity.to_string(), "-0.5");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["reverses"], "WO-1000:10:s9");
        assert_eq!(json["voided_kind"], "scrap");
    }

    #[test]
    fn reconciliation_reports_what_differs_or_is_missing() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        let erp = ErpQuantities {
            work_orders: [("WO-1".to_owned(), d("10")), ("WO-2".to_owned(), d("0"))].into(),
            lots: [("L1".to_owned(), d("75.0")), ("L2".to_owned(), d("5"))].into(),
        };
        let mes_wo = [
            ("WO-1".to_owned(), d("10.000")),
            ("WO-2".to_owned(), d("3")),
        ]
        .into();
        let mes_lots = [("L1".to_owned(), d("75"))].into();
        let diffs = reconcile(&erp, &mes_wo, &mes_lots);
        assert_eq!(
            diffs,
            vec![
                Difference {
                    entity: "work_order".into(),
                    key: "WO-2".into(),
                    mes_quantity: Some(d("3")),
                    erp_quantity: d("0"),
                },
                Difference {
                    entity: "lot".into(),
                    key: "L2".into(),
                    mes_quantity: None,
                    erp_quantity: d("5"),
                },
            ]
        );
    }
}
