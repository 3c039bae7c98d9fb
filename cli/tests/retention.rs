//! Retention (ADR 0004): the backlog (`MESSAGES`, a work queue) and the replay window
//! (`REPLAY`) are two streams with their own limits. A caught-up system never refuses a send
//! however much it has carried; with the consumers stopped the gateway sheds load at the
//! backlog bound, not before, and loses nothing. (Replays of the window: `replay.rs`.)

use hotpath_testkit as support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use hotpath_core::envelope::Envelope;
use hotpath_core::names;
use serde_json::{Value, json};
use support::ws::{connect, next_of, send_frame};
use support::{System, message_id_of, text};
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(60);

/// A message of `chars` characters with its own `clientMessageId`.
fn message(conversation: Uuid, client_id: &str, chars: usize) -> Value {
    let mut body = text(conversation, &format!("{client_id} {}", "x".repeat(chars)));
    body["clientMessageId"] = json!(client_id);
    body
}

async fn stream_state(js: &jetstream::Context, name: &str) -> jetstream::stream::State {
    js.get_stream(name)
        .await
        .unwrap_or_else(|error| panic!("stream {name}: {error}"))
        .cached_info()
        .state
        .clone()
}

/// Waits (bounded) until `MESSAGES` holds nothing: every accepted message is persisted and
/// acknowledged, so the work queue let go of it.
async fn wait_until_backlog_empty(js: &jetstream::Context) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let state = stream_state(js, names::MESSAGES_STREAM).await;
        if state.messages == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "MESSAGES still holds {} messages ({} bytes)",
            state.messages,
            state.bytes
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) until every partition's delivery consumer has a worker's pull request
/// waiting on it: the consumers are past their start-up (leases taken, consumers created).
async fn wait_until_consumers_pull(js: &jetstream::Context, partitions: u32) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut pulling = 0;
        if let Ok(stream) = js.get_stream(names::MESSAGES_STREAM).await {
            for partition in 0..partitions {
                if let Ok(info) = stream
                    .consumer_info(names::delivery_consumer(partition))
                    .await
                    && info.num_waiting > 0
                {
                    pulling += 1;
                }
            }
        }
        if pulling == partitions {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {pulling} of {partitions} partitions are being pulled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stored rows by message id: how many rows each has (always 1 unless something was stored
/// twice), waiting (bounded) until every one of `expected` is there.
async fn rows_per_id(system: &System, expected: &HashSet<Uuid>) -> HashMap<Uuid, i64> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let rows: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT id, count(*) FROM messages GROUP BY id")
                .fetch_all(&system.pool)
                .await
                .expect("rows");
        let rows: HashMap<Uuid, i64> = rows.into_iter().collect();
        if expected.iter().all(|id| rows.contains_key(id)) || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every accepted message has exactly one row, and nothing else was stored.
async fn assert_each_stored_once(system: &System, accepted: &HashSet<Uuid>) {
    let rows = rows_per_id(system, accepted).await;
    let missing = accepted.iter().filter(|id| !rows.contains_key(id)).count();
    let twice = rows.values().filter(|&&n| n != 1).count();
    let unexpected = rows.keys().filter(|id| !accepted.contains(id)).count();
    assert_eq!(
        (missing, twice, unexpected),
        (0, 0, 0),
        "(accepted but not stored, stored more than once, stored but never accepted) of {} accepted",
        accepted.len()
    );
    support::assert_gap_free_in_acceptance_order(&system.pool).await;
}

/// The replay window's entries, oldest first: (window sequence, envelope).
async fn window_entries(js: &jetstream::Context) -> Vec<(u64, Envelope)> {
    let stream = js.get_stream(names::REPLAY_STREAM).await.expect("REPLAY");
    let state = stream.cached_info().state.clone();
    let mut entries = Vec::new();
    if state.messages == 0 {
        return entries;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let entry = stream.direct_get(seq).await.expect("window entry");
        let envelope = Envelope::decode(&entry.payload).expect("the window holds envelopes");
        entries.push((seq, envelope));
    }
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_up_system_never_refuses_sends_however_much_it_has_carried() {
    const SENDS: usize = 2000;
    const CHARS: usize = 9000;
    let system = System::start_with(|config| {
        // A backlog of ~440 of these messages; the stream's ceiling twice that, 8 MiB. What is
        // sent in all is more than twice the ceiling.
        config.backlog_max_bytes = 4 << 20;
        config.replay_max_bytes = 4 << 20;
    })
    .await;
    let js = system.jetstream().await;
    wait_until_consumers_pull(&js, system.config.partitions).await;
    let ceiling = js
        .get_stream(names::MESSAGES_STREAM)
        .await
        .expect("MESSAGES")
        .cached_info()
        .config
        .max_bytes;
    assert_eq!(ceiling, 8 << 20);

    let mut conversations = Vec::new();
    for _ in 0..8 {
        conversations.push(system.conversation("alice", "group", &["bob"]).await);
    }
    // Four in flight: the consumers, though on the same two cores, keep up.
    let answers: Vec<(u16, Value)> = futures::stream::iter(0..SENDS)
        .map(|n| {
            let conversation = conversations[n % conversations.len()];
            let body = message(conversation, &format!("m-{n}"), CHARS);
            let system = &system;
            async move { system.send("alice", body).await }
        })
        .buffered(4)
        .collect()
        .await;
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for (status, _) in &answers {
        *statuses.entry(*status).or_default() += 1;
    }
    assert_eq!(
        statuses,
        BTreeMap::from([(202, SENDS)]),
        "every send accepted; first refusal: {:?}",
        answers.iter().find(|(status, _)| *status != 202)
    );
    let accepted: HashSet<Uuid> = answers.iter().map(|(_, ack)| message_id_of(ack)).collect();
    assert_eq!(accepted.len(), SENDS);
    let envelope_bytes = SENDS * CHARS;
    assert!(
        envelope_bytes as i64 > 2 * ceiling,
        "more than twice the stream's ceiling went through it"
    );

    // Persisted once each; the backlog let go of all of it.
    assert_each_stored_once(&system, &accepted).await;
    wait_until_backlog_empty(&js).await;

    // The window holds the most recent persisted messages, within its bytes: in each
    // partition, its entries are the partition's last messages in stream order, the very last
    // one included, and the oldest ones were dropped.
    let window = stream_state(&js, names::REPLAY_STREAM).await;
    assert!(
        window.bytes <= system.config.replay_max_bytes,
        "the window's {} bytes exceed its limit",
        window.bytes
    );
    assert!(window.first_sequence > 1, "the oldest entries were dropped");
    let entries = window_entries(&js).await;
    assert!(
        entries.len() > 100,
        "the window holds {} entries",
        entries.len()
    );
    let rows: Vec<(Uuid, i32, i64)> =
        sqlx::query_as("SELECT id, stream_partition, stream_seq FROM messages")
            .fetch_all(&system.pool)
            .await
            .expect("rows");
    let position: HashMap<Uuid, (i32, i64)> = rows
        .iter()
        .map(|&(id, partition, seq)| (id, (partition, seq)))
        .collect();
    let mut by_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for &(_, partition, seq) in &rows {
        by_partition.entry(partition).or_default().push(seq);
    }
    let mut kept: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for (_, envelope) in &entries {
        let (partition, seq) = position[&envelope.message_id];
        kept.entry(partition).or_default().push(seq);
    }
    for (partition, kept) in &kept {
        let mut all = by_partition[partition].clone();
        all.sort_unstable();
        let newest = &all[all.len() - kept.len()..];
        assert_eq!(
            kept.as_slice(),
            newest,
            "partition {partition}: the window keeps its newest messages, in order"
        );
    }
    for (partition, all) in &by_partition {
        assert!(
            kept.contains_key(partition),
            "partition {partition}'s newest messages are in the window ({} persisted)",
            all.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_consumers_stopped_sends_are_refused_at_the_backlog_bound_and_not_before() {
    const BOUND: u64 = 40;
    let mut system = System::start_with(|config| config.backlog_max_msgs = BOUND).await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    system.stop_consumers().await;

    // Up to the bound: accepted, one after another.
    let mut sent = Vec::new();
    for n in 0..BOUND {
        let (status, ack) = system
            .send("alice", message(conversation, &format!("m-{n}"), 10))
            .await;
        assert_eq!(status, 202, "send {n} of {BOUND} is accepted: {ack}");
        sent.push(message_id_of(&ack));
    }

    // At the bound: 503 BACKLOG_FULL with Retry-After, over HTTP ...
    let response = system
        .post(
            "alice",
            "/v1/messages",
            message(conversation, "one-too-many", 10),
        )
        .await;
    assert_eq!(response.status(), 503);
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("a Retry-After in seconds");
    assert!(retry_after >= 1);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "BACKLOG_FULL", "{body}");
    assert_eq!(body["error"]["details"]["backlogMessages"], BOUND);
    assert_eq!(body["error"]["details"]["maxMessages"], BOUND);
    // ... and over a WebSocket.
    let mut socket = connect(&system, &system.base, "alice").await;
    let mut frame = message(conversation, "one-too-many-ws", 10);
    frame["type"] = json!("send");
    frame["reqId"] = json!("s1");
    send_frame(&mut socket, frame).await;
    let refused = next_of(&mut socket, "error").await;
    assert_eq!(refused["reqId"], "s1");
    assert_eq!(refused["error"]["code"], "BACKLOG_FULL", "{refused}");
    // Nothing refused reached the stream.
    let js = system.jetstream().await;
    assert_eq!(
        stream_state(&js, names::MESSAGES_STREAM).await.messages,
        BOUND
    );

    // The consumers return: every accepted message is persisted once, in the order sent.
    system.start_consumers().await;
    let accepted: HashSet<Uuid> = sent.iter().copied().collect();
    assert_each_stored_once(&system, &accepted).await;
    let by_seq = support::ids_in_seq_order(&system.pool, conversation).await;
    assert_eq!(by_seq, sent, "seq follows the order of acceptance");

    // And sends are accepted again once the gateway sees the backlog drained.
    wait_until_backlog_empty(&js).await;
    let deadline = Instant::now() + PATIENCE;
    let again = loop {
        let (status, ack) = system
            .send("alice", message(conversation, "after-the-drain", 10))
            .await;
        if status == 202 {
            break message_id_of(&ack);
        }
        assert_eq!(ack["error"]["code"], "BACKLOG_FULL", "{ack}");
        assert!(Instant::now() < deadline, "sends are accepted again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut all = accepted;
    all.insert(again);
    assert_each_stored_once(&system, &all).await;
}

/// The stream and consumer definitions of a Hotpath before ADR 0004, as it shipped them.
const OLD_MESSAGES_JSON: &str = include_str!("fixtures/pre-0004/MESSAGES.json");
const OLD_RECEIPTS_JSON: &str = include_str!("fixtures/pre-0004/RECEIPTS.json");
const OLD_DELIVERY_JSON: &str = include_str!("fixtures/pre-0004/delivery.json");
const OLD_RECEIPTS_CONSUMER_JSON: &str = include_str!("fixtures/pre-0004/receipts.json");

/// Replaces the streams with the old layout, made the way the old `ensure_streams` and
/// consumers made it: limits retention, partitions in the metadata, one `delivery-<p>` per
/// partition and the `receipts` consumer. Nothing of the new layout is left (no `REPLAY`).
async fn create_old_layout(js: &jetstream::Context, config: &hotpath_core::config::Config) {
    for name in [
        names::MESSAGES_STREAM,
        names::RECEIPTS_STREAM,
        names::REPLAY_STREAM,
    ] {
        js.delete_stream(name).await.expect("delete new stream");
    }
    let mut messages: jetstream::stream::Config =
        serde_json::from_str(OLD_MESSAGES_JSON).expect("old MESSAGES.json");
    assert_eq!(
        messages.retention,
        jetstream::stream::RetentionPolicy::Limits
    );
    messages.metadata.insert(
        "hotpath.partitions".to_string(),
        config.partitions.to_string(),
    );
    let messages = js.create_stream(messages).await.expect("old MESSAGES");
    for partition in 0..config.partitions {
        let mut consumer: jetstream::consumer::pull::Config =
            serde_json::from_str(OLD_DELIVERY_JSON).expect("old delivery.json");
        consumer.durable_name = Some(names::delivery_consumer(partition));
        consumer.name = consumer.durable_name.clone();
        consumer.filter_subject = names::message_subject(partition);
        consumer.ack_wait = config.ack_wait();
        consumer.max_ack_pending = config.batch_size as i64;
        messages
            .create_consumer(consumer)
            .await
            .expect("old delivery consumer");
    }
    let receipts: jetstream::stream::Config =
        serde_json::from_str(OLD_RECEIPTS_JSON).expect("old RECEIPTS.json");
    let receipts = js.create_stream(receipts).await.expect("old RECEIPTS");
    let mut consumer: jetstream::consumer::pull::Config =
        serde_json::from_str(OLD_RECEIPTS_CONSUMER_JSON).expect("old receipts.json");
    consumer.name = consumer.durable_name.clone();
    receipts
        .create_consumer(consumer)
        .await
        .expect("old receipts consumer");
}

/// An envelope as an old gateway published it.
fn envelope(conversation: Uuid, n: usize) -> Envelope {
    Envelope {
        version: hotpath_core::envelope::ENVELOPE_VERSION,
        message_id: Uuid::new_v4(),
        correlation_id: Uuid::new_v4(),
        idempotency_key: format!("old-layout-{conversation}-{n}"),
        conversation_id: conversation,
        sender_id: "alice".into(),
        content: format!("sent before the upgrade {n}"),
        content_type: "text".into(),
        recipient_ids: vec!["bob".into()],
        metadata: serde_json::Map::new(),
        priority: "normal".into(),
        accepted_at: chrono::Utc::now(),
        request_digest: None,
    }
}

/// An installation made before ADR 0004 with traffic in it: `SENT` messages in the old
/// `MESSAGES`, the first half of each partition persisted and acknowledged the old way, the
/// rest not, and one receipt not yet recorded. Returns (every message id, the persisted ones).
async fn old_installation(system: &System) -> (HashSet<Uuid>, HashSet<Uuid>) {
    const SENT: usize = 24;
    let js = system.jetstream().await;
    let mut conversations = Vec::new();
    for _ in 0..3 {
        conversations.push(system.conversation("alice", "group", &["bob"]).await);
    }
    create_old_layout(&js, &system.config).await;
    let mut by_partition: BTreeMap<u32, Vec<Envelope>> = BTreeMap::new();
    for n in 0..SENT {
        let envelope = envelope(conversations[n % conversations.len()], n);
        let partition = names::partition_of(
            &envelope.conversation_id.to_string(),
            system.config.partitions,
        );
        js.send_publish(
            names::message_subject(partition),
            jetstream::message::PublishMessage::build()
                .payload(envelope.encode().into())
                .message_id(&envelope.idempotency_key),
        )
        .await
        .expect("publish")
        .await
        .expect("stored in the old MESSAGES");
        by_partition.entry(partition).or_default().push(envelope);
    }
    let all: HashSet<Uuid> = by_partition
        .values()
        .flatten()
        .map(|e| e.message_id)
        .collect();

    // The old consumers persist and acknowledge the first half of each partition.
    let messages = js
        .get_stream(names::MESSAGES_STREAM)
        .await
        .expect("old MESSAGES");
    let mut persisted = HashSet::new();
    for (partition, envelopes) in &by_partition {
        let half = envelopes.len() / 2;
        if half == 0 {
            continue;
        }
        let consumer: jetstream::consumer::PullConsumer = messages
            .get_consumer(&names::delivery_consumer(*partition))
            .await
            .expect("old delivery consumer");
        let mut batch = consumer
            .fetch()
            .max_messages(half)
            .messages()
            .await
            .expect("fetch");
        let mut fetched = Vec::new();
        while let Some(message) = batch.next().await {
            fetched.push(message.expect("message"));
        }
        assert_eq!(fetched.len(), half);
        let decoded: Vec<(Envelope, u64)> = fetched
            .iter()
            .map(|m| {
                (
                    Envelope::decode(&m.payload).expect("envelope"),
                    m.info().expect("info").stream_sequence,
                )
            })
            .collect();
        let rows: Vec<hotpath_consumers::persist::Row<'_>> = decoded
            .iter()
            .map(|(envelope, stream_seq)| hotpath_consumers::persist::Row {
                envelope,
                partition: *partition,
                stream_seq: *stream_seq,
            })
            .collect();
        hotpath_consumers::persist::persist(&system.pool, &rows)
            .await
            .expect("persisted the old way");
        for message in &fetched {
            message.double_ack().await.expect("acknowledged");
        }
        persisted.extend(decoded.iter().map(|(e, _)| e.message_id));
    }
    assert!(!persisted.is_empty() && persisted.len() < all.len());

    // A receipt for a persisted message, not yet recorded.
    let (&partition, envelopes) = by_partition.iter().next().expect("a partition");
    let receipt = hotpath_core::receipts::Receipt {
        message_id: envelopes[0].message_id,
        conversation_id: envelopes[0].conversation_id,
        user_id: "bob".into(),
        state: hotpath_core::receipts::ReceiptState::Delivered,
        at: chrono::Utc::now(),
    };
    js.send_publish(
        names::receipt_subject(partition),
        jetstream::message::PublishMessage::build()
            .payload(receipt.encode().into())
            .message_id(receipt.msg_id()),
    )
    .await
    .expect("publish receipt")
    .await
    .expect("receipt stored");
    (all, persisted)
}

async fn assert_migrated(system: &mut System, all: &HashSet<Uuid>, persisted: &HashSet<Uuid>) {
    let js = system.jetstream().await;
    for (name, retention) in [
        (
            names::MESSAGES_STREAM,
            jetstream::stream::RetentionPolicy::WorkQueue,
        ),
        (
            names::RECEIPTS_STREAM,
            jetstream::stream::RetentionPolicy::WorkQueue,
        ),
        (
            names::REPLAY_STREAM,
            jetstream::stream::RetentionPolicy::Limits,
        ),
    ] {
        let stream = js.get_stream(name).await.expect("migrated stream");
        assert_eq!(stream.cached_info().config.retention, retention, "{name}");
    }
    for holding in ["MESSAGES_MIGRATING", "RECEIPTS_MIGRATING"] {
        assert!(
            js.get_stream(holding).await.is_err(),
            "{holding} is gone once the migration is done"
        );
    }
    // The persisted part is the replay window; the rest waits in the new backlog.
    let window: HashSet<Uuid> = window_entries(&js)
        .await
        .into_iter()
        .map(|(_, envelope)| envelope.message_id)
        .collect();
    assert_eq!(&window, persisted, "REPLAY holds what was persisted");
    assert_eq!(
        stream_state(&js, names::MESSAGES_STREAM).await.messages as usize,
        all.len() - persisted.len(),
        "MESSAGES holds what was not acknowledged"
    );
    assert_eq!(stream_state(&js, names::RECEIPTS_STREAM).await.messages, 1);

    // The consumers run on the new layout: every message is stored exactly once, in order.
    system.start_consumers().await;
    assert_each_stored_once(system, all).await;
    wait_until_backlog_empty(&js).await;
    support::receipts::wait_until_settled(&js).await;
    let (recorded,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM message_receipts WHERE delivered_at IS NOT NULL")
            .fetch_one(&system.pool)
            .await
            .expect("receipts");
    assert_eq!(
        recorded, 1,
        "the receipt waiting in the old RECEIPTS is recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installation_with_the_old_layout_is_migrated_at_start_up_keeping_every_message() {
    let mut system = System::start().await;
    system.stop_consumers().await;
    let (all, persisted) = old_installation(&system).await;

    // What every role (and `hotpath migrate`) does at start-up.
    hotpath::roles::prepare(&system.config)
        .await
        .expect("start-up migrates the streams");
    assert_migrated(&mut system, &all, &persisted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_cut_short_after_its_copy_resumes_at_the_next_start_up() {
    let mut system = System::start().await;
    system.stop_consumers().await;
    let (all, persisted) = old_installation(&system).await;

    // A start that dies right after copying out: the old streams and the holding streams
    // are both there.
    let js = system.jetstream().await;
    hotpath_core::stream_migration::copy_out(&js, &system.config)
        .await
        .expect("copy out");
    assert!(js.get_stream("MESSAGES_MIGRATING").await.is_ok());
    assert_eq!(
        js.get_stream(names::MESSAGES_STREAM)
            .await
            .expect("old MESSAGES")
            .cached_info()
            .config
            .retention,
        jetstream::stream::RetentionPolicy::Limits
    );

    // The next start copies again (nothing twice) and finishes.
    hotpath::roles::prepare(&system.config)
        .await
        .expect("the next start-up finishes the migration");
    assert_migrated(&mut system, &all, &persisted).await;
}
