//! Backend MAC resolution through the kernel's routing and neighbour tables.
//!
//! For a backend configured without `mac`, the controller asks the kernel for the route to the
//! backend's address (it must be on-link: no gateway, not local) and for the neighbour entry on
//! the route's device. A missing or failed entry is resolved by sending the backend a datagram
//! (UDP port 9, discard), which makes the kernel ARP/NDP for it; entries are re-checked every
//! second, and stale ones probed again, so a MAC that changes (a VM moved, a NIC replaced) is
//! followed within seconds. The lookups use iproute2's JSON output (`ip -j`, netlink underneath)
//! behind [`Neighbours`], so tests use a fake.

use std::{net::IpAddr, process::Command};

use serde::Deserialize;

use crate::config::Mac;

/// The kernel's route to a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dev: String,
    pub gateway: Option<IpAddr>,
    /// The address is one of this machine's.
    pub local: bool,
}

/// A neighbour entry: MAC (if any) and NUD states (`REACHABLE`, `STALE`, `FAILED`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub mac: Option<Mac>,
    pub states: Vec<String>,
}

impl Neighbour {
    /// A MAC the kernel still stands by.
    pub fn usable_mac(&self) -> Option<Mac> {
        let bad = self
            .states
            .iter()
            .any(|s| s == "FAILED" || s == "INCOMPLETE");
        if bad { None } else { self.mac }
    }

    /// The kernel has not confirmed it lately: worth a probe (it then re-validates it).
    pub fn stale(&self) -> bool {
        self.states.iter().any(|s| s == "STALE")
    }
}

pub trait Neighbours {
    fn route(&self, addr: IpAddr) -> Result<Route, String>;
    /// The whole neighbour table (`ip -j neigh show`), read once per refresh; pick entries
    /// out of it with [`parse_neighbour`].
    fn table(&self) -> Result<String, String>;
    /// Makes the kernel resolve (or re-validate) `addr`.
    fn probe(&self, addr: IpAddr);
}

#[derive(Deserialize)]
struct RawRoute {
    #[serde(rename = "type")]
    kind: Option<String>,
    dev: Option<String>,
    gateway: Option<IpAddr>,
}

#[derive(Deserialize)]
struct RawNeigh {
    dst: IpAddr,
    dev: Option<String>,
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

/// Parses `ip -j route get <addr>`.
pub fn parse_route(json: &str) -> Result<Route, String> {
    let routes: Vec<RawRoute> =
        serde_json::from_str(json).map_err(|e| format!("ip route get: {e}"))?;
    let r = routes.into_iter().next().ok_or("no route")?;
    Ok(Route {
        dev: r.dev.ok_or("route without a device")?,
        gateway: r.gateway,
        local: r.kind.as_deref() == Some("local"),
    })
}

/// Parses `ip -j neigh show` and picks the entry of `addr` on `dev`.
pub fn parse_neighbour(json: &str, addr: IpAddr, dev: &str) -> Result<Option<Neighbour>, String> {
    let all: Vec<RawNeigh> =
        serde_json::from_str(json).map_err(|e| format!("ip neigh show: {e}"))?;
    Ok(all
        .into_iter()
        .find(|n| n.dst == addr && n.dev.as_deref().is_none_or(|d| d == dev))
        .map(|n| Neighbour {
            mac: n.lladdr.and_then(|m| m.parse().ok()),
            states: n.state,
        }))
}

/// The kernel's tables in this network namespace.
pub struct SystemNeighbours;

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip (iproute2): {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Neighbours for SystemNeighbours {
    fn route(&self, addr: IpAddr) -> Result<Route, String> {
        parse_route(&ip(&["-j", "route", "get", &addr.to_string()])?)
    }

    fn table(&self) -> Result<String, String> {
        ip(&["-j", "neigh", "show"])
    }

    fn probe(&self, addr: IpAddr) {
        let local = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        if let Ok(s) = std::net::UdpSocket::bind(local) {
            let _ = s.send_to(b"lb neighbour probe", (addr, 9));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = parse_route(r#"[{"dst":"10.99.0.21","dev":"eth0","prefsrc":"10.99.0.2","flags":[],"uid":0,"cache":[]}]"#).unwrap();
        assert_eq!(
            r,
            Route {
                dev: "eth0".into(),
                gateway: None,
                local: false
            }
        );
        let r = parse_route(r#"[{"dst":"8.8.8.8","gateway":"192.0.2.1","dev":"eth0","prefsrc":"192.0.2.2","flags":[],"uid":0,"cache":[]}]"#).unwrap();
        assert_eq!(r.gateway, Some("192.0.2.1".parse().unwrap()));
        let r =
            parse_route(r#"[{"type":"local","dst":"127.0.0.1","dev":"lo","prefsrc":"127.0.0.1"}]"#)
                .unwrap();
        assert!(r.local);
        assert!(parse_route("[]").is_err());
    }

    #[test]
    fn neighbours() {
        let json = r#"[{"dst":"10.99.0.21","dev":"eth0","lladdr":"02:99:00:00:00:21","state":["REACHABLE"]},
                       {"dst":"10.99.0.22","dev":"eth0","lladdr":"02:99:00:00:00:22","state":["STALE"]},
                       {"dst":"10.99.0.23","dev":"eth0","state":["FAILED"]},
                       {"dst":"fd00:99::21","dev":"eth0","lladdr":"02:99:00:00:00:21","router":null,"state":["DELAY"]}]"#;
        let n = |a: &str| parse_neighbour(json, a.parse().unwrap(), "eth0").unwrap();
        assert_eq!(
            n("10.99.0.21").unwrap().usable_mac(),
            Some("02:99:00:00:00:21".parse().unwrap())
        );
        let stale = n("10.99.0.22").unwrap();
        assert!(
            stale.stale() && stale.usable_mac().is_some(),
            "stale still forwards, but is probed"
        );
        assert_eq!(n("10.99.0.23").unwrap().usable_mac(), None);
        assert!(n("fd00:99::21").unwrap().usable_mac().is_some());
        assert_eq!(n("10.99.0.99"), None);
        assert_eq!(
            parse_neighbour(json, "10.99.0.21".parse().unwrap(), "eth1").unwrap(),
            None
        );
    }
}
