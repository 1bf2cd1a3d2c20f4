//! `lb trace`: switches the data plane's tracing on (`LB_TRACE_CFG`), reads its events from the
//! `LB_TRACE` ring buffer, decodes them and writes them as text, JSON lines or pcapng.
//!
//! The maps are opened from the pin directory (no controller needed: tracing also works while
//! `lb run` is stopped). Tracing runs until `until_ns`, which the reader pushes forward every
//! second; a killed `lb trace` therefore stops costing anything within [`LEASE`], and the
//! controller resets an expired setting to 0 (the one-branch fast path).

use std::{
    collections::BTreeMap,
    io::Write,
    net::IpAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use aya::maps::{Array, Map, MapData, PerCpuArray, RingBuf};
use lb_common::{
    BackendMeta, FlowKey, NO_BACKEND, PROTO_TCP, TraceConfig, TraceEvent, TraceRate, names,
    stats::Stat,
};

/// How far ahead `until_ns` is set each time the reader refreshes it.
pub const LEASE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: {why}")]
    Map { path: String, why: String },
    #[error("{0}")]
    Other(String),
}

/// The three trace maps.
pub struct TraceMaps {
    pub cfg: Array<MapData, TraceConfig>,
    pub ring: RingBuf<MapData>,
    pub rate: PerCpuArray<MapData, TraceRate>,
}

fn pinned(dir: &Path, name: &str) -> Result<MapData, TraceError> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|e| TraceError::Map {
        path: path.display().to_string(),
        why: format!("{e} (is the data plane pinned here, by an lb of this version?)"),
    })
}

fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(
    m: Map,
    name: &str,
) -> Result<T, TraceError> {
    T::try_from(m).map_err(|e| TraceError::Map {
        path: name.to_owned(),
        why: e.to_string(),
    })
}

impl TraceMaps {
    /// Opens the maps pinned at `dir` (a `dataplane.pin_path`).
    pub fn open_pinned(dir: &Path) -> Result<TraceMaps, TraceError> {
        Ok(TraceMaps {
            cfg: typed(Map::Array(pinned(dir, names::TRACE_CFG)?), names::TRACE_CFG)?,
            ring: typed(Map::RingBuf(pinned(dir, names::TRACE)?), names::TRACE)?,
            rate: typed(
                Map::PerCpuArray(pinned(dir, names::TRACE_RATE)?),
                names::TRACE_RATE,
            )?,
        })
    }

    /// From maps taken out of a loaded object.
    pub fn from_maps(cfg: Map, ring: Map, rate: Map) -> Result<TraceMaps, TraceError> {
        Ok(TraceMaps {
            cfg: typed(cfg, names::TRACE_CFG)?,
            ring: typed(ring, names::TRACE)?,
            rate: typed(rate, names::TRACE_RATE)?,
        })
    }

    pub fn set(&mut self, cfg: &TraceConfig) -> Result<(), TraceError> {
        self.cfg.set(0, cfg, 0).map_err(|e| TraceError::Map {
            path: names::TRACE_CFG.to_owned(),
            why: e.to_string(),
        })
    }

    pub fn get(&self) -> Result<TraceConfig, TraceError> {
        self.cfg.get(&0, 0).map_err(|e| TraceError::Map {
            path: names::TRACE_CFG.to_owned(),
            why: e.to_string(),
        })
    }

    /// Zeroes the rate-limit state and drops events left in the ring buffer by an earlier trace.
    pub fn reset(&mut self) -> Result<usize, TraceError> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| TraceError::Other(e.to_string()))?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![TraceRate::default(); n])
            .map_err(|e| TraceError::Other(e.to_string()))?;
        self.rate.set(0, zeros, 0).map_err(|e| TraceError::Map {
            path: names::TRACE_RATE.to_owned(),
            why: e.to_string(),
        })?;
        let mut stale = 0;
        while self.ring.next().is_some() {
            stale += 1;
        }
        Ok(stale)
    }

    /// The events waiting in the ring buffer.
    pub fn drain(&mut self) -> Vec<TraceEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<TraceEvent>() {
                out.push(bytemuck::pod_read_unaligned(
                    &item[..size_of::<TraceEvent>()],
                ));
            }
        }
        out
    }

    /// Events not sent (rate limit) and lost (ring buffer full), summed over CPUs.
    pub fn losses(&self) -> (u64, u64) {
        match self.rate.get(&0, 0) {
            Ok(v) => v
                .iter()
                .fold((0, 0), |(s, l), r| (s + r.suppressed, l + r.lost)),
            Err(_) => (0, 0),
        }
    }
}

/// CLOCK_MONOTONIC_COARSE and CLOCK_MONOTONIC now (ns).
pub fn clocks() -> (u64, u64) {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write into.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    };
    (
        read(libc::CLOCK_MONOTONIC_COARSE),
        read(libc::CLOCK_MONOTONIC),
    )
}

