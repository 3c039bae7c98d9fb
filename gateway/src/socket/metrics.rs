//! The socket node's metrics.

use hotpath_core::telemetry::meter;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, UpDownCounter};

use super::close::CloseReason;

#[derive(Clone)]
pub struct SocketMetrics {
    open: UpDownCounter<i64>,
    closed: Counter<u64>,
    subscriptions: UpDownCounter<i64>,
}

impl SocketMetrics {
    pub fn new() -> SocketMetrics {
        let meter = meter();
        SocketMetrics {
            open: meter
                .i64_up_down_counter("websocket_connections_open")
                .with_description("WebSockets open on this gateway")
                .build(),
            closed: meter
                .u64_counter("websocket_connections_closed_total")
                .with_description("WebSockets closed, by reason")
                .build(),
            subscriptions: meter
                .i64_up_down_counter("websocket_user_subscriptions")
                .with_description("deliver.user.<id> subscriptions held (one per connected user)")
                .build(),
        }
    }

    pub fn opened(&self) {
        self.open.add(1, &[]);
    }

    pub fn closed(&self, reason: CloseReason) {
        self.open.add(-1, &[]);
        self.closed
            .add(1, &[KeyValue::new("reason", reason.label())]);
    }

    pub fn subscribed(&self, delta: i64) {
        self.subscriptions.add(delta, &[]);
    }
}

impl Default for SocketMetrics {
    fn default() -> Self {
        SocketMetrics::new()
    }
}
