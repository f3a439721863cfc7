//! The authenticated caller, forwarded by the gateway to the services in gRPC metadata
//! (`x-mes-user`, `x-mes-roles`, `x-mes-device`, `x-mes-station`). Services check roles again
//! for sensitive operations (voids, holds).
//!
//! Metadata alone can be forged by anything that reaches a service's port, so a deployment sets
//! one internal key (`MES_INTERNAL_KEY`, shared by the four services): callers then sign the
//! identity they send ([`CallerKey::sign`], done by [`crate::grpc::TracePropagation`]) and each
//! server refuses calls whose signature is missing, wrong or stale ([`crate::grpc::server`]).

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::metadata::{MetadataMap, MetadataValue};

pub const USER: &str = "x-mes-user";
pub const ROLES: &str = "x-mes-roles";
pub const DEVICE: &str = "x-mes-device";
pub const STATION: &str = "x-mes-station";
/// `<unix seconds>.<hex HMAC-SHA256>` over the method, the time and the identity headers.
pub const SIGNATURE: &str = "x-mes-caller-signature";

/// How far a signature's time may be from the receiver's clock (replays of a captured request
/// are bounded by it; clocks of a plant's servers are NTP-synchronised).
pub const MAX_SKEW_SECONDS: i64 = 120;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub user: String,
    pub roles: Vec<String>,
    pub device: Option<String>,
    pub station: Option<String>,
}

impl Caller {
    /// A caller for internal jobs (erp-sync pulls, projections).
    pub fn system(name: &str) -> Self {
        Self {
            user: name.to_owned(),
            roles: vec!["system".into()],
            device: None,
            station: None,
        }
    }

    /// Reads the caller from metadata; `None` when no user is named.
    pub fn from_metadata(md: &MetadataMap) -> Option<Self> {
        let get = |k: &str| {
            md.get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|s| !s.is_empty())
        };
        let user = get(USER)?.to_owned();
        let roles = get(ROLES)
            .map(|r| {
                r.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Some(Self {
            user,
            roles,
            device: get(DEVICE).map(str::to_owned),
            station: get(STATION).map(str::to_owned),
        })
    }

    /// Writes the caller into metadata (values that are not valid header text are skipped).
    pub fn write_to(&self, md: &mut MetadataMap) {
        let mut put = |k: &'static str, v: &str| {
            if let Ok(v) = MetadataValue::try_from(v) {
                md.insert(k, v);
            }
        };
        put(USER, &self.user);
        put(ROLES, &self.roles.join(","));
        if let Some(d) = &self.device {
            put(DEVICE, d);
        }
        if let Some(s) = &self.station {
            put(STATION, s);
        }
    }

    pub fn has_any_role(&self, roles: &[&str]) -> bool {
        self.roles
            .iter()
            .any(|r| r == "admin" || roles.contains(&r.as_str()))
    }
}

/// The shared internal key that signs caller identities between the services.
#[derive(Clone)]
pub struct CallerKey(Arc<[u8]>);

impl std::fmt::Debug for CallerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallerKey(<redacted>)")
    }
}

/// Why a call's identity was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Missing,
    Malformed,
    Stale,
    BadSignature,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Missing => "missing caller signature",
            Refused::Malformed => "malformed caller signature",
            Refused::Stale => "caller signature outside the allowed clock skew",
            Refused::BadSignature => "caller signature does not match",
        }
    }
}

impl CallerKey {
    /// The key from configuration; `None` when it is empty (calls are then not signed).
    pub fn from_config(secret: &str) -> Option<Self> {
        (!secret.is_empty()).then(|| Self(Arc::from(secret.as_bytes())))
    }

