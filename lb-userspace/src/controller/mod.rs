//! The controller's core: one owner of the data plane. Events come in (reload, admin change,
//! health result, neighbour or route change, timer), the desired state is rebuilt from all the
//! inputs through the one rule ([`crate::desired::decide`]), and only the difference is written.
//!
//! Synchronous and generic over the data plane ([`Maps`]), the network stack ([`Neighbours`])
//! and the interfaces, so host tests drive it through fakes. [`run`] wraps it in the async
//! event loop (signals, control API, check tasks, netlink events).

pub mod cluster;
pub mod run;
pub mod socket;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use axum::http::StatusCode;

use crate::{
    admin::{AdminState, Override},
    api::{Admin, ApiError, BackendAction},
    config::{CheckKind, Config},
    dataplane::{Maps, SweepStats},
    desired::{
        self, BackendId, DesiredState, DiffSummary, HealthInput, IdMap, Ids, MacInput,
        ids::Assignment,
    },
    health::{Health, tasks::CheckSpec},
    iface::Interfaces,
    neigh::{NeighEvent, Neighbours, Resolver, Route, on_link},
    stats::Snapshot,
};

/// Shortest and longest wait between two probes of an unresolved backend.
const PROBE_MIN: Duration = Duration::from_secs(1);
const PROBE_MAX: Duration = Duration::from_secs(8);

/// Where a backend without `mac` is: its route (looked up at start, reload and on route
/// events), or why there is none.
type Routes = BTreeMap<BackendId, Result<Route, String>>;

/// A planned state: everything a reload or an admin change would commit.
struct Plan {
    /// Weight overrides this plan drops because the config's weight changed.
    dropped: Vec<crate::admin::DroppedOverride>,
    cfg: Config,
    ids: Ids,
    assignment: Assignment,
    admin: AdminState,
    routes: Routes,
    desired: DesiredState,
}

pub struct Controller<M: Maps, N: Neighbours, I: Interfaces> {
    config_path: PathBuf,
    cfg: Config,
    admin: AdminState,
    ids: Ids,
    assignment: Assignment,
    /// Backend id → (service index, backend index) in `cfg`.
    index: IdMap<(usize, usize)>,
    desired: DesiredState,
    maps: M,
    nb: N,
    ifaces: I,
    health: IdMap<Health>,
    resolver: Resolver,
    routes: Routes,
    /// Unresolved addresses: last probe and the wait before the next.
    probes: BTreeMap<IpAddr, (Instant, Duration)>,
    /// Weight overrides the config overruled, for `lb status`.
    weight_notes: BTreeMap<BackendId, String>,
    /// Service id → when its table last gained a changed slot (coarse clock, ns): entries of
    /// changed slots get a full idle timeout from then (see [`crate::dataplane::SlotView`]).
    ring_changed: BTreeMap<u32, u64>,
    /// Entries made from `LB_RECORD` since this controller started.
    record_inserted: u64,
    /// A sweep under way ([`Controller::sweep_begin`]), taken step by step.
    sweeping: Option<Sweeping>,
}

/// A sweep of the connection table under way, and the services whose tables were written since
/// it started: their changed slots stay marked at its end (entries walked before such a write
/// were judged by the table as it was; the next sweep judges them again).
struct Sweeping {
    walk: crate::dataplane::SweepWalk,
    written: BTreeSet<u32>,
}

/// Entries the first step of a sweep in `lb run` walks (whole batches of buckets; about 5 ms at
/// the 0.3 µs an entry measured on the Intel host): the loop handles what arrived meanwhile
/// between steps. Later steps are sized to the host by [`next_step_budget`].
pub const SWEEP_STEP_ENTRIES: usize = 16 * 1024;
/// What a sweep's step should take at most, about.
const SWEEP_STEP_TARGET: Duration = Duration::from_millis(5);

/// The next step's entries after a step of `budget` entries took `took`: halved while steps take
/// more than twice [`SWEEP_STEP_TARGET`], doubled while they take less than half of it, within
/// 4 096 (one batch) and 2^18 entries.
pub fn next_step_budget(budget: usize, took: Duration) -> usize {
    let b = if took > 2 * SWEEP_STEP_TARGET {
        budget / 2
    } else if took < SWEEP_STEP_TARGET / 2 {
        budget.saturating_mul(2)
    } else {
        budget
    };
    b.clamp(crate::dataplane::BATCH_ENTRIES, 1 << 18)
}

/// How long a changed slot of an `"at_syn"` TCP service keeps its previous backend while the
/// packet path hands SYNs to the controller (`dataplane.defer_records`): the connections whose
/// SYN went through the slot before the change and whose records the controller has not drained
/// yet reach their backend by it. The controller drains `LB_RECORD` before every map write, and
/// every 10 ms while records come (50 ms after a drain that found none), so this is a margin of
/// 40 times or more (and a drain waits this long for a drained backend's unrecorded
/// connections).
pub const DEFER_WINDOW_NS: u64 = 2_000_000_000;
/// Records the controller takes from `LB_RECORD` per read, and per drain at most (the ring
/// holds 65 535; the rest wait for the next drain, 10 ms later).
const RECORD_BATCH: usize = 4096;
const RECORD_DRAIN_MAX: usize = 16 * RECORD_BATCH;

