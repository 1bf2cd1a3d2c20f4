//! Bench only (`cargo xtask bench`, live frames): a traffic generator run through
//! BPF_PROG_TEST_RUN with `BPF_F_TEST_XDP_LIVE_FRAMES`, and a counting sink. The controller
//! never loads them.
//!
//! The generator rewrites every frame before sending it (live frames are recycled pages, with
//! whatever the forwarder wrote into them): destination and source MAC, and the flow (source
//! address low byte and source port) from a per-CPU sequence over `flows` flows. It expects an
//! untagged IPv4 frame with a TCP or UDP header right after a 20-byte IP header.

use crate::{
    bounds::ptr_at_mut,
    maps::{LB_BENCH_GEN, LB_BENCH_SEQ, LB_BENCH_SINK},
};
use aya_ebpf::programs::XdpContext;

const ETH_LEN: usize = 14;
const IP_SRC: usize = ETH_LEN + 12;
const L4_SRC_PORT: usize = ETH_LEN + 20;

#[inline(always)]
pub fn generate(ctx: &XdpContext) -> Option<()> {
    let cfg = LB_BENCH_GEN.get(0)?;
    let seq = LB_BENCH_SEQ.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, written only by this CPU while the program runs.
    let n = unsafe {
        let n = *seq;
        *seq = n.wrapping_add(1);
        n
    };
    let flows = if cfg.flows == 0 { 1 } else { cfg.flows as u64 };
    let flow = (n % flows) as u32;
    let dst = ptr_at_mut::<[u8; 6]>(ctx, 0)?;
    let smac = ptr_at_mut::<[u8; 6]>(ctx, 6)?;
    let src = ptr_at_mut::<[u8; 4]>(ctx, IP_SRC)?;
    let port = ptr_at_mut::<[u8; 2]>(ctx, L4_SRC_PORT)?;
    // SAFETY: each pointer was bounds-checked by `ptr_at_mut` for its size.
    unsafe {
        *dst = cfg.dst_mac;
        *smac = cfg.src_mac;
        (*src)[2] = (flow >> 24) as u8 | 0x80;
        (*src)[3] = (flow >> 16) as u8;
        *port = ((flow & 0xffff) as u16).to_be_bytes();
    }
    Some(())
}

/// Counts the frame by the last byte of its destination MAC (backends differ there).
#[inline(always)]
pub fn sink(ctx: &XdpContext) {
    let Some(mac) = ptr_at_mut::<[u8; 6]>(ctx, 0) else {
        return;
    };
    // SAFETY: bounds-checked.
    let last = unsafe { (*mac)[5] } as u32;
    if let Some(c) = LB_BENCH_SINK.get_ptr_mut(last) {
        // SAFETY: this CPU's slot.
        unsafe { *c += 1 };
    }
}
