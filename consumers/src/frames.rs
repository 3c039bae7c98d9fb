//! Publishing a live frame to a user: `message.new` from fanout, `message.state.changed` from
//! fanout and the receipts worker, all on NATS core to `deliver.user.<id>`, where the socket
//! nodes holding the user's WebSockets listen.
//!
//! A frame is best effort by design (catch-up finds what is lost, see [`crate::fanout`]), so a
//! publish never holds its caller up for long: the NATS client only makes a publish wait when
//! its own buffer is full, which means NATS is unreachable, and then [`PUBLISH_TIMEOUT`] gives
//! up on the frame. Either failure is logged and counted in
//! `delivery_fanout_failed_total{reason}` (`publish_error`, `publish_timeout`).

use std::time::Duration;

use bytes::Bytes;
use hotpath_core::names::deliver_subject;
use tracing::Span;

use crate::fanout::FanoutMetrics;

/// Longest wait to hand one publish to the NATS client.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

/// Publishes frames to users' subjects, counting what NATS would not take.
#[derive(Clone)]
pub(crate) struct FramePublisher {
    nats: async_nats::Client,
    metrics: FanoutMetrics,
}

impl FramePublisher {
    pub fn new(nats: async_nats::Client, metrics: FanoutMetrics) -> FramePublisher {
        FramePublisher { nats, metrics }
    }

    /// Publishes `frame` to the user's subject, with `span`'s trace context when tracing is on
    /// (see [`crate::trace`]); false (and counted) if NATS would not take it.
    pub async fn publish(&self, user_id: &str, frame: Bytes, span: &Span) -> bool {
        let subject = deliver_subject(user_id);
        let publish = async {
            match crate::trace::headers_of(span) {
                Some(headers) => {
                    self.nats
                        .publish_with_headers(subject, headers, frame)
                        .await
                }
                None => self.nats.publish(subject, frame).await,
            }
        };
        match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                tracing::warn!(user_id, %error, "frame publish failed");
                self.metrics.failed.add("publish_error", 1);
                false
            }
            Err(_) => {
                tracing::warn!(user_id, "frame publish timed out");
                self.metrics.failed.add("publish_timeout", 1);
                false
            }
        }
    }
}
