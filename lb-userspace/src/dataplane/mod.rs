//! The data plane as the controller sees it: a set of maps to write ops into and read counters
//! from. [`loader::Dataplane`] is the kernel's (aya, typed map handles); [`fake::FakeMaps`]
//! keeps the same contents in memory for host tests of the controller.

mod batch;
pub mod fake;
pub mod loader;
pub mod pin;
pub mod ring;
pub mod svc_cache;

use std::collections::BTreeMap;

use lb_common::{BACKEND_F_ACTIVE, FlowKey, FlowValue};

pub use self::loader::{Adopted, AttachedMode, Dataplane, LoaderError, SweepStats};
use crate::{
    config::Timeouts,
    desired::{BackendId, DesiredState, Op},
    stats::Snapshot,
};

/// A flow's maglev/sh table slot as the controller has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub service_id: u32,
    pub slot: u32,
    /// The slot's backend id (`NO_BACKEND`: none) and that id's current generation.
    pub backend: u32,
    pub generation: u32,
    /// The slot changed (`RING_DIRTY`): its packets consult the table.
    pub dirty: bool,
    /// When the service's table last gained a changed slot (CLOCK_MONOTONIC_COARSE ns).
    pub changed_ns: u64,
    /// The service records its flows only once their slot changed (UDP; TCP with
    /// `record_connections = "on_change"`): an entry of an unchanged slot is not needed.
    pub records_on_change: bool,
}

/// The sweep's view of the tables. Established packets of an unchanged maglev/sh slot skip the
/// connection table, so an open entry there is never touched: its idle time says nothing, and
/// it is not expired by idleness (the LRU bounds the table). When the slot changes, its entries
/// are looked up again and get a full idle timeout from the change (`changed_ns`).
pub trait SlotView {
    fn slot(&self, key: &FlowKey) -> Option<SlotInfo>;
}

/// No stateless slots: every entry expires by idleness.
pub struct NoSlots;

impl SlotView for NoSlots {
    fn slot(&self, _key: &FlowKey) -> Option<SlotInfo> {
        None
    }
}

/// What the controller needs of a data plane.
pub trait Maps {
    /// Performs `ops` in order (see [`crate::desired::diff`] for why the order is safe). Each
    /// op passes [`check_op`] first.
    fn apply_ops(&mut self, ops: &[Op]) -> Result<(), LoaderError>;
    /// Active connections of `ids` (those with none are left out).
    fn active_connections(
        &mut self,
        ids: &[BackendId],
    ) -> Result<BTreeMap<BackendId, u64>, LoaderError>;
    /// Every counter, summed over CPUs.
    fn snapshot(&mut self, desired: &DesiredState) -> Result<Snapshot, LoaderError>;
    /// Deletes flows idle past their timeout (open entries of unchanged maglev/sh slots
    /// excepted: see [`SlotView`]) and says which changed slots still have entries naming
    /// another backend.
    fn sweep(
        &mut self,
        now_ns: u64,
        timeouts: &Timeouts,
        slots: &dyn SlotView,
    ) -> Result<SweepStats, LoaderError>;
    /// The connection table's entry for `key`.
    fn flow_entry(&mut self, key: &FlowKey) -> Result<Option<FlowValue>, LoaderError>;
    /// Slot `slot` of `svc`'s table (`LB_RING[ring_base + slot]`) as the data plane reads it.
    fn ring_entry(&mut self, svc: &lb_common::ServiceValue, slot: u32) -> Result<u32, LoaderError>;
    /// `LB_RR_CURSOR[service_id]`.
    fn rr_cursor(&mut self, service_id: u32) -> Result<u64, LoaderError>;
    /// Flow sharing: inserts an entry a peer node reported, unless the table already has one
    /// for `key` (this node's own decision wins). Returns whether it was inserted.
    fn insert_shared_flow(&mut self, key: &FlowKey, value: &FlowValue)
    -> Result<bool, LoaderError>;
}

/// The bug guard in front of every map write: an active backend must have a MAC. A zero MAC
/// would send its flows to 00:00:00:00:00:00, a black hole.
pub fn check_op(op: &Op) -> Result<(), LoaderError> {
    match op {
        Op::Backend { id, value, .. }
            if value.flags & BACKEND_F_ACTIVE != 0 && value.mac == [0; 6] =>
        {
            Err(LoaderError::ActiveWithoutMac { id: id.0 })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use lb_common::Backend;

    use super::*;

    #[test]
    fn an_active_backend_with_a_zero_mac_is_refused() {
        let op = |flags, mac| Op::Backend {
            id: BackendId(3),
            value: Backend {
                flags,
                mac,
                ..Backend::default()
            },
            fresh: false,
            meta: Default::default(),
        };
        let e = check_op(&op(BACKEND_F_ACTIVE, [0; 6])).unwrap_err();
        assert!(e.to_string().contains("backend id 3"), "{e}");
        assert!(check_op(&op(0, [0; 6])).is_ok(), "inactive: fine");
        assert!(check_op(&op(BACKEND_F_ACTIVE, [2, 0, 0, 0, 0, 1])).is_ok());
        let mut fake = fake::FakeMaps::default();
        assert!(fake.apply_ops(&[op(BACKEND_F_ACTIVE, [0; 6])]).is_err());
        assert!(fake.backends.is_empty(), "nothing written");
    }
}
