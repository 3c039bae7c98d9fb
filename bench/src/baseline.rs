//! Same-run baselines on the very NATS and Postgres the system uses: what the two stores do
//! with the same messages when nothing of Hotpath sits in front of them.
//!
//! * Raw JetStream: pipelined publishes of the encoded envelopes into a scratch stream defined
//!   like `MESSAGES` (same storage, retention and duplicate window, one subject per partition),
//!   each with its own `Nats-Msg-Id` as the gateway sets it.
//! * Raw UNNEST insert: the consumers' own [`persist`] (the same transaction and statement)
//!   on scratch copies of `messages` and `conversations`, one worker per partition with
//!   batches of the consumers' size: the persist path minus fetching and acknowledging.
//!
//! Scratch objects are named after this process's id and removed afterwards, also when the
//! baseline fails.

use std::future::IntoFuture as _;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use hotpath_consumers::persist::{self, Row};
use hotpath_core::envelope::Envelope;
use hotpath_core::names::partition_of;
use hotpath_core::streams;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::task::JoinSet;

use super::workload::Workload;

/// Publishes awaiting their PubAck at once. The gateway has up to one per request in flight;
/// this keeps the connection busy without queueing unboundedly in the client.
const MAX_PENDING_ACKS: usize = 4096;
/// Rows per insert: the consumers' default batch size (`HOTPATH_BATCH_SIZE`).
const BATCH_ROWS: usize = 256;
/// Smallest storage limit of the scratch stream.
const SCRATCH_STREAM_MIN_BYTES: i64 = 64 * 1024 * 1024;

#[derive(Debug, Serialize)]
pub struct RawJetStream {
    pub stream: String,
    pub messages: usize,
    pub duplicates: u64,
    pub secs: f64,
    pub msgs_per_sec: f64,
}

/// Publishes `envelopes` to a scratch stream as fast as JetStream acknowledges them.
pub async fn raw_jetstream(
    nats: &async_nats::Client,
    partitions: u32,
    envelopes: &[Envelope],
) -> anyhow::Result<RawJetStream> {
    let js = jetstream::new(nats.clone());
    let pid = std::process::id();
    let name = format!("BENCH_RAW_{pid}");
    let prefix = format!("bench.raw.{pid}");
    // Encoded before the clock starts: the baseline measures JetStream, not serde.
    let (messages, payload_bytes) = encode_all(&prefix, partitions, envelopes);

    let mut config = streams::messages_stream_definition(partitions)?;
    config.name = name.clone();
    config.subjects = vec![format!("{prefix}.*")];
    config.description = Some("hotpath bench scratch stream, deleted after the run".into());
    config.metadata.clear();
    // MESSAGES' 2 GiB would not fit: a server's JetStream storage is reserved stream by
    // stream, and MESSAGES and DLQ already hold most of a local server's. Neither limit is
    // ever reached here, so a smaller one does not change the publish path.
    config.max_bytes = i64::try_from(payload_bytes * 4)
        .unwrap_or(i64::MAX)
        .max(SCRATCH_STREAM_MIN_BYTES);

    // Left over only if an earlier run with this very pid was killed mid-baseline.
    let _ = js.delete_stream(&name).await;
    js.create_stream(config)
        .await
        .with_context(|| format!("creating scratch stream {name}"))?;
    tracing::info!(stream = %name, messages = envelopes.len(), "raw JetStream baseline");
    let published = publish_all(&js, messages).await;
    let deleted = js.delete_stream(&name).await;
    let (duplicates, elapsed) = published?;
    deleted.with_context(|| format!("deleting scratch stream {name}"))?;
    let secs = elapsed.as_secs_f64();
    Ok(RawJetStream {
        stream: name,
        messages: envelopes.len(),
        duplicates,
        secs,
        msgs_per_sec: envelopes.len() as f64 / secs,
    })
}

