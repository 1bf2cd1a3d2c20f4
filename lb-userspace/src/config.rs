//! The TOML configuration: parsing and full validation into a [`Config`].
//!
//! Validation is complete before anything touches the kernel: a bad file gives one precise
//! [`ConfigError`] (file, service, field, why) and changes nothing.

use std::{
    collections::HashSet,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use lb_common::limits::{
    DEFAULT_FLOW_TABLE_SIZE, DEFAULT_RECORD_LIMIT, DEFAULT_RING_CAPACITY, DEFAULT_RING_SIZE,
    MAX_BACKENDS, MAX_RING_CAPACITY, MAX_RING_SIZE, MAX_SERVICES,
};
use serde::Deserialize;

/// A configuration error: where and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {location}{why}")]
pub struct ConfigError {
    pub file: String,
    /// `service "web": backend "10.0.0.1": mac: ` or `dataplane.interface: `, may be empty.
    pub location: String,
    pub why: String,
}

/// XDP attach mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic (skb) mode if the driver refuses.
    #[default]
    Auto,
    Native,
    Generic,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        })
    }
}

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Scheduler of a service (`scheduler = ...`); each decides for new flows only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Scheduler {
    /// Weighted Maglev consistent hashing of the 5-tuple (the default).
    #[default]
    Maglev,
    /// Source hashing: weighted Maglev on the source address only.
    Sh,
    /// Round robin (weights only matter as 0 / non-zero).
    Rr,
    /// Smooth weighted round robin.
    Wrr,
    /// Least connections.
    Lc,
    /// Weighted least connections.
    Wlc,
}

impl Scheduler {
    pub const NAMES: &'static str = "maglev, sh, rr, wrr, lc, wlc";

    pub fn parse(s: &str) -> Option<Scheduler> {
        Some(match s {
            "maglev" => Scheduler::Maglev,
            "sh" => Scheduler::Sh,
            "rr" => Scheduler::Rr,
            "wrr" => Scheduler::Wrr,
            "lc" => Scheduler::Lc,
            "wlc" => Scheduler::Wlc,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Maglev => "maglev",
            Scheduler::Sh => "sh",
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::Lc => "lc",
            Scheduler::Wlc => "wlc",
        }
    }
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("`{s}` is not a MAC address (expected six hex bytes like 02:00:00:00:00:21)")
        };
        let mut mac = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for b in &mut mac {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub dataplane: Dataplane,
    pub control: Control,
    pub timeouts: Timeouts,
    pub services: Vec<Service>,
    /// `[announce]`: VIPs announced over BGP through BIRD (off when absent).
    pub announce: Option<Announce>,
    /// `[flow_sync]`: new flows shared with the other balancer nodes (off when absent).
    pub flow_sync: Option<FlowSync>,
}

/// `[announce]`: how `lb run` announces its VIPs through BIRD (see [`crate::announce`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Announce {
    /// The file lb writes: BIRD static protocols `lb_vips4` and `lb_vips6` (include it from
    /// bird.conf). Written atomically, then `birdc configure`.
    pub include_file: PathBuf,
    /// BIRD's control socket (`birdc -s`).
    pub bird_socket: PathBuf,
    /// The birdc program.
    pub birdc: PathBuf,
    /// The TUN device that exists exactly while `lb run` runs: the announced routes go via it,
    /// so they vanish with the process (crash included).
    pub interface: String,
    /// This node's AS number, prepended while a VIP drains (`lb vip withdraw --graceful`).
    pub local_as: u32,
    /// Default of every service's `min_healthy`.
    pub min_healthy: u32,
    /// How many times `local_as` is prepended while draining.
    pub graceful_prepend: u32,
    /// A draining VIP is withdrawn once no new flow arrived for this long...
    pub drain_quiet_ms: u32,
    /// ...or after this long at most.
    pub drain_timeout_ms: u32,
}

/// `[flow_sync]`: flow sharing with the other nodes (see [`crate::flowsync`]).
#[derive(Clone, PartialEq)]
pub struct FlowSync {
    /// Where this node receives the peers' datagrams (its address on the LB segment).
    pub listen: std::net::SocketAddr,
    /// The other nodes' `listen` addresses.
    pub peers: Vec<std::net::SocketAddr>,
    /// The shared key (HMAC-SHA256), from `key` or `key_file`.
    pub key: Vec<u8>,
    /// Most new flows reported per second and CPU by the data plane.
    pub rate: u32,
}

impl fmt::Debug for FlowSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowSync")
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("key", &"(hidden)")
            .field("rate", &self.rate)
            .finish()
    }
}

/// `[timeouts]`: idle time (seconds) after which the controller removes a flow from the
/// connection table (and from its backend's active connections), like `ipvsadm --set`.
#[derive(Clone, Debug, PartialEq)]
pub struct Timeouts {
    /// Established TCP flows.
    pub tcp: u32,
    /// TCP flows whose client sent FIN or RST.
    pub tcp_fin: u32,
    /// UDP flows.
    pub udp: u32,
}

impl Timeouts {
    /// The idle timeout of an open flow of `protocol` (UDP: `udp`, TCP: `tcp`), in ns: also how
    /// long a changed slot keeps its previous backend for the protocol's unrecorded flows.
    pub fn open_ns(&self, protocol: u8) -> u64 {
        let secs = if protocol == lb_common::PROTO_UDP {
            self.udp
        } else {
            self.tcp
        };
        secs as u64 * 1_000_000_000
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 300,
        }
    }
}

/// `[control]`: the local control API and the persisted admin state.
#[derive(Clone, Debug, PartialEq)]
pub struct Control {
    /// Unix socket of the control API (mode 0600).
    pub socket: PathBuf,
    /// Admin overrides (enable/disable/drain/weight), JSON, written atomically.
    pub state_file: PathBuf,
    /// Where Prometheus metrics are served over HTTP (`GET /metrics`); off when unset.
    pub metrics: Option<std::net::SocketAddr>,
    /// Members may use every request of the control API (root and `lb run`'s user always may).
    pub group: Option<crate::api::access::Group>,
    /// Members may use the read-only requests (status, explain, `lb top`).
    pub read_group: Option<crate::api::access::Group>,
}

