//! The authenticated caller, forwarded by the gateway to the services in gRPC metadata
//! (`x-mes-user`, `x-mes-roles`, `x-mes-device`, `x-mes-station`). Services check roles again
//! for sensitive operations (voids, holds).
//!
//! Metadata alone can be forged by anything that reaches a service's port, so the four services
//! share an internal key (`MES_INTERNAL_KEY`, required outside demo mode): callers sign each
//! request ([`CallerKey::sign`], done by [`crate::grpc::Signed`]) and each server refuses calls
//! whose signature is missing, wrong, stale or already used ([`crate::grpc::server`]).
//!
//! The signature (`x-mes-caller-signature: <unix seconds>.<nonce>.<body SHA-256>.<HMAC>`)
//! covers the method, the time, a random nonce, the identity headers and the SHA-256 of the
//! request body as sent on the wire (the gRPC frames of the message), so a captured call cannot
//! be sent again with another message, and it is accepted once: the server remembers the nonces
//! it has seen for as long as their time is within [`MAX_SKEW_SECONDS`] ([`ReplayCache`]).
//! The digest travels in the header so that the server verifies the HMAC (and the nonce) from
//! the headers alone, before it reads any body ([`CallerKey::verify`]), then checks the body it
//! reads against the signed digest ([`Signature::check_body`]).
//!
//! Rotation: a key may carry one more key accepted on incoming calls, never used to sign
//! (`MES_INTERNAL_KEY_PREVIOUS`), see [`CallerKey::accepting`] and the README.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tonic::metadata::{MetadataMap, MetadataValue};

pub const USER: &str = "x-mes-user";
pub const ROLES: &str = "x-mes-roles";
pub const DEVICE: &str = "x-mes-device";
pub const STATION: &str = "x-mes-station";
/// `<unix seconds>.<32 hex nonce>.<64 hex SHA-256 of the body>.<hex HMAC-SHA256>`, the HMAC over
/// the method, the time, the nonce, the identity headers and the SHA-256 of the request body.
pub const SIGNATURE: &str = "x-mes-caller-signature";

/// How far a signature's time may be from the receiver's clock (clocks of a plant's servers are
/// NTP-synchronised). Within it, a signature is accepted once (see [`ReplayCache`]).
pub const MAX_SKEW_SECONDS: i64 = 60;

/// Nonces a server remembers at most (one per signed call of the last `2 × MAX_SKEW_SECONDS`,
/// about 60 bytes each: ~60 MB when full, i.e. above ~8,000 signed calls per second per process).
/// When full, calls are answered UNAVAILABLE (retrying is safe) rather than accepted unchecked.
pub const REPLAY_CACHE_CAPACITY: usize = 1_000_000;

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

/// The shared internal key that signs calls between the services, with an optional second key
/// accepted on incoming calls during a rotation.
#[derive(Clone)]
pub struct CallerKey {
    /// HMAC-SHA256 keyed once (the key's inner and outer blocks hashed), cloned per call.
    signing: Arc<Hmac<Sha256>>,
    also_accepted: Option<Arc<Hmac<Sha256>>>,
}

fn keyed(secret: &[u8]) -> Arc<Hmac<Sha256>> {
    Arc::new(Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length"))
}

impl std::fmt::Debug for CallerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallerKey(<redacted>)")
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Missing,
    Malformed,
    Stale,
    BadSignature,
    /// A valid signature seen before: a replay.
    Replayed,
    /// A valid signature, but the body received is not the one it signed.
    OtherBody,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Missing => "missing caller signature",
            Refused::Malformed => "malformed caller signature",
            Refused::Stale => "caller signature outside the allowed clock skew",
            Refused::BadSignature => "caller signature does not match",
            Refused::Replayed => "caller signature already used",
            Refused::OtherBody => "caller signature does not match the body",
        }
    }
}

/// A signature header taken apart (format and time checked, not yet the HMAC).
#[derive(Debug, Clone)]
pub struct Signature {
    at: i64,
    nonce: u128,
    /// The SHA-256 of the body the caller signed.
    digest: [u8; 32],
    tag: Vec<u8>,
}

