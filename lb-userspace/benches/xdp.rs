//! `cargo xtask bench`: per-packet cost of lb_xdp through BPF_PROG_TEST_RUN, next to a trivial
//! XDP_TX program measured in the same run. Prints a table and writes
//! `target/bench/xdp.json`.
//!
//! `repeat N` runs the program N times on the same buffer without restoring it, so every
//! repeated case checks through the counters that each iteration took the path it claims.
//! New flows cannot be repeated on one buffer (the second run is a hit); they are measured with
//! one call per distinct packet, next to the baseline measured the same way.

#[path = "../tests/support/mod.rs"]
mod support;

mod control;

use std::{net::Ipv4Addr, time::Duration};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use lb_common::stats::Stat;
use support::*;

const REPEAT: u32 = 2_000_000;
const NEW_FLOWS: usize = 50_000;
const ROUNDS: usize = 5;
/// Maglev builds timed for the median (a build is about 1 ms).
const MAGLEV_ROUNDS: usize = 15;

fn run(prog: &Xdp, pkt: &[u8], repeat: u32) -> (u32, Duration) {
    let mut out = vec![0u8; pkt.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::new()
    };
    let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    (r.return_value, r.duration)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// What `lb run` does every 10 ms with `dataplane.defer_records`: every record in `LB_RECORD`
/// made into an entry (`lb_record_apply`). Returns the entries made.
fn drain_records(f: &mut Fixture) -> u64 {
    use lb_userspace::dataplane::Maps as _;
    let mut made = 0;
    loop {
        let r = f.dp.take_records(4096);
        if r.is_empty() {
            return made;
        }
        made += f.dp.record_flows(&r, 0).expect("recording").inserted;
    }
}

/// CPU time of this thread so far (ns): the controller's share of a recorded connection.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Median over rounds of the kernel-reported mean ns per run.
fn repeated(
    f: &mut Fixture,
    program: &'static str,
    pkt: &[u8],
    want: u32,
    check: Option<Stat>,
) -> f64 {
    let mut samples = Vec::new();
    for _ in 0..ROUNDS {
        let before = check.map(|s| f.snapshot().get(s));
        let ns = repeat_v(f, program, pkt, want);
        if let (Some(stat), Some(b)) = (check, before) {
            let delta = f.snapshot().get(stat) - b;
            assert_eq!(
                delta,
                REPEAT as u64,
                "{program}: not every iteration counted {}",
                stat.name()
            );
        }
        samples.push(ns);
    }
    median(samples)
}

/// A program of the object: `lb_xdp` or one of the bench-only ones (loaded on first use).
fn prog<'a>(f: &'a mut Fixture, name: &'static str) -> &'a Xdp {
    if name == "lb_xdp" {
        f.dp.program()
    } else {
        f.dp.other_program(name).expect("program in the object")
    }
}

/// Mean ns per single-run call over `pkts` (one pass).
fn one_per_call(f: &mut Fixture, program: &'static str, pkts: &[Vec<u8>], want: u32) -> f64 {
    let prog = prog(f, program);
    let mut total = 0u128;
    for p in pkts {
        let (v, d) = run(prog, p, 1);
        assert_eq!(v, want, "{program}: verdict");
        total += d.as_nanos();
    }
    total as f64 / pkts.len() as f64
}

fn syn4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 64240)
        .syn();
    write(b, &[])
}

/// `n` SYNs of distinct new flows from 10.`net`.x.y (a fresh `net` per round keeps them new).
fn new_flow_syns(net: u8, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let src = Ipv4Addr::new(10, net, (i >> 8) as u8, i as u8);
            syn4(src, 1024 + (i % 50000) as u16, VIP4, 80)
        })
        .collect()
}

/// The tests' services with every backend at the LB's own MAC. Repeat mode feeds the program
/// its own output (the frame after the MAC rewrite): with the backends at another MAC, every
/// repetition after the first would be a frame for another host, which lb_xdp passes. This
/// way each repetition takes the full path, the destination-MAC check included.
fn bench_config() -> String {
    let lb = LB_MAC.map(|b| format!("{b:02x}")).join(":");
    let mut c = CONFIG.to_owned();
    for i in 0x21..=0x2f {
        c = c.replace(
            &format!("mac = \"02:00:00:00:00:{i:02x}\""),
            &format!("mac = \"{lb}\""),
        );
    }
    c
}

use lb_userspace::config::CheckKind;

