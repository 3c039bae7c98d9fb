//! `sync`: catching a socket up from Postgres.
//!
//! After a (re)connect a client asks for every message of a conversation after the last seq it
//! has; the gateway reads them from Postgres a page at a time and writes them as `message.new`
//! frames, then `sync.done`. Live frames keep flowing meanwhile, so around the seam a message
//! may arrive both ways: clients deduplicate by (conversationId, seq).
//!
//! A socket runs one sync at a time, on a task of its own, so a long catch-up never holds up
//! the socket's sends or pings, and each page waits for room in the socket's reply queue: a
//! catch-up is paced by the client's reading, never buffered whole. A `sync` that arrives
//! while another runs is refused with `SYNC_IN_PROGRESS` rather than queued: whatever the
//! client sends, a socket holds at most one catch-up's worth of Postgres reads and reply
//! frames, and a client that wants several conversations sends the next `sync` after the
//! previous one's `sync.done` (or `error`). The socket's [`SyncSlot`] is free again just before
//! that last frame is queued, so a client that waits for it is never refused.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use hotpath_core::events::{DeliveredMessage, Event};
use hotpath_core::rejection::Rejection;
use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use uuid::Uuid;

use super::close::Ending;
use super::protocol;
use crate::http::db_error;
use crate::routes::conversations::member_of;
use crate::state::AppState;
use crate::store::messages;

/// Messages read from Postgres per query.
const PAGE: i64 = 200;

/// The one sync a socket may run at a time.
pub struct SyncSlot(Arc<Semaphore>);

impl Default for SyncSlot {
    fn default() -> SyncSlot {
        SyncSlot(Arc::new(Semaphore::new(1)))
    }
}

impl SyncSlot {
    /// The slot, held until the permit is dropped, unless a sync holds it.
    pub fn take(&self) -> Result<OwnedSemaphorePermit, Rejection> {
        self.0
            .clone()
            .try_acquire_owned()
            .map_err(|_| Rejection::SyncInProgress)
    }
}

#[derive(Debug)]
pub struct SyncRequest {
    pub req_id: Option<String>,
    pub conversation_id: String,
    pub after_seq: i64,
    /// The socket's [`SyncSlot`], held while this sync runs.
    pub running: OwnedSemaphorePermit,
}

/// The reply queue went away: the connection is ending.
struct Disconnected;

/// Serves the socket's sync requests in order until the connection ends.
pub async fn serve(
    state: AppState,
    user_id: String,
    mut requests: mpsc::Receiver<SyncRequest>,
    replies: mpsc::Sender<Utf8Bytes>,
    ending: Ending,
) {
    loop {
        let request = tokio::select! {
            request = requests.recv() => request,
            () = ending.ended() => return,
        };
        let Some(request) = request else { return };
        let req_id = request.req_id.as_deref();
        let outcome = tokio::select! {
            outcome = catch_up(&state, &user_id, &request, &replies) => outcome,
            () = ending.ended() => return,
        };
        let last = match outcome {
            Ok(Ok((conversation_id, last_seq))) => {
                protocol::sync_done(req_id, conversation_id, last_seq)
            }
            Ok(Err(rejection)) => protocol::error(req_id, &rejection),
            Err(Disconnected) => return,
        };
        // Free before the client can see the end: its next sync must find the slot free.
        drop(request.running);
        if replies.send(last).await.is_err() {
            return;
        }
    }
}

/// Writes every message after `after_seq` and returns the conversation and the last seq
/// written; a rejection when the user may not read the conversation or Postgres is away.
async fn catch_up(
    state: &AppState,
    user_id: &str,
    request: &SyncRequest,
    replies: &mpsc::Sender<Utf8Bytes>,
) -> Result<Result<(Uuid, i64), Rejection>, Disconnected> {
    let conversation_id = match member_of(state, &request.conversation_id, user_id).await {
        Ok(conversation) => conversation.id,
        Err(rejection) => return Ok(Err(rejection)),
    };
    let mut last_seq = request.after_seq;
    loop {
        let rows = match messages::history(&state.queries, conversation_id, last_seq, PAGE).await {
            Ok(rows) => rows,
            Err(error) => return Ok(Err(db_error(error))),
        };
        let full_page = rows.len() as i64 == PAGE;
        for row in rows {
            last_seq = row.seq;
            let frame = Event::MessageNew {
                message: DeliveredMessage {
                    message_id: row.message_id,
                    conversation_id,
                    seq: row.seq,
                    sender_id: row.sender_id,
                    content: row.content,
                    content_type: row.content_type,
                    metadata: match row.metadata.0 {
                        Value::Object(map) => map,
                        _ => Map::new(),
                    },
                    accepted_at: row.accepted_at,
                },
            }
            .to_json();
            replies.send(frame.into()).await.map_err(|_| Disconnected)?;
        }
        if !full_page {
            return Ok(Ok((conversation_id, last_seq)));
        }
    }
}