#[cfg(test)]
thread_local! {
    /// Tests' own time for [`clock_ns`] (each test runs on its own thread).
    pub(crate) static TEST_NOW: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// The monotonic clock (ns) that dates previous backends of changed slots
/// ([`desired::DesiredService::prev`]).
pub(crate) fn clock_ns() -> u64 {
    #[cfg(test)]
    if let Some(now) = TEST_NOW.with(|n| n.get()) {
        return now;
    }
    crate::trace::clocks().0
}

impl<M: Maps, N: Neighbours, I: Interfaces> Controller<M, N, I> {
    /// Takes over `maps` (empty) with `cfg` and the persisted `admin` state: allocates ids,
    /// checks every backend without `mac` is on-link, writes the whole state.
    #[expect(
        clippy::too_many_arguments,
        reason = "the controller's inputs, each once"
    )]
    pub fn new(
        config_path: &Path,
        cfg: Config,
        admin: AdminState,
        maps: M,
        nb: N,
        ifaces: I,
        adopted: Option<&crate::dataplane::Adopted>,
        resolver: Resolver,
    ) -> anyhow::Result<Self> {
        let mut c = Controller {
            config_path: config_path.to_owned(),
            desired: DesiredState::empty(cfg.dataplane.ring_capacity),
            cfg: cfg.clone(),
            admin: AdminState::default(),
            ids: Ids::default(),
            assignment: Assignment::default(),
            index: IdMap::new(),
            maps,
            nb,
            ifaces,
            health: IdMap::new(),
            resolver: Resolver::default(),
            routes: Routes::new(),
            probes: BTreeMap::new(),
            weight_notes: BTreeMap::new(),
            ring_changed: BTreeMap::new(),
            record_inserted: 0,
            sweeping: None,
        };
        c.resolver = resolver;
        // Records an earlier program left in the pinned ring, before anything is written.
        c.drain_records();
        if let Some(a) = adopted {
            // Ids, generations and health from the maps an earlier controller left: established
            // flows keep their backends, and a backend that was out stays out until its checks
            // bring it back.
            c.ids.adopt(&cfg, a);
            c.desired = DesiredState::from_adopted(
                cfg.dataplane.ring_capacity,
                a,
                clock_ns(),
                &cfg.timeouts,
            );
            let now = Instant::now();
            for (id, b, _) in &a.backends {
                if b.flags & lb_common::BACKEND_F_ACTIVE == 0 {
                    c.health.insert(
                        BackendId(*id),
                        Health::new_down(now, "down before lb restarted (from the data plane)"),
                    );
                }
            }
        }
        let plan = c
            .plan(cfg, admin, true)
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        c.commit(plan)
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        Ok(c)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    pub fn maps(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Builds (without committing) the state for `cfg` and `admin` on top of the current one.
    /// `start`: the first plan (logs dropped overrides as found at start).
    fn plan(&self, cfg: Config, mut admin: AdminState, start: bool) -> Result<Plan, ApiError> {
        let bad = |m: String| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{}: {m}", self.config_path.display()),
            )
        };
        admin.prune(&cfg);
        let dropped = admin.reconcile_weights(&cfg);
        for d in &dropped {
            tracing::warn!("{d}{}", if start { " (found at start)" } else { "" });
        }
        let mut ids = self.ids.clone();
        let assignment = ids.sync(&cfg);
        let mut routes = Routes::new();
        for (s, (_, bids)) in cfg.services.iter().zip(&assignment.services) {
            for (b, id) in s.backends.iter().zip(bids) {
                if b.mac.is_some() {
                    continue;
                }
                let at = format!("service \"{}\": backend \"{}\"", s.name, b.address);
                let r = self
                    .nb
                    .route(b.address)
                    .map_err(|e| bad(format!("{at}: {e}")))?;
                on_link(&r).map_err(|e| bad(format!("{at}: {e}")))?;
                routes.insert(*id, Ok(r));
            }
        }
        let desired = self.build(&cfg, &assignment, &admin, &routes)?;
        Ok(Plan {
            dropped,
            cfg,
            ids,
            assignment,
            admin,
            routes,
            desired,
        })
    }

    /// The desired state of these inputs after the current one.
    fn build(
        &self,
        cfg: &Config,
        assignment: &Assignment,
        admin: &AdminState,
        routes: &Routes,
    ) -> Result<DesiredState, ApiError> {
        let inputs = desired::inputs(cfg, assignment, |id, s, b| {
            let health = match (b.health.kind, self.health.get(&id)) {
                (CheckKind::None, _) => HealthInput::Unchecked,
                (_, Some(h)) if !h.up => HealthInput::Down(h.reason.clone()),
                _ => HealthInput::Up,
            };
            let mac = match (b.mac, routes.get(&id)) {
                (Some(m), _) => MacInput::Config(m),
                (None, Some(Ok(r))) => match self.resolver.resolve(r.ifindex, b.address) {
                    Ok(mac) => MacInput::Resolved {
                        mac,
                        dev: r.dev.clone(),
                    },
                    Err(why) => MacInput::Unresolved(why),
                },
                (None, Some(Err(why))) => MacInput::Unresolved(why.clone()),
                (None, None) => MacInput::Unresolved("not looked up yet".to_owned()),
            };
            (admin.get(&s.name, b.address), health, mac)
        });
        DesiredState::next(&inputs, &cfg.dataplane, &self.ifaces, Some(&self.desired)).map_err(
            |e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("{}: {e}", self.config_path.display()),
                )
            },
        )
    }

    /// Persists the plan's admin state if it changed, makes it current, writes the difference.
    fn commit(&mut self, plan: Plan) -> Result<DiffSummary, ApiError> {
        if plan.admin != self.admin {
            plan.admin.save(&plan.cfg.control.state_file).map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{e}; nothing changed"),
                )
            })?;
        }
        // Notes of overrides the config overruled, for `lb status`: kept until a new override
        // is set for that backend.
        for d in &plan.dropped {
            if let Some(id) = plan.ids.backend(&d.service, d.address) {
                self.weight_notes.insert(
                    id,
                    format!(
                        "weight override {} dropped: the config's weight changed {} → {}",
                        d.weight, d.was, d.now
                    ),
                );
            }
        }
        for (s, (_, bids)) in plan.cfg.services.iter().zip(&plan.assignment.services) {
            for (b, id) in s.backends.iter().zip(bids) {
                if plan.admin.get(&s.name, b.address).weight.is_some() {
                    self.weight_notes.remove(id);
                }
            }
        }
        self.admin = plan.admin;
        self.cfg = plan.cfg;
        self.ids = plan.ids;
        self.assignment = plan.assignment;
        self.routes = plan.routes;
        self.index = index(&self.assignment);
        self.health.retain(|id, _| self.index.contains_key(id));
        self.weight_notes
            .retain(|id, _| self.index.contains_key(id));
        self.write(plan.desired)
    }

    /// Makes the connection-table entries the packet path handed over through `LB_RECORD`
    /// (`dataplane.defer_records`; at most [`RECORD_DRAIN_MAX`] a call). (Flow sharing: the
    /// packet path reported them when it handed them over.) Returns how many it took.
    pub fn drain_records(&mut self) -> usize {
        let mut taken = 0;
        while taken < RECORD_DRAIN_MAX {
            let batch = self.maps.take_records(RECORD_BATCH);
            if batch.is_empty() {
                break;
            }
            taken += batch.len();
            match self.maps.record_flows(&batch, clock_ns()) {
                Ok(st) => self.record_inserted += st.inserted,
                Err(e) => {
                    tracing::warn!(
                        "LB_RECORD: {} connections not recorded (their slots keep them on their backends until a change): {e}",
                        batch.len()
                    );
                }
            }
            if batch.len() < RECORD_BATCH {
                break;
            }
        }
        taken
    }

    /// Stops handing SYNs to the controller (`lb run` exits: they are recorded on the packet
    /// path again) and drains what was handed over until then.
    pub fn stop_deferring(&mut self) {
        if self.maps.defers_records() {
            if let Err(e) = self.maps.set_defer_records(false) {
                tracing::warn!("LB_RECORD_RATE: switching the handover of SYNs off: {e}");
            }
            // What a program run on another CPU reserved just before.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.drain_records();
    }

    /// Writes the difference to `next` and makes it current (even after a partial failure: the
    /// maps then hold parts of it).
    fn write(&mut self, mut next: DesiredState) -> Result<DiffSummary, ApiError> {
        // Every connection handed over so far is recorded before a slot changes.
        self.drain_records();
        let now = clock_ns();
        let before: std::collections::HashMap<u32, usize> = self
            .desired
            .services
            .iter()
            .enumerate()
            .map(|(i, o)| (o.value.id, i))
            .collect();
        let before_of = |id: u32| before.get(&id).map(|i| &self.desired.services[*i]);
        // maglev/sh slots that change keep the backend they had for their unrecorded flows
        // (UDP; TCP with record_connections = "on_change", or beyond a record limit), for the
        // protocol's idle timeout; "at_syn" TCP whose SYNs the controller records
        // (`dataplane.defer_records`), for [`DEFER_WINDOW_NS`]: the records handed over before
        // the change are drained by then (and are, right here, before anything is written).
        let limited = self.cfg.dataplane.record_limit != 0;
        let deferring = self.maps.defers_records();
        for s in &mut next.services {
            let old = before_of(s.value.id);
            let window = if desired::deferred_window_applies(s, old, now, deferring, limited) {
                DEFER_WINDOW_NS
            } else {
                self.cfg.timeouts.open_ns(s.key.protocol)
            };
            desired::with_previous(s, old, now, window, limited || deferring);
        }
        let (ops, summary) = desired::diff(Some(&self.desired), &next);
        for s in &next.services {
            let old = before_of(s.value.id);
            if s.dirty
                .iter()
                .any(|i| old.is_none_or(|o| !o.dirty.contains(i)))
            {
                self.ring_changed.insert(s.value.id, now);
            }
        }
        self.ring_changed
            .retain(|id, _| next.services.iter().any(|s| s.value.id == *id));
        self.note_written(&ops);
        let r = self.maps.apply_ops(&ops);
        self.desired = next;
        r.map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("writing the maps failed part way: {e}; run `lb reload` to retry"),
            )
        })?;
        Ok(summary)
    }

    /// Rebuilds from the current inputs and writes the difference (health, neighbour and
    /// route changes).
    fn refresh(&mut self, why: &str) {
        let next = match self.build(&self.cfg, &self.assignment, &self.admin, &self.routes) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("{why}: building the new state failed: {}", e.message);
                return;
            }
        };
        if let Err(e) = self.write(next) {
            tracing::error!("{why}: {}", e.message);
        }
    }

    /// Re-reads nothing itself: applies `cfg` (already loaded) with the current admin state.
    /// Nothing changes on any error.
    pub fn reload(&mut self, cfg: Config) -> Result<DiffSummary, ApiError> {
        if cfg.dataplane != self.cfg.dataplane
            || cfg.control != self.cfg.control
            || cfg.announce != self.cfg.announce
            || cfg.flow_sync != self.cfg.flow_sync
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "{}: [dataplane], [control], [announce] or [flow_sync] changed: restart lb to apply it; running configuration kept",
                    self.config_path.display()
                ),
            ));
        }
        let plan = self.plan(cfg, self.admin.clone(), false).map_err(|mut e| {
            e.message += "; running configuration kept";
            e
        })?;
        let summary = self.commit(plan)?;
        for id in self.unresolved() {
            self.probe(id, true);
        }
        Ok(summary)
    }

    /// Loads the config file and applies it ([`Controller::reload`]).
    pub fn reload_file(&mut self) -> Result<DiffSummary, ApiError> {
        let cfg = Config::load(&self.config_path).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{e}; running configuration kept"),
            )
        })?;
        for w in cfg.warnings() {
            tracing::warn!("{w}");
        }
        self.reload(cfg)
    }

    /// An admin change of one backend (`lb backend ...`), persisted.
    pub fn admin(
        &mut self,
        service: &str,
        addr: IpAddr,
        action: BackendAction,
    ) -> Result<String, ApiError> {
        let not_found = |m: String| ApiError::new(StatusCode::NOT_FOUND, m);
        let Some(svc) = self.cfg.services.iter().find(|s| s.name == service) else {
            let names: Vec<&str> = self.cfg.services.iter().map(|s| s.name.as_str()).collect();
            return Err(not_found(format!(
                "unknown service \"{service}\" (services: {})",
                names.join(", ")
            )));
        };
        let Some(b) = svc.backends.iter().find(|b| b.address == addr) else {
            let addrs: Vec<String> = svc.backends.iter().map(|b| b.address.to_string()).collect();
            return Err(not_found(format!(
                "service \"{service}\" has no backend {addr} (backends: {})",
                addrs.join(", ")
            )));
        };
        let mut o = self.admin.get(service, addr);
        match action {
            BackendAction::Enable => o.admin = Admin::Enabled,
            BackendAction::Disable => o.admin = Admin::Disabled,
            BackendAction::Drain => o.admin = Admin::Draining,
            BackendAction::Weight(w) if w == b.weight => o.weight = None,
            BackendAction::Weight(w) => {
                o.weight = Some(w);
                o.config_weight = Some(b.weight);
            }
        }
        let mut admin = self.admin.clone();
        admin.set(service, addr, o.clone());
        let desired = self.build(&self.cfg, &self.assignment, &admin, &self.routes)?;
        let plan = Plan {
            dropped: Vec::new(),
            cfg: self.cfg.clone(),
            ids: self.ids.clone(),
            assignment: self.assignment.clone(),
            admin,
            routes: self.routes.clone(),
            desired,
        };
        self.commit(plan)?;
        let what = describe(&o);
        tracing::info!("admin: service \"{service}\" backend {addr}: {action} → {what}");
        Ok(format!("service \"{service}\" backend {addr}: {what}"))
    }

    /// The check each checked backend should run.
    pub fn wanted_checks(&self) -> BTreeMap<BackendId, CheckSpec> {
        let mut out = BTreeMap::new();
        for (id, (si, bi)) in self.index.iter() {
            let s = &self.cfg.services[*si];
            let b = &s.backends[*bi];
            if b.health.kind != CheckKind::None {
                out.insert(
                    id,
                    CheckSpec {
                        label: format!("{}/{}", s.name, b.address),
                        address: b.address,
                        cfg: b.health.clone(),
                    },
                );
            }
        }
        out
    }

    /// Makes the health table match the checks that run: new ones start up, the others keep
    /// their state (and rise/fall counts).
    pub fn sync_health(&mut self, checked: impl IntoIterator<Item = BackendId>) {
        let now = Instant::now();
        let checked: std::collections::BTreeSet<BackendId> = checked.into_iter().collect();
        self.health.retain(|id, _| checked.contains(id));
        for id in checked {
            self.health.get_or_insert_with(id, || Health::new(now));
        }
    }

    /// One finished health check.
    pub fn on_check(&mut self, id: BackendId, result: Result<(), String>, finished: Instant) {
        // The common case, an up backend passing: no transition, whatever its rise and fall
        // (its config is not looked up).
        if let Some(h) = self.health.get_mut(&id)
            && h.up
            && result.is_ok()
        {
            h.observe(result, finished, 1, 1);
            return;
        }
        let Some(&(si, bi)) = self.index.get(&id) else {
            return; // a backend a reload removed
        };
        let b = &self.cfg.services[si].backends[bi];
        let (addr, rise, fall) = (b.address, b.health.rise, b.health.fall);
        let Some(h) = self.health.get_mut(&id) else {
            return;
        };
        let Some(t) = h.observe(result, finished, rise, fall) else {
            return;
        };
        let name = &self.cfg.services[si].name;
        if t.up {
            tracing::info!(
                "health: service \"{name}\" backend {addr} is UP ({}; it was down for {:.1} s)",
                t.reason,
                t.after.as_secs_f64()
            );
        } else {
            tracing::warn!(
                "health: service \"{name}\" backend {addr} is DOWN ({}; {:.1} s after its last good check)",
                t.reason,
                t.after.as_secs_f64()
            );
        }
        self.refresh("health");
    }

    /// Backends configured without `mac` whose MAC is not known.
    fn unresolved(&self) -> Vec<BackendId> {
        self.desired
            .backend_info
            .iter()
            .filter(|(_, i)| matches!(i.mac, MacInput::Unresolved(_)))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Probes `id`'s address (at most once per backoff period unless `now`).
    fn probe(&mut self, id: BackendId, now: bool) {
        let Some(&(si, bi)) = self.index.get(&id) else {
            return;
        };
        let addr = self.cfg.services[si].backends[bi].address;
        let t = Instant::now();
        let entry = self.probes.entry(addr).or_insert((t, PROBE_MIN));
        if now || t.duration_since(entry.0) >= entry.1 {
            if !now {
                entry.1 = (entry.1 * 2).min(PROBE_MAX);
            }
            entry.0 = t;
            self.nb.probe(addr);
        }
    }

    /// A neighbour table or route change from the kernel.
    pub fn on_neighbour(&mut self, ev: NeighEvent) {
        let received = Instant::now();
        let was = match &ev {
            NeighEvent::New { ifindex, addr, .. } | NeighEvent::Del { ifindex, addr } => {
                Some(self.resolver.resolve(*ifindex, *addr))
            }
            _ => None,
        };
        if matches!(ev, NeighEvent::Routes) {
            self.relookup_routes();
        }
        if let Some((ifindex, addr)) = self.resolver.apply(&ev) {
            let ours = self.routes.iter().any(|(id, r)| {
                r.as_ref().is_ok_and(|r| r.ifindex == ifindex) && self.address(*id) == Some(addr)
            });
            if !ours {
                return;
            }
            // Event-driven probing: a stale entry is re-validated, a failed or removed one
            // tried again (rate-limited per address).
            if self
                .resolver
                .get(ifindex, addr)
                .is_none_or(|n| n.wants_probe())
            {
                let ids: Vec<BackendId> = self
                    .routes
                    .keys()
                    .filter(|id| self.address(**id) == Some(addr))
                    .copied()
                    .collect();
                for id in ids {
                    self.probe(id, false);
                }
            } else {
                self.probes.remove(&addr);
            }
            if was == Some(self.resolver.resolve(ifindex, addr)) {
                return; // same MAC (or the same reason): nothing to write
            }
        }
        if matches!(ev, NeighEvent::Resync) {
            return; // the dump follows; applied entry by entry, then `Synced`
        }
        // The desired state changes only here: what it said before is the "before" of the log.
        let before: BTreeMap<BackendId, MacInput> = self
            .desired
            .backend_info
            .iter()
            .filter(|(id, _)| self.routes.contains_key(id))
            .map(|(id, i)| (*id, i.mac.clone()))
            .collect();
        self.refresh("neighbour");
        let took = received.elapsed();
        for (id, was) in before {
            let Some(info) = self.desired.backend_info.get(&id) else {
                continue;
            };
            if info.mac == was {
                continue;
            }
            let (svc, addr) = (&info.service, info.address);
            match &info.mac {
                MacInput::Resolved { mac, dev } => {
                    tracing::info!(
                        "neighbour: service \"{svc}\" backend {addr} is at {mac} on {dev} \
                         (maps written {} µs after the kernel's event)",
                        took.as_micros()
                    )
                }
                MacInput::Unresolved(why) => {
                    tracing::warn!("neighbour: service \"{svc}\" backend {addr} unresolved: {why}")
                }
                MacInput::Config(_) => {}
            }
        }
    }

    fn address(&self, id: BackendId) -> Option<IpAddr> {
        let (si, bi) = self.index.get(&id)?;
        Some(self.cfg.services[*si].backends[*bi].address)
    }

    /// Route events: look the routes of backends without `mac` up again. A backend whose route
    /// stopped being on-link is unresolved (down) with the reason.
    fn relookup_routes(&mut self) {
        let ids: Vec<BackendId> = self.routes.keys().copied().collect();
        for id in ids {
            let Some(addr) = self.address(id) else {
                continue;
            };
            let r = self.nb.route(addr).and_then(|r| on_link(&r).map(|()| r));
            if self.routes.get(&id) != Some(&r) {
                if let Err(why) = &r {
                    tracing::warn!("route to backend {addr} changed: {why}");
                }
                self.routes.insert(id, r);
            }
        }
    }

    /// Timer: probes unresolved backends again (with backoff).
    pub fn tick(&mut self) {
        for id in self.unresolved() {
            self.probe(id, false);
        }
    }

    /// Probes every unresolved backend now (start).
    pub fn probe_unresolved(&mut self) -> usize {
        let ids = self.unresolved();
        for id in &ids {
            self.probe(*id, true);
        }
        ids.len()
    }

    /// Sweeps the connection table, then clears the changed-slot mark of every slot no entry
    /// names another backend for any more: its established packets skip the table again. The
    /// whole walk at once (tests, tools); `lb run` takes it in steps ([`Controller::sweep_begin`]).
    pub fn sweep(&mut self, now_ns: u64) -> Result<SweepStats, crate::dataplane::LoaderError> {
        self.sweep_begin(now_ns)?;
        loop {
            if let Some(r) = self.sweep_step(usize::MAX) {
                return r;
            }
        }
    }

    /// Starts a sweep that judges idleness at `now_ns` (one under way is dropped: its marks
    /// stay, its counts are reconciled by this one). [`Controller::sweep_step`] takes it on.
    pub fn sweep_begin(&mut self, now_ns: u64) -> Result<(), crate::dataplane::LoaderError> {
        // The records handed over count in what the sweep finds (and are in the table before
        // a previous backend lapses).
        self.drain_records();
        self.sweeping = None;
        let view = desired::TableView::new(&self.desired, &self.ring_changed);
        let walk = self.maps.sweep_begin(now_ns, &view)?;
        self.sweeping = Some(Sweeping {
            walk,
            written: BTreeSet::new(),
        });
        Ok(())
    }

    /// While a sweep is under way: the services whose tables `ops` write.
    fn note_written(&mut self, ops: &[desired::Op]) {
        let Some(run) = &mut self.sweeping else {
            return;
        };
        for op in ops {
            match op {
                desired::Op::Ring { service_id, .. } | desired::Op::Table { service_id, .. } => {
                    run.written.insert(*service_id);
                }
                desired::Op::Service { value, .. } => {
                    run.written.insert(value.id);
                }
                _ => {}
            }
        }
    }

    /// Whether a sweep is under way.
    pub fn sweeping(&self) -> bool {
        self.sweeping.is_some()
    }

    /// One step of the sweep under way: at least `budget` entries of the table (whole
    /// batches). `Some` once it ended (at the table's end, with what it did, or by an error);
    /// `None` while it goes on, or when none is under way.
    pub fn sweep_step(
        &mut self,
        budget: usize,
    ) -> Option<Result<SweepStats, crate::dataplane::LoaderError>> {
        let mut run = self.sweeping.take()?;
        let timeouts = self.cfg.timeouts.clone();
        let view = desired::TableView::new(&self.desired, &self.ring_changed);
        match self
            .maps
            .sweep_step(&mut run.walk, &timeouts, &view, budget)
        {
            Err(e) => return Some(Err(e)),
            Ok(false) => {
                self.sweeping = Some(run);
                return None;
            }
            Ok(true) => {}
        }
        let stats = match self.maps.sweep_finish(run.walk, &view) {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        Some(self.sweep_end(stats, &run.written))
    }

    /// After a walk: changed slots without an entry of another backend are cleared (not in the
    /// services `written` while it walked), previous backends past their time lapse.
    fn sweep_end(
        &mut self,
        stats: SweepStats,
        written: &BTreeSet<u32>,
    ) -> Result<SweepStats, crate::dataplane::LoaderError> {
        let clock_now = clock_ns();
        let mut ops = Vec::new();
        for s in &mut self.desired.services {
            // Previous backends lapse after the idle timeout: unrecorded flows older than that
            // are gone; the slots are written without them.
            let mut lapsed = Vec::new();
            if !s.prev.is_empty() && clock_now >= s.prev_until_ns {
                lapsed = s.prev.keys().copied().collect();
                tracing::debug!(
                    "service \"{}\": the previous backends of {} changed slots lapsed",
                    s.name,
                    lapsed.len()
                );
                s.prev = Default::default();
                s.prev_until_ns = 0;
            }
            let cleared: Vec<u32> = s
                .dirty
                .iter()
                .filter(|_| !written.contains(&s.value.id))
                .filter(|i| !stats.still_dirty.contains(&(s.value.id, *i)))
                .filter(|i| !s.prev.contains_key(i))
                .collect();
            if cleared.is_empty() && lapsed.is_empty() {
                continue;
            }
            for i in &cleared {
                s.dirty.remove(*i);
            }
            let mut written = cleared.clone();
            written.extend(lapsed);
            written.sort_unstable();
            written.dedup();
            tracing::debug!(
                "service \"{}\": {} changed slots have no flow of another backend left: stateless again ({} still changed)",
                s.name,
                cleared.len(),
                s.dirty.len()
            );
            ops.push(desired::Op::Ring {
                service_id: s.value.id,
                base: s.value.ring_base,
                slots: written
                    .iter()
                    .filter_map(|i| Some((*i, s.slot_value(*i as usize)?)))
                    .collect(),
            });
        }
        if !ops.is_empty() {
            self.maps.apply_ops(&ops)?;
        }
        Ok(stats)
    }

    /// Changed slots per service name (`lb status`).
    pub fn changed_slots(&self) -> BTreeMap<String, usize> {
        self.desired
            .services
            .iter()
            .map(|s| (s.name.clone(), s.dirty.len()))
            .collect()
    }

    /// A counter snapshot.
    pub fn snapshot(&mut self) -> Result<Snapshot, crate::dataplane::LoaderError> {
        let d = &self.desired;
        let mut s = self.maps.snapshot(d)?;
        s.record_inserted = self.record_inserted;
        Ok(s)
    }

    /// What `lb status` reports of each backend beyond the desired state.
    pub fn status_view(&mut self) -> Result<crate::status::View<'_>, ApiError> {
        let ids: Vec<BackendId> = self.desired.backends.keys().copied().collect();
        let active = self
            .maps
            .active_connections(&ids)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let packed = self
            .desired
            .services
            .iter()
            .map(|s| (s.value.id, self.maps.packed_bits(s.value.id)))
            .collect();
        Ok(crate::status::View {
            cfg: &self.cfg,
            config_path: &self.config_path,
            desired: &self.desired,
            health: &self.health,
            weight_notes: &self.weight_notes,
            active,
            packed,
            defer_records: self.maps.defers_records(),
        })
    }
}

