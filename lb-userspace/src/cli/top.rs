//! `lb top [--once]`: a live view of every service and backend, refreshed each second: packet
//! and bit rates, new connections per second, active connections, health, weight, admin state;
//! totals and drop reasons. Keys: `s` sort, `f` fold all, ↑/↓ select, space/enter fold the
//! selected service, `q` quit. `--once` prints one frame as plain text (scripts, tests).
//!
//! The frame is text lines from one pure function ([`frame`]), so `--once` and the terminal
//! view show the same thing; the view only adds colours and the selection.

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use hyper::Method;
use lb_userspace::api::{self, client};
use ratatui::{
    crossterm::{
        event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
        execute,
        terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
    },
    prelude::*,
    widgets::Paragraph,
};

#[derive(clap::Args)]
pub struct Args {
    /// Print one frame as plain text and exit.
    #[arg(long)]
    once: bool,
    /// Width of the `--once` frame (the terminal view uses the terminal's).
    #[arg(long, default_value_t = 80)]
    width: usize,
}

/// Sort order of services and of backends within them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    Config,
    Pps,
    Bps,
    Conns,
    Active,
}

impl Sort {
    fn next(self) -> Sort {
        match self {
            Sort::Config => Sort::Pps,
            Sort::Pps => Sort::Bps,
            Sort::Bps => Sort::Conns,
            Sort::Conns => Sort::Active,
            Sort::Active => Sort::Config,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Sort::Config => "config order",
            Sort::Pps => "pkt/s",
            Sort::Bps => "bit/s",
            Sort::Conns => "conn/s",
            Sort::Active => "active",
        }
    }
}

/// What the viewer chose.
#[derive(Clone, Debug)]
pub struct ViewState {
    pub sort: Sort,
    /// Folded services (by name): their backends are hidden.
    pub folded: BTreeSet<String>,
    /// Selected service (index in the sorted list), in the terminal view.
    pub selected: usize,
}

impl Default for ViewState {
    fn default() -> Self {
        ViewState {
            sort: Sort::Config,
            folded: BTreeSet::new(),
            selected: 0,
        }
    }
}

/// One line of a frame; `service` marks a service row (index in the sorted list).
pub struct FrameLine {
    pub text: String,
    pub service: Option<usize>,
    pub kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Header,
    Service,
    Backend,
    BackendDown,
    Footer,
}

fn si(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.1}G", v / 1e9),
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e4 => format!("{:.0}k", v / 1e3),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn key(t: &api::Traffic, active: u64, sort: Sort) -> f64 {
    match sort {
        Sort::Config => 0.0,
        Sort::Pps => t.packets_per_second,
        Sort::Bps => t.bits_per_second,
        Sort::Conns => t.new_flows_per_second,
        Sort::Active => active as f64,
    }
}

