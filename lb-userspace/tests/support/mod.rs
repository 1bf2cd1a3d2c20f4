//! Shared fixture code for the BPF_PROG_TEST_RUN tests and benchmarks.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv4Options, PacketBuilder,
    PacketBuilderStep, SingleVlanHeader, TcpHeader,
};
use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, hash::flow_hash, stats::Stat};
use lb_userspace::{
    config::{Config, Mac},
    dataplane::Dataplane,
    desired::{BackendId, DesiredService, DesiredState},
    iface::Interfaces,
    stats::Snapshot,
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// MAC of the fake second interface `lbtest1` (ifindex 1 = `lo`, which a devmap accepts).
pub const EGRESS_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

pub const LB_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xc1];
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
pub const VIP_ANY: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 200);
pub const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 201);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x100);
pub const C1: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 11);
pub const C2: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 12);
pub const C6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x11);

/// The services every test starts from.
pub const CONFIG: &str = r#"
[dataplane]
interface = "lbtest0"

[[service]]
name = "web4"
vip = "10.99.0.100"
port = 80
protocol = "tcp"
[[service.backend]]
address = "10.99.0.21"
mac = "02:00:00:00:00:21"
[[service.backend]]
address = "10.99.0.22"
mac = "02:00:00:00:00:22"

[[service]]
name = "dns4"
vip = "10.99.0.100"
port = 53
protocol = "udp"
[[service.backend]]
address = "10.99.0.21"
mac = "02:00:00:00:00:21"
[[service.backend]]
address = "10.99.0.22"
mac = "02:00:00:00:00:22"

[[service]]
name = "web6"
vip = "fd00:99::100"
port = 80
protocol = "tcp"
[[service.backend]]
address = "fd00:99::21"
mac = "02:00:00:00:00:21"
[[service.backend]]
address = "fd00:99::22"
mac = "02:00:00:00:00:22"

[[service]]
name = "dns6"
vip = "fd00:99::100"
port = 53
protocol = "udp"
[[service.backend]]
address = "fd00:99::23"
mac = "02:00:00:00:00:23"

[[service]]
name = "anyport"
vip = "10.99.0.200"
port = 0
protocol = "tcp"
[[service.backend]]
address = "10.99.0.23"
mac = "02:00:00:00:00:23"
[[service.backend]]
address = "10.99.0.24"
mac = "02:00:00:00:00:24"

[[service]]
name = "empty"
vip = "10.99.0.201"
port = 80
protocol = "tcp"
[[service.backend]]
address = "10.99.0.25"
mac = "02:00:00:00:00:25"
weight = 0
"#;

/// One service whose second backend sits behind another interface.
pub const REDIRECT: &str = r#"
[dataplane]
interface = "lbtest0"

[[service]]
name = "web4"
vip = "10.99.0.100"
port = 80
protocol = "tcp"
[[service.backend]]
address = "10.99.1.21"
mac = "02:00:00:00:01:21"
interface = "lbtest1"
"#;

/// One service, weights 1:2:3.
pub const WEIGHTED: &str = r#"
[dataplane]
interface = "lbtest0"

[[service]]
name = "w"
vip = "10.99.0.100"
port = 80
protocol = "tcp"
[[service.backend]]
address = "10.99.0.21"
mac = "02:00:00:00:00:21"
weight = 100
[[service.backend]]
address = "10.99.0.22"
mac = "02:00:00:00:00:22"
weight = 200
[[service.backend]]
address = "10.99.0.23"
mac = "02:00:00:00:00:23"
weight = 300
"#;

pub struct FakeInterfaces;

impl Interfaces for FakeInterfaces {
    fn lookup(&self, name: &str) -> Result<(u32, Mac), String> {
        match name {
            "lbtest0" => Ok((1, Mac(LB_MAC))),
            "lbtest1" => Ok((1, Mac(EGRESS_MAC))),
            _ => Err(format!("no interface {name}")),
        }
    }
}

