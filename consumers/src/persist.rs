//! Writing a batch of envelopes to Postgres: one transaction, one insert statement.
//!
//! The transaction first locks the batch's conversations (`SELECT … FOR UPDATE`), which also
//! tells which of them exist. Then a single statement drops the keys that are already stored
//! (a redelivered batch), numbers the new rows per conversation by stream sequence on top of
//! `last_seq`, inserts them from `UNNEST` arrays with `ON CONFLICT (idempotency_key) DO
//! NOTHING`, and bumps `last_seq`. A key that is already stored never consumes a seq, so seq is
//! gap-free and follows the stream's (acceptance) order.
//!
//! A key already stored is usually a redelivery or a replay, but past the stream's duplicate
//! window it may also be a client reusing the key for a different request, which the gateway
//! could no longer refuse and answered 202 (ADR 0005). The same statement tells the two apart
//! by request digest: a row whose key names a message (stored, or first in this batch) with a
//! different digest is a conflict. It is not stored and takes no seq; its rejection is
//! recorded in `message_rejections`, in this transaction and keyed by its own message id, so a
//! redelivered conflict is recognised as already rejected and its sender is told once.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use hotpath_core::envelope::Envelope;
use hotpath_core::rejection::Rejection;
use sqlx::PgPool;
use uuid::Uuid;

/// One envelope with where it sat in the stream.
#[derive(Debug, Clone)]
pub struct Row<'a> {
    pub envelope: &'a Envelope,
    pub partition: u32,
    pub stream_seq: u64,
}

/// What happened to each row of a batch, by index into the batch.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Newly stored rows and the seq each was given.
    pub inserted: HashMap<usize, i64>,
    /// Rows whose key was already stored: a replay or redelivery.
    pub duplicates: Vec<usize>,
    /// Rows whose conversation does not exist: they can never be stored.
    pub orphans: Vec<usize>,
    /// Rows that reuse a stored key for a different request: never stored.
    pub conflicts: Vec<Conflict>,
}

/// A row refused because its key already names a different message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    pub index: usize,
    /// The message the key names.
    pub original_message_id: Uuid,
    /// True when this transaction recorded the rejection; false when an earlier delivery of
    /// the same message already had (its sender was told then).
    pub recorded_now: bool,
}

impl Conflict {
    /// What the sender is told, and the status route says.
    pub fn rejection(&self) -> Rejection {
        Rejection::IdempotencyKeyReused {
            original_message_id: self.original_message_id,
        }
    }
}

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

/// A row of the statement's answer: a stored message with its seq, or a conflict with the
/// message its key names and whether its rejection was recorded now.
#[derive(sqlx::FromRow)]
struct Answer {
    idempotency_key: String,
    message_id: Uuid,
    seq: Option<i64>,
    original_id: Option<Uuid>,
    recorded: bool,
}

