//! `hotpath`: one binary, one subcommand per role.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use hotpath::{bench, dlq, policy, replay, roles, up};
use hotpath_core::auth;
use hotpath_core::config::Config;
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
    /// workers.
    Up {
        /// Where the local servers keep their data, ports and the development JWT secret.
        #[arg(long, default_value = ".hotpath")]
        data_dir: PathBuf,
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
        /// NATS URL (default: from `hotpath up`'s data directory, else nats://127.0.0.1:4222).
        #[arg(long, env = "HOTPATH_NATS_URL", global = true)]
        nats_url: Option<String>,
        #[arg(long, default_value = ".hotpath", global = true)]
        data_dir: PathBuf,
    },
    /// Send persisted messages from the replay window (`REPLAY`) through the pipeline again
    /// (into `MESSAGES`); what is already in Postgres is only acknowledged.
    Replay {
        #[command(flatten)]
        args: replay::ReplayArgs,
        /// NATS URL (default: from `hotpath up`'s data directory, else nats://127.0.0.1:4222).
        #[arg(long, env = "HOTPATH_NATS_URL")]
        nats_url: Option<String>,
        #[arg(long, default_value = ".hotpath")]
        data_dir: PathBuf,
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
    /// Measure a running system: open-loop latency at a fixed rate, the most the gateway
    /// accepts, how fast it all reaches Postgres, and raw JetStream and Postgres baselines.
    Bench(bench::BenchArgs),
    /// Policies: test, push, list, rollback, bench.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
        /// NATS URL (default: from `hotpath up`'s data directory, else nats://127.0.0.1:4222).
        #[arg(long, env = "HOTPATH_NATS_URL", global = true)]
        nats_url: Option<String>,
        #[arg(long, default_value = ".hotpath", global = true)]
        data_dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    hotpath_core::telemetry::init_tracing();
    hotpath_core::tls::install_crypto_provider();
    match Cli::parse().command {
        Command::Up { data_dir, config } => up::up(&data_dir, config.listen, config).await,
        Command::Gateway { config } => {
            tracing::info!(config = %config, "configuration");
            roles::prepare(&config).await?;
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
                "consumers",
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
                "push workers",
                metrics_listen,
                None,
                config,
                |config, shutdown| roles::spawn_push(config, None, shutdown),
            )
            .await
        }
        Command::Dlq {
            command,
            nats_url,
            data_dir,
        } => dlq::run(command, policy::nats_url(nats_url, &data_dir)).await,
        Command::Replay {
            args,
            nats_url,
            data_dir,
        } => replay::run(args, policy::nats_url(nats_url, &data_dir)).await,
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
        Command::Bench(args) => bench::run(args).await,
        Command::Policy {
            command,
            nats_url,
            data_dir,
        } => policy::run(command, policy::nats_url(nats_url, &data_dir)).await,
    }
}

/// Runs a role that serves no HTTP of its own (`consumers`, `push`) until a signal, with
/// `/metrics` and `/healthz` on `metrics_listen` (and `/readyz` from `holdings`, if given).
async fn run_behind_metrics<Start, Started>(
    name: &str,
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
    roles::prepare(&config).await?;
    let shutdown = CancellationToken::new();
    let metrics = roles::spawn_metrics_endpoint(metrics_listen, holdings, shutdown.clone()).await?;
    let task = start(config, shutdown.clone()).await?;
    let outcome = roles::run_until_signal(name, task, shutdown.clone()).await;
    metrics.await??;
    outcome
}
