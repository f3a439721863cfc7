//! Property tests of the REST scan parser (issue 11, hostile input): `parse_batch` on arbitrary
//! JSON never panics and names only fields that exist; valid scans of every kind come out as
//! the proto scan they describe; one bad field in a valid batch is refused naming that field.
//!
//! Fixed case counts keep them at a few seconds in debug; failing cases are not persisted
//! (`failure_persistence: None`): proptest prints the minimal case, which goes into a plain
//! unit test when it is worth keeping.

use chrono::{DateTime, FixedOffset, SecondsFormat, TimeZone, Utc};
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Map, Number, Value, json};

use super::*;

/// Every field `parse_scan` reads: the contract's.
const SCAN_FIELDS: &[&str] = &mes_domain::scan::FIELDS;

/// The kinds a client may submit: wire name and protobuf kind (from the contract's table).
fn kinds() -> Vec<(&'static str, pb::ScanKind)> {
    mes_domain::ScanKind::ALL
        .into_iter()
        .filter(|k| *k != mes_domain::ScanKind::Void)
        .map(|k| (k.as_str(), k.to_proto()))
        .collect()
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

fn fields(p: &Problem) -> Vec<String> {
    p.errors.iter().map(|e| e.field.clone()).collect()
}

// ---------------------------------------------------------------- arbitrary JSON

fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,20}",
        "[\\x00-\\x1f\\x7f]{1,4}",
        "[a-z]{0,3}\\x00[a-z]{0,3}",
        " [A-Z0-9-]{1,8} ?",
        "[A-Za-z0-9._:/#+-]{60,70}",
        "x{490,520}",
        Just(String::new()),
        // values that are close to valid ones
        Just("0f8fad5b-d9cb-469f-a165-70867728950e".to_owned()),
        Just("00000000-0000-0000-0000-000000000000".to_owned()),
        prop::sample::select(
            kinds()
                .iter()
                .map(|(k, _)| (*k).to_owned())
                .collect::<Vec<_>>()
        ),
        Just("void".to_owned()),
        Just("pass".to_owned()),
        Just("fail".to_owned()),
        "[0-9]{0,22}(\\.[0-9]{0,14})?",
        "-?[0-9]{1,3}(e[0-9]{1,3})?",
        Just("2025-03-01T08:15:30Z".to_owned()),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})",
        "WO-[0-9]{1,4}",
    ]
}

fn any_number() -> impl Strategy<Value = Number> {
    prop_oneof![
        any::<u64>().prop_map(Number::from),
        any::<i64>().prop_map(Number::from),
        (0u64..20).prop_map(Number::from),
        Just(Number::from(u64::from(u32::MAX) + 1)),
        any::<f64>().prop_filter_map("finite", Number::from_f64),
        (-10.0f64..10.0).prop_filter_map("finite", Number::from_f64),
    ]
}

fn any_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(SCAN_FIELDS).prop_map(str::to_owned),
        1 => Just("scans".to_owned()),
        2 => ".{0,12}",
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any_number().prop_map(Value::Number),
        any_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((any_key(), inner), 0..10)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A scan-shaped object: real field names with arbitrary values, sometimes a stray key.
fn scan_shaped() -> impl Strategy<Value = Value> {
    prop::collection::vec((any_key(), any_json()), 0..16)
        .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>()))
}

/// Bodies: arbitrary JSON, or `{"scans": [...]}` with scan-shaped, arbitrary or valid items
/// (some batches all valid, a few around the 500 limit) and now and then a stray top-level key.
fn any_body() -> impl Strategy<Value = Value> {
    let item =
        prop_oneof![3 => scan_shaped(), 1 => any_json(), 2 => valid_scan().prop_map(|s| s.json)];
    let items = prop_oneof![
        10 => prop::collection::vec(item, 0..8),
        3 => prop::collection::vec(valid_scan().prop_map(|s| s.json), 1..4),
        1 => (495usize..=505).prop_map(|n| vec![json!({}); n]),
        1 => (valid_scan(), 498usize..=502).prop_map(|(v, n)| vec![v.json; n]),
    ];
    prop_oneof![
        1 => any_json(),
        4 => (items, prop::option::of((any_key(), any_json()))).prop_map(|(items, extra)| {
            let mut body = Map::new();
            body.insert("scans".to_owned(), Value::Array(items));
            if let Some((k, v)) = extra {
                body.insert(k, v);
            }
            Value::Object(body)
        }),
    ]
}

