//! `lb run --config <file>`: load, fill, attach, run until SIGINT/SIGTERM, detach.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use lb_userspace::{
    config::Config, iface::SystemInterfaces, loader::Dataplane, state::DesiredState,
};
use tokio::signal::unix::{SignalKind, signal};

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
    let cfg = Config::load(&args.config)?;
    let mut desired = DesiredState::build(&cfg, &SystemInterfaces)
        .with_context(|| format!("{}", args.config.display()))?;
    let dp = &cfg.dataplane;
    let mut dataplane = Dataplane::load(dp.ring_size, dp.flow_table_size)?;
    dataplane.apply(&desired).context("filling the maps")?;
    let mode = dataplane.attach(&dp.interface, dp.xdp_mode)?;
    let backends: usize = desired.backends.len();
    log::info!(
        "lb_xdp attached to {} in {mode} mode: {} services, {backends} backends, ring {} slots, flow table {}",
        dp.interface,
        desired.services.len(),
        dp.ring_size,
        dp.flow_table_size
    );
    // Machine-readable line for scripts and the lab.
    println!("attached interface={} mode={mode}", dp.interface);

    let logger = dataplane.take_logger();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let mut logs = match logger {
            // SAFETY: the fd is the logger's ring buffer map fd, owned by the logger that the
            // AsyncFd owns: it stays open and the same for the AsyncFd's whole life.
            Some(l) => Some(
                unsafe { tokio::io::unix::AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE) }
                    .map_err(|e| anyhow::anyhow!("watching the eBPF log buffer: {e}"))?,
            ),
            None => None,
        };
        let period = Duration::from_secs(args.stats_interval.max(1));
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = term.recv() => { log::info!("SIGTERM: detaching"); break; }
                _ = int.recv() => { log::info!("SIGINT: detaching"); break; }
                guard = async { logs.as_mut().expect("guarded").readable_mut().await }, if logs.is_some() => {
                    if let Ok(mut g) = guard {
                        g.get_inner_mut().flush();
                        g.clear_ready();
                    }
                }
                _ = hup.recv() => {
                    match reload(&args.config, &cfg, &desired, &mut dataplane) {
                        Ok((next, summary)) => {
                            log::info!("reload: applied ({summary})");
                            println!("reloaded {summary}");
                            desired = next;
                        }
                        Err(e) => {
                            log::error!("reload rejected, running configuration kept: {e:#}");
                            println!("reload-rejected {e:#}");
                        }
                    }
                }
                _ = tick.tick(), if args.stats_interval > 0 => {
                    match dataplane.snapshot(&desired) {
                        Ok(s) => print!("{}", super::report::render(&desired, &s)),
                        Err(e) => log::warn!("reading counters: {e}"),
                    }
                }
            }
        }
        anyhow::Ok(())
    });
    let snap = dataplane.snapshot(&desired);
    dataplane.detach().context("detaching lb_xdp")?;
    log::info!("lb_xdp detached from {}", dp.interface);
    if let Ok(s) = snap {
        print!("{}", super::report::render(&desired, &s));
    }
    result
}

/// Re-reads the config and applies only the difference. A config that fails validation, or
/// that changes the `[dataplane]` section (needs a restart), changes nothing.
fn reload(
    path: &std::path::Path,
    running: &Config,
    current: &DesiredState,
    dataplane: &mut Dataplane,
) -> anyhow::Result<(DesiredState, lb_userspace::state::DiffSummary)> {
    let cfg = Config::load(path)?;
    if cfg.dataplane != running.dataplane {
        anyhow::bail!(
            "{}: [dataplane] changed (interface, xdp_mode, flow_table_size, ring_size): restart lb to apply it",
            path.display()
        );
    }
    let next = DesiredState::next(&cfg, &SystemInterfaces, Some(current))
        .with_context(|| format!("{}", path.display()))?;
    let (ops, summary) = lb_userspace::state::diff(Some(current), &next);
    dataplane
        .apply_ops(&ops, next.ring_size)
        .context("applying the new configuration to the maps")?;
    Ok((next, summary))
}
