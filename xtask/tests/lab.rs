//! Tier 3: the real `lb` daemon in network namespaces, real clients and servers.
//! Needs root: run by `cargo xtask test` (`#[ignore]`d for a plain `cargo test`).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
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
fn dsr_native() {
    dsr(Mode::Native);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn dsr_generic() {
    dsr(Mode::Generic);
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
