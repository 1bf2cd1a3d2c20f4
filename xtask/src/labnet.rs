//! The lab's backend server and client. They run inside the lab's namespaces as
//! `xtask lab-backend ...` and `xtask lab-client ...`.
//!
//! Backend: HTTP (answers its own name), TCP echo (greets with `<name>\n`, then echoes), UDP
//! echo (answers `<name> <payload>`).
//! UDP sockets are bound to the VIPs so replies leave from the VIP (DSR needs that; a wildcard
//! socket would answer from the backend's own address).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use socket2::{Domain, Protocol, Socket, Type};

/// Runs the backend servers forever. Prints `ready` once every socket is bound.
/// While `fail_file` exists, HTTP answers `503 Service Unavailable` (health-check tests).
pub fn serve_backend(
    name: &str,
    vips: &[IpAddr],
    http_port: u16,
    echo_port: u16,
    fail_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let http = dual_stack_listener(http_port)?;
    // (An empty `vips` serves TCP only: used for a server on the LB's own address.)
    let echo = dual_stack_listener(echo_port)?;
    // One socket per VIP (replies leave from the VIP), and a wildcard one for the backend's own
    // addresses (health checks); the kernel delivers to the most specific bound socket.
    let mut udp = Vec::new();
    for vip in vips {
        udp.push(udp_socket(SocketAddr::new(*vip, echo_port), false)?);
    }
    if !vips.is_empty() {
        udp.push(udp_socket(
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), echo_port),
            true,
        )?);
    }
    let body = format!("{name}\n");
    let http_thread = thread::spawn(move || {
        for conn in http.incoming().flatten() {
            let body = body.clone();
            let failing = fail_file.as_ref().is_some_and(|f| f.exists());
            thread::spawn(move || {
                let _ = answer_http(conn, &body, failing);
            });
        }
    });
    let greeting = format!("{name}\n");
    thread::spawn(move || {
        for conn in echo.incoming().flatten() {
            let greeting = greeting.clone();
            thread::spawn(move || {
                let _ = echo_tcp(conn, &greeting);
            });
        }
    });
    for s in udp {
        let name = name.to_owned();
        thread::spawn(move || {
            // Whole datagrams, fragmented ones (8 KB tests) included.
            let mut buf = vec![0u8; 65536];
            while let Ok((n, peer)) = s.recv_from(&mut buf) {
                let mut reply = format!("{name} ").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&reply, peer);
            }
        });
    }
    println!("ready");
    std::io::stdout().flush()?;
    let _ = http_thread.join();
    Ok(())
}

fn dual_stack_listener(port: u16) -> anyhow::Result<TcpListener> {
    let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())
        .with_context(|| format!("binding TCP [::]:{port}"))?;
    s.listen(1024)?;
    Ok(s.into())
}

fn udp_socket(addr: SocketAddr, dual_stack: bool) -> anyhow::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if dual_stack {
        s.set_only_v6(false)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&addr.into())
        .with_context(|| format!("binding UDP {addr} (is the VIP on lo?)"))?;
    Ok(s.into())
}

fn answer_http(mut conn: TcpStream, body: &str, failing: bool) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let status = if failing {
        "503 Service Unavailable"
    } else {
        "200 OK"
    };
    // `GET /bytes/N`: N bytes (large downloads, e.g. across a smaller-MTU hop); the backend's
    // name in the X-Backend header.
    let line = String::from_utf8_lossy(&req[..req.len().min(256)]).into_owned();
    let big = line
        .strip_prefix("GET /bytes/")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n <= 64 << 20);
    let payload: std::borrow::Cow<'_, [u8]> = match big {
        Some(n) => (0..n)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>()
            .into(),
        None => body.as_bytes().into(),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Backend: {}\r\nConnection: close\r\n\r\n",
        payload.len(),
        body.trim()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(&payload)
}

fn echo_tcp(mut conn: TcpStream, greeting: &str) -> std::io::Result<()> {
    conn.write_all(greeting.as_bytes())?;
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        conn.write_all(&buf[..n])?;
    }
}

