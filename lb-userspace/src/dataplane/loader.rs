//! Loads `lb_xdp`, writes the desired state into its maps, attaches it, reads its counters.
//!
//! The only file that talks to the kernel's BPF maps: the map handles are taken once, typed,
//! right after the program is loaded; the controller's policy never sees them.

use std::collections::BTreeMap;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMap, HashMap, Map, MapData, PerCpuArray},
    programs::{Xdp, XdpMode as AyaXdpMode, xdp::XdpLinkId},
};
use lb_common::{
    Backend, Counters, FlowKey, FlowValue, ServiceKey, ServiceValue, VipKey,
    limits::MAX_SERVICES,
    names,
    rules::{active_connections, counted_and_open},
    stats::{STATS_LEN, Stat},
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
}

/// Every map of `lb_xdp`, typed, taken from the object once.
struct Handles {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    vips: HashMap<MapData, VipKey, u32>,
    backends: Array<MapData, Backend>,
    ring: Array<MapData, u32>,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    flags: Array<MapData, u32>,
    tx_ports: DevMap<MapData>,
    stats: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    backend_conns: PerCpuArray<MapData, u64>,
    backend_expired: PerCpuArray<MapData, u64>,
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
        Ok(Handles {
            services: take(ebpf, names::SERVICES)?,
            vips: take(ebpf, names::VIPS)?,
            backends: take(ebpf, names::BACKENDS)?,
            ring: take(ebpf, names::RING)?,
            flows: take(ebpf, names::FLOWS)?,
            flags: take(ebpf, names::FLAGS)?,
            tx_ports: take(ebpf, names::TX_PORTS)?,
            stats: take(ebpf, names::STATS)?,
            service_stats: take(ebpf, names::SERVICE_STATS)?,
            backend_stats: take(ebpf, names::BACKEND_STATS)?,
            backend_conns: take(ebpf, names::BACKEND_CONNS)?,
            backend_expired: take(ebpf, names::BACKEND_EXPIRED)?,
        })
    }
}

