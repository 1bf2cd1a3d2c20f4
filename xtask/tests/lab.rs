//! Tier 3: the real `lb` daemon in network namespaces, real clients and servers.
//! Needs root: run by `cargo xtask test` (`#[ignore]`d for a plain `cargo test`).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use xtask::{
    cmd,
    lab::{self, Lab, Mode},
};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

fn up(mode: Mode, weights: &[u16]) -> Lab {
    let mut lab =
        Lab::up(mode, weights, Path::new(XTASK)).unwrap_or_else(|e| panic!("lab up: {e:#}"));
    let attached = lab
        .start_lb(&cmd::lb_binary(), &lab.config(mode))
        .unwrap_or_else(|e| panic!("lb run: {e:#}"));
    assert_eq!(
        attached,
        mode.as_str(),
        "lb attached in another mode than asked"
    );
    assert!(
        lab.xdp_attached(&lab.lb_ns(), "eth0"),
        "lb_xdp not attached to eth0"
    );
    lab
}

/// curl (a real TCP client) through the VIP, IPv4 and IPv6; UDP echo both families; and the
/// LB's bridge port never carries a frame from the VIP back to the client.
fn dsr(mode: Mode) {
    let mut lab = up(mode, &[100, 100]);
    let names: Vec<String> = lab.backends.iter().map(|b| b.name.clone()).collect();
    let cap = lab.capture(&lab.sw(), "lb", "ip or ip6").expect("tcpdump");

    let cl = lab.client();
    for src in ["10.99.0.11", "10.99.0.12", "10.99.0.13", "10.99.0.14"] {
        let body = lab
            .exec(
                &cl,
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "--interface",
                    src,
                    "http://10.99.0.100/",
                ],
            )
            .unwrap_or_else(|e| panic!("curl from {src}: {e:#}"));
        assert!(
            names.contains(&body.trim().to_owned()),
            "unexpected answer {body:?}"
        );
    }
    let body = lab
        .exec(
            &cl,
            &[
                "curl",
                "-sS",
                "-g",
                "--max-time",
                "5",
                "http://[fd00:99::100]/",
            ],
        )
        .unwrap_or_else(|e| panic!("curl over IPv6: {e:#}"));
    assert!(
        names.contains(&body.trim().to_owned()),
        "unexpected IPv6 answer {body:?}"
    );

    let xtask = Path::new(XTASK);
    let t = lab
        .clients(
            xtask,
            "udp",
            SocketAddr::new(IpAddr::V4(lab::VIP4), lab::ECHO_PORT),
            &lab::v4s(&lab.clients4),
            20,
        )
        .expect("udp client");
    assert_eq!((t.total(), t.errors), (20, 0), "UDP over IPv4: {t:?}");
    let v6: Vec<IpAddr> = lab.clients6.iter().map(|a| IpAddr::V6(*a)).collect();
    let t = lab
        .clients(
            xtask,
            "udp",
            SocketAddr::new(IpAddr::V6(lab::VIP6), lab::ECHO_PORT),
            &v6,
            20,
        )
        .expect("udp6 client");
    assert_eq!((t.total(), t.errors), (20, 0), "UDP over IPv6: {t:?}");

    let lines = cap.stop();
    let from_vip: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(" 10.99.0.100.") && l.contains("10.99.0.100.") && is_from_vip(l))
        .collect();
    assert!(
        from_vip.is_empty(),
        "backend→client frames crossed the LB:\n{from_vip:#?}"
    );
    let to_vip = lines
        .iter()
        .filter(|l| l.contains("> 10.99.0.100.80:"))
        .count();
    let tx = lines
        .iter()
        .filter(|l| {
            l.split_whitespace().nth(1) == Some(lab::LB_MAC) && l.contains("> 10.99.0.100.80:")
        })
        .count();
    assert!(
        to_vip > 0 && tx > 0,
        "capture saw no client→VIP traffic or no XDP_TX copies ({to_vip}, {tx})"
    );
    let to_vip6 = lines
        .iter()
        .filter(|l| l.contains("> fd00:99::100.80:"))
        .count();
    assert!(to_vip6 > 0, "capture saw no IPv6 client→VIP traffic");

    let report = lab.stop_lb().expect("lb stops cleanly on SIGTERM");
    assert!(
        report.contains("verdict_tx="),
        "final counters missing:\n{report}"
    );
    assert!(
        !lab.xdp_attached(&lab.lb_ns(), "eth0"),
        "lb_xdp still attached after SIGTERM"
    );
}

