//! Faults injected into the real parts: NATS stopped under the gateway, Postgres stopped under
//! load and while receipts arrive, the consumers killed mid-batch, poison in the stream. Each
//! test acts through the API (or publishes to JetStream directly, as a broken producer would)
//! and asserts on what is observable: HTTP answers, rows in Postgres, frames on a socket,
//! entries in the DLQ stream.

use hotpath_testkit as support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use hotpath_core::domain::DlqSource;
use hotpath_core::envelope::{ENVELOPE_VERSION, Envelope};
use hotpath_core::names::{self, dlq_headers};
use hotpath_core::receipts::ReceiptState;
use serde_json::{Value, json};
use sqlx::PgPool;
use support::receipts;
use support::ws::{PATIENCE, QUIET, acknowledge, connect, state_change, state_changes};
use support::{System, text};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A text message with its own `clientMessageId`, so every call is a distinct message.
fn unique(conversation: Uuid, client_id: &str) -> Value {
    let mut body = text(conversation, &format!("message {client_id}"));
    body["clientMessageId"] = json!(client_id);
    body
}

fn message_id_of(ack: &Value) -> Uuid {
    ack["messageId"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .unwrap_or_else(|| panic!("no messageId in {ack}"))
}

/// The ids of every stored message. Retries (bounded) while Postgres is coming back, since the
/// test's own pool has to reconnect too.
async fn stored_ids(pool: &PgPool) -> HashSet<Uuid> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match sqlx::query_as::<_, (Uuid,)>("SELECT id FROM messages")
            .fetch_all(pool)
            .await
        {
            Ok(rows) => return rows.into_iter().map(|(id,)| id).collect(),
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "reading stored ids failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("reading stored ids: {error}"),
        }
    }
}

/// Row count, or `None` while Postgres cannot answer.
async fn try_count(pool: &PgPool) -> Option<i64> {
    sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM messages")
        .fetch_one(pool)
        .await
        .ok()
        .map(|(count,)| count)
}

/// Waits (at most `within`) until every id in `expected` is stored; returns what is stored.
async fn wait_until_stored(
    pool: &PgPool,
    expected: &HashSet<Uuid>,
    within: Duration,
) -> HashSet<Uuid> {
    let deadline = Instant::now() + within;
    loop {
        let stored = stored_ids(pool).await;
        if expected.is_subset(&stored) || Instant::now() > deadline {
            return stored;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Exactly once: the stored messages are the accepted ones, no more, no fewer; and per
/// conversation seq is gap-free in acceptance order.
async fn assert_stored_exactly(pool: &PgPool, accepted: &HashSet<Uuid>) {
    let stored = stored_ids(pool).await;
    let missing: Vec<&Uuid> = accepted.difference(&stored).collect();
    let unexpected: Vec<&Uuid> = stored.difference(accepted).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "{} accepted, {} stored: {} accepted but missing (e.g. {:?}), {} stored but never accepted (e.g. {:?})",
        accepted.len(),
        stored.len(),
        missing.len(),
        &missing[..missing.len().min(5)],
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)],
    );
    let rows = support::assert_gap_free_in_acceptance_order(pool).await;
    assert_eq!(rows, accepted.len(), "rows stored vs messages accepted");
}

/// Sends as one user from a background task, without borrowing the `System` (the test keeps
/// it to stop and restart servers meanwhile).
#[derive(Clone)]
struct ApiClient {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl ApiClient {
    fn new(system: &System, user: &str) -> ApiClient {
        ApiClient {
            http: system.http.clone(),
            url: system.url("/v1/messages"),
            token: system.token(user),
        }
    }

    /// (status, body); status 0 when the request itself failed.
    async fn send(&self, body: &Value) -> (u16, Value) {
        match self
            .http
            .post(&self.url)
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
        {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.json().await.unwrap_or(Value::Null))
            }
            Err(error) => (0, json!({"transportError": error.to_string()})),
        }
    }
}

/// One send made by a background sender.
struct Sent {
    started: Instant,
    finished: Instant,
    status: u16,
    answer: Value,
}

/// Sends to `conversation` every `every` (one request at a time, unique client ids) until
/// `stop`, at most `max` messages.
async fn send_steadily(
    client: ApiClient,
    conversation: Uuid,
    prefix: String,
    every: Duration,
    max: usize,
    stop: CancellationToken,
) -> Vec<Sent> {
    let mut sent = Vec::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..max {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let started = Instant::now();
        let (status, answer) = client
            .send(&unique(conversation, &format!("{prefix}-{n}")))
            .await;
        sent.push(Sent {
            started,
            finished: Instant::now(),
            status,
            answer,
        });
    }
    sent
}

