//! `hotpath up` in process mode: Hotpath's production topology on one machine, each role its
//! own OS process, as Kubernetes would run it.
//!
//! The `hotpath up` process owns everything and serves nothing itself:
//! 1. it starts the servers in the data directory: Postgres as in one-process mode, and one
//!    nats-server, or with `--nats-nodes 3` a NATS cluster with accounts ([`nats`]), each role
//!    then connecting as its own least-privilege user with the streams at three replicas;
//! 2. it applies the migrations and stream definitions once, before any role starts (each
//!    role checks them again at its own start, which then changes nothing);
//! 3. it starts the roles as children of itself, from its own binary: G gateways
//!    (`hotpath gateway`, each on its own port), C consumer replicas (`hotpath consumers`
//!    with `HOTPATH_CONSUMER_REPLICA=k` of `HOTPATH_CONSUMER_REPLICAS=C`, each with its own
//!    metrics port) and the push workers (`hotpath push`), and waits until each answers
//!    `/healthz`;
//! 4. it records every member's address, pid and log in `ports.json`
//!    ([`hotpath_localstack::Ports`]) and supervises them all ([`supervisor`]): a member that
//!    dies is restarted, with backoff, and its new pid recorded;
//! 5. on Ctrl-C or SIGTERM it stops the gateways first (they drain their requests), then the
//!    consumers and push workers (they settle their batches and release their leases), then
//!    the servers.
//!
//! Every child is started with the parent-death signal ([`hotpath_localstack::OwnedChild`]),
//! so a `kill -9` of `hotpath up` takes the whole topology down with it, and the next
//! `hotpath up` starts it again on the same ports and data.

mod nats;
mod plan;
mod registry;
mod role;
mod supervisor;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use hotpath_core::config::{Config, redact_nats_url, redact_url_password};
use hotpath_localstack::{Member, Mode, OwnedChild, Ports, Postgres};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::roles;
use crate::up::{self, Topology};
use nats::LocalNats;
use plan::Shape;
use registry::Registry;
use role::{Role, RoleSpec};
use supervisor::{Process, supervise};

/// How long a role may take from spawn to answering `/healthz` (it connects to NATS and
/// Postgres and, for a gateway, compiles the policy chain).
const START_LIMIT: Duration = Duration::from_secs(120);

/// Runs the topology until Ctrl-C or SIGTERM.
pub async fn up(
    data_dir: &Path,
    mut config: Config,
    topology: Topology,
    forwarded: Vec<(String, OsString)>,
) -> anyhow::Result<()> {
    let shape = Shape::of(topology)?;
    let recorded = Ports::read(data_dir).ok();
    let mut ports = up::choose_ports(data_dir)?;
    ports.mode = Mode::Processes;
    release_holds(data_dir)?;
    let nats = LocalNats::start(
        data_dir,
        shape.nats_nodes,
        &ports,
        recorded.as_ref(),
        &config,
    )
    .await?;
    let postgres = up::start_postgres(data_dir, ports.postgres).await?;
    up::configure(&mut config, &nats.url(), &postgres.url(), data_dir)?;
    config.nats_creds = nats.operator_creds();
    config.nats_replicas = nats.replicas();
    tracing::info!(config = %config, "configuration");
    let specs = plan::role_specs(
        data_dir,
        &config,
        shape,
        recorded.as_ref(),
        &forwarded,
        &nats,
    )?;
    ports.nats = nats.port();
    ports.nats_nodes = nats.members(data_dir);
    ports.nats_creds_dir = nats.creds_dir();
    ports.postgres_server = Some(postgres_member(&postgres, data_dir));
    for spec in &specs {
        let members = match spec.role {
            Role::Gateway => &mut ports.gateways,
            Role::Consumers => &mut ports.consumers,
            Role::Push => &mut ports.push,
        };
        members.push(plan::role_member(spec));
    }
    let mut running = Running::new(Registry::new(data_dir, ports)?, data_dir);
    for node in nats.into_processes() {
        running.servers.add(&running.registry, data_dir, node);
    }
    running
        .servers
        .add(&running.registry, data_dir, Process::Postgres(postgres));
    let outcome = start_and_serve(&config, shape, specs, &mut running, data_dir).await;
    running.shutdown().await;
    outcome
}

/// Prepares the system, starts the roles, and serves until a termination signal.
async fn start_and_serve(
    config: &Config,
    shape: Shape,
    specs: Vec<RoleSpec>,
    running: &mut Running,
    data_dir: &Path,
) -> anyhow::Result<()> {
    roles::prepare(config).await?;
    running.start_roles(specs).await?;
    print_welcome(config, shape, &running.registry.snapshot(), data_dir)?;
    roles::termination_signal().await;
    println!(
        "\nshutting down: the gateways drain their requests, then the consumers and push \
         workers settle their batches, then the servers stop"
    );
    Ok(())
}

/// Holds are for one run (a drill that died half-way may have left one): start without.
fn release_holds(data_dir: &Path) -> anyhow::Result<()> {
    let holds = data_dir.join("hold");
    if holds.exists() {
        std::fs::remove_dir_all(&holds).with_context(|| format!("removing {}", holds.display()))?;
    }
    Ok(())
}

