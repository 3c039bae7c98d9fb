//! The receipts consumer: turns the `RECEIPTS` stream into rows of `message_receipts` and tells
//! the sender when its message is first delivered and first read.
//!
//! **One durable pull consumer, `receipts`, over every partition (`receipts.*`)**, shared by
//! all consumer replicas (each process runs one worker on it; JetStream hands each receipt to
//! one of them). Receipts need no partition ownership: recording one is an upsert that never
//! moves backwards (each timestamp is set once, `read` also sets `delivered_at`, and nothing
//! is ever cleared), so order and repeats do not matter.
//!
//! Per receipt, in one transaction: lock the message row (`FOR NO KEY UPDATE`, so receipts of
//! one message are recorded one at a time and "the first" is well defined), read whether any
//! recipient had already reached `delivered` / `read`, upsert the recipient's row, commit. Then
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
use async_nats::jetstream::{self, AckKind, Message};
use bytes::Bytes;
use futures::StreamExt;
use hotpath_core::db::is_transient;
use hotpath_core::events::{Event, MessageState};
use hotpath_core::names::{RECEIPTS_STREAM, deliver_subject};
use hotpath_core::receipts::{Receipt, ReceiptState};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::dlq::{self, DeadLetter};
use crate::metrics::DeliveryMetrics;

/// Receipts fetched at once.
const BATCH: usize = 256;
/// Longest wait to hand one publish to the NATS client.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

pub struct ReceiptsWorker {
    pub consumer: PullConsumer,
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub nats: async_nats::Client,
    pub metrics: DeliveryMetrics,
    /// Deliveries after which a receipt that cannot be recorded goes to the DLQ.
    pub max_deliver: u64,
    /// Longest pause between retries while Postgres is away (well under the ack wait).
    pub max_retry_delay: Duration,
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
    let message: Option<(String, Uuid, i64, bool)> = sqlx::query_as(
        "SELECT sender_id, conversation_id, seq, $2 = ANY(recipient_ids)
           FROM messages WHERE id = $1 FOR NO KEY UPDATE",
    )
    .bind(receipt.message_id)
    .bind(&receipt.user_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((sender_id, conversation_id, seq, is_recipient)) = message else {
        return Ok(Recorded::MessageMissing);
    };
    if !is_recipient {
        return Ok(Recorded::NotRecipient);
    }
    let (any_delivered, any_read): (bool, bool) = sqlx::query_as(
        "SELECT coalesce(bool_or(delivered_at IS NOT NULL), false),
                coalesce(bool_or(read_at IS NOT NULL), false)
           FROM message_receipts WHERE message_id = $1",
    )
    .bind(receipt.message_id)
    .fetch_one(&mut *tx)
    .await?;
    let read = receipt.state == ReceiptState::Read;
    sqlx::query(
        "INSERT INTO message_receipts (message_id, user_id, delivered_at, read_at)
         VALUES ($1, $2, $3, CASE WHEN $4 THEN $3::timestamptz END)
         ON CONFLICT (message_id, user_id) DO UPDATE
            SET delivered_at = coalesce(message_receipts.delivered_at, EXCLUDED.delivered_at),
                read_at = coalesce(message_receipts.read_at, EXCLUDED.read_at)",
    )
    .bind(receipt.message_id)
    .bind(&receipt.user_id)
    .bind(receipt.at)
    .bind(read)
    .execute(&mut *tx)
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
        sender_id,
        conversation_id,
        seq,
        first,
    })
}

/// Sleeps for `delay` (doubling it, up to `max`) unless shutdown comes first; false on shutdown.
async fn pause(delay: &mut Duration, max: Duration, shutdown: &CancellationToken) -> bool {
    let sleep = *delay;
    *delay = (*delay * 2).min(max);
    tokio::select! {
        () = tokio::time::sleep(sleep) => true,
        () = shutdown.cancelled() => false,
    }
}

impl ReceiptsWorker {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let batch = async {
                self.consumer
                    .batch()
                    .max_messages(BATCH)
                    .expires(Duration::from_secs(5))
                    .messages()
                    .await
            };
            let mut messages = tokio::select! {
                batch = batch => match batch {
                    Ok(messages) => messages,
                    Err(error) => {
                        tracing::warn!(%error, "receipts fetch failed; retrying");
                        if !pause(&mut delay, Duration::from_secs(5), &shutdown).await {
                            break;
                        }
                        continue;
                    }
                },
                () = shutdown.cancelled() => break,
            };
            delay = Duration::from_millis(100);
            loop {
                let next = tokio::select! {
                    next = tokio::time::timeout(Duration::from_secs(10), messages.next()) => next,
                    () = shutdown.cancelled() => break,
                };
                match next {
                    Ok(Some(Ok(message))) => self.process(message, &shutdown).await,
                    Ok(Some(Err(error))) => {
                        tracing::warn!(%error, "receipts fetch failed part-way");
                        break;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        tracing::warn!("receipts fetch did not complete within 10 s");
                        break;
                    }
                }
            }
        }
        tracing::info!("receipts worker stopped");
    }

    async fn process(&self, message: Message, shutdown: &CancellationToken) {
        let (stream_seq, deliveries) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(error) => {
                tracing::warn!(%error, "receipt without JetStream metadata; skipping");
                return;
            }
        };
        let receipt = match Receipt::decode(&message.payload) {
            Ok(receipt) => receipt,
            Err(error) => {
                self.dead_letter(&message, stream_seq, deliveries, &error.to_string())
                    .await;
                return;
            }
        };
        let mut delay = Duration::from_millis(100);
        let recorded = loop {
            match record(&self.pool, &receipt).await {
                Ok(recorded) => break recorded,
                Err(error) if is_transient(&error) => {
                    tracing::warn!(%error, "Postgres unavailable; holding the receipt");
                    let _ = message.ack_with(AckKind::Progress).await;
                    if !pause(&mut delay, self.max_retry_delay, shutdown).await {
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
                    self.publish(&sender_id, Bytes::from(event.to_json())).await;
                }
            }
            Recorded::MessageMissing => {
                self.refuse(&message, stream_seq, deliveries, "message is not persisted")
                    .await
            }
            Recorded::NotRecipient => {
                self.dead_letter(
                    &message,
                    stream_seq,
                    deliveries,
                    "user is not a recipient of the message",
                )
                .await
            }
        }
    }

    /// A receipt that cannot be recorded now: retried later with a growing delay until it has
    /// been delivered `max_deliver` times, then moved to the DLQ.
    async fn refuse(&self, message: &Message, stream_seq: u64, deliveries: i64, reason: &str) {
        if deliveries as u64 >= self.max_deliver {
            self.dead_letter(message, stream_seq, deliveries, reason)
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

    async fn dead_letter(&self, message: &Message, stream_seq: u64, deliveries: i64, reason: &str) {
        let letter = DeadLetter::of(
            message,
            RECEIPTS_STREAM,
            "receipts",
            stream_seq,
            deliveries,
            reason,
        );
        dlq::move_message(&self.js, &self.metrics, message, letter).await;
    }

    async fn publish(&self, user_id: &str, frame: Bytes) {
        let subject = deliver_subject(user_id);
        match tokio::time::timeout(PUBLISH_TIMEOUT, self.nats.publish(subject, frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(user_id, %error, "receipt state publish failed");
                self.metrics.fanout_failed("publish_error", 1);
            }
            Err(_) => {
                tracing::warn!(user_id, "receipt state publish timed out");
                self.metrics.fanout_failed("publish_timeout", 1);
            }
        }
    }
}
