//! The control API's HTTP side: routes parsed into typed [`Request`]s, sent to the controller
//! loop over a channel (so map updates never race), answers and errors as JSON.

use std::{net::IpAddr, sync::Arc, time::Duration};

use axum::{
    Extension, Json, Router,
    extract::{DefaultBodyLimit, Path as UrlPath, State, rejection::JsonRejection},
    http::{Method, StatusCode, header},
    middleware::{Next, from_fn, map_response},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokio::{
    net::UnixListener,
    sync::{Semaphore, mpsc, oneshot},
};

use super::{
    ApiError, BackendAction, Message, WeightBody,
    access::{Access, Peer, Policy},
};

/// What a client asks of the controller.
#[derive(Debug)]
pub enum Request {
    Status,
    /// The Prometheus exposition (a JSON string holding the text).
    Metrics,
    Explain(crate::explain::Query),
    /// `caller`: who asked (for the log), e.g. `uid 0 pid 4242`.
    Reload {
        caller: String,
    },
    Backend {
        service: String,
        address: IpAddr,
        action: BackendAction,
        caller: String,
    },
    /// `lb vip list`.
    Vips,
    /// `lb vip announce|withdraw [--graceful] <service>`.
    Vip {
        service: String,
        action: VipAction,
        caller: String,
    },
}

/// What `lb vip` asks for a service's VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VipAction {
    Announce,
    Withdraw { graceful: bool },
}

impl std::fmt::Display for VipAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VipAction::Announce => "announce",
            VipAction::Withdraw { graceful: false } => "withdraw",
            VipAction::Withdraw { graceful: true } => "withdraw --graceful",
        })
    }
}

/// Body of `POST /v1/vips/{service}/withdraw` (optional).
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WithdrawBody {
    #[serde(default)]
    pub graceful: bool,
}

pub type Reply = Result<serde_json::Value, ApiError>;
pub type Envelope = (Request, oneshot::Sender<Reply>);

/// A JSON message answer.
pub fn message(m: String) -> serde_json::Value {
    serde_json::to_value(Message { message: m }).expect("serializes")
}

/// The caller of one control connection and what it may do (set per connection by
/// [`serve_unix`]; absent in tests that call the router directly: then full access).
#[derive(Clone, Debug)]
pub struct Caller {
    pub peer: Option<Peer>,
    pub access: Result<Access, String>,
}

impl Caller {
    fn name(&self) -> String {
        self.peer
            .as_ref()
            .map_or_else(|| "an unidentified caller".to_owned(), |p| p.to_string())
    }
}

/// Largest request body accepted (the API's bodies are a few bytes).
pub const MAX_BODY: usize = 64 * 1024;

pub fn router(tx: mpsc::Sender<Envelope>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/reload", post(reload))
        .route(
            "/v1/explain/{protocol}/{client}/{client_port}/{vip}/{port}",
            get(explain),
        )
        .route("/v1/backends/{service}/{address}/{action}", post(backend))
        .route("/v1/vips", get(vips))
        .route("/v1/vips/{service}/{action}", post(vip))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such API path (GET /v1/status, POST /v1/reload, POST /v1/backends/{service}/{address}/{enable|disable|drain|weight}, GET /v1/explain/{tcp|udp}/{client}/{client_port}/{vip}/{port})",
            )
        })
        .method_not_allowed_fallback(|method: Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} is not allowed on this path (GET reads, POST changes)"),
            )
        })
        .layer(from_fn(authorize))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(map_response(json_errors))
        .with_state(tx)
}

/// GET needs read access, anything else full access (see [`super::access`]).
async fn authorize(req: axum::extract::Request, next: Next) -> Response {
    let need = if req.method() == Method::GET {
        Access::Read
    } else {
        Access::Full
    };
    if let Some(c) = req.extensions().get::<Caller>() {
        let allowed = match &c.access {
            Ok(Access::Full) => Ok(()),
            Ok(Access::Read) if need == Access::Read => Ok(()),
            Ok(Access::Read) => Err(format!(
                "permission denied: {} may only read (control.read_group); changes need root or control.group",
                c.name()
            )),
            Err(why) => Err(why.clone()),
        };
        if let Err(why) = allowed {
            tracing::warn!(
                "control API: refused {} {}: {why}",
                req.method(),
                req.uri().path()
            );
            return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
        }
    }
    next.run(req).await
}