/// BPF_PROG_TEST_RUN runs on the calling thread's CPU; per-CPU counters are only predictable
/// when every run of a test uses the same CPU.
pub fn pin_to_cpu0() {
    pin_to_cpu(0);
}

/// Pins the calling thread to `cpu` (BPF_PROG_TEST_RUN then runs the program there).
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it; sched_setaffinity(0, ..)
    // applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pin to CPU {cpu}"
        );
    }
}

/// Lets the calling thread run on every online CPU again (after [`pin_to_cpu`], or in a thread
/// spawned by a pinned one: threads inherit their parent's affinity).
pub fn unpin() {
    // SAFETY: as in `pin_to_cpu`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..cpus() {
            libc::CPU_SET(cpu, &mut set);
        }
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "unpin"
        );
    }
}

/// Number of CPUs online (not the calling thread's affinity: a bench part run as a child of
/// a thread pinned to CPU 0 must still find the other CPUs to put the backends' side on).
pub fn cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 { n as usize } else { 1 }
}

/// Runs one packet through `dp`'s program: verdict and output frame.
pub fn run_on(dp: &mut Dataplane, pkt: &[u8]) -> (u32, Vec<u8>) {
    run_prog(dp.program(), pkt)
}

/// Runs one packet through `prog`: verdict and output frame.
pub fn run_prog(prog: &aya::programs::Xdp, pkt: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; pkt.len() + 512];
    let opts = TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        ..TestRunOptions::new()
    };
    let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "BPF tests need root (CAP_BPF, CAP_NET_ADMIN): run `cargo xtask test` as root"
    );
    assert!(
        !lb_userspace::EBPF_OBJECT.is_empty(),
        "lb was built without its eBPF object: run scripts/bootstrap.sh and rebuild"
    );
}

/// `cfg` with its first TCP service (the tests' `web4`) recording connections only on change
/// (`record_connections = "on_change"`).
pub fn on_change(cfg: &str) -> String {
    let tcp = "protocol = \"tcp\"\n";
    assert!(cfg.contains(tcp), "a TCP service in the config");
    cfg.replacen(
        tcp,
        "protocol = \"tcp\"\nrecord_connections = \"on_change\"\n",
        1,
    )
}

/// A service as the fixtures use it.
#[derive(Clone, Debug)]
pub struct Svc {
    pub value: lb_common::ServiceValue,
    pub ring: Vec<u32>,
    pub backends: Vec<u32>,
}

impl Svc {
    /// maglev: `key`'s slot in this service's table (the data plane's hash).
    pub fn slot_of(&self, key: &FlowKey) -> u32 {
        lb_common::hash::reduce(flow_hash(key), self.value.ring_size)
    }

    /// The `LB_RING` index of `key`'s slot.
    pub fn ring_index(&self, key: &FlowKey) -> u32 {
        self.value.ring_base + self.slot_of(key)
    }

    /// The `n`th IPv4 TCP flow to `VIP4:80` from 10.98.`net`.x whose slot is `slot` (searched
    /// by hash: one flow in `ring_size` lands there): source address, port and key.
    pub fn flow_on_slot(&self, slot: u32, net: u8, n: usize) -> (Ipv4Addr, u16, FlowKey) {
        (0..32u8)
            .flat_map(|h| (1024..=65535u16).map(move |p| (Ipv4Addr::new(10, 98, net, h), p)))
            .map(|(a, p)| (a, p, key4(a, p, VIP4, 80, 6)))
            .filter(|(_, _, k)| self.slot_of(k) == slot)
            .nth(n)
            .expect("a flow on the same slot")
    }
}

/// A freshly loaded program with the maps filled from a config.
pub struct Fixture {
    pub dp: Dataplane,
    pub desired: DesiredState,
}

impl Fixture {
    pub fn new(toml: &str) -> Fixture {
        Fixture::with_flow_table(toml, 65536)
    }

