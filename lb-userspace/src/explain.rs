//! `lb explain`: which backend a flow has (connection table) or would get (the kernel's rules
//! over the live maps), and why. The same lookups in the same order as `lb_xdp`:
//! service (exact port, then an all-ports service), connection table (valid while its backend
//! is active with the same generation), then the service's scheduler (same hash code).

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    BACKEND_F_ACTIVE, FLAG_ALL_PORTS_SERVICES, FLOW_F_CLOSED, FLOW_F_COUNTED, FlowKey, FlowValue,
    NO_BACKEND, SCHED_LC, SCHED_SH, SCHED_WLC, SCHED_WRR, ServiceKey,
    hash::{flow_hash, source_hash},
    rules::addr_key,
};

use crate::{
    api,
    config::Protocol,
    desired::{BackendId, DesiredService, DesiredState},
};

/// The flow asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    pub protocol: Protocol,
    pub client: IpAddr,
    pub client_port: u16,
    pub vip: IpAddr,
    pub port: u16,
}

impl Query {
    /// The connection table key the data plane builds from such a packet.
    pub fn key(&self) -> FlowKey {
        let (src, family) = addr_key(self.client);
        let (dst, _) = addr_key(self.vip);
        FlowKey {
            src_addr: src,
            dst_addr: dst,
            src_port: self.client_port.to_be_bytes(),
            dst_port: self.port.to_be_bytes(),
            protocol: self.protocol.number(),
            family,
            _pad: [0; 2],
        }
    }
}

/// What the live maps say, read for one explanation.
pub trait Live {
    fn flow(&mut self, key: &FlowKey) -> Option<FlowValue>;
    /// Slot `slot` of the service's table (`LB_RING[ring_base + slot]`), as stored (flags and
    /// all: see [`lb_common::ring_id`]).
    fn ring(&mut self, svc: &lb_common::ServiceValue, slot: u32) -> u32;
    /// `LB_RR_CURSOR[service_id]`: the position the next new flow of the service takes.
    fn rr_cursor(&mut self, service_id: u32) -> u64;
}

