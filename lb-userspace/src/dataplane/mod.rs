//! The data plane as the controller sees it: a set of maps to write ops into and read counters
//! from. [`loader::Dataplane`] is the kernel's (aya, typed map handles); [`fake::FakeMaps`]
//! keeps the same contents in memory for host tests of the controller.

mod batch;
/// Entries a batch of a walk of a hash map reads at most (see `batch::hash_map_part`).
pub(crate) const BATCH_ENTRIES: usize = batch::CHUNK as usize;
pub mod fake;
pub mod loader;
pub mod packed;
pub mod pin;
pub mod ring;
pub mod svc_cache;

use std::collections::BTreeMap;

use lb_common::{BACKEND_F_ACTIVE, FlowKey, FlowValue, RecordEvent};

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

    /// The backend ids the controller has in use, with their current generations: the sweep
    /// reconciles their active-connection counts with the table (see [`reconciled_expired`]).
    /// Empty (the default): counts only change by the sweep's own expiries.
    fn live_backends(&self) -> Vec<(u32, u32)> {
        Vec::new()
    }
}

/// A backend's `LB_BE_EXPIRED` after a sweep, reconciled with the connection table: the value
/// that makes its active connections (`LB_BE_CONNS` − `LB_BE_EXPIRED`, [`lb_common::rules::active_connections`])
/// equal `live`, its counted and open entries of its current generation that the sweep found
/// in the table (after its own expiries). `before` and `after`: its `LB_BE_CONNS`, read before
/// and after the sweep's walk over the table.
///
/// What this repairs: a counted connection whose entry is gone without its −1. The LRU evicts
/// entries when the table is full (a flood, more connections than `flow_table_size`), and an
/// evicted connection's FIN finds no entry; two CPUs may both count one FIN; a stale
/// generation's close lands on the id's next backend. Without this, each leaves the count off
/// for good (a drain that never reaches 0).
///
/// The walk is not atomic: connections open and close while it runs. Of the two readings the
/// smaller is used, so a backend that gains no connection during the walk (one being drained)
/// is never counted below what is really open: closes during the walk lower `after`, and an
/// entry the walk found open and that closed later only raises the result. Otherwise the
/// result is off by at most the connections that opened or closed during the walk, until the
/// next sweep (tested below).
pub fn reconciled_expired(before: u64, after: u64, live: u64) -> u64 {
    // Wrapping counters: the smaller one is the one the other is ahead of.
    let opened = if (after.wrapping_sub(before) as i64) < 0 {
        after
    } else {
        before
    };
    opened.wrapping_sub(live)
}

/// A sweep of the connection table in steps ([`Maps::sweep_step`]): what it carries from one
/// step to the next. The controller's loop takes one step at a time (`lb run` never stops for
/// a whole walk of a large table: health-check results, API requests and the records of
/// `LB_RECORD` are handled between steps).
#[derive(Debug, Default)]
pub struct SweepWalk {
    /// The time idleness is judged at (the start).
    now_ns: u64,
    /// The backends whose counts are reconciled, with their generations at the start, and
    /// their `LB_BE_CONNS` then (in id order).
    generations: BTreeMap<u32, u32>,
    opened_before: Vec<u64>,
    /// Counted, open entries of each such backend's generation that stay.
    live: BTreeMap<u32, u64>,
    /// Counted, open entries expired, by backend id.
    expired: BTreeMap<u32, u64>,
    /// Where the walk goes on (the kernel's bucket; `FakeMaps`' index); `None` before the first
    /// step.
    cursor: Option<u32>,
    done: bool,
    /// Steps taken.
    steps: u32,
    stats: SweepStats,
}

impl SweepWalk {
    fn new(now_ns: u64, generations: BTreeMap<u32, u32>, opened_before: Vec<u64>) -> SweepWalk {
        SweepWalk {
            now_ns,
            generations,
            opened_before,
            ..SweepWalk::default()
        }
    }

