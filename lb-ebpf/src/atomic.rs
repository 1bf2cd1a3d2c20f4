//! Atomic read-modify-write on map values shared by all CPUs.
//!
//! Rust's `bpfel-unknown-none` target reports no compare-and-swap, so `core::sync::atomic`'s
//! `AtomicU64::fetch_add` is not available, but the intrinsic is: it compiles to LLVM
//! `atomicrmw add … monotonic`, which the BPF backend emits as the kernel's `BPF_ATOMIC` add
//! (`lock *(u64 *)(r + off) += r`). Using the old value (`BPF_FETCH`) needs BPF CPU v3 (the
//! object is built with `-C target-cpu=v3`, see lb-userspace/build.rs) and Linux ≥ 5.12.
//!
//! Orderings: [`add`] is relaxed (a counter; nothing is published through it). [`fetch_add`]
//! asks for sequential consistency: LLVM 22's BPF backend selects the fetching instruction
//! (`BPF_ADD | BPF_FETCH`) only for orderings stronger than relaxed; a relaxed `atomicrmw`
//! whose result is used comes out as the plain locked add with the register reused as if it
//! held the old value (verified with llvm-objdump; the BPF tests would catch a regression). The
//! kernel's BPF atomics are full barriers on every JIT anyway, so it costs nothing.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

/// Adds `delta` (wrapping) to `*p` and returns the value before. Exact across CPUs.
///
/// # Safety
/// `p` must point to a live, 8-byte aligned `u64` (a map value).
#[inline(always)]
pub unsafe fn fetch_add(p: *mut u64, delta: u64) -> u64 {
    // SAFETY: the caller's contract; the kernel's atomic add works on any map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, delta) }
}

/// Adds `delta` (wrapping: `u64::MAX` is −1) to `*p`, not reading it back (a plain
/// `lock xadd`, any BPF CPU version).
///
/// # Safety
/// As [`fetch_add`].
#[inline(always)]
pub unsafe fn add(p: *mut u64, delta: u64) {
    // SAFETY: as above; the result is unused, so LLVM emits the non-fetching form.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, delta);
    }
}
