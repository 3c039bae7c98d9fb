//! Moving an installation made before ADR 0004 onto the new layout, at start-up.
//!
//! Before ADR 0004 `MESSAGES` and `RECEIPTS` had limits retention: they kept every message,
//! acknowledged or not. Now both are work queues, and JetStream cannot change a stream's
//! retention in place. So a stream found with limits retention is rebuilt, without losing
//! anything, in steps that each leave a state the next start recognises:
//!
//! 1. **Copy out.** Read each consumer's ack floor (for `MESSAGES`, one per partition). Every
//!    message at or below its consumer's floor was persisted (or recorded): for `MESSAGES` it
//!    is copied into `REPLAY`, the replay window it belongs to now; a recorded receipt is
//!    needed nowhere. Every message past the floor is copied, headers and `Nats-Msg-Id`
//!    included, into a holding stream (`MESSAGES_MIGRATING` on `migrating.msgs.in.*`,
//!    `RECEIPTS_MIGRATING` on `migrating.receipts.*`). The copy returns only once every
//!    message is acknowledged by its target.
//! 2. **Replace.** Delete the old stream (its consumers go with it) and create the work queue.
//! 3. **Move back.** Publish the holding stream's messages into the new stream in order, with
//!    their original headers and `Nats-Msg-Id`, then delete the holding stream.
//!
//! Where a restart resumes: an old stream still there means step 1 was not known to be
//! complete, so it runs again (the holding stream and `REPLAY` drop what they already have by
//! `Nats-Msg-Id` within their duplicate windows); no old stream but a holding stream means
//! step 3 runs again. Anything copied twice is harmless: downstream is idempotent (a message
//! already stored is only acknowledged, a receipt never moves backwards). Messages acknowledged
//! out of order above a floor are delivered again and found already stored.
//!
//! The stream must be quiet: stop the old gateways and consumers first; `hotpath migrate` runs
//! the migration and exits, and every role runs it before it starts.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::DeliverPolicy, message::PublishMessage, stream};
use futures::TryStreamExt as _;

use crate::config::Config;
use crate::names;
use crate::stream_copy::{Pipeline, StreamReader, stream_sequence};
use crate::streams;

/// Holding streams' subjects are the old subjects under this prefix.
const HOLDING_PREFIX: &str = "migrating.";
/// Holding stream metadata: the old stream's last sequence. The new stream starts after it, so
/// stream sequences (kept in Postgres as `stream_seq`) keep growing across the migration.
const LAST_SEQ_METADATA: &str = "hotpath.migrated.last_seq";
/// How long a holding stream remembers a `Nats-Msg-Id`: long enough that a copy repeated
/// after a restart is dropped rather than stored twice.
const HOLDING_DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);

/// One stream to migrate.
#[derive(Clone, Copy)]
struct Plan {
    stream: &'static str,
    holding: &'static str,
    /// Whether the persisted part goes into the replay window.
    into_window: bool,
}

const PLANS: [Plan; 2] = [
    Plan {
        stream: names::MESSAGES_STREAM,
        holding: "MESSAGES_MIGRATING",
        into_window: true,
    },
    Plan {
        stream: names::RECEIPTS_STREAM,
        holding: "RECEIPTS_MIGRATING",
        into_window: false,
    },
];

impl Plan {
    fn new_stream(&self, config: &Config) -> anyhow::Result<stream::Config> {
        if self.into_window {
            streams::messages_stream_config(config)
        } else {
            streams::receipts_stream_config(config)
        }
    }
}

/// Migrates `MESSAGES` and `RECEIPTS` if they still have the old layout, or finishes a
/// migration a previous start began. Does nothing on an installation already migrated.
pub async fn migrate_if_needed(js: &jetstream::Context, config: &Config) -> anyhow::Result<()> {
    for plan in PLANS {
        migrate(js, config, plan).await?;
    }
    Ok(())
}

