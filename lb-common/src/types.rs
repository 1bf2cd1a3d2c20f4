//! Map keys and values. See the crate docs for the layout rules.

use core::mem::size_of;

/// `FlowKey::family`/`ServiceKey::family`/`VipKey::family` for IPv4.
pub const FAMILY_V4: u8 = 4;
/// `...::family` for IPv6.
pub const FAMILY_V6: u8 = 6;
/// IP protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// A connection's 5-tuple, as seen from the client (client → VIP). 8-byte aligned (size 40, no
/// padding) so the program zeroes and compares it in words.
///
/// IPv4 addresses occupy the first 4 bytes of the 16-byte fields; the rest is zero.
/// Addresses and ports are in network order (copied from the packet).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// Network order.
    pub src_port: [u8; 2],
    /// Network order.
    pub dst_port: [u8; 2],
    pub protocol: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The key as five little-endian 64-bit words (the input of [`crate::hash::flow_hash`]):
    /// source address (2), destination address (2), and source port, destination port (as on
    /// the wire), protocol, family in the fifth. Read as whole words: the data plane writes the
    /// key as whole words too ([`FlowKey::from_words`]), so reading it back never waits for a
    /// partial store (a load spanning several smaller stores stalls the CPU).
    #[inline(always)]
    pub fn words(&self) -> [u64; 5] {
        bytemuck::cast::<FlowKey, [u64; 5]>(*self).map(u64::from_le)
    }

    /// The key of five little-endian words (see [`FlowKey::words`]).
    #[inline(always)]
    pub fn from_words(w: [u64; 5]) -> FlowKey {
        bytemuck::cast(w.map(u64::to_le))
    }

    /// An IPv4 key: addresses as on the wire, ports zero (see [`FlowKey::set_ports`]).
    #[inline(always)]
    pub fn v4(src: [u8; 4], dst: [u8; 4], protocol: u8) -> FlowKey {
        FlowKey::from_words([
            u32::from_le_bytes(src) as u64,
            0,
            u32::from_le_bytes(dst) as u64,
            0,
            Self::tail(0, protocol, FAMILY_V4),
        ])
    }

    /// An IPv6 key: addresses as on the wire, ports zero.
    #[inline(always)]
    pub fn v6(src: &[u8; 16], dst: &[u8; 16], protocol: u8) -> FlowKey {
        let w = |a: &[u8; 16], i: usize| {
            u64::from_le_bytes([
                a[i],
                a[i + 1],
                a[i + 2],
                a[i + 3],
                a[i + 4],
                a[i + 5],
                a[i + 6],
                a[i + 7],
            ])
        };
        FlowKey::from_words([
            w(src, 0),
            w(src, 8),
            w(dst, 0),
            w(dst, 8),
            Self::tail(0, protocol, FAMILY_V6),
        ])
    }

    /// The fifth word: `ports` (source then destination port, as on the wire: the first four
    /// bytes of a TCP or UDP header, read little-endian), protocol, family.
    #[inline(always)]
    const fn tail(ports: u32, protocol: u8, family: u8) -> u64 {
        ports as u64 | (protocol as u64) << 32 | (family as u64) << 40
    }

    /// Sets both ports: `ports` are the first four bytes of the TCP or UDP header (source
    /// port, destination port).
    #[inline(always)]
    pub fn set_ports(&mut self, ports: [u8; 4]) {
        let mut w = self.words();
        w[4] = (w[4] & !0xffff_ffff) | u32::from_le_bytes(ports) as u64;
        *self = FlowKey::from_words(w);
    }

    /// Sets the protocol.
    #[inline(always)]
    pub fn set_protocol(&mut self, protocol: u8) {
        let mut w = self.words();
        w[4] = (w[4] & !(0xff << 32)) | (protocol as u64) << 32;
        *self = FlowKey::from_words(w);
    }
}

/// A service: VIP, port (0 = every port) and protocol.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// IPv4 in the first 4 bytes, rest zero.
    pub vip: [u8; 16],
    /// Network order; `[0, 0]` matches every port of the VIP and protocol.
    pub port: [u8; 2],
    pub protocol: u8,
    pub family: u8,
}

