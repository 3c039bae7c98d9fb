//! The push workers: one per platform with credentials, each on its own durable consumer
//! (`push-apns`, `push-fcm`) of the `PUSH` work-queue stream.
//!
//! For a task, the worker reads the message and the recipient's devices of that platform
//! from Postgres, leaving out devices that already got this message (`push_deliveries`, so a
//! retried or replayed task never pushes a device twice), builds the notification and sends
//! it to every device at once. Each answer is acted on:
//!
//! | answer | device | task |
//! | --- | --- | --- |
//! | sent | recorded in `push_deliveries` | done when all are done |
//! | invalid token (APNS 410 / 400 BadDeviceToken, FCM UNREGISTERED / bad token) | deleted | not retried for it |
//! | unavailable, rate limited, timed out, auth refused | kept | retried after 1 s, 5 s, 30 s (or the provider's Retry-After, if later), then `DLQ` |
//! | refused for good (payload too large, …) | kept | `DLQ` |
//!
//! Retries are negative acknowledgements with a delay, so a waiting task holds no worker.
//! The consumer's `max_deliver` is unlimited: the worker moves a task to `DLQ` itself, with
//! the provider's answers in the headers, which JetStream's own limit would not do.
//!
//! Provider failures also feed the platform's [`Breaker`]: while it is open the worker pulls
//! nothing, and tasks already in hand go back with a delay without being tried (and without
//! that counting as one of their tries).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, Message};
use chrono::Utc;
use futures::StreamExt;
use hotpath_core::config::Config;
use hotpath_core::names::PUSH_STREAM;
use hotpath_core::streams::ensure_push_consumer;
use opentelemetry::KeyValue;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::breaker::{Breaker, Permit};
use super::payload::{self, StoredMessage};
use super::{Device, Platform, PushOutcome, PushSender, PushTask, Senders};
use crate::dlq::{self, DeadLetter};
use crate::fetch;
use crate::metrics::DeliveryMetrics;

/// How long `push_deliveries` remembers a push: replaying a task older than this may push a
/// device a second time.
const DELIVERIES_RETENTION_DAYS: i32 = 8;
/// How often old `push_deliveries` rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Longest delay a provider's Retry-After may impose on one retry.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// Most tasks whose untried deliveries a worker keeps count of.
const MAX_DEFERRED_TRACKED: usize = 65_536;
/// Delay for a task that could not be looked at (Postgres unavailable).
const STORAGE_RETRY: Duration = Duration::from_secs(5);

/// Runs a push worker for every platform in `senders` until `shutdown`. Platforms without a
/// sender are left alone: their tasks wait in the stream, up to its max age.
pub async fn run(
    config: &Config,
    nats: async_nats::Client,
    pool: PgPool,
    senders: Senders,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let js = jetstream::new(nats);
    let metrics = DeliveryMetrics::new();
    for platform in Platform::ALL {
        if !senders.contains_key(&platform) {
            tracing::info!(
                %platform,
                "no {platform} credentials configured: its push tasks wait in the PUSH stream"
            );
        }
    }
    let mut workers = JoinSet::new();
    if !senders.is_empty() {
        workers.spawn(prune_deliveries(pool.clone(), shutdown.clone()));
    }
    for (platform, sender) in senders {
        let worker = PlatformWorker {
            platform,
            sender,
            pool: pool.clone(),
            js: js.clone(),
            breaker: Breaker::new(config.push_breaker_failures, config.push_breaker_open()),
            backoff: config.push_backoff_ms.0.clone(),
            concurrency: config.push_concurrency.max(1),
            ttl: config.push_ttl(),
            attempt_timeout: config.push_request_timeout() + Duration::from_secs(10),
            metrics: metrics.clone(),
            deferred: Mutex::new(HashMap::new()),
        };
        let shutdown = shutdown.clone();
        workers.spawn(async move { worker.run(shutdown).await });
    }
    shutdown.cancelled().await;
    while let Some(joined) = workers.join_next().await {
        if let Err(error) = joined {
            anyhow::bail!("a push worker panicked: {error}");
        }
    }
    Ok(())
}

