//! An HTTP ERP double implementing the REST adapter contract
//! (`deploy/erp/rest-adapter.openapi.yaml`) on 127.0.0.1:0, with faults the test switches on
//! and off: 500s, slow answers (past the caller's timeout), dropped connections, and renamed
//! fields (interface drift). It counts every request it receives and keeps each accepted
//! confirmation once per idempotency key — it is the ERP's side of "exactly once".

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// What the double does with the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Every request answers 500.
    ServerError,
    /// Every request is processed at once and answered after this delay.
    Slow(Duration),
    /// Every connection is dropped (RST) after its request was read.
    Reset,
    /// An ERP shedding load: of the confirmation and reversal posts, only every n-th is
    /// taken; the others answer 429 and 503 in turn, each with `Retry-After: 1` (never n − 1
    /// refusals in a row more).
    Throttle(u32),
}

/// One request the double received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    /// `POST /erp/v1/confirmations`; `RESET <request line>` for dropped connections.
    pub what: String,
}

struct Inner {
    fault: Fault,
    plant: Value,
    /// (section, record key, field, new field name): renames applied to pulled records.
    renames: Vec<(String, String, String, String)>,
    /// Accepted confirmations: idempotency key → every body accepted for it (should be one).
    confirmations: BTreeMap<String, Vec<Value>>,
    /// Whether `POST /reversals` exists (otherwise 404, like a bridge that predates it).
    reversals: bool,
    /// Work orders whose confirmations and reversals the ERP answers with 500 (a poison row).
    refused: Vec<String>,
    /// The bearer token it requires (`None`: none).
    token: Option<String>,
    requests: Vec<Seen>,
    /// Confirmation and reversal posts under [`Fault::Throttle`].
    throttled_posts: u32,
    /// Idempotency key → when each post with it arrived (any answer).
    posts: BTreeMap<String, Vec<Instant>>,
    /// Posts still to answer 409 `{"status": "in_progress"}` (booking nothing), as a bridge
    /// does while a request with the same key is still being processed.
    in_progress: u32,
    /// The next booking answers 200 (after an in-progress 409), not 201.
    accepted_with_200: bool,
}

#[derive(Clone)]
pub struct ErpDouble {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
}

pub const BASE: &str = "/erp/v1";

impl ErpDouble {
    /// Starts the double with `plant` (the plant-file shape); `token`: the bearer it requires.
    pub async fn start(plant: Value, token: Option<&str>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let double = Self {
            inner: Arc::new(Mutex::new(Inner {
                fault: Fault::None,
                plant,
                renames: Vec::new(),
                confirmations: BTreeMap::new(),
                reversals: true,
                refused: Vec::new(),
                token: token.map(str::to_owned),
                requests: Vec::new(),
                throttled_posts: 0,
                posts: BTreeMap::new(),
                in_progress: 0,
                accepted_with_200: false,
            })),
            addr,
        };
        let api = Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/materials", get(materials))
            .route("/stations", get(stations))
            .route("/lots", get(lots))
            .route("/work-orders", get(work_orders))
            .route("/quantities", get(quantities))
            .route("/confirmations", post(confirm))
            .route("/reversals", post(reverse));
        let app = Router::new()
            .nest(BASE, api)
            .layer(middleware::from_fn_with_state(double.clone(), faults))
            .with_state(double.clone());
        let listener = FaultyListener {
            listener,
            double: double.clone(),
        };
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        double
    }

    pub fn base_url(&self) -> String {
        format!("http://{}{BASE}", self.addr)
    }

    pub fn set_fault(&self, fault: Fault) {
        self.lock().fault = fault;
    }

    /// Renames `field` to `to` in the record of `section` whose key is `key`.
    pub fn rename(&self, section: &str, key: &str, field: &str, to: &str) {
        self.lock()
            .renames
            .push((section.into(), key.into(), field.into(), to.into()));
    }

    /// Whether the double implements `POST /reversals` (default: yes).
    pub fn accept_reversals(&self, yes: bool) {
        self.lock().reversals = yes;
    }