impl ServiceKey {
    /// The service key of a flow: its destination address, destination port, protocol and
    /// family, built from the key's words (no byte-wise copy).
    #[inline(always)]
    pub fn of(key: &FlowKey) -> ServiceKey {
        let w = key.words();
        bytemuck::cast::<[u32; 5], ServiceKey>(
            [
                w[2] as u32,
                (w[2] >> 32) as u32,
                w[3] as u32,
                (w[3] >> 32) as u32,
                (w[4] >> 16) as u32,
            ]
            .map(u32::to_le),
        )
    }

    /// The service-cache key of this service key: see [`crate::svc_cache`].
    pub fn cache_key(&self) -> crate::svc_cache::CacheKey {
        let w = bytemuck::cast::<ServiceKey, [u32; 5]>(*self).map(u32::from_le);
        crate::svc_cache::CacheKey([w[0], w[4], w[1], w[2], w[3]])
    }

    /// The same key with port 0 (the VIP's all-ports service).
    #[inline(always)]
    pub fn any_port(self) -> ServiceKey {
        let mut w = bytemuck::cast::<ServiceKey, [u32; 5]>(self);
        w[4] &= u32::to_le(0xffff_0000);
        bytemuck::cast(w)
    }
}

impl VipKey {
    /// The VIP key of a flow's destination, from the key's words.
    #[inline(always)]
    pub fn of(key: &FlowKey) -> VipKey {
        let w = key.words();
        bytemuck::cast::<[u32; 5], VipKey>(
            [
                w[2] as u32,
                (w[2] >> 32) as u32,
                w[3] as u32,
                (w[3] >> 32) as u32,
                (w[4] >> 40) as u32 & 0xff,
            ]
            .map(u32::to_le),
        )
    }
}

/// Scheduler of a service ([`ServiceValue::scheduler`]): weighted Maglev on the 5-tuple hash.
pub const SCHED_MAGLEV: u32 = 0;
/// Source hashing: the same weighted Maglev table, on a hash of the source address only.
pub const SCHED_SH: u32 = 1;
/// (Weighted) round robin: the table's first `ring_len` slots hold a smooth weighted sequence
/// that one cursor per service, shared by all CPUs, walks.
pub const SCHED_WRR: u32 = 2;
/// Least connections: the table's first `ring_len` slots list the backends taking new flows.
pub const SCHED_LC: u32 = 3;
/// Weighted least connections (`conns_i·w_j < conns_j·w_i`), same table shape as LC.
pub const SCHED_WLC: u32 = 4;
/// [`ServiceValue::flags`] of a maglev/sh TCP service with `record_connections = "on_change"`:
/// its connections are recorded only once their table slot changed, as UDP flows are. A SYN
/// through an unchanged slot is forwarded by the slot alone (`flow_stateless`, and a new flow of
/// the service and backend), without a table insert; a FIN or RST looks its entry up and closes
/// it, and inserts nothing when there is none; a changed slot keeps its previous backend for
/// `timeouts.tcp` ([`RING_PREV`]).
pub const SVC_F_TCP_ON_CHANGE: u32 = 1;

/// What the data plane knows of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Service id: index of the per-service counters and the round-robin cursor.
    pub id: u32,
    /// `SCHED_*`.
    pub scheduler: u32,
    /// `SVC_F_*` (0 before layout 5's `SVC_F_TCP_ON_CHANGE`; a data plane that knows no flag
    /// ignores it).
    pub flags: u32,
    /// rr/wrr: length of the sequence; lc/wlc: number of backends listed; else 0.
    pub ring_len: u32,
    /// Where the service's table starts in `LB_RING` (the controller allocates the ranges).
    pub ring_base: u32,
    /// Slots of the service's table (a prime for maglev/sh; per service since layout 3).
    pub ring_size: u32,
}

/// Key of the VIP set: any address that is the VIP of some service.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Value of the VIP set: how many services the VIP has, and which service takes a fragment
/// whose datagram's first fragment was not seen (it has no ports): per protocol, the VIP's
/// all-ports service, else its only service of that protocol; `id == NO_SERVICE`: none
/// (such fragments are dropped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipValue {
    pub services: u32,
    pub _pad: u32,
    pub frag_tcp: ServiceValue,
    pub frag_udp: ServiceValue,
}

