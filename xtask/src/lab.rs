//! The lab: a DSR topology in network namespaces that it creates and always removes.
//!
//! ```text
//!            ┌──────────── <p>-sw: bridge br0 ────────────┐
//!            │ port cl        port lb         port b1..bN │
//!            └───┬───────────────┬───────────────┬────────┘
//!      <p>-cl eth0        <p>-lb eth0      <p>-bK eth0        (veth pairs)
//!   10.99.0.11-18      10.99.0.2 + lb_xdp   10.99.0.2K; VIP on lo
//!   fd00:99::11        fd00:99::2           fd00:99::2K
//!   VIP via 10.99.0.2
//! ```
//! Client → VIP goes to the LB (routed), lb_xdp rewrites the destination MAC to a backend's and
//! sends it back out (XDP_TX); the backend answers the client directly over the bridge.
//!
//! Every run has its own prefix (`lblab-<pid>-<n>`), so parallel runs never collide;
//! [`down_all`] removes leftovers of crashed runs.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::cmd::{run, run_quiet};

/// Namespace name prefix of every lab.
pub const PREFIX: &str = "lblab-";
/// Backends per lab (addresses 10.99.0.21–.90 and .101–.224).
pub const MAX_LAB_BACKENDS: usize = 194;
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x100);
pub const LB4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
pub const LB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2);
pub const LB_MAC: &str = "02:99:00:00:00:02";
pub const HTTP_PORT: u16 = 80;
pub const ECHO_PORT: u16 = 7;
/// The allow-all XDP program from Debian's xdp-tools, put on the LB's veth peer in native mode.
pub const PEER_XDP_OBJECT: &str = "/usr/lib/x86_64-linux-gnu/bpf/xdpfilt_alw_all.o";

/// XDP mode the lab runs the balancer in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Native,
    Generic,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
        }
    }
}

/// A lab backend.
#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub ns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub mac: String,
    pub weight: u16,
}

pub struct Lab {
    pub prefix: String,
    pub mode: Mode,
    pub backends: Vec<Backend>,
    /// Client source addresses (IPv4).
    pub clients4: Vec<Ipv4Addr>,
    pub clients6: Vec<Ipv6Addr>,
    pub dir: PathBuf,
    /// Generated configs leave `mac` out (the controller resolves it).
    pub omit_mac: bool,
    /// `[service.health]` body per service name, added to generated configs.
    pub health: Vec<(String, String)>,
    /// Backend servers by backend name.
    servers: std::collections::BTreeMap<String, Child>,
    xtask: PathBuf,
    lb: Option<LbProcess>,
    /// More arguments for the next `lb run` ([`Lab::start_lb_with`]).
    extra_args: Vec<String>,
}

struct LbProcess {
    child: Child,
    stdout: mpsc::Receiver<String>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
/// Prefixes of the labs alive in this process (for the Ctrl-C handler).
static ACTIVE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// On Ctrl-C/SIGTERM: remove every lab of this process, then exit 130 (or, while
/// [`wait_for_ctrlc`] waits, just wake it up so the normal teardown runs).
pub fn install_ctrlc_cleanup() {
    let _ = ctrlc::set_handler(|| {
        if WAITING.load(Ordering::SeqCst) {
            INTERRUPTED.store(true, Ordering::SeqCst);
            return;
        }
        let active = ACTIVE.lock().map(|a| a.clone()).unwrap_or_default();
        for p in active {
            remove_namespaces(&p);
        }
        eprintln!("interrupted: lab removed");
        std::process::exit(130);
    });
}

static WAITING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Blocks until Ctrl-C (needs [`install_ctrlc_cleanup`]).
pub fn wait_for_ctrlc() {
    WAITING.store(true, Ordering::SeqCst);
    while !INTERRUPTED.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(100));
    }
    WAITING.store(false, Ordering::SeqCst);
}

impl Lab {
    pub fn ns(&self, role: &str) -> String {
        format!("{}{role}", self.prefix)
    }
    pub fn sw(&self) -> String {
        self.ns("sw")
    }
    pub fn client(&self) -> String {
        self.ns("cl")
    }
    pub fn lb_ns(&self) -> String {
        self.ns("lb")
    }