/// Explains `q` against the desired state (what the maps hold after the last apply), the live
/// maps and the active-connection counts.
pub fn explain(
    desired: &DesiredState,
    active: &BTreeMap<BackendId, u64>,
    live: &mut dyn Live,
    q: &Query,
    now_ns: u64,
) -> api::Explain {
    let key = q.key();
    let mut out = api::Explain {
        protocol: q.protocol.to_string(),
        client: q.client,
        client_port: q.client_port,
        vip: q.vip,
        port: q.port,
        service: None,
        scheduler: None,
        outcome: "no_service".into(),
        verdict: "pass".into(),
        backend: None,
        backend_state: None,
        mac: None,
        reason: String::new(),
        connection: None,
    };
    let Some(svc) = service_for(desired, &key) else {
        out.reason = format!(
            "no service on {} {}:{} (nor an all-ports one): lb_xdp passes it to the kernel's stack",
            q.protocol, q.vip, q.port
        );
        return out;
    };
    out.service = Some(svc.name.clone());
    out.scheduler = Some(scheduler_name(svc.value.scheduler).to_owned());
    let usable = |id: u32| {
        desired
            .backends
            .get(&BackendId(id))
            .filter(|b| b.flags & BACKEND_F_ACTIVE != 0)
    };
    let describe = |out: &mut api::Explain, id: u32| {
        if let Some(info) = desired.backend_info.get(&BackendId(id)) {
            out.backend = Some(info.address);
            out.backend_state = Some(info.decision.state.to_string());
        }
        if let Some(b) = desired.backends.get(&BackendId(id)) {
            out.mac = Some(crate::config::Mac(b.mac).to_string());
        }
    };
    let mut moved_from = None;
    if let Some(flow) = live.flow(&key) {
        let age_s = now_ns.saturating_sub(flow.last_seen_ns) as f64 / 1e9;
        out.connection = Some(api::ExplainConnection {
            backend_id: flow.backend,
            idle_seconds: age_s,
            counted: flow.flags & FLOW_F_COUNTED != 0,
            client_closed: flow.flags & FLOW_F_CLOSED != 0,
        });
        match usable(flow.backend) {
            Some(b) if b.generation == flow.generation => {
                describe(&mut out, flow.backend);
                out.outcome = "hit".into();
                out.verdict = "forward".into();
                let state = out.backend_state.clone().unwrap_or_default();
                out.reason = format!(
                    "connection table: this flow is on {} (last packet {age_s:.0} s ago){}",
                    out.backend.map(|a| a.to_string()).unwrap_or_default(),
                    if state == "draining" {
                        "; the backend is draining: it keeps its flows and takes no new ones"
                    } else {
                        ""
                    }
                );
                return out;
            }
            _ => {
                let why = desired
                    .backend_info
                    .get(&BackendId(flow.backend))
                    .map(|i| {
                        format!(
                            "{} is {}{}",
                            i.address,
                            i.decision.state,
                            if i.decision.reason.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", i.decision.reason)
                            }
                        )
                    })
                    .unwrap_or_else(|| "its backend was removed".to_owned());
                moved_from = Some(why);
            }
        }
    }
    let (id, how) = schedule(desired, svc, active, live, &key);
    let pick = (id != NO_BACKEND)
        .then_some(id)
        .filter(|i| usable(*i).is_some());
    match pick {
        Some(id) => {
            describe(&mut out, id);
            out.verdict = "forward".into();
            let to = out.backend.map(|a| a.to_string()).unwrap_or_default();
            match moved_from {
                Some(why) => {
                    out.outcome = "rescheduled".into();
                    out.reason = format!(
                        "connection table: {why}, so its next packet is scheduled again: {how} → {to}"
                    );
                }
                None => {
                    out.outcome = "new".into();
                    out.reason = format!("not in the connection table: a new flow, {how} → {to}");
                }
            }
        }
        None => {
            out.outcome = "no_backend".into();
            out.verdict = "drop".into();
            let states: Vec<String> = svc
                .backends
                .iter()
                .filter_map(|b| desired.backend_info.get(b))
                .map(|i| format!("{} {}", i.address, i.decision.state))
                .collect();
            out.reason = format!(
                "service {} has no usable backend ({}): lb_xdp drops it",
                svc.name,
                if states.is_empty() {
                    "none configured".to_owned()
                } else {
                    states.join(", ")
                }
            );
        }
    }
    out
}

/// The service `lb_xdp` finds: the exact (vip, port, protocol), else the VIP's all-ports one.
fn service_for<'a>(desired: &'a DesiredState, key: &FlowKey) -> Option<&'a DesiredService> {
    let mut k = ServiceKey {
        vip: key.dst_addr,
        port: key.dst_port,
        protocol: key.protocol,
        family: key.family,
    };
    if let Some(s) = desired.services.iter().find(|s| s.key == k) {
        return Some(s);
    }
    if desired.flags & FLAG_ALL_PORTS_SERVICES == 0 {
        return None;
    }
    k.port = [0, 0];
    desired.services.iter().find(|s| s.key == k)
}

fn scheduler_name(s: u32) -> &'static str {
    match s {
        SCHED_SH => "sh",
        SCHED_WRR => "rr/wrr",
        SCHED_LC => "lc",
        SCHED_WLC => "wlc",
        _ => "maglev",
    }
}

