//! `hotpath replay`: persisted messages from the replay window sent through the pipeline again.
//!
//! `REPLAY` holds every persisted message as it was accepted (ADR 0004). Replaying a range
//! re-publishes each entry to its partition's subject in `MESSAGES`, in window order, with
//! `Nats-Msg-Id` `replay:REPLAY:<seq>`: the original key would be dropped by `MESSAGES`'s
//! duplicate window if the message was accepted in the last two minutes, and the window
//! sequence makes a replay repeated within those two minutes a duplicate itself. Everything
//! downstream is idempotent: a message already in Postgres is found by its idempotency key and
//! only acknowledged (it takes no new seq, its pushes are not scheduled twice), so a replay
//! never stores anything twice. What it is for: recovering after Postgres lost data (a restore
//! from an older backup), or reprocessing after a bug in what runs after persisting.
//!
//! A replay respects the backlog bound like a gateway: before each chunk it reads `MESSAGES`
//! and waits while the backlog is at half the stream's ceiling (the gateways' bound), so a
//! large replay never makes senders see 503 `BACKLOG_FULL` for long, nor fills the stream.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::DeliverPolicy, message::PublishMessage};
use hotpath_core::names::{
    MESSAGES_STREAM, REPLAY_STREAM, message_subject, replay_subject, replayed_msg_id,
};
use hotpath_core::stream_copy::{Pipeline, StreamReader, stream_sequence};

/// Messages between two looks at the backlog.
const CHUNK: u64 = 1000;
/// Pause while the backlog is at its bound.
const BACKLOG_WAIT: Duration = Duration::from_millis(250);

/// Which entries of the window to replay.
#[derive(Debug, Clone)]
pub struct Selection {
    pub from: From,
    /// Only this partition's entries.
    pub partition: Option<u32>,
    /// At most this many entries.
    pub limit: Option<u64>,
}

/// Where in the window a replay starts.
#[derive(Debug, Clone, Copy)]
pub enum From {
    /// At this `REPLAY` sequence (or the oldest entry still kept, if that is later).
    Sequence(u64),
    /// At the first entry stored this long ago or later.
    Since(Duration),
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Entries re-published.
    pub messages: u64,
    /// Of them, dropped by `MESSAGES` as a repeat of a replay within its duplicate window.
    pub duplicates: u64,
    /// The first and last `REPLAY` sequence re-published.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Replay the entries stored this long ago or later (`30m`, `2h`, `7d`).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "from_seq", required_unless_present = "from_seq")]
    pub since: Option<Duration>,
    /// Replay from this `REPLAY` sequence on.
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Only this partition's messages.
    #[arg(long)]
    pub partition: Option<u32>,
    /// At most this many messages.
    #[arg(long)]
    pub limit: Option<u64>,
}

impl ReplayArgs {
    fn selection(&self) -> Selection {
        let from = match (self.from_seq, self.since) {
            (Some(seq), _) => From::Sequence(seq),
            (None, Some(since)) => From::Since(since),
            // clap requires one of the two.
            (None, None) => From::Sequence(1),
        };
        Selection {
            from,
            partition: self.partition,
            limit: self.limit,
        }
    }
}

pub async fn run(args: ReplayArgs, nats_url: String) -> anyhow::Result<()> {
    let client = hotpath_core::streams::connect(&nats_url, "hotpath-replay").await?;
    let js = jetstream::new(client);
    let replayed = replay(&js, &args.selection()).await?;
    match (replayed.first_seq, replayed.last_seq) {
        (Some(first), Some(last)) => println!(
            "replayed {} messages of {REPLAY_STREAM} (sequences {first} to {last}) into \
             {MESSAGES_STREAM}; {} of them were repeats of a replay in the last two minutes. \
             Messages already in Postgres are only acknowledged.",
            replayed.messages, replayed.duplicates
        ),
        _ => println!("nothing in {REPLAY_STREAM} matches; nothing replayed"),
    }
    Ok(())
}

/// Re-publishes the selected entries of `REPLAY` into `MESSAGES`, in window order.
pub async fn replay(js: &jetstream::Context, selection: &Selection) -> anyhow::Result<Replayed> {
    let filter = match selection.partition {
        Some(partition) => replay_subject(partition),
        None => "replay.msgs.*".to_string(),
    };
    let start = match selection.from {
        From::Sequence(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq.max(1),
        },
        From::Since(since) => {
            let at = chrono::Utc::now()
                - chrono::Duration::from_std(since).context("--since is too long")?;
            DeliverPolicy::ByStartTime {
                start_time: async_nats::datetime::parse_rfc3339(&at.to_rfc3339())
                    .map_err(|error| anyhow::anyhow!("{error}"))?,
            }
        }
    };
    let mut reader = StreamReader::open(js, REPLAY_STREAM, &filter, start).await?;
    let mut pipeline = Pipeline::new(js);
    let mut replayed = Replayed::default();
    let limit = selection.limit.unwrap_or(u64::MAX);
    while replayed.messages < limit {
        let Some(message) = reader.next().await? else {
            break;
        };
        if replayed.messages % CHUNK == 0 {
            wait_for_room(js).await?;
        }
        let seq = stream_sequence(&message)?;
        let partition = partition_of_subject(&message.subject)
            .with_context(|| format!("{REPLAY_STREAM} entry {seq} is on {}", message.subject))?;
        let publish = PublishMessage::build()
            .payload(message.payload.clone())
            .message_id(replayed_msg_id(seq));
        pipeline
            .publish(message_subject(partition), publish)
            .await?;
        replayed.first_seq.get_or_insert(seq);
        replayed.last_seq = Some(seq);
        replayed.messages += 1;
    }
    replayed.duplicates = pipeline.finish().await?.duplicates;
    Ok(replayed)
}

/// `replay.msgs.<p>` → p.
fn partition_of_subject(subject: &str) -> Option<u32> {
    subject.strip_prefix("replay.msgs.")?.parse().ok()
}

/// Waits while `MESSAGES` holds half its ceiling or more: the backlog bound the gateways
/// shed load at (`HOTPATH_BACKLOG_MAX_*`; the stream's limits are twice it).
async fn wait_for_room(js: &jetstream::Context) -> anyhow::Result<()> {
    let mut told = false;
    loop {
        let stream = js
            .get_stream(MESSAGES_STREAM)
            .await
            .context("reading MESSAGES")?;
        let info = stream.cached_info();
        let at_bound =
            |held: u64, ceiling: i64| ceiling > 0 && held.saturating_mul(2) >= ceiling as u64;
        let full = at_bound(info.state.messages, info.config.max_messages)
            || at_bound(info.state.bytes, info.config.max_bytes);
        if !full {
            return Ok(());
        }
        if !told {
            eprintln!(
                "the backlog is at its bound ({} messages waiting to be persisted): waiting for the consumers",
                info.state.messages
            );
            told = true;
        }
        tokio::time::sleep(BACKLOG_WAIT).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_come_from_window_subjects() {
        assert_eq!(partition_of_subject("replay.msgs.12"), Some(12));
        assert_eq!(partition_of_subject(&replay_subject(3)), Some(3));
        assert_eq!(partition_of_subject("msgs.in.3"), None);
        assert_eq!(partition_of_subject("replay.msgs.x"), None);
    }
}