impl Signature {
    /// Reads the signature header and checks its time against `now`.
    pub fn parse(headers: &http::HeaderMap, now: i64) -> Result<Self, Refused> {
        let sig = headers
            .get(SIGNATURE)
            .ok_or(Refused::Missing)?
            .to_str()
            .map_err(|_| Refused::Malformed)?;
        let mut parts = sig.split('.');
        let (Some(at), Some(nonce), Some(digest), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(Refused::Malformed);
        };
        let at: i64 = at.parse().map_err(|_| Refused::Malformed)?;
        if nonce.len() != 32 {
            return Err(Refused::Malformed);
        }
        let nonce = u128::from_str_radix(nonce, 16).map_err(|_| Refused::Malformed)?;
        let digest = unhex(digest)
            .and_then(|d| <[u8; 32]>::try_from(d).ok())
            .ok_or(Refused::Malformed)?;
        let tag = unhex(tag).ok_or(Refused::Malformed)?;
        if (now - at).abs() > MAX_SKEW_SECONDS {
            return Err(Refused::Stale);
        }
        Ok(Self {
            at,
            nonce,
            digest,
            tag,
        })
    }

    /// Checks that `body` (the encoded gRPC frames received) is the body the caller signed.
    /// Only meaningful once [`CallerKey::verify`] accepted the signature.
    pub fn check_body(&self, body: &[u8]) -> Result<(), Refused> {
        let received: [u8; 32] = Sha256::digest(body).into();
        (received == self.digest)
            .then_some(())
            .ok_or(Refused::OtherBody)
    }

    /// The nonce, which [`ReplayCache`] remembers.
    pub fn nonce(&self) -> u128 {
        self.nonce
    }
}

impl CallerKey {
    /// The key from configuration; `None` when it is empty (calls are then not signed).
    pub fn from_config(secret: &str) -> Option<Self> {
        (!secret.is_empty()).then(|| Self {
            signing: keyed(secret.as_bytes()),
            also_accepted: None,
        })
    }

    /// This key, also accepting calls signed with `other` (the previous key during a rotation,
    /// or the next one before any service signs with it); an empty `other` adds nothing.
    pub fn accepting(mut self, other: &str) -> Self {
        self.also_accepted = (!other.is_empty()).then(|| keyed(other.as_bytes()));
        self
    }

    fn mac(
        key: &Hmac<Sha256>,
        method: &str,
        at: i64,
        nonce: u128,
        headers: &http::HeaderMap,
        digest: &[u8; 32],
    ) -> Hmac<Sha256> {
        let mut mac = key.clone();
        let get = |k: &str| {
            headers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        };
        let (at, nonce, digest) = (at.to_string(), format!("{nonce:032x}"), hex(digest));
        // Length-prefixed fields: no two different requests give the same input.
        for field in [
            "mes-call-v2",
            method,
            &at,
            &nonce,
            get(USER),
            get(ROLES),
            get(DEVICE),
            get(STATION),
            &digest,
        ] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field.as_bytes());
        }
        mac
    }

    /// Signs a call of `method` (`/package.Service/Method`) whose identity headers (whatever they
    /// are, none included) are in `headers` and whose body (the encoded gRPC frames) is `body`:
    /// sets [`SIGNATURE`] with the current time and a fresh random nonce.
    pub fn sign(&self, method: &str, headers: &mut http::HeaderMap, body: &[u8]) {
        let at = chrono::Utc::now().timestamp();
        let nonce: u128 = rand::random();
        let digest: [u8; 32] = Sha256::digest(body).into();
        let tag = Self::mac(&self.signing, method, at, nonce, headers, &digest)
            .finalize()
            .into_bytes();
        let value = format!("{at}.{nonce:032x}.{}.{}", hex(&digest), hex(&tag));
        if let Ok(v) = http::HeaderValue::try_from(value) {
            headers.insert(SIGNATURE, v);
        }
    }

    /// Checks a parsed signature of a call of `method` with `headers` against this key and the
    /// other accepted one, from the headers alone (the body digest it signed is in the
    /// signature): nothing of the body needs to be read to authenticate the caller. Checks
    /// neither the body (see [`Signature::check_body`]) nor replays (see [`ReplayCache`]).
    pub fn verify(
        &self,
        sig: &Signature,
        method: &str,
        headers: &http::HeaderMap,
    ) -> Result<(), Refused> {
        std::iter::once(&self.signing)
            .chain(self.also_accepted.as_ref())
            .any(|key| {
                Self::mac(key, method, sig.at, sig.nonce, headers, &sig.digest)
                    .verify_slice(&sig.tag)
                    .is_ok()
            })
            .then_some(())
            .ok_or(Refused::BadSignature)
    }
}

/// The nonces of the signatures a server accepted within the time window, so that each is
/// accepted once. In memory, per server process: with several replicas behind one address, a
/// captured call could still be replayed once to each other replica within the window (the
/// signature binds method, identity and body, so only that same call). Bounded by
/// [`REPLAY_CACHE_CAPACITY`]; only signatures that verified get in.
#[derive(Default)]
pub struct ReplayCache {
    inner: Mutex<Seen>,
    capacity: usize,
}

