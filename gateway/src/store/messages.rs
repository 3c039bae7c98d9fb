//! The `messages` table: the persisted messages, as the consumers stored them.
//!
//! The gateway never writes here (the persist consumer does); it reads a message back for its
//! status, a conversation's history for pages and `sync`, the recipients for a receipt check,
//! and a message by idempotency key when a send turns out to be a duplicate.

use chrono::{DateTime, Utc};
use hotpath_core::domain::{ContentType, Priority};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// A persisted message as its status sees it.
#[derive(Debug, sqlx::FromRow)]
pub struct StoredMessage {
    pub conversation_id: Uuid,
    pub sender_id: String,
    pub seq: i64,
    pub accepted_at: DateTime<Utc>,
    pub persisted_at: DateTime<Utc>,
}

/// The message `id`, if it was persisted.
pub async fn find(pool: &PgPool, id: Uuid) -> Result<Option<StoredMessage>, sqlx::Error> {
    sqlx::query_as(
        "SELECT conversation_id, sender_id, seq, accepted_at, persisted_at FROM messages WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// A message of a conversation's history, as pages and `sync` serve it.
#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct HistoryMessage {
    pub message_id: Uuid,
    pub seq: i64,
    pub sender_id: String,
    pub content: String,
    pub content_type: ContentType,
    pub metadata: sqlx::types::Json<Value>,
    pub priority: Priority,
    pub correlation_id: Uuid,
    pub accepted_at: DateTime<Utc>,
    pub persisted_at: DateTime<Utc>,
}

/// Up to `limit` messages of the conversation after `after_seq`, in seq order.
pub async fn history(
    pool: &PgPool,
    conversation_id: Uuid,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<HistoryMessage>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id AS message_id, seq, sender_id, content, content_type, metadata, priority,
                correlation_id, accepted_at, persisted_at
           FROM messages
          WHERE conversation_id = $1 AND seq > $2
          ORDER BY seq
          LIMIT $3",
    )
    .bind(conversation_id)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The conversation of message `id`, if it was persisted and `user_id` is one of its
/// recipients.
pub async fn conversation_of_recipient(
    pool: &PgPool,
    id: Uuid,
    user_id: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    let row: Option<(Uuid,)> = sqlx::query_as(
        "SELECT conversation_id FROM messages WHERE id = $1 AND $2 = ANY(recipient_ids)",
    )
    .bind(id)
    .bind(user_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(conversation_id,)| conversation_id))
}

/// A persisted message found by its idempotency key, with the digest of its request (`None`
/// for rows stored before digests existed).
#[derive(Debug, sqlx::FromRow)]
pub struct KeyedMessage {
    pub id: Uuid,
    pub request_digest: Option<String>,
}

/// The message stored under `idempotency_key`, if any.
pub async fn by_idempotency_key(
    pool: &PgPool,
    idempotency_key: &str,
) -> Result<Option<KeyedMessage>, sqlx::Error> {
    sqlx::query_as("SELECT id, request_digest FROM messages WHERE idempotency_key = $1")
        .bind(idempotency_key)
        .fetch_optional(pool)
        .await
}
