//! TCP checks of many backends on one thread: a timer heap of due checks, non-blocking
//! connects watched by one epoll set, results sent to the controller like the other checks'.
//!
//! Why not one tokio task per backend, as for HTTP and UDP checks: with 10 000 backends checked
//! every second, a task per check costs two timers, a reactor registration and deregistration,
//! a readiness check and a wake-up each, about 22 % of a core in all on the benchmark machine.
//! Here a check is `socket`, `setsockopt` (close with a reset), `connect`, `epoll_ctl` and
//! `close`; completions are collected every tick while checks are in flight (`tick`: 20 ms at
//! a 1-s interval).
//!
//! `syn` checks (half-open) cost less still: no socket per check. A SYN is sent from a raw socket
//! with a source port this thread reserves (a bound, never listening socket holds it); the
//! backend's SYN-ACK means up (the kernel, finding no socket for it, answers with a reset, so
//! the backend keeps nothing), its reset means down ("connection refused"). The sequence number
//! names the check, so a reply is matched by its acknowledgment number (and its source). Without
//! CAP_NET_RAW, `syn` checks connect instead (logged once).
//!
//! The schedule is the tasks' own: the first check at an offset derived from the label, then
//! every `interval_ms` ±10 % (the same jitter), each bounded by `timeout_ms`.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::mpsc as std_mpsc,
    time::{Duration, Instant, SystemTime},
};

use foldhash::{HashMap, HashMapExt as _};
use mio::{Events, Interest, Poll, Token, net::TcpStream, unix::SourceFd};
use socket2::{Domain, Protocol, SockAddr, SockFilter, Socket, Type};

use crate::config::CheckKind;
use tokio::sync::mpsc;

use super::{
    mmsg::{self, Inbox, Outgoing},
    tasks::{CheckBatch, CheckResult, CheckSpec},
    wheel::Wheel,
};
use crate::desired::{BackendId, IdMap};

/// What the controller tells the checker thread.
pub enum Cmd {
    /// Check `id` as `spec` says, its results carrying `token` (replaces an earlier spec).
    Set(BackendId, u64, CheckSpec),
    /// Stop checking `id`.
    Remove(BackendId),
}

/// The checker thread: it ends when this is dropped (the command channel closes), or when the
/// controller's result channel closes.
pub struct TcpChecker {
    cmd: std_mpsc::Sender<Cmd>,
}

impl TcpChecker {
    /// Starts the thread; results go to `tx`.
    pub fn start(tx: mpsc::Sender<CheckBatch>) -> io::Result<TcpChecker> {
        let (cmd, rx) = std_mpsc::channel();
        let poll = Poll::new()?;
        // Not joined: a thread blocked on a full result channel ends when the controller drops
        // its receiver, and dropping the checker must not wait for that.
        std::thread::Builder::new()
            .name("lb-tcp-checks".into())
            .spawn(move || Runner::new(poll, rx, tx).run())?;
        Ok(TcpChecker { cmd })
    }

    pub fn send(&self, c: Cmd) {
        let _ = self.cmd.send(c);
    }
}

/// One backend's schedule.
struct Backend {
    token: u64,
    spec: CheckSpec,
    seed: u64,
    round: u64,
    /// Bumped when the spec changes: timers of older schedules are stale.
    epoch: u64,
    /// `syn` checks: the source address toward the backend (the route's choice, for the
    /// checksum), found with the first SYN and forgotten when a check times out.
    source: Option<IpAddr>,
    /// Checks passed in a row since the last failure (or since this spec), up to `rise`.
    passes: u16,
}

/// A check in flight.
struct Inflight {
    id: BackendId,
    epoch: u64,
    probe: Probe,
    started: Instant,
    /// `started` on the system clock (the kernel stamps `syn` replies with it).
    sent: SystemTime,
    deadline: Instant,
}

/// How a check in flight asked.
enum Probe {
    /// A connect, watched in the epoll set.
    Connect(TcpStream),
    /// A SYN with this sequence number, to `target`.
    Syn { seq: u32, target: SocketAddr },
}

/// epoll tokens of the raw sockets (check keys count up from 0 and never get near).
const RAW4: Token = Token(usize::MAX - 1);
const RAW6: Token = Token(usize::MAX - 2);

/// While checks are in flight, completions are collected every tick (batched: one
/// `epoll_wait` for all that finished meanwhile, then one `recvmmsg` per 64 `syn` replies),
/// and the checks that fell due meanwhile start together (their SYNs in one `sendmmsg`). Each
/// wake-up of the thread costs a context switch and a timer (VM exits on a VM); at 10 000
/// checks a second, 4 ms instead of 1 ms took the checker from about 11 % to about 9.5 % of a
/// core (AMD EPYC Zen 4 VM), 10 ms instead of 4 ms from 10.9 % to 9.0 % (Zen 5 VM). The tick
/// is a fiftieth of the shortest interval checked, between [`TICK_MIN`] and [`TICK_MAX`]
/// (20 ms at the default 1 s interval): a check starts, and a timeout is seen, at most 2 % of
/// its interval late, within the ±10 % the schedule's jitter allows anyway. A `syn` check's
/// duration is still exact (the kernel stamps its reply's arrival), a passing `tcp` check's is
/// its handshake's round trip as the kernel measured it (`TCP_INFO`), a failing one's is
/// rounded up to the next collection.
fn tick(shortest_interval_ms: u32) -> Duration {
    (Duration::from_millis(shortest_interval_ms as u64) / TICKS_PER_INTERVAL)
        .clamp(TICK_MIN, TICK_MAX)
}

