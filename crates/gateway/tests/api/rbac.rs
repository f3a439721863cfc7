//! Authorization, with the routes enumerated from the served OpenAPI document so that a new
//! route cannot be forgotten: it must appear in the table below or in the public list.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::helpers::*;

const OPERATOR: &str = "operator";
const SUPERVISOR: &str = "supervisor";
const QUALITY: &str = "quality";
const PLANNER: &str = "planner";
const ADMIN: &str = "admin";
const ALL: &[&str] = &[OPERATOR, SUPERVISOR, QUALITY, PLANNER, ADMIN];

/// Routes that need no token.
const PUBLIC: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/api/v1/health"),
    ("post", "/api/v1/auth/token"),
];

/// The roles allowed on each protected route.
fn allowed(method: &str, path: &str) -> Option<&'static [&'static str]> {
    Some(match (method, path) {
        ("post", "/api/v1/auth/logout") => ALL,
        ("post", "/api/v1/scans") => &[OPERATOR, SUPERVISOR, QUALITY, ADMIN],
        ("get", "/api/v1/scans/{scan_id}") => ALL,
        ("post", "/api/v1/scans/{scan_id}/void") => &[SUPERVISOR, ADMIN],
        ("get", "/api/v1/work-orders") => &[OPERATOR, SUPERVISOR, QUALITY, ADMIN],
        ("get", "/api/v1/work-orders/{number}") => &[OPERATOR, SUPERVISOR, QUALITY, ADMIN],
        ("get", "/api/v1/work-orders/{number}/summary") => ALL,
        ("get", "/api/v1/lots/{lot}") => ALL,
        ("post", "/api/v1/lots/{lot}/hold") => &[QUALITY, SUPERVISOR, ADMIN],
        ("post", "/api/v1/lots/{lot}/release") => &[QUALITY, SUPERVISOR, ADMIN],
        ("get", "/api/v1/lots/{lot}/genealogy") => ALL,
        ("get", "/api/v1/lots/{lot}/history") => ALL,
        ("get", "/api/v1/reports/production") => &[PLANNER, QUALITY, ADMIN],
        ("get", "/api/v1/erp/status") => &[QUALITY, ADMIN],
        ("post", "/api/v1/erp/sync") => &[ADMIN],
        _ => return None,
    })
}

fn user_of(role: &str) -> (&'static str, Option<&'static str>) {
    match role {
        OPERATOR => ("op1", Some("TAB-10")),
        SUPERVISOR => ("sup1", None),
        QUALITY => ("qa1", None),
        PLANNER => ("plan1", None),
        _ => ("admin", None),
    }
}

/// `(method, template, concrete path, protected)` of every operation in the document.
async fn operations(app: &TestApp) -> Vec<(String, String, String, bool)> {
    let doc: Value = app.get("/openapi.json", None).await.json().await.unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if !["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                continue;
            }
            let protected = op["security"].as_array().is_some_and(|s| !s.is_empty());
            let concrete = path
                .replace("{scan_id}", "0f8fad5b-d9cb-469f-a165-70867728950e")
                .replace("{number}", "WO-1000")
                .replace("{lot}", "STEEL-L1");
            out.push((method.clone(), path.clone(), concrete, protected));
        }
    }
    out
}

