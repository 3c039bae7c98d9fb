//! `--transport ws`: every sending user keeps one WebSocket (`GET /v1/ws`) and sends each
//! message as a `send` frame (`docs/websocket.md`), answered by `send.ack` or `error` with the
//! frame's `reqId`.
//!
//! * **Set-up.** Every user's socket is opened, and has answered a ping, before any phase
//!   starts, so no phase measures a handshake.
//! * **Per socket.** A writer task alone writes to the socket (frames queued by the sends,
//!   flushed together when several wait), and a reader task reads everything that arrives and
//!   routes each `send.ack` / `error` to the send waiting for its `reqId` (a map of oneshot
//!   senders, [`Waiting`]). The rest is read and dropped: a sender's socket also gets
//!   `message.new` for its conversations and `message.state.changed` for its own messages,
//!   as a real client's does, so with this transport every sender is online and the delivery
//!   side fans out to all of them (counted in [`SenderSockets::other_frames`]).
//! * **Answers.** `send.ack` counts as "202"; an `error` counts as the HTTP status of its
//!   code ([`status_of`]), so both transports fill the same outcome keys. A send is bounded by
//!   [`REQUEST_TIMEOUT`] from queueing its frame to its answer (`timeout`); a socket that ends
//!   fails the sends waiting on it (`transport-error`), and the user's next send opens a new
//!   socket (counted in [`SenderSockets::reconnects`]; failing to: `connect-error`). Nothing
//!   waits on a dead socket.
//!
//! **The gateway answers one socket's frames one at a time** (`gateway/src/socket/
//! connection.rs`: its reader task runs each frame, a `send` through the same `accept` as
//! `POST /v1/messages`, before it reads the next, which is what keeps a client's messages in
//! the order it sent them). So a socket has effectively one send in flight; frames written
//! behind it wait in the socket, and that wait is part of their latency, as it would be for a
//! client. The phases never need more than one per socket at a time: users take turns
//! (message `seq` is user `seq mod users`), so in the capacity phase the at most
//! `--concurrency` sends in flight belong to distinct users while users ≥ concurrency (the
//! default is four users per worker), and in the latency phase a user's sends are `users`
//! sends apart (at most 25 msg/s per user by default, 40 ms apart): one queues behind the
//! previous only when that one took longer, which is then rightly counted as latency.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::{self, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use super::Answer;
use crate::delivery::{self, Socket};
use crate::load::REQUEST_TIMEOUT;
use crate::stats::Outcome;
use crate::workload::{Message, Workload};

/// Sockets opened at once during set-up.
const CONNECT_CONCURRENCY: usize = 32;
/// Longest wait for one socket to open and answer its first ping.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames waiting for a socket's writer; a send waits for room (within its timeout).
const FRAME_QUEUE: usize = 256;
/// Longest wait for the sockets' close frames at the end of the run.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the sending sockets did, for the report.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SenderSockets {
    /// One per sending user.
    pub sockets: usize,
    /// Time to open them all during set-up.
    pub connect_secs: f64,
    /// Sockets opened again after one ended during the run.
    pub reconnects: u64,
    /// Frames that were not answers to sends (`message.new`, `message.state.changed`, …):
    /// the delivery side's fanout to the senders.
    pub other_frames: u64,
}

/// One socket per user of the workload, by user index.
pub struct Sockets {
    users: Vec<UserSocket>,
    connect_secs: f64,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    reconnects: AtomicU64,
    other_frames: AtomicU64,
}

struct UserSocket {
    url: String,
    /// The open connection; replaced by the next send after it ended.
    current: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

/// One open socket: its frame queue, its waiting sends, and its writer's stop signal.
struct Connection {
    frames: mpsc::Sender<String>,
    waiting: Arc<Waiting>,
    stop: CancellationToken,
    /// Cancelled when the writer is done (close frame sent, or the socket is gone).
    written_off: CancellationToken,
}

impl Sockets {
    /// Opens every user's socket (waiting for each to answer a ping).
    pub async fn connect(gateway: &str, workload: &Workload) -> anyhow::Result<Sockets> {
        let counters = Arc::new(Counters::default());
        let urls: Vec<String> = workload
            .users
            .iter()
            .map(|user| delivery::socket_url(gateway, &user.token))
            .collect();
        tracing::info!(sockets = urls.len(), "opening a WebSocket per sending user");
        let started = Instant::now();
        let connections: Vec<Arc<Connection>> =
            futures::stream::iter(urls.iter().zip(&workload.users).map(|(url, user)| {
                let counters = counters.clone();
                async move {
                    Connection::open(url, counters)
                        .await
                        .with_context(|| format!("opening the sending socket of {}", user.id))
                }
            }))
            .buffered(CONNECT_CONCURRENCY)
            .try_collect()
            .await?;
        let connect_secs = started.elapsed().as_secs_f64();
        tracing::info!(
            sockets = connections.len(),
            connect_secs,
            "all sending sockets open"
        );
        let users = urls
            .into_iter()
            .zip(connections)
            .map(|(url, connection)| UserSocket {
                url,
                current: tokio::sync::Mutex::new(Some(connection)),
            })
            .collect();
        Ok(Sockets {
            users,
            connect_secs,
            counters,
        })
    }

