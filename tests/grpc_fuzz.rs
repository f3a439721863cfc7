//! Hostile input over gRPC: every method of every service (found in the services' own
//! descriptor set, so a new method is fuzzed without touching this file) gets messages built
//! from its request schema with hostile field values, mutations of them, and random bytes;
//! signed as the gateway signs its calls, under several roles. No answer may be `UNKNOWN` or
//! `INTERNAL` (bytes that do not decode as the request type are the caller's fault:
//! `INVALID_ARGUMENT`, `mes_proto::codec`); no service may die or stop serving.
//!
//! The random seed is printed; `MES_FUZZ_SEED=<seed>` replays a run, `MES_FUZZ_CASES=<n>` sets
//! the cases per method.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::{Buf, BufMut};
use mes_common::identity::CallerKey;
use mes_e2e::System;
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Bytes in, bytes out: the fuzzer builds the wire format itself.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

/// One gRPC method and the service process that serves it.
struct Method {
    path: String,
    input: String,
    server_streaming: bool,
    process: &'static str,
}

fn methods(set: &FileDescriptorSet) -> (Vec<Method>, HashMap<String, DescriptorProto>) {
    let mut messages = HashMap::new();
    let mut methods = Vec::new();
    for file in &set.file {
        let package = file.package();
        fn collect(
            prefix: &str,
            msgs: &[DescriptorProto],
            out: &mut HashMap<String, DescriptorProto>,
        ) {
            for m in msgs {
                let name = format!("{prefix}.{}", m.name());
                collect(&name, &m.nested_type, out);
                out.insert(name, m.clone());
            }
        }
        collect(&format!(".{package}"), &file.message_type, &mut messages);
        for service in &file.service {
            let process = match service.name() {
                "ScanIngest" | "MasterData" | "EventFeed" => "scan-ingest",
                "TraceQuery" => "trace-query",
                "ErpSync" => "erp-sync",
                other => panic!("which process serves {other}? add it here"),
            };
            for m in &service.method {
                methods.push(Method {
                    path: format!("/{package}.{}/{}", service.name(), m.name()),
                    input: m.input_type().to_owned(),
                    server_streaming: m.server_streaming(),
                    process,
                });
            }
        }
    }
    (methods, messages)
}

const STRINGS: &[&str] = &[
    "",
    " ",
    "WO-1001",
    "WO-1002",
    "ST-10",
    "BOLT-L1",
    "STEEL-L1",
    "BIKE-S0001",
    "FRAME-200",
    "00000000-0000-0000-0000-000000000000",
    "not-a-uuid",
    "-1",
    "0",
    "1e309",
    "NaN",
    "0.0000000000000000000000000001",
    "99999999999999999999999999999999999999",
    "1,5",
    "'; DROP TABLE scans; --",
    "%00",
    "\0",
    "../../etc/passwd",
    "Ünïcödé 🚲",
    "\u{202e}evil",
    "released",
    "consume",
    "2026-13-45T99:99:99Z",
];

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: i32, wire: u8, out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | u64::from(wire), out);
}

fn hostile_string(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..10) {
        0 => "x".repeat(rng.random_range(1..20_000)).into_bytes(),
        1 => uuid::Uuid::new_v4().to_string().into_bytes(),
        2 => (0..rng.random_range(0..40))
            .map(|_| rng.random_range(0x20u8..0x7f))
            .collect(),
        _ => STRINGS[rng.random_range(0..STRINGS.len())]
            .as_bytes()
            .to_vec(),
    }
}

fn hostile_varint(rng: &mut StdRng) -> u64 {
    match rng.random_range(0..8) {
        0 => 0,
        1 => 1,
        2 => u64::MAX, // -1 as int32/int64
        3 => i32::MAX as u64,
        4 => i64::MIN as u64,
        5 => rng.random_range(0..10),
        6 => rng.random_range(0..1_000_000),
        _ => rng.next_u64(),
    }
}

/// A message of type `name` built from its schema, with hostile values.
fn message(
    name: &str,
    messages: &HashMap<String, DescriptorProto>,
    rng: &mut StdRng,
    depth: u32,
) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(desc) = messages.get(name) else {
        return out;
    };
    for f in &desc.field {
        if rng.random_bool(0.25) {
            continue;
        }
        let n = if f.label() == Label::Repeated {
            rng.random_range(0..4)
        } else {
            1
        };
        for _ in 0..n {
            match f.r#type() {
                Type::String | Type::Bytes => {
                    let s = hostile_string(rng);
                    key(f.number(), 2, &mut out);
                    varint(s.len() as u64, &mut out);
                    out.extend_from_slice(&s);
                }
                Type::Message => {
                    if depth > 4 {
                        continue;
                    }
                    let inner = message(f.type_name(), messages, rng, depth + 1);
                    key(f.number(), 2, &mut out);
                    varint(inner.len() as u64, &mut out);
                    out.extend_from_slice(&inner);
                }
                Type::Fixed32 | Type::Sfixed32 | Type::Float => {
                    key(f.number(), 5, &mut out);
                    out.extend_from_slice(&rng.next_u32().to_le_bytes());
                }
                Type::Fixed64 | Type::Sfixed64 | Type::Double => {
                    key(f.number(), 1, &mut out);
                    out.extend_from_slice(&rng.next_u64().to_le_bytes());
                }
                _ => {
                    key(f.number(), 0, &mut out);
                    varint(hostile_varint(rng), &mut out);
                }
            }
        }
    }
    out
}

