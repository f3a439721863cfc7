//! Property tests of the contract's scan validation (issue 11, hostile input; the gateway and
//! scan-ingest both run it), from outside the crate: `validate_batch` on arbitrary proto scans never panics and names only `scans` or
//! `scans[i].<field>`; `parse_quantity` accepts exactly the rule it documents and round-trips;
//! every scan it accepts keeps the invariants the store relies on.
//!
//! Fixed case counts keep them at a few seconds in debug; failing cases are not persisted
//! (`failure_persistence: None`): proptest prints the minimal case, which goes into a plain
//! unit test when it is worth keeping.

use chrono::{DateTime, TimeZone, Utc};
use mes_domain::scan::{MAX_BATCH, validate_batch};
use mes_domain::{InspectResult, ScanInput, ScanKind as Kind, parse_quantity};
use mes_proto::v1 as pb;
use proptest::prelude::*;
use proptest::test_runner::Config;
use rust_decimal::Decimal;

/// The longest identifier, in bytes (written out here, not taken from the crate).
const MAX_ID_LEN: usize = 64;
const MAX_ATTRIBUTES: usize = 4096;

/// Every field a violation may name: the contract's.
const FIELDS: &[&str] = &mes_domain::scan::FIELDS;

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// 2026-12-07T12:00:00Z, give or take a few years: the validator's `now`.
fn now() -> impl Strategy<Value = DateTime<Utc>> {
    (1_700_000_000i64..1_900_000_000).prop_map(|s| Utc.timestamp_opt(s, 0).unwrap())
}

// ---------------------------------------------------------------- arbitrary scans

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[A-Z]{1,4}-[0-9]{1,6}",
        2 => ".{0,24}",
        1 => Just(String::new()),
        1 => "[\\x00-\\x1f\\x7f\\u{85}]{1,3}",
        1 => "[A-Z]{0,3}[\\x00\\t\\n\\r\\u{1b}][A-Z]{0,3}",
        1 => "[ \\t\\u{a0}\\u{3000}]{1,2}[A-Z0-9]{1,6}[ \\t]{0,2}",
        1 => "[A-Za-z0-9]{126,130}",
        1 => "é{60,70}",
        1 => "x{200,600}",
    ]
}

fn any_scan_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
        1 => Just(uuid::Uuid::nil().to_string()),
        1 => Just("0f8fad5b-d9cb-469f-a165-70867728950e".to_owned()),
        1 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).urn().to_string()),
        2 => any_text(),
    ]
}

fn any_kind() -> impl Strategy<Value = i32> {
    prop_oneof![4 => -1i32..10, 1 => any::<i32>()]
}

fn any_quantity() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just(String::new()),
        3 => "[0-9]{1,14}(\\.[0-9]{1,8})?",
        1 => "[0-9]{20,40}(\\.[0-9]{20,40})?",
        1 => "0{1,30}[1-9]?(\\.0{0,9}[1-9]?)?",
        2 => "[-+ .eE0-9,_]{1,10}",
        1 => ".{1,12}",
        1 => prop::sample::select(vec![
            "0", "-1", "1e3", ".5", "1.", " 1", "1 ", "NaN", "999999999999", "1000000000000",
            "999999999999.999999", "0.000001", "0.0000001", "79228162514264337593543950335",
            "79228162514264337593543950336",
        ])
        .prop_map(str::to_owned),
    ]
}

fn any_timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    prop::option::weighted(
        0.9,
        (
            prop_oneof![
                3 => 946_684_000i64..2_000_000_000,
                1 => any::<i64>(),
                1 => Just(946_684_800i64),
                1 => prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(8_210_266_876_799i64), Just(8_210_266_876_800i64)],
            ],
            prop_oneof![3 => 0i32..1_000_000_000, 1 => any::<i32>()],
        )
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    )
}

