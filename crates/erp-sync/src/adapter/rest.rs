//! The `rest` adapter: the generic REST/JSON contract any ERP can be bridged to (SAP, Odoo, a
//! home-grown one). The contract is published as OpenAPI 3.1 in
//! `deploy/erp/rest-adapter.openapi.yaml`; in short:
//!
//! - `GET {base}/materials|stations|lots|work-orders[?updated_since=<RFC 3339>][&page=<token>]`
//!   → `{"items": [...], "cursor": "<RFC 3339>", "next_page": "<token>"?}`. Records have the
//!   shapes of the plant file (`deploy/demo/plant.json`) and are checked against the same
//!   contract ([`crate::contract`]); `cursor` is sent back as `updated_since` next time.
//! - `POST {base}/confirmations` with `Idempotency-Key`: 2xx accepted (201 new, 200 a replay
//!   of a key the ERP already has), 409 with `{"status": "duplicate"}` already done (any other
//!   409, e.g. a request with that key still in progress, is retried); 5xx, 408, 429, timeouts and connection
//!   errors are retried (429, and 503 with `Retry-After`, are the ERP shedding load: they
//!   count no attempt and the row waits the `Retry-After` asked, up to `erp.retry_max_ms`); any other 4xx is permanent (the confirmation is set aside). 401/403
//!   are `Unauthorized`: a wrong token is an operations problem that must not set aside the
//!   whole queue (the delivery pauses and alarms, and burns no attempt).
//!   Follow-ups (production booked after the operation's confirmation) are confirmations
//!   with `follows` set and their own key (`<wo>:<op>:followup:<first late scan>`).
//! - `POST {base}/reversals` with `Idempotency-Key` (`reversal:<void scan>`): a scan reported
//!   in a confirmation was voided in the MES; the body names the confirmation it `reverses` and
//!   carries the voided scan's quantities negated. Same answers as `/confirmations`; a bridge
//!   that does not implement it answers 404, which sets the reversal aside (dead letter) for
//!   booking by hand. A dedicated endpoint rather than a `type` on `/confirmations`: an older
//!   bridge can never mistake a reversal for a confirmation.
//! - `GET {base}/quantities` → `{"work_orders": {"WO-1": "10"}, "lots": {"L1": "75"}}` for
//!   reconciliation; `GET {base}/health` → any 2xx.

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use rust_decimal::Decimal;
use serde_json::Value;

use super::{AdapterError, ErpAdapter, Posted, Pulled};
use crate::contract::{self, Checked, Drift, DriftKind};
use crate::domain::{
    Confirmation, ErpQuantities, Material, ReceivedLot, Reversal, Station, WorkOrder,
};

/// Top-level keys of a pull answer.
const PAGE_KEYS: [&str; 3] = ["items", "cursor", "next_page"];

/// Pages followed in one pull at most (a bridge that loops forever must not hang the sync).
const MAX_PAGES: usize = 10_000;

pub struct RestAdapter {
    base: Url,
    token: Option<String>,
    client: reqwest::Client,
    timeout: Duration,
}

