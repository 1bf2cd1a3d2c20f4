//! The controller of the XDP DSR load balancer: configuration, Maglev tables, the desired
//! data-plane state, and the loader that puts it into the kernel.
//!
//! Pure logic (config validation, Maglev, desired state) is host-testable without root; only
//! [`loader`] talks to the kernel.

pub mod admin;
pub mod api;
pub mod client;
pub mod config;
pub mod daemon;
pub mod health;
pub mod iface;
pub mod loader;
pub mod maglev;
pub mod neigh;
pub mod report;
pub mod sched;
pub mod state;
pub mod stats;

/// The compiled `lb_xdp` object, embedded at build time (empty if built without bpf-linker).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
