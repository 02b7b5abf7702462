//! The machine's side of a real-guest run: outside tools, mounts, loop
//! devices of image files and child processes, each a guard that undoes
//! itself when dropped (on error paths and panics too), so that a run never
//! leaves a mount, a loop device or a process behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::attach;

use super::RealError;

/// Directories searched for tools besides PATH (root's tools live in sbin).
const EXTRA_PATH: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Where tool `name` is: on PATH or in the usual system directories.
pub(crate) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_PATH.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Tool `name`, or why it is missing (with the Debian package that has it).
pub(crate) fn tool(name: &str, package: &str) -> Result<PathBuf, String> {
    find_tool(name).ok_or_else(|| format!("{name} is not installed (apt-get install {package})"))
}

/// The last `n` lines of `text`, for an error message.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `cmd` to its end; its stdout, or [`RealError::Failed`] naming `what`
/// with the end of its output.
pub(crate) fn run(what: &str, cmd: &mut Command) -> Result<String, RealError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| RealError::failed(what, format!("cannot run {:?}: {e}", cmd.get_program())))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(RealError::failed(
        what,
        format!(
            "{} ({}):\n{}",
            cmd.get_program().to_string_lossy(),
            out.status,
            tail(&format!("{stdout}\n{stderr}"), 12)
        ),
    ))
}

/// Runs `cmd` to its end: (whether it succeeded, its stdout and stderr).
pub(crate) fn run_status(what: &str, cmd: &mut Command) -> Result<(bool, String), RealError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| RealError::failed(what, format!("cannot run {:?}: {e}", cmd.get_program())))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// The user and group IDs of user `name` (from `id`).
pub(crate) fn user_ids(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id")
            .arg(flag)
            .arg(name)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// Gives `path` to user `ids`.
pub(crate) fn chown(path: &Path, (uid, gid): (u32, u32)) -> Result<(), RealError> {
    let (u, g) = (rustix::fs::Uid::from_raw(uid), rustix::fs::Gid::from_raw(gid));
    rustix::fs::chown(path, Some(u), Some(g))
        .map_err(|e| RealError::io(format!("cannot give {} to uid {uid}", path.display()), e.into()))
}

/// Sets `path`'s permission bits.
pub(crate) fn chmod(path: &Path, mode: u32) -> Result<(), RealError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| RealError::io(format!("cannot chmod {}", path.display()), e))
}

/// Creates directory `dir` (and its parents).
pub(crate) fn mkdir(dir: &Path) -> Result<(), RealError> {
    std::fs::create_dir_all(dir).map_err(|e| RealError::io(format!("cannot create {}", dir.display()), e))
}

/// A file system mounted by this run; unmounted when dropped.
#[derive(Debug)]
pub(crate) struct Mount {
    dir: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Mounts `device` (a block device) on `dir` (created) as `fstype` with `options`.
    pub(crate) fn new(device: &Path, dir: &Path, fstype: &str, options: &str) -> Result<Mount, RealError> {
        mkdir(dir)?;
        let mut cmd = Command::new(find_tool("mount").unwrap_or_else(|| "mount".into()));
        cmd.args(["-t", fstype]);
        if !options.is_empty() {
            cmd.args(["-o", options]);
        }
        run(
            &format!("mounting {} on {}", device.display(), dir.display()),
            cmd.arg(device).arg(dir),
        )?;
        Ok(Mount {
            dir: dir.to_owned(),
            mounted: true,
        })
    }

    /// Where it is mounted.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts it (its file system is written back first).
    pub(crate) fn unmount(mut self) -> Result<(), RealError> {
        self.mounted = false;
        attach::unmount(&self.dir).map_err(|e| RealError::failed("unmounting", e))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = attach::unmount(&self.dir);
        }
    }
}

/// An image file as a loop device of this run; released when dropped.
#[derive(Debug)]
pub(crate) struct LoopImage {
    device: PathBuf,
    attached: bool,
}

impl LoopImage {
    /// Sets up a loop device over `image`.
    pub(crate) fn new(image: &Path) -> Result<LoopImage, RealError> {
        let losetup = find_tool("losetup").unwrap_or_else(|| "losetup".into());
        let out = run(
            &format!("setting up a loop device for {}", image.display()),
            Command::new(losetup).args(["--find", "--show"]).arg(image),
        )?;
        let device = PathBuf::from(out.trim());
        if !device.starts_with("/dev") {
            return Err(RealError::failed("losetup", format!("printed {out:?}, not a device")));
        }
        Ok(LoopImage { device, attached: true })
    }

    /// The loop device.
    pub(crate) fn device(&self) -> &Path {
        &self.device
    }

    /// Releases the loop device.
    pub(crate) fn release(mut self) -> Result<(), RealError> {
        self.attached = false;
        attach::release_loop(&self.device).map_err(|e| RealError::failed("releasing a loop device", e))
    }
}

impl Drop for LoopImage {
    fn drop(&mut self) {
        if self.attached {
            for m in attach::mounts_of(&self.device) {
                let _ = attach::unmount(&m);
            }
            let _ = attach::release_loop(&self.device);
        }
    }
}

/// A child process of this run; killed (and reaped) when dropped.
#[derive(Debug)]
pub(crate) struct ChildGuard {
    child: Option<Child>,
    what: String,
}

impl ChildGuard {
    /// Starts `cmd` with its output to files `out` (stdout) and `err` (stderr).
    pub(crate) fn spawn(what: &str, cmd: &mut Command, out: &Path, err: &Path) -> Result<ChildGuard, RealError> {
        let file =
            |p: &Path| std::fs::File::create(p).map_err(|e| RealError::io(format!("cannot create {}", p.display()), e));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file(out)?)
            .stderr(file(err)?)
            .spawn()
            .map_err(|e| RealError::failed(what, format!("cannot start {:?}: {e}", cmd.get_program())))?;
        Ok(ChildGuard {
            child: Some(child),
            what: what.to_owned(),
        })
    }

    /// Waits up to `limit` for it to end (then kills it: an error); whether it
    /// succeeded.
    pub(crate) fn wait(mut self, limit: Duration) -> Result<bool, RealError> {
        let mut child = self
            .child
            .take()
            .expect("a guard holds its child until it is waited for");
        let deadline = Instant::now() + limit;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status.success()),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(RealError::failed(
                        &self.what,
                        format!("did not end within {} s: killed", limit.as_secs()),
                    ));
                }
                Err(e) => return Err(RealError::io(format!("waiting for {}", self.what), e)),
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