struct PlatformWorker {
    platform: Platform,
    sender: Arc<dyn PushSender>,
    pool: PgPool,
    js: jetstream::Context,
    breaker: Breaker,
    backoff: Vec<Duration>,
    concurrency: usize,
    ttl: Duration,
    /// Backstop on one attempt at a task (reading Postgres and every device's request).
    attempt_timeout: Duration,
    metrics: DeliveryMetrics,
    /// Per task in hand (stream sequence), how many of its deliveries were handed back untried
    /// (breaker open, Postgres away): its retry schedule counts tries, not deliveries. Lost on
    /// restart, which only makes the schedule shorter; bounded by `MAX_DEFERRED_TRACKED`.
    deferred: Mutex<HashMap<u64, i64>>,
}

/// What one attempt at a task came to.
enum Attempt {
    /// Every device got it, or has gone: the task is done.
    Done,
    /// Some devices must be tried again (the worst answer among them, with the longest
    /// Retry-After any of them asked for).
    Retry {
        reasons: String,
        retry_after: Option<Duration>,
    },
    /// Some devices refused it for good and none needs a retry.
    Rejected { reasons: String },
    /// Postgres could not be read; nothing was sent.
    Unreadable(String),
}

impl PlatformWorker {
    async fn run(self, shutdown: CancellationToken) {
        let platform = self.platform.as_str();
        let consumer = loop {
            match ensure_push_consumer(&self.js, platform).await {
                Ok(consumer) => break consumer,
                Err(error) => tracing::warn!(
                    platform,
                    error = format!("{error:#}"),
                    "cannot set up the push consumer; retrying"
                ),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return,
            }
        };
        tracing::info!(platform, "push worker running");
        let label = [KeyValue::new("platform", platform)];
        while !shutdown.is_cancelled() {
            // An open breaker: pull nothing, let the tasks wait in the stream.
            if let Some(wait) = self.breaker.holding_off(Instant::now()) {
                self.metrics.push_breaker_open.record(1, &label);
                tokio::select! {
                    () = tokio::time::sleep(wait.min(Duration::from_secs(1))) => {}
                    () = shutdown.cancelled() => break,
                }
                continue;
            }
            self.metrics.push_breaker_open.record(0, &label);
            let fetched = tokio::select! {
                fetched = fetch::next_batch(&consumer, self.concurrency) => fetched,
                () = shutdown.cancelled() => break,
            };
            futures::stream::iter(fetched.messages)
                .for_each_concurrent(self.concurrency, |message| self.handle(message))
                .await;
            if let Some(error) = fetched.error {
                tracing::warn!(platform, %error, "push fetch failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.cancelled() => break,
                }
            }
        }
        tracing::info!(platform, "push worker stopped");
    }

