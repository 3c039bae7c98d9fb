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
use hotpath_core::domain::DlqSource;
use hotpath_core::streams::ensure_push_consumer;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, Span};
use uuid::Uuid;

use super::breaker::{Breaker, Permit};
use super::payload::{self, StoredMessage};
use super::{Device, Platform, PushMetrics, PushOutcome, PushSender, PushTask, Senders};
use crate::backoff::{self, Backoff};
use crate::dlq::DeadLetterQueue;
use crate::fetch;
use crate::store::{devices, messages, push_deliveries};

/// How long `push_deliveries` remembers a push: replaying a task older than this may push a
/// device a second time.
const DELIVERIES_RETENTION_DAYS: i32 = 8;
/// How often old `push_deliveries` rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Longest delay a provider's Retry-After may impose on one retry.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// Most tasks whose untried deliveries a worker keeps count of.
const MAX_DEFERRED_TRACKED: usize = 65_536;
/// The wait between tries to set up or pull from the consumer, and the longest look at an
/// open breaker before checking it again.
const PULL_RETRY: Duration = Duration::from_secs(1);
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
    let metrics = PushMetrics::new();
    let dlq = DeadLetterQueue::new(js.clone(), DlqSource::Push);
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
            dlq: dlq.clone(),
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
    metrics: PushMetrics,
    /// `dlq.push`: tasks that will never be sent.
    dlq: DeadLetterQueue,
    /// Per task in hand (stream sequence), how many of its deliveries were handed back untried
    /// (breaker open, Postgres away): its retry schedule counts tries, not deliveries. Lost on
    /// restart, which only makes the schedule shorter; bounded by `MAX_DEFERRED_TRACKED`.
    deferred: Mutex<HashMap<u64, i64>>,
}

/// The devices' answers to one attempt that decide what becomes of the task.
#[derive(Default)]
struct Answers {
    /// Why devices must be tried again.
    retry: Vec<String>,
    /// The longest Retry-After any provider answer asked for.
    retry_after: Option<Duration>,
    /// Why devices refused the push for good.
    rejected: Vec<String>,
}

impl Answers {
    /// A retry if any device needs one (with every reason), else rejected if any device
    /// refused, else done.
    fn into_attempt(mut self) -> Attempt {
        if !self.retry.is_empty() {
            self.retry.extend(self.rejected);
            Attempt::Retry {
                reasons: self.retry.join("; "),
                retry_after: self.retry_after,
            }
        } else if !self.rejected.is_empty() {
            Attempt::Rejected {
                reasons: self.rejected.join("; "),
            }
        } else {
            Attempt::Done
        }
    }
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

impl Attempt {
    /// The `outcome` of the task's `push` span.
    fn label(&self) -> &'static str {
        match self {
            Attempt::Done => "done",
            Attempt::Retry { .. } => "retry",
            Attempt::Rejected { .. } => "rejected",
            Attempt::Unreadable(_) => "unreadable",
        }
    }
}

impl PlatformWorker {
    async fn run(self, shutdown: CancellationToken) {
        let platform = self.platform.as_str();
        let what = format!("the push consumer of {platform}");
        let setup = || ensure_push_consumer(&self.js, self.platform);
        let Some(consumer) =
            backoff::until_set_up(&what, Backoff::fixed(PULL_RETRY), &shutdown, setup).await
        else {
            return;
        };
        let mut pull_retry = Backoff::fixed(PULL_RETRY);
        tracing::info!(platform, "push worker running");
        while !shutdown.is_cancelled() {
            // An open breaker: pull nothing, let the tasks wait in the stream.
            if let Some(wait) = self.breaker.holding_off(Instant::now()) {
                self.metrics.breaker_open(platform, true);
                if !backoff::sleep(wait.min(PULL_RETRY), &shutdown).await {
                    break;
                }
                continue;
            }
            self.metrics.breaker_open(platform, false);
            let fetched = tokio::select! {
                fetched = fetch::next_batch(&consumer, self.concurrency) => fetched,
                () = shutdown.cancelled() => break,
            };
            futures::stream::iter(fetched.messages)
                .for_each_concurrent(self.concurrency, |message| self.handle(message))
                .await;
            if let Some(error) = fetched.error {
                tracing::warn!(platform, %error, "push fetch failed; retrying");
                if !pull_retry.pause(&shutdown).await {
                    break;
                }
            }
        }
        tracing::info!(platform, "push worker stopped");
    }

    /// Handles one push task in its `push` span, which continues the task's trace.
    async fn handle(&self, message: Message) {
        let span = crate::trace::push_span(self.platform.as_str(), message.headers.as_ref());
        self.handle_task(message).instrument(span).await
    }

    async fn handle_task(&self, message: Message) {
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
        Span::current().record("outcome", attempt.label());
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
        Span::current().record("message_id", tracing::field::display(task.message_id));
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

        let mut answers = Answers::default();
        for (device, outcome) in outcomes {
            self.act_on(task, &device, outcome, &mut answers).await;
        }
        answers.into_attempt()
    }

    /// Acts on one device's answer: records a sent push, deletes a dead token, feeds the
    /// breaker, and notes in `answers` what the answer means for the task.
    async fn act_on(
        &self,
        task: &PushTask,
        device: &Device,
        outcome: PushOutcome,
        answers: &mut Answers,
    ) {
        if let Some(label) = outcome.failure_label() {
            self.metrics.failed.add(label, 1);
        }
        match outcome {
            PushOutcome::Sent => {
                self.breaker.success();
                self.metrics.sent.add(self.platform.as_str(), 1);
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
                answers.rejected.push(reason);
            }
            PushOutcome::Retry {
                reason,
                retry_after,
            } => {
                self.provider_failed(&reason);
                answers.retry_after = answers.retry_after.max(retry_after);
                answers.retry.push(reason);
            }
            PushOutcome::Auth { reason } => {
                self.provider_failed(&reason);
                tracing::error!(
                    platform = self.platform.as_str(),
                    reason,
                    "the provider refused our credentials"
                );
                answers.retry.push(reason);
            }
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
        let Some(message) = messages::for_push(&self.pool, task.message_id).await? else {
            tracing::warn!(message_id = %task.message_id, "push task for a message that is not stored; dropped");
            self.metrics.failed.add("message_missing", 1);
            return Ok(None);
        };
        let platform = self.platform;
        let devices =
            devices::not_yet_pushed(&self.pool, &task.user_id, platform, task.message_id).await?;
        if devices.is_empty() {
            return Ok(None);
        }
        let unread =
            messages::unread_recent(&self.pool, task.conversation_id, &task.user_id).await?;
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
        let recorded = push_deliveries::record(&self.pool, message_id, token).await;
        if let Err(error) = recorded {
            tracing::warn!(%error, "could not record a sent push");
        }
    }

    /// Deletes a token the provider says is dead (only if it still belongs to that user: it
    /// may have been registered again, by someone else, meanwhile).
    async fn forget_device(&self, user_id: &str, token: &str) {
        let deleted = devices::delete(&self.pool, user_id, token).await;
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
        let moved = self
            .dlq
            .move_message(message, stream_seq, deliveries, reason)
            .await;
        if moved {
            self.metrics.failed.add("dead_lettered", 1);
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
        let pruned = push_deliveries::prune(&pool, DELIVERIES_RETENTION_DAYS).await;
        match pruned {
            Ok(rows) if rows > 0 => tracing::info!(rows, "pruned old push deliveries"),
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "pruning push deliveries failed"),
        }
    }
}
