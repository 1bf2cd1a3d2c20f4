//! The controller of the XDP DSR load balancer.
//!
//! One place per concern:
//! - [`config`]: TOML → validated model; [`admin`]: persisted overrides;
//! - [`desired`]: the pure rule (config + admin + health + neighbours → desired maps),
//!   [`desired::ids`] (id allocation), [`desired::reconcile`] (desired vs current → map writes);
//! - [`dataplane`]: the maps behind a trait; [`dataplane::loader`] is the only code that talks
//!   to the kernel's BPF objects, [`dataplane::fake`] the in-memory one for tests;
//! - [`controller`]: the event loop that owns the data plane; [`controller::socket`];
//! - [`health`]: probes and rise/fall, [`health::tasks`] (check tasks kept across reloads);
//! - [`neigh`]: MAC resolution (netlink dump + events);
//! - [`api`]: types, [`api::server`] (typed requests), [`api::client`]; [`status`]: reports;
//!   [`metrics`]: the Prometheus exposition; [`trace`]: `lb trace`'s maps, decoding, pcapng.
//!
//! Pure logic (config validation, Maglev, schedulers, desired state, diff, the controller's
//! core through fakes) is host-tested without root.

pub mod admin;
pub mod announce;
pub mod api;
pub mod config;
pub mod controller;
pub mod dataplane;
pub mod desired;
pub mod explain;
pub mod flowsync;
pub mod health;
pub mod iface;
pub mod maglev;
pub mod metrics;
pub mod neigh;
pub mod report;
pub mod sched;
pub mod stats;
pub mod status;
pub mod trace;

/// Cases of a fuzzing harness: `LB_FUZZ_CASES` when set (long runs), else `default` (CI).
#[cfg(test)]
pub(crate) fn fuzz_cases(default: u32) -> u32 {
    std::env::var("LB_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The compiled `lb_xdp` object, embedded at build time (empty if built without bpf-linker).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
