//! What Tryton sends, typed: the states of its documents, the records the adapter reads, and
//! its tagged values (`Decimal`, `datetime`, `date` as `{"__class__": ...}` objects).
//!
//! States are parsed from Tryton's strings once; a state this adapter does not know (a newer
//! Tryton, a customisation) is an [`UnknownState`] error naming it, never a silent default.
//! Quantities, prices and dates are read as leniently as before the records were typed: a
//! value that is not a number (or a tagged `Decimal`) reads as absent.
//!
//! Pulled records stay `serde_json::Value`s (see [`super::pull`]): the contract check
//! ([`crate::contract`]) reports each field that departs from it, where a typed record would
//! refuse the whole pull.

use std::fmt;
use std::str::FromStr;

use chrono::{NaiveDate, NaiveDateTime};
use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};

/// A state string Tryton sent that this adapter does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tryton {document} state {state:?} (known: {known})")]
pub struct UnknownState {
    pub document: &'static str,
    pub state: String,
    pub known: &'static str,
}

/// Declares a state enum with its Tryton strings: `FromStr`, `Display`, serde `Deserialize`.
macro_rules! tryton_states {
    ($(#[$doc:meta])* $name:ident, $document:literal, { $($variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            /// Every state, in Tryton's order.
            #[cfg(test)]
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The string Tryton uses.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $s),+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;

            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $($s => Ok($name::$variant),)+
                    other => Err(UnknownState {
                        document: $document,
                        state: other.to_owned(),
                        known: concat!($($s, " "),+).trim_ascii_end(),
                    }),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownState;

            fn try_from(s: String) -> Result<Self, UnknownState> {
                s.parse()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

tryton_states!(
    /// The state of a `production` (Tryton 8.2's `production` module).
    ProductionState, "production", {
        Request => "request",
        Draft => "draft",
        Waiting => "waiting",
        Assigned => "assigned",
        Running => "running",
        Done => "done",
        Cancelled => "cancelled",
    }
);

tryton_states!(
    /// The state of a `stock.move`.
    MoveState, "stock.move", {
        Staging => "staging",
        Draft => "draft",
        Assigned => "assigned",
        Done => "done",
        Cancelled => "cancelled",
    }
);

impl ProductionState {
    /// The states of the orders the MES sees (pulled as work orders): released and after.
    pub const FOR_THE_MES: [ProductionState; 5] = [
        ProductionState::Waiting,
        ProductionState::Assigned,
        ProductionState::Running,
        ProductionState::Done,
        ProductionState::Cancelled,
    ];

    /// The states whose output counts in the books (reconciliation): not cancelled.
    pub const BOOKED: [ProductionState; 4] = [
        ProductionState::Waiting,
        ProductionState::Assigned,
        ProductionState::Running,
        ProductionState::Done,
    ];

    /// The MES work order status of an order in this state; `None`: not released to the shop
    /// floor yet (a request, a draft).
    pub fn work_order_status(self) -> Option<&'static str> {
        match self {
            ProductionState::Request | ProductionState::Draft => None,
            ProductionState::Waiting | ProductionState::Assigned | ProductionState::Running => {
                Some("released")
            }
            ProductionState::Done => Some("closed"),
            ProductionState::Cancelled => Some("cancelled"),
        }
    }

    /// `states` as a Tryton domain value (`["state", "in", <this>]`).
    pub fn domain(states: &[ProductionState]) -> Value {
        Value::Array(states.iter().map(|s| json!(s.as_str())).collect())
    }
}

/// Every model call's context (its last parameter): the company, and for lot quantities the
/// locations they are counted in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Context {
    #[serde(skip_serializing_if = "Option::is_none")]
    company: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    locations: Option<Vec<i64>>,
}

impl Context {
    /// The context of `company` (`<= 0`: none, Tryton takes the user's).
    pub fn of_company(company: i64) -> Self {
        Self {
            company: (company > 0).then_some(company),
            locations: None,
        }
    }

    /// Lot quantities counted in `location` only (`None`: as Tryton counts them by default).
    pub fn counted_in(mut self, location: Option<i64>) -> Self {
        if let Some(l) = location {
            self.locations = Some(vec![l]);
        }
        self
    }
}

/// A side of a production order: its input or its output moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Inputs,
    Outputs,
}