/// Each envelope as the gateway's producer publishes it: to its partition's subject, with
/// its idempotency key as `Nats-Msg-Id`. Also returns the payloads' total size.
pub(super) fn encode_all(
    prefix: &str,
    partitions: u32,
    envelopes: &[Envelope],
) -> (Vec<(String, PublishMessage)>, usize) {
    let mut payload_bytes = 0;
    let messages = envelopes
        .iter()
        .map(|envelope| {
            let partition = partition_of(&envelope.conversation_id.to_string(), partitions);
            let payload = envelope.encode();
            payload_bytes += payload.len();
            let message = PublishMessage::build()
                .payload(payload.into())
                .message_id(&envelope.idempotency_key);
            (format!("{prefix}.{partition}"), message)
        })
        .collect();
    (messages, payload_bytes)
}

/// Publishes every message with up to [`MAX_PENDING_ACKS`] acknowledgements outstanding.
/// Returns how many the stream called duplicates and how long it took.
pub(super) async fn publish_all(
    js: &jetstream::Context,
    messages: Vec<(String, PublishMessage)>,
) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut duplicates = 0;
    for (subject, message) in messages {
        if pending.len() >= MAX_PENDING_ACKS
            && let Some(ack) = pending.next().await
        {
            duplicates += settled(ack)?;
        }
        let ack = js
            .send_publish(subject, message)
            .await
            .context("publishing to the scratch stream")?;
        pending.push(ack.into_future());
    }
    while let Some(ack) = pending.next().await {
        duplicates += settled(ack)?;
    }
    Ok((duplicates, started.elapsed()))
}

/// 1 if the stream reported the publish as a duplicate, 0 if stored; errors pass through.
fn settled(
    ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) -> anyhow::Result<u64> {
    let ack = ack.context("scratch stream did not acknowledge a publish")?;
    Ok(u64::from(ack.duplicate))
}

#[derive(Debug, Serialize)]
pub struct RawUnnest {
    pub schema: String,
    pub workers: u32,
    pub batch_rows: usize,
    pub rows: usize,
    pub inserted: usize,
    pub secs: f64,
    pub msgs_per_sec: f64,
}

/// Inserts `envelopes` with [`persist::persist`] into a scratch schema, one worker per
/// partition as the consumers do.
pub async fn raw_unnest(
    admin: &PgPool,
    database_url: &str,
    partitions: u32,
    workload: &Workload,
    envelopes: Arc<Vec<Envelope>>,
) -> anyhow::Result<RawUnnest> {
    // Digits only, so the name is safe to splice into DDL.
    let schema = format!("bench_{}", std::process::id());
    let outcome = async {
        create_scratch_schema(admin, &schema).await?;
        insert_all(database_url, &schema, partitions, workload, envelopes).await
    }
    .await;
    let dropped = sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(admin)
    .await;
    let (rows, inserted, elapsed) = outcome?;
    dropped.with_context(|| format!("dropping scratch schema {schema}"))?;
    let secs = elapsed.as_secs_f64();
    Ok(RawUnnest {
        schema,
        workers: partitions,
        batch_rows: BATCH_ROWS,
        rows,
        inserted,
        secs,
        msgs_per_sec: inserted as f64 / secs,
    })
}

/// Copies of `messages`, `conversations` and `message_rejections` (the persist statement writes
/// a reused key's rejection there) with every index, default and check, plus the foreign key
/// `LIKE` leaves out, so each insert does the work a real one does.
async fn create_scratch_schema(admin: &PgPool, schema: &str) -> anyhow::Result<()> {
    let ddl = format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE;
         CREATE SCHEMA {schema};
         CREATE TABLE {schema}.conversations (LIKE public.conversations INCLUDING ALL);
         CREATE TABLE {schema}.messages (LIKE public.messages INCLUDING ALL);
         CREATE TABLE {schema}.message_rejections (LIKE public.message_rejections INCLUDING ALL);
         ALTER TABLE {schema}.messages
           ADD FOREIGN KEY (conversation_id) REFERENCES {schema}.conversations (id);"
    );
    sqlx::raw_sql(AssertSqlSafe(ddl))
        .execute(admin)
        .await
        .with_context(|| format!("creating scratch schema {schema}"))?;
    Ok(())
}

