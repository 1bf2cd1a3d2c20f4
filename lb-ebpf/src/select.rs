//! Backend selection: connection table first, the service's scheduler for new flows; and the
//! active-connection accounting that goes with it.
//!
//! Exact on every CPU: maglev and sh are stateless; rr/wrr take their position in the sequence
//! from one cursor per service shared by all CPUs (atomic fetch-and-add); lc/wlc compare the
//! shared active-connection counters (atomic add/sub), scanning the service's whole list with
//! `bpf_loop` (no backend cap). Only the statistics stay per CPU.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns, generated::bpf_loop},
};
use lb_common::{
    BACKEND_F_ACTIVE, Backend, FLOW_F_CLOSED, FLOW_F_COUNTED, FlowKey, FlowValue, FragKey,
    FragValue, NO_BACKEND, PROTO_TCP, PROTO_UDP, RECORD_CLOSE, RECORD_OPEN, RING_DIRTY,
    RecordEvent, RecordRate, SCHED_LC, SCHED_MAGLEV, SCHED_SH, SCHED_WLC, SCHED_WRR,
    SVC_F_TCP_ON_CHANGE, ServiceValue, SyncEvent,
    hash::{flow_hash, reduce, source_hash},
    ring_id, ring_prev,
    rules::{active_connections, clamp_active, counted_and_open, wlc_less},
    stats::Stat,
};

use crate::{
    atomic,
    maps::{
        LB_BACKENDS, LB_BE_CONNS, LB_BE_EXPIRED, LB_FLOWS, LB_FRAGS, LB_RECORD, LB_RECORD_IN,
        LB_RECORD_RATE, LB_RR_CURSOR, LB_SYNC, LB_SYNC_CFG, LB_SYNC_RATE, packed_get, ring_get,
    },
    stats::{count, count_new_flow},
};

