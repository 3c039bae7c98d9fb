//! Backpressure from the backlog: a gateway stops accepting sends while the consumers are too
//! far behind, before anything could be lost.
//!
//! `MESSAGES` is a work queue (ADR 0004): a message leaves it when its delivery consumer
//! acknowledges it, after it is stored in Postgres. So the stream's own state *is* the
//! backlog: `state.messages` and `state.bytes` count what was accepted and is not yet persisted
//! (the same as the delivery consumers' `num_pending + num_ack_pending`). Bytes already safe in
//! Postgres never count, so a caught-up system never refuses a send however much it has
//! carried.
//!
//! Each gateway reads the stream's state every [`POLL_EVERY`] and adds what it accepted itself
//! since: every PubAck carries the message's stream sequence, and a message whose sequence is
//! past the last sequence the stream reported cannot be in that report. So this gateway's own
//! sends are counted exactly once, never missed; what other gateways accepted since the last
//! look is not known here, which the stream's ceiling (twice the bound, see
//! `hotpath_core::streams::backlog_ceiling`) leaves room for.
//!
//! When the estimate reaches the bound (`HOTPATH_BACKLOG_MAX_BYTES` or
//! `HOTPATH_BACKLOG_MAX_MSGS`), a send is answered 503 `BACKLOG_FULL` with Retry-After before
//! it is published, by HTTP and WebSocket alike. Should the stream itself refuse (more
//! gateways than the headroom was sized for), the publish error is answered the same way.
//!
//! A gateway that cannot read the stream's state keeps its last reading and keeps adding its
//! own sends on top, so it errs towards refusing; and every publish is still bounded by the
//! publish timeout.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream;
use hotpath_core::names::MESSAGES_STREAM;
use hotpath_core::rejection::Rejection;
use opentelemetry::metrics::Gauge;
use tokio_util::sync::CancellationToken;

/// How often a gateway reads the backlog from the stream.
pub const POLL_EVERY: Duration = Duration::from_millis(250);
/// Longest one reading may take; a slower answer is skipped and the last one kept.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);
/// What a client is told to wait before trying again: the consumers drain a bound's worth of
/// backlog in seconds when they are merely behind.
const RETRY_AFTER_SECS: u64 = 1;
/// What the stream stores per message beyond its payload, subject and `Nats-Msg-Id`: the file
/// store's record framing and the header block. Rounded up: the estimate may err high.
const PER_MESSAGE_OVERHEAD: u64 = 64;

/// An amount of backlog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Size {
    pub messages: u64,
    pub bytes: u64,
}

/// The bound the gateway sheds load at.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub max_messages: u64,
    pub max_bytes: u64,
}

impl Bound {
    fn reached_by(self, size: Size) -> bool {
        size.messages >= self.max_messages || size.bytes >= self.max_bytes
    }
}

/// What this gateway knows of the backlog: the stream's last reading plus its own sends the
/// reading cannot include yet. Pure bookkeeping, no clock and no I/O.
#[derive(Debug, Default)]
struct Estimate {
    read: Size,
    /// The stream's last sequence at the reading: sends at or below it are in `read` (or
    /// already persisted).
    read_last_seq: u64,
    /// This gateway's sends after `read_last_seq`: stream sequence → stored bytes.
    since: BTreeMap<u64, u64>,
    since_size: Size,
}

impl Estimate {
    fn total(&self) -> Size {
        Size {
            messages: self.read.messages + self.since_size.messages,
            bytes: self.read.bytes + self.since_size.bytes,
        }
    }

    /// A send this gateway got a PubAck for (not a duplicate: that one is counted already).
    fn accepted(&mut self, stream_seq: u64, bytes: u64) {
        if stream_seq > self.read_last_seq && self.since.insert(stream_seq, bytes).is_none() {
            self.since_size.messages += 1;
            self.since_size.bytes += bytes;
        }
    }

    /// A reading of the stream: its state counts every send up to `last_seq`.
    fn read(&mut self, state: Size, last_seq: u64) {
        self.read = state;
        self.read_last_seq = last_seq;
        self.since = self.since.split_off(&(self.read_last_seq + 1));
        self.since_size = Size {
            messages: self.since.len() as u64,
            bytes: self.since.values().sum(),
        };
    }
}

/// One gateway's view of the backlog, shared by its request handlers.
#[derive(Clone)]
pub struct Backlog {
    bound: Bound,
    estimate: Arc<Mutex<Estimate>>,
    messages_gauge: Gauge<u64>,
    bytes_gauge: Gauge<u64>,
}

