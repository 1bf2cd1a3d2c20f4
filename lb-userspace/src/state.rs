//! The desired contents of the data-plane maps, derived from a validated [`Config`].
//!
//! Pure: no kernel access, so it is unit-tested on the host. The loader writes it.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    BACKEND_F_ACTIVE, BACKEND_F_REDIRECT, Backend, FAMILY_V4, FAMILY_V6, FLAG_ALL_PORTS_SERVICES,
    NO_BACKEND, SCHED_LC, SCHED_MAGLEV, SCHED_SH, SCHED_WLC, SCHED_WRR, ServiceKey, ServiceValue,
    VipKey, limits::MAX_TX_PORTS,
};

use crate::{
    admin::AdminState,
    api::Admin,
    config::{Config, Scheduler},
    iface::Interfaces,
    maglev, sched,
};

/// One service as the data plane sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredService {
    pub name: String,
    pub key: ServiceKey,
    pub value: ServiceValue,
    /// Maglev table: backend id per slot ([`NO_BACKEND`] when none).
    pub ring: Vec<u32>,
    /// Backend ids of this service, in config order.
    pub backends: Vec<u32>,
}

/// A backend as configured and administered.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendInfo {
    pub service: String,
    pub address: IpAddr,
    pub mac: crate::config::Mac,
    pub config_weight: u16,
    pub weight_override: Option<u16>,
    pub admin: Admin,
    /// Weight in the Maglev table (0 when draining, disabled or down).
    pub effective_weight: u16,
    /// False when its health check has it down (and no fallback applies).
    pub healthy: bool,
}

/// Backends whose health checks have them down: (service name, address).
pub type Down = std::collections::BTreeSet<(String, IpAddr)>;

/// Everything the maps should contain.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredState {
    pub services: Vec<DesiredService>,
    /// Backend id → value.
    pub backends: BTreeMap<u32, Backend>,
    /// Backend id → what it is (service, address, weights, admin state), for reports.
    pub backend_info: BTreeMap<u32, BackendInfo>,
    /// VIP → number of services on it.
    pub vips: BTreeMap<VipKey, u32>,
    /// Devmap slot → ifindex.
    pub tx_ports: BTreeMap<u32, u32>,
    pub ring_size: u32,
    /// `LB_FLAGS[0]`.
    pub flags: u32,
    /// Backends of the previous state that are gone: id → inactive value (new generation).
    pub retired: BTreeMap<u32, Backend>,
    /// Next generation number to hand out (generations are never reused).
    pub next_generation: u32,
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
}

