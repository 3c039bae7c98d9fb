//! The policy chain's metrics.

use std::time::Duration;

use hotpath_core::telemetry::meter;
use hotpath_policy_host::FailureKind;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram};

/// Microsecond buckets: a healthy policy takes tens of microseconds, the deadline is 10 ms.
const EVALUATION_US_BUCKETS: &[f64] = &[
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0, 25000.0,
];

#[derive(Clone)]
pub struct PolicyMetrics {
    evaluation_us: Histogram<f64>,
    verdicts: Counter<u64>,
    failures: Counter<u64>,
    swaps: Counter<u64>,
    refused: Counter<u64>,
    version: Gauge<u64>,
    shadow_evaluation_us: Histogram<f64>,
    shadow_verdicts: Counter<u64>,
    shadow_failures: Counter<u64>,
    samples: Counter<u64>,
}

impl PolicyMetrics {
    pub fn new() -> PolicyMetrics {
        let meter = meter();
        let metrics = PolicyMetrics {
            evaluation_us: meter
                .f64_histogram("policy_evaluation_duration_us")
                .with_description("One policy's evaluation, fresh instance included")
                .with_boundaries(EVALUATION_US_BUCKETS.to_vec())
                .build(),
            verdicts: meter
                .u64_counter("policy_verdicts_total")
                .with_description("Verdicts by policy and code (allow, or the rejection's code)")
                .build(),
            failures: meter
                .u64_counter("policy_failures_total")
                .with_description("Policy failures (trap, deadline, memory, malformed, bad_output)")
                .build(),
            swaps: meter
                .u64_counter("policy_swaps_total")
                .with_description("Chains swapped in")
                .build(),
            refused: meter
                .u64_counter("policy_swaps_refused_total")
                .with_description("Chains refused (compile error, failed vectors, missing module)")
                .build(),
            version: meter
                .u64_gauge("policy_chain_version")
                .with_description("Version of the chain this gateway runs")
                .build(),
            shadow_evaluation_us: meter
                .f64_histogram("policy_shadow_evaluation_duration_us")
                .with_description("One shadow evaluation of a policy on trial, fresh instance included")
                .with_boundaries(EVALUATION_US_BUCKETS.to_vec())
                .build(),
            shadow_verdicts: meter
                .u64_counter("policy_shadow_verdicts_total")
                .with_description(
                    "What policies on trial would have decided, by policy and code (allow, or the rejection's code)",
                )
                .build(),
            shadow_failures: meter
                .u64_counter("policy_shadow_failures_total")
                .with_description("Failures of policies on trial, evaluated in shadow")
                .build(),
            samples: meter
                .u64_counter("policy_decision_samples_total")
                .with_description(
                    "Differing decisions of policies on trial: published, over_budget (only counted) or dropped",
                )
                .build(),
        };
        // From 0, so that an alert sees the first refused chain as an increase.
        metrics.refused.add(0, &[]);
        metrics
    }

    pub fn evaluated(&self, policy: &str, took: Duration) {
        self.evaluation_us.record(
            took.as_secs_f64() * 1e6,
            &[KeyValue::new("policy", policy.to_string())],
        );
    }

    pub fn verdict(&self, policy: &str, code: &str) {
        self.verdicts.add(
            1,
            &[
                KeyValue::new("policy", policy.to_string()),
                KeyValue::new("code", code.to_string()),
            ],
        );
    }

    pub fn failed(&self, policy: &str, kind: &'static str) {
        self.failures.add(
            1,
            &[
                KeyValue::new("policy", policy.to_string()),
                KeyValue::new("kind", kind),
            ],
        );
    }

    /// Chain `version` of `policies` is in force. Each policy's failure counts are exported
    /// at 0 from now on, so that an alert sees the first failure as an increase.
    pub fn swapped(&self, version: u64, policies: &[&str]) {
        self.swaps.add(1, &[]);
        self.version.record(version, &[]);
        for policy in policies {
            for kind in FailureKind::ALL {
                self.failures.add(
                    0,
                    &[
                        KeyValue::new("policy", policy.to_string()),
                        KeyValue::new("kind", kind.as_str()),
                    ],
                );
            }
        }
    }

    pub fn shadow_evaluated(&self, policy: &str, took: Duration) {
        self.shadow_evaluation_us.record(
            took.as_secs_f64() * 1e6,
            &[KeyValue::new("policy", policy.to_string())],
        );
    }

    pub fn shadow_verdict(&self, policy: &str, code: &str) {
        self.shadow_verdicts.add(
            1,
            &[
                KeyValue::new("policy", policy.to_string()),
                KeyValue::new("code", code.to_string()),
            ],
        );
    }

    pub fn shadow_failed(&self, policy: &str, kind: &'static str) {
        self.shadow_failures.add(
            1,
            &[
                KeyValue::new("policy", policy.to_string()),
                KeyValue::new("kind", kind),
            ],
        );
    }

    /// `outcome`: `published`, `over_budget` or `dropped`.
    pub fn sample(&self, policy: &str, outcome: &'static str) {
        self.samples.add(
            1,
            &[
                KeyValue::new("policy", policy.to_string()),
                KeyValue::new("outcome", outcome),
            ],
        );
    }

    pub fn refused(&self) {
        self.refused.add(1, &[]);
    }
}

impl Default for PolicyMetrics {
    fn default() -> Self {
        PolicyMetrics::new()
    }
}
