//! `lb`: the controller daemon and CLI of the XDP DSR load balancer.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "XDP direct-server-return L4 load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load lb_xdp, attach it to the configured interface, fill its maps and keep running
    /// until SIGINT/SIGTERM (then detach cleanly).
    Run(cli::run::Args),
    /// Validate a config file without touching the kernel.
    Check(cli::check::Args),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => cli::run::run(args),
        Command::Check(args) => cli::check::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
