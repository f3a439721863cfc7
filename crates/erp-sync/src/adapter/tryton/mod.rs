//! The `tryton` adapter: Tryton 8.2 (`production` and `stock_lot` modules) over JSON-RPC.
//!
//! Mapping (Tryton → MES):
//! - materials: `product.product` of type goods — `code` → number, `name` → description,
//!   default unit symbol → unit; tracking is `lot` (Tryton has lots, no serial numbers).
//!   Products without a code break the contract and go to the dead letters.
//! - stations: the base modules have none (`production_work` work centers are not used): the
//!   adapter reports one configured station (`erp.tryton_station`) and every work order has
//!   one operation, step 10, there.
//! - received lots: `stock.lot` of non-producible products with their quantity in the
//!   warehouse's storage location (lots at zero are skipped).
//! - work orders: `production` from `waiting` on (`waiting|assigned|running` → released,
//!   `done` → closed, `cancelled` → cancelled), components per unit from the BOM (or from the
//!   planned input moves when the order has no BOM).
//! - a confirmation completes the order: consumed quantities and lots on the input moves
//!   (`wait` first when needed), `assign_try` (or `assign_force`), `run`, the output `stock.lot`
//!   created, quantity and lot on the output moves, an `ir.note` on the order whose message is
//!   the idempotency key, `do`. Each step checks the order's state, so a post interrupted
//!   half-way is finished by the retry; a `done` order that carries the key is this
//!   confirmation (`AlreadyThere`).
//! - a confirmation of an order that is `done` without its key — a follow-up (production
//!   booked after the operation's confirmation), a second confirmation after a void and redo,
//!   an order closed by hand in Tryton — is booked next to it as keyed corrections, never
//!   dropped: produced lots into storage as done moves (an `ir.note` with the key, the lot
//!   created if new), consumed lots out of storage as a correction production (below).
//!   Reconciliation counts them. An order closed by hand gets the MES's quantities on top of
//!   what was booked by hand (reconciliation shows the difference if both were booked).
//!   Scrap is not posted (base Tryton production has no scrap moves).
//! - a reversal (a scan voided after its confirmation) is booked as an inventory correction
//!   next to the `done` production (which Tryton cannot undo), with the locations of the
//!   production order (its `location`, its warehouse's `storage_location`):
//!   - a voided consume: a `stock.move` of the lot from the production location back to
//!     storage (priced at the consumed move's cost), with an `ir.note` on it whose message is
//!     the idempotency key (stock.move has no text field of its own), then `do`;
//!   - a voided produce: Tryton takes stock out of storage only through an assignment, which
//!     its API offers on documents, not on a lone move (`do` is read-only on a draft move that
//!     needs one): the lot goes back to the production location as the input move of a
//!     correction production (no product, no outputs, `reference` = `erp-sync <key>`, created
//!     with its move in one call), run through `wait`, `assign_try`/`assign_force`, `run`,
//!     `do`. Correction productions are left out of pulls; reconciliation subtracts them from
//!     the order's good quantity (their moves' `origin` is the order's output move).
//!
//!   Exactly once: before creating, the adapter looks for the key (the note, the reference)
//!   and answers `AlreadyThere` when the correction is done, or finishes it when a stopped
//!   attempt left it undone; a keyless draft move identical to the one to create (an attempt
//!   stopped between the move and its note) is adopted rather than doubled.
//!   What cannot be posted lands in the dead letters with the quantities to book by hand
//!   (`erp_reversals_manual_total`): scrap (never posted), an order that is not `done`, an
//!   unknown product or lot, an order without a move of that product.
//!
//! Incremental pulls ask for records created or written since the cursor (the newest
//! `create_date`/`write_date` seen, minus a few seconds of overlap: Tryton stamps the start of
//! its transactions); upserts on the MES side are idempotent.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use reqwest::{StatusCode, Url};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::{Value, json};

use super::{AdapterError, ErpAdapter, Posted, Pulled};
use crate::config::ErpSettings;
use crate::contract::{self, Checked};
use crate::domain::{
    Confirmation, ErpQuantities, Material, ReceivedLot, Reversal, Station, WorkOrder,
};

/// Overlap of incremental pulls (transaction-start timestamps commit late).
const OVERLAP_SECONDS: i64 = 5;

/// The `reference` prefix of the correction productions that book reversed produce scans and
/// consumption confirmed after the order was done (not work orders: left out of pulls and
/// reconciliation).
pub const CORRECTION_PREFIX: &str = "erp-sync ";

/// Productions that are not correction productions (`reference` may be empty).
fn not_correction() -> Value {
    json!([
        "OR",
        ["reference", "=", null],
        ["reference", "not like", format!("{CORRECTION_PREFIX}%")]
    ])
}

/// The single operation of a Tryton production order.
pub const OPERATION_STEP: u32 = 10;

#[derive(Debug, Clone)]
pub struct TrytonSettings {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
    pub company: i64,
    pub station: String,
}

impl TrytonSettings {
    pub fn from_erp(s: &ErpSettings) -> Self {
        Self {
            url: s.tryton_url.clone(),
            database: s.tryton_database.clone(),
            user: s.tryton_user.clone(),
            password: s.tryton_password.expose().to_owned(),
            company: s.tryton_company,
            station: s.tryton_station.clone(),
        }
    }
}

/// A logged-in session and what the adapter learnt with it.
#[derive(Clone)]
struct Session {
    /// `Session base64(user:uid:token)`.
    authorization: String,
    company: i64,
    /// The first warehouse's storage location (lot quantities are counted there).
    storage: Option<i64>,
}

/// Why one JSON-RPC exchange failed.
enum CallError {
    /// 401/403: the session expired or was refused: log in again.
    Relogin,
    Erp(AdapterError),
}

pub struct TrytonAdapter {
    settings: TrytonSettings,
    rpc_url: Url,
    server_url: Url,
    client: reqwest::Client,
    timeout: Duration,
    session: tokio::sync::Mutex<Option<Session>>,
    ids: AtomicU64,
}

impl TrytonAdapter {
    pub fn new(settings: TrytonSettings, timeout: Duration) -> anyhow::Result<Self> {
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
            settings,
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
            .map_err(|e| CallError::Erp(super::rest::transport_error(e, self.timeout)))?;
        let status = resp.status();
        let gzip = resp
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
        let body = resp
            .bytes()
            .await
            .map_err(|e| CallError::Erp(super::rest::transport_error(e, self.timeout)))?;
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Err(CallError::Relogin);
        }
        if !status.is_success() {
            let msg = format!("tryton {method} answered {status}");
            return Err(CallError::Erp(
                if status.is_server_error()
                    || matches!(
                        status,
                        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS
                    )
                {
                    AdapterError::Unavailable(msg)
                } else {
                    AdapterError::Rejected(msg)
                },
            ));
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
        let params = json!([self.settings.user, {"password": self.settings.password}, "en"]);
        let result = match self
            .exchange(&self.rpc_url, "common.db.login", &params, None)
            .await
        {
            Ok(r) => r,
            // A refused login is an operations problem (wrong password): retry, set nothing aside.
            Err(CallError::Relogin) => {
                return Err(AdapterError::Unauthorized(format!(
                    "tryton refused the login of {:?}",
                    self.settings.user
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
                    self.settings.user
                )));
            }
        };
        let authorization = format!(
            "Session {}",
            base64(format!("{}:{uid}:{token}", self.settings.user).as_bytes())
        );
        let mut session = Session {
            authorization,
            company: self.settings.company,
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
        let ctx = context(session.company);
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
        tracing::info!(user = %self.settings.user, company = session.company, "logged in to tryton");
        Ok(session)
    }

    async fn session(&self) -> Result<Session, AdapterError> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        let s = self.login().await?;
        *guard = Some(s.clone());
        Ok(s)
    }