/// Every error answer is `{"error": ...}`, also those made below the handlers (oversized body,
/// a body that is not JSON).
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.is_success() || is_json {
        return res;
    }
    let body = axum::body::to_bytes(res.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let msg = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text.trim().to_owned()
    };
    ApiError::new(status, msg).into_response()
}

/// Limits of the control socket's server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more are answered 503 and closed.
    pub connections: usize,
    /// Time a connection may take to send a request's headers (also while idle between
    /// requests).
    pub header_timeout: Duration,
    /// Longest life of one connection (a slow body included).
    pub lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 64,
            header_timeout: Duration::from_secs(5),
            lifetime: Duration::from_secs(30),
        }
    }
}

/// Serves `app` on the control socket: each connection's peer is identified by the kernel and
/// checked against `policy`; at most `limits.connections` at once; idle and slow connections
/// are closed. Runs until the listener fails for good.
pub async fn serve_unix(listener: UnixListener, app: Router, policy: Policy, limits: Limits) {
    use hyper_util::{
        rt::{TokioIo, TokioTimer},
        service::TowerToHyperService,
    };
    let slots = Arc::new(Semaphore::new(limits.connections));
    let mut last_error_log: Option<std::time::Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning, and say so
                // at most every 10 s.
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!("control API: accept failed: {e}");
                    last_error_log = Some(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(busy(stream, limits.connections));
            continue;
        };
        let peer = super::access::peer(std::os::fd::AsFd::as_fd(&stream));
        let caller = match peer {
            Ok(p) => Caller {
                access: policy.access(&p),
                peer: Some(p),
            },
            Err(e) => Caller {
                peer: None,
                access: Err(format!("permission denied: the caller is unknown ({e})")),
            },
        };
        let svc = TowerToHyperService::new(app.clone().layer(Extension(caller)));
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(limits.lifetime, conn).await;
        });
    }
}

/// Answers a connection over the limit with 503 and closes it.
async fn busy(mut stream: tokio::net::UnixStream, limit: usize) {
    use tokio::io::AsyncWriteExt as _;
    let body = serde_json::json!({
        "error": format!("too many control connections (limit {limit}); try again")
    })
    .to_string();
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(msg.as_bytes())).await;
}

async fn ask(tx: &mpsc::Sender<Envelope>, req: Request) -> Response {
    let (reply_tx, reply_rx) = oneshot::channel();
    if tx.send((req, reply_tx)).await.is_err() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "lb is shutting down")
            .into_response();
    }
    match reply_rx.await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "lb is shutting down").into_response()
        }
    }
}

/// `GET /metrics` on `[control] metrics` (nothing else is served there).
pub fn metrics_router(tx: mpsc::Sender<Envelope>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "only GET /metrics is served here")
        })
        .with_state(tx)
}

async fn metrics(State(tx): State<mpsc::Sender<Envelope>>) -> Response {
    let (reply_tx, reply_rx) = oneshot::channel();
    if tx.send((Request::Metrics, reply_tx)).await.is_err() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "lb is shutting down")
            .into_response();
    }
    match reply_rx.await {
        Ok(Ok(serde_json::Value::String(text))) => (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::metrics::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        Ok(Ok(_)) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no exposition").into_response()
        }
        Ok(Err(e)) => e.into_response(),
        Err(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "lb is shutting down").into_response()
        }
    }
}

async fn status(State(tx): State<mpsc::Sender<Envelope>>) -> Response {
    ask(&tx, Request::Status).await
}

