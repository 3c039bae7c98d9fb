//! Pulling from a durable consumer without waiting on a full batch: take whatever is waiting
//! at once, and only when nothing is, long-poll for the next message (and whatever arrived
//! with it). The one way the consumers pull: the partition workers, the receipts worker and
//! the push workers all fetch through [`next_batch`].

use std::time::Duration;

use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;

/// How long a long poll asks the server to wait for a first message.
const LONG_POLL: Duration = Duration::from_secs(5);
/// Backstop on any one pull, in case the server's answer is lost.
const PULL_TIMEOUT: Duration = Duration::from_secs(10);

/// The messages a fetch got, in stream order, and the error that cut it short, if any.
pub struct Fetched {
    pub messages: Vec<Message>,
    pub error: Option<anyhow::Error>,
}

/// Whatever is waiting, up to `max`; if nothing is, waits (long poll) for the next message
/// and takes what arrived with it. A failure part-way keeps what did arrive.
pub async fn next_batch(consumer: &PullConsumer, max: usize) -> Fetched {
    let max = max.max(1);
    let mut fetched = available(consumer, max).await;
    if !fetched.messages.is_empty() || fetched.error.is_some() {
        return fetched;
    }
    let first = async {
        let mut wait = consumer
            .batch()
            .max_messages(1)
            .expires(LONG_POLL)
            .messages()
            .await?;
        match tokio::time::timeout(PULL_TIMEOUT, wait.next()).await {
            Ok(Some(message)) => Ok(Some(message.map_err(anyhow::Error::from_boxed)?)),
            Ok(None) => Ok(None),
            Err(_) => anyhow::bail!("long poll did not complete within {PULL_TIMEOUT:?}"),
        }
    };
    match first.await {
        Ok(Some(message)) => fetched.messages.push(message),
        Ok(None) => return fetched,
        Err(error) => {
            fetched.error = Some(error);
            return fetched;
        }
    }
    if max > 1 {
        let more = available(consumer, max - 1).await;
        fetched.messages.extend(more.messages);
        fetched.error = more.error;
    }
    fetched
}

/// What is waiting now, up to `max`, without waiting for more.
async fn available(consumer: &PullConsumer, max: usize) -> Fetched {
    let mut fetched = Fetched {
        messages: Vec::new(),
        error: None,
    };
    let mut fetch = match consumer.fetch().max_messages(max).messages().await {
        Ok(fetch) => fetch,
        Err(error) => {
            fetched.error = Some(error.into());
            return fetched;
        }
    };
    loop {
        match tokio::time::timeout(PULL_TIMEOUT, fetch.next()).await {
            Ok(Some(Ok(message))) => fetched.messages.push(message),
            Ok(Some(Err(error))) => {
                fetched.error = Some(anyhow::Error::from_boxed(error));
                return fetched;
            }
            Ok(None) => return fetched,
            Err(_) => {
                fetched.error = Some(anyhow::anyhow!(
                    "fetch did not complete within {PULL_TIMEOUT:?}"
                ));
                return fetched;
            }
        }
    }
}
