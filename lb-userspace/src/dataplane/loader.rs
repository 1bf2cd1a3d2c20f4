//! Loads `lb_xdp`, writes the desired state into its maps, attaches it, reads its counters.
//!
//! The only file that talks to the kernel's BPF maps: the map handles are taken once, typed,
//! right after the program is loaded; the controller's policy never sees them.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMap, HashMap, Map, MapData, PerCpuArray, RingBuf},
    programs::{
        Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    Backend, BackendMeta, Counters, FlowKey, FlowValue, LAYOUT_VERSION, META_FLOW_TABLE_SIZE,
    META_LAYOUT, META_RING_CAPACITY, META_XDP_MODE, NO_BACKEND, RecordRate, ServiceKey,
    ServiceValue, VipKey,
    limits::{MAX_BACKENDS, RING_CHUNK},
    names,
    rules::{active_connections, counted_and_open},
    stats::{FastStat, STATS_LEN, Stat},
};

use super::{Maps, check_op};
use crate::{
    config::XdpMode,
    desired::{BackendId, DesiredState, Op, diff},
    stats::Snapshot,
};

/// Loader errors. Program load errors carry the verifier log.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(
        "this lb binary was built without its eBPF object (bpf-linker was missing at build \
         time): run scripts/bootstrap.sh, then rebuild with `cargo xtask build`"
    )]
    NoObject,
    #[error("LB_RING[{index}] is outside the table array ({len} slots)")]
    RingIndex { index: u32, len: u32 },
    #[error("loading the eBPF object: {0}")]
    Object(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "attaching {} to {interface} in {mode} mode: {source}{hint}",
        names::PROGRAM
    )]
    Attach {
        interface: String,
        mode: &'static str,
        hint: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("{name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("devmap LB_TX_PORTS: {0}")]
    TxPort(#[source] Box<aya::maps::xdp::XdpMapError>),
    #[error(
        "refusing to write backend id {id} as active with MAC 00:00:00:00:00:00 (a controller bug: \
         its traffic would be black-holed)"
    )]
    ActiveWithoutMac { id: u32 },
    #[error(
        "the data plane pinned at {path} was made for another layout or size ({why}); \
         `lb run --replace` replaces it (migrating what it can), `lb detach` removes it"
    )]
    Incompatible { path: PathBuf, why: String },
    #[error("pinned state at {path}: {why}")]
    Pinned { path: PathBuf, why: String },
}

type Result<T> = std::result::Result<T, LoaderError>;

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> LoaderError {
    move |source| LoaderError::Map {
        name,
        source: Box::new(source),
    }
}

/// The loaded program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    maps: Handles,
    link: Option<(XdpLinkId, String)>,
    /// Present when the object was built with lb-ebpf's `log` feature.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The maps were filled by [`Dataplane::migrate_from`]: their tables are not the old
    /// ones (rebuilt by the controller), so [`Dataplane::read_adopted`] reads none.
    migrated: bool,
}

/// What a controller finds in the maps pinned by an earlier one.
#[derive(Clone, Debug, Default)]
pub struct Adopted {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub vips: Vec<(VipKey, lb_common::VipValue)>,
    /// Backend id, its entry and what it stands for (ids in use only).
    pub backends: Vec<(u32, Backend, BackendMeta)>,
    /// How the pinned link was attached.
    pub mode: Option<AttachedMode>,
    /// Entries in the connection table.
    pub flows: usize,
    /// maglev/sh services: their tables as `LB_RING` holds them (flags and all), by service
    /// id: which slots changed and what they had before survive the restart.
    pub rings: std::collections::BTreeMap<u32, Vec<u32>>,
}

/// Checks that the maps pinned at `pin` fit this `lb` and `dpc`: same layout version, same
/// table sizes, every map there, and the XDP mode (a link cannot change mode).
pub fn check_pinned(pin: &Path, dpc: &crate::config::Dataplane) -> std::result::Result<(), String> {
    for name in names::ALL_MAPS {
        if !pin.join(name).exists() {
            return Err(format!("map {name} is missing"));
        }
    }
    let meta = open_pinned_array::<u64>(&pin.join(names::META)).map_err(|e| e.to_string())?;
    let get = |i| meta.get(&i, 0).map_err(|e| format!("reading LB_META: {e}"));
    let layout = get(META_LAYOUT)?;
    if layout != LAYOUT_VERSION {
        return Err(format!(
            "layout version {layout}, this lb uses {LAYOUT_VERSION}"
        ));
    }
    let ring = get(META_RING_CAPACITY)?;
    if ring != dpc.ring_capacity as u64 {
        return Err(format!(
            "ring_capacity {ring}, the config says {}",
            dpc.ring_capacity
        ));
    }
    let flows = get(META_FLOW_TABLE_SIZE)?;
    if flows != dpc.flow_table_size as u64 {
        return Err(format!(
            "flow_table_size {flows}, the config says {}",
            dpc.flow_table_size
        ));
    }
    let mode = get(META_XDP_MODE)?;
    let wanted = match dpc.xdp_mode {
        XdpMode::Native => Some(1),
        XdpMode::Generic => Some(2),
        XdpMode::Auto => None,
    };
    if wanted.is_some_and(|w| mode != 0 && w != mode) {
        return Err(format!(
            "attached in {} mode, the config says {}",
            if mode == 1 { "native" } else { "generic" },
            dpc.xdp_mode
        ));
    }
    Ok(())
}

fn open_pinned(path: &Path) -> Result<MapData> {
    MapData::from_pin(path).map_err(|e| LoaderError::Pinned {
        path: path.to_owned(),
        why: e.to_string(),
    })
}

fn open_pinned_array<V: aya::Pod>(path: &Path) -> Result<Array<MapData, V>> {
    Array::try_from(Map::Array(open_pinned(path)?)).map_err(|e| LoaderError::Pinned {
        path: path.to_owned(),
        why: e.to_string(),
    })
}

fn open_pinned_per_cpu<V: aya::Pod>(path: &Path) -> Result<PerCpuArray<MapData, V>> {
    PerCpuArray::try_from(Map::PerCpuArray(open_pinned(path)?)).map_err(|e| LoaderError::Pinned {
        path: path.to_owned(),
        why: e.to_string(),
    })
}

/// Every map of `lb_xdp`, typed, taken from the object once.
struct Handles {
    meta: Array<MapData, u64>,
    backend_meta: Array<MapData, BackendMeta>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    vips: HashMap<MapData, VipKey, lb_common::VipValue>,
    backends: Array<MapData, Backend>,
    ring: super::ring::RingMem,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    flags: Array<MapData, u32>,
    tx_ports: DevMap<MapData>,
    stats: PerCpuArray<MapData, u64>,
    /// `LB_STATS_FAST` (absent from objects before session 25: the bench's A/B of older
    /// objects).
    stats_fast: Option<PerCpuArray<MapData, u64>>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    backend_conns: Array<MapData, u64>,
    backend_expired: Array<MapData, u64>,
    rr_cursor: Array<MapData, u64>,
    vip_filter: Array<MapData, u8>,
    svc_cache: super::svc_cache::SvcCache<super::ring::RingMem>,
    /// Not pinned, this program's own (absent from objects before session 12: the bench's
    /// A/B of older objects).
    record_rate: Option<PerCpuArray<MapData, RecordRate>>,
    /// The packed tables (absent from older objects).
    packed: Option<super::packed::Packer<super::ring::PackedMem>>,
    /// `LB_RECORD` (absent from older objects), and whether this program hands SYNs to the
    /// controller through it.
    records: Option<RingBuf<MapData>>,
    defer: bool,
    /// `LB_RECORD_IN`, this program's own (absent from older objects), and whether
    /// `lb_record_apply` is loaded to apply records in the kernel.
    record_in: Option<Array<MapData, lb_common::RecordEvent>>,
    apply: bool,
}

