//! `hotpath`: one binary, one subcommand per role.

// Small functions read as their steps (see clippy.toml).
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use hotpath::nats_target::NatsTarget;
use hotpath::{dlq, policy, replay, roles, up};
use hotpath_core::auth;
use hotpath_core::config::Config;
use hotpath_core::nats_auth::NatsUser;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "hotpath",
    version,
    about = "Chat-message ingress and delivery on NATS JetStream and Postgres"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start everything locally: nats-server, Postgres, migrations, gateway, consumers and push
    /// workers. With --gateways, --consumer-replicas or --nats-nodes (any value), the production
    /// topology instead: each role its own supervised process.
    Up {
        /// Where the local servers keep their data, ports and the development JWT secret.
        #[arg(long, default_value = ".hotpath")]
        data_dir: PathBuf,
        /// Run this many gateway processes (on --listen's port and the next ones); selects the
        /// process topology.
        #[arg(long, env = "HOTPATH_GATEWAYS", value_parser = clap::value_parser!(u32).range(1..))]
        gateways: Option<u32>,
        /// Run this many nats-server nodes; selects the process topology.
        #[arg(long, env = "HOTPATH_NATS_NODES", value_parser = clap::value_parser!(u32).range(1..))]
        nats_nodes: Option<u32>,
        #[command(flatten)]
        config: Config,
    },
    /// Run the gateway (HTTP API) against the given NATS and Postgres.
    Gateway {
        #[command(flatten)]
        config: Config,
    },
    /// Run the delivery consumers against the given NATS and Postgres.
    Consumers {
        /// Where /metrics, /healthz and /readyz are served.
        #[arg(long, env = "HOTPATH_METRICS_LISTEN", default_value = "127.0.0.1:9091")]
        metrics_listen: SocketAddr,
        #[command(flatten)]
        config: Config,
    },
    /// Run the push workers (APNS, FCM: whichever has credentials) against the given NATS and
    /// Postgres.
    Push {
        /// Where /metrics and /healthz are served.
        #[arg(long, env = "HOTPATH_METRICS_LISTEN", default_value = "127.0.0.1:9092")]
        metrics_listen: SocketAddr,
        #[command(flatten)]
        config: Config,
    },
    /// Inspect the DLQ and replay chosen entries to where they came from.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
        #[command(flatten)]
        nats: NatsTarget,
    },
    /// Put persisted messages from the replay window (`REPLAY`) back into Postgres, each with
    /// the seq it had; what is already there is left alone. For a Postgres restored from an
    /// older backup.
    Replay {
        #[command(flatten)]
        args: replay::ReplayArgs,
        #[command(flatten)]
        nats: NatsTarget,
    },
    /// Apply the database migrations and the stream definitions (migrating streams made by an
    /// older Hotpath: stop its gateways and consumers first), then exit.
    Migrate {
        #[command(flatten)]
        config: Config,
    },
    /// Print a development bearer token for a user (HS256, signed with the configured secret
    /// or the one `hotpath up` generated in its data directory).
    Token {
        user_id: String,
        /// Data directory of `hotpath up`, whose secret is used when none is configured.
        #[arg(long, default_value = ".hotpath")]
        data_dir: PathBuf,
        /// Lifetime of the token.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
        #[command(flatten)]
        config: Config,
    },
    /// Policies: test, push (enforcing, shadow or canary), list, diff, promote, rollback, bench.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
        #[command(flatten)]
        nats: NatsTarget,
    },
}

impl Command {
    /// The role's configuration, for the commands that take one.
    fn config(&self) -> Option<&Config> {
        match self {
            Command::Up { config, .. }
            | Command::Gateway { config }
            | Command::Consumers { config, .. }
            | Command::Push { config, .. }
            | Command::Migrate { config }
            | Command::Token { config, .. } => Some(config),
            Command::Dlq { .. } | Command::Replay { .. } | Command::Policy { .. } => None,
        }
    }

    /// The name a role's spans are exported under unless `OTEL_SERVICE_NAME` says otherwise;
    /// `None` for the commands that export none.
    fn service_name(&self) -> Option<&'static str> {
        match self {
            Command::Up { .. } => Some("hotpath"),
            Command::Gateway { .. } => Some("hotpath-gateway"),
            Command::Consumers { .. } => Some("hotpath-consumers"),
            Command::Push { .. } => Some("hotpath-push"),
            _ => None,
        }
    }
}

