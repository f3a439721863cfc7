//! A real Tryton 8.2 for the tests: installed from PyPI into a venv under a cache directory
//! (`$CARGO_TARGET_DIR/tryton-cache`, else `target/tryton-cache`), one initialised SQLite
//! database cached as a template, and per test a copy of it served by `trytond` on a loopback
//! port. The first run takes about a minute (install + `trytond-admin`); later runs start a
//! server in a few seconds. Needs only `python3` with `venv` and access to PyPI.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const PINS: [&str; 3] = [
    "trytond==8.2.1",
    "trytond-production==8.2.0",
    "trytond-stock-lot==8.2.0",
];
pub const DATABASE: &str = "mes";
pub const PASSWORD: &str = "admin-test-pass";

fn cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("tryton-cache")
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn write_conf(path: &Path, db_dir: &Path, port: u16) -> Result<(), String> {
    std::fs::write(
        path,
        format!(
            "[database]\nuri = sqlite://\npath = {}\n[web]\nlisten = 127.0.0.1:{port}\n[session]\ntimeout = 3600\n",
            db_dir.display()
        ),
    )
    .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The venv and the template database, made once (under a file lock: parallel test binaries
/// wait for each other).
fn prepare() -> Result<(PathBuf, PathBuf), String> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).map_err(|e| format!("cache dir: {e}"))?;
    let lock = File::create(cache.join("lock")).map_err(|e| format!("lock file: {e}"))?;
    lock.lock().map_err(|e| format!("lock: {e}"))?;
    let venv = cache.join("venv-8.2");
    if !venv.join(".complete").exists() {
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(&venv);
        run(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            "python3 -m venv",
        )?;
        run(
            Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "--disable-pip-version-check"])
                .args(["--timeout", "60", "--retries", "3"])
                .args(PINS),
            "pip install trytond",
        )?;
        File::create(venv.join(".complete")).map_err(|e| e.to_string())?;
        eprintln!("tryton installed in {:?}", started.elapsed());
    }
    let template = cache.join("template-8.2");
    let template_db = template.join(format!("{DATABASE}.sqlite"));
    if !template.join(".complete").exists() {
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(&template);
        let db_dir = template.join("db");
        std::fs::create_dir_all(&db_dir).map_err(|e| e.to_string())?;
        File::create(db_dir.join(format!("{DATABASE}.sqlite"))).map_err(|e| e.to_string())?;
        let conf = template.join("trytond.conf");
        write_conf(&conf, &db_dir, 0)?;
        let passfile = template.join("passfile");
        std::fs::write(&passfile, format!("{PASSWORD}\n")).map_err(|e| e.to_string())?;
        run(
            Command::new(venv.join("bin/trytond-admin"))
                .env("TRYTONPASSFILE", &passfile)
                .arg("-c")
                .arg(&conf)
                .args(["-d", DATABASE, "--all", "-u", "production", "stock_lot"])
                .args(["--activate-dependencies", "--email", "admin@example.com"]),
            "trytond-admin",
        )?;
        std::fs::copy(db_dir.join(format!("{DATABASE}.sqlite")), &template_db)
            .map_err(|e| e.to_string())?;
        File::create(template.join(".complete")).map_err(|e| e.to_string())?;
        eprintln!("tryton database initialised in {:?}", started.elapsed());
    }
    let _ = lock.unlock();
    Ok((venv, template_db))
}

/// A running trytond on a copy of the template database; stopped when dropped.
pub struct Tryton {
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
    auth: String,
    pub company: i64,
    /// Ids of what [`Tryton::seed`] created.
    refs: Value,
}

