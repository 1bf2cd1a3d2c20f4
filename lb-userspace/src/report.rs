//! Human-readable counter reports.

use std::fmt::Write as _;

use crate::{desired::DesiredState, stats::Snapshot};
use lb_common::stats::Stat;

pub fn render(desired: &DesiredState, snap: &Snapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:>12} {:>14} {:>10}",
        "service/backend", "packets", "bytes", "new_flows"
    );
    for s in &desired.services {
        let c = snap.services.get(&s.value.id).copied().unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<24} {:>12} {:>14} {:>10}",
            s.name, c.packets, c.bytes, c.new_flows
        );
        for id in &s.backends {
            let c = snap.backends.get(&id.0).copied().unwrap_or_default();
            let addr = desired
                .backend_info
                .get(id)
                .map(|i| i.address.to_string())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {:<22} {:>12} {:>14} {:>10}",
                addr, c.packets, c.bytes, c.new_flows
            );
        }
    }
    let nonzero: Vec<String> = Stat::ALL
        .iter()
        .map(|s| (s.name(), snap.get(*s)))
        .chain(crate::status::extra_counters(snap))
        .filter(|(_, v)| *v != 0)
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    let _ = writeln!(
        out,
        "counters: {}",
        if nonzero.is_empty() {
            "all zero".to_owned()
        } else {
            nonzero.join(" ")
        }
    );
    out
}
