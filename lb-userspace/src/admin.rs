//! Administrative overrides (enable/disable/drain, weight) that survive restarts.
//!
//! Kept in a JSON state file (`[control] state_file`), written atomically: a uniquely named
//! temporary file created exclusively (`O_CREAT|O_EXCL`, mode 0600, so a planted symlink is
//! never followed) in the same directory, fsync, rename, fsync of the directory. Leftover
//! temporary files of an interrupted write are removed at start.
//!
//! A weight override remembers the config weight it was set against: when the config's own
//! weight for that backend changes, the config wins and the override is dropped (HAProxy's
//! server-state behaviour).

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{api::Admin, config::Config};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    #[serde(default)]
    pub admin: Admin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u16>,
    /// The config's weight when `weight` was set; a different config weight drops `weight`.
    /// (Absent in state files of older versions: taken to match the config at first load.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_weight: Option<u16>,
}

impl Override {
    pub fn is_default(&self) -> bool {
        self.admin == Admin::Enabled && self.weight.is_none()
    }
}

/// A weight override the config overruled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroppedOverride {
    pub service: String,
    pub address: IpAddr,
    pub weight: u16,
    pub was: u16,
    pub now: u16,
}

impl std::fmt::Display for DroppedOverride {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "service \"{}\" backend {}: weight override {} dropped: the config's weight changed {} → {} (the config wins)",
            self.service, self.address, self.weight, self.was, self.now
        )
    }
}

/// Overrides by service name, then backend address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminState {
    #[serde(default)]
    pub backends: BTreeMap<String, BTreeMap<IpAddr, Override>>,
    /// VIPs an operator withdrew (`lb vip withdraw`): not announced until `lb vip announce`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub withdrawn_vips: std::collections::BTreeSet<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path}: not valid JSON state ({source}); fix or remove it")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl AdminState {
    /// Reads the state file; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<AdminState, AdminError> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| AdminError::Parse {
                path: path.to_owned(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AdminState::default()),
            Err(source) => Err(AdminError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes the state file atomically (see the module docs).
    pub fn save(&self, path: &Path) -> Result<(), AdminError> {
        let io = |source| AdminError::Io {
            path: path.to_owned(),
            source,
        };
        let dir = parent(path);
        fs::create_dir_all(dir).map_err(io)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(&temp_prefix(path))
            .suffix(TEMP_SUFFIX)
            .tempfile_in(dir)
            .map_err(io)?;
        let text = serde_json::to_vec_pretty(self).expect("state serializes");
        tmp.write_all(&text).map_err(io)?;
        tmp.write_all(b"\n").map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    /// Removes temporary files an interrupted [`AdminState::save`] left next to `path`
    /// (regular files only, never following symlinks). Returns how many.
    pub fn remove_leftovers(path: &Path) -> usize {
        let prefix = temp_prefix(path);
        let Ok(entries) = fs::read_dir(parent(path)) else {
            return 0;
        };
        let mut n = 0;
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let regular = e.file_type().is_ok_and(|t| t.is_file());
            if regular
                && name.starts_with(&prefix)
                && name.ends_with(TEMP_SUFFIX)
                && fs::remove_file(e.path()).is_ok()
            {
                n += 1;
            }
        }
        n
    }

    /// Drops weight overrides whose backend's config weight is no longer the one they were
    /// set against, and stamps old overrides (no recorded config weight) with the current one.
    pub fn reconcile_weights(&mut self, cfg: &Config) -> Vec<DroppedOverride> {
        let mut dropped = Vec::new();
        for s in &cfg.services {
            for b in &s.backends {
                let mut o = self.get(&s.name, b.address);
                let Some(w) = o.weight else { continue };
                match o.config_weight {
                    Some(was) if was != b.weight => {
                        dropped.push(DroppedOverride {
                            service: s.name.clone(),
                            address: b.address,
                            weight: w,
                            was,
                            now: b.weight,
                        });
                        o.weight = None;
                        o.config_weight = None;
                    }
                    Some(_) => continue,
                    None => o.config_weight = Some(b.weight),
                }
                self.set(&s.name, b.address, o);
            }
        }
        dropped
    }

    pub fn get(&self, service: &str, address: IpAddr) -> Override {
        self.backends
            .get(service)
            .and_then(|m| m.get(&address))
            .cloned()
            .unwrap_or_default()
    }

    /// Sets an override (a default one is removed).
    pub fn set(&mut self, service: &str, address: IpAddr, mut o: Override) {
        if o.weight.is_none() {
            o.config_weight = None;
        }
        let m = self.backends.entry(service.to_owned()).or_default();
        if o.is_default() {
            m.remove(&address);
        } else {
            m.insert(address, o);
        }
        if m.is_empty() {
            self.backends.remove(service);
        }
    }

    /// Drops overrides of backends the config no longer has.
    pub fn prune(&mut self, cfg: &Config) {
        self.backends.retain(|svc, m| {
            let Some(s) = cfg.services.iter().find(|s| s.name == *svc) else {
                return false;
            };
            m.retain(|addr, _| s.backends.iter().any(|b| b.address == *addr));
            !m.is_empty()
        });
        self.withdrawn_vips
            .retain(|v| cfg.services.iter().any(|s| s.vip == *v));
    }
}

