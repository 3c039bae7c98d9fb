//! One role as a child process: `hotpath gateway`, `hotpath consumers` or `hotpath push`,
//! run from this very binary (`std::env::current_exe()`), configured through the environment
//! the way Kubernetes configures a pod.
//!
//! A child starts from this process's environment, then gets the settings `hotpath up` was
//! given as flags (as their `HOTPATH_*` variables, since a role takes no `up` flags), then
//! what makes it this member: the local servers' URLs, its listen address, its replica index.
//! Its stdout and stderr are appended to its own log file in the data directory.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use hotpath_localstack::OwnedChild;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Which role a process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Consumers,
    Push,
}

impl Role {
    /// The `hotpath` subcommand that runs it.
    pub fn subcommand(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Consumers => "consumers",
            Role::Push => "push",
        }
    }
}

/// Everything needed to start (and restart) one role process.
#[derive(Debug, Clone)]
pub struct RoleSpec {
    /// `gateway-0`, `consumers-1`, `push`: the member's name in `ports.json` and its log's.
    pub name: String,
    pub role: Role,
    /// The gateway's API, or the metrics endpoint of consumers and push workers.
    pub listen: SocketAddr,
    pub log: PathBuf,
    /// Environment on top of this process's, in order (later entries win).
    pub env: Vec<(String, OsString)>,
    /// How much lower than `hotpath up` it runs: the delivery side's niceness for consumer
    /// replicas and push workers (ADR 0013: on a shared machine the request path comes
    /// first), 0 for gateways.
    pub niceness: i32,
}

impl RoleSpec {
    /// Starts the process.
    pub async fn spawn(&self) -> anyhow::Result<OwnedChild> {
        let exe = std::env::current_exe().context("finding the hotpath binary")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new(exe);
        cmd.arg(self.role.subcommand())
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if self.niceness != 0 {
            let niceness = self.niceness;
            // SAFETY: between fork and exec the closure makes two system calls on the child
            // itself (async-signal-safe), allocates nothing and takes no lock. Threads the
            // role starts later inherit the priority. Failing is harmless: it keeps ours.
            unsafe {
                cmd.pre_exec(move || {
                    let current = libc::getpriority(libc::PRIO_PROCESS, 0);
                    libc::setpriority(libc::PRIO_PROCESS, 0, current + niceness);
                    Ok(())
                });
            }
        }
        OwnedChild::spawn(cmd).await
    }

    /// Waits until the process answers `GET /healthz` with 200, or fails if it ends first or
    /// takes longer than `limit` (with the end of its log, which says why).
    pub async fn wait_healthy(
        &self,
        child: &mut OwnedChild,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = child.try_exit()? {
                anyhow::bail!(
                    "{} exited during start-up ({status}); {}",
                    self.name,
                    log_tail(&self.log)
                );
            }
            if healthz(self.listen).await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "{} did not answer {}/healthz within {limit:?}; {}",
                    self.name,
                    self.listen,
                    log_tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Whether `GET /healthz` at `addr` answers 200 (a bare HTTP/1.0 request: the roles serve it
/// without authentication).
pub async fn healthz(addr: SocketAddr) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        std::io::Result::Ok(head.starts_with(b"HTTP/1.") && &head[9..12] == b"200")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(true))
    )
}

/// The last lines of a role's log, for an error message.
fn log_tail(path: &Path) -> String {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(8192)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let text = read().unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(20);
    format!(
        "last lines of {}:\n{}",
        path.display(),
        lines[start..].join("\n")
    )
}