    /// As [`Fixture::new`] with a connection table of `flows` entries.
    pub fn with_flow_table(toml: &str, flows: u32) -> Fixture {
        // LB_BENCH_OBJECT: another compiled lb-ebpf object instead of the embedded one (an A/B
        // of a data-plane change on the same machine, minutes apart).
        let object = std::env::var_os("LB_BENCH_OBJECT").map(|path| {
            std::fs::read(&path)
                .unwrap_or_else(|e| panic!("LB_BENCH_OBJECT {}: {e}", path.display()))
        });
        Fixture::load(toml, flows, object.as_deref())
    }

    /// As [`Fixture::new`] with another compiled lb-ebpf object (the bench's A/B).
    pub fn from_object(toml: &str, object: &[u8]) -> Fixture {
        Fixture::load(toml, 65536, Some(object))
    }

    /// `object`, or the embedded one, loaded with a table of `flows` entries and filled from
    /// `toml`.
    fn load(toml: &str, flows: u32, object: Option<&[u8]>) -> Fixture {
        require_root();
        pin_to_cpu0();
        let cfg = Config::parse(toml, Path::new("test.toml")).expect("valid test config");
        let desired = DesiredState::from_config(&cfg, &FakeInterfaces).expect("desired state");
        let ring = cfg.dataplane.ring_capacity;
        let mut dp = match object {
            Some(object) => Dataplane::load_object_for_mac(object, ring, flows, LB_MAC),
            None => Dataplane::load_for_mac(ring, flows, LB_MAC),
        }
        .unwrap_or_else(|e| panic!("load: {e:#}"));
        dp.apply(&desired).expect("apply");
        Fixture { dp, desired }
    }

    /// As [`Fixture::new`], with every slot of the maglev/sh tables marked changed
    /// (`RING_DIRTY`): every flow is recorded in the connection table, as after a table change.
    /// For the tests of the connection table itself.
    pub fn recording(toml: &str) -> Fixture {
        let mut f = Fixture::new(toml);
        for s in &mut f.desired.services {
            if !s.stateless() {
                continue;
            }
            for i in 0..s.ring.len() as u32 {
                s.dirty.insert(i);
            }
            for i in 0..s.ring.len() {
                let v = s.slot_value(i).expect("slot");
                f.dp.set_slot(s.value.ring_base + i as u32, v)
                    .expect("slot");
            }
        }
        f
    }

    /// Runs one packet: verdict and output frame.
    pub fn run(&mut self, pkt: &[u8]) -> (u32, Vec<u8>) {
        run_on(&mut self.dp, pkt)
    }

    /// Runs one packet through another program of the object (the bench's baselines).
    pub fn run_program(&mut self, name: &'static str, pkt: &[u8]) -> (u32, Vec<u8>) {
        let prog = self.dp.other_program(name).expect(name);
        run_prog(prog, pkt)
    }

