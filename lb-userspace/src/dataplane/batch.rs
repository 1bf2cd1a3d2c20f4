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
/// `BPF_MAP_UPDATE_BATCH` (linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// Entries per call.
pub(crate) const CHUNK: u32 = 4096;

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

/// One `BPF_MAP_LOOKUP_BATCH` call on `fd`: up to `count` entries from the kernel's position
/// `from` (`None`: the start) into `keys` and `values`; the position after them goes to `next`.
/// Returns how many it filled and whether that was the map's end.
///
/// # Safety
/// `keys` and `values` must have room for `count` keys and `count` values of the map's sizes
/// (a per-CPU map's values: `round_up(value_size, 8)` × possible CPUs each).
unsafe fn lookup_batch(
    fd: BorrowedFd<'_>,
    from: Option<&u32>,
    next: &mut u32,
    keys: *mut u8,
    values: *mut u8,
    count: u32,
) -> io::Result<(u32, bool)> {
    let mut attr = BatchAttr {
        in_batch: from.map_or(0, |f| f as *const u32 as u64),
        out_batch: next as *mut u32 as u64,
        keys: keys as u64,
        values: values as u64,
        count,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is the batch form of bpf_attr with its exact size; the kernel reads one
    // position from `from`, writes at most `count` keys and values where the caller made room
    // for them and one position into `next`, all alive for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
        return Ok((attr.count, true)); // the map's end: `count` says how many were filled
    }
    Ok((attr.count, false))
}

/// Entries `0..n` of the per-CPU array `fd` (values of `T`), each CPU's value in turn:
/// `out[i * cpus + c]` is entry `i` on CPU `c` (`cpus`: the possible CPUs; 1 for a plain
/// array, whose values of 8 bytes or a multiple of 8 come the same way). `Err` when the kernel
/// has no batch lookup (before 5.6) or the map is smaller than `n`.
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
        // SAFETY: `keys` has room for CHUNK ≥ `want` keys of 4 bytes (an array's) and
        // `values` for as many values of `cpus` × `stride` bytes (of `T`, per CPU).
        let (got, done) = unsafe {
            lookup_batch(
                fd,
                started.then_some(&from),
                &mut next,
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr(),
                want,
            )?
        };
        let got = got.min(want) as usize;
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
/// starts over when its current key is deleted meanwhile). `Err`: the kernel's error (one
/// without batch lookups, before 5.6, refuses the first call, before anything reaches `f`).
pub fn hash_map<K: bytemuck::Pod, V: bytemuck::Pod>(
    fd: BorrowedFd<'_>,
    f: impl FnMut(&[K], &[V]),
) -> io::Result<()> {
    hash_map_part(fd, None, usize::MAX, f).map(|_| ())
}

/// Part of [`hash_map`]'s walk: from the kernel's position `from` (`None`: the start), whole
/// batches until `at_least` entries reached `f` or the map ended. Returns the position to go on
/// from, `None` at the map's end. A walk in parts lets its caller do other work between them;
/// an entry present for the whole walk is still seen exactly once (the position is a bucket).
pub fn hash_map_part<K: bytemuck::Pod, V: bytemuck::Pod>(
    fd: BorrowedFd<'_>,
    from: Option<u32>,
    at_least: usize,
    mut f: impl FnMut(&[K], &[V]),
) -> io::Result<Option<u32>> {
    // Batches of `CHUNK`, or of `at_least` when that is less (the kernel hands out whole
    // buckets: a bucket larger than that makes room for more, below).
    let mut cap = (CHUNK as usize).min(at_least.max(1));
    let mut keys: Vec<K> = vec![K::zeroed(); cap];
    let mut values: Vec<V> = vec![V::zeroed(); cap];
    // The kernel's position: a bucket index (u32) it writes to `next` and reads from `from`.
    let mut started = from.is_some();
    let (mut from, mut next) = (from.unwrap_or(0), 0u32);
    let mut seen = 0usize;
    loop {
        // SAFETY: `keys` and `values` have room for `cap` keys and values of `K` and `V`, the
        // map's key and value types (the caller's typed map checked their sizes).
        let r = unsafe {
            lookup_batch(
                fd,
                started.then_some(&from),
                &mut next,
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                cap as u32,
            )
        };
        let (got, done) = match r {
            Ok(r) => r,
            // A bucket holds more entries than fit: room for more, the same bucket again.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && cap < 1 << 20 => {
                cap *= 4;
                keys.resize(cap, K::zeroed());
                values.resize(cap, V::zeroed());
                continue;
            }
            Err(e) => return Err(e),
        };
        let got = (got as usize).min(cap);
        f(&keys[..got], &values[..got]);
        if done {
            return Ok(None);
        }
        if got == 0 {
            // The kernel skips empty buckets until it has entries or reaches the end.
            return Err(io::Error::other("batch lookup: no progress"));
        }
        from = next;
        started = true;
        seen += got;
        if seen >= at_least {
            return Ok(Some(from));
        }
    }
}

/// Writes `values` into entries `0..values.len()` of the array `fd` (values of `V`) with one
/// `BPF_MAP_UPDATE_BATCH` call (arrays take any element flags but `BPF_F_LOCK`'s absence: 0).
pub fn write_array<V: bytemuck::Pod>(fd: BorrowedFd<'_>, values: &[V]) -> io::Result<()> {
    let keys: Vec<u32> = (0..values.len() as u32).collect();
    write_entries(fd, &keys, bytemuck::cast_slice(values), size_of::<V>())
}

/// Writes entries `keys` of the array `fd` with `BPF_MAP_UPDATE_BATCH` calls of [`CHUNK`]
/// entries: `values` holds one value of `size` bytes a key, side by side, as the kernel takes
/// them (`size` must be what the kernel reads a key: the map's value size; a per-CPU
/// array's `round_up(value_size, 8)` for each possible CPU). `Err` when `values` is not one
/// such value a key, or the kernel's error (one without batch updates, before 5.6, refuses the
/// first call).
pub fn write_entries(
    fd: BorrowedFd<'_>,
    keys: &[u32],
    values: &[u8],
    size: usize,
) -> io::Result<()> {
    if values.len() != keys.len() * size {
        return Err(io::Error::other("update batch: not one value a key"));
    }
    for (keys, values) in keys
        .chunks(CHUNK as usize)
        .zip(values.chunks(CHUNK as usize * size))
    {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is the batch form of bpf_attr with its exact size; the kernel reads
        // `count` keys (u32) and as many values of `size` bytes (the size it reads a key, as
        // the caller gives it; `values` holds that many, checked above) from `keys` and
        // `values`, alive for the call, and writes how many it did into `count`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if attr.count as usize != keys.len() {
            return Err(io::Error::other("update batch: not every entry written"));
        }
    }
    Ok(())
}
