//! Backend selection: connection table first, the service's table for new flows; and the
//! active-connection accounting that goes with it.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    BACKEND_F_ACTIVE, Backend, FLOW_F_CLOSED, FLOW_F_COUNTED, FlowKey, FlowValue, NO_BACKEND,
    PROTO_TCP, PROTO_UDP, ServiceValue, hash::flow_hash, stats::Stat,
};

use crate::{
    maps::{LB_BACKENDS, LB_BE_CONNS, LB_FLOWS, LB_RING, LB_RING_SIZE},
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
            if closing && flow.flags & (FLOW_F_COUNTED | FLOW_F_CLOSED) == FLOW_F_COUNTED {
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
        if flow.flags & (FLOW_F_COUNTED | FLOW_F_CLOSED) == FLOW_F_COUNTED {
            add_conns(id, u64::MAX); // −1 on the backend it leaves
        }
        moved = true;
        count(Stat::FlowRescheduled);
    }

    let id = maglev_lookup(key, svc.id)?;
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

#[inline(always)]
fn maglev_lookup(key: &FlowKey, service_id: u32) -> Option<u32> {
    let ring_size = LB_RING_SIZE.load();
    if ring_size == 0 {
        return None;
    }
    let slot = flow_hash(key) % ring_size;
    let id = *LB_RING.get(service_id.wrapping_mul(ring_size).wrapping_add(slot))?;
    if id == NO_BACKEND { None } else { Some(id) }
}
