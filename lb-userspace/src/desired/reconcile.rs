//! The diff between two desired states: the map writes that turn one into the other, in an
//! order that is safe for packets in flight.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Backend, BackendMeta, ServiceKey, ServiceValue, VipKey, rules::addr_key};

use super::{BackendId, DesiredService, DesiredState};

/// One write to the data plane.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    TxPort {
        slot: u32,
        ifindex: u32,
    },
    /// `fresh`: the id is new to this backend: its counters are zeroed first. `meta` says what
    /// the id stands for (kept beside the data plane for a restarted controller).
    Backend {
        id: BackendId,
        value: Backend,
        fresh: bool,
        meta: BackendMeta,
    },
    /// Slots of one service's table that change: `(slot, backend id)`; the table starts at
    /// `LB_RING[base]`.
    Ring {
        service_id: u32,
        base: u32,
        slots: Vec<(u32, u32)>,
    },
    /// A whole table written from `LB_RING[base]` on: a new service's, or one that moved. The
    /// values are [`super::slot_value`]s of `ring`, `dirty` and `prev` (not copied per slot).
    Table {
        service_id: u32,
        base: u32,
        ring: std::sync::Arc<super::Table>,
        dirty: super::Slots,
        prev: super::Prev,
    },
    Service {
        key: ServiceKey,
        value: ServiceValue,
    },
    Vip {
        key: VipKey,
        value: lb_common::VipValue,
    },
    Flags(u32),
    RemoveService(ServiceKey),
    RemoveVip(VipKey),
    /// `LB_VIP_FILTER[slot] := on`.
    VipFilter {
        slot: u32,
        on: bool,
    },
    /// Deactivate a backend that is gone (its flows are rescheduled at their next packet).
    RetireBackend {
        id: BackendId,
        value: Backend,
    },
}

impl Op {
    /// Map updates this op costs (one syscall each).
    pub fn writes(&self) -> usize {
        match self {
            Op::Ring { slots, .. } => slots.len(),
            Op::Table { ring, .. } => ring.len(),
            _ => 1,
        }
    }
}

/// What changed, for the log and the API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiffSummary {
    pub services_added: usize,
    pub services_removed: usize,
    pub backends_added: usize,
    pub backends_updated: usize,
    pub backends_removed: usize,
    /// Tables with at least one slot changed.
    pub rings_changed: usize,
    /// Map writes in all (table slots included).
    pub map_writes: usize,
}

impl std::fmt::Display for DiffSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "services +{} -{}, backends +{} ~{} -{}, {} tables changed, {} map writes",
            self.services_added,
            self.services_removed,
            self.backends_added,
            self.backends_updated,
            self.backends_removed,
            self.rings_changed,
            self.map_writes
        )
    }
}

/// The write that turns `prev`'s table into `next`'s: the slots whose map value
/// ([`DesiredService::slot_value`]: the backend id, and the changed-slot bit) differs, or the
/// whole table when `prev` has none there (a new service, one that moved to a new size, one
/// adopted from the maps); `None` when nothing differs.
fn ring_write(prev: Option<&DesiredService>, next: &DesiredService) -> Option<Op> {
    let prev = prev.filter(|p| p.value.ring_base == next.value.ring_base && !p.ring.is_empty());
    let Some(prev) = prev else {
        return (!next.ring.is_empty()).then(|| Op::Table {
            service_id: next.value.id,
            base: next.value.ring_base,
            ring: std::sync::Arc::clone(&next.ring),
            dirty: next.dirty.clone(),
            prev: next.prev.clone(),
        });
    };
    if prev.ring == next.ring && prev.dirty == next.dirty && prev.prev == next.prev {
        return None;
    }
    let slots: Vec<(u32, u32)> = (0..next.ring.len())
        .filter_map(|i| {
            let v = next.slot_value(i)?;
            (prev.slot_value(i) != Some(v)).then_some((i as u32, v))
        })
        .collect();
    (!slots.is_empty()).then_some(Op::Ring {
        service_id: next.value.id,
        base: next.value.ring_base,
        slots,
    })
}

/// The writes that turn `prev` (None = empty maps) into `next`, in a safe order: everything a
/// service points at is written before the service, removals come last, and a removed backend is
/// deactivated only after no table names it any more.
pub fn diff(prev: Option<&DesiredState>, next: &DesiredState) -> (Vec<Op>, DiffSummary) {
    let empty = DesiredState::empty(next.ring_capacity);
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
    let service_of: BTreeMap<BackendId, u32> = next
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| (*b, s.value.id)))
        .collect();
    let meta = |id: &BackendId| {
        let (addr, family) = next
            .backend_info
            .get(id)
            .map(|i| addr_key(i.address))
            .unwrap_or_default();
        BackendMeta {
            addr,
            family,
            _pad: [0; 3],
            service_id: service_of.get(id).copied().unwrap_or(0),
        }
    };
    for (id, b) in &next.backends {
        match prev.backends.get(id) {
            Some(old) if old == b && !prev.adopted => {}
            Some(old) => {
                if old != b {
                    sum.backends_updated += 1;
                }
                ops.push(Op::Backend {
                    id: *id,
                    value: *b,
                    fresh: false,
                    meta: meta(id),
                });
            }
            None => {
                sum.backends_added += 1;
                ops.push(Op::Backend {
                    id: *id,
                    value: *b,
                    fresh: true,
                    meta: meta(id),
                });
            }
        }
    }
    let prev_by_id: BTreeMap<u32, &DesiredService> =
        prev.services.iter().map(|s| (s.value.id, s)).collect();
    for s in &next.services {
        let old = prev_by_id.get(&s.value.id).copied();
        if let Some(op) = ring_write(old, s) {
            sum.rings_changed += 1;
            ops.push(op);
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
            ops.push(Op::Vip { key: *k, value: *n });
        }
    }
    // The VIP filter: slots of the new VIPs set before they take traffic (with their
    // services), slots no VIP uses any more cleared below. An adopted state writes all again.
    let slots = |d: &DesiredState| -> BTreeSet<u32> {
        d.vips
            .keys()
            .map(|k| lb_common::hash::vip_slot(&k.addr))
            .collect()
    };
    let (prev_slots, next_slots) = (slots(prev), slots(next));
    for s in &next_slots {
        if prev.adopted || !prev_slots.contains(s) {
            ops.push(Op::VipFilter { slot: *s, on: true });
        }
    }
    if prev.flags != next.flags || prev.services.is_empty() {
        ops.push(Op::Flags(next.flags));
    }
    // Removals.
    let next_keys: BTreeSet<ServiceKey> = next.services.iter().map(|s| s.key).collect();
    let next_names: BTreeSet<&str> = next.services.iter().map(|s| s.name.as_str()).collect();
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
    for s in prev_slots.difference(&next_slots) {
        ops.push(Op::VipFilter {
            slot: *s,
            on: false,
        });
    }
    for (id, b) in &next.retired {
        if prev.backends.contains_key(id) {
            sum.backends_removed += 1;
            ops.push(Op::RetireBackend { id: *id, value: *b });
        }
    }
    // Devmap slots no backend uses any more are left as they are: nothing points at them, and
    // the kernel clears a slot itself when its device goes away.
    sum.map_writes = ops.iter().map(Op::writes).sum();
    (ops, sum)
}
