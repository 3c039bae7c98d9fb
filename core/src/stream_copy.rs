//! Reading a stream in order and publishing what was read somewhere else: the two halves of
//! `hotpath replay` and of the stream migration.
//!
//! [`StreamReader`] reads through an ordered consumer (ephemeral, no acks, recreated by the
//! client on a gap), so reading never takes anything away from the stream's own consumers and
//! needs no clean-up. It stops at the last message that was there when it reached it (the
//! delivery's `pending` count is 0), so it never waits for messages that may never come.
//!
//! [`Pipeline`] publishes with many acknowledgements outstanding (a fixed bound, awaited
//! oldest first), which is what makes copying hundreds of thousands of messages take seconds
//! instead of minutes; [`Pipeline::finish`] returns only once every one is acknowledged, so a
//! caller that goes on to delete the source knows the copy is whole.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{
    self, Message, consumer, context::PublishAckFuture, message::PublishMessage,
};
use futures::StreamExt as _;

/// Publishes awaiting their acknowledgement at once.
const MAX_PENDING_ACKS: usize = 1024;
/// Longest wait for the next message of a reader, so a server that stops answering fails the
/// copy instead of hanging it.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads a stream's messages in stream order from a starting point to the last one there.
pub struct StreamReader {
    messages: Option<consumer::pull::Ordered>,
    /// How many messages there were to read when it was opened.
    total: u64,
}

impl StreamReader {
    /// A reader of `stream`'s messages on `filter` (all subjects when empty), from `start`.
    pub async fn open(
        js: &jetstream::Context,
        stream: &str,
        filter: &str,
        start: consumer::DeliverPolicy,
    ) -> anyhow::Result<StreamReader> {
        let stream = js
            .get_stream(stream)
            .await
            .with_context(|| format!("reading stream {stream}"))?;
        let mut consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.to_string(),
                deliver_policy: start,
                ..Default::default()
            })
            .await
            .context("creating an ordered consumer")?;
        let pending = consumer
            .info()
            .await
            .context("reading the ordered consumer")?
            .num_pending;
        let messages = if pending == 0 {
            None
        } else {
            Some(consumer.messages().await.context("reading messages")?)
        };
        Ok(StreamReader {
            messages,
            total: pending,
        })
    }

    /// How many messages there were to read, from the start to the last one, when the reader
    /// was opened (a progress bar's length).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The next message, or `None` after the last one.
    pub async fn next(&mut self) -> anyhow::Result<Option<Message>> {
        let Some(messages) = self.messages.as_mut() else {
            return Ok(None);
        };
        let message = tokio::time::timeout(READ_TIMEOUT, messages.next())
            .await
            .context("no message arrived in time")?
            .context("the ordered consumer ended")?
            .map_err(|error| anyhow::anyhow!("reading a message: {error}"))?;
        let pending = message
            .info()
            .map_err(|error| anyhow::anyhow!("a message without metadata: {error}"))?
            .pending;
        if pending == 0 {
            self.messages = None;
        }
        Ok(Some(message))
    }
}

/// The stream sequence of a message a [`StreamReader`] returned.
pub fn stream_sequence(message: &Message) -> anyhow::Result<u64> {
    message
        .info()
        .map(|info| info.stream_sequence)
        .map_err(|error| anyhow::anyhow!("a message without metadata: {error}"))
}

/// What a [`Pipeline`] published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// Messages the target stored.
    pub stored: u64,
    /// Messages the target dropped as duplicates of its duplicate window.
    pub duplicates: u64,
}

/// Publishes with up to [`MAX_PENDING_ACKS`] acknowledgements outstanding.
pub struct Pipeline {
    js: jetstream::Context,
    pending: VecDeque<PublishAckFuture>,
    published: Published,
}

impl Pipeline {
    pub fn new(js: &jetstream::Context) -> Pipeline {
        Pipeline {
            js: js.clone(),
            pending: VecDeque::new(),
            published: Published::default(),
        }
    }

    /// Sends `message` to `subject`, first awaiting the oldest acknowledgement if the bound
    /// is reached. An error means some message may not be stored: start again.
    pub async fn publish(
        &mut self,
        subject: String,
        message: PublishMessage,
    ) -> anyhow::Result<()> {
        if self.pending.len() >= MAX_PENDING_ACKS {
            self.settle_oldest().await?;
        }
        let ack = self
            .js
            .send_publish(subject.clone(), message)
            .await
            .with_context(|| format!("publishing to {subject}"))?;
        self.pending.push_back(ack);
        Ok(())
    }

    async fn settle_oldest(&mut self) -> anyhow::Result<()> {
        if let Some(ack) = self.pending.pop_front() {
            let ack = ack.await.context("a copy was not stored")?;
            if ack.duplicate {
                self.published.duplicates += 1;
            } else {
                self.published.stored += 1;
            }
        }
        Ok(())
    }

    /// Awaits every outstanding acknowledgement.
    pub async fn finish(mut self) -> anyhow::Result<Published> {
        while !self.pending.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(self.published)
    }
}
