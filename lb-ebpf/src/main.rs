//! `lb_xdp`: the XDP data plane of the DSR load balancer.
//!
//! The packet path, top to bottom: parse (Ethernet, one 802.1Q tag, IPv4/IPv6, TCP/UDP) →
//! service lookup → connection table → (new flow: Maglev slot) → MAC rewrite → XDP_TX or
//! XDP_REDIRECT. Everything not for a service is passed to the kernel untouched. Every verdict
//! and every pass/drop reason is counted (see `lb_common::stats::Stat`).
#![no_std]
#![no_main]
// Atomic fetch-and-add on shared map values (see atomic.rs); RUSTC_BOOTSTRAP=lb_ebpf allows it.
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "core::intrinsics::atomic_xadd, see atomic.rs"
)]

mod atomic;
mod bench;
mod bounds;
mod maps;
mod parse;
mod select;
mod stats;
mod trace;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    BACKEND_F_REDIRECT, Backend, FLAG_ALL_PORTS_SERVICES, FlowKey, NO_BACKEND, NO_SERVICE,
    PROTO_TCP, PROTO_UDP, ServiceKey, ServiceValue, VipKey,
    stats::{FastStat, Stat},
    svc_cache,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::{
    maps::{LB_FLAGS, LB_IF_MAC, LB_SERVICES, LB_SVC_CACHE, LB_TX_PORTS, LB_VIP_FILTER, LB_VIPS},
    parse::{Frag, Parsed},
    stats::{count, count_backend, count_fast, count_service},
    trace::{Decision, maybe_trace},
};

// `#[inline(always)]`: the attribute macro wraps this function in the program's entry point;
// inlined, the whole path is one BPF function (otherwise every packet pays a BPF-to-BPF call:
// a second JITed prologue and epilogue).
#[xdp]
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    run::<true>(ctx)
}

/// `lb_xdp` without the trace check, so `cargo xtask bench` can measure what the check costs
/// when no trace runs. The controller never loads it.
#[xdp]
#[inline(always)]
pub fn lb_xdp_notrace(ctx: XdpContext) -> u32 {
    run::<false>(ctx)
}

#[inline(always)]
fn run<const TRACE: bool>(ctx: XdpContext) -> u32 {
    // The common cases in one pass (not while a trace runs: a trace needs the full decision);
    // it counts its verdicts itself. Short UDP and tagged frames apart: inside `single_pass`,
    // their checks cost the common frames' path a register (measured).
    if !(TRACE && trace::running())
        && let Some(action) = single_pass(&ctx).or_else(|| single_pass_rest(&ctx))
    {
        return action;
    }
    let mut d = Decision {
        key: FlowKey::default(),
        backend: NO_BACKEND,
        reason: 0,
    };
    let action = process(&ctx, &mut d);
    count_verdict(action);
    if TRACE {
        maybe_trace(&ctx, &d, action);
    }
    action
}

#[inline(always)]
fn count_verdict(action: u32) {
    count(match action {
        xdp_action::XDP_TX => Stat::VerdictTx,
        xdp_action::XDP_REDIRECT => Stat::VerdictRedirect,
        xdp_action::XDP_PASS => Stat::VerdictPass,
        xdp_action::XDP_DROP => Stat::VerdictDrop,
        _ => Stat::VerdictAborted,
    });
}

/// An IPv4 header without options and the 4 bytes after it (the ports).
#[repr(C)]
struct Ip4 {
    vihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frags: [u8; 2],
    ttl: u8,
    proto: u8,
    check: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
    ports: [u8; 4],
}

impl Ip4 {
    /// IHL 5, a total length the frame holds from byte `l3` on, not a fragment (MF clear,
    /// offset 0): the checks both single passes make before the protocol's.
    #[inline(always)]
    fn plain_within(&self, l3: u64, frame_len: u64) -> bool {
        let tot_len = u16::from_be_bytes(self.tot_len) as u64;
        self.vihl == 0x45
            && tot_len >= Ipv4Hdr::LEN as u64
            && l3 + tot_len <= frame_len
            && u16::from_be_bytes(self.frags) & 0x3fff == 0
    }
}