fn postgres_member(postgres: &Postgres, data_dir: &Path) -> Member {
    Member {
        name: "postgres".to_owned(),
        listen: ([127, 0, 0, 1], postgres.port()).into(),
        url: postgres.url(),
        pid: postgres.pid(),
        restarts: 0,
        log: data_dir.join("postgres").join("postgres.log"),
        data_dir: Some(postgres.data_dir().to_path_buf()),
        cluster_listen: None,
        monitor_listen: None,
    }
}

/// The supervised members, in the groups they are stopped in.
struct Running {
    registry: Registry,
    data_dir: PathBuf,
    gateways: Group,
    workers: Group,
    servers: Group,
}

impl Running {
    fn new(registry: Registry, data_dir: &Path) -> Running {
        Running {
            registry,
            data_dir: data_dir.to_path_buf(),
            gateways: Group::default(),
            workers: Group::default(),
            servers: Group::default(),
        }
    }

    /// Spawns every role at once (they start in parallel), waits until each is healthy, and
    /// only then hands them to their supervisors: a role that cannot start is a
    /// configuration problem to report, not something to restart forever.
    async fn start_roles(&mut self, specs: Vec<RoleSpec>) -> anyhow::Result<()> {
        let mut started: Vec<(RoleSpec, OwnedChild)> = Vec::new();
        for spec in specs {
            let child = spec.spawn().await?;
            println!(
                "started {} (pid {}, log {})",
                spec.name,
                child.pid(),
                spec.log.display()
            );
            self.registry.set_pid(&spec.name, Some(child.pid()));
            started.push((spec, child));
        }
        for (spec, child) in &mut started {
            spec.wait_healthy(child, START_LIMIT).await?;
        }
        for (spec, child) in started {
            let group = match spec.role {
                Role::Gateway => &mut self.gateways,
                Role::Consumers | Role::Push => &mut self.workers,
            };
            group.add(
                &self.registry,
                &self.data_dir,
                Process::Role { spec, child },
            );
        }
        Ok(())
    }

    /// Stops the gateways, then the consumers and push workers, then the servers.
    async fn shutdown(&mut self) {
        self.gateways.stop().await;
        self.workers.stop().await;
        println!("stopping nats-server and Postgres");
        self.servers.stop().await;
    }
}

/// Members stopped together.
#[derive(Default)]
struct Group {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Group {
    fn add(&mut self, registry: &Registry, data_dir: &Path, process: Process) {
        let task = supervise(
            process,
            registry.clone(),
            data_dir.to_path_buf(),
            self.stop.clone(),
        );
        self.tasks.push(task);
    }

    async fn stop(&mut self) {
        self.stop.cancel();
        for task in self.tasks.drain(..) {
            if let Err(error) = task.await {
                tracing::warn!(%error, "a supervisor task died");
            }
        }
    }
}

fn print_welcome(
    config: &Config,
    shape: Shape,
    ports: &Ports,
    data_dir: &Path,
) -> anyhow::Result<()> {
    let gateways = ports.gateway_urls();
    let first = gateways.first().context("no gateway")?;
    let second = gateways.get(1).unwrap_or(first);
    let list = |members: &[Member], path: &str| {
        members
            .iter()
            .map(|m| format!("{}{path}", m.url))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!(
        r#"
Hotpath is up: {n} NATS node(s), {g} gateway(s), {c} consumer replica(s) and the push workers, each
its own process, restarted when it dies (pids, addresses and logs in {dir}/ports.json).
  API          {api}   (POST)
  health       {health}
  web client   {first}/             (open in a browser, sign in with a token from `hotpath token <user>`)
  live view    {first}/live         (open in a browser: watch messages arrive over the WebSocket)
  metrics      {metrics}
  consumers    {consumers}   (/readyz: which partitions each holds)
  push         {push_metrics}   ({push})
  NATS         {nats}{creds}
  Postgres     {pg}
  logs         {dir}/logs
  data dir     {dir}
{try_it}"#,
        n = shape.nats_nodes,
        g = shape.gateways,
        c = shape.consumer_replicas,
        api = list(&ports.gateways, "/v1/messages"),
        health = list(&ports.gateways, "/readyz"),
        metrics = list(&ports.gateways, "/metrics"),
        consumers = list(&ports.consumers, "/metrics"),
        push_metrics = list(&ports.push, "/metrics"),
        push = up::push_line(config),
        nats = redact_nats_url(&config.nats_url),
        creds = ports
            .nats_creds_dir
            .as_ref()
            .map_or_else(String::new, |dir| format!(
                "\n               (accounts: each role its own nkey user; the operator tools take \
             HOTPATH_NATS_CREDS={}/operator.nk)",
                dir.display()
            )),
        pg = redact_url_password(&config.database_url),
        dir = data_dir.display(),
        try_it = up::try_it(config, first, second, data_dir)?,
    );
    Ok(())
}