    /// A model call with the session; logs in again once when the session expired.
    async fn call(&self, method: &str, params: Value) -> Result<Value, AdapterError> {
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

    async fn ctx(&self) -> Result<(Value, Session), AdapterError> {
        let s = self.session().await?;
        Ok((context(s.company), s))
    }

    async fn search_read(
        &self,
        model: &str,
        domain: Value,
        fields: &[&str],
        ctx: Value,
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

    async fn button(
        &self,
        model: &str,
        button: &str,
        id: i64,
        ctx: &Value,
    ) -> Result<(), AdapterError> {
        self.call(&format!("model.{model}.{button}"), json!([[id], ctx]))
            .await
            .map(|_| ())
    }

    async fn write(
        &self,
        model: &str,
        id: i64,
        vals: Value,
        ctx: &Value,
    ) -> Result<(), AdapterError> {
        self.call(&format!("model.{model}.write"), json!([[id], vals, ctx]))
            .await
            .map(|_| ())
    }

    async fn create(&self, model: &str, vals: Value, ctx: &Value) -> Result<i64, AdapterError> {
        let v = self
            .call(&format!("model.{model}.create"), json!([[vals], ctx]))
            .await?;
        v.get(0).and_then(Value::as_i64).ok_or_else(|| {
            AdapterError::Unreadable(format!("{model}.create answered {v} instead of ids"))
        })
    }

    /// The lot's id, created when Tryton does not know it yet.
    async fn lot_id(&self, number: &str, product: i64, ctx: &Value) -> Result<i64, AdapterError> {
        let found = self
            .search_read(
                "stock.lot",
                json!([["number", "=", number], ["product", "=", product]]),
                &["number"],
                ctx.clone(),
            )
            .await?;
        if let Some(id) = found
            .first()
            .and_then(|l| l.get("id"))
            .and_then(Value::as_i64)
        {
            return Ok(id);
        }
        self.create(
            "stock.lot",
            json!({"number": number, "product": product}),
            ctx,
        )
        .await
    }

    async fn production(&self, number: &str, ctx: &Value) -> Result<Value, AdapterError> {
        let found = self
            .search_read(
                "production",
                json!([["number", "=", number]]),
                &[
                    "state",
                    "product",
                    "company",
                    "location",
                    "warehouse",
                    "warehouse.storage_location",
                ],
                ctx.clone(),
            )
            .await?;
        found.into_iter().next().ok_or_else(|| {
            AdapterError::Rejected(format!("tryton has no production order {number:?}"))
        })
    }

    async fn moves(
        &self,
        production: i64,
        side: &str,
        ctx: &Value,
    ) -> Result<Vec<Move>, AdapterError> {
        let field = if side == "inputs" {
            "production_input"
        } else {
            "production_output"
        };
        let rows = self
            .search_read(
                "stock.move",
                json!([[field, "=", production]]),
                &[
                    "product",
                    "product.code",
                    "unit",
                    "from_location",
                    "to_location",
                    "company",
                    "unit_price",
                    "currency",
                    "state",
                ],
                ctx.clone(),
            )
            .await?;
        Ok(rows.iter().filter_map(Move::from_row).collect())
    }

    /// Writes `lots` (per product code) on one side's moves: existing moves of a product get the
    /// lots in order, more lots get new moves, moves left over are removed.
    async fn apply_lots(
        &self,
        production: &Value,
        side: &'static str,
        lots: &BTreeMap<String, Vec<(String, Decimal)>>,
        ctx: &Value,
    ) -> Result<(), AdapterError> {
        let pid = id_of(production)?;
        let moves = self.moves(pid, side, ctx).await?;
        let mut to_delete = Vec::new();
        let mut to_create = Vec::new();
        for (code, per_lot) in lots {
            let mine: Vec<&Move> = moves.iter().filter(|m| &m.code == code).collect();
            let product = match mine.first() {
                Some(m) => m.product,
                None => self.product_id(code, ctx).await?,
            };
            for (i, (lot, quantity)) in per_lot.iter().enumerate() {
                let lot = if lot.is_empty() {
                    Value::Null
                } else {
                    json!(self.lot_id(lot, product, ctx).await?)
                };
                let q = quantity.to_f64().unwrap_or(0.0);
                match mine.get(i) {
                    Some(m) => {
                        self.write("stock.move", m.id, json!({"quantity": q, "lot": lot}), ctx)
                            .await?
                    }
                    None => {
                        let template = mine.first().copied().or_else(|| moves.first());
                        let mut vals = match template {
                            Some(t) => t.values(),
                            None => default_move(production, side)?,
                        };
                        vals["product"] = json!(product);
                        vals["quantity"] = json!(q);
                        vals["lot"] = lot;
                        if template.is_none_or(|t| t.product != product) {
                            // The unit of another product may not fit: Tryton takes the default.
                            if let Some(o) = vals.as_object_mut() {
                                o.remove("unit");
                            }
                        }
                        to_create.push(vals);
                    }
                }
            }
            to_delete.extend(mine.iter().skip(per_lot.len()).map(|m| m.id));
        }
        if !to_create.is_empty() || !to_delete.is_empty() {
            let mut ops = Vec::new();
            if !to_create.is_empty() {
                ops.push(json!(["create", to_create]));
            }
            if !to_delete.is_empty() {
                ops.push(json!(["delete", to_delete]));
            }
            self.write("production", pid, json!({ side: ops }), ctx)
                .await?;
        }
        Ok(())
    }

    async fn product_id(&self, code: &str, ctx: &Value) -> Result<i64, AdapterError> {
        let found = self
            .search_read(
                "product.product",
                json!([["code", "=", code]]),
                &["code"],
                ctx.clone(),
            )
            .await?;
        found
            .first()
            .and_then(|p| p.get("id"))
            .and_then(Value::as_i64)
            .ok_or_else(|| AdapterError::Rejected(format!("tryton has no product {code:?}")))
    }

    async fn state(&self, id: i64, ctx: &Value) -> Result<String, AdapterError> {
        let v = self
            .call("model.production.read", json!([[id], ["state"], ctx]))
            .await?;
        Ok(v.get(0)
            .and_then(|p| p.get("state"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned())
    }

    /// The domain of records changed since the cursor (extra terms ORed in).
    fn since_domain(since: Option<&str>, extra: &[&str]) -> Option<Value> {
        let t = since
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())?
            .with_timezone(&Utc)
            - chrono::Duration::seconds(OVERLAP_SECONDS);
        let t = tagged_datetime(t.naive_utc());
        let mut or = vec![
            json!("OR"),
            json!(["write_date", ">=", t]),
            json!(["create_date", ">=", t]),
        ];
        for f in extra {
            or.push(json!([f, ">=", t]));
        }
        Some(Value::Array(or))
    }

    /// Records of `query` changed since the cursor, mapped to the contract's shape by `map`
    /// (`None`: skipped) and checked by `check`.
    async fn pull_with<T>(
        &self,
        query: Query<'_>,
        since: Option<&str>,
        map: impl Fn(&Value) -> Option<Value>,
        check: fn(&Value, usize) -> Checked<T>,
    ) -> Result<Pulled<T>, AdapterError> {
        let Query {
            model,
            mut domain,
            extra_since,
            fields,
            ctx,
        } = query;
        if let Some(d) = Self::since_domain(since, extra_since) {
            domain.push(d);
        }
        let mut all_fields: Vec<&str> = fields.to_vec();
        all_fields.extend(["write_date", "create_date"]);
        let rows = self
            .search_read(model, Value::Array(domain), &all_fields, ctx)
            .await?;
        let mut newest: Option<NaiveDateTime> = None;
        let mut items = Vec::new();
        for row in &rows {
            for f in ["write_date", "create_date"] {
                if let Some(t) = row.get(f).and_then(datetime) {
                    newest = Some(newest.map_or(t, |n| n.max(t)));
                }
            }
            if let Some(canonical) = map(row) {
                let i = items.len();
                items.push(check(&canonical, i));
            }
        }
        let cursor = newest
            .map(|t| {
                t.and_utc()
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            })
            .or_else(|| since.map(str::to_owned));
        Ok(Pulled {
            items,
            notes: Vec::new(),
            cursor,
        })
    }
}

/// What an incremental pull reads.
struct Query<'a> {
    model: &'a str,
    domain: Vec<Value>,
    /// Date fields ORed into the "changed since" filter besides the record's own.
    extra_since: &'a [&'a str],
    fields: &'a [&'a str],
    ctx: Value,
}