    fn desired_service(&self, name: &str) -> &DesiredService {
        self.desired
            .services
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    /// The service key of a service of the desired state.
    pub fn service_key(&self, name: &str) -> lb_common::ServiceKey {
        self.desired_service(name).key
    }

    /// A service of the desired state, backend ids as the raw map indexes.
    pub fn service(&self, name: &str) -> Svc {
        let s = self.desired_service(name);
        Svc {
            value: s.value,
            ring: s.ring.to_vec(),
            backends: s.backends.iter().map(|b| b.0).collect(),
        }
    }

    /// The backend the Maglev table gives a new flow (same hash as the kernel).
    pub fn predict(&self, key: &FlowKey, service: &str) -> u32 {
        let s = self.desired_service(service);
        s.ring
            .get(lb_common::hash::reduce(flow_hash(key), s.value.ring_size) as usize)
            .expect("a slot of the table")
    }

    pub fn backend_mac(&self, id: u32) -> [u8; 6] {
        self.desired.backends[&BackendId(id)].mac
    }

    /// The desired map value of backend `id`.
    pub fn backend(&self, id: u32) -> lb_common::Backend {
        self.desired.backends[&BackendId(id)]
    }

    /// Asserts XDP_TX and that the output is the input with exactly the MACs changed (to the
    /// predicted backend's and the LB's). Returns the backend id.
    pub fn expect_forward(&mut self, desc: &str, pkt: &[u8], key: &FlowKey, service: &str) -> u32 {
        let b = self.predict(key, service);
        let mut want = pkt.to_vec();
        want[0..6].copy_from_slice(&self.backend_mac(b));
        want[6..12].copy_from_slice(&LB_MAC);
        let (v, out) = self.run(pkt);
        assert_eq!(v, XDP_TX, "{desc}: verdict");
        assert_eq!(out, want, "{desc}: output bytes");
        b
    }

    /// Asserts XDP_TX and that the output is the input with only the MACs changed, to backend
    /// `id`'s and the LB's.
    pub fn expect_mac(&mut self, desc: &str, pkt: &[u8], id: u32) {
        let mut want = pkt.to_vec();
        want[0..6].copy_from_slice(&self.backend_mac(id));
        want[6..12].copy_from_slice(&LB_MAC);
        let (v, out) = self.run(pkt);
        assert_eq!(v, XDP_TX, "{desc}: verdict");
        assert_eq!(out, want, "{desc}: output bytes");
    }

    /// Asserts the verdict and that the frame is untouched.
    pub fn expect_unchanged(&mut self, desc: &str, pkt: &[u8], verdict: u32) {
        let (v, out) = self.run(pkt);
        assert_eq!(v, verdict, "{desc}: verdict");
        assert_eq!(out, pkt, "{desc}: frame must not change");
    }

    pub fn snapshot(&mut self) -> Snapshot {
        self.dp.snapshot(&self.desired).expect("counters")
    }

    pub fn assert_stat(&mut self, stat: Stat, want: u64) {
        let got = self.snapshot().get(stat);
        assert_eq!(got, want, "counter {}", stat.name());
    }
}

// ---- packets ----------------------------------------------------------------------------------

pub fn eth(ether_type: EtherType) -> Ethernet2Header {
    Ethernet2Header {
        source: CLIENT_MAC,
        destination: LB_MAC,
        ether_type,
    }
}

pub fn write<T>(b: PacketBuilderStep<T>, payload: &[u8]) -> Vec<u8>
where
    PacketBuilderStep<T>: WriteStep,
{
    b.write_to_vec(payload)
}

/// `PacketBuilderStep<TcpHeader|UdpHeader|Icmp*>::write`, unified.
pub trait WriteStep {
    fn write_to_vec(self, payload: &[u8]) -> Vec<u8>;
}

macro_rules! write_step {
    ($($t:ty),*) => {$(
        impl WriteStep for PacketBuilderStep<$t> {
            fn write_to_vec(self, payload: &[u8]) -> Vec<u8> {
                let mut out = Vec::with_capacity(self.size(payload.len()));
                self.write(&mut out, payload).expect("write packet");
                out
            }
        }
    )*};
}
write_step!(
    etherparse::TcpHeader,
    etherparse::UdpHeader,
    etherparse::Icmpv4Header,
    etherparse::Icmpv6Header
);

pub fn key4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> FlowKey {
    let mut k = FlowKey {
        src_port: sport.to_be_bytes(),
        dst_port: dport.to_be_bytes(),
        protocol: proto,
        family: FAMILY_V4,
        ..FlowKey::default()
    };
    k.src_addr[..4].copy_from_slice(&src.octets());
    k.dst_addr[..4].copy_from_slice(&dst.octets());
    k
}

pub fn key6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src_addr: src.octets(),
        dst_addr: dst.octets(),
        src_port: sport.to_be_bytes(),
        dst_port: dport.to_be_bytes(),
        protocol: proto,
        family: FAMILY_V6,
        _pad: [0; 2],
    }
}

const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n";