    /// Builds the topology with `weights.len()` backends and starts their servers
    /// (`xtask` is the path of the xtask binary, which serves `lab-backend`).
    pub fn up(mode: Mode, weights: &[u16], xtask: &Path) -> anyhow::Result<Lab> {
        check_tools(mode)?;
        anyhow::ensure!(
            weights.len() <= MAX_LAB_BACKENDS,
            "a lab has at most {MAX_LAB_BACKENDS} backends"
        );
        let (prefix, dir) = new_lab()?;
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let k = i as u8 + 1;
                // .21–.90, then .101 up: the VIP is .100.
                let host = if k <= 70 { 20 + k } else { 30 + k };
                Backend {
                    name: format!("b{k}"),
                    ns: format!("{prefix}b{k}"),
                    v4: Ipv4Addr::new(10, 99, 0, host),
                    v6: Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x20 + k as u16),
                    mac: format!("02:99:00:00:00:{:02x}", 0x20 + k),
                    weight: *w,
                }
            })
            .collect();
        let mut lab = Lab {
            prefix,
            mode,
            backends,
            clients4: (11..=18).map(|i| Ipv4Addr::new(10, 99, 0, i)).collect(),
            clients6: (0x11..=0x14)
                .map(|i| Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, i))
                .collect(),
            dir,
            health: Vec::new(),
            omit_mac: false,
            servers: std::collections::BTreeMap::new(),
            xtask: xtask.to_owned(),
            lb: None,
            extra_args: Vec::new(),
        };
        // On any error below, Drop removes what was made.
        lab.build_topology()?;
        for b in lab.backends.clone() {
            lab.start_backend(&b.name)?;
        }
        Ok(lab)
    }

    fn build_topology(&mut self) -> anyhow::Result<()> {
        let sw = self.sw();
        let mut roles = vec!["cl".to_owned(), "lb".to_owned()];
        roles.extend(self.backends.iter().map(|b| b.name.clone()));
        for ns in std::iter::once("sw".to_owned()).chain(roles.iter().cloned()) {
            run("ip", &["netns", "add", &self.ns(&ns)])?;
            ipn(&self.ns(&ns), &["link", "set", "dev", "lo", "up"])?;
        }
        ipn(&sw, &["link", "add", "name", "br0", "type", "bridge"])?;
        ipn(&sw, &["link", "set", "dev", "br0", "up"])?;
        for role in &roles {
            let ns = self.ns(role);
            run(
                "ip",
                &[
                    "link", "add", "name", "eth0", "netns", &ns, "type", "veth", "peer", "name",
                    role, "netns", &sw,
                ],
            )?;
            ipn(&sw, &["link", "set", "dev", role, "master", "br0"])?;
            ipn(&sw, &["link", "set", "dev", role, "up"])?;
            // No IPv6 DAD/RA noise in the lab.
            sysctl(&ns, "net.ipv6.conf.all.accept_dad", "0")?;
            sysctl(&ns, "net.ipv6.conf.default.accept_dad", "0")?;
            sysctl(&ns, "net.ipv6.conf.eth0.accept_dad", "0")?;
        }
        // Client: several addresses so flows differ; the VIPs are routed via the LB.
        let cl = self.client();
        ipn(
            &cl,
            &["link", "set", "dev", "eth0", "address", "02:99:00:00:00:11"],
        )?;
        for a in &self.clients4 {
            ipn(&cl, &["addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
        }
        for a in &self.clients6 {
            ipn(
                &cl,
                &["addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"],
            )?;
        }
        ipn(&cl, &["link", "set", "dev", "eth0", "up"])?;
        ipn(
            &cl,
            &[
                "route",
                "add",
                &format!("{VIP4}/32"),
                "via",
                &LB4.to_string(),
            ],
        )?;
        ipn(
            &cl,
            &[
                "-6",
                "route",
                "add",
                &format!("{VIP6}/128"),
                "via",
                &LB6.to_string(),
            ],
        )?;
        // LB.
        let lb = self.lb_ns();
        ipn(&lb, &["link", "set", "dev", "eth0", "address", LB_MAC])?;
        ipn(&lb, &["addr", "add", &format!("{LB4}/24"), "dev", "eth0"])?;
        ipn(
            &lb,
            &["addr", "add", &format!("{LB6}/64"), "dev", "eth0", "nodad"],
        )?;
        ipn(&lb, &["link", "set", "dev", "eth0", "up"])?;
        // Backends: own address on eth0, the VIPs on lo, no ARP answers for the VIP.
        for b in self.backends.clone() {
            let ns = &b.ns;
            ipn(ns, &["link", "set", "dev", "eth0", "address", &b.mac])?;
            ipn(ns, &["addr", "add", &format!("{}/24", b.v4), "dev", "eth0"])?;
            ipn(
                ns,
                &[
                    "addr",
                    "add",
                    &format!("{}/64", b.v6),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
            ipn(ns, &["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
            ipn(
                ns,
                &["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"],
            )?;
            for (k, v) in [
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
                ("net.ipv4.conf.eth0.arp_ignore", "1"),
                ("net.ipv4.conf.eth0.arp_announce", "2"),
                // Announce a new MAC at once (gratuitous ARP / unsolicited NA), as hosts do
                // after a VM move.
                ("net.ipv4.conf.eth0.arp_notify", "1"),
                ("net.ipv6.conf.eth0.ndisc_notify", "1"),
            ] {
                sysctl(ns, k, v)?;
            }
            ipn(ns, &["link", "set", "dev", "eth0", "up"])?;
        }
        if self.mode == Mode::Native {
            // veth: XDP_TX frames only reach the peer if the peer runs an XDP program; and the
            // client's partial TX checksums would be lost in the XDP frame (TOOLCHAIN.md).
            ipn(
                &sw,
                &[
                    "link",
                    "set",
                    "dev",
                    "lb",
                    "xdpdrv",
                    "obj",
                    PEER_XDP_OBJECT,
                    "sec",
                    "xdp",
                ],
            )?;
            run(
                "ip",
                &["netns", "exec", &cl, "ethtool", "-K", "eth0", "tx", "off"],
            )?;
        }
        Ok(())
    }

    /// A second client (namespace and address) behind a router: the router sits on the bridge
    /// (10.99.0.3) and reaches the client over a link whose MTU on the router's side is `mtu`
    /// (the client's own is 1500, so it advertises a 1460-byte MSS). Backends route the
    /// client's net (10.98.0.0/24) via the router; the router routes the VIP via the LB, so
    /// its ICMP errors about the backends' replies (sent from the VIP) reach the LB.
    pub fn add_routed_client(&mut self, mtu: u32) -> anyhow::Result<(String, Ipv4Addr)> {
        let (rt, c2) = (self.ns("rt"), self.ns("cl2"));
        let sw = self.sw();
        for ns in [&rt, &c2] {
            run("ip", &["netns", "add", ns])?;
            ipn(ns, &["link", "set", "dev", "lo", "up"])?;
        }
        run(
            "ip",
            &[
                "link", "add", "name", "eth0", "netns", &rt, "type", "veth", "peer", "name", "rt",
                "netns", &sw,
            ],
        )?;
        ipn(&sw, &["link", "set", "dev", "rt", "master", "br0"])?;
        ipn(&sw, &["link", "set", "dev", "rt", "up"])?;
        run(
            "ip",
            &[
                "link", "add", "name", "eth1", "netns", &rt, "type", "veth", "peer", "name",
                "eth0", "netns", &c2,
            ],
        )?;
        ipn(
            &rt,
            &["link", "set", "dev", "eth0", "address", "02:99:00:00:00:03"],
        )?;
        ipn(&rt, &["addr", "add", "10.99.0.3/24", "dev", "eth0"])?;
        ipn(&rt, &["addr", "add", "10.98.0.1/24", "dev", "eth1"])?;
        ipn(
            &rt,
            &["link", "set", "dev", "eth1", "mtu", &mtu.to_string()],
        )?;
        ipn(&c2, &["addr", "add", "10.98.0.2/24", "dev", "eth0"])?;
        for (ns, dev) in [(&rt, "eth0"), (&rt, "eth1"), (&c2, "eth0")] {
            ipn(ns, &["link", "set", "dev", dev, "up"])?;
            // Complete checksums: XDP_TX in native mode loses a partial one.
            run(
                "ip",
                &["netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"],
            )?;
        }
        ipn(&c2, &["route", "add", "default", "via", "10.98.0.1"])?;
        sysctl(&rt, "net.ipv4.ip_forward", "1")?;
        ipn(
            &rt,
            &[
                "route",
                "add",
                &format!("{VIP4}/32"),
                "via",
                &LB4.to_string(),
            ],
        )?;
        for b in self.backends.clone() {
            ipn(&b.ns, &["route", "add", "10.98.0.0/24", "via", "10.99.0.3"])?;
        }
        Ok((c2, Ipv4Addr::new(10, 98, 0, 2)))
    }

    /// While this file exists, backend `name` answers HTTP with 503.
    pub fn fail_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.fail"))
    }

    /// Starts backend `name`'s servers (HTTP, TCP echo, UDP echo) and waits until they listen.
    pub fn start_backend(&mut self, name: &str) -> anyhow::Result<()> {
        let b = self
            .backends
            .iter()
            .find(|b| b.name == name)
            .with_context(|| format!("no backend {name}"))?
            .clone();
        let fail = self.fail_file(name);
        let vips = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)];
        let child = start_backend_server(&self.xtask, &b.ns, &b.name, &vips, Some(&fail))?;
        self.servers.insert(b.name.clone(), child);
        Ok(())
    }

    /// Kills backend `name`'s servers (the namespace and its addresses stay: a dead service).
    pub fn kill_backend(&mut self, name: &str) -> anyhow::Result<()> {
        let mut c = self
            .servers
            .remove(name)
            .with_context(|| format!("backend {name} not running"))?;
        c.kill()?;
        c.wait()?;
        Ok(())
    }

    /// The `lb` config for this lab: every backend with its weight.
    pub fn config(&self, xdp_mode: Mode) -> String {
        let weights: Vec<Option<u16>> = self.backends.iter().map(|b| Some(b.weight)).collect();
        self.config_with(xdp_mode, &weights)
    }

    /// The `lb` config with per-backend weights; `None` leaves a backend out.
    pub fn config_with(&self, xdp_mode: Mode, weights: &[Option<u16>]) -> String {
        let mut s = format!(
            "# generated by the lab\n[dataplane]\ninterface = \"eth0\"\nxdp_mode = \"{}\"\nflow_table_size = 65536\nring_size = 65537\npin_path = \"{}\"\n\n[control]\nsocket = \"{}\"\n",
            xdp_mode.as_str(),
            self.pin_path().display(),
            self.socket().display()
        );
        for (name, vip, port, proto, v6) in [
            ("web", VIP4.to_string(), HTTP_PORT, "tcp", false),
            ("web6", VIP6.to_string(), HTTP_PORT, "tcp", true),
            ("echo", VIP4.to_string(), ECHO_PORT, "tcp", false),
            ("uecho", VIP4.to_string(), ECHO_PORT, "udp", false),
            ("uecho6", VIP6.to_string(), ECHO_PORT, "udp", true),
        ] {
            s += &format!(
                "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"{proto}\"\n"
            );
            if let Some((_, h)) = self.health.iter().find(|(n, _)| n == name) {
                s += &format!("[service.health]\n{h}\n");
            }
            for (b, w) in self.backends.iter().zip(weights) {
                let Some(w) = w else { continue };
                let addr = if v6 {
                    b.v6.to_string()
                } else {
                    b.v4.to_string()
                };
                if self.omit_mac {
                    s += &format!("[[service.backend]]\naddress = \"{addr}\"\nweight = {w}\n");
                } else {
                    s += &format!(
                        "[[service.backend]]\naddress = \"{addr}\"\nmac = \"{}\"\nweight = {w}\n",
                        b.mac
                    );
                }
            }
        }
        s
    }

    /// Where this lab's `lb run` pins the data plane (on the lab's own bpffs).
    pub fn pin_path(&self) -> PathBuf {
        self.dir.join("bpf/eth0")
    }

    /// The control socket of this lab's `lb run`.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("lb.sock")
    }

    /// Runs `lb --socket <this lab's> <args>` (from the root namespace: the socket is a file).
    /// Returns stdout, or fails with stderr.
    pub fn lb_cli(&self, lb: &Path, args: &[&str]) -> anyhow::Result<String> {
        lb_cli_at(lb, &self.socket(), args)
    }

    /// Starts `lb run` in the LB namespace and waits until it reports the attach.
    /// Returns the mode it attached in.
    pub fn start_lb(&mut self, lb: &Path, config: &str) -> anyhow::Result<String> {
        self.start_lb_signalled(lb, config, None)
    }

    /// [`Lab::start_lb`] with more arguments for `lb run` (e.g. `--replace`).
    pub fn start_lb_with(
        &mut self,
        lb: &Path,
        config: &str,
        args: &[&str],
    ) -> anyhow::Result<String> {
        self.extra_args = args.iter().map(|a| a.to_string()).collect();
        let r = self.start_lb_signalled(lb, config, None);
        self.extra_args.clear();
        r
    }

    /// [`Lab::start_lb`], sending `lb run` SIGHUP `after` its start (before it attached).
    pub fn start_lb_signalled(
        &mut self,
        lb: &Path,
        config: &str,
        hup_after: Option<Duration>,
    ) -> anyhow::Result<String> {
        if !lb.exists() {
            bail!("{} not found: run `cargo xtask build` first", lb.display());
        }
        let path = self.dir.join("lb.toml");
        std::fs::write(&path, config)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.lb_ns()])
            .arg(lb)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting lb run")?;
        let rx = lines(child.stdout.take().expect("piped"));
        if let Some(after) = hup_after {
            thread::sleep(after);
            signal(&child, libc::SIGHUP);
        }
        let line = wait_for_line(&rx, "attached ", Duration::from_secs(30));
        self.lb = Some(LbProcess { child, stdout: rx });
        let line = line.context("lb run did not attach (see its log above)")?;
        let mode = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("mode="))
            .unwrap_or("?")
            .to_owned();
        Ok(mode)
    }

    /// Writes `config` and sends SIGHUP; returns lb's answer (`reloaded ...`), or fails with
    /// its `reload-rejected ...` line.
    pub fn reload(&mut self, config: &str) -> anyhow::Result<String> {
        std::fs::write(self.dir.join("lb.toml"), config)?;
        let Some(p) = &self.lb else {
            bail!("lb is not running");
        };
        signal(&p.child, libc::SIGHUP);
        let line = wait_for_line(&p.stdout, "reload", Duration::from_secs(10))?;
        if line.starts_with("reload-rejected") {
            bail!("{line}");
        }
        Ok(line)
    }

    /// A held connection from the client address `src` to the VIP's echo port (`xtask
    /// lab-client --kind hold`: it pings every 100 ms until its stdin closes, then prints
    /// `done N`); returns it and the backend that answered.
    pub fn hold(&mut self, src: &str) -> anyhow::Result<(Spawned, String)> {
        self.hold_kind(src, "hold")
    }

    /// A held UDP flow from `src` to the VIP's UDP echo port (`xtask lab-client --kind
    /// hold-udp`: as [`Lab::hold`], and it fails if another backend answers).
    pub fn hold_udp(&mut self, src: &str) -> anyhow::Result<(Spawned, String)> {
        self.hold_kind(src, "hold-udp")
    }

    fn hold_kind(&mut self, src: &str, kind: &str) -> anyhow::Result<(Spawned, String)> {
        let target = format!("{VIP4}:{ECHO_PORT}");
        let xtask = self
            .xtask
            .to_str()
            .context("non-UTF-8 xtask path")?
            .to_owned();
        let cl = self.client();
        let h = self.spawn(
            &cl,
            &[
                &xtask,
                "lab-client",
                "--kind",
                kind,
                "--target",
                &target,
                "--source",
                src,
            ],
        )?;
        let line = h.expect_line("backend ", Duration::from_secs(10))?;
        Ok((h, line.trim_start_matches("backend ").trim().to_owned()))
    }

    /// Starts `args` in namespace `ns` with piped stdin/stdout (killed with the lab).
    pub fn spawn(&mut self, ns: &str, args: &[&str]) -> anyhow::Result<Spawned> {
        spawn_in(ns, args)
    }

    /// Stops `lb run` with SIGTERM; returns what it printed after attaching (final counters).
    pub fn stop_lb(&mut self) -> anyhow::Result<String> {
        let Some(mut p) = self.lb.take() else {
            bail!("lb is not running");
        };
        signal(&p.child, libc::SIGTERM);
        let status = wait_timeout(&mut p.child, Duration::from_secs(10))?;
        let mut out = String::new();
        while let Ok(l) = p.stdout.recv_timeout(Duration::from_secs(2)) {
            out.push_str(&l);
            out.push('\n');
        }
        if !status.success() {
            bail!("lb run exited with {status}:\n{out}");
        }
        Ok(out)
    }

    /// Kills `lb run` with SIGKILL (no chance to clean anything up).
    pub fn kill_lb(&mut self) -> anyhow::Result<()> {
        let Some(mut p) = self.lb.take() else {
            bail!("lb is not running");
        };
        signal(&p.child, libc::SIGKILL);
        wait_timeout(&mut p.child, Duration::from_secs(10))?;
        Ok(())
    }

    /// Id of the XDP program attached to `dev` in namespace `ns`.
    pub fn xdp_prog_id(&self, ns: &str, dev: &str) -> Option<u32> {
        let out = run("ip", &["-n", ns, "-d", "link", "show", "dev", dev]).ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let after = text.split("prog/xdp id ").nth(1)?;
        after.split_whitespace().next()?.parse().ok()
    }

    /// Whether an XDP program is attached to `dev` in namespace `ns`.
    pub fn xdp_attached(&self, ns: &str, dev: &str) -> bool {
        run("ip", &["-n", ns, "-d", "link", "show", "dev", dev])
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("prog/xdp"))
            .unwrap_or(false)
    }

    /// Runs `args` inside namespace `ns`.
    pub fn exec(&self, ns: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", ns];
        full.extend_from_slice(args);
        let out = run("ip", &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts tcpdump on `dev` in `ns` (text, link-level headers). Waits until it listens.
    pub fn capture(&self, ns: &str, dev: &str, filter: &str) -> anyhow::Result<Capture> {
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", ns, "tcpdump", "-i", dev, "-nn", "-e", "-l", "-U", filter,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
        let err = lines(child.stderr.take().expect("piped"));
        if let Err(e) = wait_for_line(&err, "listening on", Duration::from_secs(10)) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.context("tcpdump did not start"));
        }
        // Read continuously: a full pipe would block tcpdump and it would drop frames.
        let out = lines(child.stdout.take().expect("piped"));
        Ok(Capture { child, out })
    }

    fn cleanup(&mut self) {
        if let Some(mut p) = self.lb.take() {
            signal(&p.child, libc::SIGTERM);
            if wait_timeout(&mut p.child, Duration::from_secs(5)).is_err() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
        for c in self.servers.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.servers.clear();
        remove_lab(&self.prefix, &self.dir);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A process started with [`Lab::spawn`].
pub struct Spawned {
    pub child: Child,
    pub out: mpsc::Receiver<String>,
    pub err: mpsc::Receiver<String>,
}

impl Spawned {
    /// Waits for a stdout line containing `needle`.
    pub fn expect_line(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        wait_for_line(&self.out, needle, timeout).map_err(|e| {
            let err: Vec<String> = self.err.try_iter().collect();
            e.context(err.join("\n"))
        })
    }

    /// Closes stdin and waits for the exit; returns (success, stdout lines, stderr lines).
    pub fn finish(mut self, timeout: Duration) -> anyhow::Result<(bool, Vec<String>, Vec<String>)> {
        drop(self.child.stdin.take());
        let status = wait_timeout(&mut self.child, timeout)?;
        let collect = |rx: &mpsc::Receiver<String>| {
            let mut v = Vec::new();
            while let Ok(l) = rx.recv_timeout(Duration::from_secs(1)) {
                v.push(l);
            }
            v
        };
        let out = collect(&self.out);
        let err = collect(&self.err);
        Ok((status.success(), out, err))
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running tcpdump.
pub struct Capture {
    child: Child,
    out: mpsc::Receiver<String>,
}

impl Capture {
    /// Stops the capture and returns its lines.
    pub fn stop(mut self) -> Vec<String> {
        // Give in-flight frames a moment to be printed, then SIGINT (tcpdump flushes).
        thread::sleep(Duration::from_millis(300));
        signal(&self.child, libc::SIGINT);
        let _ = wait_timeout(&mut self.child, Duration::from_secs(5));
        let mut out = Vec::new();
        while let Ok(l) = self.out.recv_timeout(Duration::from_secs(2)) {
            out.push(l);
        }
        out
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new lab's name prefix (`lblab-<pid>-<n>-`) and directory, with a bpffs of its own at
/// `<dir>/bpf` for `lb run`'s pinned state (visible from every `ip netns exec`, which remounts
/// /sys), registered for the Ctrl-C cleanup. [`remove_lab`] undoes it.
pub(crate) fn new_lab() -> anyhow::Result<(String, PathBuf)> {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("{PREFIX}{}-{n}-", std::process::id());
    let dir = std::env::temp_dir().join(prefix.trim_end_matches('-'));
    std::fs::create_dir_all(dir.join("bpf"))
        .with_context(|| format!("creating {}", dir.display()))?;
    run(
        "mount",
        &[
            "-t",
            "bpf",
            "bpf",
            dir.join("bpf").to_str().unwrap_or_default(),
        ],
    )
    .context("mounting the lab's bpffs")?;
    if let Ok(mut a) = ACTIVE.lock() {
        a.push(prefix.clone());
    }
    Ok((prefix, dir))
}

/// Removes a lab: its namespaces (and what runs in them), its bpffs, `lb run`'s lock files
/// for it, its directory.
pub(crate) fn remove_lab(prefix: &str, dir: &Path) {
    remove_namespaces(prefix);
    unmount_bpffs(&dir.join("bpf"));
    remove_locks(dir);
    let _ = std::fs::remove_dir_all(dir);
    if let Ok(mut a) = ACTIVE.lock() {
        a.retain(|p| p != prefix);
    }
}

/// Starts the lab backend servers (`xtask lab-backend`) named `name` in namespace `ns`, serving
/// `vips`, and waits until they listen.
pub(crate) fn start_backend_server(
    xtask: &Path,
    ns: &str,
    name: &str,
    vips: &[IpAddr],
    fail_file: Option<&Path>,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(xtask)
        .args(["lab-backend", "--name", name]);
    for v in vips {
        cmd.arg("--vip").arg(v.to_string());
    }
    if let Some(f) = fail_file {
        cmd.arg("--fail-file").arg(f);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a lab backend")?;
    let rx = lines(child.stdout.take().expect("piped"));
    if let Err(e) = wait_for_line(&rx, "ready", Duration::from_secs(10)) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e.context(format!("backend {name} did not start")));
    }
    Ok(child)
}

/// `lb --socket <socket> <args>`, from the root namespace (the socket is a file): stdout, or
/// the error with lb's stderr.
pub(crate) fn lb_cli_at(lb: &Path, socket: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(lb)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running lb")?;
    if !out.status.success() {
        bail!(
            "lb {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `args` in namespace `ns` with piped stdin/stdout/stderr (killed when dropped).
pub(crate) fn spawn_in(ns: &str, args: &[&str]) -> anyhow::Result<Spawned> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {args:?} in {ns}"))?;
    let out = lines(child.stdout.take().expect("piped"));
    let err = lines(child.stderr.take().expect("piped"));
    Ok(Spawned { child, out, err })
}

/// Runs `xtask lab-client` in namespace `ns`: `count` requests of `kind` to `target`, sources
/// taken in turn; its JSON tally.
pub(crate) fn client_tally(
    ns: &str,
    xtask: &Path,
    kind: &str,
    target: std::net::SocketAddr,
    sources: &[IpAddr],
    count: usize,
) -> anyhow::Result<crate::labnet::Tally> {
    let xtask = xtask.to_str().context("non-UTF-8 xtask path")?;
    let (target, count) = (target.to_string(), count.to_string());
    let srcs: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
    let mut args = vec![
        "netns",
        "exec",
        ns,
        xtask,
        "lab-client",
        "--kind",
        kind,
        "--target",
        &target,
        "--count",
        &count,
    ];
    for s in &srcs {
        args.push("--source");
        args.push(s);
    }
    let out = run("ip", &args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).with_context(|| format!("lab-client output {text:?}"))?;
    crate::labnet::Tally::from_json(&v)
}

/// Removes the namespaces of every lab (leftovers of crashed runs). Returns their names.
pub fn down_all() -> anyhow::Result<Vec<String>> {
    let out = run("ip", &["netns", "list"])?;
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(PREFIX) {
            kill_netns_pids(name);
            run_quiet("ip", &["netns", "del", name]);
            removed.push(name.to_owned());
        }
    }
    for m in lab_mounts() {
        let p = PathBuf::from(&m);
        unmount_bpffs(&p);
        if let Some(dir) = p.parent() {
            remove_locks(dir);
            let _ = std::fs::remove_dir_all(dir);
        }
        removed.push(m);
    }
    Ok(removed)
}

/// Unmounts a lab's bpffs: its pinned maps and XDP link go with it.
fn unmount_bpffs(path: &Path) {
    run_quiet("umount", &["-l", path.to_str().unwrap_or_default()]);
}

/// Removes `lb run`'s lock files for pin paths under `dir` (`/run/lb/locks/<escaped path>.lock`).
fn remove_locks(dir: &Path) {
    let escaped: String = dir
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if let Ok(entries) = std::fs::read_dir("/run/lb/locks") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&escaped) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Lab bpffs mounts left behind by interrupted runs.
fn lab_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "bpf" && at.contains(&format!("/{PREFIX}"))).then(|| at.to_owned())
        })
        .collect()
}

fn remove_namespaces(prefix: &str) {
    let Ok(out) = run("ip", &["netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(prefix) {
            kill_netns_pids(name);
            run_quiet("ip", &["netns", "del", name]);
        }
    }
}

fn kill_netns_pids(ns: &str) {
    if let Ok(out) = run("ip", &["netns", "pids", ns]) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) with a pid read from `ip netns pids`; no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

pub(crate) fn check_tools(mode: Mode) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the lab needs root (network namespaces, XDP)");
    }
    for tool in ["ip", "tcpdump", "ethtool", "curl"] {
        if !run_quiet("sh", &["-c", &format!("command -v {tool}")]) {
            bail!("`{tool}` not found: run scripts/bootstrap.sh");
        }
    }
    if mode == Mode::Native && !Path::new(PEER_XDP_OBJECT).exists() {
        bail!("{PEER_XDP_OBJECT} not found (Debian package xdp-tools): run scripts/bootstrap.sh");
    }
    Ok(())
}