impl RestAdapter {
    /// `base_url` such as `https://erp-bridge.local/erp/v1`; `token` empty: no bearer.
    pub fn new(base_url: &str, token: &str, timeout: Duration) -> anyhow::Result<Self> {
        // Named in errors without a password it may carry (`http://user:password@host/...`).
        let shown = mes_common::config::redact_url(base_url);
        let mut base = Url::parse(base_url)
            .map_err(|e| anyhow::anyhow!("erp.rest_base_url {shown:?} is not a URL: {e}"))?;
        if base.scheme() != "http" {
            // The HTTP client is built without TLS (one ring-based rustls in the workspace, not
            // wired into reqwest yet): reach an https bridge through a TLS-originating sidecar.
            anyhow::bail!(
                "erp.rest_base_url must be an http:// URL (https: use a tls sidecar), not {shown:?}"
            );
        }
        if !base.path().ends_with('/') {
            // `join` then keeps the last path segment.
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            base,
            token: Some(token.trim().to_owned()).filter(|t| !t.is_empty()),
            client,
            timeout,
        })
    }

    fn url(&self, path: &str) -> Result<Url, AdapterError> {
        self.base
            .join(path)
            .map_err(|e| AdapterError::Rejected(format!("bad url for {path}: {e}")))
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .request(method, url)
            .header(reqwest::header::ACCEPT, "application/json");
        // The bridge can join the trace of the scan that caused the call.
        let traceparent = mes_common::propagation::current_traceparent();
        if !traceparent.is_empty() {
            req = req.header("traceparent", traceparent);
        }
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends and reads the whole answer (status and body).
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Vec<u8>, Option<Duration>), AdapterError> {
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, chrono::Utc::now()));
        let body = resp.bytes().await.map_err(|e| self.transport(e))?;
        Ok((status, body.to_vec(), retry_after))
    }

    fn transport(&self, e: reqwest::Error) -> AdapterError {
        transport_error(e, self.timeout)
    }

    /// GET of a JSON document; non-2xx answers are errors.
    async fn get_json(&self, url: Url) -> Result<Value, AdapterError> {
        let what = url.path().to_owned();
        let (status, body, wait) = self.send(self.request(Method::GET, url)).await?;
        if !status.is_success() {
            return Err(status_error(status, &what, &body, wait));
        }
        serde_json::from_slice(&body)
            .map_err(|e| AdapterError::Unreadable(format!("{what} did not answer JSON: {e}")))
    }

    /// Every page of one entity changed since `since`, each record checked with `check`.
    async fn pull<T>(
        &self,
        path: &'static str,
        since: Option<&str>,
        check: fn(&Value, usize) -> Checked<T>,
    ) -> Result<Pulled<T>, AdapterError> {
        // A cursor another adapter left (the file adapter's content hash) means a full pull.
        let since = since.filter(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok());
        let mut items = Vec::new();
        let mut notes = Vec::new();
        let mut cursor = None;
        let mut page: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut url = self.url(path)?;
            {
                let mut q = url.query_pairs_mut();
                if let Some(s) = since {
                    q.append_pair("updated_since", s);
                }
                if let Some(p) = &page {
                    q.append_pair("page", p);
                }
            }
            let doc = self.get_json(url).await?;
            let page_doc = read_page(&doc, path, items.len(), check)?;
            items.extend(page_doc.items);
            for n in page_doc.notes {
                if !notes.contains(&n) {
                    notes.push(n);
                }
            }
            if page_doc.cursor.is_some() {
                cursor = page_doc.cursor;
            }
            match page_doc.next_page {
                Some(next) if page.as_deref() != Some(next.as_str()) => page = Some(next),
                _ => {
                    return Ok(Pulled {
                        items,
                        notes,
                        cursor: cursor.or_else(|| since.map(str::to_owned)),
                    });
                }
            }
        }
        Err(AdapterError::Unreadable(format!(
            "{path}: more than {MAX_PAGES} pages"
        )))
    }
}

/// One page of a pull answer.
struct Page<T> {
    items: Vec<Checked<T>>,
    notes: Vec<Drift>,
    cursor: Option<String>,
    next_page: Option<String>,
}

/// Reads `{"items": [...], "cursor": "...", "next_page": "..."}`; `first` numbers the records
/// across pages.
fn read_page<T>(
    doc: &Value,
    path: &str,
    first: usize,
    check: fn(&Value, usize) -> Checked<T>,
) -> Result<Page<T>, AdapterError> {
    let Some(obj) = doc.as_object() else {
        return Err(AdapterError::Unreadable(format!(
            "{path} must answer a JSON object, not {}",
            contract::type_name(doc)
        )));
    };
    let mut notes = Vec::new();
    for key in obj.keys().filter(|k| !PAGE_KEYS.contains(&k.as_str())) {
        notes.push(Drift {
            kind: DriftKind::UnknownField,
            field: key.clone(),
            message: "is not part of the rest adapter contract".into(),
        });
    }
    let items = match obj.get("items") {
        Some(Value::Array(records)) => records
            .iter()
            .enumerate()
            .map(|(i, v)| check(v, first + i))
            .collect(),
        None | Some(Value::Null) => {
            return Err(AdapterError::Unreadable(format!(
                "{path}: the answer has no items array"
            )));
        }
        Some(other) => {
            return Err(AdapterError::Unreadable(format!(
                "{path}: items must be an array, not {}",
                contract::type_name(other)
            )));
        }
    };
    let text = |key: &str, notes: &mut Vec<Drift>| match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(other) => {
            notes.push(Drift {
                kind: DriftKind::WrongType,
                field: key.to_owned(),
                message: format!(
                    "must be a non-empty string, not {}",
                    contract::type_name(other)
                ),
            });
            None
        }
    };
    let cursor = text("cursor", &mut notes);
    let next_page = text("next_page", &mut notes);
    Ok(Page {
        items,
        notes,
        cursor,
        next_page,
    })
}

