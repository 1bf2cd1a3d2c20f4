//! The controller's side of the service cache (`LB_SVC_CACHE`, see
//! `lb_common::svc_cache`): which service each slot holds, and the seqlock writes that change
//! a slot while the data plane may read it.
//!
//! The cache follows `LB_SERVICES` op by op ([`SvcCache::set`] right after a service is
//! written, [`SvcCache::remove`] right after it is removed). Services whose keys share a slot:
//! the smallest key holds it, the others are looked up in the hash map (the cache is only a
//! shortcut: a miss is always correct). Only filled on x86-64, whose loads the program's
//! seqlock reads rely on being kept in order; elsewhere every slot stays empty.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::atomic::{Ordering, fence},
};

use lb_common::{
    ServiceValue,
    svc_cache::{CacheKey, KEY_HI, KEY_LO, KEY_REST, SEQ, VALUE, WORDS, slot, value_words},
};

/// `u32` words shared with the data plane (the memory-mapped map, or a vector in tests).
pub trait Words {
    fn get(&self, i: u32) -> u32;
    fn set(&self, i: u32, v: u32, order: Ordering);
}

/// Whether this host fills the cache (see the module's doc).
pub const FILLED: bool = cfg!(target_arch = "x86_64");

/// The cache's content as the controller keeps it, and the words it writes.
pub struct SvcCache<W: Words> {
    words: W,
    /// Every service: cache key → value words.
    services: BTreeMap<CacheKey, [u32; 6]>,
    /// Cache keys by slot.
    by_slot: BTreeMap<u32, BTreeSet<CacheKey>>,
    filled: bool,
}

impl<W: Words> SvcCache<W> {
    /// A cache over `words` holding nothing yet (see [`SvcCache::rebuild`]); `filled`: whether
    /// entries are written at all ([`FILLED`] outside tests).
    pub fn new(words: W, filled: bool) -> SvcCache<W> {
        SvcCache {
            words,
            services: BTreeMap::new(),
            by_slot: BTreeMap::new(),
            filled,
        }
    }

    /// Makes the cache hold `services` (all of `LB_SERVICES`): every slot is rewritten that
    /// differs, the others are emptied (after an adoption the pinned cache may be another
    /// controller's).
    pub fn rebuild(&mut self, services: impl IntoIterator<Item = (CacheKey, ServiceValue)>) {
        self.services.clear();
        self.by_slot.clear();
        for (k, v) in services {
            self.services.insert(k, value_words(&v));
            self.by_slot.entry(slot(&k)).or_default().insert(k);
        }
        for s in 0..lb_common::limits::SVC_CACHE_SLOTS {
            self.refresh(s);
        }
    }

    /// The service `key` now has `value`.
    pub fn set(&mut self, key: CacheKey, value: &ServiceValue) {
        self.services.insert(key, value_words(value));
        self.by_slot.entry(slot(&key)).or_default().insert(key);
        self.refresh(slot(&key));
    }

    /// The service `key` is gone.
    pub fn remove(&mut self, key: CacheKey) {
        if self.services.remove(&key).is_none() {
            return;
        }
        let s = slot(&key);
        if let Some(keys) = self.by_slot.get_mut(&s) {
            keys.remove(&key);
            if keys.is_empty() {
                self.by_slot.remove(&s);
            }
        }
        self.refresh(s);
    }

    /// The words (tests reach the mapping through it).
    pub fn words(&self) -> &W {
        &self.words
    }

    /// What slot `s` holds: (key, value words), `None` when empty.
    pub fn entry(&self, s: u32) -> Option<(CacheKey, [u32; 6])> {
        let base = s * WORDS as u32;
        let w = |i: usize| self.words.get(base + i as u32);
        let key = CacheKey([
            w(KEY_LO),
            w(KEY_HI),
            w(KEY_REST),
            w(KEY_REST + 1),
            w(KEY_REST + 2),
        ]);
        (key != CacheKey::default()).then(|| (key, std::array::from_fn(|i| w(VALUE + i))))
    }

