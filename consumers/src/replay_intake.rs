//! The replay intake: what an operator's `nats` CLI replays from the window, restored into
//! Postgres.
//!
//! The `nats` CLI can replay a range of `REPLAY` by creating a push consumer on it whose
//! deliver subject is [`REPLAY_INTAKE_SUBJECT`] (`nats consumer add REPLAY … --target
//! hotpath.replay.intake --deliver-group hotpath-replay-intake --deliver 1h`, README
//! "Operations"). Every consumer process listens there in the queue group
//! [`REPLAY_INTAKE_GROUP`], so each entry reaches one of them, and restores what arrives the
//! way `hotpath replay` does ([`crate::restore`]: the row as it was, seq included, nothing
//! twice). So the `nats` CLI needs nothing of Hotpath but this subject, and the same
//! idempotent path stores what either route replays.
//!
//! Entries are taken in batches of what has arrived (the first waited for, the rest without
//! waiting), restored in one transaction, then acknowledged on the consumer's ack subject: a
//! batch that fails (Postgres away) is not acknowledged, and JetStream delivers it again after
//! the consumer's ack wait. An entry that can never be restored (unreadable) is terminated, so
//! it is not delivered again. What the intake did is counted as
//! `delivery_replay_intake_total{outcome}` and logged per batch.

use std::sync::Arc;

use async_nats::{Client, Message};
use futures::{FutureExt as _, StreamExt as _};
use hotpath_core::config::Config;
use hotpath_core::names::{REPLAY_INTAKE_GROUP, REPLAY_INTAKE_SUBJECT};
use hotpath_core::telemetry::meter;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metrics::LabelledCounter;
use crate::restore::{self, Restoration, WindowEntry};

/// Entries restored in one transaction at most.
const BATCH: usize = 256;

/// Listens on the intake until `shutdown`, restoring what arrives.
pub async fn run(client: Client, pool: PgPool, config: Arc<Config>, shutdown: CancellationToken) {
    let mut subscription = match client
        .queue_subscribe(REPLAY_INTAKE_SUBJECT, REPLAY_INTAKE_GROUP.to_string())
        .await
    {
        Ok(subscription) => subscription,
        Err(error) => {
            tracing::error!(%error, subject = REPLAY_INTAKE_SUBJECT, "cannot listen on the replay intake; replays through the nats CLI are not restored");
            return;
        }
    };
    let counted = LabelledCounter::new(
        &meter(),
        "delivery_replay_intake_total",
        "outcome",
        "Replay window entries received on the replay intake, by what became of them \
         (restored, present, renumbered, seq_taken, no_conversation, unreadable, failed)",
    );
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            next = subscription.next() => next,
        };
        let Some(first) = first else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match subscription.next().now_or_never() {
                Some(Some(message)) => batch.push(message),
                _ => break,
            }
        }
        settle(&client, &pool, &config, &counted, batch).await;
    }
    let _ = subscription.unsubscribe().await;
}

/// Restores one batch and acknowledges what is settled.
async fn settle(
    client: &Client,
    pool: &PgPool,
    config: &Config,
    counted: &LabelledCounter,
    batch: Vec<Message>,
) {
    let mut readable = Vec::with_capacity(batch.len());
    for message in batch {
        let subject = message.subject.as_str();
        match WindowEntry::read(
            subject,
            message.headers.as_ref(),
            &message.payload,
            config.partitions,
        ) {
            Ok(entry) => readable.push((message, entry)),
            Err(why) => {
                tracing::warn!(%subject, why, "replay intake entry cannot be restored; terminated");
                counted.add("unreadable", 1);
                acknowledge(client, &message, "+TERM").await;
            }
        }
    }
    let entries: Vec<_> = readable.iter().map(|(_, entry)| entry.entry()).collect();
    match restore::restore(pool, &entries).await {
        Ok(outcome) => {
            restore::announce(client, &entries, &outcome).await;
            for ((message, entry), restoration) in readable.iter().zip(outcome) {
                counted.add(label(restoration), 1);
                if matches!(
                    restoration,
                    Restoration::SeqTaken | Restoration::NoConversation
                ) {
                    tracing::warn!(
                        message_id = %entry.envelope.message_id,
                        conversation_id = %entry.envelope.conversation_id,
                        seq = entry.seq,
                        outcome = label(restoration),
                        "replayed message not restored"
                    );
                }
                acknowledge(client, message, "+ACK").await;
            }
            tracing::info!(batch_len = readable.len(), "replay intake batch restored");
        }
        Err(error) => {
            counted.add("failed", readable.len() as u64);
            tracing::warn!(batch_len = readable.len(), %error, "replay intake batch not restored; JetStream delivers it again");
        }
    }
}

fn label(restoration: Restoration) -> &'static str {
    match restoration {
        Restoration::Restored => "restored",
        Restoration::Present => "present",
        Restoration::Renumbered => "renumbered",
        Restoration::SeqTaken => "seq_taken",
        Restoration::NoConversation => "no_conversation",
    }
}

/// Acknowledges a delivery of a JetStream consumer: `kind` is `+ACK` or `+TERM`. Anything
/// that is not such a delivery (no reply, or a reply that is not an ack subject) gets
/// nothing.
async fn acknowledge(client: &Client, message: &Message, kind: &'static str) {
    let Some(reply) = message.reply.as_ref() else {
        return;
    };
    if !reply.starts_with("$JS.ACK.") {
        return;
    }
    if let Err(error) = client.publish(reply.clone(), kind.into()).await {
        // The entry is delivered again after the ack wait and found present: harmless.
        tracing::debug!(%error, "replay intake acknowledgement not sent");
    }
}