fn main() {
    // `cargo bench` passes --bench; nothing to parse. LB_BENCH_ONLY=live: the live-frames part.
    if std::env::var("LB_BENCH_ONLY").as_deref() == Ok("live") {
        println!("{}", live_frames().unwrap_or_default());
        return;
    }
    if std::env::var("LB_BENCH_ONLY").as_deref() == Ok("health") {
        for kind in [CheckKind::Tcp, CheckKind::Syn] {
            println!("{}", control::health_checks(kind));
        }
        println!("{}", control::daemon_health_checks("tcp"));
        println!("{}", control::daemon_health_checks("syn"));
        return;
    }
    // One health figure alone (profiling): the checker (tcp, syn) or the whole daemon.
    match std::env::var("LB_BENCH_ONLY").as_deref() {
        Ok("health-tcp") => return println!("{}", control::health_checks(CheckKind::Tcp)),
        Ok("health-syn") => return println!("{}", control::health_checks(CheckKind::Syn)),
        Ok("health-lb-tcp") => return println!("{}", control::daemon_health_checks("tcp")),
        Ok("health-lb-syn") => return println!("{}", control::daemon_health_checks("syn")),
        // The apply of 1 000 services with the default table size alone (profiling).
        Ok("apply") => return println!("{}", control::apply_default()),
        _ => {}
    }
    if std::env::var("LB_BENCH_ONLY").as_deref() == Ok("maglev") {
        // The Maglev build alone, on any CPU and pinned to CPU 0 (as in the full run, after
        // the parts that pin the bench's thread), three times each.
        for _ in 0..3 {
            let (any, lo, hi) = maglev_builds();
            println!("maglev build, 1 000 backends: {any:.3} ms ({lo:.3}–{hi:.3}), any CPU");
        }
        pin_to_cpu0();
        for _ in 0..3 {
            let (cpu0, lo, hi) = maglev_builds();
            println!("maglev build, 1 000 backends: {cpu0:.3} ms ({lo:.3}–{hi:.3}), CPU 0");
        }
        return;
    }
    if std::env::var("LB_BENCH_ONLY").as_deref() == Ok("control") {
        println!("{}", control::control_plane());
        return;
    }
    if std::env::var("LB_BENCH_ONLY").as_deref() == Ok("flows") {
        // The 1M-flows part alone.
        let mut f = Fixture::new(&bench_config());
        let est = tcp4_flags(C1, 40000, VIP4, 80, "A");
        let non_vip = syn4(C1, 40000, Ipv4Addr::new(10, 99, 0, 1), 22);
        let _ = targets(&mut f, &est, &non_vip);
        return;
    }
    if std::env::var("LB_BENCH_ONLY").as_deref() == Ok("flood") {
        println!("{}", syn_flood());
        return;
    }
    if std::env::var("LB_BENCH_ONLY").as_deref() == Ok("ab") {
        ab_objects();
        return;
    }
    if std::env::var("LB_BENCH_ONLY").as_deref() == Ok("plots") {
        // The plots again from the last full run's target/bench/results.json.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
        let text = std::fs::read_to_string(dir.join("results.json")).expect("results.json");
        plots(&serde_json::from_str(&text).expect("results.json"), &dir);
        return;
    }
    if std::env::var("LB_BENCH_ONLY").as_deref() == Ok("paths") {
        // The per-path figures alone (quick A/B of a data-plane change).
        let mut f = Fixture::new(&bench_config());
        let est = tcp4_flags(C1, 40000, VIP4, 80, "A");
        let non_vip = syn4(C1, 40000, Ipv4Addr::new(10, 99, 0, 1), 22);
        f.run(&syn4(C1, 40000, VIP4, 80));
        for _ in 0..3 {
            let [e, noop] = paired_with(
                &mut f,
                ("lb_xdp", XDP_TX, Stat::FlowStateless),
                [("lb_baseline_swap", XDP_TX), ("lb_baseline_tx", XDP_TX)],
                &est,
            );
            let p = paired(
                &mut f,
                ("lb_xdp", XDP_PASS, Stat::PassNoService),
                ("lb_baseline_pass", XDP_PASS),
                &non_vip,
            );
            println!(
                "established {:.1} ns vs MAC swap {:.1} ({:.2}×, rounds {:.2}–{:.2}×, means {:.2}×), vs no-op {:.1} ({:.2}×); non-VIP {:.1} vs {:.1} ({:.2}×, rounds {:.2}–{:.2}×, means {:.2}×)",
                e.a,
                e.b,
                e.ratio,
                e.lo,
                e.hi,
                e.mean_ratio,
                noop.b,
                noop.ratio,
                p.a,
                p.b,
                p.ratio,
                p.lo,
                p.hi,
                p.mean_ratio
            );
            let e6 = paired(
                &mut f,
                ("lb_xdp", XDP_TX, Stat::FlowStateless),
                ("lb_baseline_swap", XDP_TX),
                &tcp6_flags(C6, 40000, VIP6, 80, "A"),
            );
            println!(
                "IPv6 established {:.1} ns vs MAC swap {:.1} ({:.2}×, rounds {:.2}–{:.2}×)",
                e6.a, e6.b, e6.ratio, e6.lo, e6.hi
            );
            let ev = paired(
                &mut f,
                ("lb_xdp", XDP_TX, Stat::FlowStateless),
                ("lb_baseline_swap", XDP_TX),
                &tcp4_vlan_flags(C1, 40000, VIP4, 80, 100, "A"),
            );
            let pv = paired(
                &mut f,
                ("lb_xdp", XDP_PASS, Stat::PassNoService),
                ("lb_baseline_pass", XDP_PASS),
                &tcp4_vlan_flags(C1, 40000, Ipv4Addr::new(10, 99, 0, 1), 22, 100, "A"),
            );
            println!(
                "802.1Q-tagged established {:.1} ns vs MAC swap {:.1} ({:.2}×, means {:.2}×); non-VIP {:.1} vs {:.1} ({:.2}×, means {:.2}×)",
                ev.a, ev.b, ev.ratio, ev.mean_ratio, pv.a, pv.b, pv.ratio, pv.mean_ratio
            );
        }
        return;
    }
    let mut f = Fixture::new(&bench_config());
    // A SYN of a recorded flow takes the connection-table path (a hit); an ACK of a flow
    // whose slot never changed takes the stateless path (README, Stateless slots).
    let est = syn4(C1, 40000, VIP4, 80);
    let est_ack = tcp4_flags(C1, 40000, VIP4, 80, "A");
    let est6 = tcp6(C6, 40000, VIP6, 80).0;
    let est6_ack = tcp6_flags(C6, 40000, VIP6, 80, "A");
    let non_vip = syn4(C1, 40000, Ipv4Addr::new(10, 99, 0, 1), 22);
    // Establish the flows once.
    assert_eq!(f.run(&est).0, XDP_TX);
    assert_eq!(f.run(&est6).0, XDP_TX);

    let base = repeated(&mut f, "lb_baseline_tx", &est, XDP_TX, None);
    let swap = repeated(&mut f, "lb_baseline_swap", &est, XDP_TX, None);
    let established = repeated(&mut f, "lb_xdp", &est, XDP_TX, Some(Stat::FlowHit));
    let stateless = repeated(
        &mut f,
        "lb_xdp",
        &est_ack,
        XDP_TX,
        Some(Stat::FlowStateless),
    );
    let established6 = repeated(&mut f, "lb_xdp", &est6, XDP_TX, Some(Stat::FlowHit));
    let stateless6 = repeated(
        &mut f,
        "lb_xdp",
        &est6_ack,
        XDP_TX,
        Some(Stat::FlowStateless),
    );
    let pass = repeated(
        &mut f,
        "lb_xdp",
        &non_vip,
        XDP_PASS,
        Some(Stat::PassNoService),
    );
    // The same two with an 802.1Q tag (not targets: the paths a VLAN trunk's traffic takes).
    let stateless_vlan = repeated(
        &mut f,
        "lb_xdp",
        &tcp4_vlan_flags(C1, 40000, VIP4, 80, 100, "A"),
        XDP_TX,
        Some(Stat::FlowStateless),
    );
    let pass_vlan = repeated(
        &mut f,
        "lb_xdp",
        &tcp4_vlan_flags(C1, 40000, Ipv4Addr::new(10, 99, 0, 1), 22, 100, "A"),
        XDP_PASS,
        Some(Stat::PassNoService),
    );
    // What `lb trace` costs: the same program without the check, and with a trace running
    // (filtered out; and tracing every packet, the ring buffer full so each one is counted lost).
    // Interleaved pairs (this VM's noise drifts more between runs than the check costs): the
    // median of the per-pair differences.
    let mut diffs = Vec::new();
    let mut notraces = Vec::new();
    for _ in 0..3 * ROUNDS {
        let a = repeat_v(&mut f, "lb_xdp", &est, XDP_TX);
        let b = repeat_v(&mut f, "lb_xdp_notrace", &est, XDP_TX);
        diffs.push(a - b);
        notraces.push(b);
    }
    let check_cost = median(diffs);
    let notrace = median(notraces);
    let mut t = f.dp.trace_maps().expect("trace maps");
    let mut on = lb_common::TraceConfig {
        until_ns: u64::MAX,
        rate: u32::MAX,
        filters: lb_common::TRACE_F_VIP,
        ..Default::default()
    };
    on.vip[..4].copy_from_slice(&[192, 0, 2, 1]);
    t.set(&on).unwrap();
    let trace_filtered = repeated(&mut f, "lb_xdp", &est, XDP_TX, Some(Stat::FlowHit));
    on.filters = 0;
    t.set(&on).unwrap();
    let trace_all = repeated(&mut f, "lb_xdp", &est, XDP_TX, Some(Stat::FlowHit));
    t.set(&lb_common::TraceConfig::default()).unwrap();
    let _ = t.reset();

    // New flows: a distinct 5-tuple per call, fresh for every round (the table holds 65536
    // flows, so later rounds also pay LRU eviction, as a full table in production does).
    let mut rounds_new = Vec::new();
    let mut rounds_base1 = Vec::new();
    for round in 0..ROUNDS {
        let pkts = new_flow_syns(100 + round as u8, NEW_FLOWS);
        let before = f.snapshot().get(Stat::FlowNew);
        rounds_new.push(one_per_call(&mut f, "lb_xdp", &pkts, XDP_TX));
        let delta = f.snapshot().get(Stat::FlowNew) - before;
        assert_eq!(delta, NEW_FLOWS as u64, "every call must be a new flow");
        rounds_base1.push(one_per_call(&mut f, "lb_baseline_tx", &pkts, XDP_TX));
    }
    let new_flow = median(rounds_new);
    let base1 = median(rounds_base1);

    let (sync_off, sync_on) = flow_sharing_cost(&mut f);
    let flood = syn_flood();
    // After the flood's table is freed (see control::quiesce): live frames measure throughput.
    control::quiesce();
    let live = live_frames();

    let sched_rows = schedulers();
    let issue13 = targets(&mut f, &est_ack, &non_vip);
    let control = control::control_plane();

    let len = est.len();
    println!("lb_xdp per packet, BPF_PROG_TEST_RUN, {len}-byte TCP SYN, median of {ROUNDS} rounds");
    println!("{:<44} {:>9} {:>10}", "case", "ns/pkt", "× baseline");
    let rows = [
        (
            "baseline: trivial XDP_TX program",
            "baseline_tx",
            base,
            base,
            REPEAT as usize,
        ),
        (
            "baseline: trivial MAC-swap XDP_TX program",
            "baseline_swap",
            swap,
            base,
            REPEAT as usize,
        ),
        (
            "lb_xdp established IPv4 TCP, table hit (SYN)",
            "established_v4",
            established,
            base,
            REPEAT as usize,
        ),
        (
            "established IPv4 TCP ACK, unchanged slot",
            "established_v4_stateless",
            stateless,
            base,
            REPEAT as usize,
        ),
        (
            "lb_xdp established IPv6 TCP flow (XDP_TX)",
            "established_v6",
            established6,
            base,
            REPEAT as usize,
        ),
        (
            "established IPv6 TCP ACK, unchanged slot",
            "established_v6_stateless",
            stateless6,
            base,
            REPEAT as usize,
        ),
        (
            "lb_xdp without the trace check (bench only)",
            "established_v4_notrace",
            notrace,
            base,
            REPEAT as usize,
        ),
        (
            "established, a trace running, filtered out",
            "established_v4_trace_filtered",
            trace_filtered,
            base,
            REPEAT as usize,
        ),
        (
            "established, every packet traced (ring full)",
            "established_v4_trace_all",
            trace_all,
            base,
            REPEAT as usize,
        ),
        (
            "lb_xdp non-VIP packet (XDP_PASS)",
            "non_vip_pass",
            pass,
            base,
            REPEAT as usize,
        ),
        (
            "established IPv4 TCP ACK, 802.1Q-tagged",
            "established_v4_vlan_stateless",
            stateless_vlan,
            base,
            REPEAT as usize,
        ),
        (
            "non-VIP packet, 802.1Q-tagged (XDP_PASS)",
            "non_vip_vlan_pass",
            pass_vlan,
            base,
            REPEAT as usize,
        ),
        (
            "baseline, one call per packet",
            "baseline_tx_single",
            base1,
            base1,
            NEW_FLOWS,
        ),
        (
            "lb_xdp new flow, one call per packet",
            "new_flow_v4",
            new_flow,
            base1,
            NEW_FLOWS,
        ),
        (
            "new flow, flow sharing off (paired)",
            "new_flow_v4_sync_off",
            sync_off,
            base1,
            NEW_FLOWS / 2,
        ),
        (
            "new flow, flow sharing on (each reported)",
            "new_flow_v4_sync_on",
            sync_on,
            base1,
            NEW_FLOWS / 2,
        ),
    ];
    let mut json = Vec::new();
    let sched_rows = sched_rows
        .iter()
        .map(|(label, key, ns, b, n)| (label.as_str(), key.as_str(), *ns, *b, *n));
    for (label, key, ns, b, iters) in rows.into_iter().chain(sched_rows) {
        println!("{label:<44} {ns:>9.1} {:>10.2}", ns / b);
        json.push(serde_json::json!({
            "case": key, "ns_per_packet": ns, "baseline_ns": b, "ratio": ns / b, "iterations": iters,
        }));
    }
    println!(
        "new flow minus per-call overhead: {:.1} ns (lb_xdp {new_flow:.1} − baseline {base1:.1})",
        new_flow - base1
    );
    println!(
        "flow sharing: {:+.1} ns per new flow when on (each reported to LB_SYNC; off {sync_off:.1}, on {sync_on:.1})",
        sync_on - sync_off
    );
    println!(
        "trace check when no trace runs: {check_cost:+.1} ns (median of {} interleaved pairs of lb_xdp − lb_xdp_notrace)",
        3 * ROUNDS
    );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let doc = serde_json::json!({
        "benchmark": "lb_xdp BPF_PROG_TEST_RUN",
        "frame_bytes": len,
        "rounds": ROUNDS,
        "kernel": kernel.trim(),
        "cases": json,
        "trace_check_ns": check_cost,
        "flow_sync_cost_ns": sync_on - sync_off,
        "syn_flood": flood,
        "live_frames": live,
        "targets": issue13,
        "control_plane": control,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).expect("create target/bench");
    let text = serde_json::to_string_pretty(&doc).unwrap();
    std::fs::write(dir.join("xdp.json"), &text).expect("write result");
    let path = dir.join("results.json");
    std::fs::write(&path, &text).expect("write result");
    plots(&doc, &dir);
    println!("results: {}", path.canonicalize().unwrap_or(path).display());
    // A part that failed twice is in the results with its error; the run fails after writing
    // them.
    let failed: Vec<&String> = doc["control_plane"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| v.get("error").is_some())
        .map(|(k, _)| k)
        .collect();
    assert!(
        failed.is_empty(),
        "parts failed (see results.json): {failed:?}"
    );
}

/// A SYN flood: new 5-tuples without end into a 65 536-entry table (every insert evicts once it
/// is full), interleaved with the ACKs of 10 000 established flows. Figures (one call per
/// packet): a new flow into a table with room vs under the flood, an established packet
/// without vs with the flood. Checked through the counters: every flood packet a new flow,
/// every ACK the stateless path.
/// `count` SYNs of fresh 5-tuples, from sources 10.`net`.x.y on; `n`: how many were made
/// before (the next ones go on from there).
fn flood_syns(net: u8, n: &mut u32, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|_| {
            *n += 1;
            let src = Ipv4Addr::new(
                10,
                net + (*n >> 20) as u8,
                (*n >> 12) as u8,
                (*n >> 4) as u8,
            );
            syn4(src, 1024 + (*n % 60_000) as u16, VIP4, 80)
        })
        .collect()
}

