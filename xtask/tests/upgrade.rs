//! An upgrade from the previous release, by hand (not in `cargo xtask test`: it needs that
//! release's `lb` binary):
//!
//!     git worktree add /tmp/prev <previous release> && (cd /tmp/prev && cargo build -p lb-userspace --bin lb)
//!     LB_PREVIOUS_LB=/tmp/prev/target/debug/lb cargo test -p xtask --test upgrade -- --ignored --nocapture
//!
//! The previous `lb` runs the data plane while eight connections and four UDP flows hold (one
//! per client address); the new `lb` is refused without `--replace` when the layout changed,
//! then takes over with `--replace`: every held connection and flow must survive, on its
//! backend.

use std::{path::Path, time::Duration};

use xtask::{
    cmd,
    lab::{Lab, Mode},
};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

#[test]
#[ignore = "needs root and LB_PREVIOUS_LB (the previous release's lb): see the file's docs"]
fn upgrade_from_the_previous_release_keeps_connections() {
    let old = std::env::var_os("LB_PREVIOUS_LB").expect("LB_PREVIOUS_LB: the previous lb binary");
    for mode in [Mode::Generic, Mode::Native] {
        let mut lab = Lab::up(mode, &[100, 100, 100], Path::new(XTASK)).expect("lab up");
        let config = lab.config(mode);
        lab.start_lb(Path::new(&old), &config)
            .expect("the previous lb runs");
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
        lab.stop_lb()
            .expect("SIGTERM the previous lb (its data plane stays)");
        let took = lab
            .start_lb_with(&cmd::lb_binary(), &config, &["--replace"])
            .expect("the new lb takes over with --replace");
        println!("{}: the new lb took over: {took}", mode.as_str());
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
            "{}: connections broken by the upgrade: {broken:#?}",
            mode.as_str()
        );
        let status = lab
            .lb_cli(&cmd::lb_binary(), &["status", "--json"])
            .unwrap();
        assert!(
            status.contains("\"ring_size\""),
            "the new lb answers: {status}"
        );
    }
}