/// A stock move as the adapter needs it.
struct Move {
    id: i64,
    product: i64,
    code: String,
    row: Value,
}

impl Move {
    fn from_row(row: &Value) -> Option<Self> {
        Some(Self {
            id: row.get("id")?.as_i64()?,
            product: row.get("product")?.as_i64()?,
            code: row
                .get("product.")
                .and_then(|p| p.get("code"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            row: row.clone(),
        })
    }

    /// The values a new move like this one takes.
    fn values(&self) -> Value {
        let mut vals = serde_json::Map::new();
        for f in [
            "unit",
            "from_location",
            "to_location",
            "company",
            "unit_price",
            "currency",
        ] {
            if let Some(v) = self.row.get(f).filter(|v| !v.is_null()) {
                vals.insert(f.to_owned(), v.clone());
            }
        }
        Value::Object(vals)
    }
}

/// A new move of a production without moves on that side: storage ↔ production location.
fn default_move(production: &Value, side: &str) -> Result<Value, AdapterError> {
    let location = production.get("location").and_then(Value::as_i64);
    let storage = production
        .get("warehouse.")
        .and_then(|w| w.get("storage_location"))
        .and_then(Value::as_i64);
    match (location, storage) {
        (Some(p), Some(s)) if side == "inputs" => Ok(json!({"from_location": s, "to_location": p})),
        (Some(p), Some(s)) => Ok(json!({"from_location": p, "to_location": s})),
        _ => Err(AdapterError::Rejected(
            "the production order has no locations to add a move".into(),
        )),
    }
}

fn id_of(v: &Value) -> Result<i64, AdapterError> {
    v.get("id")
        .and_then(Value::as_i64)
        .ok_or_else(|| AdapterError::Unreadable(format!("record without id: {v}")))
}

fn relogin_unavailable(e: CallError) -> AdapterError {
    match e {
        CallError::Relogin => AdapterError::Unauthorized("tryton refused the new session".into()),
        CallError::Erp(e) => e,
    }
}

/// Every model call's context (the last parameter): the company.
fn context(company: i64) -> Value {
    if company > 0 {
        json!({"company": company})
    } else {
        json!({})
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

/// A number, or a tagged `Decimal`, as a decimal.
fn decimal(v: &Value) -> Option<Decimal> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(Decimal::from(i))
            } else {
                Decimal::try_from(n.as_f64()?).ok().map(|d| d.round_dp(6))
            }
        }
        Value::Object(o) if o.get("__class__").and_then(Value::as_str) == Some("Decimal") => {
            o.get("decimal")?.as_str()?.parse().ok()
        }
        _ => None,
    }
}

/// A decimal as the contract's string (`"2.5"`); keeps non-numbers as they are so that the
/// contract check reports them.
fn quantity_string(v: &Value) -> Value {
    match decimal(v) {
        Some(d) => Value::String(d.normalize().to_string()),
        None => v.clone(),
    }
}

/// A tagged `datetime` (naive UTC) or `date`.
fn datetime(v: &Value) -> Option<NaiveDateTime> {
    let o = v.as_object()?;
    let n = |k: &str| o.get(k).and_then(Value::as_i64).unwrap_or(0);
    let date = NaiveDate::from_ymd_opt(
        i32::try_from(n("year")).ok()?,
        u32::try_from(n("month")).ok()?,
        u32::try_from(n("day")).ok()?,
    )?;
    match o.get("__class__").and_then(Value::as_str)? {
        "datetime" => date.and_hms_micro_opt(
            u32::try_from(n("hour")).ok()?,
            u32::try_from(n("minute")).ok()?,
            u32::try_from(n("second")).ok()?,
            u32::try_from(n("microsecond")).ok()?,
        ),
        "date" => date.and_hms_opt(0, 0, 0),
        _ => None,
    }
}