/// Address in the 16-byte key layout, with its family.
pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    match addr {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (b, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

impl DesiredState {
    /// The desired state of a fresh data plane: service ids follow config order, backend ids
    /// are dense in config order.
    pub fn build(cfg: &Config, ifaces: &impl Interfaces) -> Result<DesiredState, StateError> {
        DesiredState::next(cfg, ifaces, None, &AdminState::default(), &Down::new())
    }

    /// The desired state after `prev` for a new `cfg`, keeping what can be kept: a service keeps
    /// its id (by name), a backend keeps its id and generation (by service name and address), so
    /// unchanged flows never notice a reload. New services and backends take the lowest ids
    /// that neither `prev` nor the new state uses; every new backend gets a fresh generation.
    ///
    /// `admin` overrides the config per backend: a weight override replaces the weight;
    /// `draining` keeps the backend active with weight 0 (its flows stay); `disabled` makes it
    /// inactive with a new generation (its flows move at their next packet).
    pub fn next(
        cfg: &Config,
        ifaces: &impl Interfaces,
        prev: Option<&DesiredState>,
        admin: &AdminState,
        down: &Down,
    ) -> Result<DesiredState, StateError> {
        let ring_size = cfg.dataplane.ring_size;
        let (_, lb_mac) = ifaces
            .lookup(&cfg.dataplane.interface)
            .map_err(StateError::Interface)?;
        let mut next_generation = prev.map_or(1, |p| p.next_generation);
        let prev_service_ids: BTreeMap<&str, u32> = prev
            .map(|p| {
                p.services
                    .iter()
                    .map(|s| (s.name.as_str(), s.value.id))
                    .collect()
            })
            .unwrap_or_default();
        let prev_backend_ids: BTreeMap<(&str, IpAddr), u32> = prev
            .map(|p| {
                p.backend_info
                    .iter()
                    .map(|(id, i)| ((i.service.as_str(), i.address), *id))
                    .collect()
            })
            .unwrap_or_default();
        // Ids kept by name first, so new ones never take a kept one.
        let mut used_services: std::collections::BTreeSet<u32> = cfg
            .services
            .iter()
            .filter_map(|s| prev_service_ids.get(s.name.as_str()).copied())
            .collect();
        let mut used_backends: std::collections::BTreeSet<u32> = prev
            .map(|p| p.backends.keys().copied().collect())
            .unwrap_or_default();

        let mut tx_slots: BTreeMap<String, u32> = BTreeMap::new();
        let mut tx_ports = BTreeMap::new();
        let mut backends = BTreeMap::new();
        let mut backend_info = BTreeMap::new();
        let mut vips: BTreeMap<VipKey, u32> = BTreeMap::new();
        let mut services = Vec::with_capacity(cfg.services.len());

        for s in &cfg.services {
            let sid = match prev_service_ids.get(s.name.as_str()) {
                Some(id) => *id,
                None => {
                    let id = lowest_free(&used_services);
                    used_services.insert(id);
                    id
                }
            };
            let (vip, family) = addr_bytes(s.vip);
            let key = ServiceKey {
                vip,
                port: s.port.to_be_bytes(),
                protocol: s.protocol.number(),
                family,
            };
            let mut value = ServiceValue {
                id: sid,
                scheduler: match s.scheduler {
                    Scheduler::Maglev => SCHED_MAGLEV,
                    Scheduler::Sh => SCHED_SH,
                    Scheduler::Rr | Scheduler::Wrr => SCHED_WRR,
                    Scheduler::Lc => SCHED_LC,
                    Scheduler::Wlc => SCHED_WLC,
                },
                flags: 0,
                ring_len: 0,
            };
            *vips
                .entry(VipKey {
                    addr: vip,
                    family,
                    _pad: [0; 3],
                })
                .or_default() += 1;

            let mut ids = Vec::with_capacity(s.backends.len());
            let mut weights = Vec::with_capacity(s.backends.len());
            // fallback = "all": when every backend is down, use them all as if healthy.
            let all_down = !s.backends.is_empty()
                && s.backends
                    .iter()
                    .all(|b| down.contains(&(s.name.clone(), b.address)));
            let ignore_health = all_down && s.fallback == crate::config::Fallback::All;
            for b in &s.backends {
                let o = admin.get(&s.name, b.address);
                let healthy = ignore_health || !down.contains(&(s.name.clone(), b.address));
                let active = o.admin != Admin::Disabled && healthy;
                let effective_weight = match o.admin {
                    Admin::Enabled if healthy => o.weight.unwrap_or(b.weight),
                    _ => 0,
                };
                weights.push(effective_weight);
                let kept = prev_backend_ids.get(&(s.name.as_str(), b.address)).copied();
                let (id, generation) = match kept {
                    Some(id) => {
                        let old = prev.expect("kept ids come from prev").backends[&id];
                        if old.flags & BACKEND_F_ACTIVE != 0 && !active {
                            // Disabled now: its flows must not stay (nor come back later).
                            next_generation += 1;
                            (id, next_generation - 1)
                        } else {
                            (id, old.generation)
                        }
                    }
                    None => {
                        let id = lowest_free(&used_backends);
                        used_backends.insert(id);
                        next_generation += 1;
                        (id, next_generation - 1)
                    }
                };
                let (src_mac, flags, tx_port) = match &b.interface {
                    None => (lb_mac, BACKEND_F_ACTIVE, 0),
                    Some(ifname) => {
                        let (ifindex, mac) =
                            ifaces
                                .lookup(ifname)
                                .map_err(|why| StateError::BackendInterface {
                                    service: s.name.clone(),
                                    backend: b.address,
                                    why,
                                })?;
                        let n = tx_slots.len() as u32;
                        let slot = *tx_slots.entry(ifname.clone()).or_insert(n);
                        if slot >= MAX_TX_PORTS {
                            return Err(StateError::TooManyTxPorts);
                        }
                        tx_ports.insert(slot, ifindex);
                        (mac, BACKEND_F_ACTIVE | BACKEND_F_REDIRECT, slot)
                    }
                };
                let flags = if active {
                    flags
                } else {
                    flags & !BACKEND_F_ACTIVE
                };
                backends.insert(
                    id,
                    Backend {
                        mac: b.mac.unwrap_or_default().0,
                        src_mac: src_mac.0,
                        flags,
                        generation,
                        tx_port,
                        weight: effective_weight as u32,
                        _pad: 0,
                    },
                );
                backend_info.insert(
                    id,
                    BackendInfo {
                        service: s.name.clone(),
                        address: b.address,
                        mac: b.mac.unwrap_or_default(),
                        config_weight: b.weight,
                        weight_override: o.weight,
                        admin: o.admin,
                        effective_weight,
                        healthy,
                    },
                );
                ids.push(id);
            }

            let ring = match s.scheduler {
                Scheduler::Maglev | Scheduler::Sh => {
                    let idents: Vec<String> =
                        s.backends.iter().map(|b| b.address.to_string()).collect();
                    let entries: Vec<maglev::Entry> = idents
                        .iter()
                        .zip(&weights)
                        .map(|(id, w)| maglev::Entry {
                            id: id.as_bytes(),
                            weight: *w as u32,
                        })
                        .collect();
                    maglev::build(&entries, ring_size)
                        .into_iter()
                        .map(|slot| slot.map_or(NO_BACKEND, |i| ids[i]))
                        .collect()
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
                    padded(seq.into_iter().map(|i| ids[i]), ring_size)
                }
                Scheduler::Lc | Scheduler::Wlc => {
                    let list: Vec<u32> = ids
                        .iter()
                        .zip(&weights)
                        .filter(|(_, w)| **w > 0)
                        .map(|(id, _)| *id)
                        .collect();
                    value.ring_len = list.len() as u32;
                    padded(list.into_iter(), ring_size)
                }
            };
            services.push(DesiredService {
                name: s.name.clone(),
                key,
                value,
                ring,
                backends: ids,
            });
        }

        // Backends that are gone: inactive, with a generation no flow has.
        let mut retired = BTreeMap::new();
        if let Some(p) = prev {
            for (id, b) in &p.backends {
                if !backends.contains_key(id) {
                    retired.insert(
                        *id,
                        Backend {
                            flags: 0,
                            generation: next_generation,
                            ..*b
                        },
                    );
                    next_generation += 1;
                }
            }
        }
        let flags = if services.iter().any(|s| s.key.port == [0, 0]) {
            FLAG_ALL_PORTS_SERVICES
        } else {
            0
        };
        Ok(DesiredState {
            flags,
            services,
            backends,
            backend_info,
            vips,
            tx_ports,
            ring_size,
            retired,
            next_generation,
        })
    }
}

/// `ids` then [`NO_BACKEND`] up to `len`.
fn padded(ids: impl Iterator<Item = u32>, len: u32) -> Vec<u32> {
    let mut v: Vec<u32> = ids.collect();
    v.resize(len as usize, NO_BACKEND);
    v
}

fn lowest_free(used: &std::collections::BTreeSet<u32>) -> u32 {
    (0..).find(|i| !used.contains(i)).expect("u32 ids suffice")
}

/// One write to the data plane.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    TxPort {
        slot: u32,
        ifindex: u32,
    },
    /// `fresh`: the id is new to this backend: its counters are zeroed first.
    Backend {
        id: u32,
        value: Backend,
        fresh: bool,
    },
    Ring {
        service_id: u32,
        ring: Vec<u32>,
    },
    Service {
        key: ServiceKey,
        value: ServiceValue,
    },
    Vip {
        key: VipKey,
        services: u32,
    },
    Flags(u32),
    RemoveService(ServiceKey),
    RemoveVip(VipKey),
    /// Deactivate a backend that is gone (its flows are rescheduled at their next packet).
    RetireBackend {
        id: u32,
        value: Backend,
    },
}

