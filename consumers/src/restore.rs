//! Putting persisted messages back into Postgres from the replay window, each with the seq it
//! was first given.
//!
//! The main use: Postgres is restored from last night's backup, and the rest of the day is
//! still in `REPLAY` (ADR 0004). The backup's `conversations.last_seq` is last night's too, so
//! sending the lost messages through the live path would number them on top of it: right only
//! if nothing else was persisted since the restore and the replay starts exactly at the first
//! lost message. Clients have already seen the original seqs (history, `message.new` frames,
//! `after_seq` catch-up), so a restored message must come back with the seq it had, not
//! merely in order. The delivery consumer therefore writes where each message sits in
//! Postgres onto its window copy ([`hotpath_core::names::replay_headers`]: the seq and the
//! `MESSAGES` sequence; the partition is the copy's subject), and a restore inserts the row
//! exactly as it was.
//!
//! One transaction per batch, as in [`crate::persist`]: the batch's conversations are locked
//! in id order (so a restore and the live consumers never deadlock, and a live batch cannot
//! slip a row in between the check and the insert), the keys already stored are read, and one
//! statement inserts the rest with their own seq (`ON CONFLICT DO NOTHING`) and raises
//! `last_seq` to cover them, never lowering it: after the restore the live path numbers new
//! messages after every restored one. What each entry became is a [`Restoration`]:
//!
//! * already stored (by key): nothing is written, whatever its seq;
//! * its seq taken by another message: a message persisted after the restore and before the
//!   replay was numbered on top of the backup's `last_seq`. The lost one is not stored with a
//!   second seq; it is reported, so the operator knows to replay before starting the
//!   consumers (README "Operations");
//! * its conversation gone: reported, never stored (as the live path's orphans);
//! * a copy made before copies carried their seq: stored through the live path
//!   ([`crate::persist::persist`]), numbered on top of `last_seq` in window order, and reported
//!   as renumbered.
//!
//! A restore only puts the record back. It does not fan out or schedule pushes: those happened
//! when the message was first persisted, and a user must not be notified of it again. It does
//! tell the gateways' history caches ([`announce`]), as the live path does after each batch:
//! a page cached while the rows were missing would otherwise be served without them until it
//! expired.

use std::collections::{BTreeMap, HashSet};

use async_nats::HeaderMap;
use hotpath_core::announcements::HistoryChanged;
use hotpath_core::envelope::Envelope;
use hotpath_core::names::{partition_of, partition_of_replay_subject, replay_headers};
use sqlx::PgPool;
use uuid::Uuid;

use crate::persist::{self, Row};
use crate::store::{conversations, messages};

/// One replay window entry to restore.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub envelope: &'a Envelope,
    pub partition: u32,
    /// The `MESSAGES` sequence it was persisted from.
    pub stream_seq: u64,
    /// The seq it was given; `None` for a copy made before copies carried it.
    pub seq: Option<i64>,
}

/// A replay window entry read back: its envelope and where its row sat.
#[derive(Debug, Clone)]
pub struct WindowEntry {
    pub envelope: Envelope,
    pub partition: u32,
    pub stream_seq: u64,
    pub seq: Option<i64>,
}

impl WindowEntry {
    /// Reads an entry from its subject, headers and bytes; `Err` says why it cannot be
    /// restored. The partition is the subject's (`replay.msgs.<p>`); delivered on another
    /// subject, it is the conversation's among `partitions`, as the gateway routed it.
    pub fn read(
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: &[u8],
        partitions: u32,
    ) -> Result<WindowEntry, String> {
        let envelope = Envelope::decode(payload)
            .map_err(|error| format!("its envelope cannot be read: {error}"))?;
        let header = |name: &str| -> Result<Option<i64>, String> {
            let Some(value) = headers.and_then(|h| h.get(name)) else {
                return Ok(None);
            };
            value
                .as_str()
                .parse()
                .map(Some)
                .map_err(|_| format!("its {name} header is not a number"))
        };
        let seq = header(replay_headers::SEQ)?;
        let stream_seq = header(replay_headers::STREAM_SEQ)?.unwrap_or_default();
        let partition = partition_of_replay_subject(subject)
            .unwrap_or_else(|| partition_of(&envelope.conversation_id.to_string(), partitions));
        Ok(WindowEntry {
            envelope,
            partition,
            stream_seq: stream_seq.max(0) as u64,
            seq,
        })
    }

    /// The entry as [`restore`] takes it.
    pub fn entry(&self) -> Entry<'_> {
        Entry {
            envelope: &self.envelope,
            partition: self.partition,
            stream_seq: self.stream_seq,
            seq: self.seq,
        }
    }
}

/// What restoring one entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Restoration {
    /// Stored again, with its own seq.
    Restored,
    /// Its key was already stored: nothing written.
    Present,
    /// Another message holds its seq: not stored.
    SeqTaken,
    /// Its conversation does not exist: not stored.
    NoConversation,
    /// A copy without its seq, stored with a new one on top of `last_seq`.
    Renumbered,
}

