//! The Grafana dashboards (`deploy/grafana/dashboards/*.json`) and the Prometheus alert rules
//! (`k8s/base/alerts/mes-alerts.rules.yaml`, which compose loads too) name only metrics the
//! services export: the four real binaries get a little traffic, their `/metrics` are scraped,
//! and every metric name in every panel's and every rule's PromQL must be among the scraped
//! series (histograms by their `_bucket`/`_sum`/`_count` series, as exposed), every label a
//! selector matches must be one that metric carries, and every grouping label (`by`, `on` ...)
//! one its metrics carry (or a target label: job, instance).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mes_e2e::System;
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The dashboards shipped under `deploy/grafana/dashboards/`: one overview and one per service.
const DASHBOARDS: &[&str] = &[
    "mes-overview.json",
    "mes-scan-ingest.json",
    "mes-trace-query.json",
    "mes-erp-sync.json",
    "mes-gateway.json",
];

/// The alert rules, one file for Kubernetes (a ConfigMap) and compose (mounted).
const RULES: &str = "k8s/base/alerts/mes-alerts.rules.yaml";

/// Series Prometheus writes itself for every scrape target or alert: no service exports them.
const PROMETHEUS_SERIES: &[&str] = &[
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
    "ALERTS",
    "ALERTS_FOR_STATE",
];

/// Metrics that appear only with their first event, which a short healthy run does not have
/// (a counter or gauge is exported from its first value on): a query may name them when the
/// services' code emits exactly that name (checked against `crates/*/src`). Each with the event.
const EVENT_ONLY: &[(&str, &str)] = &[
    (
        "erp_outbox_dead_lettered_total",
        "a confirmation the ERP keeps refusing",
    ),
    (
        "erp_dead_letters_total",
        "a pulled record that cannot be stored",
    ),
    (
        "erp_contract_drift_total",
        "an ERP record of an unknown shape",
    ),
    ("erp_delivery_failures_total", "a failed call to the ERP"),
    (
        "erp_delivery_failures_uncounted_total",
        "a failed call to the ERP while its breaker is not closed",
    ),
    (
        "erp_delivery_throttled_total",
        "an ERP answering 429 or 503",
    ),
    (
        "erp_reconciliation_differences",
        "the first reconciliation (hourly)",
    ),
    ("event_feed_stalled", "a feed event a consumer cannot read"),
    ("event_feed_failures_total", "the feed subscription failing"),
    (
        "gateway_backend_transport_failures_total",
        "a back-end unreachable from the gateway",
    ),
    (
        "gateway_grpc_retries_total",
        "a connection to a back-end closing under a call",
    ),
    (
        "gateway_login_hash_busy_total",
        "more concurrent logins than hash permits",
    ),
    (
        "gateway_redis_failures_total",
        "Redis failing under the gateway",
    ),
    ("gateway_rate_limited_total", "a client over its rate limit"),
    (
        "grpc_server_callers_refused_total",
        "an unsigned, forged or replayed internal call",
    ),
    (
        "scan_batch_retries_total",
        "a deadlock or serialisation retry",
    ),
    (
        "reference_cache_errors_total",
        "Redis failing under scan-ingest",
    ),
    (
        "reference_cache_fills_discarded_total",
        "a reference-data fill racing an invalidation",
    ),
    (
        "trace_cache_available",
        "Redis failing under trace-query, or coming back (no value before)",
    ),
    (
        "trace_cache_errors_total",
        "Redis failing under trace-query",
    ),
    (
        "trace_prewarmed_total",
        "a pre-warmed genealogy after a produce (skipped while two are running)",
    ),
    (
        "trace_cache_stale_stores_refused_total",
        "a loader straddling a commit",
    ),
    (
        "trace_cache_invalidations_replayed_total",
        "owed cache deletions replayed after a failure",
    ),
];

// ----------------------------------------------------------------------------------------
// PromQL: the metric names an expression selects
// ----------------------------------------------------------------------------------------

/// Aggregation operators, keywords and literals of PromQL: never metric names.
const KEYWORDS: &[&str] = &[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
    "Inf",
    "NaN",
];