/// Whether flows of `svc` through an unchanged slot are not recorded: UDP, and TCP of a
/// service with `record_connections = "on_change"` (maglev/sh only: the other schedulers have
/// no slot).
#[inline(always)]
fn records_on_change(key: &FlowKey, svc: &ServiceValue) -> bool {
    key.protocol == PROTO_UDP || svc.flags & SVC_F_TCP_ON_CHANGE != 0
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// `last_seen_ns` is refreshed when older than this (one write a second per flow at most).
const TOUCH_NS: u64 = 1_000_000_000;

/// The backend for this packet's flow and how it was found (`FlowHit`, `FlowNew`,
/// `FlowRescheduled`), or `None` when the service has no usable backend.
///
/// A flow in the connection table keeps its backend as long as that backend is active and the
/// id still belongs to the same backend (generation). Otherwise the flow is scheduled (again)
/// and recorded.
///
/// Active connections: a new UDP flow (maglev/sh: one recorded here, through a changed slot), or
/// a new TCP flow starting with a SYN, counts +1 on its backend; the client's first FIN or RST, or a move to another backend, counts −1. (In DSR the
/// balancer never sees the server's packets; flows closed from the server side end when the
/// controller expires them.)
#[inline(always)]
pub fn backend_for_flow(
    key: &FlowKey,
    svc: &ServiceValue,
    tcp_flags: u8,
) -> Option<(u32, &'static Backend, Stat)> {
    // SAFETY: no arguments; reads the coarse monotonic clock.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let closing = key.protocol == PROTO_TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0;
    let bare_syn =
        key.protocol == PROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST) == TCP_SYN;
    // An "at_syn" service's SYN through an unchanged slot beyond this CPU's record limit
    // (`dataplane.record_limit`): forwarded by the slot as "on_change" would have it, and the
    // table not even read: an entry of an unchanged slot names the slot's backend (the
    // controller keeps a slot changed while one names another), so a retransmitted SYN of a
    // recorded connection reaches its backend all the same. (Only SYNs that would be recorded
    // through an unchanged slot count against the limit. Without a limit, no slot is looked
    // at here.)
    let limit = if bare_syn && svc.flags & SVC_F_TCP_ON_CHANGE == 0 {
        record_limit()
    } else {
        None
    };
    // maglev/sh: the flow's table slot says more (the other schedulers have no slot).
    let early = limit.is_some().then(|| maglev_entry(key, svc));
    if let Some(rate) = limit
        && let Some(Some(e)) = early
        && e & RING_DIRTY == 0
        && let Some(b) = usable(e)
        && over_record_limit(rate, now)
    {
        count(Stat::FlowStateless);
        count_new_flow(svc.id, e);
        return Some((e, b, Stat::FlowStateless));
    }
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
                // Two CPUs may both see a FIN of this flow (generic mode, RSS changes) and
                // both subtract: the count is then one low until the controller's next sweep,
                // which sets each backend's count to the open entries it finds. Rare, and never
                // negative (clamped).
                flow.flags |= FLOW_F_CLOSED;
                add_conns(id, u64::MAX); // −1
                flow.last_seen_ns = now;
            } else if now.wrapping_sub(flow.last_seen_ns) > TOUCH_NS {
                flow.last_seen_ns = now;
            }
            count(Stat::FlowHit);
            return Some((id, b, Stat::FlowHit));
        }
        if counted_and_open(flow) {
            add_conns(id, u64::MAX); // −1 on the backend it leaves
        }
        moved = true;
        count(Stat::FlowRescheduled);
    }

    let syn = key.protocol == PROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let entry = match early {
        Some(e) => e,
        None => maglev_entry(key, svc),
    };
    if let Some(e) = entry
        && !moved
        && e != NO_BACKEND
        && e & RING_DIRTY == 0
        && (closing || records_on_change(key, svc))
    {
        // An unchanged slot records no UDP flow (nor a TCP connection of an "on_change"
        // service): its backend is every one of its flows'. (Only first fragments, and FIN/RST
        // without an entry, come this way: the rest takes `stateless`. An entry whose backend
        // went away is rewritten below, so its count is not subtracted twice.) Nor does it
        // record the FIN or RST of an "at_syn" connection without an entry (its SYN was beyond
        // the record limit, or its entry was evicted): the slot has its backend, and the
        // connection is ending.
        let b = usable(e)?;
        if closing && !records_on_change(key, svc) {
            deferred_close(key, now, e, b.generation);
        }
        count(Stat::FlowStateless);
        return Some((e, b, Stat::FlowStateless));
    }
    // A flow of the slot from before its change that has no entry (UDP of the unchanged slot,
    // a TCP connection of an "on_change" service or beyond the record limit): it stays with
    // the backend it had.
    let mut before_change = false;
    let id = match entry.and_then(ring_prev) {
        Some(p) if !moved && !syn && usable(p).is_some() => {
            before_change = true;
            p
        }
        _ => schedule(svc, entry)?,
    };
    let b = usable(id)?;
    // Counted: a UDP flow, a TCP connection from its SYN, or one recorded through its changed
    // slot (on_change; and an "at_syn" connection kept off the table by the record limit, that
    // its previous backend takes back: a drain then waits for it).
    let counted = !closing && (syn || before_change || records_on_change(key, svc));
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
        report_new_flow(key, id, b.generation, now);
    }
    count_new_flow(svc.id, id);
    Some((
        id,
        b,
        if moved {
            Stat::FlowRescheduled
        } else {
            Stat::FlowNew
        },
    ))
}

/// This CPU's record-limit state, when a limit is set (`dataplane.record_limit` ≠ 0).
#[inline(always)]
fn record_limit() -> Option<&'static mut RecordRate> {
    let r = LB_RECORD_RATE.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; only this CPU writes it while the program runs (the controller
    // writes `limit` once, after the load).
    let r = unsafe { &mut *r };
    (r.limit != 0).then_some(r)
}

/// Whether this SYN, about to be recorded through an unchanged slot, is over this CPU's record
/// limit (`rate.limit` a second: the window `lb trace` and flow sharing use). Counts it either
/// way.
#[inline(always)]
fn over_record_limit(rate: &mut RecordRate, now: u64) -> bool {
    if !crate::trace::admit(&mut rate.window, now, rate.limit as u32) {
        return true;
    }
    rate.window.sent += 1;
    false
}