impl Handles {
    fn take(ebpf: &mut Ebpf) -> Result<Handles> {
        fn take<T: TryFrom<Map, Error = aya::maps::MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T> {
            let map = ebpf
                .take_map(name)
                .ok_or(LoaderError::MissingMap { name })?;
            T::try_from(map).map_err(map_err(name))
        }
        fn mapped<A: super::ring::Atom>(
            ebpf: &mut Ebpf,
            name: &'static str,
            words: u32,
        ) -> Result<super::ring::Mem<A>> {
            let map = ebpf
                .take_map(name)
                .ok_or(LoaderError::MissingMap { name })?;
            let Map::Array(data) = map else {
                return Err(LoaderError::MissingMap { name });
            };
            let len = data
                .info()
                .map_err(map_err(name))?
                .max_entries()
                .saturating_mul(words);
            super::ring::Mem::new(data, len).map_err(|e| syscall(name, "mmap", e))
        }
        let services: HashMap<MapData, ServiceKey, ServiceValue> = take(ebpf, names::SERVICES)?;
        // The cache holds what the services map holds (a pinned cache may be stale).
        let mut svc_cache = super::svc_cache::SvcCache::new(
            mapped(ebpf, names::SVC_CACHE, lb_common::svc_cache::WORDS as u32)?,
            super::svc_cache::FILLED,
        );
        let mut cached = Vec::new();
        for kv in services.iter() {
            let (k, v) = kv.map_err(map_err(names::SERVICES))?;
            cached.push((k.cache_key(), v));
        }
        let ring: super::ring::RingMem = mapped(ebpf, names::RING, RING_CHUNK)?;
        // The packed tables: every maglev/sh table packed again from `LB_RING` (adopted ones:
        // whatever the copy held, kept by another controller, or by none while an earlier
        // release ran) before this program takes traffic, and before anything else is written.
        let packed = if ebpf.map(names::RING_PACKED).is_some() {
            let mem = super::ring::PackedMem {
                words: mapped(ebpf, names::RING_PACKED, lb_common::packed::CHUNK)?,
                ids: mapped(ebpf, names::RING_IDS, lb_common::packed::IDS as u32)?,
            };
            let mut p = super::packed::Packer::new(mem, super::svc_cache::FILLED);
            repack(&mut p, &ring, cached.iter().map(|(_, v)| v));
            Some(p)
        } else {
            None
        };
        svc_cache.rebuild(cached);
        Ok(Handles {
            meta: take(ebpf, names::META)?,
            backend_meta: take(ebpf, names::BACKEND_META)?,
            services,
            vips: take(ebpf, names::VIPS)?,
            backends: take(ebpf, names::BACKENDS)?,
            ring,
            flows: take(ebpf, names::FLOWS)?,
            flags: take(ebpf, names::FLAGS)?,
            tx_ports: take(ebpf, names::TX_PORTS)?,
            stats: take(ebpf, names::STATS)?,
            stats_fast: match ebpf.take_map(names::STATS_FAST) {
                Some(map) => Some(PerCpuArray::try_from(map).map_err(map_err(names::STATS_FAST))?),
                None => None,
            },
            service_stats: take(ebpf, names::SERVICE_STATS)?,
            backend_stats: take(ebpf, names::BACKEND_STATS)?,
            backend_conns: take(ebpf, names::BACKEND_CONNS)?,
            backend_expired: take(ebpf, names::BACKEND_EXPIRED)?,
            rr_cursor: take(ebpf, names::RR_CURSOR)?,
            vip_filter: take(ebpf, names::VIP_FILTER)?,
            svc_cache,
            record_rate: match ebpf.take_map(names::RECORD_RATE) {
                Some(map) => Some(PerCpuArray::try_from(map).map_err(map_err(names::RECORD_RATE))?),
                None => None,
            },
            packed,
            records: match ebpf.take_map(names::RECORD) {
                Some(map) => Some(RingBuf::try_from(map).map_err(map_err(names::RECORD))?),
                None => None,
            },
            defer: false,
            record_in: match ebpf.take_map(names::RECORD_IN) {
                Some(map) => Some(Array::try_from(map).map_err(map_err(names::RECORD_IN))?),
                None => None,
            },
            apply: false,
        })
    }
}

/// Whether a service's table is packed (maglev and sh: a backend per slot).
fn packs(v: &ServiceValue) -> bool {
    matches!(v.scheduler, lb_common::SCHED_MAGLEV | lb_common::SCHED_SH)
}

/// Packs the tables of `services` (all of `LB_SERVICES`) from `ring` whole; every other
/// service id is unpacked.
fn repack<'a>(
    p: &mut super::packed::Packer<super::ring::PackedMem>,
    ring: &super::ring::RingMem,
    services: impl Iterator<Item = &'a ServiceValue>,
) {
    let mut packed = std::collections::BTreeSet::new();
    for v in services.filter(|v| packs(v)) {
        p.pack(v.id, v.ring_base, v.ring_size, |i| {
            ring.get(v.ring_base.wrapping_add(i)).unwrap_or(NO_BACKEND)
        });
        packed.insert(v.id);
    }
    p.unpack_others(&packed);
}

/// What a sweep of the connection table did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Entries seen.
    pub entries: u64,
    /// Idle entries deleted.
    pub expired: u64,
    /// Open entries of unchanged maglev/sh slots, kept whatever their idle time (see
    /// [`super::SlotView`]).
    pub exempt: u64,
    /// Changed slots `(service id, slot)` that still have an entry naming another backend (or
    /// another generation of it): they stay changed.
    pub still_dirty: std::collections::BTreeSet<(u32, u32)>,
    /// Active connections subtracted beyond the expiries: counted connections that had no
    /// entry any more (the LRU evicted it when the table was full, or a close was counted
    /// twice), found by reconciling each backend's count with the table.
    pub uncounted: u64,
    /// Active connections added back by that reconciliation (a close counted twice; races
    /// with the walk, corrected at the next sweep).
    pub recounted: u64,
}

/// The two shared per-backend connection counters.
#[derive(Clone, Copy)]
enum Counter {
    Conns,
    Expired,
}

/// How the program got attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        })
    }
}

impl Dataplane {
    /// Loads the embedded object with the given table sizes (not attached yet):
    /// `ring_capacity` slots for all services' tables, `flow_table_size` flows.
    pub fn load(ring_capacity: u32, flow_table_size: u32) -> Result<Dataplane> {
        Dataplane::load_object(crate::EBPF_OBJECT, ring_capacity, flow_table_size)
    }

    /// Loads `object` (tests pass the embedded one too; kept separate for clarity).
    pub fn load_object(
        object: &[u8],
        ring_capacity: u32,
        flow_table_size: u32,
    ) -> Result<Dataplane> {
        Dataplane::load_with(object, ring_capacity, flow_table_size, None, [0; 6])
    }

    /// Loads the embedded object with its maps pinned under `pin` (reusing the maps already
    /// pinned there: the caller checked they are compatible).
    /// `if_mac`: the interface's MAC (frames to other unicast MACs are never forwarded).
    pub fn load_pinned(
        ring_capacity: u32,
        flow_table_size: u32,
        pin: &Path,
        if_mac: [u8; 6],
    ) -> Result<Dataplane> {
        Dataplane::load_with(
            crate::EBPF_OBJECT,
            ring_capacity,
            flow_table_size,
            Some(pin),
            if_mac,
        )
    }

    /// As [`Dataplane::load`], forwarding only frames addressed to `if_mac` (tests).
    pub fn load_for_mac(
        ring_capacity: u32,
        flow_table_size: u32,
        if_mac: [u8; 6],
    ) -> Result<Dataplane> {
        Dataplane::load_object_for_mac(crate::EBPF_OBJECT, ring_capacity, flow_table_size, if_mac)
    }

    /// As [`Dataplane::load_for_mac`], from another compiled object (the bench's A/B of a
    /// data-plane change: `LB_BENCH_OBJECT`).
    pub fn load_object_for_mac(
        object: &[u8],
        ring_capacity: u32,
        flow_table_size: u32,
        if_mac: [u8; 6],
    ) -> Result<Dataplane> {
        Dataplane::load_with(object, ring_capacity, flow_table_size, None, if_mac)
    }

