//! Tier 2: the real `lb_xdp` object, loaded into the kernel, fed packets through
//! BPF_PROG_TEST_RUN. Each case reads like a fixture: description, input built with etherparse,
//! expected verdict, expected output bytes.
//!
//! Needs root and the embedded eBPF object: run by `cargo xtask test` (they are `#[ignore]`d so
//! a plain `cargo test` as a normal user stays green).

mod support;

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6Header, Ipv6RawExtHeader, PacketBuilder,
    TcpHeader, UdpHeader,
};
use lb_common::{BACKEND_F_ACTIVE, FlowKey, NO_BACKEND, stats::Stat};
use lb_userspace::dataplane::NoSlots;
use support::*;

// ---- forwarding -------------------------------------------------------------------------------

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn ipv4_tcp_to_vip_is_tx_with_only_macs_changed() {
    let mut f = Fixture::new(CONFIG);
    let (pkt, key) = tcp4(C1, 40000, VIP4, 80);
    f.expect_forward("IPv4 TCP SYN to web4", &pkt, &key, "web4");
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn ipv4_udp_to_vip_is_tx_with_only_macs_changed() {
    let mut f = Fixture::new(CONFIG);
    let (pkt, key) = udp4(C1, 5353, VIP4, 53);
    f.expect_forward("IPv4 UDP to dns4", &pkt, &key, "dns4");
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn ipv6_tcp_and_udp_to_vip_are_tx_with_only_macs_changed() {
    let mut f = Fixture::new(CONFIG);
    let (pkt, key) = tcp6(C6, 40000, VIP6, 80);
    f.expect_forward("IPv6 TCP to web6", &pkt, &key, "web6");
    let (pkt, key) = udp6(C6, 40001, VIP6, 53);
    f.expect_forward("IPv6 UDP to dns6", &pkt, &key, "dns6");
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn vlan_tagged_frame_is_forwarded_with_tag_intact() {
    let mut f = Fixture::new(CONFIG);
    let (pkt, key) = tcp4_vlan(C1, 40000, VIP4, 80, 42);
    f.expect_forward("802.1Q VID 42, IPv4 TCP to web4", &pkt, &key, "web4");
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn ipv4_with_options_is_forwarded() {
    let mut f = Fixture::new(CONFIG);
    for opts in [4usize, 12, 40] {
        let (pkt, key) = tcp4_with_options(C1, 40000, VIP4, 80, opts);
        f.expect_forward(
            &format!("IPv4 with {opts} bytes of options"),
            &pkt,
            &key,
            "web4",
        );
    }
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn ipv6_extension_headers_up_to_four_are_walked() {
    let mut f = Fixture::new(CONFIG);
    let (pkt, key) = tcp6_with_ext(C6, 40000, VIP6, 80, 2);
    f.expect_forward(
        "IPv6 hop-by-hop + destination options, TCP",
        &pkt,
        &key,
        "web6",
    );
    let (pkt, key) = tcp6_with_ext(C6, 40000, VIP6, 80, 4);
    f.expect_forward("IPv6 four extension headers, TCP", &pkt, &key, "web6");
    let (pkt, _) = tcp6_with_ext(C6, 40000, VIP6, 80, 5);
    f.expect_unchanged("IPv6 five extension headers to a VIP", &pkt, XDP_DROP);
    f.assert_stat(Stat::DropMalformed, 1);
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn all_ports_service_matches_every_port_of_its_protocol() {
    let mut f = Fixture::new(CONFIG);
    for port in [1u16, 80, 8443, 65535] {
        let (pkt, key) = tcp4(C1, 40000, VIP_ANY, port);
        f.expect_forward(
            &format!("TCP port {port} to the all-ports VIP"),
            &pkt,
            &key,
            "anyport",
        );
    }
    let (pkt, _) = udp4(C1, 40000, VIP_ANY, 53);
    f.expect_unchanged("UDP to the all-ports TCP VIP", &pkt, XDP_PASS);
    // An exact service wins over port 0 on the same VIP: web4 is 10.99.0.100:80, nothing else.
    let (pkt, _) = tcp4(C1, 40000, VIP4, 81);
    f.expect_unchanged("TCP to a VIP port without a service", &pkt, XDP_PASS);
    f.assert_stat(Stat::PassNoService, 2);
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn backend_behind_another_interface_is_redirected() {
    let mut f = Fixture::new(REDIRECT);
    let (pkt, key) = tcp4(C1, 40000, VIP4, 80);
    let b = f.predict(&key, "web4");
    let mut want = pkt.clone();
    want[0..6].copy_from_slice(&f.backend_mac(b));
    want[6..12].copy_from_slice(&EGRESS_MAC);
    let (v, out) = f.run(&pkt);
    assert_eq!(v, XDP_REDIRECT, "verdict");
    assert_eq!(
        out, want,
        "destination MAC = backend, source MAC = the egress interface's"
    );
    f.assert_stat(Stat::VerdictRedirect, 1);
    // The devmap slot vanishes (interface gone): counted drop, not a silent loss.
    let mut be = f.backend(b);
    be.tx_port = 7;
    f.dp.set_backend(b, &be).unwrap();
    let (pkt2, _) = tcp4(C2, 40000, VIP4, 80);
    let (v, _) = f.run(&pkt2);
    assert_eq!(v, XDP_DROP);
    f.assert_stat(Stat::DropTxPort, 1);
}

// ---- connection table -------------------------------------------------------------------------

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn same_flow_same_backend_over_many_packets() {
    let mut f = Fixture::new(CONFIG);
    let (pkt, key) = tcp4(C1, 41000, VIP4, 80);
    let first = f.expect_forward("first packet", &pkt, &key, "web4");
    for i in 0..200 {
        let (v, out) = f.run(&pkt);
        assert_eq!(v, XDP_TX, "packet {i}");
        assert_eq!(
            &out[0..6],
            &f.backend_mac(first),
            "packet {i} changed backend"
        );
    }
    f.assert_stat(Stat::FlowNew, 1);
    f.assert_stat(Stat::FlowHit, 200);
    assert_eq!(f.dp.flow(&key).unwrap().unwrap().backend, first);
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn unchanged_slots_are_read_from_the_packed_copy() {
    let mut f = Fixture::new(CONFIG);
    let svc = f.service("web4");
    let id = svc.value.id;
    assert_eq!(f.dp.packed_bits(id), 2, "two backends: 2-bit fields");
    // Established packets (ACKs, no entry) of 200 flows: each by its slot, no table lookup.
    let flows: Vec<(Vec<u8>, FlowKey)> = (0..200)
        .map(|i| {
            let port = 30000 + i;
            (
                tcp4_flags(C1, port, VIP4, 80, "A"),
                key4(C1, port, VIP4, 80, 6),
            )
        })
        .collect();
    let forward = |f: &mut Fixture, ring: &[u32], desc: &str| {
        for (p, k) in &flows {
            f.expect_mac(desc, p, ring[svc.slot_of(k) as usize]);
        }
    };
    forward(&mut f, &svc.ring, "packed");
    f.assert_stat(Stat::FlowStateless, 200);
    // `LB_RING` alone rewritten: packets still go by the packed copy (what the fast path reads).
    let other: Vec<u32> = svc
        .ring
        .iter()
        .map(|b| svc.backends[usize::from(*b == svc.backends[0])])
        .collect();
    f.dp.set_ring_unpacked(svc.value.ring_base, &other).unwrap();
    forward(&mut f, &svc.ring, "LB_RING changed behind the packed copy");
    // Through the controller's write both change: a table over every backend of the config
    // (more than 3: the fields widen), a third of its slots changed (those read `LB_RING`).
    let all: Vec<u32> = f.desired.backends.keys().map(|b| b.0).collect();
    assert!(all.len() > 3, "{all:?}");
    let mixed: Vec<u32> = (0..svc.value.ring_size as usize)
        .map(|s| {
            let b = all[(s * 7 + s / 5) % all.len()];
            if s % 3 == 0 {
                b | lb_common::RING_DIRTY
            } else {
                b
            }
        })
        .collect();
    f.dp.set_ring(svc.value.ring_base, &mixed).unwrap();
    assert!(f.dp.packed_bits(id) >= 4, "{} bits", f.dp.packed_bits(id));
    let before = f.snapshot().get(Stat::FlowStateless);
    let clean = flows
        .iter()
        .filter(|(_, k)| mixed[svc.slot_of(k) as usize] & lb_common::RING_DIRTY == 0)
        .count() as u64;
    let plain: Vec<u32> = mixed.iter().map(|b| b & !lb_common::RING_DIRTY).collect();
    forward(&mut f, &plain, "mixed table");
    assert_eq!(
        f.snapshot().get(Stat::FlowStateless) - before,
        clean,
        "only unchanged slots skip the connection table"
    );
    assert!(clean > 0 && clean < 200);
    // Back to two backends: narrower again only after a whole write, but every slot right.
    f.dp.set_ring(svc.value.ring_base, &svc.ring).unwrap();
    forward(&mut f, &svc.ring, "back");
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn table_change_keeps_existing_flows() {
    let mut f = Fixture::new(CONFIG);
    let svc = f.service("web4");
    // Establish 50 flows, remember their backends.
    let flows: Vec<_> = (0..50).map(|i| tcp4(C1, 42000 + 2 * i, VIP4, 80)).collect();
    let before: Vec<u32> = flows
        .iter()
        .map(|(p, k)| f.expect_forward("establish", p, k, "web4"))
        .collect();
    // Point every slot at the first backend: a new Maglev table.
    let target = svc.backends[0];
    let ring = vec![target; svc.value.ring_size as usize];
    f.dp.set_ring(svc.value.ring_base, &ring).unwrap();
    for ((p, _), b) in flows.iter().zip(&before) {
        let (v, out) = f.run(p);
        assert_eq!(v, XDP_TX);
        assert_eq!(
            &out[0..6],
            &f.backend_mac(*b),
            "an established flow moved after a table change"
        );
    }
    assert!(
        before.iter().any(|b| *b != target),
        "test needs flows on both backends"
    );
    // A new flow follows the new table.
    let (p, _) = tcp4(C2, 50000, VIP4, 80);
    let (v, out) = f.run(&p);
    assert_eq!(v, XDP_TX);
    assert_eq!(&out[0..6], &f.backend_mac(target));
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn flow_of_a_removed_backend_is_rescheduled() {
    let mut f = Fixture::new(CONFIG);
    let svc = f.service("web4");
    // Find a flow on backend 0 of web4.
    let (pkt, key) = (0..100)
        .map(|i| tcp4(C1, 43000 + 2 * i, VIP4, 80))
        .find(|(_, k)| f.predict(k, "web4") == svc.backends[0])
        .expect("some flow hashes to backend 0");
    f.expect_forward("establish", &pkt, &key, "web4");
    // Backend 0 goes down: the controller clears its active flag and rebuilds the table.
    let mut b = f.backend(svc.backends[0]);
    b.flags &= !BACKEND_F_ACTIVE;
    b.generation += 1;
    f.dp.set_backend(svc.backends[0], &b).unwrap();
    let ring = vec![svc.backends[1]; svc.value.ring_size as usize];
    f.dp.set_ring(svc.value.ring_base, &ring).unwrap();
    let (v, out) = f.run(&pkt);
    assert_eq!(v, XDP_TX);
    assert_eq!(
        &out[0..6],
        &f.backend_mac(svc.backends[1]),
        "flow not moved off the down backend"
    );
    f.assert_stat(Stat::FlowRescheduled, 1);
    assert_eq!(f.dp.flow(&key).unwrap().unwrap().backend, svc.backends[1]);
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn reused_backend_id_does_not_inherit_old_flows() {
    let mut f = Fixture::new(CONFIG);
    let svc = f.service("web4");
    let (pkt, key) = (0..100)
        .map(|i| tcp4(C1, 44000 + 2 * i, VIP4, 80))
        .find(|(_, k)| f.predict(k, "web4") == svc.backends[0])
        .unwrap();
    f.expect_forward("establish", &pkt, &key, "web4");
    // Same id, new generation (the id was handed to another backend): the flow must be chosen
    // again through the table, which now points at backend 1.
    let mut b = f.backend(svc.backends[0]);
    b.generation += 1;
    b.mac = [0x02, 0, 0, 0, 0, 0x99];
    f.dp.set_backend(svc.backends[0], &b).unwrap();
    let ring = vec![svc.backends[1]; svc.value.ring_size as usize];
    f.dp.set_ring(svc.value.ring_base, &ring).unwrap();
    let (_, out) = f.run(&pkt);
    assert_eq!(&out[0..6], &f.backend_mac(svc.backends[1]));
}

// ---- active connections ---------------------------------------------------------------------

fn active(f: &mut Fixture, backend: u32) -> u64 {
    f.dp.active_connections(&[backend])
        .unwrap()
        .get(&backend)
        .copied()
        .unwrap_or(0)
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn syn_opens_and_client_fin_or_rst_closes_a_connection() {
    let mut f = Fixture::new(CONFIG);
    let key = key4(C1, 46000, VIP4, 80, 6);
    let b = f.predict(&key, "web4");
    assert_eq!(f.run(&tcp4_flags(C1, 46000, VIP4, 80, "S")).0, XDP_TX);
    assert_eq!(active(&mut f, b), 1, "SYN opens");
    f.run(&tcp4_flags(C1, 46000, VIP4, 80, "A"));
    assert_eq!(active(&mut f, b), 1, "ACK changes nothing");
    assert_eq!(
        f.run(&tcp4_flags(C1, 46000, VIP4, 80, "FA")).0,
        XDP_TX,
        "FIN still forwarded"
    );
    assert_eq!(active(&mut f, b), 0, "client FIN closes");
    f.run(&tcp4_flags(C1, 46000, VIP4, 80, "FA"));
    f.run(&tcp4_flags(C1, 46000, VIP4, 80, "R"));
    assert_eq!(
        active(&mut f, b),
        0,
        "a second FIN or a RST does not count again"
    );
    let flow = f.dp.flow(&key).unwrap().unwrap();
    assert_eq!(
        flow.flags,
        lb_common::FLOW_F_COUNTED | lb_common::FLOW_F_CLOSED
    );
    // RST closes too.
    let key2 = key4(C2, 46002, VIP4, 80, 6);
    let b2 = f.predict(&key2, "web4");
    f.run(&tcp4_flags(C2, 46002, VIP4, 80, "S"));
    let before = active(&mut f, b2);
    f.run(&tcp4_flags(C2, 46002, VIP4, 80, "R"));
    assert_eq!(active(&mut f, b2), before - 1);
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn only_syn_started_tcp_and_udp_flows_count() {
    let mut f = Fixture::recording(CONFIG);
    let key = key4(C1, 47000, VIP4, 80, 6);
    let b = f.predict(&key, "web4");
    f.run(&tcp4_flags(C1, 47000, VIP4, 80, "A"));
    f.run(&tcp4_flags(C1, 47000, VIP4, 80, "SA"));
    assert_eq!(
        active(&mut f, b),
        0,
        "a flow first seen mid-stream is forwarded, not counted"
    );
    assert!(f.dp.flow(&key).unwrap().is_some());
    let (pkt, ukey) = udp4(C1, 47001, VIP4, 53);
    let ub = f.predict(&ukey, "dns4");
    f.run(&pkt);
    f.run(&pkt);
    assert_eq!(active(&mut f, ub), 1, "a UDP flow counts once");
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn a_moved_flow_leaves_its_count_behind() {
    let mut f = Fixture::new(CONFIG);
    let svc = f.service("web4");
    let sport = (48000..48200)
        .step_by(2)
        .find(|p| f.predict(&key4(C1, *p, VIP4, 80, 6), "web4") == svc.backends[0])
        .unwrap();
    f.run(&tcp4_flags(C1, sport, VIP4, 80, "S"));
    assert_eq!(active(&mut f, svc.backends[0]), 1);
    let mut b = f.backend(svc.backends[0]);
    b.flags = 0;
    b.generation += 1;
    f.dp.set_backend(svc.backends[0], &b).unwrap();
    // The controller's new table: every slot changed (marked), so established packets consult
    // the connection table.
    f.dp.set_ring(
        svc.value.ring_base,
        &vec![svc.backends[1] | lb_common::RING_DIRTY; svc.value.ring_size as usize],
    )
    .unwrap();
    f.run(&tcp4_flags(C1, sport, VIP4, 80, "A"));
    assert_eq!(
        active(&mut f, svc.backends[0]),
        0,
        "count left on the backend the flow left"
    );
    assert_eq!(
        active(&mut f, svc.backends[1]),
        0,
        "a mid-stream move is not a new connection"
    );
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn sweep_expires_idle_flows_and_their_counts() {
    let mut f = Fixture::recording(CONFIG);
    let key = key4(C1, 49000, VIP4, 80, 6);
    let b = f.predict(&key, "web4");
    f.run(&tcp4_flags(C1, 49000, VIP4, 80, "S"));
    let (upkt, ukey) = udp4(C1, 49001, VIP4, 53);
    f.run(&upkt);
    let ub = f.predict(&ukey, "dns4");
    let seen = f.dp.flow(&key).unwrap().unwrap().last_seen_ns;
    assert!(seen > 0, "last_seen_ns recorded");
    let t = lb_userspace::config::Timeouts {
        tcp: 100,
        tcp_fin: 10,
        udp: 5,
    };
    // 6 s later: only the UDP flow is past its timeout.
    let s = f.dp.sweep(seen + 6_000_000_000, &t, &NoSlots).unwrap();
    assert_eq!((s.entries, s.expired), (2, 1));
    assert!(f.dp.flow(&ukey).unwrap().is_none());
    assert!(f.dp.flow(&key).unwrap().is_some());
    assert_eq!(active(&mut f, ub), 0, "expired UDP flow no longer active");
    assert_eq!(active(&mut f, b), 1);
    // 101 s later the TCP flow goes too, and its backend's count with it.
    let s = f.dp.sweep(seen + 101_000_000_000, &t, &NoSlots).unwrap();
    assert_eq!(s.expired, 1);
    assert_eq!(active(&mut f, b), 0);
    // The same 5-tuple later starts over as a new flow.
    f.run(&tcp4_flags(C1, 49000, VIP4, 80, "S"));
    assert_eq!(active(&mut f, b), 1);
}

// ---- schedulers -------------------------------------------------------------------------------

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn rr_cycles_through_backends_in_order() {
    let mut f = Fixture::new(&sched_config("rr", &[100, 300, 0, 100]));
    let picks: Vec<usize> = (0..8).map(|i| f.syn(C1, 50000 + 2 * i)).collect();
    assert_eq!(
        picks,
        [0, 1, 3, 0, 1, 3, 0, 1],
        "rr ignores weights except 0"
    );
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn wrr_follows_the_smooth_sequence() {
    let mut f = Fixture::new(&sched_config("wrr", &[5, 1, 1]));
    let picks: Vec<usize> = (0..14).map(|i| f.syn(C1, 50100 + 2 * i)).collect();
    let seq = lb_userspace::sched::wrr_sequence(&[5, 1, 1], 65537);
    let want: Vec<usize> = seq.iter().chain(&seq).copied().collect();
    assert_eq!(picks, want, "two cycles of 5:1:1, interleaved");
    // An existing flow keeps its backend: the cursor only moves for new flows.
    let (v, out) = f.run(&tcp4_flags(C1, 50100, VIP4, 80, "A"));
    assert_eq!(v, XDP_TX);
    assert_eq!(f.backend_index(&out, "s"), picks[0]);
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn lc_picks_the_backend_with_fewest_connections() {
    let mut f = Fixture::new(&sched_config("lc", &[100, 100, 100]));
    // Empty: ties go to the first; then the others fill up in turn.
    let picks: Vec<usize> = (0..6).map(|i| f.syn(C1, 50200 + 2 * i)).collect();
    assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    // Close two connections on backend 1 (client FIN): it now has the fewest.
    let on1: Vec<u16> = (0..6)
        .filter(|i| picks[*i as usize] == 1)
        .map(|i| 50200 + 2 * i)
        .collect();
    for p in &on1 {
        f.run(&tcp4_flags(C1, *p, VIP4, 80, "FA"));
    }
    assert_eq!(f.syn(C2, 51000), 1);
    assert_eq!(f.syn(C2, 51002), 1);
    assert_eq!(f.syn(C2, 51004), 0, "all equal again: the first");
    // Weight 0 (drain) never gets new flows, even with the fewest connections.
    let mut f = Fixture::new(&sched_config("lc", &[100, 0]));
    assert!((0..4).all(|i| f.syn(C1, 52000 + 2 * i) == 0));
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn wlc_matches_the_host_model() {
    let weights = [1u16, 3, 2];
    let mut f = Fixture::new(&sched_config("wlc", &weights));
    let mut active = [0u64; 3];
    for i in 0..60 {
        let c: Vec<(u64, u32)> = active
            .iter()
            .zip(weights)
            .map(|(a, w)| (*a, w as u32))
            .collect();
        let want = lb_userspace::sched::least_connections(&c, true).unwrap();
        let got = f.syn(C1, 53000 + 2 * i);
        assert_eq!(got, want, "flow {i}, active {active:?}");
        active[got] += 1;
    }
    assert_eq!(active, [10, 30, 20]);
}

// ---- schedulers across CPUs (BPF_PROG_TEST_RUN runs on the calling thread's CPU) ----------

/// The CPUs the tests alternate between: 0 and 1 (this machine kind has two).
fn two_cpus() -> [usize; 2] {
    assert!(
        cpus() >= 2,
        "the cross-CPU scheduler tests need two CPUs (this machine has {})",
        cpus()
    );
    [0, 1]
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn rr_walks_one_global_sequence_across_cpus() {
    let cpu = two_cpus();
    let mut f = Fixture::new(&sched_config("rr", &[100, 100, 100, 100]));
    // Alternating CPUs, one flow each: the picks are the one cycle, not two interleaved ones.
    let picks: Vec<usize> = (0..16)
        .map(|i| f.syn_on(cpu[i % 2], C1, 41000 + 2 * i as u16))
        .collect();
    let want: Vec<usize> = (0..16).map(|i| i % 4).collect();
    assert_eq!(picks, want);
    // Uneven shares at the same time (301 on one CPU, 99 on the other): every backend gets
    // exactly a quarter of the 400.
    let got = f.concurrent_syns(&[(cpu[0], C1, 42000, 301), (cpu[1], C2, 42000, 99)]);
    let mut n = [0usize; 4];
    for i in got.iter().flatten() {
        n[*i] += 1;
    }
    assert_eq!(n, [100; 4], "each backend exactly its share");
}

/// The snapshot reads the per-backend counters of all CPUs with a few batch lookups: the
/// same sums as one lookup per backend, with packets counted on both CPUs.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn batched_counters_equal_single_lookups() {
    let cpu = two_cpus();
    let mut f = Fixture::new(&sched_config("rr", &[100, 100, 100, 100]));
    for i in 0..12 {
        f.syn_on(cpu[i % 2], C1, 43000 + i as u16);
    }
    let s = f.snapshot();
    let mut total = 0;
    for id in f.service("s").backends {
        let (batched, one) = f.dp.backend_counters_both(id).unwrap();
        assert_eq!(batched, one, "backend {id}");
        assert_eq!(s.backends[&id], one, "snapshot of backend {id}");
        assert_eq!(one.packets, 3, "rr: a quarter of the 12 flows each");
        total += one.packets;
    }
    assert_eq!(total, 12);
}

/// A run of backend writes (a config's backends) goes to the maps map by map in batch updates:
/// each backend's entry and meta as written, a fresh one's counters zeroed on every CPU and its
/// connection counts too, exactly as the writes one at a time (a run of a few) leave them.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn backend_writes_in_batches_are_the_writes_one_at_a_time() {
    use lb_common::{BackendMeta, Counters, FAMILY_V4};
    use lb_userspace::{
        dataplane::Maps as _,
        desired::{BackendId, Op},
    };
    let cpu = two_cpus();
    let mut f = Fixture::new(&sched_config("rr", &[100, 100, 100, 100]));
    let used = f.service("s").backends;
    // Every way of writing: a run of 40 (batched) and a run of 3 (one at a time).
    for run in [40u32, 3] {
        // Counters of the service's backends on both CPUs, and open connections.
        for i in 0..8 {
            f.syn_on(cpu[i % 2], C1, 44000 + (run as u16) * 10 + i as u16);
        }
        let dirty: Vec<u32> = used
            .iter()
            .copied()
            .filter(|id| f.dp.backend_counters_both(*id).unwrap().1 != Counters::default())
            .collect();
        assert_eq!(dirty.len(), 4, "rr: every backend had packets");
        assert!(
            !f.dp.active_connections(&dirty).unwrap().is_empty(),
            "open connections"
        );
        // The service's backends written again as fresh (ids reused), and new ids beside them.
        let writes: Vec<(u32, lb_common::Backend, BackendMeta)> = (0..run)
            .map(|i| {
                let id = used
                    .get(i as usize)
                    .copied()
                    .unwrap_or(3000 + run * 100 + i);
                let mut value = f.backend(used[(i % 4) as usize]);
                value.mac = [0x02, 0xbb, 0, 0, run as u8, i as u8];
                value.generation = 77 + i;
                let meta = BackendMeta {
                    addr: [
                        10, 77, run as u8, i as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    ],
                    family: FAMILY_V4,
                    _pad: [0; 3],
                    service_id: 9,
                };
                (id, value, meta)
            })
            .collect();
        let ops: Vec<Op> = writes
            .iter()
            .map(|(id, value, meta)| Op::Backend {
                id: BackendId(*id),
                value: *value,
                fresh: true,
                meta: *meta,
            })
            .collect();
        f.dp.apply_ops(&ops).expect("backend writes");
        let adopted = f.dp.read_adopted().expect("read the maps back");
        for (id, value, meta) in &writes {
            let got = adopted.backends.iter().find(|b| b.0 == *id);
            assert_eq!(
                got,
                Some(&(*id, *value, *meta)),
                "run of {run}: backend {id}"
            );
            assert_eq!(
                f.dp.backend_counters_both(*id).unwrap(),
                (Counters::default(), Counters::default()),
                "run of {run}: backend {id}'s counters zeroed on every CPU"
            );
        }
        let ids: Vec<u32> = writes.iter().map(|w| w.0).collect();
        assert!(
            f.dp.active_connections(&ids).unwrap().is_empty(),
            "run of {run}: connection counts zeroed"
        );
        // The service's backends as the config has them again, for the next run's traffic.
        let restore: Vec<Op> = used
            .iter()
            .map(|id| Op::Backend {
                id: BackendId(*id),
                value: f.backend(*id),
                fresh: false,
                meta: BackendMeta {
                    family: FAMILY_V4,
                    ..Default::default()
                },
            })
            .collect();
        f.dp.apply_ops(&restore).expect("restore");
    }
}

/// The seed's example: wrr 1:2:2:2 from two CPUs follows the smooth sequence, so servers 2–4
/// get twice as many new connections as server 1.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn wrr_1_2_2_2_across_cpus() {
    let cpu = two_cpus();
    let mut f = Fixture::new(&sched_config("wrr", &[1, 2, 2, 2]));
    let seq = lb_userspace::sched::wrr_sequence(&[1, 2, 2, 2], 65537);
    let picks: Vec<usize> = (0..28)
        .map(|i| f.syn_on(cpu[i % 2], C1, 43000 + 2 * i as u16))
        .collect();
    let want: Vec<usize> = seq.iter().cycle().take(28).copied().collect();
    assert_eq!(picks, want);
    let got = f.concurrent_syns(&[(cpu[0], C1, 44000, 500), (cpu[1], C2, 44000, 200)]);
    let mut n = [0usize; 4];
    for i in got.iter().flatten() {
        n[*i] += 1;
    }
    assert_eq!(n, [100, 200, 200, 200]);
}

/// lc compares the totals: connections opened on one CPU and closed on the other count where
/// they are, and the other CPU sees them.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn lc_follows_the_totals_across_cpus() {
    let cpu = two_cpus();
    let mut f = Fixture::new(&sched_config("lc", &[100, 100, 100, 100]));
    // Six flows on CPU 0: backends 0 1 2 3 0 1.
    let picks: Vec<usize> = (0..6)
        .map(|i| f.syn_on(cpu[0], C1, 45000 + 2 * i))
        .collect();
    assert_eq!(picks, [0, 1, 2, 3, 0, 1]);
    // CPU 1 sees CPU 0's counts: backends 2 and 3 have the fewest.
    assert_eq!(f.syn_on(cpu[1], C2, 46000), 2);
    assert_eq!(f.syn_on(cpu[1], C2, 46002), 3);
    // Closing both of backend 0's flows on CPU 1 (opened on CPU 0): CPU 0 now picks it twice.
    f.fin_on(cpu[1], C1, 45000);
    f.fin_on(cpu[1], C1, 45008);
    assert_eq!(f.syn_on(cpu[0], C2, 46004), 0);
    assert_eq!(f.syn_on(cpu[0], C2, 46006), 0);
    for id in f.service("s").backends {
        assert_eq!(active(&mut f, id), 2, "backend {id}");
    }
}

/// The seed's example for wlc: weights 1:2:2:2, new flows alternating between CPUs and closes
/// on the CPU that did not open them; every pick is the host model's on the totals.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn wlc_follows_the_totals_across_cpus() {
    let cpu = two_cpus();
    let weights = [1u16, 2, 2, 2];
    let mut f = Fixture::new(&sched_config("wlc", &weights));
    let mut totals = [0u64; 4];
    let mut open: Vec<(u16, usize, usize)> = Vec::new(); // (port, backend, cpu)
    for i in 0..140usize {
        let c: Vec<(u64, u32)> = totals
            .iter()
            .zip(weights)
            .map(|(a, w)| (*a, w as u32))
            .collect();
        let want = lb_userspace::sched::least_connections(&c, true).unwrap();
        let port = 47000 + 2 * i as u16;
        let on = cpu[i % 2];
        let got = f.syn_on(on, C1, port);
        assert_eq!(got, want, "flow {i} on CPU {on}, totals {totals:?}");
        totals[got] += 1;
        open.push((port, got, on));
        // Every third flow, the oldest open one is closed on the other CPU.
        if i % 3 == 2 {
            let (p, b, opened_on) = open.remove(0);
            f.fin_on(cpu[(opened_on + 1) % 2], C1, p);
            totals[b] -= 1;
        }
    }
    let ids = f.service("s").backends;
    for (k, id) in ids.iter().enumerate() {
        assert_eq!(active(&mut f, *id), totals[k], "backend {k}");
    }
    // Close everything (on the other CPU), then from zero: seven flows make 1:2:2:2, and with
    // counts in the ratio of the weights the next four go one to each server.
    for (p, _, opened_on) in open.drain(..) {
        f.fin_on(cpu[(opened_on + 1) % 2], C1, p);
    }
    for id in &ids {
        assert_eq!(active(&mut f, *id), 0);
    }
    let picks: Vec<usize> = (0..11)
        .map(|i| f.syn_on(cpu[i % 2], C2, 48000 + 2 * i as u16))
        .collect();
    assert_eq!(picks, [0, 1, 2, 3, 1, 2, 3, 0, 1, 2, 3]);
}

/// No backend cap: lc over the most backends a service can have (4096, every backend id) and
/// wlc over 1000, flows from both CPUs at once: each backend gets exactly its share.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn lc_and_wlc_scan_thousands_of_backends() {
    let cpu = two_cpus();
    let n = 4096; // the ring of 65 537 slots takes up to 6 553 backends
    let mut f = Fixture::new(&sched_config("lc", &vec![100; n]));
    // Two rounds, one flow at a time from alternating CPUs: exactly 2 on each.
    let mut count = vec![0usize; n];
    for i in 0..2 * n {
        let src = Ipv4Addr::new(10, 77, (i >> 14) as u8, 0);
        count[f.syn_on(cpu[i % 2], src, 1024 + (i % 16384) as u16 * 2)] += 1;
    }
    assert!(count.iter().all(|c| *c == 2), "lc over {n}: {count:?}");

    let w: Vec<u16> = (0..1000).map(|i| 1 + (i % 2) as u16).collect();
    let mut f = Fixture::new(&sched_config("wlc", &w));
    // 1500 flows, one at a time: 1 on each weight-1 backend, 2 on each weight-2 one.
    let mut count = vec![0usize; 1000];
    for i in 0..1500 {
        count[f.syn_on(cpu[i % 2], C1, 1024 + 2 * i as u16)] += 1;
    }
    for (k, c) in count.iter().enumerate() {
        assert_eq!(*c, w[k] as usize, "wlc backend {k}");
    }
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn sh_sends_each_source_to_one_backend() {
    let mut f = Fixture::new(&sched_config("sh", &[100, 100, 100, 100]));
    let mut seen = std::collections::BTreeSet::new();
    for s in 0..64u8 {
        let src = Ipv4Addr::new(10, 77, 0, s);
        let first = f.syn(src, 40000);
        for p in 1..5 {
            assert_eq!(
                f.syn(src, 40000 + 2 * p),
                first,
                "source {src}: every connection on one backend"
            );
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 4, "sources spread over all backends");
}

// ---- pass-through -----------------------------------------------------------------------------

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn non_vip_arp_and_icmp_pass_unchanged() {
    let mut f = Fixture::new(CONFIG);
    let (pkt, _) = tcp4(C1, 40000, Ipv4Addr::new(10, 99, 0, 1), 22);
    f.expect_unchanged("TCP to the LB's own address", &pkt, XDP_PASS);
    let (pkt, _) = tcp6(C6, 40000, "fd00:99::1".parse().unwrap(), 22);
    f.expect_unchanged("IPv6 TCP to a non-VIP", &pkt, XDP_PASS);
    f.expect_unchanged("ARP request for the VIP", &arp_request(C1, VIP4), XDP_PASS);
    f.expect_unchanged("ICMP echo to the VIP", &icmp4_echo(C1, VIP4), XDP_PASS);
    f.expect_unchanged("ICMPv6 echo to the VIP", &icmp6_echo(C6, VIP6), XDP_PASS);
    f.assert_stat(Stat::PassNoService, 2);
    f.assert_stat(Stat::PassNotIp, 1);
    f.assert_stat(Stat::PassIcmp, 2);
    f.assert_stat(Stat::VerdictPass, 5);
    f.assert_stat(Stat::VerdictTx, 0);
}

// ---- drops ------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn no_usable_backend_drops() {
    let mut f = Fixture::new(CONFIG);
    let (pkt, _) = tcp4(C1, 40000, VIP_EMPTY, 80);
    f.expect_unchanged("service whose only backend has weight 0", &pkt, XDP_DROP);
    assert!(f.service("empty").ring.iter().all(|b| *b == NO_BACKEND));
    // All backends of web4 down (flag cleared) while the table still names them.
    let svc = f.service("web4");
    for id in &svc.backends {
        let mut b = f.backend(*id);
        b.flags = 0;
        f.dp.set_backend(*id, &b).unwrap();
    }
    let (pkt, _) = tcp4(C1, 40000, VIP4, 80);
    f.expect_unchanged("service whose backends are all down", &pkt, XDP_DROP);
    f.assert_stat(Stat::DropNoBackend, 2);
    f.assert_stat(Stat::VerdictDrop, 2);
}

/// Every fragment of a datagram goes to one backend (IPv4 and IPv6), in order and out of
/// order; datagrams are told apart; fragments to non-VIPs pass.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn fragments_of_a_datagram_go_to_one_backend() {
    let mut f = Fixture::new(&two_udp_backends_config());
    let udp = |sport: u16| key4(C1, sport, VIP4, 53, 17);
    // In order: the first fragment (with ports) is scheduled like any packet of the flow; the
    // later ones follow it.
    let b = f.predict(&udp(5000), "dns");
    let first = frag4(C1, VIP4, 7, true, 0, Some(5000));
    f.expect_mac("first fragment", &first, b);
    f.expect_mac("middle fragment", &frag4(C1, VIP4, 7, true, 3, None), b);
    f.expect_mac("last fragment", &frag4(C1, VIP4, 7, false, 6, None), b);
    f.assert_stat(Stat::FlowFragment, 2);
    // Out of order: a later fragment first: by the client's address, recorded; the first
    // fragment and the rest follow it, whatever the 5-tuple's own choice.
    let by_addr = {
        let (v, out) = f.run(&frag4(C1, VIP4, 8, false, 6, None));
        assert_eq!(v, XDP_TX);
        f.backend_index(&out, "dns")
    };
    let by_addr = f.service("dns").backends[by_addr];
    f.assert_stat(Stat::FlowFragmentHashed, 1);
    for sport in [5002u16, 5004, 5006, 5008] {
        // Whatever this 5-tuple would get alone, datagram 8 stays together.
        f.expect_mac(
            "first after a later one",
            &frag4(C1, VIP4, 8, true, 0, Some(sport)),
            by_addr,
        );
    }
    f.expect_mac("middle", &frag4(C1, VIP4, 8, true, 3, None), by_addr);
    // Datagrams are told apart by their id: datagram 9 of the same client is on its own.
    let b9 = f.predict(&udp(5010), "dns");
    f.expect_mac(
        "another datagram",
        &frag4(C1, VIP4, 9, true, 0, Some(5010)),
        b9,
    );
    f.expect_mac(
        "its later fragment",
        &frag4(C1, VIP4, 9, false, 3, None),
        b9,
    );
    // IPv6.
    let b6 = f.predict(&key6(C6, 5000, VIP6, 53, 17), "dns6");
    f.expect_mac(
        "IPv6 first fragment",
        &frag6(C6, VIP6, 70, true, 0, Some(5000)),
        b6,
    );
    f.expect_mac(
        "IPv6 later fragment",
        &frag6(C6, VIP6, 70, false, 2, None),
        b6,
    );
    // Not to a VIP: passed untouched.
    f.expect_unchanged(
        "fragment to a non-VIP",
        &frag4(C1, Ipv4Addr::new(10, 99, 0, 1), 7, false, 3, None),
        XDP_PASS,
    );
    f.expect_unchanged(
        "first fragment to a non-VIP",
        &frag4(C1, Ipv4Addr::new(10, 99, 0, 1), 7, true, 0, Some(5000)),
        XDP_PASS,
    );
    f.assert_stat(Stat::PassFragment, 2);
    f.assert_stat(Stat::DropFragment, 0);

    // TCP fragments on the same VIP: its only TCP service takes them (none here: dropped).
    f.expect_unchanged(
        "later TCP fragment, no TCP service on the VIP",
        &frag4_tcp(C1, VIP4, 11, false, 3),
        XDP_DROP,
    );
    f.assert_stat(Stat::DropFragment, 1);

    // A VIP with two UDP services and no all-ports one has no fragment service: a later
    // fragment whose datagram was not seen is dropped; one that was seen follows.
    let mut cfg = two_udp_backends_config();
    cfg +=
        "\n[[service]]\nname = \"dns2\"\nvip = \"10.99.0.100\"\nport = 5353\nprotocol = \"udp\"\n";
    cfg += &backend_entry(0, 100);
    let mut f = Fixture::new(&cfg);
    f.expect_unchanged(
        "later fragment, datagram unseen, ambiguous VIP",
        &frag4(C1, VIP4, 12, false, 3, None),
        XDP_DROP,
    );
    let b = f.predict(&udp(5020), "dns");
    f.expect_mac(
        "first fragment",
        &frag4(C1, VIP4, 13, true, 0, Some(5020)),
        b,
    );
    f.expect_mac("seen datagram", &frag4(C1, VIP4, 13, false, 3, None), b);
}

/// Two UDP services on one VIP (ports 53 and 5353), plus IPv6 `dns6`.
fn two_udp_backends_config() -> String {
    let mut s = sched_config("maglev", &[100, 100, 100]);
    s = s.replace("name = \"s\"", "name = \"dns\"").replace(
        "port = 80\nprotocol = \"tcp\"",
        "port = 53\nprotocol = \"udp\"",
    );
    s += "\n[[service]]\nname = \"dns6\"\nvip = \"fd00:99::100\"\nport = 53\nprotocol = \"udp\"\n";
    for i in 0..3 {
        s += &format!(
            "[[service.backend]]\naddress = \"fd00:99::{:x}\"\nmac = \"02:00:00:00:01:{:02x}\"\n",
            0x21 + i,
            0x21 + i
        );
    }
    s
}

/// An IPv4 UDP fragment of datagram `id`: the first (`Some(sport)`: a UDP header to port 53)
/// or a later one (offset in 8-byte units, payload only).
fn frag4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    more: bool,
    offset_units: u16,
    sport: Option<u16>,
) -> Vec<u8> {
    let payload_len = 24u16;
    let mut ip =
        Ipv4Header::new(payload_len, 64, IpNumber::UDP, src.octets(), dst.octets()).unwrap();
    ip.identification = id;
    ip.more_fragments = more;
    ip.fragment_offset = offset_units.try_into().unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    eth(EtherType::IPV4).write(&mut out).unwrap();
    ip.write(&mut out).unwrap();
    match sport {
        Some(p) => {
            UdpHeader {
                source_port: p,
                destination_port: 53,
                length: 8000,
                checksum: 0,
            }
            .write(&mut out)
            .unwrap();
            out.extend_from_slice(&[0xab; 16]);
        }
        None => out.extend_from_slice(&[0xcd; 24]),
    }
    out
}

/// A later IPv4 TCP fragment (payload only).
fn frag4_tcp(src: Ipv4Addr, dst: Ipv4Addr, id: u16, more: bool, offset_units: u16) -> Vec<u8> {
    let mut ip = Ipv4Header::new(24, 64, IpNumber::TCP, src.octets(), dst.octets()).unwrap();
    ip.identification = id;
    ip.more_fragments = more;
    ip.fragment_offset = offset_units.try_into().unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    eth(EtherType::IPV4).write(&mut out).unwrap();
    ip.write(&mut out).unwrap();
    out.extend_from_slice(&[0xcd; 24]);
    out
}

/// An IPv6 UDP fragment (fragment header with `id`), first (`Some(sport)`) or later.
fn frag6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    id: u32,
    more: bool,
    offset_units: u16,
    sport: Option<u16>,
) -> Vec<u8> {
    let mut out = Vec::new();
    eth(EtherType::IPV6).write(&mut out).unwrap();
    Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: 8 + 24,
        next_header: IpNumber::IPV6_FRAGMENTATION_HEADER,
        hop_limit: 64,
        source: src.octets(),
        destination: dst.octets(),
    }
    .write(&mut out)
    .unwrap();
    // The fragment header by hand: etherparse 0.16 puts the M flag in bit 7 of the fourth byte
    // and the offset's low bits below it (RFC 8200: offset << 3 | M).
    out.push(17);
    out.push(0);
    out.extend_from_slice(&((offset_units << 3) | more as u16).to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    match sport {
        Some(p) => {
            UdpHeader {
                source_port: p,
                destination_port: 53,
                length: 8000,
                checksum: 0,
            }
            .write(&mut out)
            .unwrap();
            out.extend_from_slice(&[0xab; 16]);
        }
        None => out.extend_from_slice(&[0xcd; 24]),
    }
    out
}

// ---- malformed --------------------------------------------------------------------------------

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn truncated_at_every_length_never_forwards() {
    let mut f = Fixture::new(CONFIG);
    let (tcp, _) = tcp4(C1, 40000, VIP4, 80);
    let (vlan, _) = tcp4_vlan(C1, 40000, VIP4, 80, 7);
    let (tcp6, _) = tcp6(C6, 40000, VIP6, 80);
    let (udp, _) = udp4(C1, 40000, VIP4, 53);
    for (name, pkt) in [
        ("IPv4 TCP", tcp),
        ("VLAN IPv4 TCP", vlan),
        ("IPv6 TCP", tcp6),
        ("IPv4 UDP", udp),
    ] {
        // BPF_PROG_TEST_RUN needs at least an Ethernet header.
        for len in 14..pkt.len() {
            let cut = &pkt[..len];
            let (v, out) = f.run(cut);
            assert_eq!(out, cut, "{name} cut at {len}: frame modified");
            assert!(
                v == XDP_PASS || v == XDP_DROP,
                "{name} cut at {len}: verdict {v}"
            );
        }
    }
    // Every cut is counted as malformed (pass before the VIP is known, drop after).
    let s = f.snapshot();
    assert_eq!(s.get(Stat::VerdictTx), 0);
    assert_eq!(
        s.get(Stat::PassMalformed) + s.get(Stat::DropMalformed),
        s.get(Stat::VerdictPass) + s.get(Stat::VerdictDrop)
    );
    assert!(s.get(Stat::DropMalformed) > 0 && s.get(Stat::PassMalformed) > 0);
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn bad_ihl_and_bad_version_are_not_forwarded() {
    let mut f = Fixture::new(CONFIG);
    let (pkt, _) = tcp4(C1, 40000, VIP4, 80);
    for ihl in [0u8, 1, 4] {
        let mut p = pkt.clone();
        p[14] = 0x40 | ihl;
        f.expect_unchanged(&format!("IPv4 IHL {ihl} to VIP"), &p, XDP_DROP);
    }
    // IHL larger than the packet's header room.
    let mut p = pkt.clone();
    p[14] = 0x4f;
    f.expect_unchanged("IPv4 IHL 15 without options", &p, XDP_DROP);
    f.assert_stat(Stat::DropMalformed, 4);
    for version in [0u8, 5, 6, 15] {
        let mut p = pkt.clone();
        p[14] = (version << 4) | 5;
        f.expect_unchanged(&format!("version {version} in an IPv4 frame"), &p, XDP_PASS);
    }
    let (pkt6, _) = tcp6(C6, 40000, VIP6, 80);
    let mut p = pkt6.clone();
    p[14] = 0x40;
    f.expect_unchanged("version 4 in an IPv6 frame", &p, XDP_PASS);
    f.assert_stat(Stat::PassMalformed, 5);
    // tot_len larger than the frame.
    let mut p = pkt.clone();
    p[16..18].copy_from_slice(&1500u16.to_be_bytes());
    f.expect_unchanged("IPv4 total length past the frame", &p, XDP_DROP);
}

// ---- counters and distribution ----------------------------------------------------------------

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn counters_move_as_expected() {
    let mut f = Fixture::new(CONFIG);
    let (pkt, key) = tcp4(C1, 45000, VIP4, 80);
    let b = f.predict(&key, "web4");
    for _ in 0..3 {
        f.run(&pkt);
    }
    let (other, _) = tcp4(C1, 45000, Ipv4Addr::new(192, 0, 2, 1), 80);
    f.run(&other);
    let s = f.snapshot();
    let svc = f.service("web4").value.id;
    assert_eq!(s.services[&svc].packets, 3);
    assert_eq!(s.services[&svc].bytes, 3 * pkt.len() as u64);
    assert_eq!(s.services[&svc].new_flows, 1);
    assert_eq!(s.backends[&b].packets, 3);
    assert_eq!(s.backends[&b].bytes, 3 * pkt.len() as u64);
    assert_eq!(s.backends[&b].new_flows, 1);
    assert_eq!(s.get(Stat::VerdictTx), 3);
    assert_eq!(s.get(Stat::VerdictPass), 1);
    assert_eq!(s.get(Stat::FlowNew), 1);
    assert_eq!(s.get(Stat::FlowHit), 2);
    assert_eq!(s.get(Stat::VerdictAborted), 0);
}

#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn distribution_of_20000_random_flows_follows_weights() {
    let mut f = Fixture::new(WEIGHTED);
    let svc = f.service("w");
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let n = 20_000;
    for _ in 0..n {
        let r = next();
        let src = Ipv4Addr::new(10, 77, (r >> 8) as u8, r as u8);
        let sport = 1024 + ((r >> 16) as u16 % 60000);
        let (pkt, _) = tcp4(src, sport, VIP4, 80);
        let (v, _) = f.run(&pkt);
        assert_eq!(v, XDP_TX);
    }
    let s = f.snapshot();
    let weights = [1.0, 2.0, 3.0];
    let total: f64 = weights.iter().sum();
    let flows: u64 = svc.backends.iter().map(|b| s.backends[b].new_flows).sum();
    for (b, w) in svc.backends.iter().zip(weights) {
        let share = s.backends[b].new_flows as f64 / flows as f64;
        let want = w / total;
        println!("backend {b}: {:.4} of flows, weight share {want:.4}", share);
        assert!(
            (share - want).abs() < 0.02,
            "backend {b}: share {share:.4}, want {want:.4} ± 0.02"
        );
    }
    assert!(
        flows as f64 > 0.99 * n as f64,
        "{flows} distinct flows of {n}"
    );
}

// ---- the object itself ------------------------------------------------------------------------

/// lb_xdp must not call the byte-at-a-time memset/memmove/memcpy of compiler_builtins (a
/// bpf-linker default lets them through; lb-ebpf/build.rs turns it off).
#[test]
#[ignore = "needs the eBPF object: run by `cargo xtask test`"]
fn lb_xdp_calls_no_memory_functions() {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};
    require_root();
    let file = object::File::parse(lb_userspace::EBPF_OBJECT).expect("ELF");
    let mut checked = 0;
    for section in file
        .sections()
        .filter(|s| s.name().is_ok_and(|n| n.starts_with("xdp")))
    {
        for (_, reloc) in section.relocations() {
            if let RelocationTarget::Symbol(idx) = reloc.target() {
                let name = file
                    .symbol_by_index(idx)
                    .and_then(|s| s.name())
                    .unwrap_or("");
                assert!(
                    !["memset", "memmove", "memcpy", "memcmp", "bcmp"].contains(&name),
                    "lb_xdp calls {name}"
                );
            }
        }
        checked += 1;
    }
    assert!(checked > 0, "no xdp section found");
}

/// Every program of the object passes the verifier (the bench loads the others; a change of
/// the shared code can break one of them alone), and `lb_xdp_notrace` decides as `lb_xdp`.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn every_program_of_the_object_loads() {
    let mut f = Fixture::new(CONFIG);
    for name in [
        "lb_xdp_notrace",
        "lb_baseline_tx",
        "lb_baseline_swap",
        "lb_baseline_pass",
        "lb_baseline_insert",
        "lb_bench_gen",
        "lb_bench_sink",
    ] {
        f.dp.other_program(name)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
    for i in 0..50 {
        let pkt = tcp4_flags(C1, 31000 + i, VIP4, 80, "A");
        assert_eq!(
            f.run_program("lb_xdp_notrace", &pkt),
            f.run(&pkt),
            "packet {i}"
        );
    }
}

/// The bench's trivial forwarder (`lb_baseline_swap`, issue #13's baseline) swaps the two
/// Ethernet addresses and changes nothing else.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn the_bench_baseline_swaps_the_macs_and_nothing_else() {
    require_root();
    let mut f = Fixture::new(CONFIG);
    let (pkt, _) = tcp4(C1, 40000, VIP4, 80);
    let (verdict, out) = f.run_program("lb_baseline_swap", &pkt);
    assert_eq!(verdict, XDP_TX);
    let mut want = pkt.clone();
    want[..6].copy_from_slice(&pkt[6..12]);
    want[6..12].copy_from_slice(&pkt[..6]);
    assert_eq!(out, want, "only the two addresses swapped");
    // (Test-run refuses frames shorter than an Ethernet header: the drop is not reachable here.)
}

/// The bench's insert baseline (`lb_baseline_insert`, the kernel's part of a new flow)
/// records the frame's 5-tuple and does nothing else.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn the_bench_insert_baseline_inserts_the_five_tuple_and_nothing_else() {
    require_root();
    let mut f = Fixture::new(CONFIG);
    let (pkt, key) = tcp4(C1, 40000, VIP4, 80);
    let before = f.snapshot();
    let (verdict, out) = f.run_program("lb_baseline_insert", &pkt);
    assert_eq!(verdict, XDP_TX, "a new entry");
    assert_eq!(out, pkt, "the frame untouched");
    assert!(
        f.dp.flow(&key).unwrap().is_some(),
        "the packet's 5-tuple recorded"
    );
    assert_eq!(f.dp.flow_count().unwrap(), 1, "that entry alone");
    assert_eq!(f.snapshot(), before, "no counter moved");
    let (verdict, _) = f.run_program("lb_baseline_insert", &pkt);
    assert_eq!(verdict, XDP_DROP, "the entry exists: no new one");
}

// ---- helpers used above -------------------------------------------------------------------------

fn arp_request(src: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::new();
    Ethernet2Header {
        source: CLIENT_MAC,
        destination: [0xff; 6],
        ether_type: EtherType::ARP,
    }
    .write(&mut out)
    .unwrap();
    // ARP payload (etherparse 0.16 has no ARP builder): htype 1, ptype IPv4, hlen 6, plen 4, op 1.
    out.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&target.octets());
    out
}

fn icmp4_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(1, 1);
    write(b, &[0u8; 32])
}

fn icmp6_echo(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src.octets(), dst.octets(), 64)
        .icmpv6_echo_request(1, 1);
    write(b, &[0u8; 32])
}

/// IPv6 with `n` extension headers (hop-by-hop first, then destination options) before TCP.
fn tcp6_with_ext(
    src: Ipv6Addr,
    sport: u16,
    dst: Ipv6Addr,
    dport: u16,
    n: usize,
) -> (Vec<u8>, lb_common::FlowKey) {
    let tcp = TcpHeader::new(sport, dport, 1, 64240);
    let mut exts = Vec::new();
    for i in 0..n {
        let next = if i + 1 == n {
            IpNumber::TCP
        } else {
            IpNumber::IPV6_DESTINATION_OPTIONS
        };
        // 6 bytes of PadN option → 8-byte header
        Ipv6RawExtHeader::new_raw(next, &[1, 4, 0, 0, 0, 0])
            .unwrap()
            .write(&mut exts)
            .unwrap();
    }
    let mut out = Vec::new();
    eth(EtherType::IPV6).write(&mut out).unwrap();
    let first = if n == 0 {
        IpNumber::TCP
    } else {
        IpNumber::IPV6_HEADER_HOP_BY_HOP
    };
    Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: (exts.len() + tcp.header_len()) as u16,
        next_header: first,
        hop_limit: 64,
        source: src.octets(),
        destination: dst.octets(),
    }
    .write(&mut out)
    .unwrap();
    out.extend_from_slice(&exts);
    tcp.write(&mut out).unwrap();
    (out, key6(src, sport, dst, dport, 6))
}

/// The loader's bug guard: an active backend with the zero MAC is refused before it reaches
/// the kernel, and the map keeps what it had.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn loader_refuses_an_active_backend_without_mac() {
    use lb_userspace::{
        dataplane::Maps as _,
        desired::{BackendId, Op},
    };
    let mut f = Fixture::new(CONFIG);
    let svc = f.service("web4");
    let id = svc.backends[0];
    let mut bad = f.backend(id);
    bad.mac = [0; 6];
    let e =
        f.dp.apply_ops(&[Op::Backend {
            id: BackendId(id),
            value: bad,
            fresh: false,
            meta: Default::default(),
        }])
        .expect_err("an active zero MAC must be refused");
    assert!(e.to_string().contains("MAC 00:00:00:00:00:00"), "{e}");
    // Traffic still goes to the backend's real MAC.
    let key = (40000..41000)
        .map(|p| key4(C1, p, VIP4, 80, 6))
        .find(|k| f.predict(k, "web4") == id)
        .unwrap();
    let (pkt, _) = tcp4(C1, u16::from_be_bytes(key.src_port), VIP4, 80);
    f.expect_forward("after the refused write", &pkt, &key, "web4");
}

// ---- lb trace ---------------------------------------------------------------------------------

/// The trace setting is the pinned `LB_TRACE_CFG`, which the program reads as a global of its
/// own data section: a program loaded onto the same pins (a restart of `lb run`, `--replace`)
/// starts with the setting as it was, so a running trace goes on, and it follows the setting
/// when it changes.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn a_running_trace_goes_on_through_a_reload_onto_the_pins() {
    use lb_common::TraceConfig;
    use lb_userspace::{dataplane::loader::Dataplane, trace::TraceMaps};
    require_root();
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/lb-bpf-test-{}", std::process::id()));
    lb_userspace::dataplane::pin::ensure_bpffs(&pin).expect("a bpffs");
    struct Cleanup<'a>(&'a std::path::Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    let _cleanup = Cleanup(&pin);
    let first = Dataplane::load_pinned(4099, 1024, &pin, [0; 6]).expect("load pinned");
    let mut pinned = TraceMaps::open_pinned(&pin).expect("the pinned trace maps");
    let on = TraceConfig {
        until_ns: u64::MAX,
        rate: 1000,
        ..TraceConfig::default()
    };
    pinned.set(&on).expect("trace on");
    let mut second =
        Dataplane::load_pinned(4099, 1024, &pin, [0; 6]).expect("reload onto the pins");
    assert_eq!(
        pinned.get().expect("read"),
        on,
        "loading a program onto the pins keeps the running trace's setting"
    );
    let pkt = tcp4(C1, 40100, VIP4, 80).0;
    let run = |dp: &mut Dataplane| run_on(dp, &pkt).0;
    let _ = pinned.reset();
    assert_eq!(run(&mut second), XDP_PASS, "no service: passed");
    assert_eq!(pinned.drain().len(), 1, "the reloaded program traces");
    pinned.set(&TraceConfig::default()).expect("trace off");
    assert_eq!(run(&mut second), XDP_PASS);
    assert!(
        pinned.drain().is_empty(),
        "off: the program follows the pinned setting"
    );
    drop(first);
}

/// The single pass counts a packet to no VIP once, in `LB_STATS_FAST` (not in `LB_STATS`), and
/// the controller's counters show it as both `pass_no_service` and `verdict_pass`. The map is
/// pinned: the counts survive a program loaded onto the same pins (a restart of `lb run`).
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn the_single_pass_counts_once_and_the_controller_shows_both_counters() {
    use lb_common::{
        names,
        stats::{FastStat, Stat},
    };
    use lb_userspace::{dataplane::loader::Dataplane, desired::DesiredState};
    require_root();
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/lb-bpf-fast-{}", std::process::id()));
    lb_userspace::dataplane::pin::ensure_bpffs(&pin).expect("a bpffs");
    struct Cleanup<'a>(&'a std::path::Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    let _cleanup = Cleanup(&pin);
    let mut first = Dataplane::load_pinned(4099, 1024, &pin, [0; 6]).expect("load pinned");
    let pkt = tcp4(C1, 40100, VIP4, 80).0;
    for _ in 0..5 {
        assert_eq!(run_on(&mut first, &pkt).0, XDP_PASS, "no service: passed");
    }
    let raw = |name: &str, i: u32| -> u64 {
        let map = aya::maps::MapData::from_pin(pin.join(name)).expect("pinned map");
        let a: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map)).unwrap();
        a.get(&i, 0).expect("read").iter().sum()
    };
    assert_eq!(raw(names::STATS_FAST, FastStat::NoServicePass as u32), 5);
    assert_eq!(raw(names::STATS, Stat::PassNoService as u32), 0);
    assert_eq!(raw(names::STATS, Stat::VerdictPass as u32), 0);
    let desired = DesiredState::empty(4099);
    let snap = first.snapshot(&desired).expect("snapshot");
    assert_eq!(snap.get(Stat::PassNoService), 5);
    assert_eq!(snap.get(Stat::VerdictPass), 5);
    assert_eq!(snap.get(Stat::FlowStateless) + snap.get(Stat::VerdictTx), 0);
    let mut second =
        Dataplane::load_pinned(4099, 1024, &pin, [0; 6]).expect("reload onto the pins");
    assert_eq!(run_on(&mut second, &pkt).0, XDP_PASS);
    let snap = second.snapshot(&desired).expect("snapshot");
    assert_eq!(snap.get(Stat::PassNoService), 6, "kept through the reload");
    assert_eq!(snap.get(Stat::VerdictPass), 6);
    drop(first);
}

