//! Idempotency against real NATS and Postgres: a `clientMessageId` names one message of one
//! sender in one conversation, and a 202 is never followed by silent loss.

use hotpath_testkit as support;

use std::time::{Duration, Instant};

use async_nats::jetstream::stream::DirectGetErrorKind;
use hotpath_core::names;
use serde_json::{Value, json};
use support::ws::{QUIET, connect, next_of, send_frame, state_change, state_changes};
use support::{System, assert_gap_free_in_acceptance_order, text};
use uuid::Uuid;

/// The tests of one binary share the process's metrics: the ones that make the consumers meet
/// conflicts take turns, so each sees only its own in `delivery_persist_total`.
static CONFLICT_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A message body with a `clientMessageId`.
fn with_id(conversation: Uuid, client_message_id: &str, content: &str) -> Value {
    let mut body = text(conversation, content);
    body["clientMessageId"] = json!(client_message_id);
    body
}

fn message_id(ack: &Value) -> Uuid {
    ack["messageId"]
        .as_str()
        .and_then(|id| Uuid::parse_str(id).ok())
        .unwrap_or_else(|| panic!("an answer with a messageId: {ack}"))
}

/// Sends a raw JSON text (to control how it is written, e.g. the order of metadata keys).
async fn send_raw(system: &System, user: &str, body: &str) -> (u16, Value) {
    let response = system
        .http
        .post(system.url("/v1/messages"))
        .bearer_auth(system.token(user))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("request completes");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Asserts a 409 `IDEMPOTENCY_KEY_REUSED` that names `original`.
fn assert_reused(status: u16, answer: &Value, original: Uuid, what: &str) {
    assert_eq!(status, 409, "{what}: {answer}");
    assert_eq!(answer["error"]["code"], "IDEMPOTENCY_KEY_REUSED", "{what}");
    assert_eq!(
        answer["error"]["details"]["originalMessageId"],
        original.to_string(),
        "{what}: {answer}"
    );
}

/// Waits (bounded) until the delivery consumer of `conversation`'s partition has nothing
/// pending and nothing in hand: what it was given is persisted and acknowledged.
async fn wait_until_acknowledged(system: &System, conversation: Uuid) {
    let js = system.jetstream().await;
    let partition = names::partition_of(&conversation.to_string(), system.config.partitions);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = js
            .get_stream(names::MESSAGES_STREAM)
            .await
            .expect("MESSAGES stream")
            .consumer_info(names::delivery_consumer(partition))
            .await
            .expect("delivery consumer info");
        if (info.num_pending, info.num_ack_pending) == (0, 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "partition {partition} still has work: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The stored (conversation, content) of a message, if it is stored.
async fn stored(system: &System, message: Uuid) -> Option<(Uuid, String)> {
    sqlx::query_as("SELECT conversation_id, content FROM messages WHERE id = $1")
        .bind(message)
        .fetch_optional(&system.pool)
        .await
        .expect("messages readable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_message_id_in_two_conversations_is_two_messages() {
    let system = System::start().await;
    let a = system.conversation("alice", "group", &["bob"]).await;
    let b = system.conversation("alice", "group", &["carol"]).await;
    let mut carol = connect(&system, &system.base, "carol").await;

    let (status_a, ack_a) = system.send("alice", with_id(a, "m-1", "to A")).await;
    let (status_b, ack_b) = system.send("alice", with_id(b, "m-1", "to B")).await;

    assert_eq!((status_a, status_b), (202, 202), "{ack_a} {ack_b}");
    assert_eq!(ack_a["idempotentHit"], false);
    assert_eq!(ack_b["idempotentHit"], false, "{ack_b}");
    assert_ne!(message_id(&ack_a), message_id(&ack_b));
    assert_ne!(ack_a["idempotencyKey"], ack_b["idempotencyKey"]);

    let new = next_of(&mut carol, "message.new").await;
    assert_eq!(new["message"]["messageId"], ack_b["messageId"]);
    assert_eq!(new["message"]["content"], "to B");
    assert_eq!(
        system.wait_for_messages(2, Duration::from_secs(20)).await,
        2
    );
    assert_eq!(
        stored(&system, message_id(&ack_a)).await,
        Some((a, "to A".to_string()))
    );
    assert_eq!(
        stored(&system, message_id(&ack_b)).await,
        Some((b, "to B".to_string()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_key_for_another_request_is_409_and_a_true_retry_is_still_202() {
    let system = System::start().await;
    let conversation = system
        .conversation("alice", "group", &["bob", "carol"])
        .await;
    let original = r#"{"conversationId": "CONV", "clientMessageId": "m-1", "content": "first",
                       "contentType": "text", "metadata": {"a": 1, "b": {"c": 2, "d": 3}}}"#
        .replace("CONV", &conversation.to_string());
    // Alice's socket is open before she sends, so its ready-ping is answered before the
    // original's `sent` event can arrive.
    let mut socket = connect(&system, &system.base, "alice").await;
    let (status, first) = send_raw(&system, "alice", &original).await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(first["idempotentHit"], false);
    let original_id = message_id(&first);
    let original: Value = serde_json::from_str(&original).expect("the original is JSON");

    // Everything the message is made of counts: a change to any part is another message.
    let changes = [
        ("content", json!("second")),
        ("contentType", json!("image")),
        ("metadata", json!({"a": 2, "b": {"c": 2, "d": 3}})),
        ("recipientIds", json!(["bob"])),
        ("priority", json!("high")),
    ];
    let refuse_every_change = |when: &'static str| {
        let system = &system;
        let original = &original;
        let changes = &changes;
        async move {
            for (field, value) in changes {
                let mut reuse = original.clone();
                reuse[*field] = value.clone();
                let (status, answer) = system.send("alice", reuse).await;
                assert_reused(status, &answer, original_id, &format!("{field} {when}"));
            }
        }
    };
    refuse_every_change("in the stream").await;

    // A send frame on the WebSocket goes through the same check.
    let mut frame = original.clone();
    frame["type"] = json!("send");
    frame["reqId"] = json!("reuse");
    frame["content"] = json!("over the socket");
    send_frame(&mut socket, frame).await;
    let refused = next_of(&mut socket, "error").await;
    assert_eq!(refused["reqId"], "reuse");
    assert_reused(409, &refused, original_id, "a send frame");

    // The same request, its metadata written in another order, is a retry.
    let retry = r#"{"metadata": {"b": {"d": 3, "c": 2}, "a": 1}, "contentType": "text",
                    "content": "first", "clientMessageId": "m-1", "conversationId": "CONV",
                    "priority": "normal"}"#
        .replace("CONV", &conversation.to_string());
    let (status, again) = send_raw(&system, "alice", &retry).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["idempotentHit"], true);
    assert_eq!(message_id(&again), original_id);

    // Persisted and acknowledged, and gone from the stream (what a work-queue stream does with
    // an acknowledged message): the same answers, from what Postgres stored.
    assert_eq!(
        system.wait_for_messages(1, Duration::from_secs(20)).await,
        1
    );
    wait_until_acknowledged(&system, conversation).await;
    let (stream_seq,): (i64,) = sqlx::query_as("SELECT stream_seq FROM messages WHERE id = $1")
        .bind(original_id)
        .fetch_one(&system.pool)
        .await
        .expect("the original is stored");
    let stream = system
        .jetstream()
        .await
        .get_stream(names::MESSAGES_STREAM)
        .await
        .expect("MESSAGES stream");
    // It may be gone already, if the stream deletes acknowledged messages itself.
    let _ = stream.delete_message(stream_seq as u64).await;
    let gone = stream.direct_get(stream_seq as u64).await.map(|_| ());
    assert_eq!(
        gone.map_err(|e| e.kind()),
        Err(DirectGetErrorKind::NotFound)
    );
    refuse_every_change("in Postgres").await;
    let (status, again) = send_raw(&system, "alice", &retry).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["idempotentHit"], true);
    assert_eq!(message_id(&again), original_id);

    // The original is stored as it was sent, once.
    wait_until_acknowledged(&system, conversation).await;
    assert_eq!(system.message_count().await, 1);
    assert_eq!(
        stored(&system, original_id).await,
        Some((conversation, "first".to_string()))
    );
}

/// Shortens MESSAGES's duplicate window to a second, so a test can step past it the way a
/// client that reuses a key minutes later does. Before the first publish: nats-server arms its
/// timer for forgetting keys with the window in force when the first message is stored.
async fn shorten_duplicate_window(system: &System) {
    let js = system.jetstream().await;
    let mut stream = js
        .get_stream(names::MESSAGES_STREAM)
        .await
        .expect("MESSAGES stream");
    let mut config = stream.info().await.expect("stream info").config.clone();
    config.duplicate_window = Duration::from_secs(1);
    js.update_stream(config)
        .await
        .expect("duplicate window shortened");
}

/// Sends `body` as `user` until the stream has forgotten its key and takes it as a new message
/// (meanwhile it answers as a duplicate: 409 for a reuse, 202 `idempotentHit` for a retry), and
/// returns that 202.
async fn send_past_the_window(system: &System, user: &str, body: &Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, answer) = system.send(user, body.clone()).await;
        match status {
            202 if answer["idempotentHit"] == false => return answer,
            202 => {}
            409 => assert_eq!(
                answer["error"]["code"], "IDEMPOTENCY_KEY_REUSED",
                "{answer}"
            ),
            _ => panic!("unexpected answer {status}: {answer}"),
        }
        assert!(
            Instant::now() < deadline,
            "the stream still remembers the key after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `delivery_persist_total{status="conflict"}` as (rejections recorded, conflicts met again).
async fn conflict_counts(system: &System) -> (u64, u64) {
    let metrics = system.metrics().await;
    let count = |hit: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("delivery_persist_total{"))
            .filter(|l| l.contains(r#"status="conflict""#))
            .filter(|l| l.contains(&format!(r#"idempotent_hit="{hit}""#)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    (count("false"), count("true"))
}

/// Waits (bounded) until the conflict counts are `expected`.
async fn wait_for_conflict_counts(system: &System, expected: (u64, u64)) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let counts = conflict_counts(system).await;
        if counts == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "conflict counts {counts:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status_of(system: &System, user: &str, message: Uuid) -> (u16, Value) {
    let response = system
        .get(user, &format!("/v1/messages/{message}/status"))
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn rejection_rows(system: &System, message: Uuid) -> i64 {
    let (rows,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM message_rejections WHERE message_id = $1")
            .bind(message)
            .fetch_one(&system.pool)
            .await
            .expect("rejections readable");
    rows
}

/// Asserts that `answer` (a state change or a status) says `rejected` for a key reused from
/// `original`.
fn assert_rejected(answer: &Value, original: Uuid) {
    assert_eq!(answer["state"], "rejected", "{answer}");
    assert_eq!(
        answer["reason"]["code"], "IDEMPOTENCY_KEY_REUSED",
        "{answer}"
    );
    assert_eq!(
        answer["reason"]["details"]["originalMessageId"],
        original.to_string(),
        "{answer}"
    );
    assert!(
        answer.get("seq").is_none(),
        "a rejected message has no seq: {answer}"
    );
}

/// Sends alice's `m-1` ("first") to `conversation` and returns its id.
async fn send_first(system: &System, conversation: Uuid) -> Uuid {
    let (status, first) = system
        .send("alice", with_id(conversation, "m-1", "first"))
        .await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(first["idempotentHit"], false);
    message_id(&first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_window_a_reused_key_is_not_stored_and_its_sender_is_told_rejected() {
    let _turn = CONFLICT_TESTS.lock().await;
    let system = System::start().await;
    shorten_duplicate_window(&system).await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let mut alice = connect(&system, &system.base, "alice").await;
    let mut bob = connect(&system, &system.base, "bob").await;
    let (recorded, met_again) = conflict_counts(&system).await;

    let original = send_first(&system, conversation).await;
    let sent = next_of(&mut alice, "message.state.changed").await;
    assert_eq!(
        (sent["messageId"].as_str(), sent["state"].as_str()),
        (Some(original.to_string().as_str()), Some("sent"))
    );

    // Past the window the stream takes the reuse as a new message: 202, an id of its own.
    let reuse =
        send_past_the_window(&system, "alice", &with_id(conversation, "m-1", "second")).await;
    let refused = message_id(&reuse);
    assert_ne!(refused, original);

    // The consumers refuse it and tell the sender.
    let change = next_of(&mut alice, "message.state.changed").await;
    assert_eq!(change["messageId"], refused.to_string());
    assert_eq!(change["conversationId"], conversation.to_string());
    assert_rejected(&change, original);
    wait_for_conflict_counts(&system, (recorded + 1, met_again)).await;

    // The status route says so to the sender, and to nobody else.
    let (status, answer) = status_of(&system, "alice", refused).await;
    assert_eq!(status, 200, "{answer}");
    assert_rejected(&answer, original);
    assert_eq!(status_of(&system, "bob", refused).await.0, 404);
    let (_, answer) = status_of(&system, "alice", original).await;
    assert_eq!(
        (answer["state"].as_str(), answer["seq"].as_i64()),
        (Some("sent"), Some(1))
    );

    // Not stored, and it took no seq: the next message is seq 2, and bob never saw the reuse.
    assert_eq!(rejection_rows(&system, refused).await, 1);
    let (status, next) = system.send("alice", text(conversation, "next")).await;
    assert_eq!(status, 202, "{next}");
    let seen: Vec<(Value, Value)> = [
        next_of(&mut bob, "message.new").await,
        next_of(&mut bob, "message.new").await,
    ]
    .iter()
    .map(|frame| {
        (
            frame["message"]["content"].clone(),
            frame["message"]["seq"].clone(),
        )
    })
    .collect();
    assert_eq!(
        seen,
        vec![(json!("first"), json!(1)), (json!("next"), json!(2))]
    );
    assert_eq!(system.message_count().await, 2);
    assert_eq!(assert_gap_free_in_acceptance_order(&system.pool).await, 2);
    assert_eq!(
        stored(&system, original).await,
        Some((conversation, "first".to_string()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_that_waits_out_a_consumer_restart_is_rejected_exactly_once() {
    let _turn = CONFLICT_TESTS.lock().await;
    let mut system = System::start().await;
    shorten_duplicate_window(&system).await;
    let conversation = system.conversation("alice", "direct", &["bob"]).await;
    let mut alice = connect(&system, &system.base, "alice").await;
    let (recorded, met_again) = conflict_counts(&system).await;

    let original = send_first(&system, conversation).await;
    assert_eq!(
        state_changes(&mut alice, 1, Duration::ZERO).await,
        vec![state_change(original, "sent")]
    );

    // The reuse arrives while the consumers are stopped: accepted, pending in the stream.
    system.stop_consumers().await;
    let reuse_body = with_id(conversation, "m-1", "second");
    let reuse = send_past_the_window(&system, "alice", &reuse_body).await;
    let refused = message_id(&reuse);
    let (_, pending) = status_of(&system, "alice", refused).await;
    assert_eq!(pending["state"], "pending", "{pending}");

    // Back, the consumers refuse it and the sender hears it once.
    system.start_consumers().await;
    assert_eq!(
        state_changes(&mut alice, 1, QUIET).await,
        vec![state_change(refused, "rejected")]
    );
    wait_for_conflict_counts(&system, (recorded + 1, met_again)).await;
    assert_rejected(&status_of(&system, "alice", refused).await.1, original);

    // The same request once more past its own window reaches the consumers again: known as
    // rejected already, so nothing is recorded or told twice.
    let again = send_past_the_window(&system, "alice", &reuse_body).await;
    assert_eq!(message_id(&again), refused);
    wait_for_conflict_counts(&system, (recorded + 1, met_again + 1)).await;
    assert_eq!(state_changes(&mut alice, 0, QUIET).await, vec![]);
    assert_eq!(rejection_rows(&system, refused).await, 1);
    assert_eq!(system.message_count().await, 1);
    assert_eq!(assert_gap_free_in_acceptance_order(&system.pool).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_original_and_its_reuse_met_in_one_batch_store_the_first_and_reject_the_second() {
    let _turn = CONFLICT_TESTS.lock().await;
    let mut system = System::start().await;
    shorten_duplicate_window(&system).await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let mut alice = connect(&system, &system.base, "alice").await;
    let (recorded, met_again) = conflict_counts(&system).await;

    // Both wait in the stream, so one batch holds the key's first message and its reuse.
    system.stop_consumers().await;
    let original = send_first(&system, conversation).await;
    let reuse =
        send_past_the_window(&system, "alice", &with_id(conversation, "m-1", "second")).await;
    let refused = message_id(&reuse);
    system.start_consumers().await;

    let changes = state_changes(&mut alice, 2, QUIET).await;
    assert_eq!(
        changes,
        vec![
            state_change(original, "sent"),
            state_change(refused, "rejected")
        ]
    );
    wait_for_conflict_counts(&system, (recorded + 1, met_again)).await;
    assert_rejected(&status_of(&system, "alice", refused).await.1, original);
    assert_eq!(rejection_rows(&system, refused).await, 1);
    assert_eq!(assert_gap_free_in_acceptance_order(&system.pool).await, 1);
    assert_eq!(
        stored(&system, original).await,
        Some((conversation, "first".to_string()))
    );
}
