//! Times on the wire: protobuf `Timestamp` ↔ `chrono` UTC, and RFC 3339 for REST.

use chrono::{DateTime, SecondsFormat, Utc};
use prost_types::Timestamp;

/// A UTC time as a protobuf timestamp.
pub fn to_proto(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf timestamp as a UTC time; `None` when out of range (negative or ≥ 10^9 nanos,
/// seconds beyond what `chrono` holds).
pub fn from_proto(ts: &Timestamp) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

/// A protobuf timestamp as RFC 3339 (UTC, `Z`, as many fractional digits as needed).
pub fn to_rfc3339(ts: &Timestamp) -> Option<String> {
    from_proto(ts).map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_and_bad_nanos_are_none() {
        let t = DateTime::parse_from_rfc3339("2025-03-01T08:15:30.25Z")
            .unwrap()
            .to_utc();
        let ts = to_proto(t);
        assert_eq!(from_proto(&ts), Some(t));
        assert_eq!(to_rfc3339(&ts).as_deref(), Some("2025-03-01T08:15:30.250Z"));
        for nanos in [-1, 1_000_000_000] {
            assert_eq!(from_proto(&Timestamp { seconds: 0, nanos }), None);
        }
        assert_eq!(
            from_proto(&Timestamp {
                seconds: i64::MAX,
                nanos: 0
            }),
            None
        );
    }
}
