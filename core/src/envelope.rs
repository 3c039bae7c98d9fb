//! The message as it travels through the `MESSAGES` stream.
//!
//! The gateway has already authenticated, validated and authorised it, so everything here is
//! trusted by the consumers; the envelope is self-contained so a replay months later needs no
//! other state than Postgres's idempotency index.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{ContentType, Priority};

/// Bumped when the envelope changes incompatibly; consumers refuse versions they do not know.
pub const ENVELOPE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub version: u32,
    pub message_id: Uuid,
    pub correlation_id: Uuid,
    pub idempotency_key: String,
    pub conversation_id: Uuid,
    pub sender_id: String,
    pub content: String,
    pub content_type: ContentType,
    /// The recipients resolved at accept time: the request's `recipientIds`, or every other
    /// active member of the conversation.
    pub recipient_ids: Vec<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub priority: Priority,
    pub accepted_at: DateTime<Utc>,
    /// What the request was ([`crate::ids::request_digest`]), so a reuse of the key for a
    /// different request is told from a retry. Envelopes written before it existed have none
    /// (and still decode); a missing digest never conflicts ([`crate::ids::conflicts`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_digest: Option<String>,
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising a struct of strings, ids and a JSON map cannot fail.
        serde_json::to_vec(self).expect("envelope serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        let envelope: Envelope = serde_json::from_slice(bytes).map_err(EnvelopeError::Malformed)?;
        if envelope.version != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnknownVersion(envelope.version));
        }
        Ok(envelope)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("malformed envelope: {0}")]
    Malformed(serde_json::Error),
    #[error("unknown envelope version {0}")]
    UnknownVersion(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            version: ENVELOPE_VERSION,
            message_id: Uuid::nil(),
            correlation_id: Uuid::nil(),
            idempotency_key: "client_1".into(),
            conversation_id: Uuid::nil(),
            sender_id: "alice".into(),
            content: "hi".into(),
            content_type: ContentType::Text,
            recipient_ids: vec!["bob".into()],
            metadata: serde_json::Map::new(),
            priority: Priority::Normal,
            accepted_at: Utc::now(),
            request_digest: Some("d".into()),
        }
    }

    #[test]
    fn round_trips_and_refuses_unknown_versions() {
        let envelope = sample();
        let bytes = envelope.encode();
        assert_eq!(Envelope::decode(&bytes).unwrap(), envelope);

        let mut future = envelope.clone();
        future.version = 99;
        assert!(matches!(
            Envelope::decode(&future.encode()),
            Err(EnvelopeError::UnknownVersion(99))
        ));
        assert!(Envelope::decode(b"not json").is_err());
    }

    #[test]
    fn envelopes_from_before_request_digests_still_decode() {
        let mut old = serde_json::to_value(sample()).unwrap();
        assert_eq!(old["requestDigest"], "d");
        old.as_object_mut().unwrap().remove("requestDigest");
        let decoded = Envelope::decode(old.to_string().as_bytes()).unwrap();
        assert_eq!(decoded.request_digest, None);
    }
}
