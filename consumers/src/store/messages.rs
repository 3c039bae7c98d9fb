//! The `messages` table: storing a batch (the statement at the heart of delivery, whose
//! reasoning [`crate::persist`] tells), and the reads of stored messages that receipts and
//! pushes need.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::push::payload::StoredMessage;

/// The batch statement: keeps the new keys, names the message each key of the batch means,
/// sets aside (and records in `message_rejections`) the rows that reuse a key for a different
/// request, numbers the new rows per conversation on top of `last_seq`, inserts them and bumps
/// `last_seq`, all at once. One statement across the three tables, because its answer must
/// be one consistent view; [`crate::persist`] explains why it is exactly once and in order.
const INSERT_BATCH: &str = r#"
WITH input AS (
    SELECT * FROM UNNEST(
        $1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
        $8::text[], $9::text[], $10::uuid[], $11::int[], $12::int8[], $13::timestamptz[],
        $14::text[]
    ) AS t(id, conversation_id, sender_id, content, content_type, recipients, metadata,
           priority, idempotency_key, correlation_id, stream_partition, stream_seq, accepted_at,
           request_digest)
),
fresh AS (
    SELECT DISTINCT ON (i.idempotency_key) i.*
      FROM input i
     WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.idempotency_key = i.idempotency_key)
     ORDER BY i.idempotency_key, i.stream_seq
),
-- The message each key of the batch names: the stored one, or the first of a new key's rows.
named AS (
    SELECT m.idempotency_key, m.id, m.request_digest
      FROM messages m
     WHERE m.idempotency_key IN (SELECT idempotency_key FROM input)
    UNION ALL
    SELECT f.idempotency_key, f.id, f.request_digest FROM fresh f
),
-- Rows that reuse a key for a different request (a NULL digest on either side never differs).
conflicts AS (
    SELECT i.*, n.id AS original_id
      FROM input i
      JOIN named n ON n.idempotency_key = i.idempotency_key
     WHERE i.request_digest <> n.request_digest
),
rejected AS (
    INSERT INTO message_rejections (message_id, conversation_id, sender_id, correlation_id,
                                    idempotency_key, reason, original_message_id, accepted_at)
    SELECT id, conversation_id, sender_id, correlation_id, idempotency_key, $15::text,
           original_id, accepted_at
      FROM conflicts
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id
),
numbered AS (
    SELECT f.*,
           c.last_seq + row_number() OVER (PARTITION BY f.conversation_id ORDER BY f.stream_seq) AS seq
      FROM fresh f
      JOIN conversations c ON c.id = f.conversation_id
),
inserted AS (
    INSERT INTO messages (id, conversation_id, seq, sender_id, content, content_type,
                          recipient_ids, metadata, priority, idempotency_key, correlation_id,
                          stream_partition, stream_seq, accepted_at, request_digest)
    SELECT id, conversation_id, seq, sender_id, content, content_type,
           ARRAY(SELECT jsonb_array_elements_text(recipients::jsonb)), metadata::jsonb,
           priority, idempotency_key, correlation_id, stream_partition, stream_seq, accepted_at,
           request_digest
      FROM numbered
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id, idempotency_key, conversation_id, seq
),
bumped AS (
    UPDATE conversations c
       SET last_seq = b.max_seq
      FROM (SELECT conversation_id, max(seq) AS max_seq FROM inserted GROUP BY conversation_id) b
     WHERE c.id = b.conversation_id
)
SELECT idempotency_key, id AS message_id, seq, NULL::uuid AS original_id, false AS recorded
  FROM inserted
UNION ALL
SELECT DISTINCT c.idempotency_key, c.id, NULL::int8, c.original_id,
       c.id IN (SELECT message_id FROM rejected)
  FROM conflicts c
"#;

