//! `cargo xtask bench`: runs the BPF_PROG_TEST_RUN benchmark of lb_xdp (lb-userspace/benches).

use xtask::cmd;

pub fn run() -> anyhow::Result<()> {
    cmd::bootstrap()?;
    cmd::cargo(
        &[
            "bench",
            "--locked",
            "--package",
            "lb-userspace",
            "--bench",
            "xdp",
        ],
        &[],
    )
}