/// What changed, for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiffSummary {
    pub services_added: usize,
    pub services_removed: usize,
    pub backends_added: usize,
    pub backends_updated: usize,
    pub backends_removed: usize,
    pub rings_rebuilt: usize,
}

impl std::fmt::Display for DiffSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "services +{} -{}, backends +{} ~{} -{}, {} Maglev tables rebuilt",
            self.services_added,
            self.services_removed,
            self.backends_added,
            self.backends_updated,
            self.backends_removed,
            self.rings_rebuilt
        )
    }
}

/// The writes that turn `prev` (None = empty maps) into `next`, in a safe order: everything a
/// service points at is written before the service, removals come last, and a removed backend is
/// deactivated only after no table names it any more.
pub fn diff(prev: Option<&DesiredState>, next: &DesiredState) -> (Vec<Op>, DiffSummary) {
    let empty = DesiredState::empty(next.ring_size);
    let prev = prev.unwrap_or(&empty);
    let mut ops = Vec::new();
    let mut sum = DiffSummary::default();

    for (slot, ifindex) in &next.tx_ports {
        if prev.tx_ports.get(slot) != Some(ifindex) {
            ops.push(Op::TxPort {
                slot: *slot,
                ifindex: *ifindex,
            });
        }
    }
    for (id, b) in &next.backends {
        match prev.backends.get(id) {
            Some(old) if old == b => {}
            Some(_) => {
                sum.backends_updated += 1;
                ops.push(Op::Backend {
                    id: *id,
                    value: *b,
                    fresh: false,
                });
            }
            None => {
                sum.backends_added += 1;
                ops.push(Op::Backend {
                    id: *id,
                    value: *b,
                    fresh: true,
                });
            }
        }
    }
    let prev_by_id: BTreeMap<u32, &DesiredService> =
        prev.services.iter().map(|s| (s.value.id, s)).collect();
    for s in &next.services {
        let old = prev_by_id.get(&s.value.id);
        if old.is_none_or(|o| o.ring != s.ring) {
            sum.rings_rebuilt += 1;
            ops.push(Op::Ring {
                service_id: s.value.id,
                ring: s.ring.clone(),
            });
        }
        if old.is_none_or(|o| o.name != s.name) {
            sum.services_added += 1;
        }
        if old.is_none_or(|o| o.key != s.key || o.value != s.value) {
            ops.push(Op::Service {
                key: s.key,
                value: s.value,
            });
        }
    }
    for (k, n) in &next.vips {
        if prev.vips.get(k) != Some(n) {
            ops.push(Op::Vip {
                key: *k,
                services: *n,
            });
        }
    }
    if prev.flags != next.flags || prev.services.is_empty() {
        ops.push(Op::Flags(next.flags));
    }
    // Removals.
    let next_keys: std::collections::BTreeSet<ServiceKey> =
        next.services.iter().map(|s| s.key).collect();
    let next_names: std::collections::BTreeSet<&str> =
        next.services.iter().map(|s| s.name.as_str()).collect();
    for s in &prev.services {
        if !next_keys.contains(&s.key) {
            ops.push(Op::RemoveService(s.key));
        }
        if !next_names.contains(s.name.as_str()) {
            sum.services_removed += 1;
        }
    }
    for k in prev.vips.keys() {
        if !next.vips.contains_key(k) {
            ops.push(Op::RemoveVip(*k));
        }
    }
    for (id, b) in &next.retired {
        if prev.backends.contains_key(id) {
            sum.backends_removed += 1;
            ops.push(Op::RetireBackend { id: *id, value: *b });
        }
    }
    // Devmap slots no backend uses any more are left as they are: nothing points at them, and
    // the kernel clears a slot itself when its device goes away.
    (ops, sum)
}

