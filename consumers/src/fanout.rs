//! Step 2 of delivery: telling connected devices, once a batch is persisted and acknowledged.
//!
//! For every newly stored message (never a duplicate: a replay is told nothing twice), each
//! recipient gets `message.new` and the sender gets `message.state.changed` (`sent`, with the
//! seq), published on NATS core to `deliver.user.<id>`, where the socket nodes holding the
//! user's WebSockets listen. For every newly recorded rejection (a key reused for a different
//! request after the stream's window, see [`crate::persist`]) only the sender is told:
//! `message.state.changed` with `rejected` and the reason; the status route says the same,
//! durably, for a sender who was not connected.
//!
//! Live delivery is best effort by design; what makes it complete is catch-up: a client that
//! (re)connects subscribes first and then asks for everything after its last seq (`sync`), so
//! a frame lost here is found there. Hence:
//! * fanout runs after the batch is committed and acknowledged, on its own task per partition
//!   (so one partition's messages go out in seq order), fed through a bounded queue: when NATS
//!   is slow the queue fills and fanout of further batches is dropped and counted, never
//!   holding up persistence or acks;
//! * presence (`hotpath_core::presence`, cached for a second) decides whether a recipient is
//!   counted online, with how many sockets, or offline (their devices were already given a
//!   push task before the batch was acknowledged, see [`crate::push::schedule`]). Offline
//!   recipients are still published to: presence may be up to a cache period behind a device
//!   that just connected, and a publish nobody listens to costs NATS next to nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use hotpath_core::envelope::Envelope;
use hotpath_core::events::{DeliveredMessage, Event, MessageState};
use hotpath_core::names::deliver_subject;
use hotpath_core::presence::Presence;
use hotpath_core::rejection::Rejection;
use moka::future::Cache;
use tokio::sync::{OnceCell, mpsc};

use crate::metrics::DeliveryMetrics;
use crate::persist;

/// Batches waiting for fanout per partition before further ones are dropped.
const QUEUE: usize = 64;
/// How long a presence answer is reused.
const PRESENCE_CACHE_TTL: Duration = Duration::from_secs(1);
/// Presence lookups in flight at once for one message's recipients.
const LOOKUP_CONCURRENCY: usize = 32;
/// Longest wait to hand one publish to the NATS client (it only waits when the client's own
/// buffer is full, i.e. NATS is unreachable).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

/// What a settled batch tells connected users about one of its messages.
pub enum Told {
    /// Newly stored with this seq: `message.new` to the recipients, `sent` to the sender.
    Persisted { envelope: Envelope, seq: i64 },
    /// Refused for good, its rejection newly recorded: `rejected` to the sender.
    Rejected {
        envelope: Envelope,
        reason: Rejection,
    },
}

/// What to tell of a settled batch, in stream (= seq) order: the newly stored messages and
/// the newly recorded rejections (`envelope_of` finds a row's envelope by its batch index).
pub fn told<'a>(
    outcome: &persist::Outcome,
    envelope_of: impl Fn(usize) -> &'a Envelope,
) -> Vec<Told> {
    let mut told: Vec<(usize, Told)> = outcome
        .inserted
        .iter()
        .map(|(&index, &seq)| {
            let envelope = envelope_of(index).clone();
            (index, Told::Persisted { envelope, seq })
        })
        .chain(
            outcome
                .conflicts
                .iter()
                .filter(|conflict| conflict.recorded_now)
                .map(|conflict| {
                    let envelope = envelope_of(conflict.index).clone();
                    let reason = conflict.rejection();
                    (conflict.index, Told::Rejected { envelope, reason })
                }),
        )
        .collect();
    told.sort_unstable_by_key(|(index, _)| *index);
    told.into_iter().map(|(_, told)| told).collect()
}

/// Where a partition worker hands settled batches; never waits.
#[derive(Clone)]
pub struct FanoutQueue {
    partition: u32,
    batches: mpsc::Sender<Vec<Told>>,
    metrics: DeliveryMetrics,
}

impl FanoutQueue {
    pub fn hand_off(&self, batch: Vec<Told>) {
        if batch.is_empty() {
            return;
        }
        if let Err(refused) = self.batches.try_send(batch) {
            let dropped = match &refused {
                mpsc::error::TrySendError::Full(batch)
                | mpsc::error::TrySendError::Closed(batch) => batch.len(),
            };
            tracing::warn!(
                partition = self.partition,
                dropped,
                "fanout is behind; these messages are left to catch-up"
            );
            self.metrics.fanout_failed("backlog", dropped as u64);
        }
    }
}

/// Who is online, from the `PRESENCE` bucket, with answers kept for a second. Shared by all
/// partitions of a process.
#[derive(Clone)]
pub struct PresenceLookup {
    js: async_nats::jetstream::Context,
    ttl: Duration,
    bucket: Arc<OnceCell<Presence>>,
    cache: Cache<String, u32>,
}

impl PresenceLookup {
    pub fn new(js: async_nats::jetstream::Context, ttl: Duration) -> PresenceLookup {
        PresenceLookup {
            js,
            ttl,
            bucket: Arc::new(OnceCell::new()),
            cache: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(PRESENCE_CACHE_TTL)
                .build(),
        }
    }

