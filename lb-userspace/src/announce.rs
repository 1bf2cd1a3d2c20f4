//! BGP announcement of the VIPs through BIRD (`[announce]`).
//!
//! The design, and why:
//! - **lb decides, BIRD speaks BGP.** `lb run` writes an include file holding two BIRD static
//!   protocols, `lb_vips4` and `lb_vips6`, with one route per VIP to announce, then runs
//!   `birdc configure` (BIRD applies the difference without restarting its BGP sessions). The
//!   node's bird.conf includes the file and exports those protocols to its BGP neighbours.
//! - **A crash of lb withdraws within milliseconds.** Every route goes `via "<announce.interface>"`,
//!   a TUN device `lb run` creates and holds open ([`crate::iface::Tun`]). The kernel deletes it
//!   when the process ends, however it ends (SIGKILL included); BIRD sees the interface go at
//!   once (netlink) and withdraws the routes. No stale announcement outlives `lb run`, and none
//!   waits for a timer. (The data plane keeps forwarding what still arrives: it is pinned.)
//! - **A crash of BIRD withdraws everything:** its BGP sessions close (or BFD times them out
//!   when the whole node is gone) and the router drops the node's routes.
//! - **lb stopping on purpose** writes an empty file and reconfigures BIRD first (an explicit
//!   withdrawal), then the device goes.
//!
//! A VIP is announced while lb runs, the operator has not withdrawn it (`lb vip withdraw`, kept
//! in the state file) and at least one of its services has `min_healthy` healthy backends
//! (health up after a passing check, or unchecked; enabled; weight above 0; MAC known). Several
//! services may share a VIP: it stays announced while any of them can serve.
//!
//! `lb vip withdraw --graceful` drains first: the route is announced with `local_as` prepended
//! `graceful_prepend` times, so the router prefers the other nodes' routes and sends new flows
//! there, while this node's route stays as a fallback. The VIP is withdrawn once no new flow
//! arrived for `drain_quiet_ms` (measured from the service counters), or after
//! `drain_timeout_ms`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::config::Announce;

/// What this node does with a VIP's route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    Announced,
    /// Announced less preferred (AS path prepended) while new flows move away.
    Draining,
    Withdrawn,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Route::Announced => "announced",
            Route::Draining => "draining",
            Route::Withdrawn => "withdrawn",
        })
    }
}

/// One service's part in its VIP's decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceHealth {
    pub name: String,
    pub healthy: u32,
    pub backends: u32,
    pub min_healthy: u32,
}

/// One VIP: what decides it, what was decided and why (`lb vip list`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStatus {
    pub vip: IpAddr,
    pub route: Route,
    pub reason: String,
    pub services: Vec<ServiceHealth>,
    /// The operator withdrew it (persisted).
    pub operator_withdrawn: bool,
    /// While draining, or after the last drain of this run: ms since the drain began until new
    /// flows stopped (the last new flow seen), and until the route was withdrawn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainReport>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// ms from the less-preferred announcement to the last new flow that still arrived.
    pub last_new_flow_ms: u64,
    /// ms from the less-preferred announcement to the withdrawal (absent while draining).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withdrawn_ms: Option<u64>,
    /// New flows that arrived at this node while draining.
    pub new_flows: u64,
    /// Ended by `drain_timeout_ms`, not by quiet.
    pub timed_out: bool,
}

/// The rule for one VIP, without drains: announced or withdrawn, and why.
pub fn decide(services: &[ServiceHealth], operator_withdrawn: bool) -> (Route, String) {
    if operator_withdrawn {
        return (
            Route::Withdrawn,
            "withdrawn by the operator (lb vip withdraw)".into(),
        );
    }
    if let Some(s) = services.iter().find(|s| s.healthy >= s.min_healthy) {
        return (
            Route::Announced,
            format!(
                "service \"{}\" has {} healthy backends (min_healthy {})",
                s.name, s.healthy, s.min_healthy
            ),
        );
    }
    let why: Vec<String> = services
        .iter()
        .map(|s| format!("\"{}\" {}/{}", s.name, s.healthy, s.min_healthy))
        .collect();
    (
        Route::Withdrawn,
        format!(
            "too few healthy backends (healthy/min_healthy: {})",
            why.join(", ")
        ),
    )
}

/// A drain in progress.
#[derive(Clone, Copy, Debug)]
struct Drain {
    /// When the operator asked for it.
    requested: Instant,
    /// When BIRD took the less-preferred route (None until then; the request time when BIRD
    /// cannot be reached: it announces nothing then, so there is nothing to wait for).
    started: Option<Instant>,
    /// The VIP's new-flow counter at the last change, and when it changed.
    count: Option<u64>,
    first_count: Option<u64>,
    last_change: Option<Instant>,
}