    /// Whether the walk reached the table's end.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u32 {
        self.steps
    }
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
    /// another backend: [`Maps::sweep_begin`], [`Maps::sweep_step`] to the table's end, then
    /// [`Maps::sweep_finish`].
    fn sweep(
        &mut self,
        now_ns: u64,
        timeouts: &Timeouts,
        slots: &dyn SlotView,
    ) -> Result<SweepStats, LoaderError> {
        let mut walk = self.sweep_begin(now_ns, slots)?;
        while !self.sweep_step(&mut walk, timeouts, slots, usize::MAX)? {}
        self.sweep_finish(walk, slots)
    }
    /// Starts a sweep that judges idleness at `now_ns` (CLOCK_MONOTONIC_COARSE): reads what
    /// the reconciliation of active connections needs before the walk.
    fn sweep_begin(&mut self, now_ns: u64, slots: &dyn SlotView) -> Result<SweepWalk, LoaderError>;
    /// Walks on over at least `budget` entries (whole batches) or to the table's end, and
    /// deletes those of them idle past their timeout. Returns whether the walk is at the end.
    /// Between steps the caller may change the tables: `slots` is read anew each step.
    fn sweep_step(
        &mut self,
        walk: &mut SweepWalk,
        timeouts: &Timeouts,
        slots: &dyn SlotView,
        budget: usize,
    ) -> Result<bool, LoaderError>;
    /// Ends a walk: reconciles the active connections of the backends whose id and generation
    /// stayed the same throughout (an id that changed hands meanwhile waits for the next sweep).
    fn sweep_finish(
        &mut self,
        walk: SweepWalk,
        slots: &dyn SlotView,
    ) -> Result<SweepStats, LoaderError>;
    /// The connection table's entry for `key`.
    fn flow_entry(&mut self, key: &FlowKey) -> Result<Option<FlowValue>, LoaderError>;
    /// Slot `slot` of `svc`'s table (`LB_RING[ring_base + slot]`) as the data plane reads it.
    fn ring_entry(&mut self, svc: &lb_common::ServiceValue, slot: u32) -> Result<u32, LoaderError>;
    /// Bits a slot of service `service_id`'s table takes in the packed copy (0: not packed;
    /// see `lb_common::packed`).
    fn packed_bits(&self, service_id: u32) -> u32 {
        let _ = service_id;
        0
    }
    /// `LB_RR_CURSOR[service_id]`.
    fn rr_cursor(&mut self, service_id: u32) -> Result<u64, LoaderError>;
    /// Flow sharing: inserts an entry a peer node reported, unless the table already has one
    /// for `key` (this node's own decision wins). Returns whether it was inserted.
    fn insert_shared_flow(&mut self, key: &FlowKey, value: &FlowValue)
    -> Result<bool, LoaderError>;
    /// Whether the loaded program hands SYNs to the controller through `LB_RECORD`
    /// (`dataplane.defer_records`; see [`lb_common::RecordEvent`]).
    fn defers_records(&self) -> bool {
        false
    }
    /// Switches the handover of SYNs through `LB_RECORD` on or off in the loaded program.
    /// Returns whether it is on (never with an object without `LB_RECORD`).
    fn set_defer_records(&mut self, on: bool) -> Result<bool, LoaderError> {
        let _ = on;
        Ok(false)
    }
    /// Takes up to `max` records out of `LB_RECORD`, oldest first (none: nothing waits, or no
    /// ring).
    fn take_records(&mut self, max: usize) -> Vec<RecordEvent> {
        let _ = max;
        Vec::new()
    }
    /// Makes the connection-table entries `records` ask for, in order: an open one inserts a
    /// counted, open entry unless the table has one for its key (or its backend id now
    /// belongs to another backend), and counts it in its backend's active connections
    /// (through `LB_BE_EXPIRED`, the controller's side of the count); a close one closes the
    /// entry of its key if it is counted and open, and uncounts it.
    fn record_flows(
        &mut self,
        records: &[RecordEvent],
        now_ns: u64,
    ) -> Result<RecordStats, LoaderError>;
}

/// What [`Maps::record_flows`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordStats {
    /// Entries inserted (flow sharing reported them when the packet path handed them over).
    pub inserted: u64,
    /// Open records whose key had an entry already (a retransmitted SYN, or a packet that
    /// recorded the connection first), or whose backend id was reused meanwhile.
    pub skipped: u64,
    /// Entries closed by close records.
    pub closed: u64,
}

