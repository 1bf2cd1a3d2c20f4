//! The controller's side of the packed tables (`LB_RING_PACKED`, `LB_RING_IDS`, see
//! `lb_common::packed`): which backends of each maglev/sh service have an index, and the
//! seqlock writes that keep the packed fields equal to the unchanged slots of `LB_RING`.
//!
//! The packed copy follows `LB_RING` op by op, after each write to it: a whole table is packed
//! when its service is written ([`Packer::pack`]), changed slots are repacked one by one
//! ([`Packer::update`]). Between an `LB_RING` write and the packed one, a reader may still get
//! the slot's old backend from the packed copy: as if the `LB_RING` write came a moment later.
//! A field never names a backend that its slot did not have unchanged at some point, and the
//! header's sequence count keeps a reader from pairing a field with another write's id list.
//! Only filled on x86-64, whose loads the program's seqlock reads rely on being kept in order;
//! elsewhere no service is packed (every read goes to `LB_RING`).

use std::{
    collections::BTreeMap,
    sync::atomic::{Ordering, fence},
};

use lb_common::{
    RING_DIRTY,
    limits::MAX_BACKENDS,
    packed::{BITS_MASK, HDR, IDS, WRITING, bit_of, bits_for},
};

/// The packed maps' memory (the memory-mapped maps, or vectors in tests).
pub trait PackedWords {
    /// `LB_RING_PACKED` word `i` (0 outside the map).
    fn word(&self, i: u32) -> u64;
    /// Writes word `i` (nothing outside the map).
    fn set_word(&self, i: u32, v: u64);
    /// Entry `j` of `LB_RING_IDS[svc]` (0 outside the map).
    fn id(&self, svc: u32, j: usize) -> u16;
    /// Writes entry `j` of `LB_RING_IDS[svc]` with `order`.
    fn set_id(&self, svc: u32, j: usize, v: u16, order: Ordering);
    /// Words of `LB_RING_PACKED`.
    fn words(&self) -> u32;
    /// Entries of `LB_RING_IDS` (service ids below it can be packed).
    fn services(&self) -> u32;
}

/// A packed service, as the controller keeps it.
#[derive(Clone, Debug)]
struct Svc {
    base: u32,
    size: u32,
    /// Field width; 0: not packed (more than 255 backends, or the map is too small).
    k: u32,
    /// Index → backend id (index 0 unused).
    ids: Vec<u32>,
    /// Index → fields holding it.
    counts: Vec<u32>,
}

/// The packed copy of the tables.
pub struct Packer<W: PackedWords> {
    mem: W,
    svcs: BTreeMap<u32, Svc>,
    filled: bool,
    /// Backend id → index, while a table is packed (zero otherwise).
    scratch: Vec<u16>,
    /// Slot → field value, while a table is packed.
    fields: Vec<u8>,
}

/// `fields` (a whole number of words' worth: 64/k each) packed `k` bits a field, the first
/// field in a word's lowest bits, handed to `put` word by word (a loop per width: the fields
/// of a word combined with constant shifts).
fn whole_words(fields: &[u8], k: u32, mut put: impl FnMut(u64)) {
    /// One word of `N` = 64/`K` fields of `K` bits.
    #[inline(always)]
    fn word<const K: u32, const N: usize>(c: &[u8]) -> u64 {
        let c: &[u8; N] = c.try_into().expect("a word's fields");
        let mut w = 0u64;
        for (j, f) in c.iter().enumerate() {
            w |= (*f as u64) << (j as u32 * K);
        }
        w
    }
    match k {
        8 => fields.chunks_exact(8).for_each(|c| put(word::<8, 8>(c))),
        4 => fields.chunks_exact(16).for_each(|c| put(word::<4, 16>(c))),
        2 => fields.chunks_exact(32).for_each(|c| put(word::<2, 32>(c))),
        _ => fields.chunks_exact(64).for_each(|c| put(word::<1, 64>(c))),
    }
}

