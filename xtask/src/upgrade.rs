//! The previous release's `lb`, built from this repository's own history, for the upgrade test
//! (`xtask/tests/upgrade.rs`): `cargo xtask test` starts the build in the background while the
//! host and BPF tiers run, and runs the test in the lab tier.
//!
//! The source is `git archive` of [`PREVIOUS_RELEASE`] (no worktree: the clone is left as it
//! was), built with that commit's own `Cargo.lock` into `target/upgrade-from/` (a target
//! directory of its own: its `lb` must not replace this tree's `target/debug/lb`). The binary
//! is kept as `target/upgrade-from/lb-<commit>` and reused by later runs.

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::cmd;

/// The release `lb` must take over from, and hand back to, without breaking a flow: an
/// upgrade with `lb run --replace` from it, and a downgrade to it. Raise it when a release
/// is cut (and when a data-plane layout change means the older one is no longer supported).
pub const PREVIOUS_RELEASE: &str = "ced97ab8bc757648ce3dd74b67cf0cccdced0b4b";

/// Where the previous release's build stands.
pub enum Previous {
    /// Built (now or by an earlier run).
    Ready(PathBuf),
    /// Building in the background: [`Previous::wait`] finishes it.
    Building {
        child: Build,
        log: PathBuf,
        built: PathBuf,
        kept: PathBuf,
    },
    /// This clone does not have the commit (a shallow clone): the upgrade test cannot run.
    Missing(String),
}

fn dir() -> PathBuf {
    cmd::target_dir().join("upgrade-from")
}

/// Starts building the previous release's `lb` (or finds it built).
pub fn start() -> anyhow::Result<Previous> {
    let root = cmd::workspace_root();
    let dir = dir();
    let kept = dir.join(format!("lb-{PREVIOUS_RELEASE}"));
    if kept.exists() {
        return Ok(Previous::Ready(kept));
    }
    let have = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["cat-file", "-e", &format!("{PREVIOUS_RELEASE}^{{commit}}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        return Ok(Previous::Missing(format!(
            "commit {PREVIOUS_RELEASE} (the previous release) is not in this clone \
             (a shallow clone? `git fetch --unshallow` gets it)"
        )));
    }
    let src = dir.join(format!("src-{PREVIOUS_RELEASE}"));
    if src.exists() {
        std::fs::remove_dir_all(&src)
            .with_context(|| format!("removing a partial {}", src.display()))?;
    }
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    extract(&root, &src)?;
    let log = dir.join("build.log");
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let target = dir.join("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let child = Command::new(&cargo)
        .args([
            "build",
            "--locked",
            "--package",
            "lb-userspace",
            "--bin",
            "lb",
        ])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &target)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawning {cargo} for the previous release"))?;
    Ok(Previous::Building {
        child: Build(child),
        log,
        built: target.join("debug/lb"),
        kept,
    })
}

/// `git archive PREVIOUS_RELEASE | tar -x -C src`.
fn extract(root: &Path, src: &Path) -> anyhow::Result<()> {
    let mut git = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["archive", "--format=tar", PREVIOUS_RELEASE])
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning git archive")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(src)
        .stdin(git.stdout.take().expect("piped"))
        .status()
        .context("spawning tar")?;
    let git = git.wait().context("waiting for git archive")?;
    if !git.success() || !tar.success() {
        bail!(
            "extracting {PREVIOUS_RELEASE} into {} failed (git {git}, tar {tar})",
            src.display()
        );
    }
    Ok(())
}

/// The background build (cargo in a process group of its own, with its compilers); stopped if
/// the tests end before it is waited for (a failed tier).
pub struct Build(Child);

impl Drop for Build {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let group = -(self.0.id() as i32);
            // SAFETY: kill has no memory preconditions; a negative pid names the process group
            // that `process_group(0)` made for the build.
            unsafe { libc::kill(group, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
}

impl Previous {
    /// Waits for the build. `Ok(None)`: the commit is missing (the reason was printed).
    pub fn wait(self) -> anyhow::Result<Option<PathBuf>> {
        match self {
            Previous::Ready(p) => Ok(Some(p)),
            Previous::Missing(why) => {
                println!("==> NOTE: the upgrade test cannot run: {why}");
                Ok(None)
            }
            Previous::Building {
                mut child,
                log,
                built,
                kept,
            } => {
                let status = child
                    .0
                    .wait()
                    .context("waiting for the previous release's build")?;
                if !status.success() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    bail!(
                        "building the previous release ({PREVIOUS_RELEASE}) failed ({status}); \
                         the end of {}:\n{}",
                        log.display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                std::fs::copy(&built, &kept).with_context(|| {
                    format!("copying {} to {}", built.display(), kept.display())
                })?;
                Ok(Some(kept))
            }
        }
    }
}