/// The Ethernet and IPv4 headers of an untagged IPv4 frame (no options) and the 4 bytes after
/// them (the ports), as [`single_pass`] reads them.
#[repr(C)]
struct Head4 {
    /// The destination MAC and the first two bytes of the source.
    mac8: [u8; 8],
    mac_rest: [u8; 4],
    ether_type: [u8; 2],
    ip: Ip4,
}

/// The first 54 bytes of an untagged IPv4 frame with a TCP header (a UDP header and 12 bytes
/// after it), as [`single_pass`] reads them after one bounds check.
#[repr(C)]
struct Head {
    v4: Head4,
    /// The TCP header's bytes 4..20 (its flags are byte 9 here).
    l4_rest: [u8; 16],
}

/// The two commonest cases, decided in one pass over the headers, with the flow key kept in
/// registers: a packet to no VIP (passed, `pass_no_service`), and a packet of a maglev/sh
/// service found in the service cache, through an unchanged table slot (`flow_stateless`, see
/// `select::stateless`). For an untagged frame of 54 bytes or more (every Ethernet frame on a
/// wire has 60) to this host: an IPv4 header without options or an IPv6 header without
/// extension headers, then a whole TCP or UDP header (no fragment). [`single_pass_rest`] takes
/// shorter IPv4 UDP frames and IPv4 frames with an 802.1Q tag. Exactly what [`process`] decides
/// and counts for these packets; other packets of a cached service continue with [`to_service`]
/// (not parsed twice). `None`: the rest, before anything was counted or changed; [`process`]
/// then takes the packet from the start. `Some`: the verdict is counted too (where it is known
/// without a switch on it). The two commonest outcomes (to no VIP: passed; established through
/// an unchanged slot: XDP_TX) count their reason and verdict as one update of `LB_STATS_FAST`
/// (`FastStat`), which the controller adds to both `LB_STATS` counters.
///
/// One bounds check covers the IPv4 and TCP headers, and the VIP filter is read before the flow
/// key is built: the path to no VIP costs about 8.6 ns a packet in repeat mode instead of 9.5
/// (XDP_PASS: 5), see BENCHMARKS.md.
#[inline(always)]
fn single_pass(ctx: &XdpContext) -> Option<u32> {
    let h = bounds::ptr_at::<Head>(ctx, 0)?;
    // SAFETY: bounds-checked by `ptr_at`: all of `Head` lies inside the packet.
    let head = unsafe { &*h };
    let h = &head.v4;
    if !for_host(h.mac8) {
        return None;
    }
    let ether_type = u16::from_ne_bytes(h.ether_type);
    if ether_type != parse::ETH_P_IP {
        if ether_type == parse::ETH_P_IPV6 {
            return single_pass_v6(ctx);
        }
        return None;
    }
    // IPv4 without options, not a fragment, TCP or UDP.
    let h = &h.ip;
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    if !h.plain_within(EthHdr::LEN as u64, frame_len)
        || (h.proto != PROTO_TCP && h.proto != PROTO_UDP)
    {
        return None;
    }
    // The VIP filter reads the destination alone: a packet to no VIP needs no flow key.
    if !maybe_vip_slot(lb_common::hash::vip_slot_v4(u32::from_le_bytes(h.dst))) {
        count_fast(FastStat::NoServicePass);
        return Some(xdp_action::XDP_PASS);
    }
    // TCP flags, or 0 for UDP (6 has bit 2 set, 17 has not).
    let tcp_flags = head.l4_rest[9] & ((h.proto >> 2) & 1).wrapping_neg();
    let mut key = FlowKey::v4(h.src, h.dst, h.proto);
    key.set_ports(h.ports);
    decide_vip(ctx, &key, tcp_flags, frame_len)
}

