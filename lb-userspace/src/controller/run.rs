//! `lb run`: the async event loop around the [`Controller`]. One task owns the controller; the
//! control API, the check tasks, the netlink watcher and the signals send it events.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};

use super::{Controller, socket::ControlSocket};
use crate::{
    admin::AdminState,
    api::server::{self, Envelope, Request, message},
    config::Config,
    dataplane::{AttachedMode, Dataplane},
    dataplane::{LoaderError, loader::check_pinned, pin},
    health::tasks::{CheckBatch, Checks},
    iface::SystemInterfaces,
    neigh::Resolver,
    neigh::{
        NeighEvent,
        netlink::{self, SystemNeighbours},
    },
    stats::Snapshot,
};

type Ctl = Controller<Dataplane, SystemNeighbours, SystemInterfaces>;

/// SIGTERM, SIGINT and SIGHUP, caught from the moment [`Signals::install`] returns (call it
/// first thing: a signal before it would kill the process).
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Must run inside a tokio runtime.
    pub fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
        })
    }
}

/// CLOCK_MONOTONIC_COARSE in ns: the clock of `bpf_ktime_get_coarse_ns()`.
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Takes the data plane over (or loads and attaches it), serves until SIGINT/SIGTERM, then
/// exits leaving the data plane forwarding with its last state. Prints
/// `attached interface=<if> mode=<mode> adopted=<bool>` once attached, and the final counters.
pub async fn serve(
    config_path: PathBuf,
    stats_interval: u64,
    replace: bool,
    mut sig: Signals,
) -> anyhow::Result<()> {
    let cfg = Config::load(&config_path)?;
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    let dpc = cfg.dataplane.clone();
    let pin = dpc.pin_path.clone();
    // One controller per pin directory (interface): a lock, held until this process ends.
    let _lock = pin::Lock::acquire(&pin)?;
    let state_file = cfg.control.state_file.clone();
    let n = AdminState::remove_leftovers(&state_file);
    if n > 0 {
        tracing::warn!(
            "removed {n} temporary file(s) an interrupted write of {} left behind",
            state_file.display()
        );
    }
    let admin = AdminState::load(&state_file)?;
    // The socket before the data plane: a second `lb run` on the same socket is refused
    // before it touches anything.
    let mut socket = ControlSocket::bind(&cfg.control.socket, cfg.control.socket_group())?;
    let metrics = match cfg.control.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("control.metrics: cannot listen on {addr}"))?,
        ),
        None => None,
    };

    pin::ensure_bpffs(&pin)?;
    let mut replaced: Option<PathBuf> = None;
    let mut existing = pin::is_pinned(&pin);
    if existing && let Err(why) = check_pinned(&pin, &dpc) {
        if !replace {
            return Err(LoaderError::Incompatible {
                path: pin.clone(),
                why,
            }
            .into());
        }
        // bpffs forbids dots in names.
        let old = pin.with_file_name(format!(
            "{}-replaced-{}",
            pin.file_name().and_then(|n| n.to_str()).unwrap_or("lb"),
            std::process::id()
        ));
        std::fs::rename(&pin, &old)
            .with_context(|| format!("moving {} aside to {}", pin.display(), old.display()))?;
        std::fs::create_dir_all(&pin).with_context(|| format!("creating {}", pin.display()))?;
        tracing::warn!(
            "--replace: the data plane pinned at {} did not fit ({why}); replacing it",
            pin.display()
        );
        replaced = Some(old);
        existing = false;
    }
    // Maps pinned by this start alone are removed again if it fails before attaching.
    let mut fresh = FreshPins {
        path: (!existing && replaced.is_none()).then(|| pin.clone()),
    };
    // The interface's MAC: lb_xdp forwards only frames addressed to it.
    let if_mac = {
        use crate::iface::Interfaces as _;
        SystemInterfaces
            .lookup(&dpc.interface)
            .map_err(|e| anyhow::anyhow!("dataplane.interface: {e}"))?
            .1
    };
    let mut dp = Dataplane::load_pinned(dpc.ring_capacity, dpc.flow_table_size, &pin, if_mac.0)?;
    // Before the program is attached (or swapped into the pinned link): this program's own.
    dp.set_record_limit(dpc.record_limit)
        .context("dataplane.record_limit: setting it in LB_RECORD_RATE")?;
    // The controller records "at_syn" SYNs from LB_RECORD (drained below, from its first write).
    let deferring = dp
        .set_defer_records(dpc.defer_records)
        .context("dataplane.defer_records: setting it in LB_RECORD_RATE")?;
    if dpc.defer_records && !deferring {
        tracing::warn!(
            "dataplane.defer_records: this program has no LB_RECORD: SYNs are recorded on the packet path"
        );
    }
    if !existing {
        dp.write_meta(&dpc)?;
    }
    if let Some(old) = &replaced {
        for line in dp.migrate_from(old)? {
            tracing::warn!("--replace: {line}");
        }
    }
    let adopted = if existing || replaced.is_some() {
        let a = dp.read_adopted()?;
        tracing::info!(
            "taking over the data plane pinned at {}: {} services, {} backends, {} flows",
            pin.display(),
            a.services.len(),
            a.backends.len(),
            a.flows
        );
        Some(a)
    } else {
        None
    };
    let logger = dp.take_logger();
    let sync_maps = match &cfg.flow_sync {
        Some(_) => Some(dp.take_sync_maps().context(
            "flow_sync: the data plane has no LB_SYNC maps (an older pinned data plane? run `lb run --replace`)",
        )?),
        None => None,
    };
    let (announce_cfg, sync_cfg) = (cfg.announce.clone(), cfg.flow_sync.clone());

    // The neighbour table first: a backend without `mac` must not look unresolved (and lose
    // its flows) just because the dump has not arrived yet.
    let (ntx, mut nrx) = mpsc::channel::<NeighEvent>(4096);
    let watcher = tokio::spawn(async move {
        loop {
            match netlink::watch(ntx.clone()).await {
                Err(e) if !ntx.is_closed() => {
                    tracing::warn!("neighbour events: {e}; subscribing again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => return,
            }
        }
    });
    let mut resolver = Resolver::default();
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(ev)) = tokio::time::timeout_at(until, nrx.recv()).await {
        let done = matches!(ev, NeighEvent::Synced);
        resolver.apply(&ev);
        if done {
            break;
        }
    }
    let mut ctl: Ctl = Controller::new(
        &config_path,
        cfg,
        admin,
        dp,
        SystemNeighbours,
        SystemInterfaces,
        adopted.as_ref(),
        resolver,
    )?;
    // Give first resolutions a moment (an ARP/NDP round trip) before attaching.
    if ctl.probe_unresolved() > 0 {
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while !ctl.unresolved().is_empty() {
            match tokio::time::timeout_at(until, nrx.recv()).await {
                Ok(Some(ev)) => ctl.on_neighbour(ev),
                _ => break,
            }
        }
    }
    for id in ctl.unresolved() {
        if let Some(i) = ctl.desired().backend_info.get(&id) {
            tracing::warn!(
                "neighbour: service \"{}\" backend {} unresolved at start: {}",
                i.service,
                i.address,
                i.decision.reason
            );
        }
    }
    let (mode, took_over) =
        ctl.maps()
            .attach_pinned(&dpc.interface, dpc.xdp_mode, &pin, replaced.as_deref())?;
    fresh.path = None;
    if mode == AttachedMode::Native {
        vlan_offload(&dpc);
    }
    if let Some(old) = &replaced {
        match pin::remove(old) {
            Ok(_) => tracing::info!("--replace: removed the old maps at {}", old.display()),
            Err(e) => tracing::warn!("--replace: removing {}: {e}", old.display()),
        }
    }
    let overrides: usize = ctl.admin.backends.values().map(|m| m.len()).sum();
    tracing::info!(
        "lb_xdp {} {} in {mode} mode (pinned at {}): {} services, {} backends, tables {} slots (default {} per service), flow table {}{}",
        if took_over {
            "replaced in place (bpf_link_update) on"
        } else {
            "attached to"
        },
        dpc.interface,
        pin.display(),
        ctl.desired().services.len(),
        ctl.desired().backends.len(),
        dpc.ring_capacity,
        dpc.ring_size,
        dpc.flow_table_size,
        if overrides > 0 {
            format!(
                ", {overrides} admin overrides from {}",
                state_file.display()
            )
        } else {
            String::new()
        }
    );
    // Machine-readable line for scripts and the lab.
    println!(
        "attached interface={} mode={mode} adopted={took_over}",
        dpc.interface
    );

    // Several nodes: the announcement's liveness device, flow sharing.
    let mut cluster = Cluster {
        announcer: announce_cfg
            .map(crate::announce::Announcer::new)
            .transpose()?,
        sync: None,
        shared: None,
    };
    if let (Some(fs), Some(maps)) = (&sync_cfg, sync_maps) {
        let (s, rx) = super::cluster::Sync::start(fs, maps)?;
        cluster.sync = Some(s);
        cluster.shared = Some(rx);
    }

    let result = event_loop(
        &mut ctl,
        &mut sig,
        &mut socket,
        &mut nrx,
        logger,
        (mode, took_over),
        stats_interval,
        metrics,
        &mut cluster,
    )
    .await;
    if let Some(a) = cluster.announcer.take() {
        a.shutdown().await;
    }
    // SYNs are recorded on the packet path again while no controller runs.
    ctl.stop_deferring();
    if let Some(s) = cluster.sync.take() {
        s.stop();
    }
    watcher.abort();
    let snap = ctl.snapshot();
    tracing::info!(
        "lb_xdp stays attached to {} with its last state (pinned at {}); health checks and \
         neighbour updates stop until `lb run` starts again; `lb detach` removes it",
        dpc.interface,
        pin.display()
    );
    drop(socket);
    result?;
    if let Ok(s) = snap {
        print!("{}", crate::report::render(ctl.desired(), &s));
    }
    Ok(())
}

