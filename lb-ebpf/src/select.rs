//! Backend selection: connection table first, the service's scheduler for new flows; and the
//! active-connection accounting that goes with it.
//!
//! Across CPUs: maglev and sh are stateless (exact); rr/wrr walk their sequence with a per-CPU
//! cursor (each CPU exact, interleaving approximate across CPUs); lc/wlc compare this CPU's
//! connection counts (exact on one CPU; with several CPUs each balances its own share, and RSS
//! spreads flows evenly). Shared counters would need atomics this BPF target lacks.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    BACKEND_F_ACTIVE, Backend, FLOW_F_CLOSED, FLOW_F_COUNTED, FlowKey, FlowValue, MAX_LC_BACKENDS,
    NO_BACKEND, PROTO_TCP, PROTO_UDP, SCHED_LC, SCHED_SH, SCHED_WLC, SCHED_WRR, ServiceValue,
    hash::{flow_hash, source_hash},
    rules::{active_connections, clamp_active, counted_and_open, wlc_less},
    stats::Stat,
};

use crate::{
    maps::{
        LB_BACKENDS, LB_BE_CONNS, LB_BE_EXPIRED, LB_FLOWS, LB_RING, LB_RING_SIZE, LB_RR_CURSOR,
    },
    stats::{count, count_new_flow},
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// `last_seen_ns` is refreshed when older than this (one write a second per flow at most).
const TOUCH_NS: u64 = 1_000_000_000;

/// The backend for this packet's flow, or `None` when the service has no usable backend.
///
/// A flow in the connection table keeps its backend as long as that backend is active and the
/// id still belongs to the same backend (generation). Otherwise the flow is scheduled (again)
/// and recorded.
///
/// Active connections: a new UDP flow, or a new TCP flow starting with a SYN, counts +1 on its
/// backend; the client's first FIN or RST, or a move to another backend, counts −1. (In DSR the
/// balancer never sees the server's packets; flows closed from the server side end when the
/// controller expires them.)
#[inline(always)]
pub fn backend_for_flow(
    key: &FlowKey,
    svc: &ServiceValue,
    tcp_flags: u8,
) -> Option<(u32, &'static Backend)> {
    // SAFETY: no arguments; reads the coarse monotonic clock.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let closing = key.protocol == PROTO_TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0;
    let mut moved = false;
    if let Some(flow) = LB_FLOWS.get_ptr_mut(key) {
        // SAFETY: a valid map value pointer. LRU entries may be recycled under us; a torn read
        // yields some backend id and generation, which are validated below.
        let flow = unsafe { &mut *flow };
        let (id, generation) = (flow.backend, flow.generation);
        if let Some(b) = usable(id)
            && b.generation == generation
        {
            if closing && counted_and_open(flow) {
                // A flow's packets arrive on one CPU (RSS), so no other CPU closes it meanwhile.
                flow.flags |= FLOW_F_CLOSED;
                add_conns(id, u64::MAX); // −1
                flow.last_seen_ns = now;
            } else if now.wrapping_sub(flow.last_seen_ns) > TOUCH_NS {
                flow.last_seen_ns = now;
            }
            count(Stat::FlowHit);
            return Some((id, b));
        }
        if counted_and_open(flow) {
            add_conns(id, u64::MAX); // −1 on the backend it leaves
        }
        moved = true;
        count(Stat::FlowRescheduled);
    }

    let id = schedule(key, svc)?;
    let b = usable(id)?;
    let counted =
        !closing && (key.protocol == PROTO_UDP || tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN);
    let value = FlowValue {
        backend: id,
        generation: b.generation,
        last_seen_ns: now,
        flags: if counted { FLOW_F_COUNTED } else { 0 } | if closing { FLOW_F_CLOSED } else { 0 },
        // SAFETY: no arguments.
        cpu: unsafe { bpf_get_smp_processor_id() },
    };
    // A new flow only counts if this CPU's insert made it (another CPU may race us to it).
    let flags = if moved { 0 } else { BPF_NOEXIST as u64 };
    if LB_FLOWS.insert(key, value, flags).is_err() {
        count(Stat::FlowInsertFailed);
    } else {
        if counted {
            add_conns(id, 1);
        }
        count(Stat::FlowNew);
    }
    count_new_flow(svc.id, id);
    Some((id, b))
}

/// Adds `delta` (wrapping: `u64::MAX` is −1) to this CPU's active-connection counter of a
/// backend. The sum over CPUs is exact; one CPU's value is its own share.
#[inline(always)]
fn add_conns(id: u32, delta: u64) {
    if let Some(p) = LB_BE_CONNS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p = (*p).wrapping_add(delta) };
    }
}

