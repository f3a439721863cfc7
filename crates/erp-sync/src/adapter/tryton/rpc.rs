//! The transport: Tryton's JSON-RPC over HTTP — the session (login, relogin once when it
//! expired), one call, the model methods the adapter uses (`search_read`, `read`, `create`,
//! `write`, buttons) and the mapping of every failure to an [`AdapterError`].
//!
//! Failures: 401/403 mean the session expired (log in again, once); a refused login is
//! `Unauthorized`; 5xx, 408, 429, connection trouble and Tryton's concurrency and server
//! errors are retryable (`Unavailable`, `Timeout`); `UserError`, `UserWarning`, `AccessError`,
//! validation and programming errors are permanent (`Rejected`); an answer that is not JSON, or
//! records that do not read (an unknown state), are `Unreadable`.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use reqwest::{StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::TrytonSettings;
use super::values::Context;
use crate::adapter::AdapterError;
use crate::contract;

/// A logged-in session and what the adapter learnt with it.
#[derive(Clone)]
pub struct Session {
    /// `Session base64(user:uid:token)`.
    authorization: String,
    pub company: i64,
    /// The first warehouse's storage location (lot quantities are counted there).
    pub storage: Option<i64>,
}

/// Why one JSON-RPC exchange failed.
enum CallError {
    /// 401/403: the session expired or was refused: log in again.
    Relogin,
    Erp(AdapterError),
}

/// A Tryton database over JSON-RPC, with its session.
pub struct Rpc {
    user: String,
    password: String,
    /// The configured company (`<= 0`: the user's).
    company: i64,
    rpc_url: Url,
    server_url: Url,
    client: reqwest::Client,
    timeout: Duration,
    session: tokio::sync::Mutex<Option<Session>>,
    ids: AtomicU64,
}

impl Rpc {
    pub fn new(settings: &TrytonSettings, timeout: Duration) -> anyhow::Result<Self> {
        let base = Url::parse(&settings.url)
            .map_err(|e| anyhow::anyhow!("erp.tryton_url {:?} is not a URL: {e}", settings.url))?;
        if base.scheme() != "http" {
            anyhow::bail!(
                "erp.tryton_url must be an http:// URL (https: use a tls sidecar), not {:?}",
                settings.url
            );
        }
        if settings.database.trim().is_empty() || settings.database.contains('/') {
            anyhow::bail!("erp.tryton_database must be a database name");
        }
        let root = format!("{}/", base.as_str().trim_end_matches('/'));
        let root = Url::parse(&root)?;
        let rpc_url = root.join(&format!("{}/rpc/", settings.database))?;
        let server_url = root.join("rpc/")?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()?;
        Ok(Self {
            user: settings.user.clone(),
            password: settings.password.clone(),
            company: settings.company,
            rpc_url,
            server_url,
            client,
            timeout,
            session: tokio::sync::Mutex::new(None),
            ids: AtomicU64::new(1),
        })
    }

