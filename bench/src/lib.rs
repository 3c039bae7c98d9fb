//! `hotpath-bench`: measures a running Hotpath and, in the same run, what its NATS and
//! Postgres can do without it, so every figure comes with the ceiling it is compared against.
//!
//! It is a binary of its own, not a subcommand of `hotpath`: a load generator has no place in
//! the production server, which would otherwise carry its histograms, its WebSocket client and
//! its scratch-schema SQL. It finds the system the way the operator tools do (the data
//! directory of `hotpath up`, or flags) and reuses the pipeline's own code where a baseline has
//! to do exactly what the consumers do (the envelope, the partitioning, the persist statement).
//!
//! In order:
//! 1. set-up: tokens for `bench-u<i>` users and group conversations created through the API;
//! 2. latency phase ([`load::open_loop`]): a fixed arrival rate, latencies from the scheduled
//!    send time;
//! 3. capacity phase ([`load::capacity`]): back-to-back senders, the most the gateway accepts;
//! 4. after each phase, [`persisted::wait_for`] checks everything accepted reached Postgres and
//!    how fast;
//! 5. baselines ([`baseline`]): raw JetStream publishes and raw UNNEST inserts of the same
//!    messages;
//! 6. a summary on stdout and the same figures as JSON ([`report`]).
//!
//! With `--delivery`, WebSocket receivers ([`delivery`]) listen through the latency phase and
//! time every live `message.new` from the message's acceptance to its arrival.
//!
//! `--transport` ([`transport`]) says how the senders send, in every phase and in soak mode:
//! `http` (one `POST /v1/messages` per message, the default) or `ws` (one `send` frame per
//! message on a WebSocket each sending user keeps open, as chat clients do).
//!
//! With `--soak-secs`, [`soak`] replaces all of the above: capacity, then ~80% of it for a long
//! time, and checks that nothing was refused, lost or duplicated and that the replay window
//! holds the newest messages (ADR 0004).
//!
//! [`stats`] holds what the HTTP phases count and the live progress line; [`target`] finds
//! and connects to the system under test.
//!
//! `hotpath-bench chaos` ([`chaos`]) is the other kind of run: not a measurement but a
//! proof that nothing is lost while parts of a `hotpath up` topology are killed.
//!
//! The crate is a library with a thin binary, so that the tests that start a `hotpath up`
//! can run a chaos drill against it in-process.

// Small functions read as their steps (see clippy.toml).
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod baseline;
pub mod chaos;
mod delivery;
mod drain;
mod load;
mod persisted;
mod report;
mod soak;
mod stats;
mod target;
mod transport;
mod workload;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use chrono::Utc;
use clap::{Args, Parser, Subcommand};
use hotpath_core::config::{redact_nats_url, redact_url_password};
use hotpath_core::envelope::Envelope;

use delivery::{DeliveryResult, Receivers};
use load::{CapacityResult, OpenLoop, OpenLoopResult, Sender};
use report::{Baselines, Machine, PersistedReport, Report, Settings};
use target::{System, Targets};
use transport::{SenderSockets, Transport, TransportKind};
use workload::{CONTENT_CHARS, MAX_GROUP_MEMBERS, Workload};

/// Messages per second per user the default user count aims at: half the gateway's default
/// per-user limit (50/s), so the rate limiter never shapes the measurement.
const PER_USER_RATE: u32 = 25;
/// Users per capacity worker by default. The capacity phase's rate is unknown up front; with
/// 4 users per worker the per-user limit only bites above 200 msg/s per worker.
const USERS_PER_WORKER: usize = 4;
/// File descriptors kept for everything but in-flight requests (NATS, Postgres, stdio).
const FD_RESERVE: usize = 512;
/// The baselines move as many messages as the larger HTTP phase accepted, within these
/// bounds: enough for a stable rate, few enough to hold in memory (about 2.5 KB each).
const BASELINE_MESSAGES: (u64, u64) = (20_000, 100_000);

/// Measure a running system: open-loop latency at a fixed rate, the most the gateway
/// accepts, how fast it all reaches Postgres, and raw JetStream and Postgres baselines.
/// `hotpath-bench chaos`: kill parts of a running `hotpath up` topology under load and
/// prove nothing accepted is lost.
#[derive(Debug, Parser)]
#[command(
    name = "hotpath-bench",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub mode: Option<Mode>,
    #[command(flatten)]
    pub bench: BenchArgs,
}

#[derive(Debug, Subcommand)]
pub enum Mode {
    /// Drive load through every gateway of a `hotpath up` topology while killing and
    /// restarting a NATS node, a consumer replica, a gateway and Postgres; then reconcile
    /// every 202 against Postgres. Fails if anything was lost or duplicated.
    Chaos(chaos::ChaosArgs),
}

