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

/// Receive-VLAN offload (`rxvlan`, NETIF_F_HW_VLAN_CTAG_RX) of `name`: with it on, the NIC (or
/// veth) moves the 802.1Q tag into metadata before a native XDP program sees the frame, and
/// XDP_TX sends the frame without it. `Ok(None)`: the driver does not say.
pub fn rx_vlan_offload(name: &str) -> std::io::Result<Option<bool>> {
    Ok(ethtool_flags(name, ETHTOOL_GFLAGS, 0)?.map(|f| f & ETH_FLAG_RXVLAN != 0))
}

/// Turns receive-VLAN offload off on `name` (what `ethtool -K <name> rxvlan off` does).
pub fn disable_rx_vlan_offload(name: &str) -> std::io::Result<()> {
    let Some(flags) = ethtool_flags(name, ETHTOOL_GFLAGS, 0)? else {
        return Err(std::io::Error::other("the driver reports no offload flags"));
    };
    ethtool_flags(name, ETHTOOL_SFLAGS, flags & !ETH_FLAG_RXVLAN)?;
    match rx_vlan_offload(name)? {
        Some(false) => Ok(()),
        _ => Err(std::io::Error::other("the driver kept it on")),
    }
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GFLAGS: u32 = 0x25;
const ETHTOOL_SFLAGS: u32 = 0x26;
const ETH_FLAG_RXVLAN: u32 = 1 << 8;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with the `ifr_data` member (40 bytes on 64-bit Linux).
#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

/// One `SIOCETHTOOL` get/set-flags call; `Ok(None)` when the driver does not support it.
fn ethtool_flags(name: &str, cmd: u32, data: u32) -> std::io::Result<Option<u32>> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other("interface name too long"));
    }
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _pad: [0; 16],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCETHTOOL reads `req` (a valid ifreq whose data points at `value`, both alive
    // for the call) and writes `value`; `fd` is ours and closed right after.
    let r = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req as *mut IfreqData) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    if r < 0 {
        return match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(value.data))
}

/// `struct ifreq` with the `ifr_flags` member (40 bytes on 64-bit Linux).
#[repr(C)]
struct IfreqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfreqFlags {
    fn new(name: &str, flags: libc::c_short) -> std::io::Result<IfreqFlags> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(std::io::Error::other("interface name must be 1..=15 bytes"));
        }
        let mut r = IfreqFlags {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }
}

/// A TUN device that exists exactly as long as this value (and so this process) does: the
/// kernel deletes a non-persistent TUN device when its last file descriptor closes, which
/// happens on any exit, a crash or SIGKILL included. `[announce]` routes VIPs via it, so
/// BIRD withdraws them the moment `lb run` is gone.
#[derive(Debug)]
pub struct Tun {
    _fd: std::os::fd::OwnedFd,
    pub name: String,
}

impl Tun {
    /// Creates device `name` (in this network namespace) and sets it up. Fails with
    /// `EBUSY` when a device of that name exists (another `lb run` holds it).
    pub fn create(name: &str) -> std::io::Result<Tun> {
        use std::os::fd::{FromRawFd as _, OwnedFd};
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        let mut req = IfreqFlags::new(name, (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short)?;
        // SAFETY: open(2) of a constant, NUL-terminated path.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: TUNSETIFF reads and writes `req`, a valid ifreq alive for the call.
        if unsafe { libc::ioctl(raw, TUNSETIFF as _, &mut req as *mut IfreqFlags) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        set_up(name)?;
        Ok(Tun {
            _fd: fd,
            name: name.to_owned(),
        })
    }
}

/// `ip link set dev <name> up`.
fn set_up(name: &str) -> std::io::Result<()> {
    let mut req = IfreqFlags::new(name, 0)?;
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `req`, a valid ifreq alive for the
    // calls; `fd` is ours and closed right after.
    let r = unsafe {
        let mut r = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req as *mut IfreqFlags);
        if r == 0 {
            req.flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &mut req as *mut IfreqFlags);
        }
        r
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    if r < 0 { Err(err) } else { Ok(()) }
}