/// See [`tick`].
const TICKS_PER_INTERVAL: u32 = 50;
const TICK_MIN: Duration = Duration::from_millis(1);
const TICK_MAX: Duration = Duration::from_millis(20);
/// How long finished checks may wait to be handed to the controller when none of them can
/// change a backend's state (their results carry their own finish times): a passing check
/// after `rise` passing ones in a row changes nothing but the metrics. A result that may
/// change a state (a failure, or one of the first `rise` passes after one) goes at the end of
/// the pass that saw it. At 10 000 checks a second of healthy backends, the controller wakes
/// about 10 times a second for them instead of 100 (each wake-up a context switch: about
/// 1 % of a core in all on the benchmark VM).
const FLUSH: Duration = Duration::from_millis(100);
/// Longest sleep with nothing in flight (how soon a command is seen).
const IDLE: Duration = Duration::from_millis(20);

struct Runner {
    poll: Poll,
    cmds: std_mpsc::Receiver<Cmd>,
    tx: mpsc::Sender<CheckBatch>,
    /// Results not yet handed to the controller (sent together: one wake-up of its loop).
    out: CheckBatch,
    /// Whether `out` holds a result that may change a backend's state (see [`FLUSH`]).
    urgent: bool,
    /// When `out` was last sent.
    flushed: Instant,
    backends: IdMap<Backend>,
    /// How many backends are checked at each interval (ms), for the tick.
    intervals: std::collections::BTreeMap<u32, usize>,
    /// (id, epoch) of the next checks, by due time.
    due: Wheel<(BackendId, u64)>,
    /// Checks in flight by key (the epoll token; keys are never reused).
    inflight: HashMap<u64, Inflight>,
    /// Keys of the checks in flight, by deadline (finished ones are skipped).
    deadlines: Wheel<u64>,
    /// Scratch for the timers that fired.
    fired: Vec<(BackendId, u64)>,
    expired: Vec<u64>,
    next_key: u64,
    next_epoch: u64,
    /// `syn` checks' raw sockets (opened with the first one); `Err`: not available (logged).
    raw: Option<Result<Raw, ()>>,
    /// Sequence number → key of the `syn` check in flight that sent it.
    syns: HashMap<u32, u64>,
    /// SYNs of the checks started in this pass, sent together at its end (IPv4, IPv6), and
    /// those a full send buffer held back.
    queued: [Vec<Outgoing>; 2],
    /// Whether `queued` holds SYNs held back by a full send buffer (IPv4, IPv6).
    carried: [bool; 2],
    /// Buffers for the replies.
    inbox: Inbox,
}

