//! Authentication: argon2id password hashes, HS256 access tokens (the algorithm is fixed:
//! `alg: none` and every other algorithm are refused), the revocation list, and the
//! [`Principal`] extractor that authenticates a request, applies the rate limits and records
//! the user on the request span.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use mes_common::identity::Caller;

use crate::AppState;
use crate::limits::{Admission, Subject};
use crate::problem::Problem;

pub const OPERATOR: &str = "operator";
pub const SUPERVISOR: &str = "supervisor";
pub const QUALITY: &str = "quality";
pub const PLANNER: &str = "planner";
pub const ADMIN: &str = "admin";
pub const ROLES: [&str; 5] = [OPERATOR, SUPERVISOR, QUALITY, PLANNER, ADMIN];

/// Hashes a password with argon2id (random salt), off the async threads.
pub async fn hash_password(password: String) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
    })
    .await?
}

/// Verifies a password against a PHC hash, off the async threads (false on any error).
/// Unbounded: for admin commands and seeding; logins go through a [`HashPool`].
pub async fn verify_password(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || verify_blocking(&password, &hash))
        .await
        .unwrap_or(false)
}

/// Bounds the password checks of logins: each argon2id check takes 19 MiB for its whole run,
/// so at most `permits` run at once (the memory of logins is bounded whatever their number);
/// a login that cannot get a permit within `wait` is refused (503) rather than queued.
pub struct HashPool {
    permits: Arc<Semaphore>,
    size: usize,
    wait: Duration,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

/// No password check could start in time.
#[derive(Debug)]
pub struct Busy;

impl HashPool {
    pub fn new(size: usize, wait: Duration) -> Self {
        let size = size.max(1);
        metrics::gauge!("gateway_login_hash_permits").set(size as f64);
        Self {
            permits: Arc::new(Semaphore::new(size)),
            size,
            wait,
            in_flight: Arc::new(AtomicUsize::new(0)),
            peak: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// How many checks may run at once.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The most checks that ran at once since start.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Verifies `password` against a PHC hash (false on any error) once a permit is free. The
    /// permit goes with the blocking task: a login abandoned by its client still holds it
    /// until its hash is done, so the bound is real.
    pub async fn verify(&self, password: String, hash: String) -> Result<bool, Busy> {
        let permit =
            match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                _ => {
                    metrics::counter!("gateway_login_hash_busy_total").increment(1);
                    return Err(Busy);
                }
            };
        let in_flight = self.in_flight.clone();
        let peak = self.peak.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            metrics::gauge!("gateway_login_hashes_in_flight").increment(1.0);
            let ok = verify_blocking(&password, &hash);
            in_flight.fetch_sub(1, Ordering::SeqCst);
            metrics::gauge!("gateway_login_hashes_in_flight").decrement(1.0);
            ok
        })
        .await
        .map_err(|_| Busy)
    }
}

fn verify_blocking(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A new device enrolment secret: 256 random bits, hex (what `gateway device enrol` prints).
pub fn new_device_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut bytes[..]);
    hex(&bytes)
}

/// What is stored of a device secret: `sha256:<hex>`. A fast digest is enough: the secrets
/// are random 256-bit values, not passwords (the demo ones are public anyway).
pub fn device_secret_hash(secret: &str) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex(&sha2::Sha256::digest(secret.as_bytes())))
}

