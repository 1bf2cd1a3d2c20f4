//! `cargo xtask demo`: the balancer, for real, in network namespaces, in well under a minute.

use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use anyhow::{Context as _, bail};
use xtask::{
    cmd,
    lab::{self, Lab, Mode},
};

#[derive(clap::Args)]
pub struct Args {
    /// XDP mode: native (veth driver mode) or generic.
    #[arg(long, default_value = "native", value_parser = ["native", "generic"])]
    mode: String,
    /// HTTP requests to send through the VIP.
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Keep the lab up after the demo (Ctrl-C to tear it down).
    #[arg(long)]
    keep: bool,
    /// Balancer nodes: 1 is the single-node demo; 2..=8 run several nodes behind an ECMP
    /// router, announced with BGP (BIRD + BFD), and kill one in the middle of 100 streams.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    nodes: u8,
}

impl Args {
    /// The demo with `n` balancer nodes, the rest default.
    pub fn nodes(n: u8) -> Args {
        Args {
            nodes: n,
            ..Args::default()
        }
    }
}

impl Default for Args {
    fn default() -> Self {
        Args {
            mode: "native".to_owned(),
            requests: 300,
            keep: false,
            nodes: 1,
        }
    }
}

const WEIGHTS: [u16; 3] = [100, 200, 200];

