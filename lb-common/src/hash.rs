//! The flow hash. The XDP program uses it to pick a Maglev slot for a new flow; the controller
//! and the tests use the very same function to predict where a flow lands.
//!
//! Every field of the 5-tuple is mixed (Linux hands out even ephemeral ports only, so a hash of
//! the port's low bits alone would send every flow to one backend).

use crate::{FAMILY_V4, FlowKey};

const SEED: u64 = 0x6c62_5f78_6470_5f31; // "lb_xdp_1"
const K: u64 = 0x9e37_79b9_7f4a_7c15;

/// MurmurHash3's 64-bit finalizer: a full avalanche of `h`.
#[inline(always)]
pub const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Odd multipliers of the flow hash's lanes.
const LANES: [u64; 5] = [
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0xd6e8_feb8_6659_fd93,
    0xa076_1d64_78bd_642f,
];

/// Hash of a 5-tuple: each of the key's five words multiplied in its own lane (independent
/// multiplies: the data plane computes this on every established packet, and five dependent
/// rounds were a chain of ~40 cycles), the lanes folded with rotations, then a full avalanche.
///
/// An IPv4 key's words 1 and 3 (the addresses' upper halves) are zero ([`FlowKey::v4`]): their
/// lanes are the constant [`V4_LANES`], not computed per packet. Same value, fewer instructions.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let w = key.words();
    let l = |i: usize| (w[i] ^ SEED).wrapping_mul(LANES[i]);
    let h = if key.family == FAMILY_V4 {
        l(0) ^ V4_LANES ^ l(2).rotate_left(26) ^ l(4).rotate_left(52)
    } else {
        l(0) ^ l(1).rotate_left(13)
            ^ l(2).rotate_left(26)
            ^ l(3).rotate_left(39)
            ^ l(4).rotate_left(52)
    };
    let h = fmix64(h);
    (h ^ (h >> 32)) as u32
}

/// [`flow_hash`]'s lanes 1 and 3 of a zero word.
const V4_LANES: u64 =
    SEED.wrapping_mul(LANES[1]).rotate_left(13) ^ SEED.wrapping_mul(LANES[3]).rotate_left(39);

/// [`source_hash`]'s seed.
const SH_SEED: u64 = SEED ^ 0x5348; // "SH"

/// Hash of the source address (and family) only: the `sh` scheduler. Every connection from one
/// client address lands on the same backend. (IPv4: word 1 is zero, its lane a constant.)
#[inline(always)]
pub fn source_hash(key: &FlowKey) -> u32 {
    let w = key.words();
    let hi = if key.family == FAMILY_V4 {
        SH_SEED.wrapping_mul(LANES[1]).rotate_left(13)
    } else {
        (w[1] ^ SH_SEED).wrapping_mul(LANES[1]).rotate_left(13)
    };
    let h = (w[0] ^ SH_SEED).wrapping_mul(LANES[0])
        ^ hi
        ^ (key.family as u64 ^ SH_SEED)
            .wrapping_mul(LANES[4])
            .rotate_left(52);
    let h = fmix64(h);
    (h ^ (h >> 32)) as u32
}

/// A hash's slot in a table of `n` slots: `⌊h·n / 2³²⌋`, uniform like `h % n` for a uniform
/// `h`, without a division (the data plane's one per packet was a measurable cost). The data
/// plane and the controller must agree on it: a flow's Maglev slot is `reduce(flow_hash, size)`.
#[inline(always)]
pub const fn reduce(h: u32, n: u32) -> u32 {
    ((h as u64 * n as u64) >> 32) as u32
}

/// Slot of an address in the VIP filter (`LB_VIP_FILTER`, [`crate::limits::VIP_FILTER_SLOTS`]
/// entries): a packet whose destination's slot is clear is not for any VIP, found with one
/// array read instead of two hash-map lookups.
#[inline(always)]
pub fn vip_slot(addr: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_le_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    vip_slot_of_words([w(0), w(4), w(8), w(12)])
}

