//! `lb backend enable|disable|drain <service> <address>`, `lb backend weight <service> <address> <weight>`.

use std::path::Path;

use hyper::Method;
use lb_userspace::api::{self, client};

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
    /// Print the backends of a service, one address per line (for scripts).
    List { service: String },
    /// Print one backend as `key=value` lines: state, admin, weight, effective_weight,
    /// health, active_connections, packets, bytes (for scripts).
    Show { service: String, address: String },
}

pub fn run(socket: &Path, cmd: Command) -> anyhow::Result<()> {
    let (service, address, action, body) = match cmd {
        Command::List { service } => return list(socket, &service),
        Command::Show { service, address } => return show(socket, &service, &address),
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

fn service(socket: &Path, name: &str) -> anyhow::Result<api::ServiceStatus> {
    let v = client::call(socket, Method::GET, "/v1/status", None)?;
    let status: api::Status = serde_json::from_value(v)?;
    let names: Vec<String> = status.services.iter().map(|s| s.name.clone()).collect();
    status
        .services
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "unknown service \"{name}\" (services: {})",
                names.join(", ")
            )
        })
}

fn list(socket: &Path, name: &str) -> anyhow::Result<()> {
    for b in service(socket, name)?.backends {
        println!("{}", b.address);
    }
    Ok(())
}

fn show(socket: &Path, name: &str, address: &str) -> anyhow::Result<()> {
    let svc = service(socket, name)?;
    let addr: std::net::IpAddr = address
        .parse()
        .map_err(|_| anyhow::anyhow!("`{address}` is not an IP address"))?;
    let b = svc
        .backends
        .iter()
        .find(|b| b.address == addr)
        .ok_or_else(|| anyhow::anyhow!("service \"{name}\" has no backend {addr}"))?;
    println!("service={name}");
    println!("address={}", b.address);
    println!("state={}", b.state);
    println!("mac={}", b.mac);
    println!("mac_source={}", b.mac_source);
    println!("admin={}", b.admin);
    println!("weight={}", b.weight_override.unwrap_or(b.config_weight));
    println!("effective_weight={}", b.effective_weight);
    if let Some(note) = &b.weight_note {
        println!("weight_note={note}");
    }
    println!("health={}", b.health);
    println!("health_reason={}", b.health_reason);
    println!("active_connections={}", b.active_connections);
    println!("unrecorded_flows_seconds={}", b.unrecorded_flows_seconds);
    println!("packets={}", b.traffic.packets);
    println!("bytes={}", b.traffic.bytes);
    Ok(())
}