/// Whether `presented` is the secret of `stored` (a [`device_secret_hash`]), compared in
/// constant time.
pub fn device_secret_matches(stored: &str, presented: &str) -> bool {
    let expected = stored.as_bytes();
    let actual = device_secret_hash(presented);
    let actual = actual.as_bytes();
    if expected.len() != actual.len() {
        return false;
    }
    let diff = expected
        .iter()
        .zip(actual)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// A hash of a random password nobody knows: verifying against it makes an unknown user cost
/// as much time as a known one (no user enumeration by timing).
pub async fn dummy_hash() -> anyhow::Result<String> {
    hash_password(uuid::Uuid::new_v4().to_string()).await
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub station: Option<String>,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
    pub iss: String,
    pub aud: String,
}

impl Claims {
    pub fn caller(&self) -> Caller {
        Caller {
            user: self.sub.clone(),
            roles: self.roles.clone(),
            device: self.device.clone(),
            station: self.station.clone(),
        }
    }

    /// Time left before the token expires.
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.exp.saturating_sub(now_secs()))
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Issues and verifies HS256 tokens.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// The other secret of a rotation: tokens it signed still verify; none is signed with it.
    previous: Option<DecodingKey>,
    validation: Validation,
    issuer: String,
    ttl: u64,
    verified: Arc<Verified>,
}

impl Tokens {
    pub fn new(secret: &[u8], issuer: &str, ttl_seconds: u64) -> Self {
        Self::rotating(secret, None, issuer, ttl_seconds)
    }

    /// Signs with `secret`; verifies tokens signed with it or with `previous` (a rotation:
    /// README "Rotating the JWT secret").
    pub fn rotating(
        secret: &[u8],
        previous: Option<&[u8]>,
        issuer: &str,
        ttl_seconds: u64,
    ) -> Self {
        // Exactly one algorithm: a token whose header names another (or `none`) is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = 5;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[issuer]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "iss", "aud"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            previous: previous.map(DecodingKey::from_secret),
            validation,
            issuer: issuer.to_owned(),
            ttl: ttl_seconds,
            verified: Arc::new(Verified::default()),
        }
    }

    pub fn ttl(&self) -> u64 {
        self.ttl
    }

    pub fn issue(
        &self,
        user: &str,
        roles: Vec<String>,
        device: Option<String>,
        station: Option<String>,
    ) -> anyhow::Result<(String, Claims)> {
        let now = now_secs();
        let claims = Claims {
            sub: user.to_owned(),
            roles,
            device,
            station,
            iat: now,
            exp: now + self.ttl,
            jti: uuid::Uuid::new_v4().to_string(),
            iss: self.issuer.clone(),
            aud: self.issuer.clone(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok((token, claims))
    }

    /// Verifies signature, algorithm, issuer, audience and expiry. A token verified before
    /// (the same text) is not decoded and its signature not computed again, but its expiry is
    /// checked each time (an expired one is verified again, and refused as before).
    pub fn verify(&self, token: &str) -> Result<Claims, Problem> {
        self.verify_at(token, now_secs())
    }

    fn verify_at(&self, token: &str, now: u64) -> Result<Claims, Problem> {
        if let Some(claims) = self.verified.get(token) {
            // jsonwebtoken's rule: expired when `exp < now - leeway`.
            if claims.exp.saturating_add(self.validation.leeway) >= now {
                return Ok(Claims::clone(&claims));
            }
            self.verified.forget(token);
            let expired = jsonwebtoken::errors::ErrorKind::ExpiredSignature;
            return Err(refused(&expired.into()));
        }
        let decoded = match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
        {
            // Only a signature that is not the current secret's is tried with the previous one.
            Err(e)
                if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature)
                    && self.previous.is_some() =>
            {
                let previous = self.previous.as_ref().unwrap_or(&self.decoding);
                jsonwebtoken::decode::<Claims>(token, previous, &self.validation)
            }
            other => other,
        };
        let claims = decoded.map(|data| data.claims).map_err(|e| refused(&e))?;
        self.verified.remember(token, &claims);
        Ok(claims)
    }
}

fn refused(reason: &jsonwebtoken::errors::Error) -> Problem {
    tracing::info!(reason = %reason, "token refused");
    metrics::counter!("gateway_auth_failures_total", "reason" => "token").increment(1);
    Problem::unauthenticated("the access token is invalid or expired")
}

