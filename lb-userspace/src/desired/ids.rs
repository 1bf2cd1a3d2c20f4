//! Id allocation: a service keeps its id by name, a backend keeps its [`BackendId`] by
//! (service name, address) for as long as the config has it. After allocation the id is the
//! backend's only identity: health, neighbour resolution, admin state and reports all key on it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::config::Config;

/// A backend's identity once allocated: its index in `LB_BACKENDS` and in the per-backend
/// counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendId(pub u32);

impl std::fmt::Display for BackendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The ids of a config: per service (config order) its id and its backends' ids (config order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    pub services: Vec<(u32, Vec<BackendId>)>,
    /// Backends that are new in this assignment.
    pub added: Vec<BackendId>,
    /// Backends of the previous assignment the config no longer has.
    pub removed: Vec<BackendId>,
}

/// The allocator. Ids are dense and reused, but never within the sync that frees them, so a
/// retired backend's id is not handed to a new one in the same map update.
#[derive(Clone, Debug, Default)]
pub struct Ids {
    services: BTreeMap<String, u32>,
    backends: BTreeMap<(String, IpAddr), BackendId>,
}

impl Ids {
    /// Assigns ids to `cfg`'s services and backends, keeping those it had.
    pub fn sync(&mut self, cfg: &Config) -> Assignment {
        let mut used_services: BTreeSet<u32> = cfg
            .services
            .iter()
            .filter_map(|s| self.services.get(&s.name).copied())
            .collect();
        let mut used_backends: BTreeSet<u32> = self.backends.values().map(|b| b.0).collect();
        let mut services = BTreeMap::new();
        let mut backends = BTreeMap::new();
        let mut out = Assignment::default();
        // The lowest free id only grows during one sync (ids are taken, never freed here):
        // each search resumes where the last one stopped (linear in all, not quadratic).
        let (mut next_service, mut next_backend) = (0, 0);
        for s in &cfg.services {
            let sid = match self.services.get(&s.name) {
                Some(id) => *id,
                None => {
                    let id = lowest_free(&used_services, &mut next_service);
                    used_services.insert(id);
                    id
                }
            };
            services.insert(s.name.clone(), sid);
            let mut ids = Vec::with_capacity(s.backends.len());
            for b in &s.backends {
                let key = (s.name.clone(), b.address);
                let id = match self.backends.get(&key) {
                    Some(id) => *id,
                    None => {
                        let id = BackendId(lowest_free(&used_backends, &mut next_backend));
                        used_backends.insert(id.0);
                        out.added.push(id);
                        id
                    }
                };
                backends.insert(key, id);
                ids.push(id);
            }
            out.services.push((sid, ids));
        }
        let kept: BTreeSet<BackendId> = backends.values().copied().collect();
        out.removed = self
            .backends
            .values()
            .filter(|id| !kept.contains(id))
            .copied()
            .collect();
        out.removed.sort();
        self.services = services;
        self.backends = backends;
        out
    }

    /// Takes over the ids an earlier controller left in the pinned maps: a service keeps its id
    /// when its (VIP, port, protocol) is still configured, a backend its id when its service and
    /// address are. The others stay taken until the next [`Ids::sync`] retires them.
    pub fn adopt(&mut self, cfg: &Config, a: &crate::dataplane::Adopted) {
        let mut names: BTreeMap<u32, String> = BTreeMap::new();
        for (key, value) in &a.services {
            let configured = cfg.services.iter().find(|s| {
                let (vip, family) = lb_common::rules::addr_key(s.vip);
                key.vip == vip
                    && key.family == family
                    && key.port == s.port.to_be_bytes()
                    && key.protocol == s.protocol.number()
            });
            let name = configured.map_or_else(|| format!("#{}", value.id), |s| s.name.clone());
            if configured.is_some() {
                self.services.insert(name.clone(), value.id);
            }
            names.insert(value.id, name);
        }
        for (id, _, meta) in &a.backends {
            let addr = match meta.family {
                lb_common::FAMILY_V4 => {
                    IpAddr::from([meta.addr[0], meta.addr[1], meta.addr[2], meta.addr[3]])
                }
                _ => IpAddr::from(meta.addr),
            };
            let service = names
                .get(&meta.service_id)
                .cloned()
                .unwrap_or_else(|| format!("#{}", meta.service_id));
            self.backends.insert((service, addr), BackendId(*id));
        }
    }

    /// The id of a configured backend.
    pub fn backend(&self, service: &str, address: IpAddr) -> Option<BackendId> {
        self.backends.get(&(service.to_owned(), address)).copied()
    }
}

/// The lowest id at or above `from` not in `used`; `from` moves to it.
fn lowest_free(used: &BTreeSet<u32>, from: &mut u32) -> u32 {
    let mut i = *from;
    for u in used.range(i..) {
        if *u != i {
            break;
        }
        i += 1;
    }
    *from = i;
    i
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn cfg(backends: &[&str]) -> Config {
        let mut t = String::from(
            "[dataplane]\ninterface = \"eth0\"\nring_size = 251\n[[service]]\nname = \"a\"\nvip = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n",
        );
        for b in backends {
            t += &format!("[[service.backend]]\naddress = \"{b}\"\nmac = \"02:00:00:00:00:01\"\n");
        }
        Config::parse(&t, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn kept_by_address_new_take_the_lowest_free_never_a_just_freed_one() {
        let mut ids = Ids::default();
        let a = ids.sync(&cfg(&["10.0.0.1", "10.0.0.2"]));
        assert_eq!(a.services, vec![(0, vec![BackendId(0), BackendId(1)])]);
        assert_eq!(a.added.len(), 2);
        // .2 leaves and .9 arrives in the same sync: .9 must not take .2's id.
        let b = ids.sync(&cfg(&["10.0.0.1", "10.0.0.9"]));
        assert_eq!(b.services[0].1, vec![BackendId(0), BackendId(2)]);
        assert_eq!(
            (b.added, b.removed),
            (vec![BackendId(2)], vec![BackendId(1)])
        );
        // Next sync: id 1 is free again.
        let c = ids.sync(&cfg(&["10.0.0.1", "10.0.0.9", "10.0.0.3"]));
        assert_eq!(c.services[0].1[2], BackendId(1));
        assert_eq!(
            ids.backend("a", "10.0.0.9".parse().unwrap()),
            Some(BackendId(2))
        );
        assert_eq!(ids.backend("a", "10.0.0.2".parse().unwrap()), None);
    }
}
