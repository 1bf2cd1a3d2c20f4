//! Backend selection: connection table first, Maglev table for new flows.

use lb_common::{
    BACKEND_F_ACTIVE, Backend, FlowKey, FlowValue, NO_BACKEND, ServiceValue, hash::flow_hash,
    stats::Stat,
};

use crate::{
    maps::{LB_BACKENDS, LB_FLOWS, LB_RING, LB_RING_SIZE},
    stats::{count, count_new_flow},
};

/// The backend for this packet's flow, or `None` when the service has no usable backend.
///
/// A flow in the connection table keeps its backend as long as that backend is active and the
/// id still belongs to the same backend (generation). Otherwise the flow is scheduled (again)
/// and recorded.
#[inline(always)]
pub fn backend_for_flow(key: &FlowKey, svc: &ServiceValue) -> Option<(u32, &'static Backend)> {
    // SAFETY: LRU entries may be recycled under us; a torn read yields some backend id and
    // generation, which are validated against the backend below.
    if let Some(flow) = unsafe { LB_FLOWS.get(key) } {
        let (id, generation) = (flow.backend, flow.generation);
        if let Some(b) = usable(id)
            && b.generation == generation
        {
            count(Stat::FlowHit);
            return Some((id, b));
        }
        count(Stat::FlowRescheduled);
    }

    let id = maglev_lookup(key, svc.id)?;
    let b = usable(id)?;
    let value = FlowValue {
        backend: id,
        generation: b.generation,
    };
    if LB_FLOWS.insert(key, value, 0).is_err() {
        count(Stat::FlowInsertFailed);
    } else {
        count(Stat::FlowNew);
    }
    count_new_flow(svc.id, id);
    Some((id, b))
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