/// Flow sharing: reports a new connection-table entry through `LB_SYNC`, at most
/// `LB_SYNC_CFG.rate` per second and CPU. Off (`rate == 0`): one load and one branch.
#[inline(always)]
fn report_new_flow(key: &FlowKey, backend: u32, generation: u32, now: u64) {
    let Some(cfg) = LB_SYNC_CFG.get(0) else {
        return;
    };
    if cfg.rate == 0 {
        return;
    }
    let Some(rate) = LB_SYNC_RATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; only this CPU writes it while the program runs.
    let rate = unsafe { &mut *rate };
    if !crate::trace::admit(rate, now, cfg.rate) {
        count(Stat::FlowSyncSuppressed);
        return;
    }
    let ev = SyncEvent {
        key: *key,
        backend,
        generation,
    };
    if LB_SYNC.output::<SyncEvent>(&ev, 0).is_err() {
        rate.lost += 1;
        count(Stat::FlowSyncSuppressed);
        return;
    }
    rate.sent += 1;
    count(Stat::FlowSyncReported);
}

/// The fragment-table key of `key`'s datagram (`id`: its IP identification).
#[inline(always)]
fn frag_key(key: &FlowKey, id: u32) -> FragKey {
    FragKey {
        src_addr: key.src_addr,
        dst_addr: key.dst_addr,
        id,
        protocol: key.protocol,
        family: key.family,
        _pad: [0; 2],
    }
}

/// Where this datagram's fragments go, if one of them was seen (and that backend is still the
/// same and usable).
#[inline(always)]
pub fn frag_backend(key: &FlowKey, id: u32) -> Option<(u32, &'static Backend)> {
    let v = LB_FRAGS.get_ptr(frag_key(key, id))?;
    // SAFETY: a valid map value pointer; a torn read is validated below.
    let (b, generation) = unsafe { ((*v).backend, (*v).generation) };
    let backend = usable(b)?;
    if backend.generation != generation {
        return None;
    }
    Some((b, backend))
}

/// Records where this datagram's fragments go.
#[inline(always)]
pub fn record_frag(key: &FlowKey, id: u32, backend: u32, generation: u32) {
    let v = FragValue {
        backend,
        generation,
    };
    if LB_FRAGS.insert(frag_key(key, id), v, 0).is_err() {
        count(Stat::FlowInsertFailed);
    }
}

/// A backend for a fragment without ports: the client's address hash over the service's table
/// (maglev, sh: the Maglev table; rr/wrr/lc/wlc: their sequence or list).
#[inline(always)]
pub fn by_address(key: &FlowKey, svc: &ServiceValue) -> Option<(u32, &'static Backend)> {
    let h = source_hash(key);
    let slot = match svc.scheduler {
        SCHED_WRR | SCHED_LC | SCHED_WLC => reduce(h, svc.ring_len),
        _ => reduce(h, svc.ring_size),
    };
    let id = ring_slot(svc, slot)?;
    Some((id, usable(id)?))
}

/// The backend that owns `key`'s flow, without recording or counting anything: its connection
/// table entry if still valid, else (maglev, sh) the table's answer: the slot's backend, or
/// the one it had before its change while that one is usable (an unrecorded flow is older).
/// rr/wrr/lc/wlc have no stateless answer.
#[inline(always)]
pub fn owner(key: &FlowKey, svc: &ServiceValue) -> Option<(u32, &'static Backend)> {
    if let Some(flow) = LB_FLOWS.get_ptr(key) {
        // SAFETY: a valid map value pointer; a torn read is validated below.
        let (id, generation) = unsafe { ((*flow).backend, (*flow).generation) };
        if let Some(b) = usable(id)
            && b.generation == generation
        {
            return Some((id, b));
        }
    }
    let e = maglev_entry(key, svc)?;
    // Not recorded in a changed slot: a flow from before the change, while that backend lives.
    if let Some(p) = ring_prev(e)
        && let Some(b) = usable(p)
    {
        return Some((p, b));
    }
    let id = ring_id(e)?;
    Some((id, usable(id)?))
}

