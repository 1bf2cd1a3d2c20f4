//! `lb status [--json]`: services and backends with state, weight, health, connections, traffic.

use std::{fmt::Write as _, path::Path};

use hyper::Method;
use lb_userspace::api::{self, client};

#[derive(clap::Args)]
pub struct Args {
    /// Print the raw JSON of the control API.
    #[arg(long)]
    json: bool,
}

pub fn run(socket: &Path, args: Args) -> anyhow::Result<()> {
    let v = client::call(socket, Method::GET, "/v1/status", None)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s: api::Status = serde_json::from_value(v)?;
    print!("{}", render(&s));
    Ok(())
}

fn rate(bps: f64) -> String {
    match bps {
        b if b >= 1e9 => format!("{:.1}G", b / 1e9),
        b if b >= 1e6 => format!("{:.1}M", b / 1e6),
        b if b >= 1e3 => format!("{:.1}k", b / 1e3),
        b => format!("{b:.0}"),
    }
}

pub fn render(s: &api::Status) -> String {
    let mut o = String::new();
    let up = s.uptime_seconds;
    let _ = writeln!(
        o,
        "lb on {} ({} XDP), up {}h{:02}m{:02}s — config {}, admin state {}",
        s.interface,
        s.xdp_mode,
        up / 3600,
        up / 60 % 60,
        up % 60,
        s.config,
        s.state_file
    );
    if !s.pin_path.is_empty() {
        let _ = writeln!(
            o,
            "data plane pinned at {}{}",
            s.pin_path,
            if s.adopted {
                " (taken over from an earlier lb run: program replaced in place)"
            } else {
                ""
            }
        );
    }
    match s.record_limit {
        Some(0) => {
            let _ = writeln!(
                o,
                "record limit: none (every SYN of an at_syn service recorded)"
            );
        }
        Some(n) => {
            let limited = s
                .counters
                .iter()
                .find(|(k, _)| k == lb_userspace::status::RECORD_LIMITED)
                .map_or(0, |(_, v)| *v);
            let _ = writeln!(
                o,
                "record limit: {n} SYNs a second per CPU through unchanged slots ({limited} beyond it forwarded by their slot since the program was loaded)"
            );
        }
        None => {}
    }
    if let Some(on) = s.defer_records {
        let c = |name: &str| {
            s.counters
                .iter()
                .find(|(k, _)| k == name)
                .map_or(0, |(_, v)| *v)
        };
        let _ = if on {
            writeln!(
                o,
                "SYN records: by the controller (dataplane.defer_records): {} handed over and {} recorded here for a full LB_RECORD since the program was loaded; {} entries made since lb started",
                c(lb_userspace::status::RECORD_DEFERRED),
                c(lb_userspace::status::RECORD_RING_FULL),
                c(lb_userspace::status::RECORD_INSERTED)
            )
        } else {
            writeln!(
                o,
                "SYN records: on the packet path (dataplane.defer_records = false)"
            )
        };
    }
    for svc in &s.services {
        let t = &svc.traffic;
        let _ = writeln!(
            o,
            "\nservice {} {}:{}/{} ({}, ring_digest {}{}): {} pkt/s {} bit/s, {} packets, {} new flows",
            svc.name,
            svc.vip,
            svc.port,
            svc.protocol,
            svc.scheduler,
            svc.ring_digest,
            if svc.changed_slots > 0 {
                format!(", {} changed slots", svc.changed_slots)
            } else {
                String::new()
            } + if svc.record_connections == "on_change" {
                ", connections recorded on change"
            } else {
                ""
            },
            rate(t.packets_per_second),
            rate(t.bits_per_second),
            t.packets,
            t.new_flows
        );
        let _ = writeln!(
            o,
            "  {:<26} {:<9} {:>7} {:<8} {:>7} {:>8} {:>8} {:>11} {:>9}",
            "backend",
            "state",
            "weight",
            "health",
            "active",
            "pkt/s",
            "bit/s",
            "packets",
            "new_flows"
        );
        for b in &svc.backends {
            let weight = match b.weight_override {
                Some(w) => format!("{w}*"),
                None => b.config_weight.to_string(),
            };
            let _ = writeln!(
                o,
                "  {:<26} {:<9} {:>7} {:<8} {:>7} {:>8} {:>8} {:>11} {:>9}",
                b.address,
                b.state,
                weight,
                b.health,
                b.active_connections,
                rate(b.traffic.packets_per_second),
                rate(b.traffic.bits_per_second),
                b.traffic.packets,
                b.traffic.new_flows
            );
        }
    }
    for svc in &s.services {
        for b in svc.backends.iter().filter(|b| b.health == "down") {
            let _ = writeln!(
                o,
                "\n{} {} is down for {:.0} s: {}",
                svc.name, b.address, b.health_since_seconds, b.health_reason
            );
        }
    }
    for svc in &s.services {
        for b in &svc.backends {
            if let Some(note) = &b.weight_note {
                let _ = writeln!(o, "\n{} {}: {note}", svc.name, b.address);
            }
        }
    }
    for v in s.vips.iter().flatten() {
        let _ = writeln!(o, "\nVIP {} {} over BGP: {}", v.vip, v.route, v.reason);
    }
    if let Some(f) = &s.flow_sync {
        let _ = writeln!(
            o,
            "\nflow sharing: {} flows sent ({} datagrams, {} send errors); {} received: {} inserted, {} present already, {} unknown here, {} dropped; {} datagrams refused",
            f.sent,
            f.datagrams_sent,
            f.send_errors,
            f.received,
            f.inserted,
            f.existing,
            f.unknown,
            f.dropped,
            f.rejected
        );
    }
    let nonzero: Vec<String> = s
        .counters
        .iter()
        .filter(|(_, v)| *v != 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(
        o,
        "\ncounters: {}",
        if nonzero.is_empty() {
            "all zero".into()
        } else {
            nonzero.join(" ")
        }
    );
    if s.services
        .iter()
        .flat_map(|x| &x.backends)
        .any(|b| b.weight_override.is_some())
    {
        let _ = writeln!(
            o,
            "* weight set with `lb backend weight` (overrides the config file until its weight for that backend changes)"
        );
    }
    o
}
