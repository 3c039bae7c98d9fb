//! Moving a message that can never be processed to the `DLQ` stream.
//!
//! The DLQ entry is the original payload, unchanged, with headers saying where it came from,
//! why it failed and how often it was delivered, so `nats stream view DLQ` explains itself and
//! the payload can be re-published to its source once the cause is fixed. Its `Nats-Msg-Id`
//! names the source position, so a crash between the DLQ publish and the term-ack cannot file
//! it twice.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, Message, message::PublishMessage};
use hotpath_core::names::{dlq_headers, dlq_subject};
use opentelemetry::KeyValue;

use crate::metrics::DeliveryMetrics;

pub struct DeadLetter<'a> {
    /// The stream it came from (`MESSAGES`, `RECEIPTS`).
    pub source_stream: &'a str,
    /// The DLQ subject's last token: `dlq.<source>` (`messages`, `receipts`).
    pub source: &'a str,
    pub payload: &'a [u8],
    pub subject: &'a str,
    pub stream_seq: u64,
    pub deliveries: i64,
    pub reason: &'a str,
}

impl<'a> DeadLetter<'a> {
    /// The letter for a message fetched from `source_stream` (DLQ subject `dlq.<source>`).
    pub fn of(
        message: &'a Message,
        source_stream: &'a str,
        source: &'a str,
        stream_seq: u64,
        deliveries: i64,
        reason: &'a str,
    ) -> DeadLetter<'a> {
        DeadLetter {
            source_stream,
            source,
            payload: &message.payload,
            subject: message.subject.as_str(),
            stream_seq,
            deliveries,
            reason,
        }
    }
}

/// Publishes to `dlq.<source>` and waits for JetStream to store it.
pub async fn publish(js: &jetstream::Context, letter: DeadLetter<'_>) -> anyhow::Result<()> {
    let mut headers = HeaderMap::new();
    // Header values must be one line.
    headers.insert(
        dlq_headers::REASON,
        letter.reason.replace(['\r', '\n'], " ").as_str(),
    );
    headers.insert(dlq_headers::SOURCE_STREAM, letter.source_stream);
    headers.insert(dlq_headers::SOURCE_SUBJECT, letter.subject);
    headers.insert(
        dlq_headers::SOURCE_SEQUENCE,
        letter.stream_seq.to_string().as_str(),
    );
    headers.insert(
        dlq_headers::DELIVERIES,
        letter.deliveries.to_string().as_str(),
    );
    let message = PublishMessage::build()
        .payload(letter.payload.to_vec().into())
        .headers(headers)
        .message_id(format!("{}:{}", letter.source_stream, letter.stream_seq));
    js.send_publish(dlq_subject(letter.source), message)
        .await?
        .await?;
    Ok(())
}

/// Moves a fetched `message` to the DLQ: publishes the letter, then term-acks the original so
/// it is never delivered again, and counts it in `delivery_dlq_total{source}`. If the DLQ
/// cannot take it, the message is nak'ed for another try in a second. Returns whether it moved.
pub async fn move_message(
    js: &jetstream::Context,
    metrics: &DeliveryMetrics,
    message: &Message,
    letter: DeadLetter<'_>,
) -> bool {
    let (source, stream_seq, deliveries, reason) = (
        letter.source,
        letter.stream_seq,
        letter.deliveries,
        letter.reason.to_string(),
    );
    match publish(js, letter).await {
        Ok(()) => {
            tracing::warn!(source, stream_seq, deliveries, reason, "moved to DLQ");
            metrics
                .dlq_total
                .add(1, &[KeyValue::new("source", source.to_string())]);
            let _ = message.ack_with(AckKind::Term).await;
            true
        }
        Err(error) => {
            tracing::warn!(source, stream_seq, %error, "DLQ publish failed; will retry");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            false
        }
    }
}