#[derive(Default)]
struct Seen {
    nonces: HashMap<u128, i64>,
    /// (forget after, nonce) in insertion order; the times never decrease much (one clock).
    order: VecDeque<(i64, u128)>,
}

/// Why [`ReplayCache::admit`] refused a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAdmitted {
    Replayed,
    /// The cache is full of unexpired nonces: the call may be retried later.
    Full,
}

impl ReplayCache {
    pub fn new() -> Self {
        Self::with_capacity(REPLAY_CACHE_CAPACITY)
    }

    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            inner: Mutex::default(),
            capacity,
        }
    }

    /// Records `sig`'s nonce at `now`; refuses one seen before (still within its window).
    pub fn admit(&self, sig: &Signature, now: i64) -> Result<(), NotAdmitted> {
        let mut seen = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(&(until, nonce)) = seen.order.front() {
            if until >= now {
                break;
            }
            seen.order.pop_front();
            if seen.nonces.get(&nonce) == Some(&until) {
                seen.nonces.remove(&nonce);
            }
        }
        if seen.nonces.contains_key(&sig.nonce) {
            return Err(NotAdmitted::Replayed);
        }
        if seen.nonces.len() >= self.capacity {
            return Err(NotAdmitted::Full);
        }
        // Refused as stale after `at + skew`, and `at <= now + skew`: remembering it for two
        // windows from now covers it (and keeps `order` sorted).
        let until = now + 2 * MAX_SKEW_SECONDS;
        seen.nonces.insert(sig.nonce, until);
        seen.order.push_back((until, sig.nonce));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .nonces
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
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
    const BODY: &[u8] = b"\0\0\0\0\x05hello";

    fn supervisor() -> Caller {
        Caller {
            user: "sup1".into(),
            roles: vec!["supervisor".into()],
            device: None,
            station: None,
        }
    }

    fn headers_of(c: &Caller) -> http::HeaderMap {
        let mut md = MetadataMap::new();
        c.write_to(&mut md);
        md.into_headers()
    }

    fn check(
        key: &CallerKey,
        method: &str,
        h: &http::HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<(), Refused> {
        let sig = Signature::parse(h, now)?;
        key.verify(&sig, method, h)?;
        sig.check_body(body)
    }

    #[test]
    fn the_signature_is_the_hmac_of_its_length_prefixed_fields() {
        // Computed independently (a fresh HMAC from the secret, the fields spelled out): a
        // signer and a verifier of another version agree on what is signed.
        let secret = "the internal key of this deployment, 32+ bytes";
        let key = CallerKey::from_config(secret).unwrap();
        let mut caller = supervisor();
        caller.device = Some("TAB-10".into());
        let mut h = headers_of(&caller);
        key.sign(METHOD, &mut h, BODY);
        let sig = Signature::parse(&h, chrono::Utc::now().timestamp()).unwrap();
        let digest: String = Sha256::digest(BODY)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        for field in [
            "mes-call-v2".to_owned(),
            METHOD.to_owned(),
            sig.at.to_string(),
            format!("{:032x}", sig.nonce),
            "sup1".to_owned(),
            "supervisor".to_owned(),
            "TAB-10".to_owned(),
            String::new(),
            digest,
        ] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field.as_bytes());
        }
        assert_eq!(mac.finalize().into_bytes().to_vec(), sig.tag);
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }

    #[test]
    fn a_signed_call_verifies_and_any_change_to_it_does_not() {
        let key = CallerKey::from_config("an internal key of the deployment").unwrap();
        let now = chrono::Utc::now().timestamp();
        let mut h = headers_of(&supervisor());
        key.sign(METHOD, &mut h, BODY);
        assert_eq!(check(&key, METHOD, &h, BODY, now), Ok(()));

        // Another method, another body, another key, a later clock, a forged role: refused.
        assert_eq!(
            check(&key, "/mes.v1.ScanIngest/HoldLot", &h, BODY, now),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            check(&key, METHOD, &h, b"\0\0\0\0\x05hellO", now),
            Err(Refused::OtherBody)
        );
        // The digest in the header is signed too: another body's digest in its place is a
        // forgery, found before any body is read.
        let sig = h[SIGNATURE].to_str().unwrap().to_owned();
        let parts: Vec<&str> = sig.split('.').collect();
        let other_digest = hex(&Sha256::digest(b"\0\0\0\0\x05hellO"));
        let mut swapped = h.clone();
        swapped.insert(
            SIGNATURE,
            format!("{}.{}.{other_digest}.{}", parts[0], parts[1], parts[3])
                .parse()
                .unwrap(),
        );
        let parsed = Signature::parse(&swapped, now).unwrap();
        assert_eq!(
            key.verify(&parsed, METHOD, &swapped),
            Err(Refused::BadSignature)
        );
        let other = CallerKey::from_config("somebody else's key").unwrap();
        assert_eq!(
            check(&other, METHOD, &h, BODY, now),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            check(&key, METHOD, &h, BODY, now + MAX_SKEW_SECONDS + 5),
            Err(Refused::Stale)
        );
        let mut forged = h.clone();
        forged.insert(ROLES, "admin".parse().unwrap());
        assert_eq!(
            check(&key, METHOD, &forged, BODY, now),
            Err(Refused::BadSignature)
        );
        let mut moved = h.clone();
        moved.insert(STATION, "ST-20".parse().unwrap());
        assert_eq!(
            check(&key, METHOD, &moved, BODY, now),
            Err(Refused::BadSignature)
        );
    }

    #[test]
    fn a_second_key_is_accepted_but_never_signs() {
        let old = CallerKey::from_config("the old key").unwrap();
        let new = CallerKey::from_config("the new key").unwrap();
        let rotating = new.clone().accepting("the old key");
        let now = chrono::Utc::now().timestamp();
        let mut by_old = headers_of(&supervisor());
        old.sign(METHOD, &mut by_old, BODY);
        assert_eq!(check(&rotating, METHOD, &by_old, BODY, now), Ok(()));
        assert_eq!(
            check(&new, METHOD, &by_old, BODY, now),
            Err(Refused::BadSignature)
        );
        // It signs with its current key, which the old-only key does not accept.
        let mut by_rotating = headers_of(&supervisor());
        rotating.sign(METHOD, &mut by_rotating, BODY);
        assert_eq!(check(&new, METHOD, &by_rotating, BODY, now), Ok(()));
        assert_eq!(
            check(&old, METHOD, &by_rotating, BODY, now),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            check(&new.clone().accepting(""), METHOD, &by_old, BODY, now),
            Err(Refused::BadSignature)
        );
    }

    #[test]
    fn each_signature_is_admitted_once_within_its_window() {
        let key = CallerKey::from_config("k").unwrap();
        let now = chrono::Utc::now().timestamp();
        let cache = ReplayCache::with_capacity(2);
        let signed = |_| {
            let mut h = headers_of(&supervisor());
            key.sign(METHOD, &mut h, BODY);
            Signature::parse(&h, now).unwrap()
        };
        let (a, b, c) = (signed(1), signed(2), signed(3));
        assert_ne!(a.nonce(), b.nonce(), "every call has its own nonce");
        assert_eq!(cache.admit(&a, now), Ok(()));
        assert_eq!(cache.admit(&a, now), Err(NotAdmitted::Replayed));
        assert_eq!(
            cache.admit(&a, now + MAX_SKEW_SECONDS),
            Err(NotAdmitted::Replayed),
            "remembered as long as its signature is not stale"
        );
        assert_eq!(cache.admit(&b, now), Ok(()));
        assert_eq!(cache.admit(&c, now), Err(NotAdmitted::Full), "bounded");
        // Once their window passed they are forgotten (and stale anyway).
        let later = now + 2 * MAX_SKEW_SECONDS + 1;
        assert_eq!(cache.admit(&c, later), Ok(()));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn unsigned_and_garbled_signatures_are_refused() {
        let key = CallerKey::from_config("k").unwrap();
        let now = chrono::Utc::now().timestamp();
        let mut h = headers_of(&supervisor());
        assert_eq!(check(&key, METHOD, &h, BODY, now), Err(Refused::Missing));
        let nonce = "0".repeat(32);
        for garbage in [
            "".to_owned(),
            "x".into(),
            "12.zz".into(),
            "abc.00".into(),
            "1.0".into(),
            format!("{now}.{nonce}.zz"),
            format!("{now}.abc.00"),
            format!("{now}.{nonce}.00.00"),
            format!("{now}.{nonce}.00"),
            format!("{now}.{nonce}.{}.00", "0".repeat(62)),
            format!("{now}.{nonce}.{}.00", "z".repeat(64)),
            format!("{now}.{nonce}.{}.00.00", "0".repeat(64)),
            format!("{now}.{nonce}.{}.00", "0".repeat(64)),
        ] {
            h.insert(SIGNATURE, garbage.parse().unwrap());
            assert!(
                matches!(
                    check(&key, METHOD, &h, BODY, now),
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