/// Frames `single_pass` leaves for their layout alone take `single_pass_rest`: a UDP frame
/// shorter than 54 bytes (a payload under 12 bytes: a veth does not pad frames to 60 as a wire
/// does), and TCP and UDP frames with an 802.1Q tag. Forwarded with only their MACs changed
/// (the tag kept), counted once in `LB_STATS_FAST` as the single pass counts (the full path
/// would count `LB_STATS`); a tagged TCP frame to no VIP is passed the same way.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn short_udp_and_tagged_frames_take_the_single_pass() {
    use lb_common::stats::FastStat;
    let mut f = Fixture::new(CONFIG);
    let (short, key) = udp4(C1, 5353, VIP4, 53);
    assert!(short.len() < 54, "a {}-byte frame", short.len());
    let mut padded = short.clone();
    padded.resize(60, 0);
    f.expect_forward("a short IPv4 UDP frame to dns4", &short, &key, "dns4");
    f.expect_forward("the same padded to 60 bytes", &padded, &key, "dns4");
    let (tagged, key) = udp4_vlan(C1, 5353, VIP4, 53, 100);
    f.expect_forward("a tagged IPv4 UDP frame to dns4", &tagged, &key, "dns4");
    let ack = tcp4_vlan_flags(C2, 40010, VIP4, 80, 100, "A");
    let key = key4(C2, 40010, VIP4, 80, 6);
    f.expect_forward("a tagged TCP ACK to web4", &ack, &key, "web4");
    assert_eq!(
        f.dp.fast_stat(FastStat::StatelessTx).unwrap(),
        4,
        "all four through the single pass"
    );
    let other = tcp4_vlan_flags(C1, 40000, Ipv4Addr::new(10, 99, 0, 1), 22, 100, "A");
    f.expect_unchanged("a tagged TCP ACK to no VIP", &other, XDP_PASS);
    assert_eq!(f.dp.fast_stat(FastStat::NoServicePass).unwrap(), 1);
    let snap = f.snapshot();
    assert_eq!(snap.get(Stat::FlowStateless), 4);
    assert_eq!(snap.get(Stat::VerdictTx), 4);
    assert_eq!(snap.get(Stat::PassNoService), 1);
}

