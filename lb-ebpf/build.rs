//! Link arguments for the eBPF object.
//!
//! - bpf-linker passes `--bpf-expand-memcpy-in-order` to LLVM by default, which turns off LLVM's
//!   generic expansion of memory intrinsics: `memset`/`memmove` (zeroed keys, MAC and address
//!   copies) then stay calls into byte-at-a-time loops from compiler_builtins. Without it they
//!   become a few loads and stores (see README, Measurements).
//! - `+allows-misaligned-mem-access` (LLVM 22): header fields are read with one load each
//!   instead of byte by byte and shifted together (an IPv4 header sits at offset 14: its
//!   addresses are not 4-byte aligned). The kernel's verifier accepts misaligned packet and
//!   map-value loads on architectures with efficient unaligned access (x86_64, arm64); it never
//!   accepts misaligned stack accesses, so LLVM must not merge neighbouring stack stores into
//!   wider ones (`-combiner-store-merging=false`: the one place it did was a 4-byte-aligned
//!   8-byte store into the lc/wlc scan state).
fn main() {
    println!("cargo::rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    println!("cargo::rustc-link-arg-bins=--cpu-features=+allows-misaligned-mem-access");
    println!("cargo::rustc-link-arg-bins=--llvm-args=-combiner-store-merging=false");
}
