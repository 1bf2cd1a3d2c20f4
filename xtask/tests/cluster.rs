//! Tier 3, several nodes (issue #10): balancer nodes behind an ECMP router, each announcing the
//! VIP over BGP with BIRD (BFD on) driven by `lb run`. Needs root and bird2: run by
//! `cargo xtask test`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use xtask::{
    cluster::{self, Cluster, mark, stream_results},
    lab::Mode,
};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

fn lb() -> PathBuf {
    xtask::cmd::lb_binary()
}

const HEALTH: &str =
    "kind = \"tcp\"\nport = 7\ninterval_ms = 200\ntimeout_ms = 200\nrise = 1\nfall = 1";

/// A cluster of `nodes` with `lb run` on each (`scheduler` for both services, flow sharing
/// when `sync`), every node's route in the router.
fn up(nodes: usize, weights: &[u16], scheduler: &str, sync: bool) -> Cluster {
    let mut c = Cluster::up(Mode::Native, nodes, weights, Path::new(XTASK)).expect("cluster up");
    let services = c.services(scheduler, Some(HEALTH));
    for i in 0..nodes {
        let cfg = c.config(i, &services, sync);
        c.start_lb(i, &lb(), &cfg).expect("lb run");
    }
    let all: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let t = c
        .wait_next_hops(&all, Duration::from_secs(30))
        .expect("every node announces the VIP");
    println!("cluster: {nodes} nodes announced in {t:?} (BGP sessions, first health checks)");
    c
}

/// `count` HTTP requests through the VIP, every one answered; the number of distinct
/// (source, port) among them: a port the client reuses within the flow timeout is the same
/// flow, not a new one.
fn distinct_http_flows(c: &Cluster, count: usize) -> u64 {
    let (target, n) = (format!("{}:80", cluster::VIP), count.to_string());
    let srcs: Vec<String> = c.clients.iter().map(|a| a.to_string()).collect();
    let mut args = vec![
        XTASK,
        "lab-client",
        "--kind",
        "http-detail",
        "--target",
        &target,
        "--count",
        &n,
    ];
    for s in &srcs {
        args.extend(["--source", s]);
    }
    let client = c.client();
    let (_, out, err) = c
        .spawn(&client, &args)
        .expect("http client")
        .finish(Duration::from_secs(120))
        .expect("http client ends");
    let mut seen = std::collections::BTreeSet::new();
    for line in &out {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        assert!(v["error"].is_null(), "a request failed: {v} {err:?}");
        seen.insert((v["src"].to_string(), v["sport"].as_u64()));
    }
    assert_eq!(out.len(), count, "{out:?} {err:?}");
    seen.len() as u64
}

/// New flows per node, from each node's counters (`lb status` samples them every second).
fn new_flows(c: &Cluster) -> Vec<u64> {
    std::thread::sleep(Duration::from_millis(1100));
    (0..c.nodes.len())
        .map(|i| c.new_flows(i, &lb()).expect("status"))
        .collect()
}

/// Both nodes see traffic; the split over backends follows the weights (identical tables on
/// both nodes: equal ring_digest); `lb vip list` shows the VIP announced.
#[test]
#[ignore = "needs root and bird2: run by `cargo xtask test`"]
fn nodes_share_traffic_and_weights_hold() {
    let c = up(2, &[100, 200, 300], "maglev", false);
    let before = new_flows(&c);
    let t = c.http(1200).expect("http");
    assert_eq!(t.errors, 0, "{t:?}");
    let after = new_flows(&c);
    let per_node: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    println!(
        "cluster: 1200 requests, new flows per node {per_node:?}, per backend {:?}",
        t.by_backend
    );
    assert!(
        per_node.iter().all(|n| *n >= 200),
        "both nodes take new flows: {per_node:?}"
    );
    let share = |b: &str| *t.by_backend.get(b).unwrap_or(&0) as f64 / 1200.0;
    for (b, want) in [("b1", 1.0 / 6.0), ("b2", 2.0 / 6.0), ("b3", 3.0 / 6.0)] {
        assert!(
            (share(b) - want).abs() < 0.06,
            "{b}: {:.3} of the requests, weight share {want:.3}",
            share(b)
        );
    }
    let digests: Vec<String> = (0..2)
        .map(|i| {
            let st = c.status(i, &lb()).expect("status");
            st["services"][0]["ring_digest"].to_string()
        })
        .collect();
    assert_eq!(digests[0], digests[1], "identical tables on both nodes");
    let list = c.lb_cli(0, &lb(), &["vip", "list"]).expect("vip list");
    assert!(
        list.contains("10.99.0.100") && list.contains("announced"),
        "{list}"
    );
}