/// Whether `v` (an `LB_RING` value) is an unchanged slot's: its backend id, no flags (the empty
/// slot's `NO_BACKEND` has [`RING_DIRTY`] too).
fn clean(v: u32) -> bool {
    v & RING_DIRTY == 0
}

impl<W: PackedWords> Packer<W> {
    /// A packer over `mem`, nothing packed; `filled`: whether anything is written at all
    /// ([`super::svc_cache::FILLED`] outside tests).
    pub fn new(mem: W, filled: bool) -> Packer<W> {
        Packer {
            mem,
            svcs: BTreeMap::new(),
            filled,
            scratch: Vec::new(),
            fields: Vec::new(),
        }
    }

    /// The field width of service `id` (0: not packed).
    pub fn bits(&self, id: u32) -> u32 {
        self.svcs.get(&id).map_or(0, |s| s.k)
    }

    /// Starts a write of service `id`'s fields or ids (readers then take `LB_RING`); returns the
    /// header to pass to [`Packer::end`].
    fn begin(&self, id: u32) -> u16 {
        // (Odd already: a writer that stopped halfway, whose fields no reader used.)
        let h = self.mem.id(id, HDR) | WRITING;
        self.mem.set_id(id, HDR, h, Ordering::Relaxed);
        // The odd count before every write that follows (a seqlock writer's fence).
        fence(Ordering::Release);
        h
    }

    /// Ends a write begun with [`Packer::begin`]: the count even again, the width `k`.
    fn end(&self, id: u32, h: u16, k: u32) {
        let h = (h.wrapping_add(WRITING) & !BITS_MASK) | k as u16;
        self.mem.set_id(id, HDR, h, Ordering::Release);
    }

    fn field(&self, bit: u32, k: u32) -> u32 {
        ((self.mem.word(bit >> 6) >> (bit & 63)) & ((1u64 << k) - 1)) as u32
    }

    fn set_field(&self, bit: u32, k: u32, v: u32) {
        let w = bit >> 6;
        let mask = ((1u64 << k) - 1) << (bit & 63);
        let old = self.mem.word(w);
        self.mem
            .set_word(w, (old & !mask) | ((v as u64) << (bit & 63) & mask));
    }

    /// Packs service `id`'s whole table, `LB_RING[base .. base + size]` (`ring(i)`: slot `i`'s
    /// value), after it was written. A service whose table overlaps is unpacked (its range was
    /// given to this one: it moved, or is going).
    pub fn pack(&mut self, id: u32, base: u32, size: u32, ring: impl Fn(u32) -> u32) {
        self.pack_values(id, base, size, (0..size).map(ring));
    }

    /// [`Packer::pack`] given the table's `size` values in slot order (`LB_RING` read as a run,
    /// without a bounds check per slot).
    pub fn pack_values(
        &mut self,
        id: u32,
        base: u32,
        size: u32,
        values: impl Iterator<Item = u32>,
    ) {
        if !self.filled || id >= self.mem.services() {
            return;
        }
        // The distinct backends in slot order, each given its index in `scratch` (by backend
        // id), and every slot's field value in `fields`: one pass over the table, no sort (a
        // table of 65 537 slots per service, 1 000 services in a config).
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(MAX_BACKENDS as usize, 0);
        let mut fields = std::mem::take(&mut self.fields);
        fields.clear();
        fields.resize(size as usize, 0);
        let mut distinct: Vec<u32> = Vec::new();
        let mut overflow = false;
        for (field, v) in fields.iter_mut().zip(values) {
            let mut f = 0u16;
            if clean(v) && (v as usize) < scratch.len() {
                f = scratch[v as usize];
                if f == 0 {
                    if distinct.len() + 1 < IDS {
                        distinct.push(v);
                        f = distinct.len() as u16;
                        scratch[v as usize] = f;
                    } else {
                        overflow = true;
                    }
                }
            }
            // (Below IDS = 256: a byte.)
            *field = f as u8;
        }
        // More than 255 distinct backends: not packed (`bits_for` gives 0).
        let n = if overflow { IDS } else { distinct.len() };
        self.store(id, base, &fields, &distinct, n, None);
        for v in distinct {
            scratch[v as usize] = 0;
        }
        self.scratch = scratch;
        self.fields = fields;
    }

