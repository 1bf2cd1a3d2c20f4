//! Bench only (`cargo xtask bench`): a traffic generator run through BPF_PROG_TEST_RUN with
//! `BPF_F_TEST_XDP_LIVE_FRAMES` and a counting sink (live frames), and the connection table's
//! insert alone (the new-flow figure's part that is the kernel's). The controller never loads
//! them.
//!
//! The generator rewrites every frame before sending it (live frames are recycled pages, with
//! whatever the forwarder wrote into them): destination and source MAC, and the flow (source
//! address low byte and source port) from a per-CPU sequence over `flows` flows. It expects an
//! untagged IPv4 frame with a TCP or UDP header right after a 20-byte IP header.

use crate::{
    bounds::{ptr_at, ptr_at_mut},
    maps::{LB_BENCH_GEN, LB_BENCH_SEQ, LB_BENCH_SINK, LB_FLOWS},
};
use aya_ebpf::{bindings::BPF_NOEXIST, programs::XdpContext};
use lb_common::{FlowKey, FlowValue};
use network_types::ip::Ipv4Hdr;

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

/// The kernel's part of recording a new flow: this frame's 5-tuple inserted into `LB_FLOWS` as
/// a new entry, and nothing else (no VIP, service, scheduler, counter or clock). `None`: not an
/// untagged IPv4 frame with 4 bytes of ports after a 20-byte header, or the entry exists.
#[inline(always)]
pub fn insert(ctx: &XdpContext) -> Option<()> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)?;
    let ports = ptr_at::<[u8; 4]>(ctx, ETH_LEN + 20)?;
    // SAFETY: both bounds-checked by `ptr_at`.
    let (ip, ports) = unsafe { (&*ip, *ports) };
    let mut key = FlowKey::v4(ip.src_addr, ip.dst_addr, ip.proto);
    key.set_ports(ports);
    let value = FlowValue {
        backend: 0,
        generation: 0,
        last_seen_ns: 0,
        flags: 0,
        cpu: 0,
    };
    LB_FLOWS.insert(key, value, BPF_NOEXIST as u64).ok()
}
