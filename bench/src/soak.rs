//! Soak mode (`hotpath-bench --soak-secs N`): a long run below capacity that proves retention
//! (ADR 0004) holds up, rather than a measurement.
//!
//! It measures capacity (the capacity phase, unless `--soak-rate` gives the rate), then offers
//! `--soak-share` (80%) of it open loop for `--soak-secs`, waits for the consumers to catch
//! up, and checks what a user would call loss or an outage:
//! * no send refused or failed (503s and every other non-202 counted);
//! * every accepted `messageId` has exactly one row in Postgres;
//! * the replay window holds the most recent messages: in each partition its last entry is the
//!   partition's last persisted message, and its bytes are within its limit;
//! * the backlog (`MESSAGES`) is empty once caught up.
//!
//! Meant to run against `hotpath up` started with small limits, e.g.
//! `HOTPATH_BACKLOG_MAX_BYTES=4194304 HOTPATH_REPLAY_MAX_BYTES=8388608 hotpath up`, so that a
//! run carries many times the streams' sizes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use async_nats::jetstream;
use hotpath_core::envelope::Envelope;
use hotpath_core::names::{MESSAGES_STREAM, REPLAY_STREAM, replay_subject};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::load::{self, CapacityResult, OpenLoop, OpenLoopResult, Sender};
use super::persisted::{self, Persisted};
use super::transport::{SenderSockets, TransportKind};
use super::workload::Workload;

/// What the soak offered and what it verified.
#[derive(Debug, Serialize)]
pub struct SoakReport {
    /// How the senders sent (`--transport`).
    pub transport: TransportKind,
    /// Over WebSocket: the senders' sockets.
    pub sender_sockets: Option<SenderSockets>,
    pub capacity: Option<CapacityResult>,
    /// The rate offered: `share` of the measured capacity, or `--soak-rate`.
    pub rate: u32,
    pub share: f64,
    pub load: OpenLoopResult,
    pub persisted: Persisted,
    pub verdict: Verdict,
}

/// The checks, with the figures behind them.
#[derive(Debug, Serialize)]
pub struct Verdict {
    /// Sends answered anything but 202 (503s included), or not answered.
    pub errors: u64,
    pub status_503: u64,
    pub accepted: u64,
    /// Accepted messages without a row, and with more than one.
    pub lost: u64,
    pub duplicated: u64,
    pub backlog_after: u64,
    pub replay_messages: u64,
    pub replay_bytes: u64,
    pub replay_max_bytes: i64,
    /// Partitions whose last window entry is not their last persisted message.
    pub replay_stale_partitions: Vec<u32>,
    pub passed: bool,
}

pub struct Soak<'a> {
    pub sender: Arc<Sender>,
    pub ids: Arc<Mutex<Vec<Uuid>>>,
    pub nats: &'a async_nats::Client,
    pub pool: &'a PgPool,
    pub workload: &'a Workload,
    pub partitions: u32,
}

pub struct Plan {
    pub transport: TransportKind,
    pub secs: u64,
    pub share: f64,
    pub rate: Option<u32>,
    pub capacity_secs: u64,
    pub concurrency: usize,
    pub max_in_flight: usize,
}