/// The field names an error may carry for `body`: `body` (not an object), `scans`, a stray
/// top-level key, `scans[i]` (item not an object), `scans[i].<field read>` or
/// `scans[i].<stray key of that item>`, with `i` an index of the batch.
fn allowed_fields(body: &Value) -> Vec<String> {
    let Some(obj) = body.as_object() else {
        return vec!["body".to_owned()];
    };
    let mut allowed: Vec<String> = obj.keys().cloned().collect();
    allowed.push("scans".to_owned());
    if let Some(Value::Array(items)) = obj.get("scans") {
        for (i, item) in items.iter().enumerate() {
            match item.as_object() {
                None => allowed.push(format!("scans[{i}]")),
                Some(o) => allowed.extend(
                    SCAN_FIELDS
                        .iter()
                        .map(|f| (*f).to_owned())
                        .chain(o.keys().cloned())
                        .map(|f| format!("scans[{i}].{f}")),
                ),
            }
        }
    }
    allowed
}

// ---------------------------------------------------------------- valid scans

/// A valid scan as JSON with the proto scan the parser must make of it.
#[derive(Debug, Clone)]
struct Valid {
    json: Value,
    expected: pb::Scan,
    /// Fields the scan's kind requires (removing one must be refused naming it).
    required: Vec<&'static str>,
}

fn ident() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[A-Z]{1,4}-[0-9]{1,6}",
        2 => "[A-Za-z0-9._:/#+-]{1,64}",
        1 => "[A-Za-z0-9]{64}",
    ]
}

fn opt_ident() -> impl Strategy<Value = Option<String>> {
    prop::option::of(ident())
}

/// A quantity by the contract's rule (written out here): digits with 1..=6 optional decimals,
/// > 0, below 10^12 (at most 12 significant integer digits).
fn quantity() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (1u64..100_000).prop_map(|n| (n.to_string(), None)),
        3 => ("[0-9]{1,12}", prop::option::of("[0-9]{1,6}")),
        1 => ("[1-9][0-9]{11}", prop::option::of("[0-9]{6}")),
        1 => ("0{1,18}", "0{0,5}[1-9]").prop_map(|(i, f)| (i, Some(f))),
    ]
    .prop_map(|q: (String, Option<String>)| match q {
        (i, Some(f)) => format!("{i}.{f}"),
        (i, None) => i,
    })
    .prop_filter("greater than zero", |q| {
        q.bytes().any(|b| (b'1'..=b'9').contains(&b))
    })
}

/// An RFC 3339 time with an offset, as a device might send it, and the instant it names.
fn scanned_at() -> impl Strategy<Value = (String, prost_types::Timestamp)> {
    (
        // the contract's window: after 2000-01-01T00:00:00Z, at most a day ahead (up to now
        // here, so the test cannot run out of it)
        946_684_801i64..Utc::now().timestamp(),
        prop_oneof![
            Just(0u32),
            0u32..1_000_000_000,
            (0u32..1000).prop_map(|ms| ms * 1_000_000)
        ],
        // whole minutes: RFC 3339 offsets have no seconds
        prop_oneof![Just(0i32), (-1439i32..1440).prop_map(|m| m * 60)],
        any::<bool>(),
    )
        .prop_map(|(secs, nanos, offset, z)| {
            let utc: DateTime<Utc> = Utc.timestamp_opt(secs, nanos).unwrap();
            let local = utc.with_timezone(&FixedOffset::east_opt(offset).unwrap());
            let text = local.to_rfc3339_opts(SecondsFormat::AutoSi, z && offset == 0);
            let ts = prost_types::Timestamp {
                seconds: secs,
                nanos: nanos as i32,
            };
            (text, ts)
        })
}

fn attributes() -> impl Strategy<Value = Option<Value>> {
    prop::option::of(
        prop::collection::btree_map(
            "[a-z_]{1,10}",
            prop_oneof![
                ".{0,30}".prop_map(Value::String),
                any::<i64>().prop_map(Value::from),
                any::<bool>().prop_map(Value::Bool),
                Just(Value::Null),
            ],
            0..8,
        )
        .prop_map(|m| Value::Object(m.into_iter().collect())),
    )
}

/// The spellings of a UUID `uuid::Uuid::parse_str` reads; the parser stores it hyphenated.
fn scan_id() -> impl Strategy<Value = (String, String)> {
    // never the nil UUID, which the contract refuses
    (1u128.., 0..5u8).prop_map(|(n, form)| {
        let u = uuid::Uuid::from_u128(n);
        let text = match form {
            0 => u.hyphenated().to_string(),
            1 => u.hyphenated().to_string().to_uppercase(),
            2 => u.simple().to_string(),
            3 => u.braced().to_string(),
            _ => u.urn().to_string(),
        };
        (text, u.hyphenated().to_string())
    })
}

