//! `lb run`: the controller. One loop owns the data plane; the control API's handlers send it
//! requests over a channel, so map updates never race each other.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use lb_common::{BACKEND_F_ACTIVE, Counters, stats::Stat};
use tokio::{
    net::UnixListener,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use crate::{
    admin::{AdminState, Override},
    api::{self, Admin},
    config::Config,
    health,
    iface::SystemInterfaces,
    loader::{AttachedMode, Dataplane},
    neigh::{Neighbours, SystemNeighbours},
    state::{self, DesiredState, DiffSummary},
    stats::Snapshot,
};

/// What the control API asks of the controller loop.
#[derive(Debug)]
pub enum Request {
    Status,
    Backend {
        service: String,
        address: String,
        action: String,
        weight: Option<u16>,
    },
    Reload,
}

/// An API error: HTTP status and message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(api::ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

type Reply = Result<serde_json::Value, ApiError>;
type Envelope = (Request, oneshot::Sender<Reply>);

/// The running controller.
pub struct Daemon {
    config_path: PathBuf,
    cfg: Config,
    admin: AdminState,
    desired: DesiredState,
    dp: Dataplane,
    mode: AttachedMode,
    started: Instant,
    /// The last two counter samples, for rates.
    samples: [Option<(Instant, Snapshot)>; 2],
    /// Connection table: entries at the last sweep, and flows expired so far.
    flow_entries: u64,
    flows_expired: u64,
    /// Health of checked backends, by (service, address).
    health: BTreeMap<(String, IpAddr), health::Health>,
    /// Running check tasks (respawned on reload).
    checks: Vec<tokio::task::JoinHandle<()>>,
    /// MACs of backends configured without one, by (service, address).
    resolved: BTreeMap<(String, IpAddr), Resolution>,
    /// Egress device of each backend without `mac` (routes looked up at start and reload).
    devices: BTreeMap<(String, IpAddr), String>,
}

/// Where a backend configured without `mac` stands.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolution {
    /// Egress device of the route to it.
    pub dev: String,
    pub mac: Option<crate::config::Mac>,
    /// Why `mac` is `None`.
    pub reason: String,
}

/// Checks that every backend without `mac` is on-link; returns each one's egress device.
fn on_link_devices(
    cfg: &Config,
    nb: &impl Neighbours,
) -> Result<BTreeMap<(String, IpAddr), String>, String> {
    let mut out = BTreeMap::new();
    for s in &cfg.services {
        for b in s.backends.iter().filter(|b| b.mac.is_none()) {
            let at = format!("service \"{}\": backend \"{}\"", s.name, b.address);
            let r = nb
                .route(b.address)
                .map_err(|e| format!("{at}: no route to it ({e})"))?;
            if let Some(gw) = r.gateway {
                return Err(format!(
                    "{at}: reached through gateway {gw} on {}: DSR only rewrites the MAC, so a backend must be on \
                     the balancer's L2 segment (or give its `mac` and `interface` explicitly)",
                    r.dev
                ));
            }
            if r.local {
                return Err(format!("{at}: is an address of this machine"));
            }
            out.insert((s.name.clone(), b.address), r.dev);
        }
    }
    Ok(out)
}

/// Looks every backend without `mac` up in the neighbour table, probing missing and stale
/// entries. Returns whether any resolution changed.
fn resolve(
    devices: &BTreeMap<(String, IpAddr), String>,
    nb: &impl Neighbours,
    resolved: &mut BTreeMap<(String, IpAddr), Resolution>,
) -> bool {
    let mut changed = false;
    resolved.retain(|k, _| devices.contains_key(k));
    let table = nb.table();
    for ((svc, addr), dev) in devices {
        let entry = table
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|t| crate::neigh::parse_neighbour(t, *addr, dev));
        let (mac, reason) = match entry {
            Ok(Some(n)) => {
                if n.stale() {
                    nb.probe(*addr);
                }
                let reason = format!("no ARP/NDP answer (neighbour state {})", n.states.join(","));
                (n.usable_mac(), reason)
            }
            Ok(None) => (None, "not in the neighbour table yet (probing)".to_owned()),
            Err(e) => (None, format!("neighbour lookup failed: {e}")),
        };
        if mac.is_none() {
            nb.probe(*addr);
        }
        let new = Resolution {
            dev: dev.clone(),
            mac,
            reason,
        };
        let key = (svc.clone(), *addr);
        let before = resolved.get(&key).map(|r| (r.mac, r.dev.clone()));
        if before != Some((new.mac, new.dev.clone())) {
            match (&before, new.mac) {
                (_, Some(m)) => {
                    log::info!("neighbour: service \"{svc}\" backend {addr} is at {m} on {dev}")
                }
                (Some((Some(_), _)), None) => {
                    log::warn!(
                        "neighbour: service \"{svc}\" backend {addr} unresolved: {}",
                        new.reason
                    )
                }
                _ => {}
            }
            changed = true;
        }
        resolved.insert(key, new);
    }
    changed
}

