//! `hotpath replay`: persisted messages from the replay window put back into Postgres, each
//! with the seq it had.
//!
//! `REPLAY` holds every persisted message as it was accepted, with where its row sits
//! (ADR 0004, ADR 0012). A replay reads a range of it (from a window sequence or a time, up to
//! a sequence, one partition or all) through an ordered consumer: ephemeral, unacknowledged,
//! so the live durable consumers are not touched and nothing is left behind. Each batch is
//! restored in one transaction ([`hotpath_consumers::restore`]): a message already stored is
//! left alone, a lost one is inserted exactly as it was, seq included, and `last_seq` covers
//! it. So a replay is always safe to run, repeat or cut short; its main use is a Postgres
//! restored from last night's backup getting the rest of the day back.
//!
//! Reading is in window order, which is each partition's persist order, and batches are
//! restored one after another, so order is kept per partition and conversation. A replay
//! restores the record only: it fans out nothing and schedules no push (they happened when
//! the message was first persisted).
//!
//! It is an operator command: NATS with the operator's credentials ([`NatsTarget`]), Postgres
//! at `--database-url`. It prints a summary per partition on stdout, draws a progress bar on
//! stderr when that is a terminal, and exits non-zero when some entry could not be restored.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, Message, consumer::DeliverPolicy};
use hotpath_consumers::restore::{self, Entry, Restoration, WindowEntry};
use hotpath_core::config::DEFAULT_DATABASE_URL;
use hotpath_core::names::{
    MESSAGES_STREAM, REPLAY_STREAM, partition_of_replay_subject, replay_subject,
};
use hotpath_core::stream_copy::{StreamReader, stream_sequence};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sqlx::PgPool;

use crate::nats_target::NatsTarget;

/// Window entries restored in one transaction.
const BATCH: usize = 500;

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Replay from this `REPLAY` sequence on (`nats stream info REPLAY` shows the first and
    /// last).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "since", required_unless_present = "since")]
    pub from_seq: Option<u64>,
    /// Replay the entries stored this long ago or later (`30m`, `2h`, `1day`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    /// Stop after this `REPLAY` sequence (inclusive).
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// Only this partition's messages.
    #[arg(long)]
    pub partition: Option<u32>,
    /// Postgres URL (default: `hotpath up`'s Postgres from its data directory, else the
    /// roles' default).
    #[arg(long, env = "HOTPATH_DATABASE_URL")]
    pub database_url: Option<String>,
}

/// Which entries of the window to replay.
#[derive(Debug, Clone)]
pub struct Selection {
    pub from: From,
    /// The last window sequence to replay.
    pub to_seq: Option<u64>,
    /// Only this partition's entries.
    pub partition: Option<u32>,
}

/// Where in the window a replay starts.
#[derive(Debug, Clone, Copy)]
pub enum From {
    /// At this `REPLAY` sequence (or the oldest entry still kept, if that is later).
    Sequence(u64),
    /// At the first entry stored this long ago or later.
    Since(Duration),
}

/// What became of one partition's entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Entries read from the window.
    pub read: u64,
    /// Rows inserted again, with their own seq.
    pub restored: u64,
    /// Rows that were there already.
    pub present: u64,
    /// Rows inserted with a new seq: copies made before copies carried theirs.
    pub renumbered: u64,
    /// Entries not restored: their seq is held by another message, their conversation is
    /// gone, or the entry cannot be read.
    pub not_restored: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.read += other.read;
        self.restored += other.restored;
        self.present += other.present;
        self.renumbered += other.renumbered;
        self.not_restored += other.not_restored;
    }
}

/// What a replay did: a tally per partition, and the window sequences it read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    pub partitions: BTreeMap<u32, Tally>,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

impl Replayed {
    pub fn total(&self) -> Tally {
        let mut total = Tally::default();
        for tally in self.partitions.values() {
            total.add(tally);
        }
        total
    }
}

impl ReplayArgs {
    /// The selection, refusing what cannot mean anything (a range that ends before it starts).
    pub fn selection(&self) -> anyhow::Result<Selection> {
        let from = match (self.from_seq, self.since) {
            (Some(seq), None) => From::Sequence(seq),
            (None, Some(since)) => From::Since(since),
            _ => anyhow::bail!("give exactly one of --from-seq and --since"),
        };
        if let (From::Sequence(from), Some(to)) = (from, self.to_seq) {
            anyhow::ensure!(
                to >= from,
                "--to-seq {to} is before --from-seq {from}: the range would be empty"
            );
        }
        Ok(Selection {
            from,
            to_seq: self.to_seq,
            partition: self.partition,
        })
    }

