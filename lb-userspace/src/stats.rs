//! A snapshot of the data plane's counters, summed over CPUs.

use std::collections::BTreeMap;

use lb_common::{Counters, stats::Stat};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Global counters by [`Stat`].
    pub global: Vec<(Stat, u64)>,
    /// Service id → counters.
    pub services: BTreeMap<u32, Counters>,
    /// Backend id → counters.
    pub backends: BTreeMap<u32, Counters>,
    /// SYNs kept out of the connection table by `dataplane.record_limit` since the program was
    /// loaded (not an `LB_STATS` counter: the limit's state belongs to each loaded program).
    pub record_limited: u64,
    /// SYNs the program handed to the controller through `LB_RECORD` since it was loaded
    /// (`dataplane.defer_records`; the program's own state, as `record_limited`).
    pub record_deferred: u64,
    /// SYNs the program recorded itself because `LB_RECORD` was full, since it was loaded.
    pub record_ring_full: u64,
    /// Entries the controller made from `LB_RECORD` since `lb run` started (set by the
    /// controller, not read from the maps).
    pub record_inserted: u64,
}

impl Snapshot {
    pub fn get(&self, stat: Stat) -> u64 {
        self.global
            .iter()
            .find(|(s, _)| *s == stat)
            .map_or(0, |(_, v)| *v)
    }
}
