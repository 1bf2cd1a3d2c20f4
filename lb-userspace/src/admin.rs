//! Administrative overrides (enable/disable/drain, weight) that survive restarts.
//!
//! Kept in a JSON state file (`[control] state_file`), written atomically: a temporary file in
//! the same directory, fsync, rename, fsync of the directory.

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
}

impl Override {
    pub fn is_default(&self) -> bool {
        self.admin == Admin::Enabled && self.weight.is_none()
    }
}

/// Overrides by service name, then backend address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminState {
    #[serde(default)]
    pub backends: BTreeMap<String, BTreeMap<IpAddr, Override>>,
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

    /// Writes the state file atomically.
    pub fn save(&self, path: &Path) -> Result<(), AdminError> {
        let io = |source| AdminError::Io {
            path: path.to_owned(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("lb-state")
        ));
        let mut f = fs::File::create(&tmp).map_err(io)?;
        let text = serde_json::to_vec_pretty(self).expect("state serializes");
        f.write_all(&text).map_err(io)?;
        f.write_all(b"\n").map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        fs::rename(&tmp, path).map_err(io)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    pub fn get(&self, service: &str, address: IpAddr) -> Override {
        self.backends
            .get(service)
            .and_then(|m| m.get(&address))
            .cloned()
            .unwrap_or_default()
    }

    /// Sets an override (a default one is removed).
    pub fn set(&mut self, service: &str, address: IpAddr, o: Override) {
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
    }
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
            },
        );
        s.save(&path).unwrap();
        assert_eq!(AdminState::load(&path).unwrap(), s);
        assert!(!dir.join(".lb.state.json.tmp").exists());
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
}