async fn explain(
    State(tx): State<mpsc::Sender<Envelope>>,
    UrlPath((protocol, client, client_port, vip, port)): UrlPath<(
        String,
        String,
        String,
        String,
        String,
    )>,
) -> Response {
    match explain_query(&protocol, &client, &client_port, &vip, &port) {
        Ok(q) => ask(&tx, Request::Explain(q)).await,
        Err(e) => e.into_response(),
    }
}

/// Parses `lb explain`'s five fields; each error names the field.
pub fn explain_query(
    protocol: &str,
    client: &str,
    client_port: &str,
    vip: &str,
    port: &str,
) -> Result<crate::explain::Query, ApiError> {
    let bad = |what: &str, v: &str, why: &str| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("{what} `{v}`: {why}"))
    };
    let protocol = match protocol {
        "tcp" => crate::config::Protocol::Tcp,
        "udp" => crate::config::Protocol::Udp,
        p => return Err(bad("protocol", p, "must be tcp or udp")),
    };
    let client_ip: IpAddr = client
        .parse()
        .map_err(|_| bad("client address", client, "not an IP address"))?;
    let vip_ip: IpAddr = vip
        .parse()
        .map_err(|_| bad("VIP", vip, "not an IP address"))?;
    if client_ip.is_ipv4() != vip_ip.is_ipv4() {
        return Err(bad(
            "client address",
            client,
            "must be of the VIP's address family",
        ));
    }
    let port_of = |what: &str, v: &str| {
        v.parse::<u16>()
            .map_err(|_| bad(what, v, "not a port (0..=65535)"))
    };
    Ok(crate::explain::Query {
        protocol,
        client: client_ip,
        client_port: port_of("client port", client_port)?,
        vip: vip_ip,
        port: port_of("port", port)?,
    })
}

async fn reload(
    State(tx): State<mpsc::Sender<Envelope>>,
    caller: Option<Extension<Caller>>,
) -> Response {
    let caller = caller.map_or_else(|| "a test".to_owned(), |Extension(c)| c.name());
    ask(&tx, Request::Reload { caller }).await
}

async fn vips(State(tx): State<mpsc::Sender<Envelope>>) -> Response {
    ask(&tx, Request::Vips).await
}

/// Parses `POST /v1/vips/{service}/{action}` into a typed request.
pub fn vip_request(
    service: String,
    action: &str,
    body: Option<Result<WithdrawBody, String>>,
) -> Result<Request, ApiError> {
    let action = match action {
        "announce" => VipAction::Announce,
        "withdraw" => match body {
            None => VipAction::Withdraw { graceful: false },
            Some(Ok(b)) => VipAction::Withdraw {
                graceful: b.graceful,
            },
            Some(Err(e)) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("withdraw: expected no body or {{\"graceful\": true|false}} ({e})"),
                ));
            }
        },
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("unknown action `{other}` (announce, withdraw)"),
            ));
        }
    };
    Ok(Request::Vip {
        service,
        action,
        caller: String::new(),
    })
}

async fn vip(
    State(tx): State<mpsc::Sender<Envelope>>,
    caller: Option<Extension<Caller>>,
    UrlPath((service, action)): UrlPath<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let body = (!body.is_empty())
        .then(|| serde_json::from_slice::<WithdrawBody>(&body).map_err(|e| e.to_string()));
    match vip_request(service, &action, body) {
        Ok(Request::Vip {
            service, action, ..
        }) => {
            let caller = caller.map_or_else(|| "a test".to_owned(), |Extension(c)| c.name());
            ask(
                &tx,
                Request::Vip {
                    service,
                    action,
                    caller,
                },
            )
            .await
        }
        Ok(other) => ask(&tx, other).await,
        Err(e) => e.into_response(),
    }
}