    async fn handle(&self, message: Message) {
        let (stream_seq, deliveries) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(error) => {
                tracing::warn!(%error, "push task without JetStream metadata; skipping");
                return;
            }
        };
        let task: PushTask = match serde_json::from_slice(&message.payload) {
            Ok(task) => task,
            Err(error) => {
                let reason = format!("not a push task: {error}");
                self.dead_letter(&message, stream_seq, deliveries, &reason)
                    .await;
                return;
            }
        };
        if let Permit::Wait(wait) = self.breaker.permit(Instant::now()) {
            // Not tried: back to the stream until the provider may be up again, without
            // spending one of its retries.
            self.defer(stream_seq, &message, wait.max(Duration::from_secs(1)))
                .await;
            return;
        }
        // The provider's tries so far, this one included: deliveries that were only deferred
        // do not count.
        let tries = deliveries - self.deferrals(stream_seq);
        let attempt = match tokio::time::timeout(self.attempt_timeout, self.attempt(&task)).await {
            Ok(attempt) => attempt,
            Err(_) => {
                let reasons = format!("{} attempt timed out", self.platform);
                self.provider_failed(&reasons);
                Attempt::Retry {
                    reasons,
                    retry_after: None,
                }
            }
        };
        match attempt {
            Attempt::Done => {
                self.forget_deferrals(stream_seq);
                self.ack(&message).await
            }
            Attempt::Unreadable(error) => {
                tracing::warn!(%error, "push task: Postgres unavailable; will retry");
                self.defer(stream_seq, &message, STORAGE_RETRY).await;
            }
            Attempt::Retry {
                reasons,
                retry_after,
            } => match self.backoff.get(usize::try_from(tries - 1).unwrap_or(0)) {
                Some(&delay) => {
                    // Later if the provider asked for more time, within reason.
                    let delay =
                        retry_after.map_or(delay, |asked| delay.max(asked.min(MAX_RETRY_AFTER)));
                    tracing::info!(
                        platform = self.platform.as_str(),
                        message_id = %task.message_id,
                        tries,
                        retry_in_ms = delay.as_millis() as u64,
                        reasons,
                        "push failed; will retry"
                    );
                    self.nak(&message, delay).await;
                }
                None => {
                    self.dead_letter(&message, stream_seq, deliveries, &reasons)
                        .await
                }
            },
            Attempt::Rejected { reasons } => {
                self.dead_letter(&message, stream_seq, deliveries, &reasons)
                    .await
            }
        }
    }

    /// Reads what to send and to whom, sends it, and acts on each device's answer.
    async fn attempt(&self, task: &PushTask) -> Attempt {
        let (message, devices, badge) = match self.read(task).await {
            Ok(Some(read)) => read,
            Ok(None) => {
                self.breaker.release(Instant::now());
                return Attempt::Done;
            }
            Err(error) => {
                self.breaker.release(Instant::now());
                return Attempt::Unreadable(error.to_string());
            }
        };
        let notification = payload::notification(&message, badge, self.ttl, Utc::now());
        let outcomes: Vec<(Device, PushOutcome)> =
            futures::future::join_all(devices.into_iter().map(|device| {
                let notification = &notification;
                async move {
                    let outcome = self.sender.send(&device, notification).await;
                    (device, outcome)
                }
            }))
            .await;

        let mut retry: Vec<String> = Vec::new();
        let mut retry_after: Option<Duration> = None;
        let mut rejected: Vec<String> = Vec::new();
        for (device, outcome) in outcomes {
            if let Some(label) = outcome.failure_label() {
                self.metrics.push_failed(label, 1);
            }
            match outcome {
                PushOutcome::Sent => {
                    self.breaker.success();
                    self.metrics.push_sent(self.platform.as_str());
                    self.record_sent(task.message_id, &device.token).await;
                }
                PushOutcome::InvalidToken { reason } => {
                    self.breaker.success();
                    tracing::info!(
                        platform = self.platform.as_str(),
                        user_id = task.user_id,
                        reason,
                        "device token no longer valid; device removed"
                    );
                    self.forget_device(&task.user_id, &device.token).await;
                }
                PushOutcome::Rejected { reason } => {
                    self.breaker.success();
                    rejected.push(reason);
                }
                PushOutcome::Retry {
                    reason,
                    retry_after: asked,
                } => {
                    self.provider_failed(&reason);
                    retry_after = retry_after.max(asked);
                    retry.push(reason);
                }
                PushOutcome::Auth { reason } => {
                    self.provider_failed(&reason);
                    tracing::error!(
                        platform = self.platform.as_str(),
                        reason,
                        "the provider refused our credentials"
                    );
                    retry.push(reason);
                }
            }
        }
        if !retry.is_empty() {
            retry.extend(rejected);
            Attempt::Retry {
                reasons: retry.join("; "),
                retry_after,
            }
        } else if !rejected.is_empty() {
            Attempt::Rejected {
                reasons: rejected.join("; "),
            }
        } else {
            Attempt::Done
        }
    }

    fn provider_failed(&self, reason: &str) {
        if self.breaker.failure(Instant::now()) {
            tracing::warn!(
                platform = self.platform.as_str(),
                reason,
                "push provider failing: circuit breaker open, tasks wait in the stream"
            );
        }
    }

    /// The message, the devices still to push, and the recipient's unread count in the
    /// conversation; `None` when there is nothing to send.
    async fn read(
        &self,
        task: &PushTask,
    ) -> Result<Option<(StoredMessage, Vec<Device>, Option<u32>)>, sqlx::Error> {
        let message: Option<StoredMessage> = sqlx::query_as(
            "SELECT m.id AS message_id, m.conversation_id, m.seq, m.sender_id, m.content,
                    m.content_type, m.priority, c.push_preview
               FROM messages m JOIN conversations c ON c.id = m.conversation_id
              WHERE m.id = $1",
        )
        .bind(task.message_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(message) = message else {
            tracing::warn!(message_id = %task.message_id, "push task for a message that is not stored; dropped");
            self.metrics.push_failed("message_missing", 1);
            return Ok(None);
        };
        let devices: Vec<(String, String, bool)> = sqlx::query_as(
            "SELECT d.token, d.app_id, d.sandbox FROM devices d
              WHERE d.user_id = $1 AND d.platform = $2
                AND NOT EXISTS (SELECT 1 FROM push_deliveries p
                                 WHERE p.message_id = $3 AND p.token = d.token)
              ORDER BY d.updated_at DESC",
        )
        .bind(&task.user_id)
        .bind(self.platform.as_str())
        .bind(task.message_id)
        .fetch_all(&self.pool)
        .await?;
        if devices.is_empty() {
            return Ok(None);
        }
        // Unread: of the conversation's latest 100 messages, those addressed to the recipient
        // that they have not read. Bounded, so a long history costs nothing.
        let (unread,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM (
                 SELECT id, recipient_ids FROM messages
                  WHERE conversation_id = $1 ORDER BY seq DESC LIMIT 100) recent
              WHERE $2 = ANY(recent.recipient_ids)
                AND NOT EXISTS (SELECT 1 FROM message_receipts r
                                 WHERE r.message_id = recent.id AND r.user_id = $2
                                   AND r.read_at IS NOT NULL)",
        )
        .bind(task.conversation_id)
        .bind(&task.user_id)
        .fetch_one(&self.pool)
        .await?;
        let devices = devices
            .into_iter()
            .map(|(token, app_id, sandbox)| Device {
                token,
                platform: self.platform,
                app_id,
                sandbox,
            })
            .collect();
        Ok(Some((message, devices, u32::try_from(unread).ok())))
    }

    /// Remembers that `token` got `message_id`. If this fails the device may get the message
    /// twice should the task be retried; the notification's collapse id folds the two.
    async fn record_sent(&self, message_id: Uuid, token: &str) {
        let recorded = sqlx::query(
            "INSERT INTO push_deliveries (message_id, token) VALUES ($1, $2)
             ON CONFLICT DO NOTHING",
        )
        .bind(message_id)
        .bind(token)
        .execute(&self.pool)
        .await;
        if let Err(error) = recorded {
            tracing::warn!(%error, "could not record a sent push");
        }
    }

    /// Deletes a token the provider says is dead (only if it still belongs to that user: it
    /// may have been registered again, by someone else, meanwhile).
    async fn forget_device(&self, user_id: &str, token: &str) {
        let deleted = sqlx::query("DELETE FROM devices WHERE token = $1 AND user_id = $2")
            .bind(token)
            .bind(user_id)
            .execute(&self.pool)
            .await;
        if let Err(error) = deleted {
            tracing::warn!(%error, "could not delete an invalid device token");
        }
    }

    async fn ack(&self, message: &Message) {
        if let Err(error) = message.ack().await {
            // Redelivered later; the devices already pushed are skipped then.
            tracing::warn!(%error, "push task ack failed");
        }
    }

    /// Hands a task back untried, for `delay`, remembering that this delivery was not a try.
    async fn defer(&self, stream_seq: u64, message: &Message, delay: Duration) {
        {
            let mut deferred = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
            // Tasks finished by another replica leave their entries here; far beyond what one
            // worker can hold, start over (which only shortens some schedules).
            if deferred.len() >= MAX_DEFERRED_TRACKED {
                deferred.clear();
            }
            *deferred.entry(stream_seq).or_default() += 1;
        }
        self.nak(message, delay).await;
    }

    fn deferrals(&self, stream_seq: u64) -> i64 {
        let deferred = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
        deferred.get(&stream_seq).copied().unwrap_or(0)
    }

    fn forget_deferrals(&self, stream_seq: u64) {
        let mut deferred = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
        deferred.remove(&stream_seq);
    }

    async fn nak(&self, message: &Message, delay: Duration) {
        if let Err(error) = message.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::warn!(%error, "push task nak failed; it comes back after the ack wait");
        }
    }

    async fn dead_letter(&self, message: &Message, stream_seq: u64, deliveries: i64, reason: &str) {
        self.forget_deferrals(stream_seq);
        let letter = DeadLetter::of(message, PUSH_STREAM, "push", stream_seq, deliveries, reason);
        if dlq::move_message(&self.js, &self.metrics, message, letter).await {
            self.metrics.push_failed("dead_lettered", 1);
        }
    }
}

/// Deletes `push_deliveries` rows past their retention, now and then every hour.
async fn prune_deliveries(pool: PgPool, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let pruned = sqlx::query(
            "DELETE FROM push_deliveries WHERE sent_at < now() - make_interval(days => $1)",
        )
        .bind(DELIVERIES_RETENTION_DAYS)
        .execute(&pool)
        .await;
        match pruned {
            Ok(done) if done.rows_affected() > 0 => {
                tracing::info!(rows = done.rows_affected(), "pruned old push deliveries")
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "pruning push deliveries failed"),
        }
    }
}
