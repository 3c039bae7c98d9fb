//! Step 2 of delivery: telling connected devices, once a batch is persisted and acknowledged.
//!
//! For every newly stored message (never a duplicate: a replay is told nothing twice), each
//! recipient gets `message.new` and the sender gets `message.state.changed` (`sent`, with the
//! seq), published on NATS core to `deliver.user.<id>` ([`crate::frames`]), where the socket
//! nodes holding the user's WebSockets listen. For every newly recorded rejection (a key
//! reused for a different request after the stream's window, see [`crate::persist`]) only the
//! sender is told: `message.state.changed` with `rejected` and the reason; the status route
//! says the same, durably, for a sender who was not connected.
//!
//! Live delivery is best effort by design; what makes it complete is catch-up: a client that
//! (re)connects subscribes first and then asks for everything after its last seq (`sync`), so
//! a frame lost here is found there. Hence:
//! * fanout runs after the batch is committed and acknowledged, on its own task per partition
//!   (so one partition's messages go out in seq order), fed through a bounded queue: when NATS
//!   is slow the queue fills and fanout of further batches is dropped and counted, never
//!   holding up persistence or acks;
//! * presence ([`crate::presence`], cached for a second) decides whether a recipient is
//!   counted online, with how many sockets, or offline (their devices were already given a
//!   push task before the batch was acknowledged, see [`crate::push::schedule`]). Offline
//!   recipients are still published to: presence may be up to a cache period behind a device
//!   that just connected, and a publish nobody listens to costs NATS next to nothing.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use bytes::Bytes;
use hotpath_core::domain::PipelineStep;
use hotpath_core::envelope::Envelope;
use hotpath_core::events::{DeliveredMessage, Event, MessageState};
use hotpath_core::rejection::Rejection;
use hotpath_core::telemetry::meter;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use tokio::sync::mpsc;
use tracing::{Instrument as _, Span};

use crate::frames::FramePublisher;
use crate::metrics::{LabelledCounter, StepMetrics};
use crate::persist;
use crate::presence::{PresenceLookup, Sockets};
use crate::trace;

/// Batches waiting for fanout per partition before further ones are dropped.
const QUEUE: usize = 64;

/// What a settled batch tells connected users about one of its messages, in the span of
/// telling it ([`crate::trace::fanout_span`]).
pub enum Told {
    /// Newly stored with this seq: `message.new` to the recipients, `sent` to the sender.
    Persisted {
        envelope: Envelope,
        seq: i64,
        span: Span,
    },
    /// Refused for good, its rejection newly recorded: `rejected` to the sender.
    Rejected {
        envelope: Envelope,
        reason: Rejection,
        span: Span,
    },
}

