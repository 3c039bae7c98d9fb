//! Scheduling pushes, inside the delivery consumer.
//!
//! Runs after a batch is stored and before it is acknowledged, so a consumer that dies in
//! between leaves the batch to be processed again, and schedules again: each task's
//! `Nats-Msg-Id` (message, recipient, platform) lets JetStream drop the second copy, and the
//! push workers skip devices that already got the message (`push_deliveries`).
//!
//! Cheap by construction: which recipients have devices at all (usually few) is cached per
//! user for a minute, so a batch of known users costs no query (the gateways announce a new
//! registration on `hotpath.devices.changed` and the entry is dropped at once; a device that
//! went away only costs a task that finds nothing to send); presence is asked only about
//! users with devices, and what is scheduled is a publish to a local stream. The whole step is bounded in time; if NATS or Postgres cannot answer
//! within it the pushes of that batch are counted as failed and the batch goes on: a push is a
//! courtesy, the message itself is already safe.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use hotpath_core::envelope::Envelope;
use hotpath_core::names::{DEVICES_CHANGED_SUBJECT, push_subject, push_task_msg_id};
use moka::future::Cache;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

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
    /// User id → the platforms they have devices on (empty: none).
    devices: Cache<String, Arc<[Platform]>>,
}

/// How long what is known of a user's devices is reused, behind explicit invalidation.
const DEVICES_CACHE_TTL: Duration = Duration::from_secs(60);

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
            devices: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(DEVICES_CACHE_TTL)
                .build(),
        }
    }

    /// Drops cached device knowledge of the users named on `hotpath.devices.changed` until
    /// `shutdown`. Runs for as long as the consumers do.
    pub async fn listen_for_device_changes(&self, shutdown: CancellationToken) {
        let mut changes = loop {
            match self.js.client().subscribe(DEVICES_CHANGED_SUBJECT).await {
                Ok(changes) => break changes,
                Err(error) => {
                    tracing::warn!(%error, "cannot follow device changes; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        };
        loop {
            let change = tokio::select! {
                change = changes.next() => change,
                () = shutdown.cancelled() => return,
            };
            let Some(change) = change else { return };
            let user = serde_json::from_slice::<serde_json::Value>(&change.payload)
                .ok()
                .and_then(|v| v.get("userId")?.as_str().map(str::to_string));
            if let Some(user) = user {
                self.devices.invalidate(&user).await;
            }
        }
    }

    /// The platforms each of `users` has devices on; those without any are left out. Reads
    /// Postgres only for users not known from the last minute.
    async fn platforms(
        &self,
        users: &[&str],
    ) -> Result<HashMap<String, Arc<[Platform]>>, sqlx::Error> {
        let mut known = HashMap::new();
        let mut unknown: Vec<&str> = Vec::new();
        for &user in users {
            match self.devices.get(user).await {
                Some(platforms) => {
                    known.insert(user.to_string(), platforms);
                }
                None => unknown.push(user),
            }
        }
        if !unknown.is_empty() {
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT DISTINCT user_id, platform FROM devices WHERE user_id = ANY($1)",
            )
            .bind(&unknown)
            .fetch_all(&self.pool)
            .await?;
            let mut found: HashMap<&str, Vec<Platform>> =
                unknown.iter().map(|&user| (user, Vec::new())).collect();
            for (user, platform) in &rows {
                if let (Some(list), Some(platform)) =
                    (found.get_mut(user.as_str()), Platform::parse(platform))
                {
                    list.push(platform);
                }
            }
            for (user, platforms) in found {
                let platforms: Arc<[Platform]> = platforms.into();
                self.devices
                    .insert(user.to_string(), platforms.clone())
                    .await;
                known.insert(user.to_string(), platforms);
            }
        }
        known.retain(|_, platforms| !platforms.is_empty());
        Ok(known)
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
        let platforms = self.platforms(&recipients).await?;
        if platforms.is_empty() {
            return Ok(());
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
                for &platform in platforms.iter() {
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