/// Removes what cannot hold a metric name: string literals, label matchers `{...}`, ranges
/// and subqueries `[...]`, grouping label lists (`by (...)`, `on (...)`, ...) and Grafana
/// variables (`$job`, `${job}`, `$__rate_interval`).
fn strip_non_names(expr: &str) -> String {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                out.push_str("\"\"");
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    i += 1;
                }
                i += 1;
                out.push(' ');
            }
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
                out.push(' ');
            }
            '#' => {
                // A comment runs to the end of its line.
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    // Grouping label lists: `by (a, b)`, `without (...)`, `on (...)`, `ignoring (...)`,
    // `group_left (...)`, `group_right (...)`: the keyword and its list go.
    let mut text = out;
    for kw in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        while let Some((start, end)) = find_keyword_list(&text, kw) {
            text.replace_range(start..end, " ");
        }
    }
    text
}

/// The byte range of `kw` followed (after blanks) by a parenthesised list, as a whole word.
fn find_keyword_list(text: &str, kw: &str) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut from = 0;
    while let Some(pos) = text[from..].find(kw) {
        let start = from + pos;
        let after = start + kw.len();
        let word = (start == 0 || !is_ident(bytes[start - 1]))
            && (after == bytes.len() || !is_ident(bytes[after]));
        if word {
            let mut j = after;
            while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                j += 1;
            }
            if j < bytes.len() && bytes[j] == b'(' {
                let close = text[j..].find(')').map(|p| j + p + 1)?;
                return Some((start, close));
            }
        }
        from = after;
    }
    None
}

/// The metric names an expression selects, in order of appearance.
fn metric_names(expr: &str) -> Vec<String> {
    let text = strip_non_names(expr);
    let chars: Vec<char> = text.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // A number or a duration (0.99, 1e3, 5m, 0x1f): skip it whole.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let call = chars.get(j) == Some(&'(');
            if !call && !KEYWORDS.contains(&word.as_str()) {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Skips a string literal starting at `i` (its quote): the index after its closing quote.
fn skip_string(chars: &[char], mut i: usize) -> usize {
    let quote = chars[i];
    i += 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' && quote != '`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// The label names an expression uses: in label matchers, with the metric they select (`None`
/// for a selector without a name), and in grouping lists (`by`, `without`, `on`, `ignoring`,
/// `group_left`, `group_right`), with `None`.
fn label_uses(expr: &str) -> Vec<(Option<String>, String)> {
    let chars: Vec<char> = expr.chars().collect();
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let read_ident = |i: &mut usize| -> String {
        let start = *i;
        while *i < chars.len() && ident_char(chars[*i]) {
            *i += 1;
        }
        chars[start..*i].iter().collect()
    };
    let mut out = Vec::new();
    // The last identifier and where it ended: a `{` right after it selects that metric.
    let mut last: Option<(String, usize)> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
            last = None;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '{' {
            let metric = last
                .take()
                .filter(|(_, end)| chars[*end..i].iter().all(|c| c.is_whitespace()))
                .map(|(name, _)| name);
            i += 1;
            let mut expect_label = true;
            while i < chars.len() && chars[i] != '}' {
                let c = chars[i];
                if c == '"' || c == '\'' || c == '`' {
                    i = skip_string(&chars, i);
                } else if c == ',' {
                    expect_label = true;
                    i += 1;
                } else if expect_label && ident_start(c) {
                    out.push((metric.clone(), read_ident(&mut i)));
                    expect_label = false;
                } else {
                    i += 1;
                }
            }
            i += 1;
        } else if c == '$' || c.is_ascii_digit() {
            // A Grafana variable, a number or a duration.
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
        } else if ident_start(c) {
            let word = read_ident(&mut i);
            let grouping = [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ];
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            if grouping.contains(&word.as_str()) && chars.get(j) == Some(&'(') {
                i = j + 1;
                while i < chars.len() && chars[i] != ')' {
                    if ident_start(chars[i]) {
                        out.push((None, read_ident(&mut i)));
                    } else {
                        i += 1;
                    }
                }
                i += 1;
                last = None;
            } else {
                last = Some((word, i));
            }
        } else {
            i += 1;
        }
    }
    out
}

