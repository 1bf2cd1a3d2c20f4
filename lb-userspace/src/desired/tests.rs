//! Desired state and diff: every kind of change.

use std::path::Path;

use super::*;
use crate::{
    admin::AdminState,
    config::{Config, Mac},
};

const B0: BackendId = BackendId(0);
const B1: BackendId = BackendId(1);
const B2: BackendId = BackendId(2);

fn build(cfg: &Config) -> DesiredState {
    try_build(cfg).unwrap()
}

fn build_err(cfg: &Config) -> StateError {
    try_build(cfg).unwrap_err()
}

fn try_build(cfg: &Config) -> Result<DesiredState, StateError> {
    DesiredState::from_config(cfg, &Fake)
}

struct Fake;
impl Interfaces for Fake {
    fn lookup(&self, name: &str) -> Result<(u32, Mac), String> {
        match name {
            "eth0" => Ok((2, Mac([2, 0, 0, 0, 0, 1]))),
            "eth1" => Ok((3, Mac([2, 0, 0, 0, 0, 2]))),
            _ => Err(format!("no {name}")),
        }
    }
}

const CFG: &str = r#"
[dataplane]
interface = "eth0"
ring_size = 251
[[service]]
name = "a"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
[[service.backend]]
address = "10.0.0.1"
mac = "02:00:00:00:01:01"
[[service.backend]]
address = "10.0.0.2"
mac = "02:00:00:00:01:02"
interface = "eth1"
weight = 0
[[service]]
name = "b"
vip = "10.0.0.100"
port = 0
protocol = "udp"
[[service.backend]]
address = "fd00::1"
mac = "02:00:00:00:01:03"
"#;

#[test]
fn builds_keys_ids_rings_and_ports() {
    let cfg = Config::parse(CFG, Path::new("t.toml")).unwrap();
    let d = build(&cfg);
    assert_eq!(d.services.len(), 2);
    let a = &d.services[0];
    assert_eq!(a.value.id, 0);
    assert_eq!(a.key.port, [0, 80]);
    assert_eq!(a.key.protocol, 6);
    assert_eq!(&a.key.vip[..4], &[10, 0, 0, 100]);
    assert_eq!(a.backends, vec![B0, B1]);
    // weight 0: owns no slot.
    assert!(a.ring.iter().all(|b| b == 0));
    assert_eq!(a.ring.len(), 251);
    // Local backend: XDP_TX, source MAC of eth0.
    let b0 = d.backends[&B0];
    assert_eq!(b0.flags, BACKEND_F_ACTIVE);
    assert_eq!(b0.src_mac, [2, 0, 0, 0, 0, 1]);
    assert_eq!(b0.generation, 1);
    // Backend behind eth1: redirect through devmap slot 0 → ifindex 3, eth1's MAC.
    let b1 = d.backends[&B1];
    assert_eq!(b1.flags, BACKEND_F_ACTIVE | BACKEND_F_REDIRECT);
    assert_eq!(b1.src_mac, [2, 0, 0, 0, 0, 2]);
    assert_eq!(d.tx_ports.get(&b1.tx_port), Some(&3));
    // One VIP address, two services on it.
    assert_eq!(d.vips.len(), 1);
    assert_eq!(d.vips.values().next().map(|v| v.services), Some(2));
    // Fragments without a seen datagram: TCP to `a` (the only TCP service), UDP to `b` (the
    // all-ports one).
    let v = d.vips.values().next().unwrap();
    assert_eq!(
        (v.frag_tcp.id, v.frag_udp.id),
        (d.services[0].value.id, d.services[1].value.id)
    );
    assert_eq!(d.services[1].key.port, [0, 0]);
    assert!(d.services[1].ring.iter().all(|b| b == 2));
    assert_eq!(d.flags, FLAG_ALL_PORTS_SERVICES);
}

#[test]
fn unknown_interfaces_are_reported() {
    let cfg = Config::parse(&CFG.replace("\"eth1\"", "\"eth9\""), Path::new("t.toml")).unwrap();
    let e = build_err(&cfg).to_string();
    assert!(
        e.contains("service \"a\": backend \"10.0.0.2\": interface: no eth9"),
        "{e}"
    );
    let cfg = Config::parse(
        &CFG.replace("interface = \"eth0\"", "interface = \"eth7\""),
        Path::new("t.toml"),
    )
    .unwrap();
    let e = build_err(&cfg).to_string();
    assert!(e.contains("dataplane.interface: no eth7"), "{e}");
}

fn state(ids: &mut Ids, text: &str, prev: Option<&DesiredState>) -> DesiredState {
    with_all(ids, text, prev, &AdminState::default(), &Down::new())
}

