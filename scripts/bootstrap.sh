#!/usr/bin/env bash
# Installs everything this project needs on a Debian 12 machine, idempotently.
# Fast (well under a second) when everything is already present.
#
#   Debian packages: Debian's rustc/cargo 1.96 with a prebuilt core for bpfel-unknown-none,
#                    llvm-22-dev (for bpf-linker), clippy for the eBPF crate, lab tools,
#                    bird2 (BGP + BFD: `[announce]`, the multi-node lab).
#   bpf-linker 0.13.0 built against LLVM 22 (cargo install, crates.io).
#   rustup toolchain link `debian-web` -> /usr (local, downloads nothing).
#
# Env: LB_BOOTSTRAP_QUIET=1 silences the "all present" line.
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
PKGS=(rustc-web cargo-web libstd-rust-web-dev-bpf rust-web-clippy llvm-22-dev
      bpftool xdp-tools tcpdump ethtool iproute2 iputils-ping curl python3 shellcheck bird2)

log() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(uname -s)" = Linux ] || die "Linux only"
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
  command -v sudo >/dev/null || die "not root and no sudo: run as root"
else
  SUDO=
fi

did=0
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian 12 only"
  $SUDO apt-get update -q >/dev/null || die "apt-get update failed (network/registry?)"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
  if [[ " ${missing[*]} " == *" bird2 "* ]]; then
    # The package may start a system BIRD with Debian's default config: not ours to run
    # (lb's lab and demo start their own, each in its namespace).
    { $SUDO systemctl disable --now bird.service || $SUDO service bird stop; } >/dev/null 2>&1 || true
  fi
  did=1
fi

CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
export PATH="$CARGO_BIN:$PATH"
command -v rustup >/dev/null || die "rustup not found (expected in $CARGO_BIN)"

have_linker=0
if command -v bpf-linker >/dev/null; then
  v=$(bpf-linker --version 2>/dev/null | awk '{print $2}')
  [ "$v" = "$BPF_LINKER_VERSION" ] && have_linker=1
fi
if [ $have_linker -eq 0 ]; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (about a minute)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo +stable install bpf-linker --version "$BPF_LINKER_VERSION" --locked \
    --no-default-features --features llvm-22 --force -q \
    || die "cargo install bpf-linker failed (is llvm-22-dev installed? LLVM_PREFIX=/usr/lib/llvm-22)"
  did=1
fi

if ! rustup toolchain list | grep -q '^debian-web'; then
  log "linking rustup toolchain debian-web -> /usr"
  rustup toolchain link debian-web /usr || die "rustup toolchain link debian-web /usr failed"
  did=1
fi
[ -d /usr/lib/rustlib/bpfel-unknown-none/lib ] || die "no prebuilt core for bpfel-unknown-none (libstd-rust-web-dev-bpf)"

if [ $did -eq 1 ] || [ "${LB_BOOTSTRAP_QUIET:-0}" != 1 ]; then
  log "toolchain ready (debian-web rustc $(/usr/bin/rustc --version | awk '{print $2}'), bpf-linker $BPF_LINKER_VERSION)"
fi
