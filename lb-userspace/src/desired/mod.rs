//! The desired contents of the data-plane maps: one pure function of the config, the admin
//! overrides, the health checks and the neighbour resolution.
//!
//! [`decide`] is the one rule for whether a backend takes traffic, with which weight and MAC;
//! every path (start, reload, admin change, health change, MAC found/lost/changed) goes through
//! it, because every path rebuilds the whole desired state from the same inputs.

pub mod ids;
pub mod reconcile;
mod table;

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    BACKEND_F_ACTIVE, BACKEND_F_REDIRECT, Backend, FLAG_ALL_PORTS_SERVICES, NO_BACKEND, SCHED_LC,
    SCHED_MAGLEV, SCHED_SH, SCHED_WLC, SCHED_WRR, ServiceKey, ServiceValue, VipKey,
    limits::MAX_TX_PORTS, rules::addr_key,
};

pub use self::{
    ids::{BackendId, IdMap, Ids},
    reconcile::{DiffSummary, Op, diff},
    table::{Narrow, Table, tally},
};
use crate::{
    admin::Override,
    api::Admin,
    config::{self, Fallback, Mac, Scheduler},
    iface::Interfaces,
    maglev, sched,
};

/// Where a backend's destination MAC comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MacInput {
    /// `mac` in the config.
    Config(Mac),
    /// The kernel's neighbour table, on the route's device `dev`.
    Resolved { mac: Mac, dev: String },
    /// Not known (yet): why.
    Unresolved(String),
}

impl MacInput {
    pub fn mac(&self) -> Option<Mac> {
        match self {
            MacInput::Config(m) | MacInput::Resolved { mac: m, .. } => Some(*m),
            MacInput::Unresolved(_) => None,
        }
    }
}

/// What the health checks say of a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthInput {
    /// No check configured.
    Unchecked,
    Up,
    /// Down, and why.
    Down(String),
}

/// Everything known about one backend: the inputs of [`decide`].
#[derive(Clone, Debug)]
pub struct BackendInput<'a> {
    pub id: BackendId,
    pub cfg: &'a config::Backend,
    pub admin: Override,
    pub health: HealthInput,
    pub mac: MacInput,
}

/// One service and its backends' inputs (config order).
#[derive(Clone, Debug)]
pub struct ServiceInput<'a> {
    pub id: u32,
    pub cfg: &'a config::Service,
    pub backends: Vec<BackendInput<'a>>,
}

/// What `lb status` calls a backend's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Up,
    Draining,
    Disabled,
    Down,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Up => "up",
            State::Draining => "draining",
            State::Disabled => "disabled",
            State::Down => "down",
        })
    }
}

/// The verdict of [`decide`] for one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// May receive traffic (`BACKEND_F_ACTIVE`): its flows stay, and it can be scheduled if its
    /// weight is above 0. Never true without a MAC.
    pub active: bool,
    /// Weight for new flows (0 unless enabled and active).
    pub effective_weight: u16,
    pub state: State,
    /// Why it is down (empty otherwise).
    pub reason: String,
}

/// The rule. A backend is active when it is not disabled, its health allows it (up, unchecked,
/// or the service's `fallback = "all"` applies) and its MAC is known. It takes new flows with
/// its weight (the override, if any) only when enabled and active; a draining backend stays
/// active with weight 0 so its flows stay.
pub fn decide(
    admin: &Override,
    config_weight: u16,
    health: &HealthInput,
    fallback_applies: bool,
    mac: &MacInput,
) -> Decision {
    let health_ok = fallback_applies || !matches!(health, HealthInput::Down(_));
    let reason = match (mac, health) {
        (MacInput::Unresolved(why), _) => format!("MAC unresolved: {why}"),
        (_, HealthInput::Down(why)) if !health_ok => why.clone(),
        _ => String::new(),
    };
    let active = admin.admin != Admin::Disabled && health_ok && mac.mac().is_some();
    let effective_weight = match admin.admin {
        Admin::Enabled if active => admin.weight.unwrap_or(config_weight),
        _ => 0,
    };
    let state = match admin.admin {
        Admin::Disabled => State::Disabled,
        Admin::Draining => State::Draining,
        Admin::Enabled if active => State::Up,
        Admin::Enabled => State::Down,
    };
    Decision {
        active,
        effective_weight,
        state,
        reason,
    }
}

/// The inputs for `cfg` under assignment `a` (from [`Ids::sync`]): `f` says, for each
/// backend, its admin override, health and MAC.
pub fn inputs<'a>(
    cfg: &'a config::Config,
    a: &ids::Assignment,
    mut f: impl FnMut(
        BackendId,
        &'a config::Service,
        &'a config::Backend,
    ) -> (Override, HealthInput, MacInput),
) -> Vec<ServiceInput<'a>> {
    cfg.services
        .iter()
        .zip(&a.services)
        .map(|(s, (sid, bids))| ServiceInput {
            id: *sid,
            cfg: s,
            backends: s
                .backends
                .iter()
                .zip(bids)
                .map(|(b, id)| {
                    let (admin, health, mac) = f(*id, s, b);
                    BackendInput {
                        id: *id,
                        cfg: b,
                        admin,
                        health,
                        mac,
                    }
                })
                .collect(),
        })
        .collect()
}

/// A backend as configured, administered and decided, for reports.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendInfo {
    pub service: String,
    pub address: IpAddr,
    pub mac: MacInput,
    pub config_weight: u16,
    pub weight_override: Option<u16>,
    pub admin: Admin,
    pub health: HealthInput,
    pub decision: Decision,
}