/// Result of many client requests: answers per backend name, and failures.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub by_backend: BTreeMap<String, usize>,
    pub errors: usize,
    pub first_error: Option<String>,
    /// Wall-clock time (ms since the Unix epoch) of the last failure.
    pub last_error_unix_ms: Option<u64>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Tally {
    fn add(&mut self, r: anyhow::Result<String>) {
        match r {
            Ok(name) => *self.by_backend.entry(name).or_default() += 1,
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
                self.last_error_unix_ms = Some(unix_ms());
            }
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "by_backend": self.by_backend,
            "errors": self.errors,
            "first_error": self.first_error,
            "last_error_unix_ms": self.last_error_unix_ms,
        })
    }

    pub fn from_json(v: &serde_json::Value) -> anyhow::Result<Tally> {
        let mut t = Tally::default();
        for (k, n) in v["by_backend"].as_object().context("by_backend")? {
            t.by_backend
                .insert(k.clone(), n.as_u64().context("count")? as usize);
        }
        t.errors = v["errors"].as_u64().context("errors")? as usize;
        t.first_error = v["first_error"].as_str().map(str::to_owned);
        t.last_error_unix_ms = v["last_error_unix_ms"].as_u64();
        Ok(t)
    }

    pub fn total(&self) -> usize {
        self.by_backend.values().sum()
    }
}

fn bound_socket(src: IpAddr, kind: Type, proto: Protocol) -> anyhow::Result<Socket> {
    let domain = if src.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, kind, Some(proto))?;
    s.bind(&SocketAddr::new(src, 0).into())
        .with_context(|| format!("binding source {src}"))?;
    Ok(s)
}

/// One HTTP GET from `src` to `target`; returns the body (the backend's name).
pub fn http_get(src: IpAddr, target: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    http_get_from(src, target, timeout).map(|(_, name)| name)
}

/// `count` HTTP GETs one after another (sources in turn), printing one JSON line each:
/// `{"src": "...", "sport": n, "backend": "b1"}` (`"error"` instead of `"backend"` on failure).
pub fn http_detail(sources: &[IpAddr], target: SocketAddr, count: usize) -> anyhow::Result<()> {
    for i in 0..count {
        let src = sources[i % sources.len()];
        match http_get_from(src, target, Duration::from_secs(3)) {
            Ok((sport, name)) => println!(
                "{}",
                serde_json::json!({"src": src, "sport": sport, "backend": name})
            ),
            Err(e) => println!(
                "{}",
                serde_json::json!({"src": src, "error": format!("{e:#}")})
            ),
        }
    }
    Ok(())
}

/// One HTTP GET; the client's port and the body.
fn http_get_from(
    src: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let s = bound_socket(src, Type::STREAM, Protocol::TCP)?;
    let sport = s
        .local_addr()?
        .as_socket()
        .map(|a| a.port())
        .unwrap_or_default();
    s.connect_timeout(&target.into(), timeout)
        .with_context(|| format!("connecting {src} → {target}"))?;
    let mut conn: TcpStream = s.into();
    conn.set_read_timeout(Some(timeout))?;
    conn.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    conn.read_to_string(&mut resp)
        .context("reading the answer")?;
    let Some((head, body)) = resp.split_once("\r\n\r\n") else {
        bail!("malformed HTTP answer: {resp:?}");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("HTTP status: {}", head.lines().next().unwrap_or(""));
    }
    Ok((sport, body.trim().to_owned()))
}

/// One UDP echo from `src` to `target`; returns the backend's name.
pub fn udp_echo(src: IpAddr, target: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let s: UdpSocket = bound_socket(src, Type::DGRAM, Protocol::UDP)?.into();
    s.set_read_timeout(Some(timeout))?;
    s.connect(target)?;
    s.send(b"ping")?;
    let mut buf = [0u8; 2048];
    let n = s
        .recv(&mut buf)
        .with_context(|| format!("no UDP answer from {target}"))?;
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    match text.split_once(' ') {
        Some((name, "ping")) => Ok(name.to_owned()),
        _ => bail!("unexpected UDP answer {text:?}"),
    }
}

/// One UDP echo of an `size`-byte datagram (fragmented on the wire when larger than the MTU):
/// the echo must carry exactly the bytes sent; returns the backend's name.
pub fn udp_echo_big(
    src: IpAddr,
    target: SocketAddr,
    timeout: Duration,
    size: usize,
    seed: usize,
) -> anyhow::Result<String> {
    let s: UdpSocket = bound_socket(src, Type::DGRAM, Protocol::UDP)?.into();
    s.set_read_timeout(Some(timeout))?;
    s.connect(target)?;
    let payload: Vec<u8> = (0..size).map(|i| b'a' + ((i + seed) % 26) as u8).collect();
    s.send(&payload)?;
    let mut buf = vec![0u8; 65536];
    let n = s
        .recv(&mut buf)
        .with_context(|| format!("no answer to a {size}-byte datagram from {target}"))?;
    let reply = &buf[..n];
    let Some(sp) = reply.iter().position(|b| *b == b' ') else {
        bail!("unexpected UDP answer of {n} bytes");
    };
    if reply[sp + 1..] != payload[..] {
        bail!(
            "the echo of {size} bytes came back as {} different bytes",
            n - sp - 1
        );
    }
    Ok(String::from_utf8_lossy(&reply[..sp]).into_owned())
}

