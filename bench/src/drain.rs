//! The consumers on their own: a backlog published straight into `MESSAGES`, then the time
//! until all of it is in Postgres.
//!
//! In the HTTP phases the consumers persist only as fast as the gateway accepts, so their
//! rate says more about the gateway than about them. Here the backlog is published at
//! JetStream's speed (the same envelopes, subjects and `Nats-Msg-Id`s the gateway would use),
//! so the persisted rate is what the consumers themselves sustain: the figure to hold
//! against the raw UNNEST baseline.

use anyhow::Context as _;
use async_nats::jetstream;
use chrono::Utc;
use hotpath_core::envelope::Envelope;
use sqlx::PgPool;

use super::baseline::{encode_all, publish_all};
use super::persisted::{self, Persisted};
use super::stats::Window;
use super::workload::Workload;

/// Message numbers of the backlog start here, far past any HTTP phase's, so their
/// `clientMessageId`s (and so their keys) are new.
const FIRST_SEQ: u64 = 1 << 40;

/// Publishes `messages` envelopes to the partitions' subjects and waits until they are all
/// persisted.
pub async fn backlog(
    nats: &async_nats::Client,
    pool: &PgPool,
    partitions: u32,
    workload: &Workload,
    messages: u64,
) -> anyhow::Result<Persisted> {
    tracing::info!(
        messages,
        "consumer drain: publishing a backlog into MESSAGES"
    );
    let first_send = Utc::now();
    let envelopes: Vec<Envelope> = (FIRST_SEQ..FIRST_SEQ + messages)
        .map(|seq| Envelope {
            accepted_at: first_send,
            ..workload.envelope(seq)
        })
        .collect();
    let (encoded, _) = encode_all("msgs.in", partitions, &envelopes);
    let js = jetstream::new(nats.clone());
    let (duplicates, _) = publish_all(&js, encoded)
        .await
        .context("publishing the backlog")?;
    let window = Window {
        first_send,
        last_answer: Utc::now(),
        accepted_total: messages - duplicates,
    };
    persisted::wait_for(
        pool,
        &workload.conversation_ids(),
        &window,
        persisted::CATCH_UP_LIMIT,
    )
    .await
}