    /// One JSON-RPC exchange: `{"id", "method", "params"}` → `result`.
    async fn exchange(
        &self,
        url: &Url,
        method: &str,
        params: &Value,
        authorization: Option<&str>,
    ) -> Result<Value, CallError> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let mut req = self
            .client
            .post(url.clone())
            .header(reqwest::header::ACCEPT_ENCODING, "gzip")
            .json(&json!({"id": id, "method": method, "params": params}));
        if let Some(a) = authorization {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CallError::Erp(crate::adapter::rest::transport_error(e, self.timeout)))?;
        let status = resp.status();
        let gzip = resp
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
        let body = resp
            .bytes()
            .await
            .map_err(|e| CallError::Erp(crate::adapter::rest::transport_error(e, self.timeout)))?;
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Err(CallError::Relogin);
        }
        if !status.is_success() {
            return Err(CallError::Erp(http_error(method, status)));
        }
        let body = decode_body(&body, gzip).map_err(CallError::Erp)?;
        let doc: Value = serde_json::from_slice(&body).map_err(|e| {
            CallError::Erp(AdapterError::Unreadable(format!(
                "tryton {method} did not answer JSON: {e}"
            )))
        })?;
        if let Some(error) = doc.get("error").filter(|e| !e.is_null()) {
            return Err(CallError::Erp(rpc_error(method, error)));
        }
        Ok(doc.get("result").cloned().unwrap_or(Value::Null))
    }

    /// Logs in: the session, the company and the storage location.
    async fn login(&self) -> Result<Session, AdapterError> {
        let params = json!([self.user, {"password": self.password}, "en"]);
        let result = match self
            .exchange(&self.rpc_url, "common.db.login", &params, None)
            .await
        {
            Ok(r) => r,
            // A refused login is an operations problem (wrong password): retry, set nothing aside.
            Err(CallError::Relogin) => {
                return Err(AdapterError::Unauthorized(format!(
                    "tryton refused the login of {:?}",
                    self.user
                )));
            }
            Err(CallError::Erp(e)) => return Err(e),
        };
        let (uid, token) = match result.as_array().map(Vec::as_slice) {
            Some([uid, token, ..]) if uid.is_i64() && token.is_string() => {
                (uid.as_i64().unwrap_or(0), token.as_str().unwrap_or(""))
            }
            _ => {
                return Err(AdapterError::Unavailable(format!(
                    "tryton login of {:?} failed: {result}",
                    self.user
                )));
            }
        };
        let mut session = Session {
            authorization: authorization(&self.user, uid, token),
            company: self.company,
            storage: None,
        };
        let auth = Some(session.authorization.as_str());
        if session.company <= 0 {
            let prefs = self
                .exchange(
                    &self.rpc_url,
                    "model.res.user.get_preferences",
                    &json!([true, {}]),
                    auth,
                )
                .await
                .map_err(relogin_unavailable)?;
            session.company = prefs.get("company").and_then(Value::as_i64).unwrap_or(0);
        }
        let ctx = Context::of_company(session.company);
        let warehouses = self
            .exchange(
                &self.rpc_url,
                "model.stock.location.search_read",
                &json!([
                    [["type", "=", "warehouse"]],
                    0,
                    1,
                    null,
                    ["storage_location"],
                    ctx
                ]),
                auth,
            )
            .await
            .map_err(relogin_unavailable)?;
        session.storage = warehouses
            .get(0)
            .and_then(|w| w.get("storage_location"))
            .and_then(Value::as_i64);
        metrics::counter!("erp_tryton_logins_total").increment(1);
        tracing::info!(user = %self.user, company = session.company, "logged in to tryton");
        Ok(session)
    }

    /// The session, logged in when there is none.
    pub async fn session(&self) -> Result<Session, AdapterError> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        let s = self.login().await?;
        *guard = Some(s.clone());
        Ok(s)
    }

    /// Every model call's context (the company) and the session.
    pub async fn ctx(&self) -> Result<(Context, Session), AdapterError> {
        let s = self.session().await?;
        Ok((Context::of_company(s.company), s))
    }

    /// Whether the server answers (no session: `common.server.version`).
    pub async fn ping(&self) -> Result<(), AdapterError> {
        match self
            .exchange(&self.server_url, "common.server.version", &json!([]), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(CallError::Relogin) => Err(AdapterError::Unavailable("tryton refused".into())),
            Err(CallError::Erp(e)) => Err(e),
        }
    }

    /// A model call with the session; logs in again once when the session expired.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, AdapterError> {
        for attempt in 0..2 {
            let session = self.session().await?;
            match self
                .exchange(&self.rpc_url, method, &params, Some(&session.authorization))
                .await
            {
                Ok(v) => return Ok(v),
                Err(CallError::Relogin) if attempt == 0 => {
                    tracing::info!(method, "tryton session expired; logging in again");
                    let mut guard = self.session.lock().await;
                    if guard
                        .as_ref()
                        .is_some_and(|s| s.authorization == session.authorization)
                    {
                        *guard = None;
                    }
                }
                Err(CallError::Relogin) => {
                    return Err(AdapterError::Unavailable(format!(
                        "tryton refused {method} after a new login"
                    )));
                }
                Err(CallError::Erp(e)) => return Err(e),
            }
        }
        Err(AdapterError::Unavailable(format!(
            "tryton refused {method}"
        )))
    }

    /// `model.<model>.search_read` as the JSON records Tryton sent (pulls check them field by
    /// field against the contract).
    pub async fn search_read_values(
        &self,
        model: &str,
        domain: Value,
        fields: &[&str],
        ctx: &Context,
    ) -> Result<Vec<Value>, AdapterError> {
        let v = self
            .call(
                &format!("model.{model}.search_read"),
                json!([domain, 0, null, null, fields, ctx]),
            )
            .await?;
        match v {
            Value::Array(a) => Ok(a),
            other => Err(AdapterError::Unreadable(format!(
                "{model}.search_read answered {}",
                contract::type_name(&other)
            ))),
        }
    }

    /// `model.<model>.search_read` as typed records.
    pub async fn search_read<T: DeserializeOwned>(
        &self,
        model: &str,
        domain: Value,
        fields: &[&str],
        ctx: &Context,
    ) -> Result<Vec<T>, AdapterError> {
        let rows = self.search_read_values(model, domain, fields, ctx).await?;
        records(model, "search_read", Value::Array(rows))
    }

    /// `model.<model>.read` of one record as a typed record (`None`: Tryton has no such
    /// record).
    pub async fn read<T: DeserializeOwned>(
        &self,
        model: &str,
        id: i64,
        fields: &[&str],
        ctx: &Context,
    ) -> Result<Option<T>, AdapterError> {
        let v = self
            .call(&format!("model.{model}.read"), json!([[id], fields, ctx]))
            .await?;
        let v = match v {
            Value::Array(a) => Value::Array(a.into_iter().take(1).collect()),
            // Not a list: read as no record, as before records were typed.
            _ => Value::Array(Vec::new()),
        };
        Ok(records::<T>(model, "read", v)?.into_iter().next())
    }

    /// Clicks a workflow button (`wait`, `assign_try`, `run`, `do`, ...) on one record.
    pub async fn button(
        &self,
        model: &str,
        button: &str,
        id: i64,
        ctx: &Context,
    ) -> Result<(), AdapterError> {
        self.call(&format!("model.{model}.{button}"), json!([[id], ctx]))
            .await
            .map(|_| ())
    }

    pub async fn write(
        &self,
        model: &str,
        id: i64,
        vals: Value,
        ctx: &Context,
    ) -> Result<(), AdapterError> {
        self.call(&format!("model.{model}.write"), json!([[id], vals, ctx]))
            .await
            .map(|_| ())
    }

    /// Creates one record: its id.
    pub async fn create(
        &self,
        model: &str,
        vals: Value,
        ctx: &Context,
    ) -> Result<i64, AdapterError> {
        let v = self
            .call(&format!("model.{model}.create"), json!([[vals], ctx]))
            .await?;
        v.get(0).and_then(Value::as_i64).ok_or_else(|| {
            AdapterError::Unreadable(format!("{model}.create answered {v} instead of ids"))
        })
    }
}