fn tagged_datetime(t: NaiveDateTime) -> Value {
    use chrono::{Datelike, Timelike};
    json!({"__class__": "datetime", "year": t.year(), "month": t.month(), "day": t.day(),
           "hour": t.hour(), "minute": t.minute(), "second": t.second(),
           "microsecond": t.nanosecond() / 1_000})
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(TABLE[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The code of a related product (`"product.": {"code": ...}`).
fn code(row: &Value, rel: &str) -> Value {
    row.get(rel)
        .and_then(|p| p.get("code"))
        .cloned()
        .unwrap_or(Value::Null)
}

/// A production order in the contract's shape (`None`: not for the MES, e.g. a draft).
fn work_order_json(row: &Value, station: &str) -> Option<Value> {
    let status = match row.get("state").and_then(Value::as_str) {
        Some("waiting" | "assigned" | "running") => "released",
        Some("done") => "closed",
        Some("cancelled") => "cancelled",
        // request / draft: not released to the shop floor yet.
        Some(_) => return None,
        None => "",
    };
    let quantity = row.get("quantity").and_then(decimal);
    let product_code = code(row, "product.");
    let mut per_product: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut bad = Vec::new();
    // The BOM's quantities per unit of the output, or the planned inputs per ordered unit.
    let bom = row.get("bom.").filter(|b| b.is_object());
    let bom_output = bom
        .and_then(|b| b.get("outputs."))
        .and_then(Value::as_array)
        .and_then(|outs| {
            outs.iter()
                .find(|o| code(o, "product.") == product_code)
                .and_then(|o| o.get("quantity"))
                .and_then(decimal)
        });
    let (lines, per) = match (bom, bom_output) {
        (Some(b), Some(out)) if out > Decimal::ZERO => (b.get("inputs."), Some(out)),
        _ => (row.get("inputs."), quantity),
    };
    for line in lines.and_then(Value::as_array).into_iter().flatten() {
        let c = code(line, "product.");
        let q = line.get("quantity").and_then(decimal);
        // Checked arithmetic: absurd quantities make a dead letter, not a panic.
        let summed = match (c.as_str(), q, per) {
            (Some(code), Some(q), Some(per)) if per > Decimal::ZERO => q
                .checked_div(per)
                .and_then(|v| {
                    per_product
                        .get(code)
                        .copied()
                        .unwrap_or_default()
                        .checked_add(v)
                })
                .map(|sum| (code.to_owned(), sum)),
            _ => None,
        };
        match summed {
            Some((code, sum)) => {
                per_product.insert(code, sum);
            }
            None => bad.push(json!({"material": c, "quantity_per_unit": line.get("quantity")})),
        }
    }
    let mut components: Vec<Value> = per_product
        .into_iter()
        .map(|(m, q)| json!({"material": m, "quantity_per_unit": q.round_dp(6).normalize().to_string()}))
        .collect();
    components.extend(bad);
    Some(json!({
        "number": row.get("number").cloned().unwrap_or(Value::Null),
        "material": product_code,
        "planned_quantity": row.get("quantity").map(quantity_string).unwrap_or(Value::Null),
        "status": status,
        "operations": [{"step": OPERATION_STEP, "station": station, "description": "Production"}],
        "components": components,
    }))
}

#[async_trait::async_trait]
impl ErpAdapter for TrytonAdapter {
    fn name(&self) -> &'static str {
        "tryton"
    }

    async fn ping(&self) -> Result<(), AdapterError> {
        match self
            .exchange(&self.server_url, "common.server.version", &json!([]), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(CallError::Relogin) => Err(AdapterError::Unavailable("tryton refused".into())),
            Err(CallError::Erp(e)) => Err(e),
        }
    }

    #[tracing::instrument(name = "erp.tryton.pull_materials", skip(self))]
    async fn pull_materials(&self, since: Option<&str>) -> Result<Pulled<Material>, AdapterError> {
        let (ctx, _) = self.ctx().await?;
        let query = Query {
            model: "product.product",
            domain: vec![json!(["type", "=", "goods"])],
            extra_since: &[],
            fields: &["code", "name", "default_uom.symbol"],
            ctx,
        };
        self.pull_with(
            query,
            since,
            |row| {
                Some(json!({
                    "number": row.get("code").cloned().unwrap_or(Value::Null),
                    "description": row.get("name").cloned().unwrap_or(Value::Null),
                    "tracking": "lot",
                    "unit": row.get("default_uom.").and_then(|u| u.get("symbol")).cloned()
                        .unwrap_or(Value::Null),
                }))
            },
            contract::material,
        )
        .await
    }

    async fn pull_stations(&self, since: Option<&str>) -> Result<Pulled<Station>, AdapterError> {
        let station = json!({"id": self.settings.station, "name": "Tryton production"});
        Ok(Pulled {
            items: vec![contract::station(&station, 0)],
            notes: Vec::new(),
            cursor: since.map(str::to_owned),
        })
    }

    #[tracing::instrument(name = "erp.tryton.pull_received_lots", skip(self))]
    async fn pull_received_lots(
        &self,
        since: Option<&str>,
    ) -> Result<Pulled<ReceivedLot>, AdapterError> {
        let (mut ctx, session) = self.ctx().await?;
        if let Some(storage) = session.storage {
            ctx["locations"] = json!([storage]);
        }
        let query = Query {
            model: "stock.lot",
            domain: vec![json!(["product.producible", "=", false])],
            extra_since: &[],
            fields: &["number", "product.code", "quantity"],
            ctx,
        };
        self.pull_with(
            query,
            since,
            |row| {
                // A lot with nothing in stock is not material the shop floor can use.
                if row
                    .get("quantity")
                    .and_then(decimal)
                    .is_some_and(|q| q <= Decimal::ZERO)
                {
                    return None;
                }
                Some(json!({
                    "lot": row.get("number").cloned().unwrap_or(Value::Null),
                    "material": code(row, "product."),
                    "quantity": row.get("quantity").map(quantity_string).unwrap_or(Value::Null),
                    "received_at": row.get("create_date").and_then(datetime)
                        .map(|t| t.and_utc().to_rfc3339()),
                }))
            },
            contract::received_lot,
        )
        .await
    }

    #[tracing::instrument(name = "erp.tryton.pull_work_orders", skip(self))]
    async fn pull_work_orders(
        &self,
        since: Option<&str>,
    ) -> Result<Pulled<WorkOrder>, AdapterError> {
        let (ctx, _) = self.ctx().await?;
        let station = self.settings.station.clone();
        let query = Query {
            model: "production",
            domain: vec![
                json!([
                    "state",
                    "in",
                    ["waiting", "assigned", "running", "done", "cancelled"]
                ]),
                not_correction(),
            ],
            extra_since: &["inputs.write_date"],
            fields: &[
                "number",
                "state",
                "quantity",
                "product.code",
                "inputs.product.code",
                "inputs.quantity",
                "bom.inputs.product.code",
                "bom.inputs.quantity",
                "bom.outputs.product.code",
                "bom.outputs.quantity",
            ],
            ctx,
        };
        self.pull_with(
            query,
            since,
            move |row| work_order_json(row, &station),
            contract::work_order,
        )
        .await
    }

    async fn post_reversal(
        &self,
        reversal: &Reversal,
        idempotency_key: &str,
    ) -> Result<Posted, AdapterError> {
        match self.post_reversal_moves(reversal, idempotency_key).await? {
            Ok(posted) => {
                metrics::counter!("erp_reversals_posted_total", "adapter" => "tryton").increment(1);
                tracing::info!(idempotency_key, ?posted, "tryton reversal posted");
                Ok(posted)
            }
            Err(why) => {
                metrics::counter!("erp_reversals_manual_total", "adapter" => "tryton").increment(1);
                Err(AdapterError::Rejected(manual_reversal(
                    reversal,
                    idempotency_key,
                    &why,
                )))
            }
        }
    }

    #[tracing::instrument(name = "erp.tryton.post_confirmation", skip(self, confirmation),
        fields(work_order = %confirmation.work_order))]
    async fn post_confirmation(
        &self,
        confirmation: &Confirmation,
        idempotency_key: &str,
    ) -> Result<Posted, AdapterError> {
        if confirmation.operation != OPERATION_STEP {
            return Err(AdapterError::Rejected(format!(
                "tryton production orders have one operation ({OPERATION_STEP}), not {}",
                confirmation.operation
            )));
        }
        if confirmation.is_follow_up() {
            // Late production: the order is done (its confirmation went first).
            return self
                .post_confirmation_corrections(confirmation, idempotency_key)
                .await;
        }
        let (ctx, _) = self.ctx().await?;
        let production = self.production(&confirmation.work_order, &ctx).await?;
        let id = id_of(&production)?;
        let mut state = production
            .get("state")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let keyed = self.production_keyed(id, idempotency_key, &ctx).await?;
        match state.as_str() {
            // This confirmation did it (a retry after Tryton took it).
            "done" if keyed => return Ok(Posted::AlreadyThere),
            // Done by another confirmation (a void and redo) or by hand: this one's quantities
            // are booked next to it, keyed, rather than dropped.
            "done" => {
                return self
                    .post_confirmation_corrections(confirmation, idempotency_key)
                    .await;
            }
            "cancelled" => {
                return Err(AdapterError::Rejected(format!(
                    "production order {} is cancelled in tryton",
                    confirmation.work_order
                )));
            }
            "request" | "draft" | "assigned" => {
                // Quantities are read-only on assigned moves: back to waiting first.
                self.button("production", "wait", id, &ctx).await?;
                state = "waiting".into();
            }
            _ => {}
        }
        let group = |lots: &[crate::domain::LotQuantity]| {
            let mut m: BTreeMap<String, Vec<(String, Decimal)>> = BTreeMap::new();
            for l in lots {
                m.entry(l.material.clone())
                    .or_default()
                    .push((l.lot.clone(), l.quantity));
            }
            m
        };
        if state == "waiting" {
            self.apply_lots(
                &production,
                "inputs",
                &group(&confirmation.consumed_lots),
                &ctx,
            )
            .await?;
            self.button("production", "assign_try", id, &ctx).await?;
            if self.state(id, &ctx).await? != "assigned" {
                self.button("production", "assign_force", id, &ctx).await?;
            }
            self.button("production", "run", id, &ctx).await?;
        } else if state != "running" {
            return Err(AdapterError::Rejected(format!(
                "production order {} is {state} in tryton",
                confirmation.work_order
            )));
        }
        let mut outputs = group(&confirmation.produced_lots);
        if outputs.is_empty() {
            // Nothing lot-tracked produced: the good quantity on the main output, no lot.
            let moves = self.moves(id, "outputs", &ctx).await?;
            if let Some(m) = moves.first() {
                outputs.insert(
                    m.code.clone(),
                    vec![(String::new(), confirmation.good_quantity)],
                );
            }
        }
        self.apply_lots(&production, "outputs", &outputs, &ctx)
            .await?;
        if !keyed {
            // The key goes on the order before `do`: a retry after `do` finds it (and answers
            // `AlreadyThere`), a retry before `do` finishes the order.
            self.create(
                "ir.note",
                json!({"resource": format!("production,{id}"), "message": idempotency_key}),
                &ctx,
            )
            .await?;
        }
        self.button("production", "do", id, &ctx).await?;
        tracing::info!(
            idempotency_key,
            production = id,
            "tryton production order done"
        );
        Ok(Posted::New)
    }

    async fn quantities(&self) -> Result<ErpQuantities, AdapterError> {
        let mut q = ErpQuantities::default();
        let (ctx, session) = self.ctx().await?;
        let productions = self
            .search_read(
                "production",
                json!([
                    ["state", "in", ["waiting", "assigned", "running", "done"]],
                    not_correction()
                ]),
                &[
                    "number",
                    "state",
                    "product",
                    "location",
                    "outputs.product",
                    "outputs.quantity",
                ],
                ctx.clone(),
            )
            .await?;
        // Corrections of produced quantities: done moves whose origin is an output move, back
        // into the production location (a reversal) or out of it (production confirmed after
        // the order was done).
        let mut output_of: BTreeMap<String, &Value> = BTreeMap::new();
        for p in &productions {
            if p.get("state").and_then(Value::as_str) != Some("done") {
                continue;
            }
            for o in p
                .get("outputs.")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(id) = o.get("id").and_then(Value::as_i64) {
                    output_of.insert(format!("stock.move,{id}"), p);
                }
            }
        }
        let mut reversed: BTreeMap<i64, Decimal> = BTreeMap::new();
        if !output_of.is_empty() {
            let origins: Vec<&String> = output_of.keys().collect();
            let moves = self
                .search_read(
                    "stock.move",
                    json!([["state", "=", "done"], ["origin", "in", origins]]),
                    &["origin", "product", "quantity", "to_location"],
                    ctx.clone(),
                )
                .await?;
            for m in &moves {
                let Some(p) = m
                    .get("origin")
                    .and_then(Value::as_str)
                    .and_then(|o| output_of.get(o))
                else {
                    continue;
                };
                if m.get("product") == p.get("product")
                    && let Some(id) = p.get("id").and_then(Value::as_i64)
                {
                    let q = m.get("quantity").and_then(decimal).unwrap_or_default();
                    let back = m.get("to_location") == p.get("location");
                    let e = reversed.entry(id).or_default();
                    *e = if back {
                        e.checked_add(q)
                    } else {
                        e.checked_sub(q)
                    }
                    .unwrap_or(Decimal::MAX);
                }
            }
        }
        for p in &productions {
            let Some(number) = p.get("number").and_then(Value::as_str) else {
                continue;
            };
            let mut good = Decimal::ZERO;
            if p.get("state").and_then(Value::as_str) == Some("done") {
                let product = p.get("product");
                for o in p
                    .get("outputs.")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if o.get("product") == product {
                        let q = o.get("quantity").and_then(decimal).unwrap_or_default();
                        good = good.checked_add(q).unwrap_or(Decimal::MAX);
                    }
                }
            }
            if let Some(back) = p
                .get("id")
                .and_then(Value::as_i64)
                .and_then(|id| reversed.get(&id))
            {
                good -= *back;
            }
            q.work_orders.insert(number.to_owned(), good);
        }
        let mut lot_ctx = ctx;
        if let Some(storage) = session.storage {
            lot_ctx["locations"] = json!([storage]);
        }
        let lots = self
            .search_read(
                "stock.lot",
                json!([["product.producible", "=", false]]),
                &["number", "quantity"],
                lot_ctx,
            )
            .await?;
        for l in &lots {
            if let (Some(n), Some(quantity)) = (
                l.get("number").and_then(Value::as_str),
                l.get("quantity").and_then(decimal),
            ) {
                q.lots.insert(n.to_owned(), quantity);
            }
        }
        Ok(q)
    }
}