/// The include file for BIRD: `lb_vips4` and `lb_vips6` with a route per VIP to announce.
pub fn render(cfg: &Announce, routes: &BTreeMap<IpAddr, Route>) -> String {
    let mut out = String::from(
        "# Written by `lb run` ([announce] include_file): rewritten on every change, do not edit.\n\
         # Routes go via the device lb holds open, so they vanish with the lb process.\n",
    );
    for (proto, channel, v4) in [("lb_vips4", "ipv4", true), ("lb_vips6", "ipv6", false)] {
        out.push_str(&format!("protocol static {proto} {{\n  {channel};\n"));
        for (vip, r) in routes {
            if vip.is_ipv4() != v4 || *r == Route::Withdrawn {
                continue;
            }
            let len = if v4 { 32 } else { 128 };
            out.push_str(&format!("  route {vip}/{len} via \"{}\"", cfg.interface));
            if *r == Route::Draining {
                let prepend = format!("bgp_path.prepend({}); ", cfg.local_as);
                out.push_str(&format!(
                    " {{ {}}}",
                    prepend.repeat(cfg.graceful_prepend as usize)
                ));
            }
            out.push_str(";\n");
        }
        out.push_str("}\n");
    }
    out
}

/// Writes `text` to `path` atomically (a temporary file in the same directory, renamed).
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".lb-announce-")
        .tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    // BIRD may run as another user (Debian: bird): it must be able to read the file.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Runs `birdc -s <socket> configure`; BIRD answers "Reconfigured" (or "in progress").
async fn birdc_configure(cfg: &Announce) -> Result<(), String> {
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new(&cfg.birdc)
            .arg("-s")
            .arg(&cfg.bird_socket)
            .arg("configure")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "birdc configure took over 5 s".to_owned())?
    .map_err(|e| format!("running {}: {e}", cfg.birdc.display()))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("Reconfigured")
        || text.contains("Reconfiguration in progress")
        || text.contains("already in progress")
    {
        Ok(())
    } else {
        Err(format!(
            "birdc -s {} configure: {}",
            cfg.bird_socket.display(),
            text.trim().replace('\n', " | ")
        ))
    }
}

/// The announcement side of `lb run`.
pub struct Announcer {
    cfg: Announce,
    tun: Option<crate::iface::Tun>,
    drains: BTreeMap<IpAddr, Drain>,
    /// The last drain of each VIP in this run (for `lb vip list`).
    reports: BTreeMap<IpAddr, DrainReport>,
    /// What BIRD was last told (`None`: not yet, or it failed and is retried).
    applied: Option<String>,
    last_error: Option<String>,
    status: Vec<VipStatus>,
}

impl Announcer {
    /// Creates the liveness device (fails if it exists: another `lb run` holds it).
    pub fn new(cfg: Announce) -> anyhow::Result<Announcer> {
        let tun = crate::iface::Tun::create(&cfg.interface).map_err(|e| {
            anyhow::anyhow!(
                "announce.interface: cannot create TUN device {}: {e}{}",
                cfg.interface,
                if e.raw_os_error() == Some(libc::EBUSY) {
                    " (it exists: another lb run on this node uses the same name?)"
                } else {
                    ""
                }
            )
        })?;
        Ok(Announcer {
            cfg,
            tun: Some(tun),
            drains: BTreeMap::new(),
            reports: BTreeMap::new(),
            applied: None,
            last_error: None,
            status: Vec::new(),
        })
    }

    pub fn status(&self) -> &[VipStatus] {
        &self.status
    }