impl Control {
    /// The group owning the socket file and its directory (mode 0660 / 0750): the read group
    /// (everyone who may connect at all must be in it), else the admin group; none: 0600/0700.
    pub fn socket_group(&self) -> Option<u32> {
        self.read_group
            .as_ref()
            .or(self.group.as_ref())
            .map(|g| g.gid)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Dataplane {
    pub interface: String,
    pub xdp_mode: XdpMode,
    pub flow_table_size: u32,
    /// Default table size of a service (`service.ring_size` overrides it).
    pub ring_size: u32,
    /// Slots of `LB_RING`, all services' tables together.
    pub ring_capacity: u32,
    /// Where the maps and the XDP link are pinned (a directory on a bpffs), so the data plane
    /// outlives `lb run`: default `/sys/fs/bpf/lb/<interface>`.
    pub pin_path: PathBuf,
    /// What to do about receive-VLAN offload when attached in native mode.
    pub rx_vlan_offload: RxVlanOffload,
    /// SYNs recorded a second per CPU through unchanged maglev/sh table slots of
    /// `record_connections = "at_syn"` services; beyond it they are forwarded by the slot
    /// without an entry (0: no limit).
    pub record_limit: u32,
    /// The SYNs of `record_connections = "at_syn"` maglev/sh services through unchanged slots
    /// are recorded by the controller from `LB_RECORD` instead of on the packet path (see
    /// [`lb_common::RecordEvent`]).
    pub defer_records: bool,
}

/// `dataplane.rx_vlan_offload`: with receive-VLAN offload on, a native XDP program never sees
/// 802.1Q tags and XDP_TX sends tagged traffic out untagged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RxVlanOffload {
    /// Turn it off at attach (`ethtool -K <if> rxvlan off`), logged.
    #[default]
    Off,
    /// Leave it as it is; a warning says what breaks (no VLAN-tagged VIP traffic here).
    Keep,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    /// 0 = every port.
    pub port: u16,
    pub protocol: Protocol,
    pub scheduler: Scheduler,
    /// What to do when no backend is healthy.
    pub fallback: Fallback,
    /// The VIP is announced (`[announce]`) while at least this many backends are healthy.
    pub min_healthy: u32,
    /// Slots of the service's table (`ring_size`, default `dataplane.ring_size`).
    pub ring_size: u32,
    /// When TCP connections enter the connection table (`record_connections`).
    pub record_connections: RecordConnections,
    pub backends: Vec<Backend>,
}

/// `record_connections`: when a TCP connection of a maglev/sh service is recorded in the
/// connection table (README, Stateless slots).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordConnections {
    /// At its SYN: active connections counted from the start, a connection keeps its backend
    /// through any number of table changes.
    #[default]
    AtSyn,
    /// Only once its table slot changes (as UDP flows): no table insert for a new connection
    /// through an unchanged slot, so a SYN flood cannot fill the table; active connections
    /// count the connections seen since their slot changed.
    OnChange,
}

impl RecordConnections {
    /// The config value.
    pub fn name(self) -> &'static str {
        match self {
            RecordConnections::AtSyn => "at_syn",
            RecordConnections::OnChange => "on_change",
        }
    }
}

/// `fallback`: a service whose backends are all down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Drop its traffic (counted as `drop_no_backend`).
    #[default]
    Drop,
    /// Send to every backend as if healthy (IPVS/keepalived's "all down: use them all").
    All,
}

/// Health check kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// No check: always up.
    #[default]
    None,
    /// TCP connect.
    Tcp,
    /// TCP half-open: a SYN from a raw socket; a SYN-ACK is up (the kernel answers it with a
    /// reset), a reset is down. No socket per check: the cheap way to check thousands of
    /// backends (see README, Health checks).
    Syn,
    /// HTTP GET `path`, expecting `expect_status`.
    Http,
    /// Send `payload`, expect any reply.
    Udp,
}

/// A backend's health check (service settings with the backend's overrides applied).
#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    pub kind: CheckKind,
    pub port: u16,
    pub path: String,
    pub expect_status: u16,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub rise: u32,
    pub fall: u32,
    pub payload: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    pub address: IpAddr,
    /// `None`: resolved through the kernel's neighbour table (see `neigh`).
    pub mac: Option<Mac>,
    pub weight: u16,
    /// Egress interface when it is not the one the program is attached to (XDP_REDIRECT).
    pub interface: Option<String>,
    pub health: Health,
}

// ---- raw TOML shape -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    dataplane: Option<RawDataplane>,
    control: Option<RawControl>,
    timeouts: Option<RawTimeouts>,
    #[serde(default)]
    service: Vec<RawService>,
    announce: Option<RawAnnounce>,
    flow_sync: Option<RawFlowSync>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnnounce {
    include_file: Option<PathBuf>,
    bird_socket: Option<PathBuf>,
    birdc: Option<PathBuf>,
    interface: Option<String>,
    local_as: Option<i64>,
    min_healthy: Option<i64>,
    graceful_prepend: Option<i64>,
    drain_quiet_ms: Option<i64>,
    drain_timeout_ms: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlowSync {
    listen: Option<String>,
    #[serde(default)]
    peers: Vec<String>,
    key: Option<String>,
    key_file: Option<PathBuf>,
    rate: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    interface: Option<String>,
    #[serde(default)]
    xdp_mode: XdpMode,
    flow_table_size: Option<i64>,
    ring_size: Option<i64>,
    ring_capacity: Option<i64>,
    pin_path: Option<PathBuf>,
    #[serde(default)]
    rx_vlan_offload: RxVlanOffload,
    record_limit: Option<i64>,
    defer_records: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    tcp: Option<i64>,
    tcp_fin: Option<i64>,
    udp: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<PathBuf>,
    state_file: Option<PathBuf>,
    metrics: Option<String>,
    group: Option<String>,
    read_group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<String>,
    vip: Option<String>,
    port: Option<i64>,
    protocol: Option<Protocol>,
    scheduler: Option<String>,
    fallback: Option<Fallback>,
    min_healthy: Option<i64>,
    ring_size: Option<i64>,
    record_connections: Option<RecordConnections>,
    health: Option<RawHealth>,
    #[serde(default)]
    backend: Vec<RawBackend>,
}

#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<CheckKind>,
    port: Option<i64>,
    path: Option<String>,
    expect_status: Option<i64>,
    interval_ms: Option<i64>,
    timeout_ms: Option<i64>,
    rise: Option<i64>,
    fall: Option<i64>,
    payload: Option<String>,
}

impl RawHealth {
    /// `self` with `over`'s fields taking precedence.
    fn merged(&self, over: &RawHealth) -> RawHealth {
        RawHealth {
            kind: over.kind.or(self.kind),
            port: over.port.or(self.port),
            path: over.path.clone().or_else(|| self.path.clone()),
            expect_status: over.expect_status.or(self.expect_status),
            interval_ms: over.interval_ms.or(self.interval_ms),
            timeout_ms: over.timeout_ms.or(self.timeout_ms),
            rise: over.rise.or(self.rise),
            fall: over.fall.or(self.fall),
            payload: over.payload.clone().or_else(|| self.payload.clone()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Option<String>,
    mac: Option<String>,
    weight: Option<i64>,
    interface: Option<String>,
    health: Option<RawHealth>,
}

impl Config {
    /// Reads and validates `path`: a regular file (a symlink to one is fine) of at most
    /// [`MAX_CONFIG_BYTES`], checked before reading (so `/dev/zero` or a FIFO is refused, not
    /// read until memory runs out).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read as _;
        let fail = |why: String| ConfigError {
            file: path.display().to_string(),
            location: String::new(),
            why,
        };
        let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        if !meta.is_file() {
            return Err(fail(
                "not a regular file (a config is read from a file, not a device, FIFO or directory)"
                    .into(),
            ));
        }
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(fail(format!(
                "{} bytes; a config may have at most {MAX_CONFIG_BYTES} (16 MiB)",
                meta.len()
            )));
        }
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| fail(format!("cannot read: {e}")))?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(fail(format!(
                "grew past {MAX_CONFIG_BYTES} bytes while being read"
            )));
        }
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: file.clone(),
            location: String::new(),
            why: bounded(e.to_string().trim_end()),
        })?;
        Validator {
            file,
            path: path.to_owned(),
        }
        .config(raw)
    }

    /// Valid but worth knowing: one line per finding (`lb check` prints them, `lb run` and
    /// reloads log them).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.services {
            if matches!(
                s.scheduler,
                Scheduler::Rr | Scheduler::Wrr | Scheduler::Lc | Scheduler::Wlc
            ) {
                out.push(format!(
                    "service \"{}\": {} decides per node (a cursor, connection counts): with several \
                     balancers behind ECMP, a connection the router moves to another node may land \
                     on another backend{}; maglev and sh pick the same backend on every node built \
                     from the same config (compare `ring_digest` in lb status)",
                    s.name,
                    s.scheduler.name(),
                    if self.flow_sync.is_some() {
                        " unless [flow_sync] shared it in time"
                    } else {
                        " (unless [flow_sync] shares the node's flows)"
                    }
                ));
            }
            if matches!(s.scheduler, Scheduler::Lc | Scheduler::Wlc)
                && s.backends.len() > LC_SCAN_WARN
            {
                out.push(format!(
                    "service \"{}\": {} scans all {} backends for every new flow (about 10–15 ns \
                     each on the reference machine, so ≈ {} µs per new flow); maglev costs the same \
                     for any number",
                    s.name,
                    s.scheduler.name(),
                    s.backends.len(),
                    s.backends.len() * 12 / 1000
                ));
            }
        }
        out
    }
}

