//! One WebSocket, from upgrade to close.
//!
//! Four tasks share the connection:
//! * the **reader** (this task) answers the client's frames in order, each as
//!   [`super::commands`] says: sends go through the same `accept` as `POST /v1/messages`, one
//!   at a time, so a client's messages are accepted in the order it sent them;
//! * the **writer** alone writes to the socket: live frames from the node (bounded queue,
//!   overflow ends the socket), replies and catch-up frames (bounded, the producer waits), and
//!   a ping every interval; it closes a socket the client stopped answering;
//! * the **catch-up** task serves `sync` requests, one at a time (see [`super::sync`]);
//! * the **expiry** task warns the client before its token expires and ends the connection
//!   when it does (see [`super::expiry`]).
//!
//! Whichever notices the end first records why in [`Ending`]; the others stop, and the writer
//! sends the matching close frame if the client can still be told.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hotpath_core::auth::Verified;
use hotpath_core::rejection::Rejection;
use tokio::sync::mpsc;

use super::close::{CloseReason, Ending};
use super::commands::Commands;
use super::expiry::{self, TokenLifetime};
use super::protocol;
use super::sync::{self, SyncSlot};
use crate::state::AppState;

/// Replies and catch-up frames waiting for the writer; their producers wait when it is full.
const REPLY_QUEUE: usize = 64;
/// Live frames written (then flushed) together when they are already waiting.
const WRITE_BATCH: usize = 64;
/// Longest time spent writing the last replies and the close frame to a closing socket.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// When the client was last heard from, in milliseconds since the socket opened.
#[derive(Clone)]
struct Heard {
    opened: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Heard {
    fn new() -> Heard {
        Heard {
            opened: Instant::now(),
            last_ms: Arc::default(),
        }
    }

    fn now(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }
}

/// Runs one authenticated socket until it closes: its user's, until its token expires.
pub async fn serve(socket: WebSocket, state: AppState, token: Verified) {
    let Verified {
        user_id,
        expires_at,
    } = token;
    let node = state.sockets.clone();
    let (outbound_tx, outbound_rx) = mpsc::channel(state.config.ws_outbound_queue.max(1));
    let ending = Ending::default();
    let registration = match node.register(&user_id, outbound_tx, ending.clone()).await {
        Ok(registration) => registration,
        Err(error) => {
            tracing::warn!(
                user_id,
                error = format!("{error:#}"),
                "cannot register socket"
            );
            let mut socket = socket;
            let close = CloseFrame {
                code: 1011,
                reason: "delivery unavailable".into(),
            };
            let _ = socket.send(Message::Close(Some(close))).await;
            return;
        }
    };
    node.metrics().opened();
    tracing::debug!(user_id, "socket opened");

    let (sink, stream) = socket.split();
    let (replies_tx, replies_rx) = mpsc::channel(REPLY_QUEUE);
    // One sync runs at a time (the slot), and the catch-up task takes it at once.
    let (syncs_tx, syncs_rx) = mpsc::channel(1);
    let heard = Heard::new();
    let (lifetime, expiry) = TokenLifetime::new(expires_at);

    let writer = tokio::spawn(write(
        sink,
        outbound_rx,
        replies_rx,
        ending.clone(),
        heard.clone(),
        state.clone(),
    ));
    tokio::spawn(sync::serve(
        state.clone(),
        user_id.clone(),
        syncs_rx,
        replies_tx.clone(),
        ending.clone(),
    ));
    tokio::spawn(expiry::enforce(
        expiry,
        state.config.ws_expiry_notice(),
        replies_tx.clone(),
        ending.clone(),
    ));
    let reader = Reader {
        state: &state,
        user_id: &user_id,
        commands: Commands {
            state: &state,
            user_id: &user_id,
            syncs: syncs_tx,
            sync_slot: SyncSlot::default(),
            lifetime,
        },
        replies: replies_tx,
        ending: ending.clone(),
        heard,
    };
    reader.read(stream).await;
    let _ = writer.await;

    let reason = ending.reason();
    node.metrics().closed(reason);
    tracing::debug!(user_id, reason = reason.label(), "socket closed");
    drop(registration);
}

/// The socket's reading side: frames in, their answers queued for the writer.
struct Reader<'a> {
    state: &'a AppState,
    user_id: &'a str,
    commands: Commands<'a>,
    replies: mpsc::Sender<Utf8Bytes>,
    ending: Ending,
    heard: Heard,
}