    /// Writes slot `s` if it does not hold what it should: its smallest key's service, or
    /// nothing.
    fn refresh(&mut self, s: u32) {
        let want = if self.filled {
            self.by_slot
                .get(&s)
                .and_then(|keys| keys.first())
                .map(|k| (*k, self.services[k]))
        } else {
            None
        };
        if self.entry(s) == want {
            return;
        }
        let (key, value) = want.unwrap_or_default();
        let base = s * WORDS as u32;
        // A seqlock writer: the count goes odd before any word changes and even after all
        // have (the program rereads the count and drops what it read if it moved).
        let seq = self.words.get(base + SEQ as u32);
        let odd = seq.wrapping_add(1) | 1;
        self.words.set(base + SEQ as u32, odd, Ordering::Relaxed);
        fence(Ordering::Release);
        let [lo, hi, rest @ ..] = key.0;
        self.words.set(base + KEY_LO as u32, lo, Ordering::Relaxed);
        self.words.set(base + KEY_HI as u32, hi, Ordering::Relaxed);
        for (i, v) in rest.iter().enumerate() {
            self.words
                .set(base + (KEY_REST + i) as u32, *v, Ordering::Relaxed);
        }
        for (i, v) in value.iter().enumerate() {
            self.words
                .set(base + (VALUE + i) as u32, *v, Ordering::Relaxed);
        }
        self.words
            .set(base + SEQ as u32, odd.wrapping_add(1), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use lb_common::{FAMILY_V4, PROTO_TCP, ServiceKey, limits::SVC_CACHE_SLOTS};

    use super::*;

    struct Mem(Vec<AtomicU32>);

    impl Words for &Mem {
        fn get(&self, i: u32) -> u32 {
            self.0[i as usize].load(Ordering::Relaxed)
        }
        fn set(&self, i: u32, v: u32, order: Ordering) {
            self.0[i as usize].store(v, order);
        }
    }

    fn mem() -> Mem {
        Mem((0..SVC_CACHE_SLOTS as usize * WORDS)
            .map(|_| AtomicU32::new(0))
            .collect())
    }

    fn key(last: u8, port: u16) -> CacheKey {
        let p = port.to_be_bytes();
        ServiceKey {
            vip: [192, 0, 2, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: p,
            protocol: PROTO_TCP,
            family: FAMILY_V4,
        }
        .cache_key()
    }

    fn key6(last: u8, port: u16) -> CacheKey {
        let mut vip = [0u8; 16];
        vip[..2].copy_from_slice(&[0x20, 0x01]);
        vip[15] = last;
        ServiceKey {
            vip,
            port: port.to_be_bytes(),
            protocol: PROTO_TCP,
            family: lb_common::FAMILY_V6,
        }
        .cache_key()
    }

    fn value(id: u32) -> ServiceValue {
        ServiceValue {
            id,
            ring_base: id * 100,
            ring_size: 97,
            ..Default::default()
        }
    }

    /// Two keys of the same slot (`make` makes the second: IPv4 or IPv6).
    fn colliding(make: fn(u8, u16) -> CacheKey) -> (CacheKey, CacheKey) {
        let a = key(1, 80);
        for last in 2..=255u8 {
            for port in 1..2000u16 {
                let b = make(last, port);
                if slot(&b) == slot(&a) {
                    return (a.min(b), a.max(b));
                }
            }
        }
        panic!("no collision found");
    }

    #[test]
    fn follows_the_services_and_the_smallest_key_holds_a_shared_slot() {
        // Two IPv4 services, then an IPv4 and an IPv6 one, in one slot.
        for make in [key as fn(u8, u16) -> CacheKey, key6] {
            let m = mem();
            let mut c = SvcCache::new(&m, true);
            let (a, b) = colliding(make);
            let s = slot(&a);
            c.set(b, &value(2));
            assert_eq!(c.entry(s), Some((b, value_words(&value(2)))));
            c.set(a, &value(1));
            assert_eq!(c.entry(s), Some((a, value_words(&value(1)))), "smaller key");
            c.set(a, &value(3));
            assert_eq!(c.entry(s), Some((a, value_words(&value(3)))), "new value");
            c.remove(a);
            assert_eq!(c.entry(s), Some((b, value_words(&value(2)))), "b moves in");
            c.remove(b);
            assert_eq!(c.entry(s), None);
            // Every write left the count even, and each rewrite moved it.
            let seq = m.0[s as usize * WORDS + SEQ].load(Ordering::Relaxed);
            assert!(seq.is_multiple_of(2) && seq >= 10, "{seq}");
        }
    }

    #[test]
    fn rebuild_empties_what_is_not_a_service_and_unfilled_writes_nothing() {
        let m = mem();
        let stale = key(9, 9);
        {
            let mut other = SvcCache::new(&m, true);
            other.set(stale, &value(9));
        }
        let mut c = SvcCache::new(&m, true);
        let k = key(1, 443);
        c.rebuild([(k, value(1))]);
        assert_eq!(c.entry(slot(&stale)), None, "another controller's entry");
        assert_eq!(c.entry(slot(&k)), Some((k, value_words(&value(1)))));
        let n = mem();
        let mut off = SvcCache::new(&n, false);
        off.set(k, &value(1));
        assert!(n.0.iter().all(|w| w.load(Ordering::Relaxed) == 0));
    }
}
