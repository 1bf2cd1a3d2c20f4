//! The IPv4 service cache (`LB_SVC_CACHE`): a direct-mapped copy of the IPv4 entries of
//! `LB_SERVICES`, so that a packet to an IPv4 VIP finds its service with one array read
//! instead of a hash-map lookup (the kernel's jhash over the 20-byte key, a bucket walk and a
//! key compare: about a quarter of the established path).
//!
//! An entry is 16 `u32` words (one 64-byte value, one cache line):
//! - [`SEQ`]: a sequence count, odd while the controller rewrites the entry;
//! - [`KEY_LO`], [`KEY_HI`]: the service's [`cache key`](crate::ServiceKey::cache_key)
//!   (address; port, protocol, family), zero when the slot is empty (a real key has its family
//!   byte set, so zero never matches);
//! - [`VALUE`] ..: the [`ServiceValue`]'s six words.
//!
//! The controller writes an entry as a seqlock writer (count to odd, words, count to even,
//! release-ordered) through its memory mapping; the program reads the count, the words and the
//! count again, in that order, and uses the entry only if the count was even and unchanged.
//! Anything else (a miss, a slot taken by another service, an entry being written) takes the
//! hash map, which stays the authority. Reads are plain loads in program order, which x86-64
//! keeps ordered: the controller fills the cache only there.

use crate::{FlowKey, ServiceValue, limits::SVC_CACHE_BITS};

/// Words of an entry (the map's value is `[u32; WORDS]`).
pub const WORDS: usize = 16;
/// Index of the sequence count.
pub const SEQ: usize = 0;
/// Index of the key's low word (the address as on the wire, read little-endian).
pub const KEY_LO: usize = 1;
/// Index of the key's high word (port in network order, protocol, family).
pub const KEY_HI: usize = 2;
/// Index of the first of the value's six words (id, scheduler, flags, ring_len, ring_base,
/// ring_size).
pub const VALUE: usize = 3;

/// The cache key of an IPv4 flow's service (its destination, destination port, protocol and
/// family), from the key's words; `None` for IPv6.
#[inline(always)]
pub fn key_of(key: &FlowKey) -> Option<u64> {
    let w = key.words();
    if (w[4] >> 40) as u8 != crate::FAMILY_V4 {
        return None;
    }
    Some((w[2] & 0xffff_ffff) | ((w[4] >> 16) & 0xffff_ffff) << 32)
}

/// The slot of a cache key.
#[inline(always)]
pub fn slot(key: u64) -> u32 {
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SVC_CACHE_BITS)) as u32
}

/// The value's words in entry order.
pub fn value_words(v: &ServiceValue) -> [u32; 6] {
    [
        v.id,
        v.scheduler,
        v.flags,
        v.ring_len,
        v.ring_base,
        v.ring_size,
    ]
}

/// The value of an entry's six value words.
#[inline(always)]
pub fn value_of(w: [u32; 6]) -> ServiceValue {
    ServiceValue {
        id: w[0],
        scheduler: w[1],
        flags: w[2],
        ring_len: w[3],
        ring_base: w[4],
        ring_size: w[5],
    }
}

const _: () = assert!(VALUE + 6 <= WORDS);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PROTO_TCP, PROTO_UDP, ServiceKey};

    fn ports(src: u16, dst: u16) -> [u8; 4] {
        let (s, d) = (src.to_be_bytes(), dst.to_be_bytes());
        [s[0], s[1], d[0], d[1]]
    }

    #[test]
    fn a_flows_cache_key_is_its_service_keys() {
        let mut k = FlowKey::v4([10, 0, 0, 1], [192, 0, 2, 80], PROTO_TCP);
        k.set_ports(ports(40000, 443));
        let want = ServiceKey::of(&k).cache_key().expect("v4");
        assert_eq!(key_of(&k), Some(want));
        assert_ne!(want, 0, "a real key is never an empty slot's");
        // Each part of the service key is in it; the source is not.
        let mut other = FlowKey::v4([10, 0, 0, 2], [192, 0, 2, 80], PROTO_TCP);
        other.set_ports(ports(1, 443));
        assert_eq!(key_of(&other), Some(want));
        for (dst, port, proto) in [
            ([192, 0, 2, 81], 443u16, PROTO_TCP),
            ([192, 0, 2, 80], 444, PROTO_TCP),
            ([192, 0, 2, 80], 443, PROTO_UDP),
        ] {
            let mut o = FlowKey::v4([10, 0, 0, 1], dst, proto);
            o.set_ports(ports(40000, port));
            assert_ne!(key_of(&o), Some(want));
            assert_eq!(key_of(&o), ServiceKey::of(&o).cache_key());
        }
        let v6 = FlowKey::v6(&[1; 16], &[2; 16], PROTO_TCP);
        assert_eq!(key_of(&v6), None);
        assert_eq!(ServiceKey::of(&v6).cache_key(), None);
        assert!(slot(want) < crate::limits::SVC_CACHE_SLOTS);
    }

    #[test]
    fn value_words_round_trip() {
        let v = ServiceValue {
            id: 1,
            scheduler: 2,
            flags: 3,
            ring_len: 4,
            ring_base: 5,
            ring_size: 6,
        };
        assert_eq!(value_of(value_words(&v)), v);
    }
}
