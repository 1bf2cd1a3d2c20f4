//! The maps. Sizes given here are defaults; the controller sets the real ones at load time.

use core::cell::UnsafeCell;

use aya_ebpf::{
    Global,
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMap, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    Backend, BackendMeta, BenchGen, Counters, FlowKey, FlowValue, FragKey, FragValue, META_LEN,
    RecordRate, ServiceKey, ServiceValue, SyncConfig, TraceConfig, TraceRate, VipKey, VipValue,
    limits::{
        DEFAULT_FLOW_TABLE_SIZE, DEFAULT_RING_CAPACITY, FRAG_TABLE_SIZE, MAX_BACKENDS,
        MAX_SERVICES, MAX_TX_PORTS, RING_CHUNK, SVC_CACHE_SLOTS, VIP_FILTER_SLOTS,
    },
    packed,
    stats::{FAST_STATS_LEN, STATS_LEN},
    svc_cache,
};

/// This interface's MAC, set at load: a unicast frame to another MAC (a bridge flooding it to a
/// veth, promiscuous mode) is not ours to forward. Its six bytes in the low bytes of a
/// little-endian u64 (one load, one compare); zero: no check.
#[unsafe(no_mangle)]
pub static LB_IF_MAC: Global<u64> = Global::new(0);

/// Layout version and sizes of the pinned maps (controller only; never read here).
#[map]
pub static LB_META: Array<u64> = Array::with_max_entries(META_LEN, 0);

/// Backend id → what it stands for (controller only; never read here).
#[map]
pub static LB_BE_META: Array<BackendMeta> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Data-plane flags (`FLAG_*`), index 0.
#[map]
pub static LB_FLAGS: Array<u32> = Array::with_max_entries(1, 0);

/// (VIP, port, protocol) → service.
#[map]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(MAX_SERVICES, 0);

/// Service cache (see `lb_common::svc_cache`): filled by the controller through its
/// memory mapping; read here as a seqlock reader.
#[map]
pub static LB_SVC_CACHE: Array<[u32; svc_cache::WORDS]> =
    Array::with_max_entries(SVC_CACHE_SLOTS, BPF_F_MMAPABLE);

/// VIP addresses (any port/protocol), for fragment and malformed-L4 decisions.
#[map]
pub static LB_VIPS: HashMap<VipKey, VipValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// `vip_slot(address)` → 1 when some VIP hashes there (see lb_common::names::VIP_FILTER).
#[map]
pub static LB_VIP_FILTER: Array<u8> = Array::with_max_entries(VIP_FILTER_SLOTS, 0);

/// Fragmented datagrams in flight → the backend their fragments go to.
#[map]
pub static LB_FRAGS: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(FRAG_TABLE_SIZE, 0);

/// The tables of all services, flat: `ring_base + slot` → backend id (`ServiceValue` says
/// where each service's table lies), in chunks of `RING_CHUNK` slots. Memory-mapped by the
/// controller, which writes whole tables as plain stores; `dataplane.ring_capacity` slots
/// (rounded up to whole chunks), set at load time.
#[map]
pub static LB_RING: Array<[u32; RING_CHUNK as usize]> =
    Array::with_max_entries(DEFAULT_RING_CAPACITY / RING_CHUNK, BPF_F_MMAPABLE);

/// `LB_RING[i]`: slot `i` of the flat table array.
#[inline(always)]
pub fn ring_get(i: u32) -> Option<u32> {
    let chunk = LB_RING.get(i / RING_CHUNK)?;
    Some(chunk[(i % RING_CHUNK) as usize])
}

/// The packed copy of the maglev/sh tables' unchanged slots (see `lb_common::packed`), a byte
/// per `LB_RING` slot, set at load time.
#[map]
pub static LB_RING_PACKED: Array<[u64; packed::CHUNK as usize]> =
    Array::with_max_entries(DEFAULT_RING_CAPACITY / (8 * packed::CHUNK), BPF_F_MMAPABLE);

/// The packed tables' headers and index → backend id lists, by service id.
#[map]
pub static LB_RING_IDS: Array<[u16; packed::IDS]> =
    Array::with_max_entries(MAX_SERVICES, BPF_F_MMAPABLE);

/// Slot `slot` of the table of service `svc_id` (at `ring_base`) from the packed copy: the
/// backend id of an unchanged slot (its `LB_RING` value), or `None`: read `LB_RING` (a changed
/// or empty slot, a service not packed, its fields being rewritten).
#[inline(always)]
pub fn packed_get(svc_id: u32, ring_base: u32, slot: u32) -> Option<u32> {
    let ids = LB_RING_IDS.get_ptr(svc_id)? as *const u16;
    // SAFETY: `ids` points to a map value of `IDS` u16 entries, valid while the program runs;
    // every index below is masked into it. The controller may write concurrently: the
    // header's sequence count, read before and after, detects it (loads stay in program
    // order: volatile, and x86-64 keeps loads ordered).
    let h = unsafe { core::ptr::read_volatile(ids.add(packed::HDR)) };
    let k = (h & packed::BITS_MASK) as u32;
    if k == 0 || h & packed::WRITING != 0 {
        return None;
    }
    let bit = packed::bit_of(ring_base, slot, k);
    let word = bit >> 6;
    let chunk = LB_RING_PACKED.get_ptr(word / packed::CHUNK)? as *const u64;
    // SAFETY: a map value of `CHUNK` u64 words; `word % CHUNK` is inside it.
    let w = unsafe { core::ptr::read_volatile(chunk.add((word % packed::CHUNK) as usize)) };
    let v = (w >> (bit & 63)) as u32 & ((1u32 << k) - 1);
    if v == 0 {
        return None;
    }
    // SAFETY: as above; `v & 0xff` < IDS.
    let (id, again) = unsafe {
        (
            core::ptr::read_volatile(ids.add((v & 0xff) as usize)),
            core::ptr::read_volatile(ids.add(packed::HDR)),
        )
    };
    (again == h).then_some(id as u32)
}

