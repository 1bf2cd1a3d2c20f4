//! Names of the program, its maps and its load-time globals. Both sides use these constants;
//! the kernel cuts map names at 15 bytes, so every name here is at most 15 bytes long.

/// The XDP program.
pub const PROGRAM: &str = "lb_xdp";

/// Services: [`crate::ServiceKey`] → [`crate::ServiceValue`] (hash).
pub const SERVICES: &str = "LB_SERVICES";
/// Addresses that are a VIP of at least one service: [`crate::VipKey`] → [`crate::VipValue`]
/// (hash). Only consulted on rare paths (fragments, truncated L4).
pub const VIPS: &str = "LB_VIPS";
/// Maglev lookup tables, one flat array: `service_id * ring_size + slot` → backend id.
pub const RING: &str = "LB_RING";
/// Backends by global backend id: `u32` → [`crate::Backend`] (array).
pub const BACKENDS: &str = "LB_BACKENDS";
/// Connection table: [`crate::FlowKey`] → [`crate::FlowValue`] (LRU hash, shared by all CPUs).
pub const FLOWS: &str = "LB_FLOWS";
/// Egress interfaces for backends behind another interface (devmap, XDP_REDIRECT).
pub const TX_PORTS: &str = "LB_TX_PORTS";
/// Active connections per backend id, one counter shared by all CPUs (`u64`, wrapping, atomic
/// adds): +1 for a counted new flow, −1 (wrapping add of `u64::MAX`) when its client sends
/// FIN/RST or it moves to another backend.
pub const BACKEND_CONNS: &str = "LB_BE_CONNS";
/// Counted flows the controller expired (idle) per backend id (`u64`, written by the
/// controller only). Active connections = `LB_BE_CONNS` − `LB_BE_EXPIRED`.
pub const BACKEND_EXPIRED: &str = "LB_BE_EXPIRED";
/// Round-robin cursor per service id, shared by all CPUs (`u64`, atomic fetch-and-add): rr/wrr
/// walk their sequence with it.
pub const RR_CURSOR: &str = "LB_RR_CURSOR";
/// Global counters by [`crate::stats::Stat`] index (per-CPU array of `u64`).
pub const STATS: &str = "LB_STATS";
/// The commonest packets' global counters, two [`STATS`] counters in one slot
/// ([`crate::stats::FastStat`], per-CPU array of `u64`). Pinned when present, made (and pinned)
/// when missing, like [`RECORD`]: a pin directory of an earlier release lacks it (its program
/// counted those packets in [`STATS`] alone).
pub const STATS_FAST: &str = "LB_STATS_FAST";
/// Per-service counters by service id (per-CPU array of [`crate::Counters`]).
pub const SERVICE_STATS: &str = "LB_SVC_STATS";
/// Per-backend counters by backend id (per-CPU array of [`crate::Counters`]).
pub const BACKEND_STATS: &str = "LB_BE_STATS";

/// Data-plane flags, one `u32` at index 0 (array): `FLAG_*` in [`crate::types`].
pub const FLAGS: &str = "LB_FLAGS";

/// Layout version and sizes of the pinned maps (array of `u64`, `META_*` indexes); controller
/// only.
pub const META: &str = "LB_META";
/// Backend id → [`crate::BackendMeta`] (array); controller only, for adoption after a restart.
pub const BACKEND_META: &str = "LB_BE_META";

/// VIP filter: `hash::vip_slot(address)` → 1 when some VIP has that slot (array of `u8`). A
/// destination whose slot is 0 is no VIP: passed after one array read.
pub const VIP_FILTER: &str = "LB_VIP_FILTER";
/// IPv4 service cache: `hash::svc_cache_slot(key)` → [`crate::svc_cache`] entry (array of
/// `[u32; 16]`, memory-mapped by the controller): a v4 service found with one array read, its
/// hash-map lookup skipped.
pub const SVC_CACHE: &str = "LB_SVC_CACHE";
/// Fragmented datagrams in flight: [`crate::FragKey`] → [`crate::FragValue`] (LRU hash): every
/// fragment of a datagram goes where the first one to arrive went.
pub const FRAGS: &str = "LB_FRAGS";
/// `lb trace`'s settings: one [`crate::TraceConfig`] (array of one).
pub const TRACE_CFG: &str = "LB_TRACE_CFG";
/// The object's name for [`TRACE_CFG`]'s map: the program holds the setting as a global
/// ([`GLOBAL_TRACE_SETTING`]) in this data section of its own, read without a map lookup; the
/// controller pins the section's map as [`TRACE_CFG`].
pub const TRACE_CFG_SECTION: &str = ".data.lb_trace";
/// `lb trace`'s events: [`crate::TraceEvent`]s (ring buffer).
pub const TRACE: &str = "LB_TRACE";
/// `lb trace`'s rate limit and loss counts: [`crate::TraceRate`] (per-CPU array of one).
pub const TRACE_RATE: &str = "LB_TRACE_RATE";

