//! Client of the control API (what `lb status`, `lb backend ...`, `lb reload` use).

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "lb is not running: nothing listens on {socket} ({why}). Start it with `lb run --config <file>`, \
         or point at its socket with --socket / LB_SOCKET"
    )]
    NotRunning { socket: PathBuf, why: String },
    #[error(
        "permission denied on {socket}: the control socket is mode 0600 (root and the user running `lb run`), or 0660 for control.read_group / control.group when set (see README, Security)"
    )]
    PermissionDenied { socket: PathBuf },
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    #[error("talking to lb on {socket}: {why}")]
    Protocol { socket: PathBuf, why: String },
}

/// One request; returns the JSON answer of a 2xx, or the API's error message.
pub fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Protocol {
            socket: socket.to_owned(),
            why: e.to_string(),
        })?;
    rt.block_on(call_async(socket, method, path, body))
}

async fn call_async(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    let proto = |why: String| ClientError::Protocol {
        socket: socket.to_owned(),
        why,
    };
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(ClientError::PermissionDenied {
                socket: socket.to_owned(),
            });
        }
        Err(e) => {
            return Err(ClientError::NotRunning {
                socket: socket.to_owned(),
                why: e.to_string(),
            });
        }
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| proto(e.to_string()))?;
    tokio::spawn(conn);
    let bytes = body
        .map(|b| serde_json::to_vec(&b).expect("serializes"))
        .unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "lb")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| proto(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| proto(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| proto(e.to_string()))?
        .to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        proto(format!(
            "HTTP {status}, not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        ))
    })?;
    if status.is_success() {
        Ok(value)
    } else {
        Err(ClientError::Api {
            status,
            message: value["error"]
                .as_str()
                .unwrap_or("unknown error")
                .to_owned(),
        })
    }
}
