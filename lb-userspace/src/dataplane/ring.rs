//! `LB_RING` memory-mapped: the controller writes whole tables as plain stores (one syscall
//! per slot made a 65 537-slot table cost tens of milliseconds, and 1 000 of them a minute).
//! The same mapping of `u32` words serves `LB_SVC_CACHE` (see `svc_cache.rs`); mappings of
//! `u64` and `u16` words serve the packed tables (see `packed.rs`).

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering},
};

use aya::maps::MapData;

/// An atomic word type of a mapping.
pub trait Atom {
    type Value: Copy + Default;
    fn load(&self, order: Ordering) -> Self::Value;
    fn store(&self, v: Self::Value, order: Ordering);
}

macro_rules! atom {
    ($a:ty, $v:ty) => {
        impl Atom for $a {
            type Value = $v;
            fn load(&self, order: Ordering) -> $v {
                <$a>::load(self, order)
            }
            fn store(&self, v: $v, order: Ordering) {
                <$a>::store(self, v, order)
            }
        }
    };
}
atom!(AtomicU16, u16);
atom!(AtomicU32, u32);
atom!(AtomicU64, u64);

/// The mapping of `LB_RING` (created with `BPF_F_MMAPABLE`; values are chunks of
/// `RING_CHUNK` slots, 64 bytes, so the slots lie side by side: slot `i` is the `i`th `u32`).
pub type RingMem = Mem<AtomicU32>;

/// A memory-mapped array map whose values are whole multiples of 8 bytes, seen as `len` words
/// of `A` side by side.
pub struct Mem<A> {
    ptr: NonNull<A>,
    len: u32,
    bytes: usize,
    /// Keeps the map (and so the mapping's object) alive.
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory accessed through atomics only; `Mem` owns it.
unsafe impl<A> Send for Mem<A> {}

impl<A: Atom> Mem<A> {
    /// Maps `map` (`len` words of `A`, whole values) read-write.
    pub fn new(map: MapData, len: u32) -> std::io::Result<Mem<A>> {
        let bytes = (len as usize * size_of::<A>()).next_multiple_of(page_size());
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
        let ptr = NonNull::new(p.cast::<A>()).ok_or(std::io::ErrorKind::Other)?;
        Ok(Mem {
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

    fn slot(&self, i: u32) -> Option<&A> {
        // SAFETY: `i < len`: inside the mapping, which lives as long as `self`; words are
        // aligned to their size (the mapping is page-aligned).
        (i < self.len).then(|| unsafe { &*self.ptr.as_ptr().add(i as usize) })
    }

    pub fn get(&self, i: u32) -> Option<A::Value> {
        self.slot(i).map(|s| s.load(Ordering::Relaxed))
    }

    /// Writes slot `i`; `false` when it is out of range.
    pub fn set(&self, i: u32, v: A::Value) -> bool {
        self.set_ordered(i, v, Ordering::Relaxed)
    }

    /// The `len` slots from `start` on, or `None` when they do not all fit.
    pub fn run(&self, start: u32, len: u32) -> Option<&[A]> {
        if start as u64 + len as u64 > self.len as u64 {
            return None;
        }
        // SAFETY: `start + len <= self.len`: inside the mapping, which lives as long as
        // `self`; words are aligned to their size (the mapping is page-aligned).
        Some(unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr().add(start as usize), len as usize)
        })
    }

    /// Writes `vals` to the slots from `start` on (one relaxed store each, in order); `false`,
    /// writing nothing, when they do not all fit.
    pub fn set_run(&self, start: u32, vals: impl ExactSizeIterator<Item = A::Value>) -> bool {
        let Some(run) = u32::try_from(vals.len())
            .ok()
            .and_then(|n| self.run(start, n))
        else {
            return false;
        };
        for (slot, v) in run.iter().zip(vals) {
            slot.store(v, Ordering::Relaxed);
        }
        true
    }

    /// Writes slot `i` with `order`; `false` when it is out of range.
    pub fn set_ordered(&self, i: u32, v: A::Value, order: Ordering) -> bool {
        self.slot(i).map(|s| s.store(v, order)).is_some()
    }
}

/// The packed tables' two mappings (see `packed.rs`).
pub struct PackedMem {
    pub words: Mem<AtomicU64>,
    pub ids: Mem<AtomicU16>,
}

impl super::packed::PackedWords for PackedMem {
    fn word(&self, i: u32) -> u64 {
        self.words.get(i).unwrap_or(0)
    }
    fn set_word(&self, i: u32, v: u64) {
        self.words.set(i, v);
    }
    fn id(&self, svc: u32, j: usize) -> u16 {
        let i = (svc as usize * lb_common::packed::IDS + j) as u32;
        self.ids.get(i).unwrap_or(0)
    }
    fn set_id(&self, svc: u32, j: usize, v: u16, order: Ordering) {
        let i = (svc as usize * lb_common::packed::IDS + j) as u32;
        self.ids.set_ordered(i, v, order);
    }
    fn words(&self) -> u32 {
        self.words.slots()
    }
    fn services(&self) -> u32 {
        self.ids.slots() / lb_common::packed::IDS as u32
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

impl<A> Drop for Mem<A> {
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
