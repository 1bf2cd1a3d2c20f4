//! `lb`: the controller daemon and CLI of the XDP DSR load balancer.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "XDP direct-server-return L4 load balancer"
)]
struct Cli {
    /// Control socket of the running `lb run` (its `[control] socket`).
    #[arg(long, global = true, env = "LB_SOCKET", default_value = lb_userspace::api::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Take over the pinned data plane (or load, fill, attach and pin it) and control it until
    /// SIGINT/SIGTERM; the data plane keeps forwarding after `lb run` exits.
    Run(cli::run::Args),
    /// Remove the data plane and its pinned state (the only way to detach lb_xdp).
    Detach(cli::detach::Args),
    /// Validate a config file without touching the kernel.
    Check(cli::check::Args),
    /// Every service and backend: state, weight, health, active connections, traffic and rates.
    Status(cli::status::Args),
    /// Change a backend at once in the data plane; persisted across restarts.
    Backend {
        #[command(subcommand)]
        cmd: cli::backend::Command,
    },
    /// Re-read the config, validate it fully and apply only the difference (same as SIGHUP).
    Reload,
    /// Which backend a flow has (connection table) or would get, and why:
    /// `lb explain tcp 192.0.2.7 40000 10.0.0.100 80`.
    Explain(cli::explain::Args),
    /// Live view of services and backends (rates, connections, health), refreshed each second;
    /// `--once` prints one frame.
    Top(cli::top::Args),
    /// The data plane's decisions as they happen (filter by VIP, client, backend), with the
    /// frames as sent after the MAC rewrite in a pcapng file (`--pcap`). Needs root.
    Trace(cli::trace::Args),
    /// BGP announcement of the VIPs (`[announce]`): list, announce, withdraw [--graceful].
    Vip {
        #[command(subcommand)]
        cmd: cli::vip::Command,
    },
}

/// Logging through `tracing` on stderr; `RUST_LOG` filters (default `info`); records of the
/// `log` crate (aya-log's eBPF records) are forwarded into it.
fn init_logging(format: cli::run::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        cli::run::LogFormat::Text => builder.try_init(),
        cli::run::LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        Command::Run(a) => a.log_format,
        _ => cli::run::LogFormat::Text,
    };
    init_logging(format);
    let result = match cli.command {
        Command::Run(args) => cli::run::run(args),
        Command::Check(args) => cli::check::run(args),
        Command::Detach(args) => cli::detach::run(args),
        Command::Status(args) => cli::status::run(&cli.socket, args),
        Command::Backend { cmd } => cli::backend::run(&cli.socket, cmd),
        Command::Reload => cli::reload::run(&cli.socket),
        Command::Explain(args) => cli::explain::run(&cli.socket, args),
        Command::Top(args) => cli::top::run(&cli.socket, args),
        Command::Trace(args) => cli::trace::run(args),
        Command::Vip { cmd } => cli::vip::run(&cli.socket, cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if format == cli::run::LogFormat::Json {
                tracing::error!("lb: error: {e:#}");
            } else {
                eprintln!("lb: error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
