//! What each frame a client sends does, and the answer it gets: mini-redis's commands, for
//! the socket.
//!
//! [`super::connection`] owns the socket: it reads frames, queues the answers for its writer
//! and decides when the connection ends. This module owns the meaning of a frame: it checks
//! the frame against the body limit, parses it ([`super::protocol`]) and runs it, one method
//! per kind, each returning the frame to answer with. A frame, however wrong, only ever earns
//! an `error` answer, never the end of the connection, so nothing here can end it.
//!
//! A `send` takes the same path as `POST /v1/messages` from its in-flight bound on; an `ack`
//! goes to [`super::receipt`]; a `sync` is handed to the socket's catch-up task
//! ([`super::sync`]), which writes its frames itself; a `refresh` extends the socket's
//! [`TokenLifetime`] ([`super::expiry`]).

use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use hotpath_core::receipts::ReceiptState;
use hotpath_core::rejection::Rejection;
use tokio::sync::mpsc;

use super::expiry::TokenLifetime;
use super::protocol::{self, ClientFrame};
use super::sync::{SyncRequest, SyncSlot};
use crate::routes::send::{SendAccepted, accept, send_slot};
use crate::state::AppState;

/// What running a socket's frames needs: its user, its catch-up task and its token.
pub struct Commands<'a> {
    pub state: &'a AppState,
    pub user_id: &'a str,
    /// The catch-up task's requests; it takes one when the [`SyncSlot`] is free.
    pub syncs: mpsc::Sender<SyncRequest>,
    pub sync_slot: SyncSlot,
    pub lifetime: TokenLifetime,
}

impl Commands<'_> {
    /// The answer to one text frame, if it has one now (a `sync` answers with the frames the
    /// catch-up task writes). Whatever the frame, the connection goes on.
    pub async fn answer(&self, text: &str) -> Option<Utf8Bytes> {
        match self.read_frame(text) {
            Ok(frame) => self.run(frame).await,
            Err(refused) => Some(protocol::error(
                refused.req_id.as_deref(),
                &refused.rejection,
            )),
        }
    }

    /// The frame a text message holds, if it is within the body limit and parses.
    fn read_frame(&self, text: &str) -> Result<ClientFrame, protocol::FrameError> {
        let limit = self.state.config.max_body_bytes;
        if text.len() > limit {
            return Err(protocol::FrameError {
                req_id: None,
                rejection: Rejection::PayloadTooLarge { limit_bytes: limit },
            });
        }
        protocol::parse(text)
    }

    /// Does what a frame asks and returns the reply to it: at once, except for a `sync`, whose
    /// frames the catch-up task writes.
    async fn run(&self, frame: ClientFrame) -> Option<Utf8Bytes> {
        let reply = match frame {
            ClientFrame::Ping { req_id } => protocol::pong(req_id.as_deref()),
            ClientFrame::Send {
                req_id,
                body,
                correlation_id,
            } => match self.send(body, correlation_id).await {
                Ok(accepted) => protocol::send_ack(req_id.as_deref(), &accepted),
                Err(rejection) => protocol::error(req_id.as_deref(), &rejection),
            },
            ClientFrame::Ack {
                req_id,
                message_id,
                state,
            } => self.ack(req_id.as_deref(), &message_id, state).await,
            ClientFrame::Sync {
                req_id,
                conversation_id,
                after_seq,
            } => return self.start_sync(req_id, conversation_id, after_seq),
            ClientFrame::Refresh { req_id, token } => {
                let refreshed = self
                    .lifetime
                    .refresh(&self.state.verifier, self.user_id, &token);
                match refreshed {
                    Ok(expires_at) => protocol::refreshed(req_id.as_deref(), expires_at),
                    Err(rejection) => protocol::error(req_id.as_deref(), &rejection),
                }
            }
        };
        Some(reply)
    }

    /// An `ack` frame: takes the receipt (see [`super::receipt`]).
    async fn ack(&self, req_id: Option<&str>, message_id: &str, state: ReceiptState) -> Utf8Bytes {
        let taken = super::receipt::take(self.state, self.user_id, message_id, state);
        match crate::trace::ws_receipt(taken).await {
            Ok(()) => protocol::ack_ok(req_id),
            Err(rejection) => {
                if let Rejection::Internal { reason } = &rejection {
                    tracing::error!(%reason, "internal error taking a receipt");
                }
                protocol::error(req_id, &rejection)
            }
        }
    }

    /// A `sync` frame: hands it to the catch-up task if no other sync runs, else the refusal.
    fn start_sync(
        &self,
        req_id: Option<String>,
        conversation_id: String,
        after_seq: i64,
    ) -> Option<Utf8Bytes> {
        let running = match self.sync_slot.take() {
            Ok(running) => running,
            Err(rejection) => return Some(protocol::error(req_id.as_deref(), &rejection)),
        };
        let request = SyncRequest {
            req_id,
            conversation_id,
            after_seq,
            running,
        };
        // The slot was free, so the catch-up task is waiting for this request; it is gone
        // only when the connection is ending, and then nothing needs an answer.
        let _ = self.syncs.try_send(request);
        None
    }

    /// A `send` frame: the HTTP send path from the in-flight bound on.
    async fn send(
        &self,
        body: serde_json::Value,
        correlation_id: Option<uuid::Uuid>,
    ) -> Result<SendAccepted, Rejection> {
        let started = Instant::now();
        let state = self.state;
        let accepted = async {
            let _slot = send_slot(state)?;
            state.rate_limit.check(self.user_id)?;
            let correlation_id = correlation_id.unwrap_or_else(uuid::Uuid::new_v4);
            accept(state, self.user_id, body, correlation_id).await
        };
        let accepted = crate::trace::ws_send(accepted).await;
        // As the HTTP send route's layers do for its responses.
        let rejection = accepted.as_ref().err();
        if let Some(rejection) = rejection {
            crate::http::rejections::log(rejection);
        }
        let millis = started.elapsed().as_secs_f64() * 1000.0;
        state.metrics.answered(rejection, millis);
        accepted
    }
}
