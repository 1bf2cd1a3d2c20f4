//! `lb trace [--vip A] [--client A] [--backend A] [--count N] [--rate N] [--seconds S]
//! [--pcap FILE] [--json]`: the data plane's decisions as they happen, with the frames as they
//! left (after the MAC rewrite) in a pcapng file. Reads the maps pinned by `lb run` (root).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, Map, MapData};
use lb_common::{
    Backend, BackendMeta, TRACE_F_BACKEND, TRACE_F_CLIENT, TRACE_F_VIP, TraceConfig,
    limits::MAX_BACKENDS, names, rules::addr_key,
};
use lb_userspace::{
    config::{Config, DEFAULT_PIN_ROOT},
    dataplane::pin,
    trace::{self, LEASE, Pcap, TraceMaps},
};

#[derive(clap::Args)]
pub struct Args {
    /// The config whose data plane to trace (its `dataplane.pin_path`).
    #[arg(long, short, conflicts_with_all = ["interface", "pin_path"])]
    config: Option<PathBuf>,
    /// The interface whose data plane to trace (pinned at the default `/sys/fs/bpf/lb/<IF>`).
    #[arg(long, conflicts_with = "pin_path")]
    interface: Option<String>,
    /// The pin directory of the data plane to trace.
    #[arg(long)]
    pin_path: Option<PathBuf>,
    /// Only packets to this VIP.
    #[arg(long)]
    vip: Option<IpAddr>,
    /// Only packets from this client address.
    #[arg(long)]
    client: Option<IpAddr>,
    /// Only packets sent to this backend (by its address).
    #[arg(long)]
    backend: Option<IpAddr>,
    /// Stop after this many events (default: until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    seconds: Option<u64>,
    /// At most this many events per second and CPU; the rest are counted as suppressed.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Also write the frames (as sent, after the MAC rewrite; dropped ones marked) to this
    /// pcapng file (tcpdump -r, Wireshark).
    #[arg(long)]
    pcap: Option<PathBuf>,
    /// One JSON object per event instead of text.
    #[arg(long)]
    json: bool,
}

fn pin_path(a: &Args) -> anyhow::Result<PathBuf> {
    Ok(match (&a.config, &a.interface, &a.pin_path) {
        (Some(c), _, _) => Config::load(c)?.dataplane.pin_path,
        (_, Some(i), _) => PathBuf::from(DEFAULT_PIN_ROOT).join(i),
        (_, _, Some(p)) => p.clone(),
        _ => {
            Config::load(&lb_userspace::config::default_path())
                .context("no --config, --interface or --pin-path given, and the default config")?
                .dataplane
                .pin_path
        }
    })
}

/// Backend ids in use and their entries, from the pinned `LB_BE_META` and `LB_BACKENDS`.
fn backends(pin: &std::path::Path) -> anyhow::Result<BTreeMap<u32, (BackendMeta, Backend)>> {
    let open = |name: &str| -> anyhow::Result<MapData> {
        MapData::from_pin(pin.join(name)).with_context(|| format!("opening pinned {name}"))
    };
    let meta: Array<MapData, BackendMeta> =
        Array::try_from(Map::Array(open(names::BACKEND_META)?))?;
    let be: Array<MapData, Backend> = Array::try_from(Map::Array(open(names::BACKENDS)?))?;
    let mut out = BTreeMap::new();
    for id in 0..MAX_BACKENDS {
        let Ok(m) = meta.get(&id, 0) else { break };
        if m.family != 0 {
            out.insert(id, (m, be.get(&id, 0)?));
        }
    }
    Ok(out)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let pin = pin_path(&a)?;
    if !pin.join(names::TRACE).exists() {
        bail!(
            "no data plane with tracing pinned at {} (start it with `lb run`; an older layout needs `lb run --replace`)",
            pin.display()
        );
    }
    let _lock = pin::Lock::acquire(&pin.join("trace")).map_err(|e| match e {
        pin::PinError::Locked { pid, .. } => anyhow::anyhow!(
            "another lb trace (pid {pid}) is tracing {}: one trace at a time",
            pin.display()
        ),
        e => e.into(),
    })?;
    let mut maps = TraceMaps::open_pinned(&pin)?;
    let ids = backends(&pin)?;
    let addrs: BTreeMap<u32, IpAddr> =
        trace::backend_addresses(&ids.iter().map(|(id, (m, _))| (*id, *m)).collect());
    let mut cfg = TraceConfig {
        rate: a.rate.max(1),
        ..TraceConfig::default()
    };
    if let Some(v) = a.vip {
        cfg.vip = addr_key(v).0;
        cfg.filters |= TRACE_F_VIP;
    }
    if let Some(c) = a.client {
        cfg.client = addr_key(c).0;
        cfg.filters |= TRACE_F_CLIENT;
    }
    if let Some(b) = a.backend {
        let (_, be) = ids
            .iter()
            .find(|(id, _)| addrs.get(id) == Some(&b))
            .map(|(_, v)| v)
            .with_context(|| format!("--backend {b}: no such backend in the data plane"))?;
        cfg.backend_mac = be.mac;
        cfg.filters |= TRACE_F_BACKEND;
    }
    let mut pcap = match &a.pcap {
        Some(p) => Some(Pcap::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        ))?),
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed))
            .context("installing the Ctrl-C handler")?;
    }
    let stale = maps.reset()?;
    if stale > 0 {
        eprintln!("(dropped {stale} events an earlier trace left in the buffer)");
    }
    let offset = trace::mono_to_unix_ns();
    let lease = |cfg: &mut TraceConfig| cfg.until_ns = trace::clocks().0 + LEASE.as_nanos() as u64;
    lease(&mut cfg);
    maps.set(&cfg)?;
    eprintln!(
        "tracing {} (rate {}/s per CPU{}); Ctrl-C stops",
        pin.display(),
        cfg.rate,
        if a.pcap.is_some() {
            ", pcapng written"
        } else {
            ""
        }
    );
    let started = Instant::now();
    let mut refreshed = Instant::now();
    let mut n = 0u64;
    let result = (|| -> anyhow::Result<()> {
        let stdout = std::io::stdout();
        let mut out = std::io::LineWriter::new(stdout.lock());
        loop {
            for ev in maps.drain() {
                let r = trace::decode(&ev, offset, &addrs);
                use std::io::Write as _;
                if a.json {
                    writeln!(out, "{}", serde_json::to_string(&r)?)?;
                } else {
                    writeln!(out, "{}", trace::text(&r))?;
                }
                if let Some(p) = pcap.as_mut() {
                    p.write(&r)?;
                }
                n += 1;
                if a.count.is_some_and(|c| n >= c) {
                    return Ok(());
                }
            }
            if stop.load(Ordering::Relaxed)
                || a.seconds
                    .is_some_and(|s| started.elapsed() >= Duration::from_secs(s))
            {
                return Ok(());
            }
            if refreshed.elapsed() >= Duration::from_secs(1) {
                refreshed = Instant::now();
                lease(&mut cfg);
                maps.set(&cfg)?;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })();
    // Off again whatever happened: the packet path is back to one branch.
    let off = maps.set(&TraceConfig::default());
    let (suppressed, lost) = maps.losses();
    if let Some(p) = pcap {
        use std::io::Write as _;
        p.into_inner().flush().context("writing the pcap file")?;
    }
    eprintln!(
        "{n} events; {suppressed} suppressed by the rate limit, {lost} lost (ring buffer full)"
    );
    result?;
    off?;
    Ok(())
}