impl Runner {
    fn new(poll: Poll, cmds: std_mpsc::Receiver<Cmd>, tx: mpsc::Sender<CheckBatch>) -> Runner {
        Runner {
            poll,
            cmds,
            tx,
            out: Vec::new(),
            urgent: false,
            flushed: Instant::now(),
            backends: IdMap::new(),
            intervals: std::collections::BTreeMap::new(),
            due: Wheel::new(Instant::now()),
            inflight: HashMap::new(),
            deadlines: Wheel::new(Instant::now()),
            fired: Vec::new(),
            expired: Vec::new(),
            next_key: 0,
            next_epoch: 1,
            raw: None,
            syns: HashMap::new(),
            queued: [Vec::new(), Vec::new()],
            carried: [false; 2],
            inbox: Inbox::default(),
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            loop {
                match self.cmds.try_recv() {
                    Ok(c) => self.command(c),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => return,
                }
            }
            let now = Instant::now();
            self.start_due(now);
            // Wait: a tick while checks are in flight (then collect them all at once), else
            // until the next one is due (or the results are to be sent).
            let wait = if self.inflight.is_empty() {
                let flush = if self.out.is_empty() {
                    IDLE
                } else {
                    (self.flushed + FLUSH).saturating_duration_since(now)
                };
                self.due
                    .next_due()
                    .map_or(IDLE, |t| t.saturating_duration_since(now))
                    .min(IDLE)
                    .min(flush)
            } else {
                std::thread::sleep(self.tick());
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(wait))
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!("TCP checks: epoll: {e}");
                std::thread::sleep(IDLE);
                continue;
            }
            for ev in events.iter() {
                if ev.token() == RAW4 || ev.token() == RAW6 {
                    self.read_replies(ev.token() == RAW4);
                    continue;
                }
                let Some(f) = self.inflight.remove(&(ev.token().0 as u64)) else {
                    continue;
                };
                let (result, took) = match &f.probe {
                    Probe::Connect(s) if ev.is_error() || ev.is_write_closed() => {
                        (Err(connect_error(s)), None)
                    }
                    // Connected: its duration is the handshake's round trip as the kernel
                    // measured it, not the time until this collection (up to a tick later).
                    Probe::Connect(s) => (Ok(()), handshake_rtt(s)),
                    Probe::Syn { .. } => (Ok(()), None),
                };
                self.finish_after(f, result, took);
            }
            let mut expired = std::mem::take(&mut self.expired);
            self.deadlines.expire(Instant::now(), &mut expired);
            for key in expired.drain(..) {
                let Some(f) = self.inflight.remove(&key) else {
                    continue; // finished in time
                };
                if let Probe::Syn { seq, .. } = f.probe {
                    self.syns.remove(&seq);
                    // The route (and so the source address in the checksum) may have changed:
                    // the next SYN to this backend looks it up again.
                    if let Some(b) = self.backends.get_mut(&f.id) {
                        b.source = None;
                    }
                }
                let ms = f.deadline.duration_since(f.started).as_millis();
                self.finish(f, Err(format!("timeout ({ms} ms)")));
            }
            self.expired = expired;
            // Results go to the controller at the end of a pass that saw one that may change a
            // state, the others every FLUSH (one wake-up of its loop for many). The next batch
            // is sized like this one (no regrowing as it fills).
            let n = self.out.len();
            let now = Instant::now();
            if n > 0 && (self.urgent || n >= 4096 || now.duration_since(self.flushed) >= FLUSH) {
                self.flushed = now;
                self.urgent = false;
                let batch = std::mem::replace(&mut self.out, Vec::with_capacity(n));
                if self.tx.blocking_send(batch).is_err() {
                    return; // the controller is gone
                }
            }
        }
    }

    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Set(id, token, spec) => {
                let epoch = self.next_epoch;
                self.next_epoch += 1;
                let seed = lb_common::hash::bytes_hash(7, spec.label.as_bytes());
                let offset = Duration::from_millis(seed % spec.cfg.interval_ms.max(1) as u64);
                self.due.push(Instant::now() + offset, (id, epoch));
                *self.intervals.entry(spec.cfg.interval_ms).or_default() += 1;
                let old = self.backends.insert(
                    id,
                    Backend {
                        token,
                        spec,
                        seed,
                        round: 0,
                        epoch,
                        source: None,
                        passes: 0,
                    },
                );
                if let Some(old) = old {
                    self.forget_interval(old.spec.cfg.interval_ms);
                }
            }
            Cmd::Remove(id) => {
                if let Some(old) = self.backends.remove(&id) {
                    self.forget_interval(old.spec.cfg.interval_ms);
                }
            }
        }
    }

    /// One backend fewer is checked at `interval_ms`.
    fn forget_interval(&mut self, interval_ms: u32) {
        if let Some(n) = self.intervals.get_mut(&interval_ms) {
            *n -= 1;
            if *n == 0 {
                self.intervals.remove(&interval_ms);
            }
        }
    }

    /// The collection tick for the backends checked now (see [`tick`]).
    fn tick(&self) -> Duration {
        tick(self.intervals.keys().next().copied().unwrap_or(1000))
    }

    /// Starts every check due by `now` (stale timers are dropped).
    fn start_due(&mut self, now: Instant) {
        let mut fired = std::mem::take(&mut self.fired);
        self.due.expire(now, &mut fired);
        let sent = SystemTime::now();
        // Each backend's state is a cache miss at 10 000 backends (1.7 MB of them): load them
        // all first, side by side (independent loads, their misses overlap), then use them.
        let mut touch = 0u64;
        for (id, _) in &fired {
            touch ^= self.backends.get(id).map_or(0, |b| b.epoch);
        }
        std::hint::black_box(touch);
        for (id, epoch) in fired.drain(..) {
            let Some(b) = self.backends.get(&id).filter(|b| b.epoch == epoch) else {
                continue;
            };
            let target = SocketAddr::new(b.spec.address, b.spec.cfg.port);
            let deadline = now + Duration::from_millis(b.spec.cfg.timeout_ms as u64);
            let source = b.source;
            let half_open = b.spec.cfg.kind == CheckKind::Syn && self.raw_ready();
            let key = self.next_key;
            self.next_key += 1;
            let started = if half_open {
                self.queue_syn(key, target, source).map(|(seq, src)| {
                    if source.is_none()
                        && let Some(b) = self.backends.get_mut(&id)
                    {
                        b.source = Some(src);
                    }
                    Probe::Syn { seq, target }
                })
            } else {
                connect(target).and_then(|mut stream| {
                    self.poll
                        .registry()
                        .register(&mut stream, Token(key as usize), Interest::WRITABLE)
                        .map_err(|e| e.to_string())?;
                    Ok(Probe::Connect(stream))
                })
            };
            match started {
                Ok(probe) => {
                    self.deadlines.push(deadline, key);
                    self.inflight.insert(
                        key,
                        Inflight {
                            id,
                            epoch,
                            probe,
                            started: now,
                            sent,
                            deadline,
                        },
                    );
                }
                Err(e) => {
                    // Refused at once (no route, no local port): a failed check, on schedule.
                    let token = self.backends.get(&id).map_or(0, |b| b.token);
                    self.record(CheckResult {
                        id,
                        token,
                        result: Err(e),
                        finished: std::time::Instant::now(),
                        duration: Duration::ZERO,
                    });
                    self.schedule(id, epoch, now);
                }
            }
        }
        self.fired = fired;
        self.send_queued();
    }

    /// Sends the SYNs queued by [`Runner::start_due`], each family's in one batch; a check
    /// whose SYN the kernel refused (no route, say) fails at once with the reason. When the
    /// socket's send buffer is full, the SYNs not sent stay queued for the next pass (a tick
    /// later), unless their checks time out first: a check is not failed for this host's own
    /// backlog.
    fn send_queued(&mut self) {
        for family in 0..2 {
            if self.queued[family].is_empty() {
                continue;
            }
            let mut queue = std::mem::take(&mut self.queued[family]);
            if self.carried[family] {
                // SYNs of checks that timed out while they waited are not sent.
                queue.retain(|o| self.inflight.contains_key(&o.key));
            }
            let fd = match self.raw.as_ref() {
                Some(Ok(raw)) if family == 0 => Some(raw.v4.as_raw_fd()),
                Some(Ok(raw)) => raw.v6.as_ref().map(|s| s.as_raw_fd()),
                _ => None,
            };
            let sent = match fd {
                Some(fd) => mmsg::send_all(fd, &queue),
                None => mmsg::Sent {
                    failed: (0..queue.len())
                        .map(|i| (i, io::Error::other("no raw socket")))
                        .collect(),
                    unsent_from: queue.len(),
                },
            };
            for (i, e) in sent.failed {
                let Some(f) = self.inflight.remove(&queue[i].key) else {
                    continue;
                };
                if let Probe::Syn { seq, .. } = f.probe {
                    self.syns.remove(&seq);
                }
                if let Some(b) = self.backends.get_mut(&f.id) {
                    b.source = None;
                }
                self.finish(f, Err(io_reason(&e)));
            }
            queue.drain(..sent.unsent_from);
            self.carried[family] = !queue.is_empty();
            self.queued[family] = queue;
        }
    }

    /// The raw sockets of `syn` checks, opened on first use: whether they are there.
    fn raw_ready(&mut self) -> bool {
        if self.raw.is_none() {
            self.raw = Some(match Raw::open(&self.poll) {
                Ok(r) => Ok(r),
                Err(e) => {
                    tracing::warn!(
                        "health: syn checks need raw sockets (CAP_NET_RAW): {e}; they connect instead"
                    );
                    Err(())
                }
            });
        }
        matches!(self.raw, Some(Ok(_)))
    }

    /// Queues the SYN of check `key` to `target` from `source` (looked up if `None`), sent at
    /// the end of the pass ([`Runner::send_queued`]); returns its sequence number and the
    /// source address.
    fn queue_syn(
        &mut self,
        key: u64,
        target: SocketAddr,
        source: Option<IpAddr>,
    ) -> Result<(u32, IpAddr), String> {
        let Some(Ok(raw)) = self.raw.as_mut() else {
            return Err("no raw socket".into());
        };
        let src = match source {
            Some(s) => s,
            None => source_toward(target.ip()).map_err(|e| io_reason(&e))?,
        };
        // The sequence number names the check: a keyed hash of its key, never one in flight.
        let mut seq = lb_common::hash::fmix64(key ^ raw.secret) as u32;
        while self.syns.contains_key(&seq) {
            seq = seq.wrapping_add(1);
        }
        let family = match target {
            SocketAddr::V4(_) => 0,
            SocketAddr::V6(_) if raw.v6.is_some() => 1,
            SocketAddr::V6(_) => return Err("no IPv6 raw socket".into()),
        };
        let seg = syn_segment(src, target, raw.port, seq).map_err(|e| io_reason(&e))?;
        let (pkt, len) = match (src, target.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (syn_packet_v4(s, d, seq, &seg), mmsg::PKT),
            _ => {
                let mut pkt = [0u8; mmsg::PKT];
                pkt[..mmsg::SEG].copy_from_slice(&seg);
                (pkt, mmsg::SEG)
            }
        };
        self.queued[family].push(Outgoing {
            key,
            // Raw sockets take the address without a port.
            to: SockAddr::from(SocketAddr::new(target.ip(), 0)),
            pkt,
            len,
        });
        self.syns.insert(seq, key);
        Ok((seq, src))
    }

    /// Reads every reply waiting on a raw socket (a batch at a time) and finishes the checks
    /// they answer.
    fn read_replies(&mut self, v4: bool) {
        loop {
            let Some(Ok(raw)) = self.raw.as_ref() else {
                return;
            };
            let sock = if v4 { Some(&raw.v4) } else { raw.v6.as_ref() };
            let Some(sock) = sock else {
                return;
            };
            let (fd, port) = (sock.as_raw_fd(), raw.port);
            let n = match self.inbox.recv_batch(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return, // WouldBlock: all read
            };
            for i in 0..n {
                if let Some(reply) = parse_reply(self.inbox.get(i), v4, port) {
                    self.answer(reply, self.inbox.stamp(i));
                }
            }
            if n < mmsg::BATCH {
                return;
            }
        }
    }

    /// Finishes the `syn` check that `reply` (which arrived at `arrived`) answers, if any is in
    /// flight.
    fn answer(&mut self, reply: Reply, arrived: Option<SystemTime>) {
        let Some(key) = self.syns.get(&reply.ack.wrapping_sub(1)).copied() else {
            return; // not a check in flight (late, or not ours)
        };
        let Some(Probe::Syn { target, .. }) = self.inflight.get(&key).map(|f| &f.probe) else {
            return;
        };
        if reply.port != target.port() || reply.from.is_some_and(|a| a != target.ip()) {
            return;
        }
        let result = if reply.syn_ack {
            Ok(())
        } else if reply.rst {
            Err("connection refused".to_owned())
        } else {
            return;
        };
        self.syns.remove(&reply.ack.wrapping_sub(1));
        if let Some(f) = self.inflight.remove(&key) {
            // Its duration up to the reply's arrival, not to this read (up to a tick later).
            let took = arrived.and_then(|t| t.duration_since(f.sent).ok());
            self.finish_after(f, result, took);
        }
    }

    /// Records a finished check (sent with the round's batch) and schedules the next one.
    fn finish(&mut self, f: Inflight, result: Result<(), String>) {
        self.finish_after(f, result, None);
    }

    /// [`Runner::finish`], the check having taken `took` (`None`: until now).
    fn finish_after(&mut self, f: Inflight, result: Result<(), String>, took: Option<Duration>) {
        let Some(b) = self.backends.get(&f.id).filter(|b| b.epoch == f.epoch) else {
            return; // removed or changed meanwhile
        };
        let r = CheckResult {
            id: f.id,
            token: b.token,
            result,
            finished: std::time::Instant::now(),
            duration: took.unwrap_or_else(|| f.started.elapsed()),
        };
        // Dropping a connect's stream closes the socket (with a reset: SO_LINGER 0), which also
        // takes it out of the epoll set.
        drop(f.probe);
        self.schedule(f.id, f.epoch, f.started);
        self.record(r);
    }

    /// Adds a result to the next batch for the controller, noting whether it may change its
    /// backend's state (then the batch goes at the end of this pass, see [`FLUSH`]).
    fn record(&mut self, r: CheckResult) {
        self.urgent |= match self.backends.get_mut(&r.id) {
            Some(b) => may_change_state(&mut b.passes, b.spec.cfg.rise, r.result.is_ok()),
            None => true,
        };
        self.out.push(r);
    }

    /// The next check of `id`: `started` + interval ±10 %, the tasks' jitter.
    fn schedule(&mut self, id: BackendId, epoch: u64, started: Instant) {
        let Some(b) = self.backends.get_mut(&id).filter(|b| b.epoch == epoch) else {
            return;
        };
        b.round += 1;
        let j = lb_common::hash::fmix64(b.seed ^ b.round) % 201; // 0..=200 → −10 %..+10 %
        let interval = Duration::from_millis(b.spec.cfg.interval_ms as u64);
        let next = interval.mul_f64(0.9 + j as f64 / 1000.0);
        self.due.push(started + next, (id, epoch));
    }
}