/// Backend id → backend.
#[map]
pub static LB_BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Connection table: one LRU hash shared by all CPUs (a flow keeps its backend even when the
/// NIC's RSS or generic mode moves it to another CPU; see README "Connection table").
#[map]
pub static LB_FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Active connections per backend, one counter shared by all CPUs: +1 on a counted new flow,
/// −1 (wrapping add of `u64::MAX`) on the client's FIN/RST or a move, atomically.
#[map]
pub static LB_BE_CONNS: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Counted flows the controller expired, per backend (controller writes only; active =
/// `LB_BE_CONNS − LB_BE_EXPIRED`).
#[map]
pub static LB_BE_EXPIRED: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Round-robin cursor per service, shared by all CPUs (atomic fetch-and-add).
#[map]
pub static LB_RR_CURSOR: Array<u64> = Array::with_max_entries(MAX_SERVICES, 0);

/// Egress interfaces for backends behind another interface.
#[map]
pub static LB_TX_PORTS: DevMap = DevMap::with_max_entries(MAX_TX_PORTS, 0);

/// Global counters (per CPU).
#[map]
pub static LB_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

/// The single pass's two-in-one global counters (per CPU, by `FastStat`). Pinned (made when
/// missing).
#[map]
pub static LB_STATS_FAST: PerCpuArray<u64> = PerCpuArray::with_max_entries(FAST_STATS_LEN, 0);

/// Per-service counters (per CPU).
#[map]
pub static LB_SVC_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Per-backend counters (per CPU).
#[map]
pub static LB_BE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// `lb trace`'s settings; `until_ns == 0`: off. A global in a data section of its own
/// (`names::TRACE_CFG_SECTION`): the kernel gives an array map of one entry a fixed address, so
/// the program reads it with one load, no map lookup. That map is an array of one
/// `TraceConfig`, as `LB_TRACE_CFG` always was, and the controller pins it under that name (an
/// earlier version's pinned `LB_TRACE_CFG` is reused as it is, and the other way round).
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.lb_trace")]
pub static LB_TRACE_SETTING: TraceCell = TraceCell(UnsafeCell::new(TraceConfig {
    until_ns: 0,
    vip: [0; 16],
    client: [0; 16],
    backend_mac: [0; 6],
    _pad: [0; 2],
    filters: 0,
    rate: 0,
}));

/// [`LB_TRACE_SETTING`]'s cell: written from userspace only (through the map), read here.
#[repr(transparent)]
pub struct TraceCell(UnsafeCell<TraceConfig>);

// SAFETY: the program never writes the cell; userspace writes whole values through the map
// (a reader may see an update half done, as with any array map value: `until_ns` is one
// aligned load, and the rest only filters what a running trace records).
unsafe impl Sync for TraceCell {}

impl TraceCell {
    /// `until_ns`, read anew each time (volatile: userspace changes it at any moment).
    #[inline(always)]
    pub fn until_ns(&self) -> u64 {
        // SAFETY: an aligned field of a live static.
        unsafe { core::ptr::read_volatile(&raw const (*self.0.get()).until_ns) }
    }

    /// The whole setting (a trace is running).
    #[inline(always)]
    pub fn get(&self) -> &TraceConfig {
        // SAFETY: a live static; the program never writes it (see `Sync` above).
        unsafe { &*self.0.get() }
    }
}

/// `lb trace`'s events (`TraceEvent`s).
#[map]
pub static LB_TRACE: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// `lb trace`'s rate limit and loss counts, per CPU.
#[map]
pub static LB_TRACE_RATE: PerCpuArray<TraceRate> = PerCpuArray::with_max_entries(1, 0);

/// Flow sharing settings (index 0); `rate == 0`: off.
#[map]
pub static LB_SYNC_CFG: Array<SyncConfig> = Array::with_max_entries(1, 0);

/// Flow sharing: new connection-table entries (`SyncEvent`s) for the controller.
#[map]
pub static LB_SYNC: RingBuf = RingBuf::with_byte_size(1 << 18, 0);

/// Flow sharing's rate limit, per CPU.
#[map]
pub static LB_SYNC_RATE: PerCpuArray<TraceRate> = PerCpuArray::with_max_entries(1, 0);

/// The record limit's state and setting, per CPU (`RecordRate`). Not pinned: each loaded
/// program has its own, written by the controller that loaded it (`limit` 0 until then).
#[map]
pub static LB_RECORD_RATE: PerCpuArray<RecordRate> = PerCpuArray::with_max_entries(1, 0);

/// Connection-table records for the controller (`RecordEvent`s; `dataplane.defer_records`).
/// Pinned (made when missing): the next controller drains what this one did not.
#[map]
pub static LB_RECORD: RingBuf = RingBuf::with_byte_size(lb_common::limits::RECORD_RING_BYTES, 0);

/// The records `lb_record_apply` applies in one run, written by the controller. Not pinned.
#[map]
pub static LB_RECORD_IN: Array<lb_common::RecordEvent> =
    Array::with_max_entries(lb_common::limits::RECORD_APPLY_BATCH, 0);

/// Bench only: the live-frames generator's settings (index 0).
#[map]
pub static LB_BENCH_GEN: Array<BenchGen> = Array::with_max_entries(1, 0);

/// Bench only: the generator's per-CPU sequence.
#[map]
pub static LB_BENCH_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Bench only: frames the sink saw, by the last byte of their destination MAC.
#[map]
pub static LB_BENCH_SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(256, 0);