fn syn_flood() -> serde_json::Value {
    const EST: usize = 10_000;
    // 1 000 000 flood SYNs (the issue's "millions of random sources": every one a new 5-tuple).
    const CHUNK: usize = 100_000;
    let mut f = Fixture::with_flow_table(&bench_config(), 65_536);
    let est: Vec<(Vec<u8>, Vec<u8>)> = (0..EST)
        .map(|i| {
            let src = Ipv4Addr::new(10, 210, (i >> 8) as u8, i as u8);
            let sport = 2000 + (i % 50_000) as u16;
            (
                syn4(src, sport, VIP4, 80),
                tcp4_flags(src, sport, VIP4, 80, "A"),
            )
        })
        .collect();
    let syns: Vec<Vec<u8>> = est.iter().map(|(s, _)| s.clone()).collect();
    let acks: Vec<Vec<u8>> = est.iter().map(|(_, a)| a.clone()).collect();
    // Room: the established flows' SYNs, then their ACKs, in a table far from full.
    let new_room = one_per_call(&mut f, "lb_xdp", &syns, XDP_TX);
    let before = f.snapshot().get(Stat::FlowStateless);
    let est_quiet = one_per_call(&mut f, "lb_xdp", &acks, XDP_TX);
    assert_eq!(f.snapshot().get(Stat::FlowStateless) - before, EST as u64);
    let mut new_flood = Vec::new();
    let mut est_flood = Vec::new();
    let mut n = 0u32;
    for round in 0..2 * ROUNDS {
        let flood = flood_syns(220, &mut n, CHUNK);
        let before = f.snapshot().get(Stat::FlowNew);
        let c = one_per_call(&mut f, "lb_xdp", &flood, XDP_TX);
        assert_eq!(f.snapshot().get(Stat::FlowNew) - before, CHUNK as u64);
        let before = f.snapshot().get(Stat::FlowStateless);
        let e = one_per_call(&mut f, "lb_xdp", &acks, XDP_TX);
        assert_eq!(f.snapshot().get(Stat::FlowStateless) - before, EST as u64);
        // The first round fills the table; measure once every insert evicts.
        if round >= 1 {
            new_flood.push(c);
            est_flood.push(e);
        }
    }
    let (new_flood, est_flood) = (median(new_flood), median(est_flood));
    println!(
        "SYN flood (65 536-entry table, {} new flows): new flow {new_room:.1} ns with room, {new_flood:.1} ns evicting; established ACK {est_quiet:.1} ns quiet, {est_flood:.1} ns under the flood",
        n
    );
    // The same flood at a service with record_connections = "on_change": nothing inserted.
    let mut g = Fixture::with_flow_table(&on_change(&bench_config()), 65_536);
    one_per_call(&mut g, "lb_xdp", &syns, XDP_TX);
    let (mut oc_new, mut oc_est) = (Vec::new(), Vec::new());
    let mut m = 0u32;
    for _ in 0..ROUNDS {
        let flood = flood_syns(230, &mut m, CHUNK);
        let before = g.snapshot().get(Stat::FlowStateless);
        oc_new.push(one_per_call(&mut g, "lb_xdp", &flood, XDP_TX));
        oc_est.push(one_per_call(&mut g, "lb_xdp", &acks, XDP_TX));
        assert_eq!(
            g.snapshot().get(Stat::FlowStateless) - before,
            (CHUNK + EST) as u64,
            "every SYN and ACK by its slot"
        );
    }
    assert_eq!(g.snapshot().get(Stat::FlowNew), 0);
    assert_eq!(g.dp.flow_count().unwrap(), 0, "nothing in the table");
    let (oc_new, oc_est) = (median(oc_new), median(oc_est));
    println!(
        "SYN flood, record_connections = \"on_change\" ({m} new flows): new flow {oc_new:.1} ns, established ACK {oc_est:.1} ns under the flood; the table stays empty"
    );
    // The same flood at an "at_syn" service with a record limit of 100 000 (as `lb run` sets
    // `dataplane.record_limit`): each second, the first SYNs up to the limit on this CPU are
    // recorded, the rest are forwarded by their slots. The figure is the mean over the whole
    // flood, both kinds.
    const RECORD_LIMIT: u32 = 100_000;
    let mut h = Fixture::with_flow_table(&bench_config(), 65_536);
    h.dp.set_record_limit(RECORD_LIMIT).unwrap();
    one_per_call(&mut h, "lb_xdp", &syns, XDP_TX);
    assert_eq!(
        h.snapshot().get(Stat::FlowNew),
        EST as u64,
        "within the limit"
    );
    let (mut rl_new, mut rl_est) = (Vec::new(), Vec::new());
    let mut l = 0u32;
    let new_before = h.snapshot().get(Stat::FlowNew);
    for _ in 0..ROUNDS {
        let flood = flood_syns(240, &mut l, CHUNK);
        rl_new.push(one_per_call(&mut h, "lb_xdp", &flood, XDP_TX));
        let before = h.snapshot().get(Stat::FlowStateless);
        rl_est.push(one_per_call(&mut h, "lb_xdp", &acks, XDP_TX));
        assert_eq!(
            h.snapshot().get(Stat::FlowStateless) - before,
            EST as u64,
            "every ACK by its slot"
        );
    }
    let snap = h.snapshot();
    let (rl_recorded, rl_limited) = (snap.get(Stat::FlowNew) - new_before, snap.record_limited);
    assert_eq!(
        rl_recorded + rl_limited,
        l as u64,
        "every flood SYN one or the other"
    );
    let (rl_new, rl_est) = (median(rl_new), median(rl_est));
    println!(
        "SYN flood, record_limit = {RECORD_LIMIT} ({l} new flows): {rl_new:.1} ns a flood SYN (median of the rounds' means), {rl_recorded} recorded, {rl_limited} forwarded by their slots unrecorded; established ACK {rl_est:.1} ns under the flood"
    );
    // The same flood with the SYNs handed to the controller (`dataplane.defer_records`, the
    // default of `lb run`), drained every 25 000 SYNs (about what `lb run`'s 10-ms drain sees
    // of this flood on one CPU; untimed there, timed apart as the controller's share).
    const DRAIN_EVERY: usize = 25_000;
    let mut k = Fixture::with_flow_table(&bench_config(), 65_536);
    assert!(k.dp.set_defer_records(true).unwrap(), "LB_RECORD");
    let drain = |k: &mut Fixture| -> (u64, u64) {
        let cpu = thread_cpu_ns();
        let made = drain_records(k);
        (made, thread_cpu_ns() - cpu)
    };
    one_per_call(&mut k, "lb_xdp", &syns, XDP_TX);
    assert_eq!(
        drain(&mut k).0,
        EST as u64,
        "the established flows recorded"
    );
    let (mut df_new, mut df_est) = (Vec::new(), Vec::new());
    let (mut df_made, mut df_cpu) = (0u64, 0u64);
    let mut d = 0u32;
    for _ in 0..ROUNDS {
        let flood = flood_syns(250, &mut d, CHUNK);
        let mut ns = 0.0;
        for chunk in flood.chunks(DRAIN_EVERY) {
            ns += one_per_call(&mut k, "lb_xdp", chunk, XDP_TX) * chunk.len() as f64;
            let (made, cpu) = drain(&mut k);
            df_made += made;
            df_cpu += cpu;
        }
        df_new.push(ns / CHUNK as f64);
        let before = k.snapshot().get(Stat::FlowStateless);
        df_est.push(one_per_call(&mut k, "lb_xdp", &acks, XDP_TX));
        assert_eq!(
            k.snapshot().get(Stat::FlowStateless) - before,
            EST as u64,
            "every ACK by its slot"
        );
    }
    let snap = k.snapshot();
    assert_eq!(
        snap.record_deferred,
        (EST as u64) + d as u64,
        "every SYN handed over"
    );
    assert_eq!(snap.record_ring_full, 0, "none for a full ring");
    assert_eq!(
        df_made, d as u64,
        "every flood SYN recorded by the controller"
    );
    let (df_new, df_est) = (median(df_new), median(df_est));
    let df_cpu = df_cpu as f64 / d as f64;
    println!(
        "SYN flood, defer_records ({d} new flows, drained every {DRAIN_EVERY}): {df_new:.1} ns a flood SYN, the controller {df_cpu:.0} ns of CPU a record (its inserts evict, as the packet path's did); established ACK {df_est:.1} ns under the flood"
    );
    // A flood beyond what the controller drains (none here): once `LB_RECORD` is full, each
    // SYN fails to reserve a record and is recorded on the packet path (evicting), counted in
    // `flow_record_ring_full`. The SYNs that fill the ring first are not timed.
    let full_before = k.snapshot().record_ring_full;
    let mut r = d;
    let flood = flood_syns(251, &mut r, CHUNK);
    let fill = lb_common::limits::RECORD_RING_BYTES as usize / 64; // 64 bytes a record
    one_per_call(&mut k, "lb_xdp", &flood[..fill], XDP_TX);
    let (mut rf_new, mut rf_est) = (Vec::new(), Vec::new());
    for part in flood[fill..].chunks((CHUNK - fill) / 3) {
        rf_new.push(one_per_call(&mut k, "lb_xdp", part, XDP_TX));
        let before = k.snapshot().get(Stat::FlowStateless);
        rf_est.push(one_per_call(&mut k, "lb_xdp", &acks, XDP_TX));
        assert_eq!(
            k.snapshot().get(Stat::FlowStateless) - before,
            EST as u64,
            "every ACK by its slot, the ring full"
        );
    }
    let rf_full = k.snapshot().record_ring_full - full_before;
    assert!(
        rf_full >= (CHUNK - fill) as u64 - 1,
        "the SYNs after the ring filled recorded on the packet path: {rf_full}"
    );
    drain_records(&mut k);
    let (rf_new, rf_est) = (median(rf_new), median(rf_est));
    println!(
        "SYN flood beyond the controller (no drain, LB_RECORD full): {rf_new:.1} ns a flood SYN ({rf_full} recorded on the packet path); established ACK {rf_est:.1} ns"
    );
    serde_json::json!({
        "defer_records_ring_full_new_flow_ns": rf_new,
        "defer_records_ring_full_established_ns": rf_est,
        "defer_records_ring_full_syns": rf_full,
        "defer_records_new_flow_ns": df_new,
        "defer_records_controller_cpu_ns": df_cpu,
        "defer_records_established_under_flood_ns": df_est,
        "defer_records_flood_syns": d,
        "record_limit": RECORD_LIMIT,
        "record_limit_new_flow_ns": rl_new,
        "record_limit_recorded": rl_recorded,
        "record_limit_limited": rl_limited,
        "record_limit_established_under_flood_ns": rl_est,
        "new_flow_with_room_ns": new_room,
        "new_flow_evicting_ns": new_flood,
        "established_quiet_ns": est_quiet,
        "established_under_flood_ns": est_flood,
        "flood_syns": n,
        "on_change_new_flow_ns": oc_new,
        "on_change_established_under_flood_ns": oc_est,
        "on_change_flood_syns": m,
    })
}