impl<M: Maps, N: Neighbours, I: Interfaces> Controller<M, N, I> {
    /// `lb explain`: where the flow `q` goes and why, from the live maps. `now_ns` is
    /// CLOCK_MONOTONIC_COARSE (the connection table's clock).
    pub fn explain(
        &mut self,
        q: &crate::explain::Query,
        now_ns: u64,
    ) -> Result<crate::api::Explain, ApiError> {
        let ids: Vec<BackendId> = self.desired.backends.keys().copied().collect();
        let internal = |e: crate::dataplane::LoaderError| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        };
        let active = self.maps.active_connections(&ids).map_err(internal)?;
        let mut live = LiveMaps {
            maps: &mut self.maps,
            error: None,
        };
        let out = crate::explain::explain(&self.desired, &active, &mut live, q, now_ns);
        match live.error {
            Some(e) => Err(internal(e)),
            None => Ok(out),
        }
    }
}

/// The live maps for [`crate::explain`]; the first read error is kept and reported.
struct LiveMaps<'a, M: Maps> {
    maps: &'a mut M,
    error: Option<crate::dataplane::LoaderError>,
}

impl<M: Maps> crate::explain::Live for LiveMaps<'_, M> {
    fn flow(&mut self, key: &lb_common::FlowKey) -> Option<lb_common::FlowValue> {
        self.maps.flow_entry(key).unwrap_or_else(|e| {
            self.error.get_or_insert(e);
            None
        })
    }

    fn ring(&mut self, svc: &lb_common::ServiceValue, slot: u32) -> u32 {
        self.maps.ring_entry(svc, slot).unwrap_or_else(|e| {
            self.error.get_or_insert(e);
            lb_common::NO_BACKEND
        })
    }

    fn rr_cursor(&mut self, service_id: u32) -> u64 {
        self.maps.rr_cursor(service_id).unwrap_or_else(|e| {
            self.error.get_or_insert(e);
            0
        })
    }
}