fn any_attributes() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        2 => Just(r#"{"shift":"A"}"#.to_owned()),
        1 => Just("[]".to_owned()),
        1 => Just("null".to_owned()),
        1 => ".{0,20}",
        1 => "y{4085,4100}".prop_map(|s| format!(r#"{{"x":"{s}"}}"#)),
    ]
}

prop_compose! {
    fn any_scan()(
        scan_id in any_scan_id(),
        kind in any_kind(),
        work_order in any_text(),
        operation in prop_oneof![3 => 0u32..20, 1 => Just(1_000_000u32), 1 => Just(1_000_001u32), 1 => any::<u32>()],
        station in any_text(),
        lot in any_text(),
        material in any_text(),
        quantity in any_quantity(),
        into_lot in prop_oneof![3 => Just(String::new()), 1 => any_text()],
        location in any_text(),
        result in prop_oneof![4 => 0i32..4, 1 => any::<i32>()],
        defect_code in any_text(),
        scanned_at in any_timestamp(),
        attributes_json in any_attributes(),
    ) -> pb::Scan {
        pb::Scan {
            scan_id, kind, work_order, operation, station, lot, material, quantity, into_lot,
            location, result, defect_code, scanned_at, attributes_json,
        }
    }
}

fn any_batch() -> impl Strategy<Value = Vec<pb::Scan>> {
    prop_oneof![
        10 => prop::collection::vec(any_scan(), 0..8),
        1 => prop::collection::vec(any_scan(), 490..600),
    ]
}

/// A mostly valid scan of a random kind: each field is right for the kind most of the time,
/// and sometimes a boundary value (127..=129 bytes, a surrounding blank, a control character,
/// 6 or 7 decimals, a quantity at 10^12, a time at 2000 or a day ahead).
fn near_valid_scan(now: DateTime<Utc>) -> impl Strategy<Value = pb::Scan> {
    fn id(required: bool) -> BoxedStrategy<String> {
        let good = "[A-Z]{1,4}-[0-9]{1,6}";
        let edge = prop_oneof![
            "[A-Za-z0-9.:/#+_-]{63,65}",
            "[A-Za-z0-9]{127,129}",
            "é{63,65}",
            "[A-Z]{1,3}[ %&?*@,;'\"][0-9]{1,3}",
            " [A-Z0-9]{1,6}",
            "[A-Z0-9]{1,6}\\t",
            "[A-Z]{1,3}\\x00[0-9]{1,3}",
            "[A-Z]{1,3}\\u{200b}[0-9]{1,3}",
        ];
        if required {
            prop_oneof![8 => good, 1 => edge].boxed()
        } else {
            prop_oneof![6 => Just(String::new()), 3 => good, 1 => edge].boxed()
        }
    }
    let day = now.timestamp() + 86_400;
    (
        prop_oneof![9 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()), 1 => Just(uuid::Uuid::nil().to_string())],
        prop_oneof![12 => 1i32..=7, 1 => Just(8), 1 => Just(0)],
        (id(true), 0u32..5, id(true), id(true), id(false), id(false), id(true), id(false)),
        prop_oneof![
            6 => "[1-9][0-9]{0,4}(\\.[0-9]{1,6})?",
            1 => "[1-9][0-9]{11}(\\.[0-9]{1,7})?",
            1 => "0\\.[0-9]{5,7}",
            1 => Just("1000000000000".to_owned()),
            1 => Just(String::new()),
        ],
        prop_oneof![4 => Just(0i32), 2 => 1i32..=2, 1 => 3i32..5],
        prop_oneof![
            6 => (946_684_801..=day, 0i32..1_000_000_000),
            1 => (946_684_799i64..=946_684_801, 0i32..1),
            1 => (day - 1..=day + 1, 0i32..1_000_000_000),
        ],
        prop_oneof![3 => Just(String::new()), 1 => Just(r#"{"shift":"A"}"#.to_owned())],
    )
        .prop_map(
            |(scan_id, kind, (work_order, operation, station, lot, material, into_lot, location, defect_code), quantity, result, (seconds, nanos), attributes_json)| {
                let into_lot = if kind == pb::ScanKind::Consume as i32 || into_lot.len() % 5 == 0 {
                    into_lot
                } else {
                    String::new()
                };
                pb::Scan {
                    scan_id,
                    kind,
                    work_order,
                    operation,
                    station,
                    lot,
                    material,
                    quantity,
                    into_lot,
                    location,
                    result,
                    defect_code,
                    scanned_at: Some(prost_types::Timestamp { seconds, nanos }),
                    attributes_json,
                }
            },
        )
}

// ---------------------------------------------------------------- oracles

/// The quantity rule written out independently of `parse_quantity`: digits with an optional
/// `.` and digits (no sign, exponent or blank), at most 6 written decimals, > 0, < 10^12.
fn quantity_rule(s: &str) -> bool {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    let shape =
        !int.is_empty() && digits(int) && digits(frac) && (!frac.is_empty() || !s.contains('.'));
    let positive = s.bytes().any(|b| (b'1'..=b'9').contains(&b));
    let below = int.trim_start_matches('0').len() <= 12;
    shape && frac.len() <= 6 && positive && below
}

fn check_invariants(s: &ScanInput, now: DateTime<Utc>) -> Result<(), TestCaseError> {
    // The identifier rule written out: empty (absent) or 1 to 64 of letters, digits, . _ : / # + -
    let id_ok = |v: &str| {
        v.len() <= MAX_ID_LEN
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_:/#+".contains(&b))
    };
    for (name, v) in [
        ("work_order", &s.work_order),
        ("station", &s.station),
        ("lot", &s.lot),
        ("material", &s.material),
        ("into_lot", &s.into_lot),
        ("location", &s.location),
        ("defect_code", &s.defect_code),
    ] {
        prop_assert!(id_ok(v), "{} {:?} accepted", name, v);
    }
    prop_assert!(!s.scan_id.is_nil());
    prop_assert!(s.kind != Kind::Void);
    prop_assert!(!s.station.is_empty());
    let kind = s.kind;
    use Kind as K;
    if kind != K::Move {
        prop_assert!(!s.work_order.is_empty());
    }
    if matches!(
        kind,
        K::Consume | K::Produce | K::Scrap | K::Move | K::Inspect
    ) {
        prop_assert!(!s.lot.is_empty());
    }
    if kind == K::Move {
        prop_assert!(!s.location.is_empty());
    }
    if kind != K::Consume {
        prop_assert!(s.into_lot.is_empty());
    }
    if matches!(kind, K::StartOperation | K::CompleteOperation) {
        prop_assert!(s.operation != 0);
    }
    prop_assert!((0..=1_000_000).contains(&s.operation));
    match s.quantity {
        Some(q) => {
            prop_assert!(q > Decimal::ZERO, "quantity {}", q);
            prop_assert!(q.scale() <= 6, "quantity {}", q);
            prop_assert!(q < Decimal::from(1_000_000_000_000i64), "quantity {}", q);
        }
        None => prop_assert!(!matches!(
            kind,
            K::Consume | K::Produce | K::Scrap | K::Move
        )),
    }
    prop_assert_eq!(kind == K::Inspect, s.result.is_some());
    if kind == K::Scrap || s.result == Some(InspectResult::Fail) {
        prop_assert!(!s.defect_code.is_empty());
    }
    prop_assert!(s.scanned_at.timestamp() > 946_684_800);
    prop_assert!(s.scanned_at <= now + chrono::Duration::hours(24));
    prop_assert!(s.attributes.len() <= MAX_ATTRIBUTES);
    if !s.attributes.is_empty() {
        let v: serde_json::Value = serde_json::from_str(&s.attributes).unwrap();
        prop_assert!(v.is_object());
    }
    Ok(())
}

/// Whether `field` is `scans[i].<field>` with `i` (written without leading zeros) below `len`.
fn names_a_field(field: &str, len: usize) -> bool {
    let Some((i, f)) = field
        .strip_prefix("scans[")
        .and_then(|rest| rest.split_once("]."))
    else {
        return false;
    };
    let index = i.parse::<usize>().is_ok_and(|n| n < len) && (i == "0" || !i.starts_with('0'));
    index && FIELDS.contains(&f)
}

// ---------------------------------------------------------------- the properties

proptest! {
    #![proptest_config(config(256))]

    /// Arbitrary batches (0..600 scans of arbitrary text, kinds, quantities and times) never
    /// panic the validator; violations name only `scans` (an empty or too long batch) or
    /// `scans[i].<field>` with `i` in the batch; what it accepts is one scan per input.
    #[test]
    fn prop_arbitrary_batches_never_panic_and_name_fields(scans in any_batch(), now in now()) {
        match validate_batch(&scans, now) {
            Ok(out) => {
                prop_assert!((1..=MAX_BATCH).contains(&scans.len()));
                prop_assert_eq!(out.len(), scans.len());
                for s in &out {
                    check_invariants(s, now)?;
                }
            }
            Err(violations) => {
                prop_assert!(!violations.is_empty());
                for v in &violations {
                    let named = if v.field == "scans" {
                        scans.is_empty() || scans.len() > MAX_BATCH
                    } else {
                        names_a_field(&v.field, scans.len())
                    };
                    prop_assert!(named, "violation names {:?} ({})", v.field, v.message);
                    prop_assert!(!v.message.is_empty());
                }
            }
        }
    }

    /// Each mostly valid scan is either refused naming its own fields, or accepted as given
    /// with every invariant of an accepted scan.
    #[test]
    fn prop_accepted_scans_keep_the_invariants(
        (now, scans) in now().prop_flat_map(|now| (Just(now), prop::collection::vec(near_valid_scan(now), 1..16)))
    ) {
        let mut accepted = 0;
        for s in &scans {
            match validate_batch(std::slice::from_ref(s), now) {
                Ok(out) => {
                    accepted += 1;
                    prop_assert_eq!(out.len(), 1);
                    let got = &out[0];
                    check_invariants(got, now)?;
                    prop_assert_eq!(got.scan_id.to_string(), s.scan_id.clone());
                    prop_assert_eq!(got.kind.to_proto() as i32, s.kind);
                    prop_assert_eq!(&got.work_order, &s.work_order);
                    prop_assert_eq!(&got.station, &s.station);
                    prop_assert_eq!(&got.lot, &s.lot);
                    prop_assert_eq!(got.quantity, (!s.quantity.is_empty()).then(|| s.quantity.parse::<Decimal>().unwrap()));
                }
                Err(violations) => {
                    for v in &violations {
                        prop_assert!(v.field.starts_with("scans[0]."), "{:?}", v);
                    }
                }
            }
        }
        // the generator must reach acceptance, or the invariants are never checked
        prop_assume!(accepted > 0);
    }
}

proptest! {
    #![proptest_config(config(1024))]

    /// `parse_quantity` accepts exactly the documented rule, and what it accepts prints back
    /// to a string it reads as the same value and scale.
    #[test]
    fn prop_parse_quantity_is_exactly_the_rule_and_round_trips(s in any_quantity()) {
        let got = parse_quantity(&s);
        prop_assert_eq!(got.is_ok(), quantity_rule(&s), "{:?} -> {:?}", s, got);
        if let Ok(d) = got {
            prop_assert_eq!(d, s.parse::<Decimal>().unwrap());
            let again = parse_quantity(&d.to_string());
            prop_assert_eq!(again, Ok(d));
            prop_assert_eq!(again.unwrap().scale(), d.scale());
        }
    }

    /// Every decimal in the rule's range (> 0, at most 6 decimals, < 10^12) prints as a
    /// string `parse_quantity` accepts as the same value.
    #[test]
    fn prop_quantities_in_range_are_accepted(scale in 0u32..=6, m in 1i64..1_000_000_000_000_000_000) {
        let limit = 1_000_000_000_000i64 * 10i64.pow(scale);
        let d = Decimal::new(m % limit, scale);
        prop_assume!(!d.is_zero());
        prop_assert_eq!(parse_quantity(&d.to_string()), Ok(d));
    }
}
