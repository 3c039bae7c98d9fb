//! The delivery consumers: the cold path that turns the `MESSAGES` stream into rows in
//! Postgres, in order and exactly once, and then tells connected users.
//!
//! [`run`] contends for the partitions this replica is configured for (all of them by default;
//! replica k of n owns p where p mod n == k), and covers the other replicas' shares while
//! they are gone ([`failover`], with [`liveness`] keys saying which replicas run): for each
//! partition whose [`lease`] it holds, it runs one [`partition::PartitionWorker`]; for each of
//! its own that another process holds, it stands by ([`holdings`] says which is which, for
//! readiness). It also reports consumer lag ([`lag`]).
//! [`persist`] holds the single-statement batch insert that makes replays harmless;
//! [`replay_window`] copies what was persisted into `REPLAY` before it leaves the backlog,
//! and [`restore`] puts it back into Postgres with its seq (`hotpath replay`, and the
//! [`replay_intake`] where the `nats` CLI replays to);
//! [`fanout`] publishes what was persisted to the recipients' socket nodes. Beside them runs
//! one [`receipts::ReceiptsWorker`] on the shared `receipts` consumer, recording delivered/read
//! receipts and telling senders.

// Small functions read as their steps (see clippy.toml).
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod backoff;
mod dlq;
pub mod failover;
pub mod fanout;
mod fetch;
mod frames;
pub mod holdings;
mod lag;
pub mod lease;
pub mod liveness;
mod metrics;
pub mod partition;
pub mod persist;
mod presence;
pub mod push;
pub mod receipts;
pub mod replay_intake;
pub mod replay_window;
pub mod restore;
mod store;
mod trace;

use std::sync::Arc;

use anyhow::Context as _;
use async_nats::jetstream;
use hotpath_core::config::Config;
use hotpath_core::domain::DlqSource;
use hotpath_core::streams::{ensure_delivery_consumer, ensure_receipts_consumer};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use backoff::Backoff;
use dlq::DeadLetterQueue;
use failover::Assignment;
use fanout::FanoutMetrics;
use frames::FramePublisher;
pub use holdings::Holdings;
use lease::{Fence, Holder, Leases};
use metrics::StepMetrics;
use partition::{PartitionWorker, PipelineMetrics};
use persist::PersistMetrics;
use presence::PresenceLookup;
use push::schedule::PushScheduler;
use replay_window::ReplayWindow;

/// Runs the delivery workers and the receipts worker until `shutdown` is cancelled and every
/// worker has settled or handed back its batch (and released its partition's lease).
/// `holdings` (made with [`Holdings::for_config`] from the same `config`) is kept up to date
/// with what this process holds.
pub async fn run(
    config: &Config,
    nats: async_nats::Client,
    pool: PgPool,
    holdings: Holdings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let js = jetstream::new(nats.clone());
    let config = Arc::new(config.clone());
    let fanout_metrics = FanoutMetrics::new();
    let frames = FramePublisher::new(nats.clone(), fanout_metrics.clone());
    let mut workers = JoinSet::new();
    workers.spawn(replay_intake::run(
        nats,
        pool.clone(),
        config.clone(),
        shutdown.clone(),
    ));
    workers.spawn(run_receipts(
        js.clone(),
        pool.clone(),
        config.clone(),
        frames.clone(),
        shutdown.clone(),
    ));
    let partitions = config.owned_partitions();
    warn_if_owns_nothing(&config);
    if let Some(assignment) = Assignment::of(&config) {
        let Some(leases) = leases_with_retry(&js, &config, assignment, &shutdown).await else {
            return drain(workers).await;
        };
        if assignment.has_peers() {
            workers.spawn(leases.clone().announce_liveness(shutdown.clone()));
        }
        let shared = Shared::new(js.clone(), pool, config, frames, fanout_metrics, &shutdown);
        for (partition, share) in assignment.contended() {
            let work = shared.partition(partition);
            workers.spawn(lease::keep(
                partition,
                share,
                leases.clone(),
                holdings.clone(),
                shutdown.clone(),
                move |fence| work.clone().run(fence),
            ));
        }
    }
    tracing::info!(partitions = ?partitions, "delivery and receipts consumers running");

    let lag = tokio::spawn(lag::report(js, partitions, shutdown.clone()));
    let drained = drain(workers).await;
    lag.abort();
    drained
}

/// A process that owns no partition persists nothing: say so loudly, with what to fix.
fn warn_if_owns_nothing(config: &Config) {
    if let Some(problem) = config.owns_nothing_because() {
        tracing::error!(
            replica = config.consumer_replica,
            replicas = config.consumer_replicas,
            partitions = config.partitions,
            problem = problem.as_str(),
            "this consumer process owns no partitions: it persists nothing and reports not ready \
             (only receipts are recorded); fix HOTPATH_CONSUMER_REPLICA / _REPLICAS"
        );
    }
}

/// Sets up the shared `receipts` consumer and records receipts until `shutdown`.
async fn run_receipts(
    js: jetstream::Context,
    pool: PgPool,
    config: Arc<Config>,
    frames: FramePublisher,
    shutdown: CancellationToken,
) {
    let setup = || ensure_receipts_consumer(&js, &config);
    let Some(consumer) = retry("the receipts consumer", &shutdown, setup).await else {
        return;
    };
    let worker = receipts::ReceiptsWorker {
        consumer,
        pool,
        dlq: DeadLetterQueue::new(js, DlqSource::Receipts),
        frames,
        max_deliver: config.poison_deliveries(),
        max_retry_delay: config.max_retry_delay(),
    };
    worker.run(shutdown).await;
}