fn valid_scan() -> impl Strategy<Value = Valid> {
    let ids = (
        opt_ident(),
        ident(),
        opt_ident(),
        opt_ident(),
        opt_ident(),
        opt_ident(),
        opt_ident(),
    );
    (
        scan_id(),
        prop::sample::select(kinds()),
        ids,
        prop::option::of(prop_oneof![
            1u32..=10_000,
            Just(mes_domain::scan::MAX_OPERATION),
            1u32..=mes_domain::scan::MAX_OPERATION
        ]),
        prop::option::of(quantity()),
        prop::option::of(any::<bool>()),
        scanned_at(),
        attributes(),
        any::<bool>(),
    )
        .prop_map(
            |(
                (id_text, id),
                (kind_name, kind),
                (work_order, station, lot, material, into_lot, location, defect_code),
                operation,
                quantity,
                pass,
                (at_text, at),
                attributes,
                nulls,
            )| {
                use pb::ScanKind as K;
                let is = |ks: &[K]| ks.contains(&kind);
                let mut required = vec!["scan_id", "kind", "station", "scanned_at"];
                // Fill in what the kind requires; keep what it does not as generated.
                let mut need = |name: &'static str, yes: bool| {
                    if yes {
                        required.push(name);
                    }
                    yes
                };
                let work_order = if need("work_order", !is(&[K::Move])) {
                    work_order.or(Some("WO-1000".to_owned()))
                } else {
                    work_order
                };
                let operation = if need("operation", is(&[K::StartOperation, K::CompleteOperation]))
                {
                    operation.or(Some(10))
                } else {
                    operation
                };
                let lot = if need(
                    "lot",
                    is(&[K::Consume, K::Produce, K::Scrap, K::Move, K::Inspect]),
                ) {
                    lot.or(Some("LOT-1".to_owned()))
                } else {
                    lot
                };
                let quantity = if need("quantity", is(&[K::Consume, K::Produce, K::Scrap, K::Move]))
                {
                    quantity.or(Some("1".to_owned()))
                } else {
                    quantity
                };
                // only a consume goes into a lot
                let into_lot = into_lot.filter(|_| is(&[K::Consume]));
                let location = if need("location", is(&[K::Move])) {
                    location.or(Some("WH-1".to_owned()))
                } else {
                    location
                };
                let result = if need("result", is(&[K::Inspect])) {
                    pass.or(Some(true))
                } else {
                    None
                };
                let defect_code = if need(
                    "defect_code",
                    is(&[K::Scrap]) || (is(&[K::Inspect]) && result == Some(false)),
                ) {
                    defect_code.or(Some("SCRATCH".to_owned()))
                } else {
                    defect_code
                };

                let mut obj = Map::new();
                let mut put = |name: &str, v: Option<Value>| match v {
                    Some(v) => {
                        obj.insert(name.to_owned(), v);
                    }
                    // `null` reads as absent
                    None if nulls => {
                        obj.insert(name.to_owned(), Value::Null);
                    }
                    None => {}
                };
                put("scan_id", Some(json!(id_text)));
                put("kind", Some(json!(kind_name)));
                put("work_order", work_order.clone().map(Value::from));
                put("operation", operation.map(Value::from));
                put("station", Some(json!(station)));
                put("lot", lot.clone().map(Value::from));
                put("material", material.clone().map(Value::from));
                put("quantity", quantity.clone().map(Value::from));
                put("into_lot", into_lot.clone().map(Value::from));
                put("location", location.clone().map(Value::from));
                put(
                    "result",
                    result.map(|p| json!(if p { "pass" } else { "fail" })),
                );
                put("defect_code", defect_code.clone().map(Value::from));
                put("scanned_at", Some(json!(at_text)));
                put("attributes", attributes.clone());

                let expected = pb::Scan {
                    scan_id: id,
                    kind: kind as i32,
                    work_order: work_order.unwrap_or_default(),
                    operation: operation.unwrap_or(0),
                    station,
                    lot: lot.unwrap_or_default(),
                    material: material.unwrap_or_default(),
                    quantity: quantity.unwrap_or_default(),
                    into_lot: into_lot.unwrap_or_default(),
                    location: location.unwrap_or_default(),
                    result: match result {
                        Some(true) => pb::InspectResult::Pass,
                        Some(false) => pb::InspectResult::Fail,
                        None => pb::InspectResult::Unspecified,
                    } as i32,
                    defect_code: defect_code.unwrap_or_default(),
                    scanned_at: Some(at),
                    attributes_json: attributes
                        .map(|a| serde_json::to_string(&a).unwrap())
                        .unwrap_or_default(),
                };
                Valid {
                    json: Value::Object(obj),
                    expected,
                    required,
                }
            },
        )
}