fn with_admin(
    ids: &mut Ids,
    text: &str,
    prev: Option<&DesiredState>,
    admin: &AdminState,
) -> DesiredState {
    with_all(ids, text, prev, admin, &Down::new())
}

type Down = std::collections::BTreeSet<(String, IpAddr)>;

/// The desired state of `text` with every configured MAC known, the given admin overrides
/// and health-check downs.
fn with_all(
    ids: &mut Ids,
    text: &str,
    prev: Option<&DesiredState>,
    admin: &AdminState,
    down: &Down,
) -> DesiredState {
    let cfg = Config::parse(text, Path::new("t.toml")).unwrap();
    let a = ids.sync(&cfg);
    let inputs = inputs(&cfg, &a, |_, s, b| {
        let health = if down.contains(&(s.name.clone(), b.address)) {
            HealthInput::Down("test".into())
        } else {
            HealthInput::Unchecked
        };
        let mac = b
            .mac
            .map_or(MacInput::Unresolved("no mac".into()), MacInput::Config);
        (admin.get(&s.name, b.address), health, mac)
    });
    DesiredState::next(&inputs, &cfg.dataplane, &Fake, prev).unwrap()
}

#[test]
fn drain_keeps_the_backend_active_with_weight_zero() {
    let mut ids = Ids::default();
    let a = state(&mut ids, TWO, None);
    let mut adm = AdminState::default();
    adm.set(
        "a",
        "10.0.0.2".parse().unwrap(),
        crate::admin::Override {
            admin: Admin::Draining,
            weight: None,
            config_weight: None,
        },
    );
    let b = with_admin(&mut ids, TWO, Some(&a), &adm);
    assert_eq!(
        (b.backends[&B1].flags, b.backends[&B1].generation),
        (a.backends[&B1].flags, a.backends[&B1].generation),
        "same flags and generation: its flows stay"
    );
    assert_eq!(b.backends[&B1].weight, 0);
    assert!(b.services[0].ring.iter().all(|id| id == 0));
    assert_eq!(b.backend_info[&B1].decision.effective_weight, 0);
    assert_eq!(kinds(&diff(Some(&a), &b).0), ["backend", "ring"]);
}

#[test]
fn disable_deactivates_with_a_new_generation_and_enable_keeps_it() {
    let mut ids = Ids::default();
    let a = state(&mut ids, TWO, None);
    let mut adm = AdminState::default();
    let addr = "10.0.0.2".parse().unwrap();
    adm.set(
        "a",
        addr,
        crate::admin::Override {
            admin: Admin::Disabled,
            weight: None,
            config_weight: None,
        },
    );
    let b = with_admin(&mut ids, TWO, Some(&a), &adm);
    assert_eq!(b.backends[&B1].flags & BACKEND_F_ACTIVE, 0);
    assert_ne!(b.backends[&B1].generation, a.backends[&B1].generation);
    assert_eq!(kinds(&diff(Some(&a), &b).0), ["backend", "ring"]);
    // Enabled again: active, and the generation of the disabled period (old flows stay away).
    let c = with_admin(&mut ids, TWO, Some(&b), &AdminState::default());
    assert_eq!(c.backends[&B1].flags & BACKEND_F_ACTIVE, BACKEND_F_ACTIVE);
    assert_eq!(c.backends[&B1].generation, b.backends[&B1].generation);
}

#[test]
fn weight_override_replaces_the_config_weight() {
    let mut ids = Ids::default();
    let a = state(&mut ids, TWO, None);
    let mut adm = AdminState::default();
    adm.set(
        "a",
        "10.0.0.1".parse().unwrap(),
        crate::admin::Override {
            admin: Admin::Enabled,
            weight: Some(300),
            config_weight: Some(100),
        },
    );
    let b = with_admin(&mut ids, TWO, Some(&a), &adm);
    let on0 = b.services[0].ring.iter().filter(|id| *id == 0).count();
    assert!(
        (on0 as f64 / 251.0 - 0.75).abs() < 0.01,
        "{on0} of 251 slots"
    );
    assert_eq!(b.backend_info[&B0].decision.effective_weight, 300);
    assert_eq!(b.backend_info[&B0].config_weight, 100);
}

const TWO: &str = r#"
[dataplane]
interface = "eth0"
ring_size = 251
[[service]]
name = "a"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
[[service.backend]]
address = "10.0.0.1"
mac = "02:00:00:00:01:01"
[[service.backend]]
address = "10.0.0.2"
mac = "02:00:00:00:01:02"
"#;

