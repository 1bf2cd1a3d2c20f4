//! Health checks: the rise/fall state machine (pure, clock passed in) and the probes.
//!
//! A backend starts up. `fall` consecutive failures mark it down, `rise` consecutive successes
//! up again. With checks every `interval` and each bounded by `timeout`, a backend that stops
//! answering is marked down at most `fall × interval + timeout` (plus scheduling jitter) after
//! its last successful check.

mod mmsg;
pub mod tasks;
pub mod tcp;
mod wheel;

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use http_body_util::Empty;
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;

use crate::config::{CheckKind, Health as CheckConfig};

/// Health of one backend.
#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    pub up: bool,
    /// Why it is in its current state (last failure reason when down).
    pub reason: String,
    /// When the current state began.
    pub since: Instant,
    /// Last successful check.
    pub last_ok: Option<Instant>,
    ok_streak: u32,
    fail_streak: u32,
    /// State changes so far.
    pub transitions: u64,
}

/// A state change, for the log and the counters.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub up: bool,
    pub reason: String,
    /// Down: since the last successful check (or the start). Up: since it went down.
    pub after: Duration,
}

impl Health {
    pub fn new(now: Instant) -> Health {
        Health {
            up: true,
            reason: "no check yet".to_owned(),
            since: now,
            last_ok: None,
            ok_streak: 0,
            fail_streak: 0,
            transitions: 0,
        }
    }

    /// A backend that starts down (it was out of the data plane before a restart): it comes
    /// back after `rise` passing checks.
    pub fn new_down(now: Instant, reason: &str) -> Health {
        Health {
            up: false,
            reason: reason.to_owned(),
            ..Health::new(now)
        }
    }

    /// Feeds one check result (completed at `now`).
    pub fn observe(
        &mut self,
        result: Result<(), String>,
        now: Instant,
        rise: u32,
        fall: u32,
    ) -> Option<Transition> {
        match result {
            Ok(()) => {
                self.last_ok = Some(now);
                self.fail_streak = 0;
                self.ok_streak = self.ok_streak.saturating_add(1);
                if self.up {
                    if self.reason != "checks pass" {
                        self.reason = "checks pass".to_owned();
                    }
                    return None;
                }
                if self.ok_streak >= rise {
                    let after = now.saturating_duration_since(self.since);
                    self.up = true;
                    self.since = now;
                    self.reason = format!("{rise} checks passed");
                    self.transitions += 1;
                    return Some(Transition {
                        up: true,
                        reason: self.reason.clone(),
                        after,
                    });
                }
                None
            }
            Err(why) => {
                self.ok_streak = 0;
                self.fail_streak = self.fail_streak.saturating_add(1);
                if !self.up {
                    self.reason = why;
                    return None;
                }
                if self.fail_streak >= fall {
                    let after = now.saturating_duration_since(self.last_ok.unwrap_or(self.since));
                    self.up = false;
                    self.since = now;
                    self.reason = why.clone();
                    self.transitions += 1;
                    return Some(Transition {
                        up: false,
                        reason: why,
                        after,
                    });
                }
                None
            }
        }
    }
}

/// Runs one check against `address` (the backend's own address), bounded by its timeout.
pub async fn probe(cfg: &CheckConfig, address: IpAddr) -> Result<(), String> {
    let timeout = Duration::from_millis(cfg.timeout_ms as u64);
    let target = SocketAddr::new(address, cfg.port);
    match tokio::time::timeout(timeout, probe_inner(cfg, target)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timeout ({} ms)", cfg.timeout_ms)),
    }
}

