//! `lb run`'s side of several nodes: flow sharing ([`crate::flowsync`]) between the event loop,
//! the data plane's `LB_SYNC` ring buffer and the peers' UDP datagrams.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use aya::maps::{Array, MapData, RingBuf};
use lb_common::{SyncConfig, SyncEvent};
use tokio::{io::unix::AsyncFd, net::UdpSocket, sync::mpsc};

use crate::{
    config::FlowSync,
    flowsync::{self, AcceptLimit, MAX_PER_DATAGRAM, Replay, SharedFlow, SyncMaps, SyncStats},
};

/// Events read from the ring per wake-up at most (the rest on the next).
const RING_BATCH: usize = 8192;
/// Datagrams the receiver may queue for the event loop; beyond, they are dropped (counted).
const QUEUE: usize = 1024;

/// Flow sharing while `lb run` runs.
pub struct Sync {
    pub ring: AsyncFd<RingBuf<MapData>>,
    cfg_map: Array<MapData, SyncConfig>,
    socket: Arc<UdpSocket>,
    key: Arc<Vec<u8>>,
    peers: Vec<SocketAddr>,
    sender: u64,
    seq: u64,
    pending: Vec<SharedFlow>,
    pub stats: Arc<Mutex<SyncStats>>,
    receiver: tokio::task::JoinHandle<()>,
}

/// A random sender id (a restarted lb starts a new sequence).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = flowsync::unix_ms() ^ ((std::process::id() as u64) << 32);
        b = t.to_le_bytes();
    }
    u64::from_le_bytes(b)
}

impl Sync {
    /// Binds `fs.listen`, switches the data plane's reporting on, and starts the receiver,
    /// which authenticates datagrams and hands their flows to the event loop over the
    /// returned channel.
    pub fn start(
        fs: &FlowSync,
        maps: SyncMaps,
    ) -> anyhow::Result<(Sync, mpsc::Receiver<Vec<SharedFlow>>)> {
        let std_socket = std::net::UdpSocket::bind(fs.listen)
            .with_context(|| format!("flow_sync.listen: cannot bind {}", fs.listen))?;
        std_socket.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(std_socket)?);
        let SyncMaps { cfg: cfg_map, ring } = maps;
        // SAFETY: the fd is the ring buffer map's, owned by the RingBuf that the AsyncFd owns:
        // it stays open and the same for the AsyncFd's whole life.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .context("watching the LB_SYNC ring buffer")?;
        let key = Arc::new(fs.key.clone());
        let stats = Arc::new(Mutex::new(SyncStats::default()));
        let (tx, rx) = mpsc::channel(QUEUE);
        let receiver = tokio::spawn(receive(socket.clone(), key.clone(), stats.clone(), tx));
        let mut s = Sync {
            ring,
            cfg_map,
            socket,
            key,
            peers: fs.peers.clone(),
            sender: random_u64(),
            seq: 0,
            pending: Vec::with_capacity(MAX_PER_DATAGRAM),
            stats,
            receiver,
        };
        s.cfg_map
            .set(
                0,
                SyncConfig {
                    rate: fs.rate,
                    _pad: 0,
                },
                0,
            )
            .context("switching flow reporting on (LB_SYNC_CFG)")?;
        tracing::info!(
            "flow sharing: listening on {}, {} peers ({}), at most {} new flows/s per CPU reported",
            fs.listen,
            fs.peers.len(),
            fs.peers
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            fs.rate
        );
        Ok((s, rx))
    }

    /// Reads the ring (at most [`RING_BATCH`] events); `map` turns an event into what peers
    /// understand (or `None`: a backend id that changed meanwhile). Full batches are sent.
    pub fn drain_ring(&mut self, map: impl Fn(&SyncEvent) -> Option<SharedFlow>) {
        let mut n = 0;
        while n < RING_BATCH {
            let Some(item) = self.ring.get_mut().next() else {
                break;
            };
            n += 1;
            if item.len() < size_of::<SyncEvent>() {
                continue;
            }
            // SAFETY: the item holds at least a SyncEvent's bytes (checked); SyncEvent is
            // plain old data, read unaligned.
            let ev: SyncEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            if let Some(f) = map(&ev) {
                self.pending.push(f);
                if self.pending.len() >= MAX_PER_DATAGRAM {
                    self.flush();
                }
            }
        }
    }

    /// Sends what is pending to every peer.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        self.seq += 1;
        let d = flowsync::encode(
            &self.key,
            self.sender,
            self.seq,
            flowsync::unix_ms(),
            &self.pending,
        );
        let mut st = self.stats.lock().expect("not poisoned");
        st.sent += self.pending.len() as u64;
        for p in &self.peers {
            match self.socket.try_send_to(&d, *p) {
                Ok(_) => st.datagrams_sent += 1,
                Err(e) => {
                    st.send_errors += 1;
                    tracing::debug!("flow sharing: sending to {p}: {e}");
                }
            }
        }
        self.pending.clear();
    }

    pub fn pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn stats(&self) -> SyncStats {
        *self.stats.lock().expect("not poisoned")
    }

    /// Switches the data plane's reporting off (nobody reads the ring once lb stops).
    pub fn stop(mut self) {
        self.flush();
        self.receiver.abort();
        if let Err(e) = self.cfg_map.set(0, SyncConfig::default(), 0) {
            tracing::warn!("flow sharing: switching reporting off: {e}");
        }
    }
}

/// The receiver task: every datagram is checked (size, HMAC, timestamp, replay) before its
/// flows are believed; accepted flows are rate-limited and queued for the event loop.
async fn receive(
    socket: Arc<UdpSocket>,
    key: Arc<Vec<u8>>,
    stats: Arc<Mutex<SyncStats>>,
    tx: mpsc::Sender<Vec<SharedFlow>>,
) {
    let mut buf = vec![0u8; 2048];
    let mut replay = Replay::default();
    let mut limit = AcceptLimit::default();
    let mut last_warn: Option<std::time::Instant> = None;
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("flow sharing: receiving: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let d = match flowsync::decode(&key, &buf[..n], flowsync::unix_ms()) {
            Ok(d) if replay.fresh(&d) => d,
            r => {
                stats.lock().expect("not poisoned").rejected += 1;
                if last_warn.is_none_or(|t| t.elapsed().as_secs() >= 10) {
                    last_warn = Some(std::time::Instant::now());
                    let why = match r {
                        Ok(_) => "a replayed datagram".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!("flow sharing: refused a datagram from {from}: {why}");
                }
                continue;
            }
        };
        let now = std::time::Instant::now();
        let total = d.flows.len() as u64;
        let flows: Vec<SharedFlow> = d.flows.into_iter().filter(|_| limit.take(now)).collect();
        {
            let mut st = stats.lock().expect("not poisoned");
            st.received += total;
            st.dropped += total - flows.len() as u64;
        }
        if flows.is_empty() {
            continue;
        }
        let k = flows.len() as u64;
        match tx.try_send(flows) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                stats.lock().expect("not poisoned").dropped += k;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}