    /// [`Packer::pack_values`] of a table written whole from these fields, without changed
    /// slots: slot `i` holds `ids[fields[i]]` (`ids[0]`: none), and `counts[f]` slots hold
    /// field `f` (`ids.len()` entries each, at most [`IDS`]). The desired state's narrow tables
    /// are kept so (`crate::desired::Table`): no pass over the table finds its backends.
    pub fn pack_fields(&mut self, id: u32, base: u32, fields: &[u8], ids: &[u32], counts: &[u32]) {
        if !self.filled || id >= self.mem.services() {
            return;
        }
        debug_assert!(!ids.is_empty() && ids.len() <= IDS && counts.len() == ids.len());
        let distinct = ids.get(1..).unwrap_or_default();
        self.store(id, base, fields, distinct, distinct.len(), Some(counts));
    }

    /// Writes service `id`'s packed table: `fields` (a field per slot, 0: read `LB_RING`) at
    /// `base`, field `j + 1` standing for backend `distinct[j]`; `n` distinct backends (more
    /// than 255: not packed); `counts`: how many fields hold each index, or `None` to count
    /// them here.
    fn store(
        &mut self,
        id: u32,
        base: u32,
        fields: &[u8],
        distinct: &[u32],
        n: usize,
        counts: Option<&[u32]>,
    ) {
        let size = fields.len() as u32;
        let overlapping: Vec<u32> = self
            .svcs
            .iter()
            .filter(|(o, s)| {
                **o != id
                    && s.k != 0
                    && s.base < base.saturating_add(size)
                    && base < s.base + s.size
            })
            .map(|(o, _)| *o)
            .collect();
        for o in overlapping {
            self.unpack(o);
        }
        let end_bit = (base as u64 + size as u64) * 8;
        let k = if end_bit > self.mem.words() as u64 * 64 || size == 0 {
            0
        } else {
            bits_for(n)
        };
        let h = self.begin(id);
        let mut svc = Svc {
            base,
            size,
            k,
            ids: Vec::new(),
            counts: Vec::new(),
        };
        if k != 0 {
            svc.ids = vec![0; 1 << k];
            svc.counts = vec![0; 1 << k];
            for (j, b) in distinct.iter().enumerate() {
                svc.ids[j + 1] = *b;
                self.mem.set_id(id, j + 1, *b as u16, Ordering::Relaxed);
            }
            match counts {
                Some(c) => svc.counts[..c.len()].copy_from_slice(c),
                None => crate::desired::tally(fields, &mut svc.counts),
            }
            // Whole words at once: the fields of the words this table covers, the bits of
            // its neighbours' fields (first and last word) as they were. The table starts
            // on a byte (bit 8·base) and fields of k ∈ {1, 2, 4, 8} bits never straddle
            // words: each word takes the next (64 − shift) / k slots.
            let first = bit_of(base, 0, k);
            let mut word = first >> 6;
            let mut shift = first & 63;
            let mut acc = self.mem.word(word) & ((1u64 << shift) - 1);
            let mut rest: &[u8] = fields;
            while !rest.is_empty() {
                if shift == 0 && rest.len() >= (64 / k) as usize {
                    // The words this table covers whole: one at a time with a constant field
                    // width (a byte's fields combined in registers, not shifted one by one).
                    let whole = rest.len() / (64 / k) as usize * (64 / k) as usize;
                    whole_words(&rest[..whole], k, |w| {
                        self.mem.set_word(word, w);
                        word += 1;
                    });
                    rest = &rest[whole..];
                    continue;
                }
                let n = (((64 - shift) / k) as usize).min(rest.len());
                for (j, f) in rest[..n].iter().enumerate() {
                    acc |= (*f as u64) << (shift + j as u32 * k);
                }
                rest = &rest[n..];
                shift += n as u32 * k;
                if shift == 64 {
                    self.mem.set_word(word, acc);
                    word += 1;
                    shift = 0;
                    acc = 0;
                }
            }
            if shift != 0 {
                acc |= self.mem.word(word) & !((1u64 << shift) - 1);
                self.mem.set_word(word, acc);
            }
        }
        self.end(id, h, k);
        self.svcs.insert(id, svc);
    }