pub fn tcp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> (Vec<u8>, FlowKey) {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 64240)
        .syn();
    (write(b, PAYLOAD), key4(src, sport, dst, dport, 6))
}

pub fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> (Vec<u8>, FlowKey) {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport);
    (write(b, b"query"), key4(src, sport, dst, dport, 17))
}

pub fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> (Vec<u8>, FlowKey) {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 64240)
        .syn();
    (write(b, PAYLOAD), key6(src, sport, dst, dport, 6))
}

pub fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> (Vec<u8>, FlowKey) {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src.octets(), dst.octets(), 64)
        .udp(sport, dport);
    (write(b, b"query"), key6(src, sport, dst, dport, 17))
}

pub fn tcp4_vlan(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    vid: u16,
) -> (Vec<u8>, FlowKey) {
    let b = vlan4_builder(src, dst, vid)
        .tcp(sport, dport, 1, 64240)
        .syn();
    (write(b, PAYLOAD), key4(src, sport, dst, dport, 6))
}

pub fn tcp4_with_options(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    opt_len: usize,
) -> (Vec<u8>, FlowKey) {
    let tcp = TcpHeader::new(sport, dport, 1, 64240);
    let mut ip = Ipv4Header::new(
        tcp.header_len() as u16,
        64,
        IpNumber::TCP,
        src.octets(),
        dst.octets(),
    )
    .unwrap();
    // NOP options (type 1), then the header is re-measured.
    let opts = vec![1u8; opt_len];
    ip.options = Ipv4Options::try_from(&opts[..]).expect("options length multiple of 4, ≤ 40");
    ip.set_payload_len(tcp.header_len()).unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    eth(EtherType::IPV4).write(&mut out).unwrap();
    ip.write(&mut out).unwrap();
    tcp.write(&mut out).unwrap();
    (out, key4(src, sport, dst, dport, 6))
}

/// The builder of a frame with one 802.1Q tag (VLAN `vid`) around IPv4.
fn vlan4_builder(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    vid: u16,
) -> PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .vlan(etherparse::VlanHeader::Single(SingleVlanHeader {
            pcp: Default::default(),
            drop_eligible_indicator: false,
            vlan_id: vid.try_into().unwrap(),
            ether_type: EtherType::IPV4,
        }))
        .ipv4(src.octets(), dst.octets(), 64)
}

/// A TCP segment with the given flags (as [`tcp4_flags`]) in a frame tagged with VLAN `vid`.
pub fn tcp4_vlan_flags(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    vid: u16,
    flags: &str,
) -> Vec<u8> {
    let b = vlan4_builder(src, dst, vid).tcp(sport, dport, 1, 64240);
    write(with_flags(b, flags), &[])
}

/// A UDP datagram (5 bytes of payload) in a frame tagged with VLAN `vid`.
pub fn udp4_vlan(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    vid: u16,
) -> (Vec<u8>, FlowKey) {
    let b = vlan4_builder(src, dst, vid).udp(sport, dport);
    (write(b, b"query"), key4(src, sport, dst, dport, 17))
}

/// A TCP segment with the given flags ("S", "SA", "A", "F", "FA", "R").
pub fn tcp4_flags(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: &str) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 64240);
    write(with_flags(b, flags), &[])
}

/// An IPv6 TCP segment with the given flags (as [`tcp4_flags`]).
pub fn tcp6_flags(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: &str) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 64240);
    write(with_flags(b, flags), &[])
}

fn with_flags(mut b: PacketBuilderStep<TcpHeader>, flags: &str) -> PacketBuilderStep<TcpHeader> {
    for f in flags.chars() {
        b = match f {
            'S' => b.syn(),
            'A' => b.ack(1),
            'F' => b.fin(),
            'R' => b.rst(),
            'P' => b.psh(),
            other => panic!("flag {other}"),
        };
    }
    b
}