/// The trace carries each decision with the frame *as sent* (after the MAC rewrite), obeys its
/// filters and rate limit, and costs nothing visible when off.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn trace_reports_decisions_with_the_frames_as_sent() {
    use lb_common::{TRACE_F_BACKEND, TRACE_F_CLIENT, TRACE_F_VIP, TraceConfig};
    let mut f = Fixture::new(CONFIG);
    let mut t = f.dp.trace_maps().expect("trace maps");
    let on = TraceConfig {
        until_ns: u64::MAX,
        rate: 1000,
        ..TraceConfig::default()
    };
    // Off: nothing.
    f.run(&tcp4(C1, 40100, VIP4, 80).0);
    assert!(t.drain().is_empty(), "tracing is off by default");

    t.set(&on).unwrap();
    let (syn, key2) = tcp4(C1, 40102, VIP4, 80);
    let (v, out) = f.run(&syn);
    assert_eq!(v, XDP_TX);
    let non_vip = tcp4(C1, 40104, Ipv4Addr::new(10, 99, 0, 1), 22).0;
    f.run(&non_vip);
    let evs = t.drain();
    assert_eq!(evs.len(), 2, "{evs:?}");
    let e = &evs[0];
    assert_eq!(e.key, key2);
    assert_eq!((e.action, e.reason), (XDP_TX, Stat::FlowNew as u32));
    assert_eq!(e.pkt_len as usize, out.len());
    assert_eq!(&e.data[..e.cap_len as usize], &out[..], "the frame as sent");
    let b = f.predict(&key2, "web4");
    assert_eq!(e.backend, b);
    assert_eq!(
        (evs[1].action, evs[1].reason),
        (XDP_PASS, Stat::PassNoService as u32)
    );
    assert_eq!(&evs[1].data[..evs[1].cap_len as usize], &non_vip[..]);

    // Filters: VIP, client, backend MAC.
    let mut vip_only = on;
    vip_only.filters = TRACE_F_VIP;
    vip_only.vip[..4].copy_from_slice(&VIP_ANY.octets());
    t.set(&vip_only).unwrap();
    f.run(&tcp4(C1, 40106, VIP4, 80).0);
    f.run(&tcp4(C1, 40108, VIP_ANY, 443).0);
    let evs = t.drain();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].key.dst_addr[..4], VIP_ANY.octets());
    let mut client_only = on;
    client_only.filters = TRACE_F_CLIENT;
    client_only.client[..4].copy_from_slice(&C2.octets());
    t.set(&client_only).unwrap();
    f.run(&tcp4(C1, 40110, VIP4, 80).0);
    f.run(&tcp4(C2, 40110, VIP4, 80).0);
    let evs = t.drain();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].key.src_addr[..4], C2.octets());
    let mut backend_only = on;
    backend_only.filters = TRACE_F_BACKEND;
    backend_only.backend_mac = f.backend_mac(b);
    t.set(&backend_only).unwrap();
    let mut sent_to_b = 0;
    for p in 0..20u16 {
        let (pkt, k) = tcp4(C2, 41000 + 2 * p, VIP4, 80);
        f.run(&pkt);
        if f.predict(&k, "web4") == b {
            sent_to_b += 1;
        }
    }
    let evs = t.drain();
    assert!(sent_to_b > 0);
    assert_eq!(evs.len(), sent_to_b, "only frames to that backend");
    assert!(evs.iter().all(|e| e.data[..6] == f.backend_mac(b)));

    // Rate limit: 3 per second and CPU; the rest counted as suppressed. Expired: nothing.
    t.reset().unwrap();
    t.set(&TraceConfig { rate: 3, ..on }).unwrap();
    for p in 0..8u16 {
        f.run(&tcp4(C1, 42000 + 2 * p, VIP4, 80).0);
    }
    assert_eq!(t.drain().len(), 3);
    assert_eq!(t.losses(), (5, 0));
    t.set(&TraceConfig { until_ns: 1, ..on }).unwrap();
    f.run(&tcp4(C1, 43000, VIP4, 80).0);
    assert!(t.drain().is_empty(), "an expired lease traces nothing");
}