// ----------------------------------------------------------------------------------------
// Where the queries are
// ----------------------------------------------------------------------------------------

/// One PromQL expression and where it was found.
#[derive(Debug)]
struct Query {
    place: String,
    expr: String,
}

/// Every panel's targets (rows' nested panels too) and every templating query of a dashboard.
fn dashboard_queries(file: &str, dashboard: &Value) -> Vec<Query> {
    fn panels(file: &str, list: &Value, out: &mut Vec<Query>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(Query {
                        place: format!("{file}: panel \"{title}\""),
                        expr: expr.to_owned(),
                    });
                }
            }
            panels(file, &panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(file, &dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = match &var["query"] {
            Value::String(q) => Some(q.as_str()),
            q => q["query"].as_str(),
        };
        if var["type"] == "query"
            && let Some(q) = query
        {
            // label_values(metric{...}, label) selects `metric`; label_values(label) none.
            let expr = match q.trim().strip_prefix("label_values(") {
                Some(args) => match args.rsplit_once(',') {
                    Some((selector, _label)) => selector.to_owned(),
                    None => String::new(),
                },
                None => q.to_owned(),
            };
            out.push(Query {
                place: format!("{file}: variable ${}", var["name"].as_str().unwrap_or("?")),
                expr,
            });
        }
    }
    out
}

/// The `expr:` of every rule of a Prometheus rule file (inline or a `|`/`>` block), with the
/// rule's name (`alert:` or `record:`).
fn rule_queries(file: &str, text: &str) -> Vec<Query> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut name = String::from("(unnamed)");
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start().trim_start_matches("- ");
        if let Some(n) = trimmed
            .strip_prefix("alert:")
            .or_else(|| trimmed.strip_prefix("record:"))
        {
            name = n.trim().to_owned();
        }
        if let Some(rest) = trimmed.strip_prefix("expr:") {
            let indent = line.len() - line.trim_start().len();
            let rest = rest.trim();
            let expr = if rest.starts_with('|') || rest.starts_with('>') {
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                block.join("\n")
            } else {
                rest.trim_matches(|c| c == '"' || c == '\'').to_owned()
            };
            out.push(Query {
                place: format!("{file}: rule {name}"),
                expr,
            });
        }
        i += 1;
    }
    out
}

/// Metric names the recording rules of the rule file define (queries may use them).
fn recorded_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix("record:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

/// Series name -> the label names it carries.
type Series = BTreeMap<String, BTreeSet<String>>;

/// `metric -> its series` for every metric the services' code emits with a literal name
/// (`metrics::counter!("name", "label" => ...)`, `gauge!`, `histogram!`), as the exporter
/// renders them: histograms of `*_seconds` with buckets (`le`), other histograms as summaries
/// (`quantile`).
fn source_metrics() -> BTreeMap<String, Series> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut files = Vec::new();
    for krate in std::fs::read_dir(root().join("crates"))
        .expect("crates/")
        .flatten()
    {
        walk(&krate.path().join("src"), &mut files);
    }
    let mut out: BTreeMap<String, Series> = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for kind in ["counter", "gauge", "histogram"] {
            let macro_call = format!("metrics::{kind}!(");
            for (pos, _) in text.match_indices(&macro_call) {
                let args = &text[pos + macro_call.len()..];
                // The macro's arguments: up to its closing parenthesis.
                let mut depth = 1;
                let mut end = args.len();
                for (k, ch) in args.char_indices() {
                    match ch {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    if depth == 0 {
                        end = k;
                        break;
                    }
                }
                let args = &args[..end];
                let Some(rest) = args.trim_start().strip_prefix('"') else {
                    continue;
                };
                let Some(close) = rest.find('"') else {
                    continue;
                };
                let name = rest[..close].to_owned();
                let labels: BTreeSet<String> = args
                    .split("=>")
                    .filter_map(|before| {
                        let before = before.trim_end().strip_suffix('"')?;
                        let open = before.rfind('"')?;
                        Some(before[open + 1..].to_owned())
                    })
                    .collect();
                let with = |extra: &str| {
                    let mut l = labels.clone();
                    l.insert(extra.to_owned());
                    l
                };
                let series: Series = match kind {
                    "histogram" if name.ends_with("_seconds") => [
                        (format!("{name}_bucket"), with("le")),
                        (format!("{name}_sum"), labels.clone()),
                        (format!("{name}_count"), labels.clone()),
                    ]
                    .into(),
                    "histogram" => [
                        (name.clone(), with("quantile")),
                        (format!("{name}_sum"), labels.clone()),
                        (format!("{name}_count"), labels.clone()),
                    ]
                    .into(),
                    _ => [(name.clone(), labels.clone())].into(),
                };
                let entry = out.entry(name).or_default();
                for (series, labels) in series {
                    entry.entry(series).or_default().extend(labels);
                }
            }
        }
    }
    out
}

