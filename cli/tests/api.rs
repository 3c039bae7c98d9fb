//! The HTTP API against real NATS and Postgres: the happy path, idempotency, every error class.

use hotpath_testkit as support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::ws::{connect, next_of};
use support::{System, text};
use uuid::Uuid;

#[derive(sqlx::FromRow)]
struct StoredRow {
    id: Uuid,
    conversation_id: Uuid,
    seq: i64,
    sender_id: String,
    content: String,
    content_type: String,
    recipient_ids: Vec<String>,
    metadata: Value,
    priority: String,
    idempotency_key: String,
    correlation_id: Uuid,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_message_is_persisted_with_every_field_right() {
    let system = System::start().await;
    let conversation = system
        .conversation("alice", "group", &["bob", "carol"])
        .await;

    let mut body = text(conversation, "hello, hot path");
    body["clientMessageId"] = json!("m-1");
    body["metadata"] = json!({"replyTo": "x", "n": 1});
    body["priority"] = json!("high");
    body["recipientIds"] = json!(["bob"]);
    let (status, ack) = system.send("alice", body).await;

    assert_eq!(status, 202, "{ack}");
    assert_eq!(ack["state"], "pending");
    assert_eq!(ack["idempotentHit"], false);
    let message_id = ack["messageId"].as_str().unwrap().to_string();
    assert_eq!(
        ack["guidance"]["pollingEndpoint"],
        format!("/v1/messages/{message_id}/status")
    );
    assert_eq!(ack["guidance"]["websocketEvent"], "message.state.changed");
    assert!(
        ack["idempotencyKey"]
            .as_str()
            .unwrap()
            .starts_with("client_")
    );

    assert_eq!(
        system.wait_for_messages(1, Duration::from_secs(10)).await,
        1
    );
    let row: StoredRow = sqlx::query_as(
        "SELECT id, conversation_id, seq, sender_id, content, content_type, recipient_ids, metadata, priority,
                idempotency_key, correlation_id FROM messages",
    )
    .fetch_one(&system.pool)
    .await
    .unwrap();
    assert_eq!(row.id.to_string(), message_id);
    assert_eq!(row.conversation_id, conversation);
    assert_eq!(row.seq, 1);
    assert_eq!(row.sender_id, "alice");
    assert_eq!(row.content, "hello, hot path");
    assert_eq!(row.content_type, "text");
    assert_eq!(row.recipient_ids, vec!["bob".to_string()]);
    assert_eq!(row.metadata, json!({"replyTo": "x", "n": 1}));
    assert_eq!(row.priority, "high");
    assert_eq!(row.idempotency_key, ack["idempotencyKey"].as_str().unwrap());
    assert_eq!(
        row.correlation_id.to_string(),
        ack["correlationId"].as_str().unwrap()
    );

    let status: Value = system
        .get("alice", &format!("/v1/messages/{message_id}/status"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(status["state"], "sent");
    assert_eq!(status["seq"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_recipients_every_other_active_member_is_a_recipient() {
    let system = System::start().await;
    let conversation = system
        .conversation("alice", "group", &["bob", "carol"])
        .await;
    let (status, _) = system.send("alice", text(conversation, "to all")).await;
    assert_eq!(status, 202);
    system.wait_for_messages(1, Duration::from_secs(10)).await;
    let (recipients,): (Vec<String>,) = sqlx::query_as("SELECT recipient_ids FROM messages")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(recipients, vec!["bob".to_string(), "carol".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_client_message_id_answers_the_same_message_and_stores_one_row() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "direct", &["bob"]).await;
    let mut body = text(conversation, "once");
    body["clientMessageId"] = json!("retry-me");

    let (first_status, first) = system.send("alice", body.clone()).await;
    let (second_status, second) = system.send("alice", body).await;

    assert_eq!((first_status, second_status), (202, 202));
    assert_eq!(first["messageId"], second["messageId"]);
    assert_eq!(first["idempotentHit"], false);
    assert_eq!(second["idempotentHit"], true);
    system.wait_for_messages(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(system.message_count().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_client_message_id_from_two_senders_is_two_messages() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let mut body = text(conversation, "same id");
    body["clientMessageId"] = json!("shared-id");
    let (_, from_alice) = system.send("alice", body.clone()).await;
    let (_, from_bob) = system.send("bob", body).await;
    assert_ne!(from_alice["messageId"], from_bob["messageId"]);
    assert_eq!(
        system.wait_for_messages(2, Duration::from_secs(10)).await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_identical_sends_store_one_row() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let mut body = text(conversation, "thundering herd");
    body["clientMessageId"] = json!("herd-1");

    let sends = (0..100).map(|_| system.send("alice", body.clone()));
    let answers = futures::future::join_all(sends).await;

    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(status, ack)| {
            assert_eq!(*status, 202, "{ack}");
            ack["messageId"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    let first_sends = answers
        .iter()
        .filter(|(_, ack)| ack["idempotentHit"] == false)
        .count();
    assert_eq!(first_sends, 1, "exactly one send is the original");
    system.wait_for_messages(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(system.message_count().await, 1);
}

/// Sends `body` as `user` and returns (status, code).
async fn code_of(system: &System, user: &str, body: Value) -> (u16, String) {
    let (status, answer) = system.send(user, body).await;
    (
        status,
        answer["error"]["code"]
            .as_str()
            .unwrap_or("<none>")
            .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_has_its_status_and_code() {
    let system = System::start().await;
    let conversation = system
        .conversation("alice", "group", &["bob", "mallory"])
        .await;
    let closed = system.conversation("alice", "group", &["bob"]).await;
    let response = system
        .post(
            "alice",
            &format!("/v1/conversations/{closed}/deactivate"),
            json!({}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let response = system
        .post("bob", "/v1/blocks", json!({"userId": "mallory"}))
        .await;
    assert_eq!(response.status(), 201);

    let with = |field: &str, value: Value| {
        let mut body = text(conversation, "hi");
        body[field] = value;
        body
    };
    let cases: Vec<(&str, &str, Value, u16, &str)> = vec![
        (
            "not an object",
            "alice",
            json!(["x"]),
            400,
            "INVALID_SCHEMA",
        ),
        (
            "missing content",
            "alice",
            json!({"conversationId": conversation.to_string(), "contentType": "text"}),
            400,
            "MISSING_REQUIRED_FIELD",
        ),
        (
            "content not a string",
            "alice",
            with("content", json!(42)),
            400,
            "INVALID_FIELD_TYPE",
        ),
        (
            "content too long",
            "alice",
            with("content", json!("x".repeat(10_001))),
            400,
            "FIELD_TOO_LONG",
        ),
        (
            "client id too long",
            "alice",
            with("clientMessageId", json!("x".repeat(256))),
            400,
            "FIELD_TOO_LONG",
        ),
        (
            "unknown content type",
            "alice",
            with("contentType", json!("binary")),
            400,
            "INVALID_SCHEMA",
        ),
        (
            "too many recipients",
            "alice",
            with(
                "recipientIds",
                json!((0..1001).map(|i| format!("u{i}")).collect::<Vec<_>>()),
            ),
            400,
            "INVALID_SCHEMA",
        ),
        (
            "metadata not an object",
            "alice",
            with("metadata", json!([1])),
            400,
            "INVALID_FIELD_TYPE",
        ),
        (
            "recipient not a member",
            "alice",
            with("recipientIds", json!(["zed"])),
            400,
            "INVALID_RECIPIENT",
        ),
        (
            "forged sender",
            "alice",
            with("senderId", json!("bob")),
            403,
            "FORBIDDEN",
        ),
        (
            "not a member",
            "zed",
            text(conversation, "hi"),
            403,
            "NOT_CONVERSATION_MEMBER",
        ),
        (
            "unknown conversation",
            "alice",
            text(Uuid::new_v4(), "hi"),
            404,
            "CONVERSATION_NOT_FOUND",
        ),
        (
            "inactive conversation",
            "alice",
            text(closed, "hi"),
            409,
            "CONVERSATION_INACTIVE",
        ),
        (
            "blocked recipient",
            "mallory",
            with("recipientIds", json!(["bob"])),
            409,
            "USER_BLOCKED",
        ),
    ];
    for (name, user, body, status, code) in cases {
        assert_eq!(
            code_of(&system, user, body).await,
            (status, code.to_string()),
            "case: {name}"
        );
    }

    // A message only to the one blocked is refused to the blocker too (a block keeps the pair
    // apart either way; what it does to group messages: see the blocks tests below).
    assert_eq!(
        code_of(&system, "bob", with("recipientIds", json!(["mallory"])))
            .await
            .1,
        "USER_BLOCKED"
    );

    // A well-formed send still works, and nothing rejected was stored.
    assert_eq!(
        code_of(&system, "alice", with("recipientIds", json!(["bob"])))
            .await
            .0,
        202
    );
    assert_eq!(
        system.wait_for_messages(1, Duration::from_secs(10)).await,
        1
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(system.message_count().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_failures_are_401_in_the_error_shape() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let url = system.url("/v1/messages");
    let missing = system
        .http
        .post(&url)
        .json(&text(conversation, "hi"))
        .send()
        .await
        .unwrap();
    let forged = system
        .http
        .post(&url)
        .bearer_auth(hotpath_core::auth::mint_hs256_token(b"wrong secret", "alice", 60).unwrap())
        .json(&text(conversation, "hi"))
        .send()
        .await
        .unwrap();
    for response in [missing, forged] {
        assert_eq!(response.status(), 401);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "UNAUTHORIZED");
        assert!(body["error"]["message"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_paths_queries_and_plain_websocket_gets_are_400_in_the_error_shape() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let history = format!("/v1/conversations/{conversation}/messages");
    for path in [
        format!("{history}?limit=ten"),
        format!("{history}?after_seq=9223372036854775808"),
        // Not UTF-8 once percent-decoded.
        "/v1/messages/%FF/status".to_string(),
        // A GET without the WebSocket handshake.
        "/v1/ws".to_string(),
    ] {
        let response = system
            .http
            .get(system.url(&path))
            .bearer_auth(system.token("alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{path}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "INVALID_SCHEMA", "{path}: {body}");
    }
    let response = system
        .http
        .delete(system.url("/v1/blocks/%C3%28"))
        .bearer_auth(system.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "INVALID_SCHEMA", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_413_without_being_buffered() {
    let system = System::start().await;
    let limit = system.config.max_body_bytes;

    // Declared too large: refused before the body is read.
    let declared = system
        .http
        .post(system.url("/v1/messages"))
        .bearer_auth(system.token("alice"))
        .header("content-type", "application/json")
        .body(vec![b' '; limit + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(declared.status(), 413);
    let body: Value = declared.json().await.unwrap();
    assert_eq!(body["error"]["code"], "PAYLOAD_TOO_LARGE");

    // Streamed with no length: cut off once it passes the limit, long before it ends.
    let produced = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = produced.clone();
    let chunks = futures::stream::iter(0..1024).map(move |_| {
        counter.fetch_add(64 * 1024, std::sync::atomic::Ordering::SeqCst);
        Ok::<_, std::io::Error>(bytes_of(64 * 1024))
    });
    let streamed = system
        .http
        .post(system.url("/v1/messages"))
        .bearer_auth(system.token("alice"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    match streamed {
        Ok(response) => assert_eq!(response.status(), 413),
        // The server may close the connection while the client is still writing: also a refusal.
        Err(error) => assert!(error.is_request() || error.is_body(), "{error}"),
    }
    let sent = produced.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        sent < 1024 * 64 * 1024,
        "the whole 64 MiB body was consumed ({sent} bytes)"
    );
}

fn bytes_of(n: usize) -> Vec<u8> {
    vec![b' '; n]
}

use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_the_rate_limit_gets_429_with_retry_after() {
    let system = System::start_with(|config| {
        config.rate_per_user = 1;
        config.rate_burst = 3;
    })
    .await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..5 {
        let response = system
            .post(
                "alice",
                "/v1/messages",
                text(conversation, &format!("m{i}")),
            )
            .await;
        statuses.push(response.status().as_u16());
        if response.status() == 429 {
            retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "RATE_LIMIT_EXCEEDED");
        }
    }
    assert_eq!(statuses, vec![202, 202, 202, 429, 429]);
    assert!(retry_after.unwrap().parse::<u64>().unwrap() >= 1);
    // Another user is not affected.
    assert_eq!(
        system.send("bob", text(conversation, "me too")).await.0,
        202
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_nats_cannot_carry_is_500_enqueue_failed() {
    // A body limit above NATS's 1 MiB max_payload lets a huge metadata object through the
    // gateway's own checks; the publish then fails for good, which is the one 500. The blob
    // is only just over the payload limit: the schema policy reads the whole body within its
    // 10 ms of CPU, and a slow machine must not turn this into that policy's failure.
    let system = System::start_with(|config| config.max_body_bytes = 4 * 1024 * 1024).await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let mut body = text(conversation, "big");
    body["metadata"] = json!({"blob": "x".repeat(1024 * 1024 + 1024)});
    let (status, answer) = system.send("alice", body).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (500, Some("ENQUEUE_FAILED"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_pending_then_sent_and_hidden_from_outsiders() {
    let mut system = System::start().await;
    system.stop_consumers().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let (_, ack) = system
        .send("alice", text(conversation, "wait for it"))
        .await;
    let path = format!("/v1/messages/{}/status", ack["messageId"].as_str().unwrap());

    let pending: Value = system.get("alice", &path).await.json().await.unwrap();
    assert_eq!(pending["state"], "pending");
    assert_eq!(
        system.get("bob", &path).await.status(),
        200,
        "members may read it"
    );
    let outsider = system.get("eve", &path).await;
    assert_eq!(outsider.status(), 404);
    assert_eq!(
        system
            .get("alice", "/v1/messages/not-a-uuid/status")
            .await
            .status(),
        404
    );
    assert_eq!(
        system
            .get("alice", &format!("/v1/messages/{}/status", Uuid::new_v4()))
            .await
            .status(),
        404
    );

    system.start_consumers().await;
    system.wait_for_messages(1, Duration::from_secs(10)).await;
    let sent: Value = system.get("bob", &path).await.json().await.unwrap();
    assert_eq!(sent["state"], "sent");
    assert_eq!(sent["seq"], 1);
    assert!(sent["persistedAt"].is_string());
    assert_eq!(system.get("eve", &path).await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_by_seq_for_members_only() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    for i in 1..=5 {
        let mut body = text(conversation, &format!("message {i}"));
        body["clientMessageId"] = json!(format!("h-{i}"));
        assert_eq!(system.send("alice", body).await.0, 202);
    }
    system.wait_for_messages(5, Duration::from_secs(10)).await;

    let page: Value = system
        .get(
            "bob",
            &format!("/v1/conversations/{conversation}/messages?after_seq=2&limit=2"),
        )
        .await
        .json()
        .await
        .unwrap();
    let seqs: Vec<i64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 4]);
    assert_eq!(page["messages"][0]["content"], "message 3");
    assert_eq!(page["nextAfterSeq"], 4);

    let outsider = system
        .get("eve", &format!("/v1/conversations/{conversation}/messages"))
        .await;
    assert_eq!(outsider.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_take_effect_on_the_next_send() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    assert_eq!(
        system
            .send("bob", text(conversation, "warm the cache"))
            .await
            .0,
        202
    );

    let response = system
        .delete(
            "alice",
            &format!("/v1/conversations/{conversation}/members/bob"),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        code_of(&system, "bob", text(conversation, "still here?"))
            .await
            .1,
        "NOT_CONVERSATION_MEMBER"
    );

    let response = system
        .post(
            "alice",
            &format!("/v1/conversations/{conversation}/members"),
            json!({"userId": "carol"}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        system.send("carol", text(conversation, "hi all")).await.0,
        202
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_are_served() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    assert_eq!(
        system.send("alice", text(conversation, "count me")).await.0,
        202
    );
    assert_eq!(
        code_of(&system, "alice", text(Uuid::new_v4(), "nope"))
            .await
            .0,
        404
    );
    system.wait_for_messages(1, Duration::from_secs(10)).await;

    assert_eq!(
        system
            .http
            .get(system.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let ready: Value = system
        .http
        .get(system.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        ready,
        json!({"nats": "ok", "postgres": "ok", "policies": "ok"})
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = system.metrics().await;
    for name in [
        "producer_enqueued_total{",
        "producer_reject_total{reason=\"conversation_not_found\",status_code=\"404\"}",
        "producer_enqueue_duration_ms_bucket",
        "delivery_persist_total{",
        "delivery_persist_duration_ms_bucket",
        "delivery_pipeline_processed_total{",
        "delivery_pipeline_duration_ms_bucket",
        "delivery_pipeline_step_duration_ms_bucket",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}:\n{metrics}");
    }
    let openapi: Value = system
        .http
        .get(system.url("/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(openapi["openapi"], "3.0.3");
    let live = system.http.get(system.url("/live")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    assert!(live.text().await.unwrap().contains("new WebSocket("));
    assert!(openapi["paths"]["/v1/messages"]["post"].is_object());
    let unknown = system
        .http
        .get(system.url("/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_a_route_does_not_take_is_405_in_the_error_shape_with_allow() {
    let system = System::start().await;
    for (method, path, allowed) in [
        ("DELETE", "/healthz", "GET,HEAD"),
        ("PUT", "/v1/messages", "POST"),
        ("PATCH", "/v1/conversations", "GET,HEAD,POST"),
    ] {
        let response = system
            .http
            .request(method.parse().unwrap(), system.url(path))
            .bearer_auth(system.token("alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{method} {path}");
        let allow = response
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .replace(' ', "");
        let mut allow: Vec<&str> = allow.split(',').collect();
        allow.sort_unstable();
        assert_eq!(allow.join(","), allowed, "{method} {path}");
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        let body: Value = response.json().await.expect("a JSON body");
        assert_eq!(body["error"]["code"], "METHOD_NOT_ALLOWED", "{body}");
        assert_eq!(body["error"]["details"]["method"], method, "{body}");
    }
}

/// The gateway's route table, where every route is declared (`.route("/path", …)`).
const ROUTE_TABLE: &str = include_str!("../../gateway/src/lib.rs");

/// The paths the route table declares.
fn routed_paths() -> BTreeSet<String> {
    ROUTE_TABLE
        .split(".route(")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start().strip_prefix('"')?;
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

/// A path with each parameter written `{}`: the router says `{user_id}` where the document
/// says `{userId}`, and that is the same route.
fn shape(path: &str) -> String {
    let mut shaped = String::new();
    let mut in_parameter = false;
    for c in path.chars() {
        match c {
            '{' => {
                in_parameter = true;
                shaped.push_str("{}");
            }
            '}' => in_parameter = false,
            _ if !in_parameter => shaped.push(c),
            _ => {}
        }
    }
    shaped
}

/// The methods the running gateway routes at `path`: every one it does not answer with 405.
/// Asked without a token, so nothing is changed.
async fn routed_methods(system: &System, path: &str) -> BTreeSet<String> {
    let mut methods = BTreeSet::new();
    for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
        let url = system.url(&path.replace("{}", "x"));
        let response = system
            .http
            .request(method.parse().unwrap(), url)
            .send()
            .await
            .unwrap();
        if response.status() != 405 {
            methods.insert(method.to_string());
        }
    }
    methods
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_has_every_route_of_the_router_with_its_methods_and_no_other() {
    let system = System::start().await;
    let document: Value = system
        .http
        .get(system.url("/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let documented: BTreeSet<(String, String)> = document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            let methods = item.as_object().expect("path item").keys();
            methods
                .filter(|key| *key != "parameters")
                .map(|method| (shape(path), method.to_uppercase()))
        })
        .collect();

    let paths = routed_paths();
    assert!(
        paths.len() > 10,
        "the route table was not found in gateway/src/lib.rs: {paths:?}"
    );
    let mut routed = BTreeSet::new();
    for path in paths.iter().map(|path| shape(path)) {
        for method in routed_methods(&system, &path).await {
            routed.insert((path.clone(), method));
        }
    }

    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routed but not in gateway/openapi.json: {undocumented:?}; \
         in gateway/openapi.json but not routed: {unrouted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_through_one_gateway_reaches_another_gateways_cache() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (other_addr, _other) =
        hotpath::roles::spawn_gateway(system.config.clone(), shutdown.clone())
            .await
            .unwrap();
    let send_via_other = |user: &str, body: Value| {
        system
            .http
            .post(format!("http://{other_addr}/v1/messages"))
            .bearer_auth(system.token(user))
            .json(&body)
            .send()
    };
    // The other gateway caches the conversation with bob as a member.
    assert_eq!(
        send_via_other("bob", text(conversation, "hi"))
            .await
            .unwrap()
            .status(),
        202
    );

    // Bob is removed through the first gateway; the second hears of it over NATS.
    let removed = system
        .delete(
            "alice",
            &format!("/v1/conversations/{conversation}/members/bob"),
        )
        .await;
    assert_eq!(removed.status(), 200);
    let refused = until_status(
        || send_via_other("bob", text(conversation, "still here?")),
        403,
        "the other gateway kept its stale membership",
    )
    .await;
    assert_eq!(refused["error"]["code"], "NOT_CONVERSATION_MEMBER");

    // The same for blocks, both ways: the other gateway caches dave's blocks (none)...
    let direct = system.conversation("alice", "direct", &["dave"]).await;
    let to_alice = || send_via_other("dave", text(direct, "hi alice"));
    assert_eq!(to_alice().await.unwrap().status(), 202);
    // ...alice blocks him through the first gateway, and the other refuses his message...
    let blocked = system
        .post("alice", "/v1/blocks", json!({"userId": "dave"}))
        .await;
    assert_eq!(blocked.status(), 201);
    let refused = until_status(to_alice, 409, "the other gateway missed the block").await;
    assert_eq!(refused["error"]["code"], "USER_BLOCKED");
    // ...and takes it again once she lifts the block there.
    assert_eq!(
        system.delete("alice", "/v1/blocks/dave").await.status(),
        204
    );
    until_status(to_alice, 202, "the other gateway missed the unblock").await;
    shutdown.cancel();
}

/// Repeats `attempt` until it answers `status` (within 5 s, else fails saying `stale`) and
/// returns that answer's body.
async fn until_status<F, R>(attempt: F, status: u16, stale: &str) -> Value
where
    F: Fn() -> R,
    R: std::future::Future<Output = reqwest::Result<reqwest::Response>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let response = attempt().await.expect("request completes");
        if response.status() == status {
            return response.json().await.unwrap_or(Value::Null);
        }
        assert!(std::time::Instant::now() < deadline, "{stale}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_at_capacity_sheds_sends_with_503_and_retry_after() {
    let system = System::start_with(|config| {
        config.max_in_flight_sends = 1;
        // The held send waits for a lock; let it wait rather than time out.
        config.db_statement_timeout_ms = 60_000;
    })
    .await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;

    // The one slot is held by a send whose conversation facts are still loading: the
    // conversations table is locked, so the facts query waits.
    let mut locker = system.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let held = {
        let request = system
            .http
            .post(system.url("/v1/messages"))
            .bearer_auth(system.token("alice"))
            .json(&text(conversation, "slow"));
        tokio::spawn(request.send())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (waiting,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
                .fetch_one(&system.pool)
                .await
                .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the held send never reached Postgres"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let shed = system
        .post("bob", "/v1/messages", text(conversation, "fast"))
        .await;
    assert_eq!(shed.status(), 503);
    assert_eq!(shed.headers()["retry-after"], "1");
    let error: Value = shed.json().await.unwrap();
    assert_eq!(error["error"]["code"], "SERVICE_UNAVAILABLE");

    // Once the held send completes, it is accepted and the slot is free again.
    locker.rollback().await.unwrap();
    let held = held.await.unwrap().unwrap();
    assert_eq!(held.status(), 202);
    assert_eq!(
        system.send("bob", text(conversation, "fast again")).await.0,
        202
    );
}

/// A message persisted without its announcement reaching the gateway (lost, or still on its
/// way): once the status route has said `sent`, the history the same gateway serves has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_status_calls_sent_is_in_the_history_even_before_the_announcement() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let (status, accepted) = system.send("alice", text(conversation, "first")).await;
    assert_eq!(status, 202, "{accepted}");
    system.wait_for_messages(1, Duration::from_secs(10)).await;
    let page_path = format!("/v1/conversations/{conversation}/messages?after_seq=0");
    let page: Value = system.get("alice", &page_path).await.json().await.unwrap();
    assert_eq!(page["messages"].as_array().unwrap().len(), 1, "{page}");

    // A second message stored as the consumers store one, but with no announcement.
    let (second,): (Uuid,) = sqlx::query_as(
        "INSERT INTO messages (id, conversation_id, seq, sender_id, content, content_type,
                               recipient_ids, metadata, priority, idempotency_key,
                               correlation_id, stream_partition, stream_seq, accepted_at,
                               request_digest)
         SELECT gen_random_uuid(), conversation_id, 2, sender_id, 'second', content_type,
                recipient_ids, metadata, priority, idempotency_key || '-2', gen_random_uuid(),
                stream_partition, stream_seq + 1000, accepted_at, request_digest
           FROM messages WHERE conversation_id = $1 AND seq = 1
         RETURNING id",
    )
    .bind(conversation)
    .fetch_one(&system.pool)
    .await
    .expect("insert");
    sqlx::query("UPDATE conversations SET last_seq = 2 WHERE id = $1")
        .bind(conversation)
        .execute(&system.pool)
        .await
        .expect("bump");

    let status: Value = system
        .get("alice", &format!("/v1/messages/{second}/status"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&status["state"], &status["seq"]),
        (&json!("sent"), &json!(2))
    );
    let page: Value = system.get("alice", &page_path).await.json().await.unwrap();
    let seqs: Vec<i64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2], "the history lags the status: {page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_history_page_is_dropped_when_new_messages_are_persisted() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let page_path = format!("/v1/conversations/{conversation}/messages?after_seq=0");
    let contents = |page: &Value| -> Vec<String> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        system.send("alice", text(conversation, "first")).await.0,
        202
    );
    system.wait_for_messages(1, Duration::from_secs(10)).await;
    // Served twice: the second answer comes from the gateway's cache.
    let first: Value = system.get("bob", &page_path).await.json().await.unwrap();
    let again: Value = system.get("bob", &page_path).await.json().await.unwrap();
    assert_eq!(
        (contents(&first), contents(&again)),
        (vec!["first".to_string()], vec!["first".to_string()])
    );

    assert_eq!(
        system.send("alice", text(conversation, "second")).await.0,
        202
    );
    system.wait_for_messages(2, Duration::from_secs(10)).await;
    // Well inside the cache's lifetime, the page already shows the new message.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let page: Value = system.get("bob", &page_path).await.json().await.unwrap();
        if contents(&page) == vec!["first".to_string(), "second".to_string()] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stale history page: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = system.metrics().await;
    assert!(
        metrics.contains("delivery_cache_invalidated_total{cache_type=\"recent_messages\"}"),
        "{metrics}"
    );
}

/// Calls `path` as `user` (anonymously with `None`) and returns (status, JSON body or null).
async fn call(
    system: &System,
    method: reqwest::Method,
    user: Option<&str>,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = system.http.request(method, system.url(path));
    if let Some(user) = user {
        request = request.bearer_auth(system.token(user));
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request completes");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn register_device(system: &System, user: &str, body: Value) -> (u16, Value) {
    call(
        system,
        reqwest::Method::POST,
        Some(user),
        "/v1/devices",
        Some(body),
    )
    .await
}

async fn device_tokens(system: &System, user: &str) -> Vec<String> {
    let (status, list) = call(
        system,
        reqwest::Method::GET,
        Some(user),
        "/v1/devices",
        None,
    )
    .await;
    assert_eq!(status, 200, "{list}");
    list["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["token"].as_str().expect("token").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_token_is_registered_refreshed_moved_and_forgotten_by_its_owner_only() {
    let system = System::start().await;
    let token = "fcm:APA91b-token_1";
    let fcm = |app_id: &str| json!({"platform": "fcm", "token": token, "appId": app_id});

    // Every device route wants a bearer token.
    for (method, path, body) in [
        (reqwest::Method::POST, "/v1/devices", Some(fcm("app"))),
        (reqwest::Method::GET, "/v1/devices", None),
        (reqwest::Method::DELETE, "/v1/devices/x", None),
    ] {
        let (status, error) = call(&system, method, None, path, body).await;
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (401, Some("UNAUTHORIZED"))
        );
    }

    let (status, created) = register_device(&system, "alice", fcm("com.example.one")).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["token"], token);
    assert_eq!(created["platform"], "fcm");
    assert_eq!(created["appId"], "com.example.one");
    assert_eq!(created["sandbox"], false);
    let (status, refreshed) = register_device(&system, "alice", fcm("com.example.two")).await;
    assert_eq!(status, 200, "{refreshed}");
    assert_eq!(refreshed["appId"], "com.example.two");
    assert_eq!(refreshed["createdAt"], created["createdAt"]);
    let (_, list) = call(
        &system,
        reqwest::Method::GET,
        Some("alice"),
        "/v1/devices",
        None,
    )
    .await;
    assert_eq!(list, json!({"devices": [refreshed]}));

    // The phone signs in as bob: the token is his now.
    let (status, moved) = register_device(&system, "bob", fcm("com.example.two")).await;
    assert_eq!(status, 200, "{moved}");
    assert_eq!(device_tokens(&system, "alice").await, Vec::<String>::new());
    assert_eq!(device_tokens(&system, "bob").await, vec![token.to_string()]);

    let apns = "0a".repeat(32);
    let invalid = [
        (
            json!({"platform": "webpush", "token": token, "appId": "a"}),
            "platform",
        ),
        (
            json!({"platform": "fcm", "token": "", "appId": "a"}),
            "token",
        ),
        (
            json!({"platform": "fcm", "token": "has space", "appId": "a"}),
            "token",
        ),
        (
            json!({"platform": "fcm", "token": "x".repeat(4097), "appId": "a"}),
            "token",
        ),
        (
            json!({"platform": "apns", "token": "zz".repeat(32), "appId": "a"}),
            "token",
        ),
        (
            json!({"platform": "apns", "token": "0a".repeat(31), "appId": "a"}),
            "token",
        ),
        (
            json!({"platform": "fcm", "token": token, "appId": "com/example"}),
            "appId",
        ),
        (
            json!({"platform": "fcm", "token": token, "appId": ""}),
            "appId",
        ),
        (
            json!({"platform": "fcm", "token": token, "appId": "a", "sandbox": true}),
            "sandbox",
        ),
        (
            json!({"platform": "apns", "token": apns, "appId": "a b", "sandbox": true}),
            "appId",
        ),
    ];
    for (body, field) in invalid {
        let (status, error) = register_device(&system, "carol", body.clone()).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["code"], "INVALID_SCHEMA", "{body}");
        assert_eq!(error["error"]["details"]["field"], field, "{body}");
    }
    let (status, _) = register_device(
        &system,
        "carol",
        json!({"platform": "fcm", "token": "t", "appId": "a", "extra": 1}),
    )
    .await;
    assert_eq!(status, 400, "unknown fields are refused");
    assert_eq!(device_tokens(&system, "carol").await, Vec::<String>::new());
    let (status, sandboxed) = register_device(
        &system,
        "carol",
        json!({"platform": "apns", "token": apns, "appId": "com.example.App", "sandbox": true}),
    )
    .await;
    assert_eq!((status, &sandboxed["sandbox"]), (201, &json!(true)));

    // Alice no longer owns the token: she cannot forget it, and it stays bob's.
    let path = format!("/v1/devices/{token}");
    let (status, error) = call(&system, reqwest::Method::DELETE, Some("alice"), &path, None).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (404, Some("DEVICE_NOT_FOUND"))
    );
    assert!(
        !error.to_string().contains(token),
        "the token is echoed: {error}"
    );
    let (owner,): (String,) = sqlx::query_as("SELECT user_id FROM devices WHERE token = $1")
        .bind(token)
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(owner, "bob");

    let (status, _) = call(&system, reqwest::Method::DELETE, Some("bob"), &path, None).await;
    assert_eq!(status, 204);
    let (status, error) = call(&system, reqwest::Method::DELETE, Some("bob"), &path, None).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (404, Some("DEVICE_NOT_FOUND"))
    );
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM devices WHERE token = $1")
        .bind(token)
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apns_token_is_forgotten_whatever_the_case_of_its_hex() {
    // Apple's clients print the same token in either case; registration keeps it once, in
    // lower case, and sign-out must find it however the app spells it.
    let system = System::start().await;
    let lower = "0a1b2c3d".repeat(8);
    let upper = lower.to_ascii_uppercase();
    for (registered, deleted) in [(&lower, &upper), (&upper, &lower), (&upper, &upper)] {
        let (status, device) = register_device(
            &system,
            "alice",
            json!({"platform": "apns", "token": registered, "appId": "com.example.App"}),
        )
        .await;
        assert_eq!(status, 201, "{device}");
        assert_eq!(device["token"], lower.as_str());
        let path = format!("/v1/devices/{deleted}");
        let (status, error) =
            call(&system, reqwest::Method::DELETE, Some("alice"), &path, None).await;
        assert_eq!(
            status, 204,
            "registered {registered}, deleted {deleted}: {error}"
        );
        assert_eq!(device_tokens(&system, "alice").await, Vec::<String>::new());
    }

    // An FCM token is opaque: its case is part of it, and another spelling is another token.
    let fcm = "fcm:ABC-def_1";
    let (status, _) = register_device(
        &system,
        "alice",
        json!({"platform": "fcm", "token": fcm, "appId": "app"}),
    )
    .await;
    assert_eq!(status, 201);
    let path = format!("/v1/devices/{}", fcm.to_ascii_lowercase());
    let (status, _) = call(&system, reqwest::Method::DELETE, Some("alice"), &path, None).await;
    assert_eq!(status, 404);
    assert_eq!(device_tokens(&system, "alice").await, vec![fcm.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_keeps_the_twenty_most_recently_registered_devices() {
    let system = System::start().await;
    let fcm = |i: usize| json!({"platform": "fcm", "token": format!("device-{i}"), "appId": "a"});
    for i in 0..20 {
        assert_eq!(register_device(&system, "alice", fcm(i)).await.0, 201);
    }
    // Device 0 is refreshed, so device 1 is now the stalest.
    assert_eq!(register_device(&system, "alice", fcm(0)).await.0, 200);
    assert_eq!(register_device(&system, "alice", fcm(20)).await.0, 201);

    let (stored,): (Vec<String>,) = sqlx::query_as(
        "SELECT array_agg(token ORDER BY token) FROM devices WHERE user_id = 'alice'",
    )
    .fetch_one(&system.pool)
    .await
    .unwrap();
    assert_eq!(stored.len(), 20);
    assert!(!stored.contains(&"device-1".to_string()), "{stored:?}");
    let listed = device_tokens(&system, "alice").await;
    assert_eq!(listed.len(), 20);
    assert_eq!(&listed[..2], ["device-20", "device-0"], "newest first");
    assert_eq!(listed[19], "device-2");
}

async fn stored_push_preview(system: &System, conversation: Uuid) -> bool {
    let (preview,): (bool,) =
        sqlx::query_as("SELECT push_preview FROM conversations WHERE id = $1")
            .bind(conversation)
            .fetch_one(&system.pool)
            .await
            .unwrap();
    preview
}

async fn put(system: &System, user: Option<&str>, path: &str, body: Value) -> (u16, Value) {
    call(system, reqwest::Method::PUT, user, path, Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_previews_are_set_at_creation_or_later_by_members_only() {
    let system = System::start().await;

    let (status, quiet) = call(
        &system,
        reqwest::Method::POST,
        Some("alice"),
        "/v1/conversations",
        Some(json!({"type": "group", "members": ["bob"], "pushPreview": false})),
    )
    .await;
    assert_eq!((status, &quiet["pushPreview"]), (201, &json!(false)));
    let quiet = Uuid::parse_str(quiet["conversationId"].as_str().unwrap()).unwrap();
    assert!(!stored_push_preview(&system, quiet).await);

    let conversation = system.conversation("alice", "group", &["bob"]).await;
    assert!(
        stored_push_preview(&system, conversation).await,
        "previews by default"
    );
    let path = format!("/v1/conversations/{conversation}/settings");
    let (status, answer) = put(&system, Some("bob"), &path, json!({"pushPreview": false})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"conversationId": conversation.to_string(), "pushPreview": false})
    );
    assert!(!stored_push_preview(&system, conversation).await);

    // Outsiders, unknown ids, anonymous callers and malformed bodies change nothing.
    let (status, error) = put(&system, Some("eve"), &path, json!({"pushPreview": true})).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (404, Some("CONVERSATION_NOT_FOUND"))
    );
    let unknown = format!("/v1/conversations/{}/settings", Uuid::new_v4());
    let (status, _) = put(
        &system,
        Some("alice"),
        &unknown,
        json!({"pushPreview": true}),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = put(&system, None, &path, json!({"pushPreview": true})).await;
    assert_eq!(status, 401);
    for body in [
        json!({}),
        json!({"pushPreview": "yes"}),
        json!({"pushPreview": true, "x": 1}),
    ] {
        let (status, error) = put(&system, Some("alice"), &path, body.clone()).await;
        assert_eq!(status, 400, "{body}: {error}");
    }
    assert!(!stored_push_preview(&system, conversation).await);
}

/// `POST /v1/conversations/{id}/members` as `user`, adding `member`: (status, body).
async fn add_member(system: &System, user: &str, conversation: Uuid, member: &str) -> (u16, Value) {
    let response = system
        .post(
            user,
            &format!("/v1/conversations/{conversation}/members"),
            json!({"userId": member}),
        )
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `DELETE /v1/conversations/{id}/members/{member}` as `user`: the status.
async fn remove_member(system: &System, user: &str, conversation: Uuid, member: &str) -> u16 {
    let path = format!("/v1/conversations/{conversation}/members/{member}");
    system.delete(user, &path).await.status().as_u16()
}

async fn active_members(system: &System, conversation: Uuid) -> i64 {
    let (count,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM conversation_members WHERE conversation_id = $1 AND is_active",
    )
    .bind(conversation)
    .fetch_one(&system.pool)
    .await
    .expect("count");
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_holds_at_most_max_members_when_created_and_when_members_are_added() {
    let system = System::start_with(|config| config.max_members = 4).await;

    // One too many at creation (the creator counts).
    let response = system
        .post(
            "alice",
            "/v1/conversations",
            json!({"type": "group", "members": ["bob", "carol", "dave", "erin"]}),
        )
        .await;
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "CONVERSATION_FULL", "{body}");
    assert_eq!(body["error"]["details"], json!({"maxMembers": 4}));

    // Added one by one, the fifth is refused; a member already in or a left place is not.
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    for member in ["carol", "dave"] {
        assert_eq!(
            add_member(&system, "alice", conversation, member).await.0,
            200
        );
    }
    let (status, body) = add_member(&system, "bob", conversation, "erin").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        body["error"],
        json!({"code": "CONVERSATION_FULL", "message": "a conversation has at most 4 members",
               "details": {"maxMembers": 4, "conversationId": conversation}})
    );
    assert_eq!(
        add_member(&system, "alice", conversation, "dave").await.0,
        200
    );
    assert_eq!(
        remove_member(&system, "alice", conversation, "dave").await,
        200
    );
    assert_eq!(
        add_member(&system, "alice", conversation, "erin").await.0,
        200
    );
    assert_eq!(active_members(&system, conversation).await, 4);

    // Adds racing for the last two places: two get them.
    for member in ["carol", "erin"] {
        assert_eq!(
            remove_member(&system, "alice", conversation, member).await,
            200
        );
    }
    let racers = ["u1", "u2", "u3", "u4", "u5", "u6"];
    let statuses = futures::future::join_all(
        racers
            .iter()
            .map(|member| add_member(&system, "alice", conversation, member)),
    )
    .await;
    let mut statuses: Vec<u16> = statuses.into_iter().map(|(status, _)| status).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 409, 409, 409, 409]);
    assert_eq!(active_members(&system, conversation).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_past_the_users_rate_get_429_with_retry_after() {
    let system = System::start_with(|config| config.membership_rate_per_min = 3).await;

    // Create, add, remove: three changes, all taken.
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    assert_eq!(
        add_member(&system, "alice", conversation, "carol").await.0,
        200
    );
    let path = format!("/v1/conversations/{conversation}/members/carol");
    assert_eq!(system.delete("alice", &path).await.status(), 200);

    // The fourth of any kind waits.
    let refused = [
        system
            .post(
                "alice",
                &format!("/v1/conversations/{conversation}/members"),
                json!({"userId": "dave"}),
            )
            .await,
        system.delete("alice", &path).await,
        system
            .post(
                "alice",
                "/v1/conversations",
                json!({"type": "group", "members": ["dave"]}),
            )
            .await,
    ];
    for response in refused {
        assert_eq!(response.status(), 429);
        let retry_after: u64 = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("Retry-After");
        assert!(retry_after >= 1);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"]["code"], "RATE_LIMIT_EXCEEDED", "{body}");
    }
    assert_eq!(active_members(&system, conversation).await, 2);

    // Another member is not held up by alice's changes.
    assert_eq!(
        add_member(&system, "bob", conversation, "dave").await.0,
        200
    );
}

// ---- blocks ----

/// Asserts the persisted recipients of each message (by the send's answer).
async fn assert_recipients(system: &System, expected: &[(&Value, &[&str])]) {
    for (ack, recipients) in expected {
        let id = Uuid::parse_str(ack["messageId"].as_str().expect("a messageId")).expect("a UUID");
        let (stored,): (Vec<String>,) =
            sqlx::query_as("SELECT recipient_ids FROM messages WHERE id = $1")
                .bind(id)
                .fetch_one(&system.pool)
                .await
                .expect("the message is stored");
        assert_eq!(stored, *recipients, "{ack}");
    }
}

/// (messageId, userId) of every push task in `PUSH`. No push worker runs in these tests, so
/// the work queue keeps every task the consumers scheduled.
async fn push_tasks(system: &System) -> BTreeSet<(String, String)> {
    let js = system.jetstream().await;
    let stream = js
        .get_stream(hotpath_core::names::PUSH_STREAM)
        .await
        .expect("PUSH stream");
    let state = stream.cached_info().state.clone();
    let mut tasks = BTreeSet::new();
    if state.messages == 0 {
        return tasks;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let entry = stream.get_raw_message(seq).await.expect("a push task");
        let task: Value = serde_json::from_slice(&entry.payload).expect("a task is JSON");
        tasks.insert((
            task["messageId"].as_str().expect("messageId").to_string(),
            task["userId"].as_str().expect("userId").to_string(),
        ));
    }
    tasks
}

/// Waits until `PUSH` holds at least every task in `expected`, and returns all it holds.
async fn wait_for_push_tasks(
    system: &System,
    expected: &BTreeSet<(String, String)>,
) -> BTreeSet<(String, String)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let tasks = push_tasks(system).await;
        if tasks.is_superset(expected) || std::time::Instant::now() > deadline {
            return tasks;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pair(message: &Value, user: &str) -> (String, String) {
    (
        message["messageId"]
            .as_str()
            .expect("messageId")
            .to_string(),
        user.to_string(),
    )
}

async fn unblock(system: &System, user: &str, other: &str) -> (u16, Value) {
    let path = format!("/v1/blocks/{other}");
    call(system, reqwest::Method::DELETE, Some(user), &path, None).await
}

async fn blocks_of(system: &System, user: &str) -> Value {
    let (status, list) = call(system, reqwest::Method::GET, Some(user), "/v1/blocks", None).await;
    assert_eq!(status, 200, "{list}");
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_leaves_the_pair_out_of_each_others_group_messages_and_refuses_their_direct_ones() {
    let system = System::start().await;
    let group = system
        .conversation("alice", "group", &["bob", "carol"])
        .await;
    let direct = system.conversation("alice", "direct", &["carol"]).await;
    // Everyone is offline with a phone, so every recipient gets a push task.
    for user in ["alice", "bob", "carol"] {
        let device = json!({"platform": "fcm", "token": format!("fcm-{user}"), "appId": "chat"});
        assert_eq!(register_device(&system, user, device).await.0, 201);
    }
    let blocked = system
        .post("carol", "/v1/blocks", json!({"userId": "alice"}))
        .await;
    assert_eq!(blocked.status(), 201);

    // Alice, the one blocked, still speaks to the group: bob hears her, carol does not.
    let (status, from_alice) = system.send("alice", text(group, "hello all")).await;
    assert_eq!(status, 202, "{from_alice}");
    // Nor does alice hear carol: the block keeps the pair apart whoever made it.
    let (status, from_carol) = system.send("carol", text(group, "hi bob")).await;
    assert_eq!(status, 202, "{from_carol}");
    // Naming carol among the recipients leaves her out; naming only her is refused.
    let mut named = text(group, "to you two");
    named["recipientIds"] = json!(["bob", "carol"]);
    let (status, named) = system.send("alice", named).await;
    assert_eq!(status, 202, "{named}");
    let mut only_carol = text(group, "just you");
    only_carol["recipientIds"] = json!(["carol"]);
    assert_eq!(
        code_of(&system, "alice", only_carol).await,
        (409, "USER_BLOCKED".to_string())
    );
    // A direct conversation across the block is refused, both ways, as before.
    for sender in ["alice", "carol"] {
        assert_eq!(
            code_of(&system, sender, text(direct, "hi")).await,
            (409, "USER_BLOCKED".to_string()),
            "{sender} in the direct conversation"
        );
    }
    // Bob is not part of the block: both hear him.
    let (status, from_bob) = system.send("bob", text(group, "hi both")).await;
    assert_eq!(status, 202, "{from_bob}");

    assert_eq!(
        system.wait_for_messages(4, Duration::from_secs(10)).await,
        4
    );
    assert_recipients(
        &system,
        &[
            (&from_alice, &["bob"]),
            (&from_carol, &["bob"]),
            (&named, &["bob"]),
            (&from_bob, &["alice", "carol"]),
        ],
    )
    .await;

    // Pushes follow the recipients: one task per recipient, none across the block.
    let expected: BTreeSet<(String, String)> = [
        pair(&from_alice, "bob"),
        pair(&from_carol, "bob"),
        pair(&named, "bob"),
        pair(&from_bob, "alice"),
        pair(&from_bob, "carol"),
    ]
    .into_iter()
    .collect();
    assert_eq!(wait_for_push_tasks(&system, &expected).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unblocking_lets_the_pair_hear_each_other_again_and_the_list_follows() {
    let system = System::start().await;
    let group = system
        .conversation("alice", "group", &["bob", "carol"])
        .await;
    let direct = system.conversation("alice", "direct", &["carol"]).await;
    let unblock = |user, other| unblock(&system, user, other);

    // Nothing to unblock yet.
    let (status, error) = unblock("carol", "alice").await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (404, Some("BLOCK_NOT_FOUND")),
        "{error}"
    );
    assert_eq!(blocks_of(&system, "carol").await, json!({"blocks": []}));

    let (status, created) = call(
        &system,
        reqwest::Method::POST,
        Some("carol"),
        "/v1/blocks",
        Some(json!({"userId": "alice"})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert!(created["createdAt"].is_string(), "{created}");
    assert_eq!(
        blocks_of(&system, "carol").await,
        json!({"blocks": [{"userId": "alice", "createdAt": created["createdAt"]}]})
    );
    // The list is of the blocks one made: alice does not learn who blocked her from it.
    assert_eq!(blocks_of(&system, "alice").await, json!({"blocks": []}));

    // Carol listens; while the block stands (and is cached by the gateway), alice's group
    // message is not hers and the direct one is refused.
    let mut carol = connect(&system, &system.base, "carol").await;
    let (status, while_blocked) = system.send("alice", text(group, "anyone?")).await;
    assert_eq!(status, 202, "{while_blocked}");
    assert_eq!(
        code_of(&system, "alice", text(direct, "hi")).await,
        (409, "USER_BLOCKED".to_string())
    );

    // Unblocked: 204, the list forgets it, a second unblock finds nothing.
    let (status, body) = unblock("carol", "alice").await;
    assert_eq!((status, body), (204, Value::Null));
    assert_eq!(blocks_of(&system, "carol").await, json!({"blocks": []}));
    let (status, error) = unblock("carol", "alice").await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (404, Some("BLOCK_NOT_FOUND"))
    );
    // Only the blocker can lift a block: alice never blocked carol.
    assert_eq!(unblock("alice", "carol").await.0, 404);

    // Alice's messages reach carol again, in the group and directly.
    let (status, to_group) = system.send("alice", text(group, "back again")).await;
    assert_eq!(status, 202, "{to_group}");
    let (status, to_carol) = system.send("alice", text(direct, "hi carol")).await;
    assert_eq!(status, 202, "{to_carol}");
    // The first two messages carol's socket gets are these (in either order: the two
    // conversations are on different partitions); the one sent while blocked never comes,
    // and would have come first, being the same conversation's earlier message.
    let mut received = BTreeSet::new();
    for _ in 0..2 {
        let frame = next_of(&mut carol, "message.new").await;
        received.insert(frame["message"]["messageId"].as_str().unwrap().to_string());
    }
    let expected: BTreeSet<String> = [&to_group, &to_carol]
        .iter()
        .map(|ack| ack["messageId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(received, expected);

    assert_eq!(
        system.wait_for_messages(3, Duration::from_secs(10)).await,
        3
    );
    assert_recipients(
        &system,
        &[
            (&while_blocked, &["bob"]),
            (&to_group, &["bob", "carol"]),
            (&to_carol, &["carol"]),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_oneself_or_an_invalid_id_is_400_and_blocking_twice_keeps_the_first_block() {
    let system = System::start().await;
    let block = |user: Option<&'static str>, body: Value| {
        call(
            &system,
            reqwest::Method::POST,
            user,
            "/v1/blocks",
            Some(body),
        )
    };
    for (body, message) in [
        (json!({"userId": "alice"}), "cannot block yourself"),
        (json!({"userId": "not a user id"}), "not a valid user id"),
        (json!({"userId": ""}), "not a valid user id"),
    ] {
        let (status, error) = block(Some("alice"), body.clone()).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["code"], "INVALID_SCHEMA", "{body}");
        assert_eq!(error["error"]["details"]["field"], "userId", "{body}");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains(message),
            "{body}: {error}"
        );
    }
    for body in [
        json!({}),
        json!({"userId": 7}),
        json!({"userId": "bob", "x": 1}),
    ] {
        let (status, error) = block(Some("alice"), body.clone()).await;
        assert_eq!(status, 400, "{body}: {error}");
    }
    let (status, error) = call(
        &system,
        reqwest::Method::DELETE,
        Some("alice"),
        "/v1/blocks/not%20a%20user%20id",
        None,
    )
    .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (400, Some("INVALID_SCHEMA")),
        "{error}"
    );
    for (method, path) in [
        (reqwest::Method::GET, "/v1/blocks"),
        (reqwest::Method::DELETE, "/v1/blocks/bob"),
    ] {
        assert_eq!(call(&system, method, None, path, None).await.0, 401);
    }
    assert_eq!(block(None, json!({"userId": "bob"})).await.0, 401);

    // A repeated block (a retried request) is no error and keeps the first one's time.
    let (status, first) = block(Some("alice"), json!({"userId": "bob"})).await;
    assert_eq!(status, 201, "{first}");
    let (status, again) = block(Some("alice"), json!({"userId": "bob"})).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, first);
    assert_eq!(
        again,
        json!({"blockerId": "alice", "blockedId": "bob", "createdAt": first["createdAt"]})
    );
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM blocks")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}
