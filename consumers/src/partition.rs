//! One partition's delivery worker: fetch a batch, persist it, schedule its pushes, copy it
//! into the replay window, acknowledge it, hand what was new to fanout (which runs on its own
//! task, see [`crate::fanout`]), repeat.
//!
//! `MESSAGES` is a work queue (ADR 0004): the acknowledgement removes a message from the
//! stream, so it comes only after the message is in Postgres; what the stream holds is the
//! backlog. The persisted message lives on in the replay window (`REPLAY`, see
//! [`crate::replay_window`]).
//!
//! Exactly one batch is in flight per partition, and the next is fetched only after the
//! previous one is settled, so the stream's order is the persist order. (The consumer's
//! `max_ack_pending` equals the batch size, so even after a crash JetStream hands out nothing
//! past an unsettled batch until it has been redelivered.)
//!
//! A worker that dies with messages in hand (a crash, a lost pull request) leaves them
//! unacknowledged; JetStream would redeliver them only after the ack wait, behind newer
//! messages. So before it fetches, a worker that may follow such a loss (every new worker, and
//! any after a failed fetch) checks the consumer: if anything is still unacknowledged, it
//! rewinds the consumer: deletes it and creates it again with `deliver_policy: all`. In a work
//! queue deleting a consumer leaves its unacknowledged messages in the stream, and `all` starts
//! at the first message still stored, which is the first one not acknowledged; so the worker
//! reads on from there in stream order. What was already stored comes back as a duplicate and
//! is only acknowledged.
//!
//! A worker runs only while its process holds the partition's lease (see [`crate::lease`]),
//! and checks the lease's fence before each fetch and before a rewind, the two things that
//! touch the durable consumer. A worker that has just taken the lease always rewinds: a pull
//! request of the previous holder may still be waiting at the server and would take messages
//! nobody processes, and recreating the consumer drops it.
//!
//! Failures come in two kinds and are treated very differently:
//! * **transient** (Postgres down, timeouts): the batch stays in hand and is retried with
//!   backoff, while JetStream is told the messages are still being worked on
//!   (`AckKind::Progress`), so nothing is redelivered elsewhere, reordered or skipped;
//! * **permanent** (the data itself is refused): the batch is split in halves until the one
//!   message that fails is found; only that message is set aside (negatively acknowledged with
//!   a delay, and moved to the DLQ once it has been delivered `poison_max_deliver` times), so
//!   one bad message never blocks its partition.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

use std::sync::Arc;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind, Message};
use hotpath_core::config::Config;
use hotpath_core::db::is_transient;
use hotpath_core::envelope::Envelope;
use hotpath_core::names::{HISTORY_INVALIDATE_SUBJECT, MESSAGES_STREAM, delivery_consumer};
use hotpath_core::streams::rewind_delivery_consumer;
use opentelemetry::KeyValue;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::dlq::{self, DeadLetter};
use crate::fanout::{self, FanoutQueue};
use crate::fetch;
use crate::lease::Fence;
use crate::metrics::DeliveryMetrics;
use crate::persist::{self, Row};
use crate::push::schedule::PushScheduler;
use crate::replay_window::{self, ReplayWindow};

pub struct PartitionWorker {
    pub partition: u32,
    pub consumer: PullConsumer,
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub config: Arc<Config>,
    pub metrics: DeliveryMetrics,
    pub batch_size: usize,
    pub poison_max_deliver: u64,
    /// Longest pause between retries while Postgres is away; kept well under the ack wait so
    /// the in-progress signal always arrives in time.
    pub max_retry_delay: Duration,
    /// Where newly persisted messages go to be told to connected users.
    pub fanout: FanoutQueue,
    /// Schedules pushes to offline recipients' devices before a batch is acknowledged.
    pub push: PushScheduler,
    /// The partition's lease: checked before the consumer is touched.
    pub fence: Fence,
    /// Copies persisted messages into `REPLAY` before a batch is acknowledged.
    pub replay: ReplayWindow,
}

/// A fetched message whose envelope could be read.
struct Item {
    message: Message,
    envelope: Envelope,
    stream_seq: u64,
    deliveries: i64,
}

/// Sleeps for `delay` (doubling it, up to 5 s) unless shutdown comes first; false on shutdown.
async fn pause(delay: &mut Duration, shutdown: &CancellationToken) -> bool {
    let sleep = *delay;
    *delay = (*delay * 2).min(Duration::from_secs(5));
    tokio::select! {
        () = tokio::time::sleep(sleep) => true,
        () = shutdown.cancelled() => false,
    }
}

