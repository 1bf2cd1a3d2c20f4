//! Backend MAC resolution through the kernel's routing and neighbour tables.
//!
//! For a backend configured without `mac`, the controller asks the kernel for the route to the
//! backend's address (it must be on-link: no gateway, not local) and follows the neighbour
//! entry on the route's device. The entries come from netlink ([`netlink`]): one dump at start,
//! then `RTM_NEWNEIGH`/`RTM_DELNEIGH` events, so a MAC change reaches the maps milliseconds
//! after the kernel learns it. A missing, failed or stale entry is probed (a datagram to the
//! backend makes the kernel ARP/NDP for it) when its event arrives, and an unresolved backend is
//! probed again with a backoff (1 s doubling to 8 s). Route changes re-run the route lookups.
//!
//! [`Resolver`] is the pure part: a cache of neighbour entries fed by events.

pub mod netlink;

use std::{collections::BTreeMap, net::IpAddr};

use crate::config::Mac;

/// The kernel's route to a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dev: String,
    pub ifindex: u32,
    pub gateway: Option<IpAddr>,
    /// The address is one of this machine's.
    pub local: bool,
}

/// What the controller asks of the system's network stack (a fake in tests).
pub trait Neighbours {
    /// The route the kernel would use to `addr`.
    fn route(&self, addr: IpAddr) -> Result<Route, String>;
    /// Makes the kernel resolve (or re-validate) `addr`.
    fn probe(&self, addr: IpAddr);
}

/// NUD states (`include/uapi/linux/neighbour.h`).
pub mod nud {
    pub const INCOMPLETE: u16 = 0x01;
    pub const REACHABLE: u16 = 0x02;
    pub const STALE: u16 = 0x04;
    pub const DELAY: u16 = 0x08;
    pub const PROBE: u16 = 0x10;
    pub const FAILED: u16 = 0x20;
    pub const NOARP: u16 = 0x40;
    pub const PERMANENT: u16 = 0x80;

    /// `REACHABLE`, `STALE|DELAY`, ... as `ip neigh` prints them.
    pub fn names(state: u16) -> String {
        let all = [
            (INCOMPLETE, "INCOMPLETE"),
            (REACHABLE, "REACHABLE"),
            (STALE, "STALE"),
            (DELAY, "DELAY"),
            (PROBE, "PROBE"),
            (FAILED, "FAILED"),
            (NOARP, "NOARP"),
            (PERMANENT, "PERMANENT"),
        ];
        let v: Vec<&str> = all
            .iter()
            .filter(|(b, _)| state & b != 0)
            .map(|(_, n)| *n)
            .collect();
        if v.is_empty() {
            "NONE".to_owned()
        } else {
            v.join(",")
        }
    }
}

/// A neighbour entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub mac: Option<Mac>,
    /// NUD state bits ([`nud`]).
    pub state: u16,
}

impl Neighbour {
    /// A MAC the kernel still stands by (a STALE entry still forwards; it is re-validated).
    pub fn usable_mac(&self) -> Option<Mac> {
        if self.state & (nud::FAILED | nud::INCOMPLETE) != 0 {
            None
        } else {
            self.mac.filter(|m| m.0 != [0; 6])
        }
    }

    /// Worth a probe: the kernel has not confirmed it lately, or gave up on it.
    pub fn wants_probe(&self) -> bool {
        self.state & (nud::STALE | nud::FAILED) != 0 || self.usable_mac().is_none()
    }
}

/// One change of the kernel's tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NeighEvent {
    /// An entry was added or changed (also each entry of the initial dump).
    New {
        ifindex: u32,
        addr: IpAddr,
        neighbour: Neighbour,
    },
    /// An entry was removed.
    Del { ifindex: u32, addr: IpAddr },
    /// A route was added or removed: routes to backends may have changed.
    Routes,
    /// A new subscription starts: forget the entries, a dump follows.
    Resync,
    /// The dump after `Resync` is complete (entries it did not list are gone).
    Synced,
}

/// The neighbour entries the kernel reported, by (ifindex, address).
///
/// A resync keeps the known entries while the dump runs (so nothing flaps to "unresolved" in
/// between) and drops, at its end, those the dump did not list.
#[derive(Clone, Debug, Default)]
pub struct Resolver {
    entries: BTreeMap<(u32, IpAddr), Neighbour>,
    /// During a resync: the entries the dump listed so far.
    dumped: Option<std::collections::BTreeSet<(u32, IpAddr)>>,
}

impl Resolver {
    /// Applies an event; returns the (ifindex, address) it concerned, if any.
    pub fn apply(&mut self, ev: &NeighEvent) -> Option<(u32, IpAddr)> {
        match ev {
            NeighEvent::New {
                ifindex,
                addr,
                neighbour,
            } => {
                self.entries.insert((*ifindex, *addr), neighbour.clone());
                if let Some(d) = &mut self.dumped {
                    d.insert((*ifindex, *addr));
                }
                Some((*ifindex, *addr))
            }
            NeighEvent::Del { ifindex, addr } => {
                self.entries.remove(&(*ifindex, *addr));
                Some((*ifindex, *addr))
            }
            NeighEvent::Resync => {
                self.dumped = Some(Default::default());
                None
            }
            NeighEvent::Synced => {
                if let Some(d) = self.dumped.take() {
                    self.entries.retain(|k, _| d.contains(k));
                }
                None
            }
            NeighEvent::Routes => None,
        }
    }

