//! The service's internal-call surface: no start without the internal key outside demo mode,
//! unsigned calls refused, reflection for both protocol versions.

// The shared harness re-exports helpers (wait_for) this file has no use for.
#![allow(unused_imports)]

mod common;

use common::*;
use mes_common::testing::{reflection_services, unsigned_channel};
use mes_proto::v1 as pb;
use pb::scan_ingest_client::ScanIngestClient;

#[tokio::test]
async fn without_an_internal_key_it_refuses_to_start_outside_demo_mode() {
    let mut settings = scan_ingest::Settings::default();
    let name = format!("mes_test_si_{}", uuid::Uuid::new_v4().simple());
    // Refused before anything is created (a database would be dropped by the guard anyway).
    let _db = mes_common::testing::DbGuard {
        url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
    };
    settings.service.database_url = _db.url.clone();
    settings.service.listen_addr = "127.0.0.1:0".into();
    settings.service.metrics_addr = String::new();
    assert!(settings.service.internal_key.is_empty() && !settings.service.demo);
    let err = match scan_ingest::Application::build(settings).await {
        Ok(_) => panic!("started without an internal key outside demo mode"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("MES_INTERNAL_KEY"), "names the setting: {err}");
}

#[tokio::test]
async fn in_demo_mode_it_starts_without_a_key_and_trusts_callers() {
    let app = spawn_app_with(|s| {
        s.service.internal_key = Default::default();
        s.service.demo = true;
    })
    .await;
    load_demo_plant(&app).await;
    let mut plain = ScanIngestClient::new(unsigned_channel(app.port));
    plain
        .get_lot(mes_common::testing::with_caller(
            pb::GetLotRequest {
                lot: "STEEL-L1".into(),
            },
            operator(),
        ))
        .await
        .expect("an unsigned call is served in keyless demo mode");
}

#[tokio::test]
async fn with_its_key_unsigned_calls_are_refused_and_signed_ones_served() {
    let app = spawn_app().await;
    load_demo_plant(&app).await;
    let get = || {
        mes_common::testing::with_caller(
            pb::GetLotRequest {
                lot: "STEEL-L1".into(),
            },
            operator(),
        )
    };
    let mut plain = ScanIngestClient::new(unsigned_channel(app.port));
    let refused = plain.get_lot(get()).await.expect_err("unsigned");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("missing caller signature"),
        "{refused:?}"
    );
    app.scans().get_lot(get()).await.expect("a signed call");
}

#[tokio::test]
async fn reflection_answers_v1alpha_and_v1_clients() {
    let app = spawn_app().await;
    for v1alpha in [true, false] {
        let services = reflection_services(unsigned_channel(app.port), v1alpha)
            .await
            .unwrap_or_else(|e| panic!("reflection (v1alpha: {v1alpha}): {e:?}"));
        for s in ["mes.v1.ScanIngest", "mes.v1.MasterData", "mes.v1.EventFeed"] {
            assert!(services.iter().any(|n| n == s), "{s} in {services:?}");
        }
    }
}