/// One correction next to a done production: `quantity` of `code` (lot `lot`) into storage
/// (a voided consume, a produce confirmed after the order was done) or out of storage into
/// the production location (a voided produce, a consume confirmed after the order was done).
#[derive(Debug, Clone, PartialEq)]
struct ReversalLine {
    /// The product's code; `None`: the production order's own product.
    code: Option<String>,
    lot: Option<String>,
    quantity: Decimal,
    to_storage: bool,
    /// Whether it corrects the order's output (else its input) moves: the move it names as its
    /// origin (and takes unit and cost from) is on that side.
    corrects_output: bool,
    /// Whether the lot may be new (produced late): it is created then.
    new_lot_ok: bool,
}

/// The corrections that book a confirmation of an order that is `done` already (a follow-up,
/// or a second confirmation after a void and redo): produced lots into storage, consumed lots
/// out of it. Scrap is not posted (as for any confirmation).
fn confirmation_lines(c: &Confirmation) -> Vec<ReversalLine> {
    // A produced line goes into storage and corrects the order's output (its lot may be new);
    // a consumed one comes out of storage.
    let line = |code: Option<String>, lot: Option<String>, quantity: Decimal, produced: bool| {
        ReversalLine {
            code,
            lot,
            quantity,
            to_storage: produced,
            corrects_output: produced,
            new_lot_ok: produced,
        }
    };
    let of_lots = |lots: &[crate::domain::LotQuantity], produced: bool| {
        lots.iter()
            .filter(|l| l.quantity > Decimal::ZERO)
            .map(|l| {
                let lot = (!l.lot.is_empty()).then(|| l.lot.clone());
                line(Some(l.material.clone()), lot, l.quantity, produced)
            })
            .collect::<Vec<_>>()
    };
    let mut lines = of_lots(&c.produced_lots, true);
    if c.produced_lots.is_empty() && c.good_quantity > Decimal::ZERO {
        // Produced without a lot: the order's own product.
        lines.push(line(None, None, c.good_quantity, true));
    }
    lines.extend(of_lots(&c.consumed_lots, false));
    lines
}