/// `count` requests, sources taken round-robin.
pub fn many(
    kind: &str,
    sources: &[IpAddr],
    target: SocketAddr,
    count: usize,
) -> anyhow::Result<Tally> {
    let timeout = Duration::from_secs(3);
    let mut t = Tally::default();
    for i in 0..count {
        let src = sources[i % sources.len()];
        let r = match kind {
            "http" => http_get(src, target, timeout),
            "udp" => udp_echo(src, target, timeout),
            "udp-8k" => udp_echo_big(src, target, timeout, 8000, i),
            other => bail!("unknown client kind {other}"),
        };
        t.add(r);
    }
    Ok(t)
}

/// A long-lived TCP connection to the echo service: prints `backend <name>`, then sends a line
/// every 100 ms and checks the echo, until stdin closes; then prints `done <pings>`. Any
/// failure (reset, timeout, wrong echo) ends it with an error: the connection was broken.
pub fn hold(src: IpAddr, target: SocketAddr) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let s = bound_socket(src, Type::STREAM, Protocol::TCP)?;
    s.connect_timeout(&target.into(), Duration::from_secs(3))
        .with_context(|| format!("connecting {src} → {target}"))?;
    let conn: TcpStream = s.into();
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut reader = std::io::BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .context("reading the greeting")?;
    println!("backend {}", line.trim());
    std::io::stdout().flush()?;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    thread::spawn(move || {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        let _ = tx.send(());
    });
    let mut pings = 0u64;
    loop {
        let msg = format!("ping {pings}\n");
        writer
            .write_all(msg.as_bytes())
            .with_context(|| format!("sending ping {pings}"))?;
        line.clear();
        reader
            .read_line(&mut line)
            .with_context(|| format!("echo of ping {pings}"))?;
        if line != msg {
            bail!("ping {pings}: echo {line:?}");
        }
        pings += 1;
        if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
            break;
        }
    }
    println!("done {pings}");
    Ok(())
}

/// A long-lived UDP flow to the echo service (one socket: one source port): prints `backend
/// <name>`, then sends a datagram every 100 ms and checks the echo comes back from the same
/// backend, until stdin closes; then prints `done <pings>`. No answer within 3 s, a wrong echo
/// or another backend ends it with an error: the flow was broken.
pub fn hold_udp(src: IpAddr, target: SocketAddr) -> anyhow::Result<()> {
    let s: UdpSocket = bound_socket(src, Type::DGRAM, Protocol::UDP)?.into();
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.connect(target)?;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    thread::spawn(move || {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        let _ = tx.send(());
    });
    let mut first: Option<String> = None;
    let mut buf = vec![0u8; 2048];
    let mut pings = 0u64;
    loop {
        let msg = format!("ping {pings}");
        s.send(msg.as_bytes())
            .with_context(|| format!("sending ping {pings}"))?;
        let n = s
            .recv(&mut buf)
            .with_context(|| format!("no echo of ping {pings} from {target}"))?;
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        let Some((backend, echo)) = reply.split_once(' ') else {
            bail!("ping {pings}: unexpected answer {reply:?}");
        };
        if echo != msg {
            bail!("ping {pings}: echo {echo:?}");
        }
        match &first {
            None => {
                println!("backend {backend}");
                std::io::stdout().flush()?;
                first = Some(backend.to_owned());
            }
            Some(b) if b != backend => bail!("ping {pings}: moved from {b} to {backend}"),
            Some(_) => {}
        }
        pings += 1;
        if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
            break;
        }
    }
    println!("done {pings}");
    Ok(())
}

