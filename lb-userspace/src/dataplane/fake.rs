//! The maps in memory: what a [`Maps`] user wrote, for host tests.

use std::collections::BTreeMap;

use lb_common::{Backend, BackendMeta, FlowKey, FlowValue, ServiceKey, ServiceValue, VipKey};

use super::{LoaderError, Maps, SweepStats, check_op};
use crate::{
    config::Timeouts,
    desired::{BackendId, DesiredState, Op},
    stats::Snapshot,
};

/// Map contents as the kernel would hold them after the same writes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FakeMaps {
    pub backends: BTreeMap<u32, Backend>,
    /// `LB_BE_META`.
    pub meta: BTreeMap<u32, BackendMeta>,
    /// `LB_RING`: index (`ring_base + slot`) → backend id.
    pub ring: BTreeMap<u32, u32>,
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub vips: BTreeMap<VipKey, lb_common::VipValue>,
    pub tx_ports: BTreeMap<u32, u32>,
    pub flags: u32,
    /// Map updates performed (one per syscall the real loader would make).
    pub writes: usize,
    /// Active connections to report, by backend id.
    pub active: BTreeMap<BackendId, u64>,
    /// Connection table entries.
    pub flows: Vec<(FlowKey, FlowValue)>,
    /// `LB_RR_CURSOR` by service id.
    pub rr_cursors: BTreeMap<u32, u64>,
    /// `LB_VIP_FILTER` slots set.
    pub vip_filter: std::collections::BTreeSet<u32>,
    /// `LB_RECORD`: records waiting for the controller, and whether the program defers.
    pub records: std::collections::VecDeque<lb_common::RecordEvent>,
    pub defer: bool,
    /// `LB_BE_EXPIRED` changes made by [`Maps::record_flows`], by backend id (wrapping).
    pub expired: BTreeMap<u32, u64>,
}

impl Maps for FakeMaps {
    fn apply_ops(&mut self, ops: &[Op]) -> Result<(), LoaderError> {
        for op in ops {
            check_op(op)?;
            self.writes += op.writes();
            match op {
                Op::TxPort { slot, ifindex } => {
                    self.tx_ports.insert(*slot, *ifindex);
                }
                Op::Backend {
                    id, value, meta, ..
                } => {
                    self.backends.insert(id.0, *value);
                    self.meta.insert(id.0, *meta);
                }
                Op::RetireBackend { id, value } => {
                    self.backends.insert(id.0, *value);
                    self.meta.remove(&id.0);
                }
                Op::Ring { base, slots, .. } => {
                    for (slot, b) in slots {
                        self.ring.insert(base + *slot, *b);
                    }
                }
                Op::Table {
                    base,
                    ring,
                    dirty,
                    prev,
                    ..
                } => {
                    for i in 0..ring.len() {
                        if let Some(v) = crate::desired::slot_value(ring, dirty, prev, i) {
                            self.ring.insert(base + i as u32, v);
                        }
                    }
                }
                Op::Service { key, value } => {
                    self.services.insert(*key, *value);
                }
                Op::RemoveService(key) => {
                    self.services.remove(key);
                }
                Op::Vip { key, value } => {
                    self.vips.insert(*key, *value);
                }
                Op::RemoveVip(key) => {
                    self.vips.remove(key);
                }
                Op::VipFilter { slot, on } => {
                    if *on {
                        self.vip_filter.insert(*slot);
                    } else {
                        self.vip_filter.remove(slot);
                    }
                }
                Op::Flags(f) => self.flags = *f,
            }
        }
        Ok(())
    }

    fn active_connections(
        &mut self,
        ids: &[BackendId],
    ) -> Result<BTreeMap<BackendId, u64>, LoaderError> {
        Ok(ids
            .iter()
            .filter_map(|id| self.active.get(id).map(|n| (*id, *n)))
            .collect())
    }

    fn snapshot(&mut self, _desired: &DesiredState) -> Result<Snapshot, LoaderError> {
        Ok(Snapshot::default())
    }

    fn sweep_begin(
        &mut self,
        now_ns: u64,
        slots: &dyn super::SlotView,
    ) -> Result<super::SweepWalk, LoaderError> {
        let generations = slots.live_backends().into_iter().collect();
        Ok(super::SweepWalk::new(now_ns, generations, Vec::new()))
    }

    fn sweep_step(
        &mut self,
        walk: &mut super::SweepWalk,
        _timeouts: &Timeouts,
        slots: &dyn super::SlotView,
        budget: usize,
    ) -> Result<bool, LoaderError> {
        // No expiry here; which changed slots still have an entry of another backend. The
        // position is an index into `flows` (entries are only added at the end).
        walk.steps += 1;
        let from = walk.cursor.unwrap_or(0) as usize;
        let to = from.saturating_add(budget.max(1)).min(self.flows.len());
        for (k, v) in &self.flows[from.min(to)..to] {
            walk.stats.entries += 1;
            if let Some(si) = slots.slot(k)
                && si.dirty
                && (v.backend != si.backend || v.generation != si.generation)
            {
                walk.stats.still_dirty.insert((si.service_id, si.slot));
            }
        }
        walk.done = to >= self.flows.len();
        walk.cursor = (!walk.done).then_some(to as u32);
        Ok(walk.done)
    }