    fn load_with(
        object: &[u8],
        ring_capacity: u32,
        flow_table_size: u32,
        pin: Option<&Path>,
        if_mac: [u8; 6],
    ) -> Result<Dataplane> {
        if object.is_empty() {
            return Err(LoaderError::NoObject);
        }
        let mac = mac_word(if_mac);
        // The trace setting lives in a data section whose map gets its value at load: the
        // pinned one's (a trace running through a program replacement goes on; a setting
        // `lb trace` writes between this read and the load is lost, and written again by its
        // next renewal, within a second).
        let trace_cfg = pin
            .and_then(|pin| {
                open_pinned_array::<lb_common::TraceConfig>(&pin.join(names::TRACE_CFG)).ok()
            })
            .and_then(|a| a.get(&0, 0).ok())
            .unwrap_or_default();
        let mut loader = EbpfLoader::new();
        loader
            .override_global(names::GLOBAL_IF_MAC, &mac, true)
            // (Not required: an object of an earlier version, loaded by the bench's A/B, has
            // the setting as an ordinary map.)
            .override_global(names::GLOBAL_TRACE_SETTING, &trace_cfg, false)
            .map_max_entries(names::RING, ring_capacity.div_ceil(RING_CHUNK))
            .map_max_entries(
                names::RING_PACKED,
                lb_common::packed::chunks_for(ring_capacity),
            )
            .map_max_entries(names::FLOWS, flow_table_size);
        if let Some(pin) = pin {
            for name in names::ALL_MAPS
                .iter()
                .chain(&names::PACKED_MAPS)
                .chain(&[names::RECORD, names::STATS_FAST])
            {
                loader.map_pin_path(name, pin.join(name));
            }
            loader.map_pin_path(names::TRACE_CFG_SECTION, pin.join(names::TRACE_CFG));
        }
        let mut ebpf = loader
            .load(object)
            .map_err(|e| LoaderError::Object(Box::new(e)))?;
        // Before the program loads: it refers to the log ring buffer the logger keeps open.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => {
                tracing::info!(
                    "lb_xdp was built with the `log` feature: drops are logged (debug level)"
                );
                Some(l)
            }
            Err(e) => {
                tracing::debug!("no eBPF logs ({e}): lb-ebpf built without the `log` feature");
                None
            }
        };
        let prog: &mut Xdp = ebpf
            .program_mut(names::PROGRAM)
            .ok_or(LoaderError::MissingMap {
                name: names::PROGRAM,
            })?
            .try_into()
            .map_err(|source| LoaderError::Program {
                name: names::PROGRAM,
                source: Box::new(source),
            })?;
        prog.load().map_err(|source| LoaderError::Program {
            name: names::PROGRAM,
            source: Box::new(source),
        })?;
        let maps = Handles::take(&mut ebpf)?;
        Ok(Dataplane {
            ebpf,
            maps,
            link: None,
            logger,
            migrated: false,
        })
    }

    /// The eBPF logger, if the object logs (drive it with `flush()` when its fd is readable).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// The program, for attaching and BPF_PROG_TEST_RUN.
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(names::PROGRAM)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    /// Another program of the object (benchmarks load `lb_baseline_tx`), loaded on first use.
    pub fn other_program(&mut self, name: &'static str) -> Result<&mut Xdp> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(LoaderError::MissingMap { name })?
            .try_into()
            .map_err(|source| LoaderError::Program {
                name,
                source: Box::new(source),
            })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| LoaderError::Program {
                name,
                source: Box::new(source),
            })?;
        }
        Ok(prog)
    }

    /// Attaches to `interface`. `Auto` tries native first and falls back to generic.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<AttachedMode> {
        let attempt = |dp: &mut Dataplane, m: AyaXdpMode| dp.program().attach(interface, m);
        let (id, attached) = match mode {
            XdpMode::Native => attempt(self, AyaXdpMode::Driver)
                .map(|id| (id, AttachedMode::Native))
                .map_err(|source| LoaderError::Attach {
                    interface: interface.to_owned(),
                    mode: "native",
                    hint: " (the driver may lack native XDP: try xdp_mode = \"generic\" or \"auto\")",
                    source: Box::new(source),
                })?,
            XdpMode::Generic => attempt(self, AyaXdpMode::Skb)
                .map(|id| (id, AttachedMode::Generic))
                .map_err(|source| LoaderError::Attach {
                    interface: interface.to_owned(),
                    mode: "generic",
                    hint: " (is another XDP program attached? `ip link show dev <if>`)",
                    source: Box::new(source),
                })?,
            XdpMode::Auto => match attempt(self, AyaXdpMode::Driver) {
                Ok(id) => (id, AttachedMode::Native),
                Err(e) => {
                    tracing::warn!(
                        "native XDP attach to {interface} failed ({e}); falling back to generic (skb) mode"
                    );
                    attempt(self, AyaXdpMode::Skb)
                        .map(|id| (id, AttachedMode::Generic))
                        .map_err(|source| LoaderError::Attach {
                            interface: interface.to_owned(),
                            mode: "generic (after native failed)",
                            hint: " (is another XDP program attached? `ip link show dev <if>`)",
                            source: Box::new(source),
                        })?
                }
            },
        };
        self.link = Some((id, interface.to_owned()));
        Ok(attached)
    }

    /// Writes `desired` into empty maps.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<()> {
        let (ops, _) = diff(None, desired);
        self.apply_ops(&ops)
    }

    /// Writes one backend entry (tests use it to mark a backend down or change a MAC).
    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.maps
            .backends
            .set(id, backend, 0)
            .map_err(map_err(names::BACKENDS))
    }

    /// Rewrites one service's whole table, starting at `LB_RING[base]` (tests).
    pub fn set_ring(&mut self, base: u32, ring: &[u32]) -> Result<()> {
        for (slot, backend) in ring.iter().enumerate() {
            self.set_slot(base.wrapping_add(slot as u32), *backend)?;
        }
        Ok(())
    }

    /// `LB_RING[index] := backend` (a plain store into the mapping), and the packed copy of
    /// the slot.
    pub fn set_slot(&mut self, index: u32, backend: u32) -> Result<()> {
        self.write_slot(index, backend)?;
        let ring = &self.maps.ring;
        if let Some(p) = self.maps.packed.as_mut() {
            p.update_index(index, backend, |i| ring.get(i).unwrap_or(NO_BACKEND));
        }
        Ok(())
    }

    /// Rewrites a table in `LB_RING` only, leaving the packed copy as it was (tests: which of
    /// the two a packet was forwarded by).
    pub fn set_ring_unpacked(&mut self, base: u32, ring: &[u32]) -> Result<()> {
        for (slot, backend) in ring.iter().enumerate() {
            self.write_slot(base.wrapping_add(slot as u32), *backend)?;
        }
        Ok(())
    }

    /// `LB_RING[index] := backend`, nothing else (the caller updates the packed copy).
    fn write_slot(&mut self, index: u32, backend: u32) -> Result<()> {
        if self.maps.ring.set(index, backend) {
            Ok(())
        } else {
            Err(LoaderError::RingIndex {
                index,
                len: self.maps.ring.slots(),
            })
        }
    }

    /// The field width of service `id`'s packed table (0: not packed; see
    /// `lb_common::packed`).
    pub fn packed_bits(&self, id: u32) -> u32 {
        self.maps.packed.as_ref().map_or(0, |p| p.bits(id))
    }

    /// Records what the pinned maps were made for (a fresh pin directory).
    pub fn write_meta(&mut self, dpc: &crate::config::Dataplane) -> Result<()> {
        let m = &mut self.maps.meta;
        for (i, v) in [
            (META_LAYOUT, LAYOUT_VERSION),
            (META_RING_CAPACITY, dpc.ring_capacity as u64),
            (META_FLOW_TABLE_SIZE, dpc.flow_table_size as u64),
        ] {
            m.set(i, v, 0).map_err(map_err(names::META))?;
        }
        Ok(())
    }

    /// What the pinned maps hold: services, VIPs, backends in use (with what they stand for).
    pub fn read_adopted(&mut self) -> Result<Adopted> {
        let mut a = Adopted::default();
        for kv in self.maps.services.iter() {
            a.services.push(kv.map_err(map_err(names::SERVICES))?);
        }
        for kv in self.maps.vips.iter() {
            a.vips.push(kv.map_err(map_err(names::VIPS))?);
        }
        for id in 0..MAX_BACKENDS {
            let meta = self
                .maps
                .backend_meta
                .get(&id, 0)
                .map_err(map_err(names::BACKEND_META))?;
            if meta.family == 0 {
                continue;
            }
            let b = self
                .maps
                .backends
                .get(&id, 0)
                .map_err(map_err(names::BACKENDS))?;
            a.backends.push((id, b, meta));
        }
        a.mode = match self.maps.meta.get(&META_XDP_MODE, 0).unwrap_or(0) {
            1 => Some(AttachedMode::Native),
            2 => Some(AttachedMode::Generic),
            _ => None,
        };
        a.flows = self.flow_count()?;
        // (Migrated from an older layout: tables are rebuilt, and every flow through them was
        // recorded there, SYNs and UDP included.)
        for (_, v) in a.services.iter().filter(|_| !self.migrated) {
            if matches!(v.scheduler, lb_common::SCHED_MAGLEV | lb_common::SCHED_SH) {
                let ring: Option<Vec<u32>> = (0..v.ring_size)
                    .map(|i| self.maps.ring.get(v.ring_base.wrapping_add(i)))
                    .collect();
                if let Some(ring) = ring {
                    a.rings.insert(v.id, ring);
                }
            }
        }
        Ok(a)
    }

    /// Copies what can be copied from the maps pinned at `old` (same layout, other sizes): the
    /// connection table (as much as fits), backends and what they stand for, services, VIPs,
    /// active-connection counters. Returns a line per map.
    pub fn migrate_from(&mut self, old: &Path) -> Result<Vec<String>> {
        let mut report = Vec::new();
        self.migrated = true;
        let layout = open_pinned_array::<u64>(&old.join(names::META))
            .and_then(|m| m.get(&META_LAYOUT, 0).map_err(map_err(names::META)))
            .unwrap_or(0);
        // Layout 1 differs in the active-connection counters (per CPU there, summed here);
        // layouts 1 and 2 in the service values (no table range: see `service_from_v2`);
        // layouts up to 4 recorded every flow (at its SYN; UDP always; 5: see `RING_PREV`).
        // Flows, backends and their counters are the same.
        if layout != LAYOUT_VERSION && !(1..=4).contains(&layout) {
            report.push(format!(
                "nothing migrated: the old maps have layout {layout}, this lb {LAYOUT_VERSION} \
                 (established flows are scheduled again)"
            ));
            return Ok(report);
        }
        let flows: HashMap<MapData, FlowKey, FlowValue> =
            HashMap::try_from(Map::LruHashMap(open_pinned(&old.join(names::FLOWS))?))
                .map_err(map_err(names::FLOWS))?;
        let (mut copied, mut failed) = (0usize, 0usize);
        for (k, v) in flows.iter().flatten() {
            match self.maps.flows.insert(k, v, 0) {
                Ok(()) => copied += 1,
                Err(_) => failed += 1,
            }
        }
        report.push(format!(
            "connection table: {copied} flows copied{}",
            if failed > 0 {
                format!(", {failed} not (no room)")
            } else {
                String::new()
            }
        ));
        let old_meta = open_pinned_array::<BackendMeta>(&old.join(names::BACKEND_META))?;
        let old_backends = open_pinned_array::<Backend>(&old.join(names::BACKENDS))?;
        let conns = OldCounter::open(&old.join(names::BACKEND_CONNS), layout)?;
        let expired = OldCounter::open(&old.join(names::BACKEND_EXPIRED), layout)?;
        let mut n = 0;
        // The old maps' own size: an older release had fewer backend ids.
        for id in 0..old_meta.len().min(MAX_BACKENDS) {
            let meta = old_meta.get(&id, 0).map_err(map_err(names::BACKEND_META))?;
            if meta.family == 0 {
                continue;
            }
            let b = old_backends.get(&id, 0).map_err(map_err(names::BACKENDS))?;
            self.maps
                .backend_meta
                .set(id, meta, 0)
                .map_err(map_err(names::BACKEND_META))?;
            self.set_backend(id, &b)?;
            let c = conns.get(id, names::BACKEND_CONNS)?;
            self.maps
                .backend_conns
                .set(id, c, 0)
                .map_err(map_err(names::BACKEND_CONNS))?;
            let e = expired.get(id, names::BACKEND_EXPIRED)?;
            self.maps
                .backend_expired
                .set(id, e, 0)
                .map_err(map_err(names::BACKEND_EXPIRED))?;
            n += 1;
        }
        report.push(format!(
            "backends: {n} copied with their generations and active connections"
        ));
        let old_services = Map::HashMap(open_pinned(&old.join(names::SERVICES))?);
        let values: Vec<(ServiceKey, ServiceValue)> = if layout >= 3 {
            let m: HashMap<MapData, ServiceKey, ServiceValue> =
                HashMap::try_from(old_services).map_err(map_err(names::SERVICES))?;
            m.iter().flatten().collect()
        } else {
            let m: HashMap<MapData, ServiceKey, [u32; 4]> =
                HashMap::try_from(old_services).map_err(map_err(names::SERVICES))?;
            m.iter()
                .flatten()
                .map(|(k, v)| (k, service_from_v2(v)))
                .collect()
        };
        let mut n = 0;
        for (k, v) in values {
            self.maps
                .services
                .insert(k, v, 0)
                .map_err(map_err(names::SERVICES))?;
            self.maps.svc_cache.set(k.cache_key(), &v);
            n += 1;
        }
        report.push(format!(
            "services: {n} keys copied (their tables are rebuilt); traffic counters start from 0"
        ));
        // The packed copy knows the copied services (their tables, written next, are packed
        // as they are written).
        let mut values = Vec::new();
        for kv in self.maps.services.iter() {
            values.push(kv.map_err(map_err(names::SERVICES))?.1);
        }
        let (ring, packed) = (&self.maps.ring, self.maps.packed.as_mut());
        if let Some(p) = packed {
            repack(p, ring, values.iter());
        }
        Ok(report)
    }

    /// Attaches through the link pinned at `pin/link`, or at `from` (a pin directory being
    /// replaced): the program in the link is swapped for this one atomically
    /// (`bpf_link_update`, no packet goes unprocessed). Without a pinned link, attaches anew and
    /// pins the link. Returns the mode and whether an existing link was taken over.
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        mode: XdpMode,
        pin: &Path,
        from: Option<&Path>,
    ) -> Result<(AttachedMode, bool)> {
        let link_path = pin.join(names::LINK_PIN);
        let source = from.map_or(link_path.clone(), |f| f.join(names::LINK_PIN));
        let pinned_err = |why: String| LoaderError::Pinned {
            path: source.clone(),
            why,
        };
        let old_mode = match from {
            Some(f) => open_pinned_array::<u64>(&f.join(names::META))
                .and_then(|m| m.get(&META_XDP_MODE, 0).map_err(map_err(names::META)))
                .unwrap_or(0),
            None => self.maps.meta.get(&META_XDP_MODE, 0).unwrap_or(0),
        };
        let wanted = match mode {
            XdpMode::Native => 1,
            XdpMode::Generic => 2,
            XdpMode::Auto => old_mode,
        };
        if source.exists() && old_mode != 0 && wanted != old_mode {
            // A link cannot change its XDP mode: detach the old one, attach anew (a brief gap).
            tracing::warn!(
                "the XDP mode changes: detaching the old program before attaching in the new mode \
                 (a brief gap in forwarding)"
            );
            std::fs::remove_file(&source).map_err(|e| pinned_err(e.to_string()))?;
        }
        let mut taken = None;
        if source.exists() {
            let link = PinnedLink::from_pin(&source).map_err(|e| pinned_err(e.to_string()))?;
            let link =
                XdpLink::try_from(FdLink::from(link)).map_err(|e| pinned_err(e.to_string()))?;
            match self.program().attach_to_link(link) {
                Ok(id) => taken = Some(id),
                Err(e) => {
                    // A link whose interface went away (deleted, recreated) cannot be updated:
                    // it no longer attaches anything. Drop it and attach anew.
                    tracing::warn!(
                        "the pinned XDP link at {} cannot take the new program ({e}): its \
                         interface was probably recreated; attaching anew",
                        source.display()
                    );
                    std::fs::remove_file(&source).map_err(|e| pinned_err(e.to_string()))?;
                }
            }
        }
        if let Some(id) = taken {
            if source != link_path {
                let link = self
                    .program()
                    .take_link(id)
                    .map_err(|e| pinned_err(e.to_string()))?;
                let fd = FdLink::try_from(link).map_err(|e| pinned_err(e.to_string()))?;
                fd.pin(&link_path).map_err(|e| pinned_err(e.to_string()))?;
                std::fs::remove_file(&source).map_err(|e| pinned_err(e.to_string()))?;
            }
            let attached = match old_mode {
                1 => AttachedMode::Native,
                2 => AttachedMode::Generic,
                _ => match mode {
                    XdpMode::Generic => AttachedMode::Generic,
                    _ => AttachedMode::Native,
                },
            };
            self.set_mode(attached)?;
            return Ok((attached, true));
        }
        let attached = self.attach(interface, mode)?;
        let (id, _) = self.link.take().expect("just attached");
        let link = self
            .program()
            .take_link(id)
            .map_err(|e| pinned_err(e.to_string()))?;
        let fd = FdLink::try_from(link).map_err(|e| {
            pinned_err(format!(
                "the kernel attached without a bpf_link ({e}): XDP links need Linux ≥ 5.9"
            ))
        })?;
        fd.pin(&link_path).map_err(|e| pinned_err(e.to_string()))?;
        self.set_mode(attached)?;
        Ok((attached, false))
    }

    fn set_mode(&mut self, mode: AttachedMode) -> Result<()> {
        let v = match mode {
            AttachedMode::Native => 1,
            AttachedMode::Generic => 2,
        };
        self.maps
            .meta
            .set(META_XDP_MODE, v, 0)
            .map_err(map_err(names::META))
    }

    /// Number of entries in the connection table.
    /// Switches off a trace whose lease ran out (its `lb trace` died): the packet path is back
    /// to one branch. `now_coarse_ns` is CLOCK_MONOTONIC_COARSE. Returns whether it did.
    pub fn clear_expired_trace(&mut self, now_coarse_ns: u64) -> Result<bool> {
        let Some(map) = self.trace_cfg_name().and_then(|n| self.ebpf.map_mut(n)) else {
            return Ok(false);
        };
        let mut cfg: Array<&mut MapData, lb_common::TraceConfig> =
            Array::try_from(map).map_err(map_err(names::TRACE_CFG))?;
        let c = cfg.get(&0, 0).map_err(map_err(names::TRACE_CFG))?;
        if c.until_ns == 0 || c.until_ns >= now_coarse_ns {
            return Ok(false);
        }
        cfg.set(0, lb_common::TraceConfig::default(), 0)
            .map_err(map_err(names::TRACE_CFG))?;
        Ok(true)
    }

    /// The object's name for the trace setting's map: its data section, or (an earlier
    /// version's object, in the bench's A/B) the map `LB_TRACE_CFG`.
    fn trace_cfg_name(&self) -> Option<&'static str> {
        [names::TRACE_CFG_SECTION, names::TRACE_CFG]
            .into_iter()
            .find(|n| self.ebpf.map(n).is_some())
    }

    /// A map of the object by name (benchmarks configure their bench-only maps with it).
    pub fn map_mut(&mut self, name: &str) -> Option<&mut Map> {
        self.ebpf.map_mut(name)
    }

    /// Takes the flow-sharing maps out of the object (`lb run` with `[flow_sync]`).
    pub fn take_sync_maps(&mut self) -> Option<crate::flowsync::SyncMaps> {
        let cfg = self.ebpf.take_map(names::SYNC_CFG)?;
        let ring = self.ebpf.take_map(names::SYNC)?;
        crate::flowsync::SyncMaps::from_maps(cfg, ring).ok()
    }

    /// Takes the trace maps out of the object (tests read traces of an unpinned program).
    pub fn trace_maps(&mut self) -> Option<crate::trace::TraceMaps> {
        let cfg = self.ebpf.take_map(self.trace_cfg_name()?)?;
        let ring = self.ebpf.take_map(names::TRACE)?;
        let rate = self.ebpf.take_map(names::TRACE_RATE)?;
        crate::trace::TraceMaps::from_maps(cfg, ring, rate).ok()
    }

    pub fn flow_count(&mut self) -> Result<usize> {
        let mut n = 0;
        self.for_each_flow(|_, _| n += 1)?;
        Ok(n)
    }

    /// Every entry of `LB_FLOWS`, in batches of buckets (a few hundred system calls for 10^6
    /// entries); entry by entry where the kernel has no batch lookup.
    fn for_each_flow(&self, mut f: impl FnMut(FlowKey, FlowValue)) -> Result<()> {
        let fd = std::os::fd::AsFd::as_fd(aya::maps::IterableMap::map(&self.maps.flows).fd());
        let mut walked = false;
        let batched = super::batch::hash_map::<FlowKey, FlowValue>(fd, |keys, values| {
            walked = true;
            for (k, v) in keys.iter().zip(values) {
                f(*k, *v);
            }
        });
        match batched {
            Ok(()) => Ok(()),
            Err(_) if !walked => {
                for (k, v) in self.maps.flows.iter().flatten() {
                    f(k, v);
                }
                Ok(())
            }
            Err(e) => Err(map_err(names::FLOWS)(aya::maps::MapError::SyscallError(
                aya::sys::SyscallError {
                    call: "bpf_map_lookup_batch",
                    io_error: e,
                },
            ))),
        }
    }

    /// Active connections of backends `ids`: `LB_BE_CONNS` − `LB_BE_EXPIRED`; ids with
    /// none are left out.
    pub fn active_connections(&mut self, ids: &[u32]) -> Result<BTreeMap<u32, u64>> {
        let mut out = BTreeMap::new();
        for id in ids {
            let opened = self
                .maps
                .backend_conns
                .get(id, 0)
                .map_err(map_err(names::BACKEND_CONNS))?;
            let expired = self
                .maps
                .backend_expired
                .get(id, 0)
                .map_err(map_err(names::BACKEND_EXPIRED))?;
            let n = active_connections(opened, expired);
            if n > 0 {
                out.insert(*id, n);
            }
        }
        Ok(out)
    }

    /// Deletes flows idle longer than their timeout; counted ones still open are added to their
    /// backend's `LB_BE_EXPIRED` (the controller is its only writer). `now_ns` is
    /// CLOCK_MONOTONIC_COARSE. The whole walk at once: [`Dataplane::sweep_begin`],
    /// [`Dataplane::sweep_step`] to the end, [`Dataplane::sweep_finish`].
    pub fn sweep(
        &mut self,
        now_ns: u64,
        timeouts: &crate::config::Timeouts,
        slots: &dyn super::SlotView,
    ) -> Result<SweepStats> {
        let mut walk = self.sweep_begin(now_ns, slots)?;
        while !self.sweep_step(&mut walk, timeouts, slots, usize::MAX)? {}
        self.sweep_finish(walk, slots)
    }

    /// Starts a sweep (see [`super::Maps::sweep_begin`]): the backends whose counts it
    /// reconciles, their generations and their `LB_BE_CONNS` before the walk.
    pub fn sweep_begin(
        &mut self,
        now_ns: u64,
        slots: &dyn super::SlotView,
    ) -> Result<super::SweepWalk> {
        let generations: BTreeMap<u32, u32> = slots.live_backends().into_iter().collect();
        let ids: Vec<u32> = generations.keys().copied().collect();
        let opened_before = self.counters_of(Counter::Conns, &ids)?;
        Ok(super::SweepWalk::new(now_ns, generations, opened_before))
    }

    /// One step of a sweep (see [`super::Maps::sweep_step`]): at least `budget` entries in
    /// whole batches of buckets (the rest of the table where the kernel has no batch lookup),
    /// then the deletes of those idle past their timeout.
    pub fn sweep_step(
        &mut self,
        walk: &mut super::SweepWalk,
        timeouts: &crate::config::Timeouts,
        slots: &dyn super::SlotView,
        budget: usize,
    ) -> Result<bool> {
        use lb_common::{FLOW_F_CLOSED, PROTO_TCP};
        if walk.done {
            return Ok(true);
        }
        walk.steps += 1;
        let now_ns = walk.now_ns;
        let idle_limit = |k: &FlowKey, v: &FlowValue| -> u64 {
            if k.protocol == PROTO_TCP && v.flags & FLOW_F_CLOSED != 0 {
                timeouts.tcp_fin as u64 * 1_000_000_000
            } else {
                timeouts.open_ns(k.protocol)
            }
        };
        // An entry of a changed slot naming another backend keeps the slot changed.
        let mismatch = |v: &FlowValue, si: &super::SlotInfo| {
            si.dirty && (v.backend != si.backend || v.generation != si.generation)
        };
        let super::SweepWalk {
            generations,
            live,
            stats,
            cursor,
            ..
        } = walk;
        // Counted, open entries of a reconciled backend's generation at the start.
        let ours = |v: &FlowValue| {
            counted_and_open(v) && generations.get(&v.backend) == Some(&v.generation)
        };
        let mut candidates = Vec::new();
        let mut visit = |k: FlowKey, v: FlowValue| {
            stats.entries += 1;
            if ours(&v) {
                *live.entry(v.backend).or_default() += 1;
            }
            let info = slots.slot(&k);
            let mut seen = v.last_seen_ns;
            if let Some(si) = &info {
                // An open TCP connection of an unchanged slot: its packets skip the table, so
                // its idle time says nothing. (A UDP entry there is not needed at all: the
                // slot sends the flow to the same backend; it expires by idleness. So does a
                // TCP one of a service that records on change: its count ends with it, and the
                // connection goes on unrecorded, as one that never changed slot.)
                let open = k.protocol == PROTO_TCP
                    && !si.records_on_change
                    && v.flags & FLOW_F_CLOSED == 0;
                if !si.dirty && open && v.backend == si.backend && v.generation == si.generation {
                    stats.exempt += 1;
                    return;
                }
                if si.dirty {
                    seen = seen.max(si.changed_ns);
                }
            }
            if now_ns.saturating_sub(seen) > idle_limit(&k, &v) {
                candidates.push((k, v, info));
            } else if let Some(si) = info.filter(|si| mismatch(&v, si)) {
                stats.still_dirty.insert((si.service_id, si.slot));
            }
        };
        let fd = std::os::fd::AsFd::as_fd(aya::maps::IterableMap::map(&self.maps.flows).fd());
        let mut walked = false;
        let from = *cursor;
        let part =
            super::batch::hash_map_part::<FlowKey, FlowValue>(fd, from, budget, |keys, values| {
                walked = true;
                for (k, v) in keys.iter().zip(values) {
                    visit(*k, *v);
                }
            });
        *cursor = match part {
            Ok(next) => next,
            // No batch lookups (before 5.6): the whole table by key, in this step.
            Err(_) if !walked && from.is_none() => {
                for (k, v) in self.maps.flows.iter().flatten() {
                    visit(k, v);
                }
                None
            }
            Err(e) => {
                return Err(map_err(names::FLOWS)(aya::maps::MapError::SyscallError(
                    aya::sys::SyscallError {
                        call: "bpf_map_lookup_batch",
                        io_error: e,
                    },
                )));
            }
        };
        walk.done = walk.cursor.is_none();
        for (k, v, info) in candidates {
            // Re-read: a packet since the scan makes it live again (the window left is a
            // packet arriving between this read and the delete).
            let removed = match self.maps.flows.get(&k, 0) {
                Ok(now_v) if now_v == v => self.maps.flows.remove(&k).is_ok(),
                _ => false,
            };
            if !removed {
                if let Some(si) = info.filter(|si| mismatch(&v, si)) {
                    walk.stats.still_dirty.insert((si.service_id, si.slot));
                }
                continue;
            }
            walk.stats.expired += 1;
            if counted_and_open(&v) {
                *walk.expired.entry(v.backend).or_default() += 1;
                if walk.generations.get(&v.backend) == Some(&v.generation)
                    && let Some(n) = walk.live.get_mut(&v.backend)
                {
                    *n -= 1;
                }
            }
        }
        Ok(walk.done)
    }

    /// Ends a sweep (see [`super::Maps::sweep_finish`]): expiries of backend ids the controller
    /// does not know (any more) added as counted; the counts of the backends it knows made
    /// equal to what the table holds, for those whose id kept its generation throughout.
    pub fn sweep_finish(
        &mut self,
        walk: super::SweepWalk,
        slots: &dyn super::SlotView,
    ) -> Result<SweepStats> {
        let super::SweepWalk {
            generations,
            opened_before,
            live,
            expired,
            mut stats,
            ..
        } = walk;
        let now: BTreeMap<u32, u32> = slots.live_backends().into_iter().collect();
        // Backends the controller does not know (any more; nor did it at the start): their
        // expiries added as counted.
        for (b, n) in expired
            .iter()
            .filter(|(b, _)| !generations.contains_key(b) && !now.contains_key(b))
        {
            let map = &mut self.maps.backend_expired;
            let cur = map.get(b, 0).map_err(map_err(names::BACKEND_EXPIRED))?;
            map.set(*b, cur.wrapping_add(*n), 0)
                .map_err(map_err(names::BACKEND_EXPIRED))?;
        }
        // The others: opened − expired made equal to what the table holds.
        let ids: Vec<u32> = generations.keys().copied().collect();
        let opened_after = self.counters_of(Counter::Conns, &ids)?;
        let expired_now = self.counters_of(Counter::Expired, &ids)?;
        for (i, id) in ids.iter().enumerate() {
            if now.get(id) != generations.get(id) {
                continue; // the id went, or changed hands, during the walk
            }
            let want = super::reconciled_expired(
                opened_before[i],
                opened_after[i],
                live.get(id).copied().unwrap_or(0),
            );
            // Beyond this sweep's own expiries: connections without their entry (evicted, or
            // a close counted twice).
            let by_expiry = expired_now[i].wrapping_add(expired.get(id).copied().unwrap_or(0));
            let off = want.wrapping_sub(by_expiry) as i64;
            if off > 0 {
                stats.uncounted += off as u64;
            } else {
                stats.recounted += off.unsigned_abs();
            }
            if want != expired_now[i] {
                self.maps
                    .backend_expired
                    .set(*id, want, 0)
                    .map_err(map_err(names::BACKEND_EXPIRED))?;
            }
        }
        Ok(stats)
    }

    /// `LB_BE_CONNS` or `LB_BE_EXPIRED` of `ids` (sorted), read with batch lookups of the
    /// range they span (one lookup each if the kernel has none).
    fn counters_of(&self, which: Counter, ids: &[u32]) -> Result<Vec<u64>> {
        let (map, name) = match which {
            Counter::Conns => (&self.maps.backend_conns, names::BACKEND_CONNS),
            Counter::Expired => (&self.maps.backend_expired, names::BACKEND_EXPIRED),
        };
        let Some(last) = ids.last() else {
            return Ok(Vec::new());
        };
        let fd = std::os::fd::AsFd::as_fd(aya::maps::IterableMap::map(map).fd());
        if let Ok(all) = super::batch::per_cpu_array::<u64>(fd, last + 1, 1) {
            return Ok(ids.iter().map(|id| all[*id as usize]).collect());
        }
        ids.iter()
            .map(|id| map.get(id, 0).map_err(map_err(name)))
            .collect()
    }

    /// Backend writes in order (`Op::Backend`: id, value, fresh, meta): each fresh one's
    /// counters zeroed, then its `LB_BE_META`, then its `LB_BACKENDS` entry. A run of
    /// [`BATCH_BACKENDS`] or more goes map by map, each with `BPF_MAP_UPDATE_BATCH` calls
    /// (one at a time, 10 000 fresh backends were 50 000 system calls, 23-25 ms; batched
    /// 10-12 ms, the kernel's own writes): every fresh backend's counters, then every one's
    /// meta, then every one's entry, so none is seen before its counters are zeroed, as one at
    /// a time. A kernel without batch updates, and any error in them, takes the writes one at
    /// a time (each write sets a whole value: doing one twice changes nothing), which also
    /// names what failed.
    fn write_backends(&mut self, writes: &[BackendWrite]) -> Result<()> {
        if writes.len() >= BATCH_BACKENDS && self.write_backends_batched(writes).is_ok() {
            return Ok(());
        }
        for (id, value, fresh, meta) in writes {
            if *fresh {
                self.reset_backend_counters(*id)?;
            }
            self.maps
                .backend_meta
                .set(*id, meta, 0)
                .map_err(map_err(names::BACKEND_META))?;
            self.set_backend(*id, value)?;
        }
        Ok(())
    }

    /// [`Dataplane::write_backends`] map by map with batch updates.
    fn write_backends_batched(&mut self, writes: &[BackendWrite]) -> std::io::Result<()> {
        use std::os::fd::AsFd as _;

        use super::batch::write_entries;
        use aya::maps::IterableMap as _;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let fresh: Vec<u32> = writes.iter().filter(|w| w.2).map(|w| w.0).collect();
        let ids: Vec<u32> = writes.iter().map(|w| w.0).collect();
        let m = &self.maps;
        let zeros = vec![0u8; fresh.len() * size_of::<u64>()];
        write_entries(m.backend_conns.map().fd().as_fd(), &fresh, &zeros, 8)?;
        write_entries(m.backend_expired.map().fd().as_fd(), &fresh, &zeros, 8)?;
        let per_cpu = size_of::<Counters>().next_multiple_of(8) * cpus;
        let zeros = vec![0u8; fresh.len() * per_cpu];
        write_entries(m.backend_stats.map().fd().as_fd(), &fresh, &zeros, per_cpu)?;
        let metas: Vec<BackendMeta> = writes.iter().map(|w| w.3).collect();
        write_entries(
            m.backend_meta.map().fd().as_fd(),
            &ids,
            bytemuck::cast_slice(&metas),
            size_of::<BackendMeta>(),
        )?;
        let values: Vec<Backend> = writes.iter().map(|w| w.1).collect();
        write_entries(
            m.backends.map().fd().as_fd(),
            &ids,
            bytemuck::cast_slice(&values),
            size_of::<Backend>(),
        )
    }

    /// Zeroes a backend id's per-CPU counters (traffic, connections, expired): a new backend
    /// taking the id starts from nothing.
    fn reset_backend_counters(&mut self, id: u32) -> Result<()> {
        let n =
            aya::util::nr_cpus().map_err(|(_, e)| syscall(names::BACKEND_CONNS, "nr_cpus", e))?;
        let m = &mut self.maps;
        for (map, name) in [
            (&mut m.backend_conns, names::BACKEND_CONNS),
            (&mut m.backend_expired, names::BACKEND_EXPIRED),
        ] {
            map.set(id, 0, 0).map_err(map_err(name))?;
        }
        let zeros = per_cpu_values(vec![Counters::default(); n], names::BACKEND_STATS)?;
        m.backend_stats
            .set(id, zeros, 0)
            .map_err(map_err(names::BACKEND_STATS))
    }

    /// The connection table entry of `key`, if any.
    /// Writes the connection table entry of `key` (tests, and tools repairing a table).
    pub fn set_flow(&mut self, key: &FlowKey, value: &FlowValue) -> Result<()> {
        self.maps
            .flows
            .insert(key, value, 0)
            .map_err(map_err(names::FLOWS))
    }

    pub fn flow(&mut self, key: &FlowKey) -> Result<Option<FlowValue>> {
        match self.maps.flows.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::FLOWS)(e)),
        }
    }

    /// Backend `id`'s counters summed over CPUs, read both ways: with the batch lookup the
    /// snapshot uses, and with a lookup of the one entry (tests).
    pub fn backend_counters_both(&self, id: u32) -> Result<(Counters, Counters)> {
        let map = &self.maps.backend_stats;
        let batched = counter_sums(map, id + 1)
            .map_err(|e| syscall(names::BACKEND_STATS, "BPF_MAP_LOOKUP_BATCH", e))?;
        Ok((
            batched[id as usize],
            counter_sum(map, names::BACKEND_STATS, id)?,
        ))
    }

    /// Word `i` of `LB_SVC_CACHE` (tests: slot `s` is words `16·s ..`).
    pub fn svc_cache_word(&self, i: u32) -> u32 {
        self.maps.svc_cache.words().get(i).unwrap_or(0)
    }

    /// Writes word `i` of `LB_SVC_CACHE` behind the controller's back (tests).
    pub fn set_svc_cache_word(&self, i: u32, v: u32) {
        self.maps.svc_cache.words().set(i, v);
    }

    /// Removes `key` from `LB_SERVICES` alone, its cache entry left as it is (tests).
    pub fn remove_service_entry(&mut self, key: &ServiceKey) -> Result<()> {
        self.maps
            .services
            .remove(key)
            .map_err(map_err(names::SERVICES))
    }

    /// Sets the record limit (`dataplane.record_limit`: SYNs recorded a second per CPU through
    /// unchanged maglev/sh slots; 0: none) of this loaded program, on every CPU. Its counts
    /// start from zero.
    pub fn set_record_limit(&mut self, limit: u32) -> Result<()> {
        let Some(map) = self.maps.record_rate.as_mut() else {
            return Ok(());
        };
        let cpus =
            aya::util::nr_cpus().map_err(|(_, e)| syscall(names::RECORD_RATE, "nr_cpus", e))?;
        let value = RecordRate {
            limit: limit.into(),
            ..RecordRate::default()
        };
        let values = aya::maps::PerCpuValues::try_from(vec![value; cpus])
            .map_err(|e| syscall(names::RECORD_RATE, "per-CPU values", e))?;
        map.set(0, values, 0).map_err(map_err(names::RECORD_RATE))
    }

    /// Whether this program hands the SYNs it would record through unchanged slots to the
    /// controller (`dataplane.defer_records`), on every CPU. Returns whether it does: an
    /// object without `LB_RECORD` never does. Before the program takes traffic (on), and
    /// when the controller stops (off: the next SYNs are recorded on the packet path; what is
    /// left in the pinned ring waits for the next controller).
    pub fn set_defer_records(&mut self, on: bool) -> Result<bool> {
        let on = on && self.maps.records.is_some();
        let Some(map) = self.maps.record_rate.as_mut() else {
            return Ok(false);
        };
        let now = map.get(&0, 0).map_err(map_err(names::RECORD_RATE))?;
        let values: Vec<RecordRate> = now
            .iter()
            .map(|r| RecordRate {
                defer: on.into(),
                ..*r
            })
            .collect();
        let values = aya::maps::PerCpuValues::try_from(values)
            .map_err(|e| syscall(names::RECORD_RATE, "per-CPU values", e))?;
        map.set(0, values, 0).map_err(map_err(names::RECORD_RATE))?;
        self.maps.defer = on;
        // The records are applied in the kernel by `lb_record_apply` (one table insert each, no
        // system call), or else one update each.
        if on && !self.maps.apply && self.maps.record_in.is_some() {
            match self.other_program(names::RECORD_APPLY) {
                Ok(_) => self.maps.apply = true,
                Err(e) => tracing::warn!(
                    "{}: {e}; the controller records one update at a time",
                    names::RECORD_APPLY
                ),
            }
        }
        Ok(on)
    }

    /// Whether records are applied in the kernel by `lb_record_apply` (tests switch it off to
    /// test the other way: one update each). Returns whether they are.
    pub fn set_apply_in_kernel(&mut self, on: bool) -> bool {
        self.maps.apply = on && self.maps.record_in.is_some() && self.maps.defer;
        self.maps.apply
    }

    /// `records` applied by `lb_record_apply` (see [`super::Maps::record_flows`]): written
    /// into `LB_RECORD_IN` ([`RECORD_APPLY_BATCH`] a run at most), then one test run each.
    fn apply_in_kernel(
        &mut self,
        records: &[lb_common::RecordEvent],
    ) -> Result<super::RecordStats> {
        use aya::TestRun as _;
        use lb_common::limits::RECORD_APPLY_BATCH;
        let mut st = super::RecordStats::default();
        for chunk in records.chunks(RECORD_APPLY_BATCH as usize) {
            let map = self.maps.record_in.as_ref().expect("checked by the caller");
            let fd = std::os::fd::AsFd::as_fd(aya::maps::IterableMap::map(map).fd());
            super::batch::write_array(fd, chunk)
                .map_err(|e| syscall(names::RECORD_IN, "update batch", e))?;
            let mut frame = [0u8; 64];
            frame[..4].copy_from_slice(&(chunk.len() as u32).to_ne_bytes());
            let mut out = [0u8; 64];
            let prog = self.other_program(names::RECORD_APPLY)?;
            prog.test_run(aya::programs::TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..aya::programs::TestRunOptions::new()
            })
            .map_err(|source| LoaderError::Program {
                name: names::RECORD_APPLY,
                source: Box::new(source),
            })?;
            let word = |i: usize| u32::from_ne_bytes(out[4 * i..4 * i + 4].try_into().unwrap());
            st.inserted += u64::from(word(1));
            st.skipped += u64::from(word(2));
            st.closed += u64::from(word(3));
        }
        Ok(st)
    }

    /// The record limit's and `LB_RECORD`'s counts since this program was loaded (all CPUs):
    /// SYNs kept out of the table by the limit, handed to the controller, recorded here for a
    /// full ring.
    fn record_counts(&self) -> Result<(u64, u64, u64)> {
        let Some(map) = self.maps.record_rate.as_ref() else {
            return Ok((0, 0, 0));
        };
        let v = map.get(&0, 0).map_err(map_err(names::RECORD_RATE))?;
        Ok(v.iter().fold((0, 0, 0), |(l, d, f), r| {
            (l + r.window.suppressed, d + r.deferred, f + r.defer_full)
        }))
    }

    /// The single pass's two-in-one counter `stat` (`LB_STATS_FAST`), summed over CPUs, as the
    /// map holds it (the snapshot adds it to both counters it stands for); 0 for an object
    /// without the map.
    pub fn fast_stat(&self, stat: FastStat) -> Result<u64> {
        let Some(fast) = &self.maps.stats_fast else {
            return Ok(0);
        };
        let v = fast
            .get(&(stat as u32), 0)
            .map_err(map_err(names::STATS_FAST))?;
        Ok(v.iter().sum())
    }

    /// Reads every counter, summed over CPUs.
    pub fn snapshot(&mut self, desired: &DesiredState) -> Result<Snapshot> {
        let (record_limited, record_deferred, record_ring_full) = self.record_counts()?;
        let mut snap = Snapshot {
            record_limited,
            record_deferred,
            record_ring_full,
            ..Snapshot::default()
        };
        for (i, stat) in Stat::ALL.iter().enumerate().take(STATS_LEN as usize) {
            let v = self
                .maps
                .stats
                .get(&(i as u32), 0)
                .map_err(map_err(names::STATS))?;
            snap.global.push((*stat, v.iter().sum()));
        }
        // The single pass's two-in-one counters, added to both counters each stands for.
        for f in FastStat::ALL {
            let n = self.fast_stat(f)?;
            for stat in f.stats() {
                if let Some((_, c)) = snap.global.iter_mut().find(|(s, _)| *s == stat) {
                    *c += n;
                }
            }
        }
        let read = |map: &PerCpuArray<MapData, Counters>,
                    name: &'static str,
                    ids: &mut dyn Iterator<Item = u32>| {
            let ids: Vec<u32> = ids.collect();
            // All entries up to the largest id in a few calls; per id if the kernel cannot.
            let n = ids.iter().max().map_or(0, |m| m + 1);
            if let Ok(sums) = counter_sums(map, n) {
                return Ok(ids.into_iter().map(|id| (id, sums[id as usize])).collect());
            }
            ids.into_iter()
                .map(|id| Ok((id, counter_sum(map, name, id)?)))
                .collect::<Result<BTreeMap<_, _>>>()
        };
        snap.services = read(
            &self.maps.service_stats,
            names::SERVICE_STATS,
            &mut desired.services.iter().map(|s| s.value.id),
        )?;
        snap.backends = read(
            &self.maps.backend_stats,
            names::BACKEND_STATS,
            &mut desired.backends.keys().map(|id| id.0),
        )?;
        Ok(snap)
    }
}