pub(crate) fn ipn(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    run("ip", &full).map(|_| ())
}

pub(crate) fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ],
    )
    .map(|_| ())
}

pub(crate) fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid; no memory involved.
    unsafe { libc::kill(child.id() as i32, sig) };
}

pub(crate) fn wait_timeout(
    child: &mut Child,
    timeout: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("process {} did not exit within {timeout:?}", child.id());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Lines of a child's output, read on a thread.
pub(crate) fn lines<R: std::io::Read + Send + 'static>(r: R) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub(crate) fn wait_for_line(
    rx: &mpsc::Receiver<String>,
    needle: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return Ok(line),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("no `{needle}` line within {timeout:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("process exited before printing `{needle}`")
            }
        }
    }
}

impl Lab {
    /// Runs `count` client requests (`kind` = http | udp) from the client namespace to `target`,
    /// sources taken round-robin from `sources`.
    pub fn clients(
        &self,
        xtask: &Path,
        kind: &str,
        target: std::net::SocketAddr,
        sources: &[IpAddr],
        count: usize,
    ) -> anyhow::Result<crate::labnet::Tally> {
        client_tally(&self.client(), xtask, kind, target, sources, count)
    }
}

/// Client sources as `IpAddr`s.
pub fn v4s(a: &[Ipv4Addr]) -> Vec<IpAddr> {
    a.iter().map(|a| IpAddr::V4(*a)).collect()
}
