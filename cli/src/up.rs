//! `hotpath up`: the whole system on one machine, for a developer or a newcomer.
//!
//! It starts (never installs) a nats-server with JetStream and a Postgres cluster in the data
//! directory, on ports it records there so URLs stay the same from run to run, applies
//! migrations and stream definitions, runs the gateway, the consumers and the push workers
//! (for the platforms it has credentials for), and prints how to
//! talk to it. Ctrl-C drains and stops everything. The servers are children of this process
//! and die with it even on `kill -9`; the next `hotpath up` finds their data where they left it
//! (Postgres and JetStream both recover their own files) and carries on.
//!
//! By default the roles run inside this process, on tasks. Asked for a topology
//! (`--gateways`, `--consumer-replicas`, `--nats-nodes`, see [`Topology`]), it runs the
//! production shape instead, each role its own supervised process: [`crate::topology`].

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use hotpath_core::auth;
use hotpath_core::config::Config;
use hotpath_localstack::{NatsOptions, NatsServer, Ports, Postgres, free_port};
use tokio_util::sync::CancellationToken;

use crate::delivery_runtime::DeliveryRuntime;
use crate::roles;

/// What `hotpath up` was asked to run besides the servers. Any of the three given (on the
/// command line or through its environment variable, whatever the value) selects the
/// production topology, each role its own process ([`crate::topology`]); none given keeps
/// everything in this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Topology {
    pub nats_nodes: Option<u32>,
    pub gateways: Option<u32>,
    pub consumer_replicas: Option<u32>,
}

impl Topology {
    pub fn process_mode(&self) -> bool {
        self.nats_nodes.is_some() || self.gateways.is_some() || self.consumer_replicas.is_some()
    }
}

/// `hotpath up`: the servers and the roles, until Ctrl-C. `forwarded` are the settings given
/// as flags, as the environment variables that carry them to role processes.
pub async fn up(
    data_dir: &Path,
    config: Config,
    topology: Topology,
    forwarded: Vec<(String, OsString)>,
) -> anyhow::Result<()> {
    let data_dir = claim_data_dir(data_dir)?;
    let outcome = if topology.process_mode() {
        crate::topology::up(&data_dir, config, topology, forwarded).await
    } else {
        in_process(&data_dir, config).await
    };
    let _ = std::fs::remove_file(data_dir.join("up.pid"));
    outcome
}

/// Creates the data directory, refuses it if another `hotpath up` runs on it, and records
/// this process as its owner. Returns its canonical path.
fn claim_data_dir(data_dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    refuse_if_already_running(&data_dir)?;
    std::fs::write(data_dir.join("up.pid"), std::process::id().to_string())?;
    open_path_for_postgres(&data_dir)?;
    Ok(data_dir)
}

/// Everything in this process: the servers, then the roles on tasks.
async fn in_process(data_dir: &Path, mut config: Config) -> anyhow::Result<()> {
    let ports = choose_ports(data_dir)?;
    ports.write(data_dir)?;
    let (mut nats, mut postgres) = start_servers(data_dir, &ports, &config).await?;
    configure(&mut config, &nats.url(), &postgres.url(), data_dir)?;
    tracing::info!(config = %config, "configuration");

    let shutdown = CancellationToken::new();
    let outcome = run_until_signal(&config, data_dir, shutdown).await;

    println!("stopping nats-server and Postgres");
    if let Err(error) = nats.stop().await {
        tracing::warn!(%error, "stopping nats-server");
    }
    if let Err(error) = postgres.stop().await {
        tracing::warn!(%error, "stopping Postgres");
    }
    outcome
}

/// Starts the single nats-server and Postgres on `ports`, with their data in `data_dir`.
async fn start_servers(
    data_dir: &Path,
    ports: &Ports,
    config: &Config,
) -> anyhow::Result<(NatsServer, Postgres)> {
    println!(
        "starting nats-server on 127.0.0.1:{} (data in {})",
        ports.nats,
        data_dir.join("nats").display()
    );
    let nats =
        NatsServer::start_with(&data_dir.join("nats"), ports.nats, nats_options(config)).await?;
    let postgres = start_postgres(data_dir, ports.postgres).await?;
    Ok((nats, postgres))
}

