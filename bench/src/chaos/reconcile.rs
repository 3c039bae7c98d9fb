//! After the drill: every 202 checked against Postgres.
//!
//! The drill's conversations are its own (created for the run), so every row in them is one
//! of its messages, and each message's text is its `clientMessageId`. That gives:
//! * **lost**: an accepted `messageId` with no row, once the pipeline had `--catch-up-secs`
//!   to catch up;
//! * **duplicated**: rows beyond the first for one text (one logical message stored twice,
//!   under any id);
//! * **seq gaps**: per conversation, the numbers missing from 1..=max(seq);
//! * **stored without a 202**: rows of messages whose client gave up (stored, but the answer
//!   never arrived: not a loss, the client would find it in the history);
//! * the longest time from a message's first attempt, and from its acceptance, to its row.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

use super::client::Sends;
use crate::workload::Workload;

/// At most this many lost ids are listed in the report.
const LISTED: usize = 20;

#[derive(Debug, Clone, Serialize)]
pub struct Reconciled {
    pub accepted: u64,
    pub persisted: u64,
    pub lost: u64,
    /// Some of the lost `messageId`s.
    pub lost_ids: Vec<Uuid>,
    pub duplicated: u64,
    pub seq_gaps: u64,
    pub stored_without_202: u64,
    /// From the end of the load until the last accepted message was found (or the wait
    /// gave up).
    pub catch_up_secs: f64,
    /// Slowest first attempt → row (`persisted_at`): what a user waited for "sent".
    pub max_ms_first_send_to_persist: f64,
    /// Slowest acceptance (`accepted_at`) → row: the pipeline's own lag.
    pub max_ms_accept_to_persist: f64,
}

/// One row of the drill's conversations.
#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    conversation_id: Uuid,
    seq: i64,
    content: String,
    accepted_at: DateTime<Utc>,
    persisted_at: DateTime<Utc>,
}

/// Waits (up to `limit`) for every accepted message to be stored, then reconciles.
pub async fn reconcile(
    database_url: &str,
    workload: &Workload,
    sends: &Sends,
    limit: Duration,
) -> anyhow::Result<Reconciled> {
    let accepted: HashMap<Uuid, DateTime<Utc>> = sends.accepted().collect();
    let ids: Vec<Uuid> = accepted.keys().copied().collect();
    let started = Instant::now();
    let pool = connect(database_url, started + limit).await?;
    wait_for_rows(&pool, &ids, started + limit).await?;
    let catch_up_secs = started.elapsed().as_secs_f64();
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, conversation_id, seq, content, accepted_at, persisted_at
           FROM messages WHERE conversation_id = ANY($1)",
    )
    .bind(workload.conversation_ids())
    .fetch_all(&pool)
    .await
    .context("reading the drill's messages")?;
    pool.close().await;
    Ok(tally(&accepted, &rows, catch_up_secs))
}

/// A pool, retrying while Postgres is still coming back.
async fn connect(url: &str, deadline: Instant) -> anyhow::Result<PgPool> {
    loop {
        match hotpath_core::db::connect(url, 2).await {
            Ok(pool) => return Ok(pool),
            Err(error) if Instant::now() >= deadline => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Polls until every id has a row or the deadline passes.
async fn wait_for_rows(pool: &PgPool, ids: &[Uuid], deadline: Instant) -> anyhow::Result<()> {
    loop {
        let found: Result<(i64,), _> =
            sqlx::query_as("SELECT count(*) FROM messages WHERE id = ANY($1)")
                .bind(ids)
                .fetch_one(pool)
                .await;
        let complete = matches!(found, Ok((n,)) if n as usize >= ids.len());
        if complete || Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The figures from the accepted ids (with their first attempts) and the rows.
fn tally(accepted: &HashMap<Uuid, DateTime<Utc>>, rows: &[Row], catch_up_secs: f64) -> Reconciled {
    let stored: HashSet<Uuid> = rows.iter().map(|row| row.id).collect();
    let mut lost_ids: Vec<Uuid> = accepted
        .keys()
        .filter(|id| !stored.contains(id))
        .copied()
        .collect();
    lost_ids.sort();
    let lost = lost_ids.len() as u64;
    lost_ids.truncate(LISTED);

    let mut texts: HashMap<&str, u64> = HashMap::new();
    let mut seqs: HashMap<Uuid, Vec<i64>> = HashMap::new();
    let mut reconciled = Reconciled {
        accepted: accepted.len() as u64,
        persisted: 0,
        lost,
        lost_ids,
        duplicated: 0,
        seq_gaps: 0,
        stored_without_202: 0,
        catch_up_secs,
        max_ms_first_send_to_persist: 0.0,
        max_ms_accept_to_persist: 0.0,
    };
    for row in rows {
        *texts.entry(row.content.as_str()).or_default() += 1;
        seqs.entry(row.conversation_id).or_default().push(row.seq);
        let ms = |from: DateTime<Utc>| (row.persisted_at - from).as_seconds_f64() * 1e3;
        match accepted.get(&row.id) {
            Some(first_sent_at) => {
                reconciled.persisted += 1;
                reconciled.max_ms_first_send_to_persist = reconciled
                    .max_ms_first_send_to_persist
                    .max(ms(*first_sent_at));
                reconciled.max_ms_accept_to_persist =
                    reconciled.max_ms_accept_to_persist.max(ms(row.accepted_at));
            }
            None => reconciled.stored_without_202 += 1,
        }
    }
    reconciled.duplicated = texts.values().map(|n| n - 1).sum();
    reconciled.seq_gaps = seqs.values().map(|seqs| gaps(seqs)).sum();
    reconciled
}

/// The numbers in 1..=max missing from `seqs`.
fn gaps(seqs: &[i64]) -> u64 {
    let distinct: HashSet<i64> = seqs.iter().copied().collect();
    let max = distinct.iter().copied().max().unwrap_or(0);
    (max.max(0) as u64).saturating_sub(distinct.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(conversation: Uuid, seq: i64, content: &str) -> Row {
        let now = Utc::now();
        Row {
            id: Uuid::new_v4(),
            conversation_id: conversation,
            seq,
            content: content.to_owned(),
            accepted_at: now,
            persisted_at: now,
        }
    }

    #[test]
    fn counts_what_is_lost_stored_twice_or_missing_from_the_sequence() {
        let conversation = Uuid::new_v4();
        let rows = vec![
            row(conversation, 1, "a"),
            row(conversation, 2, "b"),
            row(conversation, 4, "b"),
        ];
        let lost = Uuid::new_v4();
        let accepted: HashMap<Uuid, DateTime<Utc>> = [(rows[0].id, Utc::now()), (lost, Utc::now())]
            .into_iter()
            .collect();
        let reconciled = tally(&accepted, &rows, 0.0);
        assert_eq!(reconciled.accepted, 2);
        assert_eq!(reconciled.persisted, 1);
        assert_eq!(
            (reconciled.lost, reconciled.lost_ids.clone()),
            (1, vec![lost])
        );
        assert_eq!(reconciled.duplicated, 1);
        assert_eq!(reconciled.seq_gaps, 1);
        assert_eq!(reconciled.stored_without_202, 2);
    }
}