/// One node dies (link down, then its processes: no BGP notification, BFD detects it) in the
/// middle of 100 streaming connections: every connection survives with every byte echoed.
/// `sync`: flow sharing on (needed by rr: another node would pick another backend).
fn node_loss(scheduler: &str, sync: bool) -> (usize, usize) {
    let mut c = up(3, &[100, 100, 100], scheduler, sync);
    let mut s = c.streams(100).expect("100 streams");
    std::thread::sleep(Duration::from_secs(1));
    mark(&mut s, "steady").expect("mark");
    let flows0 = new_flows(&c);
    let t0 = Instant::now();
    c.kill_node(1).expect("kill n2");
    let failover = c
        .wait_next_hops(&["n1", "n3"], Duration::from_secs(10))
        .expect("the router drops n2");
    std::thread::sleep(Duration::from_secs(3));
    let stall = mark(&mut s, "after-kill").expect("mark");
    let (_, out, err) = s.finish(Duration::from_secs(30)).expect("streams end");
    let (total, ok, bytes, errors) = stream_results(&out);
    std::thread::sleep(Duration::from_millis(1100));
    let flows1: Vec<u64> = [0usize, 2]
        .iter()
        .map(|i| c.new_flows(*i, &lb()).expect("status"))
        .collect();
    println!(
        "cluster {scheduler}{}: node n2 killed; router dropped it after {failover:?} ({:?} since the kill); \
         longest stall {stall} ms; survived: {ok}/{total} connections, {bytes} bytes verified; \
         new flows on n1/n3 before {:?} after {flows1:?}",
        if sync { " + flow sharing" } else { "" },
        t0.elapsed(),
        [flows0[0], flows0[2]]
    );
    if sync {
        for i in [0usize, 2] {
            let st = c.status(i, &lb()).expect("status");
            println!("cluster: {} flow_sync {}", c.nodes[i].name, st["flow_sync"]);
        }
    }
    assert_eq!(total, 100, "{out:?} {err:?}");
    (ok, errors.len())
}

#[test]
#[ignore = "needs root and bird2: run by `cargo xtask test`"]
fn node_loss_keeps_maglev_connections() {
    let (ok, broken) = node_loss("maglev", false);
    assert_eq!((ok, broken), (100, 0), "every connection survives");
}

#[test]
#[ignore = "needs root and bird2: run by `cargo xtask test`"]
fn node_loss_keeps_rr_connections_with_flow_sharing() {
    let (ok, broken) = node_loss("rr", true);
    assert_eq!((ok, broken), (100, 0), "every connection survives");
}

/// The control: the same with rr and no flow sharing breaks the connections the router moves
/// (another node's rr picks another backend, which answers with a reset).
#[test]
#[ignore = "needs root and bird2: run by `cargo xtask test`"]
fn node_loss_breaks_rr_connections_without_flow_sharing() {
    let (ok, broken) = node_loss("rr", false);
    assert!(broken > 0 && ok < 100, "{ok} survived, {broken} broken");
}

/// A node whose service loses every healthy backend (here: its checks go to a closed port)
/// withdraws the VIP; traffic goes to the other node. `lb vip withdraw`/`announce` by hand;
/// a crashed lb (SIGKILL) is withdrawn at once (its device is gone), a stopped one too.
#[test]
#[ignore = "needs root and bird2: run by `cargo xtask test`"]
fn unhealthy_or_stopped_node_withdraws() {
    let mut c = up(2, &[100, 100], "maglev", false);
    // n1's checks fail (port 9: nothing listens), n2's pass.
    let bad = c.services(
        "maglev",
        Some("kind = \"tcp\"\nport = 9\ninterval_ms = 200\ntimeout_ms = 200\nrise = 1\nfall = 1"),
    );
    let cfg_bad = c.config(0, &bad, false);
    c.reload(0, &cfg_bad).expect("reload n1");
    let t = c
        .wait_next_hops(&["n2"], Duration::from_secs(10))
        .expect("n1 withdraws");
    println!("cluster: n1 lost its backends; withdrawn from the router in {t:?}");
    let list = c.lb_cli(0, &lb(), &["vip", "list"]).expect("vip list");
    assert!(
        list.contains("withdrawn") && list.contains("too few healthy"),
        "{list}"
    );
    let before = new_flows(&c);
    let flows = distinct_http_flows(&c, 200);
    let after = new_flows(&c);
    assert_eq!(after[0], before[0], "no new flow reaches n1");
    // Every connection is a new flow of n2: each distinct 5-tuple at least, each of the 200
    // SYNs at most (a SYN handed to the controller counts even when its client port was used
    // again within the flow timeout: `dataplane.defer_records`).
    assert!(
        (flows..=200).contains(&(after[1] - before[1])),
        "n2 takes every one of the {flows} distinct flows (200 connections): {before:?} → {after:?}"
    );

    // Healthy again: announced again.
    let good = c.services("maglev", Some(HEALTH));
    let cfg_good = c.config(0, &good, false);
    c.reload(0, &cfg_good).expect("reload n1");
    c.wait_next_hops(&["n1", "n2"], Duration::from_secs(10))
        .expect("n1 announces again");

    // The operator: withdraw (persisted), announce.
    let out = c
        .lb_cli(0, &lb(), &["vip", "withdraw", "web"])
        .expect("vip withdraw");
    assert!(out.contains("withdrawn"), "{out}");
    c.wait_next_hops(&["n2"], Duration::from_secs(10))
        .expect("withdrawn by the operator");
    c.lb_cli(0, &lb(), &["vip", "announce", "web"])
        .expect("vip announce");
    c.wait_next_hops(&["n1", "n2"], Duration::from_secs(10))
        .expect("announced again");

    // lb crashes: its TUN device goes with it, BIRD withdraws without waiting for anything.
    c.stop_lb(0, true).expect("SIGKILL");
    let t = c
        .wait_next_hops(&["n2"], Duration::from_secs(10))
        .expect("a crashed lb's VIP is withdrawn");
    println!("cluster: lb on n1 SIGKILLed; withdrawn from the router in {t:?}");
    assert!(t < Duration::from_secs(3), "{t:?}");
    let r = c.http(50).expect("http");
    assert_eq!(r.errors, 0, "{r:?}");
    c.start_lb(0, &lb(), &cfg_good).expect("restart n1");
    c.wait_next_hops(&["n1", "n2"], Duration::from_secs(10))
        .expect("announced after the restart");
    c.stop_lb(0, false).expect("SIGTERM");
    let t = c
        .wait_next_hops(&["n2"], Duration::from_secs(10))
        .expect("a stopped lb's VIP is withdrawn");
    println!("cluster: lb on n1 stopped (SIGTERM); withdrawn in {t:?}");

    // BIRD crashes on n2 (n1 is down too now): nothing is announced.
    c.kill_bird("n2");
    c.wait_next_hops(&[], Duration::from_secs(10))
        .expect("a crashed BIRD's routes are withdrawn");
}