/// One event, decoded.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Record {
    /// Wall-clock time (µs since the Unix epoch).
    pub time_us: u64,
    pub protocol: &'static str,
    pub client: Option<IpAddr>,
    pub client_port: u16,
    pub vip: Option<IpAddr>,
    pub port: u16,
    /// `tx`, `redirect`, `pass`, `drop`, `aborted`.
    pub verdict: &'static str,
    /// The counter that explains it (`flow_hit`, `flow_new`, `pass_no_service`, ...).
    pub reason: &'static str,
    pub backend_id: Option<u32>,
    pub backend: Option<IpAddr>,
    /// A new flow (chosen by the scheduler now, not found in the connection table).
    pub new_flow: bool,
    pub cpu: u32,
    pub len: u32,
    /// Destination and source MAC of the frame as it left (or arrived, when not forwarded).
    pub dst_mac: String,
    pub src_mac: String,
    #[serde(skip)]
    pub frame: Vec<u8>,
}

fn mac(b: &[u8]) -> String {
    if b.len() < 6 {
        return String::new();
    }
    crate::config::Mac([b[0], b[1], b[2], b[3], b[4], b[5]]).to_string()
}

/// What backend ids stand for (`LB_BE_META`).
pub fn backend_addresses(meta: &BTreeMap<u32, BackendMeta>) -> BTreeMap<u32, IpAddr> {
    meta.iter()
        .filter_map(|(id, m)| lb_common::rules::key_addr(&m.addr, m.family).map(|a| (*id, a)))
        .collect()
}

/// Decodes `ev`; `mono_to_unix_ns` converts its CLOCK_MONOTONIC time to Unix time.
pub fn decode(ev: &TraceEvent, mono_to_unix_ns: i128, backends: &BTreeMap<u32, IpAddr>) -> Record {
    let k: &FlowKey = &ev.key;
    let reason = Stat::ALL
        .get(ev.reason as usize)
        .map_or("unknown", |s| s.name());
    let cap = (ev.cap_len as usize).min(ev.data.len());
    Record {
        time_us: ((ev.ts_ns as i128 + mono_to_unix_ns).max(0) / 1000) as u64,
        protocol: match k.protocol {
            PROTO_TCP => "tcp",
            17 => "udp",
            _ => "other",
        },
        client: lb_common::rules::key_addr(&k.src_addr, k.family),
        client_port: u16::from_be_bytes(k.src_port),
        vip: lb_common::rules::key_addr(&k.dst_addr, k.family),
        port: u16::from_be_bytes(k.dst_port),
        verdict: match ev.action {
            0 => "aborted",
            1 => "drop",
            2 => "pass",
            3 => "tx",
            4 => "redirect",
            _ => "unknown",
        },
        reason,
        backend_id: (ev.backend != NO_BACKEND).then_some(ev.backend),
        backend: backends.get(&ev.backend).copied(),
        new_flow: reason == Stat::FlowNew.name() || reason == Stat::FlowRescheduled.name(),
        cpu: ev.cpu,
        len: ev.pkt_len,
        dst_mac: mac(&ev.data[..cap.min(6)]),
        src_mac: if cap >= 12 {
            mac(&ev.data[6..12])
        } else {
            String::new()
        },
        frame: ev.data[..cap].to_vec(),
    }
}

/// Offset from CLOCK_MONOTONIC to Unix time, now.
pub fn mono_to_unix_ns() -> i128 {
    let unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    unix - clocks().1 as i128
}

fn endpoint(a: Option<IpAddr>, p: u16) -> String {
    match a {
        Some(IpAddr::V6(a)) => format!("[{a}]:{p}"),
        Some(a) => format!("{a}:{p}"),
        None => "?".to_owned(),
    }
}

/// One line of `lb trace`'s text output.
pub fn text(r: &Record) -> String {
    let secs = r.time_us / 1_000_000;
    let t = format!(
        "{:02}:{:02}:{:02}.{:06}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60,
        r.time_us % 1_000_000
    );
    let backend = match (r.backend, r.backend_id) {
        (Some(a), Some(id)) => format!(" backend={a} (id {id})"),
        (None, Some(id)) => format!(" backend=id {id}"),
        _ => String::new(),
    };
    format!(
        "{t} cpu{} {} {} → {} {} {}{}{} len={} {} → {}",
        r.cpu,
        r.protocol,
        endpoint(r.client, r.client_port),
        endpoint(r.vip, r.port),
        r.verdict,
        r.reason,
        backend,
        if r.new_flow { " new" } else { "" },
        r.len,
        r.src_mac,
        r.dst_mac
    )
}

/// A pcapng file: frames as `lb_xdp` left them (after the MAC rewrite), each with a comment
/// (verdict, reason, backend) and the direction flag (outbound: forwarded; inbound: passed or
/// dropped). Dropped frames are marked `DROPPED` in their comment.
pub struct Pcap<W: Write> {
    w: pcap_file::pcapng::PcapNgWriter<W>,
}