/// Whether a check result may change its backend's state, given the passes in a row before it
/// (`passes`, updated): a failure may take the backend down, and so may the first `rise` passes
/// after one bring it up; a pass after `rise` passes in a row changes nothing.
fn may_change_state(passes: &mut u16, rise: u32, ok: bool) -> bool {
    let rise = rise.clamp(1, u16::MAX as u32) as u16;
    if ok {
        let first = *passes < rise;
        *passes = passes.saturating_add(1).min(rise);
        first
    } else {
        *passes = 0;
        true
    }
}

/// A non-blocking connect to `target` whose socket closes with a reset (SO_LINGER 0: no FIN
/// exchange, no TIME_WAIT socket per check).
fn connect(target: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect(target).map_err(|e| io_reason(&e))?;
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .map_err(|e| io_reason(&e))?;
    Ok(s)
}

/// The round trip of a connected socket's handshake (SYN to SYN-ACK), as the kernel measured
/// it (`TCP_INFO`: its first round-trip sample).
fn handshake_rtt(s: &TcpStream) -> Option<Duration> {
    // SAFETY: tcp_info is plain integers: all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket descriptor, and a pointer to a tcp_info with its exact length
    // (the kernel writes at most `len` bytes and says how many).
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (r == 0 && info.tcpi_rtt > 0).then(|| Duration::from_micros(info.tcpi_rtt as u64))
}

