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

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use std::sync::Arc;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind, Message};
use hotpath_core::announcements::HistoryChanged;
use hotpath_core::config::Config;
use hotpath_core::db::is_transient;
use hotpath_core::domain::PipelineStep;
use hotpath_core::envelope::Envelope;
use hotpath_core::names::{MESSAGES_STREAM, delivery_consumer};
use hotpath_core::streams::rewind_delivery_consumer;
use hotpath_core::telemetry::meter;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Span;

use crate::backoff::{self, Backoff};
use crate::dlq::DeadLetterQueue;
use crate::fanout::{self, FanoutQueue};
use crate::fetch;
use crate::lease::Fence;
use crate::metrics::{LabelledCounter, StepMetrics, slow_histogram};
use crate::persist::{self, PersistMetrics, Row};
use crate::push::schedule::PushScheduler;
use crate::replay_window::{self, ReplayWindow};
use crate::trace;

pub struct PartitionWorker {
    pub(crate) partition: u32,
    pub(crate) consumer: PullConsumer,
    pub(crate) pool: PgPool,
    pub(crate) js: jetstream::Context,
    pub(crate) config: Arc<Config>,
    pub(crate) metrics: PipelineMetrics,
    pub(crate) persist_metrics: PersistMetrics,
    /// Where messages that can never be stored go.
    pub(crate) dlq: DeadLetterQueue,
    pub(crate) batch_size: usize,
    pub(crate) poison_max_deliver: u64,
    /// Longest pause between retries while Postgres is away; kept well under the ack wait so
    /// the in-progress signal always arrives in time.
    pub(crate) max_retry_delay: Duration,
    /// Where newly persisted messages go to be told to connected users.
    pub(crate) fanout: FanoutQueue,
    /// Schedules pushes to offline recipients' devices before a batch is acknowledged.
    pub(crate) push: PushScheduler,
    /// The partition's lease: checked before the consumer is touched.
    pub(crate) fence: Fence,
    /// Copies persisted messages into `REPLAY` before a batch is acknowledged.
    pub(crate) replay: ReplayWindow,
}

/// A fetched message whose envelope could be read.
struct Item {
    message: Message,
    envelope: Envelope,
    stream_seq: u64,
    deliveries: i64,
    /// Its `persist` span ([`crate::trace`]), open until the batch is settled.
    span: Span,
}

enum Settled {
    Done(persist::Outcome),
    Permanent(String),
    ShuttingDown,
}