/// What flow sharing costs a new flow: interleaved halves of fresh SYNs with reporting off and
/// on (every flow reported: the rate is unlimited, the ring drained between chunks so that no
/// event takes the "ring full" path). Returns (off, on) mean ns per call.
fn flow_sharing_cost(f: &mut Fixture) -> (f64, f64) {
    const CHUNK: usize = 2_000; // 112 KiB of events: fits the 256 KiB ring
    let mut sync = f.dp.take_sync_maps().expect("sync maps");
    let (mut offs, mut ons) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let pkts = new_flow_syns(200 + round as u8, NEW_FLOWS);
        let (a, b) = pkts.split_at(NEW_FLOWS / 2);
        let (mut off, mut on) = (0.0, 0.0);
        for (ca, cb) in a.chunks(CHUNK).zip(b.chunks(CHUNK)) {
            sync.set_rate(0).unwrap();
            off += one_per_call(f, "lb_xdp", ca, XDP_TX) * ca.len() as f64;
            sync.set_rate(u32::MAX).unwrap();
            let before = f.snapshot().get(Stat::FlowSyncReported);
            on += one_per_call(f, "lb_xdp", cb, XDP_TX) * cb.len() as f64;
            sync.set_rate(0).unwrap();
            let mut n = 0;
            while sync.ring.next().is_some() {
                n += 1;
            }
            assert_eq!(n, cb.len(), "every new flow reported");
            assert_eq!(
                f.snapshot().get(Stat::FlowSyncReported) - before,
                cb.len() as u64
            );
        }
        offs.push(off / a.len() as f64);
        ons.push(on / b.len() as f64);
    }
    (median(offs), median(ons))
}

/// New flows per scheduler (rr, wrr, lc/wlc scans of growing services, maglev), one call per
/// packet, on one CPU and with two CPUs inserting at once (each thread pinned to its CPU, half of
/// the packets each; the figure is the mean ns per call over both). Rows are
/// (label, key, ns/packet, baseline ns/packet, packets). A service size the config refuses is
/// reported and skipped.
fn schedulers() -> Vec<(String, String, f64, f64, usize)> {
    const FLOWS: usize = 20_000;
    let mut rows = Vec::new();
    let cases: &[(&str, usize)] = &[
        ("maglev", 10),
        ("rr", 10),
        ("wrr", 10),
        ("wlc", 10),
        ("wlc", 32),
        ("wlc", 100),
        ("wlc", 1000),
    ];
    for (sched, n) in cases {
        let weights: Vec<u16> = (0..*n).map(|i| 100 + (i % 3) as u16 * 100).collect();
        let toml = sched_config(sched, &weights);
        let cfg = lb_userspace::config::Config::parse(&toml, std::path::Path::new("bench.toml"));
        if let Err(e) = cfg {
            println!("{sched} with {n} backends: refused by the config ({e})");
            continue;
        }
        let mut f = Fixture::new(&toml);
        let mut one = Vec::new();
        let mut two = Vec::new();
        let mut base = Vec::new();
        for round in 0..ROUNDS {
            let pkts = new_flow_syns(100 + 2 * round as u8, FLOWS);
            let before = f.snapshot().get(Stat::FlowNew);
            one.push(one_per_call(&mut f, "lb_xdp", &pkts, XDP_TX));
            base.push(one_per_call(&mut f, "lb_baseline_tx", &pkts, XDP_TX));
            let pkts2 = new_flow_syns(101 + 2 * round as u8, FLOWS);
            two.push(two_cpus(&mut f, &pkts2));
            let delta = f.snapshot().get(Stat::FlowNew) - before;
            assert_eq!(
                delta,
                2 * FLOWS as u64,
                "{sched}: every call must be a new flow"
            );
        }
        pin_to_cpu0();
        let b = median(base);
        rows.push((
            format!("new flow, {sched} over {n} backends, 1 CPU"),
            format!("new_flow_{sched}_{n}"),
            median(one),
            b,
            FLOWS,
        ));
        rows.push((
            format!("new flow, {sched} over {n}, 2 CPUs at once"),
            format!("new_flow_{sched}_{n}_2cpu"),
            median(two),
            b,
            FLOWS,
        ));
    }
    rows
}

/// Mean ns per call with the packets split over two threads pinned to CPUs 0 and 1.
fn two_cpus(f: &mut Fixture, pkts: &[Vec<u8>]) -> f64 {
    let prog: &Xdp = f.dp.program();
    let (a, b) = pkts.split_at(pkts.len() / 2);
    let ns: Vec<f64> = std::thread::scope(|s| {
        let h: Vec<_> = [(0usize, a), (1usize, b)]
            .into_iter()
            .map(|(cpu, part)| {
                s.spawn(move || {
                    pin_to_cpu(cpu % cpus());
                    let mut total = 0u128;
                    for p in part {
                        let (v, d) = run(prog, p, 1);
                        assert_eq!(v, XDP_TX, "verdict");
                        total += d.as_nanos();
                    }
                    total as f64 / part.len() as f64
                })
            })
            .collect();
        h.into_iter().map(|h| h.join().unwrap()).collect()
    });
    ns.iter().sum::<f64>() / ns.len() as f64
}

/// `program` run `REPEAT` times on `pkt` (verdict `want`): mean ns per run.
fn repeat_v(f: &mut Fixture, program: &'static str, pkt: &[u8], want: u32) -> f64 {
    let (v, d) = run(prog(f, program), pkt, REPEAT);
    assert_eq!(v, want, "{program}: verdict");
    d.as_nanos() as f64
}