/// Starts Postgres on `port`, with its cluster in `<data_dir>/postgres`.
pub(crate) async fn start_postgres(data_dir: &Path, port: u16) -> anyhow::Result<Postgres> {
    println!(
        "starting Postgres on 127.0.0.1:{port} (data in {})",
        data_dir.join("postgres").display()
    );
    Postgres::start(&data_dir.join("postgres"), port, "hotpath", &[]).await
}

/// How the configuration shapes the nats-servers `hotpath up` generates configs for.
pub(crate) fn nats_options(config: &Config) -> NatsOptions {
    NatsOptions {
        sync_interval: config.nats_sync.map(|sync| sync.to_string()),
    }
}

/// Points the configuration at the local servers, with the development JWT secret unless
/// another way of verifying tokens is configured.
pub(crate) fn configure(
    config: &mut Config,
    nats_url: &str,
    database_url: &str,
    data_dir: &Path,
) -> anyhow::Result<()> {
    config.nats_url = nats_url.to_owned();
    config.database_url = database_url.to_owned();
    if config.jwt_secret.is_none()
        && config.jwt_secret_file.is_none()
        && config.jwt_public_key_file.is_none()
        && config.jwt_jwks_url.is_none()
    {
        config.jwt_secret_file = Some(ensure_dev_secret(data_dir)?);
    }
    Ok(())
}

async fn run_until_signal(
    config: &Config,
    data_dir: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    roles::prepare(config).await?;
    // The delivery side on threads of its own, below the gateway's priority (ADR 0013).
    let delivery = DeliveryRuntime::start(config.delivery_niceness)?;
    let mut consumers = delivery
        .spawn(roles::spawn_consumers(config.clone(), shutdown.clone()))
        .await?;
    let mut push = delivery
        .spawn(roles::spawn_push(config.clone(), None, shutdown.clone()))
        .await?;
    let (addr, mut gateway) = roles::spawn_gateway(config.clone(), shutdown.clone()).await?;
    print_welcome(addr, config, data_dir)?;

    // Run until asked to stop, or until a role ends by itself (which is a failure: say so
    // and stop the rest rather than keep serving half a system).
    let early_end = tokio::select! {
        () = roles::termination_signal() => None,
        ended = &mut gateway => Some(("gateway", ended)),
        ended = &mut consumers => Some(("consumers", ended)),
        ended = &mut push => Some(("push workers", ended)),
    };
    shutdown.cancel();
    if let Some((role, ended)) = early_end {
        let error = match ended {
            Ok(Ok(())) => anyhow::anyhow!("the {role} stopped unexpectedly"),
            Ok(Err(error)) => error.context(format!("the {role} failed")),
            Err(error) => anyhow::Error::from(error).context(format!("the {role} task died")),
        };
        return Err(error);
    }

    println!("\nshutting down: draining requests and settling in-flight batches");
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        let gateway = gateway.await;
        let consumers = consumers.await;
        let push = push.await;
        (gateway, consumers, push)
    })
    .await;
    match drained {
        Ok((gateway, consumers, push)) => {
            gateway.context("gateway task")??;
            consumers.context("consumers task")??;
            push.context("push workers task")??;
        }
        Err(_) => tracing::warn!("roles did not stop within 30 s"),
    }
    Ok(())
}

/// Run as root, Postgres runs as the `postgres` user, which must be able to walk down to the
/// data directory. A checkout in a private home directory (`/root`, mode 0700) would stop it,
/// so the directories on the way get the search bit for others (o+x: enter, not list), and we
/// say so.
fn open_path_for_postgres(data_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    for dir in data_dir.ancestors() {
        let metadata =
            std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        let mode = metadata.permissions().mode();
        if mode & 0o001 == 0 {
            println!(
                "note: allowing others to traverse {} (o+x) so Postgres can reach its data",
                dir.display()
            );
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001))
                .with_context(|| format!("making {} traversable", dir.display()))?;
        }
    }
    Ok(())
}