enum Settled {
    Done(persist::Outcome),
    Permanent(String),
    ShuttingDown,
}

impl PartitionWorker {
    /// Runs until `shutdown` is cancelled; a batch in hand is settled or handed back first.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        // A new worker may follow one that died with messages in hand, or whose pull request
        // is still waiting at the server.
        let mut resync = true;
        let mut taken_over = true;
        while !shutdown.is_cancelled() {
            if resync {
                match self.resync(taken_over).await {
                    Ok(()) => (resync, taken_over) = (false, false),
                    Err(error) => {
                        tracing::warn!(partition = self.partition, %error, "cannot check the consumer; retrying");
                        if !pause(&mut delay, &shutdown).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            if let Err(lost) = self.fence.check() {
                tracing::warn!(partition = self.partition, %lost, "not fetching");
                break;
            }
            let fetched = tokio::select! {
                fetched = fetch::next_batch(&self.consumer, self.batch_size) => fetched,
                () = shutdown.cancelled() => break,
            };
            if !fetched.messages.is_empty() {
                self.process(fetched.messages, &shutdown).await;
            }
            match fetched.error {
                None => delay = Duration::from_millis(100),
                Some(error) => {
                    // Messages may have been delivered to the failed pull and be lost in
                    // transit: check before fetching past them.
                    tracing::warn!(partition = self.partition, %error, "fetch failed; retrying");
                    resync = true;
                    if !pause(&mut delay, &shutdown).await {
                        break;
                    }
                }
            }
        }
        tracing::info!(partition = self.partition, "partition worker stopped");
    }

    /// If messages are delivered but unacknowledged while this worker holds none, or the
    /// worker has just `taken_over` the lease, rewinds the consumer so that they come back
    /// first and in order.
    async fn resync(&mut self, taken_over: bool) -> anyhow::Result<()> {
        let stream = self.js.get_stream(MESSAGES_STREAM).await?;
        let info = stream
            .consumer_info(delivery_consumer(self.partition))
            .await?;
        if info.num_ack_pending == 0 && !taken_over {
            return Ok(());
        }
        self.fence.check()?;
        let floor = info.ack_floor.stream_sequence;
        if info.num_ack_pending > 0 {
            tracing::warn!(
                partition = self.partition,
                unacknowledged = info.num_ack_pending,
                ack_floor = floor,
                "messages were left in hand; rewinding to the first unacknowledged one to keep stream order"
            );
        } else {
            tracing::info!(
                partition = self.partition,
                ack_floor = floor,
                "new lease holder: recreating the consumer"
            );
        }
        self.consumer = rewind_delivery_consumer(&self.js, self.partition, &self.config).await?;
        Ok(())
    }

    async fn process(&self, batch: Vec<Message>, shutdown: &CancellationToken) {
        let started = Instant::now();
        let size = batch.len();
        let mut items = Vec::with_capacity(size);
        for message in batch {
            let (stream_seq, deliveries) = match message.info() {
                Ok(info) => (info.stream_sequence, info.delivered),
                Err(error) => {
                    tracing::warn!(partition = self.partition, %error, "message without JetStream metadata; skipping");
                    continue;
                }
            };
            match Envelope::decode(&message.payload) {
                Ok(envelope) => items.push(Item {
                    message,
                    envelope,
                    stream_seq,
                    deliveries,
                }),
                // Bytes that are not an envelope never will be: straight to the DLQ.
                Err(error) => {
                    self.dead_letter(&message, stream_seq, deliveries, &error.to_string())
                        .await
                }
            }
        }
        self.metrics
            .step("decode", started.elapsed().as_secs_f64() * 1000.0);

        self.persist_in_order(&items, shutdown).await;
        self.metrics.pipeline_duration_ms.record(
            started.elapsed().as_secs_f64() * 1000.0,
            &[KeyValue::new("partition", self.partition.to_string())],
        );
        tracing::debug!(
            partition = self.partition,
            batch_len = size,
            "settled batch"
        );
    }

    /// Persists the items in stream order, splitting around permanent failures.
    async fn persist_in_order(&self, items: &[Item], shutdown: &CancellationToken) {
        let mut ranges: VecDeque<Range<usize>> = VecDeque::new();
        ranges.push_back(0..items.len());
        while let Some(range) = ranges.pop_front() {
            let slice = &items[range.clone()];
            if slice.is_empty() {
                continue;
            }
            match self.persist_with_retry(slice, shutdown).await {
                Settled::Done(outcome) => self.settle(slice, outcome).await,
                Settled::Permanent(reason) if slice.len() == 1 => {
                    self.poison(&slice[0], &reason).await
                }
                Settled::Permanent(_) => {
                    let middle = range.start + slice.len() / 2;
                    ranges.push_front(middle..range.end);
                    ranges.push_front(range.start..middle);
                }
                Settled::ShuttingDown => {
                    // Hand everything not yet settled back to JetStream for whoever runs next.
                    let unsettled = std::iter::once(range).chain(ranges.drain(..));
                    for item in unsettled.flat_map(|r| &items[r]) {
                        let _ = item
                            .message
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                    }
                    return;
                }
            }
        }
    }

    /// One transaction for the slice; on a transient failure, keeps the slice in hand and
    /// retries with backoff until it succeeds, fails permanently, or the worker shuts down.
    async fn persist_with_retry(&self, slice: &[Item], shutdown: &CancellationToken) -> Settled {
        let rows: Vec<Row<'_>> = slice
            .iter()
            .map(|item| Row {
                envelope: &item.envelope,
                partition: self.partition,
                stream_seq: item.stream_seq,
            })
            .collect();
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0u32;
        loop {
            if attempt > 0 {
                // Each failed attempt itself may take seconds (the pool's acquire timeout):
                // say "still working" right before trying again, too.
                self.in_progress(slice).await;
            }
            attempt += 1;
            let started = Instant::now();
            let result = persist::persist(&self.pool, &rows).await;
            let millis = started.elapsed().as_secs_f64() * 1000.0;
            let status = if result.is_ok() { "success" } else { "error" };
            self.metrics
                .persist_duration_ms
                .record(millis, &[KeyValue::new("status", status)]);
            self.metrics.step("persist", millis);
            match result {
                Ok(outcome) => return Settled::Done(outcome),
                Err(error) if is_transient(&error) => {
                    tracing::warn!(
                        partition = self.partition,
                        batch_len = slice.len(),
                        retry_in_ms = delay.as_millis() as u64,
                        %error,
                        "Postgres unavailable; holding the batch"
                    );
                    self.in_progress(slice).await;
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => return Settled::ShuttingDown,
                    }
                    delay = (delay * 2).min(self.max_retry_delay);
                }
                Err(error) => {
                    tracing::warn!(partition = self.partition, batch_len = slice.len(), %error, "batch refused by Postgres");
                    return Settled::Permanent(error.to_string());
                }
            }
        }
    }

    /// Tells JetStream the slice is still being worked on, restarting its ack wait.
    async fn in_progress(&self, slice: &[Item]) {
        for item in slice {
            let _ = item.message.ack_with(AckKind::Progress).await;
        }
    }

    /// Schedules pushes for what is stored and copies it into the replay window, then
    /// acknowledges it, and the conflicts whose rejection is recorded; sets aside what can
    /// never be stored; then hands the newly stored messages and newly recorded rejections, in
    /// stream (= seq) order, to fanout without waiting on it. Duplicates are not fanned out
    /// again: they were when first stored. Their pushes are scheduled and their copies made
    /// again, because the batch that stored them may have died before doing so; the tasks' and
    /// copies' message ids make that harmless.
    async fn settle(&self, slice: &[Item], outcome: persist::Outcome) {
        let started = Instant::now();
        let mut stored: Vec<usize> = outcome
            .inserted
            .keys()
            .chain(&outcome.duplicates)
            .copied()
            .collect();
        stored.sort_unstable();
        let envelopes: Vec<&Envelope> = stored.iter().map(|&i| &slice[i].envelope).collect();
        self.push.schedule(&envelopes).await;
        self.metrics
            .step("push", started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        let copies = stored
            .iter()
            .map(|&i| replay_window::Copy {
                idempotency_key: &slice[i].envelope.idempotency_key,
                payload: slice[i].message.payload.clone(),
            })
            .collect();
        self.replay.copy(self.partition, copies).await;
        self.metrics
            .step("replay", started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        let now = chrono::Utc::now();
        for index in outcome.inserted.keys() {
            let item = &slice[*index];
            let waited = (now - item.envelope.accepted_at)
                .num_microseconds()
                .unwrap_or(0) as f64
                / 1000.0;
            self.metrics
                .accept_to_persist_ms
                .record(waited.max(0.0), &[]);
            self.ack(&item.message).await;
        }
        for index in outcome
            .duplicates
            .iter()
            .chain(outcome.conflicts.iter().map(|c| &c.index))
        {
            self.ack(&slice[*index].message).await;
        }
        for index in &outcome.orphans {
            self.poison(&slice[*index], "conversation does not exist")
                .await;
        }
        let inserted = outcome.inserted.len() as u64;
        let duplicates = outcome.duplicates.len() as u64;
        let count = |n: u64, status: &'static str, hit: &'static str| {
            if n > 0 {
                self.metrics.persist_total.add(
                    n,
                    &[
                        KeyValue::new("status", status),
                        KeyValue::new("idempotent_hit", hit),
                    ],
                );
            }
        };
        count(inserted, "success", "false");
        count(duplicates, "success", "true");
        // Conflicts are not stored; `idempotent_hit`: an earlier delivery recorded the rejection.
        let rejected_now = outcome.conflicts.iter().filter(|c| c.recorded_now).count() as u64;
        let conflicts = outcome.conflicts.len() as u64;
        count(rejected_now, "conflict", "false");
        count(conflicts - rejected_now, "conflict", "true");
        self.metrics
            .processed(self.partition, "success", inserted + duplicates);
        self.metrics
            .processed(self.partition, "rejected", conflicts);
        self.metrics
            .step("ack", started.elapsed().as_secs_f64() * 1000.0);

        self.invalidate_history(slice, &outcome).await;
        self.fanout
            .hand_off(fanout::told(&outcome, |index| &slice[index].envelope));
    }

    /// Tells the gateways that these conversations have new messages, so cached history pages
    /// of them are dropped. Best effort: a lost announcement is bounded by the cache's TTL.
    async fn invalidate_history(&self, slice: &[Item], outcome: &persist::Outcome) {
        let conversations: std::collections::BTreeSet<uuid::Uuid> = outcome
            .inserted
            .keys()
            .map(|&index| slice[index].envelope.conversation_id)
            .collect();
        let client = self.js.client();
        for conversation_id in conversations {
            let payload = serde_json::json!({ "conversationId": conversation_id }).to_string();
            match client
                .publish(HISTORY_INVALIDATE_SUBJECT, payload.into())
                .await
            {
                Ok(()) => self
                    .metrics
                    .cache_invalidated_total
                    .add(1, &[KeyValue::new("cache_type", "recent_messages")]),
                Err(error) => tracing::debug!(%error, "history invalidation not announced"),
            }
        }
    }

    async fn ack(&self, message: &Message) {
        if let Err(error) = message.ack().await {
            // The message will be redelivered and found already stored: harmless.
            tracing::warn!(partition = self.partition, %error, "ack failed");
        }
    }

    /// A message that cannot be stored: retried later (in case the cause was misjudged) until
    /// it has been delivered `poison_max_deliver` times, then moved to the DLQ.
    async fn poison(&self, item: &Item, reason: &str) {
        self.metrics.persist_total.add(
            1,
            &[
                KeyValue::new("status", "failed"),
                KeyValue::new("idempotent_hit", "false"),
            ],
        );
        if item.deliveries as u64 >= self.poison_max_deliver {
            self.dead_letter(&item.message, item.stream_seq, item.deliveries, reason)
                .await;
        } else {
            tracing::warn!(
                partition = self.partition,
                stream_seq = item.stream_seq,
                deliveries = item.deliveries,
                reason,
                "message refused; will retry"
            );
            let delay = Duration::from_secs(item.deliveries.clamp(1, 30) as u64);
            let _ = item.message.ack_with(AckKind::Nak(Some(delay))).await;
            self.metrics.processed(self.partition, "retry", 1);
        }
    }

    async fn dead_letter(&self, message: &Message, stream_seq: u64, deliveries: i64, reason: &str) {
        let letter = DeadLetter::of(
            message,
            MESSAGES_STREAM,
            "messages",
            stream_seq,
            deliveries,
            reason,
        );
        if dlq::move_message(&self.js, &self.metrics, message, letter).await {
            self.metrics.processed(self.partition, "dead_lettered", 1);
        }
    }
}