impl DesiredState {
    fn empty(ring_size: u32) -> DesiredState {
        DesiredState {
            services: Vec::new(),
            backends: BTreeMap::new(),
            backend_info: BTreeMap::new(),
            vips: BTreeMap::new(),
            tx_ports: BTreeMap::new(),
            ring_size,
            flags: 0,
            retired: BTreeMap::new(),
            next_generation: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Mac;

    struct Fake;
    impl Interfaces for Fake {
        fn lookup(&self, name: &str) -> Result<(u32, Mac), String> {
            match name {
                "eth0" => Ok((2, Mac([2, 0, 0, 0, 0, 1]))),
                "eth1" => Ok((3, Mac([2, 0, 0, 0, 0, 2]))),
                _ => Err(format!("no {name}")),
            }
        }
    }

    const CFG: &str = r#"
[dataplane]
interface = "eth0"
ring_size = 251
[[service]]
name = "a"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
[[service.backend]]
address = "10.0.0.1"
mac = "02:00:00:00:01:01"
[[service.backend]]
address = "10.0.0.2"
mac = "02:00:00:00:01:02"
interface = "eth1"
weight = 0
[[service]]
name = "b"
vip = "10.0.0.100"
port = 0
protocol = "udp"
[[service.backend]]
address = "fd00::1"
mac = "02:00:00:00:01:03"
"#;

    #[test]
    fn builds_keys_ids_rings_and_ports() {
        let cfg = Config::parse(CFG, Path::new("t.toml")).unwrap();
        let d = DesiredState::build(&cfg, &Fake).unwrap();
        assert_eq!(d.services.len(), 2);
        let a = &d.services[0];
        assert_eq!(a.value.id, 0);
        assert_eq!(a.key.port, [0, 80]);
        assert_eq!(a.key.protocol, 6);
        assert_eq!(&a.key.vip[..4], &[10, 0, 0, 100]);
        assert_eq!(a.backends, vec![0, 1]);
        // weight 0: owns no slot.
        assert!(a.ring.iter().all(|b| *b == 0));
        assert_eq!(a.ring.len(), 251);
        // Local backend: XDP_TX, source MAC of eth0.
        let b0 = d.backends[&0];
        assert_eq!(b0.flags, BACKEND_F_ACTIVE);
        assert_eq!(b0.src_mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(b0.generation, 1);
        // Backend behind eth1: redirect through devmap slot 0 → ifindex 3, eth1's MAC.
        let b1 = d.backends[&1];
        assert_eq!(b1.flags, BACKEND_F_ACTIVE | BACKEND_F_REDIRECT);
        assert_eq!(b1.src_mac, [2, 0, 0, 0, 0, 2]);
        assert_eq!(d.tx_ports.get(&b1.tx_port), Some(&3));
        // One VIP address, two services on it.
        assert_eq!(d.vips.len(), 1);
        assert_eq!(d.vips.values().next(), Some(&2));
        assert_eq!(d.services[1].key.port, [0, 0]);
        assert!(d.services[1].ring.iter().all(|b| *b == 2));
        assert_eq!(d.flags, FLAG_ALL_PORTS_SERVICES);
    }

    #[test]
    fn unknown_interfaces_are_reported() {
        let cfg = Config::parse(&CFG.replace("\"eth1\"", "\"eth9\""), Path::new("t.toml")).unwrap();
        let e = DesiredState::build(&cfg, &Fake).unwrap_err().to_string();
        assert!(
            e.contains("service \"a\": backend \"10.0.0.2\": interface: no eth9"),
            "{e}"
        );
        let cfg = Config::parse(
            &CFG.replace("interface = \"eth0\"", "interface = \"eth7\""),
            Path::new("t.toml"),
        )
        .unwrap();
        let e = DesiredState::build(&cfg, &Fake).unwrap_err().to_string();
        assert!(e.contains("dataplane.interface: no eth7"), "{e}");
    }

    fn state(text: &str, prev: Option<&DesiredState>) -> DesiredState {
        let cfg = Config::parse(text, Path::new("t.toml")).unwrap();
        DesiredState::next(&cfg, &Fake, prev, &AdminState::default(), &Down::new()).unwrap()
    }

    fn with_admin(text: &str, prev: Option<&DesiredState>, admin: &AdminState) -> DesiredState {
        let cfg = Config::parse(text, Path::new("t.toml")).unwrap();
        DesiredState::next(&cfg, &Fake, prev, admin, &Down::new()).unwrap()
    }

    #[test]
    fn drain_keeps_the_backend_active_with_weight_zero() {
        let a = state(TWO, None);
        let mut adm = AdminState::default();
        adm.set(
            "a",
            "10.0.0.2".parse().unwrap(),
            crate::admin::Override {
                admin: Admin::Draining,
                weight: None,
            },
        );
        let b = with_admin(TWO, Some(&a), &adm);
        assert_eq!(
            (b.backends[&1].flags, b.backends[&1].generation),
            (a.backends[&1].flags, a.backends[&1].generation),
            "same flags and generation: its flows stay"
        );
        assert_eq!(b.backends[&1].weight, 0);
        assert!(b.services[0].ring.iter().all(|id| *id == 0));
        assert_eq!(b.backend_info[&1].effective_weight, 0);
        assert_eq!(kinds(&diff(Some(&a), &b).0), ["backend", "ring"]);
    }

    #[test]
    fn disable_deactivates_with_a_new_generation_and_enable_keeps_it() {
        let a = state(TWO, None);
        let mut adm = AdminState::default();
        let addr = "10.0.0.2".parse().unwrap();
        adm.set(
            "a",
            addr,
            crate::admin::Override {
                admin: Admin::Disabled,
                weight: None,
            },
        );
        let b = with_admin(TWO, Some(&a), &adm);
        assert_eq!(b.backends[&1].flags & BACKEND_F_ACTIVE, 0);
        assert_ne!(b.backends[&1].generation, a.backends[&1].generation);
        assert_eq!(kinds(&diff(Some(&a), &b).0), ["backend", "ring"]);
        // Enabled again: active, and the generation of the disabled period (old flows stay away).
        let c = with_admin(TWO, Some(&b), &AdminState::default());
        assert_eq!(c.backends[&1].flags & BACKEND_F_ACTIVE, BACKEND_F_ACTIVE);
        assert_eq!(c.backends[&1].generation, b.backends[&1].generation);
    }

    #[test]
    fn weight_override_replaces_the_config_weight() {
        let a = state(TWO, None);
        let mut adm = AdminState::default();
        adm.set(
            "a",
            "10.0.0.1".parse().unwrap(),
            crate::admin::Override {
                admin: Admin::Enabled,
                weight: Some(300),
            },
        );
        let b = with_admin(TWO, Some(&a), &adm);
        let on0 = b.services[0].ring.iter().filter(|id| **id == 0).count();
        assert!(
            (on0 as f64 / 251.0 - 0.75).abs() < 0.01,
            "{on0} of 251 slots"
        );
        assert_eq!(b.backend_info[&0].effective_weight, 300);
        assert_eq!(b.backend_info[&0].config_weight, 100);
    }

    const TWO: &str = r#"
[dataplane]
interface = "eth0"
ring_size = 251
[[service]]
name = "a"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
[[service.backend]]
address = "10.0.0.1"
mac = "02:00:00:00:01:01"
[[service.backend]]
address = "10.0.0.2"
mac = "02:00:00:00:01:02"
"#;

    fn kinds(ops: &[Op]) -> Vec<&'static str> {
        ops.iter()
            .map(|o| match o {
                Op::TxPort { .. } => "txport",
                Op::Backend { .. } => "backend",
                Op::Ring { .. } => "ring",
                Op::Service { .. } => "service",
                Op::Vip { .. } => "vip",
                Op::Flags(_) => "flags",
                Op::RemoveService(_) => "-service",
                Op::RemoveVip(_) => "-vip",
                Op::RetireBackend { .. } => "-backend",
            })
            .collect()
    }

    #[test]
    fn initial_diff_writes_everything_in_order() {
        let s = state(TWO, None);
        let (ops, sum) = diff(None, &s);
        assert_eq!(
            kinds(&ops),
            ["backend", "backend", "ring", "service", "vip", "flags"]
        );
        assert_eq!(
            (sum.services_added, sum.backends_added, sum.rings_rebuilt),
            (1, 2, 1)
        );
    }

    #[test]
    fn same_config_changes_nothing() {
        let a = state(TWO, None);
        let b = state(TWO, Some(&a));
        assert_eq!(diff(Some(&a), &b).0, vec![]);
        assert_eq!(a.backends, b.backends);
    }

    #[test]
    fn weight_change_rebuilds_the_table_and_keeps_flows() {
        let a = state(TWO, None);
        let b = state(
            &TWO.replacen(
                "mac = \"02:00:00:00:01:02\"",
                "mac = \"02:00:00:00:01:02\"\nweight = 0",
                1,
            ),
            Some(&a),
        );
        let (ops, _) = diff(Some(&a), &b);
        // The backend entry changes only in its weight: same flags and generation.
        assert_eq!(kinds(&ops), ["backend", "ring"]);
        assert_eq!(b.backends[&1].generation, a.backends[&1].generation);
        assert_eq!(b.backends[&1].weight, 0);
        assert!(
            b.services[0].ring.iter().all(|id| *id == 0),
            "weight 0 owns no slot"
        );
        assert_eq!(
            b.backends[&1].flags, BACKEND_F_ACTIVE,
            "drained backend stays active for its flows"
        );
    }

    #[test]
    fn added_backend_gets_a_new_id_and_generation_others_keep_theirs() {
        let a = state(TWO, None);
        let more = format!(
            "{TWO}[[service.backend]]\naddress = \"10.0.0.3\"\nmac = \"02:00:00:00:01:03\"\n"
        );
        let b = state(&more, Some(&a));
        assert_eq!(b.backends[&0], a.backends[&0]);
        assert_eq!(b.backends[&1], a.backends[&1]);
        assert_eq!(b.services[0].backends, vec![0, 1, 2]);
        assert!(b.backends[&2].generation >= a.next_generation);
        let (ops, sum) = diff(Some(&a), &b);
        assert_eq!(kinds(&ops), ["backend", "ring"]);
        assert_eq!(sum.backends_added, 1);
    }

    #[test]
    fn removed_backend_is_retired_after_the_table_stops_naming_it() {
        let a = state(TWO, None);
        let fewer = TWO.replace(
            "[[service.backend]]\naddress = \"10.0.0.2\"\nmac = \"02:00:00:00:01:02\"\n",
            "",
        );
        let b = state(&fewer, Some(&a));
        let (ops, sum) = diff(Some(&a), &b);
        assert_eq!(kinds(&ops), ["ring", "-backend"]);
        assert_eq!(sum.backends_removed, 1);
        let Op::RetireBackend { id, value } = &ops[1] else {
            unreachable!()
        };
        assert_eq!(*id, 1);
        assert_eq!(value.flags, 0);
        assert_ne!(value.generation, a.backends[&1].generation);
        // Re-adding the same address later: a new generation, so old flows never come back to it.
        let c = state(TWO, Some(&b));
        assert!(c.backends[&1].generation > value.generation);
    }

    #[test]
    fn an_id_freed_in_a_reload_is_not_reused_in_the_same_reload() {
        let a = state(TWO, None);
        let swapped = TWO.replace("10.0.0.2", "10.0.0.9");
        let b = state(&swapped, Some(&a));
        assert!(!b.backends.contains_key(&1));
        assert_eq!(b.services[0].backends, vec![0, 2]);
        assert!(b.retired.contains_key(&1));
    }

    #[test]
    fn mac_change_updates_in_place_and_keeps_flows() {
        let a = state(TWO, None);
        let b = state(
            &TWO.replace("02:00:00:00:01:02", "02:00:00:00:01:99"),
            Some(&a),
        );
        let (ops, sum) = diff(Some(&a), &b);
        assert_eq!(kinds(&ops), ["backend"]);
        assert_eq!(sum.backends_updated, 1);
        assert_eq!(b.backends[&1].generation, a.backends[&1].generation);
        assert_eq!(b.backends[&1].mac, [2, 0, 0, 0, 1, 0x99]);
    }

    #[test]
    fn service_key_change_keeps_the_id() {
        let a = state(TWO, None);
        let b = state(&TWO.replace("port = 80", "port = 8080"), Some(&a));
        assert_eq!(b.services[0].value.id, a.services[0].value.id);
        let (ops, _) = diff(Some(&a), &b);
        assert_eq!(kinds(&ops), ["service", "-service"]);
        assert_eq!(ops[1], Op::RemoveService(a.services[0].key));
    }

    #[test]
    fn removed_service_takes_its_keys_and_backends_away() {
        let a = state(CFG, None);
        let only_a = CFG.split("[[service]]\nname = \"b\"").next().unwrap();
        let b = state(only_a, Some(&a));
        let (ops, sum) = diff(Some(&a), &b);
        assert_eq!(kinds(&ops), ["vip", "flags", "-service", "-backend"]);
        assert_eq!(sum.services_removed, 1);
        assert_eq!(b.flags, 0, "no all-ports service left");
        // A new service later takes the lowest free id again.
        let c = state(CFG, Some(&b));
        assert_eq!(c.services[1].value.id, 1);
    }

    #[test]
    fn a_down_backend_is_inactive_and_out_of_the_table_until_it_is_up() {
        let a = state(TWO, None);
        let cfg = Config::parse(TWO, Path::new("t.toml")).unwrap();
        let mut down = Down::new();
        down.insert(("a".to_owned(), "10.0.0.2".parse().unwrap()));
        let b = DesiredState::next(&cfg, &Fake, Some(&a), &AdminState::default(), &down).unwrap();
        assert_eq!(b.backends[&1].flags & BACKEND_F_ACTIVE, 0, "its flows move");
        assert_ne!(b.backends[&1].generation, a.backends[&1].generation);
        assert!(!b.backend_info[&1].healthy);
        assert!(b.services[0].ring.iter().all(|id| *id == 0));
        let c = DesiredState::next(&cfg, &Fake, Some(&b), &AdminState::default(), &Down::new())
            .unwrap();
        assert_eq!(c.backends[&1].flags & BACKEND_F_ACTIVE, BACKEND_F_ACTIVE);
        assert!(c.services[0].ring.contains(&1));
    }

    #[test]
    fn all_down_drops_unless_fallback_all() {
        let mut down = Down::new();
        down.insert(("a".to_owned(), "10.0.0.1".parse().unwrap()));
        down.insert(("a".to_owned(), "10.0.0.2".parse().unwrap()));
        let cfg = Config::parse(TWO, Path::new("t.toml")).unwrap();
        let d = DesiredState::next(&cfg, &Fake, None, &AdminState::default(), &down).unwrap();
        assert!(
            d.services[0].ring.iter().all(|id| *id == NO_BACKEND),
            "drop: no backend"
        );
        let all = TWO.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nfallback = \"all\"",
        );
        let cfg = Config::parse(&all, Path::new("t.toml")).unwrap();
        let d = DesiredState::next(&cfg, &Fake, None, &AdminState::default(), &down).unwrap();
        assert!(
            d.services[0].ring.iter().all(|id| *id != NO_BACKEND),
            "fallback all: everyone"
        );
        assert!(d.backends.values().all(|b| b.flags & BACKEND_F_ACTIVE != 0));
    }
}
