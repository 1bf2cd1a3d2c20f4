//! Link arguments for the eBPF object.
//!
//! bpf-linker passes `--bpf-expand-memcpy-in-order` to LLVM by default, which turns off LLVM's
//! generic expansion of memory intrinsics: `memset`/`memmove` (zeroed keys, MAC and address
//! copies) then stay calls into byte-at-a-time loops from compiler_builtins. Without it they
//! become a few loads and stores (see README, Measurements).
fn main() {
    println!("cargo::rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
