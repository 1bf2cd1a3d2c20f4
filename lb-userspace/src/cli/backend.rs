//! `lb backend enable|disable|drain <service> <address>`, `lb backend weight <service> <address> <weight>`.

use std::path::Path;

use hyper::Method;
use lb_userspace::client;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Take new flows again (undo disable/drain).
    Enable { service: String, address: String },
    /// No new flows, and existing flows move to other backends at their next packet.
    Disable { service: String, address: String },
    /// No new flows; existing flows stay until they end.
    Drain { service: String, address: String },
    /// Set the weight (0..=65535), overriding the config file; persisted.
    Weight {
        service: String,
        address: String,
        weight: u16,
    },
}

pub fn run(socket: &Path, cmd: Command) -> anyhow::Result<()> {
    let (service, address, action, body) = match cmd {
        Command::Enable { service, address } => (service, address, "enable", None),
        Command::Disable { service, address } => (service, address, "disable", None),
        Command::Drain { service, address } => (service, address, "drain", None),
        Command::Weight {
            service,
            address,
            weight,
        } => (
            service,
            address,
            "weight",
            Some(serde_json::json!({ "weight": weight })),
        ),
    };
    let path = format!(
        "/v1/backends/{}/{}/{action}",
        encode(&service),
        encode(&address)
    );
    let v = client::call(socket, Method::POST, &path, body)?;
    println!("{}", v["message"].as_str().unwrap_or("ok"));
    Ok(())
}

/// Percent-encodes a path segment (service names are [A-Za-z0-9._-]; IPv6 has ':').
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