/// Native mode: receive-VLAN offload hides 802.1Q tags from XDP, and XDP_TX then sends
/// tagged traffic out untagged. Turned off (`dataplane.rx_vlan_offload = "off"`, the default)
/// or warned about (`"keep"`).
fn vlan_offload(dpc: &crate::config::Dataplane) {
    use crate::config::RxVlanOffload;
    let ifname = &dpc.interface;
    match crate::iface::rx_vlan_offload(ifname) {
        Ok(Some(true)) => match dpc.rx_vlan_offload {
            RxVlanOffload::Off => match crate::iface::disable_rx_vlan_offload(ifname) {
                Ok(()) => tracing::info!(
                    "receive-VLAN offload on {ifname} turned off (as `ethtool -K {ifname} rxvlan off`;                      dataplane.rx_vlan_offload = \"off\"): with it, native XDP never sees 802.1Q tags \
                     and tagged VIP traffic would leave untagged"
                ),
                Err(e) => tracing::warn!(
                    "receive-VLAN offload on {ifname} could not be turned off ({e}): VLAN-tagged VIP \
                     traffic will leave untagged; run `ethtool -K {ifname} rxvlan off` or use \
                     xdp_mode = \"generic\""
                ),
            },
            RxVlanOffload::Keep => tracing::warn!(
                "receive-VLAN offload is on for {ifname} and kept (dataplane.rx_vlan_offload = \"keep\"): \
                 native XDP does not see 802.1Q tags, so VLAN-tagged VIP traffic leaves untagged; \
                 fine only without tagged VIP traffic (else `ethtool -K {ifname} rxvlan off`)"
            ),
        },
        Ok(_) => {}
        Err(e) => tracing::debug!("reading the offload flags of {ifname}: {e}"),
    }
}