// ---------------------------------------------------------------- one bad field

/// A value of the wrong JSON type for a field (`null` is absence, not a wrong type).
fn wrong_type(is_string: bool) -> impl Strategy<Value = Value> {
    let number = any_number().prop_map(Value::Number);
    let string = any_string().prop_map(Value::String);
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        if is_string {
            number.boxed()
        } else {
            string.boxed()
        },
        Just(json!([])),
        Just(json!(["WO-1000"])),
        Just(json!({"value": 1})),
    ]
}

/// A bad value for an identifier field.
fn bad_ident() -> impl Strategy<Value = Value> {
    prop_oneof![
        wrong_type(true),
        Just(json!("")),
        "[A-Za-z0-9-]{65,80}".prop_map(Value::from),
        "x{501,520}".prop_map(Value::from),
        " [A-Z0-9-]{1,8}".prop_map(Value::from),
        "[A-Z0-9-]{1,8} ".prop_map(Value::from),
        "[A-Z]{1,4}[ ;'\"\\\\<>%é\\x00\\n\\t][0-9]{1,4}".prop_map(Value::from),
        Just(json!("x' OR '1'='1")),
    ]
}

fn bad_quantity() -> impl Strategy<Value = Value> {
    prop_oneof![
        wrong_type(true),
        prop::sample::select(vec![
            "",
            "0",
            "00",
            "0.0",
            "0.000000000000",
            "-1",
            "+1",
            "1e3",
            "1E3",
            ".5",
            "1.",
            " 1",
            "1 ",
            "1,5",
            "1.2.3",
            "NaN",
            "inf",
            "0x10",
            "½",
            "١",
        ])
        .prop_map(Value::from),
        // 10^12 and more, 7 decimals and more, more than 40 characters
        "[1-9][0-9]{12,18}".prop_map(Value::from),
        "[0-9]{1,5}\\.[0-9]{7,13}".prop_map(Value::from),
        "[1-9][0-9]{40,45}".prop_map(Value::from),
    ]
}

fn bad_operation() -> impl Strategy<Value = Value> {
    prop_oneof![
        wrong_type(false),
        Just(json!(0)),
        (i64::MIN..0).prop_map(Value::from),
        (u64::from(mes_domain::scan::MAX_OPERATION) + 1..=u64::MAX).prop_map(Value::from),
        (0.01f64..1e6)
            .prop_filter("not whole", |f| f.fract() != 0.0)
            .prop_map(Value::from),
        Just(json!("10")),
    ]
}

