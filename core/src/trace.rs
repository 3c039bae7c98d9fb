//! Traces: one message, one trace, across the queue.
//!
//! A send is traced from the gateway's HTTP request through JetStream to the consumer that
//! stores it, the fanout that tells the sockets, the socket node that writes the frame and the
//! push worker that calls APNS or FCM. The W3C trace context (`traceparent`, `tracestate`)
//! travels in the NATS message headers, written and read by OpenTelemetry's
//! [`TraceContextPropagator`] over [`NatsInjector`] and [`NatsExtractor`]; every step is a
//! `tracing` span whose parent is the context the previous process put there.
//!
//! Tracing is off unless the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and off again with `OTEL_SDK_DISABLED=true`.
//! Off, the hot path pays one relaxed atomic load per step ([`enabled`]): the roles make
//! [`tracing::Span::none`] instead of a span and write no header. On, spans go to the endpoint
//! over OTLP/HTTP (protobuf) from the batch span processor's own thread, configured by the
//! standard variables (`OTEL_SERVICE_NAME`, `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, …); the service name defaults to the role's.
//!
//! Each span of a message's work carries its trace id as the field `trace_id`, so the log
//! lines written inside it say which trace they belong to.

use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt as _};
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{FilterFn, Filtered};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans. Cheap enough for every message.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether the environment asks for traces: an OTLP endpoint is set and the SDK is not
/// disabled.
pub fn requested() -> bool {
    let set = |name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The layer that turns Hotpath's spans into OpenTelemetry spans (other crates' spans are left
/// out: they would only be noise in a message's trace).
pub type SpanLayer<S> = Filtered<OpenTelemetryLayer<S, SdkTracer>, FilterFn, S>;

/// The exporting side of tracing, while the process runs; dropping it flushes the spans still
/// queued and stops the exporter.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("flushing the last spans failed: {error}");
        }
    }
}

/// The span layer and its exporter, exporting as `service` unless `OTEL_SERVICE_NAME` says
/// otherwise; marks tracing [`enabled`].
pub fn exporter<S>(service: &str) -> anyhow::Result<(SpanLayer<S>, Exporter)>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()?;
    let mut resource = Resource::builder();
    if !service_named() {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("hotpath");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(FilterFn::new(
            hotpath_only as fn(&tracing::Metadata<'_>) -> bool,
        ));
    ENABLED.store(true, Ordering::Relaxed);
    Ok((layer, Exporter { provider }))
}

/// Whether a span or event is Hotpath's own (its crates' targets all start so).
fn hotpath_only(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.target().starts_with("hotpath")
}

/// Whether the environment names the service (`OTEL_SERVICE_NAME`, or `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES`), which the SDK then reads.
fn service_named() -> bool {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|name| !name.is_empty());
    named
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|attributes| {
            attributes
                .split(',')
                .any(|pair| pair.trim_start().starts_with("service.name="))
        })
}

/// Makes `span` a child of the trace context in `carrier`, or the root of a new trace when
/// there is none, and records its `trace_id` field for the logs.
pub fn continue_trace(span: &Span, carrier: &dyn Extractor) {
    let parent = TraceContextPropagator::new().extract(carrier);
    if parent.span().span_context().is_valid() {
        // Fails only for a disabled span or one already started: then there is nothing to do.
        let _ = span.set_parent(parent);
    }
    record_trace_id(span);
}

/// [`continue_trace`] from a NATS message's headers (none: a new trace).
pub fn continue_from_nats(span: &Span, headers: Option<&HeaderMap>) {
    match headers {
        Some(headers) => continue_trace(span, &NatsExtractor(headers)),
        None => record_trace_id(span),
    }
}

/// Records the `trace_id` field of `span` (declared `trace_id = Empty`), for the logs.
pub fn record_trace_id(span: &Span) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
    }
}

/// Writes `span`'s trace context into NATS message headers, when tracing is on.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    if !enabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut NatsInjector(headers));
}

/// NATS message headers as a carrier the propagator writes to.
pub struct NatsInjector<'a>(pub &'a mut HeaderMap);

impl Injector for NatsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

/// NATS message headers as a carrier the propagator reads from.
pub struct NatsExtractor<'a>(pub &'a HeaderMap);

impl Extractor for NatsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_context_round_trips_through_nats_headers() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut incoming = HeaderMap::new();
        incoming.insert("traceparent", traceparent);
        incoming.insert("tracestate", "vendor=value");
        let propagator = TraceContextPropagator::new();
        let context = propagator.extract(&NatsExtractor(&incoming));
        assert_eq!(
            context.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );

        let mut outgoing = HeaderMap::new();
        propagator.inject_context(&context, &mut NatsInjector(&mut outgoing));
        assert_eq!(
            outgoing.get("traceparent").map(|v| v.as_str()),
            Some(traceparent)
        );
        assert_eq!(
            outgoing.get("tracestate").map(|v| v.as_str()),
            Some("vendor=value")
        );
    }

    #[test]
    fn headers_without_a_context_give_none() {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "key");
        let context = TraceContextPropagator::new().extract(&NatsExtractor(&headers));
        assert!(!context.span().span_context().is_valid());
    }
}
