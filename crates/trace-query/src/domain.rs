//! The rules of the read path, free of transport, SQL and Redis: request validation, the
//! definitions behind the answers (cycle time, report windows, trace ids), and what an applied
//! event changes for the cached answers.

use std::collections::BTreeSet;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use mes_proto::v1 as pb;

use crate::error::Error;

/// Genealogy depth when the request says 0.
pub const DEFAULT_DEPTH: u32 = 20;
/// The deepest genealogy walk answered (and cached).
pub const MAX_DEPTH: u32 = 50;
const MAX_ID_LEN: usize = 128;
/// The longest production report range.
const MAX_REPORT_DAYS: i64 = 400;

/// A lot, serial or work-order number from a request: non-empty, at most 128 characters, no
/// control characters or surrounding spaces.
pub fn identifier(field: &str, value: &str) -> Result<String, Error> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            field,
            format!("must be at most {MAX_ID_LEN} characters"),
        ));
    }
    if value.trim() != value || value.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            "must not contain control characters or surrounding spaces",
        ));
    }
    Ok(value.to_owned())
}

/// `max_depth`: 0 means the default; 1..=50.
pub fn depth(max_depth: u32) -> Result<u32, Error> {
    match max_depth {
        0 => Ok(DEFAULT_DEPTH),
        d if d <= MAX_DEPTH => Ok(d),
        _ => Err(Error::invalid(
            "max_depth",
            format!("must be between 1 and {MAX_DEPTH}"),
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a product to its inputs.
    Backward,
    /// From an input to every product that contains it.
    Forward,
}

impl Direction {
    /// Unspecified means backward (the API's default).
    pub fn from_proto(d: i32) -> Result<Self, Error> {
        match pb::Direction::try_from(d) {
            Ok(pb::Direction::Unspecified | pb::Direction::Backward) => Ok(Self::Backward),
            Ok(pb::Direction::Forward) => Ok(Self::Forward),
            Err(_) => Err(Error::invalid("direction", "must be backward or forward")),
        }
    }

    pub fn to_proto(self) -> pb::Direction {
        match self {
            Self::Backward => pb::Direction::Backward,
            Self::Forward => pb::Direction::Forward,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backward => "backward",
            Self::Forward => "forward",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupBy {
    Hour,
    Station,
    Material,
    WorkOrder,
}

impl GroupBy {
    /// Unspecified means by hour (the API's default).
    pub fn from_proto(g: i32) -> Result<Self, Error> {
        match pb::GroupBy::try_from(g) {
            Ok(pb::GroupBy::Unspecified | pb::GroupBy::Hour) => Ok(Self::Hour),
            Ok(pb::GroupBy::Station) => Ok(Self::Station),
            Ok(pb::GroupBy::Material) => Ok(Self::Material),
            Ok(pb::GroupBy::WorkOrder) => Ok(Self::WorkOrder),
            Err(_) => Err(Error::invalid(
                "group_by",
                "must be hour, station, material or work_order",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Station => "station",
            Self::Material => "material",
            Self::WorkOrder => "work_order",
        }
    }
}

pub use mes_domain::time::to_proto as timestamp;

/// A protobuf time as UTC, `None` when absent or out of range.
pub fn time_of(ts: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    mes_domain::time::from_proto(ts?)
}

/// A production report window `[from, to)`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl Window {
    pub fn parse(
        from: Option<&prost_types::Timestamp>,
        to: Option<&prost_types::Timestamp>,
    ) -> Result<Self, Error> {
        let from = match from {
            None => return Err(Error::invalid("from", "is required")),
            Some(t) => time_of(Some(t)).ok_or_else(|| Error::invalid("from", "is not a time"))?,
        };
        let to = match to {
            None => return Err(Error::invalid("to", "is required")),
            Some(t) => time_of(Some(t)).ok_or_else(|| Error::invalid("to", "is not a time"))?,
        };
        if from >= to {
            return Err(Error::invalid("from", "must be before to"));
        }
        if to - from > TimeDelta::days(MAX_REPORT_DAYS) {
            return Err(Error::invalid(
                "to",
                format!("the range must be at most {MAX_REPORT_DAYS} days"),
            ));
        }
        Ok(Self { from, to })
    }

    /// The whole hours inside the window (answered from the hourly rollup) as `[start, end)`;
    /// the rest (`[from, start)` and `[end, to)`) is answered from the scans. An empty range
    /// (`start == end == from`) when the window holds no whole hour.
    pub fn whole_hours(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        let hour = TimeDelta::hours(1);
        let floor = |t: DateTime<Utc>| t.duration_trunc(hour).unwrap_or(t);
        let start = {
            let f = floor(self.from);
            if f == self.from { f } else { f + hour }
        };
        let end = floor(self.to);
        if start < end {
            (start, end)
        } else {
            (self.from, self.from)
        }
    }
}

/// The report key of an hour bucket: `2026-11-25T11:00:00Z`.
pub fn hour_key(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:00:00Z").to_string()
}

/// The trace id (32 lowercase hex) of a W3C `traceparent`, empty when it is not one.
pub fn trace_id_of(traceparent: &str) -> String {
    let mut parts = traceparent.split('-');
    let (Some(version), Some(trace), Some(span), Some(_flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return String::new();
    };
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(version, 2) || !hex(trace, 32) || !hex(span, 16) || trace.bytes().all(|b| b == b'0') {
        return String::new();
    }
    trace.to_ascii_lowercase()
}

/// What one operation's scans say about its cycle time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CycleFacts {
    /// Active produce scans of the operation.
    pub produces: i64,
    pub first_produce: Option<DateTime<Utc>>,
    pub last_produce: Option<DateTime<Utc>>,
    /// First `start_operation`, last `complete_operation`.
    pub started: Option<DateTime<Utc>>,
    pub completed: Option<DateTime<Utc>>,
}

/// Mean cycle seconds of an operation. Definition: with two or more produce scans, the mean
/// interval between consecutive produce scans (`(last − first) / (n − 1)`); otherwise the span
/// from its first `start_operation` to its last `complete_operation` (one cycle); otherwise 0.
/// Scan times are the devices' `scanned_at`; voided scans do not count.
pub fn mean_cycle_seconds(f: &CycleFacts) -> f64 {
    if let (true, Some(first), Some(last)) = (f.produces >= 2, f.first_produce, f.last_produce) {
        return (last - first).num_milliseconds() as f64 / 1000.0 / (f.produces - 1) as f64;
    }
    match (f.started, f.completed) {
        (Some(s), Some(c)) if c >= s => (c - s).num_milliseconds() as f64 / 1000.0,
        _ => 0.0,
    }
}

/// What a batch of applied events changed, in terms of the cached answers it affects.
///
/// The backward genealogy of lot X shows every edge `a → b` with `b` = X or an ancestor of X,
/// and the node of every ancestor; so an edge `a → b` (added or removed) or a change of lot
/// `b`'s own data affects the backward answers of `b` and of all its descendants
/// (`back_roots`). Symmetrically the forward answers of `a` and all its ancestors
/// (`fwd_roots`). The store expands the roots over the edges (including the ones removed in the
/// batch) into the keys to delete.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Changes {
    pub back_roots: BTreeSet<String>,
    pub fwd_roots: BTreeSet<String>,
    /// Edges removed by voids in this batch (still needed to find who saw them).
    pub removed_edges: Vec<(String, String)>,
    /// Lots whose history changed.
    pub history: BTreeSet<String>,
    /// Work orders whose summary changed.
    pub work_orders: BTreeSet<String>,
    /// Lots that became known (membership filter, "not found" cache).
    pub new_lots: BTreeSet<String>,
    /// Lots produced in this batch (pre-warming).
    pub produced: BTreeSet<String>,
    /// Production figures changed (reports).
    pub reports: bool,
}

impl Changes {
    pub fn edge_added(&mut self, from: &str, to: &str) {
        self.fwd_roots.insert(from.to_owned());
        self.back_roots.insert(to.to_owned());
    }

    pub fn edge_removed(&mut self, from: &str, to: &str) {
        self.edge_added(from, to);
        self.removed_edges.push((from.to_owned(), to.to_owned()));
    }

    /// The lot's own node data (material, quantity, supplier, time) changed.
    pub fn node_changed(&mut self, lot: &str) {
        self.fwd_roots.insert(lot.to_owned());
        self.back_roots.insert(lot.to_owned());
    }

    pub fn touches_genealogy(&self) -> bool {
        !self.back_roots.is_empty() || !self.fwd_roots.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The lots whose cached answers to delete, expanded from [`Changes`] by the store.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Invalidation {
    /// Lots whose backward genealogy answers are stale.
    pub backward: Vec<String>,
    /// Lots whose forward genealogy answers are stale.
    pub forward: Vec<String>,
    pub changes: Changes,
}

impl Invalidation {
    /// The cache keys (without the service's key prefix) whose answers this makes stale:
    /// genealogies, histories, work-order summaries, "not found" entries of lots and work
    /// orders that now exist, and the reports. Sorted, without duplicates.
    pub fn keys(&self) -> Vec<String> {
        let c = &self.changes;
        let mut keys: Vec<String> = Vec::new();
        keys.extend(self.backward.iter().map(|l| format!("g:b:{l}")));
        keys.extend(self.forward.iter().map(|l| format!("g:f:{l}")));
        keys.extend(c.history.iter().map(|l| format!("h:{l}")));
        keys.extend(c.new_lots.iter().map(|l| format!("nf:lot:{l}")));
        for wo in &c.work_orders {
            keys.push(format!("wo:{wo}"));
            keys.push(format!("nf:wo:{wo}"));
        }
        if c.reports {
            keys.push("reports".into());
        }
        keys.sort();
        keys.dedup();
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn identifiers_are_validated_with_the_field_name() {
        assert!(identifier("lot", "STEEL-L1").is_ok());
        for bad in ["", " X", "X ", "a\u{0}b"] {
            let e = identifier("lot", bad).unwrap_err();
            assert!(
                matches!(e, Error::Invalid { ref field, .. } if field == "lot"),
                "{bad:?}"
            );
        }
        assert!(identifier("lot", &"x".repeat(129)).is_err());
    }

    #[test]
    fn depth_defaults_and_is_bounded() {
        assert_eq!(depth(0).unwrap(), 20);
        assert_eq!(depth(1).unwrap(), 1);
        assert_eq!(depth(50).unwrap(), 50);
        assert!(matches!(depth(51), Err(Error::Invalid { field, .. }) if field == "max_depth"));
    }

    #[test]
    fn direction_and_group_by_reject_unknown_values() {
        assert_eq!(Direction::from_proto(0).unwrap(), Direction::Backward);
        assert_eq!(Direction::from_proto(2).unwrap(), Direction::Forward);
        assert!(Direction::from_proto(7).is_err());
        assert_eq!(GroupBy::from_proto(0).unwrap(), GroupBy::Hour);
        assert!(GroupBy::from_proto(9).is_err());
    }

    #[test]
    fn report_windows_are_validated() {
        let t = |s: &str| Some(timestamp(ts(s)));
        let w = Window::parse(
            t("2026-01-01T10:15:00Z").as_ref(),
            t("2026-01-01T13:30:00Z").as_ref(),
        )
        .unwrap();
        assert_eq!(
            w.whole_hours(),
            (ts("2026-01-01T11:00:00Z"), ts("2026-01-01T13:00:00Z"))
        );
        let w = Window::parse(
            t("2026-01-01T10:00:00Z").as_ref(),
            t("2026-01-01T11:00:00Z").as_ref(),
        )
        .unwrap();
        assert_eq!(
            w.whole_hours(),
            (ts("2026-01-01T10:00:00Z"), ts("2026-01-01T11:00:00Z"))
        );
        let w = Window::parse(
            t("2026-01-01T10:10:00Z").as_ref(),
            t("2026-01-01T10:50:00Z").as_ref(),
        )
        .unwrap();
        assert_eq!(w.whole_hours(), (w.from, w.from));
        let same = t("2026-01-01T10:00:00Z");
        assert!(matches!(
            Window::parse(same.as_ref(), same.as_ref()),
            Err(Error::Invalid { field, .. }) if field == "from"
        ));
        assert!(matches!(
            Window::parse(None, same.as_ref()),
            Err(Error::Invalid { field, .. }) if field == "from"
        ));
        let bad_nanos = prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert!(matches!(
            Window::parse(same.as_ref(), Some(&bad_nanos)),
            Err(Error::Invalid { field, .. }) if field == "to"
        ));
        assert!(
            Window::parse(
                t("2020-01-01T00:00:00Z").as_ref(),
                t("2026-01-01T00:00:00Z").as_ref()
            )
            .is_err()
        );
    }

    #[test]
    fn hour_keys_are_rfc3339() {
        assert_eq!(hour_key(ts("2026-11-25T11:00:00Z")), "2026-11-25T11:00:00Z");
    }

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        assert_eq!(
            trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(trace_id_of(""), "");
        assert_eq!(trace_id_of("00-zz-00f067aa0ba902b7-01"), "");
        assert_eq!(
            trace_id_of("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            ""
        );
    }

    #[test]
    fn cycle_time_prefers_consecutive_produces_then_start_to_complete() {
        let f = CycleFacts {
            produces: 3,
            first_produce: Some(ts("2026-01-01T10:00:00Z")),
            last_produce: Some(ts("2026-01-01T10:01:00Z")),
            started: Some(ts("2026-01-01T09:00:00Z")),
            completed: Some(ts("2026-01-01T11:00:00Z")),
        };
        assert_eq!(mean_cycle_seconds(&f), 30.0);
        let f = CycleFacts { produces: 1, ..f };
        assert_eq!(mean_cycle_seconds(&f), 7200.0);
        assert_eq!(mean_cycle_seconds(&CycleFacts::default()), 0.0);
    }

    #[test]
    fn changes_record_both_sides_of_an_edge() {
        let mut c = Changes::default();
        assert!(c.is_empty());
        c.edge_removed("STEEL-L1", "FRAME-L1");
        assert!(c.fwd_roots.contains("STEEL-L1"));
        assert!(c.back_roots.contains("FRAME-L1"));
        assert_eq!(c.removed_edges.len(), 1);
        assert!(c.touches_genealogy());
    }
}