/// [`single_pass`]'s second chance, for the IPv4 frames it leaves to [`process`] only for their
/// layout: an untagged UDP frame of 42 to 53 bytes (a veth does not pad frames to 60), and a
/// frame with one 802.1Q tag (TCP or UDP, as [`single_pass`] takes them untagged). The same
/// checks, decision and counting; `None` for the rest, before anything was counted or changed.
/// (Apart from [`single_pass`]: inside it, these checks cost the common frames' path a
/// register, measured in session 26.)
#[inline(always)]
fn single_pass_rest(ctx: &XdpContext) -> Option<u32> {
    let e = bounds::ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds-checked by `ptr_at`: all of `EthHdr` lies inside the packet.
    let (mac8, ether_type) = unsafe { (*e.cast::<[u8; 8]>(), (*e).ether_type) };
    if !for_host(mac8) {
        return None;
    }
    if ether_type == parse::ETH_P_IP {
        // Every untagged frame of `Head`'s size was `single_pass`'s to decide.
        if ctx.data() + core::mem::size_of::<Head>() <= ctx.data_end() {
            return None;
        }
        return ipv4_at::<{ EthHdr::LEN }>(ctx, false);
    }
    if ether_type != parse::ETH_P_8021Q {
        return None;
    }
    let tag = bounds::ptr_at::<VlanHdr>(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by `ptr_at`.
    if unsafe { (*tag).ether_type } != parse::ETH_P_IP {
        return None;
    }
    ipv4_at::<{ EthHdr::LEN + VlanHdr::LEN }>(ctx, true)
}

/// An IPv4 header without options and a UDP header, or the first 8 bytes of a TCP one.
#[repr(C)]
struct Ip4L4 {
    ip: Ip4,
    l4_rest: [u8; 4],
}

/// [`single_pass_rest`]'s IPv4 packet at byte `L3` of the frame: IHL 5, a length the frame
/// holds, not a fragment, UDP, or TCP (`tcp`) with its whole header in the frame.
#[inline(always)]
fn ipv4_at<const L3: usize>(ctx: &XdpContext, tcp: bool) -> Option<u32> {
    let h = bounds::ptr_at::<Ip4L4>(ctx, L3)?;
    // SAFETY: bounds-checked by `ptr_at`: all of `Ip4L4` lies inside the packet.
    let h = unsafe { &(*h).ip };
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    if !h.plain_within(L3 as u64, frame_len)
        || (h.proto != PROTO_UDP && !(tcp && h.proto == PROTO_TCP))
    {
        return None;
    }
    let tcp_flags = if h.proto == PROTO_TCP {
        // A TCP header the frame does not hold whole is `process`'s (malformed).
        let t = bounds::ptr_at::<TcpHdr>(ctx, L3 + Ipv4Hdr::LEN)?;
        // SAFETY: bounds-checked by `ptr_at`: the flags are byte 13 of the 20.
        unsafe { *t.cast::<u8>().add(13) }
    } else {
        0
    };
    if !maybe_vip_slot(lb_common::hash::vip_slot_v4(u32::from_le_bytes(h.dst))) {
        count_fast(FastStat::NoServicePass);
        return Some(xdp_action::XDP_PASS);
    }
    let mut key = FlowKey::v4(h.src, h.dst, h.proto);
    key.set_ports(h.ports);
    decide_vip(ctx, &key, tcp_flags, frame_len)
}

/// [`single_pass`] of an IPv6 frame: TCP or UDP right after the fixed header, a payload length
/// the frame holds.
#[inline(always)]
fn single_pass_v6(ctx: &XdpContext) -> Option<u32> {
    let ip = bounds::ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let ip = unsafe { &*ip };
    let frame_len = ctx.data_end() - ctx.data();
    const L4: usize = EthHdr::LEN + Ipv6Hdr::LEN;
    if ip.vcf[0] >> 4 != 6 || L4 + u16::from_be_bytes(ip.payload_len) as usize > frame_len {
        return None;
    }
    let (ports, tcp_flags) = l4_ports(ctx, L4, ip.next_hdr)?;
    let mut key = FlowKey::v6(&ip.src_addr, &ip.dst_addr, ip.next_hdr);
    key.set_ports(ports);
    decide(ctx, &key, tcp_flags, frame_len as u64)
}

/// The ports (as on the wire) and TCP flags of the whole TCP or UDP header at `l4`.
#[inline(always)]
fn l4_ports(ctx: &XdpContext, l4: usize, protocol: u8) -> Option<([u8; 4], u8)> {
    match protocol {
        PROTO_TCP => {
            let tcp = bounds::ptr_at::<TcpHdr>(ctx, l4)?;
            // SAFETY: bounds-checked by `ptr_at`: all 20 bytes; the flags are byte 13.
            Some(unsafe { (*tcp.cast::<[u8; 4]>(), *tcp.cast::<u8>().add(13)) })
        }
        PROTO_UDP => {
            let udp = bounds::ptr_at::<UdpHdr>(ctx, l4)?;
            // SAFETY: bounds-checked by `ptr_at`.
            Some((unsafe { *udp.cast::<[u8; 4]>() }, 0))
        }
        _ => None,
    }
}

/// [`single_pass`]'s decision for a parsed flow. A packet of a cached service that is not
/// stateless goes on with [`to_service`] from here (not parsed again).
#[inline(always)]
fn decide(ctx: &XdpContext, key: &FlowKey, tcp_flags: u8, frame_len: u64) -> Option<u32> {
    if !maybe_vip(key) {
        count_fast(FastStat::NoServicePass);
        return Some(xdp_action::XDP_PASS);
    }
    decide_vip(ctx, key, tcp_flags, frame_len)
}

/// [`decide`] for a destination the VIP filter may hold.
#[inline(always)]
fn decide_vip(ctx: &XdpContext, key: &FlowKey, tcp_flags: u8, frame_len: u64) -> Option<u32> {
    let svc = cached_service(key)?;
    let Some((id, b, how)) = select::stateless(key, &svc, tcp_flags) else {
        // The rest of the full path from here (no trace runs: the decision is not needed).
        let mut d = Decision {
            key: *key,
            backend: NO_BACKEND,
            reason: 0,
        };
        let action = to_service(ctx, &mut d, &svc, tcp_flags, &Frag::default(), false);
        count_verdict(action);
        return Some(action);
    };
    count_service(svc.id, frame_len);
    count_backend(id, frame_len);
    rewrite_macs(ctx, b);
    if b.flags & BACKEND_F_REDIRECT == 0 {
        if how == Stat::FlowStateless {
            count_fast(FastStat::StatelessTx);
        } else {
            count(how);
            count(Stat::VerdictTx);
        }
        return Some(xdp_action::XDP_TX);
    }
    count(how);
    let action = LB_TX_PORTS
        .redirect(b.tx_port, xdp_action::XDP_DROP as u64)
        .unwrap_or_else(|_| {
            count(Stat::DropTxPort);
            xdp_action::XDP_DROP
        });
    count_verdict(action);
    Some(action)
}

/// A trivial XDP_TX program: the baseline `cargo xtask bench` measures lb_xdp against, in the
/// same run. The controller never loads it.
#[xdp]
pub fn lb_baseline_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// The trivial forwarder issue #13 measures against: swaps the Ethernet addresses and sends the
/// frame back (XDP_TX), as `xdp-bench tx -m swap-macs` does; a frame shorter than an Ethernet
/// header is dropped. The controller never loads it.
#[xdp]
pub fn lb_baseline_swap(ctx: XdpContext) -> u32 {
    let Some(eth) = bounds::ptr_at_mut::<EthHdr>(&ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: `ptr_at_mut` checked that the header lies inside the packet.
    unsafe { core::mem::swap(&mut (*eth).dst_addr, &mut (*eth).src_addr) };
    xdp_action::XDP_TX
}

/// A trivial XDP_PASS program: the floor `cargo xtask bench` measures passed packets and
/// one-call-per-packet costs against. The controller never loads it.
#[xdp]
pub fn lb_baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Whether the frame is addressed to this interface (its unicast MAC, or a group address). A
/// frame to another host's MAC reaches XDP when a bridge floods it to a veth or the interface
/// is promiscuous (tcpdump): the kernel would drop it, and a balancer must not forward it (two
/// nodes would send the same packet to a backend).
#[inline(always)]
fn for_this_host(ctx: &XdpContext) -> bool {
    let Some(eth) = bounds::ptr_at::<EthHdr>(ctx, 0) else {
        return true; // the parser passes it
    };
    // SAFETY: bounds-checked above: the header's first 8 bytes (destination MAC and two bytes
    // of the source) lie inside the packet.
    for_host(unsafe { *eth.cast::<[u8; 8]>() })
}

/// [`for_this_host`] of a frame's first 8 bytes (its destination MAC, then two bytes of the
/// source).
#[inline(always)]
fn for_host(mac8: [u8; 8]) -> bool {
    let own = LB_IF_MAC.load();
    let dst = u64::from_le_bytes(mac8) & 0xffff_ffff_ffff;
    dst & 1 != 0 || own == 0 || dst == own
}

/// Bench only: the live-frames traffic generator (see bench.rs). XDP_TX sends each frame out of
/// the interface the test run names.
#[xdp]
pub fn lb_bench_gen(ctx: XdpContext) -> u32 {
    match bench::generate(&ctx) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_ABORTED,
    }
}

/// Bench only: the connection table's insert alone (see bench.rs): XDP_TX when the frame's
/// 5-tuple was inserted as a new `LB_FLOWS` entry, XDP_DROP otherwise. `cargo xtask bench`
/// shows beside the new-flow figure what the kernel's insert costs by itself.
#[xdp]
pub fn lb_baseline_insert(ctx: XdpContext) -> u32 {
    match bench::insert(&ctx) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_DROP,
    }
}