/// Fills the scratch conversations, then times the partition workers. Returns rows offered,
/// rows inserted and the elapsed time. The scratch pool is closed either way, so dropping
/// the schema afterwards waits on no open transaction.
async fn insert_all(
    database_url: &str,
    schema: &str,
    partitions: u32,
    workload: &Workload,
    envelopes: Arc<Vec<Envelope>>,
) -> anyhow::Result<(usize, usize, Duration)> {
    let pool = scratch_pool(database_url, schema, partitions).await?;
    let result = async {
        fill_conversations(&pool, workload).await?;
        tracing::info!(
            %schema,
            rows = envelopes.len(),
            workers = partitions,
            "raw UNNEST baseline"
        );
        time_partition_workers(&pool, partitions, envelopes).await
    }
    .await;
    pool.close().await;
    result
}

/// The workload's conversations, so every scratch row has its conversation.
async fn fill_conversations(pool: &PgPool, workload: &Workload) -> anyhow::Result<()> {
    let ids = workload.conversation_ids();
    let creators: Vec<&str> = workload
        .conversations
        .iter()
        .map(|c| c.members[0].as_str())
        .collect();
    // Unqualified: the scratch pool's search_path is the scratch schema.
    sqlx::query(
        "INSERT INTO conversations (id, type, created_by)
         SELECT id, 'group', creator FROM UNNEST($1::uuid[], $2::text[]) AS t(id, creator)",
    )
    .bind(&ids)
    .bind(&creators)
    .execute(pool)
    .await
    .context("filling scratch conversations")?;
    Ok(())
}

/// One worker per partition, each with its partition's envelopes, all at once. A failing
/// worker stops the others (dropping the set aborts them).
async fn time_partition_workers(
    pool: &PgPool,
    partitions: u32,
    envelopes: Arc<Vec<Envelope>>,
) -> anyhow::Result<(usize, usize, Duration)> {
    let mut by_partition: Vec<Vec<usize>> = vec![Vec::new(); partitions as usize];
    for (index, envelope) in envelopes.iter().enumerate() {
        let partition = partition_of(&envelope.conversation_id.to_string(), partitions);
        by_partition[partition as usize].push(index);
    }
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for (partition, indexes) in by_partition.into_iter().enumerate() {
        let envelopes = envelopes.clone();
        workers.spawn(insert_partition(
            pool.clone(),
            envelopes,
            partition as u32,
            indexes,
        ));
    }
    let mut inserted = 0;
    while let Some(joined) = workers.join_next().await {
        inserted += joined.context("an insert worker panicked")??;
    }
    Ok((envelopes.len(), inserted, started.elapsed()))
}

/// One partition's rows in stream order, [`BATCH_ROWS`] per transaction, one after another
/// like a delivery consumer. Returns how many rows were inserted.
async fn insert_partition(
    pool: PgPool,
    envelopes: Arc<Vec<Envelope>>,
    partition: u32,
    indexes: Vec<usize>,
) -> anyhow::Result<usize> {
    let rows: Vec<Row<'_>> = indexes
        .iter()
        .enumerate()
        .map(|(position, &index)| Row {
            envelope: &envelopes[index],
            partition,
            stream_seq: position as u64 + 1,
        })
        .collect();
    let mut inserted = 0;
    for batch in rows.chunks(BATCH_ROWS) {
        let outcome = persist::persist(&pool, batch)
            .await
            .with_context(|| format!("inserting a batch of partition {partition}"))?;
        anyhow::ensure!(
            outcome.orphans.is_empty() && outcome.duplicates.is_empty(),
            "partition {partition}: {} orphans and {} duplicates in a scratch batch",
            outcome.orphans.len(),
            outcome.duplicates.len()
        );
        inserted += outcome.inserted.len();
    }
    Ok(inserted)
}

/// A pool whose connections resolve unqualified names in `schema` only, with every
/// connection open before the clock starts.
async fn scratch_pool(database_url: &str, schema: &str, size: u32) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(database_url)
        .context("parsing the database URL")?
        .options([("search_path", schema)]);
    let pool = PgPoolOptions::new()
        .max_connections(size)
        .connect_with(options)
        .await
        .context("connecting the scratch pool")?;
    let mut warm = Vec::with_capacity(size as usize);
    for _ in 0..size {
        warm.push(
            pool.acquire()
                .await
                .context("opening scratch connections")?,
        );
    }
    drop(warm);
    Ok(pool)
}