/// [`ServiceValue::id`] meaning "no service".
pub const NO_SERVICE: u32 = u32::MAX;

impl Default for VipValue {
    fn default() -> Self {
        let none = ServiceValue {
            id: NO_SERVICE,
            ..ServiceValue::default()
        };
        VipValue {
            services: 0,
            _pad: 0,
            frag_tcp: none,
            frag_udp: none,
        }
    }
}

/// Key of the fragment table (`LB_FRAGS`): one datagram being fragmented.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// IPv4 identification (16 bits) or IPv6 fragment identification.
    pub id: u32,
    pub protocol: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Where a fragmented datagram's fragments go: the backend the first fragment to arrive chose.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub backend: u32,
    /// [`Backend::generation`] when recorded.
    pub generation: u32,
}

/// `LB_FLAGS[0]`: at least one service matches every port (port 0), so a miss on the exact
/// (VIP, port, protocol) key needs a second lookup. Without it, non-VIP traffic costs one lookup.
pub const FLAG_ALL_PORTS_SERVICES: u32 = 1;

/// Ring slot value meaning "no backend" (empty service, or every weight 0).
pub const NO_BACKEND: u32 = u32::MAX;

/// `LB_RING` entries of maglev and sh services: set on a slot whose backend changed while
/// flows of the old one may still live. Established TCP and UDP packets of a slot without it
/// skip the connection table (the slot's backend is the one every flow of the slot has had);
/// with it they look their flow up. The controller clears it once no entry of the slot names
/// another backend. Backend ids stay below it ([`crate::limits::MAX_BACKENDS`]).
pub const RING_DIRTY: u32 = 1 << 31;

/// `LB_RING` entries of maglev and sh services, with [`RING_DIRTY`]: the slot changed from
/// unchanged, so flows may go through it that were never recorded (UDP of an unchanged slot);
/// it also names the backend it had before, in bits 16..30 ([`ring_prev`]), its own backend
/// then in bits 0..16 ([`ring_id`]). A packet without an entry that is not a SYN goes to that
/// previous backend while it is usable, and is recorded with it. The controller sets it on UDP
/// services' slots and keeps it for `timeouts.udp` after the change.
pub const RING_PREV: u32 = 1 << 30;

/// The backend id of an `LB_RING` value (without [`RING_DIRTY`], [`RING_PREV`] and the
/// previous backend), or `None` for [`NO_BACKEND`].
#[inline(always)]
pub const fn ring_id(v: u32) -> Option<u32> {
    if v == NO_BACKEND {
        None
    } else if v & RING_PREV != 0 {
        Some(v & 0xffff)
    } else {
        Some(v & !RING_DIRTY)
    }
}

/// The previous backend of an `LB_RING` value with [`RING_PREV`].
#[inline(always)]
pub const fn ring_prev(v: u32) -> Option<u32> {
    if v == NO_BACKEND || v & RING_PREV == 0 {
        None
    } else {
        Some((v >> 16) & 0x3fff)
    }
}

/// The `LB_RING` value of a slot: backend `id` ([`NO_BACKEND`]: none), changed (`dirty`), and
/// the backend it had before while its unrecorded flows may live (`prev`, changed slots only).
#[inline(always)]
pub const fn ring_value(id: u32, dirty: bool, prev: Option<u32>) -> u32 {
    if id == NO_BACKEND {
        return NO_BACKEND;
    }
    match (dirty, prev) {
        (false, _) => id,
        (true, None) => id | RING_DIRTY,
        (true, Some(p)) => id | p << 16 | RING_PREV | RING_DIRTY,
    }
}

const _: () = assert!(crate::limits::MAX_BACKENDS <= 1 << 14);

/// [`Backend::flags`]: the backend may receive traffic (exists and is not down).
pub const BACKEND_F_ACTIVE: u32 = 1;
/// [`Backend::flags`]: forward with XDP_REDIRECT through `TX_PORTS[tx_port]` instead of XDP_TX.
pub const BACKEND_F_REDIRECT: u32 = 2;

