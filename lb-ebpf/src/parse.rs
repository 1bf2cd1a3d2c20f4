//! Header parsing: Ethernet, one optional 802.1Q tag, IPv4 (any valid IHL), IPv6 (with up to
//! `MAX_IPV6_EXT_HEADERS` extension headers), TCP and UDP → the flow key; ICMP errors → the
//! flow key of the packet they quote, reversed (the client → VIP direction).

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FlowKey, PROTO_TCP, PROTO_UDP, limits::MAX_IPV6_EXT_HEADERS};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::bounds::ptr_at;

// EtherTypes as the u16 read from the wire on a little-endian machine.
pub const ETH_P_IP: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
pub const ETH_P_8021Q: u16 = 0x8100u16.to_be();

// IPv6 extension headers.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;

/// Largest L4 offset we accept (keeps offsets visibly bounded for the verifier).
const MAX_L4_OFFSET: usize = 512;

/// What the parser found. The flow key is filled as far as parsing got: for `Fragment` and
/// `MalformedL4` the addresses, protocol and family are set (enough to ask "is it a VIP?").
pub enum Parsed {
    /// A complete TCP/UDP 5-tuple.
    Flow,
    /// Not IPv4/IPv6.
    NotIp,
    /// IP, but neither TCP nor UDP.
    NotTcpUdp,
    /// Broken before the destination address was known.
    Malformed,
    /// Broken after the destination address was known (truncated/bad L3 length, truncated L4,
    /// too many IPv6 extension headers).
    MalformedL4,
    /// A later IPv4 or IPv6 fragment (no ports): addresses, protocol and `frag` are set. (A
    /// first fragment parses as `Flow`, with `frag.first` set.)
    Fragment,
    /// An ICMP destination-unreachable (v4: incl. fragmentation needed; v6: also packet too
    /// big) quoting a TCP/UDP packet: the key is that packet's flow seen from the client (its
    /// destination as source), so it finds the flow's entry.
    IcmpError,
    /// Other ICMP/ICMPv6 (echo, other types, errors quoting something else).
    Icmp,
}

/// The fragment a packet is, if it is one.
#[derive(Default)]
pub struct Frag {
    /// IPv4 identification or IPv6 fragment identification.
    pub id: u32,
    /// A fragment at all.
    pub is: bool,
    /// The first fragment (offset 0: it carries the L4 header).
    pub first: bool,
}

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// ICMP/ICMPv6 header: type, code, checksum, 4 bytes (unused / MTU).
const ICMP_HDR_LEN: usize = 8;

/// Fills `key` (and `tcp_flags` for TCP: the flags byte of the header; `frag` for fragments).
#[inline(always)]
pub fn parse(ctx: &XdpContext, key: &mut FlowKey, tcp_flags: &mut u8, frag: &mut Frag) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds-checked by `ptr_at`.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut off = EthHdr::LEN;
    if ether_type == ETH_P_8021Q {
        let Some(vlan) = ptr_at::<VlanHdr>(ctx, off) else {
            return Parsed::Malformed;
        };
        // SAFETY: bounds-checked by `ptr_at`.
        ether_type = unsafe { (*vlan).ether_type };
        off += VlanHdr::LEN;
    }
    let frame_len = ctx.data_end() - ctx.data();
    let l4_off = if ether_type == ETH_P_IP {
        match parse_ipv4(ctx, off, frame_len, key, frag) {
            Ok(l4) => l4,
            Err(p) => return p,
        }
    } else if ether_type == ETH_P_IPV6 {
        match parse_ipv6(ctx, off, frame_len, key, frag) {
            Ok(l4) => l4,
            Err(p) => return p,
        }
    } else {
        return Parsed::NotIp;
    };
    if key.protocol == PROTO_ICMP || key.protocol == PROTO_ICMPV6 {
        // (Fragmented ICMP errors never quote a whole header in the first bytes we need.)
        if frag.is {
            return Parsed::Icmp;
        }
        return parse_icmp(ctx, l4_off, key);
    }
    parse_ports(ctx, l4_off, key, tcp_flags)
}

/// An ICMP error quoting a TCP/UDP packet → `key` := that packet's flow, reversed.
#[inline(always)]
fn parse_icmp(ctx: &XdpContext, off: usize, key: &mut FlowKey) -> Parsed {
    if off > MAX_L4_OFFSET {
        return Parsed::MalformedL4;
    }
    let Some(icmp) = ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, off) else {
        return Parsed::Icmp;
    };
    // SAFETY: bounds-checked by `ptr_at`.
    let kind = unsafe { (*icmp)[0] };
    let inner = off + ICMP_HDR_LEN;
    let ports_off = if key.family == FAMILY_V4 {
        if key.protocol != PROTO_ICMP || kind != ICMP_DEST_UNREACH {
            return Parsed::Icmp;
        }
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, inner) else {
            return Parsed::Icmp;
        };
        // SAFETY: bounds-checked by `ptr_at`.
        let ip = unsafe { &*ip };
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        // The quoted packet's ports are only there in its first fragment.
        // The error is addressed to the quoted packet's source (the VIP): anything else is
        // not ours to forward (found by the hostile-input property test).
        if ip.vihl >> 4 != 4
            || ihl < Ipv4Hdr::LEN
            || u16::from_be_bytes(ip.frags) & 0x1fff != 0
            || (ip.proto != PROTO_TCP && ip.proto != PROTO_UDP)
            || ip.src_addr != key.dst_addr[..4]
        {
            return Parsed::Icmp;
        }
        *key = FlowKey::v4(ip.dst_addr, ip.src_addr, ip.proto);
        inner + ihl
    } else {
        if key.protocol != PROTO_ICMPV6
            || (kind != ICMPV6_DEST_UNREACH && kind != ICMPV6_PACKET_TOO_BIG)
        {
            return Parsed::Icmp;
        }
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, inner) else {
            return Parsed::Icmp;
        };
        // SAFETY: bounds-checked by `ptr_at`.
        let ip = unsafe { &*ip };
        if ip.vcf[0] >> 4 != 6
            || (ip.next_hdr != PROTO_TCP && ip.next_hdr != PROTO_UDP)
            || ip.src_addr != key.dst_addr
        {
            return Parsed::Icmp;
        }
        *key = FlowKey::v6(&ip.dst_addr, &ip.src_addr, ip.next_hdr);
        inner + Ipv6Hdr::LEN
    };
    if ports_off > MAX_L4_OFFSET + 128 {
        return Parsed::Icmp;
    }
    let Some(ports) = ptr_at::<[u8; 4]>(ctx, ports_off) else {
        return Parsed::Icmp;
    };
    // SAFETY: bounds-checked by `ptr_at`.
    let p = unsafe { *ports };
    key.set_ports([p[2], p[3], p[0], p[1]]);
    Parsed::IcmpError
}