/// `LB_BENCH_ONLY=ab LB_BENCH_OBJECTS=a,b,...`: compiled lb-ebpf objects side by side, each in a
/// fixture of its own, every path measured on every object in each of 30 rounds (back to back,
/// so this VM's drift between runs falls on all alike), then new flows (one call per packet,
/// 10 rounds of 5 000 fresh SYNs); prints each object's median ns and the median of its
/// per-round ratio to the first object.
fn ab_objects() {
    let paths = std::env::var("LB_BENCH_OBJECTS").expect("LB_BENCH_OBJECTS=a,b,...");
    let objects: Vec<(String, Vec<u8>)> = paths
        .split(',')
        .map(|p| {
            (
                p.to_owned(),
                std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}")),
            )
        })
        .collect();
    let mut fixtures: Vec<Fixture> = objects
        .iter()
        .map(|(_, o)| Fixture::from_object(&bench_config(), o))
        .collect();
    // LB_BENCH_RECORD_LIMIT=n: each object's record limit (0, no limit, by default; an object
    // without the limit ignores it).
    if let Some(n) = std::env::var("LB_BENCH_RECORD_LIMIT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        for f in &mut fixtures {
            f.dp.set_record_limit(n).expect("record limit");
        }
    }
    let cases: [(&str, Vec<u8>, u32, Stat); 5] = [
        (
            "established",
            tcp4_flags(C1, 40000, VIP4, 80, "A"),
            XDP_TX,
            Stat::FlowStateless,
        ),
        (
            "non-VIP",
            syn4(C1, 40000, Ipv4Addr::new(10, 99, 0, 1), 22),
            XDP_PASS,
            Stat::PassNoService,
        ),
        (
            "IPv6 established",
            tcp6_flags(C6, 40000, VIP6, 80, "A"),
            XDP_TX,
            Stat::FlowStateless,
        ),
        (
            "table hit (SYN)",
            syn4(C1, 40000, VIP4, 80),
            XDP_TX,
            Stat::FlowHit,
        ),
        (
            "IPv6 table hit (SYN)",
            tcp6(C6, 40000, VIP6, 80).0,
            XDP_TX,
            Stat::FlowHit,
        ),
    ];
    for f in &mut fixtures {
        let (v4, v6) = (f.run(&cases[3].1).0, f.run(&cases[4].1).0);
        // (Objects cut short for an experiment may not forward it: see below.)
        if std::env::var_os("LB_BENCH_AB_UNCHECKED").is_none() {
            assert_eq!(v4, XDP_TX, "the SYN's flow recorded");
            assert_eq!(v6, XDP_TX, "the IPv6 SYN's flow recorded");
        }
    }
    const AB_ROUNDS: usize = 30;
    let mut ns = vec![vec![Vec::new(); cases.len()]; fixtures.len()];
    let mut ratio = vec![vec![Vec::new(); cases.len()]; fixtures.len()];
    for _ in 0..AB_ROUNDS {
        for (c, (name, pkt, want, stat)) in cases.iter().enumerate() {
            let mut first = 0.0;
            for (i, f) in fixtures.iter_mut().enumerate() {
                let before = f.snapshot().get(*stat);
                let (v, d) = run(prog(f, "lb_xdp"), pkt, REPEAT / 4);
                // LB_BENCH_AB_UNCHECKED=1: objects cut short for an experiment (they do not
                // count or decide as lb_xdp does).
                if std::env::var_os("LB_BENCH_AB_UNCHECKED").is_none() {
                    assert_eq!(v, *want, "{name}: verdict");
                    assert_eq!(
                        f.snapshot().get(*stat) - before,
                        (REPEAT / 4) as u64,
                        "{name}: path"
                    );
                }
                let x = d.as_nanos() as f64;
                if i == 0 {
                    first = x;
                }
                ns[i][c].push(x);
                ratio[i][c].push(x / first);
            }
        }
    }
    // New flows, one call per packet (fresh SYNs each round; every object's table sees the
    // same ones).
    let mut new_ns = vec![Vec::new(); fixtures.len()];
    let mut new_ratio = vec![Vec::new(); fixtures.len()];
    let mut floor = Vec::new();
    let new_rounds = if std::env::var_os("LB_BENCH_AB_UNCHECKED").is_some() {
        1
    } else {
        10
    };
    for round in 0..new_rounds {
        let pkts = new_flow_syns(100 + round as u8, 5000);
        floor.push(one_per_call(
            &mut fixtures[0],
            "lb_baseline_pass",
            &pkts,
            XDP_PASS,
        ));
        let mut first = 0.0;
        for (i, f) in fixtures.iter_mut().enumerate() {
            let before = f.snapshot().get(Stat::FlowNew);
            let x = if std::env::var_os("LB_BENCH_AB_UNCHECKED").is_some() {
                0.0
            } else {
                one_per_call(f, "lb_xdp", &pkts, XDP_TX)
            };
            if std::env::var_os("LB_BENCH_AB_UNCHECKED").is_none() {
                assert_eq!(f.snapshot().get(Stat::FlowNew) - before, 5000, "new flows");
            }
            if i == 0 {
                first = x;
            }
            new_ns[i].push(x);
            new_ratio[i].push(x / first);
        }
    }
    for (i, (path, _)) in objects.iter().enumerate() {
        let mut row: Vec<String> = cases
            .iter()
            .enumerate()
            .map(|(c, (name, ..))| {
                format!(
                    "{name} {:.0} ns ({:.3}×; means {:.2} ns, {:.3}×)",
                    median(ns[i][c].clone()),
                    median(ratio[i][c].clone()),
                    ns[i][c].iter().sum::<f64>() / ns[i][c].len() as f64,
                    ratio[i][c].iter().sum::<f64>() / ratio[i][c].len() as f64
                )
            })
            .collect();
        row.push(format!(
            "new flow {:.0} ns ({:.3}×; {:.0} ns above the XDP_PASS floor)",
            median(new_ns[i].clone()),
            median(new_ratio[i].clone()),
            median(new_ns[i].clone()) - median(floor.clone())
        ));
        println!("{path}: {}", row.join("; "));
    }
}

