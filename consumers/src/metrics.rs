//! The delivery pipeline's metrics, with the seed's names and labels.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram};

use hotpath_core::telemetry::{SLOW_MS_BUCKETS, meter};

#[derive(Clone)]
pub struct DeliveryMetrics {
    pub persist_total: Counter<u64>,
    pub persist_duration_ms: Histogram<f64>,
    pub pipeline_processed_total: Counter<u64>,
    pub pipeline_duration_ms: Histogram<f64>,
    pub pipeline_step_duration_ms: Histogram<f64>,
    pub accept_to_persist_ms: Histogram<f64>,
    pub dlq_total: Counter<u64>,
    pub cache_invalidated_total: Counter<u64>,
    pub consumer_pending: Gauge<u64>,
    pub consumer_ack_pending: Gauge<u64>,
    pub fanout_attempted_total: Counter<u64>,
    pub fanout_delivered_total: Counter<u64>,
    pub fanout_failed_total: Counter<u64>,
    pub push_enqueued_total: Counter<u64>,
    pub push_sent_total: Counter<u64>,
    pub push_failed_total: Counter<u64>,
    pub push_breaker_open: Gauge<u64>,
    pub replay_copy_failed_total: Counter<u64>,
}

impl DeliveryMetrics {
    pub fn new() -> DeliveryMetrics {
        let meter = meter();
        let histogram = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_description(description)
                .with_boundaries(SLOW_MS_BUCKETS.to_vec())
                .build()
        };
        DeliveryMetrics {
            persist_total: meter
                .u64_counter("delivery_persist_total")
                .with_description("Messages written (or found already written) by status")
                .build(),
            persist_duration_ms: histogram(
                "delivery_persist_duration_ms",
                "One batch's Postgres transaction",
            ),
            pipeline_processed_total: meter
                .u64_counter("delivery_pipeline_processed_total")
                .with_description(
                    "Messages settled by the delivery pipeline, by partition and status",
                )
                .build(),
            pipeline_duration_ms: histogram(
                "delivery_pipeline_duration_ms",
                "From fetching a batch to acknowledging it",
            ),
            pipeline_step_duration_ms: histogram(
                "delivery_pipeline_step_duration_ms",
                "Each step of a batch",
            ),
            accept_to_persist_ms: histogram(
                "delivery_accept_to_persist_ms",
                "From the gateway's 202 to the message being in Postgres",
            ),
            cache_invalidated_total: meter
                .u64_counter("delivery_cache_invalidated_total")
                .with_description("Cache invalidations announced to the gateways, by cache type")
                .build(),
            dlq_total: meter
                .u64_counter("delivery_dlq_total")
                .with_description("Messages moved to the DLQ stream, by reason")
                .build(),
            consumer_pending: meter
                .u64_gauge("delivery_consumer_pending")
                .with_description(
                    "Messages in the stream not yet delivered to the partition's consumer (lag)",
                )
                .build(),
            consumer_ack_pending: meter
                .u64_gauge("delivery_consumer_ack_pending")
                .with_description(
                    "Messages delivered to the partition's consumer and not yet acknowledged",
                )
                .build(),
            fanout_attempted_total: meter
                .u64_counter("delivery_fanout_attempted_total")
                .with_description("Recipients a persisted message was fanned out to, by presence")
                .build(),
            fanout_delivered_total: meter
                .u64_counter("delivery_fanout_delivered_total")
                .with_description(
                    "Online recipients a message was published to, by their open socket count",
                )
                .build(),
            fanout_failed_total: meter
                .u64_counter("delivery_fanout_failed_total")
                .with_description("Fanout steps that failed, by reason")
                .build(),
            push_enqueued_total: meter
                .u64_counter("delivery_push_enqueued_total")
                .with_description("Push tasks scheduled for offline recipients, by reason")
                .build(),
            push_sent_total: meter
                .u64_counter("delivery_push_sent_total")
                .with_description("Pushes the provider accepted, by platform")
                .build(),
            push_failed_total: meter
                .u64_counter("delivery_push_failed_total")
                .with_description(
                    "Pushes that failed, by reason (invalid_token, unavailable, auth, rejected, \
                     dead_lettered, enqueue_failed, …); alert on auth",
                )
                .build(),
            push_breaker_open: meter
                .u64_gauge("delivery_push_breaker_open")
                .with_description("1 while a platform's circuit breaker holds its pushes back")
                .build(),
            replay_copy_failed_total: meter
                .u64_counter("delivery_replay_copy_failed_total")
                .with_description(
                    "Persisted messages not copied into the replay window, by reason \
                     (rejected, timeout); the messages themselves are safe in Postgres",
                )
                .build(),
        }
    }

    /// `recipient_status`: `online` or `offline`, as presence said.
    pub fn fanout_attempted(&self, recipient_status: &'static str) {
        self.fanout_attempted_total
            .add(1, &[KeyValue::new("recipient_status", recipient_status)]);
    }

    /// `socket_count`: 1 to 9, then `10+` (bounded label values).
    pub fn fanout_delivered(&self, sockets: u32) {
        let socket_count = if sockets >= 10 {
            "10+".to_string()
        } else {
            sockets.to_string()
        };
        self.fanout_delivered_total
            .add(1, &[KeyValue::new("socket_count", socket_count)]);
    }

    pub fn fanout_failed(&self, reason: &'static str, count: u64) {
        if count > 0 {
            self.fanout_failed_total
                .add(count, &[KeyValue::new("reason", reason)]);
        }
    }

    pub fn push_enqueued(&self, reason: &'static str) {
        self.push_enqueued_total
            .add(1, &[KeyValue::new("reason", reason)]);
    }

    pub fn push_sent(&self, platform: &'static str) {
        self.push_sent_total
            .add(1, &[KeyValue::new("platform", platform)]);
    }

    pub fn push_failed(&self, reason: &'static str, count: u64) {
        if count > 0 {
            self.push_failed_total
                .add(count, &[KeyValue::new("reason", reason)]);
        }
    }

    pub fn replay_copy_failed(&self, reason: &'static str, count: u64) {
        if count > 0 {
            self.replay_copy_failed_total
                .add(count, &[KeyValue::new("reason", reason)]);
        }
    }

    pub fn step(&self, step: &'static str, millis: f64) {
        self.pipeline_step_duration_ms
            .record(millis, &[KeyValue::new("step", step)]);
    }

    pub fn processed(&self, partition: u32, status: &'static str, count: u64) {
        if count > 0 {
            self.pipeline_processed_total.add(
                count,
                &[
                    KeyValue::new("partition", partition.to_string()),
                    KeyValue::new("status", status),
                ],
            );
        }
    }
}

impl Default for DeliveryMetrics {
    fn default() -> Self {
        DeliveryMetrics::new()
    }
}
