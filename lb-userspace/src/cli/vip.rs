//! `lb vip list`, `lb vip announce <service>`, `lb vip withdraw [--graceful] <service>`: the BGP
//! announcement of a service's VIP (`[announce]`; see the README, Running several nodes).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use hyper::Method;
use lb_userspace::{
    announce::{Route, VipStatus},
    api::client,
};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Each VIP: announced, draining or withdrawn, and why (`--json` for scripts).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Announce the service's VIP again (undo `withdraw`; health still decides).
    Announce { service: String },
    /// Stop announcing the service's VIP (persisted until `lb vip announce`). The data plane
    /// keeps forwarding the flows that still arrive.
    Withdraw {
        service: String,
        /// First announce the route less preferred (AS path prepended), wait until new flows
        /// stop arriving at this node, then withdraw.
        #[arg(long)]
        graceful: bool,
        /// With --graceful: return at once instead of waiting for the withdrawal.
        #[arg(long)]
        no_wait: bool,
        /// With --graceful: give up waiting after this many seconds (the drain goes on).
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn vips(socket: &Path) -> anyhow::Result<(Vec<VipStatus>, Option<String>)> {
    let v = client::call(socket, Method::GET, "/v1/vips", None)?;
    let list: Vec<VipStatus> = serde_json::from_value(v["vips"].clone())?;
    Ok((list, v["bird_error"].as_str().map(str::to_owned)))
}

pub fn run(socket: &Path, cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::List { json } => {
            let (list, bird_error) = vips(socket)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"vips": list, "bird_error": bird_error})
                );
                return Ok(());
            }
            println!(
                "{:<40} {:<10} {:<24} REASON",
                "VIP", "ROUTE", "SERVICES (healthy/min)"
            );
            for s in &list {
                let svcs: Vec<String> = s
                    .services
                    .iter()
                    .map(|h| format!("{} {}/{}", h.name, h.healthy, h.min_healthy))
                    .collect();
                println!(
                    "{:<40} {:<10} {:<24} {}",
                    s.vip.to_string(),
                    s.route.to_string(),
                    svcs.join(", "),
                    s.reason
                );
                if let Some(d) = &s.drain {
                    println!(
                        "{:<40} last drain: last new flow {} ms after the prepend, {} new flows while draining{}",
                        "",
                        d.last_new_flow_ms,
                        d.new_flows,
                        d.withdrawn_ms
                            .map(|w| format!(", withdrawn after {w} ms"))
                            .unwrap_or_default()
                    );
                }
            }
            if let Some(e) = bird_error {
                println!("BIRD not updated: {e}");
            }
            Ok(())
        }
        Command::Announce { service } => {
            let v = client::call(
                socket,
                Method::POST,
                &format!("/v1/vips/{}/announce", encode(&service)),
                None,
            )?;
            println!("{}", v["message"].as_str().unwrap_or("ok"));
            Ok(())
        }
        Command::Withdraw {
            service,
            graceful,
            no_wait,
            timeout,
        } => {
            let v = client::call(
                socket,
                Method::POST,
                &format!("/v1/vips/{}/withdraw", encode(&service)),
                Some(serde_json::json!({ "graceful": graceful })),
            )?;
            println!("{}", v["message"].as_str().unwrap_or("ok"));
            if !graceful || no_wait || v["route"].as_str() != Some("draining") {
                return Ok(());
            }
            let vip: std::net::IpAddr = serde_json::from_value(v["vip"].clone())?;
            let until = Instant::now() + Duration::from_secs(timeout);
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let (list, _) = vips(socket)?;
                let Some(s) = list.into_iter().find(|s| s.vip == vip) else {
                    anyhow::bail!("VIP {vip} is no longer configured");
                };
                if s.route != Route::Draining {
                    match s.drain {
                        Some(d) => println!(
                            "VIP {vip} {}: the last new flow arrived {} ms after the route was made less \
                             preferred ({} new flows meanwhile); withdrawn after {} ms{}",
                            s.route,
                            d.last_new_flow_ms,
                            d.new_flows,
                            d.withdrawn_ms.unwrap_or(0),
                            if d.timed_out {
                                " (drain_timeout_ms reached)"
                            } else {
                                ""
                            }
                        ),
                        None => println!("VIP {vip} {}: {}", s.route, s.reason),
                    }
                    return Ok(());
                }
                if Instant::now() >= until {
                    anyhow::bail!(
                        "VIP {vip} still draining after {timeout} s (it goes on; follow with `lb vip list`)"
                    );
                }
            }
        }
    }
}