/// Step 1 alone, for every stream that needs it: what a start that dies right after copying
/// leaves behind (the tests use it to prove the migration resumes).
pub async fn copy_out(js: &jetstream::Context, config: &Config) -> anyhow::Result<()> {
    for plan in PLANS {
        if has_old_layout(js, plan.stream).await? {
            copy_out_one(js, config, plan).await?;
        }
    }
    Ok(())
}

async fn has_old_layout(js: &jetstream::Context, name: &str) -> anyhow::Result<bool> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(stream.cached_info().config.retention == stream::RetentionPolicy::Limits),
        Err(error)
            if matches!(
                error.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref api)
                    if api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            Ok(false)
        }
        Err(error) => Err(error).with_context(|| format!("reading stream {name}")),
    }
}

async fn exists(js: &jetstream::Context, name: &str) -> bool {
    js.get_stream(name).await.is_ok()
}

async fn migrate(js: &jetstream::Context, config: &Config, plan: Plan) -> anyhow::Result<()> {
    let old = has_old_layout(js, plan.stream).await?;
    if old {
        tracing::warn!(
            stream = plan.stream,
            "the stream has the layout of an older Hotpath (limits retention): migrating it to a work queue"
        );
        copy_out_one(js, config, plan).await?;
        js.delete_stream(plan.stream)
            .await
            .with_context(|| format!("deleting the old {}", plan.stream))?;
        tracing::info!(
            stream = plan.stream,
            "migration: old stream deleted with its consumers"
        );
    }
    if old || exists(js, plan.holding).await {
        create_new_stream(js, config, plan).await?;
        tracing::info!(
            stream = plan.stream,
            "migration: work queue created; moving the unacknowledged messages into it"
        );
        let moved = move_back(js, plan).await?;
        js.delete_stream(plan.holding)
            .await
            .with_context(|| format!("deleting {}", plan.holding))?;
        tracing::info!(
            stream = plan.stream,
            moved,
            "migration: done; holding stream deleted"
        );
    }
    Ok(())
}

/// Step 2's second half: the work queue, numbered on from the old stream's last sequence.
/// Left as it is if a previous start created it already.
async fn create_new_stream(
    js: &jetstream::Context,
    config: &Config,
    plan: Plan,
) -> anyhow::Result<()> {
    if exists(js, plan.stream).await {
        return Ok(());
    }
    let holding = js
        .get_stream(plan.holding)
        .await
        .with_context(|| format!("reading {}", plan.holding))?;
    let last_seq = holding
        .cached_info()
        .config
        .metadata
        .get(LAST_SEQ_METADATA)
        .and_then(|seq| seq.parse::<u64>().ok())
        .unwrap_or(0);
    let mut new = plan.new_stream(config)?;
    new.first_sequence = Some(last_seq + 1);
    js.create_stream(new)
        .await
        .with_context(|| format!("creating the new {}", plan.stream))?;
    Ok(())
}