    fn mac(&self, method: &str, at: i64, get: &dyn Fn(&str) -> String) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        // Length-prefixed fields: no two different identities give the same input.
        for field in [
            method.to_owned(),
            at.to_string(),
            get(USER),
            get(ROLES),
            get(DEVICE),
            get(STATION),
        ] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field.as_bytes());
        }
        mac
    }

    /// Signs the identity headers in `md` (whatever they are, none included) for a call of
    /// `method` (`/package.Service/Method`).
    pub fn sign(&self, method: &str, md: &mut MetadataMap) {
        let at = chrono::Utc::now().timestamp();
        let get = |k: &str| {
            md.get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let tag = self.mac(method, at, &get).finalize().into_bytes();
        let value = format!("{at}.{}", hex(&tag));
        if let Ok(v) = MetadataValue::try_from(value.as_str()) {
            md.insert(SIGNATURE, v);
        }
    }

    /// Checks the signature of a call of `method` whose headers `get` reads.
    pub fn verify(
        &self,
        method: &str,
        get: &dyn Fn(&str) -> Option<String>,
        now: i64,
    ) -> Result<(), Refused> {
        let sig = get(SIGNATURE).ok_or(Refused::Missing)?;
        let (at, tag) = sig.split_once('.').ok_or(Refused::Malformed)?;
        let at: i64 = at.parse().map_err(|_| Refused::Malformed)?;
        let tag = unhex(tag).ok_or(Refused::Malformed)?;
        if (now - at).abs() > MAX_SKEW_SECONDS {
            return Err(Refused::Stale);
        }
        let field = |k: &str| get(k).unwrap_or_default();
        self.mac(method, at, &field)
            .verify_slice(&tag)
            .map_err(|_| Refused::BadSignature)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const METHOD: &str = "/mes.v1.ScanIngest/VoidScan";

    fn supervisor() -> Caller {
        Caller {
            user: "sup1".into(),
            roles: vec!["supervisor".into()],
            device: None,
            station: None,
        }
    }

    fn reader(md: &MetadataMap) -> impl Fn(&str) -> Option<String> + '_ {
        |k| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned)
    }

    #[test]
    fn a_signed_identity_verifies_and_any_change_to_it_does_not() {
        let key = CallerKey::from_config("an internal key of the deployment").unwrap();
        let now = chrono::Utc::now().timestamp();
        let mut md = MetadataMap::new();
        supervisor().write_to(&mut md);
        key.sign(METHOD, &mut md);
        assert_eq!(key.verify(METHOD, &reader(&md), now), Ok(()));

        // Another method, another key, a later clock, a forged role: all refused.
        assert_eq!(
            key.verify("/mes.v1.ScanIngest/HoldLot", &reader(&md), now),
            Err(Refused::BadSignature)
        );
        let other = CallerKey::from_config("somebody else's key").unwrap();
        assert_eq!(
            other.verify(METHOD, &reader(&md), now),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            key.verify(METHOD, &reader(&md), now + MAX_SKEW_SECONDS + 5),
            Err(Refused::Stale)
        );
        let mut forged = md.clone();
        forged.insert(ROLES, "admin".parse().unwrap());
        assert_eq!(
            key.verify(METHOD, &reader(&forged), now),
            Err(Refused::BadSignature)
        );
        let mut moved = md.clone();
        moved.insert(STATION, "ST-20".parse().unwrap());
        assert_eq!(
            key.verify(METHOD, &reader(&moved), now),
            Err(Refused::BadSignature)
        );
    }

    #[test]
    fn unsigned_and_garbled_signatures_are_refused() {
        let key = CallerKey::from_config("k").unwrap();
        let now = chrono::Utc::now().timestamp();
        let mut md = MetadataMap::new();
        supervisor().write_to(&mut md);
        assert_eq!(key.verify(METHOD, &reader(&md), now), Err(Refused::Missing));
        for garbage in ["", "x", "12.zz", "abc.00", "1.0"] {
            md.insert(SIGNATURE, garbage.parse().unwrap());
            assert!(
                matches!(
                    key.verify(METHOD, &reader(&md), now),
                    Err(Refused::Malformed | Refused::BadSignature | Refused::Stale)
                ),
                "{garbage:?}"
            );
        }
        assert!(CallerKey::from_config("").is_none());
    }

    #[test]
    fn round_trip_through_metadata() {
        let c = Caller {
            user: "op1".into(),
            roles: vec!["operator".into(), "quality".into()],
            device: Some("TAB-10".into()),
            station: Some("ST-10".into()),
        };
        let mut md = MetadataMap::new();
        c.write_to(&mut md);
        assert_eq!(Caller::from_metadata(&md), Some(c.clone()));
        assert!(c.has_any_role(&["quality"]));
        assert!(!c.has_any_role(&["supervisor"]));
        assert!(Caller::from_metadata(&MetadataMap::new()).is_none());
    }

    #[test]
    fn admin_has_every_role() {
        let c = Caller {
            user: "a".into(),
            roles: vec!["admin".into()],
            ..Default::default()
        };
        assert!(c.has_any_role(&["supervisor"]));
    }
}
