//! Compile-time maxima. Map sizes are set by the controller at load time (`max_entries`), up to
//! these limits; the eBPF object declares them with these defaults.

/// Maximum number of services (service ids are `0..MAX_SERVICES`).
pub const MAX_SERVICES: u32 = 4096;
/// Maximum number of backends over all services (backend ids are `0..MAX_BACKENDS`).
pub const MAX_BACKENDS: u32 = 16384;
/// Default number of slots per Maglev table (a prime, as the Maglev paper requires).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Largest accepted ring size (per service).
pub const MAX_RING_SIZE: u32 = 1_048_573;
/// Default slots of `LB_RING`, all services' tables together (`dataplane.ring_capacity`):
/// 64 tables of the default size, 16 MiB.
pub const DEFAULT_RING_CAPACITY: u32 = 64 * DEFAULT_RING_SIZE;
/// `LB_RING`'s values are chunks of this many slots (64 bytes): an array map stores each
/// value in a multiple of 8 bytes, so `u32` values would not lie side by side in the
/// controller's mapping (and would take twice the cache).
pub const RING_CHUNK: u32 = 16;
/// Largest accepted `dataplane.ring_capacity` (1 GiB of tables).
pub const MAX_RING_CAPACITY: u32 = 1 << 28;
/// Default size of the connection table.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;
/// Default `dataplane.record_limit` (SYNs recorded a second per CPU through unchanged maglev/sh
/// table slots; a SYN flood beyond it is forwarded by the slots without filling the table): 0,
/// no limit. With a limit, "at_syn" services keep previous backends on table changes as
/// "on_change" ones do, so drains also wait `timeouts.tcp` for connections it kept unrecorded.
pub const DEFAULT_RECORD_LIMIT: u32 = 0;
/// Number of egress interfaces usable for XDP_REDIRECT.
/// Bytes of the `LB_RECORD` ring buffer (`dataplane.defer_records`): 65 535 records of 56 bytes
/// and their 8-byte headers, about 0.1–0.5 s of a busy node's new connections for the
/// controller to fall behind by before SYNs are recorded on the packet path again.
pub const RECORD_RING_BYTES: u32 = 1 << 22;
/// Records the controller hands `lb_record_apply` per run (`LB_RECORD_IN`'s entries).
pub const RECORD_APPLY_BATCH: u32 = 4096;
/// `dataplane.defer_records` by default: SYNs recorded by the controller.
pub const DEFAULT_DEFER_RECORDS: bool = true;
pub const MAX_TX_PORTS: u32 = 64;
/// IPv6 extension headers walked before giving up on finding TCP/UDP.
pub const MAX_IPV6_EXT_HEADERS: usize = 4;
/// Fragmented datagrams tracked at once (`LB_FRAGS`, LRU: the oldest are forgotten).
pub const FRAG_TABLE_SIZE: u32 = 16384;
/// The VIP filter has 2^VIP_FILTER_BITS one-byte slots (an array map keeps each 8 bytes apart:
/// 512 KiB).
pub const VIP_FILTER_BITS: u32 = 16;
/// Slots of the VIP filter (`LB_VIP_FILTER`).
pub const VIP_FILTER_SLOTS: u32 = 1 << VIP_FILTER_BITS;
/// The IPv4 service cache (`LB_SVC_CACHE`) has 2^SVC_CACHE_BITS slots of 64 bytes (512 KiB).
pub const SVC_CACHE_BITS: u32 = 13;
/// Slots of the service cache.
pub const SVC_CACHE_SLOTS: u32 = 1 << SVC_CACHE_BITS;
