//! What a connected user is told, as the JSON frames the WebSocket carries
//! (`docs/websocket.md`).
//!
//! The delivery consumers publish these to [`crate::names::deliver_subject`]; socket nodes
//! forward the bytes to the user's sockets untouched, so the wire format is decided here,
//! once, for both the live path and the gateway's catch-up (`sync`) from Postgres.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::domain::ContentType;

/// The state a `message.state.changed` event carries, re-exported with the event.
pub use crate::domain::MessageState;

/// A frame pushed to a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all_fields = "camelCase")]
pub enum Event {
    /// A message persisted in a conversation the user receives.
    #[serde(rename = "message.new")]
    MessageNew { message: DeliveredMessage },
    /// A message the user sent moved on (`sent`: persisted, with its seq; `delivered` / `read`:
    /// the first recipient's receipt of that kind was recorded; `rejected`: it will never be
    /// stored, with no seq and the reason why; see `docs/websocket.md`).
    #[serde(rename = "message.state.changed")]
    StateChanged {
        message_id: Uuid,
        conversation_id: Uuid,
        state: MessageState,
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<i64>,
        /// `{code, message, details}` as in an error body: only for `rejected`.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<Value>,
    },
}

/// A persisted message as a recipient sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveredMessage {
    pub message_id: Uuid,
    pub conversation_id: Uuid,
    /// Per-conversation, gap-free: clients order and deduplicate by (conversationId, seq).
    pub seq: i64,
    pub sender_id: String,
    pub content: String,
    pub content_type: ContentType,
    pub metadata: Map<String, Value>,
    pub accepted_at: DateTime<Utc>,
}

impl Event {
    /// The frame's JSON text.
    pub fn to_json(&self) -> String {
        // Serialising strings, ids, numbers and a JSON map cannot fail.
        serde_json::to_string(self).expect("event serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_have_the_documented_shape() {
        let id = Uuid::nil();
        let state = Event::StateChanged {
            message_id: id,
            conversation_id: id,
            state: MessageState::Sent,
            seq: Some(7),
            reason: None,
        };
        assert_eq!(
            serde_json::to_value(&state).unwrap(),
            json!({"type": "message.state.changed", "messageId": id, "conversationId": id,
                   "state": "sent", "seq": 7})
        );
        let rejected = Event::StateChanged {
            message_id: id,
            conversation_id: id,
            state: MessageState::Rejected,
            seq: None,
            reason: Some(json!({"code": "IDEMPOTENCY_KEY_REUSED"})),
        };
        assert_eq!(
            serde_json::to_value(&rejected).unwrap(),
            json!({"type": "message.state.changed", "messageId": id, "conversationId": id,
                   "state": "rejected", "reason": {"code": "IDEMPOTENCY_KEY_REUSED"}})
        );
        let new = Event::MessageNew {
            message: DeliveredMessage {
                message_id: id,
                conversation_id: id,
                seq: 1,
                sender_id: "alice".into(),
                content: "hi".into(),
                content_type: ContentType::Text,
                metadata: Map::new(),
                accepted_at: DateTime::UNIX_EPOCH,
            },
        };
        let value = serde_json::to_value(&new).unwrap();
        assert_eq!(value["type"], "message.new");
        assert_eq!(value["message"]["senderId"], "alice");
        assert_eq!(value["message"]["contentType"], "text");
        assert_eq!(value["message"]["acceptedAt"], "1970-01-01T00:00:00Z");
    }
}
