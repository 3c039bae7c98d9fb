//! The receipts consumer: turns the `RECEIPTS` stream into rows of `message_receipts` and tells
//! the sender when its message is first delivered and first read.
//!
//! **One durable pull consumer, `receipts`, over every partition (`receipts.*`)**, shared by
//! all consumer replicas (each process runs one worker on it; JetStream hands each receipt to
//! one of them). Receipts need no partition ownership: recording one is an upsert that never
//! moves backwards (each timestamp is set once, `read` also sets `delivered_at`, and nothing
//! is ever cleared), so order and repeats do not matter. The worker pulls the way the
//! partition workers do ([`crate::fetch`]) and backs off the same way ([`crate::backoff`]).
//!
//! Per receipt, in one transaction: lock the message row (`FOR NO KEY UPDATE`, so receipts of
//! one message are recorded one at a time and "the first" is well defined), read whether any
//! recipient had already reached `delivered` / `read`, upsert the recipient's row, commit (the
//! statements are [`crate::store::messages::lock_for_receipt`] and
//! [`crate::store::receipts`]). Then
//! the receipt is acknowledged, and only then is the sender told (`message.state.changed` on
//! `deliver.user.<sender>`, best effort like all live frames): `delivered` when this was the
//! first delivery recorded for the message, `read` when it was the first read (a `read` that
//! is also the first delivery sends both, `delivered` first). The message-level state is the
//! furthest state any recipient reached.
//!
//! Failures:
//! * the message is not in Postgres (yet): the gateway only publishes receipts for persisted
//!   messages, but be safe: negatively acknowledged with a growing delay, and moved to the DLQ
//!   (`dlq.receipts`) once delivered `poison_max_deliver` times; the same for a receipt from
//!   someone who is not a recipient, or one that cannot be decoded (straight to the DLQ);
//! * Postgres unavailable: the receipt stays in hand and is retried with backoff while
//!   JetStream is told it is still being worked on.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use hotpath_core::db::is_transient;
use hotpath_core::events::{Event, MessageState};
use hotpath_core::receipts::{Receipt, ReceiptState};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, Span};
use uuid::Uuid;

use crate::backoff::{self, Backoff};
use crate::dlq::DeadLetterQueue;
use crate::fetch;
use crate::frames::FramePublisher;
use crate::store::{messages, receipts};

/// Receipts fetched at once.
const BATCH: usize = 256;

pub struct ReceiptsWorker {
    pub(crate) consumer: PullConsumer,
    pub(crate) pool: PgPool,
    /// `dlq.receipts`: what can never be recorded.
    pub(crate) dlq: DeadLetterQueue,
    /// Tells senders of the states their messages reached.
    pub(crate) frames: FramePublisher,
    /// Deliveries after which a receipt that cannot be recorded goes to the DLQ.
    pub(crate) max_deliver: u64,
    /// Longest pause between retries while Postgres is away (well under the ack wait).
    pub(crate) max_retry_delay: Duration,
}

/// What recording a receipt did.
#[derive(Debug, PartialEq)]
pub enum Recorded {
    /// Committed; the message-level states this receipt reached first, in order.
    Changed {
        sender_id: String,
        conversation_id: Uuid,
        seq: i64,
        first: Vec<MessageState>,
    },
    /// No such message in Postgres (not persisted yet, or never).
    MessageMissing,
    /// The user is not among the message's recipients.
    NotRecipient,
}

/// Records one receipt idempotently, in one transaction.
pub async fn record(pool: &PgPool, receipt: &Receipt) -> Result<Recorded, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let target = messages::lock_for_receipt(&mut tx, receipt.message_id, &receipt.user_id).await?;
    let Some(target) = target else {
        return Ok(Recorded::MessageMissing);
    };
    if !target.is_recipient {
        return Ok(Recorded::NotRecipient);
    }
    let (any_delivered, any_read) = receipts::reached(&mut tx, receipt.message_id).await?;
    let read = receipt.state == ReceiptState::Read;
    receipts::upsert(
        &mut tx,
        receipt.message_id,
        &receipt.user_id,
        receipt.at,
        read,
    )
    .await?;
    tx.commit().await?;

    let mut first = Vec::new();
    if !any_delivered {
        first.push(MessageState::Delivered);
    }
    if read && !any_read {
        first.push(MessageState::Read);
    }
    Ok(Recorded::Changed {
        sender_id: target.sender_id,
        conversation_id: target.conversation_id,
        seq: target.seq,
        first,
    })
}