/// The moves a reversal books in Tryton, or why it cannot be posted (booked by hand).
fn reversal_lines(r: &Reversal) -> Result<Vec<ReversalLine>, String> {
    if !r.scrapped_lots.is_empty() || !r.scrap_quantity.is_zero() {
        return Err("scrap is not posted to tryton (base production has no scrap moves)".into());
    }
    let mut lines = Vec::new();
    for (lots, to_storage) in [(&r.consumed_lots, true), (&r.produced_lots, false)] {
        for l in lots {
            if l.quantity >= Decimal::ZERO {
                return Err(format!(
                    "a reversal takes quantities back, not {} of lot {}",
                    l.quantity, l.lot
                ));
            }
            lines.push(ReversalLine {
                code: Some(l.material.clone()),
                lot: (!l.lot.is_empty()).then(|| l.lot.clone()),
                quantity: -l.quantity,
                to_storage,
                corrects_output: !to_storage,
                new_lot_ok: false,
            });
        }
    }
    if r.produced_lots.is_empty() && r.good_quantity < Decimal::ZERO {
        // Produced without a lot: the order's own product.
        lines.push(ReversalLine {
            code: None,
            lot: None,
            quantity: -r.good_quantity,
            to_storage: false,
            corrects_output: true,
            new_lot_ok: false,
        });
    }
    if lines.is_empty() {
        return Err("the reversal has no quantity to take back".into());
    }
    Ok(lines)
}

/// Why a reversal cannot be posted: `Ok(Err(reason))` is for the dead letters (by hand),
/// `Err` is a Tryton failure mapped as usual.
type Postable<T> = Result<Result<T, String>, AdapterError>;

impl TrytonAdapter {
    /// Whether the production order `id` carries the confirmation key `key` (an `ir.note`).
    async fn production_keyed(
        &self,
        id: i64,
        key: &str,
        ctx: &Value,
    ) -> Result<bool, AdapterError> {
        let notes = self
            .search_read(
                "ir.note",
                json!([
                    ["message", "=", key],
                    ["resource", "=", format!("production,{id}")]
                ]),
                &["id"],
                ctx.clone(),
            )
            .await?;
        Ok(!notes.is_empty())
    }

    /// Books a confirmation of a `done` order as keyed corrections (see [`Self::post_corrections`]).
    async fn post_confirmation_corrections(
        &self,
        c: &Confirmation,
        key: &str,
    ) -> Result<Posted, AdapterError> {
        let lines = confirmation_lines(c);
        if lines.is_empty() {
            tracing::info!(
                idempotency_key = key,
                "nothing in the confirmation that tryton books (scrap is not posted)"
            );
            return Ok(Posted::New);
        }
        match self.post_corrections(&c.work_order, &lines, key).await? {
            Ok(posted) => {
                metrics::counter!("erp_confirmation_corrections_posted_total", "adapter" => "tryton")
                    .increment(1);
                tracing::info!(idempotency_key = key, ?posted, follows = ?c.follows,
                    "tryton: confirmation of a done order booked as corrections");
                Ok(posted)
            }
            Err(why) => Err(AdapterError::Rejected(format!(
                "confirmation {key} of production order {} must be booked in Tryton by hand: {why}; \
                 produced {:?}, consumed {:?}",
                c.work_order, c.produced_lots, c.consumed_lots
            ))),
        }
    }

    /// Posts a reversal as done stock moves, one `ir.note` carrying the idempotency key on each.
    async fn post_reversal_moves(&self, r: &Reversal, key: &str) -> Postable<Posted> {
        let lines = match reversal_lines(r) {
            Ok(l) => l,
            Err(why) => return Ok(Err(why)),
        };
        self.post_corrections(&r.work_order, &lines, key).await
    }

    /// Books `lines` next to the `done` production order `work_order`, each keyed by `key`
    /// (`key#n` when there are several): a move into storage is a lone done move with an
    /// `ir.note` carrying the key, a move out of storage the input of a correction production
    /// whose reference carries it. Posted before: `AlreadyThere`.
    async fn post_corrections(
        &self,
        work_order: &str,
        lines: &[ReversalLine],
        key: &str,
    ) -> Postable<Posted> {
        let (ctx, _) = self.ctx().await?;
        let production = match self.production(work_order, &ctx).await {
            Ok(p) => p,
            Err(AdapterError::Rejected(why)) => return Ok(Err(why)),
            Err(e) => return Err(e),
        };
        let pid = id_of(&production)?;
        let state = production
            .get("state")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if state != "done" {
            return Ok(Err(format!(
                "production order {work_order} is {state} in tryton, not done"
            )));
        }
        let location = production.get("location").and_then(Value::as_i64);
        let storage = production
            .get("warehouse.")
            .and_then(|w| w.get("storage_location"))
            .and_then(Value::as_i64);
        let (Some(location), Some(storage)) = (location, storage) else {
            return Ok(Err(format!(
                "production order {work_order} has no production or storage location"
            )));
        };
        let mut posted = Posted::AlreadyThere;
        for (i, line) in lines.iter().enumerate() {
            let note_key = if lines.len() == 1 {
                key.to_owned()
            } else {
                format!("{key}#{}", i + 1)
            };
            let (from, to) = if line.to_storage {
                (location, storage)
            } else {
                (storage, location)
            };
            let done = if line.to_storage {
                self.post_reversal_line(&production, pid, line, from, to, &note_key, &ctx)
                    .await?
            } else {
                self.post_correction_production(&production, pid, line, &note_key, &ctx)
                    .await?
            };
            match done {
                Ok(Posted::New) => posted = Posted::New,
                Ok(Posted::AlreadyThere) => {}
                Err(why) => return Ok(Err(why)),
            }
        }
        Ok(Ok(posted))
    }

    /// The move that carries `note_key` (an `ir.note` on it), if any.
    async fn keyed_move(&self, note_key: &str, ctx: &Value) -> Result<Option<i64>, AdapterError> {
        let notes = self
            .search_read(
                "ir.note",
                json!([
                    ["message", "=", note_key],
                    ["resource", "like", "stock.move,%"]
                ]),
                &["resource"],
                ctx.clone(),
            )
            .await?;
        Ok(notes
            .iter()
            .filter_map(|n| n.get("resource").and_then(Value::as_str))
            .find_map(|r| r.strip_prefix("stock.move,")?.parse::<i64>().ok()))
    }

    async fn move_state(&self, id: i64, ctx: &Value) -> Result<Option<String>, AdapterError> {
        let v = self
            .call("model.stock.move.read", json!([[id], ["state"], ctx]))
            .await?;
        Ok(v.get(0)
            .and_then(|m| m.get("state"))
            .and_then(Value::as_str)
            .map(str::to_owned))
    }

    #[allow(clippy::too_many_arguments)]
    async fn post_reversal_line(
        &self,
        production: &Value,
        pid: i64,
        line: &ReversalLine,
        from: i64,
        to: i64,
        note_key: &str,
        ctx: &Value,
    ) -> Postable<Posted> {
        // Posted before (perhaps not done yet: erp-sync stopped between the steps)?
        if let Some(id) = self.keyed_move(note_key, ctx).await? {
            return match self.move_state(id, ctx).await?.as_deref() {
                Some("done") => Ok(Ok(Posted::AlreadyThere)),
                Some("draft" | "assigned" | "staging") => {
                    self.call("model.stock.move.do", json!([[id], ctx])).await?;
                    Ok(Ok(Posted::New))
                }
                other => Ok(Err(format!(
                    "the reversal's stock move {id} is {} in tryton",
                    other.unwrap_or("gone")
                ))),
            };
        }
        let (product, lot, original) =
            match self.reversal_target(production, pid, line, ctx).await? {
                Ok(t) => t,
                Err(why) => return Ok(Err(why)),
            };
        let original = &original;
        let original_id = id_of(original)?;
        let origin = format!("stock.move,{original_id}");
        let quantity = line.quantity.to_f64().unwrap_or(0.0);
        let mut vals = json!({
            "product": product,
            "lot": lot,
            "quantity": quantity,
            "from_location": from,
            "to_location": to,
            "origin": origin,
        });
        for f in ["unit", "company"] {
            if let Some(v) = original.get(f).filter(|v| !v.is_null()) {
                vals[f] = v.clone();
            }
        }
        if line.to_storage {
            // From production into storage Tryton wants a price: the cost it left at.
            let price = ["cost_price", "unit_price"]
                .iter()
                .find_map(|f| original.get(*f).and_then(decimal))
                .unwrap_or_default();
            let currency = match original.get("currency").and_then(Value::as_i64) {
                Some(c) => Some(c),
                None => self.company_currency(original, ctx).await?,
            };
            vals["unit_price"] = json!({"__class__": "Decimal", "decimal": price.to_string()});
            vals["currency"] = json!(currency);
        }
        // A move created by an attempt that stopped before its note: adopt it.
        let id = match self.orphan_move(&vals, ctx).await? {
            Some(id) => id,
            None => self.create("stock.move", vals, ctx).await?,
        };
        self.create(
            "ir.note",
            json!({"resource": format!("stock.move,{id}"), "message": note_key}),
            ctx,
        )
        .await?;
        self.call("model.stock.move.do", json!([[id], ctx])).await?;
        Ok(Ok(Posted::New))
    }