/// Records of `model` as `T`; one that does not read (an unknown state, a field of another
/// type) makes the answer unreadable, naming it.
fn records<T: DeserializeOwned>(
    model: &str,
    method: &str,
    rows: Value,
) -> Result<Vec<T>, AdapterError> {
    serde_json::from_value(rows)
        .map_err(|e| AdapterError::Unreadable(format!("tryton {model}.{method}: {e}")))
}

/// The `Authorization` header of a session: `Session base64(user:uid:token)`.
fn authorization(user: &str, uid: i64, token: &str) -> String {
    let credentials = format!("{user}:{uid}:{token}");
    format!(
        "Session {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

fn relogin_unavailable(e: CallError) -> AdapterError {
    match e {
        CallError::Relogin => AdapterError::Unauthorized("tryton refused the new session".into()),
        CallError::Erp(e) => e,
    }
}

/// A status other than 2xx, 401 and 403: server trouble and throttling are retryable.
fn http_error(method: &str, status: StatusCode) -> AdapterError {
    let msg = format!("tryton {method} answered {status}");
    if status.is_server_error()
        || matches!(
            status,
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS
        )
    {
        AdapterError::Unavailable(msg)
    } else {
        AdapterError::Rejected(msg)
    }
}

/// Tryton gzips larger answers; it may also label a plain body gzip: look at the bytes.
fn decode_body(body: &[u8], labelled_gzip: bool) -> Result<Vec<u8>, AdapterError> {
    if labelled_gzip && body.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(body)
            .read_to_end(&mut out)
            .map_err(|e| {
                AdapterError::Unavailable(format!("corrupt gzip answer from tryton: {e}"))
            })?;
        Ok(out)
    } else {
        Ok(body.to_vec())
    }
}

/// `{"error": [type, args]}` → retryable or permanent.
fn rpc_error(method: &str, error: &Value) -> AdapterError {
    let (kind, args) = match error {
        Value::Array(a) => (
            a.first().and_then(Value::as_str).unwrap_or_default(),
            a.get(1).cloned().unwrap_or(Value::Null),
        ),
        Value::String(s) => (s.as_str(), Value::Null),
        _ => ("", Value::Null),
    };
    let message = match &args {
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(": "),
        Value::String(s) => s.clone(),
        _ => String::new(),
    };
    let text = format!("tryton {method}: {kind} {message}");
    let permanent = matches!(kind, "UserError" | "UserWarning" | "AccessError")
        || kind.ends_with("ValidationError")
        || kind.starts_with("KeyError")
        || kind.starts_with("TypeError")
        || kind.starts_with("ValueError");
    if kind == "ConcurrencyException" || !permanent {
        // Concurrent edits, locked databases, server trouble: retry.
        AdapterError::Unavailable(text)
    } else {
        AdapterError::Rejected(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_header_is_base64_of_user_uid_and_token() {
        // Computed independently: `base64.b64encode(b"admin:1:0123abcd")` in Python.
        assert_eq!(
            authorization("admin", 1, "0123abcd"),
            "Session YWRtaW46MTowMTIzYWJjZA=="
        );
        // Padding of each length (RFC 4648's examples, through the user name).
        for (user, encoded) in [("", "OjE6"), ("f", "ZjoxOg=="), ("fo", "Zm86MTo=")] {
            assert_eq!(authorization(user, 1, ""), format!("Session {encoded}"));
        }
    }

    #[test]
    fn errors_map_to_retryable_or_permanent() {
        let user = rpc_error(
            "m",
            &json!(["UserError", ["The lot is required.", "", null]]),
        );
        assert!(!user.is_transient());
        assert!(user.to_string().contains("The lot is required."));
        assert!(rpc_error("m", &json!(["ConcurrencyException", ["x"]])).is_transient());
        assert!(rpc_error("m", &json!(["database is locked", ""])).is_transient());
        assert!(!rpc_error("m", &json!(["AccessError", ["no"]])).is_transient());
    }

    #[test]
    fn http_statuses_map_to_retryable_or_permanent() {
        for s in [500, 502, 503, 408, 429] {
            let e = http_error("m", StatusCode::from_u16(s).unwrap());
            assert!(e.is_transient(), "{s}: {e}");
        }
        for s in [400, 404, 413] {
            let e = http_error("m", StatusCode::from_u16(s).unwrap());
            assert!(!e.is_transient(), "{s}: {e}");
            assert!(e.to_string().contains(&s.to_string()), "{e}");
        }
    }

    #[test]
    fn records_that_do_not_read_make_the_answer_unreadable() {
        let ok: Vec<super::super::values::Found> =
            records("stock.lot", "search_read", json!([{"id": 1}, {"id": 2}])).unwrap();
        assert_eq!(ok.len(), 2);
        let e = records::<super::super::values::Production>(
            "production",
            "search_read",
            json!([{"id": 1, "state": "finished"}]),
        )
        .unwrap_err();
        assert!(matches!(e, AdapterError::Unreadable(_)), "{e:?}");
        assert!(!e.is_transient());
        assert!(
            e.to_string()
                .contains("tryton production.search_read: unknown tryton production state"),
            "{e}"
        );
    }

    #[test]
    fn gzip_is_read_by_its_bytes_not_its_label() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(b"{\"result\": 1}").unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(decode_body(&gz, true).unwrap(), b"{\"result\": 1}");
        assert_eq!(decode_body(b"{}", true).unwrap(), b"{}");
        assert!(decode_body(&gz[..gz.len() - 4], true).is_err());
    }
}
