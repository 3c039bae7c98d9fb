//! Idempotency against real NATS and Postgres: a `clientMessageId` names one message of one
//! sender in one conversation, and a 202 is never followed by silent loss.

use hotpath_testkit as support;

use std::time::Duration;

use serde_json::{Value, json};
use support::ws::{connect, next_of};
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