/// One service as the data plane sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredService {
    pub name: String,
    pub key: ServiceKey,
    pub value: ServiceValue,
    /// Backend id per slot ([`NO_BACKEND`] when none): Maglev table, rr/wrr sequence or lc/wlc
    /// list, padded to `ring_size`. Shared with the previous state when unchanged (a reload
    /// of 1 000 services copies no table).
    pub ring: std::sync::Arc<Table>,
    /// Backend ids of this service, in config order.
    pub backends: Vec<BackendId>,
    /// Hash of `ring` as backend *addresses*, slot by slot (ids differ between nodes): equal
    /// on two balancers ⇔ they send every new flow of the service to the same backend
    /// ([`DesiredService::ring_digest`]). Folded when first asked for, then kept with the table
    /// (shared with the states that reuse it), not per report.
    pub digest: LazyDigest,
    /// What `ring` was computed from: an unchanged key reuses it (a MAC or health change of
    /// another service, or one that leaves the weights as they are, rebuilds no table).
    pub ring_key: RingKey,
    /// maglev/sh: the slots whose backend changed while flows recorded with the old one may
    /// live ([`lb_common::RING_DIRTY`] in the map): their established packets consult the connection
    /// table; the others are forwarded by the slot alone. Cleared by
    /// [`crate::controller::Controller::sweep`] once no entry of the slot names another backend.
    pub dirty: Slots,
    /// maglev/sh: changed slots that also name the backend they had before the change
    /// ([`lb_common::RING_PREV`]): flows of unchanged slots are not recorded, so an unrecorded
    /// flow of such a slot goes back to that backend (and is recorded) until `prev_until_ns`.
    pub prev: Prev,
    /// When `prev` lapses (the controller's monotonic clock): the protocol's idle timeout after
    /// the last change that added to it.
    pub prev_until_ns: u64,
}

/// Slot → the backend it had before its change (see [`DesiredService::prev`]).
pub type Prev = std::sync::Arc<BTreeMap<u32, u32>>;

/// A table's digest, folded from its slots when first read: folding 65 537 slots takes about
/// 0.2 ms (one dependent multiply a slot), a sixth of what building a Maglev table of 10
/// backends costs, so an apply of 1 000 such services does not fold them all. Not compared: it
/// follows from `ring` and `ring_key`, which are.
#[derive(Clone, Debug, Default)]
pub struct LazyDigest(std::sync::Arc<std::sync::OnceLock<u64>>);

impl LazyDigest {
    /// A digest already known.
    pub fn known(d: u64) -> LazyDigest {
        LazyDigest(std::sync::Arc::new(std::sync::OnceLock::from(d)))
    }
}

impl PartialEq for LazyDigest {
    fn eq(&self, _: &LazyDigest) -> bool {
        true
    }
}

impl DesiredService {
    /// [`DesiredService::digest`]: folded now if no one asked before.
    pub fn ring_digest(&self) -> u64 {
        *self
            .digest
            .0
            .get_or_init(|| table_digest(&self.ring, &self.ring_key.addresses()))
    }

    /// `LB_RING`'s value for slot `i`: the backend id, with [`lb_common::RING_DIRTY`] on a changed slot.
    pub fn slot_value(&self, i: usize) -> Option<u32> {
        slot_value(&self.ring, &self.dirty, &self.prev, i)
    }

    /// Backend id → seconds (rounded up) during which flows of this service that are not in
    /// the connection table may still reach it: the backends that changed slots name as their
    /// previous one, until `prev_until_ns` (UDP of maglev/sh; empty otherwise). A drain that
    /// waits for active connections waits for these too (`scripts/lb-maintenance.sh`).
    pub fn unrecorded_flows_seconds(&self, now_ns: u64) -> BTreeMap<u32, u64> {
        if self.prev.is_empty() || now_ns >= self.prev_until_ns {
            return BTreeMap::new();
        }
        let secs = (self.prev_until_ns - now_ns).div_ceil(1_000_000_000);
        self.prev.values().map(|&id| (id, secs)).collect()
    }

    /// Whether established packets of this service may skip the connection table.
    pub fn stateless(&self) -> bool {
        matches!(self.value.scheduler, SCHED_MAGLEV | SCHED_SH)
    }

    /// Whether flows of this service through an unchanged slot are not recorded (maglev/sh:
    /// UDP, and TCP with `record_connections = "on_change"`), so a changed slot keeps its
    /// previous backend for them.
    pub fn records_on_change(&self) -> bool {
        self.stateless()
            && (self.key.protocol == lb_common::PROTO_UDP
                || self.value.flags & lb_common::SVC_F_TCP_ON_CHANGE != 0)
    }

    /// maglev/sh: the table slot of `key` (the data plane's hash); `None` for the other
    /// schedulers, whose tables are sequences or lists.
    pub fn slot_of(&self, key: &lb_common::FlowKey) -> Option<u32> {
        let h = match self.value.scheduler {
            SCHED_MAGLEV => lb_common::hash::flow_hash(key),
            SCHED_SH => lb_common::hash::source_hash(key),
            _ => return None,
        };
        let n = self.value.ring_size;
        (n > 0).then(|| lb_common::hash::reduce(h, n))
    }

    /// `LB_RING`'s indexes this service's table occupies.
    pub fn ring_range(&self) -> std::ops::Range<u64> {
        let b = self.value.ring_base as u64;
        b..b + self.value.ring_size as u64
    }
}

/// `LB_RING`'s value for slot `i` of table `ring` with changed slots `dirty` and their previous
/// backends `prev`: the backend id, with [`lb_common::RING_DIRTY`] on a changed slot and its previous
/// backend ([`lb_common::ring_value`]).
pub fn slot_value(ring: &Table, dirty: &Slots, prev: &BTreeMap<u32, u32>, i: usize) -> Option<u32> {
    let id = ring.get(i)?;
    let changed = dirty.contains(i as u32);
    let before = if changed {
        prev.get(&(i as u32)).copied()
    } else {
        None
    };
    Some(lb_common::ring_value(id, changed, before))
}

/// A set of table slots (a bitset).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slots(Vec<u64>);

impl Slots {
    pub fn new(n: usize) -> Slots {
        Slots(vec![0; n.div_ceil(64)])
    }