/// Adds `delta` (wrapping: `u64::MAX` is −1) to a backend's shared active-connection counter.
#[inline(always)]
fn add_conns(id: u32, delta: u64) {
    if let Some(p) = LB_BE_CONNS.get_ptr_mut(id) {
        // SAFETY: a valid, aligned map value; all CPUs update it with atomic adds only.
        unsafe { atomic::add(p, delta) };
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

/// The service's scheduler picks a backend for a new flow (maglev/sh: `entry`, the flow's
/// table slot as stored).
#[inline(always)]
fn schedule(svc: &ServiceValue, entry: Option<u32>) -> Option<u32> {
    match svc.scheduler {
        SCHED_SH | SCHED_MAGLEV => ring_id(entry?),
        SCHED_WRR => {
            let n = svc.ring_len;
            if n == 0 {
                return None;
            }
            let cursor = LB_RR_CURSOR.get_ptr_mut(svc.id)?;
            // SAFETY: a valid, aligned map value; every CPU takes its position with one atomic
            // fetch-and-add, so the service's new flows walk the sequence in one global order.
            let c = unsafe { atomic::fetch_add(cursor, 1) };
            ring_slot(svc, (c % n as u64) as u32)
        }
        SCHED_LC => least_connections(svc, false),
        SCHED_WLC => least_connections(svc, true),
        _ => None,
    }
}

/// The backend id in slot `slot` (< `ring_size`) of the service's table (without
/// [`RING_DIRTY`]), or `None` for an empty slot.
#[inline(always)]
fn ring_slot(svc: &ServiceValue, slot: u32) -> Option<u32> {
    ring_id(ring_get(svc.ring_base.wrapping_add(slot))?)
}

/// maglev/sh: the `LB_RING` value of the flow's table slot (as stored: flags and all); `None`
/// for the other schedulers.
#[inline(always)]
fn maglev_entry(key: &FlowKey, svc: &ServiceValue) -> Option<u32> {
    let h = match svc.scheduler {
        SCHED_MAGLEV => flow_hash(key),
        SCHED_SH => source_hash(key),
        _ => return None,
    };
    let slot = reduce(h, svc.ring_size);
    // The packed copy first: a few KiB for the whole table, where `LB_RING` has 4 bytes a slot.
    if let Some(id) = packed_get(svc.id, svc.ring_base, slot) {
        return Some(id);
    }
    // A slot outside `LB_RING` reads as an empty one (the same decisions as `None` would
    // give: no backend). Always `Some` with a defined value: with a `None` here LLVM let a
    // later compare read the payload of either branch, an uninitialised register to the
    // verifier (in `lb_xdp_notrace`).
    Some(ring_get(svc.ring_base.wrapping_add(slot)).unwrap_or(NO_BACKEND))
}

/// The fast path of a maglev or sh service: a packet through a table slot that never changed
/// ([`RING_DIRTY`] clear) goes to the slot's backend, which every flow of the slot has had,
/// without the connection table: established TCP (no SYN, FIN or RST) and UDP. `None`: take
/// the full path (SYN, FIN and RST, which open and close the recorded connection; other
/// schedulers; a changed or empty slot; an inactive backend). A service with
/// [`SVC_F_TCP_ON_CHANGE`] takes SYNs this way too (counted as a new flow of the service and
/// backend), unrecorded (an "at_syn" service's SYN beyond the record limit goes by its slot
/// in [`backend_for_flow`]).
///
/// What skipping the table means (README, "Stateless slots"): TCP connections are recorded at
/// their SYN (unless "on_change") but their entries not touched afterwards; UDP flows of
/// unchanged slots are not recorded at all. When such a service's slot changes, the controller
/// keeps its previous backend in the slot ([`lb_common::RING_PREV`]) for the protocol's idle
/// timeout, so an unrecorded flow's next packet finds it and is recorded with it.
#[inline(always)]
pub fn stateless(
    key: &FlowKey,
    svc: &ServiceValue,
    tcp_flags: u8,
) -> Option<(u32, &'static Backend, Stat)> {
    match key.protocol {
        PROTO_TCP if tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 => {}
        // "on_change": a SYN is not recorded either (a FIN or RST may close a recorded one).
        PROTO_TCP
            if svc.flags & SVC_F_TCP_ON_CHANGE != 0 && tcp_flags & (TCP_FIN | TCP_RST) == 0 => {}
        // "at_syn": a SYN is recorded by the controller, when one drains `LB_RECORD`.
        PROTO_TCP if tcp_flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST) == TCP_SYN => {
            return deferred_syn(key, svc);
        }
        PROTO_UDP => {}
        _ => return None,
    }
    let e = maglev_entry(key, svc)?;
    if e & RING_DIRTY != 0 {
        return None; // a changed slot, or an empty one (NO_BACKEND has every bit)
    }
    let b = usable(e)?;
    if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        count_new_flow(svc.id, e); // a new connection (as `backend_for_flow` tells), not recorded
    }
    Some((e, b, Stat::FlowStateless))
}