// ----------------------------------------------------------------------------------------
// The running system
// ----------------------------------------------------------------------------------------

/// The series of one `/metrics` page and their label names (from `# TYPE` lines and samples).
fn exposed(page: &str) -> Series {
    let mut out = Series::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                let names: Vec<String> = match kind {
                    "histogram" => ["_bucket", "_sum", "_count"]
                        .iter()
                        .map(|s| format!("{name}{s}"))
                        .collect(),
                    "summary" => ["", "_sum", "_count"]
                        .iter()
                        .map(|s| format!("{name}{s}"))
                        .collect(),
                    _ => vec![name.to_owned()],
                };
                for n in names {
                    out.entry(n).or_default();
                }
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = out.entry(line[..end].to_owned()).or_default();
            if line[end..].starts_with('{') {
                // name{a="x",b="y\"z"} 1
                let chars: Vec<char> = line[end + 1..].chars().collect();
                let mut i = 0;
                while i < chars.len() && chars[i] != '}' {
                    let start = i;
                    while i < chars.len() && chars[i] != '=' {
                        i += 1;
                    }
                    labels.insert(chars[start..i].iter().collect::<String>().trim().to_owned());
                    i += 1;
                    if chars.get(i) == Some(&'"') {
                        i = skip_string(&chars, i);
                    }
                    if chars.get(i) == Some(&',') {
                        i += 1;
                    }
                }
            }
        }
    }
    out
}

/// Each service's `/metrics` series.
async fn scrape(sys: &System) -> BTreeMap<&'static str, Series> {
    let mut urls: Vec<(&'static str, String)> = ["scan-ingest", "trace-query", "erp-sync"]
        .into_iter()
        .map(|s| (s, format!("http://127.0.0.1:{}/metrics", sys.metrics[s])))
        .collect();
    // The gateway serves /metrics on its own port.
    urls.push(("gateway", format!("{}/metrics", sys.gateway)));
    let mut out = BTreeMap::new();
    for (service, url) in urls {
        let page = reqwest::get(&url)
            .await
            .and_then(reqwest::Response::error_for_status)
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .text()
            .await
            .expect("a /metrics page");
        out.insert(service, exposed(&page));
    }
    out
}

fn scan(kind: &str, wo: &str, op: u32, station: &str, extra: Value) -> Value {
    let mut s = json!({
        "scan_id": uuid::Uuid::new_v4().to_string(),
        "kind": kind,
        "work_order": wo,
        "operation": op,
        "station": station,
        "scanned_at": chrono::Utc::now().to_rfc3339(),
    });
    for (k, v) in extra.as_object().expect("an object") {
        s[k] = v.clone();
    }
    s
}

