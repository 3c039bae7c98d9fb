//! Helpers shared by both servers: waiting for children without blocking the runtime,
//! signalling, log files, ports and directories.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::{Instant, sleep};

/// How often a child is polled for exit. Children are `std::process::Child`ren (they have to
/// be forked by the spawner thread), so tokio's SIGCHLD-driven waiting is not available.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// How long we wait for a process to disappear after SIGKILL before reporting it stuck.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(10);

/// Waits up to `timeout` for `child` to exit; `None` if it is still running.
pub(crate) async fn wait_exit(
    child: &mut Child,
    timeout: Duration,
) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        sleep(POLL).await;
    }
}

/// Sends `signal` to a child we have not reaped yet (so its pid cannot have been reused).
pub(crate) fn signal(child: &Child, signal: libc::c_int) -> io::Result<()> {
    // Pids are at most 2^22 on Linux (PID_MAX_LIMIT), so they always fit in pid_t.
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on a pid we own.
    if unsafe { libc::kill(pid, signal) } != 0 {
        let err = io::Error::last_os_error();
        // ESRCH: it exited on its own in the meantime (it is a zombie until we reap it).
        if err.raw_os_error() != Some(libc::ESRCH) {
            return Err(err);
        }
    }
    Ok(())
}

/// Sends `first` (the server's graceful-shutdown signal), waits up to `grace`, then SIGKILLs.
/// Returns the exit status and whether the graceful shutdown finished in time.
pub(crate) async fn terminate(
    child: &mut Child,
    first: libc::c_int,
    grace: Duration,
) -> Result<(ExitStatus, bool)> {
    if let Some(status) = child.try_wait()? {
        return Ok((status, true));
    }
    signal(child, first)?;
    if let Some(status) = wait_exit(child, grace).await? {
        return Ok((status, true));
    }
    Ok((kill(child).await?, false))
}

/// SIGKILL and reap.
pub(crate) async fn kill(child: &mut Child) -> Result<ExitStatus> {
    signal(child, libc::SIGKILL)?;
    match wait_exit(child, KILL_WAIT).await? {
        Some(status) => Ok(status),
        None => bail!(
            "pid {} did not exit within {KILL_WAIT:?} of SIGKILL",
            child.id()
        ),
    }
}

/// SIGKILL and reap, blocking; for `Drop`, where we cannot await. After SIGKILL the wait is
/// short (the kernel tears the process down; it cannot catch or ignore the signal).
pub(crate) fn kill_blocking(child: &mut Child) {
    if let Err(err) = child.kill() {
        tracing::warn!(pid = child.id(), %err, "could not SIGKILL child");
        return;
    }
    if let Err(err) = child.wait() {
        tracing::warn!(pid = child.id(), %err, "could not reap child");
    }
}

/// Opens `path` for appending and returns it twice, for a child's stdout and stderr.
pub(crate) fn log_stdio(path: &Path) -> Result<(Stdio, Stdio)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log file {}", path.display()))?;
    let second = file
        .try_clone()
        .with_context(|| format!("duplicating log file handle {}", path.display()))?;
    Ok((file.into(), second.into()))
}

/// The last lines of a log file, for error messages. Never fails: a missing or unreadable
/// log yields a note saying so.
pub(crate) fn log_tail(path: &Path) -> String {
    const MAX_BYTES: u64 = 4096;
    const MAX_LINES: usize = 25;
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(MAX_LINES);
            format!(
                "last lines of {}:\n{}",
                path.display(),
                lines[start..].join("\n")
            )
        }
        Err(err) => format!("(could not read {}: {err})", path.display()),
    }
}

/// Fails with a clear message if something already listens on 127.0.0.1:`port`. Without this
/// check a readiness probe could talk to the other program before our server gives up.
pub(crate) fn ensure_port_free(port: u16) -> Result<()> {
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(_listener) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
            bail!("127.0.0.1:{port} is already in use by another process")
        }
        Err(err) => Err(err).with_context(|| format!("checking that 127.0.0.1:{port} is free")),
    }
}

/// Creates `dir` (and missing parents) and returns its canonical path together with the
/// directories that had to be created, outermost first.
pub(crate) fn create_dir(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let absolute =
        std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let mut created: Vec<PathBuf> = absolute
        .ancestors()
        .take_while(|p| !p.exists())
        .map(Path::to_path_buf)
        .collect();
    created.reverse();
    std::fs::create_dir_all(&absolute)
        .with_context(|| format!("creating {}", absolute.display()))?;
    let canonical = absolute
        .canonicalize()
        .with_context(|| format!("resolving {}", absolute.display()))?;
    Ok((canonical, created))
}

/// Whether `path` is an existing file with an execute bit set.
pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Looks `name` up on `PATH`.
pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}