/// A config with one TCP service on 10.99.0.100:80 using `scheduler` and `weights`.
pub fn sched_config(scheduler: &str, weights: &[u16]) -> String {
    let mut s = format!(
        "[dataplane]\ninterface = \"lbtest0\"\n\n[[service]]\nname = \"s\"\nvip = \"10.99.0.100\"\nport = 80\nprotocol = \"tcp\"\nscheduler = \"{scheduler}\"\n"
    );
    for (i, w) in weights.iter().enumerate() {
        s += &backend_entry(i, *w);
    }
    s
}

/// The `i`th backend of a generated config: 10.99.0.21 up (the first 64), then 10.99.1.1 up;
/// MAC 02:00:00:00:hh:ll with hhll = 0x21 + i.
pub fn backend_entry(i: usize, weight: u16) -> String {
    let addr = if i < 64 {
        format!("10.99.0.{}", 21 + i)
    } else {
        format!("10.99.{}.{}", 1 + (i - 64) / 200, 1 + (i - 64) % 200)
    };
    let m = 0x21 + i;
    format!(
        "[[service.backend]]\naddress = \"{addr}\"\nmac = \"02:00:00:00:{:02x}:{:02x}\"\nweight = {weight}\n",
        m >> 8,
        m & 0xff
    )
}

impl Fixture {
    /// Index (in config order) of the backend a forwarded frame went to.
    pub fn backend_index(&self, out: &[u8], service: &str) -> usize {
        let svc = self.service(service);
        svc.backends
            .iter()
            .position(|id| self.desired.backends[&BackendId(*id)].mac == out[0..6])
            .expect("frame went to a backend of the service")
    }

    /// Sends a SYN from `src:sport` on CPU `cpu` (the thread stays pinned there) and returns
    /// the backend index it went to.
    pub fn syn_on(&mut self, cpu: usize, src: Ipv4Addr, sport: u16) -> usize {
        pin_to_cpu(cpu);
        self.syn(src, sport)
    }

    /// The client's FIN+ACK of `src:sport`, on CPU `cpu`.
    pub fn fin_on(&mut self, cpu: usize, src: Ipv4Addr, sport: u16) {
        pin_to_cpu(cpu);
        let (v, _) = self.run(&tcp4_flags(src, sport, VIP4, 80, "FA"));
        assert_eq!(v, XDP_TX, "FIN of {src}:{sport}");
    }

    /// SYNs from several threads at once, each pinned to its CPU and sending its own flows
    /// (`(cpu, source, first port, count)`); the backend index of every flow, per thread.
    pub fn concurrent_syns(&mut self, plan: &[(usize, Ipv4Addr, u16, usize)]) -> Vec<Vec<usize>> {
        let macs: Vec<[u8; 6]> = self
            .service("s")
            .backends
            .iter()
            .map(|id| self.desired.backends[&BackendId(*id)].mac)
            .collect();
        let prog: &aya::programs::Xdp = self.dp.program();
        let out = std::thread::scope(|s| {
            let handles: Vec<_> = plan
                .iter()
                .map(|&(cpu, src, port, n)| {
                    let macs = &macs;
                    s.spawn(move || {
                        pin_to_cpu(cpu);
                        (0..n)
                            .map(|i| {
                                let pkt = tcp4_flags(src, port + 2 * i as u16, VIP4, 80, "S");
                                let (verdict, out) = run_prog(prog, &pkt);
                                assert_eq!(verdict, XDP_TX);
                                macs.iter()
                                    .position(|m| *m == out[0..6])
                                    .expect("a backend of the service")
                            })
                            .collect::<Vec<usize>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        pin_to_cpu0();
        out
    }

    /// Sends a SYN from `src:sport` and returns the backend index it went to.
    pub fn syn(&mut self, src: Ipv4Addr, sport: u16) -> usize {
        let (v, out) = self.run(&tcp4_flags(src, sport, VIP4, 80, "S"));
        assert_eq!(v, XDP_TX);
        self.backend_index(&out, "s")
    }
}