/// Rounds of `a` and `b` in alternation on the same packet (this VM drifts between runs more
/// than some differences measured), and `check` must count every repeat of `a`.
fn paired(
    f: &mut Fixture,
    a: (&'static str, u32, Stat),
    b: (&'static str, u32),
    pkt: &[u8],
) -> Paired {
    let [p] = paired_with(f, a, [b], pkt);
    p
}

/// [`paired`] against several baselines: each round runs `a`, then each baseline; one
/// [`Paired`] per baseline.
fn paired_with<const N: usize>(
    f: &mut Fixture,
    (a, want_a, check): (&'static str, u32, Stat),
    baselines: [(&'static str, u32); N],
    pkt: &[u8],
) -> [Paired; N] {
    let mut xs = Vec::new();
    let mut ys: [Vec<f64>; N] = std::array::from_fn(|_| Vec::new());
    for _ in 0..2 * ROUNDS {
        let before = f.snapshot().get(check);
        let x = repeat_v(f, a, pkt, want_a);
        assert_eq!(
            f.snapshot().get(check) - before,
            REPEAT as u64,
            "{a}: every repeat took the path counted by {}",
            check.name()
        );
        xs.push(x);
        for ((b, want_b), y) in baselines.iter().zip(&mut ys) {
            y.push(repeat_v(f, b, pkt, *want_b));
        }
    }
    std::array::from_fn(|i| {
        let rs: Vec<f64> = xs.iter().zip(&ys[i]).map(|(x, y)| x / y).collect();
        Paired {
            a: median(xs.clone()),
            b: median(ys[i].clone()),
            ratio: median(rs.clone()),
            mean_ratio: xs.iter().sum::<f64>() / ys[i].iter().sum::<f64>(),
            lo: rs.iter().copied().fold(f64::INFINITY, f64::min),
            hi: rs.iter().copied().fold(0.0, f64::max),
        }
    })
}

/// [`paired`]'s figures: the medians of `a` and `b` (ns), the median of the per-round a/b and
/// its range over the rounds (this VM's fast and slow moments), and the ratio of the means over
/// the rounds. The kernel reports whole ns a run: at a floor of 5–6 ns the median ratio moves
/// in steps of 15–20 %, the ratio of the means (the rounds' jitter across whole ns) less so.
struct Paired {
    a: f64,
    b: f64,
    ratio: f64,
    mean_ratio: f64,
    lo: f64,
    hi: f64,
}

/// Issue #13's figures, each beside its target, computed in this run.
fn targets(f: &mut Fixture, est: &[u8], non_vip: &[u8]) -> serde_json::Value {
    let mut out = Vec::new();
    let mut target = |name: &str, measured: f64, limit: f64, unit: &str, what: String| {
        let met = measured <= limit;
        println!(
            "target {name:<34} {measured:>9.2} {unit:<10} (≤ {limit} {unit}) {}  {what}",
            if met { "met" } else { "NOT MET" }
        );
        out.push(serde_json::json!({
            "target": name, "measured": measured, "limit": limit, "unit": unit, "met": met, "what": what,
        }));
    };
    println!("issue #13 targets (interleaved rounds, medians):");
    // `est`: an ACK of an established flow through an unchanged slot (the stateless path).
    // Against the issue's trivial forwarder (MAC swap, XDP_TX); the program that returns
    // XDP_TX without touching the frame is measured in the same rounds and reported beside it.
    let [e, noop] = paired_with(
        f,
        ("lb_xdp", XDP_TX, Stat::FlowStateless),
        [("lb_baseline_swap", XDP_TX), ("lb_baseline_tx", XDP_TX)],
        est,
    );
    target(
        "established_vs_trivial_tx",
        e.ratio,
        2.5,
        "×",
        format!(
            "established flow (TCP ACK, unchanged slot) {:.1} ns, trivial MAC-swap XDP_TX {:.1} ns (repeat mode; rounds {:.2}–{:.2}×, ratio of the means {:.2}×); no-op XDP_TX {:.1} ns: {:.2}× (rounds {:.2}–{:.2}×)",
            e.a, e.b, e.lo, e.hi, e.mean_ratio, noop.b, noop.ratio, noop.lo, noop.hi
        ),
    );
    let p = paired(
        f,
        ("lb_xdp", XDP_PASS, Stat::PassNoService),
        ("lb_baseline_pass", XDP_PASS),
        non_vip,
    );
    target(
        "non_vip_vs_trivial_pass",
        p.ratio,
        1.5,
        "×",
        format!(
            "non-VIP {:.1} ns, trivial XDP_PASS {:.1} ns (an all-ports service configured; rounds {:.2}–{:.2}×, ratio of the means {:.2}×)",
            p.a, p.b, p.lo, p.hi, p.mean_ratio
        ),
    );
    // New flows, one call per packet, against the XDP_PASS floor measured on the same packets.
    // Beside it, the same packets through the insert alone (`lb_baseline_insert`: the 5-tuple
    // into a connection table of its own, of the same size, nothing else): the kernel's part.
    // (An object built before session 11 has no such program: LB_BENCH_OBJECT A/B runs.)
    let mut ins = Fixture::new(&bench_config());
    let has_insert = ins.dp.other_program("lb_baseline_insert").is_ok();
    let mut above = Vec::new();
    let mut direct_above = Vec::new();
    let mut insert_above = Vec::new();
    let mut drain_ns = Vec::new();
    let mut drain_cpu_ns = Vec::new();
    for round in 0..ROUNDS {
        // `lb run`'s default (`dataplane.defer_records`): the SYN handed to the controller
        // through LB_RECORD (every one asserted: counted as new, handed over, none recorded
        // here for a full ring), which records it after the timed calls, as `lb run` does
        // within 10 ms on its own CPU; that drain is timed too (the controller's share).
        let handed = f.dp.set_defer_records(true).expect("LB_RECORD_RATE");
        let pkts = new_flow_syns(150 + round as u8, NEW_FLOWS);
        let (before, deferred, full) = {
            let s = f.snapshot();
            (s.get(Stat::FlowNew), s.record_deferred, s.record_ring_full)
        };
        let lb = one_per_call(f, "lb_xdp", &pkts, XDP_TX);
        let s = f.snapshot();
        assert_eq!(s.get(Stat::FlowNew) - before, NEW_FLOWS as u64);
        if handed {
            assert_eq!(
                s.record_deferred - deferred,
                NEW_FLOWS as u64,
                "all handed over"
            );
            assert_eq!(s.record_ring_full, full, "none for a full ring");
            let (wall, cpu) = (std::time::Instant::now(), thread_cpu_ns());
            let made = drain_records(f);
            assert_eq!(made, NEW_FLOWS as u64, "the controller recorded each");
            drain_ns.push(wall.elapsed().as_nanos() as f64 / NEW_FLOWS as f64);
            drain_cpu_ns.push((thread_cpu_ns() - cpu) as f64 / NEW_FLOWS as f64);
        }
        let floor = one_per_call(f, "lb_baseline_pass", &pkts, XDP_PASS);
        above.push(lb - floor);
        // Recorded on the packet path (`defer_records = false`), on other new flows; beside it
        // the same packets through the insert alone (`lb_baseline_insert`: the 5-tuple into a
        // connection table of its own, of the same size, nothing else): the kernel's part.
        f.dp.set_defer_records(false).expect("LB_RECORD_RATE");
        let pkts = new_flow_syns(170 + round as u8, NEW_FLOWS);
        let before = f.snapshot().get(Stat::FlowNew);
        let direct = one_per_call(f, "lb_xdp", &pkts, XDP_TX);
        assert_eq!(f.snapshot().get(Stat::FlowNew) - before, NEW_FLOWS as u64);
        // XDP_TX for every packet: each made a new entry.
        let insert =
            has_insert.then(|| one_per_call(&mut ins, "lb_baseline_insert", &pkts, XDP_TX));
        let floor = one_per_call(f, "lb_baseline_pass", &pkts, XDP_PASS);
        direct_above.push(direct - floor);
        insert_above.extend(insert.map(|i| i - floor));
    }
    let insert_above = if has_insert {
        median(insert_above)
    } else {
        f64::NAN
    };
    let direct_above = median(direct_above);
    let (drain, drain_cpu) = if drain_ns.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        (median(drain_ns), median(drain_cpu_ns))
    };
    println!(
        "new flow recorded on the packet path (defer_records = false): {direct_above:.0} ns above the XDP_PASS floor; the connection table's insert alone (lb_baseline_insert) {insert_above:.0} ns"
    );
    println!(
        "new flow recorded by the controller from LB_RECORD: {drain:.0} ns a connection ({drain_cpu:.0} ns of CPU), on the controller's CPU, off the packet path"
    );
    target(
        "new_flow_above_pass_floor",
        median(above),
        200.0,
        "ns",
        format!(
            "a new 5-tuple per call, minus XDP_PASS per call; the SYN handed to the controller through LB_RECORD (dataplane.defer_records, the default), which records it off the packet path in {drain:.0} ns a connection ({drain_cpu:.0} ns of CPU); recorded on the packet path instead (defer_records = false) {direct_above:.0} ns, of which the kernel's LRU insert alone (lb_baseline_insert, same packets, a table of the same size) {insert_above:.0} ns"
        ),
    );
    // The same with the service recording connections only on change: a SYN through an
    // unchanged slot is forwarded by the slot, not inserted (flow_stateless, asserted).
    let mut oc = Fixture::new(&on_change(&bench_config()));
    let mut above = Vec::new();
    for round in 0..ROUNDS {
        let pkts = new_flow_syns(160 + round as u8, NEW_FLOWS);
        let before = oc.snapshot().get(Stat::FlowStateless);
        let lb = one_per_call(&mut oc, "lb_xdp", &pkts, XDP_TX);
        assert_eq!(
            oc.snapshot().get(Stat::FlowStateless) - before,
            NEW_FLOWS as u64,
            "every SYN by its unchanged slot"
        );
        let floor = one_per_call(&mut oc, "lb_baseline_pass", &pkts, XDP_PASS);
        above.push(lb - floor);
    }
    assert_eq!(oc.snapshot().get(Stat::FlowNew), 0, "nothing inserted");
    target(
        "new_flow_on_change_above_pass_floor",
        median(above),
        200.0,
        "ns",
        "the same with record_connections = \"on_change\" (no table insert through an unchanged slot), minus XDP_PASS per call".into(),
    );

    // 1M live flows, random lookups, against the same path with one hot flow.
    const FLOWS: u32 = 1_000_000;
    const SAMPLE: usize = 100_000;
    // LB_BENCH_RING: another dataplane.ring_size for this part (the Maglev tables' size).
    let ring_cfg = match std::env::var("LB_BENCH_RING") {
        Ok(r) => CONFIG.replacen(
            "[dataplane]\n",
            &format!("[dataplane]\nring_size = {r}\n"),
            1,
        ),
        Err(_) => CONFIG.to_owned(),
    };
    let mut g = Fixture::with_flow_table(&ring_cfg, 1 << 20);
    let (coarse, _) = lb_userspace::trace::clocks();
    let key_of = |i: u32| {
        key4(
            Ipv4Addr::new(10, 200 + (i >> 16) as u8, (i >> 8) as u8, i as u8),
            1024 + (i % 60000) as u16,
            VIP4,
            80,
            6,
        )
    };
    // The 1M flows written into a fixture's table, each with the backend web4 gives it.
    let fill_flows = |f: &mut Fixture| {
        for i in 0..FLOWS {
            let k = key_of(i);
            let b = f.predict(&k, "web4");
            let v = lb_common::FlowValue {
                backend: b,
                generation: f.backend(b).generation,
                last_seen_ns: coarse,
                flags: 0,
                cpu: 0,
            };
            f.dp.set_flow(&k, &v).expect("insert flow");
        }
    };
    let t0 = std::time::Instant::now();
    fill_flows(&mut g);
    let fill = t0.elapsed();
    // The controller's sweep over the 1M entries (idle expiry, slot marks, and the active
    // connections reconciled with the table), as `lb run` does every 1-10 s: nothing expires.
    let sweep = {
        let t = lb_userspace::config::Timeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 300,
        };
        let changed = std::collections::BTreeMap::new();
        let desired = g.desired.clone();
        let view = lb_userspace::desired::TableView::new(&desired, &changed);
        let c0 = control::cpu_time();
        let t0 = std::time::Instant::now();
        let s = g.dp.sweep(coarse, &t, &view).expect("sweep");
        let (wall, c1) = (t0.elapsed(), control::cpu_time());
        assert_eq!((s.entries, s.expired), (FLOWS as u64, 0), "{s:?}");
        let cpu = (c1.0 - c0.0) + (c1.1 - c0.1);
        println!(
            "sweep of {FLOWS} entries: {wall:.2?} ({cpu:.2?} of CPU: {:.2} µs an entry)",
            cpu.as_secs_f64() * 1e6 / FLOWS as f64
        );
        // The same walk in the steps `lb run` takes (its loop handles what arrived between
        // them): the longest step is the longest the loop waits.
        // Steps sized as `lb run` sizes them: the first of `SWEEP_STEP_ENTRIES`, then by
        // how long the last one took (`next_step_budget`).
        let first = lb_userspace::controller::SWEEP_STEP_ENTRIES;
        let mut budget = first;
        let (mut smallest, mut largest) = (budget, budget);
        let t0 = std::time::Instant::now();
        let mut walk = g.dp.sweep_begin(coarse, &view).expect("sweep");
        let mut longest = t0.elapsed();
        loop {
            let ts = std::time::Instant::now();
            let done = g.dp.sweep_step(&mut walk, &t, &view, budget).expect("step");
            let took = ts.elapsed();
            longest = longest.max(took);
            if done {
                break;
            }
            budget = lb_userspace::controller::next_step_budget(budget, took);
            smallest = smallest.min(budget);
            largest = largest.max(budget);
        }
        let steps = walk.steps();
        let ts = std::time::Instant::now();
        let s = g.dp.sweep_finish(walk, &view).expect("sweep");
        longest = longest.max(ts.elapsed());
        let stepped = t0.elapsed();
        assert_eq!((s.entries, s.expired), (FLOWS as u64, 0), "{s:?}");
        println!(
            "the same in {steps} steps ({first} entries first, then {smallest}..{largest} sized to about 5 ms): {stepped:.2?}, the longest {longest:.2?} (the controller's loop waits at most that long)"
        );
        serde_json::json!({
            "entries": FLOWS,
            "wall_s": wall.as_secs_f64(),
            "cpu_s": cpu.as_secs_f64(),
            "in_steps": {
                "step_entries": first,
                "step_entries_min": smallest,
                "step_entries_max": largest,
                "steps": steps,
                "wall_s": stepped.as_secs_f64(),
                "longest_step_ms": longest.as_secs_f64() * 1e3,
            },
        })
    };
    let ack = |i: u32| {
        let k = key_of(i);
        tcp4_flags(
            Ipv4Addr::from(<[u8; 4]>::try_from(&k.src_addr[..4]).unwrap()),
            u16::from_be_bytes(k.src_port),
            VIP4,
            80,
            "A",
        )
    };
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<Vec<u8>> = (0..SAMPLE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ack((x % FLOWS as u64) as u32)
        })
        .collect();
    let hot: Vec<Vec<u8>> = (0..SAMPLE).map(|_| ack(7)).collect();
    // Stateless (every slot unchanged), then with every slot marked changed: the table path
    // (what a service pays right after its backends changed, or lc/wlc always).
    // Interleaved rounds; the ratio is the median of the per-round ratios (this VM drifts).
    let measure = |g: &mut Fixture, stat: Stat| {
        let (mut many, mut one, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..2 * ROUNDS {
            let before = g.snapshot().get(stat);
            let m = one_per_call(g, "lb_xdp", &random, XDP_TX);
            let h = one_per_call(g, "lb_xdp", &hot, XDP_TX);
            assert_eq!(
                g.snapshot().get(stat) - before,
                2 * SAMPLE as u64,
                "every call an established flow ({})",
                stat.name()
            );
            let floor = one_per_call(g, "lb_baseline_pass", &hot, XDP_PASS);
            many.push(m - floor);
            one.push(h - floor);
            ratios.push((m - floor) / (h - floor));
        }
        (median(many), median(one), median(ratios))
    };
    let (m, o, ratio) = measure(&mut g, Stat::FlowStateless);
    let web4 = g.service("web4");
    let marked: Vec<u32> = web4
        .ring
        .iter()
        .map(|b| b | lb_common::RING_DIRTY)
        .collect();
    g.dp.set_ring(web4.value.ring_base, &marked)
        .expect("mark every slot");
    let (tm, to, _) = measure(&mut g, Stat::FlowHit);
    println!(
        "established with every slot changed (connection table consulted): {tm:.1} ns above the floor with 1M flows, {to:.1} ns with one ({:.2}×)",
        tm / to
    );
    target(
        "established_1m_flows_vs_one_flow",
        ratio,
        1.5,
        "×",
        format!(
            "{m:.1} ns above the floor with 1M flows (random), {o:.1} ns with one (TCP ACKs, unchanged slots: stateless); with every slot changed {tm:.1} vs {to:.1} ns; table filled in {fill:.1?}"
        ),
    );
    // Cost against the number of live flows packets go to (random over the first n of the 1M
    // in the table), table path (every slot marked changed) and stateless (none marked).
    let floor = median(
        (0..ROUNDS)
            .map(|_| one_per_call(&mut g, "lb_baseline_pass", &hot, XDP_PASS))
            .collect(),
    );
    let mut curve = Vec::new();
    for n in [1u32, 1_000, 10_000, 100_000, 1_000_000] {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let pkts: Vec<Vec<u8>> = (0..SAMPLE / 2)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ack((x % n as u64) as u32)
            })
            .collect();
        let mut row = serde_json::json!({ "flows": n });
        for (ring, stat, name) in [
            (&marked, Stat::FlowHit, "table_ns"),
            (&web4.ring, Stat::FlowStateless, "stateless_ns"),
        ] {
            g.dp.set_ring(web4.value.ring_base, ring).expect("ring");
            let mut v = Vec::new();
            for _ in 0..3 {
                let before = g.snapshot().get(stat);
                v.push(one_per_call(&mut g, "lb_xdp", &pkts, XDP_TX) - floor);
                assert_eq!(g.snapshot().get(stat) - before, pkts.len() as u64);
            }
            row[name] = serde_json::json!(median(v));
        }
        println!(
            "established over {n:>7} live flows: {:.1} ns through the table, {:.1} ns stateless (above the floor)",
            row["table_ns"].as_f64().unwrap_or(0.0),
            row["stateless_ns"].as_f64().unwrap_or(0.0)
        );
        curve.push(row);
    }
    // The same on another config: its web4 table filled with the same 1M flows, then measured.
    let variant = |cfg: &str| {
        let mut h = Fixture::with_flow_table(cfg, 1 << 20);
        fill_flows(&mut h);
        let id = h.service("web4").value.id;
        let bits = h.dp.packed_bits(id);
        let r = measure(&mut h, Stat::FlowStateless);
        (r, bits)
    };
    // Smaller Maglev tables (dataplane.ring_size = 4099: 16 KiB per service in LB_RING).
    let small = CONFIG.replacen("[dataplane]\n", "[dataplane]\nring_size = 4099\n", 1);
    let ((sm, so, sratio), _) = variant(&small);
    target(
        "established_1m_flows_vs_one_flow_ring_4099",
        sratio,
        1.5,
        "×",
        format!(
            "the same with dataplane.ring_size = 4099 (Maglev tables of 16 KiB): {sm:.1} vs {so:.1} ns above the floor"
        ),
    );
    // The default tables with more backends: the packed copy's fields widen (2 backends: 2
    // bits a slot, 16 KiB; up to 15: 4 bits, 32 KiB; up to 255: 8 bits, 64 KiB).
    let mut by_backends = Vec::new();
    for n in [2u32, 10, 100] {
        let ((bm, bo, bratio), bits) = if n == 2 {
            ((m, o, ratio), g.dp.packed_bits(web4.value.id))
        } else {
            variant(&with_backends(n))
        };
        println!(
            "1M flows, web4 with {n} backends ({bits}-bit packed slots, {} KiB): {bm:.1} vs {bo:.1} ns above the floor ({bratio:.2}×)",
            65537 * bits as u64 / 8 / 1024
        );
        by_backends.push(serde_json::json!({
            "backends": n, "packed_bits": bits, "many_ns": bm, "one_ns": bo, "ratio": bratio,
        }));
    }
    let memlock = flows_memlock();
    if let Some(bytes) = memlock {
        println!(
            "memory: LB_FLOWS of {} entries: {bytes} bytes locked = {:.0} bytes per flow",
            1 << 20,
            bytes as f64 / (1 << 20) as f64
        );
    }

    // Control plane: one Maglev table of 65 537 slots for 1 000 backends, after the machine is
    // quiet (the kernel frees the 1M-entry tables of the part above in the background, as
    // before the health figures).
    drop(g);
    control::quiesce();
    let (builds, lo, hi) = maglev_builds();
    target(
        "maglev_build_1000_backends",
        builds,
        1.0,
        "ms",
        format!(
            "M = 65 537 (release build), median of {MAGLEV_ROUNDS} builds (range {lo:.2}–{hi:.2} ms) once the machine is quiet, after {} not timed",
            MAGLEV_ROUNDS / 3
        ),
    );
    serde_json::json!({
        "targets": out,
        "cost_vs_flows": curve,
        "established_1m_flows_by_backends": by_backends,
        "flows_memlock_bytes": memlock,
        "new_flow_insert_alone_above_floor_ns": insert_above,
        "new_flow_recorded_in_packet_path_above_floor_ns": direct_above,
        "new_flow_controller_record_ns": drain,
        "new_flow_controller_record_cpu_ns": drain_cpu,
        "flow_table_entries": 1 << 20,
        "sweep_1m_flows": sweep,
    })
}

/// The bench config with `n` backends in web4 (the first service) instead of two.
fn with_backends(n: u32) -> String {
    let two = "[[service.backend]]\naddress = \"10.99.0.21\"\nmac = \"02:00:00:00:00:21\"\n[[service.backend]]\naddress = \"10.99.0.22\"\nmac = \"02:00:00:00:00:22\"\n";
    assert!(CONFIG.contains(two), "web4's two backends");
    let many: String = (0..n)
        .map(|i| {
            format!(
                "[[service.backend]]\naddress = \"10.99.{}.{}\"\nmac = \"02:00:00:01:{:02x}:{:02x}\"\n",
                1 + i / 200,
                10 + i % 200,
                i >> 8,
                i & 0xff
            )
        })
        .collect();
    CONFIG.replacen(two, &many, 1)
}

/// The median, least and greatest time of [`MAGLEV_ROUNDS`] builds of one Maglev table of
/// 65 537 slots for 1 000 backends, in ms, after a few builds not timed (the first ones after
/// a wait pay for a CPU coming back from idle and for fresh pages).
fn maglev_builds() -> (f64, f64, f64) {
    let names: Vec<String> = (0..1000)
        .map(|i| format!("10.1.{}.{}", i / 250, i % 250))
        .collect();
    let entries: Vec<lb_userspace::maglev::Entry<'_>> = names
        .iter()
        .map(|n| lb_userspace::maglev::Entry {
            id: n.as_bytes(),
            weight: 100,
        })
        .collect();
    for _ in 0..MAGLEV_ROUNDS / 3 {
        std::hint::black_box(lb_userspace::maglev::build(&entries, 65537));
    }
    let mut builds = Vec::new();
    for _ in 0..MAGLEV_ROUNDS {
        let t = std::time::Instant::now();
        let table = lb_userspace::maglev::build(&entries, 65537);
        builds.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(table.len(), 65537);
    }
    let (lo, hi) = builds
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &b| (lo.min(b), hi.max(b)));
    (median(builds), lo, hi)
}