    /// Where Postgres is: the flag or env, else `hotpath up`'s data directory, else the
    /// roles' default.
    fn database_url(&self, data_dir: &Path) -> String {
        self.database_url
            .clone()
            .or_else(|| {
                hotpath_localstack::Ports::read(data_dir)
                    .ok()
                    .map(|p| format!("postgres://postgres@127.0.0.1:{}/hotpath", p.postgres))
            })
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string())
    }
}

pub async fn run(args: ReplayArgs, nats: &NatsTarget) -> anyhow::Result<()> {
    let selection = args.selection()?;
    let client = nats.connect("hotpath-replay").await?;
    let js = jetstream::new(client);
    let url = args.database_url(&nats.data_dir);
    let pool = hotpath_core::db::connect(&url, 2).await?;
    hotpath_core::db::check_migrated(&pool).await?;
    let replayed = replay(&js, &pool, &selection, progress_target()).await?;
    print_summary(&replayed);
    let not_restored = replayed.total().not_restored;
    anyhow::ensure!(
        not_restored == 0,
        "{not_restored} entries were not restored (see above)"
    );
    Ok(())
}

/// Where the progress bar is drawn: stderr, only when it is a terminal (stdout is the summary,
/// and a log or a pipe gets no bar).
fn progress_target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

fn print_summary(replayed: &Replayed) {
    let (Some(first), Some(last)) = (replayed.first_seq, replayed.last_seq) else {
        println!("nothing in {REPLAY_STREAM} matches; nothing replayed");
        return;
    };
    println!("replayed {REPLAY_STREAM} sequences {first} to {last}");
    for (partition, tally) in &replayed.partitions {
        println!("partition {partition}: {}", describe(tally));
    }
    println!("total: {}", describe(&replayed.total()));
}

fn describe(tally: &Tally) -> String {
    format!(
        "read {}, restored {}, already present {}, renumbered {}, not restored {}",
        tally.read, tally.restored, tally.present, tally.renumbered, tally.not_restored
    )
}

/// Restores the selected entries of `REPLAY` into Postgres, in window order, drawing progress
/// on `progress`.
pub async fn replay(
    js: &jetstream::Context,
    pool: &PgPool,
    selection: &Selection,
    progress: ProgressDrawTarget,
) -> anyhow::Result<Replayed> {
    // Entries are read on their partition's subject, which names the partition; the count
    // is only the fallback of an entry delivered elsewhere (see `WindowEntry::read`).
    let partitions = partition_count(js, selection.partition).await?.unwrap_or(1);
    let filter = match selection.partition {
        Some(partition) => replay_subject(partition),
        None => "replay.msgs.*".to_string(),
    };
    let mut reader = StreamReader::open(js, REPLAY_STREAM, &filter, start(selection)?).await?;
    let bar = ProgressBar::with_draw_target(Some(reader.total()), progress);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} entries, {per_sec}, eta {eta}")
            .context("progress bar style")?,
    );
    let mut replayed = Replayed::default();
    let mut batch: Vec<Message> = Vec::with_capacity(BATCH);
    let to_seq = selection.to_seq.unwrap_or(u64::MAX);
    while let Some(message) = reader.next().await? {
        let seq = stream_sequence(&message)?;
        if seq > to_seq {
            break;
        }
        replayed.first_seq.get_or_insert(seq);
        replayed.last_seq = Some(seq);
        batch.push(message);
        if batch.len() == BATCH {
            restore_batch(js, pool, &batch, partitions, &mut replayed).await?;
            bar.inc(batch.len() as u64);
            batch.clear();
        }
    }
    restore_batch(js, pool, &batch, partitions, &mut replayed).await?;
    bar.finish_and_clear();
    Ok(replayed)
}

/// The ordered consumer's start for `selection`.
fn start(selection: &Selection) -> anyhow::Result<DeliverPolicy> {
    Ok(match selection.from {
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
    })
}

