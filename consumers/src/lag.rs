//! How far behind the partition consumers are, for dashboards and alerts: every few seconds,
//! each owned partition's `delivery_consumer_pending` (in the stream, not yet delivered to its
//! consumer) and `delivery_consumer_ack_pending` (delivered, not yet acknowledged).
//!
//! Read from the consumers' info at the server, so the numbers are JetStream's own and stay
//! right whatever the workers are doing; a partition whose consumer cannot be read (NATS
//! away, the consumer being recreated by a rewind) keeps its last values until the next tick.

use std::time::Duration;

use async_nats::jetstream;
use hotpath_core::names::{self, MESSAGES_STREAM};
use hotpath_core::telemetry::meter;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Gauge;
use tokio_util::sync::CancellationToken;

/// How often the lag is read.
const EVERY: Duration = Duration::from_secs(5);

struct LagMetrics {
    pending: Gauge<u64>,
    ack_pending: Gauge<u64>,
}

impl LagMetrics {
    fn new() -> LagMetrics {
        let meter = meter();
        LagMetrics {
            pending: meter
                .u64_gauge("delivery_consumer_pending")
                .with_description(
                    "Messages in the stream not yet delivered to the partition's consumer (lag)",
                )
                .build(),
            ack_pending: meter
                .u64_gauge("delivery_consumer_ack_pending")
                .with_description(
                    "Messages delivered to the partition's consumer and not yet acknowledged",
                )
                .build(),
        }
    }
}

/// Publishes each of `partitions`' pending and ack-pending counts until `shutdown`.
pub async fn report(js: jetstream::Context, partitions: Vec<u32>, shutdown: CancellationToken) {
    let metrics = LagMetrics::new();
    let mut tick = tokio::time::interval(EVERY);
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
            metrics.pending.record(info.num_pending, &label);
            metrics
                .ack_pending
                .record(info.num_ack_pending as u64, &label);
        }
    }
}