/// What runs only with several nodes: `[announce]` and `[flow_sync]`.
struct Cluster {
    announcer: Option<crate::announce::Announcer>,
    sync: Option<super::cluster::Sync>,
    /// Flows the peers shared, authenticated by the receiver task.
    shared: Option<mpsc::Receiver<Vec<crate::flowsync::SharedFlow>>>,
}

impl Cluster {
    /// Decides the VIPs again and tells BIRD what changed. `fresh`: counters read just now
    /// (drains advance on them only: an older sample could look like counters going back).
    async fn announce(&mut self, ctl: &Ctl, fresh: Option<&Snapshot>) {
        let Some(a) = self.announcer.as_mut() else {
            return;
        };
        let flows = fresh.map(|s| ctl.vip_new_flows(s));
        a.update(&ctl.vip_inputs(), ctl.withdrawn_vips(), flows.as_ref())
            .await;
    }

    fn extra(&self) -> Extra {
        (
            self.announcer.as_ref().map(|a| a.status().to_vec()),
            self.sync.as_ref().map(|s| s.stats()),
        )
    }
}

/// What `lb status` adds for several nodes.
type Extra = (
    Option<Vec<crate::announce::VipStatus>>,
    Option<crate::flowsync::SyncStats>,
);

/// `lb vip announce|withdraw`.
async fn vip_request(
    ctl: &mut Ctl,
    cluster: &mut Cluster,
    service: &str,
    action: crate::api::server::VipAction,
    caller: &str,
) -> server::Reply {
    use crate::api::server::VipAction;
    if cluster.announcer.is_none() {
        return Err(not_announcing());
    }
    let withdraw = matches!(action, VipAction::Withdraw { .. });
    let (vip, sharing) = ctl.vip_admin(service, withdraw)?;
    if let Some(a) = cluster.announcer.as_mut() {
        match action {
            VipAction::Withdraw { graceful: true } => a.drain(vip),
            _ => a.cancel_drain(vip),
        }
    }
    let fresh = ctl.snapshot().ok();
    cluster.announce(ctl, fresh.as_ref()).await;
    let a = cluster.announcer.as_ref().expect("checked");
    let st = a.status().iter().find(|s| s.vip == vip);
    let (route, reason) = st.map_or(("unknown".to_owned(), String::new()), |s| {
        (s.route.to_string(), s.reason.clone())
    });
    tracing::info!("control API: {caller}: vip {action} {service}: VIP {vip} {route}");
    let mut m = format!("VIP {vip} {route}: {reason}");
    if sharing.len() > 1 {
        m.push_str(&format!(
            " (the VIP carries services {})",
            sharing.join(", ")
        ));
    }
    if let Some(e) = a.last_error() {
        m.push_str(&format!("; BIRD not updated yet: {e}"));
    }
    Ok(serde_json::json!({
        "message": m,
        "vip": vip,
        "route": route,
    }))
}

