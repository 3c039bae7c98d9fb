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
//!   that just connected, and a publish nobody listens to costs NATS next to nothing;
//! * a batch's frames for one user go in one publish (frames separated by
//!   [`FRAME_SEPARATOR`], up to [`MAX_BUNDLE_BYTES`], in the batch's order), which the socket
//!   node splits back into one WebSocket frame each: a batch of a busy group costs one publish
//!   per member instead of one per member per message. With tracing on, each frame goes on
//!   its own so it carries its message's trace context.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use bytes::{BufMut as _, Bytes, BytesMut};
use hotpath_core::domain::PipelineStep;
use hotpath_core::envelope::Envelope;
use hotpath_core::events::{DeliveredMessage, Event, MessageState};
use hotpath_core::names::FRAME_SEPARATOR;
use hotpath_core::rejection::Rejection;
use hotpath_core::telemetry::meter;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use tokio::sync::mpsc;
use tracing::{Instrument as _, Span};
use uuid::Uuid;

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
            let frames = fanout.frames_of(&batch, &presence);
            fanout.tell(&frames).await;
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

    /// What the batch tells whom, in the batch's order: for each stored message `message.new`
    /// to every recipient (counted online or offline by presence) and `sent` to the sender; for
    /// each rejection `rejected` to the sender.
    fn frames_of<'a>(
        &self,
        batch: &'a [Told],
        presence: &'a HashMap<String, Sockets>,
    ) -> Vec<Frame<'a>> {
        let mut frames = Vec::new();
        for told in batch {
            match told {
                Told::Persisted {
                    envelope,
                    seq,
                    span,
                } => {
                    let new = Bytes::from(message_new(envelope, *seq).to_json());
                    for recipient in &envelope.recipient_ids {
                        let sockets = presence.get(recipient.as_str());
                        span.in_scope(|| self.count_attempt(envelope, recipient, sockets));
                        frames.push(Frame {
                            user_id: recipient,
                            message_id: envelope.message_id,
                            bytes: new.clone(),
                            span,
                            recipient: sockets,
                        });
                    }
                    let sent = state_changed(envelope, MessageState::Sent, Some(*seq), None);
                    frames.push(Frame::to_sender(envelope, sent, span));
                }
                Told::Rejected {
                    envelope,
                    reason,
                    span,
                } => {
                    let rejected = state_changed(
                        envelope,
                        MessageState::Rejected,
                        None,
                        Some(reason.reason()),
                    );
                    frames.push(Frame::to_sender(envelope, rejected, span));
                }
            }
        }
        frames
    }

    fn count_attempt(&self, envelope: &Envelope, recipient: &str, sockets: Option<&Sockets>) {
        match sockets {
            Some(Ok(0)) => self.metrics.attempted.add("offline", 1),
            Some(Ok(_)) => self.metrics.attempted.add("online", 1),
            Some(Err(error)) => {
                tracing::warn!(
                    partition = self.partition,
                    recipient,
                    message_id = %envelope.message_id,
                    error = format!("{error:#}"),
                    "presence lookup failed; published anyway"
                );
                self.metrics.failed.add("presence_unavailable", 1);
            }
            // Every recipient of the batch was looked up.
            None => {}
        }
    }

    /// Publishes the batch's frames. With tracing on, each frame on its own, carrying its
    /// message's trace context; otherwise each user's frames of the batch together, as one
    /// payload per user (up to [`MAX_BUNDLE_BYTES`]), in the batch's order.
    async fn tell(&self, frames: &[Frame<'_>]) {
        if hotpath_core::trace::enabled() {
            for frame in frames {
                let published = self
                    .frames
                    .publish(frame.user_id, frame.bytes.clone(), frame.span)
                    .instrument(frame.span.clone())
                    .await;
                // In the message's span, so what is logged of it names its trace.
                frame.span.in_scope(|| self.published(frame, published));
            }
            return;
        }
        for bundle in bundles(frames) {
            let published = self
                .frames
                .publish(bundle.user_id, bundle.payload.freeze(), &Span::none())
                .await;
            for frame in bundle.frames {
                self.published(frame, published);
            }
        }
    }

    /// Counts a `message.new` that reached an online recipient's subject.
    fn published(&self, frame: &Frame<'_>, published: bool) {
        match frame.recipient {
            Some(Ok(0)) if published => tracing::debug!(
                partition = self.partition,
                recipient = frame.user_id,
                message_id = %frame.message_id,
                "recipient offline: left for push and catch-up"
            ),
            Some(Ok(sockets)) if published => self.metrics.delivered(*sockets),
            _ => {}
        }
    }
}

/// Largest payload fanout publishes to one user at once; NATS refuses more than its
/// `max_payload` (1 MiB by default). A frame larger than this goes alone.
pub const MAX_BUNDLE_BYTES: usize = 256 * 1024;

/// One frame of a batch for one user.
struct Frame<'a> {
    user_id: &'a str,
    message_id: Uuid,
    bytes: Bytes,
    span: &'a Span,
    /// For `message.new`: what presence said of the recipient; `None` for the sender's frames.
    recipient: Option<&'a Sockets>,
}

impl<'a> Frame<'a> {
    fn to_sender(envelope: &'a Envelope, event: Event, span: &'a Span) -> Frame<'a> {
        Frame {
            user_id: &envelope.sender_id,
            message_id: envelope.message_id,
            bytes: Bytes::from(event.to_json()),
            span,
            recipient: None,
        }
    }
}

/// Frames for one user, joined by [`FRAME_SEPARATOR`] into one payload.
struct Bundle<'f, 'a> {
    user_id: &'a str,
    payload: BytesMut,
    frames: Vec<&'f Frame<'a>>,
}

impl<'f, 'a> Bundle<'f, 'a> {
    fn fits(&self, frame: &Frame<'_>) -> bool {
        self.payload.is_empty() || self.payload.len() + 1 + frame.bytes.len() <= MAX_BUNDLE_BYTES
    }

    fn push(&mut self, frame: &'f Frame<'a>) {
        if !self.payload.is_empty() {
            self.payload.put_u8(FRAME_SEPARATOR);
        }
        self.payload.extend_from_slice(&frame.bytes);
        self.frames.push(frame);
    }
}

/// `frames` grouped by user, each user's in their order; a user whose frames exceed
/// [`MAX_BUNDLE_BYTES`] gets several bundles, in order.
fn bundles<'f, 'a>(frames: &'f [Frame<'a>]) -> Vec<Bundle<'f, 'a>> {
    let mut bundles: Vec<Bundle<'f, 'a>> = Vec::new();
    let mut open: HashMap<&str, usize> = HashMap::new();
    for frame in frames {
        let index = match open.get(frame.user_id) {
            Some(&index) if bundles[index].fits(frame) => index,
            _ => {
                bundles.push(Bundle {
                    user_id: frame.user_id,
                    payload: BytesMut::new(),
                    frames: Vec::new(),
                });
                open.insert(frame.user_id, bundles.len() - 1);
                bundles.len() - 1
            }
        };
        bundles[index].push(frame);
    }
    bundles
}

fn message_new(envelope: &Envelope, seq: i64) -> Event {
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
}

fn state_changed(
    envelope: &Envelope,
    state: MessageState,
    seq: Option<i64>,
    reason: Option<serde_json::Value>,
) -> Event {
    Event::StateChanged {
        message_id: envelope.message_id,
        conversation_id: envelope.conversation_id,
        state,
        seq,
        reason,
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
