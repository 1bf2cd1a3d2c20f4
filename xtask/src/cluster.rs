//! The multi-node lab: several balancer nodes behind a router that spreads flows by ECMP,
//! each node announcing the VIP over BGP with BIRD (BFD on), `lb run` driving the
//! announcement. Made and always removed by itself, like [`crate::lab`].
//!
//! ```text
//!  <p>cl ── 10.98.0.0/24 ── <p>rt (BIRD: BGP + BFD to every node, ECMP, L4 multipath hash)
//!  10.98.0.11-18            eth1 10.98.0.1        eth0 10.99.0.1
//!                                                   │
//!            ┌──────────── <p>sw: bridge br0 ───────┴──────────────┐
//!            │ port n1..nN                          port b1..bK     │
//!            └───┬──────────────────────────────────────┬───────────┘
//!        <p>nI eth0 10.99.0.(1+I)               <p>bK eth0 10.99.0.(20+K)
//!        BIRD (AS 65001) + lb run + lb_xdp      VIP on lo, default via 10.99.0.1
//! ```
//! Client → VIP: the router picks a node by the 5-tuple hash; the node's lb_xdp rewrites the
//! destination MAC to a backend's (XDP_TX); the backend answers the client through the router
//! (DSR: replies never cross a balancer).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    cmd::{run, run_quiet},
    lab::{
        self, Mode, PEER_XDP_OBJECT, Spawned, ipn, lines, signal, sysctl, wait_for_line,
        wait_timeout,
    },
};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const ROUTER_AS: u32 = 65000;
pub const NODE_AS: u32 = 65001;
pub const SYNC_PORT: u16 = 4790;
pub const SYNC_KEY: &str = "lab-flow-sync-key-0123456789abcdef";
/// At most this many balancer nodes.
pub const MAX_NODES: usize = 8;

/// A balancer node.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub ns: String,
    pub addr: Ipv4Addr,
    pub mac: String,
}

/// A backend.
#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub ns: String,
    pub addr: Ipv4Addr,
    pub mac: String,
    pub weight: u16,
}

pub struct Cluster {
    pub prefix: String,
    pub mode: Mode,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub backends: Vec<Backend>,
    pub clients: Vec<Ipv4Addr>,
    xtask: PathBuf,
    servers: BTreeMap<String, Child>,
    birds: BTreeMap<String, Child>,
    lbs: BTreeMap<usize, (Child, mpsc::Receiver<String>)>,
}

impl Cluster {
    pub fn router(&self) -> String {
        format!("{}rt", self.prefix)
    }
    pub fn client(&self) -> String {
        format!("{}cl", self.prefix)
    }
    fn sw(&self) -> String {
        format!("{}sw", self.prefix)
    }