/// Stores `rows` in one transaction. An `Err` leaves nothing behind.
pub async fn persist(pool: &PgPool, rows: &[Row<'_>]) -> Result<Outcome, sqlx::Error> {
    let mut outcome = Outcome::default();
    if rows.is_empty() {
        return Ok(outcome);
    }
    let mut tx = pool.begin().await?;

    let mut wanted: Vec<Uuid> = rows.iter().map(|r| r.envelope.conversation_id).collect();
    wanted.sort();
    wanted.dedup();
    // Locks in id order, so two transactions can never wait on each other in a cycle.
    let existing: Vec<(Uuid,)> =
        sqlx::query_as("SELECT id FROM conversations WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&wanted)
            .fetch_all(&mut *tx)
            .await?;
    let existing: HashSet<Uuid> = existing.into_iter().map(|(id,)| id).collect();

    let mut storable: Vec<usize> = Vec::with_capacity(rows.len());
    for (index, row) in rows.iter().enumerate() {
        if existing.contains(&row.envelope.conversation_id) {
            storable.push(index);
        } else {
            outcome.orphans.push(index);
        }
    }

    let columns = Columns::from_rows(rows, &storable);
    let reason = Rejection::IdempotencyKeyReused {
        original_message_id: Uuid::nil(),
    }
    .code();
    let answers: Vec<Answer> = sqlx::query_as(INSERT_BATCH)
        .bind(&columns.ids)
        .bind(&columns.conversation_ids)
        .bind(&columns.sender_ids)
        .bind(&columns.contents)
        .bind(&columns.content_types)
        .bind(&columns.recipients)
        .bind(&columns.metadata)
        .bind(&columns.priorities)
        .bind(&columns.keys)
        .bind(&columns.correlation_ids)
        .bind(&columns.partitions)
        .bind(&columns.stream_seqs)
        .bind(&columns.accepted_at)
        .bind(&columns.request_digests)
        .bind(reason)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;

    let mut seq_by_key: HashMap<String, i64> = HashMap::new();
    let mut conflict_by_id: HashMap<Uuid, (Uuid, bool)> = HashMap::new();
    for answer in answers {
        // Each answer has a seq (stored) or an original (a conflict), never both.
        match (answer.seq, answer.original_id) {
            (Some(seq), _) => {
                seq_by_key.insert(answer.idempotency_key, seq);
            }
            (None, Some(original)) => {
                conflict_by_id.insert(answer.message_id, (original, answer.recorded));
            }
            (None, None) => {}
        }
    }
    let mut first_of_key: HashSet<&str> = HashSet::new();
    let mut first_of_conflict: HashSet<Uuid> = HashSet::new();
    for index in storable {
        let envelope = rows[index].envelope;
        if let Some(&(original_message_id, recorded)) = conflict_by_id.get(&envelope.message_id) {
            // A conflict twice in one batch is recorded once; the second copy was not.
            let recorded_now = recorded && first_of_conflict.insert(envelope.message_id);
            outcome.conflicts.push(Conflict {
                index,
                original_message_id,
                recorded_now,
            });
            continue;
        }
        let key = envelope.idempotency_key.as_str();
        match seq_by_key.get(key) {
            // A key twice in one batch is stored once; the second copy is a duplicate.
            Some(seq) if first_of_key.insert(key) => {
                outcome.inserted.insert(index, *seq);
            }
            _ => outcome.duplicates.push(index),
        }
    }
    Ok(outcome)
}

/// The batch as column arrays for `UNNEST`.
struct Columns {
    ids: Vec<Uuid>,
    conversation_ids: Vec<Uuid>,
    sender_ids: Vec<String>,
    contents: Vec<String>,
    content_types: Vec<String>,
    recipients: Vec<String>,
    metadata: Vec<String>,
    priorities: Vec<String>,
    keys: Vec<String>,
    correlation_ids: Vec<Uuid>,
    partitions: Vec<i32>,
    stream_seqs: Vec<i64>,
    accepted_at: Vec<DateTime<Utc>>,
    request_digests: Vec<Option<String>>,
}

impl Columns {
    fn from_rows(rows: &[Row<'_>], indexes: &[usize]) -> Columns {
        let picked = || indexes.iter().map(|&i| &rows[i]);
        let envelopes = || picked().map(|r| r.envelope);
        Columns {
            ids: envelopes().map(|e| e.message_id).collect(),
            conversation_ids: envelopes().map(|e| e.conversation_id).collect(),
            sender_ids: envelopes().map(|e| e.sender_id.clone()).collect(),
            contents: envelopes().map(|e| e.content.clone()).collect(),
            content_types: envelopes().map(|e| e.content_type.clone()).collect(),
            recipients: envelopes()
                .map(|e| serde_json::Value::from(e.recipient_ids.clone()).to_string())
                .collect(),
            metadata: envelopes()
                .map(|e| serde_json::Value::Object(e.metadata.clone()).to_string())
                .collect(),
            priorities: envelopes().map(|e| e.priority.clone()).collect(),
            keys: envelopes().map(|e| e.idempotency_key.clone()).collect(),
            correlation_ids: envelopes().map(|e| e.correlation_id).collect(),
            partitions: picked().map(|r| r.partition as i32).collect(),
            stream_seqs: picked().map(|r| r.stream_seq as i64).collect(),
            accepted_at: envelopes().map(|e| e.accepted_at).collect(),
            request_digests: envelopes().map(|e| e.request_digest.clone()).collect(),
        }
    }
}