fn kinds(ops: &[Op]) -> Vec<&'static str> {
    ops.iter()
        .map(|o| match o {
            Op::TxPort { .. } => "txport",
            Op::Backend { .. } => "backend",
            Op::Ring { .. } | Op::Table { .. } => "ring",
            Op::Service { .. } => "service",
            Op::Vip { .. } => "vip",
            Op::Flags(_) => "flags",
            Op::RemoveService(_) => "-service",
            Op::RemoveVip(_) => "-vip",
            Op::RetireBackend { .. } => "-backend",
            Op::VipFilter { on: true, .. } => "filter",
            Op::VipFilter { on: false, .. } => "-filter",
        })
        .collect()
}

#[test]
fn initial_diff_writes_everything_in_order() {
    let mut ids = Ids::default();
    let s = state(&mut ids, TWO, None);
    let (ops, sum) = diff(None, &s);
    assert_eq!(
        kinds(&ops),
        [
            "backend", "backend", "ring", "service", "vip", "filter", "flags"
        ]
    );
    assert_eq!(
        (sum.services_added, sum.backends_added, sum.rings_changed),
        (1, 2, 1)
    );
}

#[test]
fn same_config_changes_nothing() {
    let mut ids = Ids::default();
    let a = state(&mut ids, TWO, None);
    let b = state(&mut ids, TWO, Some(&a));
    assert_eq!(diff(Some(&a), &b).0, vec![]);
    assert_eq!(a.backends, b.backends);
}

#[test]
fn weight_change_rebuilds_the_table_and_keeps_flows() {
    let mut ids = Ids::default();
    let a = state(&mut ids, TWO, None);
    let b = state(
        &mut ids,
        &TWO.replacen(
            "mac = \"02:00:00:00:01:02\"",
            "mac = \"02:00:00:00:01:02\"\nweight = 0",
            1,
        ),
        Some(&a),
    );
    let (ops, _) = diff(Some(&a), &b);
    // The backend entry changes only in its weight: same flags and generation.
    assert_eq!(kinds(&ops), ["backend", "ring"]);
    assert_eq!(b.backends[&B1].generation, a.backends[&B1].generation);
    assert_eq!(b.backends[&B1].weight, 0);
    assert!(
        b.services[0].ring.iter().all(|id| id == 0),
        "weight 0 owns no slot"
    );
    assert_eq!(
        b.backends[&B1].flags, BACKEND_F_ACTIVE,
        "drained backend stays active for its flows"
    );
}

#[test]
fn added_backend_gets_a_new_id_and_generation_others_keep_theirs() {
    let mut ids = Ids::default();
    let a = state(&mut ids, TWO, None);
    let more =
        format!("{TWO}[[service.backend]]\naddress = \"10.0.0.3\"\nmac = \"02:00:00:00:01:03\"\n");
    let b = state(&mut ids, &more, Some(&a));
    assert_eq!(b.backends[&B0], a.backends[&B0]);
    assert_eq!(b.backends[&B1], a.backends[&B1]);
    assert_eq!(b.services[0].backends, vec![B0, B1, B2]);
    assert!(b.backends[&B2].generation >= a.next_generation);
    let (ops, sum) = diff(Some(&a), &b);
    assert_eq!(kinds(&ops), ["backend", "ring"]);
    assert_eq!(sum.backends_added, 1);
}

#[test]
fn removed_backend_is_retired_after_the_table_stops_naming_it() {
    let mut ids = Ids::default();
    let a = state(&mut ids, TWO, None);
    let fewer = TWO.replace(
        "[[service.backend]]\naddress = \"10.0.0.2\"\nmac = \"02:00:00:00:01:02\"\n",
        "",
    );
    let b = state(&mut ids, &fewer, Some(&a));
    let (ops, sum) = diff(Some(&a), &b);
    assert_eq!(kinds(&ops), ["ring", "-backend"]);
    assert_eq!(sum.backends_removed, 1);
    let Op::RetireBackend { id, value } = &ops[1] else {
        unreachable!()
    };
    assert_eq!(*id, B1);
    assert_eq!(value.flags, 0);
    assert_ne!(value.generation, a.backends[&B1].generation);
    // Re-adding the same address later: a new generation, so old flows never come back to it.
    let c = state(&mut ids, TWO, Some(&b));
    assert!(c.backends[&B1].generation > value.generation);
}

#[test]
fn an_id_freed_in_a_reload_is_not_reused_in_the_same_reload() {
    let mut ids = Ids::default();
    let a = state(&mut ids, TWO, None);
    let swapped = TWO.replace("10.0.0.2", "10.0.0.9");
    let b = state(&mut ids, &swapped, Some(&a));
    assert!(!b.backends.contains_key(&B1));
    assert_eq!(b.services[0].backends, vec![B0, B2]);
    assert!(b.retired.contains_key(&B1));
}