/// The measuring run's settings (`hotpath-bench` without a subcommand).
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Base URL of the gateway under test.
    #[arg(
        long,
        env = "HOTPATH_GATEWAY_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub gateway: String,
    /// Data directory of `hotpath up`: its ports.json gives the NATS and Postgres URLs and
    /// its jwt-secret signs the benchmark's tokens, unless overridden below.
    #[arg(long, default_value = ".hotpath")]
    pub data_dir: PathBuf,
    /// NATS URL (default: from the data directory).
    #[arg(long, env = "HOTPATH_NATS_URL")]
    pub nats_url: Option<String>,
    /// NATS credentials (the operator's nkey seed or `.creds` file), for a NATS with accounts.
    #[arg(long, env = "HOTPATH_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// Postgres URL (default: from the data directory).
    #[arg(long, env = "HOTPATH_DATABASE_URL")]
    pub database_url: Option<String>,
    /// HS256 secret the gateway verifies tokens with (default: the data directory's).
    #[arg(long, env = "HOTPATH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Arrival rate of the latency phase, in messages per second.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: u32,
    /// Measured length of the latency phase.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub duration_secs: u64,
    /// Unmeasured lead-in at the same rate: opens connections and fills the gateway's caches.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Sending users; raised to at least ceil(rate / 25) and, with a capacity phase, to
    /// 4 per worker, so the gateway's per-user limit (50 msg/s) is not what gets measured.
    #[arg(long)]
    pub users: Option<usize>,
    /// Group conversations to spread the messages over.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub conversations: u64,
    /// Length of the capacity phase; 0 skips it.
    #[arg(long, default_value_t = 10)]
    pub capacity_secs: u64,
    /// Messages published straight into MESSAGES as a backlog for the consumers to drain
    /// (their persisting rate without the gateway in front); 0 skips it.
    #[arg(long, default_value_t = 100_000)]
    pub drain_messages: u64,
    /// How the senders send: `http` (`POST /v1/messages`) or `ws` (`send` frames on one
    /// WebSocket per sending user, opened before the first phase).
    #[arg(long, value_enum, default_value_t = TransportKind::Http)]
    pub transport: TransportKind,
    /// Back-to-back senders in the capacity phase.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub concurrency: u64,
    /// Latency-phase sends allowed in flight; sends due beyond it are counted as dropped.
    /// Lowered to fit the open-file limit (each in-flight request holds a connection).
    #[arg(long, default_value_t = 20_000)]
    pub max_in_flight: usize,
    /// Delivery mode: WebSocket receivers listen through the latency phase, and each live
    /// `message.new` is timed from the message's acceptance to its arrival.
    #[arg(long)]
    pub delivery: bool,
    /// Receivers in delivery mode: the first N users, one socket each (users are raised to
    /// at least N).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    pub receivers: u64,
    /// Soak mode: offer `--soak-share` of the measured capacity (or `--soak-rate`) open loop for
    /// this many seconds, then verify no errors, no loss, no duplicates and the replay window
    /// (the other phases are skipped). 0: off.
    #[arg(long, default_value_t = 0)]
    pub soak_secs: u64,
    /// Soak mode: the share of the measured capacity to offer.
    #[arg(long, default_value_t = 0.8)]
    pub soak_share: f64,
    /// Soak mode: offer this rate instead of measuring capacity first.
    #[arg(long)]
    pub soak_rate: Option<u32>,
    /// Where the JSON report goes.
    #[arg(long, default_value = "bench.json")]
    pub out: PathBuf,
}

impl BenchArgs {
    /// The user count: the requested one, raised so that no user has to send faster than
    /// [`PER_USER_RATE`] in the latency phase, nor serve fewer than [`USERS_PER_WORKER`]
    /// capacity workers' worth of sends, nor fewer than the receivers in delivery mode.
    fn users(&self) -> usize {
        let for_rate = self.rate.div_ceil(PER_USER_RATE) as usize;
        let for_capacity = if self.capacity_secs > 0 {
            self.concurrency as usize * USERS_PER_WORKER
        } else {
            0
        };
        let for_delivery = if self.delivery {
            self.receivers as usize
        } else {
            0
        };
        self.users
            .unwrap_or(1)
            .max(for_rate)
            .max(for_capacity)
            .max(for_delivery)
            .max(1)
    }
}

/// Runs what the command line asks for.
pub async fn main_with(cli: Cli) -> anyhow::Result<()> {
    match cli.mode {
        Some(Mode::Chaos(args)) => chaos::main_with(args).await,
        None => run(cli.bench).await,
    }
}