impl Maps for Dataplane {
    fn apply_ops(&mut self, ops: &[Op]) -> Result<()> {
        // Tables written whole in this call without changed slots and kept narrow, by service
        // id (until a slot of theirs is written again): their services are packed from their
        // fields (`Packer::pack_fields`) instead of a pass over `LB_RING` that finds them.
        let mut narrow: std::collections::HashMap<u32, (u32, &crate::desired::Narrow)> =
            std::collections::HashMap::new();
        // A run of backend writes, written together before the next other op.
        let mut backends: Vec<BackendWrite> = Vec::new();
        for op in ops {
            check_op(op)?;
            if let Op::Backend {
                id,
                value,
                fresh,
                meta,
            } = op
            {
                backends.push((id.0, *value, *fresh, *meta));
                continue;
            }
            self.write_backends(&backends)?;
            backends.clear();
            let m = &mut self.maps;
            match op {
                Op::TxPort { slot, ifindex } => m
                    .tx_ports
                    .set(*slot, *ifindex, None, 0)
                    .map_err(|e| LoaderError::TxPort(Box::new(e)))?,
                Op::Backend { .. } => unreachable!("written in runs, above"),
                Op::RetireBackend { id, value } => {
                    self.set_backend(id.0, value)?;
                    self.maps
                        .backend_meta
                        .set(id.0, BackendMeta::default(), 0)
                        .map_err(map_err(names::BACKEND_META))?;
                }
                Op::Ring {
                    service_id,
                    base,
                    slots,
                } => {
                    narrow.remove(service_id);
                    for (slot, backend) in slots {
                        self.write_slot(base.wrapping_add(*slot), *backend)?;
                    }
                    let (ring, base) = (&self.maps.ring, *base);
                    if let Some(p) = self.maps.packed.as_mut() {
                        p.update(*service_id, base, slots, |i| {
                            ring.get(base.wrapping_add(i)).unwrap_or(NO_BACKEND)
                        });
                    }
                }
                Op::Table {
                    service_id,
                    base,
                    ring,
                    dirty,
                    prev,
                } => {
                    if dirty.is_empty() {
                        // No changed slot: every slot's value is its backend id (or the empty
                        // slot's NO_BACKEND), as built. One run of stores (a table from scratch
                        // is 65 537 slots by default, and a config holds up to 1 024). A table
                        // of bytes: each slot's id from a table of 256 (no bounds check, no
                        // dispatch on the table's form a slot).
                        let written = match ring.narrow() {
                            Some(n) => {
                                let mut id = [NO_BACKEND; lb_common::packed::IDS];
                                id[..n.ids.len()].copy_from_slice(&n.ids);
                                let vals = n.fields.iter().map(|&f| id[f as usize]);
                                self.maps.ring.set_run(*base, vals)
                            }
                            None => self.maps.ring.set_run(*base, ring.iter()),
                        };
                        if !written {
                            return Err(LoaderError::RingIndex {
                                index: base.saturating_add(ring.len() as u32),
                                len: self.maps.ring.slots(),
                            });
                        }
                    } else {
                        for i in 0..ring.len() {
                            if let Some(v) = crate::desired::slot_value(ring, dirty, prev, i) {
                                self.write_slot(base.wrapping_add(i as u32), v)?;
                            }
                        }
                    }
                    let fields = ring.narrow().filter(|_| dirty.is_empty());
                    match fields {
                        Some(n) => narrow.insert(*service_id, (*base, n)),
                        None => narrow.remove(service_id),
                    };
                    // A packed service's table written whole in place is packed again; one that
                    // moved is unpacked until its service (with the new range) is written.
                    let (mem, base) = (&self.maps.ring, *base);
                    if let Some(p) = self.maps.packed.as_mut() {
                        let size = ring.len() as u32;
                        match fields {
                            Some(n) if p.packed_at(*service_id) == Some((base, size)) => {
                                p.pack_fields(*service_id, base, &n.fields, &n.ids, &n.counts)
                            }
                            _ => p.rewritten(*service_id, base, size, |i| {
                                mem.get(base.wrapping_add(i)).unwrap_or(NO_BACKEND)
                            }),
                        }
                    }
                }
                Op::Service { key, value } => {
                    m.services
                        .insert(key, value, 0)
                        .map_err(map_err(names::SERVICES))?;
                    m.svc_cache.set(key.cache_key(), value);
                    let ring = &m.ring;
                    if let Some(p) = m.packed.as_mut() {
                        let fields = narrow.get(&value.id).filter(|(base, n)| {
                            (*base, n.fields.len()) == (value.ring_base, value.ring_size as usize)
                        });
                        if !packs(value) {
                            p.unpack(value.id);
                        } else if let Some((_, n)) = fields {
                            p.pack_fields(value.id, value.ring_base, &n.fields, &n.ids, &n.counts);
                        } else {
                            // The table as one run of the mapping (no bounds check a slot).
                            match ring.run(value.ring_base, value.ring_size) {
                                Some(run) => p.pack_values(
                                    value.id,
                                    value.ring_base,
                                    value.ring_size,
                                    run.iter()
                                        .map(|s| s.load(std::sync::atomic::Ordering::Relaxed)),
                                ),
                                None => p.pack(value.id, value.ring_base, value.ring_size, |i| {
                                    ring.get(value.ring_base.wrapping_add(i))
                                        .unwrap_or(NO_BACKEND)
                                }),
                            }
                        }
                    }
                }
                Op::RemoveService(key) => {
                    let id = m.services.get(key, 0).ok().map(|v| v.id);
                    match m.services.remove(key) {
                        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                        Err(e) => return Err(map_err(names::SERVICES)(e)),
                    }
                    m.svc_cache.remove(key.cache_key());
                    if let (Some(p), Some(id)) = (m.packed.as_mut(), id) {
                        p.unpack(id);
                    }
                }
                Op::Vip { key, value } => {
                    m.vips.insert(key, value, 0).map_err(map_err(names::VIPS))?
                }
                Op::RemoveVip(key) => match m.vips.remove(key) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(names::VIPS)(e)),
                },
                Op::Flags(flags) => m.flags.set(0, flags, 0).map_err(map_err(names::FLAGS))?,
                Op::VipFilter { slot, on } => m
                    .vip_filter
                    .set(*slot, u8::from(*on), 0)
                    .map_err(map_err(names::VIP_FILTER))?,
            }
        }
        self.write_backends(&backends)
    }

    fn active_connections(&mut self, ids: &[BackendId]) -> Result<BTreeMap<BackendId, u64>> {
        let raw: Vec<u32> = ids.iter().map(|i| i.0).collect();
        Ok(Dataplane::active_connections(self, &raw)?
            .into_iter()
            .map(|(id, n)| (BackendId(id), n))
            .collect())
    }

    fn snapshot(&mut self, desired: &DesiredState) -> Result<Snapshot> {
        Dataplane::snapshot(self, desired)
    }

    fn packed_bits(&self, service_id: u32) -> u32 {
        Dataplane::packed_bits(self, service_id)
    }

    fn sweep_begin(
        &mut self,
        now_ns: u64,
        slots: &dyn super::SlotView,
    ) -> Result<super::SweepWalk> {
        Dataplane::sweep_begin(self, now_ns, slots)
    }

    fn sweep_step(
        &mut self,
        walk: &mut super::SweepWalk,
        timeouts: &crate::config::Timeouts,
        slots: &dyn super::SlotView,
        budget: usize,
    ) -> Result<bool> {
        Dataplane::sweep_step(self, walk, timeouts, slots, budget)
    }

    fn sweep_finish(
        &mut self,
        walk: super::SweepWalk,
        slots: &dyn super::SlotView,
    ) -> Result<SweepStats> {
        Dataplane::sweep_finish(self, walk, slots)
    }

    fn flow_entry(&mut self, key: &FlowKey) -> Result<Option<FlowValue>> {
        self.flow(key)
    }

    fn ring_entry(&mut self, svc: &ServiceValue, slot: u32) -> Result<u32> {
        let index = svc.ring_base.wrapping_add(slot);
        self.maps.ring.get(index).ok_or(LoaderError::RingIndex {
            index,
            len: self.maps.ring.slots(),
        })
    }

    fn defers_records(&self) -> bool {
        self.maps.defer
    }

    fn set_defer_records(&mut self, on: bool) -> Result<bool> {
        Dataplane::set_defer_records(self, on)
    }

    fn take_records(&mut self, max: usize) -> Vec<lb_common::RecordEvent> {
        let Some(ring) = self.maps.records.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while out.len() < max {
            let Some(item) = ring.next() else {
                break;
            };
            if item.len() >= size_of::<lb_common::RecordEvent>() {
                // SAFETY: the item holds at least a RecordEvent's bytes (checked); the type is
                // plain old data, read unaligned.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        out
    }

    fn record_flows(
        &mut self,
        records: &[lb_common::RecordEvent],
        now_ns: u64,
    ) -> Result<super::RecordStats> {
        if self.maps.apply {
            return self.apply_in_kernel(records);
        }
        let m = &mut self.maps;
        let flows = std::cell::RefCell::new(&mut m.flows);
        let backends = &m.backends;
        let (st, expired) = super::record_flows_with(
            records,
            now_ns,
            |k| match flows.borrow().get(k, 0) {
                Ok(v) => Ok(Some(v)),
                Err(aya::maps::MapError::KeyNotFound) => Ok(None),
                Err(e) => Err(map_err(names::FLOWS)(e)),
            },
            // One update each: `BPF_MAP_UPDATE_BATCH` takes no `BPF_NOEXIST` (its element
            // flags allow `BPF_F_LOCK` alone), and overwriting an entry the packet path made
            // meanwhile would count its connection twice.
            |run| {
                let mut f = flows.borrow_mut();
                run.iter().map(|(k, v)| insert_new(&mut f, k, v)).collect()
            },
            // BPF_EXIST: an entry evicted meanwhile is not made again.
            |k, v| match flows.borrow_mut().insert(k, v, 2) {
                Ok(()) => Ok(()),
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
                {
                    Ok(())
                }
                Err(e) => Err(map_err(names::FLOWS)(e)),
            },
            |id| backends.get(&id, 0).ok().map(|b| b.generation),
        )?;
        for (id, d) in expired {
            let was = m
                .backend_expired
                .get(&id, 0)
                .map_err(map_err(names::BACKEND_EXPIRED))?;
            m.backend_expired
                .set(id, was.wrapping_add(d), 0)
                .map_err(map_err(names::BACKEND_EXPIRED))?;
        }
        Ok(st)
    }

    fn insert_shared_flow(&mut self, key: &FlowKey, value: &FlowValue) -> Result<bool> {
        // An entry this node recorded (or an earlier share) stays.
        insert_new(&mut self.maps.flows, key, value)
    }

    fn rr_cursor(&mut self, service_id: u32) -> Result<u64> {
        self.maps
            .rr_cursor
            .get(&service_id, 0)
            .map_err(map_err(names::RR_CURSOR))
    }
}

/// Inserts `key` → `value` into the connection table unless it has an entry for `key`
/// (`BPF_NOEXIST`). Returns whether it inserted.
fn insert_new(
    flows: &mut HashMap<MapData, FlowKey, FlowValue>,
    key: &FlowKey,
    value: &FlowValue,
) -> Result<bool> {
    match flows.insert(key, value, 1) {
        Ok(()) => Ok(true),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
        {
            Ok(false)
        }
        Err(e) => Err(map_err(names::FLOWS)(e)),
    }
}

/// Entries `0..n` of a per-CPU counter array, each summed over the CPUs, read with batch
/// lookups (see `batch.rs`).
fn counter_sums(map: &PerCpuArray<MapData, Counters>, n: u32) -> std::io::Result<Vec<Counters>> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?.max(1);
    let fd = std::os::fd::AsFd::as_fd(aya::maps::IterableMap::map(map).fd());
    let all = super::batch::per_cpu_array::<Counters>(fd, n, cpus)?;
    Ok(all
        .chunks(cpus)
        .map(|per_cpu| {
            let mut sum = Counters::default();
            for c in per_cpu {
                sum.add(c);
            }
            sum
        })
        .collect())
}

