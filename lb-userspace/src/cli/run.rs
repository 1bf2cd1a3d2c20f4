//! `lb run --config <file>`: take over the pinned data plane (or load, fill, attach and pin
//! it), serve the control API until SIGINT/SIGTERM, then exit leaving it forwarding.

use std::path::PathBuf;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, message, fields).
    Json,
}

#[derive(clap::Args)]
pub struct Args {
    /// Config file (TOML).
    #[arg(long, short, default_value_os_t = lb_userspace::config::default_path())]
    pub config: PathBuf,
    /// Print the counters every N seconds (0 = only at exit).
    #[arg(long, default_value_t = 0)]
    pub stats_interval: u64,
    /// Replace a pinned data plane that does not fit this lb or config (another layout, table
    /// sizes or XDP mode), migrating what can be migrated, instead of refusing to start.
    #[arg(long)]
    pub replace: bool,
    /// Log format on stderr (`RUST_LOG` sets the level, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    lb_userspace::controller::run::main(&args.config, args.stats_interval, args.replace)
}
