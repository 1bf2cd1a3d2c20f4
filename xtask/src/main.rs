//! `cargo xtask <task>`: build, run (build-and-attach), test, bench, demo, lab.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use xtask::{cmd, lab, labnet, upgrade};

mod bench;
mod demo;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Bootstrap the toolchain if needed and build everything (lb with its embedded eBPF object).
    Build,
    /// Build, then run `lb` with the given arguments (e.g. `-- run --config lb.toml` attaches).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test tier: host unit tests, BPF_PROG_TEST_RUN tests, lab tests (root).
    Test {
        /// Only these tiers (host, bpf, lab); default all.
        #[arg(long, value_delimiter = ',')]
        tier: Vec<String>,
    },
    /// Benchmarks: lb_xdp per-packet cost next to a trivial XDP program, same run.
    Bench,
    /// Format check, clippy -D warnings on host and eBPF crates, shellcheck (what CI runs).
    Lint,
    /// Bring up the namespace lab, run the balancer and show what it does.
    Demo(demo::Args),
    /// Lab maintenance.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// (internal) Lab backend server, run inside a backend namespace.
    #[command(hide = true)]
    LabBackend {
        #[arg(long)]
        name: String,
        #[arg(long = "vip")]
        vips: Vec<IpAddr>,
        #[arg(long, default_value_t = lab::HTTP_PORT)]
        http_port: u16,
        #[arg(long, default_value_t = lab::ECHO_PORT)]
        echo_port: u16,
        /// While this file exists, HTTP answers 503.
        #[arg(long)]
        fail_file: Option<PathBuf>,
    },
    /// (internal) Lab client, run inside the client namespace; prints a JSON tally
    /// (`--kind http|udp`; `http-detail` prints each request's source port and backend), or holds one
    /// TCP connection to the echo service (`--kind hold`) or one UDP flow (`--kind hold-udp`).
    #[command(hide = true)]
    LabClient {
        #[arg(long)]
        kind: String,
        #[arg(long)]
        target: SocketAddr,
        #[arg(long = "source", required = true)]
        sources: Vec<IpAddr>,
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Remove every lab namespace left behind (crashed or interrupted runs).
    Down,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.task {
        Task::Build => build(),
        Task::Run { args } => run(args),
        Task::Test { tier } => test(tier),
        Task::Bench => bench::run(),
        Task::Lint => lint(),
        Task::Demo(args) => demo::run(args),
        Task::Lab { cmd: LabCmd::Down } => lab::down_all().map(|v| {
            if v.is_empty() {
                println!("no lab namespaces left behind");
            } else {
                println!("removed {} namespaces: {}", v.len(), v.join(" "));
            }
        }),
        Task::LabBackend {
            name,
            vips,
            http_port,
            echo_port,
            fail_file,
        } => labnet::serve_backend(&name, &vips, http_port, echo_port, fail_file),
        Task::LabClient {
            kind,
            target,
            sources,
            ..
        } if kind == "hold" => labnet::hold(sources[0], target),
        Task::LabClient {
            kind,
            target,
            sources,
            ..
        } if kind == "hold-udp" => labnet::hold_udp(sources[0], target),
        Task::LabClient {
            kind,
            target,
            sources,
            count,
        } if kind == "raw-vlan-syn" => labnet::raw_vlan_syns(
            sources[0],
            target,
            100,
            count,
            lab::LB_MAC
                .split(':')
                .map(|x| u8::from_str_radix(x, 16).unwrap_or(0))
                .collect::<Vec<u8>>()
                .try_into()
                .unwrap_or([0; 6]),
        ),
        Task::LabClient {
            kind,
            target,
            sources,
            count,
        } if kind == "stream" => labnet::stream(&sources, target, count),
        Task::LabClient {
            kind,
            target,
            sources,
            count,
        } if kind == "http-detail" => labnet::http_detail(&sources, target, count),
        Task::LabClient {
            kind,
            target,
            sources,
            count,
        } => labnet::many(&kind, &sources, target, count).map(|t| println!("{}", t.to_json())),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn build() -> anyhow::Result<()> {
    cmd::bootstrap()?;
    cmd::cargo(
        &["build", "--locked", "--package", "lb-userspace", "--bins"],
        &[],
    )
}

fn lint() -> anyhow::Result<()> {
    cmd::bootstrap()?;
    println!("==> cargo fmt --check");
    cmd::cargo(&["fmt", "--all", "--", "--check"], &[])?;
    println!("==> clippy (host crates)");
    cmd::cargo(
        &[
            "clippy",
            "--locked",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    let root = cmd::workspace_root();
    for features in ["", "log"] {
        println!(
            "==> clippy (lb-ebpf, bpfel-unknown-none, Debian toolchain, features [{features}])"
        );
        let status = Command::new("cargo")
            .args([
                "+debian-web",
                "clippy",
                "--locked",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "--features",
                features,
                "--",
                "-D",
                "warnings",
            ])
            .current_dir(root.join("lb-ebpf"))
            .env("RUSTC_BOOTSTRAP", "aya_ebpf,lb_ebpf")
            .status()
            .context("running clippy for lb-ebpf")?;
        if !status.success() {
            bail!("clippy on lb-ebpf (features [{features}]) failed ({status})");
        }
    }
    println!("==> shellcheck");
    let mut scripts: Vec<String> = std::fs::read_dir(root.join("scripts"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .map(|p| p.display().to_string())
        .collect();
    scripts.push(root.join(".ci/run").display().to_string());
    let refs: Vec<&str> = scripts.iter().map(String::as_str).collect();
    cmd::run("shellcheck", &refs).map(|_| ())?;
    println!("==> lint OK");
    Ok(())
}

fn run(args: Vec<String>) -> anyhow::Result<()> {
    build()?;
    let lb = cmd::lb_binary();
    let status = Command::new(&lb)
        .args(&args)
        .status()
        .with_context(|| format!("running {}", lb.display()))?;
    if !status.success() {
        bail!("lb {} exited with {status}", args.join(" "));
    }
    Ok(())
}

fn test(tiers: Vec<String>) -> anyhow::Result<()> {
    let all = tiers.is_empty();
    let want = |t: &str| all || tiers.iter().any(|x| x == t);
    for t in &tiers {
        if !["host", "bpf", "lab"].contains(&t.as_str()) {
            bail!("unknown tier `{t}` (host, bpf, lab)");
        }
    }
    cmd::bootstrap()?;
    // The previous release's `lb` for the upgrade test builds while the first tiers run.
    let previous = if want("lab") {
        println!(
            "==> building the previous release's lb ({}) in the background",
            upgrade::PREVIOUS_RELEASE
        );
        Some(upgrade::start()?)
    } else {
        None
    };
    if want("host") {
        println!("==> tier 1: host unit tests");
        cmd::cargo(&["test", "--locked"], &[])?;
    }
    if want("bpf") || want("lab") {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "the BPF and lab tiers need root (run `cargo xtask test --tier host` as a normal user)"
            );
        }
    }
    if want("bpf") {
        println!("==> tier 2: BPF_PROG_TEST_RUN tests against the real lb_xdp object");
        cmd::cargo(
            &[
                "test",
                "--locked",
                "--package",
                "lb-userspace",
                "--test",
                "bpf",
                "--",
                "--ignored",
                "--test-threads=1",
            ],
            &[],
        )?;
    }
    if let Some(previous) = previous {
        // Before the lab tier: its tests must not share the CPUs with a compiler.
        let old = previous.wait()?;
        println!("==> tier 3: lab tests in network namespaces");
        build()?;
        xtask_tests(&["lab", "cluster"], &[])?;
        if let Some(old) = old {
            println!("==> tier 3: upgrade from and downgrade to the previous release");
            xtask_tests(&["upgrade"], &[("LB_PREVIOUS_LB", &old.to_string_lossy())])?;
        }
        println!("==> tier 3: the README's demo (`cargo xtask demo`)");
        demo::run(demo::Args::default())?;
        println!("==> tier 3: several nodes (`cargo xtask demo --nodes 3`)");
        demo::run(demo::Args::nodes(3))?;
        let left = lab::down_all()?;
        if !left.is_empty() {
            bail!("lab tests left namespaces behind: {}", left.join(" "));
        }
    }
    println!("==> all requested tiers passed");
    Ok(())
}

/// `cargo test -p xtask --test <each> -- --ignored --test-threads=1 --nocapture`: the lab's
/// tests, one at a time (they share the namespaces' names and the CPUs).
fn xtask_tests(tests: &[&str], envs: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut args = vec!["test", "--locked", "--package", "xtask"];
    for t in tests {
        args.extend(["--test", t]);
    }
    args.extend(["--", "--ignored", "--test-threads=1", "--nocapture"]);
    cmd::cargo(&args, envs)
}

/// Path of this xtask binary (it serves `lab-backend` / `lab-client` inside namespaces).
///
/// When cargo rebuilt it while this process runs (the lab tier builds it for its tests), Linux
/// reports `<path> (deleted)`: the file at `<path>` is then the rebuilt binary, which is the one
/// to start.
pub fn self_exe() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(live) => PathBuf::from(live),
        None => exe,
    })
}