impl Side {
    /// The production's one2many field (`inputs`, `outputs`).
    pub fn field(self) -> &'static str {
        match self {
            Side::Inputs => "inputs",
            Side::Outputs => "outputs",
        }
    }

    /// The move's many2one back to the production (`production_input`, `production_output`).
    pub fn move_field(self) -> &'static str {
        match self {
            Side::Inputs => "production_input",
            Side::Outputs => "production_output",
        }
    }
}

/// A record found by a search: its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Found {
    pub id: i64,
}

/// A related record's code (`"product.": {"code": ...}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Coded {
    #[serde(default)]
    pub code: Option<String>,
}

/// A related warehouse's storage location (`"warehouse.": {"storage_location": ...}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Storage {
    #[serde(default)]
    pub storage_location: Option<i64>,
}

/// A production order as confirmations and corrections read it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Production {
    pub id: i64,
    pub state: ProductionState,
    #[serde(default)]
    pub product: Option<i64>,
    #[serde(default)]
    pub company: Option<i64>,
    /// The production location.
    #[serde(default)]
    pub location: Option<i64>,
    #[serde(default)]
    pub warehouse: Option<i64>,
    #[serde(default, rename = "warehouse.")]
    pub warehouse_of: Option<Storage>,
}

impl Production {
    pub const FIELDS: &'static [&'static str] = &[
        "state",
        "product",
        "company",
        "location",
        "warehouse",
        "warehouse.storage_location",
    ];

    /// Its warehouse's storage location.
    pub fn storage(&self) -> Option<i64> {
        self.warehouse_of.as_ref()?.storage_location
    }
}

/// A record's state, as `read` and `search_read` answer it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StateOf<S> {
    pub id: i64,
    pub state: S,
}

/// A stock move of a production order, as a template for more moves like it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Move {
    pub id: i64,
    #[serde(default)]
    pub product: Option<i64>,
    #[serde(default, rename = "product.")]
    pub product_of: Option<Coded>,
    #[serde(default)]
    pub unit: Option<i64>,
    #[serde(default)]
    pub from_location: Option<i64>,
    #[serde(default)]
    pub to_location: Option<i64>,
    #[serde(default)]
    pub company: Option<i64>,
    #[serde(default, deserialize_with = "lenient_decimal")]
    pub unit_price: Option<Decimal>,
    #[serde(default)]
    pub currency: Option<i64>,
}

impl Move {
    pub const FIELDS: &'static [&'static str] = &[
        "product",
        "product.code",
        "unit",
        "from_location",
        "to_location",
        "company",
        "unit_price",
        "currency",
        "state",
    ];

    /// Its product's code (`""` when it has none).
    pub fn code(&self) -> &str {
        self.product_of
            .as_ref()
            .and_then(|p| p.code.as_deref())
            .unwrap_or_default()
    }

    /// The values a new move like this one takes.
    pub fn values(&self) -> Value {
        let mut vals = serde_json::Map::new();
        let ids = [
            ("unit", self.unit),
            ("from_location", self.from_location),
            ("to_location", self.to_location),
            ("company", self.company),
        ];
        for (field, id) in ids {
            if let Some(id) = id {
                vals.insert(field.to_owned(), json!(id));
            }
        }
        if let Some(price) = self.unit_price {
            vals.insert("unit_price".to_owned(), tagged_decimal(price));
        }
        if let Some(currency) = self.currency {
            vals.insert("currency".to_owned(), json!(currency));
        }
        Value::Object(vals)
    }
}

/// The production's own move a correction corrects: its unit and cost, and the correction's
/// origin.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CorrectedMove {
    pub id: i64,
    #[serde(default)]
    pub unit: Option<i64>,
    #[serde(default, deserialize_with = "lenient_decimal")]
    pub cost_price: Option<Decimal>,
    #[serde(default, deserialize_with = "lenient_decimal")]
    pub unit_price: Option<Decimal>,
    #[serde(default)]
    pub currency: Option<i64>,
    #[serde(default)]
    pub company: Option<i64>,
}