    pub fn get(&self, ifindex: u32, addr: IpAddr) -> Option<&Neighbour> {
        self.entries.get(&(ifindex, addr))
    }

    /// The MAC of `addr` on `ifindex`, or why there is none.
    pub fn resolve(&self, ifindex: u32, addr: IpAddr) -> Result<Mac, String> {
        match self.get(ifindex, addr) {
            Some(n) => n.usable_mac().ok_or_else(|| {
                format!(
                    "no ARP/NDP answer (neighbour state {})",
                    nud::names(n.state)
                )
            }),
            None => Err("not in the neighbour table yet (probing)".to_owned()),
        }
    }
}

/// Checks that `addr` can be reached by MAC rewrite: on-link, not local.
pub fn on_link(route: &Route) -> Result<(), String> {
    if let Some(gw) = route.gateway {
        return Err(format!(
            "reached through gateway {gw} on {}: DSR only rewrites the MAC, so a backend must be on \
             the balancer's L2 segment (or give its `mac` and `interface` explicitly)",
            route.dev
        ));
    }
    if route.local {
        return Err("is an address of this machine".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(addr: &str, mac: Option<&str>, state: u16) -> NeighEvent {
        NeighEvent::New {
            ifindex: 2,
            addr: addr.parse().unwrap(),
            neighbour: Neighbour {
                mac: mac.map(|m| m.parse().unwrap()),
                state,
            },
        }
    }

    #[test]
    fn entries_follow_events() {
        let mut r = Resolver::default();
        let a: IpAddr = "10.99.0.21".parse().unwrap();
        assert!(
            r.resolve(2, a)
                .unwrap_err()
                .contains("not in the neighbour table")
        );
        r.apply(&new("10.99.0.21", None, nud::INCOMPLETE));
        assert!(r.resolve(2, a).unwrap_err().contains("INCOMPLETE"));
        r.apply(&new(
            "10.99.0.21",
            Some("02:99:00:00:00:21"),
            nud::REACHABLE,
        ));
        assert_eq!(
            r.resolve(2, a).unwrap(),
            "02:99:00:00:00:21".parse().unwrap()
        );
        // Stale still forwards (and wants a probe).
        r.apply(&new("10.99.0.21", Some("02:99:00:00:00:21"), nud::STALE));
        assert!(r.resolve(2, a).is_ok() && r.get(2, a).unwrap().wants_probe());
        // A gratuitous ARP with a new MAC.
        r.apply(&new("10.99.0.21", Some("02:99:00:00:01:21"), nud::STALE));
        assert_eq!(
            r.resolve(2, a).unwrap(),
            "02:99:00:00:01:21".parse().unwrap()
        );
        r.apply(&new("10.99.0.21", Some("02:99:00:00:01:21"), nud::FAILED));
        assert!(r.resolve(2, a).unwrap_err().contains("FAILED"));
        r.apply(&NeighEvent::Del {
            ifindex: 2,
            addr: a,
        });
        assert!(r.get(2, a).is_none());
        // A resync keeps entries during the dump and drops the ones it did not list.
        let b: IpAddr = "10.99.0.22".parse().unwrap();
        r.apply(&new(
            "10.99.0.22",
            Some("02:99:00:00:00:22"),
            nud::REACHABLE,
        ));
        r.apply(&NeighEvent::Resync);
        assert!(r.resolve(2, b).is_ok(), "kept while the dump runs");
        r.apply(&new(
            "10.99.0.21",
            Some("02:99:00:00:00:21"),
            nud::REACHABLE,
        ));
        r.apply(&NeighEvent::Synced);
        assert!(r.resolve(2, b).is_err() && r.resolve(2, a).is_ok());
        // Another interface is another entry.
        r.apply(&new(
            "10.99.0.21",
            Some("02:99:00:00:00:21"),
            nud::REACHABLE,
        ));
        assert!(r.resolve(3, a).is_err());
    }

    #[test]
    fn only_on_link_backends() {
        let r = |gateway: Option<&str>, local| Route {
            dev: "eth0".into(),
            ifindex: 2,
            gateway: gateway.map(|g| g.parse().unwrap()),
            local,
        };
        assert!(on_link(&r(None, false)).is_ok());
        assert!(
            on_link(&r(Some("10.0.0.1"), false))
                .unwrap_err()
                .contains("gateway 10.0.0.1 on eth0")
        );
        assert!(
            on_link(&r(None, true))
                .unwrap_err()
                .contains("address of this machine")
        );
        assert_eq!(nud::names(nud::STALE | nud::DELAY), "STALE,DELAY");
    }
}