fn step(t0: Instant, msg: &str) {
    println!("[{:>5.1}s] {msg}", t0.elapsed().as_secs_f64());
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mode = if args.mode == "native" {
        Mode::Native
    } else {
        Mode::Generic
    };
    step(
        t0,
        "toolchain and build (first run on a fresh machine: a few minutes)",
    );
    crate::build()?;
    lab::install_ctrlc_cleanup();
    let xtask = crate::self_exe()?;
    if args.nodes > 1 {
        return nodes(&args, mode, &xtask, t0);
    }

    step(
        t0,
        "lab: namespaces client, lb, b1..b3 on a bridge; VIP 10.99.0.100 / fd00:99::100 on the backends' lo",
    );
    let mut lab = Lab::up(mode, &WEIGHTS, &xtask)?;
    step(
        t0,
        &format!(
            "lb run in namespace {} (xdp_mode = {})",
            lab.lb_ns(),
            mode.as_str()
        ),
    );
    let attached = lab.start_lb(&cmd::lb_binary(), &lab.config(mode))?;
    step(t0, &format!("lb_xdp attached to eth0 in {attached} mode"));

    let lb_port = lab.capture(&lab.sw(), "lb", "ip or ip6")?;
    let mut backend_ports = Vec::new();
    for b in &lab.backends {
        backend_ports.push(lab.capture(&lab.sw(), &b.name, &format!("src host {}", lab::VIP4))?);
    }
    step(
        t0,
        &format!(
            "{} HTTP requests from 8 client addresses to http://{}/",
            args.requests,
            lab::VIP4
        ),
    );
    let target = SocketAddr::new(IpAddr::V4(lab::VIP4), lab::HTTP_PORT);
    let tally = lab.clients(
        &xtask,
        "http",
        target,
        &lab::v4s(&lab.clients4),
        args.requests,
    )?;
    let lb_lines = lb_port.stop();
    let replies: Vec<usize> = backend_ports.into_iter().map(|c| c.stop().len()).collect();

    let mut problems = Vec::new();
    println!();
    println!("  backend  weight  expected   answered   share");
    let total_w: u32 = WEIGHTS.iter().map(|w| *w as u32).sum();
    for b in &lab.backends {
        let want = b.weight as f64 / total_w as f64;
        let got = tally.by_backend.get(&b.name).copied().unwrap_or(0);
        let share = got as f64 / args.requests.max(1) as f64;
        println!(
            "  {:<7}  {:>6}  {:>7.1}%  {:>9}  {:>5.1}%",
            b.name,
            b.weight,
            100.0 * want,
            got,
            100.0 * share
        );
        if (share - want).abs() > 0.10 {
            problems.push(format!(
                "{}: {:.1}% of requests, weight share {:.1}%",
                b.name,
                100.0 * share,
                100.0 * want
            ));
        }
    }
    println!("  errors: {}", tally.errors);
    if tally.errors > 0 {
        problems.push(format!(
            "{} requests failed (first: {})",
            tally.errors,
            tally.first_error.clone().unwrap_or_default()
        ));
    }

    // DSR proof: on the LB's bridge port, only client→VIP frames (and lb_xdp's XDP_TX copies
    // of them, source MAC = the LB's); never a frame from the VIP back to the client.
    let vip = lab::VIP4.to_string();
    let to_vip = lb_lines
        .iter()
        .filter(|l| l.contains(&format!("> {vip}.80:")))
        .count();
    let tx_by_lb = lb_lines
        .iter()
        .filter(|l| l.starts_with_mac(lab::LB_MAC) && l.contains(&format!("> {vip}.80:")))
        .count();
    let from_vip = lb_lines
        .iter()
        .filter(|l| l.contains(&format!(" {vip}.80 > ")))
        .count();
    println!();
    println!("  DSR, frames on the LB's bridge port:");
    println!(
        "    client → VIP (arriving at the LB):   {}",
        to_vip - tx_by_lb
    );
    println!("    sent back out by lb_xdp (XDP_TX):    {tx_by_lb}");
    println!("    VIP → client (replies):              {from_vip}   (DSR: must be 0)");
    println!(
        "  replies seen on the backends' ports:   {}",
        replies
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" + ")
    );
    if from_vip != 0 {
        problems.push(format!("{from_vip} reply frames crossed the LB"));
    }
    if tx_by_lb == 0 {
        problems.push("no XDP_TX frames seen on the LB's port".to_owned());
    }
    if replies.iter().sum::<usize>() == 0 {
        problems.push("no replies seen on the backends' ports".to_owned());
    }

    println!();
    step(t0, "`lb status` (control API on the lab's Unix socket):");
    match lab.lb_cli(&cmd::lb_binary(), &["status"]) {
        Ok(out) => {
            for line in out.lines() {
                println!("    {line}");
            }
        }
        Err(e) => problems.push(format!("lb status failed: {e:#}")),
    }

    println!();
    step(
        t0,
        "`lb trace` (decisions and frames as sent, after the MAC rewrite) for one curl, then `lb explain` of that flow:",
    );
    let lb = cmd::lb_binary();
    let pin = lab.pin_path();
    let vip = lab::VIP4.to_string();
    let trace = lab.spawn(
        &lab.lb_ns(),
        &[
            lb.to_str().unwrap_or_default(),
            "trace",
            "--pin-path",
            pin.to_str().unwrap_or_default(),
            "--vip",
            &vip,
            "--count",
            "3",
            "--seconds",
            "10",
        ],
    )?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = lab.exec(
        &lab.client(),
        &["curl", "-s", "--max-time", "3", &format!("http://{vip}/")],
    );
    let (_, traced, _) = trace.finish(std::time::Duration::from_secs(15))?;
    for line in &traced {
        println!("    {line}");
    }
    // `<time> cpuN tcp <client>:<port> → <vip>:<port> ...`
    let client = traced
        .first()
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|c| c.rsplit_once(':'));
    match client {
        Some((addr, port)) => match lab.lb_cli(&lb, &["explain", "tcp", addr, port, &vip, "80"]) {
            Ok(out) => {
                for line in out.lines() {
                    println!("    {line}");
                }
            }
            Err(e) => problems.push(format!("lb explain failed: {e:#}")),
        },
        None => problems.push("lb trace showed no packet of the curl".to_owned()),
    }

    if args.keep {
        println!();
        println!("The lab stays up. Poke at it:");
        println!(
            "  ip netns exec {} curl -s http://{}/",
            lab.client(),
            lab::VIP4
        );
        println!(
            "  ip netns exec {} curl -s -g http://[{}]/",
            lab.client(),
            lab::VIP6
        );
        println!(
            "  ip -n {} -d link show dev eth0      # lb_xdp attached",
            lab.lb_ns()
        );
        println!(
            "  ip netns exec {} tcpdump -nn -e -i lb   # the LB's bridge port",
            lab.sw()
        );
        println!("  config: {}", lab.dir.join("lb.toml").display());
        println!("Ctrl-C tears it down (or `cargo xtask lab down` from another shell).");
        lab::wait_for_ctrlc();
    }

    step(
        t0,
        "stopping lb (SIGTERM: the controller exits, lb_xdp stays and forwards)",
    );
    let report = lab.stop_lb().context("stopping lb")?;
    if let Some(line) = report.lines().find(|l| l.starts_with("counters:")) {
        println!("    final {line}");
    }
    if !lab.xdp_attached(&lab.lb_ns(), "eth0") {
        problems.push("lb_xdp detached when lb exited (it must stay)".to_owned());
    }
    step(t0, "lb detach (the only way to remove the data plane)");
    let out = cmd::run(
        cmd::lb_binary().to_str().unwrap_or_default(),
        &[
            "detach",
            "--pin-path",
            lab.pin_path().to_str().unwrap_or_default(),
        ],
    )
    .context("lb detach")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {line}");
    }
    if lab.xdp_attached(&lab.lb_ns(), "eth0") || lab.pin_path().exists() {
        problems.push("lb detach left lb_xdp attached or pinned".to_owned());
    }
    drop(lab);
    step(t0, "lab removed");
    if !problems.is_empty() {
        bail!("the demo found problems:\n  - {}", problems.join("\n  - "));
    }
    println!("demo OK");
    Ok(())
}