/// The batch as column arrays for `UNNEST`.
pub(crate) struct Columns {
    pub ids: Vec<Uuid>,
    pub conversation_ids: Vec<Uuid>,
    pub sender_ids: Vec<String>,
    pub contents: Vec<String>,
    pub content_types: Vec<String>,
    pub recipients: Vec<String>,
    pub metadata: Vec<String>,
    pub priorities: Vec<String>,
    pub keys: Vec<String>,
    pub correlation_ids: Vec<Uuid>,
    pub partitions: Vec<i32>,
    pub stream_seqs: Vec<i64>,
    pub accepted_at: Vec<DateTime<Utc>>,
    pub request_digests: Vec<Option<String>>,
}

impl Columns {
    /// `query` with the columns bound as `$1` to `$14`, in the order both batch statements
    /// declare them in their `UNNEST`.
    fn bound_to<'q, O>(&'q self, query: PgQueryAs<'q, O>) -> PgQueryAs<'q, O> {
        query
            .bind(&self.ids)
            .bind(&self.conversation_ids)
            .bind(&self.sender_ids)
            .bind(&self.contents)
            .bind(&self.content_types)
            .bind(&self.recipients)
            .bind(&self.metadata)
            .bind(&self.priorities)
            .bind(&self.keys)
            .bind(&self.correlation_ids)
            .bind(&self.partitions)
            .bind(&self.stream_seqs)
            .bind(&self.accepted_at)
            .bind(&self.request_digests)
    }
}

/// A query of the batch statements, before its columns are bound.
type PgQueryAs<'q, O> = sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>;

/// A row of the statement's answer: a stored message with its seq, or a conflict with the
/// message its key names and whether its rejection was recorded now.
#[derive(sqlx::FromRow)]
pub(crate) struct Answer {
    pub idempotency_key: String,
    pub message_id: Uuid,
    pub seq: Option<i64>,
    pub original_id: Option<Uuid>,
    pub recorded: bool,
}

/// Runs the batch statement over `columns` in `tx` (whose conversations are locked);
/// `conflict_reason` is the reason recorded for a reused key.
pub(crate) async fn insert_batch(
    tx: &mut PgConnection,
    columns: &Columns,
    conflict_reason: &str,
) -> Result<Vec<Answer>, sqlx::Error> {
    columns
        .bound_to(sqlx::query_as(INSERT_BATCH))
        .bind(conflict_reason)
        .fetch_all(tx)
        .await
}

/// The restore statement: inserts rows exactly as they were first stored, seq included,
/// skipping any whose key (or seq, or id) is already taken, and raises `last_seq` to cover
/// what it inserted (never lowers it). [`crate::restore`] tells why this keeps seq unchanged.
const RESTORE_BATCH: &str = r#"
WITH input AS (
    SELECT * FROM UNNEST(
        $1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
        $8::text[], $9::text[], $10::uuid[], $11::int[], $12::int8[], $13::timestamptz[],
        $14::text[], $15::int8[]
    ) AS t(id, conversation_id, sender_id, content, content_type, recipients, metadata,
           priority, idempotency_key, correlation_id, stream_partition, stream_seq, accepted_at,
           request_digest, seq)
),
inserted AS (
    INSERT INTO messages (id, conversation_id, seq, sender_id, content, content_type,
                          recipient_ids, metadata, priority, idempotency_key, correlation_id,
                          stream_partition, stream_seq, accepted_at, request_digest)
    SELECT id, conversation_id, seq, sender_id, content, content_type,
           ARRAY(SELECT jsonb_array_elements_text(recipients::jsonb)), metadata::jsonb,
           priority, idempotency_key, correlation_id, stream_partition, stream_seq, accepted_at,
           request_digest
      FROM input
     ORDER BY stream_seq
    ON CONFLICT DO NOTHING
    RETURNING idempotency_key, conversation_id, seq
),
bumped AS (
    UPDATE conversations c
       SET last_seq = GREATEST(c.last_seq, b.max_seq)
      FROM (SELECT conversation_id, max(seq) AS max_seq FROM inserted GROUP BY conversation_id) b
     WHERE c.id = b.conversation_id
)
SELECT idempotency_key FROM inserted
"#;