    /// Every service id but `keep` is unpacked, whatever its header says (a copy adopted from
    /// another controller: ids it packed that are gone or another scheduler now).
    pub fn unpack_others(&mut self, keep: &std::collections::BTreeSet<u32>) {
        for id in 0..self.mem.services() {
            if keep.contains(&id) {
                continue;
            }
            self.svcs.remove(&id);
            let h = self.mem.id(id, HDR);
            if h & (BITS_MASK | WRITING) != 0 {
                let h = self.begin(id);
                self.end(id, h, 0);
            }
        }
    }

    /// Where service `id`'s table is packed (or was looked at and left unpacked): its base and
    /// size.
    pub fn packed_at(&self, id: u32) -> Option<(u32, u32)> {
        self.svcs.get(&id).map(|s| (s.base, s.size))
    }

    /// Service `id`'s table was written whole at `base` (`size` slots): packed again if it was
    /// packed there, unpacked if it was packed elsewhere (it moved: its service, written next
    /// with the new range, packs it).
    pub fn rewritten(&mut self, id: u32, base: u32, size: u32, ring: impl Fn(u32) -> u32) {
        match self.svcs.get(&id) {
            Some(s) if (s.base, s.size) == (base, size) => self.pack(id, base, size, ring),
            Some(_) => self.unpack(id),
            None => {}
        }
    }

    /// Service `id` is not packed any more (removed, another scheduler, its table moving).
    pub fn unpack(&mut self, id: u32) {
        if self.svcs.remove(&id).is_some_and(|s| s.k != 0) {
            let h = self.begin(id);
            self.end(id, h, 0);
        }
    }

    /// Slots of service `id`'s table (at `base`) now hold the given `LB_RING` values. When a
    /// new backend finds no free index, the table is packed again whole (`ring` as for
    /// [`Packer::pack`]), wider if need be.
    pub fn update(&mut self, id: u32, base: u32, slots: &[(u32, u32)], ring: impl Fn(u32) -> u32) {
        let Some(svc) = self.svcs.get(&id) else {
            return;
        };
        if svc.k == 0 {
            return;
        }
        if svc.base != base {
            self.unpack(id);
            return;
        }
        let (k, size) = (svc.k, svc.size);
        let h = self.begin(id);
        let mut svc = self.svcs.remove(&id).expect("present");
        let mut overflow = false;
        for &(s, v) in slots {
            if s >= size {
                continue;
            }
            let bit = bit_of(base, s, k);
            let old = self.field(bit, k) as usize;
            let new = if clean(v) {
                match (1..svc.ids.len()).find(|&j| svc.counts[j] > 0 && svc.ids[j] == v) {
                    Some(j) => j,
                    None => match (1..svc.ids.len()).find(|&j| svc.counts[j] == 0) {
                        Some(j) => {
                            svc.ids[j] = v;
                            self.mem.set_id(id, j, v as u16, Ordering::Relaxed);
                            j
                        }
                        None => {
                            overflow = true;
                            break;
                        }
                    },
                }
            } else {
                0
            };
            if old != new {
                svc.counts[old] = svc.counts[old].saturating_sub(1);
                svc.counts[new] += 1;
                self.set_field(bit, k, new as u32);
            }
        }
        self.end(id, h, k);
        self.svcs.insert(id, svc);
        if overflow {
            self.pack(id, base, size, ring);
        }
    }

    /// `LB_RING[index]` now holds `v` (a single write, whichever service's table it is in;
    /// `ring(i)`: `LB_RING[i]`).
    pub fn update_index(&mut self, index: u32, v: u32, ring: impl Fn(u32) -> u32) {
        let owner = self
            .svcs
            .iter()
            .find(|(_, s)| s.k != 0 && s.base <= index && index - s.base < s.size)
            .map(|(id, s)| (*id, s.base));
        if let Some((id, base)) = owner {
            self.update(id, base, &[(index - base, v)], |i| ring(base + i));
        }
    }