/// [`Maps::record_flows`] on any table: `lookup` and `update` (of an existing entry) of the
/// connection table, `insert` of a run of entries (`BPF_NOEXIST`: for each, whether it was
/// inserted; false when the key has an entry), `generation` of a backend id; returns the
/// `LB_BE_EXPIRED` change per backend (wrapping: −1 counts one more active connection) for the
/// caller to apply. Open records are inserted in runs (one batch each), a close record after
/// the run before it.
pub fn record_flows_with(
    records: &[RecordEvent],
    now_ns: u64,
    mut lookup: impl FnMut(&FlowKey) -> Result<Option<FlowValue>, LoaderError>,
    mut insert: impl FnMut(&[(FlowKey, FlowValue)]) -> Result<Vec<bool>, LoaderError>,
    mut update: impl FnMut(&FlowKey, &FlowValue) -> Result<(), LoaderError>,
    generation: impl Fn(u32) -> Option<u32>,
) -> Result<(RecordStats, BTreeMap<u32, u64>), LoaderError> {
    let mut st = RecordStats::default();
    let mut expired: BTreeMap<u32, u64> = BTreeMap::new();
    let mut run: Vec<(FlowKey, FlowValue)> = Vec::new();
    let mut flush = |run: &mut Vec<(FlowKey, FlowValue)>,
                     st: &mut RecordStats,
                     expired: &mut BTreeMap<u32, u64>|
     -> Result<(), LoaderError> {
        if run.is_empty() {
            return Ok(());
        }
        let made = insert(run)?;
        for ((_, v), made) in run.iter().zip(made) {
            if made {
                let e = expired.entry(v.backend).or_default();
                *e = e.wrapping_sub(1);
                st.inserted += 1;
            } else {
                st.skipped += 1;
            }
        }
        run.clear();
        Ok(())
    };
    for r in records {
        match r.kind {
            lb_common::RECORD_OPEN => {
                if generation(r.backend) != Some(r.generation) {
                    st.skipped += 1;
                    continue;
                }
                run.push((
                    r.key,
                    FlowValue {
                        backend: r.backend,
                        generation: r.generation,
                        last_seen_ns: now_ns,
                        flags: lb_common::FLOW_F_COUNTED,
                        cpu: r.cpu,
                    },
                ));
            }
            lb_common::RECORD_CLOSE => {
                flush(&mut run, &mut st, &mut expired)?;
                let Some(mut v) = lookup(&r.key)? else {
                    continue;
                };
                if !lb_common::rules::counted_and_open(&v) {
                    continue;
                }
                v.flags |= lb_common::FLOW_F_CLOSED;
                v.last_seen_ns = now_ns;
                update(&r.key, &v)?;
                let e = expired.entry(v.backend).or_default();
                *e = e.wrapping_add(1);
                st.closed += 1;
            }
            _ => {}
        }
    }
    flush(&mut run, &mut st, &mut expired)?;
    Ok((st, expired))
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
    use lb_common::{Backend, rules::active_connections};
    use proptest::prelude::*;

    use super::*;

    /// One sweep's walk, as counts: `alive` counted open entries and `leaked` counts without an
    /// entry when it starts (`expired` so far), then during the walk connections close or are
    /// evicted before or after the walk reaches them, and new ones open where the walk still
    /// goes (found) or where it has been (missed). Returns (active after the sweep, really open).
    #[allow(clippy::too_many_arguments)]
    fn walk(
        alive: u64,
        leaked: u64,
        expired: u64,
        closed_before: u64,
        closed_after: u64,
        evicted_before: u64,
        evicted_after: u64,
        opened_found: u64,
        opened_missed: u64,
    ) -> (u64, u64) {
        let before = alive + leaked + expired;
        let after = before - closed_before - closed_after + opened_found + opened_missed;
        let live = alive - closed_before - evicted_before + opened_found;
        let open = alive - closed_before - closed_after - evicted_before - evicted_after
            + opened_found
            + opened_missed;
        let e = reconciled_expired(before, after, live);
        (active_connections(after, e), open)
    }

    #[test]
    fn a_quiet_sweep_counts_what_the_table_holds() {
        // Nothing leaked: unchanged. Leaked (evicted earlier): subtracted.
        assert_eq!(walk(5, 0, 3, 0, 0, 0, 0, 0, 0), (5, 5));
        assert_eq!(walk(5, 40, 3, 0, 0, 0, 0, 0, 0), (5, 5));
        assert_eq!(walk(0, 40, 0, 0, 0, 0, 0, 0, 0), (0, 0));
        // A close counted twice left the counter one low (wrapped below the expiries).
        assert_eq!(
            active_connections(2, reconciled_expired(2, 2, 3)),
            3,
            "raised back"
        );
        // Wrapping counters: two closes of one connection counted twice took the counter
        // below zero; one connection is open.
        let e = reconciled_expired(u64::MAX, u64::MAX, 1);
        assert_eq!(active_connections(u64::MAX, e), 1);
    }

    proptest! {
        /// While a backend gains no connection (a drain), the sweep never counts it below what
        /// is open, whatever closes or evictions happen during the walk.
        #[test]
        fn a_drain_is_never_counted_low(
            alive in 0u64..50, leaked in 0u64..50, expired in 0u64..50,
            cb in 0u64..10, ca in 0u64..10, eb in 0u64..10, ea in 0u64..10,
        ) {
            prop_assume!(cb + ca + eb + ea <= alive);
            let (active, open) = walk(alive, leaked, expired, cb, ca, eb, ea, 0, 0);
            prop_assert!(active >= open, "{active} < {open}");
            prop_assert!(active <= open + ca + ea, "{active} > {open} + changes after the walk");
        }

        /// With connections opening and closing during the walk, the count is off by at most
        /// those changes (until the next sweep), and a leak from before is gone.
        #[test]
        fn churn_during_the_walk_bounds_the_error(
            alive in 0u64..50, leaked in 0u64..50, expired in 0u64..50,
            cb in 0u64..10, ca in 0u64..10, eb in 0u64..10, ea in 0u64..10,
            of in 0u64..10, om in 0u64..10,
        ) {
            prop_assume!(cb + ca + eb + ea <= alive);
            let (active, open) = walk(alive, leaked, expired, cb, ca, eb, ea, of, om);
            let churn = cb + ca + ea + of + om;
            prop_assert!(active.abs_diff(open) <= churn, "{active} vs {open}, churn {churn}");
            let (no_leak, _) = walk(alive, 0, expired, cb, ca, eb, ea, of, om);
            prop_assert_eq!(active, no_leak, "the leak is gone");
        }
    }

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