/// A backend (real server), by global backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Destination MAC written into forwarded frames.
    pub mac: [u8; 6],
    /// Source MAC written into forwarded frames (the egress interface's MAC).
    pub src_mac: [u8; 6],
    /// `BACKEND_F_*`.
    pub flags: u32,
    /// Bumped by the controller each time this id is (re)assigned or taken down, so flows
    /// recorded for an earlier holder of the id are never sent to a later one.
    pub generation: u32,
    /// Devmap slot when [`BACKEND_F_REDIRECT`] is set.
    pub tx_port: u32,
    /// Effective weight (wlc compares with it).
    pub weight: u32,
    pub _pad: u32,
}

/// [`FlowValue::flags`]: the flow is counted in the backend's active connections
/// (a TCP flow that began with a SYN, or a UDP flow).
pub const FLOW_F_COUNTED: u32 = 1;
/// [`FlowValue::flags`]: the client sent FIN or RST (no longer counted as active).
pub const FLOW_F_CLOSED: u32 = 2;

/// Connection table value.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Backend id.
    pub backend: u32,
    /// [`Backend::generation`] when the flow was recorded.
    pub generation: u32,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE) of the last packet, refreshed at
    /// most once a second. The controller expires idle flows with it.
    pub last_seen_ns: u64,
    /// `FLOW_F_*`.
    pub flags: u32,
    /// CPU that recorded the flow (diagnostics: the counters are shared since layout 2).
    pub cpu: u32,
}

/// What a backend id stands for, kept beside the data plane for the controller only (the XDP
/// program never reads it): a restarted controller adopts ids and generations from the pinned
/// maps with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendMeta {
    /// The backend's address (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    /// [`FAMILY_V4`] or [`FAMILY_V6`]; 0 = the id is unused.
    pub family: u8,
    pub _pad: [u8; 3],
    /// Id of the service the backend belongs to.
    pub service_id: u32,
}

/// `LB_META` indexes (array of `u64`), written when the pinned maps are created.
pub const META_LAYOUT: u32 = 0;
/// `LB_META[META_RING_CAPACITY]`: the slots of `LB_RING` (all services' tables).
pub const META_RING_CAPACITY: u32 = 1;
/// `LB_META[META_FLOW_TABLE_SIZE]`: the connection table's size.
pub const META_FLOW_TABLE_SIZE: u32 = 2;
/// `LB_META[META_XDP_MODE]`: how the pinned link was attached (1 native, 2 generic).
pub const META_XDP_MODE: u32 = 3;
/// Entries of `LB_META`.
pub const META_LEN: u32 = 8;

/// Version of the maps' layout (names, key and value types, meanings). A controller adopts
/// pinned maps only of its own layout; bump it with every change of a shared type or map.
///
/// 2: `LB_BE_CONNS`, `LB_BE_EXPIRED` and `LB_RR_CURSOR` are shared arrays (were per CPU);
/// `LB_TRACE`, `LB_TRACE_CFG` and `LB_TRACE_RATE` for `lb trace`; `LB_VIPS` values are
/// `VipValue`s; `LB_FRAGS`; `LB_VIP_FILTER`.
///
/// 3: a service's table is `LB_RING[ring_base .. ring_base + ring_size]` (`ServiceValue` says
/// where, per service; `LB_RING` is memory-mapped by the controller and holds
/// `dataplane.ring_capacity` slots); a flow's slot is `reduce(hash, ring_size)`; up to
/// `MAX_SERVICES` = 4096 services and `MAX_BACKENDS` = 16384 backends.
///
/// 4: `LB_SVC_CACHE` (the IPv4 service cache, see [`crate::svc_cache`]); `LB_IF_MAC` is a u64.
///
/// 5: UDP flows of maglev/sh services through unchanged slots are not recorded; a changed
/// slot's `LB_RING` value may carry the backend it had before ([`RING_PREV`]).
pub const LAYOUT_VERSION: u64 = 5;

/// Per-service and per-backend counters (one per CPU; the controller sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    /// Whole frames, Ethernet header included.
    pub bytes: u64,
    /// Flows that chose this service/backend (new and rescheduled).
    pub new_flows: u64,
}

impl Counters {
    /// Adds `other` field by field (summing CPUs).
    pub fn add(&mut self, other: &Counters) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.new_flows = self.new_flows.wrapping_add(other.new_flows);
    }
}