fn not_announcing() -> crate::api::ApiError {
    crate::api::ApiError::new(
        axum::http::StatusCode::CONFLICT,
        "this lb does not announce VIPs: add an [announce] section to the config (README, Running several nodes)",
    )
}

/// Pinned maps of a start that has not attached yet: removed if it fails.
struct FreshPins {
    path: Option<PathBuf>,
}

impl Drop for FreshPins {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            match pin::remove(&p) {
                Ok(_) => tracing::info!(
                    "start failed: removed the maps it had pinned at {}",
                    p.display()
                ),
                Err(e) => tracing::warn!("start failed; removing {}: {e}", p.display()),
            }
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "what serve() set up, each handed over once"
)]
async fn event_loop(
    ctl: &mut Ctl,
    sig: &mut Signals,
    socket: &mut ControlSocket,
    nrx: &mut mpsc::Receiver<NeighEvent>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    mode: (AttachedMode, bool),
    stats_interval: u64,
    metrics: Option<tokio::net::TcpListener>,
    cluster: &mut Cluster,
) -> anyhow::Result<()> {
    let listener = socket
        .listener
        .take()
        .context("control socket already served")?;
    let (tx, mut rx) = mpsc::channel::<Envelope>(64);
    let metrics_server = metrics.map(|l| {
        let app = server::metrics_router(tx.clone());
        if let Ok(a) = l.local_addr() {
            tracing::info!("metrics on http://{a}/metrics");
        }
        tokio::spawn(async move { axum::serve(l, app).await })
    });
    let app = server::router(tx);
    let policy = crate::api::access::Policy {
        // SAFETY: geteuid(2) has no preconditions.
        owner: unsafe { libc::geteuid() },
        group: ctl.config().control.group.clone(),
        read_group: ctl.config().control.read_group.clone(),
    };
    let server = tokio::spawn(server::serve_unix(
        listener,
        app,
        policy,
        server::Limits::default(),
    ));
    let c = &ctl.config().control;
    tracing::info!(
        "control API on {} ({}; at most {} connections at once)",
        c.socket.display(),
        match (&c.group, &c.read_group) {
            (None, None) => "mode 0600: root and this user only".to_owned(),
            (g, r) => format!(
                "mode 0660; full access: root{}; read-only: {}",
                g.as_ref()
                    .map(|g| format!(", group {}", g.name))
                    .unwrap_or_default(),
                r.as_ref()
                    .map_or("none".to_owned(), |g| format!("group {}", g.name))
            ),
        },
        server::Limits::default().connections
    );
    let telemetry = crate::metrics::Telemetry::default();

    let mut logs = match logger {
        // SAFETY: the fd is the logger's ring buffer map fd, owned by the logger that the
        // AsyncFd owns: it stays open and the same for the AsyncFd's whole life.
        Some(l) => Some(
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE)
            }
            .map_err(|e| anyhow::anyhow!("watching the eBPF log buffer: {e}"))?,
        ),
        None => None,
    };
    let (check_tx, mut check_rx) = mpsc::channel::<CheckBatch>(1024);
    let mut checks = Checks::new(check_tx);
    sync_checks(ctl, &mut checks);
    let started = Instant::now();
    let mut samples: [Option<(Instant, Snapshot)>; 2] = [None, None];
    // Entries at the last sweep; expired, and connections uncounted by the sweeps so far.
    let mut flows = (0u64, 0u64, 0u64);
    let mut sample = tokio::time::interval(Duration::from_secs(1));
    let mut probe_tick = tokio::time::interval(Duration::from_millis(500));
    let t = &ctl.config().timeouts;
    let every = (t.tcp.min(t.tcp_fin).min(t.udp) / 2).clamp(1, 10);
    let mut sweep = tokio::time::interval(Duration::from_secs(every as u64));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A sweep's steps, 1 ms apart: the loop's other work and the runtime's other tasks (the
    // control API, HTTP checks) run between them.
    let mut sweep_steps = tokio::time::interval(Duration::from_millis(1));
    // Entries a step walks, adjusted to this host's speed (see `next_step_budget`).
    let mut step_budget = crate::controller::SWEEP_STEP_ENTRIES;
    sweep_steps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut printed = Instant::now();
    let mut flush = tokio::time::interval(Duration::from_millis(10));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_tick = tokio::time::interval(Duration::from_millis(100));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // LB_RECORD (dataplane.defer_records): the SYNs handed over are recorded within 10 ms while
    // they come; after a drain that found none the next is 50 ms later (an idle controller
    // does not wake 100 times a second for nothing; a burst meanwhile waits in LB_RECORD, and
    // every map write, sweep and control request drains it first).
    const RECORDS_BUSY: Duration = Duration::from_millis(10);
    const RECORDS_IDLE: Duration = Duration::from_millis(50);
    let records = tokio::time::sleep(RECORDS_BUSY);
    tokio::pin!(records);
    let deferring = crate::dataplane::Maps::defers_records(ctl.maps());
    take_sample(ctl, &mut samples);
    cluster
        .announce(ctl, samples[1].as_ref().map(|(_, s)| s))
        .await;
    loop {
        tokio::select! {
            _ = sig.term.recv() => {
                tracing::info!("SIGTERM: exiting (the data plane stays)");
                break;
            }
            _ = sig.int.recv() => {
                tracing::info!("SIGINT: exiting (the data plane stays)");
                break;
            }
            _ = sig.hup.recv() => match reload(ctl, &mut checks) {
                Ok(summary) => {
                    telemetry.reload(true);
                    cluster.announce(ctl, None).await;
                    println!("reloaded {summary}")
                }
                Err(e) => {
                    telemetry.reload(false);
                    println!("reload-rejected {e}")
                }
            },
            Some((req, reply)) = rx.recv() => {
                // Every connection whose SYN was handed over before the request is recorded
                // and counted in what it reads (`lb status` would otherwise lag by up to the
                // 10 ms between drains).
                if deferring {
                    ctl.drain_records();
                }
                let r = match req {
                    Request::Status => status(ctl, &mut samples, mode, started, flows, cluster.extra()),
                    Request::Vips => match &cluster.announcer {
                        Some(a) => Ok(serde_json::json!({
                            "vips": a.status(),
                            "bird_error": a.last_error(),
                        })),
                        None => Err(not_announcing()),
                    },
                    Request::Vip { service, action, caller } => {
                        let r = vip_request(ctl, cluster, &service, action, &caller).await;
                        if let Err(e) = &r {
                            tracing::warn!(
                                "control API: {caller}: vip {action} {service} refused: {}",
                                e.message
                            );
                        }
                        r
                    }
                    Request::Reload { caller } => {
                        tracing::info!("control API: reload requested by {caller}");
                        let r = reload(ctl, &mut checks);
                        telemetry.reload(r.is_ok());
                        if r.is_ok() {
                            cluster.announce(ctl, None).await;
                        }
                        r.map(|s| message(format!("reloaded: {s}")))
                            .map_err(|e| crate::api::ApiError::new(
                                axum::http::StatusCode::UNPROCESSABLE_ENTITY, e))
                    }
                    Request::Explain(q) => ctl
                        .explain(&q, coarse_now_ns())
                        .map(|e| serde_json::to_value(e).expect("serializes")),
                    Request::Metrics => status_now(ctl, &samples, mode, started, flows, cluster.extra())
                        .map(|st| serde_json::Value::String(
                            crate::metrics::render(&st, &telemetry))),
                    Request::Backend { service, address, action, caller } => {
                        let r = ctl.admin(&service, address, action);
                        match &r {
                            Ok(m) => tracing::info!(
                                "control API: {caller}: backend {action} {service} {address}: {m}"
                            ),
                            Err(e) => tracing::warn!(
                                "control API: {caller}: backend {action} {service} {address} refused: {}",
                                e.message
                            ),
                        }
                        if r.is_ok() {
                            cluster.announce(ctl, None).await;
                        }
                        r.map(message)
                    }
                };
                let _ = reply.send(r);
            }
            Some(batch) = check_rx.recv() => {
                let mut any = false;
                for res in batch {
                    if !checks.current(&res) {
                        continue;
                    }
                    any = true;
                    telemetry.check(res.id.0, res.result.is_ok(), res.duration.as_secs_f64(), || {
                        let info = ctl.desired().backend_info.get(&res.id)?;
                        Some((info.service.clone(), info.address))
                    });
                    ctl.on_check(res.id, res.result, res.finished);
                }
                // A VIP waiting for its backends is announced as soon as they pass.
                if any && cluster.announcer.as_ref().is_some_and(|a| {
                    a.status().iter().any(|s| s.route != crate::announce::Route::Announced)
                }) {
                    cluster.announce(ctl, None).await;
                }
            }
            ready = async { cluster.sync.as_mut().expect("guarded").ring.readable_mut().await }, if cluster.sync.is_some() => {
                match ready {
                    Ok(mut g) => g.clear_ready(),
                    Err(e) => tracing::warn!("flow sharing: LB_SYNC: {e}"),
                }
                if let Some(s) = cluster.sync.as_mut() {
                    s.drain_ring(|ev| ctl.shared_of(ev));
                }
            }
            _ = flush.tick(), if cluster.sync.as_ref().is_some_and(|s| s.pending()) => {
                if let Some(s) = cluster.sync.as_mut() {
                    s.flush();
                }
            }
            Some(batch) = async { cluster.shared.as_mut().expect("guarded").recv().await }, if cluster.shared.is_some() => {
                accept_shared(ctl, cluster, &batch);
            }
            _ = drain_tick.tick(), if cluster.announcer.as_ref().is_some_and(|a| a.draining()) => {
                let fresh = ctl.snapshot().ok();
                cluster.announce(ctl, fresh.as_ref()).await;
            }
            () = &mut records, if deferring => {
                let next = if ctl.drain_records() > 0 { RECORDS_BUSY } else { RECORDS_IDLE };
                records.as_mut().reset(tokio::time::Instant::now() + next);
            }
            Some(ev) = nrx.recv() => ctl.on_neighbour(ev),
            _ = probe_tick.tick() => ctl.tick(),
            _ = sweep.tick() => {
                if let Ok(true) = ctl.maps().clear_expired_trace(coarse_now_ns()) {
                    tracing::info!("a trace's lease ran out (its lb trace ended without switching it off): tracing off");
                }
                // A sweep still under way (a very large table on a slow host) goes on.
                if !ctl.sweeping()
                    && let Err(e) = ctl.sweep_begin(coarse_now_ns())
                {
                    tracing::warn!("sweeping the connection table: {e}");
                }
            }
            // The sweep in steps: what arrives meanwhile is handled between them.
            _ = sweep_steps.tick(), if ctl.sweeping() => {
                let t = Instant::now();
                let stepped = ctl.sweep_step(step_budget);
                step_budget = crate::controller::next_step_budget(step_budget, t.elapsed());
                match stepped {
                    None => {}
                    Some(Ok(s)) => {
                        flows.0 = s.entries - s.expired;
                        flows.1 += s.expired;
                        flows.2 += s.uncounted;
                        if s.expired > 0 {
                            tracing::debug!("sweep: {} of {} flows expired", s.expired, s.entries);
                        }
                        if s.uncounted > 0 {
                            tracing::info!(
                                "sweep: {} counted connections without an entry in the connection table (evicted when it was full, or closed while the sweep walked it) no longer counted",
                                s.uncounted
                            );
                        }
                    }
                    Some(Err(e)) => tracing::warn!("sweeping the connection table: {e}"),
                }
            }
            _ = sample.tick() => {
                take_sample(ctl, &mut samples);
                cluster.announce(ctl, samples[1].as_ref().map(|(_, s)| s)).await;
                if stats_interval > 0 && printed.elapsed() >= Duration::from_secs(stats_interval) {
                    printed = Instant::now();
                    if let Some((_, s)) = &samples[1] {
                        print!("{}", crate::report::render(ctl.desired(), s));
                    }
                }
            }
            guard = async { logs.as_mut().expect("guarded").readable_mut().await }, if logs.is_some() => {
                if let Ok(mut g) = guard {
                    g.get_inner_mut().flush();
                    g.clear_ready();
                }
            }
        }
    }
    server.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    checks.stop_all();
    tracing::info!("health checks stopped");
    Ok(())
}