/// An "at_syn" service's SYN through an unchanged slot while a controller drains `LB_RECORD`
/// (`dataplane.defer_records`): forwarded by the slot, and its entry handed to the controller
/// as a [`RecordEvent`] (inserted off the packet path: counted, open, unless the table has one
/// for the key). A retransmitted SYN of a recorded connection goes the same way: an entry of an
/// unchanged slot names the slot's backend, and the controller's insert leaves it as it is.
/// Beyond a record limit (`dataplane.record_limit`) such a SYN is not recorded at all, as in
/// [`backend_for_flow`]. `None` (the full path, which inserts the entry here): no controller
/// drains the ring, the ring is full, another scheduler, a changed or empty slot, an inactive
/// backend.
#[inline(always)]
fn deferred_syn(key: &FlowKey, svc: &ServiceValue) -> Option<(u32, &'static Backend, Stat)> {
    if LB_RECORD_RATE.get(0).is_none_or(|r| r.defer == 0) {
        return None;
    }
    let e = maglev_entry(key, svc)?;
    if e & RING_DIRTY != 0 {
        return None;
    }
    let b = usable(e)?;
    // A new connection (recorded, by the controller), or one beyond the record limit,
    // forwarded by its slot unrecorded (as in `backend_for_flow`).
    let how = match hand_over(key, e, b.generation) {
        HANDED_OVER => Stat::FlowNew,
        BEYOND_LIMIT => Stat::FlowStateless,
        _ => return None,
    };
    count_new_flow(svc.id, e);
    Some((e, b, how))
}

/// [`hand_over`]: the record is in `LB_RECORD`.
const HANDED_OVER: u32 = 1;
/// [`hand_over`]: beyond the record limit, not recorded at all.
const BEYOND_LIMIT: u32 = 2;
/// [`hand_over`]: not handed over (the ring is full, or the handover was switched off).
const NOT_HANDED_OVER: u32 = 0;

/// [`deferred_syn`]'s record: the record limit applied, then the record written to `LB_RECORD`
/// and counted. A BPF subprogram, not inlined: inlined, LLVM gave the pointer into
/// `LB_RECORD_RATE` a stack slot that another path reads as a `u32`, which the verifier rejects
/// ("invalid size of register fill").
#[inline(never)]
fn hand_over(key: &FlowKey, backend: u32, generation: u32) -> u32 {
    let Some(r) = LB_RECORD_RATE.get_ptr_mut(0) else {
        return NOT_HANDED_OVER;
    };
    // SAFETY: this CPU's slot; only this CPU writes it while the program runs (the controller
    // writes `limit` and `defer` after the load, and clears `defer` when it stops).
    let r = unsafe { &mut *r };
    if r.defer == 0 {
        return NOT_HANDED_OVER;
    }
    // The clock only for the record limit and flow sharing (off by default).
    // SAFETY: no arguments; reads the coarse monotonic clock.
    let clock = || unsafe { bpf_ktime_get_coarse_ns() };
    if r.limit != 0 && over_record_limit(r, clock()) {
        return BEYOND_LIMIT;
    }
    let ev = RecordEvent {
        key: *key,
        backend,
        generation,
        kind: RECORD_OPEN,
        // SAFETY: no arguments.
        cpu: unsafe { bpf_get_smp_processor_id() },
    };
    if LB_RECORD.output::<RecordEvent>(&ev, 0).is_err() {
        r.defer_full += 1;
        return NOT_HANDED_OVER;
    }
    r.deferred += 1;
    if LB_SYNC_CFG.get(0).is_some_and(|c| c.rate != 0) {
        report_new_flow(key, backend, generation, clock());
    }
    HANDED_OVER
}