fn bad_value(field: &'static str) -> BoxedStrategy<Value> {
    match field {
        "scan_id" => prop_oneof![
            wrong_type(true),
            Just(json!("")),
            Just(json!("nope")),
            Just(json!("0f8fad5b-d9cb-469f-a165-70867728950g")),
            Just(json!("0f8fad5b-d9cb-469f-a165-70867728950")),
            Just(json!("00000000-0000-0000-0000-000000000000")),
            "[0-9a-f]{65,70}".prop_map(Value::from),
        ]
        .boxed(),
        "kind" => prop_oneof![
            wrong_type(true),
            Just(json!("void")),
            Just(json!("Consume")),
            Just(json!("")),
            "[a-z_]{1,20}"
                .prop_filter("not a kind", |k| !kinds().iter().any(|(n, _)| n == k))
                .prop_map(Value::from),
            "x{65,70}".prop_map(Value::from),
        ]
        .boxed(),
        "operation" => bad_operation().boxed(),
        "quantity" => bad_quantity().boxed(),
        "result" => prop_oneof![
            wrong_type(true),
            Just(json!("PASS")),
            Just(json!("maybe")),
            Just(json!("")),
            "x{17,20}".prop_map(Value::from),
        ]
        .boxed(),
        "scanned_at" => prop_oneof![
            wrong_type(true),
            Just(json!("")),
            Just(json!("2025-03-01T08:15:30")),
            Just(json!("2025-13-01T08:15:30Z")),
            Just(json!("2025-03-01 08:15:30")),
            Just(json!("yesterday")),
            Just(json!("1740816930")),
            "x{65,70}".prop_map(Value::from),
            // outside the contract's window
            Just(json!("1999-12-31T23:59:59Z")),
            Just(json!("9999-01-01T00:00:00Z")),
        ]
        .boxed(),
        "attributes" => prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            any_number().prop_map(Value::Number),
            any_string().prop_map(Value::String),
            Just(json!([])),
            Just(json!(["shift", "A"])),
            "y{4090,4200}".prop_map(|s| json!({ "x": s })),
        ]
        .boxed(),
        _ => bad_ident().boxed(),
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Replace (or add) the field with a bad value.
    Set(&'static str, Value),
    /// Remove a required field (index into `Valid::required`).
    Remove(prop::sample::Index),
    /// Add a field the parser does not know.
    Stray(String, Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        8 => prop::sample::select(SCAN_FIELDS)
            .prop_flat_map(|f| bad_value(f).prop_map(move |v| Mutation::Set(f, v))),
        2 => any::<prop::sample::Index>().prop_map(Mutation::Remove),
        1 => (
            ".{1,12}".prop_filter("unknown", |k| !SCAN_FIELDS.contains(&k.as_str())),
            any_json()
        )
            .prop_map(|(k, v)| Mutation::Stray(k, v)),
    ]
}

// ---------------------------------------------------------------- the properties

proptest! {
    #![proptest_config(config(512))]

    /// Arbitrary JSON never panics the parser; an answer either holds one proto scan per
    /// item of `scans` or errors that name only fields the body has or the parser reads.
    #[test]
    fn prop_arbitrary_json_never_panics_and_errors_name_real_fields(body in any_body()) {
        match parse_batch(&body) {
            Ok(scans) => {
                let items = body["scans"].as_array().expect("accepted without a scans array");
                prop_assert!((1..=MAX_SCANS).contains(&items.len()));
                prop_assert_eq!(scans.len(), items.len());
            }
            Err(p) => {
                prop_assert_eq!(p.code, "validation_failed");
                prop_assert!(!p.errors.is_empty());
                let allowed = allowed_fields(&body);
                for e in &p.errors {
                    prop_assert!(
                        allowed.contains(&e.field),
                        "error names {:?} ({}), not a field of the body", e.field, e.message
                    );
                    prop_assert!(!e.message.is_empty());
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Valid scans of every kind, in every accepted spelling, come out as the proto scan
    /// they describe (UUID hyphenated lower case, the quantity string as sent, the instant
    /// of the time whatever its offset, attributes re-serialised).
    #[test]
    fn prop_valid_scans_are_accepted_as_given(batch in prop::collection::vec(valid_scan(), 1..12)) {
        let body = json!({"scans": batch.iter().map(|v| v.json.clone()).collect::<Vec<_>>()});
        let scans = match parse_batch(&body) {
            Ok(scans) => scans,
            Err(p) => {
                let errors: Vec<String> = p.errors.iter().map(|e| format!("{} {}", e.field, e.message)).collect();
                return Err(TestCaseError::fail(format!("refused: {errors:?}")));
            }
        };
        prop_assert_eq!(scans.len(), batch.len());
        for (got, v) in scans.iter().zip(&batch) {
            prop_assert_eq!(got, &v.expected);
        }
    }

    /// One bad field in one scan of a valid batch is refused, and the only error names that
    /// scan's field.
    #[test]
    fn prop_one_bad_field_is_refused_naming_it(
        batch in prop::collection::vec(valid_scan(), 1..6),
        at in any::<prop::sample::Index>(),
        m in mutation(),
    ) {
        let i = at.index(batch.len());
        let mut items: Vec<Value> = batch.iter().map(|v| v.json.clone()).collect();
        let obj = items[i].as_object_mut().unwrap();
        let field = match m {
            Mutation::Set(f, v) => {
                obj.insert(f.to_owned(), v);
                f.to_owned()
            }
            Mutation::Remove(r) => {
                let f = *r.get(&batch[i].required);
                obj.remove(f);
                f.to_owned()
            }
            Mutation::Stray(k, v) => {
                obj.insert(k.clone(), v);
                k
            }
        };
        let body = json!({ "scans": items });
        match parse_batch(&body) {
            Ok(_) => return Err(TestCaseError::fail(format!("accepted with a bad {field}: {}", body["scans"][i]))),
            Err(p) => prop_assert_eq!(fields(&p), vec![format!("scans[{i}].{field}")], "{:?}", p.errors),
        }
    }
}