/// [`vip_slot`] of a flow's destination, from the key's words (the data plane's way). An IPv4
/// destination is its first word alone (the other three are zero).
#[inline(always)]
pub fn vip_slot_of(key: &FlowKey) -> u32 {
    let w = key.words();
    if key.family == FAMILY_V4 {
        return vip_slot_of_words([w[2] as u32, 0, 0, 0]);
    }
    vip_slot_of_words([
        w[2] as u32,
        (w[2] >> 32) as u32,
        w[3] as u32,
        (w[3] >> 32) as u32,
    ])
}

/// [`vip_slot`] of an IPv4 address, from its four bytes as on the wire read as a
/// little-endian word (the data plane's way).
#[inline(always)]
pub fn vip_slot_v4(addr: u32) -> u32 {
    vip_slot_of_words([addr, 0, 0, 0])
}

#[inline(always)]
fn vip_slot_of_words(w: [u32; 4]) -> u32 {
    let x = w[0] ^ w[1].rotate_left(7) ^ w[2].rotate_left(14) ^ w[3].rotate_left(21);
    x.wrapping_mul(0x9e37_79b1) >> (32 - crate::limits::VIP_FILTER_BITS)
}

/// Hash of arbitrary bytes with a seed (the controller's Maglev permutation uses it on backend
/// identities). Stable across releases and platforms: tables built by two controllers agree.
pub fn bytes_hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = fmix64(seed ^ K);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h ^ w).wrapping_mul(K).rotate_left(31);
    }
    let mut tail = [0u8; 8];
    let rest = chunks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    h = (h ^ u64::from_le_bytes(tail))
        .wrapping_mul(K)
        .rotate_left(31);
    fmix64(h ^ bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_slot_of_a_key_is_the_slot_of_its_destination() {
        let k = FlowKey::v6(&[1; 16], &core::array::from_fn(|i| i as u8 * 17), 6);
        assert_eq!(vip_slot_of(&k), vip_slot(&k.dst_addr));
        let k = FlowKey::v4([1, 2, 3, 4], [10, 99, 0, 100], 17);
        assert_eq!(vip_slot_of(&k), vip_slot(&k.dst_addr));
        assert_eq!(
            vip_slot_v4(u32::from_le_bytes([10, 99, 0, 100])),
            vip_slot(&k.dst_addr)
        );
    }

    /// The hashes as written for every family (five lanes, four address words): the IPv4
    /// shortcuts must give exactly these values (tables and peers depend on them).
    fn flow_hash_general(key: &FlowKey) -> u32 {
        let w = key.words();
        let l = |i: usize| (w[i] ^ SEED).wrapping_mul(LANES[i]);
        let h = l(0)
            ^ l(1).rotate_left(13)
            ^ l(2).rotate_left(26)
            ^ l(3).rotate_left(39)
            ^ l(4).rotate_left(52);
        let h = fmix64(h);
        (h ^ (h >> 32)) as u32
    }

    fn source_hash_general(key: &FlowKey) -> u32 {
        let w = key.words();
        let h = (w[0] ^ SH_SEED).wrapping_mul(LANES[0])
            ^ (w[1] ^ SH_SEED).wrapping_mul(LANES[1]).rotate_left(13)
            ^ (key.family as u64 ^ SH_SEED)
                .wrapping_mul(LANES[4])
                .rotate_left(52);
        let h = fmix64(h);
        (h ^ (h >> 32)) as u32
    }

    #[test]
    fn ipv4_shortcuts_equal_the_general_hashes() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            x = fmix64(x.wrapping_add(K));
            let b = x.to_le_bytes();
            let mut k = FlowKey::v4([b[0], b[1], b[2], b[3]], [b[4], b[5], b[6], b[7]], b[0] | 1);
            k.set_ports([b[7], b[6], b[5], b[4]]);
            assert_eq!(flow_hash(&k), flow_hash_general(&k), "{k:?}");
            assert_eq!(source_hash(&k), source_hash_general(&k), "{k:?}");
            assert_eq!(vip_slot_of(&k), vip_slot(&k.dst_addr), "{k:?}");
            let v6 = FlowKey::v6(&[b[1]; 16], &[b[2]; 16], 6);
            assert_eq!(flow_hash(&v6), flow_hash_general(&v6));
            assert_eq!(source_hash(&v6), source_hash_general(&v6));
        }
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = FlowKey {
            src_addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst_addr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            src_port: [0x9c, 0x40],
            dst_port: [0, 80],
            protocol: 6,
            family: 4,
            _pad: [0; 2],
        };
        let h = flow_hash(&base);
        let mut k = base;
        k.src_addr[3] = 2;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.dst_addr[3] = 3;
        assert_ne!(flow_hash(&k), h);
        let mut v6 = base;
        v6.family = 6;
        let mut k = v6;
        k.dst_addr[15] = 1;
        assert_ne!(flow_hash(&k), flow_hash(&v6));
        let mut k = v6;
        k.src_addr[9] = 1;
        assert_ne!(flow_hash(&k), flow_hash(&v6));
        let mut k = base;
        k.src_port[1] = 0x42;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.dst_port[1] = 81;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.protocol = 17;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.family = 6;
        assert_ne!(flow_hash(&k), h);
    }

    /// The table slot (`reduce`: the hash's high bits) of even ports, and of consecutive
    /// client addresses, spreads evenly too.
    #[test]
    fn slots_of_even_ports_and_addresses_spread_evenly() {
        for table in [8u32, 251, 65537] {
            let mut buckets = [0u32; 8];
            for i in 0..16000u32 {
                let mut k = FlowKey::v4([10, 1, (i >> 8) as u8, i as u8], [10, 99, 0, 100], 6);
                k.set_ports([0x80 | (i >> 7) as u8, (i << 1) as u8, 0, 80]);
                let slot = reduce(flow_hash(&k), table);
                buckets[(slot as u64 * 8 / table as u64) as usize] += 1;
            }
            for b in &buckets {
                assert!((1850..2150).contains(b), "table {table}: {buckets:?}");
            }
        }
    }

    #[test]
    fn even_ports_spread_over_slots() {
        // Linux connect() uses even ephemeral ports: they must still spread evenly.
        let mut buckets = [0u32; 8];
        for p in (32768u16..32768 + 16000).step_by(2) {
            let k = FlowKey {
                src_port: p.to_be_bytes(),
                dst_port: 80u16.to_be_bytes(),
                protocol: 6,
                family: 4,
                ..FlowKey::default()
            };
            buckets[(flow_hash(&k) % 8) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "uneven buckets: {buckets:?}");
        }
    }

    #[test]
    fn source_hash_ignores_ports_and_destination() {
        let mut a = FlowKey {
            family: 4,
            protocol: 6,
            ..FlowKey::default()
        };
        a.src_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        let mut b = a;
        b.src_port = [1, 2];
        b.dst_port = [0, 80];
        b.dst_addr[0] = 9;
        assert_eq!(source_hash(&a), source_hash(&b));
        b.src_addr[3] = 2;
        assert_ne!(source_hash(&a), source_hash(&b));
    }

    #[test]
    fn bytes_hash_is_stable() {
        // Golden values: a change here reshuffles every Maglev table in the field.
        assert_eq!(bytes_hash(0, b""), bytes_hash(0, b""));
        assert_ne!(bytes_hash(0, b"10.0.0.1"), bytes_hash(1, b"10.0.0.1"));
        assert_ne!(bytes_hash(0, b"10.0.0.1"), bytes_hash(0, b"10.0.0.2"));
        assert_ne!(bytes_hash(0, b"a"), bytes_hash(0, b"a\0"));
    }
}
