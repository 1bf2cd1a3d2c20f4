//! Interface facts the controller needs: index and MAC address.

use std::{ffi::CString, fs};

use crate::config::Mac;

/// What the desired state needs to know about an interface.
pub trait Interfaces {
    /// `(ifindex, MAC)` of `name`.
    fn lookup(&self, name: &str) -> Result<(u32, Mac), String>;
}

/// The kernel's interfaces in the current network namespace.
pub struct SystemInterfaces;

impl Interfaces for SystemInterfaces {
    fn lookup(&self, name: &str) -> Result<(u32, Mac), String> {
        let c = CString::new(name).map_err(|_| format!("bad interface name `{name}`"))?;
        // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if index == 0 {
            return Err(format!(
                "interface `{name}` does not exist in this network namespace ({})",
                std::io::Error::last_os_error()
            ));
        }
        let path = format!("/sys/class/net/{name}/address");
        let text = fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        let mac = text
            .trim()
            .parse::<Mac>()
            .map_err(|e| format!("interface `{name}` has no Ethernet address: {e}"))?;
        Ok((index, mac))
    }
}
