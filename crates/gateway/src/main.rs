//! The gateway binary: serves the REST API, or runs an admin command (`gateway help`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    gateway::return_large_allocations_to_the_os();
    let settings = gateway::Settings::load()?;
    if let Some(command) = gateway::cli::Command::parse(std::env::args().skip(1))? {
        return gateway::cli::run(command, settings).await;
    }
    let telemetry = mes_common::telemetry::init("gateway", &settings.service)?;
    let app = gateway::Application::build(settings).await?;
    app.run_until_stopped(mes_common::Shutdown::on_signals())
        .await?;
    telemetry.shutdown().await;
    Ok(())
}