#[inline(always)]
fn usable(id: u32) -> Option<&'static Backend> {
    let b = LB_BACKENDS.get(id)?;
    if b.flags & BACKEND_F_ACTIVE != 0 {
        Some(b)
    } else {
        None
    }
}

/// The service's scheduler picks a backend for a new flow.
#[inline(always)]
fn schedule(key: &FlowKey, svc: &ServiceValue) -> Option<u32> {
    let ring_size = LB_RING_SIZE.load();
    if ring_size == 0 {
        return None;
    }
    match svc.scheduler {
        SCHED_SH => ring_slot(svc.id, ring_size, source_hash(key) % ring_size),
        SCHED_WRR => {
            let n = svc.ring_len;
            if n == 0 {
                return None;
            }
            let cursor = LB_RR_CURSOR.get_ptr_mut(svc.id)?;
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            let c = unsafe {
                let c = *cursor;
                *cursor = c.wrapping_add(1);
                c
            };
            ring_slot(svc.id, ring_size, (c % n as u64) as u32)
        }
        SCHED_LC => least_connections(svc, ring_size, false),
        SCHED_WLC => least_connections(svc, ring_size, true),
        _ => ring_slot(svc.id, ring_size, flow_hash(key) % ring_size),
    }
}

#[inline(always)]
fn ring_slot(service_id: u32, ring_size: u32, slot: u32) -> Option<u32> {
    let id = *LB_RING.get(service_id.wrapping_mul(ring_size).wrapping_add(slot))?;
    if id == NO_BACKEND { None } else { Some(id) }
}

/// Fewest active connections on this CPU (lc), or fewest per weight (wlc: `a_i·w_j < a_j·w_i`,
/// no division), over the backends listed in the service's table. Ties go to the earlier one.
///
/// Written for the verifier: every iteration runs (no early exit), a slot that cannot win just
/// does not update the best, so the loop has a single way out.
#[inline(always)]
fn least_connections(svc: &ServiceValue, ring_size: u32, weighted: bool) -> Option<u32> {
    let n = svc.ring_len;
    let base = svc.id.wrapping_mul(ring_size);
    let mut best = NO_BACKEND;
    let (mut best_active, mut best_weight) = (u64::MAX, 1u64);
    for i in 0..MAX_LC_BACKENDS {
        let id = if i < n {
            LB_RING
                .get(base.wrapping_add(i))
                .copied()
                .unwrap_or(NO_BACKEND)
        } else {
            NO_BACKEND
        };
        let weight = match LB_BACKENDS.get(id) {
            Some(b) if b.flags & BACKEND_F_ACTIVE != 0 => b.weight as u64,
            _ => 0,
        };
        // Clamped to 32 bits so that products with a 16-bit weight fit u64 exactly (BPF has no
        // 128-bit multiply).
        // Clamped so products with a weight fit u64 exactly (BPF has no 128-bit multiply).
        let active = clamp_active(local_active(id));
        let better = if weighted {
            wlc_less(active, weight, best_active, best_weight)
        } else {
            active < best_active
        };
        if weight != 0 && better {
            best = id;
            best_active = active;
            best_weight = weight;
        }
    }
    if best == NO_BACKEND { None } else { Some(best) }
}

/// This CPU's active connections of a backend (its share; the controller sums all CPUs).
#[inline(always)]
fn local_active(id: u32) -> u64 {
    let opened = LB_BE_CONNS.get(id).copied().unwrap_or(0);
    let expired = LB_BE_EXPIRED.get(id).copied().unwrap_or(0);
    active_connections(opened, expired)
}
