//! The desired contents of the data-plane maps, derived from a validated [`Config`].
//!
//! Pure: no kernel access, so it is unit-tested on the host. The loader writes it.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    BACKEND_F_ACTIVE, BACKEND_F_REDIRECT, Backend, FAMILY_V4, FAMILY_V6, FLAG_ALL_PORTS_SERVICES,
    NO_BACKEND, SCHED_MAGLEV, ServiceKey, ServiceValue, VipKey, limits::MAX_TX_PORTS,
};

use crate::{
    config::{Config, Scheduler},
    iface::Interfaces,
    maglev,
};

/// One service as the data plane sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredService {
    pub name: String,
    pub key: ServiceKey,
    pub value: ServiceValue,
    /// Maglev table: backend id per slot ([`NO_BACKEND`] when none).
    pub ring: Vec<u32>,
    /// Backend ids of this service, in config order.
    pub backends: Vec<u32>,
}

/// Everything the maps should contain.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredState {
    pub services: Vec<DesiredService>,
    /// Backend id → value.
    pub backends: BTreeMap<u32, Backend>,
    /// Backend id → (service name, address), for reports.
    pub backend_names: BTreeMap<u32, (String, IpAddr)>,
    /// VIP → number of services on it.
    pub vips: BTreeMap<VipKey, u32>,
    /// Devmap slot → ifindex.
    pub tx_ports: BTreeMap<u32, u32>,
    pub ring_size: u32,
    /// `LB_FLAGS[0]`.
    pub flags: u32,
}

/// Error building the desired state (the config is valid, but the machine disagrees).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("dataplane.interface: {0}")]
    Interface(String),
    #[error("service \"{service}\": backend \"{backend}\": interface: {why}")]
    BackendInterface {
        service: String,
        backend: IpAddr,
        why: String,
    },
    #[error("more than {MAX_TX_PORTS} distinct backend interfaces")]
    TooManyTxPorts,
}

