//! A test's WebSocket client for `GET /v1/ws`: connect as a user, send frames, read frames.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::System;

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a test waits for a frame that should come.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn ws_url(base: &str, token: &str) -> String {
    format!(
        "{}/v1/ws?token={token}",
        base.replacen("http://", "ws://", 1)
    )
}

/// Opens a socket for `user` on the gateway at `base` and waits until the gateway serves it
/// (a ping answered means the socket is registered and its presence written).
pub async fn connect(system: &System, base: &str, user: &str) -> Socket {
    let (mut socket, _) = tokio_tungstenite::connect_async(ws_url(base, &system.token(user)))
        .await
        .expect("websocket opens");
    ping(&mut socket).await;
    socket
}

/// Pings and waits for the pong. Live frames that reach a just-registered socket first (the
/// fanout, state changes and receipts of messages sent before it connected) are passed over: a
/// reconnecting client catches up on them with `sync`.
pub async fn ping(socket: &mut Socket) {
    send_frame(socket, json!({"type": "ping", "reqId": "ready"})).await;
    let mut pong = next_frame(socket).await;
    while pong["type"] != "pong" {
        pong = next_frame(socket).await;
    }
    assert_eq!(pong, json!({"type": "pong", "reqId": "ready"}));
}

/// Pings and asserts that the pong is the very next frame: nothing else was on its way to the
/// socket.
pub async fn assert_quiet(socket: &mut Socket) {
    send_frame(socket, json!({"type": "ping", "reqId": "quiet"})).await;
    assert_eq!(
        next_frame(socket).await,
        json!({"type": "pong", "reqId": "quiet"})
    );
}

pub async fn send_frame(socket: &mut Socket, frame: Value) {
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .expect("frame sent");
}

/// The next JSON frame (pings and pongs of the WebSocket layer skipped).
pub async fn next_frame(socket: &mut Socket) -> Value {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(&text).expect("frames are JSON");
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("a frame arrives in time")
}

/// The next frame of `kind`, skipping others (a sender also sees its state changes).
pub async fn next_of(socket: &mut Socket, kind: &str) -> Value {
    loop {
        let frame = next_frame(socket).await;
        if frame["type"] == kind {
            return frame;
        }
    }
}

/// How long a test listens for a frame that must not come.
pub const QUIET: Duration = Duration::from_secs(2);

/// A `message.state.changed` as [`state_changes`] reports it: (messageId, state).
pub fn state_change(message: uuid::Uuid, state: &str) -> (String, String) {
    (message.to_string(), state.to_string())
}

/// The `message.state.changed` frames a sender's socket gets, as (messageId, state), other
/// frames skipped: read until `count` have arrived (panics if they do not within
/// [`PATIENCE`]), then for `quiet` more, so that one too many shows up in what is returned.
pub async fn state_changes(
    socket: &mut Socket,
    count: usize,
    quiet: Duration,
) -> Vec<(String, String)> {
    let mut changes = Vec::new();
    let mut deadline = tokio::time::Instant::now() + PATIENCE;
    let mut counted = false;
    loop {
        if !counted && changes.len() >= count {
            counted = true;
            deadline = tokio::time::Instant::now() + quiet;
        }
        let next = match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(next) => next,
            Err(_) if counted => return changes,
            Err(_) => panic!("{count} state changes expected within {PATIENCE:?}, got {changes:?}"),
        };
        let frame: Value = match next {
            Some(Ok(Message::Text(text))) => serde_json::from_str(&text).expect("frames are JSON"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a frame, got {other:?}"),
        };
        if frame["type"] == "message.state.changed" {
            let field = |name: &str| frame[name].as_str().unwrap_or_default().to_string();
            changes.push((field("messageId"), field("state")));
        }
    }
}

/// Acknowledges `message` with `state` (`delivered`, `read`) and waits for `ack.ok`, skipping
/// the live `message.new` frames that may come meanwhile.
pub async fn acknowledge(socket: &mut Socket, message: uuid::Uuid, state: &str) {
    send_frame(
        socket,
        json!({"type": "ack", "reqId": state, "messageId": message, "state": state}),
    )
    .await;
    loop {
        let answer = next_frame(socket).await;
        match answer["type"].as_str() {
            Some("message.new") => continue,
            Some("ack.ok") if answer["reqId"] == state => return,
            _ => panic!("{state} ack of {message} answered with {answer}"),
        }
    }
}

/// Opens a socket with `token` as it is, without waiting for anything.
pub async fn open(base: &str, token: &str) -> Socket {
    let (socket, _) = tokio_tungstenite::connect_async(ws_url(base, token))
        .await
        .expect("websocket opens");
    socket
}

/// Reads until the server closes the socket: the JSON frames that came first, and the close
/// code (`None` for a close without a frame, or a connection that just ended).
pub async fn read_until_closed(socket: &mut Socket) -> (Vec<Value>, Option<u16>) {
    let mut frames = Vec::new();
    let code = tokio::time::timeout(PATIENCE, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    frames.push(serde_json::from_str(&text).expect("frames are JSON"));
                }
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return None,
            }
        }
    })
    .await
    .expect("the server closes the socket in time");
    (frames, code)
}