    /// Builds the topology with `nodes` balancer nodes and a backend per weight, starts the
    /// backends' servers and every BIRD (not `lb run`: [`Cluster::start_lb`]).
    pub fn up(mode: Mode, nodes: usize, weights: &[u16], xtask: &Path) -> anyhow::Result<Cluster> {
        lab::check_tools(mode)?;
        for tool in ["bird", "birdc"] {
            if !run_quiet("sh", &["-c", &format!("command -v {tool}")]) {
                bail!("`{tool}` not found (Debian package bird2): run scripts/bootstrap.sh");
            }
        }
        anyhow::ensure!((1..=MAX_NODES).contains(&nodes), "1..={MAX_NODES} nodes");
        anyhow::ensure!(weights.len() <= 60, "at most 60 backends");
        let (prefix, dir) = lab::new_lab()?;
        let mut c = Cluster {
            nodes: (1..=nodes)
                .map(|i| Node {
                    name: format!("n{i}"),
                    ns: format!("{prefix}n{i}"),
                    addr: Ipv4Addr::new(10, 99, 0, 1 + i as u8),
                    mac: format!("02:99:00:00:01:{i:02x}"),
                })
                .collect(),
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let k = i as u8 + 1;
                    Backend {
                        name: format!("b{k}"),
                        ns: format!("{prefix}b{k}"),
                        addr: Ipv4Addr::new(10, 99, 0, 20 + k),
                        mac: format!("02:99:00:00:00:{:02x}", 0x20 + k),
                        weight: *w,
                    }
                })
                .collect(),
            clients: (11..=18).map(|i| Ipv4Addr::new(10, 98, 0, i)).collect(),
            prefix,
            mode,
            dir,
            xtask: xtask.to_owned(),
            servers: BTreeMap::new(),
            birds: BTreeMap::new(),
            lbs: BTreeMap::new(),
        };
        c.build()?;
        for b in c.backends.clone() {
            c.start_backend(&b)?;
        }
        c.start_bird_router()?;
        for i in 0..nodes {
            c.start_bird_node(i)?;
        }
        Ok(c)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let (sw, rt, cl) = (self.sw(), self.router(), self.client());
        let mut all = vec![sw.clone(), rt.clone(), cl.clone()];
        all.extend(self.nodes.iter().map(|n| n.ns.clone()));
        all.extend(self.backends.iter().map(|b| b.ns.clone()));
        for ns in &all {
            run("ip", &["netns", "add", ns])?;
            ipn(ns, &["link", "set", "dev", "lo", "up"])?;
        }
        ipn(&sw, &["link", "add", "name", "br0", "type", "bridge"])?;
        ipn(&sw, &["link", "set", "dev", "br0", "up"])?;
        // Every namespace on the bridge: eth0, its port named after its role.
        let mut ports: Vec<(String, String)> = vec![(rt.clone(), "rt".into())];
        ports.extend(self.nodes.iter().map(|n| (n.ns.clone(), n.name.clone())));
        ports.extend(self.backends.iter().map(|b| (b.ns.clone(), b.name.clone())));
        for (ns, port) in &ports {
            run(
                "ip",
                &[
                    "link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name",
                    port, "netns", &sw,
                ],
            )?;
            ipn(&sw, &["link", "set", "dev", port, "master", "br0"])?;
            ipn(&sw, &["link", "set", "dev", port, "up"])?;
        }
        // Client ↔ router.
        run(
            "ip",
            &[
                "link", "add", "name", "eth0", "netns", &cl, "type", "veth", "peer", "name",
                "eth1", "netns", &rt,
            ],
        )?;
        for a in &self.clients {
            ipn(&cl, &["addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
        }
        ipn(&rt, &["addr", "add", "10.98.0.1/24", "dev", "eth1"])?;
        ipn(
            &rt,
            &["link", "set", "dev", "eth0", "address", "02:99:00:00:00:01"],
        )?;
        ipn(
            &rt,
            &["addr", "add", &format!("{ROUTER}/24"), "dev", "eth0"],
        )?;
        for (ns, dev) in [(&cl, "eth0"), (&rt, "eth0"), (&rt, "eth1")] {
            ipn(ns, &["link", "set", "dev", dev, "up"])?;
            // Complete checksums: XDP_TX in native mode loses a partial one.
            run(
                "ip",
                &["netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"],
            )?;
        }
        ipn(&cl, &["route", "add", "default", "via", "10.98.0.1"])?;
        sysctl(&rt, "net.ipv4.ip_forward", "1")?;
        // ECMP over the nodes by the 5-tuple.
        sysctl(&rt, "net.ipv4.fib_multipath_hash_policy", "1")?;
        for n in self.nodes.clone() {
            ipn(&n.ns, &["link", "set", "dev", "eth0", "address", &n.mac])?;
            ipn(
                &n.ns,
                &["addr", "add", &format!("{}/24", n.addr), "dev", "eth0"],
            )?;
            ipn(&n.ns, &["link", "set", "dev", "eth0", "up"])?;
            if self.mode == Mode::Native {
                // veth: XDP_TX frames reach the peer only if it runs an XDP program.
                ipn(
                    &sw,
                    &[
                        "link",
                        "set",
                        "dev",
                        &n.name,
                        "xdpdrv",
                        "obj",
                        PEER_XDP_OBJECT,
                        "sec",
                        "xdp",
                    ],
                )?;
            }
            std::fs::create_dir_all(self.node_dir(&n.name).join("bird"))?;
        }
        for b in self.backends.clone() {
            let ns = &b.ns;
            ipn(ns, &["link", "set", "dev", "eth0", "address", &b.mac])?;
            ipn(
                ns,
                &["addr", "add", &format!("{}/24", b.addr), "dev", "eth0"],
            )?;
            ipn(ns, &["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            for (k, v) in [
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
                ("net.ipv4.conf.eth0.arp_ignore", "1"),
                ("net.ipv4.conf.eth0.arp_announce", "2"),
            ] {
                sysctl(ns, k, v)?;
            }
            ipn(ns, &["link", "set", "dev", "eth0", "up"])?;
            ipn(ns, &["route", "add", "default", "via", &ROUTER.to_string()])?;
        }
        Ok(())
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join(node)
    }

    fn start_backend(&mut self, b: &Backend) -> anyhow::Result<()> {
        let child =
            lab::start_backend_server(&self.xtask, &b.ns, &b.name, &[IpAddr::V4(VIP)], None)?;
        self.servers.insert(b.name.clone(), child);
        Ok(())
    }

    fn spawn_bird(&mut self, key: &str, ns: &str, conf: &str) -> anyhow::Result<()> {
        let dir = self.dir.join(key);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("bird.conf");
        std::fs::write(&path, conf)?;
        let out = Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&path)
            .output()?;
        if !out.status.success() {
            bail!(
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "bird", "-f", "-c"])
            .arg(&path)
            .arg("-s")
            .arg(dir.join("bird.ctl"))
            .arg("-P")
            .arg(dir.join("bird.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bird")?;
        self.birds.insert(key.to_owned(), child);
        Ok(())
    }

    fn start_bird_router(&mut self) -> anyhow::Result<()> {
        let mut conf = router_bird_conf();
        for n in &self.nodes {
            conf += &format!(
                "protocol bgp {} from lbnode {{ neighbor {} as {NODE_AS}; }}\n",
                n.name, n.addr
            );
        }
        let rt = self.router();
        self.spawn_bird("rt", &rt, &conf)
    }

    fn start_bird_node(&mut self, i: usize) -> anyhow::Result<()> {
        let n = self.nodes[i].clone();
        let conf = node_bird_conf(n.addr, &self.node_dir(&n.name).join("bird"));
        self.spawn_bird(&n.name, &n.ns, &conf)
    }

    /// The BIRD control socket of node `name` (or `rt`).
    pub fn bird_socket(&self, key: &str) -> PathBuf {
        self.dir.join(key).join("bird.ctl")
    }

    /// `[[service]]` tables for the VIP's echo (7) and HTTP (80) services, every backend, with
    /// `scheduler`; `health`: the body of `[service.health]` (or none).
    pub fn services(&self, scheduler: &str, health: Option<&str>) -> String {
        let mut s = String::new();
        for (name, port) in [("echo", 7), ("web", 80)] {
            s += &format!(
                "\n[[service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\nprotocol = \"tcp\"\nscheduler = \"{scheduler}\"\n"
            );
            if let Some(h) = health {
                s += &format!("\n[service.health]\n{h}\n");
            }
            for b in &self.backends {
                s += &format!(
                    "\n[[service.backend]]\naddress = \"{}\"\nmac = \"{}\"\nweight = {}\n",
                    b.addr, b.mac, b.weight
                );
            }
        }
        s
    }

    /// Node `i`'s config: [dataplane], [control], [announce], [flow_sync] when `sync`, then
    /// `services`.
    pub fn config(&self, i: usize, services: &str, sync: bool) -> String {
        let n = &self.nodes[i];
        let d = self.node_dir(&n.name);
        let mut c = format!(
            "[dataplane]\ninterface = \"eth0\"\nxdp_mode = \"{}\"\npin_path = \"{}\"\n\n\
             [control]\nsocket = \"{}\"\nstate_file = \"{}\"\n\n\
             [announce]\ninclude_file = \"{}\"\nbird_socket = \"{}\"\nlocal_as = {NODE_AS}\ndrain_quiet_ms = 1000\ndrain_timeout_ms = 30000\n",
            self.mode.as_str(),
            self.dir.join("bpf").join(&n.name).display(),
            self.socket(i).display(),
            d.join("lb.state.json").display(),
            d.join("bird").join("lb-vips.conf").display(),
            self.bird_socket(&n.name).display(),
        );
        if sync {
            let peers: Vec<String> = self
                .nodes
                .iter()
                .filter(|o| o.name != n.name)
                .map(|o| format!("\"{}:{SYNC_PORT}\"", o.addr))
                .collect();
            c += &format!(
                "\n[flow_sync]\nlisten = \"{}:{SYNC_PORT}\"\npeers = [{}]\nkey = \"{SYNC_KEY}\"\n",
                n.addr,
                peers.join(", ")
            );
        }
        c + services
    }

    pub fn socket(&self, i: usize) -> PathBuf {
        self.node_dir(&self.nodes[i].name).join("lb.sock")
    }

    /// Starts `lb run` on node `i` with `config`; waits until attached.
    pub fn start_lb(&mut self, i: usize, lb: &Path, config: &str) -> anyhow::Result<()> {
        let path = self.node_dir(&self.nodes[i].name).join("lb.toml");
        std::fs::write(&path, config)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.nodes[i].ns])
            .arg(lb)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting lb run")?;
        let rx = lines(child.stdout.take().expect("piped"));
        let r = wait_for_line(&rx, "attached ", Duration::from_secs(30));
        self.lbs.insert(i, (child, rx));
        r.with_context(|| format!("lb run on {} did not attach", self.nodes[i].name))?;
        Ok(())
    }

    /// Rewrites node `i`'s config and sends SIGHUP; fails with the rejection.
    pub fn reload(&mut self, i: usize, config: &str) -> anyhow::Result<String> {
        std::fs::write(self.node_dir(&self.nodes[i].name).join("lb.toml"), config)?;
        let Some((child, rx)) = self.lbs.get(&i) else {
            bail!("lb is not running on node {i}");
        };
        signal(child, libc::SIGHUP);
        let line = wait_for_line(rx, "reload", Duration::from_secs(10))?;
        if line.starts_with("reload-rejected") {
            bail!("{line}");
        }
        Ok(line)
    }

    /// Stops node `i`'s `lb run` (SIGTERM, or SIGKILL when `kill`).
    pub fn stop_lb(&mut self, i: usize, kill: bool) -> anyhow::Result<()> {
        let Some((mut child, _)) = self.lbs.remove(&i) else {
            bail!("lb is not running on node {i}");
        };
        signal(&child, if kill { libc::SIGKILL } else { libc::SIGTERM });
        let st = wait_timeout(&mut child, Duration::from_secs(10))?;
        if !kill && !st.success() {
            bail!("lb run on node {i} exited with {st}");
        }
        Ok(())
    }

    /// Node `i` dies as a machine does: its link goes down first (nothing it sends gets out:
    /// no BGP notification, no FIN), then its processes are killed and its XDP program is gone
    /// with the link. The router notices through BFD.
    pub fn kill_node(&mut self, i: usize) -> anyhow::Result<()> {
        let n = self.nodes[i].clone();
        ipn(&n.ns, &["link", "set", "dev", "eth0", "down"])?;
        if let Some((mut child, _)) = self.lbs.remove(&i) {
            signal(&child, libc::SIGKILL);
            let _ = wait_timeout(&mut child, Duration::from_secs(10));
        }
        if let Some(mut b) = self.birds.remove(&n.name) {
            let _ = b.kill();
            let _ = b.wait();
        }
        Ok(())
    }

    /// Kills BIRD on node `name` (or `rt`).
    pub fn kill_bird(&mut self, key: &str) {
        if let Some(mut b) = self.birds.remove(key) {
            let _ = b.kill();
            let _ = b.wait();
        }
    }

    /// `lb --socket <node i's> <args>`: stdout, or the error.
    pub fn lb_cli(&self, i: usize, lb: &Path, args: &[&str]) -> anyhow::Result<String> {
        lab::lb_cli_at(lb, &self.socket(i), args)
            .with_context(|| format!("on node {}", self.nodes[i].name))
    }

    /// `lb status --json` of node `i`.
    pub fn status(&self, i: usize, lb: &Path) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.lb_cli(
            i,
            lb,
            &["status", "--json"],
        )?)?)
    }

    /// New flows node `i`'s data plane saw so far (all services).
    pub fn new_flows(&self, i: usize, lb: &Path) -> anyhow::Result<u64> {
        let st = self.status(i, lb)?;
        Ok(st["counters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c[0] == "flow_new" || c[0] == "flow_rescheduled")
            .filter_map(|c| c[1].as_u64())
            .sum())
    }

    /// The nodes the router's route to the VIP goes through now (their names).
    pub fn next_hops(&self) -> Vec<String> {
        let out = run(
            "ip",
            &["-n", &self.router(), "route", "show", &format!("{VIP}/32")],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
        let mut hops: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| {
                out.split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w[0] == "via" && w[1] == n.addr.to_string())
            })
            .map(|n| n.name.clone())
            .collect();
        hops.sort();
        hops
    }

    /// Waits until the router's next hops for the VIP are exactly `want`; returns how long.
    pub fn wait_next_hops(&self, want: &[&str], timeout: Duration) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        loop {
            let now = self.next_hops();
            if now == want {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > timeout {
                bail!(
                    "the router's next hops for {VIP} are {now:?}, not {want:?}, after {timeout:?}"
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts `args` in namespace `ns` with piped stdio (killed when dropped).
    pub fn spawn(&self, ns: &str, args: &[&str]) -> anyhow::Result<Spawned> {
        lab::spawn_in(ns, args)
    }

    /// `count` long-lived streaming connections to the echo service (see
    /// [`crate::labnet::stream`]), once all are connected.
    pub fn streams(&self, count: usize) -> anyhow::Result<Spawned> {
        let xtask = self.xtask.to_str().context("non-UTF-8 path")?.to_owned();
        let target = format!("{VIP}:7");
        let count_s = count.to_string();
        let srcs: Vec<String> = self.clients.iter().map(|a| a.to_string()).collect();
        let mut args = vec![
            xtask.as_str(),
            "lab-client",
            "--kind",
            "stream",
            "--target",
            &target,
            "--count",
            &count_s,
        ];
        for s in &srcs {
            args.push("--source");
            args.push(s);
        }
        let s = self.spawn(&self.client(), &args)?;
        s.expect_line(&format!("ready {count}"), Duration::from_secs(60))?;
        Ok(s)
    }

    /// `count` HTTP requests from the client through the VIP: the tally by backend.
    pub fn http(&self, count: usize) -> anyhow::Result<crate::labnet::Tally> {
        lab::client_tally(
            &self.client(),
            &self.xtask,
            "http",
            std::net::SocketAddr::new(IpAddr::V4(VIP), 80),
            &addrs(&self.clients),
            count,
        )
    }

    fn cleanup(&mut self) {
        for (_, (mut c, _)) in std::mem::take(&mut self.lbs) {
            signal(&c, libc::SIGTERM);
            if wait_timeout(&mut c, Duration::from_secs(5)).is_err() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for c in self.birds.values_mut().chain(self.servers.values_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.birds.clear();
        self.servers.clear();
        lab::remove_lab(&self.prefix, &self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Streaming results: (connections, survived, bytes, errors).
pub fn stream_results(lines: &[String]) -> (usize, usize, u64, Vec<String>) {
    let mut total = 0;
    let mut ok = 0;
    let mut bytes = 0;
    let mut errors = Vec::new();
    for l in lines.iter().filter(|l| l.starts_with('{')) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        total += 1;
        bytes += v["bytes"].as_u64().unwrap_or(0);
        if v["error"].is_null() && v["bytes"].as_u64().unwrap_or(0) > 0 {
            ok += 1;
        } else {
            errors.push(l.clone());
        }
    }
    (total, ok, bytes, errors)
}

/// Sends `mark <label>` to a streaming client; returns the longest stall (ms) since the last.
pub fn mark(s: &mut Spawned, label: &str) -> anyhow::Result<u64> {
    use std::io::Write as _;
    let stdin = s.child.stdin.as_mut().context("piped")?;
    writeln!(stdin, "mark {label}")?;
    stdin.flush()?;
    let line = s.expect_line(&format!("phase {label} "), Duration::from_secs(20))?;
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .context("a stall figure")
}

/// The router's BIRD config (the example in `scripts/bird/router.conf`, with the lab's
/// addresses): BGP with every node, BFD, ECMP into the kernel.
pub fn router_bird_conf() -> String {
    format!(
        "router id {ROUTER};\n\
         protocol device {{ scan time 1; }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
         protocol bfd {{ interface \"eth0\" {{ min rx interval 50 ms; min tx interval 50 ms; multiplier 3; }}; }}\n\
         template bgp lbnode {{\n  local {ROUTER} as {ROUTER_AS};\n  bfd on;\n  hold time 3; keepalive time 1;\n  connect retry time 1; connect delay time 1; error wait time 1, 2;\n  ipv4 {{ import all; export none; }};\n}}\n"
    )
}

/// A node's BIRD config (the example in `scripts/bird/node.conf`, with the lab's addresses):
/// includes what `lb run` writes into `include_dir` and exports it to the router.
pub fn node_bird_conf(addr: Ipv4Addr, include_dir: &Path) -> String {
    format!(
        "router id {addr};\n\
         protocol device {{ scan time 1; }}\n\
         protocol bfd {{ interface \"eth0\" {{ min rx interval 50 ms; min tx interval 50 ms; multiplier 3; }}; }}\n\
         include \"{}/*.conf\";\n\
         protocol bgp uplink {{\n  local {addr} as {NODE_AS};\n  neighbor {ROUTER} as {ROUTER_AS};\n  bfd on;\n  hold time 3; keepalive time 1;\n  connect retry time 1; connect delay time 1; error wait time 1, 2;\n  ipv4 {{ import none; export where proto = \"lb_vips4\"; next hop self; }};\n}}\n",
        include_dir.display()
    )
}

/// Clients as addresses.
pub fn addrs(a: &[Ipv4Addr]) -> Vec<IpAddr> {
    a.iter().map(|a| IpAddr::V4(*a)).collect()
}