#[test]
fn mac_change_updates_in_place_and_keeps_flows() {
    let mut ids = Ids::default();
    let a = state(&mut ids, TWO, None);
    let b = state(
        &mut ids,
        &TWO.replace("02:00:00:00:01:02", "02:00:00:00:01:99"),
        Some(&a),
    );
    let (ops, sum) = diff(Some(&a), &b);
    assert_eq!(kinds(&ops), ["backend"]);
    assert_eq!(sum.backends_updated, 1);
    assert_eq!(b.backends[&B1].generation, a.backends[&B1].generation);
    assert_eq!(b.backends[&B1].mac, [2, 0, 0, 0, 1, 0x99]);
}

#[test]
fn service_key_change_keeps_the_id() {
    let mut ids = Ids::default();
    let a = state(&mut ids, TWO, None);
    let b = state(&mut ids, &TWO.replace("port = 80", "port = 8080"), Some(&a));
    assert_eq!(b.services[0].value.id, a.services[0].value.id);
    let (ops, _) = diff(Some(&a), &b);
    assert_eq!(kinds(&ops), ["service", "-service"]);
    assert_eq!(ops[1], Op::RemoveService(a.services[0].key));
}

/// A VIP's filter slot is set when it appears and cleared when it is gone.
#[test]
fn vip_filter_follows_the_vips() {
    let mut ids = Ids::default();
    let a = state(&mut ids, TWO, None);
    let moved = TWO.replace("10.0.0.100", "10.0.0.101");
    let b = state(&mut ids, &moved, Some(&a));
    let (ops, _) = diff(Some(&a), &b);
    let slot = |ip: &str| {
        let (addr, _) = lb_common::rules::addr_key(ip.parse().unwrap());
        lb_common::hash::vip_slot(&addr)
    };
    assert!(ops.contains(&Op::VipFilter {
        slot: slot("10.0.0.101"),
        on: true
    }));
    assert!(ops.contains(&Op::VipFilter {
        slot: slot("10.0.0.100"),
        on: false
    }));
    let mut fake = crate::dataplane::fake::FakeMaps::default();
    use crate::dataplane::Maps as _;
    fake.apply_ops(&diff(None, &a).0).unwrap();
    fake.apply_ops(&ops).unwrap();
    assert_eq!(
        fake.vip_filter,
        std::collections::BTreeSet::from([slot("10.0.0.101")])
    );
}

#[test]
fn removed_service_takes_its_keys_and_backends_away() {
    let mut ids = Ids::default();
    let a = state(&mut ids, CFG, None);
    let only_a = CFG.split("[[service]]\nname = \"b\"").next().unwrap();
    let b = state(&mut ids, only_a, Some(&a));
    let (ops, sum) = diff(Some(&a), &b);
    assert_eq!(kinds(&ops), ["vip", "flags", "-service", "-backend"]);
    assert_eq!(sum.services_removed, 1);
    assert_eq!(b.flags, 0, "no all-ports service left");
    // A new service later takes the lowest free id again.
    let c = state(&mut ids, CFG, Some(&b));
    assert_eq!(c.services[1].value.id, 1);
}

#[test]
fn a_down_backend_is_inactive_and_out_of_the_table_until_it_is_up() {
    let mut ids = Ids::default();
    let a = state(&mut ids, TWO, None);
    let mut down = Down::new();
    down.insert(("a".to_owned(), "10.0.0.2".parse().unwrap()));
    let b = with_all(&mut ids, TWO, Some(&a), &AdminState::default(), &down);
    assert_eq!(
        b.backends[&B1].flags & BACKEND_F_ACTIVE,
        0,
        "its flows move"
    );
    assert_ne!(b.backends[&B1].generation, a.backends[&B1].generation);
    assert_eq!(b.backend_info[&B1].decision.state, State::Down);
    assert!(b.services[0].ring.iter().all(|id| id == 0));
    let c = with_all(
        &mut ids,
        TWO,
        Some(&b),
        &AdminState::default(),
        &Down::new(),
    );
    assert_eq!(c.backends[&B1].flags & BACKEND_F_ACTIVE, BACKEND_F_ACTIVE);
    assert!(c.services[0].ring.contains(1));
}

#[test]
fn all_down_drops_unless_fallback_all() {
    let mut down = Down::new();
    down.insert(("a".to_owned(), "10.0.0.1".parse().unwrap()));
    down.insert(("a".to_owned(), "10.0.0.2".parse().unwrap()));
    let d = with_all(
        &mut Ids::default(),
        TWO,
        None,
        &AdminState::default(),
        &down,
    );
    assert!(
        d.services[0].ring.iter().all(|id| id == NO_BACKEND),
        "drop: no backend"
    );
    let all = TWO.replace(
        "protocol = \"tcp\"",
        "protocol = \"tcp\"\nfallback = \"all\"",
    );
    let d = with_all(
        &mut Ids::default(),
        &all,
        None,
        &AdminState::default(),
        &down,
    );
    assert!(
        d.services[0].ring.iter().all(|id| id != NO_BACKEND),
        "fallback all: everyone"
    );
    assert!(d.backends.values().all(|b| b.flags & BACKEND_F_ACTIVE != 0));
}

