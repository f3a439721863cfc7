//! Bad input is a 4xx problem naming the field, never a 5xx.

use serde_json::{Value, json};

use crate::helpers::*;

async fn operator(app: &TestApp) -> String {
    app.demo_token("op1", Some("TAB-10")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_is_400_malformed_json() {
    let app = spawn_app().await;
    let token = operator(&app).await;
    for body in ["{\"scans\": [", "not json", "", "{\"scans\": [}]}", "\u{0}"] {
        let res = app.post_raw("/api/v1/scans", Some(&token), body).await;
        assert_problem(res, 400, "malformed_json").await;
    }
    let res = app.post_raw("/api/v1/auth/token", None, "{username").await;
    assert_problem(res, 400, "malformed_json").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_types_missing_and_unknown_fields_are_named() {
    let app = spawn_app().await;
    let token = operator(&app).await;
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (json!([]), vec!["body"]),
        (json!({}), vec!["scans"]),
        (json!({"scans": "x"}), vec!["scans"]),
        (json!({"scans": []}), vec!["scans"]),
        (
            json!({"scans": [scan("ST-10")], "extra": true}),
            vec!["extra"],
        ),
        (json!({"scans": [1]}), vec!["scans[0]"]),
        (
            json!({"scans": [scan("ST-10"), scan("ST-10"), scan("ST-10"),
                {"scan_id": "x", "kind": "consume", "station": "ST-10",
                 "quantity": "-1", "scanned_at": "yesterday", "colour": "red"}]}),
            vec![
                "scans[3].scan_id",
                "scans[3].work_order",
                "scans[3].lot",
                "scans[3].quantity",
                "scans[3].scanned_at",
                "scans[3].colour",
            ],
        ),
        (
            json!({"scans": [{"scan_id": 5, "kind": "teleport", "station": 10,
                "scanned_at": "2025-03-01T08:15:30Z", "operation": "ten",
                "attributes": [1, 2]}]}),
            vec![
                "scans[0].scan_id",
                "scans[0].kind",
                "scans[0].operation",
                "scans[0].station",
                "scans[0].attributes",
            ],
        ),
        (
            json!({"scans": [{"scan_id": uuid::Uuid::new_v4().to_string(), "kind": "consume",
                "work_order": "WO-1000", "station": "ST-10", "lot": "STEEL-L1",
                "quantity": 25, "scanned_at": "2025-03-01T08:15:30Z"}]}),
            vec!["scans[0].quantity"],
        ),
        (
            json!({"scans": [{"scan_id": uuid::Uuid::new_v4().to_string(), "kind": "scrap",
                "work_order": "WO-1000", "station": "ST-10", "lot": "STEEL-L1",
                "quantity": "0", "scanned_at": "2025-03-01T08:15:30Z"}]}),
            vec!["scans[0].quantity", "scans[0].defect_code"],
        ),
        (
            json!({"scans": [{"scan_id": uuid::Uuid::new_v4().to_string(), "kind": "void",
                "station": "ST-10", "scanned_at": "2025-03-01T08:15:30Z"}]}),
            vec!["scans[0].kind"],
        ),
    ];
    for (body, fields) in cases {
        let res = app.post_json("/api/v1/scans", Some(&token), &body).await;
        let p = assert_problem(res, 400, "validation_failed").await;
        assert_eq!(error_fields(&p), fields, "{body}");
    }
    // The detail of a single error names its field.
    let mut s = scan("ST-10");
    s["quantity"] = json!("0");
    let res = app
        .post_json("/api/v1/scans", Some(&token), &json!({"scans": [s]}))
        .await;
    let p = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(p["errors"][0]["message"], "must be greater than zero");
    assert!(p["detail"].as_str().unwrap().contains("scans[0].quantity"));

    // Other bodies too.
    let res = app
        .post_json(
            "/api/v1/auth/token",
            None,
            &json!({"username": "op1", "pass": "x"}),
        )
        .await;
    let p = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(error_fields(&p), vec!["password", "pass"]);
    let qa = app.demo_token("qa1", None).await;
    let res = app
        .post_json(
            "/api/v1/lots/STEEL-L1/hold",
            Some(&qa),
            &json!({"reason": 7}),
        )
        .await;
    let p = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(error_fields(&p), vec!["reason"]);
    let sup = app.demo_token("sup1", None).await;
    let res = app
        .post_json(
            "/api/v1/scans/0f8fad5b-d9cb-469f-a165-70867728950e/void",
            Some(&sup),
            &json!({"reason": "wrong lot", "confirm": "yes"}),
        )
        .await;
    let p = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(error_fields(&p), vec!["confirm"]);
    let res = app.get("/api/v1/scans/not-a-uuid", Some(&sup)).await;
    let p = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(error_fields(&p), vec!["scan_id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_size_is_1_to_500_and_the_body_size_is_limited() {
    let app = spawn_app().await;
    let token = operator(&app).await;
    let many: Vec<Value> = (0..501).map(|_| scan("ST-10")).collect();
    let res = app
        .post_json("/api/v1/scans", Some(&token), &json!({"scans": many}))
        .await;
    let p = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(error_fields(&p), vec!["scans"]);
    // 500 valid scans pass validation (scan-ingest is down: 503).
    let ok: Vec<Value> = (0..500).map(|_| scan("ST-10")).collect();
    let res = app
        .post_json("/api/v1/scans", Some(&token), &json!({"scans": ok}))
        .await;
    assert_problem(res, 503, "unavailable").await;
    // Over 1 MiB.
    let big = format!(
        "{{\"scans\": [{{\"attributes\": {{\"x\": \"{}\"}}}}]}}",
        "a".repeat(1024 * 1024 + 10)
    );
    let res = app.post_raw("/api/v1/scans", Some(&token), big).await;
    assert_problem(res, 413, "payload_too_large").await;
    // Attributes over 4 KiB.
    let mut s = scan("ST-10");
    s["attributes"] = json!({"note": "n".repeat(5000)});
    let res = app
        .post_json("/api/v1/scans", Some(&token), &json!({"scans": [s]}))
        .await;
    let p = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(error_fields(&p), vec!["scans[0].attributes"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn injection_like_strings_are_4xx_naming_the_field() {
    let app = spawn_app().await;
    let token = operator(&app).await;
    let evil = [
        "' OR '1'='1",
        "WO-1000'; DROP TABLE scans; --",
        "\" OR \"\"=\"",
        "1; SELECT pg_sleep(10)",
        "<script>alert(1)</script>",
        "../../etc/passwd\u{0}",
    ];
    for e in evil {
        for field in [
            "work_order",
            "station",
            "lot",
            "material",
            "into_lot",
            "defect_code",
        ] {
            let mut s = scan("ST-10");
            s[field] = json!(e);
            let res = app
                .post_json("/api/v1/scans", Some(&token), &json!({"scans": [s]}))
                .await;
            let status = res.status().as_u16();
            assert!((400..500).contains(&status), "{field}={e}: {status}");
            let p = assert_problem(
                res,
                status,
                if status == 403 {
                    "forbidden"
                } else {
                    "validation_failed"
                },
            )
            .await;
            if status == 400 {
                assert_eq!(error_fields(&p), vec![format!("scans[0].{field}")]);
            }
        }
        let res = app
            .post_json(
                "/api/v1/auth/token",
                None,
                &json!({"username": e, "password": e}),
            )
            .await;
        let status = res.status().as_u16();
        assert!(status == 400 || status == 401, "{e}: {status}");
        let res = app
            .post_json(
                "/api/v1/auth/token",
                None,
                &json!({"username": "op1", "password": "demo-op1", "device_id": e}),
            )
            .await;
        let p = assert_problem(res, 400, "validation_failed").await;
        assert_eq!(error_fields(&p), vec!["device_id"]);
    }
    let qa = app.demo_token("qa1", None).await;
    for path in [
        "/api/v1/lots/x'%20OR%20'1'='1",
        "/api/v1/lots/x'%20OR%20'1'='1/history",
        "/api/v1/lots/a%3BDROP%20TABLE%20lots/genealogy",
        "/api/v1/work-orders/WO'--",
        "/api/v1/work-orders/WO'--/summary",
    ] {
        let res = app.get(path, Some(&qa)).await;
        let p = assert_problem(res, 400, "validation_failed").await;
        assert_eq!(error_fields(&p).len(), 1, "{path}");
    }
    for (path, field) in [
        ("/api/v1/work-orders?station=ST'%20OR%201=1", "station"),
        ("/api/v1/work-orders?status=released'--", "status"),
        ("/api/v1/work-orders?limit=1;DROP", "limit"),
        ("/api/v1/work-orders?limit=0", "limit"),
        ("/api/v1/work-orders?orderBy=1", "orderBy"),
        (
            "/api/v1/lots/STEEL-L1/genealogy?direction=sideways",
            "direction",
        ),
        ("/api/v1/lots/STEEL-L1/genealogy?max_depth=51", "max_depth"),
        ("/api/v1/reports/production?group_by=user", "group_by"),
        ("/api/v1/reports/production?from=yesterday", "from"),
        (
            "/api/v1/reports/production?from=2025-01-02T00:00:00Z&to=2025-01-01T00:00:00Z",
            "from",
        ),
    ] {
        let res = app.get(path, Some(&qa)).await;
        let p = assert_problem(res, 400, "validation_failed").await;
        assert_eq!(error_fields(&p), vec![field], "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_paths_and_methods_are_problems() {
    let app = spawn_app().await;
    let res = app.get("/api/v1/nope", None).await;
    assert_problem(res, 404, "not_found").await;
    let res = app.get("/api/v1/scans", None).await;
    assert_problem(res, 405, "method_not_allowed").await;
}