/// Restores `entries` (in window order), one transaction per run of entries with and without
/// a recorded seq; answers what became of each, by index. An `Err` leaves the failing run's
/// transaction undone (earlier runs stay: restoring them again is harmless).
pub async fn restore(
    pool: &PgPool,
    entries: &[Entry<'_>],
) -> Result<Vec<Restoration>, sqlx::Error> {
    let mut outcome = Vec::with_capacity(entries.len());
    let mut start = 0;
    while start < entries.len() {
        let with_seq = entries[start].seq.is_some();
        let len = entries[start..]
            .iter()
            .take_while(|entry| entry.seq.is_some() == with_seq)
            .count();
        let run = &entries[start..start + len];
        if with_seq {
            outcome.extend(restore_with_seq(pool, run).await?);
        } else {
            outcome.extend(persist_renumbered(pool, run).await?);
        }
        start += len;
    }
    Ok(outcome)
}

/// Announces, once per conversation that got rows back, [`HistoryChanged`] with the highest
/// seq restored (none for rows stored with a new seq, whose seq the restore does not learn):
/// gateways drop the conversation's cached pages and serve no page ending before that seq.
/// Best effort, like the live path's announcement: one lost is bounded by the cache's time
/// to live.
pub async fn announce(nats: &async_nats::Client, entries: &[Entry<'_>], outcome: &[Restoration]) {
    let mut changed = BTreeMap::<Uuid, Option<i64>>::new();
    for (entry, restoration) in entries.iter().zip(outcome) {
        let seq = match restoration {
            Restoration::Restored => entry.seq,
            Restoration::Renumbered => None,
            Restoration::Present | Restoration::SeqTaken | Restoration::NoConversation => continue,
        };
        let last = changed.entry(entry.envelope.conversation_id).or_default();
        *last = (*last).max(seq);
    }
    HistoryChanged::announce_all(nats, changed).await;
    // Published before the caller goes on: `hotpath replay` exits right after its last batch.
    if let Err(error) = nats.flush().await {
        tracing::warn!(%error, "history announcements of restored rows not flushed");
    }
}

fn row<'a>(entry: &Entry<'a>) -> Row<'a> {
    Row {
        envelope: entry.envelope,
        partition: entry.partition,
        stream_seq: entry.stream_seq,
    }
}

/// Entries that all carry their seq: stored exactly as they were.
async fn restore_with_seq(
    pool: &PgPool,
    entries: &[Entry<'_>],
) -> Result<Vec<Restoration>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut wanted: Vec<Uuid> = entries.iter().map(|e| e.envelope.conversation_id).collect();
    wanted.sort();
    wanted.dedup();
    let existing = conversations::lock_existing(&mut tx, &wanted).await?;
    let keys: Vec<String> = entries
        .iter()
        .map(|e| e.envelope.idempotency_key.clone())
        .collect();
    let present: HashSet<String> = messages::positions(&mut tx, &keys)
        .await?
        .into_keys()
        .collect();
    let rows: Vec<Row<'_>> = entries.iter().map(row).collect();
    let storable: Vec<usize> = (0..entries.len())
        .filter(|&i| {
            existing.contains(&entries[i].envelope.conversation_id)
                && !present.contains(&entries[i].envelope.idempotency_key)
        })
        .collect();
    let seqs: Vec<i64> = storable
        .iter()
        .map(|&i| entries[i].seq.unwrap_or_default())
        .collect();
    let inserted =
        messages::restore_batch(&mut tx, &persist::columns(&rows, &storable), &seqs).await?;
    tx.commit().await?;

    // A key twice in the window (a copy kept twice) is restored once: the later copy finds it.
    let mut first_of_key: HashSet<&str> = HashSet::new();
    let told = entries.iter().map(|entry| {
        let key = entry.envelope.idempotency_key.as_str();
        if present.contains(key) {
            Restoration::Present
        } else if !existing.contains(&entry.envelope.conversation_id) {
            Restoration::NoConversation
        } else if inserted.contains(key) {
            if first_of_key.insert(key) {
                Restoration::Restored
            } else {
                Restoration::Present
            }
        } else {
            Restoration::SeqTaken
        }
    });
    Ok(told.collect())
}

/// Entries without their seq: through the live path, which numbers what is new on top of
/// `last_seq`.
async fn persist_renumbered(
    pool: &PgPool,
    entries: &[Entry<'_>],
) -> Result<Vec<Restoration>, sqlx::Error> {
    let rows: Vec<Row<'_>> = entries.iter().map(row).collect();
    let outcome = persist::persist(pool, &rows).await?;
    let mut told = vec![Restoration::Present; entries.len()];
    for &index in outcome.inserted.keys() {
        told[index] = Restoration::Renumbered;
    }
    for &index in &outcome.orphans {
        told[index] = Restoration::NoConversation;
    }
    // Duplicates are stored already, and a conflict's key names a stored message: present.
    Ok(told)
}