impl Reader<'_> {
    async fn read(&self, mut stream: SplitStream<WebSocket>) {
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                () = self.ending.ended() => return,
            };
            self.heard.now();
            match next {
                Some(Ok(Message::Text(text))) => {
                    if let Some(reply) = self.commands.answer(&text).await {
                        self.reply(reply).await;
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    let rejection = Rejection::InvalidSchema {
                        message: "frames must be JSON text, not binary".into(),
                        details: serde_json::json!({}),
                    };
                    self.reply(protocol::error(None, &rejection)).await;
                }
                // Pings are answered by the WebSocket layer; pongs only prove liveness.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None => {
                    self.ending.end(CloseReason::ClientClosed);
                    return;
                }
                Some(Err(error)) => {
                    // The WebSocket layer refuses frames over its hard limit (a multiple of the
                    // body limit) before buffering them; the stream cannot go on after that.
                    let too_big = matches!(
                        std::error::Error::source(&error)
                            .and_then(|e| e.downcast_ref::<tungstenite::Error>()),
                        Some(tungstenite::Error::Capacity(_))
                    );
                    if too_big {
                        let limit = self.state.config.max_body_bytes;
                        let rejection = Rejection::PayloadTooLarge { limit_bytes: limit };
                        self.reply(protocol::error(None, &rejection)).await;
                        self.ending.end(CloseReason::MessageTooBig);
                    } else {
                        tracing::debug!(user_id = self.user_id, %error, "socket read failed");
                        self.ending.end(CloseReason::ConnectionError);
                    }
                    return;
                }
            }
        }
    }

    /// Queues a reply for the writer, waiting for room unless the connection ends first.
    async fn reply(&self, frame: Utf8Bytes) {
        tokio::select! {
            _ = self.replies.send(frame) => {}
            () = self.ending.ended() => {}
        }
    }
}

/// Writes everything the socket is sent, and the heartbeat, until the connection ends; then
/// the close frame.
async fn write(
    mut sink: SplitSink<WebSocket, Message>,
    mut outbound: mpsc::Receiver<Utf8Bytes>,
    mut replies: mpsc::Receiver<Utf8Bytes>,
    ending: Ending,
    heard: Heard,
    state: AppState,
) {
    let shutdown = state.sockets.shutdown().clone();
    let interval = state.config.ws_ping_interval();
    let heartbeat_timeout = state.config.ws_heartbeat_timeout();
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Live frames before replies: a long catch-up must not starve the live queue into
        // overflowing.
        let message = tokio::select! {
            biased;
            () = ending.ended() => break,
            () = shutdown.cancelled() => {
                ending.end(CloseReason::ServerShutdown);
                break;
            }
            _ = heartbeat.tick() => {
                if heard.silent_for() > heartbeat_timeout {
                    ending.end(CloseReason::HeartbeatTimeout);
                    break;
                }
                Message::Ping(Bytes::new())
            }
            Some(frame) = outbound.recv() => Message::Text(frame),
            Some(frame) = replies.recv() => Message::Text(frame),
        };
        let written = write_batch(&mut sink, message, &mut outbound);
        // A client that stops reading blocks the write; the end (queue overflow, shutdown)
        // must still get through. A write that cannot finish within the heartbeat timeout
        // means the client stopped reading, even if no more frames come to overflow its queue.
        tokio::select! {
            biased;
            () = ending.ended() => break,
            () = shutdown.cancelled() => {
                ending.end(CloseReason::ServerShutdown);
                break;
            }
            written = written => if written.is_err() {
                ending.end(CloseReason::ConnectionError);
                break;
            },
            () = tokio::time::sleep(heartbeat_timeout) => {
                ending.end(CloseReason::HeartbeatTimeout);
                break;
            }
        }
    }

    close(sink, replies, ending.reason()).await;
}

/// Writes `first` and the live frames already waiting behind it (up to [`WRITE_BATCH`]) in one
/// flush. A client that stops reading blocks this; the caller bounds it.
async fn write_batch(
    sink: &mut SplitSink<WebSocket, Message>,
    first: Message,
    outbound: &mut mpsc::Receiver<Utf8Bytes>,
) -> Result<(), axum::Error> {
    sink.feed(first).await?;
    for _ in 0..WRITE_BATCH {
        let Ok(frame) = outbound.try_recv() else {
            break;
        };
        sink.feed(Message::Text(frame)).await?;
    }
    sink.flush().await
}

/// Ends the socket for `reason`: the replies still queued when the reason lets them out, then
/// the close frame, all within [`CLOSE_TIMEOUT`].
async fn close(
    mut sink: SplitSink<WebSocket, Message>,
    mut replies: mpsc::Receiver<Utf8Bytes>,
    reason: CloseReason,
) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if reason.flushes_replies() {
            while let Ok(frame) = replies.try_recv() {
                if sink.send(Message::Text(frame)).await.is_err() {
                    return;
                }
            }
        }
        if let Some((code, text)) = reason.close_frame() {
            let close = CloseFrame {
                code,
                reason: text.into(),
            };
            let _ = sink.send(Message::Close(Some(close))).await;
        }
        let _ = sink.close().await;
    })
    .await;
}