/// Flow sharing: new connection-table entries ([`crate::SyncEvent`], ring buffer).
pub const SYNC: &str = "LB_SYNC";
/// Flow sharing settings: [`crate::SyncConfig`] (array of one).
pub const SYNC_CFG: &str = "LB_SYNC_CFG";
/// Flow sharing's per-CPU rate limit and loss counts: [`crate::TraceRate`] (per-CPU array of one).
pub const SYNC_RATE: &str = "LB_SYNC_RATE";

/// The connection-table record limit's per-CPU state ([`crate::RecordRate`], per-CPU array of
/// one). Not pinned (not in [`ALL_MAPS`]): each loaded program has its own, which the
/// controller that loaded it sets up.
pub const RECORD_RATE: &str = "LB_RECORD_RATE";

/// The packed copy of the maglev/sh tables' unchanged slots (`u64` words in chunks of
/// [`crate::packed::CHUNK`], memory-mapped; see [`crate::packed`]). Pinned, but not in
/// [`ALL_MAPS`] ([`PACKED_MAPS`]): a pin directory of an earlier release lacks it, and gets it
/// at the takeover.
pub const RING_PACKED: &str = "LB_RING_PACKED";
/// The packed tables' headers and index → backend id lists, by service id (`[u16; 256]`,
/// memory-mapped; see [`crate::packed`]). Pinned like [`RING_PACKED`].
pub const RING_IDS: &str = "LB_RING_IDS";
/// Maps pinned when present, made (and pinned) when missing: a controller packs them from
/// `LB_RING` when it loads its program, so they are no layout state to check.
pub const PACKED_MAPS: [&str; 2] = [RING_PACKED, RING_IDS];

/// Connection-table records handed to the controller ([`crate::RecordEvent`], ring buffer of
/// [`crate::limits::RECORD_RING_BYTES`]; `dataplane.defer_records`). Pinned when present, made
/// (and pinned) when missing, like [`PACKED_MAPS`]: what a program wrote before a restart is
/// drained by the next controller.
pub const RECORD: &str = "LB_RECORD";

/// The records `lb_record_apply` applies in one run ([`crate::RecordEvent`]s, array of
/// [`crate::limits::RECORD_APPLY_BATCH`]). Not pinned: each loaded program has its own.
pub const RECORD_IN: &str = "LB_RECORD_IN";
/// The program the controller runs (`BPF_PROG_TEST_RUN`, never attached) to apply records.
pub const RECORD_APPLY: &str = "lb_record_apply";

/// File name of the pinned XDP link inside the pin directory.
pub const LINK_PIN: &str = "link";

/// Load-time global (`[u8; 6]`): the MAC of the interface lb_xdp is attached to (all zeros: no
/// check of the destination MAC).
pub const GLOBAL_IF_MAC: &str = "LB_IF_MAC";
/// The global in [`TRACE_CFG_SECTION`] (a [`crate::TraceConfig`]): its value at load is the
/// pinned setting's, so replacing the program keeps a running trace.
pub const GLOBAL_TRACE_SETTING: &str = "LB_TRACE_SETTING";

/// Every map name, for tests and diagnostics.
pub const ALL_MAPS: [&str; 24] = [
    META,
    BACKEND_META,
    FLAGS,
    RR_CURSOR,
    BACKEND_CONNS,
    BACKEND_EXPIRED,
    SERVICES,
    VIPS,
    RING,
    BACKENDS,
    FLOWS,
    TX_PORTS,
    STATS,
    SERVICE_STATS,
    BACKEND_STATS,
    TRACE_CFG,
    TRACE,
    TRACE_RATE,
    FRAGS,
    VIP_FILTER,
    SVC_CACHE,
    SYNC,
    SYNC_CFG,
    SYNC_RATE,
];

const _: () = {
    let mut i = 0;
    while i < ALL_MAPS.len() {
        assert!(
            ALL_MAPS[i].len() <= 15,
            "kernel map names are at most 15 bytes"
        );
        i += 1;
    }
};