async fn call(app: &TestApp, method: &str, path: &str, token: Option<&str>) -> reqwest::Response {
    match method {
        "get" => app.get(path, token).await,
        _ => app.post_json(path, token, &json!({})).await,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_is_classified_and_public_ones_are_exactly_the_listed() {
    let app = spawn_app().await;
    let ops = operations(&app).await;
    assert!(ops.len() >= 21, "{ops:?}");
    let public: BTreeSet<(String, String)> = ops
        .iter()
        .filter(|o| !o.3)
        .map(|o| (o.0.clone(), o.1.clone()))
        .collect();
    let expected: BTreeSet<(String, String)> = PUBLIC
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(public, expected);
    for (method, path, _, protected) in &ops {
        if *protected {
            assert!(
                allowed(method, path).is_some(),
                "{method} {path} has no entry in the role table"
            );
        }
    }
    // The public ones answer without a token (the services are down: health still answers).
    for (method, path, concrete, protected) in &ops {
        if !protected && path != "/api/v1/auth/token" {
            let res = call(&app, method, concrete, None).await;
            assert_eq!(res.status(), 200, "{method} {path}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_protected_route_without_a_valid_token_is_401() {
    let app = spawn_app().await;
    for (method, path, concrete, protected) in operations(&app).await {
        if !protected {
            continue;
        }
        let res = call(&app, &method, &concrete, None).await;
        assert!(res.headers().contains_key("www-authenticate"));
        let p = assert_problem(res, 401, "unauthenticated").await;
        assert!(p["detail"].is_string(), "{method} {path}");
        let res = call(&app, &method, &concrete, Some("not-a-token")).await;
        assert_problem(res, 401, "unauthenticated").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn role_route_matrix() {
    let app = spawn_app().await;
    let mut tokens = Vec::new();
    for role in ALL {
        let (user, device) = user_of(role);
        tokens.push((*role, app.demo_token(user, device).await));
    }
    for (method, path, concrete, protected) in operations(&app).await {
        if !protected {
            continue;
        }
        let Some(roles) = allowed(&method, &path) else {
            panic!("{method} {path} not in the table");
        };
        for (role, token) in &tokens {
            // Logout revokes: use a token of its own.
            let token = if path == "/api/v1/auth/logout" {
                let (user, device) = user_of(role);
                app.demo_token(user, device).await
            } else {
                token.clone()
            };
            let res = call(&app, &method, &concrete, Some(&token)).await;
            let status = res.status().as_u16();
            if roles.contains(role) {
                assert!(
                    (status != 401 && status != 403 && status < 500) || status == 503,
                    "{role} on {method} {path}: {status} {}",
                    res.text().await.unwrap_or_default()
                );
            } else {
                assert_eq!(status, 403, "{role} on {method} {path}");
                assert_problem(res, 403, "forbidden").await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_station_bound_token_cannot_scan_at_another_station() {
    let app = spawn_app().await;
    let op = app.demo_token("op1", Some("TAB-10")).await;
    let res = app
        .post_json(
            "/api/v1/scans",
            Some(&op),
            &json!({"scans": [scan("ST-10"), scan("ST-20")]}),
        )
        .await;
    let p = assert_problem(res, 403, "forbidden").await;
    assert!(
        p["detail"].as_str().unwrap().contains("scans[1].station"),
        "{p}"
    );
    // Even a supervisor, when logged in on a device.
    let sup = app.demo_token("sup1", Some("TAB-20")).await;
    let res = app
        .post_json(
            "/api/v1/scans",
            Some(&sup),
            &json!({"scans": [scan("ST-10")]}),
        )
        .await;
    assert_problem(res, 403, "forbidden").await;
    // At its own station the request passes authorization (scan-ingest is down: 503).
    let res = app
        .post_json(
            "/api/v1/scans",
            Some(&op),
            &json!({"scans": [scan("ST-10")]}),
        )
        .await;
    assert_problem(res, 503, "unavailable").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_need_a_device_and_quality_may_only_inspect() {
    let app = spawn_app().await;
    let op = app.demo_token("op1", None).await;
    let res = app
        .post_json(
            "/api/v1/scans",
            Some(&op),
            &json!({"scans": [scan("ST-10")]}),
        )
        .await;
    assert_problem(res, 403, "forbidden").await;
    let qa = app.demo_token("qa1", None).await;
    let res = app
        .post_json(
            "/api/v1/scans",
            Some(&qa),
            &json!({"scans": [scan("ST-30")]}),
        )
        .await;
    assert_problem(res, 403, "forbidden").await;
    let mut inspect = scan("ST-30");
    inspect["kind"] = json!("inspect");
    inspect["result"] = json!("pass");
    inspect["quantity"] = Value::Null;
    let res = app
        .post_json("/api/v1/scans", Some(&qa), &json!({"scans": [inspect]}))
        .await;
    assert_problem(res, 503, "unavailable").await;
}