impl Drop for Tryton {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tryton {
    /// Installs (once), copies the template, starts the server and logs in as admin.
    pub async fn start() -> Self {
        let (venv, template_db) = tokio::task::spawn_blocking(prepare)
            .await
            .expect("prepare task")
            .unwrap_or_else(|e| panic!("cannot prepare tryton: {e}"));
        let dir = tempfile::tempdir().expect("temp dir");
        let db_dir = dir.path().join("db");
        std::fs::create_dir_all(&db_dir).unwrap();
        std::fs::copy(&template_db, db_dir.join(format!("{DATABASE}.sqlite"))).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let conf = dir.path().join("trytond.conf");
        write_conf(&conf, &db_dir, port).unwrap();
        let log = File::create(dir.path().join("trytond.log")).unwrap();
        let child = Command::new(venv.join("bin/trytond"))
            .arg("-c")
            .arg(&conf)
            .args(["-d", DATABASE])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("trytond starts");
        let mut t = Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
            http: reqwest::Client::new(),
            auth: String::new(),
            company: 0,
            refs: Value::Null,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = t
                .http
                .post(format!("{}/rpc/", t.url))
                .json(&json!({"id": 0, "method": "common.server.version", "params": []}))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                break;
            }
            if let Ok(Some(status)) = t.child.try_wait() {
                let log =
                    std::fs::read_to_string(t._dir.path().join("trytond.log")).unwrap_or_default();
                panic!("trytond exited ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "trytond did not answer in 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        t.login().await;
        t
    }

    /// A JSON-RPC call as admin; panics on errors (test set-up).
    pub async fn rpc(&self, method: &str, params: Value) -> Value {
        let mut req = self
            .http
            .post(format!("{}/{DATABASE}/rpc/", self.url))
            .json(&json!({"id": 1, "method": method, "params": params}));
        if !self.auth.is_empty() {
            req = req.header("Authorization", &self.auth);
        }
        let resp = req.send().await.expect("tryton answers");
        let status = resp.status();
        let body = resp.bytes().await.expect("body");
        let doc: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("{method}: {status} {}", String::from_utf8_lossy(&body)));
        if let Some(e) = doc.get("error") {
            panic!("{method} failed: {e}");
        }
        doc["result"].clone()
    }