/// A FIN or RST of an "at_syn" connection that found no entry in an unchanged slot, while a
/// controller drains `LB_RECORD`: its SYN's record may still be on its way, so the controller
/// is told to close the entry that record makes. When the ring is full, a closed entry of the
/// slot's backend (`backend`, `generation`) that counts nothing is inserted here instead, which
/// the controller's insert then leaves as it is.
///
/// A BPF subprogram, not inlined: a rare path (LLVM's stack slots of the inlined version
/// shared a slot between this pointer and a later `u32` in a way the verifier rejects).
#[inline(never)]
fn deferred_close(key: &FlowKey, now: u64, backend: u32, generation: u32) {
    let Some(r) = LB_RECORD_RATE.get(0) else {
        return;
    };
    if r.defer == 0 {
        return;
    }
    // SAFETY: no arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let ev = RecordEvent {
        key: *key,
        backend: NO_BACKEND,
        generation: 0,
        kind: RECORD_CLOSE,
        cpu,
    };
    if LB_RECORD.output::<RecordEvent>(&ev, 0).is_ok() {
        return;
    }
    let closed = FlowValue {
        backend,
        generation,
        last_seen_ns: now,
        flags: FLOW_F_CLOSED,
        cpu,
    };
    let _ = LB_FLOWS.insert(key, closed, BPF_NOEXIST as u64);
}

/// [`apply_records`]' state, on its stack; `bpf_loop` hands a pointer to it to
/// [`apply_record`].
#[repr(C)]
struct Applying {
    inserted: u32,
    skipped: u32,
    closed: u32,
    _pad: u32,
    now: u64,
}

/// `lb_record_apply`: the first `n` records of `LB_RECORD_IN` (`n`: the frame's first word,
/// at most its size), in order: a SYN's inserts a counted, open entry unless the table has
/// one (`BPF_NOEXIST`) or its backend id has another generation now, and counts it active; a
/// FIN's or RST's closes the entry of its key if counted and open. The counts go back in the
/// frame's next three words.
#[inline(always)]
pub fn apply_records(ctx: &aya_ebpf::programs::XdpContext) -> Option<()> {
    let words = crate::bounds::ptr_at_mut::<[u32; 4]>(ctx, 0)?;
    // SAFETY: bounds-checked by `ptr_at_mut`.
    let n = unsafe { (*words)[0] }.min(lb_common::limits::RECORD_APPLY_BATCH);
    let mut st = Applying {
        inserted: 0,
        skipped: 0,
        closed: 0,
        _pad: 0,
        // SAFETY: no arguments; reads the coarse monotonic clock.
        now: unsafe { bpf_ktime_get_coarse_ns() },
    };
    // SAFETY: `apply_record` has the callback signature bpf_loop expects; `st` outlives the
    // call and only `apply_record` touches it meanwhile.
    unsafe {
        bpf_loop(
            n,
            apply_record as *mut c_void,
            (&mut st as *mut Applying).cast(),
            0,
        )
    };
    // SAFETY: bounds-checked above.
    unsafe {
        (*words)[1] = st.inserted;
        (*words)[2] = st.skipped;
        (*words)[3] = st.closed;
    }
    Some(())
}

