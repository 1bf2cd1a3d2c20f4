//! The controller's core through fakes: every order of the events that feed the one rule, with
//! the maps' contents checked after each step against an independent model.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    rc::Rc,
    time::Instant,
};

use lb_common::{BACKEND_F_ACTIVE, NO_BACKEND};

use super::*;
use crate::{
    config::Mac,
    dataplane::fake::FakeMaps,
    neigh::{Neighbour, nud},
};

#[derive(Clone, Default)]
struct FakeNet {
    probes: Rc<RefCell<Vec<IpAddr>>>,
    gateway: Rc<RefCell<Option<IpAddr>>>,
}

impl Neighbours for FakeNet {
    fn route(&self, _addr: IpAddr) -> Result<Route, String> {
        Ok(Route {
            dev: "eth0".into(),
            ifindex: 2,
            gateway: *self.gateway.borrow(),
            local: false,
        })
    }
    fn probe(&self, addr: IpAddr) {
        self.probes.borrow_mut().push(addr);
    }
}

struct FakeIfaces;
impl Interfaces for FakeIfaces {
    fn lookup(&self, name: &str) -> Result<(u32, Mac), String> {
        match name {
            "eth0" => Ok((2, Mac([2, 0, 0, 0, 0, 1]))),
            _ => Err(format!("no {name}")),
        }
    }
}

const RING: u32 = 251;
const A: &str = "10.0.0.21";
const B: &str = "10.0.0.22";