    /// A voided produce: Tryton takes stock out of storage only through an assignment, which
    /// its API offers on documents (shipments, productions), not on a lone move. So the lot goes
    /// back to the production location as the input of a correction production (no product, no
    /// outputs) whose `reference` carries the key, created with its move in one call and then
    /// run through `wait`, `assign_try`/`assign_force`, `run`, `do` (each step checks the state,
    /// so a retry finishes what a stopped attempt began).
    async fn post_correction_production(
        &self,
        production: &Value,
        pid: i64,
        line: &ReversalLine,
        note_key: &str,
        ctx: &Value,
    ) -> Postable<Posted> {
        let reference = format!("{CORRECTION_PREFIX}{note_key}");
        let found = self
            .search_read(
                "production",
                json!([["reference", "=", reference]]),
                &["state"],
                ctx.clone(),
            )
            .await?;
        let (id, mut state) = match found.first() {
            Some(p) => (
                id_of(p)?,
                p.get("state")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            ),
            None => {
                let (product, lot, original) =
                    match self.reversal_target(production, pid, line, ctx).await? {
                        Ok(t) => t,
                        Err(why) => return Ok(Err(why)),
                    };
                let location = production.get("location").cloned().unwrap_or(Value::Null);
                let storage = production
                    .get("warehouse.")
                    .and_then(|w| w.get("storage_location"))
                    .cloned()
                    .unwrap_or(Value::Null);
                let mut input = json!({
                    "product": product,
                    "lot": lot,
                    "quantity": line.quantity.to_f64().unwrap_or(0.0),
                    "from_location": storage,
                    "to_location": location,
                    "origin": format!("stock.move,{}", id_of(&original)?),
                });
                for f in ["unit", "company"] {
                    if let Some(v) = original.get(f).filter(|v| !v.is_null()) {
                        input[f] = v.clone();
                    }
                }
                let mut vals = json!({
                    "reference": reference,
                    "location": location,
                    "warehouse": production.get("warehouse").cloned().unwrap_or(Value::Null),
                    "inputs": [["create", [input]]],
                });
                if let Some(c) = production.get("company").filter(|c| !c.is_null()) {
                    vals["company"] = c.clone();
                }
                (self.create("production", vals, ctx).await?, "draft".into())
            }
        };
        match state.as_str() {
            "done" if !found.is_empty() => return Ok(Ok(Posted::AlreadyThere)),
            "cancelled" => {
                return Ok(Err(format!(
                    "the correction production {reference:?} is cancelled in tryton"
                )));
            }
            "request" | "draft" => {
                self.button("production", "wait", id, ctx).await?;
                state = "waiting".into();
            }
            _ => {}
        }
        if state == "waiting" {
            self.button("production", "assign_try", id, ctx).await?;
            state = self.state(id, ctx).await?;
            if state != "assigned" {
                self.button("production", "assign_force", id, ctx).await?;
                state = "assigned".into();
            }
        }
        if state == "assigned" {
            self.button("production", "run", id, ctx).await?;
            state = "running".into();
        }
        if state == "running" {
            self.button("production", "do", id, ctx).await?;
        }
        Ok(Ok(Posted::New))
    }

    /// The product and lot a reversal line takes back, and the production's own move of them
    /// (its unit and cost, and the reversal's origin: the move it corrects).
    async fn reversal_target(
        &self,
        production: &Value,
        pid: i64,
        line: &ReversalLine,
        ctx: &Value,
    ) -> Postable<(i64, Option<i64>, Value)> {
        let product = match &line.code {
            Some(code) => match self.product_id(code, ctx).await {
                Ok(p) => p,
                Err(AdapterError::Rejected(why)) => return Ok(Err(why)),
                Err(e) => return Err(e),
            },
            None => match production.get("product").and_then(Value::as_i64) {
                Some(p) => p,
                None => return Ok(Err("the production order has no product".into())),
            },
        };
        let lot = match &line.lot {
            Some(number) if line.new_lot_ok => Some(self.lot_id(number, product, ctx).await?),
            Some(number) => {
                let found = self
                    .search_read(
                        "stock.lot",
                        json!([["number", "=", number], ["product", "=", product]]),
                        &["number"],
                        ctx.clone(),
                    )
                    .await?;
                match found
                    .first()
                    .and_then(|l| l.get("id"))
                    .and_then(Value::as_i64)
                {
                    Some(id) => Some(id),
                    None => return Ok(Err(format!("tryton has no lot {number:?}"))),
                }
            }
            None => None,
        };
        // The production's own move of that product (and lot, unless the lot is new): its
        // unit and cost, and the correction's origin (the move it corrects).
        let side = if line.corrects_output {
            "production_output"
        } else {
            "production_input"
        };
        let fields = ["unit", "cost_price", "unit_price", "currency", "company"];
        let mut originals = Vec::new();
        if let (Some(l), false) = (lot, line.new_lot_ok) {
            originals = self
                .search_read(
                    "stock.move",
                    json!([[side, "=", pid], ["product", "=", product], ["lot", "=", l]]),
                    &fields,
                    ctx.clone(),
                )
                .await?;
        }
        if originals.is_empty() {
            // A new lot, or one the order got in a correction (a late scan, then voided): the
            // order's move of that product.
            originals = self
                .search_read(
                    "stock.move",
                    json!([[side, "=", pid], ["product", "=", product]]),
                    &fields,
                    ctx.clone(),
                )
                .await?;
        }
        let Some(original) = originals.first() else {
            return Ok(Err(format!(
                "production order has no {} move of that product to correct",
                if line.corrects_output {
                    "output"
                } else {
                    "input"
                }
            )));
        };
        Ok(Ok((product, lot, original.clone())))
    }

    async fn company_currency(
        &self,
        original: &Value,
        ctx: &Value,
    ) -> Result<Option<i64>, AdapterError> {
        let Some(company) = original.get("company").and_then(Value::as_i64) else {
            return Ok(None);
        };
        let v = self
            .call(
                "model.company.company.read",
                json!([[company], ["currency"], ctx]),
            )
            .await?;
        Ok(v.get(0)
            .and_then(|c| c.get("currency"))
            .and_then(Value::as_i64))
    }