/// Sends `count` messages round-robin over `conversations` (as each conversation's creator),
/// 32 in flight, asserts every one is accepted and returns their ids.
async fn send_burst(
    system: &System,
    conversations: &[(String, Uuid)],
    prefix: &str,
    count: usize,
) -> HashSet<Uuid> {
    let answers: Vec<(u16, Value)> = futures::stream::iter(0..count)
        .map(|n| {
            let (sender, conversation) = &conversations[n % conversations.len()];
            system.send(sender, unique(*conversation, &format!("{prefix}-{n}")))
        })
        .buffered(32)
        .collect()
        .await;
    let ids: HashSet<Uuid> = answers
        .iter()
        .map(|(status, ack)| {
            assert_eq!(*status, 202, "{ack}");
            message_id_of(ack)
        })
        .collect();
    assert_eq!(
        ids.len(),
        count,
        "every message of the burst has its own id"
    );
    ids
}

/// Messages handed out to the delivery consumers and not yet settled, over all partitions.
async fn ack_pending(js: &jetstream::Context, partitions: u32) -> usize {
    let stream = js
        .get_stream(names::MESSAGES_STREAM)
        .await
        .expect("MESSAGES stream");
    let mut pending = 0;
    for partition in 0..partitions {
        pending += stream
            .consumer_info(names::delivery_consumer(partition))
            .await
            .expect("consumer info")
            .num_ack_pending;
    }
    pending
}

