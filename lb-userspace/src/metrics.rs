//! Prometheus metrics (OpenMetrics text), served on `[control] metrics` at `GET /metrics`.
//!
//! Every scrape is built from one fresh read of the data plane's counters and the controller's
//! report ([`crate::status::build`], the same one `lb status` shows), plus what only the
//! controller accumulates ([`Telemetry`]: health check durations, reloads). Names follow the
//! Prometheus conventions: counters end in `_total`, units in the name (`_bytes`, `_seconds`).

use std::sync::atomic::{AtomicU64, Ordering};

use lb_common::LAYOUT_VERSION;
use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet, text::encode},
    metrics::{
        MetricType, TypedMetric, counter::Counter, family::Family, gauge::Gauge, info::Info,
    },
    registry::Registry,
};

use crate::api;

type Labels = Vec<(String, String)>;

/// Buckets of `lb_health_check_duration_seconds`: 0.5 ms … 8 s.
const DURATION_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 8.0,
];

/// A histogram of check durations over [`DURATION_BUCKETS`] (and +Inf), encoded as
/// prometheus-client's own `Histogram` is, kept as plain counters in one allocation (two cache
/// lines): with 10 000 backends checked every second, each observation of a `Histogram` (a
/// lock, and a bucket list of its own to scan) was a fifth of the controller's time in `lb run`.
#[derive(Clone, Debug, Default)]
pub struct Durations(std::sync::Arc<DurationCounts>);

#[derive(Debug, Default)]
#[repr(align(64))]
struct DurationCounts {
    /// Observations per bucket (not cumulative), the last one +Inf.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    count: AtomicU64,
    /// Their sum in nanoseconds.
    sum_ns: AtomicU64,
}

impl Durations {
    /// One observation of `seconds`, in the first bucket whose bound is at least it.
    pub fn observe(&self, seconds: f64) {
        let i = DURATION_BUCKETS
            .iter()
            .take_while(|b| **b < seconds)
            .count();
        let c = &self.0;
        c.buckets[i].fetch_add(1, Ordering::Relaxed);
        c.count.fetch_add(1, Ordering::Relaxed);
        c.sum_ns
            .fetch_add((seconds.max(0.0) * 1e9) as u64, Ordering::Relaxed);
    }
}