impl PartitionWorker {
    /// Runs until `shutdown` is cancelled; a batch in hand is settled or handed back first.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(backoff::INITIAL, backoff::SETUP_MAX);
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
                        if !backoff.pause(&shutdown).await {
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
                None => backoff.reset(),
                Some(error) => {
                    // Messages may have been delivered to the failed pull and be lost in
                    // transit: check before fetching past them.
                    tracing::warn!(partition = self.partition, %error, "fetch failed; retrying");
                    resync = true;
                    if !backoff.pause(&shutdown).await {
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
        let info = match stream
            .consumer_info(delivery_consumer(self.partition))
            .await
        {
            Ok(info) => info,
            // A rewind was cut short after its delete (its answer lost in a leader change):
            // finish it.
            Err(error) if error.kind() == ConsumerInfoErrorKind::NotFound => {
                self.fence.check()?;
                tracing::warn!(
                    partition = self.partition,
                    "the consumer is gone; creating it again"
                );
                self.consumer =
                    rewind_delivery_consumer(&self.js, self.partition, &self.config).await?;
                return Ok(());
            }
            Err(error) => return Err(error.into()),
        };
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
                Ok(envelope) => {
                    let span =
                        trace::persist_span(self.partition, stream_seq, message.headers.as_ref());
                    span.record("message_id", tracing::field::display(envelope.message_id));
                    items.push(Item {
                        message,
                        envelope,
                        stream_seq,
                        deliveries,
                        span,
                    })
                }
                // Bytes that are not an envelope never will be: straight to the DLQ.
                Err(error) => {
                    self.dead_letter(&message, stream_seq, deliveries, &error.to_string())
                        .await
                }
            }
        }
        self.metrics.steps.since(PipelineStep::Decode, started);

        self.persist_in_order(&items, shutdown).await;
        self.metrics.settled_batch(self.partition, started);
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
        let mut backoff = Backoff::new(backoff::INITIAL, self.max_retry_delay);
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
            self.persist_metrics.transaction(millis, result.is_ok());
            self.metrics.steps.step(PipelineStep::Persist, millis);
            match result {
                Ok(outcome) => return Settled::Done(outcome),
                Err(error) if is_transient(&error) => {
                    let delay = backoff.next();
                    tracing::warn!(
                        partition = self.partition,
                        batch_len = slice.len(),
                        retry_in_ms = delay.as_millis() as u64,
                        %error,
                        "Postgres unavailable; holding the batch"
                    );
                    self.in_progress(slice).await;
                    if !backoff::sleep(delay, shutdown).await {
                        return Settled::ShuttingDown;
                    }
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
        let messages: Vec<(&Envelope, &Span)> = stored
            .iter()
            .map(|&i| (&slice[i].envelope, &slice[i].span))
            .collect();
        self.push.schedule(&messages).await;
        self.metrics.steps.since(PipelineStep::Push, started);
        let started = Instant::now();
        let copies = self.window_copies(slice, &stored, &outcome).await;
        self.replay.copy(self.partition, copies).await;
        self.metrics.steps.since(PipelineStep::Replay, started);
        let started = Instant::now();
        let now = chrono::Utc::now();
        for (index, seq) in &outcome.inserted {
            let item = &slice[*index];
            item.span.record("outcome", "stored");
            item.span.record("seq", seq);
            let waited = (now - item.envelope.accepted_at)
                .num_microseconds()
                .unwrap_or(0) as f64
                / 1000.0;
            self.persist_metrics.accepted_to_persisted(waited);
            self.ack(&item.message).await;
        }
        for index in &outcome.duplicates {
            slice[*index].span.record("outcome", "duplicate");
            self.ack(&slice[*index].message).await;
        }
        for conflict in &outcome.conflicts {
            slice[conflict.index].span.record("outcome", "rejected");
            self.ack(&slice[conflict.index].message).await;
        }
        for index in &outcome.orphans {
            self.poison(&slice[*index], "conversation does not exist")
                .await;
        }
        self.persist_metrics.outcome(&outcome);
        let stored = (outcome.inserted.len() + outcome.duplicates.len()) as u64;
        let conflicts = outcome.conflicts.len() as u64;
        self.metrics.processed(self.partition, "success", stored);
        self.metrics
            .processed(self.partition, "rejected", conflicts);
        self.metrics.steps.since(PipelineStep::Ack, started);

        self.invalidate_history(slice, &outcome).await;
        self.fanout.hand_off(fanout::told(&outcome, |index| {
            (&slice[index].envelope, &slice[index].span)
        }));
    }

    /// The replay window copies of the `stored` rows (in stream order), each with where its
    /// row sits: a new row's seq is in the outcome; a duplicate's row is read back (it may
    /// have been stored from another delivery). A duplicate whose row cannot be read now is
    /// not copied again: its first delivery copied it.
    async fn window_copies<'s>(
        &self,
        slice: &'s [Item],
        stored: &[usize],
        outcome: &persist::Outcome,
    ) -> Vec<replay_window::Copy<'s>> {
        let keys: Vec<String> = outcome
            .duplicates
            .iter()
            .map(|&i| slice[i].envelope.idempotency_key.clone())
            .collect();
        let positions = if keys.is_empty() {
            HashMap::new()
        } else {
            persist::positions(&self.pool, &keys)
                .await
                .unwrap_or_else(|error| {
                    tracing::warn!(partition = self.partition, %error, "stored rows of redelivered messages not read; their window copies are not made again");
                    HashMap::new()
                })
        };
        stored
            .iter()
            .filter_map(|&i| {
                let item = &slice[i];
                let key = item.envelope.idempotency_key.as_str();
                let (seq, stream_seq) = match outcome.inserted.get(&i) {
                    Some(&seq) => (seq, item.stream_seq as i64),
                    None => *positions.get(key)?,
                };
                Some(replay_window::Copy {
                    idempotency_key: key,
                    payload: item.message.payload.clone(),
                    seq,
                    stream_seq,
                })
            })
            .collect()
    }

