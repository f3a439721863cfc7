use scan_ingest::{Application, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `FAILPOINTS` configures the fault suite's fail points; without the `failpoints` feature
    // there are none and this does nothing.
    let _failpoints = fail::FailScenario::setup();
    let settings = Settings::load()?;
    let telemetry = mes_common::telemetry::init("scan-ingest", &settings.service)?;
    let app = Application::build(settings).await?;
    let result = app
        .run_until_stopped(mes_common::Shutdown::on_signals())
        .await;
    telemetry.shutdown().await;
    result
}