    /// Sends `message` on its user's socket and waits for the answer to its `reqId`.
    pub async fn send(&self, message: &Message<'_>) -> Answer {
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(message))
            .await
            .unwrap_or_else(|_| Answer::failed(Outcome::Timeout))
    }

    async fn exchange(&self, message: &Message<'_>) -> Answer {
        let connection = match self.connection(message.user_index).await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::debug!(error = format!("{error:#}"), "sending socket not reopened");
                return Answer::failed(Outcome::Connect);
            }
        };
        let Some(mut pending) = Pending::register(&connection.waiting) else {
            return Answer::failed(Outcome::Transport);
        };
        let frame = message.send_frame(&pending.id.to_string());
        if connection.frames.send(frame).await.is_err() {
            return Answer::failed(Outcome::Transport);
        }
        pending.answer().await
    }

    /// The user's open connection, or a new one if the last one ended.
    async fn connection(&self, user: usize) -> anyhow::Result<Arc<Connection>> {
        let socket = &self.users[user];
        let mut current = socket.current.lock().await;
        if let Some(connection) = current.as_ref()
            && connection.waiting.is_open()
        {
            return Ok(connection.clone());
        }
        self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        let connection = Connection::open(&socket.url, self.counters.clone()).await?;
        *current = Some(connection.clone());
        Ok(connection)
    }

    pub fn figures(&self) -> SenderSockets {
        SenderSockets {
            sockets: self.users.len(),
            connect_secs: self.connect_secs,
            reconnects: self.counters.reconnects.load(Ordering::Relaxed),
            other_frames: self.counters.other_frames.load(Ordering::Relaxed),
        }
    }

    /// Closes every socket (a close frame each), waiting at most [`CLOSE_TIMEOUT`].
    pub async fn close(&self) {
        let mut connections = Vec::with_capacity(self.users.len());
        for socket in &self.users {
            connections.extend(socket.current.lock().await.take());
        }
        for connection in &connections {
            connection.stop.cancel();
        }
        let written_off = connections.iter().map(|c| c.written_off.cancelled());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, futures::future::join_all(written_off)).await;
    }
}

impl Connection {
    /// Opens a socket at `url` and starts its writer and reader.
    async fn open(url: &str, counters: Arc<Counters>) -> anyhow::Result<Arc<Connection>> {
        let socket = tokio::time::timeout(CONNECT_TIMEOUT, delivery::open(url))
            .await
            .context("the socket was not ready in time")??;
        let (sink, stream) = socket.split();
        let (frames, queue) = mpsc::channel(FRAME_QUEUE);
        let connection = Arc::new(Connection {
            frames,
            waiting: Arc::new(Waiting::default()),
            stop: CancellationToken::new(),
            written_off: CancellationToken::new(),
        });
        tokio::spawn(write(sink, queue, connection.clone()));
        tokio::spawn(read(stream, connection.waiting.clone(), counters));
        Ok(connection)
    }
}

/// The socket's writer: queued frames out, several per flush when they wait, until the run
/// stops it or the socket ends; then the close frame.
async fn write(
    mut sink: SplitSink<Socket, tungstenite::Message>,
    mut queue: mpsc::Receiver<String>,
    connection: Arc<Connection>,
) {
    let waiting = &connection.waiting;
    loop {
        let frame = tokio::select! {
            () = connection.stop.cancelled() => break,
            () = waiting.ended.cancelled() => break,
            frame = queue.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
        };
        if write_batch(&mut sink, frame, &mut queue).await.is_err() {
            break;
        }
    }
    waiting.end();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close()).await;
    connection.written_off.cancel();
}

async fn write_batch(
    sink: &mut SplitSink<Socket, tungstenite::Message>,
    first: String,
    queue: &mut mpsc::Receiver<String>,
) -> Result<(), tungstenite::Error> {
    sink.feed(tungstenite::Message::Text(first.into())).await?;
    while let Ok(frame) = queue.try_recv() {
        sink.feed(tungstenite::Message::Text(frame.into())).await?;
    }
    sink.flush().await
}