    pub fn contains(&self, i: u32) -> bool {
        self.0
            .get(i as usize / 64)
            .is_some_and(|w| w >> (i % 64) & 1 == 1)
    }

    pub fn insert(&mut self, i: u32) {
        let w = i as usize / 64;
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        self.0[w] |= 1 << (i % 64);
    }

    pub fn remove(&mut self, i: u32) {
        if let Some(w) = self.0.get_mut(i as usize / 64) {
            *w &= !(1 << (i % 64));
        }
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// Every slot in the set, in order (a word at a time: empty words cost one test).
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().enumerate().flat_map(|(k, &w)| {
            let mut bits = w;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = bits.trailing_zeros();
                    bits &= bits - 1;
                    k as u32 * 64 + b
                })
            })
        })
    }
}

/// The changed slots of a maglev/sh table `ring` built after `old` (the service's previous
/// state): a slot whose backend differs from a backend it had (an empty slot that gets one has
/// no flows to protect, unless it was changed before), one changed before and not cleared yet,
/// and every slot when the old table's meaning differs (another scheduler, or unknown: adopted
/// from the maps). An empty slot may be in the set (its flows' entries are still waited for);
/// its map value is `NO_BACKEND` either way.
fn dirty_after(old: &DesiredService, scheduler: u32, ring: &Table) -> Slots {
    let comparable = old.value.scheduler == scheduler && old.ring.len() == ring.len();
    let mut d = Slots::new(ring.len());
    if !comparable {
        for i in 0..ring.len() {
            d.insert(i as u32);
        }
        return d;
    }
    for (i, (id, was)) in ring.iter().zip(old.ring.iter()).enumerate() {
        if old.dirty.contains(i as u32) || (was != NO_BACKEND && was != id) {
            d.insert(i as u32);
        }
    }
    d
}

/// maglev/sh UDP services, TCP services that record connections on change, and (with
/// `unrecorded_syns`: a record limit is set, `dataplane.record_limit`) TCP services that record
/// at the SYN, whose SYNs beyond the limit are not recorded: the previous
/// backends of `next`'s changed slots, after `old` (the same service as the maps hold it), at
/// `now_ns`; new ones are kept for `window_ns`. Their flows of an unchanged slot are not
/// recorded, so a slot that changes from unchanged names the backend it had (its unrecorded
/// flows go back there and are recorded); one that had a previous backend keeps it until it
/// lapses, unless the slot has that backend again. Another scheduler or table size: no slot
/// corresponds, nothing is kept. Other TCP services (no record limit) have none: a connection
/// is recorded at its SYN (active connections, drains), and a slot keeps its mark only while an
/// entry names another backend. (A TCP service switched from `on_change` still has unrecorded
/// connections: it keeps previous backends, and adds new ones, in the change that switches it
/// and while those it has live.)
pub fn with_previous(
    next: &mut DesiredService,
    old: Option<&DesiredService>,
    now_ns: u64,
    window_ns: u64,
    unrecorded_syns: bool,
) {
    let limited_tcp = unrecorded_syns && next.key.protocol == lb_common::PROTO_TCP;
    let old = old.filter(|o| {
        // A TCP service switched from on_change (in this change, or with previous backends
        // still live from it) has unrecorded connections.
        let switched = o.key.protocol == next.key.protocol
            && (o.value.flags & lb_common::SVC_F_TCP_ON_CHANGE != 0
                || !o.prev.is_empty() && now_ns < o.prev_until_ns);
        next.stateless()
            && (next.records_on_change() || limited_tcp || switched)
            && o.value.scheduler == next.value.scheduler
            && o.ring.len() == next.ring.len()
    });
    let Some(o) = old else {
        next.prev = Prev::default();
        next.prev_until_ns = 0;
        return;
    };
    let live = now_ns < o.prev_until_ns;
    let mut prev = BTreeMap::new();
    let mut added = false;
    // Only changed slots can have one (a reload of 1 000 unchanged tables looks at none). (An
    // empty slot keeps or gains one too: it is written with its next backend.)
    for slot in next.dirty.iter() {
        let i = slot as usize;
        let (Some(id), Some(was)) = (next.ring.get(i), o.ring.get(i)) else {
            continue;
        };
        let p = match o.prev.get(&slot) {
            Some(p) if live => *p,
            _ if !o.dirty.contains(slot) && was != NO_BACKEND && was != id => {
                added = true;
                was
            }
            _ => continue,
        };
        if p != id {
            prev.insert(slot, p);
        }
    }
    next.prev_until_ns = if added {
        now_ns.saturating_add(window_ns)
    } else if prev.is_empty() {
        0
    } else {
        o.prev_until_ns
    };
    next.prev = std::sync::Arc::new(prev);
}

/// Whether the previous backends that `next`'s changed slots gain now need only the short
/// window of `dataplane.defer_records` ([`crate::controller::DEFER_WINDOW_NS`]) instead of the
/// protocol's idle timeout: an `"at_syn"` maglev/sh TCP service whose SYNs the controller
/// records (`deferring`, no record limit), whose connections through unchanged slots are all
/// recorded but for the records still in the ring. Not when it comes from `"on_change"`: in
/// the change that switches it, or while previous backends that outlast the short window (its
/// unrecorded `"on_change"` connections') are live.
pub fn deferred_window_applies(
    next: &DesiredService,
    old: Option<&DesiredService>,
    now_ns: u64,
    deferring: bool,
    limited: bool,
) -> bool {
    deferring
        && !limited
        && next.stateless()
        && next.key.protocol == lb_common::PROTO_TCP
        && !next.records_on_change()
        && old.is_none_or(|o| {
            o.value.flags & lb_common::SVC_F_TCP_ON_CHANGE == 0
                && (o.prev.is_empty()
                    || o.prev_until_ns <= now_ns.saturating_add(crate::controller::DEFER_WINDOW_NS))
        })
}

