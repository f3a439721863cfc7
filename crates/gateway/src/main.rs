//! The gateway binary: serves the REST API, or runs an admin command (`gateway help`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    return_large_allocations_to_the_os();
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

/// Every password hash or check takes a 19 MiB argon2 work area. glibc raises its mmap threshold
/// after the first such block is freed, so later ones come from the heap arenas and stay there:
/// the gateway idled at ~140 MiB after a burst of logins. A fixed threshold keeps large blocks
/// mmapped, and freeing them returns the memory (~24 MiB idle).
fn return_large_allocations_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning, is thread-safe in glibc (it takes the arena
    // locks), and M_MMAP_THRESHOLD accepts any value up to 32 MiB.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
