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

/// A map keyed by [`BackendId`], stored densely by id (ids are small: below
/// `limits::MAX_BACKENDS`). Lookups are an index, not a tree walk: with 10 000 checked backends
/// the controller looks backends up 10 000 times a second per table. Iterates in id order, like
/// the `BTreeMap` it replaces.
#[derive(Clone, Debug)]
pub struct IdMap<V> {
    slots: Vec<Option<V>>,
    len: usize,
}

impl<V> Default for IdMap<V> {
    fn default() -> Self {
        IdMap {
            slots: Vec::new(),
            len: 0,
        }
    }
}

impl<V> IdMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, id: &BackendId) -> Option<&V> {
        self.slots.get(id.0 as usize)?.as_ref()
    }

    pub fn get_mut(&mut self, id: &BackendId) -> Option<&mut V> {
        self.slots.get_mut(id.0 as usize)?.as_mut()
    }

    pub fn contains_key(&self, id: &BackendId) -> bool {
        self.get(id).is_some()
    }

    /// Inserts `v` for `id`, returning the value it replaces.
    pub fn insert(&mut self, id: BackendId, v: V) -> Option<V> {
        let i = id.0 as usize;
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, || None);
        }
        let old = self.slots[i].replace(v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, id: &BackendId) -> Option<V> {
        let old = self.slots.get_mut(id.0 as usize)?.take();
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The value of `id`, inserted with `f` if there is none.
    pub fn get_or_insert_with(&mut self, id: BackendId, f: impl FnOnce() -> V) -> &mut V {
        if !self.contains_key(&id) {
            self.insert(id, f());
        }
        self.get_mut(&id).expect("just inserted")
    }

    /// Keeps the entries for which `keep` says true.
    pub fn retain(&mut self, mut keep: impl FnMut(&BackendId, &mut V) -> bool) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(v) = slot
                && !keep(&BackendId(i as u32), v)
            {
                *slot = None;
                self.len -= 1;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries in id order.
    pub fn iter(&self) -> impl Iterator<Item = (BackendId, &V)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, v)| Some((BackendId(i as u32), v.as_ref()?)))
    }

    pub fn keys(&self) -> impl Iterator<Item = BackendId> + '_ {
        self.iter().map(|(id, _)| id)
    }

    /// Empties the map, returning its entries in id order.
    pub fn take_all(&mut self) -> Vec<(BackendId, V)> {
        self.len = 0;
        std::mem::take(&mut self.slots)
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| Some((BackendId(i as u32), v?)))
            .collect()
    }
}

impl<V> std::ops::Index<&BackendId> for IdMap<V> {
    type Output = V;

    fn index(&self, id: &BackendId) -> &V {
        self.get(id).expect("no entry for this backend id")
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

    #[test]
    fn id_map_behaves_like_an_ordered_map() {
        let mut m: IdMap<&str> = IdMap::new();
        let mut reference: BTreeMap<BackendId, &str> = BTreeMap::new();
        for (id, v) in [(5, "e"), (1, "a"), (300, "z"), (1, "a2"), (7, "g")] {
            assert_eq!(
                m.insert(BackendId(id), v),
                reference.insert(BackendId(id), v)
            );
        }
        assert_eq!(m.remove(&BackendId(7)), reference.remove(&BackendId(7)));
        assert_eq!(m.remove(&BackendId(9999)), None);
        m.retain(|id, _| id.0 != 5);
        reference.retain(|id, _| id.0 != 5);
        assert_eq!(m.len(), reference.len());
        let got: Vec<_> = m.iter().map(|(id, v)| (id, *v)).collect();
        let want: Vec<_> = reference.iter().map(|(id, v)| (*id, *v)).collect();
        assert_eq!(got, want, "same entries, in id order");
        assert_eq!(*m.get_or_insert_with(BackendId(2), || "b"), "b");
        assert_eq!(*m.get_or_insert_with(BackendId(2), || "x"), "b");
        assert_eq!(m[&BackendId(300)], "z");
        assert!(!m.contains_key(&BackendId(5)));
        let all = m.take_all();
        assert_eq!(all.len(), 3);
        assert!(m.is_empty() && m.iter().next().is_none());
    }

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