/// Inserts flows the peers shared (already authenticated) and counts what became of them.
fn accept_shared(ctl: &mut Ctl, cluster: &mut Cluster, batch: &[crate::flowsync::SharedFlow]) {
    use super::Shared;
    let now = coarse_now_ns();
    let (mut inserted, mut existing, mut unknown) = (0u64, 0u64, 0u64);
    for f in batch {
        match ctl.accept_shared(f, now) {
            Ok(Shared::Inserted) => inserted += 1,
            Ok(Shared::Existing) => existing += 1,
            Ok(Shared::Unknown) => unknown += 1,
            Err(e) => {
                tracing::warn!("flow sharing: inserting a shared flow: {e}");
                unknown += 1;
            }
        }
    }
    if let Some(s) = &cluster.sync {
        let mut st = s.stats.lock().expect("not poisoned");
        st.inserted += inserted;
        st.existing += existing;
        st.unknown += unknown;
    }
}

/// Starts, keeps or stops check tasks to match the config, and the health table with them.
fn sync_checks(ctl: &mut Ctl, checks: &mut Checks) {
    let wanted = ctl.wanted_checks();
    let r = checks.sync(&wanted);
    if !r.restarted.is_empty() || !r.started.is_empty() || !r.stopped.is_empty() {
        tracing::debug!(
            "health checks: {} kept, {} started, {} restarted (config changed), {} stopped",
            r.kept.len(),
            r.started.len(),
            r.restarted.len(),
            r.stopped.len()
        );
    }
    ctl.sync_health(wanted.keys().copied().collect::<BTreeSet<_>>());
}

