//! Ownership of the checks: one per checked backend, kept across reloads as long as the
//! backend's address and check config are unchanged (so its rhythm and rise/fall counts go on),
//! restarted when they changed, stopped when the backend left. HTTP and UDP checks run as a
//! tokio task each; TCP checks all run on one thread ([`super::tcp`]).

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    config::{CheckKind, Health as CheckConfig},
    desired::{BackendId, IdMap},
};

/// What the checks send the controller: finished checks, in batches (the TCP checker sends
/// all that finished in one of its rounds at once; a task sends one).
pub type CheckBatch = Vec<CheckResult>;

/// One finished check, from the task with `token`.
#[derive(Debug)]
pub struct CheckResult {
    pub id: BackendId,
    pub token: u64,
    pub result: Result<(), String>,
    pub finished: std::time::Instant,
    /// How long the probe took.
    pub duration: Duration,
}

/// What one backend's check task runs.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckSpec {
    /// For the first check's offset (spreads checks; stable per backend).
    pub label: String,
    pub address: IpAddr,
    pub cfg: CheckConfig,
}

struct Task {
    spec: CheckSpec,
    token: u64,
    /// HTTP and UDP checks: a task each. TCP checks: `None`, run by the TCP checker thread.
    handle: Option<JoinHandle<()>>,
}

impl Task {
    fn stop(self, tcp: Option<&super::tcp::TcpChecker>, id: BackendId) {
        match self.handle {
            Some(h) => h.abort(),
            None => {
                if let Some(t) = tcp {
                    t.send(super::tcp::Cmd::Remove(id));
                }
            }
        }
    }
}

/// The running checks.
pub struct Checks {
    tasks: IdMap<Task>,
    next_token: u64,
    tx: mpsc::Sender<CheckBatch>,
    /// The thread running every TCP check (see `tcp.rs`), started with the first one.
    tcp: Option<super::tcp::TcpChecker>,
}

/// What [`Checks::sync`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub kept: Vec<BackendId>,
    pub started: Vec<BackendId>,
    pub restarted: Vec<BackendId>,
    pub stopped: Vec<BackendId>,
}

impl Checks {
    pub fn new(tx: mpsc::Sender<CheckBatch>) -> Checks {
        Checks {
            tasks: IdMap::new(),
            next_token: 1,
            tx,
            tcp: None,
        }
    }

    /// Makes the running tasks match `wanted`.
    pub fn sync(&mut self, wanted: &BTreeMap<BackendId, CheckSpec>) -> SyncReport {
        let mut report = SyncReport::default();
        let gone: Vec<BackendId> = self
            .tasks
            .keys()
            .filter(|id| !wanted.contains_key(id))
            .collect();
        for id in gone {
            if let Some(t) = self.tasks.remove(&id) {
                t.stop(self.tcp.as_ref(), id);
            }
            report.stopped.push(id);
        }
        for (id, spec) in wanted {
            match self.tasks.get(id) {
                Some(t) if t.spec == *spec => {
                    report.kept.push(*id);
                    continue;
                }
                Some(_) => report.restarted.push(*id),
                None => report.started.push(*id),
            }
            let token = self.next_token;
            self.next_token += 1;
            if let Some(old) = self.tasks.remove(id) {
                old.stop(self.tcp.as_ref(), *id);
            }
            let handle = match spec.cfg.kind {
                CheckKind::Tcp | CheckKind::Syn => match self.tcp_checker() {
                    Some(t) => {
                        t.send(super::tcp::Cmd::Set(*id, token, spec.clone()));
                        None
                    }
                    // No thread (could not start one): a task, as for the other kinds.
                    None => Some(tokio::spawn(check_loop(
                        *id,
                        token,
                        spec.clone(),
                        self.tx.clone(),
                    ))),
                },
                _ => Some(tokio::spawn(check_loop(
                    *id,
                    token,
                    spec.clone(),
                    self.tx.clone(),
                ))),
            };
            self.tasks.insert(
                *id,
                Task {
                    spec: spec.clone(),
                    token,
                    handle,
                },
            );
        }
        report
    }