/// `lb vip withdraw --graceful`: new flows move to the other node while the existing ones go
/// on (all of them survive, moved by the router to the other node: same Maglev table), and the
/// VIP is withdrawn once no new flow arrives.
#[test]
#[ignore = "needs root and bird2: run by `cargo xtask test`"]
fn graceful_withdraw_moves_new_flows_first() {
    let c = up(2, &[100, 100], "maglev", false);
    let mut s = c.streams(60).expect("60 streams");
    mark(&mut s, "steady").expect("mark");
    let out = c
        .lb_cli(0, &lb(), &["vip", "withdraw", "--graceful", "web"])
        .expect("graceful withdraw");
    println!("cluster: lb vip withdraw --graceful: {}", out.trim());
    assert!(out.contains("draining"), "{out}");
    assert!(out.contains("withdrawn after"), "{out}");
    // BIRD has the withdrawal; the router follows within a BGP update.
    c.wait_next_hops(&["n2"], Duration::from_secs(5))
        .expect("withdrawn in the end");
    let before = new_flows(&c);
    let r = c.http(200).expect("http");
    assert_eq!(r.errors, 0, "{r:?}");
    let after = new_flows(&c);
    assert_eq!(
        after[0], before[0],
        "no new flow reaches n1 after the drain"
    );
    let stall = mark(&mut s, "after").expect("mark");
    let (_, out, _) = s.finish(Duration::from_secs(30)).expect("streams end");
    let (total, ok, bytes, errors) = stream_results(&out);
    println!(
        "cluster: graceful withdraw: survived {ok}/{total}, {bytes} bytes, longest stall {stall} ms"
    );
    assert_eq!((total, ok), (60, 60), "{errors:?}");
    let list = c
        .lb_cli(0, &lb(), &["vip", "list", "--json"])
        .expect("vip list");
    let v: serde_json::Value = serde_json::from_str(&list).expect("json");
    assert_eq!(v["vips"][0]["route"], "withdrawn", "{v}");
    assert!(
        v["vips"][0]["drain"]["withdrawn_ms"].as_u64().is_some(),
        "{v}"
    );
    let _ = cluster::VIP;
}

/// The BIRD configs shipped in scripts/bird parse (bird -p), with the node's include pointing at
/// what `lb run` writes.
#[test]
#[ignore = "needs bird2: run by `cargo xtask test`"]
fn shipped_bird_configs_parse() {
    let root = xtask::cmd::workspace_root().join("scripts/bird");
    let dir = std::env::temp_dir().join(format!("lb-bird-parse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("lb-vips.conf"),
        "protocol static lb_vips4 {\n  ipv4;\n  route 10.99.0.100/32 via \"lb-alive\" { bgp_path.prepend(65001); };\n}\nprotocol static lb_vips6 {\n  ipv6;\n}\n",
    )
    .unwrap();
    for name in ["router.conf", "node.conf"] {
        let text = std::fs::read_to_string(root.join(name))
            .unwrap()
            .replace("/run/lb/bird", dir.to_str().unwrap());
        let path = dir.join(format!("{name}.test"));
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&path)
            .output()
            .expect("bird");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
