use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread")]
async fn login_returns_a_bearer_token_with_roles() {
    let app = spawn_app().await;
    let res = app
        .post_json(
            "/api/v1/auth/token",
            None,
            &json!({"username": "op1", "password": "demo-op1"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    assert_eq!(body["roles"], json!(["operator"]));
    assert_eq!(body["station"], Value::Null);
    assert!(body["access_token"].as_str().unwrap().len() > 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn login_on_an_enrolled_device_binds_its_station() {
    let app = spawn_app().await;
    for (device, station) in [
        ("TAB-10", "ST-10"),
        ("TAB-20", "ST-20"),
        ("TAB-30", "ST-30"),
    ] {
        let res = app
            .post_json(
                "/api/v1/auth/token",
                None,
                &json!({"username": "op1", "password": "demo-op1", "device_id": device,
                        "device_secret": format!("demo-{device}")}),
            )
            .await;
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["station"], station);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_station_binding_needs_the_devices_enrolment_secret() {
    let demo = spawn_app().await;
    // In demo mode (secrets published in the README) naming a demo tablet is enough, as in
    // docs/api.md's login; the station is bound.
    let res = demo
        .post_json(
            "/api/v1/auth/token",
            None,
            &json!({"username": "op1", "password": "demo-op1", "device_id": "TAB-10"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["station"], "ST-10");
    // Outside demo mode (same users and devices), naming a tablet is not enough.
    let mut settings = demo.settings.clone();
    settings.service.demo = false;
    let prod = spawn_with_storage_of(&demo, settings).await;
    let app = &prod;
    let login = |body: Value| async move { app.post_json("/api/v1/auth/token", None, &body).await };
    let res =
        login(json!({"username": "op1", "password": "demo-op1", "device_id": "TAB-10"})).await;
    let p = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(error_fields(&p), vec!["device_secret"]);
    // Another tablet's secret, or a wrong one.
    for secret in ["demo-TAB-20", "demo-TAB-1", "", "x"] {
        let res = login(json!({"username": "op1", "password": "demo-op1",
            "device_id": "TAB-10", "device_secret": secret}))
        .await;
        let status = res.status().as_u16();
        assert!(status == 401 || status == 400, "{secret:?}: {status}");
        if status == 401 {
            let p = assert_problem(res, 401, "unauthenticated").await;
            assert!(!p["detail"].as_str().unwrap().contains("demo-"), "{p}");
        }
    }
    // A secret without a device means nothing.
    let res =
        login(json!({"username": "op1", "password": "demo-op1", "device_secret": "demo-TAB-10"}))
            .await;
    let p = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(error_fields(&p), vec!["device_secret"]);
    // The tablet's own secret binds its station.
    let res = login(json!({"username": "op1", "password": "demo-op1",
        "device_id": "TAB-10", "device_secret": "demo-TAB-10"}))
    .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["station"], "ST-10");
    // Stored hashed, never as given.
    let pool = mes_common::db::lazy_pool(&app.settings.service.database_url, 1).unwrap();
    let stored: Vec<Option<String>> =
        sqlx::query_scalar("SELECT secret_hash FROM devices ORDER BY device_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), 3);
    for hash in stored {
        let hash = hash.expect("every demo device has a secret");
        assert!(!hash.contains("demo-"), "{hash}");
    }
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_credentials_are_401() {
    let app = spawn_app().await;
    for body in [
        json!({"username": "op1", "password": "wrong"}),
        json!({"username": "nobody", "password": "demo-op1"}),
        json!({"username": "admin", "password": "demo-op1"}),
    ] {
        let res = app.post_json("/api/v1/auth/token", None, &body).await;
        let p = assert_problem(res, 401, "unauthenticated").await;
        assert_eq!(p["detail"], "invalid username or password");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_device_is_401() {
    let app = spawn_app().await;
    let res = app
        .post_json(
            "/api/v1/auth/token",
            None,
            &json!({"username": "op1", "password": "demo-op1", "device_id": "TAB-99",
                    "device_secret": "demo-TAB-99"}),
        )
        .await;
    assert_problem(res, 401, "unauthenticated").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn logout_revokes_the_token() {
    let app = spawn_app().await;
    let token = app.demo_token("qa1", None).await;
    // Usable before (the service is down: 503, but authenticated).
    assert_eq!(
        app.get("/api/v1/lots/STEEL-L1", Some(&token))
            .await
            .status(),
        503
    );
    let res = app
        .client
        .post(app.url("/api/v1/auth/logout"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let res = app.get("/api/v1/lots/STEEL-L1", Some(&token)).await;
    let p = assert_problem(res, 401, "unauthenticated").await;
    assert!(p["detail"].as_str().unwrap().contains("revoked"));
    // A fresh login works again.
    let again = app.demo_token("qa1", None).await;
    assert_eq!(
        app.get("/api/v1/lots/STEEL-L1", Some(&again))
            .await
            .status(),
        503
    );
}

fn claims(exp_offset: i64) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"sub": "admin", "roles": ["admin"], "iat": now, "exp": now + exp_offset,
           "jti": uuid::Uuid::new_v4().to_string(), "iss": "mes-gateway", "aud": "mes-gateway"})
}

async fn assert_refused(app: &TestApp, token: &str) {
    let res = app.get("/api/v1/erp/status", Some(token)).await;
    assert_problem(res, 401, "unauthenticated").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_tampered_expired_and_other_algorithm_tokens_are_401() {
    let app = spawn_app().await;
    let key = EncodingKey::from_secret(TEST_SECRET.as_bytes());

    // Control: a token signed like the gateway's is accepted (503: erp-sync is down).
    let good = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims(600), &key).unwrap();
    assert_eq!(
        app.get("/api/v1/erp/status", Some(&good)).await.status(),
        503
    );

    // Tampered payload (roles escalated) with the original signature.
    let real = app.demo_token("op1", None).await;
    let parts: Vec<&str> = real.split('.').collect();
    let mut payload = claims(600);
    payload["sub"] = json!("op1");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64url(payload.to_string().as_bytes()),
        parts[2]
    );
    assert_refused(&app, &forged).await;
    // Tampered signature.
    let mut sig = parts[2].to_owned();
    let last = if sig.ends_with('A') { 'B' } else { 'A' };
    sig.pop();
    sig.push(last);
    assert_refused(&app, &format!("{}.{}.{sig}", parts[0], parts[1])).await;

    // alg: none.
    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims(600).to_string().as_bytes())
    );
    assert_refused(&app, &none).await;

    // Expired.
    let expired =
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims(-3600), &key).unwrap();
    assert_refused(&app, &expired).await;

    // HS512 with the right secret.
    let hs512 = jsonwebtoken::encode(&Header::new(Algorithm::HS512), &claims(600), &key).unwrap();
    assert_refused(&app, &hs512).await;

    // Another secret; another issuer or audience; garbage; wrong scheme.
    let other = EncodingKey::from_secret(b"not-the-gateway-secret-0123456789abcdef");
    let wrong_key =
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims(600), &other).unwrap();
    assert_refused(&app, &wrong_key).await;
    let mut foreign = claims(600);
    foreign["iss"] = json!("someone-else");
    let foreign = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &foreign, &key).unwrap();
    assert_refused(&app, &foreign).await;
    // The right issuer and key, but meant for another audience; and no audience at all.
    let mut elsewhere = claims(600);
    elsewhere["aud"] = json!("another-service");
    let elsewhere = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &elsewhere, &key).unwrap();
    assert_refused(&app, &elsewhere).await;
    let mut nowhere = claims(600);
    nowhere.as_object_mut().unwrap().remove("aud");
    let nowhere = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &nowhere, &key).unwrap();
    assert_refused(&app, &nowhere).await;
    assert_refused(&app, "garbage").await;
    let res = app
        .client
        .get(app.url("/api/v1/erp/status"))
        .header("authorization", format!("Basic {good}"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 401, "unauthenticated").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_users_exist_only_in_demo_mode() {
    let mut settings = test_settings();
    settings.service.demo = false;
    let app = spawn_with(settings).await;
    let res = app
        .post_json(
            "/api/v1/auth/token",
            None,
            &json!({"username": "admin", "password": "demo-admin"}),
        )
        .await;
    assert_problem(res, 401, "unauthenticated").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn users_created_by_the_admin_commands_can_log_in() {
    let mut settings = test_settings();
    settings.service.demo = false;
    let app = spawn_with(settings.clone()).await;
    let pool = mes_common::db::lazy_pool(&settings.service.database_url, 2).unwrap();
    let hash = gateway::auth::hash_password("a-long-password".into())
        .await
        .unwrap();
    gateway::store::upsert_user(&pool, "alice", &hash, &["quality".to_owned()])
        .await
        .unwrap();
    let enrolled = gateway::cli::execute(
        gateway::cli::Command::parse(
            "device enrol --id TAB-40 --station ST-40"
                .split(' ')
                .map(str::to_owned),
        )
        .unwrap()
        .unwrap(),
        settings.clone(),
    )
    .await
    .unwrap();
    // The enrolment prints the device's secret once.
    let secret = enrolled
        .lines()
        .find_map(|l| l.strip_prefix("device secret: "))
        .expect("the secret is printed")
        .to_owned();
    assert!(secret.len() >= 32, "{secret}");
    let res = app
        .post_json(
            "/api/v1/auth/token",
            None,
            &json!({"username": "alice", "password": "a-long-password", "device_id": "TAB-40",
                    "device_secret": secret}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["roles"], json!(["quality"]));
    assert_eq!(body["station"], "ST-40");
    gateway::store::disable_user(&pool, "alice").await.unwrap();
    let res = app
        .post_json(
            "/api/v1/auth/token",
            None,
            &json!({"username": "alice", "password": "a-long-password"}),
        )
        .await;
    assert_problem(res, 401, "unauthenticated").await;
    pool.close().await;
}
