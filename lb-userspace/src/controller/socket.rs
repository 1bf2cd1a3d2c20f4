//! The control socket: bound with mode 0600 (0660 and the configured group when
//! `control.group`/`read_group` is set), in a directory that is not world-writable (created
//! 0750 when missing), never at the cost of anything else.
//!
//! Whatever is at `control.socket` is only replaced if it is a socket nobody answers on (a stale
//! one of ours). A live socket means another `lb` runs: refused, and its socket is left alone; a
//! file that is not a socket is refused. The socket is removed at exit only if it is still the
//! one this process bound.

use std::{
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use tokio::net::UnixListener;

/// A bound control socket; removes its file on drop if the file is still ours.
pub struct ControlSocket {
    pub listener: Option<UnixListener>,
    path: PathBuf,
    /// (device, inode) of the socket file this process created.
    ours: (u64, u64),
}

impl ControlSocket {
    /// Binds `path`; `group`: the group that may connect (file mode 0660, directory group).
    pub fn bind(path: &Path, group: Option<u32>) -> anyhow::Result<ControlSocket> {
        use std::os::unix::fs::DirBuilderExt as _;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o750)
                    .create(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let m =
                std::fs::metadata(dir).with_context(|| format!("checking {}", dir.display()))?;
            if m.mode() & 0o002 != 0 {
                bail!(
                    "{} (the directory of control.socket) is world-writable: anyone could replace \
                     the socket there; use a directory only root can write, like /run/lb",
                    dir.display()
                );
            }
            // SAFETY: geteuid(2) has no preconditions.
            if let Some(gid) = group
                && m.uid() == unsafe { libc::geteuid() }
            {
                std::os::unix::fs::chown(dir, None, Some(gid))
                    .with_context(|| format!("chgrp {gid} {}", dir.display()))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
                    .with_context(|| format!("chmod 0750 {}", dir.display()))?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => bail!(
                "{} (control.socket) exists and is not a socket: refusing to replace it; \
                 point control.socket at a free path",
                path.display()
            ),
            Ok(_) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    bail!(
                        "another lb is already serving {} (control.socket): stop it first, or \
                         give this one another control.socket",
                        path.display()
                    );
                }
                std::fs::remove_file(path)
                    .with_context(|| format!("removing the stale socket {}", path.display()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
        }
        // SAFETY: umask(2) only changes this process's file mode mask; restored right after bind.
        let old = unsafe { libc::umask(0o177) };
        let l = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener =
            l.with_context(|| format!("binding the control socket {}", path.display()))?;
        let mode = if group.is_some() { 0o660 } else { 0o600 };
        if let Some(gid) = group {
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("chgrp {gid} {}", path.display()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
        let m = std::fs::symlink_metadata(path)
            .with_context(|| format!("checking {}", path.display()))?;
        Ok(ControlSocket {
            listener: Some(listener),
            path: path.to_owned(),
            ours: (m.dev(), m.ino()),
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let still_ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.ours);
        if still_ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-sock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn a_second_bind_is_refused_and_leaves_the_first_alone() {
        let d = dir("second");
        let p = d.join("lb.sock");
        let first = ControlSocket::bind(&p, None).unwrap();
        let e = ControlSocket::bind(&p, None).err().unwrap().to_string();
        assert!(e.contains("another lb is already serving"), "{e}");
        assert!(
            std::os::unix::net::UnixStream::connect(&p).is_ok(),
            "first still reachable"
        );
        drop(first);
        assert!(!p.exists(), "removed at exit");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_regular_file_is_never_replaced_a_stale_socket_is() {
        let d = dir("file");
        let p = d.join("lb.toml");
        std::fs::write(&p, "precious").unwrap();
        let e = ControlSocket::bind(&p, None).err().unwrap().to_string();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "precious");
        // A stale socket (bound, then its listener gone without removing the file).
        let s = d.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&s).unwrap());
        let c = ControlSocket::bind(&s, None).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&s).is_ok());
        drop(c);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A missing directory is made 0750; a world-writable one is refused; a group makes the
    /// socket 0660 with that group.
    #[tokio::test]
    async fn directory_and_mode() {
        let d = dir("perm");
        let p = d.join("sub/lb.sock");
        let s = ControlSocket::bind(&p, Some(0)).unwrap();
        let dm = std::fs::metadata(d.join("sub")).unwrap();
        assert_eq!(dm.mode() & 0o777, 0o750);
        let sm = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!((sm.mode() & 0o777, sm.gid()), (0o660, 0));
        drop(s);
        let open = d.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ControlSocket::bind(&open.join("lb.sock"), None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is world-writable"), "{e}");
        assert!(!open.join("lb.sock").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