/// Runs the restore statement over `columns` with each row's own `seqs`, in `tx` (whose
/// conversations are locked and exist); returns the keys it inserted.
pub(crate) async fn restore_batch(
    tx: &mut PgConnection,
    columns: &Columns,
    seqs: &[i64],
) -> Result<HashSet<String>, sqlx::Error> {
    let inserted: Vec<(String,)> = columns
        .bound_to(sqlx::query_as(RESTORE_BATCH))
        .bind(seqs)
        .fetch_all(tx)
        .await?;
    Ok(inserted.into_iter().map(|(key,)| key).collect())
}

/// Where each of the stored messages among `keys` sits: idempotency key → (seq, stream_seq).
pub(crate) async fn positions(
    conn: &mut PgConnection,
    keys: &[String],
) -> Result<HashMap<String, (i64, i64)>, sqlx::Error> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT idempotency_key, seq, stream_seq FROM messages WHERE idempotency_key = ANY($1)",
    )
    .bind(keys)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(key, seq, stream_seq)| (key, (seq, stream_seq)))
        .collect())
}

/// The stored message a receipt is about, locked against other receipts of it.
pub(crate) struct ReceiptTarget {
    pub sender_id: String,
    pub conversation_id: Uuid,
    pub seq: i64,
    /// Whether the receipt's user is among the message's recipients.
    pub is_recipient: bool,
}

/// Locks message `id` in `tx` (`FOR NO KEY UPDATE`: receipts of one message are recorded one
/// at a time, and inserts into other tables that reference it are not held up); `None` if it
/// is not stored.
pub(crate) async fn lock_for_receipt(
    tx: &mut PgConnection,
    id: Uuid,
    user_id: &str,
) -> Result<Option<ReceiptTarget>, sqlx::Error> {
    let row: Option<(String, Uuid, i64, bool)> = sqlx::query_as(
        "SELECT sender_id, conversation_id, seq, $2 = ANY(recipient_ids)
           FROM messages WHERE id = $1 FOR NO KEY UPDATE",
    )
    .bind(id)
    .bind(user_id)
    .fetch_optional(tx)
    .await?;
    Ok(row.map(
        |(sender_id, conversation_id, seq, is_recipient)| ReceiptTarget {
            sender_id,
            conversation_id,
            seq,
            is_recipient,
        },
    ))
}

/// Message `id` with what a push of it needs (its conversation's preview setting); `None` if
/// it is not stored.
pub(crate) async fn for_push(
    pool: &PgPool,
    id: Uuid,
) -> Result<Option<StoredMessage>, sqlx::Error> {
    sqlx::query_as(
        "SELECT m.id AS message_id, m.conversation_id, m.seq, m.sender_id, m.content,
                m.content_type, m.priority, c.push_preview
           FROM messages m JOIN conversations c ON c.id = m.conversation_id
          WHERE m.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Of the conversation's latest 100 messages, those addressed to `user_id` that they have not
/// read. Bounded, so a long history costs nothing.
pub(crate) async fn unread_recent(
    pool: &PgPool,
    conversation_id: Uuid,
    user_id: &str,
) -> Result<i64, sqlx::Error> {
    let (unread,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM (
             SELECT id, recipient_ids FROM messages
              WHERE conversation_id = $1 ORDER BY seq DESC LIMIT 100) recent
          WHERE $2 = ANY(recent.recipient_ids)
            AND NOT EXISTS (SELECT 1 FROM message_receipts r
                             WHERE r.message_id = recent.id AND r.user_id = $2
                               AND r.read_at IS NOT NULL)",
    )
    .bind(conversation_id)
    .bind(user_id)
    .fetch_one(pool)
    .await?;
    Ok(unread)
}