    /// The user's open sockets on live nodes (0: offline). Concurrent lookups of one user
    /// share one read.
    pub(crate) async fn sockets(&self, user_id: &str) -> Result<u32, Arc<anyhow::Error>> {
        self.cache
            .try_get_with_by_ref(user_id, async {
                // Opened on first use: the consumers persist whether or not presence works.
                let bucket = self
                    .bucket
                    .get_or_try_init(|| Presence::open(&self.js, self.ttl))
                    .await?;
                bucket.live_sockets(user_id).await
            })
            .await
    }
}

/// Starts the fanout task of `partition`; it ends when the returned queue is dropped.
pub fn spawn(
    partition: u32,
    nats: async_nats::Client,
    presence: PresenceLookup,
    metrics: DeliveryMetrics,
) -> FanoutQueue {
    let (batches, mut receiver) = mpsc::channel::<Vec<Told>>(QUEUE);
    let fanout = Fanout {
        partition,
        nats,
        presence,
        metrics: metrics.clone(),
    };
    tokio::spawn(async move {
        while let Some(batch) = receiver.recv().await {
            let started = Instant::now();
            for item in &batch {
                match item {
                    Told::Persisted { envelope, seq } => fanout.message(envelope, *seq).await,
                    Told::Rejected { envelope, reason } => fanout.rejected(envelope, reason).await,
                }
            }
            fanout
                .metrics
                .step("fanout", started.elapsed().as_secs_f64() * 1000.0);
        }
    });
    FanoutQueue {
        partition,
        batches,
        metrics,
    }
}

struct Fanout {
    partition: u32,
    nats: async_nats::Client,
    presence: PresenceLookup,
    metrics: DeliveryMetrics,
}

impl Fanout {
    async fn message(&self, envelope: &Envelope, seq: i64) {
        let new = Bytes::from(
            Event::MessageNew {
                message: DeliveredMessage {
                    message_id: envelope.message_id,
                    conversation_id: envelope.conversation_id,
                    seq,
                    sender_id: envelope.sender_id.clone(),
                    content: envelope.content.clone(),
                    content_type: envelope.content_type.clone(),
                    metadata: envelope.metadata.clone(),
                    accepted_at: envelope.accepted_at,
                },
            }
            .to_json(),
        );
        // Owned values in the lookups keep the future `Send` for the spawned task.
        let presence: Vec<(String, Result<u32, Arc<anyhow::Error>>)> =
            futures::stream::iter(envelope.recipient_ids.clone())
                .map(|recipient| {
                    let lookup = self.presence.clone();
                    async move {
                        let sockets = lookup.sockets(&recipient).await;
                        (recipient, sockets)
                    }
                })
                .buffered(LOOKUP_CONCURRENCY)
                .collect()
                .await;
        for (recipient, sockets) in presence {
            let recipient = recipient.as_str();
            let published = self.publish(recipient, new.clone()).await;
            match sockets {
                Ok(0) => {
                    self.metrics.fanout_attempted("offline");
                    if published {
                        tracing::debug!(
                            partition = self.partition,
                            recipient,
                            message_id = %envelope.message_id,
                            "recipient offline: left for push and catch-up"
                        );
                    }
                }
                Ok(sockets) => {
                    self.metrics.fanout_attempted("online");
                    if published {
                        self.metrics.fanout_delivered(sockets);
                    }
                }
                Err(error) => {
                    tracing::warn!(
                        partition = self.partition,
                        recipient,
                        error = format!("{error:#}"),
                        "presence lookup failed; published anyway"
                    );
                    self.metrics.fanout_failed("presence_unavailable", 1);
                }
            }
        }

        let state = Event::StateChanged {
            message_id: envelope.message_id,
            conversation_id: envelope.conversation_id,
            state: MessageState::Sent,
            seq: Some(seq),
            reason: None,
        };
        self.publish(&envelope.sender_id, Bytes::from(state.to_json()))
            .await;
    }

    /// Tells the sender that a message it was told was accepted will never be stored.
    async fn rejected(&self, envelope: &Envelope, reason: &Rejection) {
        let state = Event::StateChanged {
            message_id: envelope.message_id,
            conversation_id: envelope.conversation_id,
            state: MessageState::Rejected,
            seq: None,
            reason: Some(reason.reason()),
        };
        self.publish(&envelope.sender_id, Bytes::from(state.to_json()))
            .await;
    }

    /// Publishes a frame to the user's subject; false (and counted) if NATS would not take it.
    async fn publish(&self, user_id: &str, frame: Bytes) -> bool {
        let subject = deliver_subject(user_id);
        match tokio::time::timeout(PUBLISH_TIMEOUT, self.nats.publish(subject, frame)).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                tracing::warn!(partition = self.partition, user_id, %error, "fanout publish failed");
                self.metrics.fanout_failed("publish_error", 1);
                false
            }
            Err(_) => {
                tracing::warn!(
                    partition = self.partition,
                    user_id,
                    "fanout publish timed out"
                );
                self.metrics.fanout_failed("publish_timeout", 1);
                false
            }
        }
    }
}
