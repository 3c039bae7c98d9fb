//! Persisted throughput: how fast what the gateway accepted became rows in Postgres.
//!
//! The benchmark's conversations are its own, so "this phase's rows" are the rows of those
//! conversations accepted since the phase's first send (the phases run one after another and
//! each waits for its answers, so their `accepted_at` ranges do not overlap). Postgres's own
//! `persisted_at` says when the last one landed, independent of how often we poll.

use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

use super::stats::Window;

/// How long to wait for the consumers to catch up after a phase.
pub const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);
const POLL_EVERY: Duration = Duration::from_millis(250);
const REPORT_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize)]
pub struct Persisted {
    /// Messages the gateway accepted (202) in the phase, warm-up included.
    pub expected: u64,
    /// Rows found. Can exceed `expected`: a send that timed out or got a 503 may still have
    /// been stored.
    pub persisted: u64,
    /// Whether every accepted message was found within the wait limit.
    pub complete: bool,
    /// From the phase's first send to the last row's `persisted_at`.
    pub secs: f64,
    pub msgs_per_sec: f64,
    /// From the phase's last HTTP answer to the last row's `persisted_at`: how far behind the
    /// consumers were when sending stopped.
    pub drain_secs: f64,
    /// `persisted_at - accepted_at` per row: the pipeline's lag behind the gateway.
    pub accept_to_persist_ms: LagPercentiles,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LagPercentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

/// Waits until the phase's accepted messages are all in Postgres (at most `limit`), then
/// measures how fast they got there.
pub async fn wait_for(
    pool: &PgPool,
    conversations: &[Uuid],
    window: &Window,
    limit: Duration,
) -> anyhow::Result<Persisted> {
    let expected = window.accepted_total;
    let deadline = Instant::now() + limit;
    let mut next_report = Instant::now() + REPORT_EVERY;
    let mut found = count(pool, conversations, window.first_send).await?;
    while found < expected && Instant::now() < deadline {
        if Instant::now() >= next_report {
            eprintln!("waiting for persistence: {found}/{expected} rows");
            next_report += REPORT_EVERY;
        }
        tokio::time::sleep(POLL_EVERY).await;
        found = count(pool, conversations, window.first_send).await?;
    }
    let complete = found >= expected;
    if !complete {
        tracing::warn!(
            found,
            expected,
            limit_secs = limit.as_secs(),
            "not every accepted message was persisted in time"
        );
    }
    summarize(pool, conversations, window, expected, complete).await
}

async fn count(pool: &PgPool, conversations: &[Uuid], since: DateTime<Utc>) -> anyhow::Result<u64> {
    let (count,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM messages WHERE conversation_id = ANY($1) AND accepted_at >= $2",
    )
    .bind(conversations)
    .bind(since)
    .fetch_one(pool)
    .await
    .context("counting persisted benchmark messages")?;
    Ok(count.max(0) as u64)
}

/// Rate, drain time and accept-to-persist lag of the phase's rows.
async fn summarize(
    pool: &PgPool,
    conversations: &[Uuid],
    window: &Window,
    expected: u64,
    complete: bool,
) -> anyhow::Result<Persisted> {
    type Row = (
        i64,
        Option<DateTime<Utc>>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
    );
    let (count, last, p50, p95, p99, max): Row = sqlx::query_as(
        "WITH lag AS (
             SELECT persisted_at, extract(epoch FROM persisted_at - accepted_at)::float8 * 1000 AS ms
               FROM messages
              WHERE conversation_id = ANY($1) AND accepted_at >= $2
         )
         SELECT count(*), max(persisted_at),
                percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.95) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
                max(ms)
           FROM lag",
    )
    .bind(conversations)
    .bind(window.first_send)
    .fetch_one(pool)
    .await
    .context("measuring persisted benchmark messages")?;
    let last = last.unwrap_or(window.first_send);
    let secs = seconds_between(window.first_send, last);
    let persisted = count.max(0) as u64;
    Ok(Persisted {
        expected,
        persisted,
        complete,
        secs,
        msgs_per_sec: if secs > 0.0 {
            persisted as f64 / secs
        } else {
            0.0
        },
        drain_secs: seconds_between(window.last_answer, last),
        accept_to_persist_ms: LagPercentiles {
            p50: p50.unwrap_or(0.0),
            p95: p95.unwrap_or(0.0),
            p99: p99.unwrap_or(0.0),
            max: max.unwrap_or(0.0),
        },
    })
}

/// `to - from` in seconds; negative when the last row landed before the last answer.
fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).as_seconds_f64()
}
