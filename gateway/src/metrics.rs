//! The producer's metrics, with the seed's names and labels.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

use hotpath_core::rejection::Rejection;
use hotpath_core::telemetry::{FAST_MS_BUCKETS, meter};

#[derive(Clone)]
pub struct ProducerMetrics {
    enqueued: Counter<u64>,
    rejected: Counter<u64>,
    duration_ms: Histogram<f64>,
}

impl ProducerMetrics {
    pub fn new() -> ProducerMetrics {
        let meter = meter();
        ProducerMetrics {
            enqueued: meter
                .u64_counter("producer_enqueued_total")
                .with_description("Messages accepted onto the stream")
                .build(),
            rejected: meter
                .u64_counter("producer_reject_total")
                .with_description("Send requests turned down, by reason and status")
                .build(),
            duration_ms: meter
                .f64_histogram("producer_enqueue_duration_ms")
                .with_description("Time from request to answer on the send path")
                .with_boundaries(FAST_MS_BUCKETS.to_vec())
                .build(),
        }
    }

    pub fn enqueued(
        &self,
        conversation_type: &str,
        content_type: &str,
        priority: &str,
        millis: f64,
    ) {
        self.enqueued.add(
            1,
            &[
                KeyValue::new("conversation_type", conversation_type.to_string()),
                KeyValue::new("content_type", content_type.to_string()),
                KeyValue::new("priority", priority.to_string()),
            ],
        );
        self.duration_ms
            .record(millis, &[KeyValue::new("status", "success")]);
    }

    pub fn rejected(&self, rejection: &Rejection, millis: f64) {
        self.rejected.add(
            1,
            &[
                KeyValue::new("reason", rejection.telemetry_label()),
                KeyValue::new("status_code", rejection.status().to_string()),
            ],
        );
        self.duration_ms
            .record(millis, &[KeyValue::new("status", "rejected")]);
    }
}

impl Default for ProducerMetrics {
    fn default() -> Self {
        ProducerMetrics::new()
    }
}