    /// What the packed copy says of slot `slot` of service `id`: `Some(backend)` for a packed
    /// field, `None` for "read `LB_RING`" (the data plane's reading, for tests).
    #[cfg(test)]
    pub fn read(&self, id: u32, ring_base: u32, slot: u32) -> Option<u32> {
        let h = self.mem.id(id, HDR);
        let k = (h & BITS_MASK) as u32;
        if k == 0 || h & WRITING != 0 {
            return None;
        }
        let v = self.field(bit_of(ring_base, slot, k), k) as usize;
        (v != 0).then(|| self.mem.id(id, v & (IDS - 1)) as u32)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        cell::RefCell,
        collections::{BTreeMap, BTreeSet},
    };

    use lb_common::{NO_BACKEND, ring_value};
    use proptest::prelude::*;

    use super::*;

    /// Whole words packed with constant widths hold each field where the data plane reads
    /// it: field j of a word at bits j·k.
    #[test]
    fn whole_words_place_fields_as_read() {
        for k in [1u32, 2, 4, 8] {
            let per = (64 / k) as usize;
            let fields: Vec<u8> = (0..per * 3)
                .map(|i| ((i * 7 + 3) % (1 << k)) as u8)
                .collect();
            let mut words = Vec::new();
            whole_words(&fields, k, |w| words.push(w));
            assert_eq!(words.len(), 3, "k {k}");
            for (i, f) in fields.iter().enumerate() {
                let w = words[i / per];
                let got = (w >> ((i % per) as u32 * k)) & ((1u64 << k) - 1);
                assert_eq!(got, *f as u64, "k {k} field {i}");
            }
        }
    }

    /// Vectors for the two maps.
    struct Mem {
        words: RefCell<Vec<u64>>,
        ids: RefCell<Vec<u16>>,
    }

    impl Mem {
        fn new(words: usize, services: usize) -> Mem {
            Mem {
                words: RefCell::new(vec![0; words]),
                ids: RefCell::new(vec![0; services * IDS]),
            }
        }
    }

    impl PackedWords for &Mem {
        fn word(&self, i: u32) -> u64 {
            self.words.borrow().get(i as usize).copied().unwrap_or(0)
        }
        fn set_word(&self, i: u32, v: u64) {
            if let Some(w) = self.words.borrow_mut().get_mut(i as usize) {
                *w = v;
            }
        }
        fn id(&self, svc: u32, j: usize) -> u16 {
            self.ids.borrow()[svc as usize * IDS + j]
        }
        fn set_id(&self, svc: u32, j: usize, v: u16, _: Ordering) {
            self.ids.borrow_mut()[svc as usize * IDS + j] = v;
        }
        fn words(&self) -> u32 {
            self.words.borrow().len() as u32
        }
        fn services(&self) -> u32 {
            (self.ids.borrow().len() / IDS) as u32
        }
    }

    /// Every slot of every packed service reads as `LB_RING` says: its backend when unchanged,
    /// else "read `LB_RING`"; and every unchanged slot of a service with at most 255 backends
    /// is packed.
    fn check(p: &Packer<&Mem>, ring: &[u32], tables: &BTreeMap<u32, (u32, u32)>) {
        for (&id, &(base, size)) in tables {
            let distinct: BTreeSet<u32> = ring[base as usize..(base + size) as usize]
                .iter()
                .copied()
                .filter(|v| clean(*v))
                .collect();
            // (Fields widen as backends come, and stay wide.)
            let k = p.bits(id);
            if distinct.len() <= 255 {
                assert!(
                    k != 0 && (1 << k) > distinct.len(),
                    "service {id}: {k} bits"
                );
            }
            for s in 0..size {
                let v = ring[(base + s) as usize];
                let want = (clean(v) && p.bits(id) != 0).then_some(v);
                assert_eq!(p.read(id, base, s), want, "service {id} slot {s} ({v:#x})");
            }
        }
    }

