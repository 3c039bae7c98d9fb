//! Writing a batch of envelopes to Postgres: one transaction, one insert statement.
//!
//! The transaction first locks the batch's conversations (`SELECT … FOR UPDATE`, in id order,
//! [`conversations::lock_existing`]), which also tells which of them exist. Then a single
//! statement ([`messages::insert_batch`]) drops the keys that are already stored
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
//!
//! The SQL lives with the tables it touches, in [`crate::store`]; this module owns the
//! transaction around it and reads the statement's answer back into an [`Outcome`] per row.

use std::collections::{HashMap, HashSet};

use hotpath_core::envelope::Envelope;
use hotpath_core::rejection::Rejection;
use hotpath_core::telemetry::meter;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use sqlx::PgPool;
use uuid::Uuid;

use crate::metrics::slow_histogram;
use crate::store::conversations;
use crate::store::messages::{self, Answer, Columns};

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
    // Locked in id order, so two transactions can never wait on each other in a cycle.
    let existing = conversations::lock_existing(&mut tx, &wanted).await?;

    let mut storable: Vec<usize> = Vec::with_capacity(rows.len());
    for (index, row) in rows.iter().enumerate() {
        if existing.contains(&row.envelope.conversation_id) {
            storable.push(index);
        } else {
            outcome.orphans.push(index);
        }
    }

    let reason = Rejection::IdempotencyKeyReused {
        original_message_id: Uuid::nil(),
    }
    .code();
    let answers = messages::insert_batch(&mut tx, &columns(rows, &storable), reason).await?;
    tx.commit().await?;

    sort_out(rows, &storable, answers, &mut outcome);
    Ok(outcome)
}

/// Where the stored messages among `keys` sit: idempotency key → (seq, stream_seq).
pub async fn positions(
    pool: &PgPool,
    keys: &[String],
) -> Result<HashMap<String, (i64, i64)>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    messages::positions(&mut conn, keys).await
}

/// Tells from the statement's `answers` which of the `storable` rows were stored now (with
/// their seq), were already stored, or are conflicts.
fn sort_out(rows: &[Row<'_>], storable: &[usize], answers: Vec<Answer>, outcome: &mut Outcome) {
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
    for &index in storable {
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
}

/// The rows at `indexes` as the statement's column arrays.
pub(crate) fn columns(rows: &[Row<'_>], indexes: &[usize]) -> Columns {
    let picked = || indexes.iter().map(|&i| &rows[i]);
    let envelopes = || picked().map(|r| r.envelope);
    Columns {
        ids: envelopes().map(|e| e.message_id).collect(),
        conversation_ids: envelopes().map(|e| e.conversation_id).collect(),
        sender_ids: envelopes().map(|e| e.sender_id.clone()).collect(),
        contents: envelopes().map(|e| e.content.clone()).collect(),
        content_types: envelopes().map(|e| e.content_type.to_string()).collect(),
        recipients: envelopes()
            .map(|e| serde_json::Value::from(e.recipient_ids.clone()).to_string())
            .collect(),
        metadata: envelopes()
            .map(|e| serde_json::Value::Object(e.metadata.clone()).to_string())
            .collect(),
        priorities: envelopes().map(|e| e.priority.to_string()).collect(),
        keys: envelopes().map(|e| e.idempotency_key.clone()).collect(),
        correlation_ids: envelopes().map(|e| e.correlation_id).collect(),
        partitions: picked().map(|r| r.partition as i32).collect(),
        stream_seqs: picked().map(|r| r.stream_seq as i64).collect(),
        accepted_at: envelopes().map(|e| e.accepted_at).collect(),
        request_digests: envelopes().map(|e| e.request_digest.clone()).collect(),
    }
}

/// What persisting does, as `delivery_persist_total{status, idempotent_hit}`,
/// `delivery_persist_duration_ms{status}` and `delivery_accept_to_persist_ms`.
#[derive(Clone)]
pub(crate) struct PersistMetrics {
    total: Counter<u64>,
    duration_ms: Histogram<f64>,
    accept_to_persist_ms: Histogram<f64>,
}

impl PersistMetrics {
    pub fn new() -> PersistMetrics {
        let meter = meter();
        PersistMetrics {
            total: meter
                .u64_counter("delivery_persist_total")
                .with_description("Messages written (or found already written) by status")
                .build(),
            duration_ms: slow_histogram(
                &meter,
                "delivery_persist_duration_ms",
                "One batch's Postgres transaction",
            ),
            accept_to_persist_ms: slow_histogram(
                &meter,
                "delivery_accept_to_persist_ms",
                "From the gateway's 202 to the message being in Postgres",
            ),
        }
    }

    /// One transaction took `millis`, and committed or not.
    pub fn transaction(&self, millis: f64, committed: bool) {
        let status = if committed { "success" } else { "error" };
        self.duration_ms
            .record(millis, &[KeyValue::new("status", status)]);
    }

    /// A newly stored message waited `millis` since the gateway accepted it.
    pub fn accepted_to_persisted(&self, millis: f64) {
        self.accept_to_persist_ms.record(millis.max(0.0), &[]);
    }

    /// The rows of a committed batch, by what became of them: stored now or before
    /// (`idempotent_hit`), or a conflict whose rejection was recorded now or before.
    pub fn outcome(&self, outcome: &Outcome) {
        let rejected_now = outcome.conflicts.iter().filter(|c| c.recorded_now).count();
        self.count(outcome.inserted.len(), "success", "false");
        self.count(outcome.duplicates.len(), "success", "true");
        self.count(rejected_now, "conflict", "false");
        self.count(outcome.conflicts.len() - rejected_now, "conflict", "true");
    }

    /// A message that cannot be stored.
    pub fn refused(&self) {
        self.count(1, "failed", "false");
    }

    fn count(&self, rows: usize, status: &'static str, idempotent_hit: &'static str) {
        if rows > 0 {
            self.total.add(
                rows as u64,
                &[
                    KeyValue::new("status", status),
                    KeyValue::new("idempotent_hit", idempotent_hit),
                ],
            );
        }
    }
}