/// Why a connect failed (the socket's pending error).
fn connect_error(s: &TcpStream) -> String {
    match s.take_error() {
        Ok(Some(e)) => io_reason(&e),
        Ok(None) => "connection closed".to_owned(),
        Err(e) => io_reason(&e),
    }
}

/// The same wording as the tokio checks' errors.
fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        _ => e.to_string(),
    }
}

/// The raw sockets of `syn` checks.
struct Raw {
    v4: Socket,
    /// `None` when the host has no IPv6.
    v6: Option<Socket>,
    /// Bound, never listening, dual-stack: reserves `port` (no other socket gets it, and a
    /// SYN-ACK to it finds no socket, so the kernel answers it with a reset).
    _reserve: Socket,
    port: u16,
    /// Keys the sequence numbers (replies cannot be guessed by a third party).
    secret: u64,
}

impl Raw {
    fn open(poll: &Poll) -> io::Result<Raw> {
        let reserve = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        reserve.set_only_v6(false)?;
        reserve.bind(&SockAddr::from(SocketAddr::from((
            std::net::Ipv6Addr::UNSPECIFIED,
            0,
        ))))?;
        let port = reserve
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .ok_or_else(|| io::Error::other("no local port"))?;
        let v4 = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
        v4.set_nonblocking(true)?;
        dont_fragment(&v4)?;
        // SYNs go out with the IPv4 header this thread wrote (`syn_packet_v4`).
        v4.set_header_included_v4(true)?;
        mmsg::enable_timestamps(v4.as_raw_fd())?;
        raw_buffers(&v4);
        // Only TCP segments to our port: X = IP header length, A = destination port.
        v4.attach_filter(&[
            SockFilter::new(0xb1, 0, 0, 0),
            SockFilter::new(0x48, 0, 0, 2),
            SockFilter::new(0x15, 0, 1, port as u32),
            SockFilter::new(0x06, 0, 0, 0xffff),
            SockFilter::new(0x06, 0, 0, 0),
        ])?;
        poll.registry()
            .register(&mut SourceFd(&v4.as_raw_fd()), RAW4, Interest::READABLE)?;
        let v6 = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::TCP))
            .and_then(|s| {
                s.set_nonblocking(true)?;
                mmsg::enable_timestamps(s.as_raw_fd())?;
                raw_buffers(&s);
                // IPv6 raw sockets see the segment alone: A = destination port.
                s.attach_filter(&[
                    SockFilter::new(0x28, 0, 0, 2),
                    SockFilter::new(0x15, 0, 1, port as u32),
                    SockFilter::new(0x06, 0, 0, 0xffff),
                    SockFilter::new(0x06, 0, 0, 0),
                ])?;
                poll.registry().register(
                    &mut SourceFd(&s.as_raw_fd()),
                    RAW6,
                    Interest::READABLE,
                )?;
                Ok(s)
            })
            .ok();
        let secret = lb_common::hash::fmix64(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ std::process::id() as u64,
        );
        Ok(Raw {
            v4,
            v6,
            _reserve: reserve,
            port,
            secret,
        })
    }
}