/// Backend id → (service index, backend index).
fn index(a: &Assignment) -> IdMap<(usize, usize)> {
    let mut out = IdMap::new();
    for (si, (_, bids)) in a.services.iter().enumerate() {
        for (bi, id) in bids.iter().enumerate() {
            out.insert(*id, (si, bi));
        }
    }
    out
}

fn describe(o: &Override) -> String {
    match (o.admin, o.weight) {
        (a, Some(w)) => format!("{a}, weight {w} (override)"),
        (a, None) => format!("{a}"),
    }
}

/// What became of one flow a peer shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shared {
    Inserted,
    /// This node has an entry for it already.
    Existing,
    /// No such service or backend here, or the backend is not usable.
    Unknown,
}

impl<M: Maps, N: Neighbours, I: Interfaces> Controller<M, N, I> {
    /// Healthy backends of service `si` for the announcement rule: enabled, weight above 0,
    /// MAC known, and health up after at least one passing check (or not checked).
    fn healthy_backends(&self, si: usize) -> u32 {
        let Some((_, bids)) = self.assignment.services.get(si) else {
            return 0;
        };
        bids.iter()
            .filter(|id| {
                let Some(info) = self.desired.backend_info.get(id) else {
                    return false;
                };
                let checked_ok = match info.health {
                    HealthInput::Unchecked => true,
                    HealthInput::Up => self
                        .health
                        .get(id)
                        .is_some_and(|h| h.up && h.last_ok.is_some()),
                    HealthInput::Down(_) => false,
                };
                checked_ok
                    && info.decision.state == desired::State::Up
                    && info.decision.effective_weight > 0
            })
            .count() as u32
    }

