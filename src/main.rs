//! `gateway`: see `gateway --help`.

use std::process::ExitCode;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use gateway::cli::{Cli, Command, ConfigCommand, TokenCommand};
use gateway::config::{FlagLayer, Loaded};
use gateway::lock::LockState;
use gateway::startup::Application;

/// mimalloc reads its options when the process starts, before `main`:
/// the long-running gateway re-executes itself once with
/// `MIMALLOC_ARENA_EAGER_COMMIT=0` (arena memory committed as it is used:
/// idle RSS ~19 MB instead of ~46 MB), unless the variable is already set
/// (then that value wins). Returns only when it did not re-execute.
fn lazy_commit_or_reexec() {
    const VAR: &str = "MIMALLOC_ARENA_EAGER_COMMIT";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    use std::os::unix::process::CommandExt as _;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(VAR, "0")
        .exec();
    // exec returned: run on as we are.
    eprintln!("note: cannot re-execute with {VAR}=0 ({err}); memory use is higher");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let flags = cli.flags();
    if matches!(cli.command, None | Some(Command::Run)) {
        lazy_commit_or_reexec();
    }
    match cli.command {
        None | Some(Command::Run) => run(&cli, &flags),
        Some(Command::Config(ConfigCommand::Print)) => {
            match Loaded::load(cli.config.as_deref(), true, &flags)
                .and_then(|l| l.settings().map(|s| (l, s)))
            {
                Ok((_, settings)) => {
                    print!("{}", settings.rendered);
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(e),
            }
        }
        Some(Command::Config(ConfigCommand::Check { ref file })) => {
            match Loaded::load(Some(file), false, &FlagLayer::default()).and_then(|l| l.settings())
            {
                Ok(_) => {
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(e),
            }
        }
        Some(
            ref cmd @ (Command::Config(ConfigCommand::Get | ConfigCommand::Set { .. })
            | Command::Dlq(_)
            | Command::Replay { .. }
            | Command::Wal(_)
            | Command::Sink(_)
            | Command::DeviceSend { .. }
            | Command::Route(_)
            | Command::Ping
            | Command::Status),
        ) => gateway::ops_cli::run(&cli, cmd).unwrap_or(ExitCode::from(2)),
        Some(Command::Fleet(ref cmd)) => gateway::fleet_cli::run(cmd, cli.json),
        Some(Command::Healthcheck(ref args)) => {
            match Loaded::load(cli.config.as_deref(), true, &flags).and_then(|l| l.settings()) {
                Ok(settings) => gateway::healthcheck::run(&settings, args),
                Err(e) => {
                    // One line, and "unhealthy" for whoever reads the exit code.
                    println!("unhealthy: configuration: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Token(TokenCommand::New { ref device })) => {
            if !gateway_actors::ingest::validate::is_valid_device_id(device) {
                eprintln!(
                    "error: device id {device:?} must match ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$"
                );
                return ExitCode::from(2);
            }
            match gateway::auth::new_token(device) {
                Ok((token, line)) => {
                    println!("token: {token}");
                    println!("tokens-file line: {line}");
                    eprintln!("Give the token to the device (Authorization: Bearer <token>); append the line to http.device_tokens_file.");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: no randomness available: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn config_error(e: gateway::config::ConfigError) -> ExitCode {
    eprintln!("error: configuration: {e}");
    ExitCode::from(2)
}

fn run(cli: &Cli, flags: &FlagLayer) -> ExitCode {
    let base = match Loaded::load(cli.config.as_deref(), true, flags).and_then(|l| l.settings()) {
        Ok(s) => s,
        Err(e) => return config_error(e),
    };
    // One gateway per data dir; the CLI uses the admin API while we hold it.
    let _lock = match gateway::lock::try_lock(&base.data_dir) {
        Ok(LockState::Acquired(l)) => l,
        Ok(LockState::Held(pid)) => {
            let who = pid.map_or("another process".to_string(), |p| format!("pid {p}"));
            eprintln!(
                "error: data dir {} is in use by {who} (another gateway, or a CLI command); stop it first",
                base.data_dir.display()
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!(
                "error: cannot lock data dir {}: {e}",
                base.data_dir.display()
            );
            return ExitCode::FAILURE;
        }
    };
    // With the lock held: the fleet config bundle this start runs with.
    let (settings, bundle_notes) =
        match gateway::bundles::load_settings(cli.config.as_deref(), flags, base) {
            Ok(s) => s,
            Err(e) => return config_error(e),
        };
    gateway_actors::repeats::configure(settings.log_repeats.burst, settings.log_repeats.interval);
    let telemetry = gateway::telemetry::init_with_traces(
        &settings.log_level,
        settings.otlp_endpoint.as_deref(),
        &settings.gateway_id,
    );
    for note in bundle_notes {
        tracing::warn!(note = %note, "config bundles");
    }
    let system = actix::System::new();
    let result = system.block_on(async move {
        let app = Application::build(settings).await?;
        gateway::sdnotify::notify("READY=1");
        if let Some(every) = gateway::sdnotify::watchdog_interval() {
            // Alive = the WAL writer runs: nothing is acknowledged without it.
            let health = app.handles.wal_health.clone();
            actix_rt::spawn(async move {
                loop {
                    if health.alive.load(std::sync::atomic::Ordering::SeqCst) {
                        gateway::sdnotify::notify("WATCHDOG=1");
                    }
                    actix_rt::time::sleep(every).await;
                }
            });
        }
        app.run_until_stopped().await?;
        anyhow::Ok(())
    });
    let code = match result {
        Ok(()) => {
            tracing::info!("gateway stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "gateway failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Exports the spans still queued.
    telemetry.shutdown();
    if gateway::bundles::reexec_requested() && code == ExitCode::SUCCESS {
        let err = gateway::bundles::reexec();
        eprintln!("error: cannot re-execute the gateway to apply its configuration: {err}");
        return ExitCode::FAILURE;
    }
    code
}
