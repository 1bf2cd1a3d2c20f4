//! Who may use the control socket, and for what: decided per connection from the kernel's
//! account of the peer (`SO_PEERCRED`: uid, gid, pid; `SO_PEERGROUPS`: supplementary groups),
//! not only from the socket file's mode.
//!
//! - root, and the user `lb run` runs as: everything;
//! - members of `control.group`: everything;
//! - members of `control.read_group`: read-only requests (`GET`: status, explain; `lb top`);
//! - anyone else: refused (403, the reason in `{"error": ...}`).

use std::os::fd::{AsRawFd, BorrowedFd};

/// The process at the other end of a control connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    /// Supplementary groups (primary gid included when the kernel reports it).
    pub groups: Vec<u32>,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {} pid {}", self.uid, self.pid)
    }
}

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Status, explain.
    Read,
    /// Also reload and backend changes.
    Full,
}

/// A configured group: name and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
}

/// The rules of one control socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The uid `lb run` runs as (full access, like root).
    pub owner: u32,
    pub group: Option<Group>,
    pub read_group: Option<Group>,
}

impl Policy {
    fn member(p: &Peer, g: &Option<Group>) -> bool {
        g.as_ref()
            .is_some_and(|g| p.gid == g.gid || p.groups.contains(&g.gid))
    }

    /// What `p` may do, or why not.
    pub fn access(&self, p: &Peer) -> Result<Access, String> {
        if p.uid == 0 || p.uid == self.owner || Self::member(p, &self.group) {
            return Ok(Access::Full);
        }
        if Self::member(p, &self.read_group) {
            return Ok(Access::Read);
        }
        Err(format!(
            "permission denied: {p} is not root{}{}",
            match &self.group {
                Some(g) => format!(", not in control.group `{}`", g.name),
                None => String::new(),
            },
            match &self.read_group {
                Some(g) => format!(", not in control.read_group `{}`", g.name),
                None => String::new(),
            }
        ))
    }

    /// Checks `need` for `p`: `Ok` or the refusal's message.
    pub fn allow(&self, p: &Peer, need: Access) -> Result<(), String> {
        match (self.access(p)?, need) {
            (Access::Full, _) | (Access::Read, Access::Read) => Ok(()),
            (Access::Read, Access::Full) => Err(format!(
                "permission denied: {p} may only read (control.read_group); changes need root or control.group"
            )),
        }
    }
}

/// The peer of a connected Unix socket, from the kernel.
pub fn peer(fd: BorrowedFd<'_>) -> std::io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cred`, a valid ucred.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut groups = vec![0u32; 256];
    let mut len = (groups.len() * size_of::<u32>()) as libc::socklen_t;
    // SAFETY: as above, into a buffer of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // More than 256 groups (ERANGE) or an old kernel: the primary group only.
    groups.truncate(if r == 0 {
        len as usize / size_of::<u32>()
    } else {
        0
    });
    Ok(Peer {
        uid: cred.uid,
        gid: cred.gid,
        pid: cred.pid,
        groups,
    })
}

/// The id of group `name` (the system's group database).
pub fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let mut grp: libc::group = unsafe_zeroed_group();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r(3) fills `grp` using `buf` (of the given length) and sets `out` to
    // `&grp` or null; all pointers are valid for the call.
    let r =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    (r == 0 && !out.is_null()).then_some(grp.gr_gid)
}

fn unsafe_zeroed_group() -> libc::group {
    // SAFETY: `libc::group` is plain data (integers and pointers); all-zero is a valid value
    // that getgrnam_r overwrites.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            owner: 0,
            group: Some(Group {
                name: "lbadmin".into(),
                gid: 900,
            }),
            read_group: Some(Group {
                name: "lbview".into(),
                gid: 901,
            }),
        }
    }

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            pid: 4242,
            groups: groups.to_vec(),
        }
    }

    /// A non-root user in the read-only group can read status but not change weights.
    #[test]
    fn read_group_reads_but_does_not_change() {
        let p = policy();
        let viewer = peer(1001, 1001, &[1001, 901]);
        assert_eq!(p.access(&viewer), Ok(Access::Read));
        assert!(p.allow(&viewer, Access::Read).is_ok());
        let e = p.allow(&viewer, Access::Full).unwrap_err();
        assert!(e.contains("uid 1001 pid 4242 may only read"), "{e}");
        // Admin group (as primary or supplementary group), root, the owner: everything.
        for who in [
            peer(1002, 900, &[]),
            peer(1003, 1003, &[900]),
            peer(0, 0, &[]),
        ] {
            assert_eq!(p.access(&who), Ok(Access::Full), "{who:?}");
        }
        let owner = Policy {
            owner: 1500,
            ..policy()
        };
        assert_eq!(owner.access(&peer(1500, 1500, &[])), Ok(Access::Full));
        // Anyone else: refused, saying why.
        let e = p.access(&peer(1004, 1004, &[1004])).unwrap_err();
        assert!(
            e.contains("not in control.group `lbadmin`, not in control.read_group `lbview`"),
            "{e}"
        );
        // No groups configured: root and the owner only.
        let strict = Policy {
            owner: 0,
            group: None,
            read_group: None,
        };
        assert!(strict.access(&peer(1001, 900, &[901])).is_err());
    }

    /// The kernel's account of a real peer: this process on both ends of a socket pair.
    #[test]
    fn peer_credentials_come_from_the_kernel() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = super::peer(std::os::fd::AsFd::as_fd(&a)).unwrap();
        // SAFETY: no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        assert_eq!((p.uid, p.gid, p.pid), (uid, gid, std::process::id() as i32));
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-lb"), None);
    }
}