fn dir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    // Admin changes fsync the state file: keep it in memory where the machine has it.
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!(
        "lb-ctl-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Two backends without `mac`, checked (rise = fall = 1), in a maglev service.
fn config(dir: &Path, weight_a: u16) -> String {
    format!(
        "[dataplane]\ninterface = \"eth0\"\nring_size = {RING}\n[control]\nsocket = \"{d}/lb.sock\"\nstate_file = \"{d}/state.json\"\n\
         [[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n\
         [service.health]\nkind = \"tcp\"\nrise = 1\nfall = 1\n\
         [[service.backend]]\naddress = \"{A}\"\nweight = {weight_a}\n[[service.backend]]\naddress = \"{B}\"\n",
        d = dir.display()
    )
}

type Ctl = Controller<FakeMaps, FakeNet, FakeIfaces>;

fn start(dir: &Path, net: &FakeNet) -> Ctl {
    start_with(dir, net, &config(dir, 100))
}

/// [`config`] with a UDP service (port 53) instead.
fn udp_config(dir: &Path, weight_a: u16) -> String {
    config(dir, weight_a).replace(
        "port = 80\nprotocol = \"tcp\"",
        "port = 53\nprotocol = \"udp\"",
    )
}

/// [`start`] with another config text.
fn start_with(dir: &Path, net: &FakeNet, text: &str) -> Ctl {
    start_on(dir, net, text, FakeMaps::default())
}

/// [`start_with`] on given (empty) maps.
fn start_on(dir: &Path, net: &FakeNet, text: &str, maps: FakeMaps) -> Ctl {
    let path = dir.join("lb.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = Config::load(&path).unwrap();
    let mut c = Controller::new(
        &path,
        cfg,
        AdminState::default(),
        maps,
        net.clone(),
        FakeIfaces,
        None,
        Resolver::default(),
    )
    .unwrap();
    let checked: Vec<BackendId> = c.wanted_checks().keys().copied().collect();
    c.sync_health(checked);
    c
}

/// A restarted controller on `maps`, adopting what an earlier one left in them.
fn adopt(dir: &Path, net: &FakeNet, maps: FakeMaps) -> Ctl {
    let path = dir.join("lb.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    adopt_with(
        dir,
        net,
        maps,
        Resolver::default(),
        AdminState::default(),
        &text,
    )
}

/// [`adopt`], with the neighbours `lb run` reads before it starts (`resolver`) and the admin
/// state it persisted.
fn adopt_with(
    dir: &Path,
    net: &FakeNet,
    maps: FakeMaps,
    resolver: Resolver,
    admin: AdminState,
    text: &str,
) -> Ctl {
    let adopted = maps.adopted();
    let path = dir.join("lb.toml");
    std::fs::write(&path, text).unwrap();
    Controller::new(
        &path,
        Config::load(&path).unwrap(),
        admin,
        maps,
        net.clone(),
        FakeIfaces,
        Some(&adopted),
        resolver,
    )
    .unwrap()
}

fn addr(a: &str) -> IpAddr {
    a.parse().unwrap()
}

fn id(c: &Ctl, a: &str) -> BackendId {
    c.ids.backend("web", addr(a)).unwrap()
}

/// The events that feed the rule.
#[derive(Clone, Copy, Debug)]
enum Ev {
    /// The neighbour entry of a backend: reachable at MAC `n`, or failed.
    Resolved(&'static str, u8),
    Failed(&'static str),
    Deleted(&'static str),
    /// A health check result.
    Health(&'static str, bool),
    Weight(&'static str, u16),
    Drain(&'static str),
    Disable(&'static str),
    Enable(&'static str),
    Reload,
    Resync,
}

/// What the model expects of one backend.
#[derive(Clone, Debug, Default)]
struct Model {
    mac: Option<u8>,
    up: bool,
    admin: Admin,
    weight: Option<u16>,
}

fn mac(n: u8) -> Mac {
    Mac([2, 0x99, 0, 0, 0, n])
}

/// The kernel reports backend `a` reachable at MAC `n`.
fn reachable(c: &mut Ctl, a: &str, n: u8) {
    c.on_neighbour(NeighEvent::New {
        ifindex: 2,
        addr: addr(a),
        neighbour: Neighbour {
            mac: Some(mac(n)),
            state: nud::REACHABLE,
        },
    });
}

fn step(c: &mut Ctl, dir: &Path, ev: Ev, model: &mut BTreeMap<&'static str, Model>) {
    let neigh = |a: &str, mac: Option<Mac>, state| NeighEvent::New {
        ifindex: 2,
        addr: addr(a),
        neighbour: Neighbour { mac, state },
    };
    match ev {
        Ev::Resolved(a, n) => {
            c.on_neighbour(neigh(a, Some(mac(n)), nud::REACHABLE));
            model.get_mut(a).unwrap().mac = Some(n);
        }
        Ev::Failed(a) => {
            c.on_neighbour(neigh(a, None, nud::FAILED));
            model.get_mut(a).unwrap().mac = None;
        }
        Ev::Deleted(a) => {
            c.on_neighbour(NeighEvent::Del {
                ifindex: 2,
                addr: addr(a),
            });
            model.get_mut(a).unwrap().mac = None;
        }
        Ev::Health(a, ok) => {
            let r = if ok { Ok(()) } else { Err("refused".into()) };
            let i = id(c, a);
            c.on_check(i, r, Instant::now());
            model.get_mut(a).unwrap().up = ok;
        }
        Ev::Weight(a, w) => {
            c.admin("web", addr(a), BackendAction::Weight(w)).unwrap();
            model.get_mut(a).unwrap().weight = (w != 100).then_some(w);
        }
        Ev::Drain(a) => {
            c.admin("web", addr(a), BackendAction::Drain).unwrap();
            model.get_mut(a).unwrap().admin = Admin::Draining;
        }
        Ev::Disable(a) => {
            c.admin("web", addr(a), BackendAction::Disable).unwrap();
            model.get_mut(a).unwrap().admin = Admin::Disabled;
        }
        Ev::Enable(a) => {
            c.admin("web", addr(a), BackendAction::Enable).unwrap();
            model.get_mut(a).unwrap().admin = Admin::Enabled;
        }
        Ev::Reload => {
            let cfg = Config::parse(&config(dir, 100), &dir.join("lb.toml")).unwrap();
            c.reload(cfg).unwrap();
        }
        Ev::Resync => {
            // The watcher restarted: a resync, then the dump of what the model knows.
            c.on_neighbour(NeighEvent::Resync);
            let known: Vec<(&str, Option<u8>)> = model.iter().map(|(a, m)| (*a, m.mac)).collect();
            for (a, m) in known {
                if let Some(n) = m {
                    c.on_neighbour(neigh(a, Some(mac(n)), nud::REACHABLE));
                }
            }
            c.on_neighbour(NeighEvent::Synced);
        }
    }
}

/// The maps hold exactly what the model says, and nothing active without a MAC.
fn check(c: &Ctl, model: &BTreeMap<&'static str, Model>, trail: &[Ev]) {
    let fake = &c.maps;
    let mut weights = BTreeMap::new();
    for (a, m) in model {
        let i = id(c, a);
        let b = fake.backends[&i.0];
        let active = m.admin != Admin::Disabled && m.up && m.mac.is_some();
        let weight = match m.admin {
            Admin::Enabled if active => m.weight.unwrap_or(100),
            _ => 0,
        };
        assert_eq!(
            b.flags & BACKEND_F_ACTIVE != 0,
            active,
            "{a} active after {trail:?}: {m:?}"
        );
        if active {
            assert_eq!(Mac(b.mac), mac(m.mac.unwrap()), "{a} MAC after {trail:?}");
        }
        assert!(
            b.flags & BACKEND_F_ACTIVE == 0 || b.mac != [0; 6],
            "{a}: active with the zero MAC after {trail:?}"
        );
        assert_eq!(b.weight, weight as u32, "{a} weight after {trail:?}");
        weights.insert(i.0, weight);
    }
    let table = fake.table(0);
    for slot in &table {
        assert!(
            *slot == NO_BACKEND || weights.get(slot).copied().unwrap_or(0) > 0,
            "slot names backend {slot} (weight 0 or unknown) after {trail:?}"
        );
    }
    for (i, w) in &weights {
        assert_eq!(
            table.contains(i),
            *w > 0,
            "backend {i} in table after {trail:?}"
        );
    }
    if weights.values().all(|w| *w == 0) {
        assert!(table.iter().all(|s| *s == NO_BACKEND));
    }
}

fn permutations(events: &[Ev]) -> Vec<Vec<Ev>> {
    if events.len() <= 1 {
        return vec![events.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..events.len() {
        let mut rest = events.to_vec();
        let e = rest.remove(i);
        for mut p in permutations(&rest) {
            p.insert(0, e);
            out.push(p);
        }
    }
    out
}

fn run_orders(events: &[Ev]) -> usize {
    let orders = permutations(events);
    for order in &orders {
        let d = dir();
        let net = FakeNet::default();
        let mut c = start(&d, &net);
        let mut model: BTreeMap<&'static str, Model> = [A, B]
            .into_iter()
            .map(|a| {
                (
                    a,
                    Model {
                        up: true,
                        ..Model::default()
                    },
                )
            })
            .collect();
        check(&c, &model, &[]);
        for (k, ev) in order.iter().enumerate() {
            step(&mut c, &d, *ev, &mut model);
            check(&c, &model, &order[..=k]);
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
    orders.len()
}

/// Every order of: A resolved, B failed, B resolved, A's check fails, A's check passes,
/// an admin weight change, a reload.
#[test]
fn every_order_of_neighbour_health_admin_and_reload_events() {
    let n = run_orders(&[
        Ev::Resolved(A, 0x21),
        Ev::Failed(B),
        Ev::Resolved(B, 0x22),
        Ev::Health(A, false),
        Ev::Health(A, true),
        Ev::Weight(A, 200),
        Ev::Reload,
    ]);
    assert_eq!(n, 5040);
}

/// Every order of: a MAC change, a lost entry, a watcher resync, drain and disable.
#[test]
fn every_order_of_mac_changes_and_admin_states() {
    let n = run_orders(&[
        Ev::Resolved(A, 0x21),
        Ev::Resolved(A, 0x31),
        Ev::Deleted(B),
        Ev::Resolved(B, 0x22),
        Ev::Resync,
        Ev::Drain(B),
        Ev::Disable(A),
    ]);
    assert_eq!(n, 5040);
}

/// Issue #8's scenario: B never resolves; a weight change of A, a reload and A's health
/// transitions never make B active.
#[test]
fn an_unresolved_backend_never_becomes_active() {
    let d = dir();
    let net = FakeNet::default();
    let mut c = start(&d, &net);
    reachable(&mut c, A, 0x21);
    let b = id(&c, B);
    let inactive = |c: &Ctl| c.maps.backends[&b.0].flags & BACKEND_F_ACTIVE == 0;
    assert!(inactive(&c));
    c.admin("web", addr(A), BackendAction::Weight(200)).unwrap();
    assert!(inactive(&c), "after the weight change");
    c.reload(Config::parse(&config(&d, 100), &d.join("lb.toml")).unwrap())
        .unwrap();
    assert!(inactive(&c), "after a reload");
    c.on_check(id(&c, A), Err("x".into()), Instant::now());
    c.on_check(id(&c, A), Ok(()), Instant::now());
    assert!(inactive(&c), "after health transitions");
    let info = &c.desired.backend_info[&b];
    assert_eq!(info.decision.state, desired::State::Down);
    assert!(
        info.decision.reason.starts_with("MAC unresolved"),
        "{info:?}"
    );
    assert!(net.probes.borrow().contains(&addr(B)), "B was probed");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A weight override holds across reloads until the config's weight for that backend changes;
/// then the config wins and the status says so.
#[test]
fn a_config_weight_change_drops_the_override() {
    let d = dir();
    let net = FakeNet::default();
    let mut c = start(&d, &net);
    c.admin("web", addr(A), BackendAction::Weight(300)).unwrap();
    let reload = |c: &mut Ctl, w| {
        c.reload(Config::parse(&config(&d, w), &d.join("lb.toml")).unwrap())
            .unwrap()
    };
    reload(&mut c, 100);
    assert_eq!(
        c.admin.get("web", addr(A)).weight,
        Some(300),
        "kept across reload"
    );
    reload(&mut c, 150);
    assert_eq!(c.admin.get("web", addr(A)).weight, None, "config wins");
    let note = &c.weight_notes[&id(&c, A)];
    assert!(
        note.contains("override 300 dropped") && note.contains("100 → 150"),
        "{note}"
    );
    let saved = AdminState::load(&d.join("state.json")).unwrap();
    assert_eq!(saved.get("web", addr(A)).weight, None, "persisted");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A reload that makes a backend unreachable by MAC rewrite is refused, and nothing changes.
#[test]
fn a_backend_behind_a_gateway_is_refused_at_reload() {
    let d = dir();
    let net = FakeNet::default();
    let mut c = start(&d, &net);
    let before = c.maps.clone();
    *net.gateway.borrow_mut() = Some(addr("10.0.0.1"));
    let e = c
        .reload(Config::parse(&config(&d, 150), &d.join("lb.toml")).unwrap())
        .unwrap_err();
    assert!(
        e.message.contains("reached through gateway 10.0.0.1"),
        "{}",
        e.message
    );
    assert!(e.message.contains("running configuration kept"));
    assert_eq!(c.maps.backends, before.backends);
    std::fs::remove_dir_all(&d).unwrap();
}

/// The map writes of a one-backend change on a 65 537-slot table: only the slots that change
/// (before: the whole table, 65 537 writes).
#[test]
fn a_one_backend_change_writes_only_the_changed_slots() {
    let d = dir();
    let mut text = format!(
        "[dataplane]\ninterface = \"eth0\"\nring_size = 65537\n[control]\nsocket = \"{0}/lb.sock\"\nstate_file = \"{0}/state.json\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n",
        d.display()
    );
    for i in 1..=10 {
        text += &format!(
            "[[service.backend]]\naddress = \"10.0.0.{i}\"\nmac = \"02:00:00:00:00:{i:02x}\"\n"
        );
    }
    let path = d.join("lb.toml");
    let cfg = Config::parse(&text, &path).unwrap();
    let mut c = Controller::new(
        &path,
        cfg,
        AdminState::default(),
        FakeMaps::default(),
        FakeNet::default(),
        FakeIfaces,
        None,
        Resolver::default(),
    )
    .unwrap();
    let w0 = c.maps.writes;
    assert!(w0 >= 65537, "first fill writes the whole table ({w0})");
    c.admin("web", addr("10.0.0.3"), BackendAction::Drain)
        .unwrap();
    let drain = c.maps.writes - w0;
    let w1 = c.maps.writes;
    c.admin("web", addr("10.0.0.3"), BackendAction::Enable)
        .unwrap();
    let enable = c.maps.writes - w1;
    println!(
        "one-backend change on a 65537-slot table with 10 backends: drain {drain} writes, enable {enable} writes (before: 65537 + 1)"
    );
    // One backend of ten owns about a tenth of the slots; the others keep theirs (Maglev).
    assert!(
        drain < 65537 / 5 && enable < 65537 / 5,
        "{drain} / {enable}"
    );
    assert!(drain > 65537 / 20, "{drain}");
    assert_eq!(c.maps.table(0), c.desired.services[0].ring.to_vec());
    std::fs::remove_dir_all(&d).unwrap();
}

/// Every order of: B disabled, resolved, enabled again, and its check failing.
#[test]
fn every_order_of_disable_enable_and_resolution() {
    let n = run_orders(&[
        Ev::Disable(B),
        Ev::Resolved(B, 0x22),
        Ev::Enable(B),
        Ev::Health(B, false),
        Ev::Resolved(A, 0x21),
    ]);
    assert_eq!(n, 120);
}

/// A restarted controller adopts what the maps hold: the same ids and generations (so
/// established flows stay), nothing rewritten with another value, and a backend that was out
/// (its check failed) starts down instead of coming back untested.
#[test]
fn a_restarted_controller_adopts_ids_generations_and_health() {
    let d = dir();
    let net = FakeNet::default();
    let mut c = start(&d, &net);
    for (a, n) in [(A, 0x21), (B, 0x22)] {
        reachable(&mut c, a, n);
    }
    // Churn generations: B disabled and enabled again, A's check fails.
    c.admin("web", addr(B), BackendAction::Disable).unwrap();
    c.admin("web", addr(B), BackendAction::Enable).unwrap();
    c.on_check(id(&c, A), Err("refused".into()), Instant::now());
    let (ida, idb) = (id(&c, A), id(&c, B));
    let maps = c.maps.clone();
    assert_eq!(
        maps.backends[&ida.0].flags & BACKEND_F_ACTIVE,
        0,
        "A is out"
    );
    let adopted = maps.adopted();
    assert_eq!(adopted.backends.len(), 2);
    drop(c);

    let path = d.join("lb.toml");
    let mut resolver = Resolver::default();
    for (a, n) in [(A, 0x21), (B, 0x22)] {
        resolver.apply(&NeighEvent::New {
            ifindex: 2,
            addr: addr(a),
            neighbour: Neighbour {
                mac: Some(mac(n)),
                state: nud::REACHABLE,
            },
        });
    }
    let mut c2: Ctl = Controller::new(
        &path,
        Config::load(&path).unwrap(),
        AdminState::load(&d.join("state.json")).unwrap(),
        maps.clone(),
        net.clone(),
        FakeIfaces,
        Some(&adopted),
        resolver,
    )
    .unwrap();
    let checked: Vec<BackendId> = c2.wanted_checks().keys().copied().collect();
    c2.sync_health(checked);
    assert_eq!((id(&c2, A), id(&c2, B)), (ida, idb), "same ids");
    assert_eq!(
        c2.maps.backends, maps.backends,
        "same values, generations included"
    );
    assert_eq!(c2.maps.table(0), maps.table(0), "same table");
    let info = &c2.desired.backend_info[&ida];
    assert_eq!(info.decision.state, desired::State::Down, "A starts down");
    // A passing check (rise = 1) brings it back with its old generation kept for nobody.
    c2.on_check(ida, Ok(()), Instant::now());
    assert_ne!(c2.maps.backends[&ida.0].flags & BACKEND_F_ACTIVE, 0);
    std::fs::remove_dir_all(&d).unwrap();
}

/// `lb explain` over the fake maps: no service, a new flow (the Maglev slot the kernel's hash
/// gives), a hit, a hit on a draining backend, a rescheduled flow after a disable, and a drop
/// when nothing is usable.
#[test]
fn explain_follows_the_kernels_rules() {
    use crate::explain::Query;
    let d = dir();
    let net = FakeNet::default();
    let mut c = start(&d, &net);
    for (a, n) in [(A, 0x21), (B, 0x22)] {
        reachable(&mut c, a, n);
        c.on_check(id(&c, a), Ok(()), Instant::now());
    }
    let q = Query {
        protocol: crate::config::Protocol::Tcp,
        client: addr("192.0.2.7"),
        client_port: 40000,
        vip: addr("10.0.0.100"),
        port: 80,
    };
    let e = c.explain(&Query { port: 81, ..q }, 0).unwrap();
    assert_eq!(
        (e.outcome.as_str(), e.verdict.as_str()),
        ("no_service", "pass")
    );

    let e = c.explain(&q, 0).unwrap();
    let slot = lb_common::hash::reduce(lb_common::hash::flow_hash(&q.key()), RING);
    let base = c.desired.services[0].value.ring_base;
    let want = lb_common::ring_id(c.maps.ring[&(base + slot)]).unwrap();
    let want_addr = c.desired.backend_info[&BackendId(want)].address;
    assert_eq!(
        (e.outcome.as_str(), e.backend),
        ("new", Some(want_addr)),
        "{e:?}"
    );
    assert!(
        e.reason.contains(&format!("slot {slot} of {RING}")),
        "{}",
        e.reason
    );

    // The flow is recorded on the *other* backend (say an earlier table): the table wins.
    let other = if want_addr == addr(A) { B } else { A };
    let oid = id(&c, other);
    let generation = c.maps.backends[&oid.0].generation;
    c.maps.flows.push((
        q.key(),
        lb_common::FlowValue {
            backend: oid.0,
            generation,
            last_seen_ns: 0,
            flags: lb_common::FLOW_F_COUNTED,
            cpu: 0,
        },
    ));
    let e = c.explain(&q, 3_000_000_000).unwrap();
    assert_eq!(
        (e.outcome.as_str(), e.backend),
        ("hit", Some(addr(other))),
        "{e:?}"
    );
    assert!(
        e.connection
            .as_ref()
            .is_some_and(|c| c.counted && c.idle_seconds == 3.0)
    );
    c.admin("web", addr(other), BackendAction::Drain).unwrap();
    let e = c.explain(&q, 0).unwrap();
    assert_eq!(e.outcome, "hit");
    assert!(e.reason.contains("draining"), "{}", e.reason);
    c.admin("web", addr(other), BackendAction::Disable).unwrap();
    let e = c.explain(&q, 0).unwrap();
    assert_eq!(
        (e.outcome.as_str(), e.backend),
        ("rescheduled", Some(addr(if other == A { B } else { A }))),
        "{e:?}"
    );
    assert!(
        e.reason.contains(&format!("{other} is disabled")),
        "{}",
        e.reason
    );
    let remaining = if other == A { B } else { A };
    c.admin("web", addr(remaining), BackendAction::Disable)
        .unwrap();
    let e = c.explain(&q, 0).unwrap();
    assert_eq!(
        (e.outcome.as_str(), e.verdict.as_str()),
        ("no_backend", "drop"),
        "{e:?}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// The announcement's inputs: a checked backend counts as healthy only after a passing check
/// (not at start), and while its MAC is known, enabled and weighted; `lb vip withdraw` is
/// persisted and survives a restart of the controller.
#[test]
fn vip_inputs_count_only_verified_backends_and_withdrawals_persist() {
    let d = dir();
    let net = FakeNet::default();
    let mut c = start(&d, &net);
    let vip = addr("10.0.0.100");
    let healthy = |c: &Ctl| c.vip_inputs()[&vip][0].healthy;
    reachable(&mut c, A, 1);
    reachable(&mut c, B, 2);
    assert_eq!(healthy(&c), 0, "no check has passed yet");
    c.on_check(id(&c, A), Ok(()), Instant::now());
    assert_eq!(healthy(&c), 1);
    c.on_check(id(&c, B), Ok(()), Instant::now());
    assert_eq!(healthy(&c), 2);
    c.admin("web", addr(B), BackendAction::Drain).unwrap();
    assert_eq!(healthy(&c), 1, "a draining backend takes no new flows");
    c.on_check(id(&c, A), Err("refused".into()), Instant::now());
    assert_eq!(healthy(&c), 0);
    assert_eq!(c.vip_inputs()[&vip][0].min_healthy, 1);

    let (v, sharing) = c.vip_admin("web", true).unwrap();
    assert_eq!((v, sharing), (vip, vec!["web".to_owned()]));
    assert!(c.withdrawn_vips().contains(&vip));
    let saved = AdminState::load(&d.join("state.json")).unwrap();
    assert!(saved.withdrawn_vips.contains(&vip), "persisted");
    c.vip_admin("web", false).unwrap();
    assert!(c.withdrawn_vips().is_empty());
    let e = c.vip_admin("nope", true).unwrap_err();
    assert_eq!(e.status, StatusCode::NOT_FOUND);
    assert!(
        e.message.contains("unknown service \"nope\""),
        "{}",
        e.message
    );
}

/// Flow sharing: a peer's flow is mapped to this node's id of the same backend address and
/// inserted (not counted), an existing entry is kept, unknown services/backends and inactive
/// backends are refused; this node's own event is described by address.
#[test]
fn shared_flows_map_by_address() {
    use crate::flowsync::SharedFlow;
    let d = dir();
    let net = FakeNet::default();
    let mut c = start(&d, &net);
    reachable(&mut c, A, 1);
    let key = |port: u16, dport: u16| {
        let mut k = lb_common::FlowKey {
            protocol: lb_common::PROTO_TCP,
            family: lb_common::FAMILY_V4,
            ..Default::default()
        };
        k.src_addr[..4].copy_from_slice(&[10, 98, 0, 1]);
        k.dst_addr[..4].copy_from_slice(&[10, 0, 0, 100]);
        k.src_port = port.to_be_bytes();
        k.dst_port = dport.to_be_bytes();
        k
    };
    let f = SharedFlow {
        key: key(40000, 80),
        backend: addr(A),
    };
    assert_eq!(c.accept_shared(&f, 7).unwrap(), Shared::Inserted);
    let v = c.maps().flows.last().unwrap().1;
    assert_eq!(v.backend, id(&c, A).0);
    assert_eq!(v.flags, 0, "not counted here");
    assert_eq!(v.cpu, lb_common::FLOW_CPU_PEER);
    assert_eq!(c.accept_shared(&f, 8).unwrap(), Shared::Existing);
    // B has no MAC yet: not usable, refused.
    let to_b = SharedFlow {
        backend: addr(B),
        key: key(40001, 80),
    };
    assert_eq!(c.accept_shared(&to_b, 7).unwrap(), Shared::Unknown);
    let other_port = SharedFlow {
        key: key(40002, 443),
        ..f
    };
    assert_eq!(c.accept_shared(&other_port, 7).unwrap(), Shared::Unknown);
    let stranger = SharedFlow {
        backend: addr("10.0.0.99"),
        key: key(40003, 80),
    };
    assert_eq!(c.accept_shared(&stranger, 7).unwrap(), Shared::Unknown);
    // This node's event → by address; a stale generation → nothing.
    let a = id(&c, A);
    let generation = c.desired().backends[&a].generation;
    let ev = lb_common::SyncEvent {
        key: key(40004, 80),
        backend: a.0,
        generation,
    };
    assert_eq!(c.shared_of(&ev).unwrap().backend, addr(A));
    let stale = lb_common::SyncEvent {
        generation: generation.wrapping_add(1),
        ..ev
    };
    assert!(c.shared_of(&stale).is_none());
}

/// Drains A: exactly the table slots that changed are marked, the recorded flow's slot
/// `kslot` among them, now on `b`. Returns those slots, sorted.
fn drain_a(c: &mut Ctl, sid: u32, before: &[u32], kslot: u32, b: BackendId) -> Vec<u32> {
    c.admin("web", addr(A), BackendAction::Drain).unwrap();
    let after = c.maps.table(sid);
    let want: Vec<u32> = (0..RING)
        .filter(|i| before[*i as usize] != after[*i as usize])
        .collect();
    let mut got = c.maps.changed(sid);
    got.sort();
    assert_eq!(got, want, "exactly the slots that changed");
    assert!(want.contains(&kslot) && after[kslot as usize] == b.0);
    want
}

/// Records a counted flow to 10.0.0.100:`port` (`protocol`) on one of `backend`'s slots of
/// `table` (the service's, `RING` slots), as the data plane would have; returns its slot.
fn record_flow_on(c: &mut Ctl, table: &[u32], backend: BackendId, protocol: u8, port: u16) -> u32 {
    let key = (0..5000u16)
        .map(|p| {
            let mut k = lb_common::FlowKey {
                protocol,
                family: lb_common::FAMILY_V4,
                ..Default::default()
            };
            k.src_addr[..4].copy_from_slice(&[10, 98, 0, 1]);
            k.dst_addr[..4].copy_from_slice(&[10, 0, 0, 100]);
            k.src_port = p.to_be_bytes();
            k.dst_port = port.to_be_bytes();
            k
        })
        .find(|k| {
            table[lb_common::hash::reduce(lb_common::hash::flow_hash(k), RING) as usize]
                == backend.0
        })
        .unwrap();
    let generation = c.desired.backends[&backend].generation;
    c.maps.flows.push((
        key,
        lb_common::FlowValue {
            backend: backend.0,
            generation,
            last_seen_ns: 0,
            flags: lb_common::FLOW_F_COUNTED,
            cpu: 0,
        },
    ));
    lb_common::hash::reduce(lb_common::hash::flow_hash(&key), RING)
}

/// Stateless slots: a table change marks exactly the slots whose backend changed (and keeps
/// earlier marks); a sweep clears every mark but those of slots where an entry still names
/// another backend; a restart that adopts the maps marks every slot (nothing is known).
#[test]
fn changed_slots_are_marked_and_cleared_by_the_sweep() {
    let d = dir();
    let net = FakeNet::default();
    let mut c = start(&d, &net);
    reachable(&mut c, A, 1);
    reachable(&mut c, B, 2);
    let (a, b) = (id(&c, A), id(&c, B));
    let sid = c.desired.services[0].value.id;
    // B's resolution took slots from A: changed, and cleared by a sweep (no flows yet).
    assert!(!c.maps.changed(sid).is_empty());
    c.sweep(0).unwrap();
    assert!(
        c.maps.changed(sid).is_empty(),
        "no flow: nothing stays changed"
    );
    let before = c.maps.table(sid);
    let kslot = record_flow_on(&mut c, &before, a, lb_common::PROTO_TCP, 80);

    let want = drain_a(&mut c, sid, &before, kslot, b);

    c.sweep(1).unwrap();
    assert_eq!(
        c.maps.changed(sid),
        vec![kslot],
        "only the slot whose flow names A stays changed"
    );
    // Back to A: its slots change again; the flow's slot names A again, so nothing is left.
    c.admin("web", addr(A), BackendAction::Enable).unwrap();
    assert!(c.maps.changed(sid).len() >= want.len() - 1);
    c.sweep(2).unwrap();
    assert!(c.maps.changed(sid).is_empty());

    // A restart that adopts the maps: every slot changed until the first sweep. (The same
    // maps, the stale flow of A's old generation left out: it would keep its slot changed
    // until it expires.)
    let mut maps2 = c.maps.clone();
    maps2.flows.clear();
    let mut c2 = adopt(&d, &net, maps2);
    reachable(&mut c2, A, 1);
    reachable(&mut c2, B, 2);
    let s2 = c2.desired.services[0].value.id;
    assert_eq!(
        c2.maps.changed(s2).len(),
        RING as usize,
        "adopted: all changed"
    );
    c2.sweep(3).unwrap();
    assert!(c2.maps.changed(s2).is_empty());
    std::fs::remove_dir_all(&d).unwrap();
}

/// The sweep's steps follow the host's speed: halved while they take over 10 ms, doubled while
/// under 2.5 ms, between one batch (4 096 entries) and 2^18.
#[test]
fn sweep_steps_are_sized_to_about_5_ms() {
    use std::time::Duration;

    use super::next_step_budget as next;
    let ms = Duration::from_millis;
    assert_eq!(next(16384, ms(16)), 8192, "a slow host: halved");
    assert_eq!(next(8192, ms(8)), 8192, "within the band: kept");
    assert_eq!(next(16384, ms(1)), 32768, "a fast host: doubled");
    assert_eq!(next(4096, ms(50)), 4096, "never below one batch");
    assert_eq!(next(1 << 18, Duration::ZERO), 1 << 18, "nor above 2^18");
}

/// `lb run` sweeps in steps, and the tables may change between them: an entry walked before a
/// change was judged by the table as it was, so a service written while a sweep walks keeps
/// its changed slots to the next sweep (which then clears those without an entry of another
/// backend). Without that, the slot of a flow of A walked before A was drained would be
/// cleared, and the flow's packets would go to the slot's new backend.
#[test]
fn a_table_written_while_the_sweep_walks_keeps_its_changed_slots() {
    let d = dir();
    let net = FakeNet::default();
    let mut c = start(&d, &net);
    reachable(&mut c, A, 1);
    reachable(&mut c, B, 2);
    let (a, b) = (id(&c, A), id(&c, B));
    let sid = c.desired.services[0].value.id;
    c.sweep(0).unwrap();
    assert!(c.maps.changed(sid).is_empty());
    let before = c.maps.table(sid);
    let kslot = record_flow_on(&mut c, &before, a, lb_common::PROTO_TCP, 80);
    // A second entry, so that the walk is not over after the first.
    record_flow_on(&mut c, &before, b, lb_common::PROTO_TCP, 81);

    c.sweep_begin(1).unwrap();
    assert!(c.sweep_step(1).is_none(), "one entry walked, one to go");
    assert!(c.sweeping());
    let want = drain_a(&mut c, sid, &before, kslot, b);
    let stats = c.sweep_step(1).expect("the walk's end").unwrap();
    assert!(!c.sweeping());
    assert_eq!(stats.entries, 2);
    let mut got = c.maps.changed(sid);
    got.sort();
    assert_eq!(
        got, want,
        "written while the sweep walked: every mark stays"
    );

    // The next sweep judges every entry by the table as it is now.
    c.sweep(2).unwrap();
    assert_eq!(
        c.maps.changed(sid),
        vec![kslot],
        "only the slot whose flow names A stays changed"
    );

    // A sweep with no write while it walks clears as a whole walk does.
    c.admin("web", addr(A), BackendAction::Enable).unwrap();
    c.sweep_begin(3).unwrap();
    assert!(c.sweep_step(1).is_none());
    assert!(c.sweep_step(1).expect("the end").is_ok());
    assert!(c.maps.changed(sid).is_empty());
    std::fs::remove_dir_all(&d).unwrap();
}

/// A TCP service with `record_connections = "on_change"` keeps previous backends as UDP does,
/// for `timeouts.tcp`; with the default (`at_syn`) its changed slots name none.
#[test]
fn changed_slots_of_tcp_on_change_name_their_previous_backend() {
    const TCP_NS: u64 = 900 * 1_000_000_000; // timeouts.tcp, the default
    let set_now = |t: u64| super::TEST_NOW.with(|n| n.set(Some(t)));
    // (on_change, a record limit): "at_syn" with a limit keeps previous backends too (its SYNs
    // beyond the limit are not recorded).
    for (on_change, limit) in [(true, false), (false, false), (false, true)] {
        set_now(1);
        let d = dir();
        let net = FakeNet::default();
        let mut text = config(&d, 100);
        if on_change {
            text = text.replace(
                "protocol = \"tcp\"",
                "protocol = \"tcp\"\nrecord_connections = \"on_change\"",
            );
        }
        if limit {
            assert!(text.contains("[dataplane]\n"));
            text = text.replacen("[dataplane]\n", "[dataplane]\nrecord_limit = 100000\n", 1);
        }
        let mut c = start_with(&d, &net, &text);
        reachable(&mut c, A, 1);
        reachable(&mut c, B, 2);
        let a = id(&c, A);
        let sid = c.desired.services[0].value.id;
        let base = c.desired.services[0].value.ring_base;
        let prev_of = |c: &Ctl, i: u32| lb_common::ring_prev(c.maps.ring[&(base + i)]);
        let changed = c.maps.changed(sid);
        assert!(!changed.is_empty());
        // `lb explain` says so, whether the flow's slot changed or not.
        let q = crate::explain::Query {
            protocol: crate::config::Protocol::Tcp,
            client: addr("192.0.2.7"),
            client_port: 40000,
            vip: addr("10.0.0.100"),
            port: 80,
        };
        let e = c.explain(&q, 0).unwrap();
        assert_eq!(
            e.reason.contains("record_connections = on_change"),
            on_change,
            "{}",
            e.reason
        );
        if !on_change && !limit {
            assert!(changed.iter().all(|i| prev_of(&c, *i).is_none()));
            continue;
        }
        assert!(changed.iter().all(|i| prev_of(&c, *i) == Some(a.0)));
        set_now(TCP_NS);
        c.sweep(0).unwrap();
        assert_eq!(c.maps.changed(sid), changed, "within timeouts.tcp: kept");
        set_now(1 + TCP_NS);
        c.sweep(0).unwrap();
        assert!(c.maps.changed(sid).is_empty(), "lapsed after timeouts.tcp");
    }
}

/// Stateless slots of a UDP service: a slot that changes from unchanged (its flows were never
/// recorded) names its previous backend until the UDP idle timeout lapses; a sweep clears every
/// mark but those of slots with a live previous backend or an entry that names another backend;
/// a restart that adopts the maps takes the marks and previous backends the maps hold.
#[test]
fn changed_slots_of_udp_name_their_previous_backend() {
    const UDP_NS: u64 = 300 * 1_000_000_000; // timeouts.udp, the default
    let set_now = |t: u64| super::TEST_NOW.with(|n| n.set(Some(t)));
    set_now(1);
    let d = dir();
    let net = FakeNet::default();
    let mut c = start_with(&d, &net, &udp_config(&d, 100));
    reachable(&mut c, A, 1);
    reachable(&mut c, B, 2);
    let (a, b) = (id(&c, A), id(&c, B));
    let sid = c.desired.services[0].value.id;
    let base = c.desired.services[0].value.ring_base;
    let prev_of = |c: &Ctl, i: u32| lb_common::ring_prev(c.maps.ring[&(base + i)]);
    // B's resolution took slots from A: changed, each naming A for A's unrecorded flows.
    let changed = c.maps.changed(sid);
    assert!(!changed.is_empty());
    assert!(changed.iter().all(|i| prev_of(&c, *i) == Some(a.0)));
    c.sweep(0).unwrap();
    assert_eq!(c.maps.changed(sid), changed, "previous backends live: kept");
    set_now(1 + UDP_NS);
    c.sweep(0).unwrap();
    assert!(
        c.maps.changed(sid).is_empty(),
        "previous backends lapsed, no flow: nothing stays changed"
    );
    let before = c.maps.table(sid);
    let kslot = record_flow_on(&mut c, &before, a, lb_common::PROTO_UDP, 53);

    let t1 = 2 + UDP_NS;
    set_now(t1);
    let want = drain_a(&mut c, sid, &before, kslot, b);
    assert!(
        want.iter().all(|i| prev_of(&c, *i) == Some(a.0)),
        "each names A (draining: its flows stay)"
    );

    c.sweep(1).unwrap();
    assert_eq!(
        c.maps.changed(sid),
        want,
        "previous backends live: all kept"
    );
    set_now(t1 + UDP_NS);
    c.sweep(1).unwrap();
    assert_eq!(
        c.maps.changed(sid),
        vec![kslot],
        "only the slot whose flow names A stays changed"
    );
    assert_eq!(prev_of(&c, kslot), None, "lapsed");
    // Back to A: its slots change again, from unchanged ones (naming B) but the flow's, which
    // names A again; once B's previous lapse, nothing is left.
    let t2 = t1 + UDP_NS + 1;
    set_now(t2);
    c.admin("web", addr(A), BackendAction::Enable).unwrap();
    assert!(c.maps.changed(sid).len() >= want.len() - 1);
    assert_eq!(
        prev_of(&c, kslot),
        None,
        "the flow's slot was changed: no previous"
    );
    c.sweep(2).unwrap();
    assert!(!c.maps.changed(sid).is_empty());
    set_now(t2 + UDP_NS);
    c.sweep(2).unwrap();
    assert!(c.maps.changed(sid).is_empty());

    // A restart that adopts the maps takes what they hold: a change (A drained again) marks
    // slots naming A, and the adopted controller keeps them, previous backends included. (The
    // stale flow of A's old generation left out: it would keep its slot changed until it
    // expires.)
    let t3 = t2 + UDP_NS + 1;
    set_now(t3);
    c.admin("web", addr(A), BackendAction::Drain).unwrap();
    let marked = c.maps.changed(sid);
    assert!(!marked.is_empty());
    let mut maps2 = c.maps.clone();
    maps2.flows.clear();
    let mut resolver = Resolver::default();
    for (a, n) in [(A, 1), (B, 2)] {
        resolver.apply(&NeighEvent::New {
            ifindex: 2,
            addr: addr(a),
            neighbour: Neighbour {
                mac: Some(mac(n)),
                state: nud::REACHABLE,
            },
        });
    }
    let mut c2 = adopt_with(
        &d,
        &net,
        maps2,
        resolver,
        c.admin.clone(),
        &udp_config(&d, 100),
    );
    let s2 = c2.desired.services[0].value.id;
    assert_eq!(c2.maps.changed(s2), marked, "adopted: the same marks");
    assert!(
        marked
            .iter()
            .all(|i| lb_common::ring_prev(c2.maps.ring[&(base + i)]) == Some(a.0)),
        "and previous backends"
    );
    c2.sweep(3).unwrap();
    assert_eq!(
        c2.maps.changed(s2),
        marked,
        "live for a full timeout from the restart"
    );
    set_now(t3 + 2 * UDP_NS);
    c2.sweep(3).unwrap();
    assert!(c2.maps.changed(s2).is_empty());
    std::fs::remove_dir_all(&d).unwrap();
}

/// An upgrade from layout 2 (`lb run --replace`): the migrated services have no table range
/// (`service_from_v2`). Adopted, each gets a range and its whole table, every slot marked
/// changed, so its established flows keep their backends through their entries (the slot
/// formula changed with layout 3).
#[test]
fn services_migrated_from_layout_2_get_whole_tables_marked_changed() {
    let d = dir();
    let net = FakeNet::default();
    let mut c = start(&d, &net);
    reachable(&mut c, A, 1);
    let mut maps2 = c.maps.clone();
    maps2.flows.clear();
    maps2.ring.clear();
    for v in maps2.services.values_mut() {
        *v = crate::dataplane::loader::service_from_v2([v.id, v.scheduler, v.flags, v.ring_len]);
    }
    assert!(
        maps2
            .adopted()
            .services
            .iter()
            .all(|(_, v)| v.ring_size == 0)
    );
    let mut c2 = adopt(&d, &net, maps2);
    reachable(&mut c2, A, 1);
    let s = c2.desired.services[0].value;
    assert_eq!(s.ring_size, RING);
    assert_eq!(
        c2.maps.table(s.id),
        c2.desired.services[0].ring.to_vec(),
        "whole table written"
    );
    assert_eq!(
        c2.maps.changed(s.id).len(),
        RING as usize,
        "every slot changed"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// `dataplane.defer_records`: the controller records the SYNs the packet path hands over
/// (counted, open; a close record closes the entry again), drains them before it writes a
/// change, and the changed slots of its `"at_syn"` TCP service name their previous backend for
/// [`DEFER_WINDOW_NS`] only (a record may still be in the ring), not for `timeouts.tcp`.
#[test]
fn handed_over_syns_are_recorded_before_a_change_and_previous_backends_are_brief() {
    use lb_common::{RECORD_CLOSE, RECORD_OPEN, RecordEvent};
    let set_now = |t: u64| super::TEST_NOW.with(|n| n.set(Some(t)));
    set_now(1);
    let d = dir();
    let net = FakeNet::default();
    let maps = FakeMaps {
        defer: true,
        ..FakeMaps::default()
    };
    let mut c = start_on(&d, &net, &config(&d, 100), maps);
    reachable(&mut c, A, 1);
    let a = id(&c, A);
    let generation = c.maps.backends[&a.0].generation;
    let key = |port: u16| {
        let mut k = lb_common::FlowKey::v4([192, 0, 2, 7], [10, 0, 0, 100], 6);
        k.set_ports([(port >> 8) as u8, port as u8, 0, 80]);
        k
    };
    let open = |port: u16| RecordEvent {
        key: key(port),
        backend: a.0,
        generation,
        kind: RECORD_OPEN,
        cpu: 1,
    };
    // Three SYNs through A's slots wait in LB_RECORD, the third closed already; B's resolution
    // takes slots from A: they are recorded first.
    c.maps.records.extend([
        open(40000),
        open(40001),
        open(40002),
        RecordEvent {
            kind: RECORD_CLOSE,
            ..open(40002)
        },
        // A SYN with a stale generation (its backend id was reused): not recorded.
        RecordEvent {
            generation: generation + 1,
            ..open(40003)
        },
    ]);
    reachable(&mut c, B, 2);
    assert!(c.maps.records.is_empty(), "drained before the change");
    let entry = |c: &Ctl, port: u16| {
        c.maps
            .flows
            .iter()
            .find(|(k, _)| *k == key(port))
            .map(|(_, v)| *v)
    };
    let e = entry(&c, 40000).expect("recorded");
    assert_eq!(
        (e.backend, e.flags, e.cpu),
        (a.0, lb_common::FLOW_F_COUNTED, 1)
    );
    assert!(entry(&c, 40001).is_some());
    assert_eq!(
        entry(&c, 40002).unwrap().flags,
        lb_common::FLOW_F_COUNTED | lb_common::FLOW_F_CLOSED
    );
    assert!(entry(&c, 40003).is_none());
    assert_eq!(
        c.maps.active.get(&a),
        Some(&2),
        "two open connections counted"
    );
    assert_eq!(c.snapshot().unwrap().record_inserted, 3);
    // The changed slots name A, for the short window only.
    let sid = c.desired.services[0].value.id;
    let base = c.desired.services[0].value.ring_base;
    let prev_of = |c: &Ctl, i: u32| lb_common::ring_prev(c.maps.ring[&(base + i)]);
    let changed = c.maps.changed(sid);
    assert!(!changed.is_empty());
    assert!(changed.iter().all(|i| prev_of(&c, *i) == Some(a.0)));
    assert_eq!(c.desired.services[0].prev_until_ns, 1 + DEFER_WINDOW_NS);
    set_now(1 + DEFER_WINDOW_NS);
    c.sweep(0).unwrap();
    assert!(
        c.maps
            .changed(sid)
            .iter()
            .all(|i| prev_of(&c, *i).is_none()),
        "lapsed after the window"
    );
    // Stopping hands SYNs back to the packet path, and drains what is left.
    c.maps.records.push_back(open(40004));
    c.stop_deferring();
    assert!(!c.maps.defer);
    assert!(entry(&c, 40004).is_some());
    std::fs::remove_dir_all(&d).unwrap();
}
