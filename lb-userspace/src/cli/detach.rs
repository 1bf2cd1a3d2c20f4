//! `lb detach [--config FILE | --interface IF | --pin-path DIR]`: the only way the data plane
//! and its pinned state are removed.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use lb_userspace::{
    config::{Config, DEFAULT_PIN_ROOT},
    dataplane::pin,
};

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct Args {
    /// The config whose `dataplane.pin_path` to remove.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The interface whose data plane to remove (pinned at the default `/sys/fs/bpf/lb/<IF>`).
    #[arg(long)]
    interface: Option<String>,
    /// The pin directory to remove.
    #[arg(long)]
    pin_path: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let pin_path = match (args.config, args.interface, args.pin_path) {
        (Some(c), _, _) => Config::load(&c)?.dataplane.pin_path,
        (_, Some(i), _) => PathBuf::from(DEFAULT_PIN_ROOT).join(i),
        (_, _, Some(p)) => p,
        _ => bail!("give --config, --interface or --pin-path"),
    };
    // Refused while a controller runs: it holds the lock (and would pin the link again).
    let lock = pin::Lock::acquire(&pin_path)?;
    if !pin_path.exists() {
        println!("nothing pinned at {}", pin_path.display());
    } else {
        let removed =
            pin::remove(&pin_path).with_context(|| format!("removing {}", pin_path.display()))?;
        for r in &removed {
            println!("removed {r}");
        }
        println!(
            "detached: lb_xdp is no longer attached (its link was unpinned) and nothing is left at {}",
            pin_path.display()
        );
    }
    let _ = std::fs::remove_file(&lock.path);
    Ok(())
}
