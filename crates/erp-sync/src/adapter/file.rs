//! The `file` adapter: the ERP is a JSON file holding the plant, and a JSON-lines file that
//! receives confirmations and reversals.
//!
//! Inbound, the file has no per-record change dates, so every pull returns the whole plant and
//! the cursor is the file's content hash; scan-ingest's idempotent upserts report unchanged
//! records as such. Outbound, a confirmation is appended as one line, unless a line with its
//! idempotency key is already in the file: the file is the ERP side, so each key appears there
//! exactly once, even across processes (the file is locked while it is checked and appended).

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{AdapterError, ErpAdapter, Posted, Pulled};
use crate::contract::{self, Checked, Drift, DriftKind};
use crate::domain::{
    Confirmation, ErpQuantities, Material, ReceivedLot, Reversal, Station, WorkOrder,
};

/// Top-level keys of the plant file.
const SECTIONS: [&str; 5] = ["plant", "materials", "stations", "lots", "work_orders"];

pub struct FileAdapter {
    plant_file: PathBuf,
    outbox_file: PathBuf,
    /// Idempotency keys already in the outbox file, and how far it has been read.
    index: Arc<Mutex<KeyIndex>>,
}

#[derive(Default)]
struct KeyIndex {
    /// Bytes of the file read so far (complete lines only).
    offset: u64,
    keys: HashSet<String>,
}

/// One line of the outbox file: `type` is `production_confirmation` or `production_reversal`.
#[derive(Serialize)]
struct OutboxLine<'a, T: Serialize> {
    idempotency_key: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    posted_at: String,
    #[serde(flatten)]
    document: &'a T,
}

impl FileAdapter {
    pub fn new(plant_file: impl Into<PathBuf>, outbox_file: impl Into<PathBuf>) -> Self {
        Self {
            plant_file: plant_file.into(),
            outbox_file: outbox_file.into(),
            index: Arc::default(),
        }
    }

    /// Appends one line unless its key is in the file already.
    async fn append<T: Serialize>(
        &self,
        idempotency_key: &str,
        kind: &'static str,
        document: &T,
    ) -> Result<Posted, AdapterError> {
        let line = serde_json::to_string(&OutboxLine {
            idempotency_key,
            kind,
            posted_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            document,
        })
        .map_err(|e| AdapterError::Rejected(format!("cannot serialise {kind}: {e}")))?;
        let path = self.outbox_file.clone();
        let index = self.index.clone();
        let key = idempotency_key.to_owned();
        tokio::task::spawn_blocking(move || append_once(&path, &index, &key, &line))
            .await
            .map_err(|e| AdapterError::Unavailable(format!("outbox writer failed: {e}")))?
            .map_err(|e| {
                AdapterError::Unavailable(format!(
                    "cannot append to {}: {e}",
                    self.outbox_file.display()
                ))
            })
    }

    /// The plant document and its content hash.
    async fn read_plant(&self) -> Result<(Value, String), AdapterError> {
        let bytes = tokio::fs::read(&self.plant_file).await.map_err(|e| {
            AdapterError::Unavailable(format!("cannot read {}: {e}", self.plant_file.display()))
        })?;
        let hash: String = Sha256::digest(&bytes)
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect();
        let doc: Value = serde_json::from_slice(&bytes).map_err(|e| {
            AdapterError::Unreadable(format!("{} is not JSON: {e}", self.plant_file.display()))
        })?;
        if !doc.is_object() {
            return Err(AdapterError::Unreadable(format!(
                "{} must hold a JSON object, not {}",
                self.plant_file.display(),
                contract::type_name(&doc)
            )));
        }
        Ok((doc, format!("sha256:{hash}")))
    }

    /// Checks every record of one section of the plant.
    async fn pull_section<T>(
        &self,
        section: &'static str,
        check: fn(&Value, usize) -> Checked<T>,
    ) -> Result<Pulled<T>, AdapterError> {
        let (doc, cursor) = self.read_plant().await?;
        let mut notes = Vec::new();
        if section == "materials" {
            // Unknown top-level keys are reported once per pull, with the first entity.
            if let Some(obj) = doc.as_object() {
                for key in obj.keys().filter(|k| !SECTIONS.contains(&k.as_str())) {
                    notes.push(Drift {
                        kind: DriftKind::UnknownField,
                        field: key.clone(),
                        message: "is not part of the plant file contract".into(),
                    });
                }
            }
        }
        let items = match doc.get(section) {
            Some(Value::Array(records)) => records
                .iter()
                .enumerate()
                .map(|(i, v)| check(v, i))
                .collect(),
            None | Some(Value::Null) => {
                notes.push(Drift {
                    kind: DriftKind::MissingField,
                    field: section.into(),
                    message: "is required (an array, possibly empty)".into(),
                });
                Vec::new()
            }
            Some(other) => {
                notes.push(Drift {
                    kind: DriftKind::WrongType,
                    field: section.into(),
                    message: format!("must be an array, not {}", contract::type_name(other)),
                });
                Vec::new()
            }
        };
        Ok(Pulled {
            items,
            notes,
            cursor: Some(cursor),
        })
    }
}