    /// A drain is in progress (the event loop then samples the counters more often).
    pub fn draining(&self) -> bool {
        !self.drains.is_empty()
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Starts draining `vip` (`lb vip withdraw --graceful`) if it is announced.
    pub fn drain(&mut self, vip: IpAddr) {
        let announced = self
            .status
            .iter()
            .any(|s| s.vip == vip && s.route == Route::Announced);
        if announced {
            self.drains.insert(
                vip,
                Drain {
                    requested: Instant::now(),
                    started: None,
                    count: None,
                    first_count: None,
                    last_change: None,
                },
            );
            self.reports.remove(&vip);
        }
    }

    /// Stops a drain (`lb vip announce`, or a plain withdraw).
    pub fn cancel_drain(&mut self, vip: IpAddr) {
        self.drains.remove(&vip);
    }

    /// Decides every VIP from `inputs` (VIP → its services), the operator's withdrawals and
    /// the VIPs' new-flow counters (drains advance only with a fresh reading: `Some`), then
    /// tells BIRD if anything changed.
    pub async fn update(
        &mut self,
        inputs: &BTreeMap<IpAddr, Vec<ServiceHealth>>,
        withdrawn: &BTreeSet<IpAddr>,
        new_flows: Option<&BTreeMap<IpAddr, u64>>,
    ) {
        let now = Instant::now();
        self.drains.retain(|v, _| inputs.contains_key(v));
        let mut status = Vec::new();
        for (vip, services) in inputs {
            let (mut route, mut reason) = decide(services, withdrawn.contains(vip));
            if let Some(d) = self.drains.get_mut(vip) {
                if d.started.is_none() && self.last_error.is_some() {
                    d.started = Some(d.requested);
                }
                let count = new_flows.map(|m| m.get(vip).copied().unwrap_or(0));
                // drain_timeout_ms counts from the request, whatever happens meanwhile.
                let timed_out = now.duration_since(d.requested)
                    >= Duration::from_millis(self.cfg.drain_timeout_ms as u64);
                let done = match (d.started, count) {
                    // BIRD has not taken the prepended route yet, or no fresh counters.
                    (None, _) | (_, None) => timed_out,
                    (Some(t0), Some(count)) => {
                        if d.count.is_none_or(|c| count > c) {
                            if d.count.is_some() {
                                d.last_change = Some(now);
                            }
                            d.count = Some(count);
                            d.first_count.get_or_insert(count);
                        }
                        let quiet = now.duration_since(d.last_change.unwrap_or(t0));
                        quiet >= Duration::from_millis(self.cfg.drain_quiet_ms as u64) || timed_out
                    }
                };
                let t0 = d.started.unwrap_or(d.requested);
                self.reports.insert(
                    *vip,
                    DrainReport {
                        last_new_flow_ms: d
                            .last_change
                            .map_or(0, |t| t.duration_since(t0).as_millis() as u64),
                        withdrawn_ms: None,
                        new_flows: match (count, d.first_count) {
                            (Some(c), Some(f)) => c.saturating_sub(f),
                            _ => 0,
                        },
                        timed_out,
                    },
                );
                if done {
                    let t0 = d.started.unwrap_or(d.requested);
                    if let Some(r) = self.reports.get_mut(vip) {
                        r.withdrawn_ms = Some(now.duration_since(t0).as_millis() as u64);
                        tracing::info!(
                            "announce: VIP {vip} drained: the last new flow arrived {} ms after the \
                             route was made less preferred ({} new flows meanwhile); withdrawn after {} ms{}",
                            r.last_new_flow_ms,
                            r.new_flows,
                            now.duration_since(t0).as_millis(),
                            if r.timed_out {
                                " (drain_timeout_ms reached)"
                            } else {
                                ""
                            }
                        );
                    }
                    self.drains.remove(vip);
                } else if withdrawn.contains(vip) {
                    route = Route::Draining;
                    reason = format!(
                        "draining (lb vip withdraw --graceful): withdrawn once no new flow arrives for {} ms",
                        self.cfg.drain_quiet_ms
                    );
                }
            }
            status.push(VipStatus {
                vip: *vip,
                route,
                reason,
                services: services.clone(),
                operator_withdrawn: withdrawn.contains(vip),
                drain: self.reports.get(vip).copied(),
            });
        }
        for s in &status {
            let before = self.status.iter().find(|o| o.vip == s.vip).map(|o| o.route);
            if before != Some(s.route) {
                tracing::info!("announce: VIP {} {}: {}", s.vip, s.route, s.reason);
            }
        }
        self.status = status;
        let routes: BTreeMap<IpAddr, Route> =
            self.status.iter().map(|s| (s.vip, s.route)).collect();
        self.apply(render(&self.cfg, &routes)).await;
        // A drain's clock starts when BIRD has the less-preferred route.
        if self.applied.is_some() {
            for (vip, d) in self.drains.iter_mut() {
                if d.started.is_none() && routes.get(vip) == Some(&Route::Draining) {
                    d.started = Some(Instant::now());
                }
            }
        }
    }

    /// Writes the file and reconfigures BIRD when `text` differs from what BIRD has; a failure
    /// is logged and retried at the next update.
    async fn apply(&mut self, text: String) {
        if self.applied.as_deref() == Some(text.as_str()) {
            return;
        }
        let r = match write_atomic(&self.cfg.include_file, &text) {
            Err(e) => Err(format!("writing {}: {e}", self.cfg.include_file.display())),
            Ok(()) => birdc_configure(&self.cfg).await,
        };
        match r {
            Ok(()) => {
                if self.last_error.take().is_some() {
                    tracing::info!("announce: BIRD reconfigured again");
                }
                self.applied = Some(text);
            }
            Err(e) => {
                if self.last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(
                        "announce: {e} (retried every second; BIRD reads the file when it starts)"
                    );
                }
                self.last_error = Some(e);
                self.applied = None;
            }
        }
    }

