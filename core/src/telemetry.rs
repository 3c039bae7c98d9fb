//! Metrics, logs and traces (the traces' own module is [`crate::trace`]).
//!
//! Metrics are OpenTelemetry instruments exported in Prometheus text format on each process's
//! `/metrics`. Components create their own instruments from [`meter`] where the work happens;
//! this module only owns the exporter and the registry it fills.

use std::sync::OnceLock;

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::trace;

struct Telemetry {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
}

static TELEMETRY: OnceLock<Telemetry> = OnceLock::new();

fn telemetry() -> &'static Telemetry {
    TELEMETRY.get_or_init(|| {
        let registry = prometheus::Registry::new();
        // Building the exporter only fails if the registry refuses its collector, which a
        // fresh registry never does.
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .without_counter_suffixes()
            .without_units()
            .without_target_info()
            .build()
            .expect("prometheus exporter on a fresh registry");
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        Telemetry { registry, provider }
    })
}

/// The meter every Hotpath component registers its instruments with.
pub fn meter() -> Meter {
    telemetry().provider.meter("hotpath")
}

/// Everything measured so far, in Prometheus text format.
pub fn render() -> String {
    let families = telemetry().registry.gather();
    let mut out = Vec::new();
    // Encoding gathered families into a Vec cannot fail.
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("prometheus text encoding");
    String::from_utf8_lossy(&out).into_owned()
}

/// Millisecond histogram buckets for fast operations (the producer's 1–250 ms range, with
/// sub-millisecond resolution because that is where a healthy hot path lives).
pub const FAST_MS_BUCKETS: &[f64] = &[
    0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0,
];
/// Millisecond buckets for batch work against Postgres and the whole pipeline.
pub const SLOW_MS_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// Structured logs to stderr, filtered by `RUST_LOG` (default `info`); no spans are exported.
pub fn init_tracing() {
    // A second call (tests start several roles) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(log_filter())
        .with(log_lines())
        .try_init();
}

/// Structured logs as [`init_tracing`], and spans exported over OTLP as `service` when the
/// environment asks for it ([`crate::trace`]). Keep the answer until the process ends: dropping
/// it flushes the spans still queued.
pub fn init_logs_and_traces(service: &str) -> Option<trace::Exporter> {
    if !trace::requested() {
        init_tracing();
        return None;
    }
    match trace::exporter(service) {
        Ok((spans, exporter)) => {
            let _ = tracing_subscriber::registry()
                .with(log_filter())
                .with(log_lines())
                .with(spans)
                .try_init();
            tracing::info!(service, "exporting traces over OTLP");
            Some(exporter)
        }
        Err(error) => {
            init_tracing();
            // Traces are for diagnosis: a role runs without them rather than not at all.
            tracing::warn!(%error, "cannot export traces; running without them");
            None
        }
    }
}

fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,async_nats=warn"))
}

fn log_lines<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_subscriber::fmt::layer().with_writer(std::io::stderr)
}
