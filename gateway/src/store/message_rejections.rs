//! The `message_rejections` table: messages the consumers refused for good after the gateway
//! had accepted them (today only a reused idempotency key, the table's CHECK).

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// A message refused after it was accepted.
#[derive(Debug, sqlx::FromRow)]
pub struct RejectedMessage {
    pub conversation_id: Uuid,
    pub sender_id: String,
    /// The message the reused key already named.
    pub original_message_id: Uuid,
    pub accepted_at: DateTime<Utc>,
    /// When the consumers refused it.
    pub created_at: DateTime<Utc>,
}

/// The refusal of message `message_id`, if it was refused.
pub async fn find(pool: &PgPool, message_id: Uuid) -> Result<Option<RejectedMessage>, sqlx::Error> {
    sqlx::query_as(
        "SELECT conversation_id, sender_id, original_message_id, accepted_at, created_at
           FROM message_rejections WHERE message_id = $1",
    )
    .bind(message_id)
    .fetch_optional(pool)
    .await
}