/// `lb trace`'s settings, `LB_TRACE_CFG[0]`; written by `lb trace`, read by `lb_xdp`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceConfig {
    /// Tracing runs until this CLOCK_MONOTONIC_COARSE time (ns); 0 = off (the data plane then
    /// pays one load and one branch). `lb trace` pushes it forward every second, so a killed
    /// trace stops by itself.
    pub until_ns: u64,
    /// Only flows to this VIP ([`TRACE_F_VIP`]).
    pub vip: [u8; 16],
    /// Only flows from this client ([`TRACE_F_CLIENT`]).
    pub client: [u8; 16],
    /// Only frames sent to this backend MAC ([`TRACE_F_BACKEND`]).
    pub backend_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// `TRACE_F_*`: which filters apply.
    pub filters: u32,
    /// Most events per second and CPU; the rest are counted as suppressed.
    pub rate: u32,
}

pub const TRACE_F_VIP: u32 = 1;
pub const TRACE_F_CLIENT: u32 = 2;
pub const TRACE_F_BACKEND: u32 = 4;

/// Bytes of each traced frame copied into its event (from the start of the frame).
/// A power of two (the data plane masks lengths with it).
pub const TRACE_SNAP: usize = 128;
const _: () = assert!(TRACE_SNAP.is_power_of_two());

/// One decision of `lb_xdp`, as `lb trace` receives it through the `LB_TRACE` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// The 5-tuple (zero where the parser did not get that far).
    pub key: FlowKey,
    /// Backend id ([`NO_BACKEND`] when none was chosen).
    pub backend: u32,
    /// The XDP verdict (`XDP_TX` = 3, ...).
    pub action: u32,
    /// Why: a [`crate::stats::Stat`] index (`flow_hit`, `flow_new`, `pass_no_service`,
    /// `drop_no_backend`, ...).
    pub reason: u32,
    /// CPU that ran the program.
    pub cpu: u32,
    /// Length of the whole frame.
    pub pkt_len: u32,
    /// Bytes of it in `data` (at most [`TRACE_SNAP`]): the frame as it left, after the MAC
    /// rewrite (or as it arrived, when passed or dropped).
    pub cap_len: u32,
    pub data: [u8; TRACE_SNAP],
}

/// Per-CPU bookkeeping of the trace rate limit (`LB_TRACE_RATE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceRate {
    /// Start of the current one-second window (ns, coarse clock).
    pub window_ns: u64,
    /// Events sent in the current window.
    pub sent: u64,
    /// Events not sent because of the rate limit, since the trace started.
    pub suppressed: u64,
    /// Events lost because the ring buffer was full.
    pub lost: u64,
}

/// Per-CPU state of the connection-table record limit (`LB_RECORD_RATE`, an array of one that
/// is not pinned: every load of `lb_xdp` starts it afresh, and the controller writes `limit`
/// into each CPU's copy after the load).
///
/// At most `limit` SYNs a second on this CPU are recorded through a table slot that never
/// changed (maglev/sh, `record_connections = "at_syn"`); beyond it such a SYN is forwarded by
/// its slot alone, as `"on_change"` would (`flow_stateless`), and counted in
/// `window.suppressed`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordRate {
    /// The one-second window, as `lb trace` and flow sharing keep theirs: `sent` = SYNs
    /// recorded through unchanged slots in it, `suppressed` = SYNs not recorded because of the
    /// limit since this program was loaded (`lost` is not used).
    pub window: TraceRate,
    /// `dataplane.record_limit` (0: no limit).
    pub limit: u64,
    /// Non-zero while a controller drains `LB_RECORD` (`dataplane.defer_records`): a SYN that
    /// would be recorded through an unchanged slot is handed to the controller as a
    /// [`RecordEvent`] instead of inserted here (see [`RecordEvent`]).
    pub defer: u64,
    /// SYNs handed to the controller through `LB_RECORD` since this program was loaded.
    pub deferred: u64,
    /// SYNs recorded here because `LB_RECORD` was full (no controller draining it, or one
    /// that falls behind), since this program was loaded.
    pub defer_full: u64,
}

