//! `lb reload`: re-read the config, validate, apply only the difference (same as SIGHUP).

use std::path::Path;

use hyper::Method;
use lb_userspace::api::client;

pub fn run(socket: &Path) -> anyhow::Result<()> {
    let v = client::call(socket, Method::POST, "/v1/reload", None)?;
    println!("{}", v["message"].as_str().unwrap_or("ok"));
    Ok(())
}