// ---- ICMP errors to the flow's owner ------------------------------------------------------------

/// The packet a backend sent to the client (from the VIP), as an ICMP error quotes it: the IP
/// header and the first 8 bytes of TCP (a router quotes at least that).
fn quoted4(vip: Ipv4Addr, vport: u16, client: Ipv4Addr, cport: u16) -> Vec<u8> {
    let b = PacketBuilder::ipv4(vip.octets(), client.octets(), 63)
        .tcp(vport, cport, 7, 64240)
        .ack(1);
    let mut full = Vec::new();
    b.write(&mut full, &[0u8; 1400]).unwrap();
    full.truncate(20 + 8);
    full
}

fn quoted6(vip: Ipv6Addr, vport: u16, client: Ipv6Addr, cport: u16) -> Vec<u8> {
    let b = PacketBuilder::ipv6(vip.octets(), client.octets(), 63)
        .tcp(vport, cport, 7, 64240)
        .ack(1);
    let mut full = Vec::new();
    b.write(&mut full, &[0u8; 1400]).unwrap();
    full.truncate(40 + 8);
    full
}

/// ICMPv4 "fragmentation needed" from a router to the VIP, quoting `quoted`.
fn frag_needed(router: Ipv4Addr, vip: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(router.octets(), vip.octets(), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ));
    write(b, quoted)
}

fn icmp4_unreachable(router: Ipv4Addr, vip: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(router.octets(), vip.octets(), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Host,
        ));
    write(b, quoted)
}

fn packet_too_big(router: Ipv6Addr, vip: Ipv6Addr, quoted: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(router.octets(), vip.octets(), 64)
        .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 });
    write(b, quoted)
}