/// The scheduler's answer for a new flow and how it got there.
fn schedule(
    desired: &DesiredState,
    svc: &DesiredService,
    active: &BTreeMap<BackendId, u64>,
    live: &mut dyn Live,
    key: &FlowKey,
) -> (u32, String) {
    let _ = desired;
    let ring = svc.value.ring_size;
    let id = svc.value.id;
    let entry = |live: &mut dyn Live, slot: u32| {
        lb_common::ring_id(live.ring(&svc.value, slot)).unwrap_or(NO_BACKEND)
    };
    // maglev/sh: what the slot says beyond its backend.
    let udp = key.protocol == lb_common::PROTO_UDP;
    let on_change = !udp && svc.value.flags & lb_common::SVC_F_TCP_ON_CHANGE != 0;
    let slot_note = |v: u32| match lb_common::ring_prev(v) {
        Some(p) if udp => format!(
            "; the slot changed from backend #{p}: a UDP flow without an entry goes back there \
             while it is usable (a new one cannot be told from one of before the change) and is \
             recorded there"
        ),
        Some(p) if on_change => format!(
            "; the slot changed from backend #{p}: a packet without an entry that is not a SYN \
             goes back there while it is usable and is recorded there (record_connections = \
             on_change: connections of the unchanged slot were not recorded), a new connection \
             comes here"
        ),
        Some(p) => format!(
            "; the slot changed from backend #{p}: a packet without an entry that is not a SYN \
             goes back there while it is usable, a new connection comes here"
        ),
        None if v != NO_BACKEND && v & lb_common::RING_DIRTY == 0 => if udp {
            "; an unchanged slot: its UDP flows are not recorded"
        } else if on_change {
            "; an unchanged slot: its connections are not recorded (record_connections = on_change)"
        } else {
            "; an unchanged slot: established packets skip the connection table (SYNs are \
             recorded, up to dataplane.record_limit a second per CPU when one is set; by the \
             controller with dataplane.defer_records)"
        }
        .to_owned(),
        None => String::new(),
    };
    match svc.value.scheduler {
        SCHED_SH => {
            let slot = lb_common::hash::reduce(source_hash(key), ring);
            let v = live.ring(&svc.value, slot);
            (
                lb_common::ring_id(v).unwrap_or(NO_BACKEND),
                format!("sh: source hash → slot {slot} of {ring}{}", slot_note(v)),
            )
        }
        SCHED_WRR => {
            let n = svc.value.ring_len;
            if n == 0 {
                return (NO_BACKEND, "rr/wrr: empty sequence".into());
            }
            let c = live.rr_cursor(id);
            let pos = (c % n as u64) as u32;
            (
                entry(live, pos),
                format!(
                    "rr/wrr: the next new flow of the service takes position {pos} of the {n}-long sequence (if no other new flow comes first)"
                ),
            )
        }
        SCHED_LC | SCHED_WLC => {
            let weighted = svc.value.scheduler == SCHED_WLC;
            let mut ids = Vec::new();
            let mut cands = Vec::new();
            for slot in 0..svc.value.ring_len {
                let b = entry(live, slot);
                let w = desired
                    .backends
                    .get(&BackendId(b))
                    .filter(|v| v.flags & BACKEND_F_ACTIVE != 0)
                    .map_or(0, |v| v.weight);
                ids.push(b);
                cands.push((active.get(&BackendId(b)).copied().unwrap_or(0), w));
            }
            match crate::sched::least_connections(&cands, weighted) {
                Some(i) => (
                    ids[i],
                    format!(
                        "{}: fewest active connections{} ({} of {} backends' counts)",
                        if weighted { "wlc" } else { "lc" },
                        if weighted { " per weight" } else { "" },
                        cands[i].0,
                        ids.len()
                    ),
                ),
                None => (NO_BACKEND, "lc/wlc: no backend takes new flows".into()),
            }
        }
        _ => {
            let slot = lb_common::hash::reduce(flow_hash(key), ring);
            let v = live.ring(&svc.value, slot);
            (
                lb_common::ring_id(v).unwrap_or(NO_BACKEND),
                format!(
                    "maglev: 5-tuple hash → slot {slot} of {ring}{}",
                    slot_note(v)
                ),
            )
        }
    }
}