impl TypedMetric for Durations {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Durations {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        let buckets: Vec<(f64, u64)> = DURATION_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(c.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let sum = c.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, c.count.load(Ordering::Relaxed), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Each backend's health-check histograms, by backend id: [failed, passed]. Ids name other
/// backends after a reload, which therefore forgets them all.
type CheckSeries = Vec<[Option<Durations>; 2]>;

/// What the controller accumulates for the metrics over its life.
#[derive(Clone, Default)]
pub struct Telemetry {
    health_duration: Family<Labels, Durations>,
    reloads: Family<Labels, Counter>,
    /// The series each backend's checks go to, found once (10 000 backends checked every
    /// second made the label lookup, with its seven strings, a measurable cost).
    series: std::sync::Arc<std::sync::Mutex<CheckSeries>>,
}

impl Telemetry {
    /// One finished health check of backend `id`; `labels` gives its service and address
    /// (asked only the first time after a start or reload).
    pub fn check(
        &self,
        id: u32,
        ok: bool,
        seconds: f64,
        labels: impl FnOnce() -> Option<(String, std::net::IpAddr)>,
    ) {
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let i = id as usize;
        if let Some(h) = series.get(i).and_then(|s| s[ok as usize].as_ref()) {
            h.observe(seconds);
            return;
        }
        let Some((service, backend)) = labels() else {
            return;
        };
        let h = self
            .health_duration
            .get_or_create(&vec![
                ("service".to_owned(), service),
                ("backend".to_owned(), backend.to_string()),
                (
                    "result".to_owned(),
                    if ok { "success" } else { "failure" }.to_owned(),
                ),
            ])
            .clone();
        h.observe(seconds);
        if series.len() <= i {
            series.resize_with(i + 1, Default::default);
        }
        series[i][ok as usize] = Some(h);
    }

    /// A config reload (SIGHUP, `lb reload`), applied or rejected.
    pub fn reload(&self, ok: bool) {
        if ok {
            // Backend ids may name other backends now: their series are found again.
            self.series
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
        self.reloads
            .get_or_create(&vec![(
                "result".to_owned(),
                if ok { "applied" } else { "rejected" }.to_owned(),
            )])
            .inc();
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn set(c: &Counter, v: u64) {
    c.inner().store(v, Ordering::Relaxed);
}

/// The exposition for one scrape.
pub fn render(st: &api::Status, tel: &Telemetry) -> String {
    let mut r = Registry::default();

    let be_packets = Family::<Labels, Counter>::default();
    let be_bytes = Family::<Labels, Counter>::default();
    let be_new = Family::<Labels, Counter>::default();
    let be_active = Family::<Labels, Gauge>::default();
    let be_unrecorded = Family::<Labels, Gauge>::default();
    let be_up = Family::<Labels, Gauge>::default();
    let be_weight = Family::<Labels, Gauge>::default();
    let be_transitions = Family::<Labels, Counter>::default();
    let svc_packets = Family::<Labels, Counter>::default();
    let svc_bytes = Family::<Labels, Counter>::default();
    let svc_new = Family::<Labels, Counter>::default();
    let svc_changed = Family::<Labels, Gauge>::default();
    for s in &st.services {
        let sl = labels(&[("service", &s.name)]);
        svc_changed.get_or_create(&sl).set(s.changed_slots as i64);
        set(&svc_packets.get_or_create(&sl), s.traffic.packets);
        set(&svc_bytes.get_or_create(&sl), s.traffic.bytes);
        set(&svc_new.get_or_create(&sl), s.traffic.new_flows);
        for b in &s.backends {
            let addr = b.address.to_string();
            let l = labels(&[("service", &s.name), ("backend", &addr)]);
            set(&be_packets.get_or_create(&l), b.traffic.packets);
            set(&be_bytes.get_or_create(&l), b.traffic.bytes);
            set(&be_new.get_or_create(&l), b.traffic.new_flows);
            set(&be_transitions.get_or_create(&l), b.health_transitions);
            be_active.get_or_create(&l).set(b.active_connections as i64);
            be_unrecorded
                .get_or_create(&l)
                .set(b.unrecorded_flows_seconds as i64);
            be_up
                .get_or_create(&l)
                .set(i64::from(b.health != "down" && b.state != "down"));
            be_weight
                .get_or_create(&l)
                .set(i64::from(b.effective_weight));
        }
    }
    r.register(
        "lb_backend_packets",
        "Packets forwarded to the backend (frames leaving through XDP_TX/XDP_REDIRECT)",
        be_packets,
    );
    r.register(
        "lb_backend_bytes",
        "Bytes forwarded to the backend (whole frames, Ethernet header included)",
        be_bytes,
    );
    r.register(
        "lb_backend_new_flows",
        "Flows that chose the backend (new, or moved from another backend)",
        be_new,
    );
    r.register(
        "lb_backend_active_connections",
        "Open connections: UDP flows and TCP flows begun with a SYN, until the client's FIN/RST, a move or idle expiry",
        be_active,
    );
    r.register(
        "lb_backend_unrecorded_flows_seconds",
        "Seconds during which UDP flows of a maglev/sh service not in the connection table may still come back to the backend after a change (a drain waits for them too)",
        be_unrecorded,
    );
    r.register(
        "lb_backend_up",
        "1 when the backend's health is up (or unchecked) and its MAC is known, else 0",
        be_up,
    );
    r.register(
        "lb_backend_weight",
        "Effective weight for new flows (0 when draining, disabled or down)",
        be_weight,
    );
    r.register(
        "lb_health_transitions",
        "Health state changes of the backend since lb run started",
        be_transitions,
    );
    r.register(
        "lb_service_packets",
        "Packets forwarded for the service",
        svc_packets,
    );
    r.register(
        "lb_service_bytes",
        "Bytes forwarded for the service (whole frames)",
        svc_bytes,
    );
    r.register(
        "lb_service_new_flows",
        "Flows that chose a backend of the service",
        svc_new,
    );
    r.register(
        "lb_service_changed_slots",
        "maglev/sh: table slots whose backend changed while flows of the old one may live; their established packets consult the connection table",
        svc_changed,
    );

    let verdicts = Family::<Labels, Counter>::default();
    let drops = Family::<Labels, Counter>::default();
    let passes = Family::<Labels, Counter>::default();
    let flows = Family::<Labels, Counter>::default();
    for (name, v) in &st.counters {
        let (family, key, value) = if let Some(x) = name.strip_prefix("verdict_") {
            (&verdicts, "verdict", x)
        } else if let Some(x) = name.strip_prefix("drop_") {
            (&drops, "reason", x)
        } else if let Some(x) = name.strip_prefix("pass_") {
            (&passes, "reason", x)
        } else if let Some(x) = name.strip_prefix("flow_") {
            (&flows, "event", x)
        } else {
            continue;
        };
        set(&family.get_or_create(&labels(&[(key, value)])), *v);
    }
    r.register(
        "lb_verdicts",
        "XDP verdicts of lb_xdp (tx, redirect, pass, drop, aborted)",
        verdicts,
    );
    r.register("lb_drops", "Packets dropped by lb_xdp, by reason", drops);
    r.register(
        "lb_passes",
        "Packets passed to the kernel's stack unchanged, by reason",
        passes,
    );
    r.register(
        "lb_flow_events",
        "Flow decisions by kind (the flow_* counters): new, hit, rescheduled, insert_failed, stateless, record_limited (SYNs beyond dataplane.record_limit, counted since the program was loaded), record_deferred and record_ring_full (SYNs handed to the controller through LB_RECORD, and recorded on the packet path for a full ring, since the load), record_inserted (entries the controller made from LB_RECORD since lb started), ...",
        flows,
    );

    if let Some(vips) = &st.vips {
        let announced = Family::<Labels, Gauge>::default();
        for v in vips {
            let vip = v.vip.to_string();
            let route = v.route.to_string();
            announced
                .get_or_create(&labels(&[("vip", &vip), ("route", &route)]))
                .set(i64::from(v.route != crate::announce::Route::Withdrawn));
        }
        r.register(
            "lb_vip_announced",
            "1 while this node announces the VIP over BGP ([announce]; route: announced or draining), 0 when withdrawn",
            announced,
        );
    }
    if let Some(fs) = &st.flow_sync {
        let sync = Family::<Labels, Counter>::default();
        for (what, v) in [
            ("sent", fs.sent),
            ("received", fs.received),
            ("inserted", fs.inserted),
            ("existing", fs.existing),
            ("unknown", fs.unknown),
            ("dropped", fs.dropped),
        ] {
            set(&sync.get_or_create(&labels(&[("event", what)])), v);
        }
        r.register(
            "lb_flow_sync_flows",
            "Flow sharing ([flow_sync]): flows sent to the peers, received, inserted, already present, unknown here, dropped by the receive limit",
            sync,
        );
        let dg = Family::<Labels, Counter>::default();
        for (what, v) in [
            ("sent", fs.datagrams_sent),
            ("send_error", fs.send_errors),
            ("rejected", fs.rejected),
        ] {
            set(&dg.get_or_create(&labels(&[("event", what)])), v);
        }
        r.register(
            "lb_flow_sync_datagrams",
            "Flow sharing datagrams: sent, failed to send, refused (authentication, timestamp, replay)",
            dg,
        );
    }

    let entries = Gauge::<i64>::default();
    entries.set(st.flow_entries as i64);
    r.register(
        "lb_flow_table_entries",
        "Connection table entries counted by the controller's last sweep (a full walk of LB_FLOWS, every 1-10 s) minus those it expired",
        entries,
    );
    let expired = Counter::<u64>::default();
    set(&expired, st.flows_expired);
    r.register(
        "lb_flows_expired",
        "Idle flows removed by the controller's sweep since lb run started",
        expired,
    );
    let uncounted = Counter::<u64>::default();
    set(&uncounted, st.connections_uncounted);
    r.register(
        "lb_connections_uncounted",
        "Active connections the sweep subtracted beyond its expiries since lb run started: counted connections whose entries the LRU evicted (a few may have closed while a sweep walked the table)",
        uncounted,
    );
    let mode = Family::<Labels, Gauge>::default();
    mode.get_or_create(&labels(&[
        ("interface", &st.interface),
        ("mode", &st.xdp_mode),
    ]))
    .set(1);
    r.register(
        "lb_xdp_mode",
        "1 for the interface lb_xdp is attached to and its mode (native or generic)",
        mode,
    );
    r.register(
        "lb",
        "lb's version and the data plane's map layout version",
        Info::new(labels(&[
            ("version", env!("CARGO_PKG_VERSION")),
            ("layout", &LAYOUT_VERSION.to_string()),
        ])),
    );
    let uptime = Gauge::<i64>::default();
    uptime.set(st.uptime_seconds as i64);
    r.register(
        "lb_uptime_seconds",
        "Seconds since this lb run started",
        uptime,
    );
    r.register(
        "lb_health_check_duration_seconds",
        "Time a health check took (connect, request and answer), by result",
        tel.health_duration.clone(),
    );
    r.register(
        "lb_config_reloads",
        "Config reloads (SIGHUP, lb reload) by result: applied or rejected",
        tel.reloads.clone(),
    );
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

/// The OpenMetrics content type Prometheus negotiates (it reads the classic text format too).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    /// `Durations` reads exactly as prometheus-client's own histogram with the same buckets
    /// and observations (bucket edges, +Inf, the sum and count included).
    #[test]
    fn durations_encode_as_a_histogram_does() {
        use prometheus_client::metrics::histogram::Histogram;
        let ours = Durations::default();
        let theirs = Histogram::new(DURATION_BUCKETS);
        for v in [
            0.0, 0.0001, 0.0005, 0.00051, 0.001, 0.003, 0.01, 0.25, 0.9, 1.0, 7.5, 8.0, 8.5, 30.0,
        ] {
            ours.observe(v);
            theirs.observe(v);
        }
        fn text(m: impl prometheus_client::registry::Metric) -> String {
            let mut r = Registry::default();
            r.register("d", "h", m);
            let mut out = String::new();
            encode(&mut out, &r).unwrap();
            out
        }
        assert_eq!(text(ours), text(theirs), "the same exposition");
    }

    /// Names of every global counter, so the test can check none is left out.
    fn counter_names() -> impl Iterator<Item = &'static str> {
        lb_common::stats::Stat::ALL.iter().map(|s| s.name())
    }

    fn status() -> api::Status {
        let traffic = api::Traffic {
            packets: 10,
            bytes: 1500,
            new_flows: 3,
            packets_per_second: 0.0,
            bits_per_second: 0.0,
            new_flows_per_second: 0.0,
        };
        api::Status {
            interface: "eth0".into(),
            xdp_mode: "native".into(),
            uptime_seconds: 5,
            config: "lb.toml".into(),
            state_file: "s.json".into(),
            pin_path: "/sys/fs/bpf/lb/eth0".into(),
            adopted: false,
            services: vec![api::ServiceStatus {
                name: "web".into(),
                vip: "10.0.0.1".parse().unwrap(),
                port: 80,
                protocol: "tcp".into(),
                scheduler: "maglev".into(),
                ring_digest: String::new(),
                changed_slots: 0,
                ring_size: 65537,
                packed_bits: 2,
                record_connections: "at_syn".into(),
                traffic,
                backends: vec![api::BackendStatus {
                    address: "10.0.0.21".parse().unwrap(),
                    mac: "02:00:00:00:00:21".into(),
                    mac_source: "config".into(),
                    state: "up".into(),
                    admin: api::Admin::Enabled,
                    config_weight: 100,
                    weight_override: None,
                    weight_note: None,
                    effective_weight: 100,
                    health: "down".into(),
                    health_reason: "timeout".into(),
                    health_since_seconds: 1.0,
                    health_transitions: 2,
                    active_connections: 7,
                    unrecorded_flows_seconds: 4,
                    traffic,
                }],
            }],
            flow_entries: 42,
            flows_expired: 1,
            connections_uncounted: 3,
            counters: counter_names()
                .enumerate()
                .map(|(i, n)| (n.to_owned(), i as u64))
                .collect(),
            record_limit: None,
            defer_records: None,
            vips: None,
            flow_sync: None,
        }
    }

    #[test]
    fn exposition_has_every_documented_metric() {
        let tel = Telemetry::default();
        let labels = || Some(("web".to_owned(), "10.0.0.21".parse().unwrap()));
        tel.check(0, true, 0.002, labels);
        tel.check(0, true, 0.004, || panic!("labels are asked once"));
        tel.reload(true);
        tel.reload(false);
        let text = render(&status(), &tel);
        let l = r#"{service="web",backend="10.0.0.21"}"#;
        for line in [
            format!("lb_backend_packets_total{l} 10"),
            format!("lb_backend_bytes_total{l} 1500"),
            format!("lb_backend_new_flows_total{l} 3"),
            format!("lb_backend_active_connections{l} 7"),
            format!("lb_backend_unrecorded_flows_seconds{l} 4"),
            format!("lb_backend_up{l} 0"),
            format!("lb_backend_weight{l} 100"),
            format!("lb_health_transitions_total{l} 2"),
            r#"lb_service_packets_total{service="web"} 10"#.to_owned(),
            r#"lb_verdicts_total{verdict="tx"} 0"#.to_owned(),
            r#"lb_drops_total{reason="no_backend"} 10"#.to_owned(),
            r#"lb_passes_total{reason="not_ip"} 5"#.to_owned(),
            "lb_flow_table_entries 42".to_owned(),
            r#"lb_xdp_mode{interface="eth0",mode="native"} 1"#.to_owned(),
            format!(
                r#"lb_info{{version="{}",layout="{LAYOUT_VERSION}"}} 1"#,
                env!("CARGO_PKG_VERSION")
            ),
            r#"lb_config_reloads_total{result="applied"} 1"#.to_owned(),
            r#"lb_config_reloads_total{result="rejected"} 1"#.to_owned(),
            r#"lb_health_check_duration_seconds_count{service="web",backend="10.0.0.21",result="success"} 2"#
                .to_owned(),
        ] {
            assert!(text.lines().any(|x| x == line), "missing `{line}` in:\n{text}");
        }
        // Every global counter appears under one of the families.
        for n in counter_names() {
            let suffix = n.split_once('_').map(|(_, s)| s).unwrap();
            assert!(text.contains(&format!("\"{suffix}\"}}")), "{n} missing");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
