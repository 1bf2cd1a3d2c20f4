//! Flow sharing between balancer nodes (`[flow_sync]`), like the IPVS sync daemon or vc5's
//! flow sharing: the data plane reports new connection-table entries through the `LB_SYNC`
//! ring buffer (rate-limited per CPU), the controller sends them in batches over UDP to the
//! other nodes, and a node receiving one inserts it into its own table unless it has an entry
//! already. So when the router moves a connection to another node (a node died or was
//! drained), that node knows its backend even for rr/wrr/lc/wlc services, or for a maglev flow
//! that began before a backend change.
//!
//! Entries travel by backend *address* (backend ids differ between nodes). Lossy by design (UDP,
//! no retransmission), bounded (the kernel-side rate, [`MAX_PER_DATAGRAM`], the receive-side
//! [`ACCEPT_PER_SEC`]) and authenticated: every datagram carries an HMAC-SHA256 over all of it
//! with the shared key, a timestamp (±[`MAX_SKEW_MS`]) and a per-sender sequence number (no
//! replay).
//!
//! Wire format (big-endian), one datagram:
//!
//! ```text
//! magic "LBF1" | version 1 | count u8 | 0 u16 | sender u64 | seq u64 | unix time ms u64
//! count × { family u8 | protocol u8 | 0 u16 | client [16] | vip [16] | client port u16 |
//!           vip port u16 | backend [16] }
//! HMAC-SHA256 [32] over everything before it
//! ```

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{Array, Map, MapData, RingBuf};
use hmac::{Hmac, Mac as _};
use lb_common::{
    FlowKey, SyncConfig,
    rules::{addr_key, key_addr},
};
use sha2::Sha256;

pub const MAGIC: &[u8; 4] = b"LBF1";
pub const VERSION: u8 = 1;
const HEADER: usize = 32;
const ENTRY: usize = 56;
const TAG: usize = 32;
/// Flows per datagram (1 216 bytes at most: below any MTU on the LB segment).
pub const MAX_PER_DATAGRAM: usize = 21;
/// Largest clock difference between two nodes accepted.
pub const MAX_SKEW_MS: u64 = 30_000;
/// Most shared entries a node inserts per second; the rest are dropped (and counted).
pub const ACCEPT_PER_SEC: u64 = 200_000;
/// Senders whose last sequence number is remembered (replay protection).
const MAX_SENDERS: usize = 256;

/// The flow-sharing maps of the data plane.
pub struct SyncMaps {
    pub cfg: Array<MapData, SyncConfig>,
    pub ring: RingBuf<MapData>,
}

impl SyncMaps {
    pub fn from_maps(cfg: Map, ring: Map) -> Result<SyncMaps, aya::maps::MapError> {
        Ok(SyncMaps {
            cfg: Array::try_from(cfg)?,
            ring: RingBuf::try_from(ring)?,
        })
    }

    /// Reports at most `rate` new flows per second and CPU; 0 = off.
    pub fn set_rate(&mut self, rate: u32) -> Result<(), aya::maps::MapError> {
        self.cfg.set(0, SyncConfig { rate, _pad: 0 }, 0)
    }
}

/// One shared flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedFlow {
    pub key: FlowKey,
    pub backend: IpAddr,
}

/// A datagram that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub sender: u64,
    pub seq: u64,
    pub time_ms: u64,
    pub flows: Vec<SharedFlow>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0} bytes: not a flow-sharing datagram")]
    Size(usize),
    #[error("bad magic or version")]
    Magic,
    #[error("count {count} does not match the length {len}")]
    Count { count: usize, len: usize },
    #[error("authentication failed (wrong [flow_sync] key, or altered)")]
    Tag,
    #[error("timestamp {skew_ms} ms away from this node's clock")]
    Stale { skew_ms: u64 },
    #[error("malformed entry {0}")]
    Entry(usize),
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// One datagram carrying `flows` (at most [`MAX_PER_DATAGRAM`]; the rest are ignored).
pub fn encode(key: &[u8], sender: u64, seq: u64, time_ms: u64, flows: &[SharedFlow]) -> Vec<u8> {
    let flows = &flows[..flows.len().min(MAX_PER_DATAGRAM)];
    let mut out = Vec::with_capacity(HEADER + flows.len() * ENTRY + TAG);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(flows.len() as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&sender.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&time_ms.to_be_bytes());
    for f in flows {
        out.push(f.key.family);
        out.push(f.key.protocol);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&f.key.src_addr);
        out.extend_from_slice(&f.key.dst_addr);
        out.extend_from_slice(&f.key.src_port);
        out.extend_from_slice(&f.key.dst_port);
        out.extend_from_slice(&addr_key(f.backend).0);
    }
    let mut m = mac(key);
    m.update(&out);
    out.extend_from_slice(&m.finalize().into_bytes());
    out
}

