//! Real-time delivery over `GET /v1/ws`, against real NATS and Postgres and real gateways:
//! live `message.new` across gateways, state changes to the sender, several sockets per user,
//! catch-up with `sync`, sends over the socket, slow clients, heartbeats, presence, receipts.

use hotpath_testkit as support;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::{SinkExt, StreamExt};
use hotpath_core::domain::DlqSource;
use hotpath_core::names::FRAME_SEPARATOR;
use hotpath_core::presence::{Presence, PresenceRecord};
use hotpath_core::receipts::{Receipt, ReceiptState};
use serde_json::{Value, json};
use support::receipts::{self, Stamp};
use support::ws::{
    PATIENCE, QUIET, Socket, acknowledge, assert_quiet, connect, next_frame, next_of, ping,
    send_frame, state_change, state_changes, ws_url,
};
use support::{System, text};
use tokio::net::TcpSocket;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Sends `count` messages as `sender` over HTTP, numbered from `first`, and returns their ids.
async fn send_many(
    system: &System,
    sender: &str,
    conversation: Uuid,
    first: usize,
    count: usize,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for i in first..first + count {
        let (status, ack) = system
            .send(sender, text(conversation, &format!("m-{i}")))
            .await;
        assert_eq!(status, 202, "{ack}");
        ids.push(ack["messageId"].as_str().expect("messageId").to_string());
    }
    ids
}

/// A second gateway process on the same NATS and Postgres, as a load balancer would see it.
async fn second_gateway(system: &System) -> (String, CancellationToken) {
    let stop = CancellationToken::new();
    let (addr, _task) = hotpath::roles::spawn_gateway(system.config.clone(), stop.clone())
        .await
        .expect("second gateway starts");
    (format!("http://{addr}"), stop)
}

async fn presence(system: &System) -> Presence {
    let nats = async_nats::connect(system.config.nats_url.as_str())
        .await
        .expect("nats");
    Presence::open(&jetstream::new(nats), system.config.presence_ttl())
        .await
        .expect("presence bucket")
}

/// Waits until the user's stored presence satisfies `done`, and returns it.
async fn presence_until(
    presence: &Presence,
    user: &str,
    done: impl Fn(&Option<PresenceRecord>) -> bool,
) -> Option<PresenceRecord> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let record = presence.record(user).await.expect("presence readable");
        if done(&record) {
            return record;
        }
        assert!(
            Instant::now() < deadline,
            "presence of {user} stayed {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has_metric(metrics: &str, name: &str, label: &str) -> bool {
    metrics
        .lines()
        .any(|l| l.starts_with(name) && l.contains(label))
}