/// Largest config file accepted (16 MiB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Longest `why` of a parse error: the TOML parser quotes the offending line, which may be
/// megabytes long.
const MAX_ERROR_CHARS: usize = 1000;

/// `why`, cut to [`MAX_ERROR_CHARS`] characters.
fn bounded(why: &str) -> String {
    if why.chars().count() <= MAX_ERROR_CHARS {
        return why.to_owned();
    }
    let mut s: String = why.chars().take(MAX_ERROR_CHARS).collect();
    s.push_str(" … (cut)");
    s
}

/// Above this many backends `lb check` warns about an lc/wlc service's per-new-flow scan.
pub const LC_SCAN_WARN: usize = 256;

struct Validator {
    file: String,
    path: PathBuf,
}

impl Validator {
    fn err(&self, location: impl Into<String>, why: impl Into<String>) -> ConfigError {
        let mut location = location.into();
        if !location.is_empty() {
            location.push_str(": ");
        }
        ConfigError {
            file: self.file.clone(),
            location,
            why: why.into(),
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let dp = raw.dataplane.ok_or_else(|| {
            self.err(
                "",
                "missing [dataplane] section (it needs at least `interface`)",
            )
        })?;
        let dataplane = self.dataplane(dp)?;
        let control = self.control(raw.control)?;
        let timeouts = self.timeouts(raw.timeouts)?;
        let announce = raw.announce.map(|a| self.announce(a)).transpose()?;
        // A service's min_healthy defaults to [announce] min_healthy, else 1.
        let default_min_healthy = announce.as_ref().map_or(1, |a| a.min_healthy);
        if raw.service.len() > MAX_SERVICES as usize {
            return Err(self.err(
                "service",
                format!(
                    "{} services; at most {MAX_SERVICES} are supported",
                    raw.service.len()
                ),
            ));
        }
        let mut names = HashSet::new();
        let mut keys = HashSet::new();
        let mut services = Vec::with_capacity(raw.service.len());
        let mut total_backends = 0usize;
        for (i, rs) in raw.service.into_iter().enumerate() {
            let s = self.service(i, rs, &dataplane, default_min_healthy)?;
            let loc = format!("service \"{}\"", s.name);
            if !names.insert(s.name.clone()) {
                return Err(self.err(format!("{loc}: name"), "duplicate service name"));
            }
            if !keys.insert((s.vip, s.port, s.protocol)) {
                return Err(self.err(
                    loc,
                    format!(
                        "another service already has vip {} port {} protocol {}",
                        s.vip, s.port, s.protocol
                    ),
                ));
            }
            total_backends += s.backends.len();
            services.push(s);
        }
        let slots: u64 = services.iter().map(|s| s.ring_size as u64).sum();
        if slots > dataplane.ring_capacity as u64 {
            return Err(self.err(
                "dataplane.ring_capacity",
                format!(
                    "{} services' tables need {slots} slots, the table array has {} \
                     (raise dataplane.ring_capacity, or give services a smaller ring_size)",
                    services.len(),
                    dataplane.ring_capacity
                ),
            ));
        }
        if total_backends > MAX_BACKENDS as usize {
            return Err(self.err(
                "service",
                format!("{total_backends} backends in all; at most {MAX_BACKENDS} are supported"),
            ));
        }
        let flow_sync = raw.flow_sync.map(|f| self.flow_sync(f)).transpose()?;
        Ok(Config {
            dataplane,
            control,
            timeouts,
            services,
            announce,
            flow_sync,
        })
    }

    fn announce(&self, a: RawAnnounce) -> Result<Announce, ConfigError> {
        let include_file = a.include_file.ok_or_else(|| {
            self.err(
                "announce.include_file",
                "required (the file lb writes for BIRD, e.g. \"/run/lb/bird-vips.conf\", included from bird.conf)",
            )
        })?;
        if !include_file.is_absolute() {
            return Err(self.err(
                "announce.include_file",
                format!("{} is not an absolute path", include_file.display()),
            ));
        }
        let interface = a.interface.unwrap_or_else(|| "lb-alive".to_owned());
        check_ifname(&interface).map_err(|why| self.err("announce.interface", why))?;
        let local_as = match a.local_as {
            None => {
                return Err(self.err(
                    "announce.local_as",
                    "required (this node's BGP AS number, prepended while a VIP drains)",
                ));
            }
            Some(n) if (1..=u32::MAX as i64).contains(&n) => n as u32,
            Some(n) => {
                return Err(self.err(
                    "announce.local_as",
                    format!("{n} is out of range 1..=4294967295"),
                ));
            }
        };
        let range = |key: &str, v: Option<i64>, default: u32, lo: i64, hi: i64| match v {
            None => Ok(default),
            Some(n) if (lo..=hi).contains(&n) => Ok(n as u32),
            Some(n) => Err(self.err(
                format!("announce.{key}"),
                format!("{n} is out of range {lo}..={hi}"),
            )),
        };
        let drain_quiet_ms = range("drain_quiet_ms", a.drain_quiet_ms, 2000, 100, 600_000)?;
        let drain_timeout_ms = range(
            "drain_timeout_ms",
            a.drain_timeout_ms,
            60_000,
            100,
            3_600_000,
        )?;
        if drain_timeout_ms < drain_quiet_ms {
            return Err(self.err(
                "announce.drain_timeout_ms",
                format!("{drain_timeout_ms} is below drain_quiet_ms ({drain_quiet_ms})"),
            ));
        }
        Ok(Announce {
            include_file,
            bird_socket: a
                .bird_socket
                .unwrap_or_else(|| PathBuf::from("/run/bird/bird.ctl")),
            birdc: a.birdc.unwrap_or_else(|| PathBuf::from("birdc")),
            interface,
            local_as,
            graceful_prepend: range("graceful_prepend", a.graceful_prepend, 3, 1, 16)?,
            min_healthy: range("min_healthy", a.min_healthy, 1, 0, 4096)?,
            drain_quiet_ms,
            drain_timeout_ms,
        })
    }

    fn flow_sync(&self, f: RawFlowSync) -> Result<FlowSync, ConfigError> {
        let addr = |key: &str, s: &str| {
            s.parse::<std::net::SocketAddr>().map_err(|_| {
                self.err(
                    format!("flow_sync.{key}"),
                    format!("`{s}` is not an address:port (e.g. \"10.99.0.2:4790\")"),
                )
            })
        };
        let listen = addr(
            "listen",
            f.listen.as_deref().ok_or_else(|| {
                self.err(
                    "flow_sync.listen",
                    "required (this node's address:port on the LB segment)",
                )
            })?,
        )?;
        let mut peers = Vec::with_capacity(f.peers.len());
        for p in &f.peers {
            let a = addr("peers", p)?;
            if a == listen || peers.contains(&a) {
                return Err(self.err(
                    "flow_sync.peers",
                    format!("{a} is listed twice (or is this node's own listen address)"),
                ));
            }
            peers.push(a);
        }
        if peers.len() > 64 {
            return Err(self.err("flow_sync.peers", "at most 64 peers"));
        }
        let key = match (f.key, f.key_file) {
            (Some(k), None) => k.into_bytes(),
            (None, Some(p)) => {
                let text = std::fs::read_to_string(&p).map_err(|e| {
                    self.err(
                        "flow_sync.key_file",
                        format!("cannot read {}: {e}", p.display()),
                    )
                })?;
                text.trim().as_bytes().to_vec()
            }
            _ => {
                return Err(self.err(
                    "flow_sync",
                    "exactly one of `key` and `key_file` (the shared secret of all nodes)",
                ));
            }
        };
        if key.len() < 16 {
            return Err(self.err(
                "flow_sync.key",
                format!(
                    "{} bytes; the shared key needs at least 16 (e.g. `openssl rand -hex 32`)",
                    key.len()
                ),
            ));
        }
        let rate = match f.rate {
            None => 20_000,
            Some(n) if (1..=1_000_000).contains(&n) => n as u32,
            Some(n) => {
                return Err(self.err(
                    "flow_sync.rate",
                    format!("{n} is out of range 1..=1000000 (new flows per second and CPU)"),
                ));
            }
        };
        Ok(FlowSync {
            listen,
            peers,
            key,
            rate,
        })
    }

    fn timeouts(&self, raw: Option<RawTimeouts>) -> Result<Timeouts, ConfigError> {
        let d = Timeouts::default();
        let Some(raw) = raw else { return Ok(d) };
        let check = |name: &str, v: Option<i64>, default: u32| match v {
            None => Ok(default),
            Some(n) if (1..=86400 * 7).contains(&n) => Ok(n as u32),
            Some(n) => Err(self.err(
                format!("timeouts.{name}"),
                format!("{n} is out of range 1..=604800 (seconds)"),
            )),
        };
        Ok(Timeouts {
            tcp: check("tcp", raw.tcp, d.tcp)?,
            tcp_fin: check("tcp_fin", raw.tcp_fin, d.tcp_fin)?,
            udp: check("udp", raw.udp, d.udp)?,
        })
    }

    fn control(&self, raw: Option<RawControl>) -> Result<Control, ConfigError> {
        let raw = raw.unwrap_or(RawControl {
            socket: None,
            state_file: None,
            metrics: None,
            group: None,
            read_group: None,
        });
        let socket = raw
            .socket
            .unwrap_or_else(|| PathBuf::from(crate::api::DEFAULT_SOCKET));
        if socket.as_os_str().is_empty() || socket.as_os_str().len() > 107 {
            return Err(self.err(
                "control.socket",
                "must be a path of 1..=107 bytes (Unix socket limit)",
            ));
        }
        // Default: next to the config file, `<stem>.state.json`.
        let state_file = raw.state_file.unwrap_or_else(|| {
            let stem = self
                .path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("lb");
            self.path.with_file_name(format!("{stem}.state.json"))
        });
        if state_file.as_os_str().is_empty() {
            return Err(self.err("control.state_file", "must not be empty"));
        }
        let metrics = match raw.metrics.as_deref() {
            None => None,
            Some(s) => Some(s.parse::<std::net::SocketAddr>().map_err(|_| {
                self.err(
                    "control.metrics",
                    format!(
                        "`{s}` is not an address:port to listen on (e.g. \"127.0.0.1:9470\" or \"[::1]:9470\")"
                    ),
                )
            })?),
        };
        let group = |key: &str, name: Option<String>| match name {
            None => Ok(None),
            Some(n) => match crate::api::access::group_id(&n) {
                Some(gid) => Ok(Some(crate::api::access::Group { name: n, gid })),
                None => Err(self.err(
                    format!("control.{key}"),
                    format!(
                        "no group `{n}` on this system (create it with groupadd, or remove the key)"
                    ),
                )),
            },
        };
        Ok(Control {
            socket,
            state_file,
            metrics,
            group: group("group", raw.group)?,
            read_group: group("read_group", raw.read_group)?,
        })
    }

    fn dataplane(&self, dp: RawDataplane) -> Result<Dataplane, ConfigError> {
        let interface = dp.interface.ok_or_else(|| {
            self.err(
                "dataplane.interface",
                "required (the interface to attach lb_xdp to)",
            )
        })?;
        check_ifname(&interface).map_err(|why| self.err("dataplane.interface", why))?;
        let flow_table_size = match dp.flow_table_size {
            None => DEFAULT_FLOW_TABLE_SIZE,
            Some(n) if (1024..=(1 << 28)).contains(&n) => n as u32,
            Some(n) => {
                return Err(self.err(
                    "dataplane.flow_table_size",
                    format!("{n} is out of range 1024..=268435456"),
                ));
            }
        };
        let ring_size = match dp.ring_size {
            None => DEFAULT_RING_SIZE,
            Some(n) => self.ring_size("dataplane.ring_size", n)?,
        };
        let ring_capacity = match dp.ring_capacity {
            None => DEFAULT_RING_CAPACITY.max(ring_size),
            Some(n) if (7..=MAX_RING_CAPACITY as i64).contains(&n) => n as u32,
            Some(n) => {
                return Err(self.err(
                    "dataplane.ring_capacity",
                    format!("{n} is out of range 7..={MAX_RING_CAPACITY}"),
                ));
            }
        };
        let pin_path = match dp.pin_path {
            None => PathBuf::from(DEFAULT_PIN_ROOT).join(&interface),
            Some(p) if !p.is_absolute() => {
                return Err(self.err(
                    "dataplane.pin_path",
                    format!("{} is not an absolute path", p.display()),
                ));
            }
            Some(p) => p,
        };
        let record_limit = match dp.record_limit {
            None => DEFAULT_RECORD_LIMIT,
            Some(n) if (0..=u32::MAX as i64).contains(&n) => n as u32,
            Some(n) => {
                return Err(self.err(
                    "dataplane.record_limit",
                    format!(
                        "{n} is out of range 0..={} (SYNs recorded a second per CPU; 0: no limit)",
                        u32::MAX
                    ),
                ));
            }
        };
        Ok(Dataplane {
            interface,
            xdp_mode: dp.xdp_mode,
            flow_table_size,
            ring_size,
            ring_capacity,
            pin_path,
            rx_vlan_offload: dp.rx_vlan_offload,
            record_limit,
            defer_records: dp
                .defer_records
                .unwrap_or(lb_common::limits::DEFAULT_DEFER_RECORDS),
        })
    }

    fn service(
        &self,
        index: usize,
        rs: RawService,
        dp: &Dataplane,
        default_min_healthy: u32,
    ) -> Result<Service, ConfigError> {
        let name = rs
            .name
            .ok_or_else(|| self.err(format!("service #{}", index + 1), "name: required"))?;
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(self.err(
                format!("service #{}: name", index + 1),
                format!("`{name}` must be 1..=64 characters of [A-Za-z0-9._-]"),
            ));
        }
        let loc = format!("service \"{name}\"");
        let vip_s = rs
            .vip
            .ok_or_else(|| self.err(format!("{loc}: vip"), "required"))?;
        let vip: IpAddr = vip_s.parse().map_err(|_| {
            self.err(
                format!("{loc}: vip"),
                format!("`{vip_s}` is not an IPv4 or IPv6 address"),
            )
        })?;
        if vip.is_unspecified() || vip.is_multicast() || vip.is_loopback() {
            return Err(self.err(
                format!("{loc}: vip"),
                format!("{vip} cannot be a VIP (unspecified, multicast or loopback)"),
            ));
        }
        let port = match rs.port {
            None => return Err(self.err(format!("{loc}: port"), "required (0 = every port)")),
            Some(p) if (0..=65535).contains(&p) => p as u16,
            Some(p) => {
                return Err(self.err(
                    format!("{loc}: port"),
                    format!("{p} is out of range 0..=65535"),
                ));
            }
        };
        let protocol = rs
            .protocol
            .ok_or_else(|| self.err(format!("{loc}: protocol"), "required (tcp or udp)"))?;
        let scheduler = match rs.scheduler.as_deref() {
            None => Scheduler::Maglev,
            Some(name) => Scheduler::parse(name).ok_or_else(|| {
                self.err(
                    format!("{loc}: scheduler"),
                    format!("`{name}` is not a scheduler (one of: {})", Scheduler::NAMES),
                )
            })?,
        };
        let svc_health = rs.health.clone().unwrap_or_default();
        // Validate the service's own settings even without backends.
        self.health(&loc, &svc_health, port)?;
        let mut addrs = HashSet::new();
        let mut backends = Vec::with_capacity(rs.backend.len());
        for (j, rb) in rs.backend.into_iter().enumerate() {
            let b = self.backend(&loc, j, rb, dp, &svc_health, port)?;
            if !addrs.insert(b.address) {
                return Err(self.err(
                    format!("{loc}: backend \"{}\": address", b.address),
                    "duplicate backend address in this service",
                ));
            }
            backends.push(b);
        }
        let ring_size = match rs.ring_size {
            None => dp.ring_size,
            Some(n) => self.ring_size(&format!("{loc}: ring_size"), n)?,
        };
        if backends.len() as u64 > ring_size as u64 / 10 {
            return Err(self.err(
                format!("{loc}: backend"),
                format!(
                    "{} backends for a ring of {ring_size} slots; Maglev needs ring_size ≥ 10 × backends (raise the service's ring_size or dataplane.ring_size)",
                    backends.len(),
                ),
            ));
        }
        let min_healthy = match rs.min_healthy {
            None => default_min_healthy.min(backends.len().max(1) as u32),
            Some(n) if n >= 0 && n as u64 <= backends.len().max(1) as u64 => n as u32,
            Some(n) => {
                return Err(self.err(
                    format!("{loc}: min_healthy"),
                    format!(
                        "{n} is out of range 0..={} (the service's backends; more would never announce the VIP)",
                        backends.len().max(1)
                    ),
                ));
            }
        };
        let record_connections = rs.record_connections.unwrap_or_default();
        if record_connections == RecordConnections::OnChange
            && (protocol != Protocol::Tcp
                || !matches!(scheduler, Scheduler::Maglev | Scheduler::Sh))
        {
            return Err(self.err(
                format!("{loc}: record_connections"),
                "\"on_change\" needs a tcp service with the maglev or sh scheduler (UDP flows of maglev/sh are always recorded on change; the other schedulers need every connection in the table)",
            ));
        }
        Ok(Service {
            name,
            vip,
            port,
            protocol,
            scheduler,
            fallback: rs.fallback.unwrap_or_default(),
            min_healthy,
            ring_size,
            record_connections,
            backends,
        })
    }