/// Checks and decodes one datagram (`now_ms`: this node's Unix time in ms). The tag is checked
/// (in constant time) before anything else of the content is believed.
pub fn decode(key: &[u8], d: &[u8], now_ms: u64) -> Result<Datagram, DecodeError> {
    if d.len() < HEADER + TAG || d.len() > HEADER + MAX_PER_DATAGRAM * ENTRY + TAG {
        return Err(DecodeError::Size(d.len()));
    }
    let (body, tag) = d.split_at(d.len() - TAG);
    let mut m = mac(key);
    m.update(body);
    m.verify_slice(tag).map_err(|_| DecodeError::Tag)?;
    if &body[..4] != MAGIC || body[4] != VERSION {
        return Err(DecodeError::Magic);
    }
    let count = body[5] as usize;
    if body.len() != HEADER + count * ENTRY {
        return Err(DecodeError::Count {
            count,
            len: d.len(),
        });
    }
    let u64_at = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    let (sender, seq, time_ms) = (u64_at(8), u64_at(16), u64_at(24));
    let skew_ms = now_ms.abs_diff(time_ms);
    if skew_ms > MAX_SKEW_MS {
        return Err(DecodeError::Stale { skew_ms });
    }
    let mut flows = Vec::with_capacity(count);
    for (i, e) in body[HEADER..].chunks_exact(ENTRY).enumerate() {
        let (family, protocol) = (e[0], e[1]);
        let bytes: [u8; 16] = e[40..56].try_into().expect("16 bytes");
        let backend = key_addr(&bytes, family).ok_or(DecodeError::Entry(i))?;
        let mut key = FlowKey {
            protocol,
            family,
            ..Default::default()
        };
        key.src_addr.copy_from_slice(&e[4..20]);
        key.dst_addr.copy_from_slice(&e[20..36]);
        key.src_port.copy_from_slice(&e[36..38]);
        key.dst_port.copy_from_slice(&e[38..40]);
        flows.push(SharedFlow { key, backend });
    }
    Ok(Datagram {
        sender,
        seq,
        time_ms,
        flows,
    })
}

/// Replay protection: the last sequence number of each sender (a sender id is random per
/// `lb run`, so a restarted peer starts a new sequence).
#[derive(Default)]
pub struct Replay {
    last: BTreeMap<u64, (u64, u64)>, // sender → (seq, time_ms of that datagram)
}

impl Replay {
    /// Whether `d` is new (and remembers it). The oldest sender is forgotten beyond
    /// [`MAX_SENDERS`].
    pub fn fresh(&mut self, d: &Datagram) -> bool {
        if let Some((seq, _)) = self.last.get(&d.sender)
            && d.seq <= *seq
        {
            return false;
        }
        self.last.insert(d.sender, (d.seq, d.time_ms));
        if self.last.len() > MAX_SENDERS
            && let Some(oldest) = self
                .last
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(s, _)| *s)
        {
            self.last.remove(&oldest);
        }
        true
    }
}

/// Flow-sharing counters (`lb status`, metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyncStats {
    /// Flows sent to the peers (each counted once, whatever the number of peers).
    pub sent: u64,
    pub datagrams_sent: u64,
    /// Datagrams that could not be sent (socket errors).
    pub send_errors: u64,
    /// Flows received in accepted datagrams.
    pub received: u64,
    /// Received flows inserted into the connection table.
    pub inserted: u64,
    /// Received flows this node had an entry for already.
    pub existing: u64,
    /// Received flows for a service or backend this node does not have (or not usable).
    pub unknown: u64,
    /// Received flows dropped by the receive rate limit.
    pub dropped: u64,
    /// Datagrams refused: authentication, size, timestamp or replay.
    pub rejected: u64,
}

/// A token bucket of [`ACCEPT_PER_SEC`] per second.
#[derive(Debug)]
pub struct AcceptLimit {
    window: std::time::Instant,
    used: u64,
}