/// Entry `id` of a per-CPU counter array (`name`), summed over the CPUs, with one lookup.
fn counter_sum(
    map: &PerCpuArray<MapData, Counters>,
    name: &'static str,
    id: u32,
) -> Result<Counters> {
    let mut sum = Counters::default();
    for c in map.get(&id, 0).map_err(map_err(name))?.iter() {
        sum.add(c);
    }
    Ok(sum)
}

/// The data plane's form of the interface MAC (`LB_IF_MAC`): its bytes in the low six bytes
/// of a little-endian u64.
fn mac_word(mac: [u8; 6]) -> u64 {
    let mut w = [0u8; 8];
    w[..6].copy_from_slice(&mac);
    u64::from_le_bytes(w)
}

/// A service value of layouts 1 and 2 (id, scheduler, flags, sequence length) in today's form:
/// no table range yet (`ring_size` 0). Adopted like that, the service's new table is written
/// whole, every slot marked changed, so its established flows keep their backends through their
/// connection-table entries (the slot formula changed with layout 3).
pub fn service_from_v2(v: [u32; 4]) -> ServiceValue {
    ServiceValue {
        id: v[0],
        scheduler: v[1],
        flags: v[2],
        ring_len: v[3],
        ring_base: 0,
        ring_size: 0,
    }
}