/// [`RecordEvent::kind`]: a SYN to record (an entry counted and open, unless the table has
/// one for the key already).
pub const RECORD_OPEN: u32 = 0;
/// [`RecordEvent::kind`]: a FIN or RST that found no entry: the controller closes the entry
/// an earlier [`RECORD_OPEN`] of the key made, if any.
pub const RECORD_CLOSE: u32 = 1;

/// A connection-table record handed from the packet path to the controller through the
/// `LB_RECORD` ring buffer (`dataplane.defer_records`, on by default): the SYN of a
/// `record_connections = "at_syn"` maglev/sh connection through an unchanged table slot is
/// forwarded by the slot at once, and the controller inserts its entry (counted, open,
/// `BPF_NOEXIST`) off the packet path. The slot names the entry's backend until the slot
/// changes; the controller keeps a changed slot's previous backend until it has drained the
/// ring past the change, so a connection not yet recorded keeps its backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordEvent {
    pub key: FlowKey,
    /// Backend id (the slot's), for [`RECORD_OPEN`].
    pub backend: u32,
    /// [`Backend::generation`] of that id when the SYN went through.
    pub generation: u32,
    /// [`RECORD_OPEN`] or [`RECORD_CLOSE`].
    pub kind: u32,
    /// The CPU that saw the packet ([`FlowValue::cpu`]).
    pub cpu: u32,
}

/// One new connection-table entry, reported through the `LB_SYNC` ring buffer for flow sharing
/// (`[flow_sync]`): the controller sends it to the other balancer nodes, which insert it into
/// their own tables (by backend address: ids differ between nodes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncEvent {
    pub key: FlowKey,
    /// Backend id on this node.
    pub backend: u32,
    /// [`Backend::generation`] of that id when the flow was recorded.
    pub generation: u32,
}

/// `LB_SYNC_CFG[0]`: flow sharing settings, written by the controller.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncConfig {
    /// Most new flows reported per second and CPU; 0 = flow sharing off (one load and one
    /// branch per new flow).
    pub rate: u32,
    pub _pad: u32,
}

/// Bench only: `LB_BENCH_GEN[0]`, the live-frames generator's settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchGen {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// Distinct flows to cycle through (source address bytes 2-3 and port).
    pub flows: u32,
}

/// [`FlowValue::cpu`] of an entry a peer node shared (it was not recorded by a CPU here).
pub const FLOW_CPU_PEER: u32 = u32::MAX;

// Layout: no implicit padding anywhere (sizes are the sums of the fields).
const _: () = assert!(size_of::<FlowKey>() == 40);
const _: () = assert!(size_of::<ServiceKey>() == 20);
const _: () = assert!(size_of::<ServiceValue>() == 24);
const _: () = assert!(size_of::<VipKey>() == 20);
const _: () = assert!(size_of::<Backend>() == 32);
const _: () = assert!(size_of::<FlowValue>() == 24);
const _: () = assert!(size_of::<Counters>() == 24);
const _: () = assert!(size_of::<BackendMeta>() == 24);
const _: () = assert!(size_of::<TraceConfig>() == 56);
const _: () = assert!(size_of::<VipValue>() == 56);
const _: () = assert!(size_of::<FragKey>() == 40);
const _: () = assert!(size_of::<FragValue>() == 8);
const _: () = assert!(size_of::<TraceEvent>() == 72 + TRACE_SNAP);
const _: () = assert!(size_of::<TraceRate>() == 32);
const _: () = assert!(size_of::<RecordRate>() == 64);
const _: () = assert!(size_of::<RecordEvent>() == 56);
const _: () = assert!(size_of::<SyncEvent>() == 48);
const _: () = assert!(size_of::<SyncConfig>() == 8);
const _: () = assert!(size_of::<BenchGen>() == 16);

mod pod {
    use super::*;

