//! `lb check --config <file>`: validate without touching the kernel.

use std::path::PathBuf;

use lb_userspace::config::Config;

#[derive(clap::Args)]
pub struct Args {
    /// Config file (TOML).
    #[arg(long, short, default_value_os_t = lb_userspace::config::default_path())]
    config: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config)?;
    let backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
    println!(
        "{}: OK ({} services, {} backends, interface {}, xdp_mode {})",
        args.config.display(),
        cfg.services.len(),
        backends,
        cfg.dataplane.interface,
        cfg.dataplane.xdp_mode
    );
    let slots: u64 = cfg.services.iter().map(|s| s.ring_size as u64).sum();
    let mib = |n: u64| n as f64 * 4.0 / (1024.0 * 1024.0);
    println!(
        "tables: {slots} of {} slots in LB_RING ({:.1} of {:.1} MiB)",
        cfg.dataplane.ring_capacity,
        mib(slots),
        mib(cfg.dataplane.ring_capacity as u64)
    );
    for w in cfg.warnings() {
        println!("warning: {w}");
    }
    Ok(())
}