    /// Tells the gateways that these conversations have new messages, so cached history pages
    /// of them are dropped. Best effort: a lost announcement is bounded by the cache's TTL.
    async fn invalidate_history(&self, slice: &[Item], outcome: &persist::Outcome) {
        let mut conversations = std::collections::BTreeMap::<uuid::Uuid, Option<i64>>::new();
        for (&index, &seq) in &outcome.inserted {
            let last = conversations
                .entry(slice[index].envelope.conversation_id)
                .or_default();
            *last = (*last).max(Some(seq));
        }
        let announced = HistoryChanged::announce_all(&self.js.client(), conversations).await;
        self.metrics
            .cache_invalidated
            .add("recent_messages", announced);
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
        self.persist_metrics.refused();
        item.span.record("outcome", "refused");
        if item.deliveries as u64 >= self.poison_max_deliver {
            self.dead_letter(&item.message, item.stream_seq, item.deliveries, reason)
                .await;
        } else {
            item.span.in_scope(|| {
                tracing::warn!(
                    partition = self.partition,
                    stream_seq = item.stream_seq,
                    deliveries = item.deliveries,
                    reason,
                    "message refused; will retry"
                )
            });
            let delay = Duration::from_secs(item.deliveries.clamp(1, 30) as u64);
            let _ = item.message.ack_with(AckKind::Nak(Some(delay))).await;
            self.metrics.processed(self.partition, "retry", 1);
        }
    }

    async fn dead_letter(&self, message: &Message, stream_seq: u64, deliveries: i64, reason: &str) {
        let moved = self
            .dlq
            .move_message(message, stream_seq, deliveries, reason)
            .await;
        if moved {
            self.metrics.processed(self.partition, "dead_lettered", 1);
        }
    }
}

/// The partition workers' own metrics: `delivery_pipeline_processed_total{partition, status}`,
/// `delivery_pipeline_duration_ms{partition}`, the steps of a batch and
/// `delivery_cache_invalidated_total{cache_type}`.
#[derive(Clone)]
pub(crate) struct PipelineMetrics {
    processed_total: Counter<u64>,
    duration_ms: Histogram<f64>,
    pub steps: StepMetrics,
    pub cache_invalidated: LabelledCounter,
}

impl PipelineMetrics {
    /// Shares `steps` with fanout, which records its own step.
    pub fn new(steps: StepMetrics) -> PipelineMetrics {
        let meter = meter();
        PipelineMetrics {
            processed_total: meter
                .u64_counter("delivery_pipeline_processed_total")
                .with_description(
                    "Messages settled by the delivery pipeline, by partition and status",
                )
                .build(),
            duration_ms: slow_histogram(
                &meter,
                "delivery_pipeline_duration_ms",
                "From fetching a batch to acknowledging it",
            ),
            steps,
            cache_invalidated: LabelledCounter::new(
                &meter,
                "delivery_cache_invalidated_total",
                "cache_type",
                "Cache invalidations announced to the gateways, by cache type",
            ),
        }
    }

    /// A batch of `partition`, fetched at `started`, is settled.
    fn settled_batch(&self, partition: u32, started: Instant) {
        self.duration_ms.record(
            started.elapsed().as_secs_f64() * 1000.0,
            &[KeyValue::new("partition", partition.to_string())],
        );
    }

    /// `count` messages of `partition` settled with `status`.
    fn processed(&self, partition: u32, status: &'static str, count: u64) {
        if count > 0 {
            self.processed_total.add(
                count,
                &[
                    KeyValue::new("partition", partition.to_string()),
                    KeyValue::new("status", status),
                ],
            );
        }
    }
}
