//! Metrics and logs.
//!
//! Metrics are OpenTelemetry instruments exported in Prometheus text format on each process's
//! `/metrics`. Components create their own instruments from [`meter`] where the work happens;
//! this module only owns the exporter and the registry it fills.

use std::sync::OnceLock;

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

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

/// Structured logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,async_nats=warn"));
    // A second call (tests start several roles) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
