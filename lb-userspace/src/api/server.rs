//! The control API's HTTP side: routes parsed into typed [`Request`]s, sent to the controller
//! loop over a channel (so map updates never race), answers and errors as JSON.

use std::net::IpAddr;

use axum::{
    Json, Router,
    extract::{Path as UrlPath, State, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokio::sync::{mpsc, oneshot};

use super::{ApiError, BackendAction, Message, WeightBody};

/// What a client asks of the controller.
#[derive(Debug)]
pub enum Request {
    Status,
    /// The Prometheus exposition (a JSON string holding the text).
    Metrics,
    Explain(crate::explain::Query),
    Reload,
    Backend {
        service: String,
        address: IpAddr,
        action: BackendAction,
    },
}

pub type Reply = Result<serde_json::Value, ApiError>;
pub type Envelope = (Request, oneshot::Sender<Reply>);

/// A JSON message answer.
pub fn message(m: String) -> serde_json::Value {
    serde_json::to_value(Message { message: m }).expect("serializes")
}

pub fn router(tx: mpsc::Sender<Envelope>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/reload", post(reload))
        .route(
            "/v1/explain/{protocol}/{client}/{client_port}/{vip}/{port}",
            get(explain),
        )
        .route("/v1/backends/{service}/{address}/{action}", post(backend))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such API path (GET /v1/status, POST /v1/reload, POST /v1/backends/{service}/{address}/{enable|disable|drain|weight}, GET /v1/explain/{tcp|udp}/{client}/{client_port}/{vip}/{port})",
            )
        })
        .with_state(tx)
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

async fn reload(State(tx): State<mpsc::Sender<Envelope>>) -> Response {
    ask(&tx, Request::Reload).await
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
    })
}

async fn backend(
    State(tx): State<mpsc::Sender<Envelope>>,
    UrlPath((service, address, action)): UrlPath<(String, String, String)>,
    body: Result<Json<WeightBody>, JsonRejection>,
) -> Response {
    let body = (action == "weight").then(|| body.map(|Json(w)| w).map_err(|e| e.body_text()));
    match backend_request(service, &address, &action, body) {
        Ok(req) => ask(&tx, req).await,
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