    /// Ends every session on the server (as an idle timeout would), then logs the harness in
    /// again: the adapter's next call meets a 401.
    pub async fn expire_sessions(&mut self) {
        let db = self
            ._dir
            .path()
            .join("db")
            .join(format!("{DATABASE}.sqlite"));
        let python = cache_dir().join("venv-8.2/bin/python");
        let script = "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nc.execute('DELETE FROM ir_session')\nc.commit()\n";
        run(
            Command::new(python).arg("-c").arg(script).arg(&db),
            "delete tryton sessions",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        self.auth.clear();
        self.login().await;
    }

    async fn login(&mut self) {
        let login = self
            .rpc(
                "common.db.login",
                json!(["admin", {"password": PASSWORD}, "en"]),
            )
            .await;
        let uid = login[0].as_i64().expect("uid");
        let token = login[1].as_str().expect("token");
        self.auth = format!("Session {}", b64(format!("admin:{uid}:{token}").as_bytes()));
    }

    fn ctx(&self) -> Value {
        json!({"company": self.company})
    }

    /// A company for admin, two products (a producible lot-tracked widget and a lot-tracked
    /// steel plate), a received steel lot of 100 in storage, a BOM (1 widget = 2 plates) and a
    /// waiting production order of 10 widgets. Returns the order's number.
    pub async fn seed(&mut self) -> String {
        let d = |s: &str| json!({"__class__": "Decimal", "decimal": s});
        let cur = self
            .rpc(
                "model.currency.currency.create",
                json!([[{"name": "Euro", "code": "EUR", "symbol": "EUR", "rounding": d("0.01"), "digits": 2}], {}]),
            )
            .await[0]
            .clone();
        let party = self
            .rpc(
                "model.party.party.create",
                json!([[{"name": "ACME Manufacturing"}], {}]),
            )
            .await[0]
            .clone();
        let co = self
            .rpc(
                "model.company.company.create",
                json!([[{"party": party, "currency": cur}], {}]),
            )
            .await[0]
            .clone();
        self.rpc(
            "model.res.user.write",
            json!([[1], {"companies": [["add", [co]]], "company": co}, {}]),
        )
        .await;
        self.company = co.as_i64().unwrap();
        let ctx = self.ctx();
        let unit = self
            .rpc(
                "model.product.uom.search",
                json!([[["symbol", "=", "u"]], 0, 1, null, ctx]),
            )
            .await[0]
            .clone();
        let wh = self
            .rpc(
                "model.stock.location.search_read",
                json!([
                    [["type", "=", "warehouse"]],
                    0,
                    1,
                    null,
                    ["storage_location", "production_location"],
                    ctx
                ]),
            )
            .await[0]
            .clone();
        let supplier = self
            .rpc(
                "model.stock.location.search",
                json!([[["type", "=", "supplier"]], 0, 1, null, ctx]),
            )
            .await[0]
            .clone();
        let (storage, production) = (
            wh["storage_location"].clone(),
            wh["production_location"].clone(),
        );
        let mut products = Vec::new();
        for (name, code, producible) in [("Widget", "WID", true), ("Steel plate", "STL", false)] {
            let t = self
                .rpc(
                    "model.product.template.create",
                    json!([[{"name": name, "code": code, "type": "goods", "default_uom": unit,
                             "list_price": d("10"), "producible": producible,
                             "lot_required": ["storage"], "products": [["create", [{}]]]}], ctx]),
                )
                .await[0]
                .clone();
            products.push(
                self.rpc(
                    "model.product.product.search",
                    json!([[["template", "=", t]], 0, 1, null, ctx]),
                )
                .await[0]
                    .clone(),
            );
        }
        let (widget, steel) = (products[0].clone(), products[1].clone());
        let lot = self
            .rpc(
                "model.stock.lot.create",
                json!([[{"number": "STL-L1", "product": steel}], ctx]),
            )
            .await[0]
            .clone();
        let receipt = self
            .rpc(
                "model.stock.move.create",
                json!([[{"product": steel, "lot": lot, "quantity": 100.0, "from_location": supplier,
                         "to_location": storage, "unit": unit, "company": co,
                         "unit_price": d("5"), "currency": cur}], ctx]),
            )
            .await[0]
            .clone();
        self.rpc("model.stock.move.do", json!([[receipt], ctx]))
            .await;
        let bom = self
            .rpc(
                "model.production.bom.create",
                json!([[{"name": "Widget BOM",
                         "inputs": [["create", [{"product": steel, "quantity": 2.0, "unit": unit}]]],
                         "outputs": [["create", [{"product": widget, "quantity": 1.0, "unit": unit}]]]}], ctx]),
            )
            .await[0]
            .clone();
        self.refs = json!({"co": co, "cur": cur, "unit": unit, "warehouse": wh["id"],
            "storage": storage, "production": production, "widget": widget, "steel": steel,
            "bom": bom, "steel_lot": lot});
        self.create_order().await
    }

    /// A waiting production order of 10 widgets from 20 plates; returns its number.
    pub async fn create_order(&self) -> String {
        let r = &self.refs;
        let ctx = self.ctx();
        let d = |s: &str| json!({"__class__": "Decimal", "decimal": s});
        let order = self
            .rpc(
                "model.production.create",
                json!([[{"company": r["co"], "warehouse": r["warehouse"], "location": r["production"],
                         "product": r["widget"], "bom": r["bom"], "unit": r["unit"], "quantity": 10.0,
                         "reference": "MES-TEST",
                         "inputs": [["create", [{"product": r["steel"], "quantity": 20.0,
                             "from_location": r["storage"], "to_location": r["production"],
                             "unit": r["unit"], "company": r["co"]}]]],
                         "outputs": [["create", [{"product": r["widget"], "quantity": 10.0,
                             "from_location": r["production"], "to_location": r["storage"],
                             "unit": r["unit"], "company": r["co"], "unit_price": d("0"),
                             "currency": r["cur"]}]]]}],
                       ctx]),
            )
            .await[0]
            .clone();
        self.rpc("model.production.wait", json!([[order], ctx]))
            .await;
        let read = self
            .rpc("model.production.read", json!([[order], ["number"], ctx]))
            .await;
        read[0]["number"].as_str().expect("number").to_owned()
    }

    /// Plays the first half of a confirmation by hand, as an erp-sync that crashed after `run`
    /// would leave it: `consumed` plates of the steel lot on the input, the order running.
    pub async fn run_half_way(&self, number: &str, consumed: f64) {
        let ctx = self.ctx();
        let p = self
            .rpc(
                "model.production.search_read",
                json!([[["number", "=", number]], 0, 1, null, ["inputs"], ctx]),
            )
            .await[0]
            .clone();
        let input = p["inputs"][0].clone();
        self.rpc(
            "model.stock.move.write",
            json!([[input], {"quantity": consumed, "lot": self.refs["steel_lot"]}, ctx]),
        )
        .await;
        for button in ["assign_force", "run"] {
            self.rpc(
                &format!("model.production.{button}"),
                json!([[p["id"]], ctx]),
            )
            .await;
        }
    }

    /// The warehouse's storage location (where [`Tryton::seed`] received the steel lot).
    pub fn storage(&self) -> i64 {
        self.refs["storage"].as_i64().expect("seeded")
    }

    /// A lot's quantity in the storage location (Tryton counts lot quantities per location
    /// context).
    pub async fn lot_quantity_in_storage(&self, number: &str) -> f64 {
        let mut ctx = self.ctx();
        ctx["locations"] = json!([self.storage()]);
        let lots = self
            .rpc(
                "model.stock.lot.search_read",
                json!([[["number", "=", number]], 0, 1, null, ["quantity"], ctx]),
            )
            .await;
        lots[0]["quantity"].as_f64().expect("lot quantity")
    }

    /// The stock moves that carry `key` in an `ir.note` (how the adapter marks reversals),
    /// with their state, quantity, lot and locations.
    pub async fn moves_with_note(&self, key: &str) -> Vec<Value> {
        let ctx = self.ctx();
        let notes = self
            .rpc(
                "model.ir.note.search_read",
                json!([[["message", "=", key]], 0, null, null, ["resource"], ctx]),
            )
            .await;
        let mut moves = Vec::new();
        for n in notes.as_array().expect("notes") {
            let id: i64 = n["resource"]
                .as_str()
                .and_then(|r| r.strip_prefix("stock.move,"))
                .and_then(|i| i.parse().ok())
                .unwrap_or_else(|| panic!("a note on a stock move: {n}"));
            let m = self
                .rpc(
                    "model.stock.move.read",
                    json!([
                        [id],
                        [
                            "state",
                            "quantity",
                            "lot.number",
                            "from_location",
                            "to_location",
                            "origin"
                        ],
                        ctx
                    ]),
                )
                .await;
            moves.push(m[0].clone());
        }
        moves
    }

    /// The productions whose `reference` is `reference` (how the adapter books reversed
    /// produce scans), with their state and input moves.
    pub async fn productions_with_reference(&self, reference: &str) -> Vec<Value> {
        let found = self
            .rpc(
                "model.production.search_read",
                json!([
                    [["reference", "=", reference]],
                    0,
                    null,
                    null,
                    [
                        "state",
                        "product",
                        "inputs.state",
                        "inputs.quantity",
                        "inputs.lot.number",
                        "inputs.from_location",
                        "inputs.to_location",
                        "outputs"
                    ],
                    self.ctx()
                ]),
            )
            .await;
        found.as_array().expect("productions").clone()
    }

    /// What an erp-sync stopped half-way through a reversal leaves in Tryton: a draft move of
    /// `quantity` steel plates (lot STL-L1) from the production location back to storage,
    /// carrying `key` in an `ir.note`, not done yet.
    pub async fn half_posted_reversal(&self, key: &str, quantity: f64) {
        let r = &self.refs;
        let ctx = self.ctx();
        let d = |s: &str| json!({"__class__": "Decimal", "decimal": s});
        let m = self
            .rpc(
                "model.stock.move.create",
                json!([[{"product": r["steel"], "lot": r["steel_lot"], "quantity": quantity,
                         "from_location": r["production"], "to_location": r["storage"],
                         "unit": r["unit"], "company": r["co"], "unit_price": d("5"),
                         "currency": r["cur"]}], ctx]),
            )
            .await[0]
            .clone();
        self.rpc(
            "model.ir.note.create",
            json!([[{"resource": format!("stock.move,{m}"), "message": key}], ctx]),
        )
        .await;
    }

    /// The production order with its moves and their lots.
    pub async fn production(&self, number: &str) -> Value {
        self.rpc(
            "model.production.search_read",
            json!([
                [["number", "=", number]],
                0,
                1,
                null,
                [
                    "state",
                    "location",
                    "inputs.quantity",
                    "inputs.lot.number",
                    "inputs.product.code",
                    "outputs.quantity",
                    "outputs.lot.number",
                    "outputs.product.code"
                ],
                self.ctx()
            ]),
        )
        .await[0]
            .clone()
    }
}

fn b64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() {
                char::from(T[((n >> (18 - 6 * i)) & 63) as usize])
            } else {
                '='
            });
        }
    }
    out
}
