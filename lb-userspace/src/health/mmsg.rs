//! Batched datagram I/O for the `syn` checks' raw sockets: every SYN started in one pass of the
//! checker goes out in one `sendmmsg`, and the replies waiting are read 64 at a time with
//! `recvmmsg`. Each system call costs a few hundred nanoseconds on a VM with the kernel's
//! return-stack mitigations, and a burst of SYNs to the same device wakes the receiving CPU
//! once instead of once per SYN (the benchmark's RPS set-up: an inter-processor interrupt,
//! a VM exit, was the largest single cost of a check).

use std::{
    io,
    os::fd::RawFd,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use socket2::SockAddr;

/// A TCP SYN without options: the segment alone.
pub const SEG: usize = 20;
/// Room for a SYN with its IPv4 header (IPv4 raw sockets send it whole: `IP_HDRINCL`).
pub const PKT: usize = 40;

/// One SYN to send.
pub struct Outgoing {
    /// The check it belongs to.
    pub key: u64,
    /// The backend's address (port 0: raw sockets take none).
    pub to: SockAddr,
    /// The datagram: `pkt[..len]`.
    pub pkt: [u8; PKT],
    pub len: usize,
}

/// Most messages one `sendmmsg` takes (the kernel's `UIO_MAXIOV`).
const MAX_BATCH: usize = 1024;

/// What [`send_all`] did with a batch.
#[derive(Debug, Default)]
pub struct Sent {
    /// Indexes into the batch that the kernel refused, each with its error.
    pub failed: Vec<(usize, io::Error)>,
    /// The first index not tried: the socket's send buffer was full (`EAGAIN`); this one and
    /// those after it are to be sent later. The batch's length when all were tried.
    pub unsent_from: usize,
}

/// Sends every segment of `out` from `fd` (a non-blocking raw socket) in as few calls as it
/// takes, until the socket's send buffer is full (then [`Sent::unsent_from`] says where to go
/// on); the segments not refused went out.
pub fn send_all(fd: RawFd, out: &[Outgoing]) -> Sent {
    let mut failed = Vec::new();
    let mut iovs: Vec<libc::iovec> = out
        .iter()
        .map(|o| libc::iovec {
            iov_base: o.pkt.as_ptr().cast_mut().cast(),
            iov_len: o.len.min(PKT),
        })
        .collect();
    let mut hdrs: Vec<libc::mmsghdr> = out
        .iter()
        .zip(iovs.iter_mut())
        .map(|(o, iov)| {
            // SAFETY: an all-zero msghdr is a valid empty one (no control data, no flags).
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = o.to.as_ptr().cast_mut().cast();
            h.msg_hdr.msg_namelen = o.to.len();
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let mut at = 0;
    while at < hdrs.len() {
        let n = (hdrs.len() - at).min(MAX_BATCH) as libc::c_uint;
        // SAFETY: `hdrs[at..at + n]` are initialised headers whose name and iovec pointers
        // point into `out` and `iovs`, which outlive the call; the kernel only reads them
        // (and writes each header's `msg_len`).
        let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr().add(at), n, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                // The buffer is full of SYNs the kernel has not sent yet: the rest later.
                io::ErrorKind::WouldBlock => break,
                // The error is the first remaining message's: it failed, the rest are retried.
                _ => {
                    failed.push((at, e));
                    at += 1;
                }
            }
        } else if r == 0 {
            failed.push((at, io::Error::other("sendmmsg sent nothing")));
            at += 1;
        } else {
            at += r as usize;
        }
    }
    Sent {
        failed,
        unsent_from: at,
    }
}

/// Sets a socket buffer (`SO_SNDBUF`, `SO_RCVBUF`) to `bytes`, beyond the host's
/// `net.core.wmem_max`/`rmem_max` where the process may (`SO_*BUFFORCE`, CAP_NET_ADMIN);
/// otherwise as far as those allow.
pub fn set_buffer(fd: RawFd, receive: bool, bytes: usize) -> io::Result<()> {
    let (force, plain) = if receive {
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF)
    } else {
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)
    };
    let v = bytes.min(libc::c_int::MAX as usize) as libc::c_int;
    set_int_option(fd, libc::SOL_SOCKET, force, v)
        .or_else(|_| set_int_option(fd, libc::SOL_SOCKET, plain, v))
}