/// Returns the L4 offset.
#[inline(always)]
fn parse_ipv4(
    ctx: &XdpContext,
    off: usize,
    frame_len: usize,
    key: &mut FlowKey,
    frag: &mut Frag,
) -> Result<usize, Parsed> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, off).ok_or(Parsed::Malformed)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(Parsed::Malformed);
    }
    // The key as whole words (read back as words: no partial-store stalls).
    *key = FlowKey::v4(ip.src_addr, ip.dst_addr, ip.proto);
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if ihl < Ipv4Hdr::LEN || tot_len < ihl || off + tot_len > frame_len {
        return Err(Parsed::MalformedL4);
    }
    // MF flag or a non-zero fragment offset.
    let frags = u16::from_be_bytes(ip.frags);
    if frags & 0x3fff != 0 {
        frag.is = true;
        frag.id = u16::from_be_bytes(ip.id) as u32;
        frag.first = frags & 0x1fff == 0;
        if !frag.first {
            return Err(Parsed::Fragment);
        }
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP && ip.proto != PROTO_ICMP {
        return Err(Parsed::NotTcpUdp);
    }
    Ok(off + ihl)
}

/// Returns the L4 offset.
#[inline(always)]
fn parse_ipv6(
    ctx: &XdpContext,
    off: usize,
    frame_len: usize,
    key: &mut FlowKey,
    frag: &mut Frag,
) -> Result<usize, Parsed> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, off).ok_or(Parsed::Malformed)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(Parsed::Malformed);
    }
    let mut next = ip.next_hdr;
    *key = FlowKey::v6(&ip.src_addr, &ip.dst_addr, next);
    let mut off = off + Ipv6Hdr::LEN;
    if off + u16::from_be_bytes(ip.payload_len) as usize > frame_len {
        return Err(Parsed::MalformedL4);
    }
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if next == PROTO_TCP || next == PROTO_UDP || next == PROTO_ICMPV6 {
            break;
        }
        let cur = next;
        let len = match cur {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH => {
                let h = ptr_at::<[u8; 2]>(ctx, off).ok_or(Parsed::MalformedL4)?;
                // SAFETY: bounds-checked by `ptr_at`.
                let h = unsafe { *h };
                next = h[0];
                if cur == IPV6_AH {
                    (h[1] as usize + 2) * 4
                } else {
                    (h[1] as usize + 1) * 8
                }
            }
            IPV6_FRAGMENT => {
                // next header, reserved, offset (13 bits) + flags, identification.
                let h = ptr_at::<[u8; 8]>(ctx, off).ok_or(Parsed::MalformedL4)?;
                // SAFETY: bounds-checked by `ptr_at`.
                let h = unsafe { *h };
                next = h[0];
                let offlg = u16::from_be_bytes([h[2], h[3]]);
                // An "atomic fragment" (offset 0, no M flag) is a whole datagram.
                if offlg & 0xfff9 != 0 {
                    frag.is = true;
                    frag.id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                    frag.first = offlg >> 3 == 0;
                    if !frag.first {
                        key.set_protocol(next);
                        return Err(Parsed::Fragment);
                    }
                }
                8
            }
            _ => return Err(Parsed::NotTcpUdp),
        };
        key.set_protocol(next);
        off += len;
        if off > MAX_L4_OFFSET {
            return Err(Parsed::MalformedL4);
        }
    }
    match next {
        PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => Ok(off),
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT => {
            Err(Parsed::MalformedL4)
        }
        _ => Err(Parsed::NotTcpUdp),
    }
}

#[inline(always)]
fn parse_ports(ctx: &XdpContext, off: usize, key: &mut FlowKey, tcp_flags: &mut u8) -> Parsed {
    if off > MAX_L4_OFFSET {
        return Parsed::MalformedL4;
    }
    // A complete TCP (20 bytes) or UDP (8 bytes) header must be present; ports come first in both.
    let ports = if key.protocol == PROTO_TCP {
        let Some(tcp) = ptr_at::<TcpHdr>(ctx, off) else {
            return Parsed::MalformedL4;
        };
        // SAFETY: bounds-checked by `ptr_at`: all 20 bytes; the flags are byte 13.
        *tcp_flags = unsafe { *tcp.cast::<u8>().add(13) };
        tcp.cast::<[u8; 4]>()
    } else {
        let Some(udp) = ptr_at::<UdpHdr>(ctx, off) else {
            return Parsed::MalformedL4;
        };
        udp.cast::<[u8; 4]>()
    };
    // SAFETY: bounds-checked by `ptr_at` (the whole header, of which these are the first bytes).
    key.set_ports(unsafe { *ports });
    Parsed::Flow
}