/// Waits for every worker to stop.
async fn drain(mut workers: JoinSet<()>) -> anyhow::Result<()> {
    while let Some(joined) = workers.join_next().await {
        joined.context("a partition worker panicked")?;
    }
    Ok(())
}

/// The `PARTITION_LEASES` bucket, opened; `None` only on shutdown.
async fn leases_with_retry(
    js: &jetstream::Context,
    config: &Config,
    assignment: Assignment,
    shutdown: &CancellationToken,
) -> Option<Leases> {
    let holder = Holder::of_this_process();
    tracing::info!(
        host = holder.host.as_str(),
        pid = holder.pid,
        id = holder.id.as_str(),
        "partition lease holder identity"
    );
    let open = || Leases::open(js, config.lease_ttl(), holder.clone(), assignment);
    retry("the partition leases bucket", shutdown, open).await
}

/// Runs `attempt` until it succeeds, pausing 100 ms doubling to 5 s between failures; `None`
/// once `shutdown` is cancelled.
async fn retry<T, Attempting>(
    what: &str,
    shutdown: &CancellationToken,
    attempt: impl FnMut() -> Attempting,
) -> Option<T>
where
    Attempting: Future<Output = anyhow::Result<T>>,
{
    let backoff = Backoff::new(backoff::INITIAL, backoff::SETUP_MAX);
    backoff::until_set_up(what, backoff, shutdown, attempt).await
}

/// What every partition worker of this process shares, each part built once.
#[derive(Clone)]
struct Shared {
    js: jetstream::Context,
    pool: PgPool,
    config: Arc<Config>,
    metrics: PipelineMetrics,
    persist_metrics: PersistMetrics,
    dlq: DeadLetterQueue,
    frames: FramePublisher,
    fanout_metrics: FanoutMetrics,
    presence: PresenceLookup,
    push: PushScheduler,
    replay: ReplayWindow,
}

impl Shared {
    /// Also starts following device changes for push scheduling, until `shutdown`.
    fn new(
        js: jetstream::Context,
        pool: PgPool,
        config: Arc<Config>,
        frames: FramePublisher,
        fanout_metrics: FanoutMetrics,
        shutdown: &CancellationToken,
    ) -> Shared {
        let presence = PresenceLookup::new(js.clone(), config.presence_ttl());
        let push = PushScheduler::new(pool.clone(), js.clone(), presence.clone());
        {
            let (push, shutdown) = (push.clone(), shutdown.clone());
            tokio::spawn(async move { push.listen_for_device_changes(shutdown).await });
        }
        Shared {
            metrics: PipelineMetrics::new(StepMetrics::new()),
            persist_metrics: PersistMetrics::new(),
            dlq: DeadLetterQueue::new(js.clone(), DlqSource::Messages),
            replay: ReplayWindow::new(js.clone()),
            js,
            pool,
            config,
            frames,
            fanout_metrics,
            presence,
            push,
        }
    }

    /// The work of `partition`, with its own fanout task.
    fn partition(&self, partition: u32) -> PartitionWork {
        let fanout = fanout::spawn(
            partition,
            self.frames.clone(),
            self.presence.clone(),
            self.fanout_metrics.clone(),
            self.metrics.steps.clone(),
        );
        PartitionWork {
            partition,
            fanout,
            shared: self.clone(),
        }
    }
}

/// What a partition worker is made of, kept to build a fresh worker each time this process
/// takes the partition's lease.
#[derive(Clone)]
struct PartitionWork {
    partition: u32,
    fanout: fanout::FanoutQueue,
    shared: Shared,
}

impl PartitionWork {
    /// Sets up the durable consumer and processes the partition until the lease is gone.
    async fn run(self, fence: Fence) {
        let shared = self.shared;
        let Some(consumer) =
            consumer_with_retry(&shared.js, self.partition, &shared.config, &fence).await
        else {
            return;
        };
        let config = shared.config;
        let worker = PartitionWorker {
            partition: self.partition,
            consumer,
            pool: shared.pool,
            js: shared.js,
            batch_size: config.batch_limit(),
            poison_max_deliver: config.poison_deliveries(),
            max_retry_delay: config.max_retry_delay(),
            config,
            metrics: shared.metrics,
            persist_metrics: shared.persist_metrics,
            dlq: shared.dlq,
            fanout: self.fanout,
            push: shared.push,
            replay: shared.replay,
            fence: fence.clone(),
        };
        worker.run(fence.token()).await;
    }
}

/// The partition's durable consumer, created or updated; `None` once the lease is gone.
async fn consumer_with_retry(
    js: &jetstream::Context,
    partition: u32,
    config: &Config,
    fence: &Fence,
) -> Option<async_nats::jetstream::consumer::PullConsumer> {
    let what = format!("the delivery consumer of partition {partition}");
    let setup = || async {
        fence.check()?;
        ensure_delivery_consumer(js, partition, config).await
    };
    retry(&what, &fence.token(), setup).await
}