fn icmp6_unreachable(router: Ipv6Addr, vip: Ipv6Addr, quoted: &[u8]) -> Vec<u8> {
    use etherparse::icmpv6::DestUnreachableCode;
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(router.octets(), vip.octets(), 64)
        .icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(
            DestUnreachableCode::Address,
        ));
    write(b, quoted)
}

/// Path-MTU discovery through the VIP: an ICMP "fragmentation needed" / "packet too big" (and
/// a destination unreachable) quoting a packet a backend sent for a VIP flow reaches exactly
/// that backend, with only the MACs changed, IPv4 and IPv6: the connection table's backend
/// when the flow is there (even when the table would now say otherwise), else the Maglev
/// table's. Errors quoting non-VIP packets, and echo, are passed.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn icmp_errors_reach_the_flows_backend() {
    let mut f = Fixture::new(CONFIG);
    let router = Ipv4Addr::new(10, 99, 0, 254);
    // A live flow.
    let (syn, key) = tcp4(C1, 45000, VIP4, 80);
    let owner = f.expect_forward("SYN", &syn, &key, "web4");
    for (desc, pkt) in [
        (
            "frag needed",
            frag_needed(router, VIP4, &quoted4(VIP4, 80, C1, 45000)),
        ),
        (
            "host unreachable",
            icmp4_unreachable(router, VIP4, &quoted4(VIP4, 80, C1, 45000)),
        ),
    ] {
        f.expect_mac(desc, &pkt, owner);
    }
    f.assert_stat(Stat::FlowIcmpError, 2);

    // The flow table wins over the table: record the flow on the other backend.
    let other = f
        .service("web4")
        .backends
        .into_iter()
        .find(|b| *b != owner)
        .unwrap();
    let (syn2, key2) = tcp4(C2, 45002, VIP4, 80);
    f.expect_forward("SYN 2", &syn2, &key2, "web4");
    let mut v = f.dp.flow(&key2).unwrap().unwrap();
    v.backend = other;
    v.generation = f.backend(other).generation;
    f.dp.set_flow(&key2, &v).unwrap();
    let (verdict, out) = f.run(&frag_needed(router, VIP4, &quoted4(VIP4, 80, C2, 45002)));
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        out[0..6],
        f.backend_mac(other),
        "the connection table's backend"
    );

    // Not in the table: the Maglev answer for that flow.
    let k3 = key4(C2, 45004, VIP4, 80, 6);
    let want = f.predict(&k3, "web4");
    let (verdict, out) = f.run(&frag_needed(router, VIP4, &quoted4(VIP4, 80, C2, 45004)));
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out[0..6], f.backend_mac(want));
    assert!(
        f.dp.flow(&k3).unwrap().is_none(),
        "an ICMP error records no flow"
    );

    // IPv6: packet too big and unreachable.
    let router6: Ipv6Addr = "fd00:99::fe".parse().unwrap();
    let (syn6, key6) = tcp6(C6, 45010, VIP6, 80);
    let owner6 = f.expect_forward("SYN v6", &syn6, &key6, "web6");
    for (desc, pkt) in [
        (
            "packet too big",
            packet_too_big(router6, VIP6, &quoted6(VIP6, 80, C6, 45010)),
        ),
        (
            "unreachable",
            icmp6_unreachable(router6, VIP6, &quoted6(VIP6, 80, C6, 45010)),
        ),
    ] {
        f.expect_mac(desc, &pkt, owner6);
    }

    // Errors quoting something that is not a VIP flow, and echo: passed, untouched.
    let lb4 = Ipv4Addr::new(10, 99, 0, 1);
    f.expect_unchanged(
        "frag needed for the LB's own traffic",
        &frag_needed(router, lb4, &quoted4(lb4, 22, C1, 45000)),
        XDP_PASS,
    );
    f.expect_unchanged(
        "frag needed quoting another port of the VIP",
        &frag_needed(router, VIP4, &quoted4(VIP4, 8080, C1, 45000)),
        XDP_PASS,
    );
    f.expect_unchanged("echo to the VIP", &icmp4_echo(C1, VIP4), XDP_PASS);
    // Addressed elsewhere than the quoted packet's source (the VIP): not forwarded (found by
    // the hostile-input property test).
    f.expect_unchanged(
        "an error quoting a VIP flow, sent to another address",
        &frag_needed(router, lb4, &quoted4(VIP4, 80, C1, 45000)),
        XDP_PASS,
    );
    f.expect_unchanged(
        "an error quoting only 4 bytes of IP",
        &frag_needed(router, VIP4, &quoted4(VIP4, 80, C1, 45000)[..4]),
        XDP_PASS,
    );
    f.assert_stat(Stat::PassIcmp, 5);
}

// ---- hostile input ----------------------------------------------------------------------------

/// Where a frame is going: the IPv4/IPv6 destination behind Ethernet and at most one VLAN tag.
fn ip_destination(frame: &[u8]) -> Option<std::net::IpAddr> {
    let mut off = 12;
    let mut et = u16::from_be_bytes(frame.get(off..off + 2)?.try_into().ok()?);
    off += 2;
    if et == 0x8100 {
        et = u16::from_be_bytes(frame.get(off + 2..off + 4)?.try_into().ok()?);
        off += 4;
    }
    match et {
        0x0800 => {
            let d: [u8; 4] = frame.get(off + 16..off + 20)?.try_into().ok()?;
            Some(d.into())
        }
        0x86dd => {
            let d: [u8; 16] = frame.get(off + 24..off + 40)?.try_into().ok()?;
            Some(d.into())
        }
        _ => None,
    }
}

/// Thousands of mutated and truncated frames through the real program, from seeds of every
/// kind it handles (TCP/UDP over IPv4/IPv6, VLAN, IPv4 options, IPv6 extension headers, ICMP
/// errors, fragments), with random bytes written anywhere (headers included, so lengths lie,
/// tags nest, extension chains break, ICMP quotes garbage) and random truncation: never
/// XDP_ABORTED; a frame that is passed or dropped is untouched; a frame that is sent out goes
/// to a VIP and differs from its input only in the two MAC addresses.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn hostile_frames_are_harmless() {
    use proptest::{
        prelude::*,
        test_runner::{Config, TestRunner},
    };
    let mut f = Fixture::new(CONFIG);
    let router = Ipv4Addr::new(10, 99, 0, 254);
    let seeds: Vec<Vec<u8>> = vec![
        tcp4(C1, 40000, VIP4, 80).0,
        udp4(C1, 5353, VIP4, 53).0,
        tcp6(C6, 40000, VIP6, 80).0,
        udp6(C6, 5353, VIP6, 53).0,
        tcp4_vlan(C1, 40000, VIP4, 80, 100).0,
        tcp4_with_options(C1, 40000, VIP4, 80, 12).0,
        tcp6_with_ext(C6, 40000, VIP6, 80, 3).0,
        tcp4(C1, 40000, VIP_ANY, 8080).0,
        frag_needed(router, VIP4, &quoted4(VIP4, 80, C1, 40000)),
        packet_too_big(
            "fd00:99::fe".parse().unwrap(),
            VIP6,
            &quoted6(VIP6, 80, C6, 40000),
        ),
        frag4(C1, VIP4, 7, true, 0, Some(5000)),
        frag4(C1, VIP4, 7, false, 3, None),
        frag6(C6, VIP6, 9, true, 0, Some(5000)),
        icmp4_echo(C1, VIP4),
        arp_request(C1, VIP4),
    ];
    let vips: Vec<std::net::IpAddr> =
        vec![VIP4.into(), VIP_ANY.into(), VIP_EMPTY.into(), VIP6.into()];
    let strategy = (
        0..seeds.len(),
        prop::collection::vec((0usize..200, any::<u8>()), 0..8),
        prop::option::weighted(0.3, 0usize..200),
        prop::option::weighted(0.1, prop::collection::vec(any::<u8>(), 4..12)),
    );
    // 20 000 in CI; `LB_FUZZ_CASES` for longer runs.
    let cases: u32 = std::env::var("LB_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    // (The runner wants a `Fn`: the fixture and the tallies live in cells.)
    let cell = std::cell::RefCell::new(&mut f);
    let (tx, passed, dropped) = (
        std::cell::Cell::new(0u32),
        std::cell::Cell::new(0u32),
        std::cell::Cell::new(0u32),
    );
    runner
        .run(&strategy, |(seed, writes, cut, insert)| {
            let mut pkt = seeds[seed].clone();
            if let Some(tag) = insert {
                // Extra bytes after the MACs: nested/garbage VLAN tags, shifted headers.
                let at = 12.min(pkt.len());
                pkt.splice(at..at, tag);
            }
            for (pos, byte) in writes {
                if let Some(b) = pkt.get_mut(pos) {
                    *b = byte;
                }
            }
            if let Some(n) = cut {
                pkt.truncate(n);
            }
            if pkt.len() < 14 {
                pkt.resize(14, 0);
            }
            let (v, out) = cell.borrow_mut().run(&pkt);
            prop_assert_ne!(v, XDP_ABORTED, "aborted on {:02x?}", pkt);
            match v {
                XDP_TX | XDP_REDIRECT => {
                    tx.set(tx.get() + 1);
                    prop_assert_eq!(out.len(), pkt.len());
                    prop_assert_eq!(&out[12..], &pkt[12..], "only the MACs may change");
                    let dst = ip_destination(&pkt);
                    prop_assert!(
                        dst.is_some_and(|d| vips.contains(&d)),
                        "sent a frame not to a VIP ({:?}): {:02x?}",
                        dst,
                        pkt
                    );
                }
                XDP_PASS | XDP_DROP => {
                    let c = if v == XDP_PASS { &passed } else { &dropped };
                    c.set(c.get() + 1);
                    prop_assert_eq!(&out, &pkt, "a frame not sent out is untouched");
                }
                other => prop_assert!(false, "verdict {}", other),
            }
            Ok(())
        })
        .unwrap();
    let (tx, passed, dropped) = (tx.get(), passed.get(), dropped.get());
    println!(
        "{cases} hostile frames: {tx} sent out (to a VIP, only MACs changed), {passed} passed, {dropped} dropped, untouched"
    );
    assert!(
        tx > cases / 20 && passed > cases / 20 && dropped > cases / 200,
        "every path exercised"
    );
    f.assert_stat(Stat::VerdictAborted, 0);
}

/// `lb_xdp` decides the commonest IPv4 and IPv6 packets in one pass (no VIP; established TCP
/// and UDP of an unchanged maglev/sh slot) and takes the full path while a trace runs. Both must decide
/// alike: the same frames (valid ones of every kind and TCP flag, and hostile variants of
/// them) through two data planes of one config, one tracing, give the same verdicts, the same
/// output bytes and, at the end, the same counters (global, per service, per backend). Once
/// with unchanged tables, once with every slot marked changed (all recorded), once with a
/// service that records connections only on change.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn the_single_pass_path_decides_as_the_full_path() {
    use lb_common::TraceConfig;
    use proptest::{
        prelude::*,
        test_runner::{Config, TestRunner},
    };
    let mut seeds: Vec<Vec<u8>> = vec![
        udp4(C1, 5353, VIP4, 53).0,
        udp4(C2, 5354, VIP4, 53).0,
        tcp4(C1, 40000, VIP_ANY, 8080).0,
        tcp4(C1, 40000, Ipv4Addr::new(10, 99, 0, 1), 22).0,
        udp4(C1, 40000, Ipv4Addr::new(10, 99, 0, 1), 53).0,
        tcp4_vlan(C1, 40000, VIP4, 80, 100).0,
        tcp4_with_options(C1, 40000, VIP4, 80, 12).0,
        tcp6(C6, 40000, VIP6, 80).0,
        frag4(C1, VIP4, 7, true, 0, Some(5000)),
        icmp4_echo(C1, VIP4),
    ];
    for flags in ["S", "A", "PA", "FA", "R", "SA", ""] {
        seeds.push(tcp4_flags(C1, 40002, VIP4, 80, flags));
        seeds.push(tcp4_flags(C2, 40004, VIP4, 80, flags));
        seeds.push(tcp6_flags(C6, 40006, VIP6, 80, flags));
    }
    for flags in ["S", "A", "PA", "FA", "R", ""] {
        seeds.push(tcp4_vlan_flags(C1, 40008, VIP4, 80, 100, flags));
    }
    seeds.extend([
        udp4_vlan(C2, 5355, VIP4, 53, 7).0,
        tcp4_vlan_flags(C1, 40000, Ipv4Addr::new(10, 99, 0, 1), 22, 100, "A"),
        udp6(C6, 5353, VIP6, 53).0,
        tcp6(C6, 40000, "fd00:99::1".parse().unwrap(), 22).0,
        tcp6_with_ext(C6, 40000, VIP6, 80, 1).0,
    ]);
    let strategy = (
        0..seeds.len(),
        prop::collection::vec((0usize..80, any::<u8>()), 0..3),
        prop::option::weighted(0.1, 0usize..80),
    );
    // And with web4 recording its connections only on change (SYNs take the single pass).
    let on_change = on_change(CONFIG);
    for (recording, cfg) in [(false, CONFIG), (true, CONFIG), (false, on_change.as_str())] {
        let make = || {
            if recording {
                Fixture::recording(cfg)
            } else {
                Fixture::new(cfg)
            }
        };
        let (mut single, mut full) = (make(), make());
        let mut t = full.dp.trace_maps().expect("trace maps");
        t.set(&TraceConfig {
            until_ns: u64::MAX,
            rate: u32::MAX,
            ..TraceConfig::default()
        })
        .unwrap();
        let cell = std::cell::RefCell::new((&mut single, &mut full));
        let mut runner = TestRunner::new(Config {
            cases: 4_000,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&strategy, |(seed, writes, cut)| {
                let mut pkt = seeds[seed].clone();
                for (pos, byte) in writes {
                    if let Some(b) = pkt.get_mut(pos) {
                        *b = byte;
                    }
                }
                if let Some(n) = cut {
                    pkt.truncate(n.max(14));
                }
                let mut c = cell.borrow_mut();
                let a = c.0.run(&pkt);
                let b = c.1.run(&pkt);
                prop_assert_eq!(a, b, "frame {:02x?}", pkt);
                Ok(())
            })
            .unwrap();
        let _ = t.drain();
        let (a, b) = (single.snapshot(), full.snapshot());
        assert_eq!(
            a.global, b.global,
            "global counters (recording: {recording})"
        );
        assert_eq!(a.services, b.services, "per-service counters");
        assert_eq!(a.backends, b.backends, "per-backend counters");
        assert!(
            a.get(Stat::FlowStateless) > 0 || recording,
            "the single pass was taken"
        );
        assert!(a.get(Stat::PassNoService) > 0 && a.get(Stat::FlowNew) > 0);
    }
}

// ---- flow sharing -------------------------------------------------------------------------------

/// `LB_SYNC`: off by default; on, each new connection-table entry is reported once (key,
/// backend id, generation), known flows are not, at most `rate` per second and CPU (the rest
/// counted). An entry a peer shared decides the flow's backend here, whatever the scheduler
/// would say, and a local entry is never overwritten by a shared one.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn new_flows_are_reported_and_shared_flows_are_followed() {
    use lb_userspace::dataplane::Maps as _;
    let mut f = Fixture::new(&sched_config("rr", &[100, 100, 100]));
    let mut sync = f.dp.take_sync_maps().expect("sync maps");
    let events = |sync: &mut lb_userspace::flowsync::SyncMaps| {
        let mut out = Vec::new();
        while let Some(item) = sync.ring.next() {
            assert_eq!(item.len(), size_of::<lb_common::SyncEvent>());
            // SAFETY: the item is one SyncEvent (length checked), plain old data.
            out.push(unsafe {
                std::ptr::read_unaligned(item.as_ptr().cast::<lb_common::SyncEvent>())
            });
        }
        out
    };
    f.syn(C1, 50000);
    assert!(events(&mut sync).is_empty(), "off by default");

    sync.set_rate(1000).unwrap();
    let (syn, key) = tcp4(C1, 50002, VIP4, 80);
    let (v, out) = f.run(&syn);
    assert_eq!(v, XDP_TX);
    let b = f.service("s").backends[f.backend_index(&out, "s")];
    f.run(&syn); // the same flow again: a hit, not reported
    let evs = events(&mut sync);
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].key, key);
    assert_eq!(evs[0].backend, b);
    assert_eq!(evs[0].generation, f.backend(b).generation);
    f.assert_stat(Stat::FlowSyncReported, 1);

    // Rate: 3 per second and CPU.
    sync.set_rate(3).unwrap();
    for p in 0..8u16 {
        f.syn(C1, 51000 + 2 * p);
    }
    assert_eq!(
        events(&mut sync).len(),
        2,
        "3 in this second, one used above"
    );
    f.assert_stat(Stat::FlowSyncSuppressed, 6);

    // A shared entry: the flow goes where the peer sent it (rr would pick by its cursor).
    sync.set_rate(0).unwrap();
    let ids = f.service("s").backends.clone();
    for (i, target) in ids.iter().cycle().take(6).enumerate() {
        let (pkt, key) = tcp4(C2, 52000 + 2 * i as u16, VIP4, 80);
        let value = lb_common::FlowValue {
            backend: *target,
            generation: f.backend(*target).generation,
            last_seen_ns: 0,
            flags: 0,
            cpu: lb_common::FLOW_CPU_PEER,
        };
        assert!(f.dp.insert_shared_flow(&key, &value).unwrap(), "inserted");
        f.expect_mac("a shared flow", &pkt, *target);
        let other = ids[(ids.iter().position(|x| x == target).unwrap() + 1) % ids.len()];
        let moved = lb_common::FlowValue {
            backend: other,
            ..value
        };
        assert!(
            !f.dp.insert_shared_flow(&key, &moved).unwrap(),
            "an existing entry stays"
        );
        f.expect_mac("still where it was", &pkt, *target);
    }
    assert!(events(&mut sync).is_empty(), "off again");
}