impl Default for AcceptLimit {
    fn default() -> Self {
        AcceptLimit {
            window: std::time::Instant::now(),
            used: 0,
        }
    }
}

impl AcceptLimit {
    pub fn take(&mut self, now: std::time::Instant) -> bool {
        if now.duration_since(self.window) >= std::time::Duration::from_secs(1) {
            self.window = now;
            self.used = 0;
        }
        if self.used >= ACCEPT_PER_SEC {
            return false;
        }
        self.used += 1;
        true
    }
}

/// Unix time in ms.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::{FAMILY_V4, FAMILY_V6};

    use super::*;

    fn flow(i: u8, v6: bool) -> SharedFlow {
        let mut key = FlowKey {
            protocol: 6,
            family: if v6 { FAMILY_V6 } else { FAMILY_V4 },
            ..Default::default()
        };
        key.src_addr[..4].copy_from_slice(&[10, 98, 0, i]);
        key.dst_addr[..4].copy_from_slice(&[10, 99, 0, 100]);
        key.src_port = [0x80, i];
        key.dst_port = [0, 7];
        SharedFlow {
            key,
            backend: if v6 {
                "fd00:99::21".parse().expect("addr")
            } else {
                IpAddr::V4(Ipv4Addr::new(10, 99, 0, 20 + i))
            },
        }
    }

    #[test]
    fn round_trip_and_every_check() {
        let key = b"0123456789abcdef";
        let flows: Vec<SharedFlow> = (0..MAX_PER_DATAGRAM as u8 + 3)
            .map(|i| flow(i, i % 3 == 0))
            .collect();
        let d = encode(key, 7, 42, 1_000_000, &flows);
        assert_eq!(d.len(), HEADER + MAX_PER_DATAGRAM * ENTRY + TAG);
        let got = decode(key, &d, 1_000_500).expect("valid");
        assert_eq!(got.sender, 7);
        assert_eq!(got.seq, 42);
        assert_eq!(got.flows, flows[..MAX_PER_DATAGRAM]);
        // Wrong key, any flipped bit, truncation, old timestamp.
        assert_eq!(decode(b"another key", &d, 1_000_000), Err(DecodeError::Tag));
        for i in 0..d.len() {
            let mut bad = d.clone();
            bad[i] ^= 0x10;
            assert_eq!(
                decode(key, &bad, 1_000_000),
                Err(DecodeError::Tag),
                "byte {i}"
            );
        }
        assert!(matches!(
            decode(key, &d[..d.len() - 1], 1_000_000),
            Err(DecodeError::Tag)
        ));
        assert_eq!(decode(key, &d[..10], 1_000_000), Err(DecodeError::Size(10)));
        assert_eq!(
            decode(key, &d, 1_000_000 + MAX_SKEW_MS + 1),
            Err(DecodeError::Stale {
                skew_ms: MAX_SKEW_MS + 1
            })
        );
        // An empty datagram is valid (nothing to insert).
        let e = encode(key, 1, 1, 5, &[]);
        assert_eq!(decode(key, &e, 5).expect("valid").flows, vec![]);
    }

    #[test]
    fn replays_are_refused() {
        let key = b"k";
        let mut r = Replay::default();
        let a = decode(key, &encode(key, 1, 5, 100, &[flow(1, false)]), 100).expect("valid");
        assert!(r.fresh(&a));
        assert!(!r.fresh(&a), "the same datagram again");
        let older = decode(key, &encode(key, 1, 4, 100, &[]), 100).expect("valid");
        assert!(!r.fresh(&older));
        let other = decode(key, &encode(key, 2, 1, 100, &[]), 100).expect("valid");
        assert!(r.fresh(&other), "another sender has its own sequence");
        for s in 10..10 + MAX_SENDERS as u64 + 5 {
            let d = decode(key, &encode(key, s, 1, 100 + s, &[]), 100).expect("valid");
            assert!(r.fresh(&d));
        }
        assert!(r.last.len() <= MAX_SENDERS);
    }

    #[test]
    fn accept_limit_is_per_second() {
        let mut l = AcceptLimit::default();
        let t = l.window;
        for _ in 0..ACCEPT_PER_SEC {
            assert!(l.take(t));
        }
        assert!(!l.take(t));
        assert!(l.take(t + std::time::Duration::from_secs(1)));
    }
}