/// A failed exchange: timeouts and connection trouble are transient.
pub(crate) fn transport_error(e: reqwest::Error, timeout: Duration) -> AdapterError {
    if e.is_timeout() {
        AdapterError::Timeout(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
    } else if e.is_builder() {
        AdapterError::Rejected(format!("cannot build the request: {e}"))
    } else {
        // Connection refused or reset, a truncated body, a protocol error: retry.
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        AdapterError::Unavailable(msg)
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (a date in the past: 0).
fn retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

/// A non-2xx answer: 429, and 503 with `Retry-After`, are `Throttled` (the ERP is up and
/// sheds load: not the row's failure); other 5xx, 408 are transient, 401/403
/// `Unauthorized` (see the module); `retry_after`: the answer's `Retry-After`.
fn status_error(
    status: StatusCode,
    what: &str,
    body: &[u8],
    retry_after: Option<Duration>,
) -> AdapterError {
    let detail: String = String::from_utf8_lossy(body).chars().take(300).collect();
    let msg = format!("{what} answered {status}: {detail}");
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        AdapterError::Unauthorized(msg)
    } else if status == StatusCode::TOO_MANY_REQUESTS
        || (status == StatusCode::SERVICE_UNAVAILABLE && retry_after.is_some())
    {
        AdapterError::Throttled {
            message: msg,
            retry_after,
        }
    } else if status.is_server_error()
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

/// Whether an answer's body says the idempotency key was booked already
/// (`{"status": "duplicate"}`).
fn says_duplicate(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_owned))
        .is_some_and(|s| s == "duplicate")
}

/// `{"work_orders": {"WO-1": "10"}, "lots": {"L1": "75"}}`.
fn read_quantities(doc: &Value) -> Result<ErpQuantities, AdapterError> {
    let mut q = ErpQuantities::default();
    for (section, out) in [("work_orders", &mut q.work_orders), ("lots", &mut q.lots)] {
        let Some(map) = doc.get(section).and_then(Value::as_object) else {
            return Err(AdapterError::Unreadable(format!(
                "quantities: {section} must be an object"
            )));
        };
        for (key, v) in map {
            let d = v
                .as_str()
                .and_then(|s| s.parse::<Decimal>().ok())
                .ok_or_else(|| {
                    AdapterError::Unreadable(format!(
                        "quantities: {section}.{key} must be a decimal string"
                    ))
                })?;
            out.insert(key.clone(), d);
        }
    }
    Ok(q)
}

impl RestAdapter {
    /// Posts a confirmation or a reversal to `path` with its idempotency key.
    async fn post_document<T: serde::Serialize + Sync>(
        &self,
        path: &'static str,
        document: &T,
        idempotency_key: &str,
    ) -> Result<Posted, AdapterError> {
        let url = self.url(path)?;
        let req = self
            .request(Method::POST, url)
            .header("Idempotency-Key", idempotency_key)
            .json(document);
        let (status, body, wait) = self.send(req).await?;
        match status {
            StatusCode::CREATED | StatusCode::ACCEPTED | StatusCode::NO_CONTENT => Ok(Posted::New),
            StatusCode::OK => {
                // 200: the bridge may say it replayed the key (`{"status": "duplicate"}`).
                Ok(if says_duplicate(&body) {
                    Posted::AlreadyThere
                } else {
                    Posted::New
                })
            }
            // 409 is done only when the bridge says the key is booked already; otherwise (the
            // IETF Idempotency-Key draft's "a request with this key is still being processed",
            // or anything unexplained) the first request may still fail: retry.
            StatusCode::CONFLICT if says_duplicate(&body) => Ok(Posted::AlreadyThere),
            StatusCode::CONFLICT => {
                let detail: String = String::from_utf8_lossy(&body).chars().take(300).collect();
                Err(AdapterError::Unavailable(format!(
                    "{path} answered 409 without saying the key is booked (still in progress?): {detail}"
                )))
            }
            s if s.is_success() => Ok(Posted::New),
            s => Err(status_error(s, path, &body, wait)),
        }
    }
}

#[async_trait::async_trait]
impl ErpAdapter for RestAdapter {
    fn name(&self) -> &'static str {
        "rest"
    }

    async fn ping(&self) -> Result<(), AdapterError> {
        let url = self.url("health")?;
        let (status, body, wait) = self.send(self.request(Method::GET, url)).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(status_error(status, "health", &body, wait))
        }
    }

    async fn pull_materials(&self, since: Option<&str>) -> Result<Pulled<Material>, AdapterError> {
        self.pull("materials", since, contract::material).await
    }

    async fn pull_stations(&self, since: Option<&str>) -> Result<Pulled<Station>, AdapterError> {
        self.pull("stations", since, contract::station).await
    }

    async fn pull_received_lots(
        &self,
        since: Option<&str>,
    ) -> Result<Pulled<ReceivedLot>, AdapterError> {
        self.pull("lots", since, contract::received_lot).await
    }

    async fn pull_work_orders(
        &self,
        since: Option<&str>,
    ) -> Result<Pulled<WorkOrder>, AdapterError> {
        self.pull("work-orders", since, contract::work_order).await
    }

    #[tracing::instrument(name = "erp.rest.post_confirmation", skip(self, confirmation))]
    async fn post_confirmation(
        &self,
        confirmation: &Confirmation,
        idempotency_key: &str,
    ) -> Result<Posted, AdapterError> {
        self.post_document("confirmations", confirmation, idempotency_key)
            .await
    }

    async fn post_reversal(
        &self,
        reversal: &Reversal,
        idempotency_key: &str,
    ) -> Result<Posted, AdapterError> {
        self.post_document("reversals", reversal, idempotency_key)
            .await
    }

    async fn quantities(&self) -> Result<ErpQuantities, AdapterError> {
        let doc = self.get_json(self.url("quantities")?).await?;
        read_quantities(&doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn statuses_map_to_retryable_or_permanent() {
        for s in [401, 403] {
            let e = status_error(StatusCode::from_u16(s).unwrap(), "x", b"", None);
            assert!(matches!(e, AdapterError::Unauthorized(_)), "{s}");
        }
        for s in [500, 502, 503, 504, 408, 429, 401, 403] {
            let e = status_error(StatusCode::from_u16(s).unwrap(), "x", b"", None);
            assert!(e.is_transient(), "{s}");
        }
        for s in [400, 404, 410, 422] {
            let e = status_error(StatusCode::from_u16(s).unwrap(), "x", b"nope", None);
            assert!(!e.is_transient(), "{s}");
        }
    }

    #[test]
    fn too_many_requests_and_unavailable_with_retry_after_are_throttling() {
        let wait = Some(Duration::from_secs(2));
        for (s, wait, throttled) in [
            (429, None, true),
            (429, wait, true),
            (503, wait, true),
            (503, None, false),
            (500, wait, false),
        ] {
            let e = status_error(StatusCode::from_u16(s).unwrap(), "x", b"", wait);
            assert_eq!(
                matches!(e, AdapterError::Throttled { .. }),
                throttled,
                "{s} {wait:?}"
            );
            assert!(e.is_transient(), "{s}");
        }
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Wed, 31 Dec 2025 23:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn only_a_duplicate_says_the_key_is_booked() {
        assert!(says_duplicate(br#"{"status": "duplicate"}"#));
        for body in [
            &br#"{"status": "in_progress"}"#[..],
            b"",
            b"already confirmed",
            b"[]",
        ] {
            assert!(!says_duplicate(body), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn a_page_is_checked_and_notes_unknown_keys() {
        let doc = json!({"items": [{"id": "ST-1"}, {"ident": "ST-2"}], "cursor": "2026-01-01T00:00:00Z",
                         "total": 2});
        let page = read_page(&doc, "stations", 0, contract::station).unwrap();
        assert_eq!(page.items.len(), 2);
        assert!(page.items[0].record.is_some());
        assert!(page.items[1].record.is_none());
        assert_eq!(page.cursor.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(page.notes[0].field, "total");
        assert!(read_page(&json!([1]), "stations", 0, contract::station).is_err());
        assert!(read_page(&json!({"cursor": "x"}), "stations", 0, contract::station).is_err());
    }

    #[test]
    fn quantities_need_decimal_strings() {
        let q = read_quantities(&json!({"work_orders": {"WO-1": "10"}, "lots": {"L1": "7.5"}}))
            .unwrap();
        assert_eq!(q.work_orders["WO-1"], Decimal::from(10));
        assert!(read_quantities(&json!({"work_orders": {"WO-1": 10}, "lots": {}})).is_err());
    }

    #[test]
    fn the_base_url_keeps_its_path() {
        let a = RestAdapter::new("http://h:1/erp/v1", "", Duration::from_secs(1)).unwrap();
        assert_eq!(
            a.url("work-orders").unwrap().as_str(),
            "http://h:1/erp/v1/work-orders"
        );
        assert!(a.token.is_none());
        assert!(RestAdapter::new("ftp://h", "", Duration::from_secs(1)).is_err());
        assert!(RestAdapter::new("not a url", "", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn a_refused_base_url_is_named_without_its_password() {
        for url in [
            "https://bridge:s3cret@erp.example/erp/v1",
            "http://bridge:s3cret@erp.example:notaport/erp/v1",
        ] {
            let err = match RestAdapter::new(url, "", Duration::from_secs(1)) {
                Ok(_) => panic!("{url} is refused"),
                Err(e) => format!("{e:#}"),
            };
            assert!(!err.contains("s3cret"), "the password leaks: {err}");
            assert!(
                err.contains("erp.rest_base_url") && err.contains("bridge:***@erp.example"),
                "the error still names the url: {err}"
            );
        }
    }
}