/// tcpdump line of a frame whose IP source is the VIP (IPv4 or IPv6).
fn is_from_vip(line: &str) -> bool {
    line.split(": ").nth(1).is_some_and(|l3| {
        let src = l3.split_whitespace().next().unwrap_or("");
        src.starts_with("10.99.0.100.") || src.starts_with("fd00:99::100.")
    })
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn lab_removes_everything_it_made() {
    let prefix;
    {
        let lab = up(Mode::Generic, &[100]);
        prefix = lab.prefix.clone();
        let list = String::from_utf8(cmd::run("ip", &["netns", "list"]).unwrap().stdout).unwrap();
        assert!(list.contains(&format!("{prefix}lb")));
    }
    let list = String::from_utf8(cmd::run("ip", &["netns", "list"]).unwrap().stdout).unwrap();
    assert!(!list.contains(&prefix), "namespaces left behind:\n{list}");
}

/// 2 000 new TCP connections from 8 source addresses split 1:2:2 within ±5 points.
fn distribution(mode: Mode) {
    let lab = up(mode, &[100, 200, 200]);
    let t = lab
        .clients(
            Path::new(XTASK),
            "http",
            SocketAddr::new(IpAddr::V4(lab::VIP4), lab::HTTP_PORT),
            &lab::v4s(&lab.clients4),
            2000,
        )
        .expect("http client");
    assert_eq!(t.errors, 0, "failed requests: {t:?}");
    assert_eq!(t.total(), 2000);
    for (b, want) in lab.backends.iter().zip([0.2, 0.4, 0.4]) {
        let share = *t.by_backend.get(&b.name).unwrap_or(&0) as f64 / 2000.0;
        println!(
            "{} {}: {:.1}% (weight share {:.0}%)",
            mode.as_str(),
            b.name,
            100.0 * share,
            100.0 * want
        );
        assert!(
            (share - want).abs() <= 0.05,
            "{}: {:.3} of connections, want {want} ± 0.05 ({t:?})",
            b.name,
            share
        );
    }
}

/// A long-lived TCP connection keeps its backend while the backend set and the weights change
/// under it: a backend is added, and the connection's own backend is set to weight 0 (drain).
/// New connections follow the new weights meanwhile.
fn affinity(mode: Mode) {
    let mut lab = Lab::up(mode, &[100, 100, 100], Path::new(XTASK)).expect("lab up");
    // Start with b1 and b2 only; b3 is added later.
    let config = lab.config_with(mode, &[Some(100), Some(100), None]);
    lab.start_lb(&cmd::lb_binary(), &config).expect("lb run");
    let cl = lab.client();
    let target = format!("{}:{}", lab::VIP4, lab::ECHO_PORT);
    let hold = lab
        .spawn(
            &cl,
            &[
                XTASK,
                "lab-client",
                "--kind",
                "hold",
                "--target",
                &target,
                "--source",
                "10.99.0.15",
            ],
        )
        .expect("hold client");
    let line = hold
        .expect_line("backend ", Duration::from_secs(10))
        .expect("connected");
    let held = line.trim_start_matches("backend ").trim().to_owned();
    let idx = lab
        .backends
        .iter()
        .position(|b| b.name == held)
        .expect("held backend is b1 or b2");
    assert!(
        idx < 2,
        "held connection on {held}, which is not configured yet"
    );

    // Change 1: add b3.
    let added = lab.config_with(mode, &[Some(100), Some(100), Some(100)]);
    let r = lab.reload(&added).expect("reload adding b3");
    assert!(r.contains("backends +"), "{r}");
    std::thread::sleep(Duration::from_millis(500));
    // Change 2: the held connection's backend gets weight 0.
    let mut w = [Some(100u16), Some(100), Some(100)];
    w[idx] = Some(0);
    lab.reload(&lab.config_with(mode, &w))
        .expect("reload draining the held backend");
    std::thread::sleep(Duration::from_millis(500));

    // New connections: none to the drained backend, some to the new one.
    let t = lab
        .clients(
            Path::new(XTASK),
            "http",
            SocketAddr::new(IpAddr::V4(lab::VIP4), lab::HTTP_PORT),
            &lab::v4s(&lab.clients4),
            200,
        )
        .expect("http client");
    assert_eq!(t.errors, 0, "{t:?}");
    assert_eq!(
        t.by_backend.get(&held),
        None,
        "new connections went to the drained {held}: {t:?}"
    );
    assert!(
        t.by_backend.get("b3").copied().unwrap_or(0) > 0,
        "no new connection on the added b3: {t:?}"
    );

    let (ok, out, err) = hold
        .finish(Duration::from_secs(10))
        .expect("hold client exits");
    assert!(ok, "the long-lived connection broke: {out:?} {err:?}");
    let pings: u64 = out
        .iter()
        .find_map(|l| l.strip_prefix("done "))
        .and_then(|n| n.trim().parse().ok())
        .expect("done line");
    assert!(pings >= 5, "only {pings} echoes over the connection");
}

/// Traffic to and from the LB's own addresses is untouched while lb_xdp is attached, and the
/// backends answer neither ARP nor NDP for the VIP (only the client's route sends it to the LB).
fn non_vip_traffic(mode: Mode) {
    let mut lab = up(mode, &[100, 100]);
    let cl = lab.client();
    let lbns = lab.lb_ns();
    lab.exec(&cl, &["ping", "-c", "2", "-W", "2", "10.99.0.2"])
        .expect("ping LB (IPv4) from the client");
    lab.exec(&cl, &["ping", "-6", "-c", "2", "-W", "2", "fd00:99::2"])
        .expect("ping LB (IPv6) from the client");
    lab.exec(&lbns, &["ping", "-c", "1", "-W", "2", "10.99.0.21"])
        .expect("ping a backend from the LB");
    // A TCP service on the LB's own address.
    let server = lab
        .spawn(
            &lbns,
            &[
                XTASK,
                "lab-backend",
                "--name",
                "lb-itself",
                "--http-port",
                "8080",
                "--echo-port",
                "8007",
            ],
        )
        .expect("server on the LB");
    server
        .expect_line("ready", Duration::from_secs(10))
        .expect("server ready");
    let body = lab
        .exec(
            &cl,
            &["curl", "-sS", "--max-time", "5", "http://10.99.0.2:8080/"],
        )
        .expect("TCP to the LB's own address");
    assert_eq!(body.trim(), "lb-itself");
    let body = lab
        .exec(
            &cl,
            &[
                "curl",
                "-sS",
                "-g",
                "--max-time",
                "5",
                "http://[fd00:99::2]:8080/",
            ],
        )
        .expect("TCP to the LB's own IPv6 address");
    assert_eq!(body.trim(), "lb-itself");
    // The LB has the VIP on-link (10.99.0.0/24): resolving it must fail.
    assert!(
        lab.exec(&lbns, &["ping", "-c", "1", "-W", "1", "10.99.0.100"])
            .is_err(),
        "someone answered for the VIP"
    );
    assert!(
        lab.exec(&lbns, &["ping", "-6", "-c", "1", "-W", "1", "fd00:99::100"])
            .is_err(),
        "someone answered for the IPv6 VIP"
    );
    let neigh = lab.exec(&lbns, &["ip", "neigh", "show"]).unwrap();
    for l in neigh
        .lines()
        .filter(|l| l.starts_with("10.99.0.100 ") || l.starts_with("fd00:99::100 "))
    {
        assert!(
            !l.contains("lladdr"),
            "a backend answered ARP/NDP for the VIP: {l}"
        );
    }
    let report = lab.stop_lb().expect("lb stops");
    assert!(report.contains("verdict_pass="), "{report}");
    assert!(
        !report.contains("verdict_tx="),
        "non-VIP traffic was forwarded: {report}"
    );
}

macro_rules! both_modes {
    ($($name:ident),*) => {
        mod native {
            $(
                #[test]
                #[ignore = "needs root: run by `cargo xtask test`"]
                fn $name() {
                    super::$name(super::Mode::Native);
                }
            )*
        }
        mod generic {
            $(
                #[test]
                #[ignore = "needs root: run by `cargo xtask test`"]
                fn $name() {
                    super::$name(super::Mode::Generic);
                }
            )*
        }
    };
}

both_modes!(dsr, distribution, affinity, non_vip_traffic);
