//! The announcements processes make to each other on NATS core subjects, as typed payloads.
//!
//! Caches are what these announcements keep honest: a gateway's facts (conversations, members,
//! blocks) and history pages, a delivery consumer's knowledge of who has push devices. Each
//! announcement is best effort (a core publish, not a stream): a lost one is bounded by the
//! cache's time to live, so no caller waits on or retries them. Publisher and listener share
//! the struct here, as they share [`crate::envelope::Envelope`], so a renamed field is a
//! compile error on both sides rather than a cache that silently stops being invalidated.
//!
//! | subject | payload | from → to |
//! | --- | --- | --- |
//! | [`FACTS_INVALIDATE_SUBJECT`] | [`FactsChanged`] | a gateway → every other gateway |
//! | [`HISTORY_INVALIDATE_SUBJECT`] | [`HistoryChanged`] | the delivery consumers → gateways |
//! | [`DEVICES_CHANGED_SUBJECT`] | [`DevicesChanged`] | a gateway → the delivery consumers |
//!
//! [`FACTS_INVALIDATE_SUBJECT`]: crate::names::FACTS_INVALIDATE_SUBJECT
//! [`HISTORY_INVALIDATE_SUBJECT`]: crate::names::HISTORY_INVALIDATE_SUBJECT
//! [`DEVICES_CHANGED_SUBJECT`]: crate::names::DEVICES_CHANGED_SUBJECT

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::names::HISTORY_INVALIDATE_SUBJECT;

/// The wire form of every announcement: its JSON.
pub trait Announcement: Serialize + DeserializeOwned {
    fn encode(&self) -> Vec<u8> {
        // These structs hold only strings, ids and lists of them: serialising cannot fail.
        serde_json::to_vec(self).expect("an announcement serialises")
    }

    fn decode(payload: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

/// Facts changed: a conversation (its kind, activity or members) and/or the blocks of some
/// users. Every gateway drops its cached copies of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FactsChanged {
    /// The gateway that made the change (it has already dropped its own copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_ids: Vec<String>,
}

impl FactsChanged {
    pub fn conversation(id: Uuid) -> FactsChanged {
        FactsChanged {
            origin: None,
            conversation_id: Some(id),
            user_ids: Vec::new(),
        }
    }

    pub fn users(user_ids: Vec<String>) -> FactsChanged {
        FactsChanged {
            origin: None,
            conversation_id: None,
            user_ids,
        }
    }
}

impl Announcement for FactsChanged {}

/// A conversation got new messages: cached history pages of it are stale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryChanged {
    pub conversation_id: Uuid,
    /// The highest seq now stored in it (absent from older consumers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<i64>,
}

impl Announcement for HistoryChanged {}

impl HistoryChanged {
    /// Announces each conversation of `changed` with its highest stored seq (if known) on
    /// [`HISTORY_INVALIDATE_SUBJECT`]; answers how many were handed to NATS. Best effort: a
    /// lost announcement is bounded by the history cache's time to live.
    pub async fn announce_all(
        nats: &async_nats::Client,
        changed: BTreeMap<Uuid, Option<i64>>,
    ) -> u64 {
        let mut announced = 0;
        for (conversation_id, last_seq) in changed {
            let changed = HistoryChanged {
                conversation_id,
                last_seq,
            };
            match nats
                .publish(HISTORY_INVALIDATE_SUBJECT, changed.encode().into())
                .await
            {
                Ok(()) => announced += 1,
                Err(error) => {
                    tracing::debug!(%conversation_id, %error, "history change not announced")
                }
            }
        }
        announced
    }
}

/// A user registered a device: whatever was cached about their devices (perhaps "none") is
/// stale, and they may have to be pushed from now on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevicesChanged {
    pub user_id: String,
}

impl Announcement for DevicesChanged {}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire<A: Announcement>(announcement: &A) -> serde_json::Value {
        serde_json::from_slice(&announcement.encode()).unwrap()
    }

    #[test]
    fn each_announcement_has_its_documented_wire_shape() {
        let id = Uuid::from_u128(7);
        assert_eq!(
            wire(&HistoryChanged {
                conversation_id: id,
                last_seq: Some(12),
            }),
            serde_json::json!({"conversationId": id, "lastSeq": 12})
        );
        // From consumers that do not send it yet.
        assert_eq!(
            HistoryChanged::decode(format!("{{\"conversationId\":\"{id}\"}}").as_bytes())
                .unwrap()
                .last_seq,
            None
        );
        assert_eq!(
            wire(&DevicesChanged {
                user_id: "u1".into()
            }),
            serde_json::json!({"userId": "u1"})
        );
        assert_eq!(
            wire(&FactsChanged::conversation(id)),
            serde_json::json!({"conversationId": id})
        );
        assert_eq!(
            wire(&FactsChanged::users(vec!["a".into(), "b".into()])),
            serde_json::json!({"userIds": ["a", "b"]})
        );
    }

    #[test]
    fn announcements_round_trip_and_garbage_is_an_error() {
        let mut facts = FactsChanged::conversation(Uuid::from_u128(1));
        facts.origin = Some(Uuid::from_u128(2));
        assert_eq!(FactsChanged::decode(&facts.encode()).unwrap(), facts);
        let devices = DevicesChanged {
            user_id: "u".into(),
        };
        assert_eq!(DevicesChanged::decode(&devices.encode()).unwrap(), devices);
        assert!(HistoryChanged::decode(b"{\"conversationId\":\"nope\"}").is_err());
        assert!(DevicesChanged::decode(b"not json").is_err());
    }
}