    /// A table size: a prime in 7..=MAX_RING_SIZE.
    fn ring_size(&self, field: &str, n: i64) -> Result<u32, ConfigError> {
        if !(7..=MAX_RING_SIZE as i64).contains(&n) {
            return Err(self.err(field, format!("{n} is out of range 7..={MAX_RING_SIZE}")));
        }
        if !is_prime(n as u64) {
            return Err(self.err(
                field,
                format!("{n} is not a prime (Maglev needs a prime table size, e.g. 65537)"),
            ));
        }
        Ok(n as u32)
    }

    fn backend(
        &self,
        svc_loc: &str,
        index: usize,
        rb: RawBackend,
        dp: &Dataplane,
        svc_health: &RawHealth,
        svc_port: u16,
    ) -> Result<Backend, ConfigError> {
        let addr_s = rb.address.ok_or_else(|| {
            self.err(
                format!("{svc_loc}: backend #{}: address", index + 1),
                "required",
            )
        })?;
        let address: IpAddr = addr_s.parse().map_err(|_| {
            self.err(
                format!("{svc_loc}: backend #{}: address", index + 1),
                format!("`{addr_s}` is not an IPv4 or IPv6 address"),
            )
        })?;
        let loc = format!("{svc_loc}: backend \"{address}\"");
        let mac = match rb.mac {
            None => None,
            Some(mac_s) => {
                let mac: Mac = mac_s
                    .parse()
                    .map_err(|why: String| self.err(format!("{loc}: mac"), why))?;
                if mac.0 == [0; 6] || mac.0[0] & 1 == 1 {
                    return Err(self.err(
                        format!("{loc}: mac"),
                        format!("{mac} is not a unicast MAC address"),
                    ));
                }
                Some(mac)
            }
        };
        let weight = match rb.weight {
            None => 100,
            Some(w) if (0..=65535).contains(&w) => w as u16,
            Some(w) => {
                return Err(self.err(
                    format!("{loc}: weight"),
                    format!("{w} is out of range 0..=65535"),
                ));
            }
        };
        let interface = match rb.interface {
            Some(i) if i == dp.interface => None,
            Some(i) => {
                check_ifname(&i).map_err(|why| self.err(format!("{loc}: interface"), why))?;
                Some(i)
            }
            None => None,
        };
        let raw_health = match &rb.health {
            Some(h) => svc_health.merged(h),
            None => svc_health.clone(),
        };
        let health = self.health(&loc, &raw_health, svc_port)?;
        Ok(Backend {
            address,
            mac,
            weight,
            interface,
            health,
        })
    }