    fn sweep_finish(
        &mut self,
        walk: super::SweepWalk,
        _slots: &dyn super::SlotView,
    ) -> Result<SweepStats, LoaderError> {
        Ok(walk.stats)
    }

    fn flow_entry(&mut self, key: &FlowKey) -> Result<Option<FlowValue>, LoaderError> {
        Ok(self.flows.iter().find(|(k, _)| k == key).map(|(_, v)| *v))
    }

    fn ring_entry(&mut self, svc: &ServiceValue, slot: u32) -> Result<u32, LoaderError> {
        Ok(self
            .ring
            .get(&(svc.ring_base + slot))
            .copied()
            .unwrap_or(lb_common::NO_BACKEND))
    }

    fn rr_cursor(&mut self, service_id: u32) -> Result<u64, LoaderError> {
        Ok(self.rr_cursors.get(&service_id).copied().unwrap_or(0))
    }

    fn insert_shared_flow(
        &mut self,
        key: &FlowKey,
        value: &FlowValue,
    ) -> Result<bool, LoaderError> {
        if self.flows.iter().any(|(k, _)| k == key) {
            return Ok(false);
        }
        self.flows.push((*key, *value));
        self.writes += 1;
        Ok(true)
    }

    fn defers_records(&self) -> bool {
        self.defer
    }

    fn set_defer_records(&mut self, on: bool) -> Result<bool, LoaderError> {
        self.defer = on;
        Ok(on)
    }

    fn take_records(&mut self, max: usize) -> Vec<lb_common::RecordEvent> {
        let n = max.min(self.records.len());
        self.records.drain(..n).collect()
    }

    fn record_flows(
        &mut self,
        records: &[lb_common::RecordEvent],
        now_ns: u64,
    ) -> Result<super::RecordStats, LoaderError> {
        let flows = std::cell::RefCell::new(std::mem::take(&mut self.flows));
        let backends = &self.backends;
        let r = super::record_flows_with(
            records,
            now_ns,
            |k| Ok(flows.borrow().iter().find(|(f, _)| f == k).map(|(_, v)| *v)),
            |run| {
                let mut f = flows.borrow_mut();
                Ok(run
                    .iter()
                    .map(|(k, v)| {
                        if f.iter().any(|(x, _)| x == k) {
                            return false;
                        }
                        f.push((*k, *v));
                        true
                    })
                    .collect())
            },
            |k, v| {
                if let Some(e) = flows.borrow_mut().iter_mut().find(|(f, _)| f == k) {
                    e.1 = *v;
                }
                Ok(())
            },
            |id| backends.get(&id).map(|b| b.generation),
        );
        self.flows = flows.into_inner();
        let (st, expired) = r?;
        for (id, d) in expired {
            let e = self.expired.entry(id).or_default();
            *e = e.wrapping_add(d);
            let a = self.active.entry(BackendId(id)).or_default();
            *a = a.wrapping_sub(d);
        }
        Ok(st)
    }
}

impl FakeMaps {
    /// What a restarted controller would find in these maps.
    pub fn adopted(&self) -> super::Adopted {
        super::Adopted {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            vips: self.vips.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self
                .meta
                .iter()
                .map(|(id, m)| (*id, self.backends[id], *m))
                .collect(),
            mode: None,
            flows: 0,
            rings: self
                .services
                .values()
                .filter(|v| matches!(v.scheduler, lb_common::SCHED_MAGLEV | lb_common::SCHED_SH))
                .map(|v| {
                    let ring = (v.ring_base..v.ring_base + v.ring_size)
                        .map(|i| self.ring.get(&i).copied().unwrap_or(lb_common::NO_BACKEND))
                        .collect();
                    (v.id, ring)
                })
                .collect(),
        }
    }

    /// Where service `id`'s table lies, as its `LB_SERVICES` value says.
    fn range(&self, id: u32) -> std::ops::Range<u32> {
        self.services
            .values()
            .find(|v| v.id == id)
            .map_or(0..0, |v| v.ring_base..v.ring_base + v.ring_size)
    }

    /// Service `id`'s table as the data plane reads it: backend ids (the changed-slot mark
    /// left out), `ring_size` slots from `ring_base` (as its `LB_SERVICES` value says).
    pub fn table(&self, id: u32) -> Vec<u32> {
        self.range(id)
            .map(|i| match self.ring.get(&i).copied() {
                None => lb_common::NO_BACKEND,
                Some(v) => lb_common::ring_id(v).unwrap_or(lb_common::NO_BACKEND),
            })
            .collect()
    }

    /// The slots of service `id` marked changed (`RING_DIRTY`, an empty slot excepted).
    pub fn changed(&self, id: u32) -> Vec<u32> {
        let r = self.range(id);
        r.clone()
            .filter(|i| {
                self.ring
                    .get(i)
                    .is_some_and(|v| *v != lb_common::NO_BACKEND && *v & lb_common::RING_DIRTY != 0)
            })
            .map(|i| i - r.start)
            .collect()
    }
}
