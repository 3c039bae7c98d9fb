//! The delivery consumers: the cold path that turns the `MESSAGES` stream into rows in
//! Postgres, in order and exactly once, and then tells connected users.
//!
//! [`run`] starts one [`partition::PartitionWorker`] per partition this replica owns (all of
//! them by default; replica k of n owns p where p mod n == k) and reports consumer lag.
//! [`persist`] holds the single-statement batch insert that makes replays harmless;
//! [`fanout`] publishes what was persisted to the recipients' socket nodes. Beside them runs
//! one [`receipts::ReceiptsWorker`] on the shared `receipts` consumer, recording delivered/read
//! receipts and telling senders.

mod dlq;
pub mod fanout;
mod fetch;
mod metrics;
pub mod partition;
pub mod persist;
pub mod push;
pub mod receipts;

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

pub use metrics::DeliveryMetrics;
use partition::PartitionWorker;

/// Runs the delivery workers and the receipts worker until `shutdown` is cancelled and every worker has settled or
/// handed back its batch.
pub async fn run(
    config: &Config,
    nats: async_nats::Client,
    pool: PgPool,
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
    let partitions = config.owned_partitions();
    let shared_config = std::sync::Arc::new(config.clone());
    let mut workers = JoinSet::new();
    for &partition in &partitions {
        let (js, pool, config, metrics, shutdown) = (
            js.clone(),
            pool.clone(),
            shared_config.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        let fanout = fanout::spawn(partition, nats.clone(), presence.clone(), metrics.clone());
        let push = push.clone();
        workers.spawn(async move {
            // Creating the consumer needs NATS: keep trying (NATS may be restarting) rather
            // than leave this partition without a worker.
            let Some(consumer) = consumer_with_retry(&js, partition, &config, &shutdown).await
            else {
                return;
            };
            let worker = PartitionWorker {
                partition,
                consumer,
                pool,
                js,
                batch_size: config.batch_size.max(1),
                poison_max_deliver: config.poison_max_deliver.max(1),
                max_retry_delay: (config.ack_wait() / 3)
                    .clamp(Duration::from_millis(100), Duration::from_secs(5)),
                config,
                metrics,
                fanout,
                push,
            };
            worker.run(shutdown).await;
        });
    }
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
            let mut delay = Duration::from_millis(100);
            let consumer = loop {
                match ensure_receipts_consumer(&js, &config).await {
                    Ok(consumer) => break consumer,
                    Err(error) => tracing::warn!(
                        error = format!("{error:#}"),
                        "cannot set up the receipts consumer; retrying"
                    ),
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(5));
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
    tracing::info!(partitions = ?partitions, "delivery and receipts consumers running");

    let lag = tokio::spawn(report_lag(js, partitions, metrics, shutdown.clone()));
    while let Some(joined) = workers.join_next().await {
        joined.context("a partition worker panicked")?;
    }
    lag.abort();
    Ok(())
}

/// The partition's durable consumer, created or updated; `None` only on shutdown.
async fn consumer_with_retry(
    js: &jetstream::Context,
    partition: u32,
    config: &Config,
    shutdown: &CancellationToken,
) -> Option<async_nats::jetstream::consumer::PullConsumer> {
    let mut delay = Duration::from_millis(100);
    loop {
        match ensure_delivery_consumer(js, partition, config).await {
            Ok(consumer) => return Some(consumer),
            Err(error) => tracing::warn!(
                partition,
                error = format!("{error:#}"),
                "cannot set up the consumer; retrying"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
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
