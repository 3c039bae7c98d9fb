//! Where a message's trace begins: the gateway's span of a send, and the trace context it
//! hands on in the JetStream message's headers (see `hotpath_core::trace` for the whole
//! trace).
//!
//! A send is the span `send` (kind server), a child of the client's `traceparent` when it
//! sent one, else the root of a new trace; its publish is the span `publish` (kind producer),
//! whose context goes into the message's headers for the consumers to continue.
//!
//! With tracing off this costs the send path two header lookups and no allocation: no span is
//! made and no header written, except that a `traceparent` (and `tracestate`) the client sent
//! is passed on as it came, so a process further on that traces still joins the client's
//! trace.

use std::future::Future;

use async_nats::HeaderMap;
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use hotpath_core::envelope::Envelope;
use hotpath_core::trace;
use opentelemetry_http::HeaderExtractor;
use tracing::field::Empty;
use tracing::{Instrument as _, Span};

/// The W3C trace context headers.
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

tokio::task_local! {
    /// The client's trace context of the send in progress, while tracing is off.
    static PASSED_ON: PassedOn;
}

/// A client's trace context headers, as they came.
#[derive(Clone)]
struct PassedOn {
    traceparent: HeaderValue,
    tracestate: Option<HeaderValue>,
}

/// Runs the rest of the send route (`next`) within the send's span, or with the client's
/// trace context kept for the publish when tracing is off.
pub async fn send(request: Request, next: Next) -> Response {
    if trace::enabled() {
        let span = tracing::info_span!(
            "send",
            otel.kind = "server",
            http.request.method = "POST",
            http.route = "/v1/messages",
            http.response.status_code = Empty,
            trace_id = Empty,
        );
        trace::continue_trace(&span, &HeaderExtractor(request.headers()));
        let response = next.run(request).instrument(span.clone()).await;
        span.record("http.response.status_code", response.status().as_u16());
        return response;
    }
    let headers = request.headers();
    match headers.get(TRACEPARENT) {
        Some(traceparent) if within_bounds(traceparent, headers.get(TRACESTATE)) => {
            let passed_on = PassedOn {
                traceparent: traceparent.clone(),
                tracestate: headers.get(TRACESTATE).cloned(),
            };
            PASSED_ON.scope(passed_on, next.run(request)).await
        }
        _ => next.run(request).await,
    }
}

/// Whether the client's headers are of a size the W3C trace context allows, so passing them
/// on cannot make a message's headers grow much (a `traceparent` is 55 bytes in version 00;
/// a `tracestate` at most 512).
fn within_bounds(traceparent: &HeaderValue, tracestate: Option<&HeaderValue>) -> bool {
    traceparent.len() <= 128 && tracestate.is_none_or(|state| state.len() <= 512)
}

/// Runs `work`, a `send` frame of a WebSocket, within a span of its own: the root of a new
/// trace (a frame carries no trace context). Nothing is added with tracing off.
pub async fn ws_send<F: Future>(work: F) -> F::Output {
    if !trace::enabled() {
        return work.await;
    }
    let span = tracing::info_span!(
        "send",
        otel.kind = "server",
        transport = "websocket",
        trace_id = Empty
    );
    trace::record_trace_id(&span);
    work.instrument(span).await
}

/// Runs `work`, taking a receipt from a WebSocket, within a span of its own (the root of a
/// new trace, which the receipts consumer continues). Nothing is added with tracing off.
pub async fn ws_receipt<F: Future>(work: F) -> F::Output {
    if !trace::enabled() {
        return work.await;
    }
    let span = tracing::info_span!(
        "receipt",
        otel.kind = "server",
        transport = "websocket",
        trace_id = Empty
    );
    trace::record_trace_id(&span);
    work.instrument(span).await
}

/// The span of handing a frame published for a user (`headers`: its NATS headers) to the
/// user's sockets here, continuing the trace of the fanout that published it. None with
/// tracing off or for a frame that carries no trace context.
pub fn deliver_span(headers: Option<&HeaderMap>, sockets: usize) -> Span {
    let traced = headers.filter(|headers| headers.get(TRACEPARENT).is_some());
    if !trace::enabled() || traced.is_none() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "deliver",
        otel.kind = "consumer",
        messaging.system = "nats",
        sockets,
        trace_id = Empty,
    );
    trace::continue_from_nats(&span, traced);
    span
}

/// The span of one publish to the stream, a child of the send's (none with tracing off).
pub fn publish_span(subject: &str, envelope: &Envelope) -> Span {
    if !trace::enabled() {
        return Span::none();
    }
    tracing::info_span!(
        "publish",
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.destination.name = subject,
        message_id = %envelope.message_id,
        conversation_id = %envelope.conversation_id,
    )
}

/// Writes the trace context the consumers continue into a message's headers: `span`'s, or
/// with tracing off the client's own, passed on.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    if trace::enabled() {
        trace::inject(span, headers);
        return;
    }
    let _ = PASSED_ON.try_with(|passed_on| {
        if let Ok(traceparent) = passed_on.traceparent.to_str() {
            headers.insert(TRACEPARENT, traceparent);
        }
        if let Some(Ok(tracestate)) = passed_on.tracestate.as_ref().map(|v| v.to_str()) {
            headers.insert(TRACESTATE, tracestate);
        }
    });
}