impl CorrectedMove {
    pub const FIELDS: &'static [&'static str] =
        &["unit", "cost_price", "unit_price", "currency", "company"];

    /// The price of a move back into storage: the cost it left at.
    pub fn price(&self) -> Decimal {
        self.cost_price.or(self.unit_price).unwrap_or_default()
    }
}

/// An `ir.note`'s resource (`"stock.move,12"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Note {
    #[serde(default)]
    pub resource: Option<String>,
}

/// A company's currency.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Company {
    #[serde(default)]
    pub currency: Option<i64>,
}

/// A production order as reconciliation reads it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BookedProduction {
    pub id: i64,
    #[serde(default)]
    pub number: Option<String>,
    pub state: ProductionState,
    #[serde(default)]
    pub product: Option<i64>,
    #[serde(default)]
    pub location: Option<i64>,
    #[serde(default, rename = "outputs.")]
    pub outputs: Option<Vec<BookedMove>>,
}

impl BookedProduction {
    pub const FIELDS: &'static [&'static str] = &[
        "number",
        "state",
        "product",
        "location",
        "outputs.product",
        "outputs.quantity",
    ];

    /// Its output moves.
    pub fn outputs(&self) -> &[BookedMove] {
        self.outputs.as_deref().unwrap_or_default()
    }
}

/// A done stock move as reconciliation reads it (an output, or a correction of one).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BookedMove {
    #[serde(default)]
    pub id: Option<i64>,
    #[serde(default)]
    pub product: Option<i64>,
    #[serde(default, deserialize_with = "lenient_decimal")]
    pub quantity: Option<Decimal>,
    /// `model,id` of the move it corrects (correction moves).
    #[serde(default)]
    pub origin: Option<String>,
    #[serde(default)]
    pub to_location: Option<i64>,
}

impl BookedMove {
    pub const CORRECTION_FIELDS: &'static [&'static str] =
        &["origin", "product", "quantity", "to_location"];
}

/// A lot and its quantity in storage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LotQuantity {
    #[serde(default)]
    pub number: Option<String>,
    #[serde(default, deserialize_with = "lenient_decimal")]
    pub quantity: Option<Decimal>,
}

impl LotQuantity {
    pub const FIELDS: &'static [&'static str] = &["number", "quantity"];
}

/// The reference of a record (`"stock.move,12"`).
pub fn resource(model: &str, id: i64) -> String {
    format!("{model},{id}")
}

/// A number or a tagged `Decimal` as a decimal; anything else reads as absent (as [`decimal`]).
fn lenient_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
    Ok(decimal(&Value::deserialize(d)?))
}

/// A number, or a tagged `Decimal`, as a decimal.
pub fn decimal(v: &Value) -> Option<Decimal> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(Decimal::from(i))
            } else {
                Decimal::try_from(n.as_f64()?).ok().map(|d| d.round_dp(6))
            }
        }
        Value::Object(o) if o.get("__class__").and_then(Value::as_str) == Some("Decimal") => {
            o.get("decimal")?.as_str()?.parse().ok()
        }
        _ => None,
    }
}

/// A decimal as Tryton's tagged `Decimal`.
pub fn tagged_decimal(d: Decimal) -> Value {
    json!({"__class__": "Decimal", "decimal": d.to_string()})
}

/// A decimal as the contract's string (`"2.5"`); keeps non-numbers as they are so that the
/// contract check reports them.
pub fn quantity_string(v: &Value) -> Value {
    match decimal(v) {
        Some(d) => Value::String(d.normalize().to_string()),
        None => v.clone(),
    }
}

/// A tagged `datetime` (naive UTC) or `date`.
pub fn datetime(v: &Value) -> Option<NaiveDateTime> {
    let o = v.as_object()?;
    let n = |k: &str| o.get(k).and_then(Value::as_i64).unwrap_or(0);
    let date = NaiveDate::from_ymd_opt(
        i32::try_from(n("year")).ok()?,
        u32::try_from(n("month")).ok()?,
        u32::try_from(n("day")).ok()?,
    )?;
    match o.get("__class__").and_then(Value::as_str)? {
        "datetime" => date.and_hms_micro_opt(
            u32::try_from(n("hour")).ok()?,
            u32::try_from(n("minute")).ok()?,
            u32::try_from(n("second")).ok()?,
            u32::try_from(n("microsecond")).ok()?,
        ),
        "date" => date.and_hms_opt(0, 0, 0),
        _ => None,
    }
}