/// What a sweep of the connection table did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Entries seen.
    pub entries: u64,
    /// Idle entries deleted.
    pub expired: u64,
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
    /// Loads the embedded object with the given table sizes (not attached yet).
    pub fn load(ring_size: u32, flow_table_size: u32) -> Result<Dataplane> {
        Dataplane::load_object(crate::EBPF_OBJECT, ring_size, flow_table_size)
    }

    /// Loads `object` (tests pass the embedded one too; kept separate for clarity).
    pub fn load_object(object: &[u8], ring_size: u32, flow_table_size: u32) -> Result<Dataplane> {
        if object.is_empty() {
            return Err(LoaderError::NoObject);
        }
        let mut ebpf = EbpfLoader::new()
            .override_global(names::GLOBAL_RING_SIZE, &ring_size, true)
            .map_max_entries(names::RING, MAX_SERVICES * ring_size)
            .map_max_entries(names::FLOWS, flow_table_size)
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

    /// Detaches from the interface (also happens when the `Dataplane` is dropped).
    pub fn detach(&mut self) -> Result<()> {
        if let Some((id, _)) = self.link.take() {
            self.program()
                .detach(id)
                .map_err(|source| LoaderError::Program {
                    name: names::PROGRAM,
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// Writes `desired` into empty maps.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<()> {
        let (ops, _) = diff(None, desired);
        self.apply_ops(&ops, desired.ring_size)
    }

    /// Writes one backend entry (tests use it to mark a backend down or change a MAC).
    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.maps
            .backends
            .set(id, backend, 0)
            .map_err(map_err(names::BACKENDS))
    }

    /// Rewrites one service's whole table (tests).
    pub fn set_ring(&mut self, service_id: u32, ring_size: u32, ring: &[u32]) -> Result<()> {
        for (slot, backend) in ring.iter().enumerate() {
            self.set_slot(service_id, ring_size, slot as u32, *backend)?;
        }
        Ok(())
    }

    fn set_slot(&mut self, service_id: u32, ring_size: u32, slot: u32, backend: u32) -> Result<()> {
        self.maps
            .ring
            .set(service_id * ring_size + slot, backend, 0)
            .map_err(map_err(names::RING))
    }

    /// Number of entries in the connection table.
    pub fn flow_count(&mut self) -> Result<usize> {
        Ok(self.maps.flows.keys().filter(|k| k.is_ok()).count())
    }

    /// Active connections of backends `ids`: Σcpu `LB_BE_CONNS` − Σcpu `LB_BE_EXPIRED`; ids with
    /// none are left out.
    pub fn active_connections(&mut self, ids: &[u32]) -> Result<BTreeMap<u32, u64>> {
        let mut out = BTreeMap::new();
        for id in ids {
            let opened = per_cpu_sum(&self.maps.backend_conns, names::BACKEND_CONNS, *id)?;
            let expired = per_cpu_sum(&self.maps.backend_expired, names::BACKEND_EXPIRED, *id)?;
            let n = active_connections(opened, expired);
            if n > 0 {
                out.insert(*id, n);
            }
        }
        Ok(out)
    }

    /// Deletes flows idle longer than their timeout; counted ones still open are added to
    /// `LB_BE_EXPIRED` on the CPU that counted them. `now_ns` is CLOCK_MONOTONIC_COARSE.
    pub fn sweep(&mut self, now_ns: u64, timeouts: &crate::config::Timeouts) -> Result<SweepStats> {
        use lb_common::{FLOW_F_CLOSED, PROTO_TCP};
        let idle_limit = |k: &FlowKey, v: &FlowValue| -> u64 {
            let secs = if k.protocol != PROTO_TCP {
                timeouts.udp
            } else if v.flags & FLOW_F_CLOSED != 0 {
                timeouts.tcp_fin
            } else {
                timeouts.tcp
            };
            secs as u64 * 1_000_000_000
        };
        let mut stats = SweepStats::default();
        let mut candidates = Vec::new();
        for (k, v) in self.maps.flows.iter().flatten() {
            stats.entries += 1;
            if now_ns.saturating_sub(v.last_seen_ns) > idle_limit(&k, &v) {
                candidates.push((k, v));
            }
        }
        let mut expired: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        for (k, v) in candidates {
            // Re-read: a packet since the scan makes it live again (the window left is a
            // packet arriving between this read and the delete).
            match self.maps.flows.get(&k, 0) {
                Ok(now_v) if now_v == v => {}
                _ => continue,
            }
            if self.maps.flows.remove(&k).is_ok() {
                stats.expired += 1;
                if counted_and_open(&v) {
                    *expired.entry((v.backend, v.cpu)).or_default() += 1;
                }
            }
        }
        let mut by_backend: BTreeMap<u32, Vec<(u32, u64)>> = BTreeMap::new();
        for ((b, cpu), n) in expired {
            by_backend.entry(b).or_default().push((cpu, n));
        }
        for (b, adds) in by_backend {
            let map = &mut self.maps.backend_expired;
            let cur = map.get(&b, 0).map_err(map_err(names::BACKEND_EXPIRED))?;
            let mut vals: Vec<u64> = cur.iter().copied().collect();
            for (cpu, n) in adds {
                if let Some(slot) = vals.get_mut(cpu as usize) {
                    *slot = slot.wrapping_add(n);
                }
            }
            let vals = per_cpu_values(vals, names::BACKEND_EXPIRED)?;
            map.set(b, vals, 0)
                .map_err(map_err(names::BACKEND_EXPIRED))?;
        }
        Ok(stats)
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
            map.set(id, per_cpu_values(vec![0u64; n], name)?, 0)
                .map_err(map_err(name))?;
        }
        let zeros = per_cpu_values(vec![Counters::default(); n], names::BACKEND_STATS)?;
        m.backend_stats
            .set(id, zeros, 0)
            .map_err(map_err(names::BACKEND_STATS))
    }

    /// The connection table entry of `key`, if any.
    pub fn flow(&mut self, key: &FlowKey) -> Result<Option<FlowValue>> {
        match self.maps.flows.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::FLOWS)(e)),
        }
    }

    /// Reads every counter, summed over CPUs.
    pub fn snapshot(&mut self, desired: &DesiredState) -> Result<Snapshot> {
        let mut snap = Snapshot::default();
        for (i, stat) in Stat::ALL.iter().enumerate().take(STATS_LEN as usize) {
            let v = self
                .maps
                .stats
                .get(&(i as u32), 0)
                .map_err(map_err(names::STATS))?;
            snap.global.push((*stat, v.iter().sum()));
        }
        let read = |map: &PerCpuArray<MapData, Counters>,
                    name: &'static str,
                    ids: &mut dyn Iterator<Item = u32>| {
            let mut out = BTreeMap::new();
            for id in ids {
                let per_cpu = map.get(&id, 0).map_err(map_err(name))?;
                let mut sum = Counters::default();
                for c in per_cpu.iter() {
                    sum.add(c);
                }
                out.insert(id, sum);
            }
            Ok::<_, LoaderError>(out)
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
    fn apply_ops(&mut self, ops: &[Op], ring_size: u32) -> Result<()> {
        for op in ops {
            check_op(op)?;
            let m = &mut self.maps;
            match op {
                Op::TxPort { slot, ifindex } => m
                    .tx_ports
                    .set(*slot, *ifindex, None, 0)
                    .map_err(|e| LoaderError::TxPort(Box::new(e)))?,
                Op::Backend { id, value, fresh } => {
                    if *fresh {
                        self.reset_backend_counters(id.0)?;
                    }
                    self.set_backend(id.0, value)?
                }
                Op::RetireBackend { id, value } => self.set_backend(id.0, value)?,
                Op::Ring { service_id, slots } => {
                    for (slot, backend) in slots {
                        self.set_slot(*service_id, ring_size, *slot, *backend)?;
                    }
                }
                Op::Service { key, value } => m
                    .services
                    .insert(key, value, 0)
                    .map_err(map_err(names::SERVICES))?,
                Op::RemoveService(key) => match m.services.remove(key) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(names::SERVICES)(e)),
                },
                Op::Vip { key, services } => m
                    .vips
                    .insert(key, services, 0)
                    .map_err(map_err(names::VIPS))?,
                Op::RemoveVip(key) => match m.vips.remove(key) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(names::VIPS)(e)),
                },
                Op::Flags(flags) => m.flags.set(0, flags, 0).map_err(map_err(names::FLAGS))?,
            }
        }
        Ok(())
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

    fn sweep(&mut self, now_ns: u64, timeouts: &crate::config::Timeouts) -> Result<SweepStats> {
        Dataplane::sweep(self, now_ns, timeouts)
    }
}

/// The wrapping sum over CPUs of a per-CPU `u64` array slot.
fn per_cpu_sum(map: &PerCpuArray<MapData, u64>, name: &'static str, id: u32) -> Result<u64> {
    let v = map.get(&id, 0).map_err(map_err(name))?;
    Ok(v.iter().fold(0u64, |a, x| a.wrapping_add(*x)))
}

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