/// Parses the path and body into a typed request.
pub fn backend_request(
    service: String,
    address: &str,
    action: &str,
    body: Option<Result<WeightBody, String>>,
) -> Result<Request, ApiError> {
    let address: IpAddr = address.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("`{address}` is not an IP address"),
        )
    })?;
    let action = match action {
        "enable" => BackendAction::Enable,
        "disable" => BackendAction::Disable,
        "drain" => BackendAction::Drain,
        "weight" => match body {
            Some(Ok(w)) => BackendAction::Weight(w.weight),
            Some(Err(e)) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("weight: expected {{\"weight\": 0..=65535}} ({e})"),
                ));
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "weight: missing {\"weight\": N}",
                ));
            }
        },
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("unknown action `{other}` (enable, disable, drain, weight)"),
            ));
        }
    };
    Ok(Request::Backend {
        service,
        address,
        action,
        caller: String::new(),
    })
}

async fn backend(
    State(tx): State<mpsc::Sender<Envelope>>,
    caller: Option<Extension<Caller>>,
    UrlPath((service, address, action)): UrlPath<(String, String, String)>,
    body: Result<Json<WeightBody>, JsonRejection>,
) -> Response {
    if let Err(JsonRejection::BytesRejection(e)) = &body {
        return ApiError::new(e.status(), e.body_text()).into_response();
    }
    let body = (action == "weight").then(|| body.map(|Json(w)| w).map_err(|e| e.body_text()));
    match backend_request(service, &address, &action, body) {
        Ok(Request::Backend {
            service,
            address,
            action,
            ..
        }) => {
            let caller = caller.map_or_else(|| "a test".to_owned(), |Extension(c)| c.name());
            ask(
                &tx,
                Request::Backend {
                    service,
                    address,
                    action,
                    caller,
                },
            )
            .await
        }
        Ok(other) => ask(&tx, other).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_typed() {
        let r = backend_request("web".into(), "10.0.0.1", "drain", None).unwrap();
        assert!(matches!(
            r,
            Request::Backend {
                action: BackendAction::Drain,
                ..
            }
        ));
        let r = backend_request(
            "web".into(),
            "fd00::1",
            "weight",
            Some(Ok(WeightBody { weight: 7 })),
        )
        .unwrap();
        assert!(matches!(
            r,
            Request::Backend {
                action: BackendAction::Weight(7),
                ..
            }
        ));
        let e = backend_request("web".into(), "nope", "drain", None).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = backend_request("web".into(), "10.0.0.1", "explode", None).unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(e.message.contains("unknown action `explode`"));
        let e = backend_request("web".into(), "10.0.0.1", "weight", Some(Err("bad".into())))
            .unwrap_err();
        assert!(e.message.contains("0..=65535"));
    }
}

/// Fuzzing the request handling: any path pieces and bodies parse into a typed request or a
/// precise error, never a panic; over the socket, any method, path and body gets a JSON answer.
#[cfg(test)]
mod fuzz {
    use proptest::{prelude::*, test_runner::Config as RunnerConfig};

    use super::*;

    fn cases() -> u32 {
        crate::fuzz_cases(2000)
    }

    proptest! {
        #![proptest_config(RunnerConfig { cases: cases(), failure_persistence: None, ..RunnerConfig::default() })]

        #[test]
        fn path_pieces(service in ".{0,40}", addr in ".{0,40}", action in "(enable|drain|disable|weight|.{0,10})",
                       weight in prop::option::of(any::<u32>())) {
            let body = weight.map(|w| u16::try_from(w).map(|weight| WeightBody { weight }).map_err(|e| e.to_string()));
            match backend_request(service, &addr, &action, body) {
                Ok(Request::Backend { .. }) => {}
                Ok(other) => prop_assert!(false, "unexpected {:?}", other),
                Err(e) => prop_assert!(e.status.is_client_error() && !e.message.is_empty()),
            }
        }

        #[test]
        fn explain_pieces(p in ".{0,5}", a in ".{0,45}", b in ".{0,7}", c in ".{0,45}", d in ".{0,7}") {
            if let Err(e) = explain_query(&p, &a, &b, &c, &d) {
                prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
            }
        }
    }
}

/// The control socket's server end to end: limits, JSON errors, credentials.
#[cfg(test)]
mod serve_tests {
    use std::{
        io::{Read as _, Write as _},
        os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
        path::PathBuf,
        time::Instant,
    };

    use super::*;
    use crate::api::access::Group;

    /// A server on a fresh socket, answering Status with `{"ok": true}` and changes with a
    /// message, as the controller would.
    async fn start(policy: Policy, limits: Limits) -> (PathBuf, tokio::task::JoinHandle<()>) {
        let dir =
            std::env::temp_dir().join(format!("lb-serve-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("lb.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (tx, mut rx) = mpsc::channel::<Envelope>(8);
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                let v = match req {
                    Request::Status => Ok(serde_json::json!({"ok": true})),
                    other => Ok(message(format!("done: {other:?}"))),
                };
                let _ = reply.send(v);
            }
        });
        let h = tokio::spawn(serve_unix(listener, router(tx), policy, limits));
        (path, h)
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    fn root_only() -> Policy {
        Policy {
            owner: 0,
            group: None,
            read_group: None,
        }
    }

    /// One raw HTTP/1.1 request; the status code and body.
    fn raw(path: &std::path::Path, request: &str) -> (u16, String) {
        let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // (A server answering 503 at once may have closed before the request is written.)
        let _ = s.write_all(request.as_bytes());
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (code, body.to_owned())
    }

    fn get(path: &std::path::Path, url: &str) -> (u16, String) {
        raw(
            path,
            &format!("GET {url} HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n"),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_error_is_json() {
        let (p, _h) = start(root_only(), Limits::default()).await;
        let (code, body) = tokio::task::spawn_blocking({
            let p = p.clone();
            move || get(&p, "/v1/nope")
        })
        .await
        .unwrap();
        assert_eq!(code, 404);
        assert!(body.contains("\"error\":\"no such API path"), "{body}");
        let p2 = p.clone();
        let (code, body) = tokio::task::spawn_blocking(move || {
            raw(
                &p2,
                "DELETE /v1/status HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n",
            )
        })
        .await
        .unwrap();
        assert_eq!(code, 405);
        assert!(
            body.contains("\"error\":\"method DELETE is not allowed"),
            "{body}"
        );
        let p2 = p.clone();
        let (code, body) = tokio::task::spawn_blocking(move || {
            let big = format!("{{\"weight\": 1, \"pad\": \"{}\"}}", "x".repeat(100_000));
            raw(
                &p2,
                &format!(
                    "POST /v1/backends/web/10.0.0.1/weight HTTP/1.1\r\nhost: lb\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{big}",
                    big.len()
                ),
            )
        })
        .await
        .unwrap();
        assert_eq!(code, 413, "{body}");
        assert!(body.starts_with("{\"error\":"), "{body}");
        let p2 = p.clone();
        let (code, body) = tokio::task::spawn_blocking(move || {
            raw(
                &p2,
                "POST /v1/backends/web/10.0.0.1/weight HTTP/1.1\r\nhost: lb\r\ncontent-type: application/json\r\ncontent-length: 5\r\nconnection: close\r\n\r\nnope!",
            )
        })
        .await
        .unwrap();
        assert_eq!(code, 400, "{body}");
        assert!(body.contains("\"error\":\"weight: expected"), "{body}");
        let (code, body) = tokio::task::spawn_blocking(move || get(&p, "/v1/status"))
            .await
            .unwrap();
        assert_eq!((code, body.as_str()), (200, "{\"ok\":true}"));
    }

    /// Idle connections are closed after the header timeout; past the connection limit a
    /// client gets a JSON 503 at once; the API answers again when the idle ones are gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_time_out_and_connections_are_bounded() {
        let limits = Limits {
            connections: 3,
            header_timeout: Duration::from_millis(300),
            lifetime: Duration::from_secs(5),
        };
        let (p, _h) = start(root_only(), limits).await;
        let p2 = p.clone();
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let idle: Vec<_> = (0..3)
                .map(|_| std::os::unix::net::UnixStream::connect(&p2).unwrap())
                .collect();
            std::thread::sleep(Duration::from_millis(50));
            let (code, body) = get(&p2, "/v1/status");
            assert_eq!(code, 503, "{body}");
            assert!(
                body.contains("too many control connections (limit 3)"),
                "{body}"
            );
            // The idle ones are closed by the server (EOF) after the header timeout.
            for mut c in idle {
                c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut buf = Vec::new();
                let _ = c.read_to_end(&mut buf);
            }
            let waited = t.elapsed();
            assert!(waited < Duration::from_secs(3), "closed after {waited:?}");
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(get(&p2, "/v1/status").0, 200);
        })
        .await
        .unwrap();
    }

    /// Random methods, paths and bodies over the socket: every answer is JSON, errors are
    /// `{"error": ...}` (300 cases; more with `LB_FUZZ_CASES`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_requests_get_json() {
        use proptest::{
            prelude::*,
            strategy::ValueTree,
            test_runner::{Config as RunnerConfig, TestRunner},
        };
        let (p, _h) = start(root_only(), Limits::default()).await;
        // A tenth of the harness cases: each is a socket round trip.
        let n = crate::fuzz_cases(3000) / 10;
        tokio::task::spawn_blocking(move || {
            let mut runner = TestRunner::new(RunnerConfig::default());
            let strategy = (
                "(GET|POST|PUT|DELETE|PATCH|HEAD|OPTIONS)",
                prop::collection::vec("[a-z0-9.:%{}]{0,12}", 0..6),
                "[ -~]{0,200}",
            );
            for _ in 0..n {
                let (method, parts, body) = strategy.new_tree(&mut runner).unwrap().current();
                let path = format!("/{}", parts.join("/"));
                let req = format!(
                    "{method} {path} HTTP/1.1\r\nhost: lb\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let (code, text) = raw(&p, &req);
                assert!(code >= 200, "{method} {path}: no status ({text:?})");
                if method == "HEAD" {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{method} {path} {body:?}: not JSON ({e}): {text:?}"));
                if code >= 400 {
                    assert!(v["error"].is_string(), "{method} {path}: {text}");
                }
            }
        })
        .await
        .unwrap();
    }

    /// SO_PEERCRED decides: a user in the read-only group reads status but cannot change a
    /// weight; a stranger can do neither. (Needs root to run curl as other users.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_group_reads_status_but_cannot_change_weights() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to act as other users");
            return;
        }
        if std::process::Command::new("curl")
            .arg("--version")
            .output()
            .is_err()
        {
            panic!("curl is needed (scripts/bootstrap.sh installs it)");
        }
        let policy = Policy {
            owner: 0,
            group: Some(Group {
                name: "lbtest-admin".into(),
                gid: 64_990,
            }),
            read_group: Some(Group {
                name: "lbtest-view".into(),
                gid: 64_991,
            }),
        };
        let (p, _h) = start(policy, Limits::default()).await;
        let curl = move |uid: u32, gid: u32, args: &[&str]| -> String {
            let out = std::process::Command::new("curl")
                .args(["-s", "-o", "-", "-w", " %{http_code}", "--unix-socket"])
                .arg(&p)
                .args(args)
                .uid(uid)
                .gid(gid)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        tokio::task::spawn_blocking(move || {
            let viewer = (64_001, 64_991);
            let out = curl(viewer.0, viewer.1, &["http://lb/v1/status"]);
            assert!(out.ends_with(" 200"), "{out}");
            let weight = [
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-d",
                "{\"weight\": 5}",
                "http://lb/v1/backends/web/10.0.0.1/weight",
            ];
            let out = curl(viewer.0, viewer.1, &weight);
            assert!(out.ends_with(" 403"), "{out}");
            assert!(out.contains("uid 64001"), "{out}");
            assert!(out.contains("may only read"), "{out}");
            let out = curl(64_002, 64_002, &["http://lb/v1/status"]);
            assert!(out.ends_with(" 403"), "{out}");
            assert!(out.contains("not in control.group `lbtest-admin`"), "{out}");
            let admin = curl(64_003, 64_990, &weight);
            assert!(admin.ends_with(" 200"), "{admin}");
        })
        .await
        .unwrap();
    }
}