const TEMP_SUFFIX: &str = ".tmp";

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn temp_prefix(path: &Path) -> String {
    format!(
        ".{}.",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("lb-state")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_save() {
        let dir = std::env::temp_dir().join(format!("lb-admin-test-{}", std::process::id()));
        let path = dir.join("lb.state.json");
        let mut s = AdminState::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        s.set(
            "web",
            a,
            Override {
                admin: Admin::Draining,
                weight: Some(7),
                config_weight: Some(100),
            },
        );
        s.save(&path).unwrap();
        assert_eq!(AdminState::load(&path).unwrap(), s);
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 1, "only the state file: {left:?}");
        // Back to default: the entry disappears.
        s.set("web", a, Override::default());
        assert!(s.backends.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_is_empty_and_garbage_is_an_error() {
        let dir = std::env::temp_dir().join(format!("lb-admin-test2-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            AdminState::load(&dir.join("none.json")).unwrap(),
            AdminState::default()
        );
        fs::write(dir.join("bad.json"), b"{not json").unwrap();
        let e = AdminState::load(&dir.join("bad.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.json") && e.contains("fix or remove it"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A symlink planted where a temporary file could go is never followed: the temporary
    /// name is unique and created exclusively; leftovers are removed, symlinks are not touched.
    #[test]
    fn save_never_follows_a_planted_symlink() {
        let dir = std::env::temp_dir().join(format!("lb-admin-test3-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        fs::write(&victim, b"precious").unwrap();
        let path = dir.join("lb.state.json");
        // The old fixed temporary name, and a guess at the new pattern.
        for name in [".lb.state.json.tmp", ".lb.state.json.x.tmp"] {
            std::os::unix::fs::symlink(&victim, dir.join(name)).unwrap();
        }
        fs::write(dir.join(".lb.state.json.leftover.tmp"), b"half").unwrap();
        assert_eq!(AdminState::remove_leftovers(&path), 1);
        assert!(
            dir.join(".lb.state.json.tmp").is_symlink(),
            "symlinks are left alone"
        );
        let mut s = AdminState::default();
        s.set(
            "web",
            "10.0.0.1".parse().unwrap(),
            Override {
                admin: Admin::Disabled,
                weight: None,
                config_weight: None,
            },
        );
        s.save(&path).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(AdminState::load(&path).unwrap(), s);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_changed_config_weight_drops_the_override() {
        let text = |w: u16| {
            format!(
                "[dataplane]\ninterface = \"eth0\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n[[service.backend]]\naddress = \"10.0.0.1\"\nmac = \"02:00:00:00:00:01\"\nweight = {w}\n"
            )
        };
        let cfg = |w| Config::parse(&text(w), Path::new("t.toml")).unwrap();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mut s = AdminState::default();
        // An override from an older state file: no recorded config weight → stamped, kept.
        s.set(
            "web",
            a,
            Override {
                admin: Admin::Draining,
                weight: Some(300),
                config_weight: None,
            },
        );
        assert!(s.reconcile_weights(&cfg(100)).is_empty());
        assert_eq!(s.get("web", a).config_weight, Some(100));
        // Same config weight: kept across reloads and restarts.
        assert!(s.reconcile_weights(&cfg(100)).is_empty());
        assert_eq!(s.get("web", a).weight, Some(300));
        // The config's weight changes: the config wins, the drain stays.
        let d = s.reconcile_weights(&cfg(150));
        assert_eq!(d.len(), 1);
        assert!(
            d[0].to_string().contains("weight override 300 dropped"),
            "{}",
            d[0]
        );
        assert_eq!(
            s.get("web", a),
            Override {
                admin: Admin::Draining,
                weight: None,
                config_weight: None,
            }
        );
    }
}