/// A unicast frame to another host's MAC (a bridge flooding it, promiscuous mode) is never
/// forwarded, even to a VIP: passed untouched and counted. Broadcast/multicast destinations
/// take the normal path (ARP).
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn frames_to_another_mac_are_not_forwarded() {
    let mut f = Fixture::new(CONFIG);
    let (mut pkt, key) = tcp4(C1, 40000, VIP4, 80);
    pkt[0..6].copy_from_slice(&[0x02, 0x99, 0, 0, 1, 2]);
    f.expect_unchanged("to another node's MAC", &pkt, XDP_PASS);
    f.assert_stat(Stat::PassOtherHost, 1);
    f.assert_stat(Stat::FlowNew, 0);
    pkt[0..6].copy_from_slice(&LB_MAC);
    f.expect_forward("to this interface's MAC", &pkt, &key, "web4");
    f.expect_unchanged(
        "broadcast ARP",
        &arp_request(C1, Ipv4Addr::new(10, 99, 0, 2)),
        XDP_PASS,
    );
    f.assert_stat(Stat::PassNotIp, 1);
    f.assert_stat(Stat::PassOtherHost, 1);
    // All six bytes count, and only those (the check reads eight: two of the source MAC).
    let mut last = LB_MAC;
    last[5] ^= 0x40;
    pkt[0..6].copy_from_slice(&last);
    f.expect_unchanged("differs in the last byte", &pkt, XDP_PASS);
    f.assert_stat(Stat::PassOtherHost, 2);
    pkt[0..6].copy_from_slice(&LB_MAC);
    pkt[6] ^= 0xff;
    pkt[7] ^= 0xff;
    f.expect_forward("another source MAC", &pkt, &key, "web4");
    f.assert_stat(Stat::PassOtherHost, 2);
}

// ---- the service cache ------------------------------------------------------------------------

/// An IPv4 or IPv6 service is found in `LB_SVC_CACHE` (the hash map is not even read: with the
/// map entry removed behind the controller's back, the cached service still forwards), unless
/// its entry is being written (odd sequence count) or names another key (IPv6: down to the
/// address's last word): then the hash map decides.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn services_are_found_in_the_cache() {
    use lb_common::svc_cache::{KEY_LO, KEY_REST, SEQ, WORDS, slot};
    for (name, v4) in [("web4", true), ("web6", false)] {
        let mut f = Fixture::new(CONFIG);
        let skey = f.service_key(name);
        let k = skey.cache_key();
        let base = slot(&k) * WORDS as u32;
        let word = |f: &Fixture, i: usize| f.dp.svc_cache_word(base + i as u32);
        assert_eq!(word(&f, KEY_LO), k.0[0], "the controller cached {name}");
        assert_eq!(word(&f, KEY_REST + 2), k.0[4], "{name}: the last key word");
        let seq = word(&f, SEQ);
        assert_eq!(seq % 2, 0, "not being written");
        f.dp.remove_service_entry(&skey).unwrap();
        let pkt = |port: u16| {
            if v4 {
                tcp4(C1, port, VIP4, 80)
            } else {
                tcp6(C6, port, VIP6, 80)
            }
        };
        let (p, key) = pkt(40000);
        f.expect_forward("from the cache alone", &p, &key, name);
        // An entry being written is not used: the hash map (without the service now) says no
        // service.
        f.dp.set_svc_cache_word(base + SEQ as u32, seq + 1);
        let (p, key) = pkt(40001);
        f.expect_unchanged("entry being written", &p, XDP_PASS);
        f.assert_stat(Stat::PassNoService, 1);
        // Complete again, but the key names another service: not used either.
        let (at, good) = if v4 {
            (KEY_LO, k.0[0])
        } else {
            (KEY_REST + 2, k.0[4])
        };
        f.dp.set_svc_cache_word(base + SEQ as u32, seq + 2);
        f.dp.set_svc_cache_word(base + at as u32, good ^ 1);
        f.expect_unchanged("another key", &p, XDP_PASS);
        f.assert_stat(Stat::PassNoService, 2);
        // Restored: used again.
        f.dp.set_svc_cache_word(base + at as u32, good);
        f.expect_forward("restored", &p, &key, name);
    }
}

// ---- stateless slots (maglev/sh) ----------------------------------------------------------------

/// Established TCP (no SYN/FIN/RST) and UDP of a maglev service through an unchanged slot are
/// forwarded by the slot alone: a (deliberately wrong) connection-table entry is not even read,
/// and UDP is not recorded. SYN, FIN and RST go through the table; a changed slot
/// (`RING_DIRTY`) consults it too, and a new flow there follows the slot's backend. A changed
/// slot that names its previous backend (`RING_PREV`) sends an unrecorded flow's packets
/// (mid-stream TCP, UDP) there and records them with it, while a SYN takes the slot's backend;
/// a previous backend that is not usable any more is ignored.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn established_tcp_of_an_unchanged_slot_skips_the_table() {
    let mut f = Fixture::new(CONFIG);
    let svc = f.service("web4");
    let (syn, key) = tcp4(C1, 45000, VIP4, 80);
    let b = f.expect_forward("SYN", &syn, &key, "web4");
    let other = *svc.backends.iter().find(|x| **x != b).unwrap();
    let mut wrong = f.dp.flow(&key).unwrap().expect("recorded at the SYN");
    wrong.backend = other;
    wrong.generation = f.backend(other).generation;
    f.dp.set_flow(&key, &wrong).unwrap();
    let ack = tcp4_flags(C1, 45000, VIP4, 80, "A");
    f.expect_mac("ACK through an unchanged slot: the slot decides", &ack, b);
    f.assert_stat(Stat::FlowStateless, 1);
    f.assert_stat(Stat::FlowHit, 0);
    let psh = tcp4_flags(C1, 45000, VIP4, 80, "PA");
    f.expect_mac("data", &psh, b);
    f.assert_stat(Stat::FlowStateless, 2);
    for flags in ["S", "FA", "R"] {
        f.expect_mac(
            &format!("{flags}: the table decides"),
            &tcp4_flags(C1, 45000, VIP4, 80, flags),
            other,
        );
    }
    f.assert_stat(Stat::FlowStateless, 2);
    // UDP: the slot, nothing recorded; an entry (recorded while the slot was changed) is not
    // read.
    let (udp, ukey) = udp4(C1, 45001, VIP4, 53);
    let ub = f.expect_forward("UDP", &udp, &ukey, "dns4");
    assert!(
        f.dp.flow(&ukey).unwrap().is_none(),
        "UDP of an unchanged slot: not recorded"
    );
    f.assert_stat(Stat::FlowStateless, 3);
    let dns = f.service("dns4");
    let uother = *dns.backends.iter().find(|x| **x != ub).unwrap();
    let uwrong = lb_common::FlowValue {
        backend: uother,
        generation: f.backend(uother).generation,
        ..wrong
    };
    f.dp.set_flow(&ukey, &uwrong).unwrap();
    f.expect_mac("UDP: the slot decides", &udp, ub);
    f.assert_stat(Stat::FlowStateless, 4);

    // The slot changes (marked): the table decides the ACK.
    let slot = svc.slot_of(&key);
    f.dp.set_slot(svc.ring_index(&key), b | lb_common::RING_DIRTY)
        .unwrap();
    f.expect_mac("ACK through a changed slot: its flow's entry", &ack, other);
    f.assert_stat(Stat::FlowStateless, 4);
    // Other flows on the same slot.
    let same_slot = |skip: usize| svc.flow_on_slot(slot, 1, skip);
    // A new flow through a changed slot: the slot's backend (without the mark), recorded.
    let (a2, p2, key2) = same_slot(0);
    let syn2 = tcp4(a2, p2, VIP4, 80).0;
    f.expect_mac("new flow through a changed slot", &syn2, b);
    assert_eq!(f.dp.flow(&key2).unwrap().unwrap().backend, b);
    // No entry, changed slot without a previous backend, mid-stream: the slot's, recorded.
    f.dp.set_slot(svc.value.ring_base + slot, other | lb_common::RING_DIRTY)
        .unwrap();
    let (a3, p3, key3) = same_slot(1);
    let ack3 = tcp4_flags(a3, p3, VIP4, 80, "A");
    f.expect_mac("mid-stream, no entry, changed slot", &ack3, other);
    assert_eq!(f.dp.flow(&key3).unwrap().unwrap().backend, other);

    // The slot went from b to other and names b: a flow without an entry (evicted) stays on b,
    // recorded with it; a SYN takes other.
    let v = lb_common::ring_value(other, true, Some(b));
    f.dp.set_slot(svc.value.ring_base + slot, v).unwrap();
    let (a4, p4, key4_) = same_slot(2);
    f.expect_mac(
        "mid-stream, no entry, previous backend",
        &tcp4_flags(a4, p4, VIP4, 80, "A"),
        b,
    );
    // Counted from now (a connection kept off the table by the record limit was never counted;
    // one whose entry was evicted was, and its count stays as stale as the eviction left it):
    // a drain of b waits for it.
    let e = f.dp.flow(&key4_).unwrap().unwrap();
    assert_eq!(
        (e.backend, e.flags & lb_common::FLOW_F_COUNTED),
        (b, lb_common::FLOW_F_COUNTED)
    );
    f.expect_mac("and after", &tcp4_flags(a4, p4, VIP4, 80, "PA"), b);
    let (a5, p5, key5) = same_slot(3);
    f.expect_mac(
        "a SYN: the slot's backend",
        &tcp4(a5, p5, VIP4, 80).0,
        other,
    );
    assert_eq!(f.dp.flow(&key5).unwrap().unwrap().backend, other);
    // The previous backend is gone: ignored.
    let mut gone = f.backend(b);
    gone.flags &= !BACKEND_F_ACTIVE;
    f.dp.set_backend(b, &gone).unwrap();
    let (a7, p7, key7) = same_slot(4);
    f.expect_mac(
        "previous backend not usable: the slot's",
        &tcp4_flags(a7, p7, VIP4, 80, "A"),
        other,
    );
    assert_eq!(f.dp.flow(&key7).unwrap().unwrap().backend, other);
}

/// `record_connections = "on_change"` (a TCP maglev service): a SYN through an unchanged slot
/// is forwarded by the slot and not recorded (`flow_stateless`, a new flow of the service and
/// the backend, no active connection); FIN and RST without an entry insert nothing; once the
/// slot changes and names its previous backend, an unrecorded connection's next packet goes
/// there and is recorded, counted, and its FIN closes it; a SYN then takes the slot's backend
/// and is recorded. A recorded connection of an unchanged slot is closed by its FIN.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn on_change_records_tcp_only_when_its_slot_changed() {
    let mut f = Fixture::new(&on_change(CONFIG));
    let svc = f.service("web4");
    assert_eq!(svc.value.flags, lb_common::SVC_F_TCP_ON_CHANGE);
    let (syn, key) = tcp4(C1, 48000, VIP4, 80);
    let b = f.expect_forward("SYN through an unchanged slot", &syn, &key, "web4");
    assert!(f.dp.flow(&key).unwrap().is_none(), "the SYN: not recorded");
    f.assert_stat(Stat::FlowStateless, 1);
    f.assert_stat(Stat::FlowNew, 0);
    let snap = f.snapshot();
    assert_eq!(
        snap.services[&svc.value.id].new_flows, 1,
        "a new flow of the service"
    );
    assert_eq!(snap.backends[&b].new_flows, 1, "and of the backend");
    assert_eq!(active(&mut f, b), 0);
    f.expect_mac("ACK", &tcp4_flags(C1, 48000, VIP4, 80, "A"), b);
    for flags in ["FA", "R"] {
        f.expect_mac(
            &format!("{flags} without an entry: the slot"),
            &tcp4_flags(C1, 48000, VIP4, 80, flags),
            b,
        );
        assert!(
            f.dp.flow(&key).unwrap().is_none(),
            "{flags}: nothing inserted"
        );
    }
    f.assert_stat(Stat::FlowNew, 0);
    assert_eq!(
        f.snapshot().services[&svc.value.id].new_flows,
        1,
        "FIN, RST: no new flow"
    );

    // The slot changes from b to other and names b.
    let other = *svc.backends.iter().find(|x| **x != b).unwrap();
    let slot = svc.slot_of(&key);
    f.dp.set_slot(
        svc.ring_index(&key),
        lb_common::ring_value(other, true, Some(b)),
    )
    .unwrap();
    f.expect_mac(
        "unrecorded connection after the change: its previous backend",
        &tcp4_flags(C1, 48000, VIP4, 80, "PA"),
        b,
    );
    let e = f.dp.flow(&key).unwrap().expect("recorded");
    assert_eq!(e.backend, b);
    assert_ne!(e.flags & lb_common::FLOW_F_COUNTED, 0, "counted from now");
    assert_eq!(active(&mut f, b), 1);
    f.expect_mac("FIN: closes it", &tcp4_flags(C1, 48000, VIP4, 80, "FA"), b);
    assert_eq!(active(&mut f, b), 0);
    let (a3, p3, key3) = svc.flow_on_slot(slot, 2, 0);
    f.expect_mac(
        "a SYN through the changed slot: its backend",
        &tcp4(a3, p3, VIP4, 80).0,
        other,
    );
    let e = f.dp.flow(&key3).unwrap().expect("recorded at the SYN");
    assert_eq!(e.backend, other);
    assert_eq!(active(&mut f, other), 1);

    // The mark cleared (the sweep found no entry of another backend): the recorded
    // connection's packets take the slot, its FIN still finds and closes its entry.
    f.dp.set_slot(svc.value.ring_base + slot, other).unwrap();
    f.expect_mac(
        "ACK, unchanged slot",
        &tcp4_flags(a3, p3, VIP4, 80, "A"),
        other,
    );
    f.expect_mac("FIN", &tcp4_flags(a3, p3, VIP4, 80, "FA"), other);
    assert_ne!(
        f.dp.flow(&key3).unwrap().unwrap().flags & lb_common::FLOW_F_CLOSED,
        0,
        "closed"
    );
    assert_eq!(active(&mut f, other), 0);
}

/// UDP through a changed slot that names its previous backend: an unrecorded flow (a new one
/// cannot be told from it) goes to the previous backend and is recorded there, counted.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn udp_of_a_changed_slot_stays_with_its_previous_backend() {
    let mut f = Fixture::new(CONFIG);
    let dns = f.service("dns4");
    let (udp, key) = udp4(C1, 46000, VIP4, 53);
    let b = f.expect_forward("UDP", &udp, &key, "dns4");
    let other = *dns.backends.iter().find(|x| **x != b).unwrap();
    f.dp.set_slot(
        dns.ring_index(&key),
        lb_common::ring_value(other, true, Some(b)),
    )
    .unwrap();
    f.expect_mac("unrecorded UDP flow: its previous backend", &udp, b);
    let e = f.dp.flow(&key).unwrap().expect("recorded");
    assert_eq!(e.backend, b);
    assert_ne!(e.flags & lb_common::FLOW_F_COUNTED, 0, "a UDP flow counts");
    f.assert_stat(Stat::FlowNew, 1);
    f.expect_mac("then its entry", &udp, b);
    f.assert_stat(Stat::FlowHit, 1);
}

