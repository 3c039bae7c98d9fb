//! The delivery consumers: the cold path that turns the `MESSAGES` stream into rows in
//! Postgres, in order and exactly once, and then tells connected users.
//!
//! [`run`] contends for the partitions this replica is configured for (all of them by default;
//! replica k of n owns p where p mod n == k): for each it holds a [`lease`], it runs one
//! [`partition::PartitionWorker`]; for each another process holds, it stands by
//! ([`holdings`] says which is which, for readiness). It also reports consumer lag.
//! [`persist`] holds the single-statement batch insert that makes replays harmless;
//! [`replay_window`] copies what was persisted into `REPLAY` before it leaves the backlog;
//! [`fanout`] publishes what was persisted to the recipients' socket nodes. Beside them runs
//! one [`receipts::ReceiptsWorker`] on the shared `receipts` consumer, recording delivered/read
//! receipts and telling senders.

mod dlq;
pub mod fanout;
mod fetch;
pub mod holdings;
pub mod lease;
mod metrics;
pub mod partition;
pub mod persist;
pub mod push;
pub mod receipts;
pub mod replay_window;

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use hotpath_core::config::Config;
use hotpath_core::names::{self, MESSAGES_STREAM};
use hotpath_core::streams::{ensure_delivery_consumer, ensure_receipts_consumer};
use opentelemetry::KeyValue;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use holdings::Holdings;
use lease::{Fence, Holder, Leases};
pub use metrics::DeliveryMetrics;
use partition::PartitionWorker;

/// Runs the delivery workers and the receipts worker until `shutdown` is cancelled and every worker has settled or
/// handed back its batch (and released its partition's lease). `holdings` (made with
/// [`Holdings::for_config`] from the same `config`) is kept up to date with what this process
/// holds.
pub async fn run(
    config: &Config,
    nats: async_nats::Client,
    pool: PgPool,
    holdings: Holdings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let js = jetstream::new(nats.clone());
    let metrics = DeliveryMetrics::new();
    let presence = fanout::PresenceLookup::new(js.clone(), config.presence_ttl());
    let push = push::schedule::PushScheduler::new(
        pool.clone(),
        js.clone(),
        presence.clone(),
        metrics.clone(),
    );
    {
        let (push, shutdown) = (push.clone(), shutdown.clone());
        tokio::spawn(async move { push.listen_for_device_changes(shutdown).await });
    }
    let replay = replay_window::ReplayWindow::new(js.clone(), metrics.clone());
    let partitions = config.owned_partitions();
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
    let shared_config = std::sync::Arc::new(config.clone());
    let mut workers = JoinSet::new();
    {
        let (js, nats, pool, config, metrics, shutdown) = (
            js.clone(),
            nats.clone(),
            pool.clone(),
            shared_config.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        workers.spawn(async move {
            let setup = || ensure_receipts_consumer(&js, &config);
            let Some(consumer) = retry("the receipts consumer", &shutdown, setup).await else {
                return;
            };
            let worker = receipts::ReceiptsWorker {
                consumer,
                pool,
                js,
                nats,
                metrics,
                max_deliver: config.poison_max_deliver.max(1),
                max_retry_delay: (config.ack_wait() / 3)
                    .clamp(Duration::from_millis(100), Duration::from_secs(5)),
            };
            worker.run(shutdown).await;
        });
    }
    if !partitions.is_empty() {
        let Some(leases) = leases_with_retry(&js, config, &shutdown).await else {
            return drain(workers).await;
        };
        for &partition in &partitions {
            let worker = PartitionWork {
                partition,
                js: js.clone(),
                pool: pool.clone(),
                config: shared_config.clone(),
                metrics: metrics.clone(),
                fanout: fanout::spawn(partition, nats.clone(), presence.clone(), metrics.clone()),
                push: push.clone(),
                replay: replay.clone(),
            };
            workers.spawn(lease::keep(
                partition,
                leases.clone(),
                holdings.clone(),
                shutdown.clone(),
                move |fence| worker.clone().run(fence),
            ));
        }
    }
    tracing::info!(partitions = ?partitions, "delivery and receipts consumers running");

    let lag = tokio::spawn(report_lag(js, partitions, metrics, shutdown.clone()));
    let drained = drain(workers).await;
    lag.abort();
    drained
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
    shutdown: &CancellationToken,
) -> Option<Leases> {
    let holder = Holder::of_this_process();
    tracing::info!(
        host = holder.host.as_str(),
        pid = holder.pid,
        id = holder.id.as_str(),
        "partition lease holder identity"
    );
    let open = || Leases::open(js, config.lease_ttl(), holder.clone());
    retry("the partition leases bucket", shutdown, open).await
}

/// Runs `attempt` until it succeeds (NATS may be restarting: keep trying), pausing 100 ms
/// doubling to 5 s between failures; `None` once `shutdown` is cancelled.
async fn retry<T, Attempt, Attempting>(
    what: &str,
    shutdown: &CancellationToken,
    mut attempt: Attempt,
) -> Option<T>
where
    Attempt: FnMut() -> Attempting,
    Attempting: Future<Output = anyhow::Result<T>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(done) => return Some(done),
            Err(error) => tracing::warn!(
                what,
                error = format!("{error:#}"),
                "cannot set up; retrying"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// What a partition worker is made of, kept to build a fresh worker each time this process
/// takes the partition's lease.
#[derive(Clone)]
struct PartitionWork {
    partition: u32,
    js: jetstream::Context,
    pool: PgPool,
    config: std::sync::Arc<Config>,
    metrics: DeliveryMetrics,
    fanout: fanout::FanoutQueue,
    push: push::schedule::PushScheduler,
    replay: replay_window::ReplayWindow,
}

impl PartitionWork {
    /// Sets up the durable consumer and processes the partition until the lease is gone.
    async fn run(self, fence: Fence) {
        let Some(consumer) =
            consumer_with_retry(&self.js, self.partition, &self.config, &fence).await
        else {
            return;
        };
        let config = self.config;
        let worker = PartitionWorker {
            partition: self.partition,
            consumer,
            pool: self.pool,
            js: self.js,
            batch_size: config.batch_size.max(1),
            poison_max_deliver: config.poison_max_deliver.max(1),
            max_retry_delay: (config.ack_wait() / 3)
                .clamp(Duration::from_millis(100), Duration::from_secs(5)),
            config,
            metrics: self.metrics,
            fanout: self.fanout,
            push: self.push,
            replay: self.replay,
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

/// Publishes each owned consumer's pending and ack-pending counts every few seconds.
async fn report_lag(
    js: jetstream::Context,
    partitions: Vec<u32>,
    metrics: DeliveryMetrics,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Ok(stream) = js.get_stream(MESSAGES_STREAM).await else {
            continue;
        };
        for &partition in &partitions {
            let Ok(info) = stream
                .consumer_info(names::delivery_consumer(partition))
                .await
            else {
                continue;
            };
            let label = [KeyValue::new("partition", partition.to_string())];
            metrics.consumer_pending.record(info.num_pending, &label);
            metrics
                .consumer_ack_pending
                .record(info.num_ack_pending as u64, &label);
        }
    }
}