/// The inputs of a service's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingKey {
    scheduler: Scheduler,
    ring_size: u32,
    backends: Vec<(BackendId, IpAddr, u16)>,
}

impl RingKey {
    /// Backend id → address, of the backends the table may name.
    fn addresses(&self) -> BTreeMap<u32, IpAddr> {
        self.backends.iter().map(|(id, a, _)| (id.0, *a)).collect()
    }

    /// Matches no real table.
    fn none() -> RingKey {
        RingKey {
            scheduler: Scheduler::Maglev,
            ring_size: 0,
            backends: Vec::new(),
        }
    }
}

/// Everything the maps should contain.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredState {
    pub services: Vec<DesiredService>,
    /// Backend id → value.
    pub backends: BTreeMap<BackendId, Backend>,
    /// Backend id → what it is and why, for reports.
    pub backend_info: BTreeMap<BackendId, BackendInfo>,
    /// VIP → number of services on it.
    pub vips: BTreeMap<VipKey, lb_common::VipValue>,
    /// Devmap slot → ifindex.
    pub tx_ports: BTreeMap<u32, u32>,
    /// Slots of `LB_RING` (`dataplane.ring_capacity`): the services' tables lie in it.
    pub ring_capacity: u32,
    /// `LB_FLAGS[0]`.
    pub flags: u32,
    /// Backends of the previous state that are gone: id → inactive value (new generation).
    pub retired: BTreeMap<BackendId, Backend>,
    /// Next generation number to hand out (generations are never reused).
    pub next_generation: u32,
    /// Read back from pinned maps (an earlier controller's): the next diff rewrites every
    /// backend and table once.
    pub adopted: bool,
}

/// Error building the desired state (the config is valid, but the machine disagrees).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("dataplane.interface: {0}")]
    Interface(String),
    #[error("service \"{service}\": backend \"{backend}\": interface: {why}")]
    BackendInterface {
        service: String,
        backend: IpAddr,
        why: String,
    },
    #[error("more than {MAX_TX_PORTS} distinct backend interfaces")]
    TooManyTxPorts,
    #[error(
        "service \"{service}\": no room for a table of {size} slots in LB_RING ({capacity} slots, \
         {used} in use{changing}); raise dataplane.ring_capacity (needs `lb run --replace`) or \
         give services a smaller ring_size"
    )]
    RingCapacity {
        service: String,
        size: u32,
        capacity: u32,
        used: u64,
        /// A table that changes size needs room for both while the service switches.
        changing: &'static str,
    },
}

impl DesiredState {
    /// An empty data plane.
    pub fn empty(ring_capacity: u32) -> DesiredState {
        DesiredState {
            services: Vec::new(),
            backends: BTreeMap::new(),
            backend_info: BTreeMap::new(),
            vips: BTreeMap::new(),
            tx_ports: BTreeMap::new(),
            ring_capacity,
            flags: 0,
            retired: BTreeMap::new(),
            next_generation: 1,
            adopted: false,
        }
    }

    /// What an earlier controller left in the pinned maps, as a previous state: its backends
    /// keep their ids and generations (so established flows stay), its services and VIPs are
    /// there to be replaced or removed by the first diff.
    ///
    /// A maglev/sh table is taken as the maps hold it: its backends, changed slots and their
    /// previous backends (kept for a full idle timeout of the service's protocol from `now_ns`:
    /// when they were set is not recorded there), so the first diff writes only what differs
    /// and slots that change now keep their unrecorded flows.
    pub fn from_adopted(
        ring_capacity: u32,
        a: &crate::dataplane::Adopted,
        now_ns: u64,
        timeouts: &config::Timeouts,
    ) -> DesiredState {
        let mut d = DesiredState::empty(ring_capacity);
        for (k, v) in &a.services {
            let mut ring = Vec::new();
            let mut dirty = Slots::default();
            let mut prev = BTreeMap::new();
            for (i, raw) in a.rings.get(&v.id).into_iter().flatten().enumerate() {
                ring.push(lb_common::ring_id(*raw).unwrap_or(NO_BACKEND));
                if *raw != NO_BACKEND && raw & lb_common::RING_DIRTY != 0 {
                    dirty.insert(i as u32);
                }
                if let Some(p) = lb_common::ring_prev(*raw) {
                    prev.insert(i as u32, p);
                }
            }
            d.services.push(DesiredService {
                name: format!("#{}", v.id),
                key: *k,
                value: *v,
                ring: std::sync::Arc::new(Table::from_ids(&ring)),
                backends: Vec::new(),
                digest: LazyDigest::known(0),
                ring_key: RingKey::none(),
                dirty,
                prev_until_ns: if prev.is_empty() {
                    0
                } else {
                    now_ns.saturating_add(timeouts.open_ns(k.protocol))
                },
                prev: std::sync::Arc::new(prev),
            });
        }
        d.vips = a.vips.iter().copied().collect();
        for (id, b, _) in &a.backends {
            d.backends.insert(BackendId(*id), *b);
        }
        d.next_generation = a
            .backends
            .iter()
            .map(|(_, b, _)| b.generation.saturating_add(1))
            .max()
            .unwrap_or(1)
            .max(1);
        d.flags = u32::MAX; // unknown: written again
        d.adopted = true;
        d
    }

    /// The state of a fresh data plane for `cfg` alone: ids in config order, configured MACs
    /// (a backend without one is unresolved, so inactive), no admin overrides, no checks.
    /// For fixtures and benchmarks.
    pub fn from_config(
        cfg: &config::Config,
        ifaces: &impl Interfaces,
    ) -> Result<DesiredState, StateError> {
        let a = Ids::default().sync(cfg);
        let inputs = inputs(cfg, &a, |_, _, b| {
            (
                Override::default(),
                HealthInput::Unchecked,
                b.mac
                    .map_or(MacInput::Unresolved("no mac".into()), MacInput::Config),
            )
        });
        DesiredState::next(&inputs, &cfg.dataplane, ifaces, None)
    }