/// What to tell of a settled batch, in stream (= seq) order: the newly stored messages and
/// the newly recorded rejections (`item_of` finds a row's envelope and `persist` span by its
/// batch index).
pub fn told<'a>(
    outcome: &persist::Outcome,
    item_of: impl Fn(usize) -> (&'a Envelope, &'a Span),
) -> Vec<Told> {
    let mut told: Vec<(usize, Told)> = outcome
        .inserted
        .iter()
        .map(|(&index, &seq)| {
            let (envelope, persist) = item_of(index);
            let span = trace::fanout_span(persist, envelope.message_id);
            let envelope = envelope.clone();
            (
                index,
                Told::Persisted {
                    envelope,
                    seq,
                    span,
                },
            )
        })
        .chain(
            outcome
                .conflicts
                .iter()
                .filter(|conflict| conflict.recorded_now)
                .map(|conflict| {
                    let (envelope, persist) = item_of(conflict.index);
                    let span = trace::fanout_span(persist, envelope.message_id);
                    let envelope = envelope.clone();
                    let reason = conflict.rejection();
                    (
                        conflict.index,
                        Told::Rejected {
                            envelope,
                            reason,
                            span,
                        },
                    )
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
    metrics: FanoutMetrics,
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
            self.metrics.failed.add("backlog", dropped as u64);
        }
    }
}

/// Starts the fanout task of `partition`; it ends when the returned queue is dropped.
pub(crate) fn spawn(
    partition: u32,
    frames: FramePublisher,
    presence: PresenceLookup,
    metrics: FanoutMetrics,
    steps: StepMetrics,
) -> FanoutQueue {
    let (batches, mut receiver) = mpsc::channel::<Vec<Told>>(QUEUE);
    let fanout = Fanout {
        partition,
        frames,
        presence,
        metrics: metrics.clone(),
    };
    tokio::spawn(async move {
        while let Some(batch) = receiver.recv().await {
            let started = Instant::now();
            let presence = fanout.presence_of(&batch).await;
            for item in &batch {
                match item {
                    Told::Persisted {
                        envelope,
                        seq,
                        span,
                    } => {
                        let told = fanout.message(envelope, *seq, &presence, span);
                        told.instrument(span.clone()).await
                    }
                    Told::Rejected {
                        envelope,
                        reason,
                        span,
                    } => {
                        let told = fanout.rejected(envelope, reason, span);
                        told.instrument(span.clone()).await
                    }
                }
            }
            steps.since(PipelineStep::Fanout, started);
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
    frames: FramePublisher,
    presence: PresenceLookup,
    metrics: FanoutMetrics,
}

impl Fanout {
    /// The presence of every recipient of the batch's stored messages, each looked up once:
    /// a batch of a busy group asks once per member, not once per member per message.
    async fn presence_of(&self, batch: &[Told]) -> HashMap<String, Sockets> {
        let recipients: HashSet<&str> = batch
            .iter()
            .filter_map(|told| match told {
                Told::Persisted { envelope, .. } => Some(envelope),
                Told::Rejected { .. } => None,
            })
            .flat_map(|envelope| envelope.recipient_ids.iter().map(String::as_str))
            .collect();
        self.presence
            .sockets_of(recipients.into_iter().map(str::to_owned))
            .await
            .into_iter()
            .collect()
    }

    async fn message(
        &self,
        envelope: &Envelope,
        seq: i64,
        presence: &HashMap<String, Sockets>,
        span: &Span,
    ) {
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
        for recipient in &envelope.recipient_ids {
            let recipient = recipient.as_str();
            let published = self.frames.publish(recipient, new.clone(), span).await;
            match presence.get(recipient) {
                Some(Ok(0)) => {
                    self.metrics.attempted.add("offline", 1);
                    if published {
                        tracing::debug!(
                            partition = self.partition,
                            recipient,
                            message_id = %envelope.message_id,
                            "recipient offline: left for push and catch-up"
                        );
                    }
                }
                Some(Ok(sockets)) => {
                    self.metrics.attempted.add("online", 1);
                    if published {
                        self.metrics.delivered(*sockets);
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(
                        partition = self.partition,
                        recipient,
                        error = format!("{error:#}"),
                        "presence lookup failed; published anyway"
                    );
                    self.metrics.failed.add("presence_unavailable", 1);
                }
                // Every recipient of the batch was looked up.
                None => {}
            }
        }

        let state = Event::StateChanged {
            message_id: envelope.message_id,
            conversation_id: envelope.conversation_id,
            state: MessageState::Sent,
            seq: Some(seq),
            reason: None,
        };
        self.frames
            .publish(&envelope.sender_id, Bytes::from(state.to_json()), span)
            .await;
    }

    /// Tells the sender that a message it was told was accepted will never be stored.
    async fn rejected(&self, envelope: &Envelope, reason: &Rejection, span: &Span) {
        let state = Event::StateChanged {
            message_id: envelope.message_id,
            conversation_id: envelope.conversation_id,
            state: MessageState::Rejected,
            seq: None,
            reason: Some(reason.reason()),
        };
        self.frames
            .publish(&envelope.sender_id, Bytes::from(state.to_json()), span)
            .await;
    }
}

/// Every `reason` of `delivery_fanout_failed_total`, exported at 0 from the start.
const FANOUT_FAILURES: [&str; 4] = [
    "backlog",
    "presence_unavailable",
    "publish_error",
    "publish_timeout",
];

/// Fanout's metrics: `delivery_fanout_attempted_total{recipient_status}`,
/// `delivery_fanout_delivered_total{socket_count}` and `delivery_fanout_failed_total{reason}`
/// (which [`FramePublisher`] also counts in).
#[derive(Clone)]
pub(crate) struct FanoutMetrics {
    /// `recipient_status`: `online` or `offline`, as presence said.
    attempted: LabelledCounter,
    delivered_total: Counter<u64>,
    pub failed: LabelledCounter,
}

impl FanoutMetrics {
    pub fn new() -> FanoutMetrics {
        let meter = meter();
        let metrics = FanoutMetrics {
            attempted: LabelledCounter::new(
                &meter,
                "delivery_fanout_attempted_total",
                "recipient_status",
                "Recipients a persisted message was fanned out to, by presence",
            ),
            delivered_total: meter
                .u64_counter("delivery_fanout_delivered_total")
                .with_description(
                    "Online recipients a message was published to, by their open socket count",
                )
                .build(),
            failed: LabelledCounter::new(
                &meter,
                "delivery_fanout_failed_total",
                "reason",
                "Fanout steps that failed, by reason",
            ),
        };
        metrics.failed.declare(&FANOUT_FAILURES);
        metrics
    }

    /// `socket_count`: 1 to 9, then `10+` (bounded label values).
    fn delivered(&self, sockets: u32) {
        let socket_count = if sockets >= 10 {
            "10+".to_string()
        } else {
            sockets.to_string()
        };
        self.delivered_total
            .add(1, &[KeyValue::new("socket_count", socket_count)]);
    }
}