impl Soak<'_> {
    pub async fn run(&self, plan: &Plan) -> anyhow::Result<SoakReport> {
        let conversations = self.workload.conversation_ids();
        let (capacity, rate) = match plan.rate {
            Some(rate) => (None, rate),
            None => {
                let capacity =
                    load::capacity(&self.sender, plan.capacity_secs.max(1), plan.concurrency)
                        .await?;
                persisted::wait_for(
                    self.pool,
                    &conversations,
                    &capacity.window,
                    persisted::CATCH_UP_LIMIT,
                )
                .await?;
                let rate = (capacity.accepted_per_sec * plan.share).max(1.0) as u32;
                (Some(capacity), rate)
            }
        };
        self.ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        tracing::info!(rate, secs = plan.secs, "soak: offering load");
        let load = load::open_loop(
            &self.sender,
            &OpenLoop {
                rate,
                warmup_secs: 0,
                duration_secs: plan.secs,
                max_in_flight: plan.max_in_flight,
            },
        )
        .await?;
        let persisted = persisted::wait_for(
            self.pool,
            &conversations,
            &load.window,
            persisted::CATCH_UP_LIMIT,
        )
        .await?;
        let verdict = self.verify(&load).await?;
        Ok(SoakReport {
            transport: plan.transport,
            sender_sockets: self.sender.transport().sockets(),
            capacity,
            rate,
            share: plan.share,
            load,
            persisted,
            verdict,
        })
    }

    async fn verify(&self, load: &OpenLoopResult) -> anyhow::Result<Verdict> {
        let ids: Vec<Uuid> = self
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let rows: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT id, count(*) FROM messages WHERE id = ANY($1) GROUP BY id")
                .bind(&ids)
                .fetch_all(self.pool)
                .await
                .context("counting the soak's rows")?;
        let rows: HashMap<Uuid, i64> = rows.into_iter().collect();
        let distinct: HashSet<&Uuid> = ids.iter().collect();
        let lost = distinct.iter().filter(|id| !rows.contains_key(id)).count() as u64;
        let duplicated =
            rows.values().filter(|&&n| n > 1).count() as u64 + (ids.len() - distinct.len()) as u64;

        let js = jetstream::new(self.nats.clone());
        let backlog_after = wait_for_empty_backlog(&js).await?;
        let window = js.get_stream(REPLAY_STREAM).await.context("REPLAY")?;
        let info = window.cached_info().clone();
        let stale = self.stale_partitions(&window).await?;

        let errors = load
            .outcomes
            .iter()
            .filter(|(k, _)| *k != "202")
            .map(|(_, n)| n)
            .sum();
        let status_503 = load.outcomes.get("503").copied().unwrap_or(0);
        let within_bytes =
            info.config.max_bytes < 0 || info.state.bytes <= info.config.max_bytes as u64;
        Ok(Verdict {
            errors,
            status_503,
            accepted: ids.len() as u64,
            lost,
            duplicated,
            backlog_after,
            replay_messages: info.state.messages,
            replay_bytes: info.state.bytes,
            replay_max_bytes: info.config.max_bytes,
            passed: errors == 0
                && lost == 0
                && duplicated == 0
                && backlog_after == 0
                && within_bytes
                && stale.is_empty(),
            replay_stale_partitions: stale,
        })
    }

    /// Partitions whose newest window entry is not their newest persisted message of the
    /// benchmark's conversations.
    async fn stale_partitions(
        &self,
        window: &jetstream::stream::Stream,
    ) -> anyhow::Result<Vec<u32>> {
        let newest: Vec<(i32, Uuid)> = sqlx::query_as(
            "SELECT DISTINCT ON (stream_partition) stream_partition, id FROM messages
              WHERE conversation_id = ANY($1) ORDER BY stream_partition, stream_seq DESC",
        )
        .bind(self.workload.conversation_ids())
        .fetch_all(self.pool)
        .await
        .context("reading each partition's newest message")?;
        let newest: BTreeMap<u32, Uuid> =
            newest.into_iter().map(|(p, id)| (p as u32, id)).collect();
        let mut stale = Vec::new();
        for partition in 0..self.partitions {
            let Some(expected) = newest.get(&partition) else {
                continue;
            };
            let last = window
                .direct_get_last_for_subject(replay_subject(partition))
                .await
                .ok()
                .and_then(|entry| Envelope::decode(&entry.payload).ok())
                .map(|envelope| envelope.message_id);
            if last != Some(*expected) {
                stale.push(partition);
            }
        }
        Ok(stale)
    }
}

/// Waits (up to the catch-up limit) for `MESSAGES` to be empty; returns what it still holds.
async fn wait_for_empty_backlog(js: &jetstream::Context) -> anyhow::Result<u64> {
    let deadline = tokio::time::Instant::now() + persisted::CATCH_UP_LIMIT;
    loop {
        let held = js
            .get_stream(MESSAGES_STREAM)
            .await
            .context("MESSAGES")?
            .cached_info()
            .state
            .messages;
        if held == 0 || tokio::time::Instant::now() >= deadline {
            return Ok(held);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

impl SoakReport {
    pub fn summary(&self) -> String {
        let v = &self.verdict;
        let capacity = self.capacity.as_ref().map_or("given".to_string(), |c| {
            format!("{:.0} msg/s measured", c.accepted_per_sec)
        });
        format!(
            "\nsoak over {transport}: {rate} msg/s ({share:.0}% of capacity: {capacity}) for {secs} s\n\
             \x20 sent {scheduled}, accepted {accepted}, errors {errors} (503: {s503}), p99 {p99:.2} ms\n\
             \x20 persisted {persisted}/{expected} at {pps:.0} msg/s; lost {lost}, duplicated {dup}\n\
             \x20 backlog after catch-up: {backlog} messages\n\
             \x20 replay window: {rm} messages, {rb} of {rmax} bytes; partitions whose newest entry is not their newest message: {stale:?}\n\
             \x20 verdict: {verdict}\n",
            transport = self.transport.label(),
            rate = self.rate,
            share = self.share * 100.0,
            secs = self.load.duration_secs,
            scheduled = self.load.scheduled,
            accepted = v.accepted,
            errors = v.errors,
            s503 = v.status_503,
            p99 = self.load.latency_ms.p99,
            persisted = self.persisted.persisted,
            expected = self.persisted.expected,
            pps = self.persisted.msgs_per_sec,
            lost = v.lost,
            dup = v.duplicated,
            backlog = v.backlog_after,
            rm = v.replay_messages,
            rb = v.replay_bytes,
            rmax = v.replay_max_bytes,
            stale = v.replay_stale_partitions,
            verdict = if v.passed { "PASS" } else { "FAIL" },
        )
    }
}