/// A datetime as Tryton's tagged `datetime`.
pub fn tagged_datetime(t: NaiveDateTime) -> Value {
    use chrono::{Datelike, Timelike};
    json!({"__class__": "datetime", "year": t.year(), "month": t.month(), "day": t.day(),
           "hour": t.hour(), "minute": t.minute(), "second": t.second(),
           "microsecond": t.nanosecond() / 1_000})
}

/// The code of a related product (`"product.": {"code": ...}`), as sent.
pub fn code(row: &Value, rel: &str) -> Value {
    row.get(rel)
        .and_then(|p| p.get("code"))
        .cloned()
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_production_state_tryton_sends_parses_and_prints_back() {
        let cases = [
            ("request", ProductionState::Request),
            ("draft", ProductionState::Draft),
            ("waiting", ProductionState::Waiting),
            ("assigned", ProductionState::Assigned),
            ("running", ProductionState::Running),
            ("done", ProductionState::Done),
            ("cancelled", ProductionState::Cancelled),
        ];
        assert_eq!(cases.len(), ProductionState::ALL.len());
        for (s, state) in cases {
            assert_eq!(s.parse::<ProductionState>(), Ok(state), "{s}");
            assert_eq!(state.as_str(), s);
            assert_eq!(state.to_string(), s);
            assert_eq!(
                serde_json::from_value::<ProductionState>(json!(s)).unwrap(),
                state
            );
        }
    }

    #[test]
    fn an_unknown_production_state_is_an_error_naming_it() {
        let e = "finished".parse::<ProductionState>().unwrap_err();
        assert_eq!(e.state, "finished");
        assert_eq!(
            e.to_string(),
            "unknown tryton production state \"finished\" \
             (known: request draft waiting assigned running done cancelled)"
        );
        // Case matters: Tryton sends lower case.
        assert!("Done".parse::<ProductionState>().is_err());
        assert!("".parse::<ProductionState>().is_err());
        // In a record: the record does not read, and says why.
        let e = serde_json::from_value::<Production>(json!({"id": 1, "state": "finished"}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown tryton production state \"finished\""),
            "{e}"
        );
        assert!(serde_json::from_value::<Production>(json!({"id": 1})).is_err());
    }

    #[test]
    fn every_move_state_tryton_sends_parses_and_an_unknown_one_is_an_error() {
        let cases = [
            ("staging", MoveState::Staging),
            ("draft", MoveState::Draft),
            ("assigned", MoveState::Assigned),
            ("done", MoveState::Done),
            ("cancelled", MoveState::Cancelled),
        ];
        assert_eq!(cases.len(), MoveState::ALL.len());
        for (s, state) in cases {
            assert_eq!(s.parse::<MoveState>(), Ok(state), "{s}");
            assert_eq!(state.as_str(), s);
        }
        let e = "request".parse::<MoveState>().unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown tryton stock.move state \"request\" \
             (known: staging draft assigned done cancelled)"
        );
        let read: Vec<StateOf<MoveState>> =
            serde_json::from_value(json!([{"id": 3, "state": "done"}])).unwrap();
        assert_eq!(read[0].state, MoveState::Done);
    }

    #[test]
    fn only_released_orders_are_work_orders_for_the_mes() {
        use ProductionState::*;
        let status = |s: ProductionState| s.work_order_status();
        assert_eq!(status(Request), None);
        assert_eq!(status(Draft), None);
        assert_eq!(status(Waiting), Some("released"));
        assert_eq!(status(Assigned), Some("released"));
        assert_eq!(status(Running), Some("released"));
        assert_eq!(status(Done), Some("closed"));
        assert_eq!(status(Cancelled), Some("cancelled"));
        assert_eq!(
            ProductionState::domain(&ProductionState::FOR_THE_MES),
            json!(["waiting", "assigned", "running", "done", "cancelled"])
        );
        assert_eq!(
            ProductionState::domain(&ProductionState::BOOKED),
            json!(["waiting", "assigned", "running", "done"])
        );
    }

    #[test]
    fn records_read_as_tryton_sends_them() {
        let p: Production = serde_json::from_value(json!({"id": 7, "state": "done",
            "product": 3, "company": 1, "location": 9, "warehouse": 4,
            "warehouse.": {"id": 4, "storage_location": 5}}))
        .unwrap();
        assert_eq!(p.state, ProductionState::Done);
        assert_eq!((p.location, p.storage()), (Some(9), Some(5)));
        let p: Production = serde_json::from_value(json!({"id": 7, "state": "draft",
            "product": null, "warehouse": null, "warehouse.": null}))
        .unwrap();
        assert_eq!((p.product, p.storage()), (None, None));

        let m: Move = serde_json::from_value(json!({"id": 2, "product": 3,
            "product.": {"id": 3, "code": "STL"}, "unit": 1, "from_location": 5,
            "to_location": 9, "company": 1, "currency": null, "state": "draft",
            "unit_price": {"__class__": "Decimal", "decimal": "12.3400"}}))
        .unwrap();
        assert_eq!(m.code(), "STL");
        assert_eq!(
            m.values(),
            json!({"unit": 1, "from_location": 5, "to_location": 9, "company": 1,
                   "unit_price": {"__class__": "Decimal", "decimal": "12.3400"}})
        );
        let m: Move =
            serde_json::from_value(json!({"id": 2, "product": 3, "product.": null})).unwrap();
        assert_eq!((m.code(), m.values()), ("", json!({})));

        let o: CorrectedMove = serde_json::from_value(json!({"id": 2, "cost_price": null,
            "unit_price": {"__class__": "Decimal", "decimal": "1.5"}}))
        .unwrap();
        assert_eq!(o.price().to_string(), "1.5");
        let o: CorrectedMove = serde_json::from_value(json!({"id": 2,
            "cost_price": {"__class__": "Decimal", "decimal": "2"}, "unit_price": 1.5}))
        .unwrap();
        assert_eq!(o.price().to_string(), "2");

        let b: BookedProduction = serde_json::from_value(json!({"id": 1, "number": "MO/1",
            "state": "done", "product": 3, "location": 9,
            "outputs.": [{"id": 11, "product": 3, "quantity": 10.0}]}))
        .unwrap();
        assert_eq!(b.outputs()[0].quantity, Some(Decimal::from(10)));
        let b: BookedProduction =
            serde_json::from_value(json!({"id": 1, "state": "waiting", "outputs.": null})).unwrap();
        assert!(b.outputs().is_empty() && b.number.is_none());
        // A quantity that is no number reads as absent, as before the records were typed.
        let l: LotQuantity =
            serde_json::from_value(json!({"id": 1, "number": "L1", "quantity": "x"})).unwrap();
        assert_eq!(l.quantity, None);
    }

    #[test]
    fn the_context_names_the_company_and_where_lots_are_counted() {
        assert_eq!(json!(Context::of_company(2)), json!({"company": 2}));
        assert_eq!(json!(Context::of_company(0)), json!({}));
        assert_eq!(
            json!(Context::of_company(2).counted_in(Some(5))),
            json!({"company": 2, "locations": [5]})
        );
        assert_eq!(json!(Context::of_company(-1).counted_in(None)), json!({}));
    }

    #[test]
    fn tagged_values_decode() {
        assert_eq!(
            decimal(&json!({"__class__": "Decimal", "decimal": "2.50"}))
                .unwrap()
                .to_string(),
            "2.50"
        );
        assert_eq!(decimal(&json!(10.0)).unwrap().normalize().to_string(), "10");
        assert_eq!(decimal(&json!(0.1)).unwrap().normalize().to_string(), "0.1");
        assert!(decimal(&json!("x")).is_none());
        assert_eq!(
            decimal(&tagged_decimal("2.50".parse().unwrap())),
            Some("2.50".parse().unwrap())
        );
        let t = datetime(
            &json!({"__class__": "datetime", "year": 2026, "month": 11, "day": 25,
            "hour": 11, "minute": 37, "second": 27, "microsecond": 33161}),
        )
        .unwrap();
        assert_eq!(t.to_string(), "2026-11-25 11:37:27.033161");
        assert_eq!(datetime(&tagged_datetime(t)), Some(t));
        assert!(datetime(&json!({"__class__": "datetime", "year": 2026, "month": 13})).is_none());
    }
}