fn reload(ctl: &mut Ctl, checks: &mut Checks) -> Result<String, String> {
    match ctl.reload_file() {
        Ok(summary) => {
            sync_checks(ctl, checks);
            tracing::info!("reload: applied ({summary})");
            Ok(summary.to_string())
        }
        Err(e) => {
            tracing::error!("reload rejected: {}", e.message);
            Err(e.message)
        }
    }
}

fn take_sample(ctl: &mut Ctl, samples: &mut [Option<(Instant, Snapshot)>; 2]) {
    match ctl.snapshot() {
        Ok(s) => {
            samples[0] = samples[1].take();
            samples[1] = Some((Instant::now(), s));
        }
        Err(e) => tracing::warn!("reading counters: {e}"),
    }
}

fn status(
    ctl: &mut Ctl,
    samples: &mut [Option<(Instant, Snapshot)>; 2],
    mode: (AttachedMode, bool),
    started: Instant,
    flows: (u64, u64, u64),
    extra: Extra,
) -> server::Reply {
    if samples[1].is_none() {
        take_sample(ctl, samples);
    }
    let Some((t1, s1)) = &samples[1] else {
        return Err(crate::api::ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "no counters yet",
        ));
    };
    let before = samples[0].as_ref().map(|(t, s)| (*t, s));
    let st = report(ctl, (*t1, s1), before, mode, started, flows, extra)?;
    Ok(serde_json::to_value(st).expect("serializes"))
}