fn refuse_if_already_running(data_dir: &Path) -> anyhow::Result<()> {
    let Ok(pid) = std::fs::read_to_string(data_dir.join("up.pid")) else {
        return Ok(());
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return Ok(());
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let alive_hotpath =
        pid as u32 != std::process::id() && String::from_utf8_lossy(&cmdline).contains("hotpath");
    anyhow::ensure!(
        !alive_hotpath,
        "hotpath up is already running with this data directory (pid {pid}); stop it with Ctrl-C or `kill {pid}`"
    );
    Ok(())
}

/// The recorded ports of the servers if they are still free, else new free ones. The caller
/// records them (for next time and for the tools).
pub(crate) fn choose_ports(data_dir: &Path) -> anyhow::Result<Ports> {
    let recorded = Ports::read(data_dir).ok();
    Ok(Ports {
        nats: reuse_or_free(recorded.as_ref().map(|p| p.nats))?,
        postgres: reuse_or_free(recorded.as_ref().map(|p| p.postgres))?,
        up_pid: Some(std::process::id()),
        ..Ports::default()
    })
}

/// `recorded` if it is still free on 127.0.0.1, else a free port.
pub(crate) fn reuse_or_free(recorded: Option<u16>) -> anyhow::Result<u16> {
    match recorded.filter(|port| port_is_free(*port)) {
        Some(port) => Ok(port),
        None => Ok(free_port()?),
    }
}

pub(crate) fn port_is_free(port: u16) -> bool {
    port != 0 && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The development HS256 secret, generated on first run. One the gateway would refuse (empty,
/// or shorter than 32 bytes, as an edited file may be) is replaced by a new one: it is a
/// development secret, and the only cost is that tokens minted with the old one stop working.
pub fn ensure_dev_secret(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("jwt-secret");
    if path.exists() {
        match auth::read_secret_file(&path) {
            Ok(_) => return Ok(path),
            Err(error) => {
                println!(
                    "note: replacing the development JWT secret {} ({error:#}); tokens signed \
                     with the old one are no longer accepted",
                    path.display()
                );
                tracing::warn!(path = %path.display(), %error, "replacing the development JWT secret");
            }
        }
    }
    std::fs::write(&path, auth::generate_secret())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// Whether APNS and FCM have credentials, for the banner.
pub(crate) fn push_line(config: &Config) -> String {
    let configured = |yes: bool| if yes { "configured" } else { "not configured" };
    format!(
        "APNS {}, FCM {}",
        configured(
            config.apns_key_file.is_some()
                || config.apns_key.is_some()
                || config.apns_cert_file.is_some()
        ),
        configured(config.fcm_credentials_file.is_some() || config.fcm_credentials.is_some()),
    )
}

fn print_welcome(addr: SocketAddr, config: &Config, data_dir: &Path) -> anyhow::Result<()> {
    let base = format!("http://{addr}");
    println!(
        r#"
Hotpath is up.
  API          {base}/v1/messages   (POST)
  health       {base}/healthz  {base}/readyz
  web client   {base}/             (open in a browser, sign in with a token from `hotpath token <user>`)
  live view    {base}/live         (open in a browser: watch messages arrive over the WebSocket)
  metrics      {base}/metrics
  push         {push} (credentials: README, "Offline push")
  NATS         {nats}
  Postgres     {pg}
  data dir     {dir}
{try_it}"#,
        push = push_line(config),
        nats = hotpath_core::config::redact_nats_url(&config.nats_url),
        pg = hotpath_core::config::redact_url_password(&config.database_url),
        dir = data_dir.display(),
        try_it = try_it(config, &base, &base, data_dir)?,
    );
    Ok(())
}

/// The walkthrough under the banner: a token for alice, a conversation created through
/// `create`, a message sent through `send`, the history read back through `create`.
pub(crate) fn try_it(
    config: &Config,
    create: &str,
    send: &str,
    data_dir: &Path,
) -> anyhow::Result<String> {
    let secret = auth::hs256_secret(config)?;
    let alice = auth::mint_hs256_token(&secret, "alice", 86_400)?;
    Ok(format!(
        r#"
Try it (tokens for other users: hotpath token <user> --data-dir {dir}):

  export TOKEN={alice}
  CONV=$(curl -s -X POST {create}/v1/conversations -H "Authorization: Bearer $TOKEN" \
      -H 'Content-Type: application/json' -d '{{"type":"group","members":["bob"]}}' \
      | sed 's/.*"conversationId":"\([^"]*\)".*/\1/')
  curl -s -X POST {send}/v1/messages -H "Authorization: Bearer $TOKEN" \
      -H 'Content-Type: application/json' \
      -d "{{\"conversationId\":\"$CONV\",\"content\":\"hello\",\"contentType\":\"text\",\"clientMessageId\":\"m-1\"}}"
  curl -s {create}/v1/conversations/$CONV/messages -H "Authorization: Bearer $TOKEN"

Press Ctrl-C to stop.
"#,
        dir = data_dir.display(),
    ))
}