/// Bytes flipped, cut, repeated or inserted: mostly not a valid message any more.
fn mutate(mut bytes: Vec<u8>, rng: &mut StdRng) -> Vec<u8> {
    for _ in 0..rng.random_range(1..4) {
        match rng.random_range(0..4) {
            0 if !bytes.is_empty() => {
                let i = rng.random_range(0..bytes.len());
                bytes[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !bytes.is_empty() => {
                let cut = rng.random_range(0..bytes.len());
                bytes.truncate(cut);
            }
            2 => {
                let again = bytes.clone();
                bytes.extend(again);
            }
            _ => {
                let i = rng.random_range(0..=bytes.len());
                bytes.insert(i, rng.random());
            }
        }
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpc_method_survives_hostile_messages_without_internal_errors() {
    let seed: u64 = std::env::var("MES_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let per_method: usize = std::env::var("MES_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    eprintln!("gRPC fuzzing with MES_FUZZ_SEED={seed}, {per_method} cases per method");
    let mut rng = StdRng::seed_from_u64(seed);
    let set = FileDescriptorSet::decode(mes_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let (methods, messages) = methods(&set);
    assert!(methods.len() >= 20, "only {} methods found", methods.len());

    let mut sys = System::start().await.expect("system");
    let key = CallerKey::from_config(&sys.internal_key);
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut cases = 0usize;
    for m in &methods {
        let channel = sys.channel(m.process).await;
        let mut grpc = tonic::client::Grpc::new(mes_common::grpc::signed(channel, key.clone()));
        for case in 0..per_method {
            let valid = message(&m.input, &messages, &mut rng, 0);
            let body = match case % 4 {
                0 | 1 => valid,
                2 => mutate(valid, &mut rng),
                _ => (0..rng.random_range(0..300))
                    .map(|_| rng.random())
                    .collect(),
            };
            let mut req = tonic::Request::new(body.clone());
            req.set_timeout(Duration::from_secs(10));
            let (user, roles) = [
                ("fuzz", "admin"),
                ("fuzz", "operator"),
                ("fuzz", "quality,planner"),
                ("", ""),
            ][case % 4];
            if !user.is_empty() {
                req.metadata_mut()
                    .insert("x-mes-user", user.parse().expect("ascii"));
                req.metadata_mut()
                    .insert("x-mes-roles", roles.parse().expect("ascii"));
            }
            grpc.ready().await.expect("channel ready");
            let path = http::uri::PathAndQuery::from_maybe_shared(m.path.clone()).expect("path");
            let status = if m.server_streaming {
                match grpc.server_streaming(req, path, Raw).await {
                    Ok(res) => {
                        let mut stream = res.into_inner();
                        // The first event, an error, or a subscription waiting for events.
                        match tokio::time::timeout(Duration::from_millis(300), stream.message())
                            .await
                        {
                            Ok(Err(status)) => Some(status),
                            _ => None,
                        }
                    }
                    Err(status) => Some(status),
                }
            } else {
                grpc.unary(req, path, Raw).await.err()
            };
            cases += 1;
            let code = status.as_ref().map_or(tonic::Code::Ok, |s| s.code());
            // Every INTERNAL or UNKNOWN is a failure of ours, an undecodable request included.
            let undecodable = status
                .as_ref()
                .is_some_and(|s| s.message().contains("not a valid protobuf message"));
            let bad = matches!(code, tonic::Code::Unknown | tonic::Code::Internal);
            let outcome = if undecodable {
                format!("{code:?} (undecodable request)")
            } else {
                format!("{code:?}")
            };
            *outcomes.entry(outcome).or_default() += 1;
            if bad
                && failures.len() < 40
                && !failures.iter().any(|f: &String| f.starts_with(&m.path))
            {
                failures.push(format!(
                    "{} as {roles:?}: {:?} for {} bytes {}",
                    m.path,
                    status,
                    body.len(),
                    body.iter()
                        .take(64)
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                ));
            }
        }
    }
    eprintln!(
        "{cases} gRPC calls over {} methods: {outcomes:?}",
        methods.len()
    );
    let mut alive = true;
    for service in ["scan-ingest", "trace-query", "erp-sync"] {
        alive &= !sys.exited(service) && sys.serves(service).await;
    }
    mes_e2e::reliability_record(
        "gRPC fuzzing",
        &serde_json::json!({
            "scenario": "gRPC fuzzing",
            "seed": seed.to_string(),
            "methods": methods.len(),
            "cases": cases,
            "outcomes": outcomes,
            "internal_or_unknown_failures": failures.len(),
            "services_alive": alive,
            "passed": failures.is_empty() && alive,
            "problems": failures,
        }),
    );
    for service in ["scan-ingest", "trace-query", "erp-sync"] {
        assert!(
            !sys.exited(service),
            "{service} died:\n{}",
            sys.log(service)
        );
        assert!(sys.serves(service).await, "{service} no longer serves");
    }
    assert!(
        failures.is_empty(),
        "MES_FUZZ_SEED={seed}: {} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