async fn probe_inner(cfg: &CheckConfig, target: SocketAddr) -> Result<(), String> {
    let io_err = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        std::io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        _ => e.to_string(),
    };
    match cfg.kind {
        CheckKind::None => Ok(()),
        // Connected is up. Closed with a reset (SO_LINGER 0, as HAProxy's checks do): no FIN
        // exchange and no TIME_WAIT socket per check (10 000 backends checked every second
        // would keep 600 000 of them).
        // (`syn` checks run on the TCP checker thread; should it be missing, a connect
        // answers the same question.)
        CheckKind::Tcp | CheckKind::Syn => tokio::net::TcpStream::connect(target)
            .await
            .map(|s| {
                let _ = s.set_zero_linger();
            })
            .map_err(io_err),
        CheckKind::Http => {
            let stream = tokio::net::TcpStream::connect(target)
                .await
                .map_err(io_err)?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("http: {e}"))?;
            tokio::spawn(conn);
            let host = match target.ip() {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("[{a}]"),
            };
            let req = Request::get(cfg.path.as_str())
                .header("host", host)
                .header("user-agent", "lb-health/1")
                .body(Empty::<Bytes>::new())
                .map_err(|e| format!("http: {e}"))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("http: {e}"))?;
            let status = resp.status().as_u16();
            if status == cfg.expect_status {
                Ok(())
            } else {
                Err(format!("status {status} (expected {})", cfg.expect_status))
            }
        }
        CheckKind::Udp => {
            let local: SocketAddr = if target.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .expect("literal");
            let sock = tokio::net::UdpSocket::bind(local).await.map_err(io_err)?;
            sock.connect(target).await.map_err(io_err)?;
            sock.send(cfg.payload.as_bytes()).await.map_err(io_err)?;
            let mut buf = [0u8; 1500];
            sock.recv(&mut buf).await.map(|_| ()).map_err(io_err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controllable clock: `t(s)` is `s` seconds after a fixed start.
    fn clock() -> impl Fn(f64) -> Instant {
        let t0 = Instant::now();
        move |s| t0 + Duration::from_secs_f64(s)
    }

    #[test]
    fn starts_up_and_falls_after_fall_failures() {
        let t = clock();
        let mut h = Health::new(t(0.0));
        assert!(h.up);
        assert_eq!(h.observe(Ok(()), t(1.0), 2, 3), None);
        assert_eq!(h.observe(Err("timeout".into()), t(2.0), 2, 3), None);
        assert_eq!(h.observe(Err("timeout".into()), t(3.0), 2, 3), None);
        let tr = h
            .observe(Err("connection refused".into()), t(4.0), 2, 3)
            .expect("down");
        assert!(!tr.up);
        assert_eq!(tr.reason, "connection refused");
        assert_eq!(tr.after, Duration::from_secs(3), "since the last success");
        assert!(!h.up);
        assert_eq!(h.transitions, 1);
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let t = clock();
        let mut h = Health::new(t(0.0));
        for (i, r) in [Err("x"), Ok(()), Err("x"), Ok(()), Err("x")]
            .into_iter()
            .enumerate()
        {
            assert_eq!(h.observe(r.map_err(String::from), t(i as f64), 2, 2), None);
        }
        assert!(h.up);
    }

    #[test]
    fn rises_after_rise_successes() {
        let t = clock();
        let mut h = Health::new(t(0.0));
        h.observe(Err("status 503 (expected 200)".into()), t(1.0), 3, 1)
            .expect("down at once with fall 1");
        assert_eq!(h.reason, "status 503 (expected 200)");
        assert_eq!(h.observe(Ok(()), t(2.0), 3, 1), None);
        assert_eq!(
            h.observe(Err("timeout".into()), t(3.0), 3, 1),
            None,
            "streak broken"
        );
        assert_eq!(h.observe(Ok(()), t(4.0), 3, 1), None);
        assert_eq!(h.observe(Ok(()), t(5.0), 3, 1), None);
        let tr = h.observe(Ok(()), t(6.0), 3, 1).expect("up");
        assert!(tr.up && h.up);
        assert_eq!(tr.after, Duration::from_secs(5), "down for 5 s");
        assert_eq!(h.transitions, 2);
    }

    #[test]
    fn never_checked_backend_counts_from_its_start() {
        let t = clock();
        let mut h = Health::new(t(0.0));
        h.observe(Err("timeout".into()), t(0.5), 1, 2);
        let tr = h.observe(Err("timeout".into()), t(1.5), 1, 2).unwrap();
        assert_eq!(tr.after, Duration::from_millis(1500));
    }

    /// The detection bound: with checks every `interval`, a backend that dies right after a
    /// successful check is down after `fall` more checks, each finishing within `timeout`.
    #[test]
    fn detection_time_is_within_fall_times_interval_plus_timeout() {
        let (interval, timeout, fall) = (1.0, 0.5, 3u32);
        let t = clock();
        let mut h = Health::new(t(0.0));
        h.observe(Ok(()), t(0.0), 2, fall);
        let mut now = 0.0;
        let mut down_at = None;
        for _ in 0..fall {
            now += interval;
            if h.observe(Err("timeout".into()), t(now + timeout), 2, fall)
                .is_some()
            {
                down_at = Some(now + timeout);
            }
        }
        let down_at = down_at.expect("down");
        assert!(
            down_at <= fall as f64 * interval + timeout + 1e-9,
            "{down_at}"
        );
    }

    #[tokio::test]
    async fn probes_report_refused_and_timeouts() {
        let cfg = |kind, port| CheckConfig {
            kind,
            port,
            path: "/".into(),
            expect_status: 200,
            interval_ms: 1000,
            timeout_ms: 300,
            rise: 1,
            fall: 1,
            payload: "ping".into(),
        };
        // Nothing listens on this port of localhost.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            probe(&cfg(CheckKind::Tcp, port), lo).await,
            Err("connection refused".into())
        );
        assert_eq!(probe(&cfg(CheckKind::None, port), lo).await, Ok(()));
        // A listener that never answers HTTP: timeout.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(probe(&cfg(CheckKind::Tcp, port), lo).await, Ok(()));
        assert_eq!(
            probe(&cfg(CheckKind::Http, port), lo).await,
            Err("timeout (300 ms)".into())
        );
        // UDP with no answer: timeout.
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        assert_eq!(
            probe(&cfg(CheckKind::Udp, port), lo).await,
            Err("timeout (300 ms)".into())
        );
    }
}