    /// Whether `r` comes from the current task of its backend (not one stopped since).
    pub fn current(&self, r: &CheckResult) -> bool {
        self.tasks.get(&r.id).is_some_and(|t| t.token == r.token)
    }

    pub fn stop_all(&mut self) {
        for (id, t) in self.tasks.take_all() {
            t.stop(self.tcp.as_ref(), id);
        }
    }

    /// The TCP checker thread, started on first use.
    fn tcp_checker(&mut self) -> Option<&super::tcp::TcpChecker> {
        if self.tcp.is_none() {
            match super::tcp::TcpChecker::start(self.tx.clone()) {
                Ok(t) => self.tcp = Some(t),
                Err(e) => tracing::error!("TCP checks: starting their thread: {e}"),
            }
        }
        self.tcp.as_ref()
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Checks `spec.address` every `interval` (±10 % jitter; the first one at an offset derived from
/// the label, so checks don't fire in bursts) until the receiver is gone.
async fn check_loop(id: BackendId, token: u64, spec: CheckSpec, tx: mpsc::Sender<CheckBatch>) {
    let cfg = &spec.cfg;
    let interval = Duration::from_millis(cfg.interval_ms as u64);
    let seed = lb_common::hash::bytes_hash(7, spec.label.as_bytes());
    let offset = Duration::from_millis(seed % cfg.interval_ms.max(1) as u64);
    tokio::time::sleep(offset).await;
    let mut round = 0u64;
    loop {
        let started = tokio::time::Instant::now();
        let result = super::probe(cfg, spec.address).await;
        let msg = CheckResult {
            id,
            token,
            result,
            finished: std::time::Instant::now(),
            duration: started.elapsed(),
        };
        if tx.send(vec![msg]).await.is_err() {
            return;
        }
        round += 1;
        let j = lb_common::hash::fmix64(seed ^ round) % 201; // 0..=200 → −10 %..+10 %
        let next = interval.mul_f64(0.9 + j as f64 / 1000.0);
        tokio::time::sleep_until(started + next).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CheckKind;

    fn spec(port: u16) -> CheckSpec {
        CheckSpec {
            label: "web/127.0.0.1".into(),
            address: "127.0.0.1".parse().unwrap(),
            cfg: CheckConfig {
                kind: CheckKind::Tcp,
                port,
                path: "/".into(),
                expect_status: 200,
                interval_ms: 60_000,
                timeout_ms: 100,
                rise: 2,
                fall: 2,
                payload: String::new(),
            },
        }
    }

    /// A reload with the same check config keeps the task (and its rhythm); a changed one
    /// restarts it; results of a stopped task are not current any more.
    #[tokio::test]
    async fn unchanged_checks_survive_a_sync() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut c = Checks::new(tx);
        let a = BackendId(0);
        let b = BackendId(1);
        let mut want = BTreeMap::from([(a, spec(1)), (b, spec(1))]);
        let r = c.sync(&want);
        assert_eq!((r.started.len(), r.kept.len()), (2, 0));
        let token_a = c.tasks[&a].token;
        let r = c.sync(&want);
        assert_eq!(r.kept, vec![a, b]);
        assert_eq!(c.tasks[&a].token, token_a, "same task");
        want.insert(b, spec(2));
        want.remove(&a);
        let r = c.sync(&want);
        assert_eq!((r.restarted, r.stopped), (vec![b], vec![a]));
        let stale = CheckResult {
            id: a,
            token: token_a,
            result: Ok(()),
            finished: std::time::Instant::now(),
            duration: Duration::ZERO,
        };
        assert!(!c.current(&stale));
        c.stop_all();
        assert!(rx.try_recv().is_err() || c.tasks.is_empty());
    }
}
