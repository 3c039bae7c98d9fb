//! The gateway's HTTP server: the accept loop, the connection cap, and graceful shutdown.
//!
//! `axum::serve` has no timeouts and no connection cap, so a client that opens connections
//! and sends nothing, or trickles its headers (slowloris), could hold sockets and memory
//! forever. The gateway serves the router with hyper's HTTP/1.1 connection instead (WebSocket
//! upgrades included), one task per connection, with three limits:
//!
//! * **`HOTPATH_MAX_CONNECTIONS`**, a semaphore with one permit per open connection (the
//!   mini-redis way). A connection accepted when every permit is taken is closed at once,
//!   without an answer: the kernel would otherwise queue it unanswered in the listen backlog
//!   until the client gives up, and the gateway never queues what it cannot serve (the same
//!   rule as the in-flight send bound). The client sees a reset or an empty reply and may
//!   retry, here or at another gateway; `gateway_http_connections_refused_total` counts them.
//!   A WebSocket keeps its permit until it closes.
//! * **the header and idle timeouts**, per connection (`phase.rs`, `connection.rs`).
//! * **the body timeout**, a tower layer on the router and the whole-body deadline of
//!   `http::BoundedJson` (late bodies get 408 `REQUEST_TIMEOUT`).
//!
//! Shutdown: when `shutdown` is cancelled the listener is dropped (new connections are
//! refused by the kernel), idle connections close, and every connection finishes the request
//! it is handling; `serve` returns once all of them are gone. Slow ones cannot delay that past
//! their deadlines.

mod connection;
mod phase;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hotpath_core::config::Config;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, UpDownCounter};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use phase::Expiry;
pub use phase::Timeouts;

/// The server's limits, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub timeouts: Timeouts,
}

impl ServerLimits {
    pub fn from_config(config: &Config) -> ServerLimits {
        ServerLimits {
            max_connections: config.max_connections.max(1),
            timeouts: Timeouts {
                header: config.http_header_timeout(),
                idle: config.http_idle_timeout(),
            },
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets in-flight requests
/// finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let metrics = ServerMetrics::new();
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                wait_after_accept_error(&error).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "closing a connection over HOTPATH_MAX_CONNECTIONS");
            metrics.refused.add(1, &[]);
            continue;
        };
        let slot = connection::Slot::new(permit, metrics.clone());
        // Answers are small and written whole: send them without waiting for an ACK.
        let _ = stream.set_nodelay(true);
        connections.spawn(connection::serve(
            stream,
            slot,
            router.clone(),
            limits.timeouts,
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Errors of one connection (reset before it was accepted) are nothing to wait for; others
/// (out of file descriptors) would spin the loop, so wait a moment as hyper's examples do.
async fn wait_after_accept_error(error: &std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The server's metrics: open connections, refused ones, and those closed by a deadline.
#[derive(Clone)]
pub struct ServerMetrics {
    open: UpDownCounter<i64>,
    refused: Counter<u64>,
    closed: Counter<u64>,
}

impl ServerMetrics {
    fn new() -> ServerMetrics {
        let meter = hotpath_core::telemetry::meter();
        ServerMetrics {
            open: meter
                .i64_up_down_counter("gateway_http_connections")
                .with_description("Open HTTP connections, WebSockets included")
                .build(),
            refused: meter
                .u64_counter("gateway_http_connections_refused_total")
                .with_description(
                    "Connections closed on accept because HOTPATH_MAX_CONNECTIONS were open",
                )
                .build(),
            closed: meter
                .u64_counter("gateway_http_connections_closed_total")
                .with_description("Connections closed for slow headers or idleness, by reason")
                .build(),
        }
    }

    fn connection_opened(&self) {
        self.open.add(1, &[]);
    }

    fn connection_closed(&self) {
        self.open.add(-1, &[]);
    }

    fn closed_by_deadline(&self, why: Expiry) {
        self.closed.add(1, &[KeyValue::new("reason", why.label())]);
    }
}
