//! Writing a batch of envelopes to Postgres: one transaction, one insert statement.
//!
//! The transaction first locks the batch's conversations (`SELECT … FOR UPDATE`), which also
//! tells which of them exist. Then a single statement drops the keys that are already stored
//! (a redelivered batch), numbers the new rows per conversation by stream sequence on top of
//! `last_seq`, inserts them from `UNNEST` arrays with `ON CONFLICT (idempotency_key) DO
//! NOTHING`, and bumps `last_seq`. A key that is already stored never consumes a seq, so seq is
//! gap-free and follows the stream's (acceptance) order.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use hotpath_core::envelope::Envelope;
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
    RETURNING idempotency_key, conversation_id, seq
),
bumped AS (
    UPDATE conversations c
       SET last_seq = b.max_seq
      FROM (SELECT conversation_id, max(seq) AS max_seq FROM inserted GROUP BY conversation_id) b
     WHERE c.id = b.conversation_id
)
SELECT idempotency_key, seq FROM inserted
"#;

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
    let stored: Vec<(String, i64)> = sqlx::query_as(INSERT_BATCH)
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
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;

    let seq_by_key: HashMap<String, i64> = stored.into_iter().collect();
    let mut first_of_key: HashSet<&str> = HashSet::new();
    for index in storable {
        let key = rows[index].envelope.idempotency_key.as_str();
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
