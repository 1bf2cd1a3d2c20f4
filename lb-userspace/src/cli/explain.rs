//! `lb explain <tcp|udp> <client> <client-port> <vip> <port> [--json]`: which backend this flow
//! has (connection table) or would get (the kernel's rules over the live maps), and why.

use std::{fmt::Write as _, path::Path};

use hyper::Method;
use lb_userspace::api::{self, client, server::explain_query};

#[derive(clap::Args)]
pub struct Args {
    /// tcp or udp.
    protocol: String,
    /// The client's address (the packet's source).
    client: String,
    /// The client's port.
    client_port: String,
    /// The VIP (the packet's destination).
    vip: String,
    /// The service port.
    port: String,
    /// Print the raw JSON of the control API.
    #[arg(long)]
    json: bool,
}

pub fn run(socket: &Path, a: Args) -> anyhow::Result<()> {
    // Checked here first: a typo is reported even when lb is not running.
    let q = explain_query(&a.protocol, &a.client, &a.client_port, &a.vip, &a.port)
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let path = format!(
        "/v1/explain/{}/{}/{}/{}/{}",
        q.protocol, q.client, q.client_port, q.vip, q.port
    );
    let v = client::call(socket, Method::GET, &path, None)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let e: api::Explain = serde_json::from_value(v)?;
    print!("{}", render(&e));
    Ok(())
}

fn endpoint(a: std::net::IpAddr, p: u16) -> String {
    match a {
        std::net::IpAddr::V4(_) => format!("{a}:{p}"),
        std::net::IpAddr::V6(_) => format!("[{a}]:{p}"),
    }
}

pub fn render(e: &api::Explain) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "{} {} → {}",
        e.protocol,
        endpoint(e.client, e.client_port),
        endpoint(e.vip, e.port)
    );
    match (&e.service, &e.scheduler) {
        (Some(s), Some(sch)) => {
            let _ = writeln!(o, ": service {s} ({sch})");
        }
        _ => {
            let _ = writeln!(o, ": no service");
        }
    }
    match e.backend {
        Some(b) if e.verdict == "forward" => {
            let _ = writeln!(
                o,
                "  {}: forward to {b} ({}, MAC {})",
                e.outcome,
                e.backend_state.as_deref().unwrap_or("?"),
                e.mac.as_deref().unwrap_or("?")
            );
        }
        _ => {
            let _ = writeln!(o, "  {}: {}", e.outcome, e.verdict);
        }
    }
    let _ = writeln!(o, "  why: {}", e.reason);
    if let Some(c) = &e.connection {
        let _ = writeln!(
            o,
            "  connection table: backend id {}, idle {:.0} s, {}{}",
            c.backend_id,
            c.idle_seconds,
            if c.counted {
                "counted as active"
            } else {
                "not counted"
            },
            if c.client_closed {
                ", client closed (FIN/RST)"
            } else {
                ""
            }
        );
    }
    o
}
