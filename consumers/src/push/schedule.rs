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

use async_nats::HeaderMap;
use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use hotpath_core::announcements::{Announcement, DevicesChanged};
use hotpath_core::envelope::Envelope;
use hotpath_core::names::{DEVICES_CHANGED_SUBJECT, push_subject, push_task_msg_id};
use moka::future::Cache;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Span;

use super::{Platform, PushMetrics, PushTask};
use crate::backoff::{self, Backoff};
use crate::presence::PresenceLookup;
use crate::store::devices;

/// Longest the scheduling step may hold up a batch's acknowledgement.
const SCHEDULE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct PushScheduler {
    pool: PgPool,
    js: jetstream::Context,
    presence: PresenceLookup,
    metrics: PushMetrics,
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
    pub fn new(pool: PgPool, js: jetstream::Context, presence: PresenceLookup) -> PushScheduler {
        PushScheduler {
            pool,
            js,
            presence,
            metrics: PushMetrics::new(),
            devices: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(DEVICES_CACHE_TTL)
                .build(),
        }
    }

    /// Drops cached device knowledge of the users named on `hotpath.devices.changed` until
    /// `shutdown`. Runs for as long as the consumers do.
    pub async fn listen_for_device_changes(&self, shutdown: CancellationToken) {
        let client = self.js.client();
        let subscribe = || async { Ok(client.subscribe(DEVICES_CHANGED_SUBJECT).await?) };
        let backoff = Backoff::fixed(Duration::from_secs(1));
        let what = "the device changes subscription";
        let Some(mut changes) = backoff::until_set_up(what, backoff, &shutdown, subscribe).await
        else {
            return;
        };
        loop {
            let change = tokio::select! {
                change = changes.next() => change,
                () = shutdown.cancelled() => return,
            };
            let Some(change) = change else { return };
            if let Ok(changed) = DevicesChanged::decode(&change.payload) {
                self.devices.invalidate(&changed.user_id).await;
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
            let rows = devices::platforms_of(&self.pool, &unknown).await?;
            let mut found: HashMap<&str, Vec<Platform>> =
                unknown.iter().map(|&user| (user, Vec::new())).collect();
            for (user, platform) in &rows {
                if let Some(list) = found.get_mut(user.as_str()) {
                    list.push(*platform);
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

    /// Schedules the pushes of `messages` (stored by this batch or before it; each with its
    /// `persist` span, whose trace the task continues). Never fails: what could not be
    /// scheduled is logged and counted.
    pub async fn schedule(&self, messages: &[(&Envelope, &Span)]) {
        if messages.is_empty() {
            return;
        }
        match tokio::time::timeout(SCHEDULE_TIMEOUT, self.try_schedule(messages)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = format!("{error:#}"), "push scheduling failed");
                self.metrics.failed.add("enqueue_failed", 1);
            }
            Err(_) => {
                tracing::warn!("push scheduling timed out");
                self.metrics.failed.add("enqueue_timeout", 1);
            }
        }
    }

    /// Publishes a task per offline recipient with devices and platform they have devices
    /// on, then counts what the stream stored.
    async fn try_schedule(&self, messages: &[(&Envelope, &Span)]) -> anyhow::Result<()> {
        let recipients = recipients(messages);
        if recipients.is_empty() {
            return Ok(());
        }
        let platforms = self.platforms(&recipients).await?;
        if platforms.is_empty() {
            return Ok(());
        }
        let offline = self.offline(platforms.keys().cloned()).await;

        let mut acks = Vec::new();
        for &(envelope, span) in messages {
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
                    let mut headers = HeaderMap::new();
                    let msg_id =
                        push_task_msg_id(&envelope.message_id.to_string(), recipient, platform);
                    headers.insert(NATS_MESSAGE_ID, msg_id);
                    hotpath_core::trace::inject(span, &mut headers);
                    let message = PublishMessage::build()
                        .payload(serde_json::to_vec(&task)?.into())
                        .headers(headers);
                    let ack = self
                        .js
                        .send_publish(push_subject(platform), message)
                        .await?;
                    acks.push((*why, ack));
                }
            }
        }
        self.count_stored(acks).await;
        Ok(())
    }

    /// Who of `users` is offline now, and why they count as such.
    async fn offline(&self, users: impl IntoIterator<Item = String>) -> HashMap<String, Why> {
        self.presence
            .sockets_of(users)
            .await
            .into_iter()
            .filter_map(|(user_id, sockets)| match sockets {
                Ok(0) => Some((user_id, Why::Offline)),
                Ok(_) => None,
                Err(_) => Some((user_id, Why::PresenceUnknown)),
            })
            .collect()
    }

    /// Awaits the stream's acknowledgement of each task published, counting the new ones.
    async fn count_stored(&self, acks: Vec<(Why, PublishAckFuture)>) {
        for (why, ack) in acks {
            match ack.await {
                // A second copy of a task (a batch processed again) is not a new push.
                Ok(ack) if ack.duplicate => {}
                Ok(_) => self.metrics.enqueued.add(why.label(), 1),
                Err(error) => {
                    tracing::warn!(%error, "push task not stored");
                    self.metrics.failed.add("enqueue_failed", 1);
                }
            }
        }
    }
}

/// The recipients of `messages` other than their senders, each once, in a stable order.
fn recipients<'a>(messages: &[(&'a Envelope, &Span)]) -> Vec<&'a str> {
    let recipients: BTreeSet<&str> = messages
        .iter()
        .flat_map(|&(envelope, _)| {
            envelope
                .recipient_ids
                .iter()
                .filter(|r| **r != envelope.sender_id)
                .map(String::as_str)
        })
        .collect();
    recipients.into_iter().collect()
}
