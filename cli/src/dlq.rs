//! `hotpath dlq list|replay`: what could never be processed, and sending it back.
//!
//! A DLQ entry is the original payload with `Hotpath-Dlq-*` headers saying where it came from
//! and why it failed (see the consumers' `dlq` module). Replaying publishes the payload to
//! its source subject again, with `Nats-Msg-Id` `replay:DLQ:<DLQ seq>` so a replay repeated within
//! the source stream's duplicate window is dropped by JetStream, and then deletes the entry
//! from the DLQ. What is downstream is idempotent as well: a message is stored once by its
//! idempotency key, a receipt never moves backwards, a push skips devices that already got
//! it. So replaying twice, or a crash between the publish and the delete, delivers nothing
//! twice.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage, stream::DirectGetErrorKind};
use clap::Subcommand;
use hotpath_core::domain::DlqSource;
use hotpath_core::names::{DLQ_STREAM, dlq_headers};

use crate::nats_target::NatsTarget;

#[derive(Subcommand)]
pub enum DlqCommand {
    /// List DLQ entries, oldest first: sequence, source, reason, deliveries, time.
    List {
        /// Only entries from this source (`messages`, `receipts`, `push`).
        #[arg(long)]
        source: Option<DlqSource>,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print each entry as one JSON object per line (payload included).
        #[arg(long)]
        json: bool,
    },
    /// Publish entries to the subject they came from again, then remove them from the DLQ.
    Replay {
        /// DLQ sequence numbers (as `list` shows them).
        seqs: Vec<u64>,
        /// Every entry (of `--source`, if given) instead of chosen ones.
        #[arg(long, conflicts_with = "seqs")]
        all: bool,
        /// With `--all`: only entries from this source.
        #[arg(long, requires = "all")]
        source: Option<DlqSource>,
    },
}

/// One DLQ entry as read back.
pub struct Entry {
    pub seq: u64,
    pub dlq_subject: String,
    pub time: String,
    pub source_stream: Option<String>,
    pub source_subject: Option<String>,
    pub source_sequence: Option<String>,
    pub reason: Option<String>,
    pub deliveries: Option<String>,
    pub payload: bytes::Bytes,
}

pub async fn run(command: DlqCommand, nats: &NatsTarget) -> anyhow::Result<()> {
    let client = nats.connect("hotpath-dlq").await?;
    let js = jetstream::new(client);
    match command {
        DlqCommand::List {
            source,
            limit,
            json,
        } => {
            let entries = list(&js, source, limit).await?;
            if entries.is_empty() && !json {
                println!("the DLQ is empty");
            }
            for entry in &entries {
                if json {
                    println!("{}", entry_json(entry));
                } else {
                    println!(
                        "{seq:>8}  {time}  {subject}  from {stream}/{source_seq} ({src_subject})  \
                         deliveries={deliveries}\n          reason: {reason}",
                        seq = entry.seq,
                        time = entry.time,
                        subject = entry.dlq_subject,
                        stream = entry.source_stream.as_deref().unwrap_or("?"),
                        source_seq = entry.source_sequence.as_deref().unwrap_or("?"),
                        src_subject = entry.source_subject.as_deref().unwrap_or("?"),
                        deliveries = entry.deliveries.as_deref().unwrap_or("?"),
                        reason = entry.reason.as_deref().unwrap_or("?"),
                    );
                }
            }
            Ok(())
        }
        DlqCommand::Replay { seqs, all, source } => {
            let seqs = if all {
                list(&js, source, usize::MAX)
                    .await?
                    .into_iter()
                    .map(|e| e.seq)
                    .collect()
            } else {
                anyhow::ensure!(
                    !seqs.is_empty(),
                    "name the DLQ entries to replay (hotpath dlq list shows them), or use --all"
                );
                seqs
            };
            let mut failed = 0;
            for seq in seqs {
                match replay(&js, seq).await {
                    Ok(subject) => println!("replayed DLQ entry {seq} to {subject}"),
                    Err(error) => {
                        failed += 1;
                        eprintln!("DLQ entry {seq} not replayed: {error:#}");
                    }
                }
            }
            anyhow::ensure!(failed == 0, "{failed} entries were not replayed");
            Ok(())
        }
    }
}

/// Up to `limit` entries, oldest first, of `source` if given.
pub async fn list(
    js: &jetstream::Context,
    source: Option<DlqSource>,
    limit: usize,
) -> anyhow::Result<Vec<Entry>> {
    let stream = js.get_stream(DLQ_STREAM).await?;
    let subject = match source {
        Some(source) => hotpath_core::names::dlq_subject(source),
        None => "dlq.>".to_string(),
    };
    let mut entries = Vec::new();
    let mut next = 1;
    while entries.len() < limit {
        let message = match stream
            .direct_get_next_for_subject(subject.clone(), Some(next))
            .await
        {
            Ok(message) => message,
            Err(error) if error.kind() == DirectGetErrorKind::NotFound => break,
            Err(error) => return Err(error.into()),
        };
        next = message.sequence + 1;
        entries.push(entry(message));
    }
    Ok(entries)
}

fn entry(message: async_nats::jetstream::message::StreamMessage) -> Entry {
    let header = |name: &str| {
        message
            .headers
            .get(name)
            .map(|value| value.as_str().to_string())
    };
    Entry {
        seq: message.sequence,
        dlq_subject: message.subject.to_string(),
        time: message.time.to_string(),
        source_stream: header(dlq_headers::SOURCE_STREAM),
        source_subject: header(dlq_headers::SOURCE_SUBJECT),
        source_sequence: header(dlq_headers::SOURCE_SEQUENCE),
        reason: header(dlq_headers::REASON),
        deliveries: header(dlq_headers::DELIVERIES),
        payload: message.payload,
    }
}

fn entry_json(entry: &Entry) -> serde_json::Value {
    let payload = match serde_json::from_slice::<serde_json::Value>(&entry.payload) {
        Ok(json) => json,
        Err(_) => String::from_utf8_lossy(&entry.payload).into_owned().into(),
    };
    serde_json::json!({
        "seq": entry.seq,
        "subject": entry.dlq_subject,
        "time": entry.time,
        "sourceStream": entry.source_stream,
        "sourceSubject": entry.source_subject,
        "sourceSequence": entry.source_sequence,
        "reason": entry.reason,
        "deliveries": entry.deliveries,
        "payload": payload,
    })
}

/// Publishes DLQ entry `seq` to its source subject, waits for the source stream to store it,
/// then deletes the entry. Returns the subject it went to.
pub async fn replay(js: &jetstream::Context, seq: u64) -> anyhow::Result<String> {
    let stream = js.get_stream(DLQ_STREAM).await?;
    let message = match stream.direct_get(seq).await {
        Ok(message) => message,
        Err(error) if error.kind() == DirectGetErrorKind::NotFound => {
            anyhow::bail!("there is no DLQ entry {seq} (already replayed?)")
        }
        Err(error) => return Err(error.into()),
    };
    let entry = entry(message);
    let Some(subject) = entry.source_subject.clone() else {
        anyhow::bail!("the entry does not say where it came from");
    };
    // The original's headers are not kept in the DLQ: the payload is the whole message.
    let publish = PublishMessage::build()
        .payload(entry.payload.clone())
        .headers(HeaderMap::new())
        .message_id(format!("replay:{DLQ_STREAM}:{seq}"));
    js.send_publish(subject.clone(), publish).await?.await?;
    stream.delete_message(seq).await?;
    Ok(subject)
}