/// Bytes the kernel accounts for the largest `LB_FLOWS` map loaded (bpftool).
fn flows_memlock() -> Option<u64> {
    control::maps_memlock()
        .into_iter()
        .filter(|(name, _, _)| name == "LB_FLOWS")
        .map(|(_, _, bytes)| bytes)
        .max()
}

/// The plots of BENCHMARKS.md from the results: ns/packet per path (bars, with the baselines)
/// and established cost against the number of live flows (lines, log x). Plain SVG text.
fn plots(doc: &serde_json::Value, dir: &std::path::Path) {
    let case = |k: &str| {
        doc["cases"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["case"] == k))
            .and_then(|c| c["ns_per_packet"].as_f64())
            .unwrap_or(0.0)
    };
    let bars = [
        ("trivial XDP_TX", case("baseline_tx")),
        ("trivial MAC-swap XDP_TX", case("baseline_swap")),
        ("established, stateless", case("established_v4_stateless")),
        ("established, table hit", case("established_v4")),
        ("established IPv6", case("established_v6")),
        ("non-VIP (XDP_PASS)", case("non_vip_pass")),
        ("per-call floor", case("baseline_tx_single")),
        ("new flow (1 call)", case("new_flow_v4")),
    ];
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max);
    // Room for every bar (34 px of title, 36 a bar, a margin).
    let height = 34 + 36 * bars.len() + 8;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"720\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"10\" y=\"18\" font-size=\"14\">lb_xdp ns per packet (BPF_PROG_TEST_RUN, median of rounds)</text>\n",
    );
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = 34.0 + i as f64 * 36.0;
        let w = 460.0 * v / max;
        svg += &format!(
            "<text x=\"10\" y=\"{:.0}\">{label}</text><rect x=\"190\" y=\"{:.0}\" width=\"{w:.1}\" height=\"22\" fill=\"#4a7bd0\"/><text x=\"{:.0}\" y=\"{:.0}\">{v:.1} ns</text>\n",
            y + 15.0,
            y,
            196.0 + w,
            y + 15.0
        );
    }
    svg += "</svg>\n";
    let _ = std::fs::write(dir.join("paths.svg"), svg);

    let curve = doc["targets"]["cost_vs_flows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let pts = |k: &str| -> Vec<(f64, f64)> {
        curve
            .iter()
            .filter_map(|r| Some((r["flows"].as_f64()?.max(1.0).log10(), r[k].as_f64()?)))
            .collect()
    };
    let (table, stateless) = (pts("table_ns"), pts("stateless_ns"));
    let ymax = table
        .iter()
        .chain(&stateless)
        .map(|p| p.1)
        .fold(1.0, f64::max)
        * 1.1;
    let (x0, y0, w, h) = (60.0, 250.0, 600.0, 200.0);
    let sx = |x: f64| x0 + w * x / 6.0;
    let sy = |y: f64| y0 - h * y / ymax;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"720\" height=\"300\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"10\" y=\"18\" font-size=\"14\">established packet, ns above the XDP_PASS floor, against live flows (random)</text>\n<line x1=\"{x0}\" y1=\"{y0}\" x2=\"{}\" y2=\"{y0}\" stroke=\"black\"/><line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x0}\" y2=\"{}\" stroke=\"black\"/>\n",
        x0 + w,
        y0 - h
    );
    for e in 0..=6 {
        svg += &format!(
            "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"middle\">1e{e}</text>\n",
            sx(e as f64),
            y0 + 16.0
        );
    }
    for k in 0..=4 {
        let v = ymax * k as f64 / 4.0;
        svg += &format!(
            "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">{v:.0}</text>\n",
            x0 - 6.0,
            sy(v) + 4.0
        );
    }
    for (pts, color, name, ly) in [
        (
            &table,
            "#d04a4a",
            "connection table consulted (slot changed)",
            40.0,
        ),
        (&stateless, "#4a7bd0", "stateless (slot unchanged)", 58.0),
    ] {
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/><text x=\"{:.0}\" y=\"{ly}\" fill=\"{color}\">{name}</text>\n",
            path.join(" "),
            x0 + 20.0
        );
    }
    svg += "</svg>\n";
    let _ = std::fs::write(dir.join("flows.svg"), svg);
}