    /// Answers 500 to every confirmation and reversal of `work_order` (until `None`).
    pub fn refuse_work_order(&self, work_order: Option<&str>) {
        self.lock().refused = work_order.into_iter().map(str::to_owned).collect();
    }

    /// The bearer token the double requires from now on.
    pub fn set_token(&self, token: Option<&str>) {
        self.lock().token = token.map(str::to_owned);
    }

    /// Work order → sum of the good quantities of every accepted confirmation and reversal
    /// (what the ERP's books say was produced).
    pub fn good_quantities(&self) -> BTreeMap<String, rust_decimal::Decimal> {
        let inner = self.lock();
        let mut out: BTreeMap<String, rust_decimal::Decimal> = BTreeMap::new();
        for body in inner.confirmations.values().flatten() {
            let (Some(wo), Some(good)) = (
                body.get("work_order").and_then(Value::as_str),
                body.get("good_quantity")
                    .and_then(Value::as_str)
                    .and_then(|q| q.parse::<rust_decimal::Decimal>().ok()),
            ) else {
                continue;
            };
            *out.entry(wo.to_owned()).or_default() += good;
        }
        out
    }

    pub fn clear_renames(&self) {
        self.lock().renames.clear();
    }

    /// Idempotency key → how many times the ERP accepted it (1 = exactly once).
    pub fn confirmation_counts(&self) -> BTreeMap<String, usize> {
        self.lock()
            .confirmations
            .iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect()
    }

    pub fn confirmation(&self, key: &str) -> Option<Value> {
        self.lock()
            .confirmations
            .get(key)
            .and_then(|v| v.first().cloned())
    }

    /// Requests received whose description contains `what` (e.g. `confirmations`).
    pub fn requests(&self, what: &str) -> Vec<Seen> {
        self.lock()
            .requests
            .iter()
            .filter(|s| s.what.contains(what))
            .cloned()
            .collect()
    }

    /// The next `n` confirmation or reversal posts answer 409 `{"status": "in_progress"}`
    /// and book nothing; the one after books it and answers 200 `{"status": "accepted"}`.
    pub fn answer_in_progress(&self, n: u32) {
        self.lock().in_progress = n;
    }

    /// Idempotency key → when each post with it arrived, whatever the answer.
    pub fn posts(&self) -> BTreeMap<String, Vec<Instant>> {
        self.lock().posts.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, what: String) {
        self.lock().requests.push(Seen {
            at: Instant::now(),
            what,
        });
    }

    fn page(&self, section: &str, key_field: &str) -> Response {
        let inner = self.lock();
        let mut items = inner
            .plant
            .get(section)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for item in &mut items {
            let key = item
                .get(key_field)
                .and_then(Value::as_str)
                .map(str::to_owned);
            for (s, k, from, to) in &inner.renames {
                if s == section
                    && key.as_deref() == Some(k.as_str())
                    && let Some(obj) = item.as_object_mut()
                    && let Some(v) = obj.remove(from)
                {
                    obj.insert(to.clone(), v);
                }
            }
        }
        let cursor = chrono::Utc::now().to_rfc3339();
        axum::Json(json!({"items": items, "cursor": cursor})).into_response()
    }
}