    #[test]
    fn a_table_packs_and_follows_its_slots() {
        let mem = Mem::new(64, 4);
        let mut p = Packer::new(&mem, true);
        // Two services side by side, the second starting inside a word of the first.
        let mut ring = vec![NO_BACKEND; 300];
        let mut tables = BTreeMap::new();
        for s in 0..100u32 {
            ring[s as usize] = 7 + s % 3;
        }
        for s in 0..101u32 {
            ring[100 + s as usize] = 1000 + s % 2;
        }
        tables.insert(0, (0, 100));
        tables.insert(1, (100, 101));
        p.pack(0, 0, 100, |i| ring[i as usize]);
        p.pack(1, 100, 101, |i| ring[100 + i as usize]);
        check(&p, &ring, &tables);
        assert_eq!((p.bits(0), p.bits(1)), (2, 2));
        // A slot changes (marked), one goes back unchanged to another backend, one names a
        // backend new to the service: the field widens (3 → 4 backends: 2 → 4 bits).
        let changes = [(5, ring_value(8, true, Some(9))), (6, 7), (7, 42)];
        for (s, v) in changes {
            ring[s as usize] = v;
        }
        p.update(0, 0, &changes, |i| ring[i as usize]);
        check(&p, &ring, &tables);
        assert_eq!(p.bits(0), 4);
        // The neighbour moved onto the first's range: the first is unpacked.
        p.pack(1, 50, 101, |i| ring[50 + i as usize]);
        assert_eq!(p.bits(0), 0);
        assert_eq!(p.read(0, 0, 0), None);
    }

    #[test]
    fn packing_from_fields_writes_what_packing_from_the_ring_does() {
        // Three tables side by side (sharing words), with empty slots; then each packed again
        // from a narrow table whose indexes differ (a Maglev build's order).
        let ring: Vec<u32> = (0..333u32)
            .map(|i| {
                if i % 17 == 0 {
                    NO_BACKEND
                } else {
                    100 + (i * 7) % 5
                }
            })
            .collect();
        let tables = [(0u32, 0u32, 100u32), (1, 100, 33), (2, 133, 200)];
        let (a, b) = (Mem::new(64, 4), Mem::new(64, 4));
        let (mut pa, mut pb) = (Packer::new(&a, true), Packer::new(&b, true));
        for &(id, base, size) in &tables {
            pa.pack(id, base, size, |i| ring[(base + i) as usize]);
            let t = crate::desired::Table::from_ids(&ring[base as usize..(base + size) as usize]);
            let n = t.narrow().expect("five backends");
            pb.pack_fields(id, base, &n.fields, &n.ids, &n.counts);
        }
        assert_eq!(*a.words.borrow(), *b.words.borrow());
        assert_eq!(*a.ids.borrow(), *b.ids.borrow());
        for &(id, ..) in &tables {
            assert_eq!(pa.svcs[&id].counts, pb.svcs[&id].counts);
        }
        let all = tables
            .iter()
            .map(|&(id, base, size)| (id, (base, size)))
            .collect();
        for &(id, base, size) in &tables {
            let slice = &ring[base as usize..(base + size) as usize];
            let mut ids: Vec<u32> = slice.iter().copied().filter(|v| clean(*v)).collect();
            ids.sort_unstable();
            ids.dedup();
            ids.reverse();
            let fields: Vec<u32> = slice
                .iter()
                .map(|v| ids.iter().position(|b| b == v).map_or(0, |j| j as u32 + 1))
                .collect();
            let t = crate::desired::Table::from_fields(&fields, &ids);
            assert_eq!(t.to_vec(), slice);
            let n = t.narrow().unwrap();
            pb.pack_fields(id, base, &n.fields, &n.ids, &n.counts);
        }
        check(&pb, &ring, &all);
    }

    #[test]
    fn more_than_255_backends_are_not_packed() {
        let mem = Mem::new(1024, 1);
        let mut p = Packer::new(&mem, true);
        let ring: Vec<u32> = (0..1000).map(|s| s % 300).collect();
        p.pack(0, 0, 1000, |i| ring[i as usize]);
        assert_eq!(p.bits(0), 0);
        assert_eq!(p.read(0, 0, 3), None);
    }

