//! How a send reaches the gateway (`--transport`): one `POST /v1/messages` per message over
//! pooled HTTP/1.1 connections, or one `send` frame per message over a WebSocket each sending
//! user keeps open ([`ws`]), which is how most chat clients send.
//!
//! The phases ([`super::load`]) do not know which: a send is [`Transport::send`], and its
//! [`Answer`] is counted under the same keys either way ("202" for an accepted send, the HTTP
//! status of a refusal, `timeout` / `connect-error` / `transport-error` for a send that got no
//! answer), so a latency, capacity or soak run over one transport compares line by line with
//! the same run over the other.

mod ws;

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde::Serialize;

use super::stats::Outcome;
use super::workload::{Message, Workload};

pub use ws::SenderSockets;

/// `--transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// `POST /v1/messages`, one request per message.
    Http,
    /// `send` frames on one WebSocket per sending user (`GET /v1/ws`).
    Ws,
}

impl TransportKind {
    pub fn label(self) -> &'static str {
        match self {
            TransportKind::Http => "http",
            TransportKind::Ws => "ws",
        }
    }
}

/// How one send was answered.
pub struct Answer {
    pub outcome: Outcome,
    /// The body of an accepted send (the 202 body, or the `send.ack` frame, which carries the
    /// same fields): where the `messageId` is.
    pub accepted: Option<Bytes>,
}

impl Answer {
    fn failed(outcome: Outcome) -> Answer {
        Answer {
            outcome,
            accepted: None,
        }
    }
}

/// The sending side's connections to the gateway.
pub enum Transport {
    Http(Http),
    Ws(ws::Sockets),
}

impl Transport {
    /// Over HTTP: the shared client, nothing to open. Over WebSocket: one socket per user of
    /// the workload, each open and answering a ping before this returns, so no phase measures
    /// a handshake.
    pub async fn connect(
        kind: TransportKind,
        http: &reqwest::Client,
        gateway: &str,
        workload: &Workload,
    ) -> anyhow::Result<Transport> {
        Ok(match kind {
            TransportKind::Http => Transport::Http(Http {
                client: http.clone(),
                url: format!("{gateway}/v1/messages"),
            }),
            TransportKind::Ws => Transport::Ws(ws::Sockets::connect(gateway, workload).await?),
        })
    }

    /// Sends `message` and waits for its answer, at most [`super::load::REQUEST_TIMEOUT`].
    pub async fn send(&self, message: &Message<'_>) -> Answer {
        match self {
            Transport::Http(http) => http.send(message).await,
            Transport::Ws(sockets) => sockets.send(message).await,
        }
    }

    pub fn kind(&self) -> TransportKind {
        match self {
            Transport::Http(_) => TransportKind::Http,
            Transport::Ws(_) => TransportKind::Ws,
        }
    }

    /// What the WebSocket senders did (none over HTTP).
    pub fn sockets(&self) -> Option<SenderSockets> {
        match self {
            Transport::Http(_) => None,
            Transport::Ws(sockets) => Some(sockets.figures()),
        }
    }

    /// Closes the WebSockets (nothing to do over HTTP).
    pub async fn close(&self) {
        if let Transport::Ws(sockets) = self {
            sockets.close().await;
        }
    }
}

/// `POST /v1/messages` with the sender's token, over the client's connection pool.
pub struct Http {
    client: reqwest::Client,
    url: String,
}

impl Http {
    async fn send(&self, message: &Message<'_>) -> Answer {
        let sent = self
            .client
            .post(&self.url)
            .header(AUTHORIZATION, message.user.authorization.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(message.request_body())
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => return Answer::failed(Outcome::from_error(&error)),
        };
        let status = response.status().as_u16();
        // The body is read to the end so the connection goes back to the pool.
        match response.bytes().await {
            Ok(body) => Answer {
                outcome: Outcome::Status(status),
                accepted: (status == 202).then_some(body),
            },
            Err(error) => Answer::failed(Outcome::from_error(&error)),
        }
    }
}
