//! `hotpath up`: the whole system on one machine, in one process, for a developer or a
//! newcomer.
//!
//! It starts (never installs) a nats-server with JetStream and a Postgres cluster in the data
//! directory, on ports it records there so URLs stay the same from run to run, applies
//! migrations and stream definitions, runs the gateway, the consumers and the push workers
//! (for the platforms it has credentials for), and prints how to
//! talk to it. Ctrl-C drains and stops everything. The servers are children of this process
//! and die with it even on `kill -9`; the next `hotpath up` finds their data where they left it
//! (Postgres and JetStream both recover their own files) and carries on.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use hotpath_core::auth;
use hotpath_core::config::Config;
use hotpath_localstack::{NatsOptions, NatsServer, Postgres, free_port};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::roles;

/// Ports chosen on the first run (recorded in `ports.json`), reused on later ones when still
/// free. Other tools (`hotpath bench`) find the servers through them.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ports {
    pub nats: u16,
    pub postgres: u16,
}

/// The ports `hotpath up` recorded in `data_dir`.
pub fn read_ports(data_dir: &Path) -> anyhow::Result<Ports> {
    let path = data_dir.join("ports.json");
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading {} (start the system with `hotpath up --data-dir {}`)",
            path.display(),
            data_dir.display()
        )
    })?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

pub async fn up(data_dir: &Path, listen: SocketAddr, mut config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    refuse_if_already_running(&data_dir)?;
    std::fs::write(data_dir.join("up.pid"), std::process::id().to_string())?;

    open_path_for_postgres(&data_dir)?;
    let ports = choose_ports(&data_dir)?;
    println!(
        "starting nats-server on 127.0.0.1:{} (data in {})",
        ports.nats,
        data_dir.join("nats").display()
    );
    let nats_options = NatsOptions {
        sync_interval: config.nats_sync.map(|sync| sync.to_string()),
    };
    let mut nats = NatsServer::start_with(&data_dir.join("nats"), ports.nats, nats_options).await?;
    println!(
        "starting Postgres on 127.0.0.1:{} (data in {})",
        ports.postgres,
        data_dir.join("postgres").display()
    );
    let mut postgres =
        Postgres::start(&data_dir.join("postgres"), ports.postgres, "hotpath", &[]).await?;

    config.nats_url = nats.url();
    config.database_url = postgres.url();
    config.listen = listen;
    if config.jwt_secret.is_none()
        && config.jwt_secret_file.is_none()
        && config.jwt_public_key_file.is_none()
        && config.jwt_jwks_url.is_none()
    {
        config.jwt_secret_file = Some(ensure_dev_secret(&data_dir)?);
    }
    tracing::info!(config = %config, "configuration");

    let shutdown = CancellationToken::new();
    let outcome = run_until_signal(&config, &data_dir, shutdown).await;

    println!("stopping nats-server and Postgres");
    if let Err(error) = nats.stop().await {
        tracing::warn!(%error, "stopping nats-server");
    }
    if let Err(error) = postgres.stop().await {
        tracing::warn!(%error, "stopping Postgres");
    }
    let _ = std::fs::remove_file(data_dir.join("up.pid"));
    outcome
}

async fn run_until_signal(
    config: &Config,
    data_dir: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    roles::prepare(config).await?;
    let mut consumers = roles::spawn_consumers(config.clone(), shutdown.clone()).await?;
    let mut push = roles::spawn_push(config.clone(), None, shutdown.clone()).await?;
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

/// The recorded ports if they are still free, else new free ones (recorded for next time).
fn choose_ports(data_dir: &Path) -> anyhow::Result<Ports> {
    let path = data_dir.join("ports.json");
    let recorded = read_ports(data_dir).ok();
    let usable = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    let ports = Ports {
        nats: recorded
            .as_ref()
            .map(|p| p.nats)
            .filter(|p| usable(*p))
            .map_or_else(free_port, Ok)?,
        postgres: recorded
            .as_ref()
            .map(|p| p.postgres)
            .filter(|p| usable(*p))
            .map_or_else(free_port, Ok)?,
    };
    std::fs::write(&path, serde_json::to_vec_pretty(&ports)?)?;
    Ok(ports)
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

fn configured(yes: bool) -> &'static str {
    if yes { "configured" } else { "not configured" }
}

fn print_welcome(addr: SocketAddr, config: &Config, data_dir: &Path) -> anyhow::Result<()> {
    let secret = auth::hs256_secret(config)?;
    let alice = auth::mint_hs256_token(&secret, "alice", 86_400)?;
    let base = format!("http://{addr}");
    println!(
        r#"
Hotpath is up.
  API          {base}/v1/messages   (POST)
  health       {base}/healthz  {base}/readyz
  live view    {base}/live         (open in a browser: watch messages arrive over the WebSocket)
  metrics      {base}/metrics
  push         APNS {apns}, FCM {fcm} (credentials: README, "Offline push")
  NATS         {nats}
  Postgres     {pg}
  data dir     {dir}

Try it (tokens for other users: hotpath token <user> --data-dir {dir}):

  export TOKEN={alice}
  CONV=$(curl -s -X POST {base}/v1/conversations -H "Authorization: Bearer $TOKEN" \
      -H 'Content-Type: application/json' -d '{{"type":"group","members":["bob"]}}' \
      | sed 's/.*"conversationId":"\([^"]*\)".*/\1/')
  curl -s -X POST {base}/v1/messages -H "Authorization: Bearer $TOKEN" \
      -H 'Content-Type: application/json' \
      -d "{{\"conversationId\":\"$CONV\",\"content\":\"hello\",\"contentType\":\"text\",\"clientMessageId\":\"m-1\"}}"
  curl -s {base}/v1/conversations/$CONV/messages -H "Authorization: Bearer $TOKEN"

Press Ctrl-C to stop.
"#,
        nats = hotpath_core::config::redact_nats_url(&config.nats_url),
        apns = configured(
            config.apns_key_file.is_some()
                || config.apns_key.is_some()
                || config.apns_cert_file.is_some()
        ),
        fcm = configured(config.fcm_credentials_file.is_some() || config.fcm_credentials.is_some()),
        pg = hotpath_core::config::redact_url_password(&config.database_url),
        dir = data_dir.display(),
    );
    Ok(())
}