    #[test]
    fn a_table_beyond_the_map_is_not_packed() {
        let mem = Mem::new(2, 1); // 128 bits: 16 slots
        let mut p = Packer::new(&mem, true);
        p.pack(0, 10, 7, |_| 3);
        assert_eq!(p.bits(0), 0);
        p.pack(0, 8, 7, |_| 3);
        assert_eq!(p.bits(0), 1);
        assert_eq!(p.read(0, 8, 6), Some(3));
    }

    #[test]
    fn an_adopted_copy_is_packed_again_and_stale_headers_cleared() {
        let mem = Mem::new(64, 4);
        // Another controller's copy: service 1 packed (k = 2), service 2 halfway through a
        // write (count odd), service 3 packed but gone now.
        (&mem).set_id(1, HDR, 5 << 5 | 2, Ordering::Relaxed);
        (&mem).set_id(2, HDR, WRITING | 3 << 5 | 4, Ordering::Relaxed);
        (&mem).set_id(3, HDR, 1 << 5 | 2, Ordering::Relaxed);
        let mut p = Packer::new(&mem, true);
        let ring = vec![9u32; 64];
        p.pack(1, 0, 64, |i| ring[i as usize]);
        p.pack(2, 64, 64, |i| ring[i as usize]);
        p.unpack_others(&BTreeSet::from([1, 2]));
        for id in [1, 2] {
            let h = (&mem).id(id, HDR);
            assert_eq!((h & WRITING, h & BITS_MASK), (0, 1), "service {id}: {h:#x}");
            assert_eq!(p.read(id, 64 * (id - 1), 5), Some(9));
        }
        assert_eq!((&mem).id(3, HDR) & (BITS_MASK | WRITING), 0);
        assert_eq!((&mem).id(0, HDR), 0, "never packed: untouched");
    }

    proptest! {
        /// Random slot writes (unchanged, changed, empty; backends from a pool that may
        /// outgrow the field) on services side by side: the packed copy always reads as
        /// `LB_RING`, and the neighbours' fields are never touched.
        #[test]
        fn the_packed_copy_reads_as_the_ring(
            sizes in prop::collection::vec(1u32..200, 1..4),
            pool in 1u32..40,
            writes in prop::collection::vec(
                (0usize..4, 0u32..200, 0u32..64, 0u8..4), 0..300),
            init in prop::collection::vec(0u32..64, 200),
            by_fields in any::<bool>(),
        ) {
            let total: u32 = sizes.iter().sum();
            let mem = Mem::new((total as usize).div_ceil(8) + 1, 4);
            let mut p = Packer::new(&mem, true);
            let mut ring = vec![NO_BACKEND; total as usize];
            let mut tables = BTreeMap::new();
            let mut base = 0;
            for (id, &size) in sizes.iter().enumerate() {
                for s in 0..size {
                    ring[(base + s) as usize] = init[s as usize] % pool;
                }
                tables.insert(id as u32, (base, size));
                // The loader's way for a narrow table written whole (from its fields), or
                // from the ring.
                let t = crate::desired::Table::from_ids(&ring[base as usize..(base + size) as usize]);
                match t.narrow().filter(|_| by_fields) {
                    Some(n) => p.pack_fields(id as u32, base, &n.fields, &n.ids, &n.counts),
                    None => p.pack(id as u32, base, size, |i| ring[(base + i) as usize]),
                }
                base += size;
            }
            check(&p, &ring, &tables);
            for (svc, slot, b, kind) in writes {
                let Some(&(base, size)) = tables.get(&((svc % sizes.len()) as u32)) else {
                    continue;
                };
                let slot = slot % size;
                let b = b % (pool + 3);
                let v = match kind {
                    0 | 1 => b,
                    2 => ring_value(b, true, None),
                    _ => NO_BACKEND,
                };
                ring[(base + slot) as usize] = v;
                p.update_index(base + slot, v, |i| ring[i as usize]);
                check(&p, &ring, &tables);
            }
        }
    }
}
