//! The packed tables (`LB_RING_PACKED`, `LB_RING_IDS`): a compact copy of the unchanged slots
//! of maglev/sh tables, so that the established path's random slot reads touch a few KiB
//! instead of a 256 KiB table (with 10^6 flows every packet reads another slot; the table's
//! cache lines are what the path then waits for).
//!
//! A service's slot `s` is a field of `k` bits (`k` ∈ {1, 2, 4, 8}) at bit
//! [`bit_of`]`(ring_base, s, k)` of `LB_RING_PACKED` (u64 words, little-endian bit order): the
//! table's `LB_RING` range `[ring_base, ring_base + ring_size)` maps to bits
//! `[8·ring_base, 8·(ring_base + ring_size))`, of which the service uses the first
//! `k·ring_size`, so services' fields never overlap and a field never straddles two words.
//! A field holds an index `v`: 0 means "read `LB_RING`" (a changed slot, an empty one, a backend
//! without an index), `v` ≥ 1 the backend id `LB_RING_IDS[service id][v]` (u16), which is then
//! exactly the slot's `LB_RING` value (an unchanged slot's value is its backend id).
//!
//! `LB_RING_IDS[service id][0]` ([`HDR`]) is a header: `k` in bits 0..4 (0: the service is not
//! packed) and a sequence count above it; the controller makes the count odd ([`WRITING`])
//! while it rewrites the service's fields or ids, so a reader that saw an even count, read a
//! field and an id, and sees the same header again, read a consistent pair; anything else
//! reads `LB_RING`, which stays the authority. Both maps are pinned beside the others but are
//! no layout state: made zero (nothing packed) when missing, and packed again whole from
//! `LB_RING` by every controller that loads its program.

/// u64 words per `LB_RING_PACKED` value (64 bytes).
pub const CHUNK: u32 = 8;
/// u16 entries per `LB_RING_IDS` value: the header and the ids of indexes 1..=255.
pub const IDS: usize = 256;
/// Index of the header in an `LB_RING_IDS` value.
pub const HDR: usize = 0;
/// Header bits holding `k`.
pub const BITS_MASK: u16 = 0xf;
/// The header's sequence count steps by this; set while the controller writes.
pub const WRITING: u16 = 1 << 4;

/// The bit of slot `slot` of a table at `ring_base` with `k`-bit fields (below 2^32 for every
/// table inside `MAX_RING_CAPACITY` slots).
#[inline(always)]
pub const fn bit_of(ring_base: u32, slot: u32, k: u32) -> u32 {
    ring_base.wrapping_mul(8).wrapping_add(slot.wrapping_mul(k))
}

/// `LB_RING_PACKED` values for a `LB_RING` of `ring_capacity` slots (a byte a slot).
pub const fn chunks_for(ring_capacity: u32) -> u32 {
    let c = ring_capacity.div_ceil(8 * CHUNK);
    if c == 0 { 1 } else { c }
}

/// The field width for `n` distinct backends (indexes 1..=n): 0 when more than 255.
pub const fn bits_for(n: usize) -> u32 {
    match n {
        0..=1 => 1,
        2..=3 => 2,
        4..=15 => 4,
        16..=255 => 8,
        _ => 0,
    }
}
