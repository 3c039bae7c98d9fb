//! The consumers' spans of a message's trace (see `hotpath_core::trace`): each continues the
//! trace context the message came with, in its NATS headers, and hands it on in the headers of
//! what it publishes in turn.
//!
//! * `persist` (kind consumer): one per message of a batch, from its fetch to its
//!   acknowledgement; a child of the gateway's `publish`. The batch's one transaction is in
//!   every message's span.
//! * `fanout` (kind producer): telling the message's recipients and sender on their
//!   `deliver.user.<id>` subjects; a child of `persist`, continued by the socket node's
//!   `deliver`.
//! * `push` (kind consumer): one push task in a push worker, the APNS or FCM call included; a
//!   child of `persist`, which published the task.
//! * `receipt` (kind consumer): recording one delivered/read receipt; a child of the
//!   gateway's span that took it.
//!
//! With tracing off every function here answers [`Span::none`] at the cost of one atomic load.

use async_nats::HeaderMap;
use hotpath_core::trace;
use tracing::Span;
use tracing::field::Empty;
use uuid::Uuid;

/// The span of storing one message of `partition`'s batch.
pub fn persist_span(partition: u32, stream_seq: u64, headers: Option<&HeaderMap>) -> Span {
    if !trace::enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "persist",
        otel.kind = "consumer",
        messaging.system = "nats",
        partition,
        stream_seq,
        message_id = Empty,
        outcome = Empty,
        seq = Empty,
        trace_id = Empty,
    );
    trace::continue_from_nats(&span, headers);
    span
}

/// The span of telling a stored message's recipients and sender, a child of its `persist`.
pub fn fanout_span(persist: &Span, message_id: Uuid) -> Span {
    if !trace::enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        parent: persist,
        "fanout",
        otel.kind = "producer",
        messaging.system = "nats",
        %message_id,
        trace_id = Empty,
    );
    trace::record_trace_id(&span);
    span
}

/// The span of one push task in the `platform` worker.
pub fn push_span(platform: &str, headers: Option<&HeaderMap>) -> Span {
    if !trace::enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "push",
        otel.kind = "consumer",
        messaging.system = "nats",
        platform,
        message_id = Empty,
        outcome = Empty,
        trace_id = Empty,
    );
    trace::continue_from_nats(&span, headers);
    span
}

/// The span of recording one receipt.
pub fn receipt_span(headers: Option<&HeaderMap>) -> Span {
    if !trace::enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "receipt",
        otel.kind = "consumer",
        messaging.system = "nats",
        message_id = Empty,
        state = Empty,
        trace_id = Empty,
    );
    trace::continue_from_nats(&span, headers);
    span
}

/// Headers for a publish that continues `span`'s trace, when tracing is on.
pub fn headers_of(span: &Span) -> Option<HeaderMap> {
    if !trace::enabled() || span.is_none() {
        return None;
    }
    let mut headers = HeaderMap::new();
    trace::inject(span, &mut headers);
    Some(headers)
}
