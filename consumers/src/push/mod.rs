//! Step 3 of delivery, and the push workers: telling offline recipients' phones through APNS
//! and FCM, without ever slowing persisting or fanout.
//!
//! * [`schedule`]: while a delivery batch is settled, each offline recipient with registered
//!   devices gets one task per platform in the `PUSH` work-queue stream (`push.<platform>`),
//!   with a `Nats-Msg-Id` per (message, recipient, platform), so a batch processed twice
//!   schedules each push once. Publishing to a local stream is all the delivery consumer does.
//! * [`worker`]: one worker per platform with credentials pulls `push-<platform>`, reads the
//!   message and the recipient's devices from Postgres and hands each device to that
//!   platform's [`PushSender`]. What the provider answers decides what happens next
//!   ([`PushOutcome`]): delete the device, retry after 1 s, 5 s and 30 s (or the provider's
//!   Retry-After), or give up into the `DLQ` with the provider's answer in headers. A
//!   per-platform circuit breaker ([`breaker`]) stops pulling while a provider is down, so
//!   its tasks wait in the stream instead of burning their retries.
//! * [`apns`] (through `a2`) and [`fcm`] (HTTP v1 through `reqwest` + `gcp_auth`) are the
//!   senders; [`payload`] builds what each platform is sent.

pub mod apns;
pub mod breaker;
pub mod fcm;
mod metrics;
pub mod payload;
pub mod schedule;
pub mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub(crate) use metrics::PushMetrics;

pub use hotpath_core::domain::Platform;

/// One task in the `PUSH` stream: tell `user_id`'s devices of `platform` about a message.
/// The message itself is read from Postgres when the task runs (it is stored before any task
/// is scheduled), so the conversation's preview setting at send time is what counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushTask {
    pub message_id: Uuid,
    pub conversation_id: Uuid,
    pub user_id: String,
    pub platform: Platform,
}

/// A registered device.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub token: String,
    pub platform: Platform,
    /// APNS: the topic (bundle id); FCM: the app the token was issued for.
    pub app_id: String,
    /// APNS only: send to Apple's sandbox (development builds).
    pub sandbox: bool,
}

/// What a recipient's phone shows, independent of the platform.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub message_id: Uuid,
    pub conversation_id: Uuid,
    pub seq: i64,
    pub sender_id: String,
    /// The notification's title: who wrote.
    pub title: String,
    /// The notification's text: the message, shortened, or a neutral line when the
    /// conversation keeps content out of pushes.
    pub body: String,
    /// Whether `body` carries message content.
    pub preview: bool,
    /// Unread messages for the recipient, where known.
    pub badge: Option<u32>,
    /// Wake the device now (high and normal priority) or when convenient (low).
    pub high_priority: bool,
    /// After this the provider should drop the push rather than deliver it late.
    pub expires_at: DateTime<Utc>,
}

/// What became of one push, as the provider answered it.
#[derive(Debug, Clone, PartialEq)]
pub enum PushOutcome {
    Sent,
    /// The token is not (or no longer) valid: the device is deleted, never retried.
    InvalidToken {
        reason: String,
    },
    /// The provider is unavailable, overloaded or slow: retried with the backoff, not before
    /// `retry_after` when it said so.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The provider refused our credentials: retried (someone has to fix them; the failures
    /// metric with reason `auth` is what to alert on).
    Auth {
        reason: String,
    },
    /// This request will never be accepted (for example a payload the provider finds too
    /// large): straight to the DLQ.
    Rejected {
        reason: String,
    },
}

impl PushOutcome {
    /// The `reason` label of `delivery_push_failed_total`; `None` for `Sent`.
    pub fn failure_label(&self) -> Option<&'static str> {
        match self {
            PushOutcome::Sent => None,
            PushOutcome::InvalidToken { .. } => Some("invalid_token"),
            PushOutcome::Retry { .. } => Some("unavailable"),
            PushOutcome::Auth { .. } => Some("auth"),
            PushOutcome::Rejected { .. } => Some("rejected"),
        }
    }

    /// The provider's answer, for logs and DLQ headers.
    pub fn reason(&self) -> &str {
        match self {
            PushOutcome::Sent => "sent",
            PushOutcome::InvalidToken { reason }
            | PushOutcome::Retry { reason, .. }
            | PushOutcome::Auth { reason }
            | PushOutcome::Rejected { reason } => reason,
        }
    }
}

/// Sends one notification to one device. One implementation per provider; tests use one that
/// records what it was asked.
pub trait PushSender: Send + Sync {
    fn send<'a>(
        &'a self,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, PushOutcome>;
}

/// The senders of the platforms this deployment has credentials for.
pub type Senders = HashMap<Platform, Arc<dyn PushSender>>;

/// The senders configured by `config`: APNS when a key (or certificate) is given, FCM when a
/// service account is. A platform without credentials has no worker: its tasks wait in the
/// stream (up to its max age) until one runs.
pub fn senders_from_config(config: &hotpath_core::config::Config) -> anyhow::Result<Senders> {
    let mut senders: Senders = HashMap::new();
    if let Some(apns) = apns::ApnsSender::from_config(config)? {
        senders.insert(Platform::Apns, Arc::new(apns));
    }
    if let Some(fcm) = fcm::FcmSender::from_config(config)? {
        senders.insert(Platform::Fcm, Arc::new(fcm));
    }
    Ok(senders)
}
