//! The one report builder: `lb status` (and what later views read) from the desired state, the
//! health table, the counters and their rates.

use std::{collections::BTreeMap, path::Path, time::Instant};

use lb_common::{Counters, stats::Stat};

use crate::{
    api,
    config::Config,
    desired::{BackendId, DesiredState, MacInput},
    health::Health,
    stats::Snapshot,
};

/// What the controller knows, borrowed for one report.
pub struct View<'a> {
    pub cfg: &'a Config,
    pub config_path: &'a Path,
    pub desired: &'a DesiredState,
    pub health: &'a crate::desired::IdMap<Health>,
    pub weight_notes: &'a BTreeMap<BackendId, String>,
    /// Active connections by backend (none: left out).
    pub active: BTreeMap<BackendId, u64>,
    /// Bits a slot in the packed copy of each service's table, by service id (0: not packed).
    pub packed: BTreeMap<u32, u32>,
    /// The program hands "at_syn" SYNs to the controller (`dataplane.defer_records`).
    pub defer_records: bool,
}

/// Two counter samples for rates: the latest and the one before.
pub struct Samples<'a> {
    pub now: (Instant, &'a Snapshot),
    pub before: Option<(Instant, &'a Snapshot)>,
}

/// Everything else the report shows about the process.
pub struct Process<'a> {
    pub xdp_mode: &'a str,
    /// Took over a pinned data plane.
    pub adopted: bool,
    pub started: Instant,
    pub flow_entries: u64,
    pub flows_expired: u64,
    pub connections_uncounted: u64,
}

/// The counter of SYNs kept out of the connection table by `dataplane.record_limit`, beside
/// the `LB_STATS` counters in `lb status` and the metrics (`lb_flow_events_total{event="record_limited"}`).
/// It counts from the program's load (each loaded program keeps its own).
pub const RECORD_LIMITED: &str = "flow_record_limited";
/// SYNs handed to the controller through `LB_RECORD` (`dataplane.defer_records`), counted from
/// the program's load like [`RECORD_LIMITED`].
pub const RECORD_DEFERRED: &str = "flow_record_deferred";
/// SYNs the program recorded itself because `LB_RECORD` was full, from the program's load.
pub const RECORD_RING_FULL: &str = "flow_record_ring_full";
/// Connection-table entries the controller made from `LB_RECORD` since `lb run` started.
pub const RECORD_INSERTED: &str = "flow_record_inserted";

/// The counters beside `LB_STATS`'s in `lb status`, the report and the metrics.
pub fn extra_counters(s: &crate::stats::Snapshot) -> [(&'static str, u64); 4] {
    [
        (RECORD_LIMITED, s.record_limited),
        (RECORD_DEFERRED, s.record_deferred),
        (RECORD_RING_FULL, s.record_ring_full),
        (RECORD_INSERTED, s.record_inserted),
    ]
}

pub fn build(v: &View<'_>, samples: &Samples<'_>, p: &Process<'_>) -> api::Status {
    let (t1, s1) = samples.now;
    let rate = |now: &Counters, before: Option<&Counters>| -> api::Traffic {
        let (pps, bps, nps) = match (before, samples.before) {
            (Some(b), Some((t0, _))) => {
                let dt = t1.duration_since(t0).as_secs_f64().max(1e-3);
                (
                    now.packets.saturating_sub(b.packets) as f64 / dt,
                    8.0 * now.bytes.saturating_sub(b.bytes) as f64 / dt,
                    now.new_flows.saturating_sub(b.new_flows) as f64 / dt,
                )
            }
            _ => (0.0, 0.0, 0.0),
        };
        api::Traffic {
            packets: now.packets,
            bytes: now.bytes,
            new_flows: now.new_flows,
            packets_per_second: pps,
            bits_per_second: bps,
            new_flows_per_second: nps,
        }
    };
    let mut services = Vec::new();
    let now_ns = crate::controller::clock_ns();
    for (ds, cs) in v.desired.services.iter().zip(&v.cfg.services) {
        let id = ds.value.id;
        let unrecorded = ds.unrecorded_flows_seconds(now_ns);
        let now = s1.services.get(&id).copied().unwrap_or_default();
        let before = samples.before.and_then(|(_, p)| p.services.get(&id));
        let mut backends = Vec::new();
        for bid in &ds.backends {
            let info = &v.desired.backend_info[bid];
            let now = s1.backends.get(&bid.0).copied().unwrap_or_default();
            let before = samples.before.and_then(|(_, p)| p.backends.get(&bid.0));
            let (mac, mac_source) = match &info.mac {
                MacInput::Config(m) => (m.to_string(), "config"),
                MacInput::Resolved { mac, .. } => (mac.to_string(), "neighbour"),
                MacInput::Unresolved(_) => ("unresolved".to_owned(), "unresolved"),
            };
            let h = v.health.get(bid);
            let unresolved = matches!(info.mac, MacInput::Unresolved(_));
            backends.push(api::BackendStatus {
                address: info.address,
                mac,
                mac_source: mac_source.to_owned(),
                state: info.decision.state.to_string(),
                admin: info.admin,
                config_weight: info.config_weight,
                weight_override: info.weight_override,
                weight_note: v.weight_notes.get(bid).cloned(),
                effective_weight: info.decision.effective_weight,
                health: match h {
                    _ if unresolved => "down".to_owned(),
                    None => "none".to_owned(),
                    Some(h) if h.up => "up".to_owned(),
                    Some(_) => "down".to_owned(),
                },
                health_reason: if unresolved {
                    info.decision.reason.clone()
                } else {
                    h.map(|h| h.reason.clone()).unwrap_or_default()
                },
                health_since_seconds: h.map_or(0.0, |h| h.since.elapsed().as_secs_f64()),
                health_transitions: h.map_or(0, |h| h.transitions),
                active_connections: v.active.get(bid).copied().unwrap_or(0),
                unrecorded_flows_seconds: unrecorded.get(&bid.0).copied().unwrap_or(0),
                traffic: rate(&now, before),
            });
        }
        services.push(api::ServiceStatus {
            name: ds.name.clone(),
            vip: cs.vip,
            port: cs.port,
            protocol: cs.protocol.to_string(),
            scheduler: cs.scheduler.name().to_owned(),
            ring_digest: format!("{:016x}", ds.ring_digest()),
            changed_slots: ds.dirty.len() as u64,
            ring_size: ds.value.ring_size,
            packed_bits: v.packed.get(&ds.value.id).copied().unwrap_or(0),
            record_connections: cs.record_connections.name().to_owned(),
            traffic: rate(&now, before),
            backends,
        });
    }
    api::Status {
        interface: v.cfg.dataplane.interface.clone(),
        xdp_mode: p.xdp_mode.to_owned(),
        uptime_seconds: p.started.elapsed().as_secs(),
        config: v.config_path.display().to_string(),
        state_file: v.cfg.control.state_file.display().to_string(),
        pin_path: v.cfg.dataplane.pin_path.display().to_string(),
        adopted: p.adopted,
        services,
        flow_entries: p.flow_entries,
        flows_expired: p.flows_expired,
        connections_uncounted: p.connections_uncounted,
        counters: Stat::ALL
            .iter()
            .map(|s| (s.name().to_owned(), s1.get(*s)))
            .chain(extra_counters(s1).map(|(n, v)| (n.to_owned(), v)))
            .collect(),
        record_limit: Some(v.cfg.dataplane.record_limit),
        defer_records: Some(v.defer_records),
        vips: None,
        flow_sync: None,
    }
}