    /// A draft move exactly like `vals` that no note claims.
    async fn orphan_move(&self, vals: &Value, ctx: &Value) -> Result<Option<i64>, AdapterError> {
        let mut domain = vec![json!(["state", "=", "draft"])];
        for f in [
            "product",
            "lot",
            "from_location",
            "to_location",
            "origin",
            "quantity",
        ] {
            domain.push(json!([f, "=", vals.get(f).cloned().unwrap_or(Value::Null)]));
        }
        let candidates = self
            .search_read("stock.move", Value::Array(domain), &["id"], ctx.clone())
            .await?;
        for c in &candidates {
            let id = id_of(c)?;
            let notes = self
                .search_read(
                    "ir.note",
                    json!([["resource", "=", format!("stock.move,{id}")]]),
                    &["id"],
                    ctx.clone(),
                )
                .await?;
            if notes.is_empty() {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }
}

/// Why a reversal is refused, with what the operator must book in Tryton.
fn manual_reversal(r: &Reversal, key: &str, why: &str) -> String {
    let lots = |what: &str, lots: &[crate::domain::LotQuantity]| {
        lots.iter()
            .map(|l| format!("{what} {} {} of lot {}", l.quantity, l.material, l.lot))
            .collect::<Vec<_>>()
    };
    let mut changes = lots("produced", &r.produced_lots);
    changes.extend(lots("consumed", &r.consumed_lots));
    changes.extend(lots("scrapped", &r.scrapped_lots));
    format!(
        "reversal of {} must be booked in Tryton by hand: {why}; production order {}: {} \
         (voided scan {}, {key}, by {}: {})",
        r.reverses,
        r.work_order,
        changes.join(", "),
        r.voided_scan,
        r.voided_by,
        r.reason
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reversal_of(kind: crate::domain::ProductionKind, lot: &str, material: &str) -> Reversal {
        let void = crate::domain::VoidOf {
            work_order: "MO/0001".into(),
            operation: 10,
            station: "ST-10".into(),
            reverses: "MO/0001:10:c1".into(),
            voided_scan: "s1".into(),
            void_scan: "v1".into(),
            voided_at: Utc::now(),
            voided_by: "sup1".into(),
            reason: "wrong lot".into(),
        };
        let line = crate::domain::ProductionLine {
            kind,
            lot: lot.into(),
            material: material.into(),
            quantity: "25".parse().unwrap(),
        };
        crate::domain::build_reversal(&void, &line)
    }

    #[test]
    fn reversals_become_moves_back_and_scrap_is_booked_by_hand() {
        use crate::domain::ProductionKind;
        let consume = reversal_lines(&reversal_of(ProductionKind::Consume, "L1", "STL")).unwrap();
        assert_eq!(
            consume,
            vec![ReversalLine {
                code: Some("STL".into()),
                lot: Some("L1".into()),
                quantity: Decimal::from(25),
                to_storage: true,
                corrects_output: false,
                new_lot_ok: false,
            }]
        );
        let produce = reversal_lines(&reversal_of(ProductionKind::Produce, "W1", "WID")).unwrap();
        assert_eq!(produce.len(), 1);
        assert!(!produce[0].to_storage);
        assert_eq!(produce[0].quantity, Decimal::from(25));
        let mut no_lot = reversal_of(ProductionKind::Produce, "", "WID");
        no_lot.produced_lots.clear();
        let lines = reversal_lines(&no_lot).unwrap();
        assert_eq!(lines[0].code, None);
        assert!(!lines[0].to_storage);
        let scrap = reversal_lines(&reversal_of(ProductionKind::Scrap, "W1", "WID"));
        assert!(scrap.unwrap_err().contains("scrap"));
    }

    #[test]
    fn a_reversal_that_cannot_be_posted_says_what_to_book_by_hand() {
        let r = reversal_of(
            crate::domain::ProductionKind::Consume,
            "STEEL-L1",
            "STEEL-500",
        );
        let why = manual_reversal(
            &r,
            &r.idempotency_key(),
            "production order MO/0001 is running",
        );
        assert!(
            why.starts_with("reversal of MO/0001:10:c1 must be booked in Tryton by hand: "),
            "{why}"
        );
        assert!(
            why.contains("consumed -25 STEEL-500 of lot STEEL-L1"),
            "{why}"
        );
        assert!(why.contains("reversal:v1"), "{why}");
        let e = AdapterError::Rejected(why);
        assert!(!e.is_transient());
    }

    #[test]
    fn tagged_values_decode() {
        assert_eq!(
            decimal(&json!({"__class__": "Decimal", "decimal": "2.50"}))
                .unwrap()
                .to_string(),
            "2.50"
        );
        assert_eq!(decimal(&json!(10.0)).unwrap().normalize().to_string(), "10");
        assert_eq!(decimal(&json!(0.1)).unwrap().normalize().to_string(), "0.1");
        assert!(decimal(&json!("x")).is_none());
        let t = datetime(
            &json!({"__class__": "datetime", "year": 2026, "month": 11, "day": 25,
            "hour": 11, "minute": 37, "second": 27, "microsecond": 33161}),
        )
        .unwrap();
        assert_eq!(t.to_string(), "2026-11-25 11:37:27.033161");
        assert_eq!(datetime(&tagged_datetime(t)), Some(t));
        assert!(datetime(&json!({"__class__": "datetime", "year": 2026, "month": 13})).is_none());
    }

    #[test]
    fn base64_matches_the_rfc_examples() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
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
    fn gzip_is_read_by_its_bytes_not_its_label() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(b"{\"result\": 1}").unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(decode_body(&gz, true).unwrap(), b"{\"result\": 1}");
        assert_eq!(decode_body(b"{}", true).unwrap(), b"{}");
        assert!(decode_body(&gz[..gz.len() - 4], true).is_err());
    }

    #[test]
    fn a_production_order_becomes_a_work_order() {
        let row = json!({"id": 1, "number": "1", "state": "waiting", "quantity": 10.0,
            "product.": {"id": 1, "code": "WID"},
            "inputs.": [{"quantity": 20.0, "product.": {"code": "STL"}}],
            "bom.": {"id": 1, "inputs.": [{"quantity": 2.0, "product.": {"code": "STL"}},
                                          {"quantity": 4.0, "product.": {"code": "BLT"}}],
                     "outputs.": [{"quantity": 1.0, "product.": {"code": "WID"}}]}});
        let c = contract::work_order(&work_order_json(&row, "ST").unwrap(), 0);
        assert!(c.drifts.is_empty(), "{:?}", c.drifts);
        let wo = c.record.unwrap();
        assert_eq!(wo.components.len(), 2);
        assert_eq!(wo.components[0].material, "BLT");
        assert_eq!(wo.components[0].quantity_per_unit, Decimal::from(4));
        assert_eq!(wo.operations[0].station, "ST");
        // Without a BOM: the planned inputs per ordered unit.
        let mut no_bom = row.clone();
        no_bom["bom."] = Value::Null;
        let wo = contract::work_order(&work_order_json(&no_bom, "ST").unwrap(), 0)
            .record
            .unwrap();
        assert_eq!(wo.components[0].quantity_per_unit, Decimal::from(2));
        // Drafts are not released; a product without a code is a dead letter.
        let mut draft = row.clone();
        draft["state"] = json!("draft");
        assert!(work_order_json(&draft, "ST").is_none());
        let mut nocode = row;
        nocode["product."] = json!({"id": 1, "code": null});
        assert!(
            contract::work_order(&work_order_json(&nocode, "ST").unwrap(), 0)
                .record
                .is_none()
        );
    }
}
