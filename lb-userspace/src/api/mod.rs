//! The control API: JSON types shared by the daemon (`lb run`) and the CLI.
//!
//! HTTP/1.1 over a Unix socket (default `/run/lb/lb.sock`, mode 0600):
//! - `GET  /v1/status` → [`Status`]
//! - `POST /v1/backends/{service}/{address}/enable|disable|drain` → [`Message`]
//! - `POST /v1/backends/{service}/{address}/weight` with `{"weight": N}` → [`Message`]
//! - `POST /v1/reload` → [`Message`]
//! - `GET  /v1/explain/{tcp|udp}/{client}/{client_port}/{vip}/{port}` → [`Explain`]
//!
//! Errors: a non-2xx status with `{"error": "..."}` (every error, unknown paths and methods and
//! oversized bodies included). Who may call what: [`access`].

pub mod access;
pub mod client;
pub mod server;

use std::net::IpAddr;

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};

/// An API error: HTTP status and message (sent as `{"error": message}`).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// What `POST /v1/backends/{service}/{address}/{action}` asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendAction {
    Enable,
    Disable,
    Drain,
    Weight(u16),
}

impl std::fmt::Display for BackendAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendAction::Enable => f.write_str("enable"),
            BackendAction::Disable => f.write_str("disable"),
            BackendAction::Drain => f.write_str("drain"),
            BackendAction::Weight(w) => write!(f, "weight {w}"),
        }
    }
}

/// Default control socket.
pub const DEFAULT_SOCKET: &str = "/run/lb/lb.sock";

/// Administrative state of a backend, set by `lb backend ...` and persisted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    /// Normal: takes new flows by weight.
    #[default]
    Enabled,
    /// No new flows; existing flows stay until they end.
    Draining,
    /// No new flows, and existing flows are moved to other backends at their next packet.
    Disabled,
}

