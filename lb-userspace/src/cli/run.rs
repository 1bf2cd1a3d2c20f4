//! `lb run --config <file>`: load, fill, attach, serve the control API, run until
//! SIGINT/SIGTERM, detach.

use std::path::PathBuf;

use lb_userspace::daemon::Daemon;

#[derive(clap::Args)]
pub struct Args {
    /// Config file (TOML).
    #[arg(long, short, default_value_os_t = lb_userspace::config::default_path())]
    config: PathBuf,
    /// Print the counters every N seconds (0 = only at exit).
    #[arg(long, default_value_t = 0)]
    stats_interval: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let daemon = Daemon::start(&args.config)?;
    // Machine-readable line for scripts and the lab.
    println!(
        "attached interface={} mode={}",
        daemon.interface(),
        daemon.mode()
    );
    let report = daemon.run(args.stats_interval)?;
    print!("{report}");
    Ok(())
}
