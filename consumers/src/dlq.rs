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
use hotpath_core::domain::DlqSource;
use hotpath_core::names::{dlq_headers, dlq_subject};
use hotpath_core::telemetry::meter;

use crate::metrics::LabelledCounter;

/// One source's way into the DLQ: a worker of the `MESSAGES`, `RECEIPTS` or `PUSH` stream
/// holds one and moves there what it can never process.
#[derive(Clone)]
pub struct DeadLetterQueue {
    js: jetstream::Context,
    /// Where the messages come from: the DLQ subject is `dlq.<source>`.
    source: DlqSource,
    /// `delivery_dlq_total{source}`.
    moved: LabelledCounter,
}

/// Where one message sat in its source and why it goes to the DLQ.
struct DeadLetter<'a> {
    payload: &'a [u8],
    subject: &'a str,
    stream_seq: u64,
    deliveries: i64,
    reason: &'a str,
}

impl DeadLetterQueue {
    pub fn new(js: jetstream::Context, source: DlqSource) -> DeadLetterQueue {
        let moved = LabelledCounter::new(
            &meter(),
            "delivery_dlq_total",
            "source",
            "Messages moved to the DLQ stream, by reason",
        );
        moved.declare(&[source.as_str()]);
        DeadLetterQueue { js, source, moved }
    }

    /// Moves a fetched `message` (at `stream_seq`, delivered `deliveries` times) to the DLQ:
    /// publishes the letter, then term-acks the original so it is never delivered again, and
    /// counts it in `delivery_dlq_total{source}`. If the DLQ cannot take it, the message is
    /// nak'ed for another try in a second. Returns whether it moved.
    pub async fn move_message(
        &self,
        message: &Message,
        stream_seq: u64,
        deliveries: i64,
        reason: &str,
    ) -> bool {
        let letter = DeadLetter {
            payload: &message.payload,
            subject: message.subject.as_str(),
            stream_seq,
            deliveries,
            reason,
        };
        let source = self.source.as_str();
        match self.publish(letter).await {
            Ok(()) => {
                tracing::warn!(source, stream_seq, deliveries, reason, "moved to DLQ");
                self.moved.add(source, 1);
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

    /// Publishes to `dlq.<source>` and waits for JetStream to store it.
    async fn publish(&self, letter: DeadLetter<'_>) -> anyhow::Result<()> {
        let mut headers = HeaderMap::new();
        // Header values must be one line.
        headers.insert(
            dlq_headers::REASON,
            letter.reason.replace(['\r', '\n'], " ").as_str(),
        );
        headers.insert(dlq_headers::SOURCE_STREAM, self.source.stream());
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
            .message_id(format!("{}:{}", self.source.stream(), letter.stream_seq));
        self.js
            .send_publish(dlq_subject(self.source), message)
            .await?
            .await?;
        Ok(())
    }
}