/// The report on a fresh read of the counters (rates against the last periodic sample),
/// leaving the periodic samples as they are: for a scrape, exact at the time it is made.
fn status_now(
    ctl: &mut Ctl,
    samples: &[Option<(Instant, Snapshot)>; 2],
    mode: (AttachedMode, bool),
    started: Instant,
    flows: (u64, u64, u64),
    extra: Extra,
) -> Result<crate::api::Status, crate::api::ApiError> {
    let fresh = ctl.snapshot().map_err(|e| {
        crate::api::ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading counters: {e}"),
        )
    })?;
    let before = samples[1].as_ref().map(|(t, s)| (*t, s));
    report(
        ctl,
        (Instant::now(), &fresh),
        before,
        mode,
        started,
        flows,
        extra,
    )
}

/// The report from the counters `now` (rates against `before`) and what the event loop knows.
fn report(
    ctl: &mut Ctl,
    now: (Instant, &Snapshot),
    before: Option<(Instant, &Snapshot)>,
    (mode, adopted): (AttachedMode, bool),
    started: Instant,
    flows: (u64, u64, u64),
    (vips, flow_sync): Extra,
) -> Result<crate::api::Status, crate::api::ApiError> {
    let mode = mode.to_string();
    let view = ctl.status_view()?;
    let mut st = crate::status::build(
        &view,
        &crate::status::Samples { now, before },
        &crate::status::Process {
            xdp_mode: &mode,
            adopted,
            started,
            flow_entries: flows.0,
            flows_expired: flows.1,
            connections_uncounted: flows.2,
        },
    );
    (st.vips, st.flow_sync) = (vips, flow_sync);
    Ok(st)
}

/// For `lb run`: the runtime, the signal handlers first, then [`serve`].
pub fn main(config_path: &Path, stats_interval: u64, replace: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let sig = Signals::install()?;
        serve(config_path.to_owned(), stats_interval, replace, sig).await
    })
}
