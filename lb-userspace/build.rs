//! Builds the eBPF object (`lb-ebpf`) for BPF CPU v3 and leaves it at `$OUT_DIR/lb-ebpf`, where
//! `src/lib.rs` embeds it.
//!
//! - `LB_EBPF_OBJECT=/path/to/object`: embed a prebuilt object instead of building one.
//! - `LB_EBPF_FEATURES=log`: features of lb-ebpf (`log`: every drop logged through aya-log).
//! - `LB_EBPF_TOOLCHAIN=<rustup toolchain>`: build with another toolchain (default `debian-web`,
//!   which `scripts/bootstrap.sh` links to Debian's rustc with its prebuilt BPF `core`).
//! - `AYA_BUILD_SKIP=1`, or no `bpf-linker` on PATH: embed an empty object (host-only unit tests
//!   need no eBPF toolchain); `lb run` then says how to get a real one.
use std::{env, fs, path::PathBuf, process::Command};

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
            // Built again once bpf-linker is installed (a missing file is always stale, and
            // this path is cheap): otherwise the objectless build stays until lb-ebpf changes.
            for dir in env::split_paths(&env::var_os("PATH").unwrap_or_default()) {
                println!(
                    "cargo:rerun-if-changed={}",
                    dir.join("bpf-linker").display()
                );
            }
        }
        if !dst.exists() {
            fs::write(&dst, b"").context("writing empty eBPF placeholder")?;
        }
        return Ok(());
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?);
    // The object depends on lb-ebpf's sources and on lb-common, which the kernel side compiles.
    for dir in ["../lb-ebpf", "../lb-common"] {
        println!(
            "cargo:rerun-if-changed={}",
            manifest_dir.join(dir).display()
        );
    }
    let toolchain = env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "debian-web".to_owned());
    let features = env::var("LB_EBPF_FEATURES").unwrap_or_default();
    build_ebpf(&manifest_dir, &out_dir, &toolchain, &features).with_context(|| {
        format!(
            "building the eBPF object with toolchain `{toolchain}` failed; \
             run scripts/bootstrap.sh (installs it), or set LB_EBPF_OBJECT to a prebuilt object"
        )
    })?;
    Ok(())
}

/// `cargo build` of lb-ebpf for `bpfel-unknown-none` through `rustup run <toolchain>`, then the
/// binary is copied to `$OUT_DIR/lb-ebpf`. The same steps as aya-build 0.2, which cannot pass
/// `-C target-cpu`: the program needs BPF CPU v3 for atomic fetch-and-add with its result
/// (shared round-robin cursors; lb-ebpf/src/atomic.rs) and for 32-bit jumps.
fn build_ebpf(
    manifest_dir: &std::path::Path,
    out_dir: &std::path::Path,
    toolchain: &str,
    features: &str,
) -> anyhow::Result<()> {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb-unknown-none",
        _ => "bpfel-unknown-none",
    };
    let target_dir = out_dir.join("ebpf-target");
    let flags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
        "-Ctarget-cpu=v3".to_owned(),
    ]
    .join("\x1f");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        toolchain,
        "cargo",
        "build",
        "--package",
        "lb-ebpf",
        "--bins",
    ])
    .args(["--release", "--target", target, "--features", features])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(manifest_dir.join("../lb-ebpf"))
    .env("CARGO_ENCODED_RUSTFLAGS", flags)
    // Debian's rustc is a stable compiler: only aya-ebpf (asm_experimental_arch) and lb-ebpf
    // (core_intrinsics, for the atomics) may use unstable features.
    .env("RUSTC_BOOTSTRAP", "aya_ebpf,lb_ebpf");
    // The outer build's compiler and target dir are not the eBPF build's.
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(key);
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?} (is rustup installed?)"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let built = target_dir.join(target).join("release").join("lb-ebpf");
    fs::copy(&built, out_dir.join("lb-ebpf"))
        .with_context(|| format!("copying {}", built.display()))?;
    Ok(())
}