/// Tokens whose verification succeeded, by their exact text (a token of other bytes, even
/// with the same claims, is verified on its own). Bounded: when full, it starts again empty.
#[derive(Default)]
struct Verified {
    claims: Mutex<HashMap<String, Arc<Claims>>>,
}

impl Verified {
    /// At most this many tokens are remembered (a few hundred bytes each).
    const CAPACITY: usize = 10_000;

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Claims>>> {
        self.claims.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, token: &str) -> Option<Arc<Claims>> {
        self.map().get(token).cloned()
    }

    fn remember(&self, token: &str, claims: &Claims) {
        let mut map = self.map();
        if map.len() >= Self::CAPACITY {
            map.clear();
        }
        map.insert(token.to_owned(), Arc::new(claims.clone()));
    }

    fn forget(&self, token: &str) {
        self.map().remove(token);
    }
}

/// The authenticated caller of a request (extracting it authenticates and rate-limits).
#[derive(Debug, Clone)]
pub struct Principal {
    pub claims: Claims,
    pub caller: Caller,
}

impl Principal {
    /// `Err(403)` unless the caller has one of `roles` (admin has every role).
    pub fn require(&self, roles: &[&str]) -> Result<(), Problem> {
        if self.caller.has_any_role(roles) {
            Ok(())
        } else {
            let mut needed: Vec<&str> = roles.to_vec();
            needed.push(ADMIN);
            Err(Problem::forbidden(format!(
                "this operation needs one of the roles: {}",
                needed.join(", ")
            )))
        }
    }

    pub fn has(&self, role: &str) -> bool {
        self.caller.roles.iter().any(|r| r == role)
    }
}

