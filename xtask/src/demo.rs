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
}

impl Default for Args {
    fn default() -> Self {
        Args {
            mode: "native".to_owned(),
            requests: 300,
            keep: false,
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

trait StartsWithMac {
    fn starts_with_mac(&self, mac: &str) -> bool;
}

impl StartsWithMac for String {
    /// tcpdump -e lines start with "<time> <src mac> > <dst mac>".
    fn starts_with_mac(&self, mac: &str) -> bool {
        self.split_whitespace().nth(1) == Some(mac)
    }
}