/// The controller's side of `dataplane.defer_records`: never attached, run by `lb run` with
/// `BPF_PROG_TEST_RUN` on a frame whose first word is how many records of `LB_RECORD_IN` to
/// apply (the records it took from `LB_RECORD`); the next three words come back as the
/// entries inserted, the records skipped (an entry was there, or the backend id was reused) and
/// the entries closed. In the kernel, so a record costs the table insert and no system call.
#[xdp]
pub fn lb_record_apply(ctx: XdpContext) -> u32 {
    select::apply_records(&ctx);
    xdp_action::XDP_PASS
}

/// Bench only: counts what arrives by destination MAC and drops it.
#[xdp]
pub fn lb_bench_sink(ctx: XdpContext) -> u32 {
    bench::sink(&ctx);
    xdp_action::XDP_DROP
}

#[inline(always)]
fn process(ctx: &XdpContext, d: &mut Decision) -> u32 {
    if !for_this_host(ctx) {
        return pass(d, Stat::PassOtherHost);
    }
    let mut tcp_flags = 0u8;
    let mut frag = Frag::default();
    match parse::parse(ctx, &mut d.key, &mut tcp_flags, &mut frag) {
        Parsed::Flow => {}
        Parsed::NotIp => return pass(d, Stat::PassNotIp),
        Parsed::NotTcpUdp => return pass(d, Stat::PassNotTcpUdp),
        Parsed::Malformed => return pass(d, Stat::PassMalformed),
        Parsed::MalformedL4 => {
            return if is_vip(&d.key) {
                drop(ctx, d, Stat::DropMalformed)
            } else {
                pass(d, Stat::PassMalformed)
            };
        }
        Parsed::Fragment => return later_fragment(ctx, d, &frag),
        Parsed::Icmp => return pass(d, Stat::PassIcmp),
        Parsed::IcmpError => return icmp_error(ctx, d),
    }

    // Most traffic through a balancer's interface is not for a VIP: one array read says so.
    if !maybe_vip(&d.key) {
        return pass(
            d,
            if frag.is {
                Stat::PassFragment
            } else {
                Stat::PassNoService
            },
        );
    }
    let Some(svc) = lookup_service(&d.key) else {
        return pass(
            d,
            if frag.is {
                Stat::PassFragment
            } else {
                Stat::PassNoService
            },
        );
    };
    to_service(ctx, d, &svc, tcp_flags, &frag, true)
}

