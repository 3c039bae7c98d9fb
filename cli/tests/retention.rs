//! Retention (ADR 0004): the backlog (`MESSAGES`, a work queue) and the replay window
//! (`REPLAY`) are two streams with their own limits. A caught-up system never refuses a send
//! however much it has carried; with the consumers stopped the gateway sheds load at the
//! backlog bound, not before, and loses nothing; a replay stores nothing twice.

use hotpath_testkit as support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use hotpath_core::envelope::Envelope;
use hotpath_core::names;
use serde_json::{Value, json};
use support::ws::{connect, next_of, send_frame};
use support::{System, text};
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(60);

/// A message of `chars` characters with its own `clientMessageId`.
fn message(conversation: Uuid, client_id: &str, chars: usize) -> Value {
    let mut body = text(conversation, &format!("{client_id} {}", "x".repeat(chars)));
    body["clientMessageId"] = json!(client_id);
    body
}

fn message_id_of(ack: &Value) -> Uuid {
    ack["messageId"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .unwrap_or_else(|| panic!("no messageId in {ack}"))
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
    const SENDS: usize = 1000;
    const CHARS: usize = 9000;
    let system = System::start_with(|config| {
        // A backlog of ~220 of these messages; the stream's ceiling twice that, 4 MiB. What is
        // sent in all is more than twice the ceiling.
        config.backlog_max_bytes = 2 << 20;
        config.replay_max_bytes = 2 << 20;
    })
    .await;
    let js = system.jetstream().await;
    let ceiling = js
        .get_stream(names::MESSAGES_STREAM)
        .await
        .expect("MESSAGES")
        .cached_info()
        .config
        .max_bytes;
    assert_eq!(ceiling, 4 << 20);

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
    let by_seq: Vec<(Uuid,)> =
        sqlx::query_as("SELECT id FROM messages WHERE conversation_id = $1 ORDER BY seq")
            .bind(conversation)
            .fetch_all(&system.pool)
            .await
            .expect("rows");
    let by_seq: Vec<Uuid> = by_seq.into_iter().map(|(id,)| id).collect();
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

/// Runs the real `hotpath replay …` command against the test's NATS.
async fn hotpath_replay(system: &System, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_hotpath"))
        .arg("replay")
        .args(args)
        .arg("--nats-url")
        .arg(system.servers.nats.url())
        .output()
        .await
        .expect("hotpath replay runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_range_of_the_window_stores_nothing_twice() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let mut accepted = HashSet::new();
    for n in 0..10 {
        let (status, ack) = system
            .send("alice", message(conversation, &format!("m-{n}"), 10))
            .await;
        assert_eq!(status, 202, "{ack}");
        accepted.insert(message_id_of(&ack));
    }
    assert_each_stored_once(&system, &accepted).await;
    let js = system.jetstream().await;
    let deadline = Instant::now() + PATIENCE;
    while stream_state(&js, names::REPLAY_STREAM).await.messages < 10 {
        assert!(
            Instant::now() < deadline,
            "the window holds the ten messages"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metric = "delivery_persist_total";
    let found_stored = |metrics: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(metric) && l.contains("idempotent_hit=\"true\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = found_stored(&system.metrics().await);

    let output = hotpath_replay(&system, &["--from-seq", "3", "--limit", "5"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("replayed 5 messages of REPLAY (sequences 3 to 7)"),
        "{stdout}"
    );

    // The five went through the consumers again and were found already stored.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = found_stored(&system.metrics().await) - before;
        if found >= 5.0 {
            assert_eq!(found, 5.0, "each replayed message is found stored once");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replayed messages reach the consumers ({found} so far)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until_backlog_empty(&js).await;
    assert_each_stored_once(&system, &accepted).await;

    // Repeating the replay within the duplicate window stores nothing in MESSAGES at all.
    let output = hotpath_replay(&system, &["--from-seq", "3", "--limit", "5"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("5 of them were repeats"), "{stdout}");
}