    /// Every VIP with its services' health, for [`crate::announce`].
    pub fn vip_inputs(&self) -> BTreeMap<IpAddr, Vec<crate::announce::ServiceHealth>> {
        let mut out: BTreeMap<IpAddr, Vec<crate::announce::ServiceHealth>> = BTreeMap::new();
        for (si, s) in self.cfg.services.iter().enumerate() {
            out.entry(s.vip)
                .or_default()
                .push(crate::announce::ServiceHealth {
                    name: s.name.clone(),
                    healthy: self.healthy_backends(si),
                    backends: s.backends.len() as u32,
                    min_healthy: s.min_healthy,
                });
        }
        out
    }

    /// New flows so far per VIP (its services' counters summed).
    pub fn vip_new_flows(&self, snap: &Snapshot) -> BTreeMap<IpAddr, u64> {
        let mut out = BTreeMap::new();
        for (s, d) in self.cfg.services.iter().zip(&self.desired.services) {
            let n = snap.services.get(&d.value.id).map_or(0, |c| c.new_flows);
            *out.entry(s.vip).or_insert(0) += n;
        }
        out
    }

    /// The VIPs the operator withdrew (persisted).
    pub fn withdrawn_vips(&self) -> &std::collections::BTreeSet<IpAddr> {
        &self.admin.withdrawn_vips
    }