fn bearer(parts: &Parts) -> Result<&str, Problem> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| Problem::unauthenticated("missing Authorization: Bearer token"))?;
    let value = value
        .to_str()
        .map_err(|_| Problem::unauthenticated("malformed Authorization header"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| Problem::unauthenticated("malformed Authorization header"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(Problem::unauthenticated(
            "the Authorization scheme must be Bearer",
        ));
    }
    Ok(token.trim())
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Problem> {
        let token = bearer(parts)?;
        let claims = state.tokens.verify(token)?;
        // One Redis round trip: the revocation check, then (unless revoked) the rate limits.
        let user = Subject::User(&claims.sub);
        let both;
        let subjects: &[Subject<'_>] = match claims.device.as_deref() {
            Some(d) => {
                both = [user, Subject::Device(d)];
                &both
            }
            None => std::slice::from_ref(&user),
        };
        let admission = state.limits.admit(&claims.jti, subjects).await;
        if matches!(admission, Ok(Admission::Revoked)) {
            metrics::counter!("gateway_auth_failures_total", "reason" => "revoked").increment(1);
            return Err(Problem::unauthenticated("the access token was revoked"));
        }
        let span = tracing::Span::current();
        span.record("user", claims.sub.as_str());
        if let Some(d) = &claims.device {
            span.record("device", d.as_str());
        }
        admission?;
        let caller = claims.caller();
        Ok(Self { claims, caller })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(b"0123456789abcdef0123456789abcdef", "mes-gateway", 900)
    }

    #[test]
    fn issued_tokens_verify_and_carry_the_binding() {
        let t = tokens();
        let (tok, claims) = t
            .issue(
                "op1",
                vec!["operator".into()],
                Some("TAB-10".into()),
                Some("ST-10".into()),
            )
            .unwrap();
        let back = t.verify(&tok).unwrap();
        assert_eq!(back, claims);
        assert_eq!(back.caller().station.as_deref(), Some("ST-10"));
    }

    #[test]
    fn other_algorithms_and_secrets_are_refused() {
        let t = tokens();
        let (_, claims) = t.issue("op1", vec!["operator".into()], None, None).unwrap();
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let hs512 = jsonwebtoken::encode(&Header::new(Algorithm::HS512), &claims, &key).unwrap();
        assert!(t.verify(&hs512).is_err());
        let other = EncodingKey::from_secret(b"another-secret-another-secret-xx");
        let forged = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &other).unwrap();
        assert!(t.verify(&forged).is_err());
        assert!(t.verify("not.a.token").is_err());
        assert!(t.verify("").is_err());
    }

    #[test]
    fn during_a_rotation_tokens_of_both_secrets_verify_and_only_the_new_one_signs() {
        const OLD: &[u8] = b"0123456789abcdef0123456789abcdef";
        const NEW: &[u8] = b"the-new-secret-of-32-bytes-or-more";
        let before = Tokens::new(OLD, "mes-gateway", 900);
        let (old_token, _) = before
            .issue("op1", vec!["operator".into()], None, None)
            .unwrap();
        let during = Tokens::rotating(NEW, Some(OLD), "mes-gateway", 900);
        assert!(
            during.verify(&old_token).is_ok(),
            "a token of the old secret"
        );
        let (new_token, claims) = during
            .issue("op1", vec!["operator".into()], None, None)
            .unwrap();
        assert!(during.verify(&new_token).is_ok());
        assert!(
            before.verify(&new_token).is_err(),
            "new tokens are signed with the new secret"
        );
        let stranger = EncodingKey::from_secret(b"another-secret-another-secret-xx");
        let forged =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &stranger).unwrap();
        assert!(during.verify(&forged).is_err(), "a third secret");
        let after = Tokens::new(NEW, "mes-gateway", 900);
        assert!(after.verify(&old_token).is_err(), "the old secret retired");
        assert!(after.verify(&new_token).is_ok());
    }

    #[test]
    fn a_verified_token_is_still_refused_once_expired_and_other_bytes_are_verified_anew() {
        let t = tokens();
        let (tok, claims) = t.issue("op1", vec!["operator".into()], None, None).unwrap();
        let now = now_secs();
        assert_eq!(t.verify_at(&tok, now).unwrap(), claims);
        assert_eq!(t.verify_at(&tok, now).unwrap(), claims, "verified again");
        // Within the leeway, then past it: the remembered verification does not outlive exp.
        assert!(t.verify_at(&tok, claims.exp + 5).is_ok());
        assert!(t.verify_at(&tok, claims.exp + 6).is_err());
        assert!(t.verify_at(&tok, now).is_ok(), "verified in full again");
        assert!(t.verify_at(&tok, claims.exp + 6).is_err());
        // Another signature over the same claims, or a changed payload, is not the token seen.
        let other = EncodingKey::from_secret(b"another-secret-another-secret-xx");
        let forged = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &other).unwrap();
        assert!(t.verify_at(&forged, now).is_err());
        let (admin, _) = t.issue("op1", vec!["admin".into()], None, None).unwrap();
        let mut parts: Vec<&str> = tok.split('.').collect();
        parts[1] = admin.split('.').nth(1).unwrap();
        assert!(t.verify_at(&parts.join("."), now).is_err());
    }

    #[test]
    fn device_secrets_are_stored_as_digests_and_checked() {
        let secret = new_device_secret();
        assert_eq!(secret.len(), 64);
        assert_ne!(secret, new_device_secret());
        let stored = device_secret_hash(&secret);
        assert!(stored.starts_with("sha256:") && !stored.contains(&secret));
        assert!(device_secret_matches(&stored, &secret));
        assert!(!device_secret_matches(&stored, "demo-TAB-10"));
        assert!(!device_secret_matches(&stored, ""));
        assert!(!device_secret_matches("garbage", &secret));
    }

    #[tokio::test]
    async fn passwords_hash_and_verify() {
        let h = hash_password("demo-op1".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("demo-op1".into(), h.clone()).await);
        assert!(!verify_password("wrong".into(), h).await);
        assert!(!verify_password("x".into(), dummy_hash().await.unwrap()).await);
        assert!(!verify_password("x".into(), "garbage".into()).await);
    }
}