    /// The desired state for `services` after `prev`. A backend keeps its generation unless it
    /// stops being active (its flows must not stay, nor come back later) or is new; backends of
    /// `prev` that are gone are retired (inactive, with a generation no flow has).
    pub fn next(
        services: &[ServiceInput<'_>],
        dataplane: &config::Dataplane,
        ifaces: &impl Interfaces,
        prev: Option<&DesiredState>,
    ) -> Result<DesiredState, StateError> {
        let (_, lb_mac) = ifaces
            .lookup(&dataplane.interface)
            .map_err(StateError::Interface)?;
        let mut next_generation = prev.map_or(1, |p| p.next_generation);
        let mut fresh = || {
            next_generation += 1;
            next_generation - 1
        };
        let mut tx_slots: BTreeMap<String, u32> = BTreeMap::new();
        let mut out = DesiredState::empty(dataplane.ring_capacity);
        let mut tables = TableSpace::new(dataplane.ring_capacity, prev);
        let prev_by_id: std::collections::HashMap<u32, &DesiredService> = prev
            .map(|p| p.services.iter().map(|o| (o.value.id, o)).collect())
            .unwrap_or_default();
        // Services (indexes into `out.services`) whose Maglev table must be built.
        let mut maglev_jobs: Vec<usize> = Vec::new();

        for s in services {
            let (vip, family) = addr_key(s.cfg.vip);
            let key = ServiceKey {
                vip,
                port: s.cfg.port.to_be_bytes(),
                protocol: s.cfg.protocol.number(),
                family,
            };
            let mut value = ServiceValue {
                id: s.id,
                scheduler: match s.cfg.scheduler {
                    Scheduler::Maglev => SCHED_MAGLEV,
                    Scheduler::Sh => SCHED_SH,
                    Scheduler::Rr | Scheduler::Wrr => SCHED_WRR,
                    Scheduler::Lc => SCHED_LC,
                    Scheduler::Wlc => SCHED_WLC,
                },
                flags: match s.cfg.record_connections {
                    config::RecordConnections::AtSyn => 0,
                    config::RecordConnections::OnChange => lb_common::SVC_F_TCP_ON_CHANGE,
                },
                ring_len: 0,
                ring_base: 0,
                ring_size: s.cfg.ring_size,
            };
            let ring_size = s.cfg.ring_size;
            value.ring_base = tables.place(s.id, ring_size).ok_or_else(|| {
                let changing = prev
                    .and_then(|p| p.services.iter().find(|o| o.value.id == s.id))
                    .is_some_and(|o| o.value.ring_size != ring_size);
                StateError::RingCapacity {
                    service: s.cfg.name.clone(),
                    size: ring_size,
                    capacity: dataplane.ring_capacity,
                    used: tables.used(),
                    changing: if changing {
                        ", its old table included"
                    } else {
                        ""
                    },
                }
            })?;
            out.vips
                .entry(VipKey {
                    addr: vip,
                    family,
                    _pad: [0; 3],
                })
                .or_default()
                .services += 1;

            // fallback = "all": when every backend's check has it down, ignore the checks.
            let fallback_applies = s.cfg.fallback == Fallback::All
                && !s.backends.is_empty()
                && s.backends
                    .iter()
                    .all(|b| matches!(b.health, HealthInput::Down(_)));
            let mut ids = Vec::with_capacity(s.backends.len());
            let mut weights = Vec::with_capacity(s.backends.len());
            for b in &s.backends {
                let d = decide(&b.admin, b.cfg.weight, &b.health, fallback_applies, &b.mac);
                let generation = match prev.and_then(|p| p.backends.get(&b.id)) {
                    Some(old) if old.flags & BACKEND_F_ACTIVE != 0 && !d.active => fresh(),
                    Some(old) => old.generation,
                    None => fresh(),
                };
                // A resolved MAC on another device than the data plane's: egress through it.
                let egress = match (&b.cfg.interface, &b.mac) {
                    (Some(i), _) => Some(i.clone()),
                    (None, MacInput::Resolved { dev, .. }) if *dev != dataplane.interface => {
                        Some(dev.clone())
                    }
                    _ => None,
                };
                let (src_mac, mut flags, tx_port) = match egress {
                    None => (lb_mac, BACKEND_F_ACTIVE, 0),
                    Some(ifname) => {
                        let (ifindex, mac) =
                            ifaces
                                .lookup(&ifname)
                                .map_err(|why| StateError::BackendInterface {
                                    service: s.cfg.name.clone(),
                                    backend: b.cfg.address,
                                    why,
                                })?;
                        let n = tx_slots.len() as u32;
                        let slot = *tx_slots.entry(ifname).or_insert(n);
                        if slot >= MAX_TX_PORTS {
                            return Err(StateError::TooManyTxPorts);
                        }
                        out.tx_ports.insert(slot, ifindex);
                        (mac, BACKEND_F_ACTIVE | BACKEND_F_REDIRECT, slot)
                    }
                };
                if !d.active {
                    flags &= !BACKEND_F_ACTIVE;
                }
                out.backends.insert(
                    b.id,
                    Backend {
                        // Zero only when inactive: the loader refuses an active zero MAC.
                        mac: b.mac.mac().unwrap_or_default().0,
                        src_mac: src_mac.0,
                        flags,
                        generation,
                        tx_port,
                        weight: d.effective_weight as u32,
                        _pad: 0,
                    },
                );
                weights.push(d.effective_weight);
                ids.push(b.id);
                out.backend_info.insert(
                    b.id,
                    BackendInfo {
                        service: s.cfg.name.clone(),
                        address: b.cfg.address,
                        mac: b.mac.clone(),
                        config_weight: b.cfg.weight,
                        weight_override: b.admin.weight,
                        admin: b.admin.admin,
                        health: b.health.clone(),
                        decision: d,
                    },
                );
            }
            let ring_key = RingKey {
                scheduler: s.cfg.scheduler,
                ring_size,
                backends: s
                    .backends
                    .iter()
                    .zip(&weights)
                    .map(|(b, w)| (b.id, b.cfg.address, *w))
                    .collect(),
            };
            let old = prev_by_id.get(&s.id).copied();
            let reuse = old.filter(|o| o.ring_key == ring_key);
            let (ring, digest) = match reuse {
                Some(o) => {
                    value.ring_len = o.value.ring_len;
                    (std::sync::Arc::clone(&o.ring), o.digest.clone())
                }
                // Maglev tables are built below, side by side on every CPU.
                None if matches!(s.cfg.scheduler, Scheduler::Maglev | Scheduler::Sh) => {
                    maglev_jobs.push(out.services.len());
                    Default::default()
                }
                None => {
                    let r = ring(s.cfg, &ids, &weights, &ring_key, &mut value);
                    (
                        std::sync::Arc::new(Table::from_ids(&r)),
                        LazyDigest::default(),
                    )
                }
            };
            let (dirty, prev, prev_until_ns) = match old {
                // The same table: the same changed slots.
                Some(o)
                    if reuse.is_some() && matches!(value.scheduler, SCHED_MAGLEV | SCHED_SH) =>
                {
                    (o.dirty.clone(), o.prev.clone(), o.prev_until_ns)
                }
                // A new service has no flows yet; rr/wrr/lc/wlc always use the table; a new
                // Maglev table's changes are found when it is built (and its previous backends
                // when it is written: `with_previous`).
                _ => (Slots::default(), Prev::default(), 0),
            };
            out.services.push(DesiredService {
                name: s.cfg.name.clone(),
                key,
                value,
                ring,
                backends: ids,
                digest,
                ring_key,
                dirty,
                prev,
                prev_until_ns,
            });
        }

        build_maglev_tables(&mut out.services, &maglev_jobs, &prev_by_id);

        if let Some(p) = prev {
            for (id, b) in &p.backends {
                if !out.backends.contains_key(id) {
                    let value = Backend {
                        flags: 0,
                        generation: fresh(),
                        ..*b
                    };
                    out.retired.insert(*id, value);
                }
            }
        }
        out.flags = if out.services.iter().any(|s| s.key.port == [0, 0]) {
            FLAG_ALL_PORTS_SERVICES
        } else {
            0
        };
        out.next_generation = next_generation;
        frag_services(&mut out);
        Ok(out)
    }
}

/// Where the services' tables lie in `LB_RING`: a service keeps its range while its size
/// stays; a new or resized one gets the first gap that no table of the previous state (still
/// read by packets until the service switches) nor of the next one occupies.
struct TableSpace {
    capacity: u64,
    /// Taken ranges `(start, end)`.
    taken: Vec<(u64, u64)>,
    /// Service id → its previous range.
    prev: BTreeMap<u32, (u32, u32)>,
}

impl TableSpace {
    fn new(capacity: u32, prev: Option<&DesiredState>) -> TableSpace {
        let mut t = TableSpace {
            capacity: capacity as u64,
            taken: Vec::new(),
            prev: BTreeMap::new(),
        };
        for s in prev.map(|p| p.services.as_slice()).unwrap_or_default() {
            let r = s.ring_range();
            if !r.is_empty() {
                t.taken.push((r.start, r.end));
                t.prev
                    .insert(s.value.id, (s.value.ring_base, s.value.ring_size));
            }
        }
        t
    }