    fn health(&self, loc: &str, h: &RawHealth, svc_port: u16) -> Result<Health, ConfigError> {
        let at = |field: &str| format!("{loc}: health.{field}");
        let kind = h.kind.unwrap_or_default();
        let int =
            |field: &str, v: Option<i64>, default: i64, range: std::ops::RangeInclusive<i64>| {
                let v = v.unwrap_or(default);
                if range.contains(&v) {
                    Ok(v)
                } else {
                    Err(self.err(
                        at(field),
                        format!("{v} is out of range {}..={}", range.start(), range.end()),
                    ))
                }
            };
        let port = match h.port {
            Some(p) => int("port", Some(p), 0, 1..=65535)? as u16,
            None if svc_port == 0 && kind != CheckKind::None => {
                return Err(self.err(
                    at("port"),
                    "required: the service listens on every port (port = 0)",
                ));
            }
            None => svc_port,
        };
        let interval_ms = int("interval_ms", h.interval_ms, 1000, 100..=3_600_000)? as u32;
        let timeout_ms = int("timeout_ms", h.timeout_ms, 500, 10..=3_600_000)? as u32;
        if timeout_ms > interval_ms {
            return Err(self.err(
                at("timeout_ms"),
                format!("{timeout_ms} ms is longer than interval_ms ({interval_ms} ms)"),
            ));
        }
        let path = h.path.clone().unwrap_or_else(|| "/".to_owned());
        if !path.starts_with('/') || path.contains(char::is_whitespace) {
            return Err(self.err(
                at("path"),
                format!("`{path}` must start with '/' and contain no spaces"),
            ));
        }
        Ok(Health {
            kind,
            port,
            path,
            expect_status: int("expect_status", h.expect_status, 200, 100..=599)? as u16,
            interval_ms,
            timeout_ms,
            rise: int("rise", h.rise, 2, 1..=100)? as u32,
            fall: int("fall", h.fall, 2, 1..=100)? as u32,
            payload: h.payload.clone().unwrap_or_else(|| "ping".to_owned()),
        })
    }
}

fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 15
        || name.contains(['/', ' '])
        || name == "."
        || name == ".."
    {
        return Err(format!(
            "`{name}` is not a valid interface name (1..=15 characters, no '/' or space)"
        ));
    }
    Ok(())
}

/// Deterministic primality test (trial division; ring sizes are small).
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Default config path shown in help texts.
/// Where `dataplane.pin_path` defaults to (then `/<interface>`).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/lb";

pub fn default_path() -> PathBuf {
    PathBuf::from("/etc/lb/lb.toml")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[dataplane]
interface = "eth0"
xdp_mode = "native"
flow_table_size = 65536
ring_size = 65537

[[service]]
name = "web"
vip = "10.99.0.100"
port = 80
protocol = "tcp"
scheduler = "maglev"

[[service.backend]]
address = "10.99.0.21"
mac = "02:00:00:00:00:21"
weight = 100

[[service.backend]]
address = "10.99.0.22"
mac = "02:00:00:00:00:22"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("lb.toml"))
    }

    /// Replaces `from` by `to` in the good config and returns the error message.
    fn err_of(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "test bug: {from:?} not in GOOD");
        parse(&GOOD.replacen(from, to, 1))
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn announce_flow_sync_and_min_healthy() {
        let c = parse(GOOD).unwrap();
        assert!(
            c.announce.is_none() && c.flow_sync.is_none(),
            "off unless configured"
        );
        assert_eq!(c.services[0].min_healthy, 1, "default");
        let more = format!(
            "{GOOD}\n[announce]\ninclude_file = \"/run/lb/bird/lb-vips.conf\"\nlocal_as = 65001\n\n\
             [flow_sync]\nlisten = \"10.0.0.2:4790\"\npeers = [\"10.0.0.3:4790\"]\nkey = \"0123456789abcdef\"\n"
        );
        let c = parse(&more).unwrap();
        let a = c.announce.unwrap();
        assert_eq!(a.interface, "lb-alive");
        assert_eq!(a.bird_socket, PathBuf::from("/run/bird/bird.ctl"));
        assert_eq!(
            (a.graceful_prepend, a.drain_quiet_ms, a.drain_timeout_ms),
            (3, 2000, 60000)
        );
        let f = c.flow_sync.unwrap();
        assert_eq!(f.peers.len(), 1);
        assert_eq!(f.rate, 20_000);
        assert!(
            !format!("{f:?}").contains("0123456789abcdef"),
            "the key is not logged"
        );
        let bad = |from: &str, to: &str| {
            parse(&more.replacen(from, to, 1))
                .expect_err("must be rejected")
                .to_string()
        };
        let e = bad("local_as = 65001\n", "");
        assert!(e.contains("announce.local_as: required"), "{e}");
        let e = bad(
            "include_file = \"/run/lb/bird/lb-vips.conf\"",
            "include_file = \"vips.conf\"",
        );
        assert!(
            e.contains("announce.include_file: vips.conf is not an absolute path"),
            "{e}"
        );
        let e = bad("key = \"0123456789abcdef\"", "key = \"short\"");
        assert!(
            e.contains("flow_sync.key: 5 bytes; the shared key needs at least 16"),
            "{e}"
        );
        let e = bad("peers = [\"10.0.0.3:4790\"]", "peers = [\"10.0.0.2:4790\"]");
        assert!(e.contains("flow_sync.peers"), "{e}");
        let e = bad("listen = \"10.0.0.2:4790\"", "listen = \"nowhere\"");
        assert!(
            e.contains("flow_sync.listen: `nowhere` is not an address:port"),
            "{e}"
        );
        let e = bad("key = \"0123456789abcdef\"\n", "");
        assert!(e.contains("exactly one of `key` and `key_file`"), "{e}");
        let with_default = more.replace("local_as = 65001", "local_as = 65001\nmin_healthy = 2");
        assert_eq!(
            parse(&with_default).unwrap().services[0].min_healthy,
            2,
            "[announce] default"
        );
        let e = err_of("protocol = \"tcp\"", "protocol = \"tcp\"\nmin_healthy = 9");
        assert!(e.contains("min_healthy: 9 is out of range 0..="), "{e}");
    }

    #[test]
    fn defer_records_is_on_by_default_and_can_be_turned_off() {
        let c = parse("[dataplane]\ninterface = \"eth0\"\n").unwrap();
        assert!(c.dataplane.defer_records);
        let c = parse("[dataplane]\ninterface = \"eth0\"\ndefer_records = false\n").unwrap();
        assert!(!c.dataplane.defer_records);
        let e = parse("[dataplane]\ninterface = \"eth0\"\ndefer_records = 1\n").unwrap_err();
        assert!(e.to_string().contains("defer_records"), "{e}");
    }

    #[test]
    fn record_limit_is_read_and_zero_turns_it_off() {
        let c = parse("[dataplane]\ninterface = \"eth0\"\nrecord_limit = 0\n").unwrap();
        assert_eq!(c.dataplane.record_limit, 0);
        let c = parse("[dataplane]\ninterface = \"eth0\"\nrecord_limit = 250000\n").unwrap();
        assert_eq!(c.dataplane.record_limit, 250_000);
    }

    #[test]
    fn good_config_parses_with_all_fields() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.dataplane.interface, "eth0");
        assert_eq!(c.dataplane.xdp_mode, XdpMode::Native);
        assert_eq!(c.dataplane.flow_table_size, 65536);
        assert_eq!(c.dataplane.ring_size, 65537);
        let s = &c.services[0];
        assert_eq!(
            (s.name.as_str(), s.port, s.protocol),
            ("web", 80, Protocol::Tcp)
        );
        assert_eq!(s.vip, "10.99.0.100".parse::<IpAddr>().unwrap());
        assert_eq!(s.backends[0].mac, Some(Mac([2, 0, 0, 0, 0, 0x21])));
        assert_eq!(s.backends[1].weight, 100, "default weight");
    }

    /// Not a regular file, or too big: refused before reading. A huge invalid line is not
    /// echoed back whole.
    #[test]
    fn hostile_files_are_refused_cheaply() {
        let e = Config::load(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let dir = std::env::temp_dir().join(format!("lb-cfg-size-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Config::load(&dir).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let big = dir.join("big.toml");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_CONFIG_BYTES + 1).unwrap();
        let e = Config::load(&big).unwrap_err().to_string();
        assert!(e.contains("at most 16777216 (16 MiB)"), "{e}");
        let line = dir.join("line.toml");
        std::fs::write(&line, format!("x = \"{}", "a".repeat(2_000_000))).unwrap();
        let e = Config::load(&line).unwrap_err().to_string();
        assert!(e.len() < 2000, "{} bytes of error", e.len());
        assert!(e.contains("(cut)"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn control_groups_are_resolved() {
        let c = parse(&format!(
            "{GOOD}\n[control]\ngroup = \"root\"\nread_group = \"root\"\n"
        ))
        .unwrap();
        assert_eq!(c.control.group.as_ref().map(|g| g.gid), Some(0));
        assert_eq!(c.control.socket_group(), Some(0));
        let e = parse(&format!(
            "{GOOD}\n[control]\nread_group = \"no-such-lb-group\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("control.read_group: no group `no-such-lb-group` on this system"),
            "{e}"
        );
    }

    /// No backend cap for lc/wlc (the data plane scans with bpf_loop); large scans are named.
    #[test]
    fn large_lc_services_are_valid_and_warned_about() {
        let svc = |sched: &str, n: usize| {
            let mut t = format!(
                "[dataplane]\ninterface = \"eth0\"\n[[service]]\nname = \"s\"\nvip = \"10.9.0.1\"\nport = 80\nprotocol = \"tcp\"\nscheduler = \"{sched}\"\n"
            );
            for i in 0..n {
                t += &format!(
                    "[[service.backend]]\naddress = \"10.8.{}.{}\"\nmac = \"02:00:00:00:00:01\"\n",
                    i / 250,
                    1 + i % 250
                );
            }
            parse(&t).unwrap()
        };
        let scan = |w: Vec<String>| {
            w.into_iter()
                .filter(|w| w.contains("scans all"))
                .collect::<Vec<_>>()
        };
        let w = scan(svc("wlc", 1000).warnings());
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("wlc scans all 1000 backends"), "{w:?}");
        assert!(scan(svc("lc", 256).warnings()).is_empty());
        assert!(svc("maglev", 1000).warnings().is_empty());
        // Per-node schedulers are named for multi-node setups; maglev and sh are not.
        for (sched, warned) in [
            ("rr", true),
            ("wrr", true),
            ("lc", true),
            ("wlc", true),
            ("sh", false),
        ] {
            let w = svc(sched, 3).warnings();
            assert_eq!(
                w.iter().any(|w| w.contains("decides per node")),
                warned,
                "{sched}: {w:?}"
            );
        }
    }

    #[test]
    fn shipped_example_is_valid() {
        let text = include_str!("../../lb.example.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[1].port, 0);
    }

    #[test]
    fn health_defaults_overrides_and_errors() {
        let c = parse(GOOD).unwrap();
        let h = &c.services[0].backends[0].health;
        assert_eq!(h.kind, CheckKind::None, "no checks unless configured");
        assert_eq!(
            (h.port, h.interval_ms, h.timeout_ms, h.rise, h.fall),
            (80, 1000, 500, 2, 2)
        );
        assert_eq!(c.services[0].fallback, Fallback::Drop);
        assert_eq!(c.services[0].record_connections, RecordConnections::AtSyn);
        let on_change = GOOD.replace(
            "scheduler = \"maglev\"",
            "scheduler = \"sh\"\nrecord_connections = \"on_change\"",
        );
        assert_eq!(
            parse(&on_change).unwrap().services[0].record_connections,
            RecordConnections::OnChange
        );
        let with = GOOD.replacen(
            "scheduler = \"maglev\"\n",
            "scheduler = \"maglev\"\nfallback = \"all\"\n\n[service.health]\nkind = \"http\"\npath = \"/healthz\"\nfall = 3\n",
            1,
        );
        let with = with.replacen(
            "weight = 100\n",
            "weight = 100\nhealth = { kind = \"tcp\", port = 8080 }\n",
            1,
        );
        let c = parse(&with).unwrap();
        let (b0, b1) = (
            &c.services[0].backends[0].health,
            &c.services[0].backends[1].health,
        );
        assert_eq!(
            (b0.kind, b0.port, b0.fall, b0.path.as_str()),
            (CheckKind::Tcp, 8080, 3, "/healthz")
        );
        assert_eq!((b1.kind, b1.port, b1.fall), (CheckKind::Http, 80, 3));
        assert_eq!(c.services[0].fallback, Fallback::All);
        let bad = |extra: &str| {
            parse(&GOOD.replacen(
                "scheduler = \"maglev\"\n",
                &format!("scheduler = \"maglev\"\n\n[service.health]\nkind = \"tcp\"\n{extra}"),
                1,
            ))
            .unwrap_err()
            .to_string()
        };
        assert!(
            bad("timeout_ms = 2000\n")
                .contains("service \"web\": health.timeout_ms: 2000 ms is longer than interval_ms")
        );
        assert!(bad("rise = 0\n").contains("health.rise: 0 is out of range 1..=100"));
        assert!(bad("path = \"healthz\"\n").contains("health.path: `healthz` must start with '/'"));
        assert!(
            bad("kind = \"icmp\"\n").contains("unknown variant `icmp`")
                || bad("kind = \"icmp\"\n").contains("duplicate key")
        );
        let allports = GOOD.replace("port = 80", "port = 0").replacen(
            "scheduler = \"maglev\"\n",
            "scheduler = \"maglev\"\n\n[service.health]\nkind = \"tcp\"\n",
            1,
        );
        let e = parse(&allports).unwrap_err().to_string();
        assert!(
            e.contains("health.port: required: the service listens on every port"),
            "{e}"
        );
    }

    #[test]
    fn timeouts_defaults_and_range() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            c.timeouts,
            Timeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 300
            }
        );
        let c = parse(&format!("{GOOD}\n[timeouts]\nudp = 5\n")).unwrap();
        assert_eq!(c.timeouts.udp, 5);
        assert_eq!(c.timeouts.tcp, 900);
        let e = parse(&format!("{GOOD}\n[timeouts]\ntcp = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("timeouts.tcp: 0 is out of range"), "{e}");
    }

    #[test]
    fn control_defaults_and_overrides() {
        let c = Config::parse(GOOD, Path::new("/etc/lb/lb.toml")).unwrap();
        assert_eq!(c.control.socket, PathBuf::from("/run/lb/lb.sock"));
        assert_eq!(c.control.state_file, PathBuf::from("/etc/lb/lb.state.json"));
        let c = parse(&format!(
            "{GOOD}\n[control]\nsocket = \"/tmp/x.sock\"\nstate_file = \"/var/lib/lb/s.json\"\n"
        ))
        .unwrap();
        assert_eq!(c.control.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.control.state_file, PathBuf::from("/var/lib/lb/s.json"));
        let e = parse(&format!("{GOOD}\n[control]\nsocket = \"\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("control.socket: must be a path"), "{e}");
        assert_eq!(c.control.metrics, None, "metrics off by default");
        let c = parse(&format!(
            "{GOOD}\n[control]\nmetrics = \"127.0.0.1:9470\"\n"
        ))
        .unwrap();
        assert_eq!(c.control.metrics, Some("127.0.0.1:9470".parse().unwrap()));
        let e = parse(&format!("{GOOD}\n[control]\nmetrics = \"localhost\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("control.metrics: `localhost` is not an address:port"),
            "{e}"
        );
    }

    #[test]
    fn defaults_apply() {
        let c = parse("[dataplane]\ninterface = \"eth0\"\n").unwrap();
        assert_eq!(c.dataplane.xdp_mode, XdpMode::Auto);
        assert_eq!(c.dataplane.flow_table_size, DEFAULT_FLOW_TABLE_SIZE);
        assert_eq!(c.dataplane.ring_size, DEFAULT_RING_SIZE);
        assert_eq!(c.dataplane.record_limit, DEFAULT_RECORD_LIMIT);
        assert!(c.services.is_empty());
    }

    #[test]
    fn ipv6_vip_and_all_ports() {
        let c = parse(
            &GOOD
                .replace("10.99.0.100", "fd00:99::100")
                .replace("port = 80", "port = 0"),
        )
        .unwrap();
        assert!(c.services[0].vip.is_ipv6());
        assert_eq!(c.services[0].port, 0);
    }

    #[test]
    fn errors_name_file_service_field_and_reason() {
        let cases = [
            (
                "interface = \"eth0\"\n",
                "",
                "lb.toml: dataplane.interface: required",
            ),
            (
                "xdp_mode = \"native\"",
                "xdp_mode = \"turbo\"",
                "unknown variant `turbo`",
            ),
            (
                "ring_size = 65537",
                "ring_size = 65536",
                "lb.toml: dataplane.ring_size: 65536 is not a prime",
            ),
            (
                "ring_size = 65537",
                "ring_size = 5",
                "dataplane.ring_size: 5 is out of range",
            ),
            (
                "scheduler = \"maglev\"",
                "scheduler = \"maglev\"\nring_size = 4097",
                "lb.toml: service \"web\": ring_size: 4097 is not a prime",
            ),
            (
                "scheduler = \"maglev\"",
                "scheduler = \"maglev\"\nring_size = 11",
                "service \"web\": backend: 2 backends for a ring of 11 slots",
            ),
            (
                "scheduler = \"maglev\"",
                "scheduler = \"rr\"\nrecord_connections = \"on_change\"",
                "lb.toml: service \"web\": record_connections: \"on_change\" needs a tcp service with the maglev or sh scheduler",
            ),
            (
                "protocol = \"tcp\"",
                "protocol = \"udp\"\nrecord_connections = \"on_change\"",
                "lb.toml: service \"web\": record_connections: \"on_change\" needs a tcp service",
            ),
            (
                "scheduler = \"maglev\"",
                "scheduler = \"maglev\"\nrecord_connections = \"always\"",
                "unknown variant `always`, expected `at_syn` or `on_change`",
            ),
            (
                "ring_size = 65537",
                "ring_size = 65537\nring_capacity = 65536",
                "lb.toml: dataplane.ring_capacity: 1 services' tables need 65537 slots, the table array has 65536",
            ),
            (
                "flow_table_size = 65536",
                "flow_table_size = 10",
                "dataplane.flow_table_size: 10 is out of range",
            ),
            (
                "flow_table_size = 65536",
                "flow_table_size = 65536\nrecord_limit = -1",
                "lb.toml: dataplane.record_limit: -1 is out of range 0..=4294967295",
            ),
            (
                "vip = \"10.99.0.100\"",
                "vip = \"10.99.0.300\"",
                "service \"web\": vip: `10.99.0.300` is not an IPv4 or IPv6 address",
            ),
            (
                "vip = \"10.99.0.100\"",
                "vip = \"224.0.0.1\"",
                "service \"web\": vip: 224.0.0.1 cannot be a VIP",
            ),
            (
                "port = 80",
                "port = 70000",
                "service \"web\": port: 70000 is out of range 0..=65535",
            ),
            (
                "protocol = \"tcp\"",
                "protocol = \"sctp\"",
                "unknown variant `sctp`",
            ),
            (
                "scheduler = \"maglev\"",
                "scheduler = \"random\"",
                "service \"web\": scheduler: `random` is not a scheduler (one of: maglev, sh, rr, wrr, lc, wlc)",
            ),
            (
                "mac = \"02:00:00:00:00:21\"",
                "mac = \"02:00:00:00:21\"",
                "service \"web\": backend \"10.99.0.21\": mac: `02:00:00:00:21` is not a MAC address",
            ),
            (
                "mac = \"02:00:00:00:00:21\"",
                "mac = \"01:00:5e:00:00:01\"",
                "backend \"10.99.0.21\": mac: 01:00:5e:00:00:01 is not a unicast MAC",
            ),
            (
                "weight = 100",
                "weight = 65536",
                "service \"web\": backend \"10.99.0.21\": weight: 65536 is out of range 0..=65535",
            ),
            ("weight = 100", "weight = -1", "weight: -1 is out of range"),
            (
                "address = \"10.99.0.22\"",
                "address = \"10.99.0.21\"",
                "service \"web\": backend \"10.99.0.21\": address: duplicate backend address",
            ),
            (
                "address = \"10.99.0.21\"",
                "address = \"backend1\"",
                "service \"web\": backend #1: address: `backend1` is not an IPv4 or IPv6 address",
            ),
            (
                "name = \"web\"",
                "name = \"web app\"",
                "service #1: name: `web app` must be",
            ),
            (
                "weight = 100",
                "weight = 100\ncolour = \"red\"",
                "unknown field `colour`",
            ),
        ];
        for (from, to, want) in cases {
            let got = err_of(from, to);
            assert!(
                got.contains(want),
                "replacing {from:?} by {to:?}:\n got: {got}\nwant: …{want}…"
            );
            assert!(got.starts_with("lb.toml: "), "no file name in: {got}");
        }
    }

    #[test]
    fn mac_is_optional() {
        let c = parse(&GOOD.replacen("mac = \"02:00:00:00:00:21\"\n", "", 1)).unwrap();
        assert_eq!(c.services[0].backends[0].mac, None, "resolved at run time");
    }

    #[test]
    fn duplicate_names_and_keys_are_rejected() {
        let second = r#"
[[service]]
name = "web"
vip = "10.99.0.101"
port = 80
protocol = "tcp"
"#;
        let got = parse(&format!("{GOOD}{second}")).unwrap_err().to_string();
        assert!(
            got.contains("service \"web\": name: duplicate service name"),
            "{got}"
        );
        let third = second
            .replace("\"web\"", "\"web2\"")
            .replace("10.99.0.101", "10.99.0.100");
        let got = parse(&format!("{GOOD}{third}")).unwrap_err().to_string();
        assert!(
            got.contains(
                "service \"web2\": another service already has vip 10.99.0.100 port 80 protocol tcp"
            ),
            "{got}"
        );
        // Same VIP and port, other protocol: fine.
        let udp = third.replace("\"tcp\"", "\"udp\"");
        parse(&format!("{GOOD}{udp}")).unwrap();
    }

    #[test]
    fn ring_must_be_much_larger_than_backend_count() {
        let text = GOOD.replace("ring_size = 65537", "ring_size = 13");
        let got = parse(&text).unwrap_err().to_string();
        assert!(got.contains("ring_size ≥ 10 × backends"), "{got}");
    }

    #[test]
    fn mac_parse_and_display_round_trip() {
        let m: Mac = "02:AB:cd:00:00:21".parse().unwrap();
        assert_eq!(m.to_string(), "02:ab:cd:00:00:21");
        assert!("02:ab:cd:00:00:21:00".parse::<Mac>().is_err());
        assert!("02:ab:cd:00:00:2".parse::<Mac>().is_err());
        assert!("zz:ab:cd:00:00:21".parse::<Mac>().is_err());
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(7) && is_prime(251) && is_prime(1_048_573));
        assert!(!is_prime(65536) && !is_prime(1) && !is_prime(9));
    }
}

/// Fuzzing the config parser (a proptest harness; `LB_FUZZ_CASES` sets the number of cases,
/// CI runs the default): any text, and valid configs with bytes overwritten, parse or fail
/// with a bounded message, never panic.
#[cfg(test)]
mod fuzz {
    use proptest::{prelude::*, test_runner::Config as RunnerConfig};

    use super::*;

    fn cases() -> u32 {
        crate::fuzz_cases(2000)
    }

    const VALID: &str = include_str!("../../lb.example.toml");

    proptest! {
        #![proptest_config(RunnerConfig { cases: cases(), failure_persistence: None, ..RunnerConfig::default() })]

        #[test]
        fn any_text(text in ".{0,400}") {
            if let Err(e) = Config::parse(&text, Path::new("fuzz.toml")) {
                prop_assert!(e.to_string().len() < 3000);
            }
        }

        #[test]
        fn mutated_valid_configs(edits in prop::collection::vec((0usize..4000, any::<u8>()), 1..6)) {
            let mut bytes = VALID.as_bytes().to_vec();
            for (pos, b) in edits {
                let n = bytes.len();
                bytes[pos % n] = b;
            }
            let text = String::from_utf8_lossy(&bytes);
            if let Err(e) = Config::parse(&text, Path::new("fuzz.toml")) {
                prop_assert!(e.to_string().len() < 3000);
            }
        }
    }
}
