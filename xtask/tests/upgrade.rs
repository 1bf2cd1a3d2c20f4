//! An upgrade from the previous release and a downgrade to it, with connections held.
//! `cargo xtask test` builds that release's `lb` (`xtask::upgrade`) and runs this in its lab
//! tier. By hand:
//!
//!     git archive <previous release> | tar -x -C /tmp/prev && (cd /tmp/prev && cargo build -p lb-userspace --bin lb)
//!     LB_PREVIOUS_LB=/tmp/prev/target/debug/lb cargo test -p xtask --test upgrade -- --ignored --nocapture
//!
//! One `lb` runs the data plane while eight TCP connections and four UDP flows hold (one per
//! client address); it stops (its data plane stays), and the other `lb` takes over with
//! `lb run --replace`: every held connection and flow must survive, on its backend. First
//! from the previous release to this one, then back, in generic and in native XDP.

use std::{path::Path, time::Duration};

use xtask::{
    cmd,
    lab::{Lab, Mode},
};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

#[test]
#[ignore = "needs root and LB_PREVIOUS_LB (the previous release's lb): see the file's docs"]
fn upgrade_and_downgrade_keep_connections() {
    let old = std::env::var_os("LB_PREVIOUS_LB").expect("LB_PREVIOUS_LB: the previous lb binary");
    let old = Path::new(&old);
    let new = cmd::lb_binary();
    for mode in [Mode::Generic, Mode::Native] {
        for (what, from, to) in [("upgrade", old, new.as_path()), ("downgrade", &new, old)] {
            take_over(mode, what, from, to);
        }
    }
}

/// `from` runs the data plane with flows held, `to` takes over with `--replace`.
fn take_over(mode: Mode, what: &str, from: &Path, to: &Path) {
    let mut lab = Lab::up(mode, &[100, 100, 100], Path::new(XTASK)).expect("lab up");
    let config = lab.config(mode);
    lab.start_lb(from, &config)
        .unwrap_or_else(|e| panic!("{what}: {} runs: {e:#}", from.display()));
    let mut holds = Vec::new();
    for i in 11..=18 {
        let src = format!("10.99.0.{i}");
        let (h, backend) = lab.hold(&src).expect("held connection");
        holds.push((src, backend, h));
    }
    // And UDP flows (layout 5 records those of unchanged slots no more).
    for i in 11..=14 {
        let src = format!("10.99.0.{i}");
        let (h, backend) = lab.hold_udp(&src).expect("held UDP flow");
        holds.push((format!("{src} (UDP)"), backend, h));
    }
    lab.stop_lb().unwrap_or_else(|e| {
        panic!(
            "{what}: SIGTERM {} (its data plane stays): {e:#}",
            from.display()
        )
    });
    let took = lab
        .start_lb_with(to, &config, &["--replace"])
        .unwrap_or_else(|e| panic!("{what}: {} takes over with --replace: {e:#}", to.display()));
    println!(
        "{} {what}: {} took over: {took}",
        mode.as_str(),
        to.display()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let mut broken = Vec::new();
    for (src, backend, h) in holds {
        let (ok, out, err) = h.finish(Duration::from_secs(10)).expect("hold ends");
        if !ok {
            broken.push(format!("{src} (on {backend}): {out:?} {err:?}"));
        }
    }
    assert!(
        broken.is_empty(),
        "{} {what}: connections broken: {broken:#?}",
        mode.as_str()
    );
    let status = lab.lb_cli(to, &["status", "--json"]).unwrap();
    assert!(
        status.contains("\"ring_size\""),
        "{} {what}: {} answers: {status}",
        mode.as_str(),
        to.display()
    );
}
