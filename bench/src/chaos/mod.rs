//! `hotpath-bench chaos`: a fault drill against a running `hotpath up` topology (process
//! mode: `hotpath up --gateways 2 --consumer-replicas 2 …`), which proves that a careful
//! client loses nothing while the system's parts die and come back.
//!
//! It finds everything in the data directory's `ports.json` (every gateway, every member's
//! pid), then, in order:
//! 1. sets up users and group conversations of its own through the first gateway;
//! 2. prints its fault schedule ([`faults`]): a NATS node killed (`kill -9`), a consumer
//!    replica killed, a gateway killed (the supervisor of `hotpath up` restarts each), and
//!    Postgres stopped for 20 s (held, so the supervisor waits, then released);
//! 3. drives open-loop load through all the gateways for the whole run, as careful clients
//!    ([`client`]): each message keeps its `clientMessageId` through every retry, tries the
//!    next gateway after a failure, and backs off on 503 and 429 as `Retry-After` says;
//! 4. injects the faults on schedule, each once the previous one healed, and times how long
//!    each took to heal (the member back, with a new pid, and ready);
//! 5. waits for the pipeline to catch up and reconciles every 202 against Postgres
//!    ([`reconcile`]): accepted, persisted, lost, duplicated, seq gaps, the longest time to
//!    persist, and the errors the clients saw by class during each fault ([`report`]).
//!
//! The summary goes to stdout and the same figures as JSON to `--out`. The command fails
//! when anything accepted was lost or stored twice, when a conversation's seq has a gap, or
//! when a fault did not heal.

mod client;
mod faults;
mod reconcile;
pub mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use clap::Args;
use hotpath_core::auth;
use hotpath_localstack::{Mode, Ports};

use crate::workload::Workload;
use client::{Clients, Load};
use faults::Schedule;
use report::{ChaosReport, Verdict};

/// Messages per second per user the user count aims at: half the gateway's default per-user
/// limit, as in the benchmark, so retries after a fault rarely meet the limit.
const PER_USER_RATE: u32 = 25;

/// A chaos drill's settings.
#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    /// Data directory of the `hotpath up` (in process mode) to drill.
    #[arg(long, default_value = ".hotpath")]
    pub data_dir: PathBuf,
    /// How long the load runs; the faults are spread over it.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(30..))]
    pub duration_secs: u64,
    /// Messages offered per second, over all gateways (open loop).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: u32,
    /// Group conversations to spread the messages over.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub conversations: u64,
    /// How long Postgres stays stopped.
    #[arg(long, default_value_t = 20)]
    pub postgres_down_secs: u64,
    /// How long a client keeps retrying one message before it gives up (a message given up
    /// on was never accepted, so it cannot be lost).
    #[arg(long, default_value_t = 60)]
    pub give_up_secs: u64,
    /// How long to wait, after the load, for every accepted message to reach Postgres.
    #[arg(long, default_value_t = 180)]
    pub catch_up_secs: u64,
    /// How long a fault may take to heal before the drill counts it as not healed.
    #[arg(long, default_value_t = 90)]
    pub heal_limit_secs: u64,
    /// HS256 secret the gateways verify tokens with (default: the data directory's).
    #[arg(long, env = "HOTPATH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Where the JSON report goes.
    #[arg(long, default_value = "chaos.json")]
    pub out: PathBuf,
}

/// Runs the drill, prints and writes the report, and fails if the drill found a problem.
pub async fn main_with(args: ChaosArgs) -> anyhow::Result<()> {
    let report = run(&args).await?;
    print!("{}", report.summary());
    report.write_json(&args.out)?;
    println!("report written to {}", args.out.display());
    anyhow::ensure!(
        report.verdict.passed,
        "{}",
        report.verdict.failures.join("; ")
    );
    Ok(())
}

/// Runs the drill and returns what it found.
pub async fn run(args: &ChaosArgs) -> anyhow::Result<ChaosReport> {
    let ports = Ports::read(&args.data_dir)?;
    anyhow::ensure!(
        ports.mode == Mode::Processes && !ports.gateways.is_empty(),
        "{} is not a process topology: start it with `hotpath up --gateways 2 \
         --consumer-replicas 2` (each role its own process) to drill it",
        args.data_dir.display()
    );
    let secret = match &args.jwt_secret {
        Some(secret) => secret.as_bytes().to_vec(),
        None => auth::read_secret_file(&args.data_dir.join("jwt-secret"))
            .context("no --jwt-secret given and none in the data directory")?,
    };
    let gateways = ports.gateway_urls();
    let database_url = ports.postgres_server.as_ref().map_or_else(
        || format!("postgres://postgres@127.0.0.1:{}/hotpath", ports.postgres),
        |pg| pg.url.clone(),
    );
    let schedule = Schedule::plan(args, &ports)?;
    let http = client::http()?;
    let users = (args.rate.div_ceil(PER_USER_RATE) as usize).max(2);
    let workload = Arc::new(
        Workload::set_up(
            &http,
            &gateways[0],
            &secret,
            users,
            args.conversations as usize,
        )
        .await
        .context("setting up the drill's users and conversations")?,
    );
    print!("{}", schedule.describe(args, &gateways));

    let started_at = Utc::now();
    let clients = Arc::new(Clients::new(http, gateways.clone(), workload.clone(), args));
    let load = Load::start(
        clients.clone(),
        args.rate,
        Duration::from_secs(args.duration_secs),
    );
    let faults = schedule
        .run(
            &args.data_dir,
            &database_url,
            &clients,
            args,
            load.started(),
        )
        .await;
    let sends = load.finish().await?;
    let catch_up = Duration::from_secs(args.catch_up_secs);
    let reconciled = reconcile::reconcile(&database_url, &workload, &sends, catch_up).await?;
    Ok(ChaosReport {
        run_id: workload.run_id.clone(),
        started_at,
        duration_secs: args.duration_secs,
        rate: args.rate,
        gateways,
        verdict: Verdict::of(&faults, &reconciled),
        faults,
        errors_outside_faults: clients.errors_outside_faults(),
        sends: sends.summary(),
        reconciled,
    })
}