/// `cfg` with resolved MACs filled in, and the route's device as egress interface where it is
/// not the data-plane interface.
fn effective(cfg: &Config, resolved: &BTreeMap<(String, IpAddr), Resolution>) -> Config {
    let mut eff = cfg.clone();
    for s in &mut eff.services {
        for b in s.backends.iter_mut().filter(|b| b.mac.is_none()) {
            if let Some(r) = resolved.get(&(s.name.clone(), b.address)) {
                b.mac = r.mac;
                if b.interface.is_none() && r.dev != cfg.dataplane.interface {
                    b.interface = Some(r.dev.clone());
                }
            }
        }
    }
    eff
}

/// One finished health check.
#[derive(Debug)]
pub struct CheckResult {
    pub service: String,
    pub address: IpAddr,
    pub result: Result<(), String>,
    pub finished: Instant,
}

/// Checks `address` every `interval` (±10 % jitter, first one at a random offset so checks
/// don't fire in bursts) until the receiver is gone.
async fn check_loop(
    service: String,
    address: IpAddr,
    cfg: crate::config::Health,
    tx: mpsc::Sender<CheckResult>,
) {
    let interval = Duration::from_millis(cfg.interval_ms as u64);
    let seed = lb_common::hash::bytes_hash(7, format!("{service}/{address}").as_bytes());
    let offset = Duration::from_millis(seed % cfg.interval_ms.max(1) as u64);
    tokio::time::sleep(offset).await;
    let mut round = 0u64;
    loop {
        let started = tokio::time::Instant::now();
        let result = health::probe(&cfg, address).await;
        let msg = CheckResult {
            service: service.clone(),
            address,
            result,
            finished: Instant::now(),
        };
        if tx.send(msg).await.is_err() {
            return;
        }
        round += 1;
        let j = lb_common::hash::fmix64(seed ^ round) % 201; // 0..=200 → −10 %..+10 %
        let next = interval.mul_f64(0.9 + j as f64 / 1000.0);
        tokio::time::sleep_until(started + next).await;
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

impl Daemon {
    /// Loads the config and admin state, loads and fills the program, attaches it.
    pub fn start(config_path: &Path) -> anyhow::Result<Daemon> {
        let cfg = Config::load(config_path)?;
        let mut admin = AdminState::load(&cfg.control.state_file)?;
        let before = admin.clone();
        admin.prune(&cfg);
        if admin != before {
            log::warn!(
                "{}: dropped overrides of backends no longer in the config",
                cfg.control.state_file.display()
            );
        }
        let devices = on_link_devices(&cfg, &SystemNeighbours)
            .map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
        let mut resolved = BTreeMap::new();
        // Give first resolutions a moment (an ARP/NDP round trip) before filling the maps.
        for _ in 0..20 {
            resolve(&devices, &SystemNeighbours, &mut resolved);
            if resolved.values().all(|r| r.mac.is_some()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let unresolved: state::Down = resolved
            .iter()
            .filter(|(_, r)| r.mac.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        for (k, r) in resolved.iter().filter(|(_, r)| r.mac.is_none()) {
            log::warn!(
                "neighbour: service \"{}\" backend {} unresolved at start: {}",
                k.0,
                k.1,
                r.reason
            );
        }
        let desired = DesiredState::next(
            &effective(&cfg, &resolved),
            &SystemInterfaces,
            None,
            &admin,
            &unresolved,
        )
        .with_context(|| config_path.display().to_string())?;
        let dpc = &cfg.dataplane;
        let mut dp = Dataplane::load(dpc.ring_size, dpc.flow_table_size)?;
        dp.apply(&desired).context("filling the maps")?;
        let mode = dp.attach(&dpc.interface, dpc.xdp_mode)?;
        let overrides: usize = admin.backends.values().map(BTreeMap::len).sum();
        log::info!(
            "lb_xdp attached to {} in {mode} mode: {} services, {} backends, ring {} slots, flow table {}{}",
            dpc.interface,
            desired.services.len(),
            desired.backends.len(),
            dpc.ring_size,
            dpc.flow_table_size,
            if overrides > 0 {
                format!(
                    ", {overrides} admin overrides from {}",
                    cfg.control.state_file.display()
                )
            } else {
                String::new()
            }
        );
        Ok(Daemon {
            config_path: config_path.to_owned(),
            cfg,
            admin,
            desired,
            dp,
            mode,
            started: Instant::now(),
            samples: [None, None],
            flow_entries: 0,
            flows_expired: 0,
            health: BTreeMap::new(),
            checks: Vec::new(),
            resolved,
            devices,
        })
    }

    pub fn mode(&self) -> AttachedMode {
        self.mode
    }

    pub fn interface(&self) -> &str {
        &self.cfg.dataplane.interface
    }

    /// Serves until SIGINT/SIGTERM, then detaches. Returns the final counters report.
    pub fn run(mut self, stats_interval: u64) -> anyhow::Result<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?;
        let logger = self.dp.take_logger();
        let socket = self.cfg.control.socket.clone();
        let result = rt.block_on(async {
            let listener = bind_socket(&socket)?;
            let (tx, mut rx) = mpsc::channel::<Envelope>(64);
            let app = router(tx);
            let server = tokio::spawn(async move { axum::serve(listener, app).await });
            log::info!("control API on {} (mode 0600)", socket.display());

            let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
            let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
            let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
            let mut logs = match logger {
                // SAFETY: the fd is the logger's ring buffer map fd, owned by the logger that
                // the AsyncFd owns: it stays open and the same for the AsyncFd's whole life.
                Some(l) => Some(
                    unsafe {
                        tokio::io::unix::AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE)
                    }
                    .map_err(|e| anyhow::anyhow!("watching the eBPF log buffer: {e}"))?,
                ),
                None => None,
            };
            let (check_tx, mut check_rx) = mpsc::channel::<CheckResult>(1024);
            self.spawn_checks(&check_tx);
            let mut sample = tokio::time::interval(Duration::from_secs(1));
            let mut neigh_tick = tokio::time::interval(Duration::from_secs(1));
            // Sweep often enough for the shortest timeout, at most every 10 s.
            let t = &self.cfg.timeouts;
            let every = (t.tcp.min(t.tcp_fin).min(t.udp) / 2).clamp(1, 10);
            let mut sweep = tokio::time::interval(Duration::from_secs(every as u64));
            let mut printed = Instant::now();
            loop {
                tokio::select! {
                    _ = term.recv() => { log::info!("SIGTERM: detaching"); break; }
                    _ = int.recv() => { log::info!("SIGINT: detaching"); break; }
                    _ = hup.recv() => {
                        match self.reload() {
                            Ok(summary) => {
                                self.spawn_checks(&check_tx);
                                println!("reloaded {summary}");
                            }
                            Err(e) => println!("reload-rejected {}", e.message),
                        }
                    }
                    Some((req, reply)) = rx.recv() => {
                        let is_reload = matches!(req, Request::Reload);
                        let r = self.handle(req);
                        if is_reload && r.is_ok() {
                            self.spawn_checks(&check_tx);
                        }
                        let _ = reply.send(r);
                    }
                    Some(res) = check_rx.recv() => self.on_check(res),
                    _ = sweep.tick() => self.sweep(),
                    _ = neigh_tick.tick() => self.refresh_neighbours(),
                    _ = sample.tick() => {
                        self.sample();
                        if stats_interval > 0 && printed.elapsed() >= Duration::from_secs(stats_interval) {
                            printed = Instant::now();
                            if let Some((_, s)) = &self.samples[1] {
                                print!("{}", crate::report::render(&self.desired, s));
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
            for h in self.checks.drain(..) {
                h.abort();
            }
            anyhow::Ok(())
        });
        let _ = std::fs::remove_file(&socket);
        let snap = self.dp.snapshot(&self.desired);
        self.dp.detach().context("detaching lb_xdp")?;
        log::info!("lb_xdp detached from {}", self.cfg.dataplane.interface);
        result?;
        Ok(snap
            .map(|s| crate::report::render(&self.desired, &s))
            .unwrap_or_default())
    }

    /// (Re)starts one check task per checked backend; health already known is kept.
    fn spawn_checks(&mut self, tx: &mpsc::Sender<CheckResult>) {
        for h in self.checks.drain(..) {
            h.abort();
        }
        let mut keep = std::collections::BTreeSet::new();
        for s in &self.cfg.services {
            for b in &s.backends {
                if b.health.kind == crate::config::CheckKind::None {
                    continue;
                }
                keep.insert((s.name.clone(), b.address));
                self.health
                    .entry((s.name.clone(), b.address))
                    .or_insert_with(|| health::Health::new(Instant::now()));
                self.checks.push(tokio::spawn(check_loop(
                    s.name.clone(),
                    b.address,
                    b.health.clone(),
                    tx.clone(),
                )));
            }
        }
        self.health.retain(|k, _| keep.contains(k));
    }

    /// The backends whose checks have them down (for `cfg`'s backends).
    fn down(&self, cfg: &Config) -> state::Down {
        let mut d = state::Down::new();
        for s in &cfg.services {
            for b in &s.backends {
                if self
                    .health
                    .get(&(s.name.clone(), b.address))
                    .is_some_and(|h| !h.up)
                {
                    d.insert((s.name.clone(), b.address));
                }
            }
        }
        d
    }

    fn on_check(&mut self, r: CheckResult) {
        let Some(b) = self
            .cfg
            .services
            .iter()
            .find(|s| s.name == r.service)
            .and_then(|s| s.backends.iter().find(|b| b.address == r.address))
        else {
            return; // a check of a backend a reload removed
        };
        let (rise, fall) = (b.health.rise, b.health.fall);
        let Some(h) = self.health.get_mut(&(r.service.clone(), r.address)) else {
            return;
        };
        let Some(t) = h.observe(r.result, r.finished, rise, fall) else {
            return;
        };
        if t.up {
            log::info!(
                "health: service \"{}\" backend {} is UP ({}; it was down for {:.1} s)",
                r.service,
                r.address,
                t.reason,
                t.after.as_secs_f64()
            );
        } else {
            log::warn!(
                "health: service \"{}\" backend {} is DOWN ({}; {:.1} s after its last good check)",
                r.service,
                r.address,
                t.reason,
                t.after.as_secs_f64()
            );
        }
        let (cfg, admin) = (self.cfg.clone(), self.admin.clone());
        if let Err(e) = self.apply(&cfg, &admin) {
            log::error!("health: applying the change failed: {}", e.message);
        }
    }

    /// Re-reads the neighbour table for backends without `mac`; applies any change (a MAC
    /// that moved, a backend resolved or lost).
    fn refresh_neighbours(&mut self) {
        if self.devices.is_empty() {
            return;
        }
        if resolve(&self.devices, &SystemNeighbours, &mut self.resolved) {
            let (cfg, admin) = (self.cfg.clone(), self.admin.clone());
            if let Err(e) = self.apply(&cfg, &admin) {
                log::error!("neighbour: applying the change failed: {}", e.message);
            }
        }
    }

    fn sweep(&mut self) {
        let started = Instant::now();
        match self.dp.sweep(coarse_now_ns(), &self.cfg.timeouts) {
            Ok(s) => {
                self.flow_entries = s.entries - s.expired;
                self.flows_expired += s.expired;
                if s.expired > 0 {
                    log::debug!(
                        "sweep: {} of {} flows expired in {:?}",
                        s.expired,
                        s.entries,
                        started.elapsed()
                    );
                }
            }
            Err(e) => log::warn!("sweeping the connection table: {e}"),
        }
    }

    fn sample(&mut self) {
        match self.dp.snapshot(&self.desired) {
            Ok(s) => {
                self.samples[0] = self.samples[1].take();
                self.samples[1] = Some((Instant::now(), s));
            }
            Err(e) => log::warn!("reading counters: {e}"),
        }
    }

    fn handle(&mut self, req: Request) -> Reply {
        match req {
            Request::Status => self
                .status()
                .map(|s| serde_json::to_value(s).expect("serializes")),
            Request::Reload => self
                .reload()
                .map(|summary| message(format!("reloaded: {summary}"))),
            Request::Backend {
                service,
                address,
                action,
                weight,
            } => self.backend(&service, &address, &action, weight),
        }
    }

    /// Re-reads the config and applies the difference; nothing changes on any error.
    pub fn reload(&mut self) -> Result<DiffSummary, ApiError> {
        let bad = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
        let cfg = Config::load(&self.config_path).map_err(|e| bad(e.to_string()))?;
        if cfg.dataplane != self.cfg.dataplane || cfg.control != self.cfg.control {
            let e = bad(format!(
                "{}: [dataplane] or [control] changed: restart lb to apply it; running configuration kept",
                self.config_path.display()
            ));
            log::error!("reload rejected: {}", e.message);
            return Err(e);
        }
        let devices = on_link_devices(&cfg, &SystemNeighbours).map_err(|e| {
            bad(format!(
                "{}: {e}; running configuration kept",
                self.config_path.display()
            ))
        })?;
        resolve(&devices, &SystemNeighbours, &mut self.resolved);
        let mut admin = self.admin.clone();
        admin.prune(&cfg);
        let summary = self
            .apply(&cfg, &admin)
            .inspect_err(|e| log::error!("reload rejected: {}", e.message))?;
        self.cfg = cfg;
        self.devices = devices;
        log::info!("reload: applied ({summary})");
        Ok(summary)
    }

    /// Builds the state for `cfg` + `admin`, persists `admin` if it changed, writes the maps.
    fn apply(&mut self, cfg: &Config, admin: &AdminState) -> Result<DiffSummary, ApiError> {
        let down = self.down(cfg);
        let eff = effective(cfg, &self.resolved);
        let next = DesiredState::next(&eff, &SystemInterfaces, Some(&self.desired), admin, &down)
            .map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{}: {e}", self.config_path.display()),
            )
        })?;
        if *admin != self.admin {
            admin.save(&cfg.control.state_file).map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{e}; nothing changed"),
                )
            })?;
            self.admin = admin.clone();
        }
        let (ops, summary) = state::diff(Some(&self.desired), &next);
        let result = self.dp.apply_ops(&ops, next.ring_size);
        // Even after a partial failure the maps hold parts of `next`: track it, report it.
        self.desired = next;
        result.map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("writing the maps failed part way: {e}; run `lb reload` to retry"),
            )
        })?;
        Ok(summary)
    }

    fn backend(
        &mut self,
        service: &str,
        address: &str,
        action: &str,
        weight: Option<u16>,
    ) -> Reply {
        let not_found = |m: String| ApiError::new(StatusCode::NOT_FOUND, m);
        let Some(svc) = self.cfg.services.iter().find(|s| s.name == service) else {
            let names: Vec<&str> = self.cfg.services.iter().map(|s| s.name.as_str()).collect();
            return Err(not_found(format!(
                "unknown service \"{service}\" (services: {})",
                names.join(", ")
            )));
        };
        let addr: IpAddr = address.parse().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("`{address}` is not an IP address"),
            )
        })?;
        if !svc.backends.iter().any(|b| b.address == addr) {
            let addrs: Vec<String> = svc.backends.iter().map(|b| b.address.to_string()).collect();
            return Err(not_found(format!(
                "service \"{service}\" has no backend {addr} (backends: {})",
                addrs.join(", ")
            )));
        }
        let mut o = self.admin.get(service, addr);
        match action {
            "enable" => o.admin = Admin::Enabled,
            "disable" => o.admin = Admin::Disabled,
            "drain" => o.admin = Admin::Draining,
            "weight" => {
                let w = weight.ok_or_else(|| {
                    ApiError::new(StatusCode::BAD_REQUEST, "weight: missing {\"weight\": N}")
                })?;
                let cfg_w = svc
                    .backends
                    .iter()
                    .find(|b| b.address == addr)
                    .map(|b| b.weight);
                o.weight = if Some(w) == cfg_w { None } else { Some(w) };
            }
            other => {
                return Err(not_found(format!(
                    "unknown action `{other}` (enable, disable, drain, weight)"
                )));
            }
        }
        let mut admin = self.admin.clone();
        admin.set(service, addr, o.clone());
        let cfg = self.cfg.clone();
        self.apply(&cfg, &admin)?;
        log::info!(
            "admin: service \"{service}\" backend {addr}: {action} → {}",
            describe(&o)
        );
        Ok(message(format!(
            "service \"{service}\" backend {addr}: {}",
            describe(&o)
        )))
    }

    /// The status report.
    pub fn status(&mut self) -> Result<api::Status, ApiError> {
        let internal = |e: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e);
        if self.samples[1].is_none() {
            self.sample();
        }
        let (t1, s1) = self.samples[1]
            .clone()
            .ok_or_else(|| internal("no counters yet".into()))?;
        let prev = self.samples[0].clone();
        let rate = |now: &Counters, before: Option<&Counters>| -> api::Traffic {
            let (pps, bps) = match (before, &prev) {
                (Some(b), Some((t0, _))) => {
                    let dt = t1.duration_since(*t0).as_secs_f64().max(1e-3);
                    (
                        now.packets.saturating_sub(b.packets) as f64 / dt,
                        8.0 * now.bytes.saturating_sub(b.bytes) as f64 / dt,
                    )
                }
                _ => (0.0, 0.0),
            };
            api::Traffic {
                packets: now.packets,
                bytes: now.bytes,
                new_flows: now.new_flows,
                packets_per_second: pps,
                bits_per_second: bps,
            }
        };
        let ids: Vec<u32> = self.desired.backends.keys().copied().collect();
        let active = self
            .dp
            .active_connections(&ids)
            .map_err(|e| internal(e.to_string()))?;
        let mut services = Vec::new();
        for (ds, cs) in self.desired.services.iter().zip(&self.cfg.services) {
            let id = ds.value.id;
            let now = s1.services.get(&id).copied().unwrap_or_default();
            let before = prev.as_ref().and_then(|(_, p)| p.services.get(&id));
            let mut backends = Vec::new();
            for bid in &ds.backends {
                let info = &self.desired.backend_info[bid];
                let be = self.desired.backends[bid];
                let now = s1.backends.get(bid).copied().unwrap_or_default();
                let before = prev.as_ref().and_then(|(_, p)| p.backends.get(bid));
                let state = match info.admin {
                    Admin::Disabled => "disabled",
                    Admin::Draining => "draining",
                    Admin::Enabled if !info.healthy || be.flags & BACKEND_F_ACTIVE == 0 => "down",
                    Admin::Enabled => "up",
                };
                let key = (ds.name.clone(), info.address);
                let configured = cs
                    .backends
                    .iter()
                    .find(|b| b.address == info.address)
                    .is_some_and(|b| b.mac.is_some());
                let resolution = self.resolved.get(&key);
                let unresolved = !configured && resolution.is_none_or(|r| r.mac.is_none());
                let (mac, mac_source) = if configured {
                    (info.mac.to_string(), "config")
                } else if unresolved {
                    ("unresolved".to_owned(), "unresolved")
                } else {
                    (info.mac.to_string(), "neighbour")
                };
                backends.push(api::BackendStatus {
                    address: info.address,
                    mac,
                    mac_source: mac_source.to_owned(),
                    state: state.to_owned(),
                    admin: info.admin,
                    config_weight: info.config_weight,
                    weight_override: info.weight_override,
                    effective_weight: info.effective_weight,
                    health: match self.health.get(&(ds.name.clone(), info.address)) {
                        _ if unresolved => "down".to_owned(),
                        None => "none".to_owned(),
                        Some(h) if h.up => "up".to_owned(),
                        Some(_) => "down".to_owned(),
                    },
                    health_reason: if unresolved {
                        format!(
                            "MAC unresolved: {}",
                            resolution.map_or("not looked up yet", |r| r.reason.as_str())
                        )
                    } else {
                        self.health
                            .get(&(ds.name.clone(), info.address))
                            .map(|h| h.reason.clone())
                            .unwrap_or_default()
                    },
                    health_since_seconds: self
                        .health
                        .get(&(ds.name.clone(), info.address))
                        .map(|h| h.since.elapsed().as_secs_f64())
                        .unwrap_or(0.0),
                    health_transitions: self
                        .health
                        .get(&(ds.name.clone(), info.address))
                        .map(|h| h.transitions)
                        .unwrap_or(0),
                    active_connections: active.get(bid).copied().unwrap_or(0),
                    traffic: rate(&now, before),
                });
            }
            services.push(api::ServiceStatus {
                name: ds.name.clone(),
                vip: cs.vip,
                port: cs.port,
                protocol: cs.protocol.to_string(),
                scheduler: cs.scheduler.name().to_owned(),
                traffic: rate(&now, before),
                backends,
            });
        }
        Ok(api::Status {
            interface: self.cfg.dataplane.interface.clone(),
            xdp_mode: self.mode.to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            config: self.config_path.display().to_string(),
            state_file: self.cfg.control.state_file.display().to_string(),
            services,
            flow_entries: self.flow_entries,
            flows_expired: self.flows_expired,
            counters: Stat::ALL
                .iter()
                .map(|s| (s.name().to_owned(), s1.get(*s)))
                .collect(),
        })
    }
}