/// Waits (bounded) until every partition's delivery consumer exists and has a worker's pull
/// request waiting on it: only then is the consumers role past its start-up.
async fn wait_until_consumers_pull(js: &jetstream::Context, partitions: u32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut waiting = Vec::new();
    while Instant::now() < deadline {
        waiting.clear();
        if let Ok(stream) = js.get_stream(names::MESSAGES_STREAM).await {
            for partition in 0..partitions {
                let info = stream
                    .consumer_info(names::delivery_consumer(partition))
                    .await;
                waiting.push(info.map(|info| info.num_waiting).unwrap_or(0));
            }
        }
        if waiting.len() == partitions as usize && waiting.iter().all(|&n| n > 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the delivery consumers are not all pulling; pull requests waiting: {waiting:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_answers_503_with_retry_after_in_bounded_time_and_sending_recovers() {
    let mut system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    // The same clientMessageId throughout: retrying it is what a client is told to do.
    let body = unique(conversation, "through-the-outage");
    // The outage hits a running system, not one still starting up: the consumers role does
    // not (yet) survive losing NATS while it creates its delivery consumers.
    wait_until_consumers_pull(&system.jetstream().await, system.config.partitions).await;

    system.servers.nats.stop().await.expect("nats-server stops");
    let started = Instant::now();
    let response = system.post("alice", "/v1/messages", body.clone()).await;
    let took = started.elapsed();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap_or("<not ascii>").to_string());
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "ENQUEUE_FAILED", "{answer}");
    let retry_after = retry_after.expect("a Retry-After header on the 503");
    assert!(
        retry_after.parse::<u64>().is_ok_and(|secs| secs >= 1),
        "Retry-After is {retry_after:?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "the 503 took {took:?}, not under 3 s"
    );

    system
        .servers
        .nats
        .restart()
        .await
        .expect("nats-server restarts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ack = loop {
        let (status, answer) = system.send("alice", body.clone()).await;
        if status == 202 {
            break answer;
        }
        assert_eq!(
            status, 503,
            "while the gateway reconnects only 503 is expected: {answer}"
        );
        assert!(
            Instant::now() < deadline,
            "no 202 within 20 s of NATS coming back; last answer: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let message = message_id_of(&ack);

    let stored = wait_until_stored(
        &system.pool,
        &HashSet::from([message]),
        Duration::from_secs(20),
    )
    .await;
    assert!(stored.contains(&message), "the message was never stored");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_stored_exactly(&system.pool, &HashSet::from([message])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_20_s_under_load_loses_and_duplicates_nothing() {
    const CONVERSATIONS: usize = 8;
    // 8 senders, one request at a time each, one every 53 ms: about 150 messages a second.
    const EVERY: Duration = Duration::from_millis(53);
    const OUTAGE: Duration = Duration::from_secs(20);

    let mut system = System::start().await;
    let mut accepted = HashSet::new();
    let mut conversations = Vec::new();
    for i in 0..CONVERSATIONS {
        let sender = format!("sender-{i}");
        let conversation = system.conversation(&sender, "group", &["reader"]).await;
        // Warms the gateway's cache: this conversation and this sender's blocks.
        let (status, ack) = system
            .send(&sender, unique(conversation, &format!("warm-{i}")))
            .await;
        assert_eq!(status, 202, "{ack}");
        accepted.insert(message_id_of(&ack));
        conversations.push((sender, conversation));
    }

    let stop = CancellationToken::new();
    let senders: Vec<JoinHandle<Vec<Sent>>> = conversations
        .iter()
        .enumerate()
        .map(|(i, (sender, conversation))| {
            tokio::spawn(send_steadily(
                ApiClient::new(&system, sender),
                *conversation,
                format!("load-{i}"),
                EVERY,
                5_000,
                stop.clone(),
            ))
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(2)).await;
    system
        .servers
        .postgres
        .stop()
        .await
        .expect("postgres stops");
    let outage_began = Instant::now();
    // The fault is real: Postgres does not answer.
    assert!(
        sqlx::query("SELECT 1").execute(&system.pool).await.is_err(),
        "Postgres still answers after stop()"
    );
    tokio::time::sleep(OUTAGE.saturating_sub(outage_began.elapsed())).await;
    let outage_ended = Instant::now();
    system
        .servers
        .postgres
        .restart()
        .await
        .expect("postgres restarts");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();

    let mut sent = Vec::new();
    for sender in senders {
        sent.extend(sender.await.expect("sender task"));
    }
    let refused: Vec<String> = sent
        .iter()
        .filter(|s| s.status != 202)
        .map(|s| format!("{} {}", s.status, s.answer))
        .collect();
    assert!(
        refused.is_empty(),
        "{} of {} sends were not accepted, e.g. {:?}",
        refused.len(),
        sent.len(),
        &refused[..refused.len().min(5)]
    );
    let during_outage = sent
        .iter()
        .filter(|s| s.started >= outage_began && s.finished <= outage_ended)
        .count();
    assert!(
        during_outage >= 500,
        "only {during_outage} sends were accepted while Postgres was down"
    );
    let load: HashSet<Uuid> = sent.iter().map(|s| message_id_of(&s.answer)).collect();
    assert_eq!(load.len(), sent.len(), "every send has its own message id");
    accepted.extend(load);

    wait_until_stored(&system.pool, &accepted, Duration::from_secs(60)).await;
    assert_stored_exactly(&system.pool, &accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_batch_and_restarted_stores_everything_exactly_once_in_order() {
    const BURST: usize = 2000;
    const ATTEMPTS: usize = 5;

    // Small batches: many transactions per partition, so a kill lands inside one.
    let mut system = System::start_with(|config| config.batch_size = 16).await;
    let js = system.jetstream().await;
    let partitions = system.config.partitions;
    system.stop_consumers().await;
    let mut conversations = Vec::new();
    for i in 0..4 {
        let sender = format!("sender-{i}");
        let conversation = system.conversation(&sender, "group", &["reader"]).await;
        conversations.push((sender, conversation));
    }

    let mut accepted: HashSet<Uuid> = HashSet::new();
    let mut killed_mid_work = false;
    for attempt in 0..ATTEMPTS {
        // The consumers are stopped here: the burst waits in the stream.
        let burst = send_burst(&system, &conversations, &format!("burst-{attempt}"), BURST).await;
        accepted.extend(burst);
        let before = try_count(&system.pool).await.expect("count");
        system.start_consumers().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while try_count(&system.pool).await.unwrap_or(before) <= before && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        system.kill_consumers().await;
        let after = try_count(&system.pool).await.expect("count");
        let unsettled = ack_pending(&js, partitions).await;
        tracing::info!(attempt, before, after, unsettled, "killed the consumers");
        if after > before && (after as usize) < accepted.len() && unsettled > 0 {
            killed_mid_work = true;
            break;
        }
        // Too early or too late: let this burst drain and try again with the next one.
        system.start_consumers().await;
        wait_until_stored(&system.pool, &accepted, Duration::from_secs(60)).await;
        system.stop_consumers().await;
    }
    assert!(
        killed_mid_work,
        "in {ATTEMPTS} attempts the consumers were never killed with work in hand"
    );

    system.start_consumers().await;
    // Unsettled messages come back after the ack wait (3 s in tests).
    wait_until_stored(&system.pool, &accepted, Duration::from_secs(60)).await;
    assert_stored_exactly(&system.pool, &accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_lands_in_the_dlq_and_does_not_block_its_partition() {
    let system = System::start_with(|config| config.poison_max_deliver = 2).await;
    let partitions = system.config.partitions;
    // Everything goes to partition 0: the garbage, the orphan, and the good message behind them.
    let mut on_partition_zero = None;
    for _ in 0..64 {
        let id = system.conversation("alice", "group", &["bob"]).await;
        if names::partition_of(&id.to_string(), partitions) == 0 {
            on_partition_zero = Some(id);
            break;
        }
    }
    let conversation = on_partition_zero.expect("a conversation on partition 0 within 64 tries");
    let missing_conversation = (0..10_000)
        .map(|_| Uuid::new_v4())
        .find(|id| names::partition_of(&id.to_string(), partitions) == 0)
        .expect("an id on partition 0");
    let subject = names::message_subject(0);
    let js = system.jetstream().await;

    // (a) Bytes that are not an envelope.
    let garbage: &[u8] = b"\x00\xff this is not an envelope {";
    let garbage_seq = js
        .publish(subject.clone(), garbage.to_vec().into())
        .await
        .expect("publish garbage")
        .await
        .expect("garbage stored")
        .sequence;

    // (b) A well-formed envelope for a conversation that does not exist.
    let orphan = Envelope {
        version: ENVELOPE_VERSION,
        message_id: Uuid::new_v4(),
        correlation_id: Uuid::new_v4(),
        idempotency_key: format!("test_orphan_{}", Uuid::new_v4()),
        conversation_id: missing_conversation,
        sender_id: "alice".into(),
        content: "nobody will ever read this".into(),
        content_type: "text".into(),
        recipient_ids: vec!["bob".into()],
        metadata: serde_json::Map::new(),
        priority: "normal".into(),
        accepted_at: chrono::Utc::now(),
        request_digest: None,
    };
    let orphan_bytes = orphan.encode();
    let orphan_ack = js
        .send_publish(
            subject.clone(),
            PublishMessage::build()
                .payload(orphan_bytes.clone().into())
                .message_id(&orphan.idempotency_key),
        )
        .await
        .expect("publish orphan")
        .await
        .expect("orphan stored");
    assert!(!orphan_ack.duplicate);
    let orphan_seq = orphan_ack.sequence;

    // (c) A good message behind both, in the same partition.
    let (status, ack) = system
        .send("alice", unique(conversation, "behind-the-poison"))
        .await;
    assert_eq!(status, 202, "{ack}");
    let good = message_id_of(&ack);
    let stored = wait_until_stored(
        &system.pool,
        &HashSet::from([good]),
        Duration::from_secs(20),
    )
    .await;
    assert!(
        stored.contains(&good),
        "the message behind the poison was never stored"
    );

    // Both poisons reach the DLQ (the orphan after its second delivery).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let count = js
            .get_stream(names::DLQ_STREAM)
            .await
            .expect("DLQ stream")
            .cached_info()
            .state
            .messages;
        if count >= 2 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Room for a wrongly repeated dead letter to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dlq = js.get_stream(names::DLQ_STREAM).await.expect("DLQ stream");
    let state = dlq.cached_info().state.clone();
    assert_eq!(state.messages, 2, "DLQ entries: {state:?}");
    let mut entries = HashMap::new();
    for seq in state.first_sequence..=state.last_sequence {
        let entry = dlq.get_raw_message(seq).await.expect("DLQ entry");
        assert_eq!(
            entry.subject.as_str(),
            names::dlq_subject(DlqSource::Messages)
        );
        let header = |name: &str| {
            entry
                .headers
                .get(name)
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        assert!(
            !header(dlq_headers::REASON).is_empty(),
            "DLQ entry {seq} has no reason"
        );
        assert_eq!(header(dlq_headers::SOURCE_STREAM), names::MESSAGES_STREAM);
        assert_eq!(header(dlq_headers::SOURCE_SUBJECT), subject);
        let source_seq: u64 = header(dlq_headers::SOURCE_SEQUENCE)
            .parse()
            .unwrap_or_else(|_| panic!("DLQ entry {seq} has no source sequence"));
        let deliveries = header(dlq_headers::DELIVERIES);
        entries.insert(source_seq, (entry.payload.to_vec(), deliveries));
    }
    let garbage_entry = entries
        .get(&garbage_seq)
        .expect("the garbage is in the DLQ under its stream sequence");
    assert_eq!(garbage_entry.0, garbage, "the garbage's payload, unchanged");
    let orphan_entry = entries
        .get(&orphan_seq)
        .expect("the orphan is in the DLQ under its stream sequence");
    assert_eq!(
        orphan_entry.0, orphan_bytes,
        "the orphan's payload, unchanged"
    );
    assert_eq!(
        orphan_entry.1, "2",
        "the orphan is dead-lettered on its poison_max_deliver-th delivery"
    );

    // Nothing of the orphan was stored; only the good message was.
    let (orphans,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM messages WHERE id = $1 OR conversation_id = $2")
            .bind(orphan.message_id)
            .bind(missing_conversation)
            .fetch_one(&system.pool)
            .await
            .expect("count");
    assert_eq!(orphans, 0);
    assert_stored_exactly(&system.pool, &HashSet::from([good])).await;

    // And the partition is clear: nothing left pending or in hand.
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        let info = js
            .get_stream(names::MESSAGES_STREAM)
            .await
            .expect("MESSAGES stream")
            .consumer_info(names::delivery_consumer(0))
            .await
            .expect("consumer info");
        if (info.num_pending == 0 && info.num_ack_pending == 0) || Instant::now() > deadline {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (info.num_pending, info.num_ack_pending),
        (0, 0),
        "partition 0 still has work"
    );
}

/// Sends `first..=last` as `m<n>` to `conversation` and returns the accepted ids.
async fn send_numbered(
    system: &System,
    conversation: Uuid,
    range: std::ops::RangeInclusive<usize>,
) -> HashSet<Uuid> {
    let mut accepted = HashSet::new();
    for n in range {
        let (status, ack) = system
            .send("alice", unique(conversation, &format!("m{n}")))
            .await;
        assert_eq!(status, 202, "{ack}");
        accepted.insert(message_id_of(&ack));
    }
    accepted
}

/// A worker that holds fewer messages than a batch when it dies (or is stopped) leaves them
/// unacknowledged; newer messages must not overtake them when the next worker starts.
async fn a_partial_batch_in_hand_is_not_overtaken(kill: bool) {
    let mut system = System::start_with(|config| config.batch_size = 16).await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let mut accepted = send_numbered(&system, conversation, 0..=0).await;
    wait_until_stored(&system.pool, &accepted, Duration::from_secs(10)).await;

    // With Postgres down the worker holds a batch of three, well short of a full batch.
    system
        .servers
        .postgres
        .stop()
        .await
        .expect("postgres stops");
    accepted.extend(send_numbered(&system, conversation, 1..=3).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    if kill {
        system.kill_consumers().await;
    } else {
        system.stop_consumers().await;
    }

    // Ten newer messages of the same partition are waiting when the next worker starts.
    accepted.extend(send_numbered(&system, conversation, 4..=13).await);
    system
        .servers
        .postgres
        .restart()
        .await
        .expect("postgres restarts");
    system.start_consumers().await;

    wait_until_stored(&system.pool, &accepted, Duration::from_secs(30)).await;
    assert_stored_exactly(&system.pool, &accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_batch_held_by_a_killed_consumer_keeps_its_place_in_order() {
    a_partial_batch_in_hand_is_not_overtaken(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_batch_handed_back_on_shutdown_keeps_its_place_in_order() {
    a_partial_batch_in_hand_is_not_overtaken(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_started_while_nats_restarts_still_persist() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let mut system = system;
    system.stop_consumers().await;
    system.servers.nats.stop().await.expect("nats stops");
    let consumers_shutdown = CancellationToken::new();
    let config = system.config.clone();
    let starting = tokio::spawn({
        let shutdown = consumers_shutdown.clone();
        async move { hotpath::roles::spawn_consumers(config, shutdown).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    system.servers.nats.restart().await.expect("nats restarts");
    let consumers = starting
        .await
        .expect("join")
        .expect("consumers start once NATS is back");

    let deadline = Instant::now() + Duration::from_secs(20);
    let accepted = loop {
        let (status, ack) = system
            .send("alice", unique(conversation, "after-restart"))
            .await;
        if status == 202 {
            break HashSet::from([message_id_of(&ack)]);
        }
        assert!(
            Instant::now() < deadline,
            "sending never recovered: {status} {ack}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stored = wait_until_stored(&system.pool, &accepted, Duration::from_secs(20)).await;
    assert!(
        accepted.is_subset(&stored),
        "the message was accepted but never persisted"
    );
    consumers_shutdown.cancel();
    consumers
        .await
        .expect("join")
        .expect("consumers stop cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_taken_while_postgres_is_down_are_recorded_once_when_it_is_back() {
    let mut system = System::start().await;
    let js = system.jetstream().await;
    let partitions = system.config.partitions;
    let conversation = system
        .conversation("alice", "group", &["bob", "carol"])
        .await;
    let mut alice = connect(&system, &system.base, "alice").await;
    let mut bob = connect(&system, &system.base, "bob").await;
    let send = async |name: &str| {
        let (status, ack) = system.send("alice", unique(conversation, name)).await;
        assert_eq!(status, 202, "{ack}");
        message_id_of(&ack)
    };
    let first = send("first").await;
    let second = send("second").await;
    let mut heard = state_changes(&mut alice, 2, Duration::ZERO).await;
    heard.sort();
    let mut expected = vec![state_change(first, "sent"), state_change(second, "sent")];
    expected.sort();
    assert_eq!(heard, expected, "both messages persisted");
    // Bob's `delivered` for the first is recorded before the outage (and this gateway now
    // takes his acks for it without asking Postgres).
    acknowledge(&mut bob, first, "delivered").await;
    assert_eq!(
        state_changes(&mut alice, 1, Duration::ZERO).await,
        [state_change(first, "delivered")]
    );
    let (bob_delivered, _) = receipts::wait_for(
        &system.pool,
        first,
        "bob",
        ReceiptState::Delivered,
        PATIENCE,
    )
    .await;

    system
        .servers
        .postgres
        .stop()
        .await
        .expect("postgres stops");
    assert!(
        sqlx::query("SELECT 1").execute(&system.pool).await.is_err(),
        "Postgres still answers after stop()"
    );
    // Receipts arrive meanwhile: bob reads the first over his socket; the second is
    // delivered to both, and the first to carol, as the gateway publishes them.
    acknowledge(&mut bob, first, "read").await;
    let published = [
        receipts::receipt(second, conversation, "bob", ReceiptState::Delivered),
        receipts::receipt(second, conversation, "carol", ReceiptState::Delivered),
        receipts::receipt(first, conversation, "carol", ReceiptState::Delivered),
    ];
    for receipt in &published {
        receipts::publish(&js, partitions, receipt).await;
    }
    // Down for longer than the ack wait (3 s): the consumer must keep what it holds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    system
        .servers
        .postgres
        .restart()
        .await
        .expect("postgres restarts");

    // Every receipt is recorded, each with the time it was taken.
    let within = Duration::from_secs(30);
    for receipt in &published {
        let (delivered_at, read_at) = receipts::wait_for(
            &system.pool,
            receipt.message_id,
            &receipt.user_id,
            ReceiptState::Delivered,
            within,
        )
        .await;
        assert_eq!((delivered_at, read_at), (Some(receipt.at), None));
    }
    let (delivered_at, read_at) =
        receipts::wait_for(&system.pool, first, "bob", ReceiptState::Read, within).await;
    assert_eq!(
        delivered_at, bob_delivered,
        "bob's delivered_at was set again"
    );
    assert!(read_at >= delivered_at);
    for message in [first, second] {
        assert_eq!(receipts::row(&system.pool, message, "bob").await.2, 2);
    }
    // Alice is told once each: the first read of the first, the first delivery of the second.
    let mut heard = state_changes(&mut alice, 2, QUIET).await;
    heard.sort();
    let mut expected = vec![
        state_change(first, "read"),
        state_change(second, "delivered"),
    ];
    expected.sort();
    assert_eq!(heard, expected);
    // Nothing was given up on.
    receipts::wait_until_settled(&js).await;
    let letters: Vec<String> = receipts::dead_letters(&js, None)
        .await
        .iter()
        .map(|l| format!("{:?}: {:?}", l.dlq_subject, l.reason))
        .collect();
    assert!(letters.is_empty(), "dead-lettered: {letters:?}");
}