/// The sweep and stateless slots: an open entry of an unchanged slot is never expired by
/// idleness (its packets do not touch it), a closed one is; once its slot changes it gets a
/// full idle timeout from the change; an entry naming another backend keeps its slot changed.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn sweep_keeps_open_flows_of_unchanged_slots() {
    use std::collections::BTreeMap;
    let mut f = Fixture::new(CONFIG);
    let svc = f.service("web4");
    let (syn, key) = tcp4(C1, 47000, VIP4, 80);
    let b = f.expect_forward("open", &syn, &key, "web4");
    let (syn2, key2) = tcp4(C1, 47002, VIP4, 80);
    f.run(&syn2);
    f.run(&tcp4_flags(C1, 47002, VIP4, 80, "FA"));
    let seen = f.dp.flow(&key).unwrap().unwrap().last_seen_ns;
    let t = lb_userspace::config::Timeouts {
        tcp: 100,
        tcp_fin: 10,
        udp: 5,
    };
    let mut changed = BTreeMap::new();
    let view = lb_userspace::desired::TableView::new(&f.desired, &changed);
    let s = f.dp.sweep(seen + 10_000_000_000_000, &t, &view).unwrap();
    assert_eq!((s.entries, s.exempt, s.expired), (2, 1, 1), "{s:?}");
    assert!(
        f.dp.flow(&key).unwrap().is_some(),
        "open, unchanged slot: kept"
    );
    assert!(f.dp.flow(&key2).unwrap().is_none(), "closed: expired");
    assert!(s.still_dirty.is_empty());

    // The slot changes at t0: a full timeout from then.
    let slot = svc.slot_of(&key);
    let web4 = f
        .desired
        .services
        .iter()
        .position(|s| s.name == "web4")
        .unwrap();
    f.desired.services[web4].dirty.insert(slot);
    let t0 = seen + 20_000_000_000_000;
    changed.insert(svc.value.id, t0);
    let view = lb_userspace::desired::TableView::new(&f.desired, &changed);
    let s = f.dp.sweep(t0 + 50_000_000_000, &t, &view).unwrap();
    assert_eq!((s.expired, s.exempt), (0, 0), "{s:?}");
    assert!(
        s.still_dirty.is_empty(),
        "its entry names the slot's backend"
    );
    // An entry naming another backend keeps the slot changed.
    let other = *svc.backends.iter().find(|x| **x != b).unwrap();
    let mut v = f.dp.flow(&key).unwrap().unwrap();
    v.backend = other;
    v.generation = f.backend(other).generation;
    f.dp.set_flow(&key, &v).unwrap();
    let s = f.dp.sweep(t0 + 50_000_000_000, &t, &view).unwrap();
    assert!(s.still_dirty.contains(&(svc.value.id, slot)), "{s:?}");
    // Past the timeout from the change: expired.
    let s = f.dp.sweep(t0 + 101_000_000_000, &t, &view).unwrap();
    assert_eq!(s.expired, 1);
    assert!(s.still_dirty.is_empty());
}

/// A UDP entry of an unchanged slot (recorded while the slot was changed) expires by idleness,
/// its count subtracted: its packets take the slot to the same backend and do not refresh it.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn sweep_expires_udp_entries_of_unchanged_slots() {
    use std::collections::BTreeMap;
    let mut f = Fixture::new(CONFIG);
    let (udp, key) = udp4(C1, 47100, VIP4, 53);
    let b = f.expect_forward("UDP", &udp, &key, "dns4");
    let v = lb_common::FlowValue {
        backend: b,
        generation: f.backend(b).generation,
        last_seen_ns: 1,
        flags: lb_common::FLOW_F_COUNTED,
        cpu: 0,
    };
    f.dp.set_flow(&key, &v).unwrap();
    f.expect_mac("still the slot", &udp, b);
    assert_eq!(
        f.dp.flow(&key).unwrap().unwrap().last_seen_ns,
        1,
        "not refreshed"
    );
    let t = lb_userspace::config::Timeouts {
        tcp: 100,
        tcp_fin: 10,
        udp: 5,
    };
    let changed = BTreeMap::new();
    let view = lb_userspace::desired::TableView::new(&f.desired, &changed);
    let s = f.dp.sweep(10_000_000_000, &t, &view).unwrap();
    assert_eq!((s.entries, s.exempt, s.expired), (1, 0, 1), "{s:?}");
    assert!(f.dp.flow(&key).unwrap().is_none());
}

/// With `record_connections = "on_change"` an open TCP entry of an unchanged slot (recorded
/// while the slot was changed) is not needed either: it expires by idleness, its count
/// subtracted, and the connection goes on by its slot (with `"at_syn"` it is kept, above).
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn sweep_expires_on_change_tcp_entries_of_unchanged_slots() {
    use std::collections::BTreeMap;
    let mut f = Fixture::new(&on_change(CONFIG));
    let svc = f.service("web4");
    let (_, key) = tcp4(C1, 47200, VIP4, 80);
    let ack = tcp4_flags(C1, 47200, VIP4, 80, "A");
    let b = f.predict(&key, "web4");
    // Recorded through its changed slot (counted), then the mark is cleared.
    let other = *svc.backends.iter().find(|x| **x != b).unwrap();
    f.dp.set_slot(
        svc.ring_index(&key),
        lb_common::ring_value(other, true, Some(b)),
    )
    .unwrap();
    f.expect_mac("recorded with its previous backend", &ack, b);
    assert_eq!(active(&mut f, b), 1);
    f.dp.set_slot(svc.ring_index(&key), b).unwrap();
    let seen = f.dp.flow(&key).unwrap().unwrap().last_seen_ns;
    f.expect_mac("unchanged slot", &ack, b);
    let t = lb_userspace::config::Timeouts {
        tcp: 100,
        tcp_fin: 10,
        udp: 5,
    };
    let changed = BTreeMap::new();
    let view = lb_userspace::desired::TableView::new(&f.desired, &changed);
    let s = f.dp.sweep(seen + 101_000_000_000, &t, &view).unwrap();
    assert_eq!((s.entries, s.exempt, s.expired), (1, 0, 1), "{s:?}");
    assert!(f.dp.flow(&key).unwrap().is_none());
    assert_eq!(active(&mut f, b), 0, "its count subtracted");
    f.expect_mac("and it goes on by its slot", &ack, b);
    assert!(f.dp.flow(&key).unwrap().is_none(), "unrecorded");
}

/// A SYN flood (ten times the connection table's size in distinct new 5-tuples) evicts the
/// established flows' entries, yet their packets keep their backends: their slots never
/// changed, so the slot decides (issue #13, SYN flood). The flood's own SYNs are all forwarded.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn established_flows_keep_their_backend_through_a_syn_flood() {
    let mut f = Fixture::with_flow_table(CONFIG, 1024);
    let flows: Vec<(u16, FlowKey, u32)> = (0..50u16)
        .map(|i| {
            let (syn, key) = tcp4(C1, 30000 + 2 * i, VIP4, 80);
            let b = f.expect_forward("establish", &syn, &key, "web4");
            (30000 + 2 * i, key, b)
        })
        .collect();
    for i in 0..10_240u32 {
        let src = Ipv4Addr::new(10, 97, (i >> 8) as u8, i as u8);
        let (v, _) = f.run(&tcp4(src, 1024 + (i % 50_000) as u16, VIP4, 80).0);
        assert_eq!(v, XDP_TX, "a flood SYN is a new flow like any other");
    }
    let evicted = flows
        .iter()
        .filter(|(_, k, _)| f.dp.flow(k).unwrap().is_none())
        .count();
    assert!(
        evicted > 40,
        "the flood evicted the entries ({evicted} of 50)"
    );
    let before = f.snapshot().get(Stat::FlowStateless);
    for (port, _, b) in &flows {
        f.expect_mac(
            "established after the flood",
            &tcp4_flags(C1, *port, VIP4, 80, "A"),
            *b,
        );
    }
    assert_eq!(f.snapshot().get(Stat::FlowStateless) - before, 50);
}

/// Counted SYNs [`overfull_table`] sends into its 1 024-entry table.
const OVERFULL_SYNS: u32 = 4096;

/// Connection `i` of [`overfull_table`]: (client address in 10.`net`/16, client port).
fn overfull_conn(net: u8, i: u32) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(10, net, (i >> 8) as u8, i as u8),
        1024 + i as u16,
    )
}

/// A 1 024-entry connection table after [`OVERFULL_SYNS`] counted SYNs to web4 (connections
/// [`overfull_conn`]): the LRU evicted the older entries. Returns the fixture, the entries
/// still held by backend, and the time of the last one.
fn overfull_table(net: u8) -> (Fixture, std::collections::BTreeMap<u32, u64>, u64) {
    let mut f = Fixture::with_flow_table(CONFIG, 1024);
    for i in 0..OVERFULL_SYNS {
        let (src, port) = overfull_conn(net, i);
        assert_eq!(f.run(&tcp4(src, port, VIP4, 80).0).0, XDP_TX);
    }
    let mut held = std::collections::BTreeMap::new();
    let mut seen = 0;
    for i in 0..OVERFULL_SYNS {
        let (src, port) = overfull_conn(net, i);
        if let Some(v) = f.dp.flow(&key4(src, port, VIP4, 80, 6)).unwrap() {
            *held.entry(v.backend).or_default() += 1;
            seen = v.last_seen_ns;
        }
    }
    (f, held, seen)
}

/// What the LRU's evictions mean for active connections (issue #13): a counted connection
/// whose entry a full table evicted has no entry for its FIN to close, so its +1 would stay
/// for good (a drain of its backend would never reach 0). The sweep reconciles every backend's
/// count with the counted entries it finds: after it, each backend counts exactly the open
/// connections the table holds for it, and a second sweep changes nothing.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn the_sweep_uncounts_connections_the_lru_evicted() {
    use std::collections::BTreeMap;
    let (mut f, held, seen) = overfull_table(97);
    let svc = f.service("web4");
    let conn = |i: u32| overfull_conn(97, i);
    const N: u32 = OVERFULL_SYNS;
    let total = |f: &mut Fixture| svc.backends.iter().map(|b| active(f, *b)).sum::<u64>();
    assert_eq!(total(&mut f), N as u64, "every SYN counted");
    let entries: u64 = held.values().sum();
    assert!(
        entries <= 1024 && entries > 500,
        "the LRU evicted: {entries} left"
    );
    let t = lb_userspace::config::Timeouts {
        tcp: 100,
        tcp_fin: 10,
        udp: 5,
    };
    let changed = BTreeMap::new();
    let desired = f.desired.clone();
    let view = lb_userspace::desired::TableView::new(&desired, &changed);
    let s = f.dp.sweep(seen, &t, &view).unwrap();
    assert_eq!(
        (s.entries, s.expired),
        (entries, 0),
        "the sweep's walk (batches of buckets) sees every entry once: {s:?}"
    );
    assert_eq!(f.dp.flow_count().unwrap() as u64, entries);
    assert_eq!((s.uncounted, s.recounted), (N as u64 - entries, 0), "{s:?}");
    for b in &svc.backends {
        assert_eq!(
            active(&mut f, *b),
            held.get(b).copied().unwrap_or(0),
            "backend {b}: its open entries"
        );
    }
    let s = f.dp.sweep(seen, &t, &view).unwrap();
    assert_eq!((s.uncounted, s.recounted), (0, 0), "a second sweep: {s:?}");
    // Every connection closes (client FINs): those with an entry subtract their one, the
    // others find none; nothing is left counted, and a sweep keeps it so.
    for i in 0..N {
        let (src, port) = conn(i);
        assert_eq!(f.run(&tcp4_flags(src, port, VIP4, 80, "FA")).0, XDP_TX);
    }
    assert_eq!(total(&mut f), 0);
    let s = f.dp.sweep(seen, &t, &view).unwrap();
    assert_eq!((s.uncounted, s.recounted), (0, 0), "{s:?}");
    assert_eq!(total(&mut f), 0);
}

/// `lb run` sweeps in steps (a step walks whole batches of buckets, then deletes what expired
/// among them), so that its loop is not held up by a walk of a large table. Stepped, the walk
/// still sees every entry once and reconciles as a whole walk does; a backend id whose
/// generation changed between the start and the end (it changed hands while the sweep walked)
/// is left to the next sweep: its count is not touched.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn the_sweep_in_steps_sees_every_entry_once_and_skips_ids_that_changed_hands() {
    use std::collections::BTreeMap;

    use lb_userspace::dataplane::SlotView;
    /// No slots; the backends in use as given.
    struct Gens(Vec<(u32, u32)>);
    impl SlotView for Gens {
        fn slot(&self, _key: &FlowKey) -> Option<lb_userspace::dataplane::SlotInfo> {
            None
        }
        fn live_backends(&self) -> Vec<(u32, u32)> {
            self.0.clone()
        }
    }
    let (mut f, held, seen) = overfull_table(96);
    let svc = f.service("web4");
    let entries: u64 = held.values().sum();
    assert!(entries > 500, "{entries} entries");
    let t = lb_userspace::config::Timeouts {
        tcp: 100,
        tcp_fin: 10,
        udp: 5,
    };
    let changed = BTreeMap::new();
    let desired = f.desired.clone();
    let view = lb_userspace::desired::TableView::new(&desired, &changed);
    let start = view.live_backends();
    let moved = *svc
        .backends
        .iter()
        .find(|b| held.contains_key(b) && start.iter().any(|(id, _)| id == *b))
        .expect("a backend of web4 with entries");
    let end = Gens(
        start
            .iter()
            .map(|(id, g)| (*id, if *id == moved { g + 1 } else { *g }))
            .collect(),
    );
    let start = Gens(start);
    let counted_before = active(&mut f, moved);
    assert!(
        counted_before > held[&moved],
        "the LRU evicted some of its entries: {counted_before} counted, {} held",
        held[&moved]
    );
    let mut walk = f.dp.sweep_begin(seen, &start).unwrap();
    let mut steps = 0;
    while !f.dp.sweep_step(&mut walk, &t, &start, 100).unwrap() {
        steps += 1;
        assert!(steps < 10_000, "the walk ends");
    }
    assert!(walk.steps() > 3, "{} steps", walk.steps());
    let s = f.dp.sweep_finish(walk, &end).unwrap();
    assert_eq!(
        (s.entries, s.expired),
        (entries, 0),
        "every entry once, in steps: {s:?}"
    );
    assert_eq!(
        active(&mut f, moved),
        counted_before,
        "the id that changed hands: its count not touched"
    );
    for b in svc.backends.iter().filter(|b| **b != moved) {
        assert_eq!(
            active(&mut f, *b),
            held.get(b).copied().unwrap_or(0),
            "backend {b}: its open entries"
        );
    }
    // The next sweep (no change while it walks) reconciles that one too.
    let s = f.dp.sweep(seen, &t, &view).unwrap();
    assert_eq!(s.entries, entries, "{s:?}");
    for b in &svc.backends {
        assert_eq!(active(&mut f, *b), held.get(b).copied().unwrap_or(0));
    }
}