/// The socket's reader: every frame is read (so the gateway's queue for it never fills);
/// answers go to their sends, the rest is counted and dropped.
async fn read(mut stream: SplitStream<Socket>, waiting: Arc<Waiting>, counters: Arc<Counters>) {
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            () = waiting.ended.cancelled() => break,
        };
        match next {
            Some(Ok(tungstenite::Message::Text(text))) => {
                if !waiting.route(text) {
                    counters.other_frames.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some(Ok(tungstenite::Message::Close(_)) | Err(_)) | None => break,
            // Pings are answered by the WebSocket layer while we read.
            Some(Ok(_)) => {}
        }
    }
    waiting.end();
}

/// The sends of one socket waiting for their answers, by `reqId`.
struct Waiting {
    /// `None` once the socket ended: dropping the senders fails every waiting send.
    pending: Mutex<Option<HashMap<u64, oneshot::Sender<Answer>>>>,
    next_id: AtomicU64,
    /// Cancelled when the socket ended (either task noticed).
    ended: CancellationToken,
}

impl Default for Waiting {
    fn default() -> Waiting {
        Waiting {
            pending: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(0),
            ended: CancellationToken::new(),
        }
    }
}

/// An answer frame: only the fields the routing reads (serde skips the rest).
#[derive(Deserialize)]
struct Reply<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(rename = "reqId", borrow)]
    req_id: Option<&'a str>,
    #[serde(borrow)]
    error: Option<ErrorBody<'a>>,
}

#[derive(Deserialize)]
struct ErrorBody<'a> {
    code: &'a str,
    details: Option<ErrorDetails>,
}

#[derive(Deserialize)]
struct ErrorDetails {
    #[serde(rename = "retryAfterSeconds")]
    retry_after_seconds: Option<serde::de::IgnoredAny>,
}

impl Waiting {
    fn is_open(&self) -> bool {
        !self.ended.is_cancelled()
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Option<HashMap<u64, oneshot::Sender<Answer>>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fails every waiting send and refuses new ones.
    fn end(&self) {
        self.pending().take();
        self.ended.cancel();
    }

    /// Gives a `send.ack` or `error` frame to the send waiting for its `reqId`; false for any
    /// other frame (and for an answer nobody waits for any more: its send timed out).
    fn route(&self, text: Utf8Bytes) -> bool {
        // Most frames are fanout (`message.new`, state changes), which carry no `reqId`: a
        // substring search is cheaper than parsing them.
        if !text.contains("\"reqId\"") {
            return false;
        }
        let Ok(reply) = serde_json::from_str::<Reply<'_>>(&text) else {
            return false;
        };
        let outcome = match (reply.kind, &reply.error) {
            ("send.ack", _) => Outcome::Status(202),
            ("error", Some(error)) => {
                let retry_after = error
                    .details
                    .as_ref()
                    .is_some_and(|d| d.retry_after_seconds.is_some());
                status_of(error.code, retry_after).map_or(Outcome::Unrecognised, Outcome::Status)
            }
            _ => return false,
        };
        let Some(id) = reply.req_id.and_then(|id| id.parse::<u64>().ok()) else {
            return false;
        };
        let Some(waiter) = self.pending().as_mut().and_then(|p| p.remove(&id)) else {
            return false;
        };
        let accepted = outcome.is_accepted().then(|| Bytes::from(text));
        // A send that gave up waiting dropped its receiver; nothing is owed to it.
        let _ = waiter.send(Answer { outcome, accepted });
        true
    }
}

/// One send waiting for its answer; forgotten when dropped (answered, timed out or failed).
struct Pending<'a> {
    waiting: &'a Waiting,
    id: u64,
    reply: oneshot::Receiver<Answer>,
}

impl<'a> Pending<'a> {
    /// A new `reqId` and its waiter; `None` when the socket has ended.
    fn register(waiting: &'a Waiting) -> Option<Pending<'a>> {
        let id = waiting.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, reply) = oneshot::channel();
        waiting.pending().as_mut()?.insert(id, tx);
        Some(Pending { waiting, id, reply })
    }

    /// The answer; `transport-error` when the socket ended first.
    async fn answer(&mut self) -> Answer {
        (&mut self.reply)
            .await
            .unwrap_or_else(|_| Answer::failed(Outcome::Transport))
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(pending) = self.waiting.pending().as_mut() {
            pending.remove(&self.id);
        }
    }
}