/// The installation's partition count, as `MESSAGES` recorded it at creation (`None` for a
/// stream made before it was recorded); refuses a selected partition it does not have.
async fn partition_count(
    js: &jetstream::Context,
    selected: Option<u32>,
) -> anyhow::Result<Option<u32>> {
    let stream = js
        .get_stream(MESSAGES_STREAM)
        .await
        .with_context(|| format!("reading {MESSAGES_STREAM}'s partition count"))?;
    let partitions = hotpath_core::streams::recorded_partitions(&stream.cached_info().config);
    if let (Some(partition), Some(partitions)) = (selected, partitions) {
        anyhow::ensure!(
            partition < partitions,
            "there is no partition {partition}: this installation has {partitions} (0 to {})",
            partitions - 1
        );
    }
    Ok(partitions)
}

/// Restores one batch of window entries and adds what became of them to `replayed`.
async fn restore_batch(
    js: &jetstream::Context,
    pool: &PgPool,
    batch: &[Message],
    partitions: u32,
    replayed: &mut Replayed,
) -> anyhow::Result<()> {
    let mut reads = Vec::with_capacity(batch.len());
    for message in batch {
        let window_seq = stream_sequence(message)?;
        let read = WindowEntry::read(
            &message.subject,
            message.headers.as_ref(),
            &message.payload,
            partitions,
        );
        match read {
            Ok(read) => reads.push((window_seq, read)),
            Err(why) => {
                eprintln!("{REPLAY_STREAM} entry {window_seq} not restored: {why}");
                let partition = partition_of_replay_subject(&message.subject).unwrap_or(u32::MAX);
                let tally = replayed.partitions.entry(partition).or_default();
                tally.read += 1;
                tally.not_restored += 1;
            }
        }
    }
    let entries: Vec<Entry<'_>> = reads.iter().map(|(_, read)| read.entry()).collect();
    let outcome = restore::restore(pool, &entries).await.context(
        "restoring into Postgres (what was restored before stays; run the replay again)",
    )?;
    restore::announce(&js.client(), &entries, &outcome).await;
    for ((window_seq, read), restoration) in reads.iter().zip(outcome) {
        let tally = replayed.partitions.entry(read.partition).or_default();
        tally.read += 1;
        match restoration {
            Restoration::Restored => tally.restored += 1,
            Restoration::Present => tally.present += 1,
            Restoration::Renumbered => tally.renumbered += 1,
            Restoration::SeqTaken | Restoration::NoConversation => {
                tally.not_restored += 1;
                eprintln!(
                    "{REPLAY_STREAM} entry {window_seq} (message {}, conversation {}, seq {}) not restored: {}",
                    read.envelope.message_id,
                    read.envelope.conversation_id,
                    read.seq.unwrap_or_default(),
                    why_not(restoration)
                );
            }
        }
    }
    Ok(())
}

fn why_not(restoration: Restoration) -> &'static str {
    match restoration {
        Restoration::SeqTaken => {
            "another message holds its seq (persisted after the restore, before this replay)"
        }
        Restoration::NoConversation => "its conversation does not exist",
        Restoration::Restored | Restoration::Present | Restoration::Renumbered => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        args: ReplayArgs,
    }

    fn parse(argv: &[&str]) -> Result<ReplayArgs, clap::Error> {
        Command::try_parse_from(std::iter::once("replay").chain(argv.iter().copied()))
            .map(|c| c.args)
    }

    #[test]
    fn a_range_is_a_start_and_an_optional_end() {
        let args = parse(&["--from-seq", "3", "--to-seq", "9", "--partition", "2"]).unwrap();
        let selection = args.selection().unwrap();
        assert!(matches!(selection.from, From::Sequence(3)));
        assert_eq!((selection.to_seq, selection.partition), (Some(9), Some(2)));
        let args = parse(&["--since", "1h"]).unwrap();
        assert!(matches!(
            args.selection().unwrap().from,
            From::Since(d) if d == Duration::from_secs(3600)
        ));
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse(&["--from-seq", "3", "--since", "1h"]).is_err());
        assert!(parse(&[]).is_err());
        assert!(parse(&["--since", "an hour"]).is_err());
        assert!(parse(&["--from-seq", "0"]).is_err());
        let backwards = parse(&["--from-seq", "9", "--to-seq", "3"]).unwrap();
        let error = backwards.selection().unwrap_err().to_string();
        assert!(
            error.contains("--to-seq 3 is before --from-seq 9"),
            "{error}"
        );
    }
}
