//! Where the system under test is, and the connections to it.
//!
//! Flags and environment come first; what they leave out is read from the data directory of
//! `hotpath up` (its recorded ports and its development JWT secret), so a bench against the
//! local stack needs no flags at all. Every connection is made, and the gateway asked whether
//! it is ready, before the first message is sent: a bench aimed at nothing fails in a second
//! and says why, instead of reporting a run of connection errors as the gateway's figures.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use hotpath_core::names::MESSAGES_STREAM;
use hotpath_core::nats_auth::NatsUser;
use hotpath_core::streams::recorded_partitions;
use hotpath_core::{auth, db, streams};
use hotpath_localstack::Ports;
use sqlx::PgPool;

use super::BenchArgs;
use super::load::REQUEST_TIMEOUT;

/// Partitions assumed when the stream does not record them: the configuration's default.
const DEFAULT_PARTITIONS: u32 = 16;

/// Where the system under test is, and the key to its front door.
pub struct Targets {
    pub gateway: String,
    pub nats_url: String,
    pub nats_creds: Option<PathBuf>,
    pub database_url: String,
    pub secret: Vec<u8>,
}

impl Targets {
    /// Flags and environment first, then the data directory.
    pub fn resolve(args: &BenchArgs) -> anyhow::Result<Targets> {
        let ports = || Ports::read(&args.data_dir).context("or pass --nats-url and --database-url");
        let nats_url = match &args.nats_url {
            Some(url) => url.clone(),
            None => format!("nats://127.0.0.1:{}", ports()?.nats),
        };
        let database_url = match &args.database_url {
            Some(url) => url.clone(),
            None => format!(
                "postgres://postgres@127.0.0.1:{}/hotpath",
                ports()?.postgres
            ),
        };
        let secret = match &args.jwt_secret {
            Some(secret) => secret.as_bytes().to_vec(),
            None => auth::read_secret_file(&args.data_dir.join("jwt-secret"))
                .context("no --jwt-secret given and none in the data directory")?,
        };
        Ok(Targets {
            gateway: args.gateway.trim_end_matches('/').to_string(),
            nats_url,
            nats_creds: args.nats_creds.clone(),
            database_url,
            secret,
        })
    }
}

/// Connections to the system under test, checked before anything is sent.
pub struct System {
    pub http: reqwest::Client,
    pub nats: async_nats::Client,
    pub pool: PgPool,
    /// The partition count the running system was set up with.
    pub partitions: u32,
}

impl System {
    pub async fn connect(targets: &Targets) -> anyhow::Result<System> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        check_ready(&http, &targets.gateway).await?;
        let nats = streams::connect(
            &targets.nats_url,
            "hotpath-bench",
            NatsUser::Operator,
            targets.nats_creds.as_deref(),
        )
        .await?;
        let partitions = system_partitions(&nats).await?;
        let pool = db::connect(&targets.database_url, 4).await?;
        Ok(System {
            http,
            nats,
            pool,
            partitions,
        })
    }
}

/// Fails early and clearly when nothing answers at `--gateway`.
async fn check_ready(http: &reqwest::Client, gateway: &str) -> anyhow::Result<()> {
    let url = format!("{gateway}/readyz");
    let response = http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("no gateway at {gateway} (is `hotpath up` running?)"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "{url} answered {}: the system is not ready",
        response.status()
    );
    Ok(())
}

/// The partition count the running system was set up with, as recorded on its stream.
async fn system_partitions(nats: &async_nats::Client) -> anyhow::Result<u32> {
    let stream = jetstream::new(nats.clone())
        .get_stream(MESSAGES_STREAM)
        .await
        .context("reading the MESSAGES stream (has the system been started?)")?;
    Ok(recorded_partitions(&stream.cached_info().config).unwrap_or(DEFAULT_PARTITIONS))
}
