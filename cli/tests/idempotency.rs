//! Idempotency against real NATS and Postgres: a `clientMessageId` names one message of one
//! sender in one conversation, and a 202 is never followed by silent loss.

use hotpath_testkit as support;

use std::time::{Duration, Instant};

use async_nats::jetstream::stream::DirectGetErrorKind;
use hotpath_core::names;
use serde_json::{Value, json};
use support::ws::{connect, next_of, send_frame};
use support::{System, text};
use uuid::Uuid;

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
    let mut socket = connect(&system, &system.base, "alice").await;
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
