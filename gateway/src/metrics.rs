//! The producer's metrics, with the seed's names and labels: what the send path accepted and
//! turned down, and how long each answer took (HTTP sends and WebSocket `send` frames alike).

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

use hotpath_core::domain::{ContentType, ConversationKind, Priority};
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

    /// One message accepted onto the stream.
    pub fn enqueued(
        &self,
        conversation_type: ConversationKind,
        content_type: &ContentType,
        priority: &Priority,
    ) {
        self.enqueued.add(
            1,
            &[
                KeyValue::new("conversation_type", conversation_type.as_str()),
                KeyValue::new("content_type", content_type.label()),
                KeyValue::new("priority", priority.label()),
            ],
        );
    }

    /// One send answered after `millis`: accepted, or turned down with `rejection`.
    pub fn answered(&self, rejection: Option<&Rejection>, millis: f64) {
        let status = match rejection {
            None => "success",
            Some(rejection) => {
                self.rejected.add(
                    1,
                    &[
                        KeyValue::new("reason", rejection.telemetry_label()),
                        KeyValue::new("status_code", rejection.status().to_string()),
                    ],
                );
                "rejected"
            }
        };
        self.duration_ms
            .record(millis, &[KeyValue::new("status", status)]);
    }
}

impl Default for ProducerMetrics {
    fn default() -> Self {
        ProducerMetrics::new()
    }
}