/// Appends `line` unless `key` is already in the file. Runs on a blocking thread; the file is
/// locked (advisory, exclusive) so that other processes appending to it wait.
fn append_once(
    path: &Path,
    index: &Mutex<KeyIndex>,
    key: &str,
    line: &str,
) -> std::io::Result<Posted> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut index = index
        .lock()
        .map_err(|_| std::io::Error::other("outbox index poisoned"))?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    file.lock()?;
    let result = (|| {
        let len = file.metadata()?.len();
        if len < index.offset {
            // The file was replaced or truncated: read it again from the start.
            *index = KeyIndex::default();
        }
        file.seek(SeekFrom::Start(index.offset))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)?;
        // Only complete lines count; a torn last line (a crash mid-write) is not a post.
        let complete = tail.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
        for raw in tail[..complete].split(|b| *b == b'\n') {
            if let Ok(v) = serde_json::from_slice::<Value>(raw)
                && let Some(k) = v.get("idempotency_key").and_then(Value::as_str)
            {
                index.keys.insert(k.to_owned());
            }
        }
        index.offset += complete as u64;
        if index.keys.contains(key) {
            return Ok(Posted::AlreadyThere);
        }
        let mut out = Vec::with_capacity(line.len() + 2);
        if complete < tail.len() {
            // Terminate the torn line so that ours stands on its own.
            out.push(b'\n');
        }
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
        file.write_all(&out)?;
        file.sync_data()?;
        index.offset = len + out.len() as u64;
        index.keys.insert(key.to_owned());
        Ok(Posted::New)
    })();
    let _ = file.unlock();
    result
}

#[async_trait::async_trait]
impl ErpAdapter for FileAdapter {
    fn name(&self) -> &'static str {
        "file"
    }

    async fn ping(&self) -> Result<(), AdapterError> {
        tokio::fs::metadata(&self.plant_file).await.map_err(|e| {
            AdapterError::Unavailable(format!("cannot read {}: {e}", self.plant_file.display()))
        })?;
        Ok(())
    }

    async fn pull_materials(&self, _since: Option<&str>) -> Result<Pulled<Material>, AdapterError> {
        self.pull_section("materials", contract::material).await
    }

    async fn pull_stations(&self, _since: Option<&str>) -> Result<Pulled<Station>, AdapterError> {
        self.pull_section("stations", contract::station).await
    }

    async fn pull_received_lots(
        &self,
        _since: Option<&str>,
    ) -> Result<Pulled<ReceivedLot>, AdapterError> {
        self.pull_section("lots", contract::received_lot).await
    }

    async fn pull_work_orders(
        &self,
        _since: Option<&str>,
    ) -> Result<Pulled<WorkOrder>, AdapterError> {
        self.pull_section("work_orders", contract::work_order).await
    }

    async fn post_confirmation(
        &self,
        confirmation: &Confirmation,
        idempotency_key: &str,
    ) -> Result<Posted, AdapterError> {
        self.append(idempotency_key, "production_confirmation", confirmation)
            .await
    }

    /// Appended like a confirmation, with `"type": "production_reversal"` and negated
    /// quantities (so the books, and `quantities`, add up).
    async fn post_reversal(
        &self,
        reversal: &Reversal,
        idempotency_key: &str,
    ) -> Result<Posted, AdapterError> {
        self.append(idempotency_key, "production_reversal", reversal)
            .await
    }

    /// Work orders: the good quantities of their confirmations in the outbox file. Received
    /// lots: the plant's quantity less what confirmations consumed and scrapped from them.
    async fn quantities(&self) -> Result<ErpQuantities, AdapterError> {
        let (doc, _) = self.read_plant().await?;
        let mut q = ErpQuantities::default();
        let records = |section: &str| {
            doc.get(section)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        for (i, v) in records("work_orders").iter().enumerate() {
            if let Some(wo) = contract::work_order(v, i).record {
                q.work_orders.insert(wo.number, Decimal::ZERO);
            }
        }
        for (i, v) in records("lots").iter().enumerate() {
            if let Some(lot) = contract::received_lot(v, i).record {
                q.lots.insert(lot.lot, lot.quantity);
            }
        }
        let text = match tokio::fs::read_to_string(&self.outbox_file).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(AdapterError::Unavailable(format!(
                    "cannot read {}: {e}",
                    self.outbox_file.display()
                )));
            }
        };
        let mut seen = HashSet::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let key = v.get("idempotency_key").and_then(Value::as_str);
            if !key.is_some_and(|k| seen.insert(k.to_owned())) {
                continue;
            }
            if let Some(good) = v
                .get("work_order")
                .and_then(Value::as_str)
                .and_then(|wo| q.work_orders.get_mut(wo))
            {
                *good += decimal_at(&v, "good_quantity");
            }
            for list in ["consumed_lots", "scrapped_lots"] {
                for used in v.get(list).and_then(Value::as_array).into_iter().flatten() {
                    if let Some(on_hand) = used
                        .get("lot")
                        .and_then(Value::as_str)
                        .and_then(|l| q.lots.get_mut(l))
                    {
                        *on_hand -= decimal_at(used, "quantity");
                    }
                }
            }
        }
        Ok(q)
    }
}