/// The measuring run: the phases, the baselines, the report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let targets = Targets::resolve(&args)?;
    let users = args.users();
    let conversations = args.conversations as usize;
    anyhow::ensure!(
        users.div_ceil(conversations) <= MAX_GROUP_MEMBERS,
        "{users} users do not fit in {conversations} conversations of at most \
         {MAX_GROUP_MEMBERS} members; pass more --conversations"
    );
    let max_in_flight = in_flight_bound(args.max_in_flight);
    let started_at = Utc::now();
    let machine = Machine::detect().await;
    let system = System::connect(&targets).await?;

    tracing::info!(
        users,
        conversations,
        partitions = system.partitions,
        "setting up users and conversations"
    );
    let workload = Arc::new(
        Workload::set_up(
            &system.http,
            &targets.gateway,
            &targets.secret,
            users,
            conversations,
        )
        .await?,
    );
    if args.soak_secs > 0 {
        return run_soak(&args, &targets, &system, &workload, max_in_flight).await;
    }
    let mut phases = run_phases(&args, &targets, &system, &workload, max_in_flight).await?;
    if args.drain_messages > 0 {
        let drained = drain::backlog(
            &system.nats,
            &system.pool,
            system.partitions,
            &workload,
            args.drain_messages,
        )
        .await?;
        phases.persisted.consumer_drain = Some(drained);
    }
    let baselines = run_baselines(
        &system,
        &targets.database_url,
        &workload,
        phases.baseline_messages(),
    )
    .await;

    let mut report = Report {
        run_id: workload.run_id.clone(),
        started_at,
        machine,
        settings: settings(&args, &targets, &system, &workload, max_in_flight),
        latency_phase: phases.latency,
        capacity_phase: phases.capacity,
        sender_sockets: phases.sender_sockets,
        delivery: phases.delivery,
        persisted: phases.persisted,
        baselines,
        ratios: Default::default(),
        warnings: Vec::new(),
    };
    report.complete();
    print!("{}", report.summary());
    report.write_json(&args.out)?;
    println!("report written to {}", args.out.display());
    system.pool.close().await;
    Ok(())
}

/// What the run was asked to do and what it derived from that and the system, for the report.
fn settings(
    args: &BenchArgs,
    targets: &Targets,
    system: &System,
    workload: &Workload,
    max_in_flight: usize,
) -> Settings {
    Settings {
        gateway: targets.gateway.clone(),
        transport: args.transport,
        nats_url: redact_nats_url(&targets.nats_url),
        database_url: redact_url_password(&targets.database_url),
        partitions: system.partitions,
        rate: args.rate,
        duration_secs: args.duration_secs,
        warmup_secs: args.warmup_secs,
        users: args.users(),
        conversations: args.conversations as usize,
        members_per_conversation: workload.group_sizes(),
        capacity_secs: args.capacity_secs,
        concurrency: args.concurrency as usize,
        max_in_flight,
        content_chars: CONTENT_CHARS,
        request_body_bytes: workload.message(0).request_body().len(),
        envelope_bytes: workload.envelope(0).encode().len(),
    }
}

/// Soak mode: see [`soak`]. Fails (after writing the report) when a check failed.
async fn run_soak(
    args: &BenchArgs,
    targets: &Targets,
    system: &System,
    workload: &Arc<Workload>,
    max_in_flight: usize,
) -> anyhow::Result<()> {
    let ids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let transport = connect_transport(args, targets, system, workload).await?;
    let sender = Arc::new(Sender::new(transport, workload.clone()).recording(ids.clone()));
    let soak = soak::Soak {
        sender: sender.clone(),
        ids,
        nats: &system.nats,
        pool: &system.pool,
        workload,
        partitions: system.partitions,
    };
    let report = soak
        .run(&soak::Plan {
            transport: args.transport,
            secs: args.soak_secs,
            share: args.soak_share,
            rate: args.soak_rate,
            capacity_secs: args.capacity_secs,
            concurrency: args.concurrency as usize,
            max_in_flight,
        })
        .await?;
    sender.transport().close().await;
    print!("{}", report.summary());
    let json = serde_json::to_vec_pretty(&report).context("serialising the soak report")?;
    std::fs::write(&args.out, json).with_context(|| format!("writing {}", args.out.display()))?;
    println!("report written to {}", args.out.display());
    system.pool.close().await;
    anyhow::ensure!(
        report.verdict.passed,
        "the soak found errors, loss or duplicates"
    );
    Ok(())
}

/// What the sending phases measured, persistence included.
struct Phases {
    latency: OpenLoopResult,
    capacity: Option<CapacityResult>,
    sender_sockets: Option<SenderSockets>,
    delivery: Option<DeliveryResult>,
    persisted: PersistedReport,
}

impl Phases {
    /// As many messages as the larger phase accepted, within [`BASELINE_MESSAGES`].
    fn baseline_messages(&self) -> u64 {
        let capacity = self.capacity.as_ref().map_or(0, |c| c.accepted);
        capacity
            .max(self.latency.accepted)
            .clamp(BASELINE_MESSAGES.0, BASELINE_MESSAGES.1)
    }
}