/// Room for one reply: an IPv4 header with options (60 bytes) and a TCP header with options
/// (60), rounded up. A longer datagram is cut (its headers are all that is read).
pub const REPLY: usize = 128;

/// Replies per `recvmmsg`.
pub const BATCH: usize = 64;

/// Room for one reply's control data: its receive time (`SCM_TIMESTAMPNS`, a timespec).
const CONTROL: usize = 64;

/// Buffers for [`Inbox::recv_batch`].
pub struct Inbox {
    bufs: Box<[[u8; REPLY]; BATCH]>,
    lens: [usize; BATCH],
    /// Control data, 8-byte aligned for the `cmsghdr`s the kernel writes.
    control: Box<[[u64; CONTROL / 8]; BATCH]>,
    stamps: [Option<SystemTime>; BATCH],
}

impl Default for Inbox {
    fn default() -> Inbox {
        Inbox {
            bufs: Box::new([[0; REPLY]; BATCH]),
            lens: [0; BATCH],
            control: Box::new([[0; CONTROL / 8]; BATCH]),
            stamps: [None; BATCH],
        }
    }
}

/// Asks the kernel to stamp every datagram `fd` receives with its arrival time
/// (`SO_TIMESTAMPNS`), which [`Inbox::stamp`] returns: a check's duration does not depend on
/// when the checker got round to reading its reply.
pub fn enable_timestamps(fd: RawFd) -> io::Result<()> {
    set_int_option(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)
}

/// `setsockopt(fd, level, name, value)` for an option that takes a C int.
pub fn set_int_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a pointer to a c_int with its exact length; the kernel checks the descriptor.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The arrival time in a received message's control data, if the kernel put one there.
///
/// # Safety
/// `h` is a header filled by `recvmmsg`: its control pointer and length describe a buffer
/// that is still alive.
unsafe fn arrival(h: &libc::msghdr) -> Option<SystemTime> {
    // SAFETY: the caller's promise; CMSG_FIRSTHDR/NXTHDR stay inside msg_controllen.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(h) };
    while !c.is_null() {
        // SAFETY: `c` points at a whole cmsghdr inside the control buffer.
        let hdr = unsafe { &*c };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_TIMESTAMPNS {
            // SAFETY: an SCM_TIMESTAMPNS message carries a timespec after its header.
            let ts: libc::timespec = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).cast()) };
            return Some(UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
        }
        // SAFETY: as above.
        c = unsafe { libc::CMSG_NXTHDR(h, c) };
    }
    None
}

