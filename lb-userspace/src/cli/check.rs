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
    // The packed copy the data plane reads first (maglev/sh; the fields as wide as the
    // configured backends need: each distinct backend of a table takes an index).
    let (mut packed, mut bits, mut wide) = (0usize, 0u64, 0usize);
    for s in cfg.services.iter().filter(|s| {
        matches!(
            s.scheduler,
            lb_userspace::config::Scheduler::Maglev | lb_userspace::config::Scheduler::Sh
        )
    }) {
        match lb_common::packed::bits_for(s.backends.len()) {
            0 => wide += 1,
            k => {
                packed += 1;
                bits += s.ring_size as u64 * k as u64;
            }
        }
    }
    println!(
        "packed copy: {packed} maglev/sh tables in LB_RING_PACKED ({} KiB of {:.1} MiB){}",
        (bits / 8).div_ceil(1024),
        cfg.dataplane.ring_capacity as f64 / (1024.0 * 1024.0),
        if wide > 0 {
            format!("; {wide} with more than 255 backends read LB_RING only")
        } else {
            String::new()
        }
    );
    for w in cfg.warnings() {
        println!("warning: {w}");
    }
    Ok(())
}