    macro_rules! pod {
        ($($t:ty),*) => {$(
            // SAFETY: `#[repr(C)]`, only integers and byte arrays, no implicit padding
            // (sizes asserted above), every bit pattern valid.
            #[cfg(feature = "user")]
            unsafe impl aya::Pod for $t {}
            // SAFETY: as above.
            unsafe impl bytemuck::Zeroable for $t {}
            // SAFETY: as above.
            unsafe impl bytemuck::Pod for $t {}
        )*};
    }
    pod!(
        FlowKey,
        ServiceKey,
        ServiceValue,
        VipKey,
        Backend,
        FlowValue,
        Counters,
        BackendMeta,
        TraceConfig,
        TraceEvent,
        TraceRate,
        RecordRate,
        RecordEvent,
        VipValue,
        FragKey,
        FragValue,
        SyncEvent,
        SyncConfig,
        BenchGen
    );
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;

    use super::*;

    #[test]
    fn field_offsets_match_the_kernel_side() {
        assert_eq!(offset_of!(FlowKey, dst_addr), 16);
        assert_eq!(offset_of!(FlowKey, src_port), 32);
        assert_eq!(offset_of!(FlowKey, dst_port), 34);
        assert_eq!(offset_of!(FlowKey, protocol), 36);
        assert_eq!(offset_of!(FlowKey, family), 37);
        assert_eq!(offset_of!(ServiceKey, port), 16);
        assert_eq!(offset_of!(ServiceKey, family), 19);
        assert_eq!(offset_of!(Backend, src_mac), 6);
        assert_eq!(offset_of!(Backend, flags), 12);
        assert_eq!(offset_of!(Backend, tx_port), 20);
        assert_eq!(offset_of!(Backend, weight), 24);
        assert_eq!(offset_of!(ServiceValue, ring_len), 12);
        assert_eq!(offset_of!(ServiceValue, ring_size), 20);
        assert_eq!(offset_of!(Counters, new_flows), 16);
    }

    /// The word-wise constructors build exactly the keys the fields describe.
    #[test]
    fn keys_from_words_match_their_fields() {
        let mut k = FlowKey::v4([10, 0, 0, 1], [10, 99, 0, 100], PROTO_TCP);
        k.set_ports([0xc3, 0x50, 0x00, 0x50]);
        let mut want = FlowKey {
            protocol: PROTO_TCP,
            family: FAMILY_V4,
            src_port: [0xc3, 0x50],
            dst_port: [0x00, 0x50],
            ..FlowKey::default()
        };
        want.src_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        want.dst_addr[..4].copy_from_slice(&[10, 99, 0, 100]);
        assert_eq!(k, want);
        assert_eq!(FlowKey::from_words(k.words()), k);
        k.set_protocol(PROTO_UDP);
        assert_eq!(
            (k.protocol, k.src_port, k.family),
            (PROTO_UDP, [0xc3, 0x50], FAMILY_V4)
        );
        assert_eq!(
            ServiceKey::of(&k),
            ServiceKey {
                vip: want.dst_addr,
                port: [0x00, 0x50],
                protocol: PROTO_UDP,
                family: FAMILY_V4,
            }
        );
        assert_eq!(ServiceKey::of(&k).any_port().port, [0, 0]);
        assert_eq!(ServiceKey::of(&k).any_port().protocol, PROTO_UDP);
        assert_eq!(
            VipKey::of(&k),
            VipKey {
                addr: want.dst_addr,
                family: FAMILY_V4,
                _pad: [0; 3],
            }
        );
        let s: [u8; 16] = core::array::from_fn(|i| i as u8 + 1);
        let d: [u8; 16] = core::array::from_fn(|i| 0xf0 - i as u8);
        let k6 = FlowKey::v6(&s, &d, PROTO_UDP);
        assert_eq!((k6.src_addr, k6.dst_addr, k6.family), (s, d, FAMILY_V6));
        assert_eq!(
            (k6.protocol, k6.src_port, k6.dst_port),
            (PROTO_UDP, [0; 2], [0; 2])
        );
    }

    /// Keys are aligned so that zeroing and copying them compiles to word stores in BPF
    /// (their sizes are multiples of the alignment, so no padding appears).
    #[test]
    fn alignment() {
        assert_eq!(core::mem::align_of::<FlowKey>(), 8);
        assert_eq!(core::mem::align_of::<ServiceKey>(), 4);
        assert_eq!(core::mem::align_of::<VipKey>(), 4);
        assert_eq!(core::mem::align_of::<Backend>(), 4);
    }
}
