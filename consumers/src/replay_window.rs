//! Filling the replay window, inside the delivery consumer.
//!
//! `MESSAGES` is a work queue: once a batch is acknowledged its messages are gone from it. So
//! before acknowledging, the worker copies each message it found stored (new or already there)
//! into `REPLAY` on `replay.msgs.<p>`: the envelope's bytes exactly as they were accepted, with
//! `Nats-Msg-Id` = the idempotency key, so a batch delivered again (a crash before the acks)
//! is kept once within the window's duplicate window, and headers saying where the row sits
//! (`Hotpath-Seq`, `Hotpath-Stream-Seq`), so a replay into a Postgres restored from an older
//! backup puts the row back with the seq it had ([`crate::restore`]). `REPLAY` is limits retention with
//! `discard: old`, bounded by `HOTPATH_REPLAY_MAX_AGE_SECS` and `HOTPATH_REPLAY_MAX_BYTES`: it
//! holds the most recent persisted messages and never refuses one for being full.
//!
//! Why the worker copies instead of JetStream sourcing: a stream that sources a work queue
//! does so through a consumer of it, which would take the messages away from the delivery
//! consumers; and an interest-retention `MESSAGES` would drop a partition's unacknowledged
//! messages when its consumer is deleted for a rewind (ADR 0004).
//!
//! The copy is pipelined (every publish sent, then the acknowledgements awaited) and bounded
//! in time like push scheduling. A failure is counted (`delivery_replay_copy_failed_total`) and
//! logged, and the batch goes on: Postgres is the record, the window is a convenience for
//! replay, so a missing copy never holds back or fails a persisted batch.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use hotpath_core::names::{replay_headers, replay_subject};
use hotpath_core::telemetry::meter;

use crate::metrics::LabelledCounter;

/// Longest the copy may hold up a batch's acknowledgement.
const COPY_TIMEOUT: Duration = Duration::from_secs(5);

/// One persisted message as it is copied: its idempotency key, the bytes the stream held, and
/// where its row sits.
pub struct Copy<'a> {
    pub idempotency_key: &'a str,
    pub payload: Bytes,
    /// The row's per-conversation seq.
    pub seq: i64,
    /// The row's `stream_seq`.
    pub stream_seq: i64,
}

#[derive(Clone)]
pub struct ReplayWindow {
    js: jetstream::Context,
    /// `delivery_replay_copy_failed_total{reason}`.
    copy_failed: LabelledCounter,
}

impl ReplayWindow {
    pub fn new(js: jetstream::Context) -> ReplayWindow {
        let copy_failed = LabelledCounter::new(
            &meter(),
            "delivery_replay_copy_failed_total",
            "reason",
            "Persisted messages not copied into the replay window, by reason \
             (rejected, timeout); the messages themselves are safe in Postgres",
        );
        copy_failed.declare(&["rejected", "timeout"]);
        ReplayWindow { js, copy_failed }
    }

    /// Copies `persisted` (in stream order) into the window of `partition`. Never fails: what
    /// could not be copied is logged and counted.
    pub async fn copy(&self, partition: u32, persisted: Vec<Copy<'_>>) {
        let count = persisted.len() as u64;
        if count == 0 {
            return;
        }
        match tokio::time::timeout(COPY_TIMEOUT, self.try_copy(partition, persisted)).await {
            Ok(0) => {}
            Ok(failed) => self.copy_failed.add("rejected", failed),
            Err(_) => {
                tracing::warn!(
                    partition,
                    batch_len = count,
                    "copying into the replay window timed out"
                );
                self.copy_failed.add("timeout", count);
            }
        }
    }

    /// Sends every copy, then awaits their acknowledgements; returns how many failed.
    async fn try_copy(&self, partition: u32, persisted: Vec<Copy<'_>>) -> u64 {
        let subject = replay_subject(partition);
        let mut failed = 0;
        let mut acks = Vec::with_capacity(persisted.len());
        for copy in persisted {
            let message = PublishMessage::build()
                .payload(copy.payload)
                .message_id(copy.idempotency_key)
                .header(replay_headers::SEQ, copy.seq.to_string().as_str())
                .header(
                    replay_headers::STREAM_SEQ,
                    copy.stream_seq.to_string().as_str(),
                );
            match self.js.send_publish(subject.clone(), message).await {
                Ok(ack) => acks.push(ack),
                Err(error) => {
                    tracing::warn!(partition, %error, "replay window copy not sent");
                    failed += 1;
                }
            }
        }
        for ack in acks {
            if let Err(error) = ack.await {
                tracing::warn!(partition, %error, "replay window copy not stored");
                failed += 1;
            }
        }
        failed
    }
}