    /// The base of service `id`'s table of `size` slots, or `None` when no gap fits.
    fn place(&mut self, id: u32, size: u32) -> Option<u32> {
        if let Some((base, old)) = self.prev.get(&id)
            && *old == size
            && *base as u64 + size as u64 <= self.capacity
        {
            return Some(*base);
        }
        self.taken.sort_unstable();
        let mut at = 0u64;
        for (start, end) in &self.taken {
            if *start >= at + size as u64 {
                break;
            }
            at = at.max(*end);
        }
        if at + size as u64 > self.capacity {
            return None;
        }
        self.taken.push((at, at + size as u64));
        Some(at as u32)
    }

    /// Slots taken so far.
    fn used(&self) -> u64 {
        self.taken.iter().map(|(s, e)| e - s).sum()
    }
}

/// The weighted Maglev table of `k`'s backends (identities: their addresses), as backend ids
/// ([`NO_BACKEND`] where no backend has a weight), written by the builder into `table` (a
/// build thread's, reused from table to table).
fn maglev_ring(k: &RingKey, table: &mut Vec<u32>) {
    const _: () = assert!(maglev::EMPTY == NO_BACKEND);
    let idents: Vec<String> = k.backends.iter().map(|(_, a, _)| a.to_string()).collect();
    let entries: Vec<maglev::Entry> = idents
        .iter()
        .zip(&k.backends)
        .map(|(id, (_, _, w))| maglev::Entry {
            id: id.as_bytes(),
            weight: *w as u32,
        })
        .collect();
    let ids: Vec<u32> = k.backends.iter().map(|(id, _, _)| id.0).collect();
    let _ = maglev::build_values_into(&entries, &ids, k.ring_size, table);
}

/// What decides a Maglev table's slots as indexes into its backends: the table's size and
/// the backends' identities (addresses) and weights, in the builder's turn order (by
/// identity). Services whose backends have the same addresses and weights (ports of one VIP,
/// VIPs of one pool) have the same shape: their tables share one build and its bytes, each
/// with its own backend ids.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Shape {
    ring_size: u32,
    backends: Vec<(String, u16)>,
}