impl std::fmt::Display for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Admin::Enabled => "enabled",
            Admin::Draining => "draining",
            Admin::Disabled => "disabled",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub interface: String,
    pub xdp_mode: String,
    pub uptime_seconds: u64,
    pub config: String,
    pub state_file: String,
    /// Where the data plane is pinned (`dataplane.pin_path`).
    #[serde(default)]
    pub pin_path: String,
    /// This controller took over a pinned data plane (replacing its program in place) rather
    /// than attaching a new one.
    #[serde(default)]
    pub adopted: bool,
    pub services: Vec<ServiceStatus>,
    /// Connection table entries at the last sweep.
    pub flow_entries: u64,
    /// Idle flows removed by the sweeper since start (`[timeouts]`).
    pub flows_expired: u64,
    /// Active connections the sweep subtracted since start beyond its expiries: counted
    /// connections whose entries were gone (evicted by the LRU when the table was full; a few
    /// may be connections that closed while a sweep walked the table, counted back at the next).
    #[serde(default)]
    pub connections_uncounted: u64,
    /// Global counters by name (`verdict_tx`, `drop_no_backend`, ...).
    pub counters: Vec<(String, u64)>,
    /// `dataplane.record_limit` of the running program: SYNs recorded a second per CPU through
    /// unchanged maglev/sh slots of "at_syn" services (0: no limit; absent from an older `lb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_limit: Option<u32>,
    /// Whether the running program hands the SYNs of "at_syn" maglev/sh services through
    /// unchanged slots to the controller (`dataplane.defer_records`; absent from an older `lb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defer_records: Option<bool>,
    /// `[announce]`: each VIP's route (absent without `[announce]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vips: Option<Vec<crate::announce::VipStatus>>,
    /// `[flow_sync]`: flow sharing counters (absent without `[flow_sync]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_sync: Option<crate::flowsync::SyncStats>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub scheduler: String,
    /// Digest of the service's table by backend *address* per slot (ids differ between nodes):
    /// equal on two balancers ⇔ they send every new flow of this service to the same backend.
    #[serde(default)]
    pub ring_digest: String,
    /// maglev/sh: table slots marked changed (`RING_DIRTY`): their established TCP and UDP
    /// packets consult the connection table until a sweep finds no flow of another backend
    /// there and their previous backend (`RING_PREV`) lapsed.
    #[serde(default)]
    pub changed_slots: u64,
    /// Slots of the service's table (`ring_size`).
    #[serde(default)]
    pub ring_size: u32,
    /// maglev/sh: bits a slot of its table takes in the packed copy the data plane reads first
    /// (1, 2, 4 or 8); 0: not packed (another scheduler, more than 255 backends, not x86-64, or a
    /// daemon older than the copy).
    #[serde(default)]
    pub packed_bits: u32,
    /// `record_connections`: `at_syn` or `on_change` (README, Stateless slots). Empty from a
    /// daemon older than the setting (which records at the SYN).
    #[serde(default)]
    pub record_connections: String,
    pub traffic: Traffic,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: IpAddr,
    /// Destination MAC in use (`unresolved` when not known).
    pub mac: String,
    /// `config`, `neighbour` (resolved through the kernel's neighbour table) or `unresolved`.
    pub mac_source: String,
    /// `up`, `draining` (no new flows), `disabled` or `down`.
    pub state: String,
    pub admin: Admin,
    /// Weight from the config file.
    pub config_weight: u16,
    /// Weight set with `lb backend weight` (persisted), overriding the config until the
    /// config's own weight for this backend changes.
    pub weight_override: Option<u16>,
    /// Set when a reload dropped this backend's weight override because the config's weight
    /// changed (the config wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_note: Option<String>,
    /// Weight in effect for new flows (0 when draining or disabled).
    pub effective_weight: u16,
    /// `up`, `down`, or `none` (no check configured).
    pub health: String,
    /// Why (last failure when down, e.g. `timeout (500 ms)`, `connection refused`,
    /// `status 503 (expected 200)`).
    pub health_reason: String,
    /// Seconds in the current health state.
    pub health_since_seconds: f64,
    /// Health state changes since `lb run` started.
    pub health_transitions: u64,
    /// Open connections: new UDP flows and TCP flows that began with a SYN, until the client's
    /// FIN/RST, a move to another backend, or idle expiry (`[timeouts]`).
    pub active_connections: u64,
    /// Seconds during which UDP flows of a maglev/sh service that are not in the connection
    /// table (so not in `active_connections`) may still reach this backend: after a change
    /// (a drain, a weight), its former slots send them back to it for `timeouts.udp`. 0: none.
    #[serde(default)]
    pub unrecorded_flows_seconds: u64,
    pub traffic: Traffic,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Over the last sampling interval (about a second).
    pub packets_per_second: f64,
    pub bits_per_second: f64,
    /// New flows per second over the same interval.
    #[serde(default)]
    pub new_flows_per_second: f64,
}

/// `GET /v1/explain/{protocol}/{client}/{client_port}/{vip}/{port}`: where a flow goes and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explain {
    pub protocol: String,
    pub client: IpAddr,
    pub client_port: u16,
    pub vip: IpAddr,
    pub port: u16,
    /// The service it matches (none: passed to the kernel).
    pub service: Option<String>,
    pub scheduler: Option<String>,
    /// `hit` (connection table), `new` (scheduler), `rescheduled` (its recorded backend is no
    /// longer usable), `no_backend` (dropped), `no_service` (passed).
    pub outcome: String,
    /// `forward`, `drop` or `pass`.
    pub verdict: String,
    pub backend: Option<IpAddr>,
    /// The backend's state (`up`, `draining`, `disabled`, `down`).
    pub backend_state: Option<String>,
    /// Destination MAC written into the frame.
    pub mac: Option<String>,
    /// Why, in words.
    pub reason: String,
    /// The connection table's entry, when there is one.
    pub connection: Option<ExplainConnection>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExplainConnection {
    pub backend_id: u32,
    /// Since the entry's last refresh (refreshed at most once a second).
    pub idle_seconds: f64,
    /// Counted in the backend's active connections.
    pub counted: bool,
    /// The client sent FIN or RST.
    pub client_closed: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightBody {
    pub weight: u16,
}