/// Address in the 16-byte key layout, with its family.
pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    match addr {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (b, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

impl DesiredState {
    /// Builds the desired state. Service ids follow config order; backend ids are dense and
    /// global, in config order; every backend starts at generation 1.
    pub fn build(cfg: &Config, ifaces: &impl Interfaces) -> Result<DesiredState, StateError> {
        let ring_size = cfg.dataplane.ring_size;
        let (_, lb_mac) = ifaces
            .lookup(&cfg.dataplane.interface)
            .map_err(StateError::Interface)?;
        let mut tx_slots: BTreeMap<String, u32> = BTreeMap::new();
        let mut tx_ports = BTreeMap::new();
        let mut backends = BTreeMap::new();
        let mut backend_names = BTreeMap::new();
        let mut vips: BTreeMap<VipKey, u32> = BTreeMap::new();
        let mut services = Vec::with_capacity(cfg.services.len());
        let mut next_backend = 0u32;

        for (sid, s) in cfg.services.iter().enumerate() {
            let (vip, family) = addr_bytes(s.vip);
            let key = ServiceKey {
                vip,
                port: s.port.to_be_bytes(),
                protocol: s.protocol.number(),
                family,
            };
            let value = ServiceValue {
                id: sid as u32,
                scheduler: match s.scheduler {
                    Scheduler::Maglev => SCHED_MAGLEV,
                },
                flags: 0,
                _reserved: 0,
            };
            *vips
                .entry(VipKey {
                    addr: vip,
                    family,
                    _pad: [0; 3],
                })
                .or_default() += 1;

            let mut ids = Vec::with_capacity(s.backends.len());
            for b in &s.backends {
                let id = next_backend;
                next_backend += 1;
                let (src_mac, flags, tx_port) = match &b.interface {
                    None => (lb_mac, BACKEND_F_ACTIVE, 0),
                    Some(ifname) => {
                        let (ifindex, mac) =
                            ifaces
                                .lookup(ifname)
                                .map_err(|why| StateError::BackendInterface {
                                    service: s.name.clone(),
                                    backend: b.address,
                                    why,
                                })?;
                        let n = tx_slots.len() as u32;
                        let slot = *tx_slots.entry(ifname.clone()).or_insert(n);
                        if slot >= MAX_TX_PORTS {
                            return Err(StateError::TooManyTxPorts);
                        }
                        tx_ports.insert(slot, ifindex);
                        (mac, BACKEND_F_ACTIVE | BACKEND_F_REDIRECT, slot)
                    }
                };
                backends.insert(
                    id,
                    Backend {
                        mac: b.mac.0,
                        src_mac: src_mac.0,
                        flags,
                        generation: 1,
                        tx_port,
                    },
                );
                backend_names.insert(id, (s.name.clone(), b.address));
                ids.push(id);
            }

            let idents: Vec<String> = s.backends.iter().map(|b| b.address.to_string()).collect();
            let entries: Vec<maglev::Entry> = idents
                .iter()
                .zip(&s.backends)
                .map(|(id, b)| maglev::Entry {
                    id: id.as_bytes(),
                    weight: b.weight as u32,
                })
                .collect();
            let ring = maglev::build(&entries, ring_size)
                .into_iter()
                .map(|slot| slot.map_or(NO_BACKEND, |i| ids[i]))
                .collect();
            services.push(DesiredService {
                name: s.name.clone(),
                key,
                value,
                ring,
                backends: ids,
            });
        }
        let flags = if services.iter().any(|s| s.key.port == [0, 0]) {
            FLAG_ALL_PORTS_SERVICES
        } else {
            0
        };
        Ok(DesiredState {
            flags,
            services,
            backends,
            backend_names,
            vips,
            tx_ports,
            ring_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Mac;

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
        let d = DesiredState::build(&cfg, &Fake).unwrap();
        assert_eq!(d.services.len(), 2);
        let a = &d.services[0];
        assert_eq!(a.value.id, 0);
        assert_eq!(a.key.port, [0, 80]);
        assert_eq!(a.key.protocol, 6);
        assert_eq!(&a.key.vip[..4], &[10, 0, 0, 100]);
        assert_eq!(a.backends, vec![0, 1]);
        // weight 0: owns no slot.
        assert!(a.ring.iter().all(|b| *b == 0));
        assert_eq!(a.ring.len(), 251);
        // Local backend: XDP_TX, source MAC of eth0.
        let b0 = d.backends[&0];
        assert_eq!(b0.flags, BACKEND_F_ACTIVE);
        assert_eq!(b0.src_mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(b0.generation, 1);
        // Backend behind eth1: redirect through devmap slot 0 → ifindex 3, eth1's MAC.
        let b1 = d.backends[&1];
        assert_eq!(b1.flags, BACKEND_F_ACTIVE | BACKEND_F_REDIRECT);
        assert_eq!(b1.src_mac, [2, 0, 0, 0, 0, 2]);
        assert_eq!(d.tx_ports.get(&b1.tx_port), Some(&3));
        // One VIP address, two services on it.
        assert_eq!(d.vips.len(), 1);
        assert_eq!(d.vips.values().next(), Some(&2));
        assert_eq!(d.services[1].key.port, [0, 0]);
        assert!(d.services[1].ring.iter().all(|b| *b == 2));
        assert_eq!(d.flags, FLAG_ALL_PORTS_SERVICES);
    }

    #[test]
    fn unknown_interfaces_are_reported() {
        let cfg = Config::parse(&CFG.replace("\"eth1\"", "\"eth9\""), Path::new("t.toml")).unwrap();
        let e = DesiredState::build(&cfg, &Fake).unwrap_err().to_string();
        assert!(
            e.contains("service \"a\": backend \"10.0.0.2\": interface: no eth9"),
            "{e}"
        );
        let cfg = Config::parse(
            &CFG.replace("interface = \"eth0\"", "interface = \"eth7\""),
            Path::new("t.toml"),
        )
        .unwrap();
        let e = DesiredState::build(&cfg, &Fake).unwrap_err().to_string();
        assert!(e.contains("dataplane.interface: no eth7"), "{e}");
    }
}