impl ReceiptsWorker {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(backoff::INITIAL, backoff::SETUP_MAX);
        while !shutdown.is_cancelled() {
            let fetched = tokio::select! {
                fetched = fetch::next_batch(&self.consumer, BATCH) => fetched,
                () = shutdown.cancelled() => break,
            };
            for message in fetched.messages {
                if shutdown.is_cancelled() {
                    break;
                }
                let span = crate::trace::receipt_span(message.headers.as_ref());
                self.process(message, &span, &shutdown)
                    .instrument(span.clone())
                    .await;
            }
            match fetched.error {
                None => backoff.reset(),
                Some(error) => {
                    tracing::warn!(%error, "receipts fetch failed; retrying");
                    if !backoff.pause(&shutdown).await {
                        break;
                    }
                }
            }
        }
        tracing::info!("receipts worker stopped");
    }

    /// Records one receipt, in its `receipt` span (`span`, also the one the sender's frames
    /// continue).
    async fn process(&self, message: Message, span: &Span, shutdown: &CancellationToken) {
        let (stream_seq, deliveries) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(error) => {
                tracing::warn!(%error, "receipt without JetStream metadata; skipping");
                return;
            }
        };
        let receipt = match Receipt::decode(&message.payload) {
            Ok(receipt) => {
                span.record("message_id", tracing::field::display(receipt.message_id));
                span.record("state", receipt.state.as_str());
                receipt
            }
            Err(error) => {
                self.dlq
                    .move_message(&message, stream_seq, deliveries, &error.to_string())
                    .await;
                return;
            }
        };
        let mut backoff = Backoff::new(backoff::INITIAL, self.max_retry_delay);
        let recorded = loop {
            match record(&self.pool, &receipt).await {
                Ok(recorded) => break recorded,
                Err(error) if is_transient(&error) => {
                    tracing::warn!(%error, "Postgres unavailable; holding the receipt");
                    let _ = message.ack_with(AckKind::Progress).await;
                    if !backoff.pause(shutdown).await {
                        let _ = message
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                        return;
                    }
                }
                Err(error) => {
                    self.refuse(&message, stream_seq, deliveries, &error.to_string())
                        .await;
                    return;
                }
            }
        };
        match recorded {
            Recorded::Changed {
                sender_id,
                conversation_id,
                seq,
                first,
            } => {
                if let Err(error) = message.ack().await {
                    // Redelivered and recorded again: harmless, and the sender is not told twice.
                    tracing::warn!(%error, "receipt ack failed");
                }
                for state in first {
                    let event = Event::StateChanged {
                        message_id: receipt.message_id,
                        conversation_id,
                        state,
                        seq: Some(seq),
                        reason: None,
                    };
                    self.frames
                        .publish(&sender_id, Bytes::from(event.to_json()), span)
                        .await;
                }
            }
            Recorded::MessageMissing => {
                self.refuse(&message, stream_seq, deliveries, "message is not persisted")
                    .await
            }
            Recorded::NotRecipient => {
                let reason = "user is not a recipient of the message";
                self.dlq
                    .move_message(&message, stream_seq, deliveries, reason)
                    .await;
            }
        }
    }

    /// A receipt that cannot be recorded now: retried later with a growing delay until it has
    /// been delivered `max_deliver` times, then moved to the DLQ.
    async fn refuse(&self, message: &Message, stream_seq: u64, deliveries: i64, reason: &str) {
        if deliveries as u64 >= self.max_deliver {
            self.dlq
                .move_message(message, stream_seq, deliveries, reason)
                .await;
        } else {
            tracing::debug!(
                stream_seq,
                deliveries,
                reason,
                "receipt not recorded; will retry"
            );
            let delay = Duration::from_secs(deliveries.clamp(1, 30) as u64);
            let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
        }
    }
}
