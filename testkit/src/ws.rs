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

pub async fn ping(socket: &mut Socket) {
    send_frame(socket, json!({"type": "ping", "reqId": "ready"})).await;
    let pong = next_frame(socket).await;
    assert_eq!(pong, json!({"type": "pong", "reqId": "ready"}));
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