impl Shape {
    /// `k`'s shape, and its backends' ids in the shape's order; `None` for 255 backends or
    /// more (a table of two-byte ids).
    fn of(k: &RingKey) -> Option<(Shape, Vec<u32>)> {
        if k.backends.len() >= lb_common::packed::IDS {
            return None;
        }
        let mut b: Vec<(String, u16, u32)> = k
            .backends
            .iter()
            .map(|(id, a, w)| (a.to_string(), *w, id.0))
            .collect();
        // (Stable, as the builder's own sort: backends of one address keep their order.)
        b.sort_by(|x, y| x.0.as_bytes().cmp(y.0.as_bytes()));
        let ids = b.iter().map(|(_, _, id)| *id).collect();
        let shape = Shape {
            ring_size: k.ring_size,
            backends: b.into_iter().map(|(a, w, _)| (a, w)).collect(),
        };
        Some((shape, ids))
    }

    /// The Maglev build of this shape: each slot's 1-based index into the shape's backends (0
    /// where none has a weight), and how many slots hold each index. The builder writes the
    /// indexes as they are, a byte a slot (into `scratch`, then copied): no pass looks ids up
    /// or converts.
    fn build(&self, scratch: &mut Vec<u8>) -> (std::sync::Arc<[u8]>, Vec<u32>) {
        let entries: Vec<maglev::Entry> = self
            .backends
            .iter()
            .map(|(a, w)| maglev::Entry {
                id: a.as_bytes(),
                weight: *w as u32,
            })
            .collect();
        let n = self.backends.len() as u32;
        let values: Vec<u32> = (1..=n).collect();
        let got = maglev::build_values_into(&entries, &values, self.ring_size, scratch);
        // Each index's slots are its backend's quota; the rest (all, when no backend has a
        // weight) are empty.
        let mut counts = Vec::with_capacity(got.len() + 1);
        counts.push(self.ring_size - got.iter().sum::<u32>());
        counts.extend(got);
        debug_assert_eq!(
            {
                let mut c = vec![0; counts.len()];
                table::tally(scratch, &mut c);
                c
            },
            counts,
            "a backend's slots are its quota"
        );
        (std::sync::Arc::from(&scratch[..]), counts)
    }
}

/// A build thread's tables, reused from one build to the next.
#[derive(Default)]
struct Scratch {
    /// A table of up to 255 backends, a byte a slot ([`Shape::build`]).
    fields: Vec<u8>,
    /// A larger one, a `u32` id a slot ([`maglev_ring`]).
    ids: Vec<u32>,
}

/// Builds the Maglev tables of `services[jobs]` from their [`RingKey`]s (and each one's changed
/// slots after its previous state), spread over the machine's CPUs: 1 000 tables
/// of 65 537 slots are seconds of work for one core.
fn build_maglev_tables(
    services: &mut [DesiredService],
    jobs: &[usize],
    prev_by_id: &std::collections::HashMap<u32, &DesiredService>,
) {
    if jobs.is_empty() {
        return;
    }
    /// A built table: ring, changed slots.
    type Built = (Table, Slots);
    // Each shape is built once (by the first thread that needs it; another waits for it), its
    // bytes shared by the services that have it.
    let mut index: std::collections::HashMap<Shape, usize> = std::collections::HashMap::new();
    let mut shapes: Vec<Shape> = Vec::new();
    let shaped: Vec<Option<(usize, Vec<u32>)>> = jobs
        .iter()
        .map(|&i| {
            let (shape, ids) = Shape::of(&services[i].ring_key)?;
            let at = *index.entry(shape).or_insert_with_key(|shape| {
                shapes.push(shape.clone());
                shapes.len() - 1
            });
            Some((at, ids))
        })
        .collect();
    type Fields = (std::sync::Arc<[u8]>, Vec<u32>);
    let built_shapes: Vec<std::sync::OnceLock<Fields>> =
        shapes.iter().map(|_| std::sync::OnceLock::new()).collect();
    // Each thread builds into its own scratch tables (bytes for up to 255 backends, else
    // `u32`s), reused from one table to the next, and keeps the compact copy.
    let build = |j: usize, s: &DesiredService, scratch: &mut Scratch| -> Built {
        let table = match &shaped[j] {
            Some((at, ids)) => {
                let (fields, counts) =
                    built_shapes[*at].get_or_init(|| shapes[*at].build(&mut scratch.fields));
                Table::shared(std::sync::Arc::clone(fields), counts.clone(), ids)
            }
            // 255 backends or more: two-byte ids.
            None => {
                maglev_ring(&s.ring_key, &mut scratch.ids);
                Table::from_ids(&scratch.ids)
            }
        };
        let dirty = match prev_by_id.get(&s.value.id) {
            Some(o) => dirty_after(o, s.value.scheduler, &table),
            None => Slots::default(),
        };
        (table, dirty)
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len());
    let built: Vec<(usize, Built)> = if threads <= 1 {
        let mut scratch = Scratch::default();
        jobs.iter()
            .enumerate()
            .map(|(j, i)| (*i, build(j, &services[*i], &mut scratch)))
            .collect()
    } else {
        let shared: &[DesiredService] = services;
        // Each thread takes the next job when it is done with one (a CPU that is busy with
        // something else, or slower, builds fewer tables; a fixed split waits for it).
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (build, next) = (&build, &next);
                    scope.spawn(move || {
                        let (mut out, mut scratch) = (Vec::new(), Scratch::default());
                        loop {
                            let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(i) = jobs.get(j) else {
                                break out;
                            };
                            out.push((*i, build(j, &shared[*i], &mut scratch)));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("a table build panicked"))
                .collect()
        })
    };
    for (i, (ring, dirty)) in built {
        let s = &mut services[i];
        s.ring = std::sync::Arc::new(ring);
        s.digest = LazyDigest::default();
        s.dirty = dirty;
    }
}