/// Counts requests, checks the bearer token, applies 500s and delays, and closes every
/// connection after its answer (so that a dropped-connection fault hits the next request).
async fn faults(State(d): State<ErpDouble>, req: Request, next: Next) -> Response {
    d.record(format!("{} {}", req.method(), req.uri().path()));
    if let Some(key) = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
    {
        d.lock()
            .posts
            .entry(key.to_owned())
            .or_default()
            .push(Instant::now());
    }
    let mut fault = d.lock().fault;
    if let Fault::Throttle(every) = fault {
        fault = Fault::None;
        if req.method() == axum::http::Method::POST {
            let n = {
                let mut inner = d.lock();
                inner.throttled_posts += 1;
                inner.throttled_posts
            };
            if n % every.max(1) != 0 {
                let status = if n % 2 == 1 {
                    StatusCode::TOO_MANY_REQUESTS
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let mut resp = (status, "slow down").into_response();
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
        }
    }
    if req.uri().path().ends_with("/health") && matches!(fault, Fault::Slow(_)) {
        // Status polls ping the ERP: keep them quick, so that short states stay observable.
        fault = Fault::None;
    }
    let mut resp = match fault {
        Fault::ServerError => (StatusCode::INTERNAL_SERVER_ERROR, "erp down").into_response(),
        _ => {
            let token = d.lock().token.clone();
            let authorized = match &token {
                None => true,
                Some(t) => {
                    req.headers()
                        .get(header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        == Some(format!("Bearer {t}").as_str())
                }
            };
            if authorized {
                let resp = next.run(req).await;
                if let Fault::Slow(delay) = fault {
                    // The ERP has done the work; its answer is late (past the caller's timeout,
                    // which drops the connection: the work stays done).
                    tokio::time::sleep(delay).await;
                }
                resp
            } else {
                (StatusCode::UNAUTHORIZED, "bad token").into_response()
            }
        }
    };
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

async fn materials(State(d): State<ErpDouble>) -> Response {
    d.page("materials", "number")
}

async fn stations(State(d): State<ErpDouble>) -> Response {
    d.page("stations", "id")
}

async fn lots(State(d): State<ErpDouble>) -> Response {
    d.page("lots", "lot")
}

async fn work_orders(State(d): State<ErpDouble>) -> Response {
    d.page("work_orders", "number")
}

/// Work orders: the good quantity of the confirmations (and reversals) it accepted.
async fn quantities(State(d): State<ErpDouble>) -> Response {
    let good = d.good_quantities();
    let inner = d.lock();
    let mut wo = serde_json::Map::new();
    for w in inner
        .plant
        .get("work_orders")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(n) = w.get("number").and_then(Value::as_str) {
            let q = good.get(n).copied().unwrap_or_default().normalize();
            wo.insert(n.to_owned(), json!(q.to_string()));
        }
    }
    axum::Json(json!({"work_orders": wo, "lots": {}})).into_response()
}

/// A new key is stored (201); a known key is the same confirmation (409 `duplicate`).
async fn confirm(State(d): State<ErpDouble>, headers: HeaderMap, body: String) -> Response {
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
    else {
        return (StatusCode::BAD_REQUEST, "Idempotency-Key required").into_response();
    };
    let Ok(value) = serde_json::from_str::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not json").into_response();
    };
    let mut inner = d.lock();
    if value
        .get("work_order")
        .and_then(Value::as_str)
        .is_some_and(|wo| inner.refused.iter().any(|r| r == wo))
    {
        return (StatusCode::INTERNAL_SERVER_ERROR, "erp cannot book it").into_response();
    }
    if inner.confirmations.contains_key(&key) {
        return (
            StatusCode::CONFLICT,
            axum::Json(json!({"status": "duplicate"})),
        )
            .into_response();
    }
    if inner.in_progress > 0 {
        inner.in_progress -= 1;
        inner.accepted_with_200 = true;
        return (
            StatusCode::CONFLICT,
            axum::Json(json!({"status": "in_progress"})),
        )
            .into_response();
    }
    let status = if std::mem::take(&mut inner.accepted_with_200) {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    inner.confirmations.insert(key, vec![value]);
    (status, axum::Json(json!({"status": "accepted"}))).into_response()
}

/// Reversals are booked like confirmations (same key space, the keys differ by prefix).
async fn reverse(State(d): State<ErpDouble>, headers: HeaderMap, body: String) -> Response {
    if !d.lock().reversals {
        return (StatusCode::NOT_FOUND, "no such endpoint").into_response();
    }
    confirm(State(d), headers, body).await
}

/// A listener that, under [`Fault::Reset`], reads a request and drops its connection.
struct FaultyListener {
    listener: TcpListener,
    double: ErpDouble,
}

impl axum::serve::Listener for FaultyListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((mut stream, addr)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            if self.double.lock().fault != Fault::Reset {
                return (stream, addr);
            }
            let double = self.double.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]);
                let line = head.lines().next().unwrap_or_default().to_owned();
                double.record(format!("RESET {line}"));
                // Linger 0: close with a reset, not a clean FIN.
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
                drop(stream);
            });
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}