/// Issue #10's consistency without shared state: two nodes built from the same config have
/// byte-identical tables; nodes whose configs list the same services and backends in another
/// order (so other ids) still send every slot to the same backend address, and `ring_digest`
/// says so; a different weight changes the digest.
#[test]
fn tables_agree_across_nodes() {
    const NODE: &str = r#"
[dataplane]
interface = "eth0"
ring_size = 65537
[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
[[service.backend]]
address = "10.0.0.1"
mac = "02:00:00:00:01:01"
[[service.backend]]
address = "10.0.0.2"
mac = "02:00:00:00:01:02"
weight = 200
[[service.backend]]
address = "10.0.0.3"
mac = "02:00:00:00:01:03"
[[service]]
name = "dns"
vip = "10.0.0.100"
port = 53
protocol = "udp"
scheduler = "sh"
[[service.backend]]
address = "10.0.0.4"
mac = "02:00:00:00:01:04"
[[service.backend]]
address = "10.0.0.5"
mac = "02:00:00:00:01:05"
"#;
    let build = |text: &str| {
        let cfg = config::Config::parse(text, Path::new("node.toml")).unwrap();
        DesiredState::from_config(&cfg, &Fake).unwrap()
    };
    let (a, b) = (build(NODE), build(NODE));
    for (sa, sb) in a.services.iter().zip(&b.services) {
        assert_eq!(sa.ring, sb.ring, "{}: the same bytes in LB_RING", sa.name);
    }
    // Another order: services swapped, backends reversed.
    let parts: Vec<&str> = NODE.split("[[service]]").collect();
    let web_rev = {
        let mut bs: Vec<&str> = parts[1].split("[[service.backend]]").collect();
        let head = bs.remove(0);
        bs.reverse();
        format!(
            "{head}[[service.backend]]{}",
            bs.join("[[service.backend]]")
        )
    };
    let other = format!("{}[[service]]{}[[service]]{}", parts[0], parts[2], web_rev);
    let c = build(&other);
    let by_name =
        |d: &DesiredState, n: &str| d.services.iter().find(|s| s.name == n).unwrap().clone();
    let addrs = |d: &DesiredState, s: &DesiredService| -> Vec<std::net::IpAddr> {
        s.ring
            .iter()
            .map(|id| d.backend_info[&BackendId(id)].address)
            .collect()
    };
    for name in ["web", "dns"] {
        let (sa, sc) = (by_name(&a, name), by_name(&c, name));
        assert_ne!(sa.backends, sc.backends, "{name}: the ids differ");
        assert_eq!(
            addrs(&a, &sa),
            addrs(&c, &sc),
            "{name}: same backend per slot"
        );
        assert_eq!(sa.ring_digest(), sc.ring_digest(), "{name}: same digest");
    }
    let changed = build(&NODE.replace("weight = 200", "weight = 300"));
    assert_ne!(
        by_name(&a, "web").ring_digest(),
        by_name(&changed, "web").ring_digest(),
        "a weight change shows"
    );
}

/// Per-service table sizes: each table gets its own range of `LB_RING`; a service keeps its
/// range while its size stays; a resized one moves to a range that neither its old table (read
/// by packets until the service switches) nor any other occupies, and is written whole; a
/// table that does not fit is a precise error.
#[test]
fn tables_get_their_own_ranges_and_keep_them() {
    let two = |a: u32, b: u32, cap: u32| {
        format!(
            "{}ring_capacity = {cap}\n[[service]]\nname = \"a\"\nvip = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\nring_size = {a}\n[[service.backend]]\naddress = \"10.0.0.1\"\nmac = \"02:00:00:00:01:01\"\n[[service]]\nname = \"b\"\nvip = \"10.0.0.100\"\nport = 81\nprotocol = \"tcp\"\nring_size = {b}\n[[service.backend]]\naddress = \"10.0.0.2\"\nmac = \"02:00:00:00:01:02\"\n",
            "[dataplane]\ninterface = \"eth0\"\n"
        )
    };
    let range = |d: &DesiredState, i: usize| d.services[i].ring_range();
    let disjoint = |d: &DesiredState| {
        let (x, y) = (range(d, 0), range(d, 1));
        x.end <= y.start || y.end <= x.start
    };
    let mut ids = Ids::default();
    let s1 = state(&mut ids, &two(101, 251, 400), None);
    assert_eq!((range(&s1, 0), range(&s1, 1)), (0..101, 101..352));
    assert!(
        s1.services
            .iter()
            .all(|s| s.ring.len() == s.value.ring_size as usize)
    );

    // Same sizes: same ranges, nothing written.
    let s2 = state(&mut ids, &two(101, 251, 400), Some(&s1));
    assert_eq!((range(&s2, 0), range(&s2, 1)), (0..101, 101..352));
    assert!(diff(Some(&s1), &s2).0.is_empty());

    // "a" grows to 11: it cannot stay at 0..101 nor take 101..352, so it goes after both.
    let s3 = state(&mut ids, &two(11, 251, 400), Some(&s2));
    assert_eq!((range(&s3, 0), range(&s3, 1)), (352..363, 101..352));
    assert!(disjoint(&s3));
    let (ops, _) = diff(Some(&s2), &s3);
    let written: usize = ops
        .iter()
        .filter_map(|o| match o {
            Op::Ring { base, slots, .. } if *base == 352 => Some(slots.len()),
            Op::Table { base, ring, .. } if *base == 352 => Some(ring.len()),
            _ => None,
        })
        .sum();
    assert_eq!(written, 11, "a moved table is written whole");
    // Every slot of the moved table is changed: its established flows use their entries.
    assert_eq!(s3.services[0].dirty.len(), 11);

    // Now 0..101 is free again: a table of 97 fits there.
    let s4 = state(&mut ids, &two(97, 251, 400), Some(&s3));
    assert_eq!(range(&s4, 0), 0..97);

    // No room: "b" cannot grow to 307 while its old table (251) still occupies its range.
    let fits = state(&mut ids.clone(), &two(97, 307, 660), Some(&s4));
    assert_eq!(range(&fits, 1), 352..659, "97 + 251 (old) + 307 ≤ 660");
    let cfg = Config::parse(&two(97, 307, 600), Path::new("lb.toml")).unwrap();
    let a = Ids::default().sync(&cfg);
    let inputs = inputs(&cfg, &a, |_, _, b| {
        (
            Override::default(),
            HealthInput::Unchecked,
            MacInput::Config(b.mac.unwrap()),
        )
    });
    let err = DesiredState::next(&inputs, &cfg.dataplane, &Fake, Some(&s4)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("service \"b\": no room for a table of 307 slots in LB_RING (600 slots")
            && msg.contains("its old table included"),
        "{msg}"
    );
}

/// A maglev service of `protocol` with table `ring`, changed slots `dirty` and previous
/// backends `prev` until `until` (the previous-backend tests' input).
fn maglev_service(
    protocol: u8,
    ring: &[u32],
    dirty: &[u32],
    prev: &[(u32, u32)],
    until: u64,
) -> DesiredService {
    let mut d = Slots::new(ring.len());
    for i in dirty {
        d.insert(*i);
    }
    DesiredService {
        name: "svc".into(),
        key: ServiceKey {
            protocol,
            ..Default::default()
        },
        value: ServiceValue {
            scheduler: SCHED_MAGLEV,
            ring_size: ring.len() as u32,
            ..Default::default()
        },
        ring: std::sync::Arc::new(Table::from_ids(ring)),
        backends: Vec::new(),
        digest: LazyDigest::default(),
        ring_key: RingKey::none(),
        dirty: d,
        prev: std::sync::Arc::new(prev.iter().copied().collect()),
        prev_until_ns: until,
    }
}

/// Previous backends of a UDP service's changed slots (its flows of unchanged slots are not
/// recorded): a slot that changes from unchanged names its backend before; a later change keeps that while it lives,
/// a change back to it drops it; it lapses; another table size keeps nothing.
#[test]
fn changed_slots_name_their_previous_backend_while_it_lives() {
    let svc = |ring: &[u32], dirty: &[u32], prev: &[(u32, u32)], until: u64| {
        maglev_service(lb_common::PROTO_UDP, ring, dirty, prev, until)
    };
    const W: u64 = 100;
    // Slots 0 and 1 change from A (1) to B (2); slot 2 was changed already (no previous: its
    // flows are recorded); slot 3 stays.
    let old = svc(&[1, 1, 1, 1], &[2], &[], 0);
    let mut next = svc(&[2, 2, 2, 1], &[0, 1, 2], &[], 0);
    with_previous(&mut next, Some(&old), 10, W, false);
    assert_eq!(*next.prev, [(0, 1), (1, 1)].into_iter().collect());
    assert_eq!(next.prev_until_ns, 10 + W);
    assert_eq!(
        next.slot_value(0),
        Some(lb_common::ring_value(2, true, Some(1)))
    );
    assert_eq!(next.slot_value(2), Some(2 | lb_common::RING_DIRTY));
    assert_eq!(next.slot_value(3), Some(1));
    // A (1) may still get unrecorded flows for the rest of the window, rounded up to seconds.
    const S: u64 = 1_000_000_000;
    let mut window = svc(&[2, 2, 2, 1], &[0, 1, 2], &[(0, 1), (1, 1)], 10 + 3 * S);
    assert_eq!(
        window.unrecorded_flows_seconds(10 + S / 2),
        [(1, 3)].into_iter().collect()
    );
    assert!(window.unrecorded_flows_seconds(10 + 3 * S).is_empty());
    window.prev = Default::default();
    assert!(window.unrecorded_flows_seconds(0).is_empty());
    // Then slot 0 goes to C (3) and slot 1 back to A, slot 3 from A to C: slot 0 keeps A, slot
    // 1 has A again (nothing to keep), slot 3 names A from now on.
    let mut later = svc(&[3, 1, 2, 3], &[0, 1, 2, 3], &[], 0);
    with_previous(&mut later, Some(&next), 50, W, false);
    assert_eq!(*later.prev, [(0, 1), (3, 1)].into_iter().collect());
    assert_eq!(
        later.prev_until_ns,
        50 + W,
        "a new one: a full window from now"
    );
    // Lapsed: nothing kept, nothing new.
    let mut lapsed = svc(&[3, 1, 2, 3], &[0, 1, 2, 3], &[], 0);
    with_previous(&mut lapsed, Some(&later), 50 + W, W, false);
    assert!(lapsed.prev.is_empty());
    assert_eq!(lapsed.prev_until_ns, 0);
    // An empty slot keeps its previous backend for when it has one again.
    let mut empty = svc(&[NO_BACKEND, 2, 2, 1], &[0, 1, 2], &[], 0);
    with_previous(&mut empty, Some(&old), 10, W, false);
    assert_eq!(empty.prev.get(&0), Some(&1));
    assert_eq!(empty.slot_value(0), Some(NO_BACKEND));
    // Another table size: no slot corresponds.
    let mut resized = svc(&[2, 2, 2, 2, 2], &[0, 1, 2, 3, 4], &[], 0);
    with_previous(&mut resized, Some(&old), 10, W, false);
    assert!(resized.prev.is_empty());
    // A TCP service: none (its connections are recorded at their SYN).
    let mut tcp = svc(&[2, 2, 2, 1], &[0, 1, 2], &[], 0);
    tcp.key.protocol = lb_common::PROTO_TCP;
    with_previous(&mut tcp, Some(&old), 10, W, false);
    assert!(tcp.prev.is_empty());
    assert_eq!(tcp.slot_value(0), Some(2 | lb_common::RING_DIRTY));
    // Unless a record limit is set (SYNs beyond it are not recorded): as UDP. (Not UDP's
    // business: it keeps them either way.)
    let mut limited = svc(&[2, 2, 2, 1], &[0, 1, 2], &[], 0);
    limited.key.protocol = lb_common::PROTO_TCP;
    with_previous(&mut limited, Some(&old), 10, W, true);
    assert_eq!(*limited.prev, [(0, 1), (1, 1)].into_iter().collect());
    assert_eq!(
        limited.slot_value(0),
        Some(lb_common::ring_value(2, true, Some(1)))
    );
    let mut udp = svc(&[2, 2, 2, 1], &[0, 1, 2], &[], 0);
    with_previous(&mut udp, Some(&old), 10, W, true);
    assert_eq!(*udp.prev, *limited.prev);
    // A TCP service with record_connections = "on_change" (its connections of unchanged slots
    // are not recorded): as UDP. And one that just switched back to "at_syn" still has
    // unrecorded connections: as UDP too; from at_syn to at_syn: none.
    let tcp_svc = |ring: &[u32], dirty: &[u32], on_change: bool| {
        let mut s = svc(ring, dirty, &[], 0);
        s.key.protocol = lb_common::PROTO_TCP;
        if on_change {
            s.value.flags = lb_common::SVC_F_TCP_ON_CHANGE;
        }
        s
    };
    for (was, is, kept) in [
        (true, true, true),
        (true, false, true),
        (false, true, true),
        (false, false, false),
    ] {
        let old = tcp_svc(&[1, 1, 1, 1], &[2], was);
        let mut next = tcp_svc(&[2, 2, 2, 1], &[0, 1, 2], is);
        with_previous(&mut next, Some(&old), 10, W, false);
        let want: BTreeMap<u32, u32> = if kept {
            [(0, 1), (1, 1)].into_iter().collect()
        } else {
            BTreeMap::new()
        };
        assert_eq!(*next.prev, want, "on_change {was} → {is}");
        if was && !is {
            // The next change of the (now at_syn) service keeps them while they live.
            let mut again = tcp_svc(&[2, 2, 3, 1], &[0, 1, 2], false);
            with_previous(&mut again, Some(&next), 20, W, false);
            assert_eq!(*again.prev, want, "live: kept");
            let mut lapsed = tcp_svc(&[2, 2, 3, 1], &[0, 1, 2], false);
            with_previous(&mut lapsed, Some(&next), 10 + W, W, false);
            assert!(lapsed.prev.is_empty(), "lapsed: none");
        }
    }
}

/// The short window of `dataplane.defer_records` applies to `"at_syn"` maglev/sh TCP services
/// without a record limit, and not to a service that comes from `"on_change"` (in the change,
/// or while its long previous backends are live).
#[test]
fn the_deferred_window_is_for_at_syn_tcp_without_on_change_history() {
    const W: u64 = crate::controller::DEFER_WINDOW_NS;
    let svc = |dirty: &[u32], prev: &[(u32, u32)], until: u64| {
        maglev_service(lb_common::PROTO_TCP, &[1; 4], dirty, prev, until)
    };
    let tcp = svc(&[], &[], 0);
    assert_eq!(tcp.key.protocol, lb_common::PROTO_TCP);
    assert!(deferred_window_applies(&tcp, Some(&tcp), 10, true, false));
    assert!(deferred_window_applies(&tcp, None, 10, true, false));
    assert!(
        !deferred_window_applies(&tcp, Some(&tcp), 10, false, false),
        "not deferring"
    );
    assert!(
        !deferred_window_applies(&tcp, Some(&tcp), 10, true, true),
        "a record limit"
    );
    let mut on_change = tcp.clone();
    on_change.value.flags |= lb_common::SVC_F_TCP_ON_CHANGE;
    assert!(!deferred_window_applies(
        &on_change,
        Some(&tcp),
        10,
        true,
        false
    ));
    assert!(
        !deferred_window_applies(&tcp, Some(&on_change), 10, true, false),
        "switched now"
    );
    let long = svc(&[0], &[(0, 2)], 10 + 900 * 1_000_000_000);
    assert!(
        !deferred_window_applies(&tcp, Some(&long), 10, true, false),
        "switched earlier"
    );
    let short = svc(&[0], &[(0, 2)], 10 + W);
    assert!(deferred_window_applies(&tcp, Some(&short), 10, true, false));
}

#[test]
fn services_with_the_same_backends_share_their_table_bytes() {
    // Two ports of one VIP to the same backends (listed in another order), a third with
    // another weight: the first two share one build, each table naming its own ids; every
    // table is what a build of its own gives.
    let svc = |name: &str, port: u16, backends: &[(&str, u16)]| {
        let mut t = format!(
            "[[service]]\nname = \"{name}\"\nvip = \"10.0.0.100\"\nport = {port}\nprotocol = \"tcp\"\n"
        );
        for (i, (a, w)) in backends.iter().enumerate() {
            t += &format!(
                "[[service.backend]]\naddress = \"{a}\"\nmac = \"02:00:00:00:01:{i:02x}\"\nweight = {w}\n"
            );
        }
        t
    };
    let text = format!(
        "[dataplane]\ninterface = \"eth0\"\nring_size = 251\n{}{}{}",
        svc(
            "a",
            80,
            &[("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 1)]
        ),
        svc(
            "b",
            443,
            &[("10.0.0.3", 1), ("10.0.0.1", 1), ("10.0.0.2", 2)]
        ),
        svc(
            "c",
            8080,
            &[("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)]
        ),
    );
    let cfg = Config::parse(&text, Path::new("t.toml")).unwrap();
    let d = build(&cfg);
    let narrow: Vec<&table::Narrow> = d
        .services
        .iter()
        .map(|s| s.ring.narrow().expect("three backends: a byte a slot"))
        .collect();
    assert!(std::sync::Arc::ptr_eq(&narrow[0].fields, &narrow[1].fields));
    assert!(!std::sync::Arc::ptr_eq(
        &narrow[0].fields,
        &narrow[2].fields
    ));
    for s in &d.services {
        let mut own = Vec::new();
        maglev_ring(&s.ring_key, &mut own);
        assert_eq!(s.ring.to_vec(), own, "service {}", s.name);
        assert!(own.iter().all(|id| s.backends.iter().any(|b| b.0 == *id)));
    }
    // The same address behind each slot in a and b (their ids differ).
    let addr = |s: &DesiredService, id: u32| s.ring_key.addresses()[&id];
    let (a, b) = (&d.services[0], &d.services[1]);
    assert_ne!(a.ring, b.ring);
    for (x, y) in a.ring.iter().zip(b.ring.iter()) {
        assert_eq!(addr(a, x), addr(b, y));
    }
}
