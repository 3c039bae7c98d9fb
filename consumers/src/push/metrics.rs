//! The push side's metrics, shared by scheduling (inside the delivery consumer) and the push
//! workers: `delivery_push_enqueued_total{reason}`, `delivery_push_sent_total{platform}`,
//! `delivery_push_failed_total{reason}` and `delivery_push_breaker_open{platform}`. The
//! failures counter is the one to alert on (`reason="auth"`: our credentials were refused).

use hotpath_core::domain::Platform;
use hotpath_core::telemetry::meter;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Gauge;

use crate::metrics::LabelledCounter;

/// Every `reason` of `delivery_push_failed_total`, exported at 0 from the start (an alert
/// watches `auth`).
const PUSH_FAILURES: [&str; 8] = [
    "invalid_token",
    "unavailable",
    "auth",
    "rejected",
    "dead_lettered",
    "enqueue_failed",
    "enqueue_timeout",
    "message_missing",
];

#[derive(Clone)]
pub(crate) struct PushMetrics {
    /// `reason`: why the recipient is pushed (`offline`, `presence_unknown`).
    pub enqueued: LabelledCounter,
    /// `platform`: the provider that accepted the push.
    pub sent: LabelledCounter,
    /// `reason`: `invalid_token`, `unavailable`, `auth`, `rejected`, `dead_lettered`, …
    pub failed: LabelledCounter,
    breaker_open: Gauge<u64>,
}

impl PushMetrics {
    pub fn new() -> PushMetrics {
        let meter = meter();
        let metrics = PushMetrics {
            enqueued: LabelledCounter::new(
                &meter,
                "delivery_push_enqueued_total",
                "reason",
                "Push tasks scheduled for offline recipients, by reason",
            ),
            sent: LabelledCounter::new(
                &meter,
                "delivery_push_sent_total",
                "platform",
                "Pushes the provider accepted, by platform",
            ),
            failed: LabelledCounter::new(
                &meter,
                "delivery_push_failed_total",
                "reason",
                "Pushes that failed, by reason (invalid_token, unavailable, auth, rejected, \
                 dead_lettered, enqueue_failed, …); alert on auth",
            ),
            breaker_open: meter
                .u64_gauge("delivery_push_breaker_open")
                .with_description("1 while a platform's circuit breaker holds its pushes back")
                .build(),
        };
        metrics.enqueued.declare(&["offline", "presence_unknown"]);
        metrics.sent.declare(&Platform::ALL.map(Platform::as_str));
        metrics.failed.declare(&PUSH_FAILURES);
        metrics
    }

    /// Whether `platform`'s circuit breaker holds its pushes back now.
    pub fn breaker_open(&self, platform: &'static str, open: bool) {
        self.breaker_open
            .record(u64::from(open), &[KeyValue::new("platform", platform)]);
    }
}