/// `dataplane.record_limit`: beyond this CPU's limit a second, the SYN of an `"at_syn"` maglev
/// service through an unchanged slot is forwarded by the slot (the same backend, output bytes
/// checked) and not recorded: nothing evicted, nothing counted active, `flow_stateless` and
/// the limit's own count say so. Its ACKs still go to that backend. SYNs through a changed slot
/// and new flows of schedulers without slots are recorded whatever the limit; after a second the
/// window starts again.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn syns_beyond_the_record_limit_are_forwarded_by_their_slot_unrecorded() {
    let rr = "\n[[service]]\nname = \"rr4\"\nvip = \"10.99.0.100\"\nport = 8080\nprotocol = \"tcp\"\nscheduler = \"rr\"\n[[service.backend]]\naddress = \"10.99.0.21\"\nmac = \"02:00:00:00:00:21\"\n";
    let mut f = Fixture::with_flow_table(&format!("{CONFIG}{rr}"), 1024);
    f.dp.set_record_limit(10).unwrap();
    let svc = f.service("web4");
    let recorded: Vec<(FlowKey, u32)> = (0..10u16)
        .map(|i| {
            let (syn, key) = tcp4(C1, 30000 + i, VIP4, 80);
            let b = f.expect_forward("within the limit", &syn, &key, "web4");
            assert_eq!(f.dp.flow(&key).unwrap().map(|e| e.backend), Some(b));
            (key, b)
        })
        .collect();
    f.assert_stat(Stat::FlowNew, 10);
    let active_before: u64 = svc.backends.iter().map(|b| active(&mut f, *b)).sum();
    assert_eq!(active_before, 10);

    let mut flood = Vec::new();
    for i in 0..500u32 {
        let src = Ipv4Addr::new(10, 97, (i >> 8) as u8, i as u8);
        let (syn, key) = tcp4(src, 1024 + i as u16, VIP4, 80);
        let b = f.expect_forward("beyond the limit: by the slot", &syn, &key, "web4");
        flood.push((src, 1024 + i as u16, key, b));
    }
    f.assert_stat(Stat::FlowNew, 10);
    f.assert_stat(Stat::FlowStateless, 500);
    assert_eq!(f.snapshot().record_limited, 500);
    assert!(
        flood
            .iter()
            .all(|(.., k, _)| f.dp.flow(k).unwrap().is_none()),
        "none recorded"
    );
    assert!(
        recorded
            .iter()
            .all(|(k, b)| f.dp.flow(k).unwrap().map(|e| e.backend) == Some(*b)),
        "nothing evicted"
    );
    let active_after: u64 = svc.backends.iter().map(|b| active(&mut f, *b)).sum();
    assert_eq!(active_after, 10, "unrecorded SYNs are not counted active");
    let snap = f.snapshot();
    assert_eq!(
        snap.services[&svc.value.id].new_flows, 510,
        "each a new flow of the service"
    );
    let per_backend: u64 = svc
        .backends
        .iter()
        .map(|b| snap.backends[b].new_flows)
        .sum();
    assert_eq!(per_backend, 510, "and of its backend");
    let (key, b) = recorded[3];
    let port = u16::from_be_bytes(key.src_port);
    f.expect_mac(
        "a recorded connection's SYN again, beyond the limit",
        &tcp4(C1, port, VIP4, 80).0,
        b,
    );
    let (src, port, key, b) = flood[7];
    f.expect_mac(
        "the ACK of an unrecorded SYN",
        &tcp4_flags(src, port, VIP4, 80, "A"),
        b,
    );
    for flags in ["FA", "R"] {
        f.expect_mac(
            &format!("{flags} of an unrecorded connection: by the slot"),
            &tcp4_flags(src, port, VIP4, 80, flags),
            b,
        );
        assert!(
            f.dp.flow(&key).unwrap().is_none(),
            "{flags}: nothing inserted"
        );
    }
    f.assert_stat(Stat::FlowNew, 10);
    // Its slot changes (the controller names the previous backend when a limit is set): the
    // unrecorded connection stays on its backend, recorded and counted from its next packet,
    // and its FIN closes it.
    let (src, port, key, b) = flood[9];
    let other = *svc.backends.iter().find(|x| **x != b).unwrap();
    f.dp.set_slot(
        svc.ring_index(&key),
        lb_common::ring_value(other, true, Some(b)),
    )
    .unwrap();
    let before = active(&mut f, b);
    f.expect_mac(
        "an unrecorded connection after its slot changed",
        &tcp4_flags(src, port, VIP4, 80, "PA"),
        b,
    );
    let e = f.dp.flow(&key).unwrap().expect("recorded now");
    assert_eq!(
        (e.backend, e.flags & lb_common::FLOW_F_COUNTED),
        (b, lb_common::FLOW_F_COUNTED)
    );
    assert_eq!(active(&mut f, b), before + 1);
    f.expect_mac("its FIN", &tcp4_flags(src, port, VIP4, 80, "FA"), b);
    assert_eq!(active(&mut f, b), before);
    f.dp.set_slot(svc.ring_index(&key), svc.ring[svc.slot_of(&key) as usize])
        .unwrap();

    // A SYN through a changed slot is recorded, limit or not.
    let (_, key0) = tcp4(C1, 40000, VIP4, 80);
    let slot = svc.slot_of(&key0);
    let old = svc.ring[slot as usize];
    let other = *svc.backends.iter().find(|x| **x != old).unwrap();
    f.dp.set_slot(
        svc.ring_index(&key0),
        lb_common::ring_value(other, true, Some(old)),
    )
    .unwrap();
    let (a, p, key) = svc.flow_on_slot(slot, 3, 0);
    f.expect_mac(
        "a SYN through the changed slot",
        &tcp4(a, p, VIP4, 80).0,
        other,
    );
    assert_eq!(f.dp.flow(&key).unwrap().map(|e| e.backend), Some(other));
    // So is a new flow of a scheduler without slots.
    let (syn, key) = tcp4(C1, 41000, VIP4, 8080);
    assert_eq!(f.run(&syn).0, XDP_TX);
    assert!(f.dp.flow(&key).unwrap().is_some(), "rr: recorded");
    assert_eq!(f.snapshot().record_limited, 501, "neither counted");
    // (The window was still full: the next SYN of an unchanged slot is over the limit.)
    let (syn, key) = tcp4(C1, 30400, VIP4, 80);
    f.expect_forward("still beyond the limit", &syn, &key, "web4");
    assert!(f.dp.flow(&key).unwrap().is_none());
    assert_eq!(f.snapshot().record_limited, 502);

    // A new window a second later.
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    let (syn, key) = tcp4(C1, 30500, VIP4, 80);
    let b = f.expect_forward("a second later", &syn, &key, "web4");
    assert_eq!(f.dp.flow(&key).unwrap().map(|e| e.backend), Some(b));
    assert_eq!(f.snapshot().record_limited, 502);
}

/// The connection table is shared: a SYN flood at an `"at_syn"` maglev service evicts the
/// entries of an rr service's established connections (which then would be scheduled again);
/// at an `"on_change"` one it writes nothing, and every rr connection keeps its entry and its
/// backend.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn a_flood_at_an_on_change_service_evicts_no_other_entries() {
    let rr = "\n[[service]]\nname = \"rr4\"\nvip = \"10.99.0.100\"\nport = 8080\nprotocol = \"tcp\"\nscheduler = \"rr\"\n[[service.backend]]\naddress = \"10.99.0.21\"\nmac = \"02:00:00:00:00:21\"\n[[service.backend]]\naddress = \"10.99.0.22\"\nmac = \"02:00:00:00:00:22\"\n";
    for on in [false, true] {
        let base = format!("{CONFIG}{rr}");
        let cfg = if on { on_change(&base) } else { base };
        let mut f = Fixture::with_flow_table(&cfg, 1024);
        let flows: Vec<(u16, FlowKey, u32)> = (0..50u16)
            .map(|i| {
                let (syn, key) = tcp4(C1, 31000 + 2 * i, VIP4, 8080);
                f.run(&syn);
                let b =
                    f.dp.flow(&key)
                        .unwrap()
                        .expect("an rr flow is recorded")
                        .backend;
                (31000 + 2 * i, key, b)
            })
            .collect();
        for i in 0..10_240u32 {
            let src = Ipv4Addr::new(10, 97, (i >> 8) as u8, i as u8);
            let (v, _) = f.run(&tcp4(src, 1024 + (i % 50_000) as u16, VIP4, 80).0);
            assert_eq!(v, XDP_TX);
        }
        let evicted = flows
            .iter()
            .filter(|(_, k, _)| f.dp.flow(k).unwrap().is_none())
            .count();
        if !on {
            assert!(
                evicted > 40,
                "at_syn: the flood evicted them ({evicted} of 50)"
            );
            continue;
        }
        assert_eq!(evicted, 0, "on_change: the flood evicted none");
        for (port, _, b) in &flows {
            f.expect_mac(
                "rr connection after the flood",
                &tcp4_flags(C1, *port, VIP4, 8080, "A"),
                *b,
            );
        }
    }
}

/// Per-service table sizes (layout 3): each service's table lies at its own `ring_base` in
/// `LB_RING` with its own `ring_size`, and the data plane takes a flow's slot in its service's
/// table (`reduce(hash, ring_size)`), as the controller predicts.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn services_have_their_own_table_sizes() {
    let mut toml = String::from(
        "[dataplane]\ninterface = \"lbtest0\"\nring_capacity = 70001\n\n[[service]]\nname = \"small\"\nvip = \"10.99.0.100\"\nport = 80\nprotocol = \"tcp\"\nring_size = 101\n",
    );
    for i in 0..3 {
        toml += &backend_entry(i, 100);
    }
    toml += "[[service]]\nname = \"big\"\nvip = \"10.99.0.100\"\nport = 443\nprotocol = \"tcp\"\n";
    for i in 3..13 {
        toml += &backend_entry(i, 100 + i as u16);
    }
    let mut f = Fixture::new(&toml);
    let (small, big) = (f.service("small"), f.service("big"));
    assert_eq!((small.value.ring_size, big.value.ring_size), (101, 65537));
    let (a, b) = (
        small.value.ring_base..small.value.ring_base + 101,
        big.value.ring_base..big.value.ring_base + 65537,
    );
    assert!(
        a.end <= b.start || b.end <= a.start,
        "{a:?} and {b:?} overlap"
    );
    assert!(a.end.max(b.end) <= 70001);
    let mut seen = std::collections::BTreeSet::new();
    for p in 0..300u16 {
        for (port, name) in [(80, "small"), (443, "big")] {
            let (pkt, key) = tcp4(C1, 20000 + p, VIP4, port);
            seen.insert(f.expect_forward(name, &pkt, &key, name));
        }
    }
    assert_eq!(seen.len(), 13, "every backend of both services took flows");
}

/// `dataplane.defer_records`: an `"at_syn"` SYN through an unchanged slot is forwarded by the
/// slot (output bytes checked) and handed to the controller through `LB_RECORD` instead of
/// inserted; the controller's `record_flows` makes the entry (counted, open), a FIN that came
/// first closes it, a retransmitted SYN leaves it, and the entry keeps the connection on its
/// backend once its slot changes. With the handover off, or `LB_RECORD` full, SYNs are recorded
/// on the packet path again; a record limit still keeps SYNs beyond it out of the table.
#[test]
#[ignore = "needs root and the eBPF object: run by `cargo xtask test`"]
fn syns_handed_to_the_controller_are_recorded_from_lb_record() {
    use lb_userspace::dataplane::Maps as _;
    let mut f = Fixture::with_flow_table(CONFIG, 1024);
    assert!(
        f.dp.set_defer_records(true).unwrap(),
        "the object has LB_RECORD"
    );
    let svc = f.service("web4");
    let conns: Vec<(u16, FlowKey, u32)> = (0..20u16)
        .map(|i| {
            let (syn, key) = tcp4(C1, 30000 + i, VIP4, 80);
            let b = f.expect_forward("a SYN handed over", &syn, &key, "web4");
            assert!(f.dp.flow(&key).unwrap().is_none(), "not inserted here");
            (30000 + i, key, b)
        })
        .collect();
    // New flows (recorded, a moment later), not forwarded statelessly.
    f.assert_stat(Stat::FlowNew, 20);
    f.assert_stat(Stat::FlowStateless, 0);
    let snap = f.snapshot();
    assert_eq!(snap.record_deferred, 20);
    assert_eq!(
        snap.services[&svc.value.id].new_flows, 20,
        "new flows all the same"
    );
    let total = |f: &mut Fixture| -> u64 { svc.backends.iter().map(|b| active(f, *b)).sum() };
    assert_eq!(total(&mut f), 0, "counted once recorded");
    // The first connection's FIN comes before the controller drains: by the slot, and a close
    // record after the open one.
    let (port0, key0, b0) = conns[0];
    f.expect_mac(
        "a FIN before its record",
        &tcp4_flags(C1, port0, VIP4, 80, "FA"),
        b0,
    );
    assert!(f.dp.flow(&key0).unwrap().is_none());
    let records = f.dp.take_records(100);
    assert_eq!(records.len(), 21);
    for (r, (_, key, b)) in records.iter().zip(&conns) {
        assert_eq!(
            (r.key, r.backend, r.kind),
            (*key, *b, lb_common::RECORD_OPEN)
        );
    }
    assert_eq!(
        (records[20].key, records[20].kind),
        (key0, lb_common::RECORD_CLOSE)
    );
    // (A record whose generation is not the backend's is skipped: all 20 are current.)
    let st = f.dp.record_flows(&records, 1).unwrap();
    assert_eq!((st.inserted, st.skipped, st.closed), (20, 0, 1));
    for (_, key, b) in &conns[1..] {
        let e = f.dp.flow(key).unwrap().expect("recorded by the controller");
        assert_eq!((e.backend, e.flags), (*b, lb_common::FLOW_F_COUNTED));
    }
    let e0 = f.dp.flow(&key0).unwrap().unwrap();
    assert_eq!(
        e0.flags,
        lb_common::FLOW_F_COUNTED | lb_common::FLOW_F_CLOSED
    );
    assert_eq!(
        total(&mut f),
        19,
        "counted from the record, the closed one not"
    );
    // A retransmitted SYN: handed over again, its record finds the entry (applied by the
    // controller's other way, one update each, as without `lb_record_apply`).
    assert!(!f.dp.set_apply_in_kernel(false));
    let (port1, key1, b1) = conns[1];
    f.expect_mac("a retransmitted SYN", &tcp4(C1, port1, VIP4, 80).0, b1);
    let again = f.dp.take_records(100);
    let st = f.dp.record_flows(&again, 2).unwrap();
    assert_eq!((st.inserted, st.skipped), (0, 1));
    // And a new one, and its close, that way.
    let (syn, key) = tcp4(C1, 30100, VIP4, 80);
    let b = f.expect_forward("a SYN applied by updates", &syn, &key, "web4");
    f.expect_mac("its FIN", &tcp4_flags(C1, 30100, VIP4, 80, "FA"), b);
    let pair = f.dp.take_records(100);
    assert_eq!(pair.len(), 2);
    let st = f.dp.record_flows(&pair, 3).unwrap();
    assert_eq!((st.inserted, st.skipped, st.closed), (1, 0, 1));
    assert_eq!(
        f.dp.flow(&key).unwrap().unwrap().flags,
        lb_common::FLOW_F_COUNTED | lb_common::FLOW_F_CLOSED
    );
    assert_eq!(total(&mut f), 19, "opened and closed");
    assert!(f.dp.set_apply_in_kernel(true));
    assert_eq!(total(&mut f), 19);
    // Its slot changes: the entry keeps the connection on its backend; its FIN closes it.
    let other = *svc.backends.iter().find(|x| **x != b1).unwrap();
    f.dp.set_slot(
        svc.ring_index(&key1),
        lb_common::ring_value(other, true, None),
    )
    .unwrap();
    f.expect_mac(
        "an ACK after the change",
        &tcp4_flags(C1, port1, VIP4, 80, "A"),
        b1,
    );
    f.expect_mac("its FIN", &tcp4_flags(C1, port1, VIP4, 80, "FA"), b1);
    assert_eq!(total(&mut f), 18);
    assert!(
        f.dp.take_records(100).is_empty(),
        "a marked slot hands nothing over"
    );
    f.dp.set_slot(svc.ring_index(&key1), svc.ring[svc.slot_of(&key1) as usize])
        .unwrap();

    // Off: recorded here.
    assert!(!f.dp.set_defer_records(false).unwrap());
    let (syn, key) = tcp4(C1, 31000, VIP4, 80);
    let new_before = f.snapshot().get(Stat::FlowNew);
    f.expect_forward("a SYN with the handover off", &syn, &key, "web4");
    assert!(f.dp.flow(&key).unwrap().is_some());
    f.assert_stat(Stat::FlowNew, new_before + 1);
    assert_eq!(
        f.snapshot().record_deferred,
        22,
        "the 20, a retransmission and one more"
    );
    assert!(f.dp.take_records(100).is_empty());

    // A full ring: recorded here, and counted.
    assert!(f.dp.set_defer_records(true).unwrap());
    // 64 bytes a record with its header; a ring buffer holds one byte less than its size.
    let cap = lb_common::limits::RECORD_RING_BYTES / 64 - 1;
    let mut handed = 0u32;
    for i in 0..cap + 1 {
        let src = Ipv4Addr::new(10, 96, (i >> 8) as u8, i as u8);
        let (syn, key) = tcp4(src, 1024 + (i >> 16) as u16, VIP4, 80);
        assert_eq!(f.run(&syn).0, XDP_TX);
        if f.snapshot().record_ring_full > 0 {
            assert!(
                f.dp.flow(&key).unwrap().is_some(),
                "the ring is full: recorded here"
            );
            break;
        }
        handed += 1;
    }
    assert_eq!(handed, cap, "the ring holds {cap} records");
    assert_eq!(f.snapshot().record_ring_full, 1);
    f.assert_stat(Stat::FlowNew, new_before + 2 + cap as u64);
    // The first of them closes while the ring is full: a closed entry of its slot's backend,
    // counting nothing, made here; its record then finds it.
    let src0 = Ipv4Addr::new(10, 96, 0, 0);
    let (_, key0) = tcp4(src0, 1024, VIP4, 80);
    let slot_backend = svc.ring[svc.slot_of(&key0) as usize];
    f.expect_mac(
        "a FIN while the ring is full",
        &tcp4_flags(src0, 1024, VIP4, 80, "FA"),
        slot_backend,
    );
    let e = f.dp.flow(&key0).unwrap().expect("a closed entry");
    assert_eq!(
        (e.backend, e.flags),
        (slot_backend, lb_common::FLOW_F_CLOSED)
    );
    let before = total(&mut f);
    let first = f.dp.take_records(4096);
    assert_eq!(first[0].key, key0);
    let st = f.dp.record_flows(&first, 4).unwrap();
    assert_eq!(
        (st.inserted, st.skipped),
        (4095, 1),
        "its record finds the closed entry"
    );
    assert_eq!(total(&mut f), before + 4095);
    let mut drained = first.len();
    loop {
        let r = f.dp.take_records(4096);
        if r.is_empty() {
            break;
        }
        drained += r.len();
    }
    assert_eq!(drained, cap as usize);

    // A record limit: SYNs within it are handed over, the rest go by the slot unrecorded.
    f.dp.set_record_limit(3).unwrap();
    assert!(f.dp.set_defer_records(true).unwrap());
    for i in 0..5u16 {
        let (syn, key) = tcp4(C1, 32000 + i, VIP4, 80);
        f.expect_forward("a SYN with a record limit", &syn, &key, "web4");
    }
    let snap = f.snapshot();
    assert_eq!((snap.record_deferred, snap.record_limited), (3, 2));
    assert_eq!(f.dp.take_records(100).len(), 3);
}