fn fit(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        format!("{s:<w$}")
    } else {
        let mut t: String = s.chars().take(w.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The services in display order.
pub fn sorted(st: &api::Status, sort: Sort) -> Vec<&api::ServiceStatus> {
    let mut v: Vec<&api::ServiceStatus> = st.services.iter().collect();
    if sort != Sort::Config {
        let active = |s: &api::ServiceStatus| s.backends.iter().map(|b| b.active_connections).sum();
        v.sort_by(|a, b| {
            key(&b.traffic, active(b), sort).total_cmp(&key(&a.traffic, active(a), sort))
        });
    }
    v
}

/// One frame, `width` columns (at least 60).
pub fn frame(st: &api::Status, view: &ViewState, width: usize) -> Vec<FrameLine> {
    let width = width.max(60);
    let name_w = width - 49;
    let mut out = Vec::new();
    let mut push = |text: String, service, kind| {
        out.push(FrameLine {
            text: fit(&text, width),
            service,
            kind,
        })
    };
    let up = st.uptime_seconds;
    let c = |n: &str| {
        st.counters
            .iter()
            .find(|(k, _)| k == n)
            .map_or(0, |(_, v)| *v)
    };
    let (mut pps, mut bps, mut nps, mut active) = (0.0, 0.0, 0.0, 0u64);
    for s in &st.services {
        pps += s.traffic.packets_per_second;
        bps += s.traffic.bits_per_second;
        nps += s.traffic.new_flows_per_second;
        active += s.backends.iter().map(|b| b.active_connections).sum::<u64>();
    }
    push(
        format!(
            "lb top: {} ({}) up {}h{:02}m{:02}s, {} flows [s]ort: {} [f]old [q]uit",
            st.interface,
            st.xdp_mode,
            up / 3600,
            up / 60 % 60,
            up % 60,
            st.flow_entries,
            view.sort.name()
        ),
        None,
        Kind::Header,
    );
    push(
        format!(
            "total: {} pkt/s {}bit/s {} conn/s {} active; tx {} pass {} drop {}",
            si(pps),
            si(bps),
            si(nps),
            active,
            c("verdict_tx") + c("verdict_redirect"),
            c("verdict_pass"),
            c("verdict_drop")
        ),
        None,
        Kind::Header,
    );
    push(
        format!(
            "{:<name_w$} {:>9} {:>4} {:>6} {:>6} {:>6} {:>6} {:>5}",
            "SERVICE / BACKEND", "STATE", "W", "PKT/S", "BIT/S", "CONN/S", "ACTIVE", "HLTH"
        ),
        None,
        Kind::Header,
    );
    for (i, s) in sorted(st, view.sort).into_iter().enumerate() {
        let folded = view.folded.contains(&s.name);
        let up_n = s.backends.iter().filter(|b| b.state == "up").count();
        let act: u64 = s.backends.iter().map(|b| b.active_connections).sum();
        let vip = match s.vip {
            std::net::IpAddr::V4(a) => format!("{a}:{}", s.port),
            std::net::IpAddr::V6(a) => format!("[{a}]:{}", s.port),
        };
        push(
            format!(
                "{:<name_w$} {:>9} {:>4} {:>6} {:>6} {:>6} {:>6} {:>5}",
                fit(
                    &format!(
                        "{} {} {vip}/{} {}",
                        if folded { "+" } else { "-" },
                        s.name,
                        s.protocol,
                        s.scheduler
                    ),
                    name_w
                ),
                format!("{up_n}/{} up", s.backends.len()),
                "",
                si(s.traffic.packets_per_second),
                si(s.traffic.bits_per_second),
                si(s.traffic.new_flows_per_second),
                act,
                ""
            ),
            Some(i),
            Kind::Service,
        );
        if folded {
            continue;
        }
        let mut backends: Vec<&api::BackendStatus> = s.backends.iter().collect();
        if view.sort != Sort::Config {
            backends.sort_by(|a, b| {
                key(&b.traffic, b.active_connections, view.sort).total_cmp(&key(
                    &a.traffic,
                    a.active_connections,
                    view.sort,
                ))
            });
        }
        for b in backends {
            let state = match b.admin {
                api::Admin::Enabled => b.state.clone(),
                a => a.to_string(),
            };
            push(
                format!(
                    "{:<name_w$} {:>9} {:>4} {:>6} {:>6} {:>6} {:>6} {:>5}",
                    fit(&format!("    {}", b.address), name_w),
                    state,
                    b.effective_weight,
                    si(b.traffic.packets_per_second),
                    si(b.traffic.bits_per_second),
                    si(b.traffic.new_flows_per_second),
                    b.active_connections,
                    b.health
                ),
                Some(i),
                if b.state == "down" || b.health == "down" {
                    Kind::BackendDown
                } else {
                    Kind::Backend
                },
            );
        }
    }
    let drops: Vec<String> = st
        .counters
        .iter()
        .filter(|(k, _)| k.starts_with("drop_"))
        .map(|(k, v)| format!("{} {v}", k.trim_start_matches("drop_")))
        .collect();
    push(format!("drops: {}", drops.join(", ")), None, Kind::Footer);
    out
}

pub fn run(socket: &Path, a: Args) -> anyhow::Result<()> {
    let get = || -> anyhow::Result<api::Status> {
        let v = client::call(socket, Method::GET, "/v1/status", None)?;
        Ok(serde_json::from_value(v)?)
    };
    if a.once {
        let st = get()?;
        for l in frame(&st, &ViewState::default(), a.width) {
            println!("{}", l.text.trim_end());
        }
        return Ok(());
    }
    // Fail before touching the terminal when lb is not running.
    let mut st = get()?;
    enable_raw_mode()?;
    let mut stdout = std::io::stdout();
    if let Err(e) = execute!(stdout, EnterAlternateScreen) {
        let _ = disable_raw_mode();
        return Err(e.into());
    }
    let result = (|| -> anyhow::Result<()> {
        let mut term = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
        let mut view = ViewState::default();
        let mut fetched = Instant::now();
        let mut error: Option<String> = None;
        loop {
            term.draw(|f| draw(f, &st, &view, error.as_deref()))?;
            let wait = Duration::from_secs(1).saturating_sub(fetched.elapsed());
            if event::poll(wait)?
                && let Event::Key(k) = event::read()?
                && k.kind == KeyEventKind::Press
            {
                let n = st.services.len();
                match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(());
                    }
                    KeyCode::Char('s') => view.sort = view.sort.next(),
                    KeyCode::Char('f') => {
                        if view.folded.len() == n {
                            view.folded.clear();
                        } else {
                            view.folded = st.services.iter().map(|s| s.name.clone()).collect();
                        }
                    }
                    KeyCode::Up => view.selected = view.selected.saturating_sub(1),
                    KeyCode::Down => view.selected = (view.selected + 1).min(n.saturating_sub(1)),
                    KeyCode::Char(' ') | KeyCode::Enter => {
                        if let Some(s) = sorted(&st, view.sort).get(view.selected) {
                            let name = s.name.clone();
                            if !view.folded.remove(&name) {
                                view.folded.insert(name);
                            }
                        }
                    }
                    _ => {}
                }
            }
            if fetched.elapsed() >= Duration::from_secs(1) {
                fetched = Instant::now();
                match get() {
                    Ok(s) => {
                        st = s;
                        error = None;
                    }
                    Err(e) => error = Some(format!("{e:#}")),
                }
            }
        }
    })();
    let _ = disable_raw_mode();
    let _ = execute!(std::io::stdout(), LeaveAlternateScreen);
    result
}

