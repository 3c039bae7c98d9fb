//! The `message_receipts` table: when each recipient got (`delivered_at`) and showed
//! (`read_at`) a message. The receipts consumer writes it; the gateway reads it for the
//! sender's view of a message's status.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// A recipient of a message with the times its receipts were recorded (none yet: both `None`).
#[derive(Debug, sqlx::FromRow)]
pub struct RecipientReceipt {
    pub user_id: String,
    pub delivered_at: Option<DateTime<Utc>>,
    pub read_at: Option<DateTime<Utc>>,
}

/// Every recipient of message `message_id` with its receipts, in the message's recipient
/// order; empty when the message is not persisted.
pub async fn of_message(
    pool: &PgPool,
    message_id: Uuid,
) -> Result<Vec<RecipientReceipt>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.user_id, mr.delivered_at, mr.read_at
           FROM messages m
          CROSS JOIN LATERAL unnest(m.recipient_ids) WITH ORDINALITY AS r(user_id, n)
           LEFT JOIN message_receipts mr ON mr.message_id = m.id AND mr.user_id = r.user_id
          WHERE m.id = $1
          ORDER BY r.n",
    )
    .bind(message_id)
    .fetch_all(pool)
    .await
}