/// `cargo xtask demo --nodes N`: N balancer nodes behind an ECMP router (BIRD, BGP + BFD),
/// new connections spread over nodes and backends, then one node dies in the middle of 100
/// long-lived streams. Ends with `survived: S/T connections ...`.
fn nodes(args: &Args, mode: Mode, xtask: &std::path::Path, t0: Instant) -> anyhow::Result<()> {
    use std::time::Duration;
    use xtask::cluster::{self, Cluster};
    let n = args.nodes as usize;
    let lb = cmd::lb_binary();
    step(
        t0,
        &format!(
            "lab: client → router (BIRD, ECMP by 5-tuple, BFD) → {n} balancer nodes (BIRD + lb run) → 3 backends; replies go backend → router (DSR)"
        ),
    );
    let mut c = Cluster::up(mode, n, &WEIGHTS, xtask)?;
    let health =
        "kind = \"tcp\"\nport = 7\ninterval_ms = 200\ntimeout_ms = 200\nrise = 1\nfall = 1";
    let services = c.services("maglev", Some(health));
    for i in 0..n {
        let cfg = c.config(i, &services, true);
        c.start_lb(i, &lb, &cfg)?;
    }
    let names: Vec<String> = c.nodes.iter().map(|x| x.name.clone()).collect();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    let took = c.wait_next_hops(&all, Duration::from_secs(30))?;
    step(
        t0,
        &format!(
            "every node announces {} (lb vip list on n1 below); the router has {n} next hops after {} ms",
            cluster::VIP,
            took.as_millis()
        ),
    );
    for line in c.lb_cli(0, &lb, &["vip", "list"])?.lines() {
        println!("    {line}");
    }
    println!(
        "    router: {}",
        cmd::run(
            "ip",
            &[
                "-n",
                &c.router(),
                "route",
                "show",
                &format!("{}/32", cluster::VIP)
            ]
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).replace('\n', " "))
        .unwrap_or_default()
        .trim()
    );
    let flows = |c: &Cluster| -> Vec<u64> {
        std::thread::sleep(Duration::from_millis(1100));
        (0..n).map(|i| c.new_flows(i, &lb).unwrap_or(0)).collect()
    };
    let before = flows(&c);
    step(
        t0,
        &format!(
            "{} HTTP requests to http://{}/",
            args.requests,
            cluster::VIP
        ),
    );
    let tally = c.http(args.requests)?;
    let after = flows(&c);
    let mut problems = Vec::new();
    println!(
        "    new flows per node:    {}",
        names
            .iter()
            .zip(after.iter().zip(&before))
            .map(|(nm, (a, b))| format!("{nm} {}", a - b))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "    answers per backend:   {} (weights {})",
        tally
            .by_backend
            .iter()
            .map(|(b, k)| format!("{b} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        WEIGHTS
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join(":")
    );
    if tally.errors > 0 {
        problems.push(format!("{} requests failed", tally.errors));
    }
    if after.iter().zip(&before).any(|(a, b)| a == b) {
        problems.push("a node took no new flow".to_owned());
    }
    let digests: Vec<String> = (0..n)
        .map(|i| {
            c.status(i, &lb)
                .map(|s| s["services"][0]["ring_digest"].to_string())
                .unwrap_or_default()
        })
        .collect();
    println!(
        "    ring_digest per node:  {} (equal: every node picks the same backend)",
        digests.join(" ")
    );
    if digests.iter().any(|d| *d != digests[0]) {
        problems.push("the nodes' tables differ".to_owned());
    }

    step(
        t0,
        "100 long-lived streaming connections (512 bytes every 50 ms each, every echo checked)",
    );
    let mut s = c.streams(100)?;
    std::thread::sleep(Duration::from_secs(2));
    cluster::mark(&mut s, "steady")?;
    let victim = n / 2;
    step(
        t0,
        &format!(
            "node {} dies: link down, processes killed (no BGP goodbye: the router's BFD notices)",
            names[victim]
        ),
    );
    let killed = Instant::now();
    c.kill_node(victim)?;
    let rest: Vec<&str> = all
        .iter()
        .copied()
        .filter(|x| *x != names[victim])
        .collect();
    let failover = c.wait_next_hops(&rest, Duration::from_secs(10))?;
    step(
        t0,
        &format!(
            "the router dropped {} {} ms after it died",
            names[victim],
            failover.as_millis()
        ),
    );
    std::thread::sleep(Duration::from_secs(3).saturating_sub(killed.elapsed()));
    let stall = cluster::mark(&mut s, "after")?;
    let (_, out, _) = s.finish(Duration::from_secs(30))?;
    let (total, ok, bytes, errors) = cluster::stream_results(&out);
    for i in (0..n).filter(|i| *i != victim) {
        if let Ok(st) = c.status(i, &lb) {
            println!("    {} flow sharing: {}", names[i], st["flow_sync"]);
        }
    }
    if !errors.is_empty() {
        problems.push(format!("broken connections: {}", errors.join("; ")));
    }
    if args.keep {
        println!(
            "The lab stays up (namespaces {}*). Ctrl-C tears it down.",
            c.prefix
        );
        lab::wait_for_ctrlc();
    }
    drop(c);
    step(t0, "lab removed");
    if !problems.is_empty() {
        bail!("the demo found problems:\n  - {}", problems.join("\n  - "));
    }
    println!(
        "survived: {ok}/{total} connections ({bytes} bytes echoed and verified, {} lost); longest stall {stall} ms; node failover (BFD) {} ms",
        if ok == total { "none" } else { "some" },
        failover.as_millis()
    );
    Ok(())
}

trait StartsWithMac {
    fn starts_with_mac(&self, mac: &str) -> bool;
}

impl StartsWithMac for String {
    /// tcpdump -e lines start with "<time> <src mac> > <dst mac>".
    fn starts_with_mac(&self, mac: &str) -> bool {
        self.split_whitespace().nth(1) == Some(mac)
    }
}