/// Step 1: the persisted part into `REPLAY` (for `MESSAGES`), the rest into the holding
/// stream; returns once every copy is acknowledged.
async fn copy_out_one(js: &jetstream::Context, config: &Config, plan: Plan) -> anyhow::Result<()> {
    let mut old = js.get_stream(plan.stream).await?;
    let info = old.info().await?;
    let old_config = info.config.clone();
    let last_seq = info.state.last_sequence;
    if plan.into_window {
        js.create_or_update_stream(streams::replay_stream_config(config)?)
            .await
            .context("creating the REPLAY stream")?;
    }
    js.get_or_create_stream(stream::Config {
        name: plan.holding.to_string(),
        description: Some(format!(
            "Messages of {} not yet acknowledged, held while it is rebuilt as a work queue",
            plan.stream
        )),
        subjects: old_config
            .subjects
            .iter()
            .map(|subject| format!("{HOLDING_PREFIX}{subject}"))
            .collect(),
        retention: stream::RetentionPolicy::Limits,
        storage: old_config.storage,
        num_replicas: old_config.num_replicas,
        duplicate_window: HOLDING_DUPLICATE_WINDOW,
        metadata: HashMap::from([(LAST_SEQ_METADATA.to_string(), last_seq.to_string())]),
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating {}", plan.holding))?;

    let floors = ack_floors(&old).await?;
    tracing::info!(stream = plan.stream, consumers = floors.len(), floors = ?floors, "migration: copying out");
    let mut reader = StreamReader::open(js, plan.stream, "", DeliverPolicy::All).await?;
    let mut pipeline = Pipeline::new(js);
    let (mut to_window, mut held) = (0u64, 0u64);
    while let Some(message) = reader.next().await? {
        let seq = stream_sequence(&message)?;
        let subject = message.subject.to_string();
        let persisted = floors
            .iter()
            .any(|(filter, floor)| seq <= *floor && subject_matches(filter, &subject));
        let headers = message.headers.clone().unwrap_or_default();
        if !persisted {
            let copy = PublishMessage::build()
                .payload(message.payload.clone())
                .headers(headers);
            pipeline
                .publish(format!("{HOLDING_PREFIX}{subject}"), copy)
                .await?;
            held += 1;
        } else if plan.into_window {
            let Some(partition) = subject
                .strip_prefix("msgs.in.")
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let mut copy = PublishMessage::build().payload(message.payload.clone());
            if let Some(id) = headers.get(async_nats::header::NATS_MESSAGE_ID) {
                copy = copy.message_id(id.as_str());
            }
            pipeline
                .publish(names::replay_subject(partition), copy)
                .await?;
            to_window += 1;
        }
    }
    pipeline.finish().await?;
    tracing::info!(
        stream = plan.stream,
        to_window,
        held,
        "migration: copied out"
    );
    Ok(())
}

/// Each durable consumer of `stream` (Hotpath's own; ephemeral readers such as this
/// migration's own ordered consumers do not count): its filter and its ack floor (the stream
/// sequence up to which everything it was given is acknowledged).
async fn ack_floors(stream: &jetstream::stream::Stream) -> anyhow::Result<HashMap<String, u64>> {
    let consumers: Vec<jetstream::consumer::Info> = stream
        .consumers()
        .try_collect()
        .await
        .context("listing the old stream's consumers")?;
    Ok(consumers
        .into_iter()
        .filter(|info| info.config.durable_name.is_some())
        .map(|info| {
            let filter = if info.config.filter_subject.is_empty() {
                ">".to_string()
            } else {
                info.config.filter_subject.clone()
            };
            (filter, info.ack_floor.stream_sequence)
        })
        .collect())
}

/// Step 3: the holding stream's messages into the new stream, in order, headers kept.
async fn move_back(js: &jetstream::Context, plan: Plan) -> anyhow::Result<u64> {
    let mut reader = StreamReader::open(js, plan.holding, "", DeliverPolicy::All).await?;
    let mut pipeline = Pipeline::new(js);
    let mut moved = 0;
    while let Some(message) = reader.next().await? {
        let Some(subject) = message.subject.strip_prefix(HOLDING_PREFIX) else {
            continue;
        };
        let mut copy = PublishMessage::build().payload(message.payload.clone());
        if let Some(headers) = message.headers.clone() {
            copy = copy.headers(headers);
        }
        pipeline.publish(subject.to_string(), copy).await?;
        moved += 1;
    }
    pipeline.finish().await?;
    Ok(moved)
}

/// Whether `subject` matches a NATS subject `filter` (`*` one token, `>` the rest).
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut filter = filter.split('.');
    let mut subject = subject.split('.');
    loop {
        match (filter.next(), subject.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(f), Some(s)) if f == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_filters_token_by_token() {
        let cases = [
            ("msgs.in.3", "msgs.in.3", true),
            ("msgs.in.3", "msgs.in.30", false),
            ("receipts.*", "receipts.7", true),
            ("receipts.*", "receipts.7.x", false),
            (">", "msgs.in.1", true),
            ("msgs.>", "msgs.in.1", true),
            ("msgs.in.*", "msgs.in", false),
        ];
        for (filter, subject, matches) in cases {
            assert_eq!(
                subject_matches(filter, subject),
                matches,
                "{filter} / {subject}"
            );
        }
    }
}