fn seq_and_content(frame: &Value) -> (i64, String) {
    assert_eq!(frame["type"], "message.new", "{frame}");
    let message = &frame["message"];
    (
        message["seq"].as_i64().expect("seq"),
        message["content"].as_str().expect("content").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_on_another_gateway_gets_each_message_once_in_seq_order() {
    let system = System::start().await;
    let (other_gateway, _stop) = second_gateway(&system).await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let mut bob = connect(&system, &other_gateway, "bob").await;

    let ids = send_many(&system, "alice", conversation, 1, 20).await;

    for (i, id) in ids.iter().enumerate() {
        let frame = next_frame(&mut bob).await;
        let (seq, content) = seq_and_content(&frame);
        assert_eq!(seq, i as i64 + 1);
        assert_eq!(content, format!("m-{}", i + 1));
        let message = &frame["message"];
        assert_eq!(message["messageId"], id.as_str());
        assert_eq!(message["conversationId"], conversation.to_string());
        assert_eq!(message["senderId"], "alice");
        assert_eq!(message["contentType"], "text");
        assert_eq!(message["metadata"], json!({}));
        assert!(message["acceptedAt"].is_string());
    }
    // Nothing was delivered twice: the very next frame is the next message.
    send_many(&system, "alice", conversation, 21, 1).await;
    assert_eq!(
        seq_and_content(&next_frame(&mut bob).await),
        (21, "m-21".into())
    );
    let metrics = system.metrics().await;
    for (name, label) in [
        (
            "delivery_fanout_attempted_total",
            "recipient_status=\"online\"",
        ),
        ("delivery_fanout_delivered_total", "socket_count=\"1\""),
    ] {
        assert!(has_metric(&metrics, name, label), "{name}{{{label}}}");
    }
}

/// Fanout sends each user a batch's frames in one NATS payload; the socket node hands them on
/// as separate WebSocket frames, in seq order, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_told_to_a_user_in_one_payload_arrives_as_one_frame_per_message_in_seq_order() {
    const MESSAGES: usize = 30;
    let mut system = System::start().await;
    let conversation = system
        .conversation("alice", "group", &["bob", "carol"])
        .await;
    let mut alice = connect(&system, &system.base, "alice").await;
    let mut bob = connect(&system, &system.base, "bob").await;
    let nats = async_nats::connect(system.config.nats_url.as_str())
        .await
        .expect("nats");
    let mut bobs_deliveries = nats
        .subscribe(hotpath_core::names::deliver_subject("bob"))
        .await
        .expect("subscribe");
    nats.flush().await.expect("flush");

    // A backlog, so that the consumers find all of it in one fetch.
    system.stop_consumers().await;
    let ids = send_many(&system, "alice", conversation, 1, MESSAGES).await;
    system.start_consumers().await;

    for i in 1..=MESSAGES {
        let frame = next_frame(&mut bob).await;
        assert_eq!(seq_and_content(&frame), (i as i64, format!("m-{i}")));
    }
    assert_quiet(&mut bob).await;
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            next_frame(&mut alice).await,
            json!({"type": "message.state.changed", "messageId": id,
                   "conversationId": conversation.to_string(), "state": "sent", "seq": i + 1})
        );
    }
    assert_quiet(&mut alice).await;

    let (mut payloads, mut frames) = (0, 0);
    while frames < MESSAGES {
        let delivery = tokio::time::timeout(PATIENCE, bobs_deliveries.next())
            .await
            .expect("bob's deliveries arrive")
            .expect("subscription open");
        payloads += 1;
        frames += delivery.payload.split(|&b| b == FRAME_SEPARATOR).count();
    }
    assert_eq!(frames, MESSAGES);
    assert!(
        payloads < MESSAGES,
        "{MESSAGES} frames came in {payloads} payloads: none was told together"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_is_told_when_its_message_is_sent_and_offline_recipients_are_counted() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let mut alice = connect(&system, &system.base, "alice").await;

    let ids = send_many(&system, "alice", conversation, 1, 2).await;

    for (i, id) in ids.iter().enumerate() {
        let frame = next_frame(&mut alice).await;
        assert_eq!(
            frame,
            json!({"type": "message.state.changed", "messageId": id,
                   "conversationId": conversation.to_string(), "state": "sent", "seq": i + 1})
        );
    }
    // Bob never connected: he counts as offline (left for catch-up; no push sender yet).
    let metrics = system.metrics().await;
    assert!(
        has_metric(
            &metrics,
            "delivery_fanout_attempted_total",
            "recipient_status=\"offline\""
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_socket_of_a_user_gets_the_message_once() {
    let system = System::start().await;
    let (other_gateway, _stop) = second_gateway(&system).await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    // Two sockets on one gateway (one shared subscription) and one on the other.
    let mut sockets = vec![
        connect(&system, &system.base, "bob").await,
        connect(&system, &system.base, "bob").await,
        connect(&system, &other_gateway, "bob").await,
    ];

    send_many(&system, "alice", conversation, 1, 3).await;

    for socket in &mut sockets {
        for seq in 1..=3 {
            assert_eq!(
                seq_and_content(&next_frame(socket).await),
                (seq, format!("m-{seq}"))
            );
        }
    }
    // Closing one socket leaves the others (and the shared subscription) working.
    let mut first = sockets.remove(0);
    first.close(None).await.expect("closed");
    send_many(&system, "alice", conversation, 4, 1).await;
    for socket in &mut sockets {
        assert_eq!(
            seq_and_content(&next_frame(socket).await),
            (4, "m-4".into())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_catches_up_with_sync_then_hears_live_messages() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let mut bob = connect(&system, &system.base, "bob").await;
    send_many(&system, "alice", conversation, 1, 1).await;
    assert_eq!(
        seq_and_content(&next_frame(&mut bob).await),
        (1, "m-1".into())
    );
    bob.close(None).await.expect("closed");
    drop(bob);

    // While bob is away: 100 messages, more than one page of catch-up.
    send_many(&system, "alice", conversation, 2, 100).await;
    assert_eq!(
        system.wait_for_messages(101, PATIENCE).await,
        101,
        "all persisted"
    );

    let mut bob = connect(&system, &system.base, "bob").await;
    send_frame(
        &mut bob,
        json!({"type": "sync", "reqId": "s1", "conversationId": conversation, "afterSeq": 1}),
    )
    .await;
    // The catch-up writes 2..=101 in order. A live frame of the last messages may still be on
    // its way from fanout and reach the new socket around it (the protocol says so: clients
    // deduplicate by seq), so other frames may only repeat a seq the catch-up covers.
    let mut next_in_sync = 2;
    let done = loop {
        let frame = next_frame(&mut bob).await;
        if frame["type"] == "sync.done" {
            break frame;
        }
        let (seq, content) = seq_and_content(&frame);
        assert_eq!(content, format!("m-{seq}"));
        if seq == next_in_sync {
            next_in_sync += 1;
        } else {
            assert!((2..=101).contains(&seq), "an unexpected frame: {frame}");
        }
    };
    assert_eq!(
        next_in_sync, 102,
        "the catch-up skipped from {next_in_sync}"
    );
    assert_eq!(
        done,
        json!({"type": "sync.done", "reqId": "s1", "conversationId": conversation, "lastSeq": 101})
    );

    send_many(&system, "alice", conversation, 102, 1).await;
    let live = loop {
        let frame = seq_and_content(&next_frame(&mut bob).await);
        if frame.0 > 101 {
            break frame;
        }
        // A late live frame of a message the catch-up already served.
    };
    assert_eq!(live, (102, "m-102".into()));

    // A conversation bob is not in cannot be synced.
    let other = system.conversation("carol", "group", &["dave"]).await;
    send_frame(
        &mut bob,
        json!({"type": "sync", "reqId": "s2", "conversationId": other, "afterSeq": 0}),
    )
    .await;
    let refused = next_frame(&mut bob).await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["reqId"], "s2");
    assert_eq!(refused["error"]["code"], "NOT_CONVERSATION_MEMBER");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_over_the_socket_is_answered_like_http_and_bad_frames_get_error_frames() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let mut alice = connect(&system, &system.base, "alice").await;

    // The same send over HTTP and over the socket: the same answer, field for field.
    let mut body = text(conversation, "over http");
    body["clientMessageId"] = json!("http-1");
    let (status, http_ack) = system.send("alice", body).await;
    assert_eq!(status, 202);
    let mut frame = text(conversation, "over the socket");
    frame["type"] = json!("send");
    frame["reqId"] = json!("r1");
    frame["clientMessageId"] = json!("ws-1");
    send_frame(&mut alice, frame.clone()).await;
    // The ack, and (once persisted) the state change: live frames and replies are not ordered
    // with respect to each other, so take them as they come.
    let mut ack = Value::Null;
    let mut sent = Value::Null;
    while ack.is_null() || sent.is_null() {
        let next = next_frame(&mut alice).await;
        match next["type"].as_str() {
            Some("send.ack") => ack = next,
            Some("message.state.changed") if next["conversationId"] == conversation.to_string() => {
                if next["seq"] == 2 {
                    sent = next;
                }
            }
            _ => panic!("unexpected {next}"),
        }
    }
    assert_eq!(ack["reqId"], "r1");
    assert_eq!(ack["state"], "pending");
    assert_eq!(ack["idempotentHit"], false);
    assert_eq!(ack["guidance"], {
        let mut guidance = http_ack["guidance"].clone();
        guidance["pollingEndpoint"] = json!(format!(
            "/v1/messages/{}/status",
            ack["messageId"].as_str().unwrap()
        ));
        guidance
    });
    let keys = |v: &Value| {
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.retain(|k| k != "type" && k != "reqId");
        keys.sort();
        keys
    };
    assert_eq!(keys(&ack), keys(&http_ack));
    // It is a real send: persisted (seq 2, after the HTTP one), and the sender is told so.
    assert_eq!(sent["messageId"], ack["messageId"]);
    assert_eq!(sent["state"], "sent");
    // Retrying it is an idempotent hit, as over HTTP.
    frame["reqId"] = json!("r2");
    send_frame(&mut alice, frame).await;
    let retry = next_of(&mut alice, "send.ack").await;
    assert_eq!(retry["reqId"], "r2");
    assert_eq!(retry["idempotentHit"], true);
    assert_eq!(retry["messageId"], ack["messageId"]);

    // Refused sends carry the HTTP code for the same body.
    for body in [
        json!({"conversationId": conversation, "contentType": "text"}),
        json!({"conversationId": conversation, "content": 5, "contentType": "text"}),
        json!({"conversationId": Uuid::new_v4(), "content": "x", "contentType": "text"}),
    ] {
        let (_, http_error) = system.send("alice", body.clone()).await;
        let mut frame = body;
        frame["type"] = json!("send");
        frame["reqId"] = json!("bad");
        send_frame(&mut alice, frame).await;
        let error = next_of(&mut alice, "error").await;
        assert_eq!(error["reqId"], "bad");
        assert_eq!(error["error"], http_error["error"]);
    }
    let (_, http_error) = system
        .send("mallory", text(conversation, "not a member"))
        .await;
    let mut mallory = connect(&system, &system.base, "mallory").await;
    let mut frame = text(conversation, "not a member");
    frame["type"] = json!("send");
    send_frame(&mut mallory, frame).await;
    let error = next_of(&mut mallory, "error").await;
    assert_eq!(error["error"]["code"], "NOT_CONVERSATION_MEMBER");
    assert_eq!(error["error"], http_error["error"]);

    // Frames that are not understood get an error frame, and the socket stays open.
    let refusals = [
        (Message::Text("not json".into()), "INVALID_SCHEMA"),
        (Message::Text("[1, 2]".into()), "INVALID_SCHEMA"),
        (
            Message::Text(r#"{"type": "dance"}"#.into()),
            "INVALID_SCHEMA",
        ),
        (
            Message::Text(r#"{"content": "no type"}"#.into()),
            "MISSING_REQUIRED_FIELD",
        ),
        (Message::Binary(vec![1, 2, 3].into()), "INVALID_SCHEMA"),
        (
            Message::Text(
                json!({"type": "send", "content": "x".repeat(system.config.max_body_bytes)})
                    .to_string()
                    .into(),
            ),
            "PAYLOAD_TOO_LARGE",
        ),
    ];
    for (message, code) in refusals {
        alice.send(message).await.expect("frame sent");
        let error = next_of(&mut alice, "error").await;
        assert_eq!(error["error"]["code"], code, "{error}");
    }
    ping(&mut alice).await;

    // A frame beyond what the WebSocket layer reads at all: told why, then closed with 1009.
    let huge = "x".repeat(system.config.max_body_bytes * 8);
    alice
        .send(Message::Text(huge.into()))
        .await
        .expect("frame sent");
    let error = next_of(&mut alice, "error").await;
    assert_eq!(error["error"]["code"], "PAYLOAD_TOO_LARGE");
    // The rest of the frame is never read, so the close frame may be overtaken by a reset.
    let close = tokio::time::timeout(PATIENCE, alice.next())
        .await
        .expect("closed in time");
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1009),
        None | Some(Err(_)) => {}
        other => panic!("expected the socket to close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_without_a_valid_token_is_refused_with_401() {
    let system = System::start().await;
    let url = format!("{}/v1/ws", system.base.replacen("http://", "ws://", 1));
    for request in [url.clone(), format!("{url}?token=garbage")] {
        match tokio_tungstenite::connect_async(request).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401);
                let body: Value =
                    serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                        .expect("JSON error body");
                assert_eq!(body["error"]["code"], "UNAUTHORIZED");
            }
            other => panic!("expected 401, got {other:?}"),
        }
    }
    // The header works as well as the query parameter.
    let mut request = url.into_client_request().expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", system.token("alice"))
            .parse()
            .expect("header"),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("opens with a bearer header");
    ping(&mut socket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_while_others_keep_receiving() {
    // A queue that holds a whole fanout batch (64 in tests), so a reading client never
    // overflows it, yet small enough that a stuck one does within a few thousand messages.
    let system = System::start_with(|config| config.ws_outbound_queue = 256).await;
    let conversation = system
        .conversation("alice", "group", &["bob", "carol"])
        .await;
    let presence = presence(&system).await;
    // Carol reads all along, on her own task, and reports the seqs she got.
    let mut carol = connect(&system, &system.base, "carol").await;
    let (seqs_tx, mut seqs) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let frame = next_frame(&mut carol).await;
            if seqs_tx.send(frame["message"]["seq"].as_i64()).is_err() {
                return;
            }
        }
    });
    // Bob's socket has a tiny receive buffer and is never read until the end.
    let address = system.base.trim_start_matches("http://");
    let tcp = TcpSocket::new_v4().expect("socket");
    tcp.set_recv_buffer_size(4096).expect("small buffer");
    let stream = tcp
        .connect(address.parse().expect("address"))
        .await
        .expect("connects");
    let (mut bob, _) = tokio_tungstenite::client_async(
        ws_url(&system.base, &system.token("bob")),
        MaybeTlsStream::Plain(stream),
    )
    .await
    .expect("websocket opens");
    ping(&mut bob).await;

    // Big messages until the gateway gives up on bob (kernel buffers hold some megabytes
    // before his queue even starts to fill).
    let filler = "x".repeat(9_000);
    let mut sent = 0i64;
    while presence.record("bob").await.expect("presence").is_some() {
        assert!(sent < 3_000, "bob was never cut off");
        for _ in 0..50 {
            // Distinct contents: identical ones within a second would be one message.
            let content = format!("{sent:05}{filler}");
            let (status, ack) = system.send("alice", text(conversation, &content)).await;
            assert_eq!(status, 202, "{ack}");
            assert_eq!(ack["idempotentHit"], false);
            sent += 1;
        }
        system.wait_for_messages(sent, PATIENCE).await;
    }

    // Carol got every message, in order, before and after bob was cut off.
    send_many(&system, "alice", conversation, 0, 1).await;
    for expected in 1..=sent + 1 {
        let seq = tokio::time::timeout(PATIENCE, seqs.recv())
            .await
            .expect("carol keeps receiving");
        assert_eq!(seq, Some(Some(expected)));
    }

    // Bob got what fitted in the buffers and then the connection ended, with 1008 if the
    // close frame could still get through.
    let mut received = 0i64;
    loop {
        match tokio::time::timeout(PATIENCE, bob.next())
            .await
            .expect("bob's socket ends")
        {
            Some(Ok(Message::Text(_))) => received += 1,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1008);
                assert_eq!(frame.reason.as_str(), "outbound queue full");
                break;
            }
            Some(Ok(other)) => panic!("unexpected {other:?}"),
            None | Some(Err(_)) => break,
        }
    }
    assert!(
        received < sent,
        "bob received {received} of {sent}: not cut off"
    );
    let metrics = system.metrics().await;
    assert!(
        has_metric(
            &metrics,
            "websocket_connections_closed_total",
            "reason=\"outbound_queue_full\""
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_stops_answering_pings_is_closed() {
    let system = System::start_with(|config| {
        config.ws_ping_interval_secs = 1;
        config.ws_heartbeat_timeout_secs = 2;
    })
    .await;
    let presence = presence(&system).await;
    // This client reads all along, and so answers pings (the WebSocket layer does): it stays.
    let mut lively = connect(&system, &system.base, "carol").await;
    let stop_reading = CancellationToken::new();
    let reader = tokio::spawn({
        let stop = stop_reading.clone();
        async move {
            while !stop.is_cancelled() {
                if let Ok(next) =
                    tokio::time::timeout(Duration::from_millis(100), lively.next()).await
                {
                    assert!(matches!(next, Some(Ok(_))), "lively socket ended: {next:?}");
                }
            }
            lively
        }
    });
    // This one is never read, so it never answers.
    let mut silent = connect(&system, &system.base, "bob").await;

    presence_until(&presence, "bob", Option::is_none).await;
    let mut closed_with = None;
    while let Ok(Some(Ok(message))) = tokio::time::timeout(PATIENCE, silent.next()).await {
        if let Message::Close(Some(frame)) = message {
            closed_with = Some(u16::from(frame.code));
            break;
        }
    }
    assert_eq!(closed_with, Some(4000));

    // Well past the timeout, the lively socket still works.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_reading.cancel();
    let mut lively = reader.await.expect("reader");
    ping(&mut lively).await;
    assert!(presence.record("carol").await.expect("presence").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_shows_a_user_while_connected_and_not_after() {
    let system = System::start().await;
    let (other_gateway, _stop) = second_gateway(&system).await;
    let presence = presence(&system).await;
    assert_eq!(presence.record("bob.smith").await.expect("presence"), None);

    let mut first = connect(&system, &system.base, "bob.smith").await;
    let record = presence.record("bob.smith").await.expect("presence");
    let sockets = |r: &Option<PresenceRecord>| {
        r.as_ref()
            .map(|r| r.nodes.values().map(|n| n.sockets).collect::<Vec<_>>())
    };
    assert_eq!(sockets(&record), Some(vec![1]));
    let mut second = connect(&system, &system.base, "bob.smith").await;
    let mut third = connect(&system, &other_gateway, "bob.smith").await;
    let record = presence_until(&presence, "bob.smith", |r| {
        r.as_ref().is_some_and(|r| r.nodes.len() == 2)
    })
    .await;
    let mut counts = sockets(&record).expect("record");
    counts.sort();
    assert_eq!(
        counts,
        vec![1, 2],
        "two nodes: one with 2 sockets, one with 1"
    );
    assert_eq!(presence.live_sockets("bob.smith").await.expect("lookup"), 3);

    for socket in [&mut first, &mut second, &mut third] {
        socket.close(None).await.expect("closed");
    }
    presence_until(&presence, "bob.smith", Option::is_none).await;
    assert_eq!(presence.live_sockets("bob.smith").await.expect("lookup"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_closes_its_sockets_with_going_away() {
    let system = System::start().await;
    let (other_gateway, stop) = second_gateway(&system).await;
    let presence = presence(&system).await;
    let mut bob = connect(&system, &other_gateway, "bob").await;

    stop.cancel();

    let close = tokio::time::timeout(PATIENCE, async {
        loop {
            match bob.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(close, Some(1001));
    presence_until(&presence, "bob", Option::is_none).await;
}

/// A gateway on a tokio runtime of its own, on a thread of its own. Killing it shuts that
/// runtime down: every one of its tasks (the server, each socket's reader and writer, the
/// presence refresher, its NATS client) is dropped where it stands without running again, and
/// its TCP connections close, as when the process dies. Its shutdown token is never
/// cancelled, so none of the gateway's own cleanup runs; the presence writes its dropped
/// sockets try to spawn land on a runtime that is shutting down and never run.
struct DoomedGateway {
    base: String,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DoomedGateway {
    async fn start(config: hotpath_core::config::Config) -> DoomedGateway {
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("gateway runtime");
            let started = runtime.block_on(hotpath::roles::spawn_gateway(
                config,
                CancellationToken::new(),
            ));
            let (addr, _task) = started.expect("doomed gateway starts");
            let _ = addr_tx.send(addr);
            let _ = runtime.block_on(killed);
            runtime.shutdown_timeout(Duration::from_secs(5));
        });
        let addr = addr_rx.await.expect("doomed gateway reports its address");
        DoomedGateway {
            base: format!("http://{addr}"),
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    /// Ends the gateway on the spot and returns once all of its tasks are gone.
    async fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .expect("join")
                .expect("the doomed gateway's thread ends cleanly");
        }
    }
}

/// The sum of a metric's samples whose line contains `label`.
fn metric_value(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_users_go_offline_within_the_presence_ttl() {
    let system = System::start_with(|config| config.presence_ttl_secs = 3).await;
    let ttl = system.config.presence_ttl();
    assert_eq!(ttl, Duration::from_secs(3));
    let presence = presence(&system).await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let mut doomed = DoomedGateway::start(system.config.clone()).await;
    let mut bob = connect(&system, &doomed.base, "bob").await;

    // Online: presence lists the doomed gateway, and live delivery reaches bob there.
    assert_eq!(presence.live_sockets("bob").await.expect("lookup"), 1);
    send_many(&system, "alice", conversation, 1, 1).await;
    assert_eq!(
        seq_and_content(&next_frame(&mut bob).await),
        (1, "m-1".into())
    );

    doomed.kill().await;
    let killed = Instant::now();
    // Nothing cleaned up after it: its entry is still stored (it goes by expiry alone).
    let record = presence.record("bob").await.expect("presence");
    assert!(
        record.is_some_and(|r| r.nodes.len() == 1),
        "the dead gateway's entry was removed instead of expiring"
    );
    // Its socket is gone with it.
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match bob.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Text(_))) => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "bob's socket outlived its gateway");

    // Readers call bob offline at most a TTL after the gateway's last refresh, which came
    // before it died.
    while presence.live_sockets("bob").await.expect("lookup") > 0 {
        assert!(
            killed.elapsed() < ttl + Duration::from_secs(1),
            "bob still online {:?} after his gateway died",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let offline_after = killed.elapsed();
    // The bucket's max_age then removes the key nobody refreshes any more.
    presence_until(&presence, "bob", Option::is_none).await;
    let removed_after = killed.elapsed();
    assert!(
        removed_after < ttl * 3,
        "bob's key was removed only {removed_after:?} after his gateway died"
    );
    eprintln!("presence: offline after {offline_after:?}, key removed after {removed_after:?}");

    // Fanout reuses presence answers for up to a second; past that, messages to bob take the
    // offline path. (The registry is shared by the tests running beside this one, so this
    // counts at least ours.)
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let offline = |m: &str| {
        metric_value(
            m,
            "delivery_fanout_attempted_total",
            "recipient_status=\"offline\"",
        )
    };
    let before = offline(&system.metrics().await);
    const OFFLINE_SENDS: usize = 5;
    send_many(&system, "alice", conversation, 2, OFFLINE_SENDS).await;
    assert_eq!(
        system
            .wait_for_messages(1 + OFFLINE_SENDS as i64, PATIENCE)
            .await,
        1 + OFFLINE_SENDS as i64
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        let after = offline(&system.metrics().await);
        if after - before >= OFFLINE_SENDS as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "offline fanout went from {before} to {after}, expected {OFFLINE_SENDS} more"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_move_the_senders_message_to_delivered_then_read_once() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "direct", &["bob"]).await;
    let mut alice = connect(&system, &system.base, "alice").await;
    let mut bob = connect(&system, &system.base, "bob").await;

    // Sent over the socket: pending in the ack, then `sent` once persisted.
    let mut frame = text(conversation, "did you get this?");
    frame["type"] = json!("send");
    frame["reqId"] = json!("s1");
    send_frame(&mut alice, frame).await;
    let mut ack = Value::Null;
    let mut sent = Value::Null;
    while ack.is_null() || sent.is_null() {
        let next = next_frame(&mut alice).await;
        match next["type"].as_str() {
            Some("send.ack") => ack = next,
            Some("message.state.changed") => sent = next,
            _ => panic!("unexpected {next}"),
        }
    }
    assert_eq!(ack["state"], "pending");
    let message_id = ack["messageId"].as_str().expect("messageId").to_string();
    let message = Uuid::parse_str(&message_id).expect("uuid");
    assert_eq!(sent["messageId"], message_id.as_str());
    assert_eq!(sent["state"], "sent");
    let new = next_of(&mut bob, "message.new").await;
    assert_eq!(new["message"]["messageId"], message_id.as_str());

    // Only a recipient may acknowledge; the state must be one of the two.
    let mut mallory = connect(&system, &system.base, "mallory").await;
    for (socket, who) in [(&mut mallory, "mallory"), (&mut alice, "alice")] {
        send_frame(
            socket,
            json!({"type": "ack", "reqId": who, "messageId": message_id, "state": "read"}),
        )
        .await;
        let error = next_of(socket, "error").await;
        assert_eq!(error["reqId"], who);
        assert_eq!(error["error"]["code"], "MESSAGE_NOT_FOUND", "{error}");
    }
    send_frame(
        &mut bob,
        json!({"type": "ack", "reqId": "bad", "messageId": Uuid::new_v4(), "state": "delivered"}),
    )
    .await;
    assert_eq!(
        next_of(&mut bob, "error").await["error"]["code"],
        "MESSAGE_NOT_FOUND"
    );
    send_frame(
        &mut bob,
        json!({"type": "ack", "reqId": "bad", "messageId": message_id, "state": "sent"}),
    )
    .await;
    assert_eq!(
        next_of(&mut bob, "error").await["error"]["code"],
        "INVALID_SCHEMA"
    );

    // Delivered, then read: the sender is told each, with the message's seq.
    for state in ["delivered", "read"] {
        send_frame(
            &mut bob,
            json!({"type": "ack", "reqId": state, "messageId": message_id, "state": state}),
        )
        .await;
        assert_eq!(
            next_frame(&mut bob).await,
            json!({"type": "ack.ok", "reqId": state})
        );
        let changed = next_of(&mut alice, "message.state.changed").await;
        assert_eq!(
            changed,
            json!({"type": "message.state.changed", "messageId": message_id,
                   "conversationId": conversation, "state": state, "seq": 1})
        );
    }

    // The sender sees each recipient's receipt; the message-level state is the furthest.
    let path = format!("/v1/messages/{message_id}/status");
    let status: Value = system.get("alice", &path).await.json().await.unwrap();
    assert_eq!(status["state"], "read", "{status}");
    let recipients = status["recipients"].as_array().expect("recipients");
    assert_eq!(recipients.len(), 1, "{status}");
    assert_eq!(recipients[0]["userId"], "bob");
    assert_eq!(recipients[0]["state"], "read");
    let at = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().expect("timestamp"))
            .expect("rfc3339")
            .with_timezone(&chrono::Utc)
    };
    let (delivered_at, read_at, rows) = receipts::row(&system.pool, message, "bob").await;
    assert_eq!(rows, 1);
    assert_eq!(Some(at(&recipients[0]["deliveredAt"])), delivered_at);
    assert_eq!(Some(at(&recipients[0]["readAt"])), read_at);
    assert!(delivered_at <= read_at);
    // Others who may see the message keep the plain shape.
    let seen_by_bob: Value = system.get("bob", &path).await.json().await.unwrap();
    assert_eq!(seen_by_bob["state"], "sent");
    assert!(seen_by_bob.get("recipients").is_none(), "{seen_by_bob}");

    // Acknowledging again changes nothing: the same row, the same timestamps, no new frame.
    for state in ["read", "delivered"] {
        send_frame(
            &mut bob,
            json!({"type": "ack", "reqId": "again", "messageId": message_id, "state": state}),
        )
        .await;
        assert_eq!(next_frame(&mut bob).await["type"], "ack.ok");
    }
    // Past the stream's duplicate window, a repeat reaches the consumer: still nothing changes.
    for state in [
        hotpath_core::receipts::ReceiptState::Delivered,
        hotpath_core::receipts::ReceiptState::Read,
    ] {
        let repeat = hotpath_core::receipts::Receipt {
            message_id: message,
            conversation_id: conversation,
            user_id: "bob".into(),
            state,
            at: chrono::Utc::now(),
        };
        let recorded = hotpath_consumers::receipts::record(&system.pool, &repeat)
            .await
            .expect("recorded");
        match recorded {
            hotpath_consumers::receipts::Recorded::Changed { first, .. } => {
                assert!(first.is_empty(), "a repeat moved the state: {first:?}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        receipts::row(&system.pool, message, "bob").await,
        (delivered_at, read_at, 1)
    );
    assert_quiet(&mut alice).await;
}

/// Sends `content` as alice over HTTP and waits until she is told it is `sent` and every
/// recipient's socket got it; returns its id.
async fn sent_by_alice(
    system: &System,
    conversation: Uuid,
    content: &str,
    alice: &mut Socket,
    recipients: &mut [&mut Socket],
) -> Uuid {
    let (status, ack) = system.send("alice", text(conversation, content)).await;
    assert_eq!(status, 202, "{ack}");
    let id = ack["messageId"].as_str().expect("messageId").to_string();
    assert_eq!(
        state_changes(alice, 1, Duration::ZERO).await,
        [(id.clone(), "sent".to_string())]
    );
    for socket in recipients.iter_mut() {
        let new = next_of(socket, "message.new").await;
        assert_eq!(new["message"]["messageId"], id.as_str());
    }
    Uuid::parse_str(&id).expect("uuid")
}

/// What alice, the sender, reads on the status route of `message`: the message-level state,
/// and per recipient (userId, state, deliveredAt, readAt) in recipient order.
async fn receipts_seen_by_sender(
    system: &System,
    message: Uuid,
) -> (String, Vec<(String, String, Stamp, Stamp)>) {
    let path = format!("/v1/messages/{message}/status");
    let status: Value = system.get("alice", &path).await.json().await.expect("json");
    let text = |v: &Value| v.as_str().unwrap_or_else(|| panic!("{status}")).to_string();
    let stamp = |v: &Value| {
        v.as_str().map(|at| {
            chrono::DateTime::parse_from_rfc3339(at)
                .expect("rfc3339")
                .with_timezone(&chrono::Utc)
        })
    };
    let recipients = status["recipients"]
        .as_array()
        .unwrap_or_else(|| panic!("no recipients in {status}"))
        .iter()
        .map(|r| {
            (
                text(&r["userId"]),
                text(&r["state"]),
                stamp(&r["deliveredAt"]),
                stamp(&r["readAt"]),
            )
        })
        .collect();
    (text(&status["state"]), recipients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_group_the_sender_is_told_the_first_delivered_and_the_first_read_once_each() {
    let system = System::start().await;
    let js = system.jetstream().await;
    let partitions = system.config.partitions;
    let conversation = system
        .conversation("alice", "group", &["bob", "carol"])
        .await;
    let mut alice = connect(&system, &system.base, "alice").await;
    let mut bob = connect(&system, &system.base, "bob").await;
    let mut carol = connect(&system, &system.base, "carol").await;
    let message = sent_by_alice(
        &system,
        conversation,
        "m-1",
        &mut alice,
        &mut [&mut bob, &mut carol],
    )
    .await;

    // Both recipients got it: alice hears `delivered` once, not once per recipient.
    tokio::join!(
        acknowledge(&mut bob, message, "delivered"),
        acknowledge(&mut carol, message, "delivered"),
    );
    assert_eq!(
        state_changes(&mut alice, 1, Duration::ZERO).await,
        [state_change(message, "delivered")]
    );
    let wait_for = |user, state| receipts::wait_for(&system.pool, message, user, state, PATIENCE);
    let (bob_delivered, _) = wait_for("bob", ReceiptState::Delivered).await;
    let (carol_delivered, _) = wait_for("carol", ReceiptState::Delivered).await;
    assert_eq!(state_changes(&mut alice, 0, QUIET).await, []);
    assert_eq!(
        receipts_seen_by_sender(&system, message).await,
        (
            "delivered".to_string(),
            vec![
                ("bob".into(), "delivered".into(), bob_delivered, None),
                ("carol".into(), "delivered".into(), carol_delivered, None),
            ]
        )
    );

    // Carol reads it first: alice hears `read`; bob reading it too tells her nothing new.
    acknowledge(&mut carol, message, "read").await;
    assert_eq!(
        state_changes(&mut alice, 1, Duration::ZERO).await,
        [state_change(message, "read")]
    );
    acknowledge(&mut bob, message, "read").await;
    let bob_row = wait_for("bob", ReceiptState::Read).await;
    let carol_row = wait_for("carol", ReceiptState::Read).await;
    assert_eq!(state_changes(&mut alice, 0, QUIET).await, []);
    assert_eq!(bob_row.0, bob_delivered, "bob's delivered_at was set again");
    assert_eq!(
        carol_row.0, carol_delivered,
        "carol's delivered_at was set again"
    );
    assert_eq!(
        receipts_seen_by_sender(&system, message).await,
        (
            "read".to_string(),
            vec![
                ("bob".into(), "read".into(), bob_row.0, bob_row.1),
                ("carol".into(), "read".into(), carol_row.0, carol_row.1),
            ]
        )
    );

    // Repeats change nothing: acks again over the sockets (the stream collapses them), and
    // the same receipts once more past the stream's duplicate window (the consumer sees them).
    let rows_before = (
        receipts::row(&system.pool, message, "bob").await,
        receipts::row(&system.pool, message, "carol").await,
    );
    for socket in [&mut bob, &mut carol] {
        for state in ["delivered", "read"] {
            acknowledge(socket, message, state).await;
        }
    }
    for user in ["bob", "carol"] {
        for state in [ReceiptState::Delivered, ReceiptState::Read] {
            let repeat = receipts::receipt(message, conversation, user, state);
            receipts::publish_repeat(&js, partitions, &repeat).await;
        }
    }
    receipts::wait_until_settled(&js).await;
    assert_eq!(state_changes(&mut alice, 0, QUIET).await, []);
    assert_eq!(
        (
            receipts::row(&system.pool, message, "bob").await,
            receipts::row(&system.pool, message, "carol").await,
        ),
        rows_before
    );
    assert!(
        receipts::dead_letters(&js, Some(DlqSource::Receipts))
            .await
            .is_empty(),
        "a repeated receipt was dead-lettered"
    );

    // A `read` with no `delivered` before it: both recorded, both told, `delivered` first.
    let second = sent_by_alice(
        &system,
        conversation,
        "m-2",
        &mut alice,
        &mut [&mut bob, &mut carol],
    )
    .await;
    acknowledge(&mut bob, second, "read").await;
    assert_eq!(
        state_changes(&mut alice, 2, QUIET).await,
        [
            state_change(second, "delivered"),
            state_change(second, "read")
        ]
    );
    let (delivered_at, read_at) =
        receipts::wait_for(&system.pool, second, "bob", ReceiptState::Read, PATIENCE).await;
    assert!(delivered_at.is_some());
    assert_eq!(
        delivered_at, read_at,
        "one receipt, one time for both states"
    );
    assert_eq!(
        receipts_seen_by_sender(&system, second).await,
        (
            "read".to_string(),
            vec![
                ("bob".into(), "read".into(), delivered_at, read_at),
                ("carol".into(), "sent".into(), None, None),
            ]
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_receipt_is_recorded_once_its_message_is_persisted_and_strays_are_dead_lettered() {
    // A receipt that cannot be recorded yet is retried 1 s and then 2 s later, and moved to the
    // DLQ on its third delivery. (Two deliveries would leave the message one second to be
    // persisted after the consumers start: the test would then pass only on a fast machine.)
    const MAX_DELIVER: u64 = 3;
    let mut system = System::start_with(|config| config.poison_max_deliver = MAX_DELIVER).await;
    let js = system.jetstream().await;
    let partitions = system.config.partitions;
    let conversation = system
        .conversation("alice", "group", &["bob", "carol"])
        .await;
    let mut alice = connect(&system, &system.base, "alice").await;

    // With the consumers stopped the message is accepted and stays pending.
    system.stop_consumers().await;
    let (status, ack) = system.send("alice", text(conversation, "early")).await;
    assert_eq!(status, 202, "{ack}");
    assert_eq!(ack["state"], "pending");
    let message = Uuid::parse_str(ack["messageId"].as_str().expect("messageId")).expect("uuid");
    let path = format!("/v1/messages/{message}/status");
    let status: Value = system.get("alice", &path).await.json().await.expect("json");
    assert_eq!(status["state"], "pending", "{status}");

    // Bob's receipt reaches the stream before the message reaches Postgres (the gateway only
    // takes acks for persisted messages, but receipts must not depend on it), and so does one
    // for a message that never exists.
    let early = receipts::receipt(message, conversation, "bob", ReceiptState::Delivered);
    receipts::publish(&js, partitions, &early).await;
    let phantom = receipts::receipt(Uuid::new_v4(), conversation, "bob", ReceiptState::Delivered);
    receipts::publish(&js, partitions, &phantom).await;
    system.start_consumers().await;

    // Once the message is persisted, bob's receipt is recorded with its own time, and alice
    // hears `sent` and `delivered` (from two publishers, so in either order).
    let recorded = receipts::wait_for(
        &system.pool,
        message,
        "bob",
        ReceiptState::Delivered,
        PATIENCE,
    )
    .await;
    assert_eq!(recorded, (Some(early.at), None));
    let mut heard = state_changes(&mut alice, 2, Duration::ZERO).await;
    heard.sort();
    assert_eq!(
        heard,
        [
            state_change(message, "delivered"),
            state_change(message, "sent")
        ]
    );
    assert_eq!(
        receipts_seen_by_sender(&system, message).await,
        (
            "delivered".to_string(),
            vec![
                ("bob".into(), "delivered".into(), Some(early.at), None),
                ("carol".into(), "sent".into(), None, None),
            ]
        )
    );

    // Someone who is not a recipient acknowledges the (now persisted) message.
    let stranger = receipts::receipt(message, conversation, "mallory", ReceiptState::Read);
    receipts::publish(&js, partitions, &stranger).await;

    // Both strays end in the DLQ, once each, saying why: the phantom after MAX_DELIVER
    // deliveries, the stranger's at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while receipts::dead_letters(&js, Some(DlqSource::Receipts))
        .await
        .len()
        < 2
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    receipts::wait_until_settled(&js).await;
    let letters = receipts::dead_letters(&js, Some(DlqSource::Receipts)).await;
    let summary: Vec<(Option<Receipt>, Option<String>, Option<String>)> = letters
        .iter()
        .map(|l| {
            (
                Receipt::decode(&l.payload).ok(),
                l.reason.clone(),
                l.deliveries.clone(),
            )
        })
        .collect();
    assert_eq!(letters.len(), 2, "{summary:?}");
    for (receipt, reason, deliveries) in [
        (
            &phantom,
            "message is not persisted",
            MAX_DELIVER.to_string(),
        ),
        (&stranger, "user is not a recipient", "1".to_string()),
    ] {
        let letter = letters
            .iter()
            .find(|l| Receipt::decode(&l.payload).ok().as_ref() == Some(receipt))
            .unwrap_or_else(|| panic!("{receipt:?} is not in the DLQ: {summary:?}"));
        assert!(
            letter.reason.as_deref().is_some_and(|r| r.contains(reason)),
            "{receipt:?}: {summary:?}"
        );
        assert_eq!(letter.deliveries.as_deref(), Some(deliveries.as_str()));
        assert_eq!(letter.source_stream.as_deref(), Some("RECEIPTS"));
        let partition = hotpath_core::names::partition_of(&conversation.to_string(), partitions);
        assert_eq!(
            letter.source_subject,
            Some(hotpath_core::names::receipt_subject(partition))
        );
    }

    // Neither wrote a row, and alice was told nothing more.
    assert_eq!(
        receipts::row(&system.pool, message, "mallory").await,
        (None, None, 1)
    );
    assert_eq!(
        receipts::row(&system.pool, phantom.message_id, "bob").await,
        (None, None, 0)
    );
    assert_eq!(state_changes(&mut alice, 0, QUIET).await, []);
}

/// A token for `user` that expires `secs` seconds from now.
fn expiring_token(user: &str, secs: u64) -> String {
    hotpath_core::auth::mint_hs256_token(support::SECRET.as_bytes(), user, secs).expect("token")
}

/// The next frame that is not the gateway's `token.expiring` notice.
async fn next_besides_notice(socket: &mut Socket) -> Value {
    loop {
        let frame = next_frame(socket).await;
        if frame["type"] != "token.expiring" {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_is_closed_with_4001_when_its_token_expires_unless_its_user_refreshes_it() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "direct", &["bob"]).await;
    // Three of bob's sockets opened with one token, so they expire at the same second.
    let token = expiring_token("bob", 3);
    let mut lapsing = support::ws::open(&system.base, &token).await;
    let mut refreshed = support::ws::open(&system.base, &token).await;
    let mut refused = support::ws::open(&system.base, &token).await;

    // A refresh with bob's new token moves the socket's end; with anyone else's or a bad
    // one, nothing changes.
    send_frame(
        &mut refreshed,
        json!({"type": "refresh", "reqId": "r1", "token": system.token("bob")}),
    )
    .await;
    let answer = next_besides_notice(&mut refreshed).await;
    assert_eq!(answer["type"], "refreshed", "{answer}");
    assert_eq!(answer["reqId"], "r1");
    let expires_at = chrono::DateTime::parse_from_rfc3339(answer["expiresAt"].as_str().unwrap())
        .expect("expiresAt is a time");
    assert!(expires_at > chrono::Utc::now() + chrono::Duration::minutes(59));
    for (token, code) in [
        (system.token("alice"), "FORBIDDEN"),
        ("not a token".to_string(), "UNAUTHORIZED"),
    ] {
        send_frame(
            &mut refused,
            json!({"type": "refresh", "reqId": code, "token": token}),
        )
        .await;
        let answer = next_besides_notice(&mut refused).await;
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["reqId"], code);
        assert_eq!(answer["error"]["code"], code, "{answer}");
    }

    // The client is told before the end, then the socket is closed with 4001.
    let (frames, code) = support::ws::read_until_closed(&mut lapsing).await;
    assert_eq!(code, Some(4001), "{frames:?}");
    assert_eq!(
        frames.first().map(|f| f["type"].clone()),
        Some(json!("token.expiring")),
        "{frames:?}"
    );
    assert!(frames[0]["expiresAt"].is_string(), "{frames:?}");
    let (_, code) = support::ws::read_until_closed(&mut refused).await;
    assert_eq!(code, Some(4001));

    // Past the first expiry, the refreshed socket still works and receives.
    let (status, ack) = system
        .send("alice", text(conversation, "still there?"))
        .await;
    assert_eq!(status, 202, "{ack}");
    let new = next_of(&mut refreshed, "message.new").await;
    assert_eq!(new["message"]["content"], "still there?");
    ping(&mut refreshed).await;
    assert!(
        has_metric(
            &system.metrics().await,
            "websocket_connections_closed_total",
            "reason=\"token_expired\""
        ),
        "expiries are counted"
    );
}

/// How many messages `RECEIPTS` has ever stored (what work-queue retention may already have
/// removed included).
async fn receipts_stored(js: &jetstream::Context) -> u64 {
    let mut stream = js
        .get_stream(hotpath_core::names::RECEIPTS_STREAM)
        .await
        .expect("RECEIPTS");
    stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence
}

/// The next frame that answers one of the client's, live `message.new` frames skipped.
async fn next_answer(socket: &mut Socket) -> Value {
    loop {
        let frame = next_frame(socket).await;
        if frame["type"] != "message.new" {
            return frame;
        }
    }
}

/// Alice sends `count` messages to bob in a direct conversation; returns their ids once
/// they are persisted (bob, connecting after, may still get some of them live).
async fn persisted_for_bob(system: &System, count: usize) -> Vec<String> {
    let conversation = system.conversation("alice", "direct", &["bob"]).await;
    let ids = send_many(system, "alice", conversation, 1, count).await;
    assert_eq!(
        system.wait_for_messages(count as i64, PATIENCE).await,
        count as i64
    );
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeating_an_ack_a_thousand_times_puts_one_receipt_in_the_stream() {
    let system = System::start().await;
    let message = persisted_for_bob(&system, 1).await.remove(0);
    // As if every repeat came after the stream's duplicate window, which alone would
    // collapse repeats only within two minutes.
    let js = system.jetstream().await;
    let mut config = js
        .get_stream(hotpath_core::names::RECEIPTS_STREAM)
        .await
        .expect("RECEIPTS")
        .info()
        .await
        .expect("info")
        .config
        .clone();
    config.duplicate_window = Duration::from_millis(100);
    js.update_stream(config).await.expect("window shortened");
    let mut bob = connect(&system, &system.base, "bob").await;
    let before = receipts_stored(&js).await;

    // One read, then delivered (which read implies) and read again, a thousand acks in all.
    for i in 0..1000 {
        let state = if i % 2 == 0 { "read" } else { "delivered" };
        send_frame(
            &mut bob,
            json!({"type": "ack", "reqId": i.to_string(), "messageId": message, "state": state}),
        )
        .await;
    }
    for i in 0..1000 {
        let answer = next_answer(&mut bob).await;
        assert_eq!(answer, json!({"type": "ack.ok", "reqId": i.to_string()}));
    }

    assert_eq!(receipts_stored(&js).await - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_past_the_users_rate_are_refused_and_never_reach_the_stream() {
    let system = System::start_with(|config| {
        config.ack_rate_per_user = 1;
        config.ack_rate_burst = 10;
    })
    .await;
    let messages = persisted_for_bob(&system, 40).await;
    let js = system.jetstream().await;
    let mut bob = connect(&system, &system.base, "bob").await;
    let before = receipts_stored(&js).await;

    for (i, message) in messages.iter().enumerate() {
        send_frame(
            &mut bob,
            json!({"type": "ack", "reqId": i.to_string(), "messageId": message, "state": "delivered"}),
        )
        .await;
    }
    let (mut taken, mut refused) = (0u64, 0u64);
    for i in 0..messages.len() {
        let answer = next_answer(&mut bob).await;
        assert_eq!(answer["reqId"], i.to_string(), "{answer}");
        match answer["type"].as_str() {
            Some("ack.ok") => taken += 1,
            Some("error") => {
                assert_eq!(answer["error"]["code"], "RATE_LIMIT_EXCEEDED", "{answer}");
                let wait = answer["error"]["details"]["retryAfterSeconds"].as_u64();
                assert!(wait.is_some_and(|secs| secs >= 1), "{answer}");
                refused += 1;
            }
            _ => panic!("unexpected {answer}"),
        }
    }

    assert!(taken >= 10, "the burst is taken: {taken}");
    assert!(refused > 0, "a flood of 40 acks was taken whole");
    assert_eq!(receipts_stored(&js).await - before, taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sync_while_one_runs_is_refused_and_the_first_completes() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    send_many(&system, "alice", conversation, 1, 210).await;
    assert_eq!(system.wait_for_messages(210, PATIENCE).await, 210);
    // Fanout runs after persisting: once it has told (offline) bob of all 210, no live
    // `message.new` can reach the socket he opens next and come between the sync's frames.
    let told = Instant::now() + PATIENCE;
    while support::metric_sum(
        &system.metrics().await,
        "delivery_fanout_attempted_total",
        "recipient_status=\"offline\"",
    ) < 210.0
    {
        assert!(Instant::now() < told, "fanout told bob of 210 messages");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut bob = connect(&system, &system.base, "bob").await;

    // Holding the messages table keeps the first sync running for as long as the test likes.
    let mut lock = system.pool.begin().await.expect("transaction");
    sqlx::query("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    for (req_id, after_seq) in [("s1", 0), ("s2", 5)] {
        send_frame(
            &mut bob,
            json!({"type": "sync", "reqId": req_id, "conversationId": conversation, "afterSeq": after_seq}),
        )
        .await;
    }
    let refused = next_frame(&mut bob).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["reqId"], "s2");
    assert_eq!(refused["error"]["code"], "SYNC_IN_PROGRESS", "{refused}");
    lock.rollback().await.expect("unlocked");

    for seq in 1..=210 {
        assert_eq!(
            seq_and_content(&next_frame(&mut bob).await),
            (seq, format!("m-{seq}"))
        );
    }
    assert_eq!(
        next_frame(&mut bob).await,
        json!({"type": "sync.done", "reqId": "s1", "conversationId": conversation, "lastSeq": 210})
    );
    // Once one has ended, the next is taken.
    send_frame(
        &mut bob,
        json!({"type": "sync", "reqId": "s3", "conversationId": conversation, "afterSeq": 209}),
    )
    .await;
    assert_eq!(
        seq_and_content(&next_frame(&mut bob).await),
        (210, "m-210".into())
    );
    assert_eq!(next_frame(&mut bob).await["type"], "sync.done");
}
