//! The service cache (`LB_SVC_CACHE`): a direct-mapped copy of the entries of `LB_SERVICES`,
//! so that a packet to a VIP finds its service with one array read instead of a hash-map
//! lookup (the kernel's jhash over the 20-byte key, a bucket walk and a key compare: about a
//! quarter of the established path). IPv4 services since layout 4, IPv6 ones too since the
//! entry's last key words were used (old programs never match an IPv6 entry: its family byte
//! differs from every IPv4 key's).
//!
//! An entry is 16 `u32` words (one 64-byte value, one cache line):
//! - [`SEQ`]: a sequence count, odd while the controller rewrites the entry;
//! - [`KEY_LO`], [`KEY_HI`]: the service's [`CacheKey`]'s first two words (the address's
//!   first word; port, protocol, family), zero when the slot is empty (a real key has its
//!   family byte set, so zero never matches);
//! - [`VALUE`] ..: the [`ServiceValue`]'s six words;
//! - [`KEY_REST`] ..: the key's last three words (the rest of an IPv6 address; zero for IPv4).
//!
//! The controller writes an entry as a seqlock writer (count to odd, words, count to even,
//! release-ordered) through its memory mapping; the program reads the count, the words and the
//! count again, in that order, and uses the entry only if the count was even and unchanged.
//! Anything else (a miss, a slot taken by another service, an entry being written) takes the
//! hash map, which stays the authority. Reads are plain loads in program order, which x86-64
//! keeps ordered: the controller fills the cache only there.

use crate::{FAMILY_V4, FlowKey, ServiceValue, limits::SVC_CACHE_BITS};

/// Words of an entry (the map's value is `[u32; WORDS]`).
pub const WORDS: usize = 16;
/// Index of the sequence count.
pub const SEQ: usize = 0;
/// Index of the key's first word (the address's first four bytes, read little-endian).
pub const KEY_LO: usize = 1;
/// Index of the key's second word (port in network order, protocol, family).
pub const KEY_HI: usize = 2;
/// Index of the first of the value's six words (id, scheduler, flags, ring_len, ring_base,
/// ring_size).
pub const VALUE: usize = 3;
/// Index of the key's last three words (the address's bytes 4..16; zero for IPv4).
pub const KEY_REST: usize = VALUE + 6;

/// A service's cache key, in entry order: the address's first word; port, protocol and family;
/// the address's other three words (zero for IPv4). Ordered: of two services sharing a slot,
/// the smaller key is cached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CacheKey(pub [u32; 5]);

impl CacheKey {
    /// Whether this is an IPv4 key (by its family byte; its last three words are then zero).
    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        (self.0[1] >> 24) as u8 == FAMILY_V4
    }
}

/// The cache key of a flow's service (its destination, destination port, protocol and
/// family), from the key's words.
#[inline(always)]
pub fn key_of(key: &FlowKey) -> CacheKey {
    let w = key.words();
    CacheKey([
        w[2] as u32,
        (w[4] >> 16) as u32,
        (w[2] >> 32) as u32,
        w[3] as u32,
        (w[3] >> 32) as u32,
    ])
}

/// The slot of a cache key. (IPv4 keys: the same slot as before IPv6 keys were cached.)
#[inline(always)]
pub fn slot(key: &CacheKey) -> u32 {
    let w = key.0;
    let rest = (w[2] as u64 | (w[3] as u64) << 32).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ (w[4] as u64).wrapping_mul(0x1656_67b1_9e37_79f9);
    let k = (w[0] as u64 | (w[1] as u64) << 32) ^ rest;
    (k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SVC_CACHE_BITS)) as u32
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

const _: () = assert!(KEY_REST + 3 <= WORDS);

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
        let want = ServiceKey::of(&k).cache_key();
        assert_eq!(key_of(&k), want);
        assert!(want.is_v4() && want.0[2..] == [0; 3]);
        assert_ne!(want.0[1], 0, "a real key is never an empty slot's");
        // Each part of the service key is in it; the source is not.
        let mut other = FlowKey::v4([10, 0, 0, 2], [192, 0, 2, 80], PROTO_TCP);
        other.set_ports(ports(1, 443));
        assert_eq!(key_of(&other), want);
        for (dst, port, proto) in [
            ([192, 0, 2, 81], 443u16, PROTO_TCP),
            ([192, 0, 2, 80], 444, PROTO_TCP),
            ([192, 0, 2, 80], 443, PROTO_UDP),
        ] {
            let mut o = FlowKey::v4([10, 0, 0, 1], dst, proto);
            o.set_ports(ports(40000, port));
            assert_ne!(key_of(&o), want);
            assert_eq!(key_of(&o), ServiceKey::of(&o).cache_key());
        }
        // IPv6: every byte of the address counts; the family differs from every IPv4 key's.
        let dst: [u8; 16] = core::array::from_fn(|i| i as u8 + 1);
        let mut v6 = FlowKey::v6(&[1; 16], &dst, PROTO_TCP);
        v6.set_ports(ports(40000, 443));
        let k6 = key_of(&v6);
        assert_eq!(k6, ServiceKey::of(&v6).cache_key());
        assert!(!k6.is_v4() && k6.0[1] != want.0[1]);
        for i in 0..16 {
            let mut d = dst;
            d[i] ^= 0x80;
            let mut o = FlowKey::v6(&[1; 16], &d, PROTO_TCP);
            o.set_ports(ports(40000, 443));
            assert_ne!(key_of(&o), k6, "byte {i}");
        }
        assert!(slot(&want) < crate::limits::SVC_CACHE_SLOTS);
        assert!(slot(&k6) < crate::limits::SVC_CACHE_SLOTS);
    }

    /// An IPv4 key's slot is the one it had before IPv6 keys were cached (a data plane of
    /// the previous version finds the entries a new controller writes).
    #[test]
    fn ipv4_slots_are_unchanged() {
        let mut k = FlowKey::v4([10, 0, 0, 1], [192, 0, 2, 80], PROTO_TCP);
        k.set_ports(ports(40000, 443));
        let c = key_of(&k);
        let old = (c.0[0] as u64 | (c.0[1] as u64) << 32).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            >> (64 - SVC_CACHE_BITS);
        assert_eq!(slot(&c), old as u32);
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
