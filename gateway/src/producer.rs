//! Handing an accepted message to JetStream, bounded in time.
//!
//! Publishes are pipelined: each request sends its message and awaits its own PubAck, with
//! no lock and no one-at-a-time round trip, so thousands can be in flight on one connection.
//! Every publish carries `Nats-Msg-Id` = the idempotency key (and the trace context, see
//! [`crate::trace`]), and the PubAck's `duplicate`
//! flag tells a repeated key apart from a first send (whether it is a retry is decided by
//! [`crate::duplicates`], which reads the kept message back with [`Producer::kept`]). If NATS
//! is down or the stream refuses the message, the caller learns it within the publish timeout,
//! as a 503 with Retry-After.
//! What the stream stored is counted into this gateway's view of the backlog ([`Backlog`]), and
//! a stream that refuses because it is full is answered like a full backlog: 503
//! `BACKLOG_FULL`.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::connection::State;
use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::{self, context::PublishAckFuture};
use hotpath_core::envelope::Envelope;
use hotpath_core::names::{message_subject, partition_of, receipt_subject};
use hotpath_core::receipts::Receipt;
use hotpath_core::rejection::Rejection;
use opentelemetry::KeyValue;
use tracing::Instrument as _;

use crate::backlog::Backlog;
use crate::trace;
use opentelemetry::metrics::Histogram;

/// What JetStream said about a publish.
#[derive(Debug, Clone)]
pub struct Published {
    /// True when the stream already had this key within its duplicate window: a message with
    /// it was accepted before, and this one was not stored.
    pub duplicate: bool,
    /// The stream that holds the message: this one, or for a duplicate the one it kept.
    pub stream: String,
    pub stream_sequence: u64,
}

#[derive(Clone)]
pub struct Producer {
    js: jetstream::Context,
    client: async_nats::Client,
    partitions: u32,
    timeout: Duration,
    duration_ms: Histogram<f64>,
    backlog: Backlog,
}

impl Producer {
    pub fn new(
        client: async_nats::Client,
        partitions: u32,
        timeout: Duration,
        backlog: Backlog,
    ) -> Producer {
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .max_ack_inflight(50_000)
            .build(client.clone());
        Producer {
            js,
            client,
            partitions,
            timeout,
            duration_ms: hotpath_core::telemetry::meter()
                .f64_histogram("producer_publish_duration_ms")
                .with_description("JetStream publish round trip, from send to PubAck")
                .with_boundaries(hotpath_core::telemetry::FAST_MS_BUCKETS.to_vec())
                .build(),
            backlog,
        }
    }

    pub async fn publish(&self, envelope: &Envelope) -> Result<Published, Rejection> {
        // While disconnected the client would buffer the publish and maybe deliver it after we
        // answered 503; refuse up front instead so a 503 almost always means "not stored".
        if self.client.connection_state() != State::Connected {
            return Err(unavailable("the message stream is unreachable"));
        }
        let started = Instant::now();
        let partition = partition_of(&envelope.conversation_id.to_string(), self.partitions);
        let subject = message_subject(partition);
        let payload = envelope.encode();
        let payload_bytes = payload.len();
        let span = trace::publish_span(&subject, envelope);
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, envelope.idempotency_key.as_str());
        trace::inject(&span, &mut headers);
        let message = PublishMessage::build()
            .payload(payload.into())
            .headers(headers);

        let outcome = tokio::time::timeout(self.timeout, async {
            let ack: PublishAckFuture = self.js.send_publish(subject.clone(), message).await?;
            ack.await
        })
        .instrument(span)
        .await;
        let status = match &outcome {
            Ok(Ok(_)) => "ok",
            _ => "error",
        };
        self.duration_ms.record(
            started.elapsed().as_secs_f64() * 1000.0,
            &[KeyValue::new("status", status)],
        );

        match outcome {
            Ok(Ok(ack)) => {
                if !ack.duplicate {
                    self.backlog.accepted(
                        ack.sequence,
                        &subject,
                        &envelope.idempotency_key,
                        payload_bytes,
                    );
                }
                Ok(Published {
                    duplicate: ack.duplicate,
                    stream: ack.stream,
                    stream_sequence: ack.sequence,
                })
            }
            Ok(Err(error)) if is_stream_full(&error) => {
                tracing::warn!(%error, "the MESSAGES stream is full");
                Err(self.backlog.full())
            }
            Ok(Err(error)) => Err(classify(error)),
            Err(_) => Err(unavailable(
                "the message stream did not acknowledge in time",
            )),
        }
    }
}

impl Producer {
    /// The envelope at `sequence` of `stream`, read with a direct get (the stream allows it:
    /// `allow_direct` in `nats/streams/MESSAGES.json`, so any replica answers; bounded by the
    /// publish timeout). `None` when the stream no longer holds it; an error when it could not
    /// be asked or what it holds is not an envelope.
    pub async fn kept(&self, stream: &str, sequence: u64) -> anyhow::Result<Option<Envelope>> {
        let stream = self.js.get_stream_no_info(stream).await?;
        // The context's request timeout is the publish timeout.
        match stream.direct_get(sequence).await {
            Ok(message) => Ok(Some(Envelope::decode(&message.payload)?)),
            Err(error) if error.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Publishes a receipt to `receipts.<p>` (p: the conversation's partition) with
    /// `Nats-Msg-Id` = `<messageId>:<userId>:<state>`, so a repeated ack within the stream's
    /// duplicate window is stored once. Bounded by the publish timeout like a message.
    pub async fn publish_receipt(&self, receipt: &Receipt) -> Result<(), Rejection> {
        if self.client.connection_state() != State::Connected {
            return Err(unavailable("the receipt stream is unreachable"));
        }
        let partition = partition_of(&receipt.conversation_id.to_string(), self.partitions);
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, receipt.msg_id());
        trace::inject(&tracing::Span::current(), &mut headers);
        let message = PublishMessage::build()
            .payload(receipt.encode().into())
            .headers(headers);
        let outcome = tokio::time::timeout(self.timeout, async {
            self.js
                .send_publish(receipt_subject(partition), message)
                .await?
                .await
        })
        .await;
        match outcome {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(classify(error)),
            Err(_) => Err(unavailable(
                "the receipt stream did not acknowledge in time",
            )),
        }
    }
}

fn classify(error: async_nats::jetstream::context::PublishError) -> Rejection {
    tracing::warn!(%error, "publish failed");
    match error.kind() {
        // The body limit keeps requests far below NATS's max_payload, so this is a bug or a
        // misconfigured server: retrying the same message cannot help.
        PublishErrorKind::MaxPayloadExceeded => Rejection::EnqueueFailed {
            reason: error.to_string(),
        },
        // Time-outs, no stream, broken connection, too many in flight, and the stream refusing
        // the message because it is full (discard policy "new"): all pass with time.
        _ => unavailable(&error.to_string()),
    }
}

/// Whether the stream refused the message because it holds its `max_bytes` or `max_msgs`
/// (`discard: new`). JetStream says so only in words: a store failure (10077) described as
/// "maximum bytes exceeded" or "maximum messages exceeded".
fn is_stream_full(error: &async_nats::jetstream::context::PublishError) -> bool {
    use std::error::Error as _;
    let Some(api_error) = error
        .source()
        .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
    else {
        return false;
    };
    api_error.error_code() == async_nats::jetstream::ErrorCode::STREAM_STORE_FAILED
        && api_error.to_string().starts_with("maximum ")
}

fn unavailable(reason: &str) -> Rejection {
    Rejection::EnqueueUnavailable {
        reason: reason.into(),
        retry_after_secs: 1,
    }
}