fn describe(o: &Override) -> String {
    match (o.admin, o.weight) {
        (a, Some(w)) => format!("{a}, weight {w} (override)"),
        (a, None) => format!("{a}"),
    }
}

fn message(m: String) -> serde_json::Value {
    serde_json::to_value(api::Message { message: m }).expect("serializes")
}

fn router(tx: mpsc::Sender<Envelope>) -> Router {
    Router::new()
        .route("/v1/status", get(status_handler))
        .route("/v1/reload", post(reload_handler))
        .route(
            "/v1/backends/{service}/{address}/{action}",
            post(backend_handler),
        )
        .with_state(tx)
}

async fn ask(tx: &mpsc::Sender<Envelope>, req: Request) -> Response {
    let (reply_tx, reply_rx) = oneshot::channel();
    if tx.send((req, reply_tx)).await.is_err() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "lb is shutting down")
            .into_response();
    }
    match reply_rx.await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "lb is shutting down").into_response()
        }
    }
}

async fn status_handler(State(tx): State<mpsc::Sender<Envelope>>) -> Response {
    ask(&tx, Request::Status).await
}

async fn reload_handler(State(tx): State<mpsc::Sender<Envelope>>) -> Response {
    ask(&tx, Request::Reload).await
}

async fn backend_handler(
    State(tx): State<mpsc::Sender<Envelope>>,
    UrlPath((service, address, action)): UrlPath<(String, String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let weight = if action == "weight" {
        match serde_json::from_slice::<api::WeightBody>(&body) {
            Ok(w) => Some(w.weight),
            Err(e) => {
                return ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("weight: expected {{\"weight\": 0..=65535}} ({e})"),
                )
                .into_response();
            }
        }
    } else {
        None
    };
    ask(
        &tx,
        Request::Backend {
            service,
            address,
            action,
            weight,
        },
    )
    .await
}

/// Binds the control socket with mode 0600. A stale socket (nobody answering) is replaced;
/// a live one means another lb runs: refuse.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another lb is already serving {} (control.socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    // SAFETY: umask(2) only changes this process's file mode mask; restored right after bind.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = l.with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(l)
}