/// The service's table: Maglev (maglev, sh), the weighted sequence (rr, wrr) or the list of
/// backends taking new flows (lc, wlc); sets `value.ring_len` where the data plane needs it.
fn ring(
    s: &config::Service,
    ids: &[BackendId],
    weights: &[u16],
    key: &RingKey,
    value: &mut ServiceValue,
) -> Vec<u32> {
    let ring_size = key.ring_size;
    match s.scheduler {
        Scheduler::Maglev | Scheduler::Sh => {
            let mut table = Vec::new();
            maglev_ring(key, &mut table);
            table
        }
        Scheduler::Rr | Scheduler::Wrr => {
            let w: Vec<u32> = weights
                .iter()
                .map(|w| match (s.scheduler, *w) {
                    (_, 0) => 0,
                    (Scheduler::Rr, _) => 1,
                    (_, w) => w as u32,
                })
                .collect();
            let seq = sched::wrr_sequence(&w, ring_size as usize);
            value.ring_len = seq.len() as u32;
            padded(seq.into_iter().map(|i| ids[i].0), ring_size)
        }
        Scheduler::Lc | Scheduler::Wlc => {
            let list: Vec<u32> = ids
                .iter()
                .zip(weights)
                .filter(|(_, w)| **w > 0)
                .map(|(id, _)| id.0)
                .collect();
            value.ring_len = list.len() as u32;
            padded(list.into_iter(), ring_size)
        }
    }
}

/// `ids` then [`NO_BACKEND`] up to `len`.
fn padded(ids: impl Iterator<Item = u32>, len: u32) -> Vec<u32> {
    let mut v: Vec<u32> = ids.collect();
    v.resize(len as usize, NO_BACKEND);
    v
}

#[cfg(test)]
mod tests;

/// Per VIP and protocol, the service that takes fragments whose datagram was not seen yet: the
/// all-ports service, else the only service of that protocol on the VIP; none when ambiguous.
fn frag_services(out: &mut DesiredState) {
    use lb_common::{PROTO_TCP, PROTO_UDP};
    for (vk, vv) in out.vips.iter_mut() {
        for (proto, slot) in [(PROTO_TCP, &mut vv.frag_tcp), (PROTO_UDP, &mut vv.frag_udp)] {
            let on_vip: Vec<&DesiredService> = out
                .services
                .iter()
                .filter(|s| {
                    s.key.vip == vk.addr && s.key.family == vk.family && s.key.protocol == proto
                })
                .collect();
            let pick = on_vip
                .iter()
                .find(|s| s.key.port == [0, 0])
                .or(if on_vip.len() == 1 {
                    on_vip.first()
                } else {
                    None
                });
            if let Some(s) = pick {
                *slot = s.value;
            }
        }
    }
}

/// [`DesiredService::ring_digest`] of `ring`, whose ids stand for `addrs`.
fn table_digest(ring: &Table, addrs: &BTreeMap<u32, IpAddr>) -> u64 {
    let of: std::collections::HashMap<u32, u64> =
        addrs.iter().map(|(id, a)| (*id, addr_digest(*a))).collect();
    let mut last = (u32::MAX - 1, 0u64);
    let per_slot = ring.iter().map(|id| {
        if id != last.0 {
            last = (id, of.get(&id).copied().unwrap_or(0));
        }
        last.1
    });
    fold_digest(per_slot, ring.len())
}

/// A backend address's part of a [`table_digest`].
fn addr_digest(a: IpAddr) -> u64 {
    let (addr, family) = addr_key(a);
    let mut b = [0u8; 17];
    b[0] = family;
    b[1..].copy_from_slice(&addr);
    lb_common::hash::bytes_hash(0x7269_6e67, &b)
}

/// The digest of a table given each slot's [`addr_digest`] (0: empty), in slot order: one
/// multiply per slot.
fn fold_digest(slots: impl Iterator<Item = u64>, len: usize) -> u64 {
    let mut h = lb_common::hash::fmix64(0x7269_6e67 ^ len as u64);
    for v in slots {
        h = (h ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(31);
    }
    lb_common::hash::fmix64(h)
}

/// The sweep's view of the tables of `desired` (see [`crate::dataplane::SlotView`]).
pub struct TableView<'a> {
    desired: &'a DesiredState,
    /// foldhash: the sweep looks up every entry's service here, 10^6 times a sweep at scale
    /// (SipHash was a large part of that).
    by_key: foldhash::HashMap<ServiceKey, usize>,
    changed_ns: &'a BTreeMap<u32, u64>,
}

impl<'a> TableView<'a> {
    /// `changed_ns`: service id → when its table last gained a changed slot.
    pub fn new(desired: &'a DesiredState, changed_ns: &'a BTreeMap<u32, u64>) -> TableView<'a> {
        TableView {
            by_key: desired
                .services
                .iter()
                .enumerate()
                .map(|(i, s)| (s.key, i))
                .collect(),
            desired,
            changed_ns,
        }
    }
}

impl crate::dataplane::SlotView for TableView<'_> {
    fn slot(&self, key: &lb_common::FlowKey) -> Option<crate::dataplane::SlotInfo> {
        let mut k = ServiceKey {
            vip: key.dst_addr,
            port: key.dst_port,
            protocol: key.protocol,
            family: key.family,
        };
        let i = match self.by_key.get(&k) {
            Some(i) => *i,
            None if self.desired.flags & FLAG_ALL_PORTS_SERVICES != 0 => {
                k.port = [0, 0];
                *self.by_key.get(&k)?
            }
            None => return None,
        };
        let s = &self.desired.services[i];
        let slot = s.slot_of(key)?;
        let backend = s.ring.get(slot as usize)?;
        Some(crate::dataplane::SlotInfo {
            service_id: s.value.id,
            slot,
            backend,
            generation: self
                .desired
                .backends
                .get(&BackendId(backend))
                .map_or(0, |b| b.generation),
            dirty: s.dirty.contains(slot),
            changed_ns: self.changed_ns.get(&s.value.id).copied().unwrap_or(0),
            records_on_change: s.records_on_change(),
        })
    }

    fn live_backends(&self) -> Vec<(u32, u32)> {
        self.desired
            .backends
            .iter()
            .map(|(id, b)| (id.0, b.generation))
            .collect()
    }
}