/// Buffer room of each raw socket, both ways. A raw socket has the host's default
/// (`net.core.rmem_default`, about 200 KiB: some 150 replies), which a checker thread held up for
/// 15 ms at 10 000 checks a second overflows: the replies dropped, their checks time out and
/// healthy backends go down. 4 MiB holds thousands of either.
const RAW_BUFFER: usize = 4 << 20;

/// Gives a raw socket [`RAW_BUFFER`] to send and to receive (as far as the host allows:
/// without CAP_NET_ADMIN, up to `net.core.wmem_max`/`rmem_max`).
fn raw_buffers(s: &Socket) {
    for receive in [true, false] {
        if let Err(e) = mmsg::set_buffer(s.as_raw_fd(), receive, RAW_BUFFER) {
            tracing::debug!("health: raw socket buffer of {RAW_BUFFER} bytes: {e}");
        }
    }
}

/// Sets DF on the socket's IPv4 packets (`IP_PMTUDISC_DO`): a SYN never needs fragmenting.
/// (Its SYNs now carry DF and a non-zero identification in the header this thread writes,
/// `syn_packet_v4`; before that, DF spared the kernel its hashed `ip_idents` table, the costliest
/// step of sending a SYN.)
fn dont_fragment(s: &Socket) -> io::Result<()> {
    mmsg::set_int_option(
        s.as_raw_fd(),
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DO,
    )
}

/// The source address the kernel uses toward `dst` (a connected UDP socket's local address;
/// nothing is sent).
fn source_toward(dst: IpAddr) -> io::Result<IpAddr> {
    let any: SocketAddr = if dst.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let u = std::net::UdpSocket::bind(any)?;
    u.connect((dst, 9))?;
    Ok(u.local_addr()?.ip())
}

/// A SYN from `src`:`sport` to `target` with sequence number `seq`, checksum included.
fn syn_segment(
    src: IpAddr,
    target: SocketAddr,
    sport: u16,
    seq: u32,
) -> io::Result<[u8; mmsg::SEG]> {
    let mut h = etherparse::TcpHeader::new(sport, target.port(), seq, 64240);
    h.syn = true;
    let sum = match (src, target.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => h.calc_checksum_ipv4_raw(s.octets(), d.octets(), &[]),
        (IpAddr::V6(s), IpAddr::V6(d)) => h.calc_checksum_ipv6_raw(s.octets(), d.octets(), &[]),
        _ => {
            return Err(io::Error::other(
                "source and backend address families differ",
            ));
        }
    };
    h.checksum = sum.map_err(|e| io::Error::other(e.to_string()))?;
    let mut seg = [0u8; mmsg::SEG];
    seg.copy_from_slice(&h.to_bytes());
    Ok(seg)
}

/// The IPv4 datagram of SYN `seg` from `src` to `dst`: the IPv4 raw socket takes it whole
/// (`IP_HDRINCL`), which spares the kernel building the header (its corked `ip_append_data`
/// path was about 7 % of the checker's time). DF is set (a SYN never needs fragmenting) and the
/// identification is not zero (the kernel would pick one from its hashed `ip_idents` table);
/// the kernel fills in the total length and the header checksum.
fn syn_packet_v4(
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    seq: u32,
    seg: &[u8; mmsg::SEG],
) -> [u8; mmsg::PKT] {
    let mut ip = etherparse::Ipv4Header::new(
        mmsg::SEG as u16,
        64,
        etherparse::IpNumber::TCP,
        src.octets(),
        dst.octets(),
    )
    .expect("a 20-byte payload fits");
    ip.dont_fragment = true;
    ip.identification = (seq >> 16) as u16 | 1;
    ip.header_checksum = ip.calc_header_checksum();
    let mut pkt = [0u8; mmsg::PKT];
    pkt[..mmsg::PKT - mmsg::SEG].copy_from_slice(&ip.to_bytes());
    pkt[mmsg::PKT - mmsg::SEG..].copy_from_slice(seg);
    pkt
}