impl Backlog {
    pub fn new(bound: Bound) -> Backlog {
        let meter = hotpath_core::telemetry::meter();
        // The bound next to the estimate, so that an alert on "near the bound" needs no
        // copy of the configuration (ops/prometheus/alerts.yml divides one by the other).
        meter
            .u64_gauge("producer_backlog_limit_messages")
            .with_description("The backlog bound in messages (HOTPATH_BACKLOG_MAX_MSGS)")
            .build()
            .record(bound.max_messages, &[]);
        meter
            .u64_gauge("producer_backlog_limit_bytes")
            .with_description("The backlog bound in bytes (HOTPATH_BACKLOG_MAX_BYTES)")
            .build()
            .record(bound.max_bytes, &[]);
        Backlog {
            bound,
            estimate: Arc::new(Mutex::new(Estimate::default())),
            messages_gauge: meter
                .u64_gauge("producer_backlog_messages")
                .with_description(
                    "Accepted messages not yet persisted, as this gateway estimates them",
                )
                .build(),
            bytes_gauge: meter
                .u64_gauge("producer_backlog_bytes")
                .with_description(
                    "Bytes of accepted messages not yet persisted, as this gateway estimates them",
                )
                .build(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Estimate> {
        // Nothing panics while holding the lock (plain arithmetic and a BTreeMap), so a
        // poisoned lock still holds consistent numbers.
        self.estimate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The backlog as this gateway estimates it now.
    pub fn size(&self) -> Size {
        self.lock().total()
    }

    /// Ok while the backlog is below its bound; otherwise the 503 to answer, before anything
    /// is published.
    pub fn admit(&self) -> Result<(), Rejection> {
        let size = self.size();
        if self.bound.reached_by(size) {
            return Err(self.full_at(size));
        }
        Ok(())
    }

    /// The 503 `BACKLOG_FULL` answer, with the backlog as estimated now.
    pub fn full(&self) -> Rejection {
        self.full_at(self.size())
    }

    fn full_at(&self, size: Size) -> Rejection {
        Rejection::BacklogFull {
            backlog_bytes: size.bytes,
            backlog_messages: size.messages,
            max_bytes: self.bound.max_bytes,
            max_messages: self.bound.max_messages,
            retry_after_secs: RETRY_AFTER_SECS,
        }
    }

    /// Counts a message the stream stored for this gateway (PubAck without `duplicate`).
    pub fn accepted(&self, stream_seq: u64, subject: &str, msg_id: &str, payload_bytes: usize) {
        let bytes = payload_bytes as u64 + subject.len() as u64 + msg_id.len() as u64;
        self.lock()
            .accepted(stream_seq, bytes + PER_MESSAGE_OVERHEAD);
    }

    /// Reads the stream once now (so a gateway starting into a full backlog knows it), then
    /// every [`POLL_EVERY`] on a task until `shutdown`.
    pub async fn start_polling(&self, js: jetstream::Context, shutdown: CancellationToken) {
        self.poll_once(&js).await;
        let backlog = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => backlog.poll_once(&js).await,
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }

    async fn poll_once(&self, js: &jetstream::Context) {
        let read = tokio::time::timeout(POLL_TIMEOUT, js.get_stream(MESSAGES_STREAM)).await;
        let state = match read {
            Ok(Ok(stream)) => stream.cached_info().state.clone(),
            Ok(Err(error)) => {
                tracing::debug!(%error, "cannot read the backlog; keeping the last reading");
                return;
            }
            Err(_) => {
                tracing::debug!("reading the backlog timed out; keeping the last reading");
                return;
            }
        };
        let size = {
            let mut estimate = self.lock();
            estimate.read(
                Size {
                    messages: state.messages,
                    bytes: state.bytes,
                },
                state.last_sequence,
            );
            estimate.total()
        };
        self.messages_gauge.record(size.messages, &[]);
        self.bytes_gauge.record(size.bytes, &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Bound = Bound {
        max_messages: 10,
        max_bytes: 1000,
    };

    fn size(messages: u64, bytes: u64) -> Size {
        Size { messages, bytes }
    }

    #[test]
    fn own_sends_count_until_a_reading_includes_them() {
        let mut estimate = Estimate::default();
        estimate.read(size(3, 300), 3);
        estimate.accepted(4, 100);
        estimate.accepted(5, 100);
        assert_eq!(estimate.total(), size(5, 500));
        // The reading saw sequence 4 (and the consumers persisted two older ones): 5 is not
        // in it yet and still counts.
        estimate.read(size(2, 200), 4);
        assert_eq!(estimate.total(), size(3, 300));
        estimate.read(size(0, 0), 5);
        assert_eq!(estimate.total(), size(0, 0));
    }

    #[test]
    fn a_send_acknowledged_after_a_reading_that_includes_it_is_not_counted_twice() {
        let mut estimate = Estimate::default();
        estimate.read(size(1, 100), 7);
        // PubAck of sequence 7 arrives after the reading that saw it.
        estimate.accepted(7, 100);
        assert_eq!(estimate.total(), size(1, 100));
        // A repeated PubAck (a retry answered again) is counted once.
        estimate.accepted(8, 100);
        estimate.accepted(8, 100);
        assert_eq!(estimate.total(), size(2, 200));
    }

    #[test]
    fn a_recreated_stream_starts_the_count_afresh() {
        let mut estimate = Estimate::default();
        estimate.read(size(5, 500), 10);
        // The stream was recreated (a migration): its sequences start again at 1.
        estimate.read(size(0, 0), 0);
        estimate.accepted(1, 100);
        assert_eq!(estimate.total(), size(1, 100));
    }

    #[test]
    fn the_bound_is_reached_by_messages_or_bytes() {
        let cases = [
            (size(9, 999), false),
            (size(10, 0), true),
            (size(0, 1000), true),
            (size(11, 2000), true),
        ];
        for (backlog, full) in cases {
            assert_eq!(BOUND.reached_by(backlog), full, "{backlog:?}");
        }
    }

    #[test]
    fn a_full_backlog_is_refused_with_its_figures() {
        let backlog = Backlog::new(BOUND);
        assert!(backlog.admit().is_ok());
        for seq in 1..=10 {
            backlog.accepted(seq, "msgs.in.0", "key", 10);
        }
        let refused = backlog.admit().unwrap_err();
        assert_eq!(refused.code(), "BACKLOG_FULL");
        assert_eq!(refused.status(), 503);
        assert_eq!(refused.details()["backlogMessages"], 10);
        assert_eq!(refused.details()["maxMessages"], 10);
        assert_eq!(refused.retry_after_secs(), Some(RETRY_AFTER_SECS));
    }
}