/// One record of [`apply_records`] (`bpf_loop` callback).
extern "C" fn apply_record(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Applying` that `apply_records` passed to bpf_loop.
    let st = unsafe { &mut *ctx.cast::<Applying>() };
    let Some(r) = LB_RECORD_IN.get(i as u32) else {
        return 1;
    };
    if r.kind == RECORD_OPEN {
        if LB_BACKENDS
            .get(r.backend)
            .is_none_or(|b| b.generation != r.generation)
        {
            st.skipped += 1;
            return 0;
        }
        let v = FlowValue {
            backend: r.backend,
            generation: r.generation,
            last_seen_ns: st.now,
            flags: FLOW_F_COUNTED,
            cpu: r.cpu,
        };
        if LB_FLOWS.insert(r.key, v, BPF_NOEXIST as u64).is_ok() {
            add_conns(r.backend, 1);
            st.inserted += 1;
        } else {
            st.skipped += 1;
        }
    } else if r.kind == RECORD_CLOSE
        && let Some(f) = LB_FLOWS.get_ptr_mut(r.key)
    {
        // SAFETY: a valid map value pointer (see `backend_for_flow`).
        let f = unsafe { &mut *f };
        if counted_and_open(f) {
            f.flags |= FLOW_F_CLOSED;
            f.last_seen_ns = st.now;
            add_conns(f.backend, u64::MAX); // −1
            st.closed += 1;
        }
    }
    0
}

/// The scan's state, on the caller's stack; `bpf_loop` hands a pointer to it to [`lc_step`].
#[repr(C)]
struct LcScan {
    base: u32,
    weighted: u32,
    best: u32,
    _pad: u32,
    best_active: u64,
    best_weight: u64,
}

/// Fewest active connections (lc), or fewest per weight (wlc: `a_i·w_j < a_j·w_i`, no
/// division), over the `ring_len` backends listed at the start of the service's table. Ties go
/// to the earlier one. The counters are the shared totals, so every CPU compares the same
/// numbers.
///
/// One `bpf_loop` call: the verifier checks [`lc_step`] once, whatever the number of backends
/// (up to the ring's `ring_size / 10`, as for Maglev).
#[inline(always)]
fn least_connections(svc: &ServiceValue, weighted: bool) -> Option<u32> {
    let mut scan = LcScan {
        base: svc.ring_base,
        weighted: weighted as u32,
        best: NO_BACKEND,
        _pad: 0,
        best_active: u64::MAX,
        best_weight: 1,
    };
    // SAFETY: `lc_step` has the callback signature bpf_loop expects; `scan` outlives the call
    // (bpf_loop returns after the last iteration) and only `lc_step` touches it meanwhile.
    unsafe {
        bpf_loop(
            svc.ring_len,
            lc_step as *mut c_void,
            &mut scan as *mut LcScan as *mut c_void,
            0,
        );
    }
    if scan.best == NO_BACKEND {
        None
    } else {
        Some(scan.best)
    }
}

/// One step of [`least_connections`]: the `i`th listed backend against the best so far.
/// Returns 0 (continue).
#[inline(never)]
extern "C" fn lc_step(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `LcScan` that `least_connections` passed to bpf_loop.
    let scan = unsafe { &mut *(ctx as *mut LcScan) };
    let Some(id) = ring_get(scan.base.wrapping_add(i as u32)) else {
        return 0;
    };
    let weight = match LB_BACKENDS.get(id) {
        Some(b) if b.flags & BACKEND_F_ACTIVE != 0 => b.weight as u64,
        _ => return 0,
    };
    if weight == 0 {
        return 0;
    }
    // Clamped so products with a weight fit u64 exactly (BPF has no 128-bit multiply).
    let active = clamp_active(shared_active(id));
    let better = if scan.weighted != 0 {
        wlc_less(active, weight, scan.best_active, scan.best_weight)
    } else {
        active < scan.best_active
    };
    if better {
        scan.best = id;
        scan.best_active = active;
        scan.best_weight = weight;
    }
    0
}

/// A backend's active connections: opened (shared counter) minus expired by the controller.
#[inline(always)]
fn shared_active(id: u32) -> u64 {
    let opened = LB_BE_CONNS.get(id).copied().unwrap_or(0);
    let expired = LB_BE_EXPIRED.get(id).copied().unwrap_or(0);
    active_connections(opened, expired)
}