    /// Stopping on purpose: withdraws every VIP explicitly, then removes the device.
    pub async fn shutdown(mut self) {
        let routes: BTreeMap<IpAddr, Route> = BTreeMap::new();
        self.applied = None;
        self.apply(render(&self.cfg, &routes)).await;
        if self.last_error.is_none() {
            tracing::info!("announce: every VIP withdrawn (lb is stopping)");
        }
        self.tun.take();
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn cfg() -> Announce {
        Announce {
            include_file: PathBuf::from("/run/lb/bird-vips.conf"),
            bird_socket: PathBuf::from("/run/bird/bird.ctl"),
            birdc: PathBuf::from("birdc"),
            interface: "lb-alive".into(),
            local_as: 65001,
            min_healthy: 1,
            graceful_prepend: 2,
            drain_quiet_ms: 2000,
            drain_timeout_ms: 60000,
        }
    }

    fn svc(name: &str, healthy: u32, min: u32) -> ServiceHealth {
        ServiceHealth {
            name: name.into(),
            healthy,
            backends: 3,
            min_healthy: min,
        }
    }

    #[test]
    fn the_rule() {
        assert_eq!(decide(&[svc("web", 1, 1)], false).0, Route::Announced);
        assert_eq!(decide(&[svc("web", 0, 1)], false).0, Route::Withdrawn);
        assert_eq!(decide(&[svc("web", 1, 2)], false).0, Route::Withdrawn);
        assert_eq!(decide(&[svc("web", 0, 0)], false).0, Route::Announced);
        assert_eq!(decide(&[svc("web", 3, 1)], true).0, Route::Withdrawn);
        // Any service of the VIP that can serve keeps it announced.
        let (r, why) = decide(&[svc("web", 0, 1), svc("tls", 2, 2)], false);
        assert_eq!(r, Route::Announced);
        assert!(why.contains("\"tls\""), "{why}");
        let (r, why) = decide(&[svc("web", 0, 1), svc("tls", 1, 2)], false);
        assert_eq!(r, Route::Withdrawn);
        assert!(
            why.contains("\"web\" 0/1") && why.contains("\"tls\" 1/2"),
            "{why}"
        );
    }

    #[test]
    fn include_file() {
        let routes = BTreeMap::from([
            ("10.99.0.100".parse().unwrap(), Route::Announced),
            ("10.99.0.101".parse().unwrap(), Route::Draining),
            ("10.99.0.102".parse().unwrap(), Route::Withdrawn),
            ("fd00:99::100".parse().unwrap(), Route::Announced),
        ]);
        let text = render(&cfg(), &routes);
        let body: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "protocol static lb_vips4 {",
                "  ipv4;",
                "  route 10.99.0.100/32 via \"lb-alive\";",
                "  route 10.99.0.101/32 via \"lb-alive\" { bgp_path.prepend(65001); bgp_path.prepend(65001); };",
                "}",
                "protocol static lb_vips6 {",
                "  ipv6;",
                "  route fd00:99::100/128 via \"lb-alive\";",
                "}",
            ]
        );
        // Nothing announced: both protocols still exist (bird.conf refers to them).
        let empty = render(&cfg(), &BTreeMap::new());
        assert!(empty.contains("protocol static lb_vips4 {\n  ipv4;\n}"));
        assert!(empty.contains("protocol static lb_vips6 {\n  ipv6;\n}"));
    }

    #[test]
    fn the_include_file_parses_in_bird() {
        // Only where BIRD is installed (the lab machines): `bird -p` parses a config.
        let Ok(out) = std::process::Command::new("bird").arg("--version").output() else {
            return;
        };
        if !out.status.success() && out.stderr.is_empty() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let inc = dir.path().join("vips.conf");
        let routes = BTreeMap::from([
            ("10.99.0.100".parse().unwrap(), Route::Announced),
            ("10.99.0.101".parse().unwrap(), Route::Draining),
            ("fd00:99::100".parse().unwrap(), Route::Draining),
        ]);
        std::fs::write(&inc, render(&cfg(), &routes)).expect("write");
        let conf = dir.path().join("bird.conf");
        std::fs::write(
            &conf,
            format!(
                "router id 10.0.0.1;\nprotocol device {{}}\ninclude \"{}\";\n",
                inc.display()
            ),
        )
        .expect("write");
        let out = std::process::Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&conf)
            .output()
            .expect("bird -p");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
