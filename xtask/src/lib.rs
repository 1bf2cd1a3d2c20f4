//! Support code for `cargo xtask`: the network-namespace lab, its backend server and client,
//! and small process helpers. Used by the xtask binary and by the lab tests.

pub mod cluster;
pub mod cmd;
pub mod lab;
pub mod labnet;
pub mod upgrade;