/// Live frames (issue #13, throughput): a generator program run through BPF_PROG_TEST_RUN
/// with `BPF_F_TEST_XDP_LIVE_FRAMES` sends real frames out of veth `va` (namespace A); the
/// forwarder under test runs in native mode on its peer `vb` (namespace B) and sends them back
/// with XDP_TX; a sink program on `va` counts them per destination MAC and drops them.
/// Generator, forwarder and sink share one CPU (the thread is pinned; veth runs the peer's NAPI
/// on the sending CPU). Forwarders: `lb_xdp` (this object, the tests' services) and the trivial
/// MAC-swap XDP_TX program (`lb_baseline_swap`, the issue's trivial forwarder), in alternation, with 1 flow and with 100 000 flows, UDP and
/// TCP ACKs (established), both through unchanged slots (the stateless path). The
/// sink's per-MAC counts are checked against lb_xdp's per-backend counters.
fn live_frames() -> Option<serde_json::Value> {
    use aya::programs::{TestRunAttrs, XdpMode};
    const FRAMES: u32 = 2_000_000;
    const LIVE_ROUNDS: usize = 7;
    let tag = format!("lbbench{}", std::process::id() % 100_000);
    let (na, nb) = (format!("{tag}a"), format!("{tag}b"));
    let _guard = Netns(vec![na.clone(), nb.clone()]);
    let ip = control::ip;
    ip(&["netns", "add", &na]);
    ip(&["netns", "add", &nb]);
    for n in [&na, &nb] {
        // No IPv6 neighbour discovery or MLD frames among the measured ones.
        ip(&[
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
        ]);
        ip(&[
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]);
    }
    ip(&[
        "link", "add", "va", "netns", &na, "type", "veth", "peer", "name", "vb", "netns", &nb,
    ]);
    let mac = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
    ip(&[
        "-n",
        &na,
        "link",
        "set",
        "va",
        "address",
        &mac(CLIENT_MAC),
        "up",
    ]);
    ip(&[
        "-n",
        &nb,
        "link",
        "set",
        "vb",
        "address",
        &mac(LB_MAC),
        "up",
    ]);
    let orig = std::fs::File::open("/proc/self/ns/net").expect("own netns");
    let enter = |ns: &str| {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns");
        // SAFETY: setns(2) on a namespace fd we hold; affects only this thread.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {ns}");
    };
    let leave = || {
        // SAFETY: as above, back to the namespace we started in.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&orig), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns back");
    };
    pin_to_cpu0();
    // The default connection table (1 048 576 entries): 100 000 flows fit.
    let mut f = Fixture::with_flow_table(CONFIG, 1 << 20);
    enter(&na);
    // SAFETY: a NUL-terminated constant name.
    let va = unsafe { libc::if_nametoindex(c"va".as_ptr()) };
    let sink_link =
        f.dp.other_program("lb_bench_sink")
            .expect("sink")
            .attach("va", XdpMode::Driver)
            .expect("attach the sink to va (native)");
    leave();
    let mut results = Vec::new();
    for (proto, flows) in [
        ("udp", 1u32),
        ("udp", 100_000),
        ("tcp", 1),
        ("tcp", 100_000),
    ] {
        // LB_BENCH_LIVE=udp:1 (protocol:flows): one case alone (profiling).
        if let Ok(only) = std::env::var("LB_BENCH_LIVE")
            && only != format!("{proto}:{flows}")
        {
            continue;
        }
        let (frame, dport) = if proto == "udp" {
            (udp4(C1, 40000, VIP4, 53).0, 53)
        } else {
            (tcp4_flags(C1, 40000, VIP4, 80, "A"), 80)
        };
        let _ = dport;
        let (mut lb_pps, mut triv_pps) = (Vec::new(), Vec::new());
        // Rounds of both forwarders back to back, in alternating order (this VM switches
        // speed from one second to the next): the ratio is the median of the rounds' ratios.
        for round in 0..LIVE_ROUNDS {
            let order = if round % 2 == 0 {
                ["lb_xdp", "lb_baseline_swap"]
            } else {
                ["lb_baseline_swap", "lb_xdp"]
            };
            for forwarder in order {
                enter(&nb);
                let link = if forwarder == "lb_xdp" {
                    f.dp.program().attach("vb", XdpMode::Driver)
                } else {
                    f.dp.other_program(forwarder)
                        .expect("program")
                        .attach("vb", XdpMode::Driver)
                }
                .expect("attach the forwarder to vb (native)");
                leave();
                let setup = BenchGenSetup {
                    dst_mac: LB_MAC,
                    src_mac: CLIENT_MAC,
                    flows,
                };
                setup.write(&mut f);
                let sink0 = sink_counts(&mut f);
                let be0 = f.snapshot().backends.clone();
                enter(&na);
                let mut ctx = [0u32; 6];
                ctx[1] = frame.len() as u32; // data_end
                ctx[3] = va; // ingress_ifindex
                let ctx_bytes: Vec<u8> = ctx.iter().flat_map(|w| w.to_ne_bytes()).collect();
                let prog = f.dp.other_program("lb_bench_gen").expect("generator");
                let t0 = std::time::Instant::now();
                let r = prog.test_run(aya::programs::TestRunOptions {
                    data_in: Some(&frame),
                    ctx_in: Some(&ctx_bytes),
                    repeat: FRAMES,
                    attrs: TestRunAttrs::new().xdp_live_frames(64),
                    ..aya::programs::TestRunOptions::new()
                });
                let elapsed = t0.elapsed().as_secs_f64();
                leave();
                if let Err(e) = r {
                    println!("live frames: BPF_PROG_TEST_RUN with live frames failed: {e}");
                    return None;
                }
                // Let the last batch drain through the veth pair.
                std::thread::sleep(std::time::Duration::from_millis(50));
                let sink1 = sink_counts(&mut f);
                let got: u64 = (0..256).map(|i| sink1[i] - sink0[i]).sum();
                let pps = got as f64 / elapsed;
                if forwarder == "lb_xdp" {
                    // The sink's count per backend MAC equals lb_xdp's per-backend counter.
                    // (Backends of different services may share a MAC: summed by MAC.)
                    let be1 = f.snapshot().backends.clone();
                    let mut by_mac: std::collections::BTreeMap<usize, u64> = Default::default();
                    for (id, c) in &be1 {
                        let before = be0.get(id).map_or(0, |c| c.packets);
                        *by_mac.entry(f.backend_mac(*id)[5] as usize).or_default() +=
                            c.packets - before;
                    }
                    for (last, n) in &by_mac {
                        assert_eq!(
                            sink1[*last] - sink0[*last],
                            *n,
                            "MAC ..:{last:02x}: sink count vs lb_xdp's backend counters"
                        );
                    }
                    assert_eq!(
                        by_mac.values().sum::<u64>(),
                        FRAMES as u64,
                        "every frame to a backend"
                    );
                    lb_pps.push(pps);
                } else {
                    triv_pps.push(pps);
                }
                enter(&nb);
                let detached = if forwarder == "lb_xdp" {
                    f.dp.program().detach(link)
                } else {
                    f.dp.other_program(forwarder).expect("program").detach(link)
                };
                leave();
                detached.expect("detach");
            }
        }
        let ratios: Vec<f64> = lb_pps.iter().zip(&triv_pps).map(|(l, t)| l / t).collect();
        let (ratio, lo, hi) = (
            median(ratios.clone()),
            ratios.iter().copied().fold(f64::MAX, f64::min),
            ratios.iter().copied().fold(0.0, f64::max),
        );
        let (l, t) = (median(lb_pps), median(triv_pps));
        println!(
            "live frames {proto} {flows:>6} flows: lb_xdp {:.2} Mpps, trivial MAC-swap XDP_TX {:.2} Mpps: {ratio:.2}× (rounds {lo:.2}–{hi:.2}×)",
            l / 1e6,
            t / 1e6,
        );
        results.push(serde_json::json!({
            "protocol": proto, "flows": flows, "lb_pps": l, "trivial_pps": t, "ratio": ratio,
            "round_ratios": ratios,
        }));
    }
    enter(&na);
    let _ =
        f.dp.other_program("lb_bench_sink")
            .expect("sink")
            .detach(sink_link);
    leave();
    Some(serde_json::json!(results))
}

/// The generator's settings.
struct BenchGenSetup {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    flows: u32,
}

impl BenchGenSetup {
    fn write(&self, f: &mut Fixture) {
        let map = f.dp.map_mut("LB_BENCH_GEN").expect("LB_BENCH_GEN");
        let mut a: aya::maps::Array<&mut aya::maps::MapData, lb_common::BenchGen> =
            aya::maps::Array::try_from(map).expect("array");
        a.set(
            0,
            lb_common::BenchGen {
                dst_mac: self.dst_mac,
                src_mac: self.src_mac,
                flows: self.flows,
            },
            0,
        )
        .expect("set");
    }
}

/// The sink's counts per last MAC byte, summed over CPUs.
fn sink_counts(f: &mut Fixture) -> Vec<u64> {
    let map = f.dp.map_mut("LB_BENCH_SINK").expect("LB_BENCH_SINK");
    let a: aya::maps::PerCpuArray<&mut aya::maps::MapData, u64> =
        aya::maps::PerCpuArray::try_from(map).expect("per-cpu array");
    (0..256u32)
        .map(|i| a.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0))
        .collect()
}

/// Namespaces removed when dropped.
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", n])
                .status();
        }
    }
}