/// The rest of [`process`] once the packet's service is known (`try_stateless`: false when
/// [`single_pass`] found the packet is not for the stateless path already).
#[inline(always)]
fn to_service(
    ctx: &XdpContext,
    d: &mut Decision,
    svc: &ServiceValue,
    tcp_flags: u8,
    frag: &Frag,
    try_stateless: bool,
) -> u32 {
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    count_service(svc.id, frame_len);
    // Established TCP and UDP of maglev/sh through an unchanged slot: the table slot alone
    // decides.
    if try_stateless
        && !frag.is
        && let Some((id, b, how)) = select::stateless(&d.key, svc, tcp_flags)
    {
        count(how);
        count_backend(id, frame_len);
        d.reason = how as u32;
        return forward(ctx, d, id, b);
    }
    // A first fragment goes where an earlier-arriving fragment of its datagram went.
    if frag.is
        && let Some((id, b)) = select::frag_backend(&d.key, frag.id)
    {
        count(Stat::FlowFragment);
        count_backend(id, frame_len);
        d.reason = Stat::FlowFragment as u32;
        return forward(ctx, d, id, b);
    }

    let Some((backend_id, backend, how)) = select::backend_for_flow(&d.key, svc, tcp_flags) else {
        return drop(ctx, d, Stat::DropNoBackend);
    };
    count_backend(backend_id, frame_len);
    d.reason = how as u32;
    if frag.is {
        select::record_frag(&d.key, frag.id, backend_id, backend.generation);
    }
    forward(ctx, d, backend_id, backend)
}

