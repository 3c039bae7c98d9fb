//! Scheduling pushes, inside the delivery consumer.
//!
//! Runs after a batch is stored and before it is acknowledged, so a consumer that dies in
//! between leaves the batch to be processed again, and schedules again: each task's
//! `Nats-Msg-Id` (message, recipient, platform) lets JetStream drop the second copy, and the
//! push workers skip devices that already got the message (`push_deliveries`).
//!
//! Cheap by construction: one indexed query per batch finds which recipients have devices at
//! all (usually few), presence is asked only about those, and what is scheduled is a publish
//! to a local stream. The whole step is bounded in time; if NATS or Postgres cannot answer
//! within it the pushes of that batch are counted as failed and the batch goes on: a push is a
//! courtesy, the message itself is already safe.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use hotpath_core::envelope::Envelope;
use hotpath_core::names::{push_subject, push_task_msg_id};
use sqlx::PgPool;

use super::{Platform, PushTask};
use crate::fanout::PresenceLookup;
use crate::metrics::DeliveryMetrics;

/// Longest the scheduling step may hold up a batch's acknowledgement.
const SCHEDULE_TIMEOUT: Duration = Duration::from_secs(5);
/// Presence lookups in flight at once.
const LOOKUP_CONCURRENCY: usize = 32;

#[derive(Clone)]
pub struct PushScheduler {
    pool: PgPool,
    js: jetstream::Context,
    presence: PresenceLookup,
    metrics: DeliveryMetrics,
}

/// Why a recipient is pushed: the label of `delivery_push_enqueued_total`.
#[derive(Clone, Copy)]
enum Why {
    Offline,
    /// Presence could not be read: better a push too many than a missed message.
    PresenceUnknown,
}

impl Why {
    fn label(self) -> &'static str {
        match self {
            Why::Offline => "offline",
            Why::PresenceUnknown => "presence_unknown",
        }
    }
}

impl PushScheduler {
    pub fn new(
        pool: PgPool,
        js: jetstream::Context,
        presence: PresenceLookup,
        metrics: DeliveryMetrics,
    ) -> PushScheduler {
        PushScheduler {
            pool,
            js,
            presence,
            metrics,
        }
    }

    /// Schedules the pushes of `messages` (stored by this batch or before it). Never fails:
    /// what could not be scheduled is logged and counted.
    pub async fn schedule(&self, messages: &[&Envelope]) {
        if messages.is_empty() {
            return;
        }
        match tokio::time::timeout(SCHEDULE_TIMEOUT, self.try_schedule(messages)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = format!("{error:#}"), "push scheduling failed");
                self.metrics.push_failed("enqueue_failed", 1);
            }
            Err(_) => {
                tracing::warn!("push scheduling timed out");
                self.metrics.push_failed("enqueue_timeout", 1);
            }
        }
    }

    async fn try_schedule(&self, messages: &[&Envelope]) -> anyhow::Result<()> {
        let recipients: BTreeSet<&str> = messages
            .iter()
            .flat_map(|envelope| {
                envelope
                    .recipient_ids
                    .iter()
                    .filter(|r| **r != envelope.sender_id)
                    .map(String::as_str)
            })
            .collect();
        if recipients.is_empty() {
            return Ok(());
        }
        let recipients: Vec<&str> = recipients.into_iter().collect();
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT DISTINCT user_id, platform FROM devices WHERE user_id = ANY($1)",
        )
        .bind(&recipients)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut platforms: HashMap<String, Vec<Platform>> = HashMap::new();
        for (user_id, platform) in rows {
            if let Some(platform) = Platform::parse(&platform) {
                platforms.entry(user_id).or_default().push(platform);
            }
        }

        // Who of them is offline now.
        let offline: HashMap<String, Why> = futures::stream::iter(platforms.keys().cloned())
            .map(|user_id| {
                let presence = self.presence.clone();
                async move {
                    let why = match presence.sockets(&user_id).await {
                        Ok(0) => Some(Why::Offline),
                        Ok(_) => None,
                        Err(_) => Some(Why::PresenceUnknown),
                    };
                    (user_id, why)
                }
            })
            .buffer_unordered(LOOKUP_CONCURRENCY)
            .filter_map(|(user_id, why)| async move { why.map(|why| (user_id, why)) })
            .collect()
            .await;

        let mut acks = Vec::new();
        for envelope in messages {
            for recipient in &envelope.recipient_ids {
                if *recipient == envelope.sender_id {
                    continue;
                }
                let (Some(why), Some(platforms)) =
                    (offline.get(recipient), platforms.get(recipient))
                else {
                    continue;
                };
                for &platform in platforms {
                    let task = PushTask {
                        message_id: envelope.message_id,
                        conversation_id: envelope.conversation_id,
                        user_id: recipient.clone(),
                        platform,
                    };
                    let message = PublishMessage::build()
                        .payload(serde_json::to_vec(&task)?.into())
                        .message_id(push_task_msg_id(
                            &envelope.message_id.to_string(),
                            recipient,
                            platform.as_str(),
                        ));
                    let ack = self
                        .js
                        .send_publish(push_subject(platform.as_str()), message)
                        .await?;
                    acks.push((*why, ack));
                }
            }
        }
        for (why, ack) in acks {
            match ack.await {
                // A second copy of a task (a batch processed again) is not a new push.
                Ok(ack) if ack.duplicate => {}
                Ok(_) => self.metrics.push_enqueued(why.label()),
                Err(error) => {
                    tracing::warn!(%error, "push task not stored");
                    self.metrics.push_failed("enqueue_failed", 1);
                }
            }
        }
        Ok(())
    }
}