    /// `lb vip announce|withdraw <service>`: persists the operator's choice for the service's
    /// VIP. Returns the VIP and the services sharing it.
    pub fn vip_admin(
        &mut self,
        service: &str,
        withdraw: bool,
    ) -> Result<(IpAddr, Vec<String>), ApiError> {
        let Some(svc) = self.cfg.services.iter().find(|s| s.name == service) else {
            let names: Vec<&str> = self.cfg.services.iter().map(|s| s.name.as_str()).collect();
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "unknown service \"{service}\" (services: {})",
                    names.join(", ")
                ),
            ));
        };
        let vip = svc.vip;
        let sharing: Vec<String> = self
            .cfg
            .services
            .iter()
            .filter(|s| s.vip == vip)
            .map(|s| s.name.clone())
            .collect();
        let mut admin = self.admin.clone();
        if withdraw {
            admin.withdrawn_vips.insert(vip);
        } else {
            admin.withdrawn_vips.remove(&vip);
        }
        if admin != self.admin {
            admin.save(&self.cfg.control.state_file).map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{e}; nothing changed"),
                )
            })?;
            self.admin = admin;
        }
        Ok((vip, sharing))
    }

    /// Flow sharing: this node's new flow `ev` (from `LB_SYNC`) as peers understand it, or
    /// `None` if its backend id no longer stands for the same backend.
    pub fn shared_of(&self, ev: &lb_common::SyncEvent) -> Option<crate::flowsync::SharedFlow> {
        let id = BackendId(ev.backend);
        let b = self.desired.backends.get(&id)?;
        if b.generation != ev.generation {
            return None;
        }
        let info = self.desired.backend_info.get(&id)?;
        Some(crate::flowsync::SharedFlow {
            key: ev.key,
            backend: info.address,
        })
    }

    /// Flow sharing: inserts a flow a peer shared, mapped to this node's backend id of the
    /// same address in the service the flow belongs to. `now_ns`: the table's clock.
    pub fn accept_shared(
        &mut self,
        f: &crate::flowsync::SharedFlow,
        now_ns: u64,
    ) -> Result<Shared, crate::dataplane::LoaderError> {
        let k = &f.key;
        let Some(vip) = lb_common::rules::key_addr(&k.dst_addr, k.family) else {
            return Ok(Shared::Unknown);
        };
        let port = u16::from_be_bytes(k.dst_port);
        let proto = k.protocol;
        let matches = |s: &&crate::config::Service| s.vip == vip && s.protocol.number() == proto;
        // The exact port first, then an all-ports service (as the data plane looks them up).
        let si = self
            .cfg
            .services
            .iter()
            .position(|s| matches(&s) && s.port == port)
            .or_else(|| {
                self.cfg
                    .services
                    .iter()
                    .position(|s| matches(&s) && s.port == 0)
            });
        let Some(si) = si else {
            return Ok(Shared::Unknown);
        };
        let s = &self.cfg.services[si];
        let Some(bi) = s.backends.iter().position(|b| b.address == f.backend) else {
            return Ok(Shared::Unknown);
        };
        let id = self.assignment.services[si].1[bi];
        let Some(b) = self.desired.backends.get(&id) else {
            return Ok(Shared::Unknown);
        };
        if b.flags & lb_common::BACKEND_F_ACTIVE == 0 {
            return Ok(Shared::Unknown);
        }
        let value = lb_common::FlowValue {
            backend: id.0,
            generation: b.generation,
            last_seen_ns: now_ns,
            // Not counted here: its opening was counted on the node that saw it.
            flags: 0,
            cpu: lb_common::FLOW_CPU_PEER,
        };
        // A maglev/sh flow on another backend than its slot's here: the slot must consult the
        // table (changed), or its packets would follow the slot.
        if let Some(ds) = self.desired.services.iter_mut().find(|d| d.name == s.name)
            && let Some(slot) = ds.slot_of(k)
            && ds.ring.get(slot as usize) != Some(id.0)
            && !ds.dirty.contains(slot)
        {
            ds.dirty.insert(slot);
            let op = desired::Op::Ring {
                service_id: ds.value.id,
                base: ds.value.ring_base,
                slots: ds
                    .slot_value(slot as usize)
                    .map(|v| (slot, v))
                    .into_iter()
                    .collect(),
            };
            self.ring_changed
                .insert(ds.value.id, crate::trace::clocks().0);
            let ops = [op];
            self.note_written(&ops);
            self.maps.apply_ops(&ops)?;
        }
        Ok(if self.maps.insert_shared_flow(k, &value)? {
            Shared::Inserted
        } else {
            Shared::Existing
        })
    }
}
