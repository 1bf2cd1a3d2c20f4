//! `LB_RING` memory-mapped: the controller writes whole tables as plain stores (one syscall
//! per slot made a 65 537-slot table cost tens of milliseconds, and 1 000 of them a minute).
//! The same mapping of `u32` words serves `LB_SVC_CACHE` (see `svc_cache.rs`).

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::MapData;

/// The mapping of `LB_RING` (created with `BPF_F_MMAPABLE`; values are chunks of
/// `RING_CHUNK` slots, 64 bytes, so the slots lie side by side: slot `i` is the `i`th `u32`).
pub struct RingMem {
    ptr: NonNull<AtomicU32>,
    len: u32,
    bytes: usize,
    /// Keeps the map (and so the mapping's object) alive.
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory accessed through atomics only; `RingMem` owns it.
unsafe impl Send for RingMem {}

impl RingMem {
    /// Maps `map` (`len` slots of `u32`, whole chunks) read-write.
    pub fn new(map: MapData, len: u32) -> std::io::Result<RingMem> {
        let bytes = (len as usize * 4).next_multiple_of(page_size());
        // SAFETY: a fresh shared mapping of the map's fd, no address hint; the kernel checks
        // that the map is mmapable and `bytes` fits it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<AtomicU32>()).ok_or(std::io::ErrorKind::Other)?;
        Ok(RingMem {
            ptr,
            len,
            bytes,
            _map: map,
        })
    }

    /// Slots in all.
    pub fn slots(&self) -> u32 {
        self.len
    }

    fn slot(&self, i: u32) -> Option<&AtomicU32> {
        // SAFETY: `i < len`: inside the mapping, which lives as long as `self`; u32 slots are
        // 4-byte aligned (the mapping is page-aligned).
        (i < self.len).then(|| unsafe { &*self.ptr.as_ptr().add(i as usize) })
    }

    pub fn get(&self, i: u32) -> Option<u32> {
        self.slot(i).map(|s| s.load(Ordering::Relaxed))
    }

    /// Writes slot `i`; `false` when it is out of range.
    pub fn set(&self, i: u32, v: u32) -> bool {
        self.slot(i)
            .map(|s| s.store(v, Ordering::Relaxed))
            .is_some()
    }
}

impl super::svc_cache::Words for RingMem {
    fn get(&self, i: u32) -> u32 {
        RingMem::get(self, i).unwrap_or(0)
    }

    fn set(&self, i: u32, v: u32, order: Ordering) {
        if let Some(s) = self.slot(i) {
            s.store(v, order);
        }
    }
}

impl Drop for RingMem {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

fn page_size() -> usize {
    // SAFETY: no arguments; sysconf only reads.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as usize } else { 4096 }
}
