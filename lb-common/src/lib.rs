//! Types, map names, limits and the flow hash shared by the XDP program (`lb-ebpf`) and the
//! controller (`lb-userspace`).
//!
//! Every map key and value here is `#[repr(C)]`, built only from integers and byte arrays, with
//! explicit padding fields, so its layout is the same on both sides (checked at compile time).
//! Multi-byte fields are **host (little-endian) order** unless the field's doc says "network
//! order"; addresses and ports copied straight out of packets stay in network order.
#![no_std]

pub mod hash;
pub mod limits;
pub mod names;
pub mod packed;
pub mod rules;
pub mod stats;
pub mod svc_cache;
pub mod types;

pub use types::*;