impl Inbox {
    /// Reads up to [`BATCH`] datagrams waiting on `fd` (non-blocking); returns how many
    /// (`WouldBlock` when none is waiting).
    pub fn recv_batch(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.bufs[i].as_mut_ptr().cast(),
            iov_len: REPLY,
        });
        let control = &mut self.control;
        let mut hdrs: [libc::mmsghdr; BATCH] = std::array::from_fn(|i| {
            // SAFETY: an all-zero msghdr is a valid empty one (no name, no control data).
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = &mut iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = control[i].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = CONTROL;
            h
        });
        // SAFETY: BATCH initialised headers, each with one iovec into its own buffer of
        // `self.bufs` (REPLY bytes) and its own control buffer (CONTROL bytes), all of which
        // outlive the call; no timeout.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = r as usize;
        for ((len, stamp), h) in self.lens.iter_mut().zip(&mut self.stamps).zip(&hdrs[..n]) {
            *len = (h.msg_len as usize).min(REPLY);
            // SAFETY: filled by recvmmsg just now; its control buffer is `self.control`'s.
            *stamp = unsafe { arrival(&h.msg_hdr) };
        }
        Ok(n)
    }

    /// When datagram `i` of the last [`Inbox::recv_batch`] arrived (with
    /// [`enable_timestamps`] on its socket).
    pub fn stamp(&self, i: usize) -> Option<SystemTime> {
        self.stamps[i]
    }

    /// Datagram `i` of the last [`Inbox::recv_batch`] (cut to [`REPLY`] bytes).
    pub fn get(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, SocketAddr, UdpSocket},
        os::fd::AsRawFd,
    };

    use super::*;

    /// `n` segments to `to`, the `i`th filled with the byte `i`.
    fn numbered(to: &SockAddr, n: u8) -> Vec<Outgoing> {
        (0..n)
            .map(|i| Outgoing {
                key: i as u64,
                to: to.clone(),
                pkt: [i; PKT],
                len: SEG,
            })
            .collect()
    }

    /// Datagrams sent in one batch all arrive, in order, and are read back in batches; one
    /// to an address the kernel refuses fails alone.
    #[test]
    fn a_batch_goes_out_and_comes_back() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        enable_timestamps(rx.as_raw_fd()).unwrap();
        let before = SystemTime::now();
        let to = SockAddr::from(rx.local_addr().unwrap());
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut out = numbered(&to, 100);
        // Port 0 cannot be sent to.
        out[50].to = SockAddr::from(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let sent = send_all(tx.as_raw_fd(), &out);
        assert_eq!(sent.unsent_from, out.len(), "every one tried");
        let failed = sent.failed;
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, 50);
        let mut inbox = Inbox::default();
        let mut got = Vec::new();
        loop {
            match inbox.recv_batch(rx.as_raw_fd()) {
                Ok(n) => {
                    assert!(n <= BATCH);
                    got.extend((0..n).map(|i| inbox.get(i).to_vec()));
                    for i in 0..n {
                        let t = inbox.stamp(i).expect("stamped");
                        assert!(t >= before && t <= SystemTime::now(), "{t:?}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let want: Vec<Vec<u8>> = (0..100u8)
            .filter(|i| *i != 50)
            .map(|i| vec![i; SEG])
            .collect();
        assert_eq!(got, want);
    }

    /// A full send buffer stops the batch without failing anything: what was not tried is sent
    /// later, from where it stopped. (A Unix datagram socket's receiver takes only
    /// `net.unix.max_dgram_qlen` unread datagrams; then the sender gets EAGAIN.)
    #[test]
    fn a_full_buffer_leaves_the_rest_for_later() {
        let dir = std::env::temp_dir().join(format!("lb-mmsg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rx");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = std::os::unix::net::UnixDatagram::unbound().unwrap();
        tx.set_nonblocking(true).unwrap();
        let to = SockAddr::unix(&path).unwrap();
        let out = numbered(&to, 200);
        let mut got = Vec::new();
        let (mut at, mut stops) = (0, 0);
        for _ in 0..1000 {
            let sent = send_all(tx.as_raw_fd(), &out[at..]);
            assert!(sent.failed.is_empty(), "{:?}", sent.failed);
            if sent.unsent_from < out.len() - at {
                stops += 1;
            }
            at += sent.unsent_from;
            let mut buf = [0u8; PKT];
            while let Ok(n) = rx.recv(&mut buf) {
                got.push(buf[..n].to_vec());
            }
            if at == out.len() {
                break;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(at, out.len());
        assert!(stops > 0, "the receiver's queue never filled");
        assert!(got.len() == out.len(), "{} arrived", got.len());
        let want: Vec<Vec<u8>> = (0..200u8).map(|i| vec![i; SEG]).collect();
        assert_eq!(got, want, "all of them, in order, once");
    }
}