/// A decimal string field of an outbox line (0 when absent or unreadable).
fn decimal_at(v: &Value, field: &str) -> Decimal {
    v.get(field)
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

    fn confirmation(scan: &str) -> Confirmation {
        Confirmation {
            work_order: "WO-1000".into(),
            operation: 10,
            station: "ST-10".into(),
            good_quantity: Decimal::from(10),
            scrap_quantity: Decimal::ZERO,
            produced_lots: vec![],
            consumed_lots: vec![],
            scrapped_lots: vec![],
            completed_at: chrono::Utc::now(),
            completed_by: "op1".into(),
            completion_scan: scan.into(),
            follows: None,
        }
    }

    fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    #[tokio::test]
    async fn a_key_is_appended_once_even_by_two_adapters() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sub/out.jsonl");
        let a = FileAdapter::new("unused.json", &out);
        let b = FileAdapter::new("unused.json", &out);
        let c = confirmation("s1");
        let key = c.idempotency_key();
        assert_eq!(a.post_confirmation(&c, &key).await.unwrap(), Posted::New);
        assert_eq!(
            a.post_confirmation(&c, &key).await.unwrap(),
            Posted::AlreadyThere
        );
        // A second process (fresh index) sees the key in the file.
        assert_eq!(
            b.post_confirmation(&c, &key).await.unwrap(),
            Posted::AlreadyThere
        );
        let c2 = confirmation("s2");
        assert_eq!(
            b.post_confirmation(&c2, &c2.idempotency_key())
                .await
                .unwrap(),
            Posted::New
        );
        // `a` catches up with what `b` appended.
        assert_eq!(
            a.post_confirmation(&c2, &c2.idempotency_key())
                .await
                .unwrap(),
            Posted::AlreadyThere
        );
        let all = lines(&out);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0]["idempotency_key"], "WO-1000:10:s1");
        assert_eq!(all[0]["type"], "production_confirmation");
        assert_eq!(all[0]["work_order"], "WO-1000");
        assert_eq!(
            all[0]["good_quantity"], "10",
            "quantities are decimal strings"
        );
    }

    #[tokio::test]
    async fn a_torn_last_line_is_not_a_post_and_is_terminated() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        std::fs::write(&out, "{\"idempotency_key\": \"WO-1000:10:s1\", \"work_o").unwrap();
        let a = FileAdapter::new("unused.json", &out);
        let c = confirmation("s1");
        assert_eq!(
            a.post_confirmation(&c, &c.idempotency_key()).await.unwrap(),
            Posted::New
        );
        assert_eq!(lines(&out).len(), 1);
    }

    #[tokio::test]
    async fn the_demo_plant_passes_the_contract() {
        let plant = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/demo/plant.json");
        let a = FileAdapter::new(plant, "unused.jsonl");
        let m = a.pull_materials(None).await.unwrap();
        let s = a.pull_stations(None).await.unwrap();
        let l = a.pull_received_lots(None).await.unwrap();
        let w = a.pull_work_orders(None).await.unwrap();
        assert_eq!(
            (m.items.len(), s.items.len(), l.items.len(), w.items.len()),
            (5, 3, 4, 3)
        );
        for drifts in [&m.notes, &s.notes, &l.notes, &w.notes] {
            assert!(drifts.is_empty(), "{drifts:?}");
        }
        assert!(
            m.items
                .iter()
                .all(|c| c.drifts.is_empty() && c.record.is_some())
        );
        assert!(
            w.items
                .iter()
                .all(|c| c.drifts.is_empty() && c.record.is_some())
        );
        assert!(m.cursor.unwrap().starts_with("sha256:"));
    }

    #[tokio::test]
    async fn an_unreadable_plant_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let plant = dir.path().join("plant.json");
        std::fs::write(&plant, "not json").unwrap();
        let a = FileAdapter::new(&plant, dir.path().join("o.jsonl"));
        assert!(matches!(
            a.pull_materials(None).await,
            Err(AdapterError::Unreadable(_))
        ));
        std::fs::write(&plant, r#"{"materials": {"number": "M"}}"#).unwrap();
        let pulled = a.pull_materials(None).await.unwrap();
        assert!(pulled.items.is_empty());
        assert_eq!(pulled.notes[0].kind, DriftKind::WrongType);
        let missing = FileAdapter::new(dir.path().join("nope.json"), "o.jsonl");
        assert!(
            missing
                .pull_stations(None)
                .await
                .unwrap_err()
                .is_transient()
        );
    }
}
