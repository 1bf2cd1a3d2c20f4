//! Builds the eBPF object (`lb-ebpf`) with aya-build and leaves it at `$OUT_DIR/lb-ebpf`, where
//! `src/lib.rs` embeds it.
//!
//! - `LB_EBPF_OBJECT=/path/to/object`: embed a prebuilt object instead of building one.
//! - `LB_EBPF_FEATURES=log`: features of lb-ebpf (`log`: every drop logged through aya-log).
//! - `LB_EBPF_TOOLCHAIN=<rustup toolchain>`: build with another toolchain (default `debian-web`,
//!   which `scripts/bootstrap.sh` links to Debian's rustc with its prebuilt BPF `core`).
//! - `AYA_BUILD_SKIP=1`, or no `bpf-linker` on PATH: embed an empty object (host-only unit tests
//!   need no eBPF toolchain); `lb run` then says how to get a real one.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=LB_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=LB_EBPF_FEATURES");
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let dst = out_dir.join("lb-ebpf");

    if let Some(obj) = env::var_os("LB_EBPF_OBJECT") {
        let obj = PathBuf::from(obj);
        println!("cargo:rerun-if-changed={}", obj.display());
        fs::copy(&obj, &dst)
            .with_context(|| format!("LB_EBPF_OBJECT: cannot copy {}", obj.display()))?;
        return Ok(());
    }

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let have_linker = env::var_os("PATH")
        .is_some_and(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()));
    if skip || !have_linker {
        if !skip {
            println!(
                "cargo:warning=bpf-linker not found: building lb without its eBPF object \
                 (run scripts/bootstrap.sh for a complete build)"
            );
        }
        if !dst.exists() {
            fs::write(&dst, b"").context("writing empty eBPF placeholder")?;
        }
        return Ok(());
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?);
    let root_dir = manifest_dir.join("../lb-ebpf");
    // aya-build watches lb-ebpf's directory; the kernel side also compiles lb-common.
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("../lb-common").display()
    );
    let root_dir = root_dir.to_str().context("non-UTF-8 path to lb-ebpf")?;
    let toolchain = env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "debian-web".to_owned());
    // Debian's rustc is a stable compiler: let only aya-ebpf use its one unstable feature
    // (asm_experimental_arch). Not "1": that would make aya-build ask for -Z build-std.
    // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf") };
    let features = env::var("LB_EBPF_FEATURES").unwrap_or_default();
    let features: Vec<&str> = features.split(',').filter(|f| !f.is_empty()).collect();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir,
            features: &features,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!(
            "building the eBPF object with toolchain `{toolchain}` failed; \
             run scripts/bootstrap.sh (installs it), or set LB_EBPF_OBJECT to a prebuilt object"
        )
    })
}