/// A counter array of pinned maps being migrated: per CPU in layout 1 (summed), shared since.
enum OldCounter {
    PerCpu(PerCpuArray<MapData, u64>),
    Shared(Array<MapData, u64>),
}

impl OldCounter {
    fn open(path: &Path, layout: u64) -> Result<OldCounter> {
        if layout == 1 {
            open_pinned_per_cpu(path).map(OldCounter::PerCpu)
        } else {
            open_pinned_array(path).map(OldCounter::Shared)
        }
    }

    fn get(&self, id: u32, name: &'static str) -> Result<u64> {
        match self {
            OldCounter::PerCpu(m) => {
                let v = m.get(&id, 0).map_err(map_err(name))?;
                Ok(v.iter().fold(0u64, |a, x| a.wrapping_add(*x)))
            }
            OldCounter::Shared(m) => m.get(&id, 0).map_err(map_err(name)),
        }
    }
}

/// An `Op::Backend`'s write: id, value, fresh (its counters zeroed first), meta.
type BackendWrite = (u32, Backend, bool, BackendMeta);

/// Backend writes from which [`Dataplane::write_backends`] batches them (fewer: one at a
/// time, as a reload that changes a backend or two writes them).
const BATCH_BACKENDS: usize = 16;

fn per_cpu_values<T: aya::Pod>(
    vals: Vec<T>,
    name: &'static str,
) -> Result<aya::maps::PerCpuValues<T>> {
    aya::maps::PerCpuValues::try_from(vals).map_err(|e| syscall(name, "per-cpu values", e))
}

fn syscall(name: &'static str, call: &'static str, io_error: std::io::Error) -> LoaderError {
    LoaderError::Map {
        name,
        source: Box::new(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call,
            io_error,
        })),
    }
}