/// The HTTP status of an `error` frame's code: the frame carries the code and not the status,
/// so this is `Rejection::status` (`core/src/rejection.rs`) read backwards. `ENQUEUE_FAILED`
/// is the code of two rejections: the stream unavailable for now (503, with
/// `retryAfterSeconds`) and an unexpected failure (500, without). `None` for a code the
/// gateway does not give.
fn status_of(code: &str, retry_after: bool) -> Option<u16> {
    Some(match code {
        "INVALID_SCHEMA"
        | "MISSING_REQUIRED_FIELD"
        | "INVALID_FIELD_TYPE"
        | "FIELD_TOO_LONG"
        | "INVALID_RECIPIENT" => 400,
        "UNAUTHORIZED" => 401,
        "FORBIDDEN" | "NOT_CONVERSATION_MEMBER" => 403,
        "CONVERSATION_NOT_FOUND"
        | "MESSAGE_NOT_FOUND"
        | "DEVICE_NOT_FOUND"
        | "BLOCK_NOT_FOUND"
        | "NOT_FOUND" => 404,
        "METHOD_NOT_ALLOWED" => 405,
        "REQUEST_TIMEOUT" => 408,
        "CONVERSATION_INACTIVE"
        | "USER_BLOCKED"
        | "IDEMPOTENCY_KEY_REUSED"
        | "CONVERSATION_FULL"
        | "SYNC_IN_PROGRESS" => 409,
        "PAYLOAD_TOO_LARGE" => 413,
        "RATE_LIMIT_EXCEEDED" => 429,
        "ENQUEUE_FAILED" if retry_after => 503,
        "ENQUEUE_FAILED" | "INTERNAL_ERROR" => 500,
        "BACKLOG_FULL" | "SERVICE_UNAVAILABLE" => 503,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use hotpath_core::rejection::{PolicyCode, Rejection};
    use serde_json::json;

    use super::*;

    fn frame(value: serde_json::Value) -> Utf8Bytes {
        value.to_string().into()
    }

    #[tokio::test]
    async fn answers_reach_the_send_waiting_for_their_req_id_in_any_order() {
        let waiting = Waiting::default();
        let mut first = Pending::register(&waiting).expect("open");
        let mut second = Pending::register(&waiting).expect("open");
        let mut third = Pending::register(&waiting).expect("open");
        let message_id = uuid::Uuid::new_v4();

        let other = frame(json!({"type": "message.new", "message": {"content": "hi"}}));
        assert!(!waiting.route(other), "a fanout frame answers no send");
        let rate_limited = Rejection::RateLimitExceeded {
            retry_after_secs: 1,
        };
        let mut error = rate_limited.body();
        error["type"] = "error".into();
        error["reqId"] = third.id.to_string().into();
        assert!(waiting.route(frame(error)));
        let ack =
            json!({"type": "send.ack", "reqId": first.id.to_string(), "messageId": message_id});
        assert!(waiting.route(frame(ack)));
        let unknown = json!({"type": "error", "reqId": second.id.to_string(),
                             "error": {"code": "NO_SUCH_CODE", "message": "?", "details": {}}});
        assert!(waiting.route(frame(unknown)));

        let accepted = first.answer().await;
        assert_eq!(accepted.outcome, Outcome::Status(202));
        let body: serde_json::Value =
            serde_json::from_slice(&accepted.accepted.expect("the ack's body")).expect("json");
        assert_eq!(body["messageId"], message_id.to_string());
        assert_eq!(second.answer().await.outcome, Outcome::Unrecognised);
        let refused = third.answer().await;
        assert_eq!(refused.outcome, Outcome::Status(429));
        assert!(refused.accepted.is_none());
    }

    #[tokio::test]
    async fn a_socket_that_ends_fails_its_waiting_sends_and_takes_no_more() {
        let waiting = Waiting::default();
        let mut pending = Pending::register(&waiting).expect("open");
        let late = json!({"type": "send.ack", "reqId": "99"});
        assert!(!waiting.route(frame(late)), "nobody waits for reqId 99");
        waiting.end();
        assert_eq!(pending.answer().await.outcome, Outcome::Transport);
        assert!(Pending::register(&waiting).is_none());
        assert!(!waiting.is_open());
    }

    #[test]
    fn a_dropped_send_is_forgotten() {
        let waiting = Waiting::default();
        let pending = Pending::register(&waiting).expect("open");
        let id = pending.id;
        drop(pending);
        let ack = json!({"type": "send.ack", "reqId": id.to_string()});
        assert!(!waiting.route(frame(ack)));
    }

    /// Every rejection the gateway can give, as its `error` frame carries it, maps to the
    /// status HTTP would have answered with.
    #[tokio::test]
    async fn error_codes_map_to_the_gateways_statuses() {
        let mut rejections = vec![
            Rejection::InvalidSchema {
                message: "m".into(),
                details: json!({}),
            },
            Rejection::MissingRequiredField { field: "f".into() },
            Rejection::InvalidFieldType {
                field: "f".into(),
                expected: "e".into(),
            },
            Rejection::FieldTooLong {
                field: "f".into(),
                max: 1,
                actual: 2,
            },
            Rejection::InvalidRecipient {
                recipient_id: "r".into(),
                reason: "x".into(),
            },
            Rejection::Unauthorized { reason: "x".into() },
            Rejection::Forbidden { reason: "x".into() },
            Rejection::NotConversationMember {
                user_id: "u".into(),
                conversation_id: "c".into(),
            },
            Rejection::ConversationNotFound {
                conversation_id: "c".into(),
            },
            Rejection::ConversationInactive {
                conversation_id: "c".into(),
            },
            Rejection::UserBlocked {
                user_id: "u".into(),
                other_user_id: "o".into(),
            },
            Rejection::IdempotencyKeyReused {
                original_message_id: uuid::Uuid::nil(),
            },
            Rejection::ConversationFull {
                max_members: 2,
                conversation_id: None,
            },
            Rejection::SyncInProgress,
            Rejection::MessageNotFound {
                message_id: "m".into(),
            },
            Rejection::DeviceNotFound,
            Rejection::BlockNotFound {
                user_id: "u".into(),
            },
            Rejection::RouteNotFound,
            Rejection::MethodNotAllowed {
                method: "PUT".into(),
            },
            Rejection::PayloadTooLarge { limit_bytes: 1 },
            Rejection::RequestTimeout { timeout_secs: 1 },
            Rejection::RateLimitExceeded {
                retry_after_secs: 1,
            },
            Rejection::EnqueueUnavailable {
                reason: "r".into(),
                retry_after_secs: 1,
            },
            Rejection::BacklogFull {
                backlog_bytes: 1,
                backlog_messages: 1,
                max_bytes: 1,
                max_messages: 1,
                retry_after_secs: 1,
            },
            Rejection::EnqueueFailed { reason: "r".into() },
            Rejection::ServiceUnavailable {
                reason: "r".into(),
                retry_after_secs: 1,
            },
            Rejection::Internal { reason: "r".into() },
        ];
        rejections.extend(PolicyCode::ALL.into_iter().map(|code| Rejection::Policy {
            code,
            message: "m".into(),
            details: json!({}),
        }));
        for rejection in rejections {
            covered(&rejection);
            let waiting = Waiting::default();
            let mut pending = Pending::register(&waiting).expect("open");
            let mut error = rejection.body();
            error["type"] = "error".into();
            error["reqId"] = pending.id.to_string().into();
            assert!(waiting.route(frame(error)));
            let outcome = pending.answer().await.outcome;
            assert_eq!(
                outcome,
                Outcome::Status(rejection.status()),
                "{rejection:?}"
            );
        }
    }

    /// Fails to compile when a rejection is added: add it to the list above, and its code to
    /// [`status_of`].
    fn covered(rejection: &Rejection) {
        match rejection {
            Rejection::InvalidSchema { .. }
            | Rejection::MissingRequiredField { .. }
            | Rejection::InvalidFieldType { .. }
            | Rejection::FieldTooLong { .. }
            | Rejection::InvalidRecipient { .. }
            | Rejection::Unauthorized { .. }
            | Rejection::Forbidden { .. }
            | Rejection::NotConversationMember { .. }
            | Rejection::ConversationNotFound { .. }
            | Rejection::ConversationInactive { .. }
            | Rejection::UserBlocked { .. }
            | Rejection::IdempotencyKeyReused { .. }
            | Rejection::ConversationFull { .. }
            | Rejection::SyncInProgress
            | Rejection::MessageNotFound { .. }
            | Rejection::DeviceNotFound
            | Rejection::BlockNotFound { .. }
            | Rejection::RouteNotFound
            | Rejection::MethodNotAllowed { .. }
            | Rejection::PayloadTooLarge { .. }
            | Rejection::RequestTimeout { .. }
            | Rejection::RateLimitExceeded { .. }
            | Rejection::EnqueueUnavailable { .. }
            | Rejection::BacklogFull { .. }
            | Rejection::EnqueueFailed { .. }
            | Rejection::ServiceUnavailable { .. }
            | Rejection::Policy { .. }
            | Rejection::Internal { .. } => {}
        }
    }
}
