//! `lb trace`: each decision of `lb_xdp`, with the frame as it left, into the `LB_TRACE` ring
//! buffer, filtered and rate-limited as `LB_TRACE_CFG` says. Off (`until_ns == 0`), the
//! packet path pays one load and one branch ([`running`]).

use aya_ebpf::{
    helpers::{
        bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns,
        generated::bpf_xdp_load_bytes,
    },
    programs::XdpContext,
};
use lb_common::{
    FlowKey, TRACE_F_BACKEND, TRACE_F_CLIENT, TRACE_F_VIP, TRACE_SNAP, TraceConfig, TraceEvent,
    TraceRate,
};

use crate::maps::{LB_BACKENDS, LB_TRACE, LB_TRACE_RATE, LB_TRACE_SETTING};

/// What `lb_xdp` decided for one packet (filled along the way).
pub struct Decision {
    pub key: FlowKey,
    pub backend: u32,
    /// A `Stat` index: why.
    pub reason: u32,
}

/// Whether a trace may be running (`lb_xdp`'s single-pass path is then not taken): one load.
#[inline(always)]
pub fn running() -> bool {
    LB_TRACE_SETTING.until_ns() != 0
}

/// After the full path: the decision to the trace, if one runs.
#[inline(always)]
pub fn maybe_trace(ctx: &XdpContext, d: &Decision, action: u32) {
    if running() {
        trace(ctx, LB_TRACE_SETTING.get(), d, action);
    }
}

/// A per-CPU limit of `limit` events a second (a window of one second from the first event):
/// whether one more may go. A refused one is counted in `rate.suppressed`; the caller counts
/// `sent` (or `lost`) once it tried. Used by `lb trace`, flow sharing and the record limit.
#[inline(always)]
pub fn admit(rate: &mut TraceRate, now: u64, limit: u32) -> bool {
    if now.wrapping_sub(rate.window_ns) >= 1_000_000_000 {
        rate.window_ns = now;
        rate.sent = 0;
    }
    if rate.sent >= limit as u64 {
        rate.suppressed += 1;
        return false;
    }
    true
}

#[inline(always)]
fn trace(ctx: &XdpContext, cfg: &TraceConfig, d: &Decision, action: u32) {
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now > cfg.until_ns {
        return;
    }
    if cfg.filters & TRACE_F_VIP != 0 && d.key.dst_addr != cfg.vip {
        return;
    }
    if cfg.filters & TRACE_F_CLIENT != 0 && d.key.src_addr != cfg.client {
        return;
    }
    // The backend's MAC is read here, on the trace path, not recorded for every packet.
    if cfg.filters & TRACE_F_BACKEND != 0
        && LB_BACKENDS
            .get(d.backend)
            .is_none_or(|b| b.mac != cfg.backend_mac)
    {
        return;
    }
    let Some(rate) = LB_TRACE_RATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; only this CPU writes it while the program runs.
    let rate = unsafe { &mut *rate };
    if !admit(rate, now, cfg.rate) {
        return;
    }
    let Some(mut entry) = LB_TRACE.reserve::<TraceEvent>(0) else {
        rate.lost += 1;
        return;
    };
    rate.sent += 1;
    let ev = entry.as_mut_ptr();
    let pkt_len = (ctx.data_end() - ctx.data()) as u32;
    let cap = if pkt_len as usize > TRACE_SNAP {
        TRACE_SNAP as u32
    } else {
        pkt_len
    };
    // SAFETY: `ev` points to the reserved, exclusively owned event; every field is written
    // before it is submitted (`data` up to `cap_len`, the rest is never read).
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).key = d.key;
        (*ev).backend = d.backend;
        (*ev).action = action;
        (*ev).reason = d.reason;
        (*ev).cpu = bpf_get_smp_processor_id();
        (*ev).pkt_len = pkt_len;
        // 1..=TRACE_SNAP in a form the verifier sees (a frame is never empty).
        let len = (cap.wrapping_sub(1) & (TRACE_SNAP as u32 - 1)) + 1;
        let r = bpf_xdp_load_bytes(ctx.ctx, 0, (*ev).data.as_mut_ptr().cast(), len);
        (*ev).cap_len = if r == 0 { len } else { 0 };
    }
    entry.submit(0);
}