impl<W: Write> Pcap<W> {
    pub fn new(w: W) -> Result<Pcap<W>, TraceError> {
        use pcap_file::{
            DataLink,
            pcapng::{PcapNgWriter, blocks::interface_description::InterfaceDescriptionBlock},
        };
        let mut w = PcapNgWriter::new(w).map_err(|e| TraceError::Other(e.to_string()))?;
        let idb = InterfaceDescriptionBlock {
            linktype: DataLink::ETHERNET,
            snaplen: lb_common::TRACE_SNAP as u32,
            options: vec![],
        };
        w.write_pcapng_block(idb)
            .map_err(|e| TraceError::Other(e.to_string()))?;
        Ok(Pcap { w })
    }

    pub fn write(&mut self, r: &Record) -> Result<(), TraceError> {
        use pcap_file::pcapng::blocks::enhanced_packet::{
            EnhancedPacketBlock, EnhancedPacketOption,
        };
        let forwarded = matches!(r.verdict, "tx" | "redirect");
        let comment = format!(
            "{}lb_xdp {} {}{}{}",
            if r.verdict == "drop" { "DROPPED " } else { "" },
            r.verdict,
            r.reason,
            r.backend
                .map(|b| format!(" backend {b}"))
                .unwrap_or_default(),
            if r.new_flow { " new flow" } else { "" }
        );
        let epb = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: Duration::from_micros(r.time_us),
            original_len: r.len,
            data: std::borrow::Cow::Borrowed(&r.frame),
            options: vec![
                EnhancedPacketOption::Comment(comment.into()),
                // Direction (bits 0-1): 1 inbound, 2 outbound.
                EnhancedPacketOption::Flags(if forwarded { 2 } else { 1 }),
            ],
        };
        self.w
            .write_pcapng_block(epb)
            .map_err(|e| TraceError::Other(e.to_string()))?;
        Ok(())
    }

    pub fn into_inner(self) -> W {
        self.w.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> TraceEvent {
        let mut key = FlowKey {
            src_port: 40000u16.to_be_bytes(),
            dst_port: 80u16.to_be_bytes(),
            protocol: PROTO_TCP,
            family: lb_common::FAMILY_V4,
            ..FlowKey::default()
        };
        key.src_addr[..4].copy_from_slice(&[10, 99, 0, 11]);
        key.dst_addr[..4].copy_from_slice(&[10, 99, 0, 100]);
        let mut data = [0u8; lb_common::TRACE_SNAP];
        data[..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x21]);
        data[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        TraceEvent {
            ts_ns: 1_000,
            key,
            backend: 3,
            action: 3,
            reason: Stat::FlowNew as u32,
            cpu: 1,
            pkt_len: 74,
            cap_len: 74,
            data,
        }
    }

    #[test]
    fn decode_and_text() {
        let backends = BTreeMap::from([(3, "10.99.0.21".parse().unwrap())]);
        let r = decode(&event(), 1_000_000_000, &backends);
        assert_eq!(r.time_us, 1_000_001);
        assert_eq!(
            (r.verdict, r.reason, r.new_flow, r.backend),
            ("tx", "flow_new", true, Some("10.99.0.21".parse().unwrap()))
        );
        assert_eq!(r.dst_mac, "02:00:00:00:00:21");
        assert_eq!(r.frame.len(), 74);
        let t = text(&r);
        assert!(
            t.ends_with(
                "cpu1 tcp 10.99.0.11:40000 → 10.99.0.100:80 tx flow_new backend=10.99.0.21 (id 3) new len=74 02:00:00:00:00:01 → 02:00:00:00:00:21"
            ),
            "{t}"
        );
    }

    /// The pcapng file reads back (with the same crate's reader) with the frame and comment.
    #[test]
    fn pcapng_round_trip() {
        use pcap_file::pcapng::{
            Block, PcapNgReader, blocks::enhanced_packet::EnhancedPacketOption,
        };
        let backends = BTreeMap::new();
        let mut ev = event();
        ev.action = 1;
        ev.reason = Stat::DropNoBackend as u32;
        let mut p = Pcap::new(Vec::new()).unwrap();
        p.write(&decode(&ev, 0, &backends)).unwrap();
        let bytes = p.into_inner();
        let mut r = PcapNgReader::new(&bytes[..]).unwrap();
        let mut packets = 0;
        while let Some(b) = r.next_block() {
            if let Block::EnhancedPacket(e) = b.unwrap() {
                packets += 1;
                assert_eq!(e.data.len(), 74);
                assert_eq!(e.original_len, 74);
                assert!(e.options.iter().any(|o| matches!(o,
                    EnhancedPacketOption::Comment(c) if c.starts_with("DROPPED lb_xdp drop drop_no_backend"))));
            }
        }
        assert_eq!(packets, 1);
    }
}