/// The latency phase, then the capacity phase if asked for, each followed by the wait for
/// its messages to reach Postgres (so the next phase starts on a drained pipeline).
async fn run_phases(
    args: &BenchArgs,
    targets: &Targets,
    system: &System,
    workload: &Arc<Workload>,
    max_in_flight: usize,
) -> anyhow::Result<Phases> {
    let receivers = if args.delivery {
        let count = args.receivers as usize;
        Some(Receivers::connect(&targets.gateway, workload, count).await?)
    } else {
        None
    };
    let transport = connect_transport(args, targets, system, workload).await?;
    let sender = Arc::new(
        Sender::new(transport, workload.clone())
            .expecting(receivers.as_ref().map(Receivers::expected)),
    );
    let conversation_ids = workload.conversation_ids();
    let persisted_after = |window| {
        persisted::wait_for(
            &system.pool,
            &conversation_ids,
            window,
            persisted::CATCH_UP_LIMIT,
        )
    };

    let plan = OpenLoop {
        rate: args.rate,
        warmup_secs: args.warmup_secs,
        duration_secs: args.duration_secs,
        max_in_flight,
    };
    if let Some(receivers) = &receivers {
        let warmup = chrono::Duration::seconds(args.warmup_secs as i64);
        receivers.measure_from(Utc::now() + warmup);
    }
    let latency = load::open_loop(&sender, &plan).await?;
    let delivery = match receivers {
        Some(receivers) => Some(receivers.finish(args.duration_secs).await?),
        None => None,
    };
    let latency_persisted = persisted_after(&latency.window).await?;
    let (capacity, capacity_persisted) = if args.capacity_secs > 0 {
        let concurrency = args.concurrency as usize;
        let capacity = load::capacity(&sender, args.capacity_secs, concurrency).await?;
        let persisted = persisted_after(&capacity.window).await?;
        (Some(capacity), Some(persisted))
    } else {
        (None, None)
    };
    let sender_sockets = sender.transport().sockets();
    sender.transport().close().await;
    let persisted = PersistedReport {
        msgs_per_sec: capacity_persisted
            .as_ref()
            .unwrap_or(&latency_persisted)
            .msgs_per_sec,
        latency_phase: latency_persisted,
        capacity_phase: capacity_persisted,
        consumer_drain: None,
    };
    Ok(Phases {
        latency,
        capacity,
        sender_sockets,
        delivery,
        persisted,
    })
}

/// The senders' transport, connected (over WebSocket: every user's socket open) before the
/// first send.
async fn connect_transport(
    args: &BenchArgs,
    targets: &Targets,
    system: &System,
    workload: &Workload,
) -> anyhow::Result<Transport> {
    Transport::connect(args.transport, &system.http, &targets.gateway, workload).await
}

/// `--max-in-flight`, lowered to what the open-file limit allows. Each in-flight HTTP/1.1
/// request holds a socket of its own, and running out of descriptors would show up as
/// connect errors the gateway never caused.
fn in_flight_bound(requested: usize) -> usize {
    let Some(limit) = open_files_limit() else {
        return requested;
    };
    let allowed = limit.saturating_sub(FD_RESERVE).max(1);
    if allowed < requested {
        tracing::warn!(
            requested,
            allowed,
            open_files_limit = limit,
            "lowering --max-in-flight to fit the open-file limit (raise it with ulimit -n)"
        );
    }
    requested.min(allowed)
}

/// This process's soft limit on open files, from /proc/self/limits; None when unlimited or
/// unknown.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    // "Max open files  <soft>  <hard>  files"
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Both baselines on `messages` envelopes of the workload. A failing baseline is reported,
/// not fatal: the HTTP figures gathered so far still get written.
async fn run_baselines(
    system: &System,
    database_url: &str,
    workload: &Workload,
    messages: u64,
) -> Baselines {
    let envelopes: Arc<Vec<Envelope>> =
        Arc::new((0..messages).map(|seq| workload.envelope(seq)).collect());
    let mut errors = Vec::new();
    let raw_jetstream = baseline::raw_jetstream(&system.nats, system.partitions, &envelopes)
        .await
        .inspect_err(|error| errors.push(format!("raw JetStream: {error:#}")))
        .ok();
    let raw_unnest = baseline::raw_unnest(
        &system.pool,
        database_url,
        system.partitions,
        workload,
        envelopes.clone(),
    )
    .await
    .inspect_err(|error| errors.push(format!("raw UNNEST: {error:#}")))
    .ok();
    for error in &errors {
        tracing::error!(%error, "baseline failed");
    }
    Baselines {
        messages: envelopes.len(),
        raw_jetstream,
        raw_unnest,
        errors,
    }
}