/// Scans accepted and rejected, reads cached and not, a bad login and a 404: enough that the
/// labelled series the dashboards chart exist.
async fn traffic(sys: &System) {
    let http = reqwest::Client::new();
    let token = sys.token("op1", Some("TAB-10")).await;
    let scans = vec![
        scan("start_operation", "WO-1000", 10, "ST-10", json!({})),
        scan(
            "consume",
            "WO-1000",
            10,
            "ST-10",
            json!({"lot": "STEEL-L1", "quantity": "5"}),
        ),
        scan(
            "produce",
            "WO-1000",
            10,
            "ST-10",
            json!({"lot": "FRAME-L1", "quantity": "2", "material": "FRAME-200"}),
        ),
        scan("complete_operation", "WO-1000", 10, "ST-10", json!({})),
        // Refused: the work order is cancelled.
        scan("start_operation", "WO-1002", 10, "ST-10", json!({})),
    ];
    let consume = scans[1]["scan_id"].as_str().expect("an id").to_owned();
    let r = http
        .post(format!("{}/api/v1/scans", sys.gateway))
        .bearer_auth(&token)
        .json(&json!({ "scans": scans }))
        .send()
        .await
        .expect("POST /api/v1/scans");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let body: Value = r.json().await.expect("json");
    let statuses: Vec<&str> = body["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["status"].as_str())
        .collect();
    assert!(
        statuses.contains(&"accepted") && statuses.contains(&"rejected"),
        "{body}"
    );
    // A supervisor voids the consume: a reversal for the ERP.
    let sup = sys.token("sup1", None).await;
    let r = http
        .post(format!("{}/api/v1/scans/{consume}/void", sys.gateway))
        .bearer_auth(&sup)
        .json(&json!({"reason": "wrong lot", "confirm": true}))
        .send()
        .await
        .expect("POST void");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    // Reads: twice each, so trace-query answers from the database and then from its cache.
    for _ in 0..2 {
        for path in [
            "/api/v1/lots/FRAME-L1/genealogy?direction=backward",
            "/api/v1/lots/STEEL-L1/genealogy?direction=forward",
            "/api/v1/work-orders/WO-1000",
            "/api/v1/lots/NO-SUCH-LOT/genealogy?direction=backward",
            "/api/v1/health",
        ] {
            let r = http
                .get(format!("{}{path}", sys.gateway))
                .bearer_auth(&token)
                .send()
                .await
                .expect("GET");
            assert!(r.status().as_u16() < 500, "{path}: {}", r.status());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A refused login and a route that does not exist.
    let r = http
        .post(format!("{}/api/v1/auth/token", sys.gateway))
        .json(&json!({"username": "op1", "password": "wrong"}))
        .send()
        .await
        .expect("POST /api/v1/auth/token");
    assert!(r.status().is_client_error(), "{}", r.status());
    let r = http
        .get(format!("{}/api/v1/no-such-route", sys.gateway))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 404);
}

// ----------------------------------------------------------------------------------------
// The tests
// ----------------------------------------------------------------------------------------

fn all_queries() -> Vec<Query> {
    let dir = root().join("deploy/grafana/dashboards");
    let mut queries = Vec::new();
    for file in DASHBOARDS {
        let path = dir.join(file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let dashboard: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
        let found = dashboard_queries(file, &dashboard);
        assert!(found.len() >= 4, "{file}: only {} queries", found.len());
        queries.extend(found);
    }
    let rules = std::fs::read_to_string(root().join(RULES)).expect(RULES);
    let found = rule_queries(RULES, &rules);
    assert!(found.len() >= 10, "{RULES}: only {} rules", found.len());
    queries.extend(found);
    queries
}

#[test]
fn the_promql_parser_finds_metric_names_and_nothing_else() {
    let names = |e: &str| metric_names(e);
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (service, le) (rate(grpc_server_request_duration_seconds_bucket{job=~"$job", code!="Ok"}[$__rate_interval])))"#
        ),
        ["grpc_server_request_duration_seconds_bucket"]
    );
    assert_eq!(
        names(
            "sum by (job) (up{job=~\"a|b\"}) == 0 or absent(up{job=\"x\"})\n  and on (job) feed_head_position - ignoring(consumer) group_left event_feed_position offset 5m > 1e3"
        ),
        ["up", "up", "feed_head_position", "event_feed_position"]
    );
    assert_eq!(
        names(
            r#"sum(rate(trace_cache_requests_total{result=~"hit|negative_hit"}[5m])) / clamp_min(sum(rate(trace_cache_requests_total[5m])), 1)"#
        ),
        ["trace_cache_requests_total", "trace_cache_requests_total"]
    );
    assert_eq!(
        names(r#"max without (instance) (erp_breaker_state) == bool 2"#),
        ["erp_breaker_state"]
    );
    assert!(names("vector(1) * 0.5 + time()").is_empty());
    // A block of a rule file, with the rule's name.
    let rules = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: |\n          rate(x_total[5m])\n            > 0\n        for: 1m\n      - alert: B\n        expr: max(y) > 0\n";
    let q = rule_queries("f", rules);
    assert_eq!(q.len(), 2);
    assert_eq!(q[0].place, "f: rule A");
    assert_eq!(q[0].expr, "rate(x_total[5m])\n> 0");
    assert_eq!(metric_names(&q[1].expr), ["y"]);
}

#[test]
fn the_promql_parser_finds_the_labels_of_selectors_and_groupings() {
    let uses = |e: &str| -> Vec<(Option<String>, String)> { label_uses(e) };
    let m = |name: &str, label: &str| (Some(name.to_owned()), label.to_owned());
    let g = |label: &str| (None, label.to_owned());
    assert_eq!(
        uses(
            r#"histogram_quantile(0.99, sum by (service, le) (rate(grpc_server_request_duration_seconds_bucket{job=~"$job", code!="Ok,x=}"}[$__rate_interval])))"#
        ),
        [
            g("service"),
            g("le"),
            m("grpc_server_request_duration_seconds_bucket", "job"),
            m("grpc_server_request_duration_seconds_bucket", "code"),
        ]
    );
    assert_eq!(
        uses(
            "max(feed_head_position) - on () group_right max by (consumer) (feed_subscriber_position {consumer!=\"\"})"
        ),
        [g("consumer"), m("feed_subscriber_position", "consumer")]
    );
    assert_eq!(
        uses(r#"count({__name__=~"scan.*", kind="x"})"#),
        [g("__name__"), g("kind")]
    );

    // A /metrics page: histogram series with `le`, summaries with `quantile`, quoted values.
    let page = "# TYPE a_seconds histogram\n\
        a_seconds_bucket{m=\"x,y}\",le=\"0.1\"} 1\n\
        a_seconds_sum{m=\"q\\\"}\"} 1\n\
        # TYPE s summary\n\
        s{quantile=\"0.5\"} 1\n\
        c 3\n";
    let e = exposed(page);
    let set = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
    assert_eq!(e["a_seconds_bucket"], set(&["m", "le"]));
    assert_eq!(e["a_seconds_sum"], set(&["m"]));
    assert_eq!(e["a_seconds_count"], set(&[]));
    assert_eq!(e["s"], set(&["quantile"]));
    assert_eq!(e["s_count"], set(&[]));
    assert_eq!(e["c"], set(&[]));

    // What a query gets wrong.
    let series = |n: &str| (n == "x_total").then(|| set(&["kind"]));
    let none = BTreeSet::new();
    assert_eq!(
        problems(
            r#"sum by (kind, job) (rate(x_total{kind="a", instance="i"}[5m])) and on (job) up == 1"#,
            series,
            &none
        ),
        Vec::<String>::new()
    );
    let found = problems(
        r#"sum by (knd) (rate(x_total{kid="a"}[5m]))"#,
        series,
        &none,
    );
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].starts_with("grouping label knd"), "{found:?}");
    assert!(found[1].starts_with("label kid of x_total"), "{found:?}");
    // An unknown metric: named; its grouping labels cannot be judged.
    let found = problems(r#"sum by (knd) (y_total{kind="a"})"#, series, &none);
    assert_eq!(found, ["metric y_total"]);
    // A recorded series may carry any label.
    assert!(problems("r:x{any=\"1\"}", series, &set(&["r:x"])).is_empty());
}

/// Labels Prometheus attaches to every scraped series (target labels), or that name a series.
const TARGET_LABELS: &[&str] = &["job", "instance", "__name__"];

/// What is wrong with one query against the known series: unknown metrics, labels a metric
/// does not carry, grouping labels none of its metrics carry.
fn problems(
    expr: &str,
    series: impl Fn(&str) -> Option<BTreeSet<String>>,
    recorded: &BTreeSet<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    let names = metric_names(expr);
    let labels_of = |name: &str| -> Option<BTreeSet<String>> {
        if recorded.contains(name) || name.starts_with("ALERTS") {
            // Any label: a recording rule's or an alert's own.
            return None;
        }
        let mut labels = if PROMETHEUS_SERIES.contains(&name) {
            BTreeSet::new()
        } else {
            series(name)?
        };
        labels.extend(TARGET_LABELS.iter().map(|l| (*l).to_owned()));
        Some(labels)
    };
    for name in &names {
        let known = PROMETHEUS_SERIES.contains(&name.as_str())
            || recorded.contains(name)
            || series(name).is_some();
        if !known {
            out.push(format!("metric {name}"));
        }
    }
    let mut all: Option<BTreeSet<String>> =
        Some(TARGET_LABELS.iter().map(|l| (*l).to_owned()).collect());
    for name in &names {
        match (labels_of(name), &mut all) {
            (Some(l), Some(a)) => a.extend(l),
            _ => all = None,
        }
    }
    for (metric, label) in label_uses(expr) {
        let allowed = match &metric {
            Some(m) => labels_of(m),
            None => all.clone(),
        };
        if let Some(allowed) = allowed
            && !allowed.contains(&label)
        {
            match metric {
                Some(m) => out.push(format!("label {label} of {m} (it has {allowed:?})")),
                None => out.push(format!(
                    "grouping label {label} (its metrics have {allowed:?})"
                )),
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_names_metrics_and_labels_the_services_export() {
    let queries = all_queries();
    let rules_text = std::fs::read_to_string(root().join(RULES)).expect(RULES);
    let recorded = recorded_names(&rules_text);
    let source = source_metrics();
    let in_source = |name: &str| -> Option<BTreeSet<String>> {
        source.values().find_map(|series| series.get(name).cloned())
    };
    // Every event-only metric is one the code emits, under that exact name.
    for (name, why) in EVENT_ONLY {
        assert!(
            in_source(name).is_some(),
            "{name} (exported after {why}) is emitted nowhere in crates/*/src"
        );
    }

    let sys = System::start_with(&[
        // The ledger check runs at once rather than after 5 minutes.
        ("MES_SCAN_INGEST_LEDGER_CHECK_INTERVAL_SECONDS", "1"),
    ])
    .await
    .expect("system");
    traffic(&sys).await;

    // Some series appear a moment later (feed consumers, periodic gauges): scrape until every
    // query checks out or 30 s passed.
    let mut found: Vec<String> = Vec::new();
    let mut exported = BTreeMap::new();
    for _ in 0..30 {
        exported = scrape(&sys).await;
        let series = |name: &str| -> Option<BTreeSet<String>> {
            let mut labels: Option<BTreeSet<String>> = None;
            for s in exported.values() {
                if let Some(l) = s.get(name) {
                    labels
                        .get_or_insert_with(BTreeSet::new)
                        .extend(l.iter().cloned());
                }
            }
            labels.or_else(|| {
                EVENT_ONLY
                    .iter()
                    .any(|(n, _)| *n == name)
                    .then(|| in_source(name))
                    .flatten()
            })
        };
        found = queries
            .iter()
            .flat_map(|q| {
                problems(&q.expr, series, &recorded)
                    .into_iter()
                    .map(move |p| {
                        format!("  {}: {p}\n      {}", q.place, q.expr.replace('\n', " "))
                    })
            })
            .collect();
        if found.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        found.is_empty(),
        "queries name metrics or labels no service exports:\n{}\nexported:\n{}",
        found.join("\n"),
        exported
            .iter()
            .map(|(s, series)| format!(
                "  {s}: {}",
                series
                    .iter()
                    .map(|(n, l)| format!("{n}{l:?}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // And the names really were looked at: the overview alone charts dozens.
    let distinct: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(&q.expr)).collect();
    assert!(distinct.len() >= 30, "{distinct:?}");
}
