//! Pinned state under bpffs: making sure a bpffs is there, one controller per pin directory
//! (a lock), and removing everything (`lb detach`).

use std::{
    ffi::CString,
    fs,
    io::{Read as _, Seek as _, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::{ffi::OsStrExt as _, fs::OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use lb_common::names;

/// `statfs(2)` magic of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors about the pin directory and its lock.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{path} is not on a bpffs: mount one (`mount -t bpf bpf {dir}`) or point \
         dataplane.pin_path at a directory on one"
    )]
    NotBpffs { path: PathBuf, dir: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another lb run (pid {pid}) controls the data plane pinned at {pin_path} (lock {lock}): \
         stop it first (one controller per interface)"
    )]
    Locked {
        pid: String,
        pin_path: PathBuf,
        lock: PathBuf,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PinError {
    let path = path.to_owned();
    move |source| PinError::Io { what, path, source }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid statfs to write into.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Makes sure `pin_path` exists on a bpffs. Under `/sys/fs/bpf` a missing bpffs is mounted
/// (mode 0700); anywhere else it is an error saying how to mount one.
pub fn ensure_bpffs(pin_path: &Path) -> Result<(), PinError> {
    let mut existing = pin_path.to_owned();
    while !existing.exists() {
        if !existing.pop() {
            break;
        }
    }
    if !is_bpffs(&existing) {
        let root = Path::new("/sys/fs/bpf");
        if pin_path.starts_with(root) && root.is_dir() && !is_bpffs(root) {
            let src = CString::new("bpf").expect("no NUL");
            let target = CString::new("/sys/fs/bpf").expect("no NUL");
            let data = CString::new("mode=0700").expect("no NUL");
            // SAFETY: valid NUL-terminated strings; mount(2) has no memory preconditions.
            let r = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    src.as_ptr(),
                    0,
                    data.as_ptr().cast(),
                )
            };
            if r != 0 {
                return Err(io("mounting a bpffs on", root)(
                    std::io::Error::last_os_error(),
                ));
            }
            tracing::info!("mounted a bpffs on /sys/fs/bpf");
        } else if !pin_path.starts_with(root) || !is_bpffs(root) {
            return Err(PinError::NotBpffs {
                path: pin_path.to_owned(),
                dir: existing,
            });
        }
    }
    fs::create_dir_all(pin_path).map_err(io("creating", pin_path))?;
    if !is_bpffs(pin_path) {
        return Err(PinError::NotBpffs {
            path: pin_path.to_owned(),
            dir: pin_path.parent().unwrap_or(pin_path).to_owned(),
        });
    }
    Ok(())
}

/// Whether a data plane is pinned at `pin_path`.
pub fn is_pinned(pin_path: &Path) -> bool {
    pin_path.join(names::META).exists() || pin_path.join(names::LINK_PIN).exists()
}

/// The exclusive right to control the data plane pinned at one path: an `flock` on a file in
/// `/run/lb/locks`, holding the owner's pid. Released when the process exits, however it exits.
pub struct Lock {
    _file: fs::File,
    pub path: PathBuf,
}

/// The lock file of a pin path.
pub fn lock_path(pin_path: &Path) -> PathBuf {
    let name: String = pin_path
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from("/run/lb/locks").join(format!("{name}.lock"))
}

impl Lock {
    pub fn acquire(pin_path: &Path) -> Result<Lock, PinError> {
        let path = lock_path(pin_path);
        let dir = path.parent().expect("has a parent");
        fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
            .open(&path)
            .map_err(io("opening the lock", &path))?;
        // SAFETY: flock(2) on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(PinError::Locked {
                pid: pid.trim().to_owned(),
                pin_path: pin_path.to_owned(),
                lock: path,
            });
        }
        file.set_len(0).map_err(io("writing the lock", &path))?;
        file.rewind().map_err(io("writing the lock", &path))?;
        writeln!(file, "{}", std::process::id()).map_err(io("writing the lock", &path))?;
        Ok(Lock { _file: file, path })
    }
}

/// Removes the pinned link (the program detaches when no one else holds it) and every pinned
/// map, then the directory. Returns what it removed.
pub fn remove(pin_path: &Path) -> Result<Vec<String>, PinError> {
    let mut removed = Vec::new();
    let link = pin_path.join(names::LINK_PIN);
    if link.exists() {
        fs::remove_file(&link).map_err(io("removing", &link))?;
        removed.push(format!("XDP link {}", link.display()));
    }
    if pin_path.is_dir() {
        for e in fs::read_dir(pin_path).map_err(io("reading", pin_path))? {
            let e = e.map_err(io("reading", pin_path))?;
            let p = e.path();
            if p.is_dir() {
                continue;
            }
            fs::remove_file(&p).map_err(io("removing", &p))?;
            removed.push(format!("map {}", p.display()));
        }
        fs::remove_dir(pin_path).map_err(io("removing", pin_path))?;
        removed.push(format!("directory {}", pin_path.display()));
    }
    Ok(removed)
}