/// `count` long-lived TCP connections to the echo service (sources taken in turn), each sending
/// 512 bytes every 50 ms and checking that exactly those bytes come back (a pattern unique to
/// the connection and offset). Prints `ready <n>` once all are connected. On stdin:
/// `mark <label>` prints `phase <label> max_stall_ms <m>` (the longest wait for an echo, over
/// all connections, since the previous mark); end of input stops all and prints one JSON line
/// per connection: `{"conn":i,"backend":"b1","bytes":n,"error":null}`.
pub fn stream(sources: &[IpAddr], target: SocketAddr, count: usize) -> anyhow::Result<()> {
    use std::{
        io::BufRead as _,
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
    };
    let stop = Arc::new(AtomicBool::new(false));
    let max_stall = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for i in 0..count {
        let src = sources[i % sources.len()];
        let s = bound_socket(src, Type::STREAM, Protocol::TCP)?;
        s.connect_timeout(&target.into(), Duration::from_secs(3))
            .with_context(|| format!("connection {i}: {src} → {target}"))?;
        let conn: TcpStream = s.into();
        conn.set_read_timeout(Some(Duration::from_secs(15)))?;
        conn.set_nodelay(true)?;
        let mut reader = std::io::BufReader::new(conn.try_clone()?);
        let mut greeting = String::new();
        reader
            .read_line(&mut greeting)
            .with_context(|| format!("connection {i}: greeting"))?;
        conns.push((i, greeting.trim().to_owned(), reader, conn));
    }
    println!("ready {count}");
    std::io::stdout().flush()?;
    let mut handles = Vec::new();
    for (i, backend, mut reader, mut writer) in conns {
        let (stop, max_stall) = (stop.clone(), max_stall.clone());
        handles.push(thread::spawn(move || {
            let mut sent = 0u64;
            let mut buf = [0u8; 512];
            let mut got = [0u8; 512];
            let mut error = None;
            while !stop.load(Ordering::Relaxed) {
                for (k, b) in buf.iter_mut().enumerate() {
                    let x = (i as u64)
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        .wrapping_add(sent + k as u64);
                    *b = (x ^ (x >> 29)) as u8;
                }
                let t = std::time::Instant::now();
                if let Err(e) = writer.write_all(&buf) {
                    error = Some(format!("send at byte {sent}: {e}"));
                    break;
                }
                if let Err(e) = reader.read_exact(&mut got) {
                    error = Some(format!("echo at byte {sent}: {e}"));
                    break;
                }
                if got != buf {
                    error = Some(format!("corrupted echo at byte {sent}"));
                    break;
                }
                max_stall.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
                sent += 512;
                thread::sleep(Duration::from_millis(50));
            }
            (i, backend, sent, error)
        }));
    }
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if let Some(label) = line.strip_prefix("mark ") {
            println!(
                "phase {label} max_stall_ms {}",
                max_stall.swap(0, Ordering::Relaxed)
            );
            std::io::stdout().flush()?;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let (i, backend, bytes, error) =
            h.join().map_err(|_| anyhow::anyhow!("thread panicked"))?;
        println!(
            "{}",
            serde_json::json!({"conn": i, "backend": backend, "bytes": bytes, "error": error})
        );
    }
    Ok(())
}

/// `count` TCP SYNs to `target` tagged with 802.1Q VLAN `vid`, sent raw (AF_PACKET) out of
/// `eth0` to `dst_mac` (the LB): the lab has no 8021q module, so no VLAN interfaces.
pub fn raw_vlan_syns(
    src: IpAddr,
    target: SocketAddr,
    vid: u16,
    count: usize,
    dst_mac: [u8; 6],
) -> anyhow::Result<()> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, target.ip()) else {
        bail!("raw VLAN SYNs are IPv4 only");
    };
    let src_mac = {
        let t = std::fs::read_to_string("/sys/class/net/eth0/address")?;
        let b: Vec<u8> = t
            .trim()
            .split(':')
            .map(|x| u8::from_str_radix(x, 16))
            .collect::<Result<_, _>>()?;
        <[u8; 6]>::try_from(b).map_err(|_| anyhow::anyhow!("bad MAC {t}"))?
    };
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    anyhow::ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the fd was just opened and is owned here.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: a NUL-terminated literal.
    let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
    anyhow::ensure!(ifindex != 0, "no eth0");
    for i in 0..count {
        let b = etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
            .single_vlan(vid.try_into()?)
            .ipv4(s.octets(), d.octets(), 64)
            .tcp(40000 + i as u16, target.port(), 1, 64240)
            .syn();
        let mut frame = Vec::with_capacity(b.size(0));
        b.write(&mut frame, &[])?;
        // SAFETY: a zeroed sockaddr_ll is valid; the fields set are plain integers.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&dst_mac);
        // SAFETY: sendto(2) reads `frame` and `addr`, both valid for the call.
        let r = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        anyhow::ensure!(r >= 0, "sendto: {}", std::io::Error::last_os_error());
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