/// What a reply to a SYN says.
#[derive(Debug, PartialEq)]
struct Reply {
    /// Its source port (the backend's port).
    port: u16,
    /// Its source address (IPv4; IPv6 raw sockets give the segment alone).
    from: Option<IpAddr>,
    ack: u32,
    syn_ack: bool,
    rst: bool,
}

/// A segment read from a raw socket (IPv4: with its IP header), if it is addressed to `port`.
fn parse_reply(buf: &[u8], v4: bool, port: u16) -> Option<Reply> {
    let (from, seg) = if v4 {
        let (ip, rest) = etherparse::Ipv4Header::from_slice(buf).ok()?;
        (Some(IpAddr::V4(ip.source.into())), rest)
    } else {
        (None, buf)
    };
    let (tcp, _) = etherparse::TcpHeader::from_slice(seg).ok()?;
    if tcp.destination_port != port || !tcp.ack {
        return None;
    }
    Some(Reply {
        port: tcp.source_port,
        from,
        ack: tcp.acknowledgment_number,
        syn_ack: tcp.syn && !tcp.rst,
        rst: tcp.rst,
    })
}

#[cfg(test)]
mod tests {
    /// Failures, and the first `rise` passes after one, may change a state (they go to the
    /// controller at once); the passes after those may wait.
    #[test]
    fn only_results_that_may_change_a_state_are_urgent() {
        let mut passes = 0u16;
        let urgent: Vec<bool> = [true, true, true, true, false, true, true, false, true]
            .iter()
            .map(|ok| may_change_state(&mut passes, 2, *ok))
            .collect();
        assert_eq!(
            urgent,
            [true, true, false, false, true, true, true, true, true]
        );
        // rise 0 counts as 1 (a pass after a pass changes nothing).
        let mut passes = 0u16;
        assert!(may_change_state(&mut passes, 0, true));
        assert!(!may_change_state(&mut passes, 0, true));
    }

    /// The tick is a fiftieth of the shortest interval, within its bounds.
    #[test]
    fn the_tick_follows_the_shortest_interval() {
        assert_eq!(tick(1000), Duration::from_millis(20));
        assert_eq!(tick(500), Duration::from_millis(10));
        assert_eq!(tick(100), Duration::from_millis(2));
        assert_eq!(tick(10), TICK_MIN);
        assert_eq!(tick(60_000), TICK_MAX);
    }

    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::config::{CheckKind, Health as CheckConfig};

    fn spec(port: u16, interval_ms: u32) -> CheckSpec {
        CheckSpec {
            label: format!("t/{port}"),
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            cfg: CheckConfig {
                kind: CheckKind::Tcp,
                port,
                path: "/".into(),
                expect_status: 200,
                interval_ms,
                timeout_ms: 200,
                rise: 1,
                fall: 1,
                payload: String::new(),
            },
        }
    }

