//! What the delivery components' metrics have in common. Each component builds its own
//! instruments once, when it is made, and records them where the work happens:
//! [`crate::persist::PersistMetrics`], [`crate::partition::PipelineMetrics`],
//! [`crate::fanout::FanoutMetrics`], [`crate::push::PushMetrics`],
//! [`crate::dlq::DlqMetrics`], [`crate::replay_window`] and [`crate::lag`]. Names, labels
//! and help texts are the seed's, which dashboards and tests scrape by name.
//!
//! Only two things are shared: the histogram shape of batch work, and the per-step duration
//! of a batch, which the partition worker records for its steps and fanout for its own (it
//! runs on its own task, after the batch is acknowledged).

use std::time::Instant;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};

use hotpath_core::domain::PipelineStep;
use hotpath_core::telemetry::{SLOW_MS_BUCKETS, meter};

/// A millisecond histogram with the buckets of batch work against Postgres and NATS.
pub fn slow_histogram(
    meter: &Meter,
    name: &'static str,
    description: &'static str,
) -> Histogram<f64> {
    meter
        .f64_histogram(name)
        .with_description(description)
        .with_boundaries(SLOW_MS_BUCKETS.to_vec())
        .build()
}

/// A counter of things by one `label`, for counters that only ever take that one label.
#[derive(Clone)]
pub struct LabelledCounter {
    counter: Counter<u64>,
    label: &'static str,
}

impl LabelledCounter {
    pub fn new(
        meter: &Meter,
        name: &'static str,
        label: &'static str,
        description: &'static str,
    ) -> LabelledCounter {
        let counter = meter
            .u64_counter(name)
            .with_description(description)
            .build();
        LabelledCounter { counter, label }
    }

    /// Adds `count` under `value`; nothing at all for 0, so no series appears empty.
    pub fn add(&self, value: &'static str, count: u64) {
        if count > 0 {
            self.counter.add(count, &[KeyValue::new(self.label, value)]);
        }
    }

    /// Exports 0 under each of `values` from now on. A counter an alert watches with
    /// `increase()` must exist before its first event: a series that appears at 1 shows no
    /// increase, and the first DLQ entry or refused credential would go unnoticed.
    pub fn declare(&self, values: &[&'static str]) {
        for value in values {
            self.counter.add(0, &[KeyValue::new(self.label, *value)]);
        }
    }
}

/// `delivery_pipeline_step_duration_ms{step}`: each step of a batch.
#[derive(Clone)]
pub struct StepMetrics {
    duration_ms: Histogram<f64>,
}

impl StepMetrics {
    pub fn new() -> StepMetrics {
        StepMetrics {
            duration_ms: slow_histogram(
                &meter(),
                "delivery_pipeline_step_duration_ms",
                "Each step of a batch",
            ),
        }
    }

    /// `step` of a batch took `millis`.
    pub fn step(&self, step: PipelineStep, millis: f64) {
        self.duration_ms
            .record(millis, &[KeyValue::new("step", step.as_str())]);
    }

    /// `step` of a batch began at `started` and is done.
    pub fn since(&self, step: PipelineStep, started: Instant) {
        self.step(step, started.elapsed().as_secs_f64() * 1000.0);
    }
}
