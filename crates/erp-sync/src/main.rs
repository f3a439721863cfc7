use erp_sync::{Application, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    let telemetry = mes_common::telemetry::init("erp-sync", &settings.service)?;
    let app = Application::build(settings).await?;
    let result = app
        .run_until_stopped(mes_common::Shutdown::on_signals())
        .await;
    telemetry.shutdown().await;
    result
}
