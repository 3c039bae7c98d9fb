//! A delivered/read receipt as it travels on the `RECEIPTS` stream, from the gateway that
//! checked it to the receipts consumer that records it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What a receipt records, re-exported with the receipt that carries it.
pub use crate::domain::ReceiptState;

/// One recipient's receipt for one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    pub message_id: Uuid,
    pub conversation_id: Uuid,
    pub user_id: String,
    pub state: ReceiptState,
    /// When the gateway took the receipt; the recorded timestamp (set once).
    pub at: DateTime<Utc>,
}

impl Receipt {
    pub fn encode(&self) -> Vec<u8> {
        // Ids, a string, an enum and a timestamp always serialise.
        serde_json::to_vec(self).expect("receipt serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<Receipt, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The `Nats-Msg-Id` that collapses repeats of this receipt.
    pub fn msg_id(&self) -> String {
        crate::names::receipt_msg_id(&self.message_id.to_string(), &self.user_id, self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_round_trip_and_read_is_further_than_delivered() {
        let receipt = Receipt {
            message_id: Uuid::nil(),
            conversation_id: Uuid::nil(),
            user_id: "bob".into(),
            state: ReceiptState::Read,
            at: DateTime::UNIX_EPOCH,
        };
        assert_eq!(Receipt::decode(&receipt.encode()).unwrap(), receipt);
        assert_eq!(
            receipt.msg_id(),
            "00000000-0000-0000-0000-000000000000:bob:read"
        );
        assert!(ReceiptState::Read > ReceiptState::Delivered);
        assert_eq!(
            "read".parse::<ReceiptState>().ok(),
            Some(ReceiptState::Read)
        );
        assert_eq!("sent".parse::<ReceiptState>().ok(), None);
    }
}
