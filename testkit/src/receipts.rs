//! Receipts seen from outside the receipts consumer: published straight to `RECEIPTS` the way
//! the gateway publishes them (for what the gateway itself would refuse to take: a receipt for
//! a message not persisted yet, or from a stranger), the rows the consumer writes, whether it
//! has worked through the stream, and what it moved to the DLQ.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use hotpath_core::domain::{DlqSource, ReceiptState};
use hotpath_core::names;
use hotpath_core::receipts::Receipt;
use sqlx::PgPool;
use sqlx::types::chrono::{DateTime, Utc};
use uuid::Uuid;

/// When a receipt state was recorded; `None` until it is.
pub type Stamp = Option<DateTime<Utc>>;

/// `user_id`'s receipt for a message, taken now. The time is cut to microseconds, what
/// Postgres keeps, so a recorded timestamp can be compared with it exactly.
pub fn receipt(
    message_id: Uuid,
    conversation_id: Uuid,
    user_id: &str,
    state: ReceiptState,
) -> Receipt {
    Receipt {
        message_id,
        conversation_id,
        user_id: user_id.to_string(),
        state,
        // Microseconds since 1970 are always a valid time.
        at: DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).expect("a valid time"),
    }
}

/// Publishes `receipt` as the gateway does (`receipts.<p>` of the conversation's partition,
/// `Nats-Msg-Id` per message, user and state) and waits until JetStream stored it.
pub async fn publish(js: &jetstream::Context, partitions: u32, receipt: &Receipt) {
    publish_with_id(js, partitions, receipt, receipt.msg_id()).await;
}

/// Publishes `receipt` again under a `Nats-Msg-Id` of its own: what reaches the consumer when
/// a client repeats an ack after the stream's duplicate window has passed.
pub async fn publish_repeat(js: &jetstream::Context, partitions: u32, receipt: &Receipt) {
    let msg_id = format!("{}:repeat:{}", receipt.msg_id(), Uuid::new_v4());
    publish_with_id(js, partitions, receipt, msg_id).await;
}

async fn publish_with_id(
    js: &jetstream::Context,
    partitions: u32,
    receipt: &Receipt,
    msg_id: String,
) {
    let partition = names::partition_of(&receipt.conversation_id.to_string(), partitions);
    let stored = js
        .send_publish(
            names::receipt_subject(partition),
            PublishMessage::build()
                .payload(receipt.encode().into())
                .message_id(msg_id),
        )
        .await
        .expect("receipt published")
        .await
        .expect("receipt stored");
    assert!(!stored.duplicate, "JetStream took {receipt:?} for a repeat");
}

/// `user`'s recorded (delivered_at, read_at) for `message` (both `None` without a row), and
/// how many receipt rows the message has.
pub async fn row(pool: &PgPool, message: Uuid, user: &str) -> (Stamp, Stamp, i64) {
    let (delivered, read): (Stamp, Stamp) = sqlx::query_as(
        "SELECT delivered_at, read_at FROM message_receipts WHERE message_id = $1 AND user_id = $2",
    )
    .bind(message)
    .bind(user)
    .fetch_optional(pool)
    .await
    .expect("receipt row")
    .unwrap_or((None, None));
    let (rows,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM message_receipts WHERE message_id = $1")
            .bind(message)
            .fetch_one(pool)
            .await
            .expect("count");
    (delivered, read, rows)
}

/// Waits (at most `within`) until `user`'s receipt for `message` has reached `state`, and
/// returns (delivered_at, read_at). Retries while Postgres cannot answer (it may be coming
/// back, and the test's pool has to reconnect too).
pub async fn wait_for(
    pool: &PgPool,
    message: Uuid,
    user: &str,
    state: ReceiptState,
    within: Duration,
) -> (Stamp, Stamp) {
    let deadline = Instant::now() + within;
    let mut last = Ok((None, None));
    while Instant::now() < deadline {
        last = sqlx::query_as::<_, (Stamp, Stamp)>(
            "SELECT delivered_at, read_at FROM message_receipts
              WHERE message_id = $1 AND user_id = $2",
        )
        .bind(message)
        .bind(user)
        .fetch_optional(pool)
        .await
        .map(|row| row.unwrap_or((None, None)));
        if let Ok((delivered, read)) = last {
            let reached = match state {
                ReceiptState::Delivered => delivered.is_some(),
                ReceiptState::Read => read.is_some(),
            };
            if reached {
                return (delivered, read);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{user}'s receipt for {message} did not reach {} within {within:?}; last read: {last:?}",
        state.as_str()
    );
}

/// Waits (bounded) until the receipts consumer has handed out every receipt in the stream and
/// holds none: each one was recorded, or moved to the DLQ.
pub async fn wait_until_settled(js: &jetstream::Context) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        let info = js
            .get_stream(names::RECEIPTS_STREAM)
            .await
            .expect("RECEIPTS stream")
            .consumer_info(names::RECEIPTS_CONSUMER)
            .await
            .expect("receipts consumer info");
        let counts = (info.num_pending, info.num_ack_pending);
        if counts == (0, 0) {
            return;
        }
        last = Some(counts);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the receipts consumer still has work: (pending, in hand) = {last:?}");
}

/// The DLQ entries from `source` (every source with `None`), oldest first.
pub async fn dead_letters(
    js: &jetstream::Context,
    source: Option<DlqSource>,
) -> Vec<hotpath::dlq::Entry> {
    hotpath::dlq::list(js, source, 1000)
        .await
        .expect("DLQ readable")
}