fn draw(f: &mut Frame<'_>, st: &api::Status, view: &ViewState, error: Option<&str>) {
    let area = f.area();
    let lines = frame(st, view, area.width as usize);
    // Keep the selected service on screen (the three header lines stay above it).
    let at = lines
        .iter()
        .position(|l| l.kind == Kind::Service && l.service == Some(view.selected))
        .unwrap_or(0);
    let height = area.height as usize;
    let scroll = if at + 2 >= height { at + 3 - height } else { 0 };
    let mut text: Vec<Line<'_>> = lines
        .into_iter()
        .map(|l| {
            let mut style = match l.kind {
                Kind::Header => Style::default().add_modifier(Modifier::BOLD),
                Kind::Service => Style::default().fg(Color::Cyan),
                Kind::Backend => Style::default(),
                Kind::BackendDown => Style::default().fg(Color::Red),
                Kind::Footer => Style::default().fg(Color::Yellow),
            };
            if l.kind == Kind::Service && l.service == Some(view.selected) {
                style = style.add_modifier(Modifier::REVERSED);
            }
            Line::styled(l.text, style)
        })
        .collect();
    if let Some(e) = error {
        text.insert(
            0,
            Line::styled(format!("(stale) {e}"), Style::default().fg(Color::Red)),
        );
    }
    f.render_widget(Paragraph::new(text).scroll((scroll as u16, 0)), area);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> api::Status {
        let t = |pps: f64| api::Traffic {
            packets: 100,
            bytes: 10_000,
            new_flows: 10,
            packets_per_second: pps,
            bits_per_second: pps * 8000.0,
            new_flows_per_second: pps / 10.0,
        };
        let backend = |a: &str, pps: f64, health: &str| api::BackendStatus {
            address: a.parse().unwrap(),
            mac: "02:00:00:00:00:01".into(),
            mac_source: "config".into(),
            state: if health == "down" { "down" } else { "up" }.into(),
            admin: api::Admin::Enabled,
            config_weight: 100,
            weight_override: None,
            weight_note: None,
            effective_weight: 100,
            health: health.into(),
            health_reason: String::new(),
            health_since_seconds: 0.0,
            health_transitions: 0,
            active_connections: 3,
            unrecorded_flows_seconds: 0,
            traffic: t(pps),
        };
        let service =
            |name: &str, vip: &str, backends: Vec<api::BackendStatus>| api::ServiceStatus {
                name: name.into(),
                vip: vip.parse().unwrap(),
                port: 80,
                protocol: "tcp".into(),
                scheduler: "maglev".into(),
                ring_digest: String::new(),
                changed_slots: 0,
                ring_size: 65537,
                packed_bits: 2,
                record_connections: "at_syn".into(),
                traffic: t(backends.iter().map(|b| b.traffic.packets_per_second).sum()),
                backends,
            };
        api::Status {
            interface: "eth0".into(),
            xdp_mode: "native".into(),
            uptime_seconds: 3725,
            config: "lb.toml".into(),
            state_file: "s".into(),
            pin_path: String::new(),
            adopted: false,
            services: vec![
                service(
                    "web",
                    "10.0.0.100",
                    vec![
                        backend("10.0.0.21", 1500.0, "up"),
                        backend("10.0.0.22", 25000.0, "down"),
                    ],
                ),
                service(
                    "a-service-with-a-rather-long-name",
                    "fd00:99::100",
                    vec![backend("fd00:99::21", 5.0, "none")],
                ),
            ],
            flow_entries: 12,
            flows_expired: 0,
            connections_uncounted: 0,
            counters: vec![("verdict_tx".into(), 9), ("drop_no_backend".into(), 2)],
            record_limit: None,
            defer_records: None,
            vips: None,
            flow_sync: None,
        }
    }

    #[test]
    fn a_frame_fits_80_columns_and_lists_everything() {
        let st = status();
        let lines = frame(&st, &ViewState::default(), 80);
        let text: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        for l in &text {
            assert!(l.chars().count() <= 80, "too wide: {l:?}");
        }
        let all = text.join("\n");
        for needle in [
            "web 10.0.0.100:80/tcp",
            "10.0.0.21",
            "10.0.0.22",
            "fd00:99::21",
            "1.5k",
            "25k",
            "no_backend 2",
            "up 1h02m05s",
        ] {
            assert!(all.contains(needle), "{needle} missing:\n{all}");
        }
        assert!(lines.len() <= 24, "{} lines", lines.len());
    }

    #[test]
    fn sorting_and_folding() {
        let st = status();
        let mut v = ViewState {
            sort: Sort::Pps,
            ..ViewState::default()
        };
        let lines = frame(&st, &v, 80);
        let b: Vec<&str> = lines
            .iter()
            .filter(|l| matches!(l.kind, Kind::Backend | Kind::BackendDown))
            .map(|l| l.text.trim())
            .collect();
        assert!(b[0].starts_with("10.0.0.22"), "busiest first: {b:?}");
        v.folded.insert("web".into());
        let lines = frame(&st, &v, 80);
        assert!(!lines.iter().any(|l| l.text.contains("10.0.0.21")));
        assert!(lines.iter().any(|l| l.text.contains("+ web")));
    }
}
