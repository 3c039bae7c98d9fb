//! How a WebSocket ends, decided once by whichever part of the connection notices first.

use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

/// Why a socket was closed: the `reason` label of `websocket_connections_closed_total`, and
/// the close frame (if any) the client is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame or went away.
    ClientClosed,
    /// Reading or writing failed: nothing more can be sent.
    ConnectionError,
    /// The client did not keep up with what it was sent (see `Config::ws_outbound_queue`).
    OutboundQueueFull,
    /// Nothing, not even a pong, arrived within the heartbeat timeout.
    HeartbeatTimeout,
    /// A frame larger than the WebSocket layer accepts at all.
    MessageTooBig,
    /// The socket's token expired without a `refresh` (see `super::expiry`).
    TokenExpired,
    /// The gateway is stopping.
    ServerShutdown,
}

impl CloseReason {
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ConnectionError => "connection_error",
            CloseReason::OutboundQueueFull => "outbound_queue_full",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::ServerShutdown => "server_shutdown",
        }
    }

    /// The close code and reason to send, where the client can still be told.
    pub fn close_frame(self) -> Option<(u16, &'static str)> {
        match self {
            CloseReason::ClientClosed | CloseReason::ConnectionError => None,
            CloseReason::OutboundQueueFull => Some((1008, "outbound queue full")),
            CloseReason::HeartbeatTimeout => Some((4000, "heartbeat timeout")),
            CloseReason::MessageTooBig => Some((1009, "message too big")),
            CloseReason::TokenExpired => Some((4001, "token expired")),
            CloseReason::ServerShutdown => Some((1001, "server shutting down")),
        }
    }

    /// Whether replies still queued (acks, the error about an oversized frame) are worth
    /// writing before the close frame: only when the client is still reading.
    pub fn flushes_replies(self) -> bool {
        matches!(
            self,
            CloseReason::MessageTooBig | CloseReason::TokenExpired | CloseReason::ServerShutdown
        )
    }
}

/// The end of one connection: the first reason recorded wins, and every task of the
/// connection (reader, writer, catch-up) stops when it is cancelled.
#[derive(Clone, Default)]
pub struct Ending {
    reason: Arc<OnceLock<CloseReason>>,
    token: CancellationToken,
}

impl Ending {
    /// Records `reason` unless the connection is already ending, and stops its tasks.
    pub fn end(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub fn is_ending(&self) -> bool {
        self.token.is_cancelled()
    }

    pub async fn ended(&self) {
        self.token.cancelled().await
    }

    /// The recorded reason; a connection that ended without one simply broke.
    pub fn reason(&self) -> CloseReason {
        self.reason
            .get()
            .copied()
            .unwrap_or(CloseReason::ConnectionError)
    }
}
