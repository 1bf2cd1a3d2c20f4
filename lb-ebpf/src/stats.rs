//! Counter updates (per-CPU: plain adds, no atomics needed).

use lb_common::stats::{FastStat, Stat};

use crate::maps::{LB_BE_STATS, LB_STATS, LB_STATS_FAST, LB_SVC_STATS};

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(c) = LB_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

/// The two counters `fast` stands for, as one update (see `FastStat`).
#[inline(always)]
pub fn count_fast(fast: FastStat) {
    if let Some(c) = LB_STATS_FAST.get_ptr_mut(fast as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_service(id: u32, bytes: u64) {
    if let Some(c) = LB_SVC_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_backend(id: u32, bytes: u64) {
    if let Some(c) = LB_BE_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// A flow chose `backend` of `service` (new or rescheduled).
#[inline(always)]
pub fn count_new_flow(service: u32, backend: u32) {
    if let Some(c) = LB_SVC_STATS.get_ptr_mut(service) {
        // SAFETY: per-CPU slot.
        unsafe { (*c).new_flows += 1 };
    }
    if let Some(c) = LB_BE_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU slot.
        unsafe { (*c).new_flows += 1 };
    }
}