    /// A passing `tcp` check's duration is its handshake's round trip, which the kernel has
    /// for every connected socket.
    #[test]
    fn a_connected_socket_has_its_handshake_round_trip() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let rtt = handshake_rtt(&TcpStream::from_std(s)).expect("TCP_INFO's round trip");
        assert!(rtt > Duration::ZERO);
    }

    /// Results per backend until each of `backends` has at least three (within 5 s), every one
    /// shown to `check` first.
    fn gather(
        rx: &mut mpsc::Receiver<CheckBatch>,
        backends: usize,
        check: impl Fn(&CheckResult),
    ) -> HashMap<BackendId, Vec<Result<(), String>>> {
        let mut seen: HashMap<BackendId, Vec<Result<(), String>>> = HashMap::new();
        let t0 = Instant::now();
        while seen.values().map(Vec::len).min().unwrap_or(0) < 3 || seen.len() < backends {
            assert!(t0.elapsed() < Duration::from_secs(5), "results: {seen:?}");
            for r in rx.blocking_recv().expect("checker alive") {
                check(&r);
                seen.entry(r.id).or_default().push(r.result);
            }
        }
        seen
    }

    /// An accepting port passes, a closed one fails with the reason, each result carries its
    /// backend's token, checks repeat at their interval, and a removed backend is no longer
    /// checked.
    #[test]
    fn checks_pass_fail_repeat_and_stop() {
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open_port = open.local_addr().unwrap().port();
        let closed_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (tx, mut rx) = mpsc::channel(64);
        let c = TcpChecker::start(tx).unwrap();
        let (a, b) = (BackendId(1), BackendId(2));
        c.send(Cmd::Set(a, 11, spec(open_port, 50)));
        c.send(Cmd::Set(b, 12, spec(closed_port, 50)));
        let seen = gather(&mut rx, 2, |r| {
            assert_eq!(r.token, if r.id == a { 11 } else { 12 })
        });
        assert!(seen[&a].iter().all(|r| r.is_ok()), "{:?}", seen[&a]);
        assert!(
            seen[&b]
                .iter()
                .all(|r| r.as_ref().unwrap_err() == "connection refused"),
            "{:?}",
            seen[&b]
        );
        // Removed: no result of it after the queue drains.
        c.send(Cmd::Remove(a));
        std::thread::sleep(Duration::from_millis(100));
        while rx.try_recv().is_ok() {}
        let t1 = Instant::now();
        while t1.elapsed() < Duration::from_millis(300) {
            if let Ok(batch) = rx.try_recv() {
                assert!(
                    batch.iter().all(|r| r.id == b),
                    "a removed backend was checked"
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(open);
    }

    #[test]
    fn syn_segments_check_and_replies_parse() {
        let src: IpAddr = "10.0.0.1".parse().unwrap();
        let target: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let seg = syn_segment(src, target, 40000, 0x1234_5678).unwrap();
        let (h, rest) = etherparse::TcpHeader::from_slice(&seg).unwrap();
        assert!(rest.is_empty() && h.syn && !h.ack);
        assert_eq!(
            (h.source_port, h.destination_port, h.sequence_number),
            (40000, 80, 0x1234_5678)
        );
        assert_eq!(
            h.calc_checksum_ipv4_raw([10, 0, 0, 1], [10, 0, 0, 2], &[])
                .unwrap(),
            h.checksum
        );
        assert!(syn_segment("::1".parse().unwrap(), target, 1, 1).is_err());
        // With its IPv4 header, as the IPv4 raw socket sends it.
        let pkt = syn_packet_v4(
            [10, 0, 0, 1].into(),
            [10, 0, 0, 2].into(),
            0x1234_5678,
            &seg,
        );
        let (ip, rest) = etherparse::Ipv4Header::from_slice(&pkt).unwrap();
        assert_eq!(rest, &seg[..]);
        assert_eq!(
            (ip.source, ip.destination, ip.protocol, ip.time_to_live),
            ([10, 0, 0, 1], [10, 0, 0, 2], etherparse::IpNumber::TCP, 64)
        );
        assert!(ip.dont_fragment && ip.identification != 0);
        assert_eq!(ip.total_len as usize, pkt.len());
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());

        // A SYN-ACK from the backend, as an IPv4 raw socket reads it.
        let mut sa = etherparse::TcpHeader::new(80, 40000, 7, 1000);
        sa.syn = true;
        sa.ack = true;
        sa.acknowledgment_number = 0x1234_5679;
        let ip = etherparse::Ipv4Header::new(
            sa.header_len() as u16,
            64,
            etherparse::IpNumber::TCP,
            [10, 0, 0, 2],
            [10, 0, 0, 1],
        )
        .unwrap();
        let mut pkt = ip.to_bytes().to_vec();
        pkt.extend_from_slice(&sa.to_bytes());
        let r = parse_reply(&pkt, true, 40000).unwrap();
        assert_eq!(
            r,
            Reply {
                port: 80,
                from: Some(target.ip()),
                ack: 0x1234_5679,
                syn_ack: true,
                rst: false,
            }
        );
        assert!(parse_reply(&pkt, true, 40001).is_none(), "another port");
        assert!(parse_reply(&pkt[..25], true, 40000).is_none(), "truncated");
        // IPv6: the segment alone.
        let r6 = parse_reply(&sa.to_bytes(), false, 40000).unwrap();
        assert_eq!((r6.from, r6.syn_ack), (None, true));
    }

    /// `syn` checks against real sockets (needs CAP_NET_RAW: CI runs as root): an open port is
    /// up without ever being connected (nothing to accept), a closed one is refused.
    #[test]
    fn syn_checks_are_half_open() {
        // SAFETY: geteuid only reads.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: raw sockets need root");
            return;
        }
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        open.set_nonblocking(true).unwrap();
        let open_port = open.local_addr().unwrap().port();
        let closed_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let syn = |port| CheckSpec {
            cfg: CheckConfig {
                kind: CheckKind::Syn,
                ..spec(port, 50).cfg
            },
            ..spec(port, 50)
        };
        let open6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        open6.set_nonblocking(true).unwrap();
        let six = CheckSpec {
            address: "::1".parse().unwrap(),
            ..syn(open6.local_addr().unwrap().port())
        };
        let (tx, mut rx) = mpsc::channel(64);
        let c = TcpChecker::start(tx).unwrap();
        let (a, b, v6) = (BackendId(1), BackendId(2), BackendId(3));
        c.send(Cmd::Set(a, 1, syn(open_port)));
        c.send(Cmd::Set(b, 2, syn(closed_port)));
        c.send(Cmd::Set(v6, 3, six));
        let seen = gather(&mut rx, 3, |_| {});
        assert!(seen[&a].iter().all(|r| r.is_ok()), "{:?}", seen[&a]);
        assert!(seen[&v6].iter().all(|r| r.is_ok()), "IPv6: {:?}", seen[&v6]);
        assert!(
            seen[&b]
                .iter()
                .all(|r| r.as_ref().unwrap_err() == "connection refused"),
            "{:?}",
            seen[&b]
        );
        assert!(open6.accept().is_err(), "IPv6 half-open too");
        assert_eq!(
            open.accept().map(|_| ()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "half-open: no connection reached the listener"
        );
    }
}