/// A later fragment (no ports): where its datagram's first-arriving fragment went; if none was
/// seen, by the client's address over the VIP's fragment service (recorded, so the rest
/// follows). Not to a VIP: passed.
#[inline(always)]
fn later_fragment(ctx: &XdpContext, d: &mut Decision, frag: &Frag) -> u32 {
    let vkey = VipKey::of(&d.key);
    // SAFETY: VIP values are only replaced whole by the controller.
    let Some(vip) = (unsafe { LB_VIPS.get(vkey) }) else {
        return pass(d, Stat::PassFragment);
    };
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    if let Some((id, b)) = select::frag_backend(&d.key, frag.id) {
        count(Stat::FlowFragment);
        count_backend(id, frame_len);
        d.reason = Stat::FlowFragment as u32;
        return forward(ctx, d, id, b);
    }
    let svc = if d.key.protocol == PROTO_TCP {
        &vip.frag_tcp
    } else {
        &vip.frag_udp
    };
    if svc.id == NO_SERVICE {
        return drop(ctx, d, Stat::DropFragment);
    }
    let Some((id, b)) = select::by_address(&d.key, svc) else {
        return drop(ctx, d, Stat::DropFragment);
    };
    select::record_frag(&d.key, frag.id, id, b.generation);
    count(Stat::FlowFragmentHashed);
    count_service(svc.id, frame_len);
    count_backend(id, frame_len);
    d.reason = Stat::FlowFragmentHashed as u32;
    forward(ctx, d, id, b)
}

/// An ICMP error quoting a VIP flow goes to the backend that owns the flow (path-MTU discovery
/// and unreachables reach the server that sent the packet); `d.key` is the quoted flow,
/// reversed. Without an owner it is passed to the kernel.
#[inline(always)]
fn icmp_error(ctx: &XdpContext, d: &mut Decision) -> u32 {
    let Some(svc) = lookup_service(&d.key) else {
        return pass(d, Stat::PassIcmp);
    };
    let Some((backend_id, backend)) = select::owner(&d.key, &svc) else {
        return pass(d, Stat::PassIcmp);
    };
    count(Stat::FlowIcmpError);
    count_backend(backend_id, (ctx.data_end() - ctx.data()) as u64);
    d.reason = Stat::FlowIcmpError as u32;
    forward(ctx, d, backend_id, backend)
}

/// MAC rewrite, then out of the same interface (XDP_TX) or the backend's (XDP_REDIRECT).
#[inline(always)]
fn forward(ctx: &XdpContext, d: &mut Decision, backend_id: u32, backend: &Backend) -> u32 {
    d.backend = backend_id;
    match transmit(ctx, backend) {
        Some(action) => action,
        None => drop(ctx, d, Stat::DropTxPort),
    }
}

/// [`forward`]'s rewrite and verdict; `None`: the backend's egress port is gone (drop).
#[inline(always)]
fn transmit(ctx: &XdpContext, backend: &Backend) -> Option<u32> {
    rewrite_macs(ctx, backend);
    if backend.flags & BACKEND_F_REDIRECT != 0 {
        LB_TX_PORTS
            .redirect(backend.tx_port, xdp_action::XDP_DROP as u64)
            .ok()
    } else {
        Some(xdp_action::XDP_TX)
    }
}

