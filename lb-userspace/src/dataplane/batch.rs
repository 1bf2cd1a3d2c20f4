//! Whole per-CPU arrays and hash maps read with a few `BPF_MAP_LOOKUP_BATCH` calls instead of
//! one lookup per entry. The controller samples every backend's counters each second: with
//! 10 000 backends, one system call (and one allocation) each was about 1 % of a core. Its
//! sweep walks the connection table: with 10^6 entries, a key walk and a lookup per entry took
//! 3.5 s of CPU (and held up the controller's loop as long) on the AMD host of session 14.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// `BPF_MAP_LOOKUP_BATCH` (linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries per call.
const CHUNK: u32 = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries `0..n` of the per-CPU array `fd` (values of `T`), each CPU's value in turn:
/// `out[i * cpus + c]` is entry `i` on CPU `c` (`cpus`: the possible CPUs). `Err` when the
/// kernel has no batch lookup (before 5.6) or the map is smaller than `n`.
pub fn per_cpu_array<T: bytemuck::Pod>(
    fd: BorrowedFd<'_>,
    n: u32,
    cpus: usize,
) -> io::Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    let stride = size.next_multiple_of(8);
    let mut out = Vec::with_capacity(n as usize * cpus);
    let mut keys = vec![0u32; CHUNK as usize];
    let mut values = vec![0u8; CHUNK as usize * cpus * stride];
    let (mut from, mut next) = (0u32, 0u32);
    let mut started = false;
    while (out.len() / cpus.max(1)) < n as usize {
        let want = (n - (out.len() / cpus.max(1)) as u32).min(CHUNK);
        let mut attr = BatchAttr {
            in_batch: if started {
                (&from as *const u32) as u64
            } else {
                0
            },
            out_batch: (&mut next as *mut u32) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: want,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is the batch form of bpf_attr with its exact size; the kernel writes
        // at most `count` keys into `keys`, `count` values of `cpus` × `stride` bytes into
        // `values` (both sized for CHUNK) and one key into `next`, all alive for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        let done = if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
            true // the map's end: `count` says how many were filled
        } else {
            false
        };
        let got = attr.count.min(want) as usize;
        for (i, key) in keys.iter().take(got).enumerate() {
            if *key as usize != out.len() / cpus.max(1) {
                return Err(io::Error::other("batch lookup: keys out of order"));
            }
            for c in 0..cpus {
                let at = (i * cpus + c) * stride;
                out.push(bytemuck::pod_read_unaligned(&values[at..at + size]));
            }
        }
        if done || got == 0 {
            break;
        }
        from = next;
        started = true;
    }
    if out.len() < n as usize * cpus {
        return Err(io::Error::other("batch lookup: the map has fewer entries"));
    }
    Ok(out)
}

/// Every entry of the (non-per-CPU) hash map `fd`, `CHUNK` or so at a time: `f` gets each
/// batch's keys and values. The kernel hands out whole buckets, each read under its lock, so
/// an entry present for the whole walk is seen exactly once (unlike a walk by next key, which
/// starts over when its current key is deleted meanwhile). `Err` when the kernel has no batch
/// lookup for this map (before 5.6); nothing was passed to `f` then.
pub fn hash_map<K: bytemuck::Pod, V: bytemuck::Pod>(
    fd: BorrowedFd<'_>,
    mut f: impl FnMut(&[K], &[V]),
) -> io::Result<()> {
    let mut cap = CHUNK as usize;
    let mut keys: Vec<K> = vec![K::zeroed(); cap];
    let mut values: Vec<V> = vec![V::zeroed(); cap];
    // The kernel's position: a bucket index (u32) it writes to `next` and reads from `from`.
    let (mut from, mut next) = (0u32, 0u32);
    let mut started = false;
    loop {
        let mut attr = BatchAttr {
            in_batch: if started {
                (&from as *const u32) as u64
            } else {
                0
            },
            out_batch: (&mut next as *mut u32) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: cap as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is the batch form of bpf_attr with its exact size; the kernel writes
        // at most `count` keys of the map's key size (`K`, checked by the caller's map type)
        // into `keys` and as many values into `values`, both `cap` long, and one bucket index
        // into `next`, all alive for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        let done = if r < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOENT) => true, // the last bucket: `count` says how many
                // A bucket holds more entries than fit: room for more, the same bucket again.
                Some(libc::ENOSPC) if cap < 1 << 20 => {
                    cap *= 4;
                    keys.resize(cap, K::zeroed());
                    values.resize(cap, V::zeroed());
                    continue;
                }
                _ => return Err(e),
            }
        } else {
            false
        };
        let got = (attr.count as usize).min(cap);
        f(&keys[..got], &values[..got]);
        if done {
            return Ok(());
        }
        if got == 0 {
            // The kernel skips empty buckets until it has entries or reaches the end.
            return Err(io::Error::other("batch lookup: no progress"));
        }
        from = next;
        started = true;
    }
}