/// mimalloc instead of glibc's allocator: a send allocates and frees many small buffers on
/// several threads at once (docs/performance.md has the before/after).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    hotpath_core::tls::install_crypto_provider();
    let matches = Cli::command().get_matches();
    let command = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli.command,
        Err(error) => error.exit(),
    };
    // Held until `main` returns: dropping it flushes the spans still queued.
    let _traces = match command.service_name() {
        Some(service) => hotpath_core::telemetry::init_logs_and_traces(service),
        None => {
            hotpath_core::telemetry::init_tracing();
            None
        }
    };
    if let Some(config) = command.config() {
        config.validate()?;
    }
    run(command, &matches).await
}

async fn run(command: Command, matches: &ArgMatches) -> anyhow::Result<()> {
    match command {
        Command::Up {
            data_dir,
            gateways,
            nats_nodes,
            config,
        } => {
            let up_matches = matches.subcommand_matches("up");
            let topology = up::Topology {
                nats_nodes,
                gateways,
                consumer_replicas: up_matches
                    .filter(|m| given(m, "consumer_replicas"))
                    .map(|_| config.consumer_replicas),
            };
            let forwarded = up_matches.map(forwarded_settings).unwrap_or_default();
            up::up(&data_dir, config, topology, forwarded).await
        }
        Command::Gateway { config } => {
            tracing::info!(config = %config, "configuration");
            roles::prepare_role(&config, NatsUser::Gateway).await?;
            let shutdown = CancellationToken::new();
            let (addr, task) = roles::spawn_gateway(config, shutdown.clone()).await?;
            tracing::info!(%addr, "gateway listening");
            roles::run_until_signal("gateway", task, shutdown).await
        }
        Command::Consumers {
            metrics_listen,
            config,
        } => {
            let holdings = hotpath_consumers::Holdings::for_config(&config);
            run_behind_metrics(
                ("consumers", NatsUser::Consumers),
                metrics_listen,
                Some(holdings.clone()),
                config,
                |config, shutdown| roles::spawn_consumers_reporting(config, holdings, shutdown),
            )
            .await
        }
        Command::Push {
            metrics_listen,
            config,
        } => {
            run_behind_metrics(
                ("push workers", NatsUser::Push),
                metrics_listen,
                None,
                config,
                |config, shutdown| roles::spawn_push(config, None, shutdown),
            )
            .await
        }
        Command::Dlq { command, nats } => dlq::run(command, &nats).await,
        Command::Replay { args, nats } => replay::run(args, &nats).await,
        Command::Migrate { config } => roles::prepare(&config).await,
        Command::Token {
            user_id,
            data_dir,
            ttl_secs,
            config,
        } => {
            // The configured secret if there is one (refused if too short, as the gateway would),
            // else the one `hotpath up` generated.
            let secret = if config.jwt_secret.is_some() || config.jwt_secret_file.is_some() {
                auth::hs256_secret(&config)?
            } else {
                auth::read_secret_file(&data_dir.join("jwt-secret"))?
            };
            println!("{}", auth::mint_hs256_token(&secret, &user_id, ttl_secs)?);
            Ok(())
        }
        Command::Policy { command, nats } => policy::run(command, &nats).await,
    }
}

/// Runs a role that serves no HTTP of its own (`consumers`, `push`: its name and NATS user)
/// until a signal, with `/metrics` and `/healthz` on `metrics_listen` (and `/readyz` from
/// `holdings`, if given).
async fn run_behind_metrics<Start, Started>(
    (name, user): (&str, NatsUser),
    metrics_listen: SocketAddr,
    holdings: Option<hotpath_consumers::Holdings>,
    config: Config,
    start: Start,
) -> anyhow::Result<()>
where
    Start: FnOnce(Config, CancellationToken) -> Started,
    Started: Future<Output = anyhow::Result<JoinHandle<anyhow::Result<()>>>>,
{
    tracing::info!(config = %config, "configuration");
    roles::prepare_role(&config, user).await?;
    let shutdown = CancellationToken::new();
    let metrics = roles::spawn_metrics_endpoint(metrics_listen, holdings, shutdown.clone()).await?;
    let task = start(config, shutdown.clone()).await?;
    let outcome = roles::run_until_signal(name, task, shutdown.clone()).await;
    metrics.await??;
    outcome
}

/// Whether the argument `id` was given, on the command line or in its environment variable.
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// The settings `hotpath up` was given as flags, as the `HOTPATH_*` variables that carry
/// them to the role processes it starts (settings from the environment reach them anyway).
fn forwarded_settings(matches: &ArgMatches) -> Vec<(String, std::ffi::OsString)> {
    let command = Cli::command();
    let Some(up) = command.find_subcommand("up") else {
        return Vec::new();
    };
    up.get_arguments()
        .filter(|arg| matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine))
        .filter_map(|arg| {
            let env = arg.get_env()?.to_string_lossy().into_owned();
            let value = matches.get_raw(arg.get_id().as_str())?.next_back()?;
            Some((env, value.to_owned()))
        })
        .collect()
}