/// Exact (VIP, port, protocol) first, then the VIP's all-ports service (port 0). The service
/// cache is asked first.
#[inline(always)]
fn lookup_service(key: &FlowKey) -> Option<ServiceValue> {
    if let Some(v) = cached_service(key) {
        return Some(v);
    }
    let skey = ServiceKey::of(key);
    // SAFETY: services are only replaced whole by the controller; a value read during an
    // update is either the old or the new one (both valid).
    if let Some(v) = unsafe { LB_SERVICES.get(skey) } {
        return Some(*v);
    }
    let flags = LB_FLAGS.get(0).copied().unwrap_or(0);
    if flags & FLAG_ALL_PORTS_SERVICES == 0 {
        return None;
    }
    // SAFETY: as above.
    unsafe { LB_SERVICES.get(skey.any_port()) }.copied()
}

/// The flow's service from the service cache (`lb_common::svc_cache`), if its slot holds it and
/// was not being rewritten while read: the sequence count, the key and value words and the
/// count again, each read once, in this order (volatile: neither merged nor reordered). An IPv4
/// key needs only its first two words compared: an entry with an IPv4 key's family byte has
/// the other three zero.
#[inline(always)]
fn cached_service(key: &FlowKey) -> Option<ServiceValue> {
    let k = svc_cache::key_of(key);
    let e = LB_SVC_CACHE.get_ptr(svc_cache::slot(&k))?;
    // SAFETY: `e` points to a map value of WORDS u32 words, valid while the program runs; the
    // controller may write it concurrently, which the sequence count detects.
    unsafe {
        let w = |i: usize| core::ptr::read_volatile((e as *const u32).add(i));
        let seq = w(svc_cache::SEQ);
        if seq & 1 != 0 {
            return None;
        }
        if w(svc_cache::KEY_LO) != k.0[0] || w(svc_cache::KEY_HI) != k.0[1] {
            return None;
        }
        if !k.is_v4()
            && (w(svc_cache::KEY_REST) != k.0[2]
                || w(svc_cache::KEY_REST + 1) != k.0[3]
                || w(svc_cache::KEY_REST + 2) != k.0[4])
        {
            return None;
        }
        let v = svc_cache::value_of([
            w(svc_cache::VALUE),
            w(svc_cache::VALUE + 1),
            w(svc_cache::VALUE + 2),
            w(svc_cache::VALUE + 3),
            w(svc_cache::VALUE + 4),
            w(svc_cache::VALUE + 5),
        ]);
        if w(svc_cache::SEQ) != seq {
            return None;
        }
        Some(v)
    }
}

/// False when the destination is certainly no VIP (its filter slot is clear).
#[inline(always)]
fn maybe_vip(key: &FlowKey) -> bool {
    maybe_vip_slot(lb_common::hash::vip_slot_of(key))
}

/// False when the VIP filter's `slot` is clear.
#[inline(always)]
fn maybe_vip_slot(slot: u32) -> bool {
    LB_VIP_FILTER.get(slot).is_some_and(|v| *v != 0)
}

#[inline(always)]
fn is_vip(key: &FlowKey) -> bool {
    LB_VIPS.get_ptr(VipKey::of(key)).is_some()
}

/// Destination MAC := backend's MAC, source MAC := egress interface's MAC. Nothing else changes.
#[inline(always)]
fn rewrite_macs(ctx: &XdpContext, backend: &Backend) {
    // The Ethernet header was bounds-checked by the parser; check again for the verifier.
    if let Some(eth) = bounds::ptr_at_mut::<EthHdr>(ctx, 0) {
        // SAFETY: `ptr_at_mut` checked that the header lies inside the packet.
        unsafe {
            (*eth).dst_addr = backend.mac;
            (*eth).src_addr = backend.src_mac;
        }
    }
}

#[inline(always)]
fn pass(d: &mut Decision, reason: Stat) -> u32 {
    count(reason);
    d.reason = reason as u32;
    xdp_action::XDP_PASS
}

#[inline(always)]
fn drop(ctx: &XdpContext, d: &mut Decision, reason: Stat) -> u32 {
    count(reason);
    d.reason = reason as u32;
    #[cfg(feature = "log")]
    aya_log_ebpf::debug!(ctx, "lb_xdp: XDP_DROP {}", reason.name());
    let _ = ctx;
    xdp_action::XDP_DROP
}

const _: () = assert!(PROTO_TCP == 6);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
