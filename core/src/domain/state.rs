//! How far a message got, as its sender and its recipients see it.
//!
//! One vocabulary serves every place a state is shown: the 202 of a send (`pending`), the
//! status route (any of them), the `message.state.changed` WebSocket event (`sent` onwards)
//! and the receipts a recipient acknowledges. A receipt can only record `delivered` or `read`,
//! so it carries the narrower [`ReceiptState`], whose spelling is borrowed from
//! [`MessageState`] rather than written a second time.

use super::UnknownWord;

closed_words! {
    /// The state of a message.
    pub enum MessageState as "message state" {
        /// Accepted (202) and in the stream, not yet persisted.
        Pending => "pending",
        /// Persisted, with its per-conversation seq.
        Sent => "sent",
        /// A recipient's device received it.
        Delivered => "delivered",
        /// A recipient read it.
        Read => "read",
        /// Accepted (202) but refused for good by the consumers: its key already named a
        /// different message (ADR 0005).
        Rejected => "rejected",
    }
}

/// How far a recipient got with a message: what a receipt records. `Read` implies
/// `Delivered`, so the order says which receipt is further.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReceiptState {
    Delivered,
    Read,
}

impl ReceiptState {
    /// The message state this receipt moves a message to.
    pub fn message_state(self) -> MessageState {
        match self {
            ReceiptState::Delivered => MessageState::Delivered,
            ReceiptState::Read => MessageState::Read,
        }
    }

    /// The spelling of [`ReceiptState::message_state`].
    pub fn as_str(self) -> &'static str {
        self.message_state().as_str()
    }
}

impl From<ReceiptState> for MessageState {
    fn from(state: ReceiptState) -> MessageState {
        state.message_state()
    }
}

impl std::str::FromStr for ReceiptState {
    type Err = UnknownWord;

    fn from_str(text: &str) -> Result<ReceiptState, UnknownWord> {
        match text.parse() {
            Ok(MessageState::Delivered) => Ok(ReceiptState::Delivered),
            Ok(MessageState::Read) => Ok(ReceiptState::Read),
            _ => Err(UnknownWord::new("receipt state", text)),
        }
    }
}

spelled_by_as_str!(ReceiptState);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_spelled_as_on_the_wire() {
        let table = [
            (MessageState::Pending, "pending"),
            (MessageState::Sent, "sent"),
            (MessageState::Delivered, "delivered"),
            (MessageState::Read, "read"),
            (MessageState::Rejected, "rejected"),
        ];
        assert_eq!(table.len(), MessageState::ALL.len());
        for (state, word) in table {
            assert_eq!(state.as_str(), word);
            assert_eq!(word.parse::<MessageState>(), Ok(state));
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{word}\"")
            );
            assert_eq!(
                serde_json::from_str::<MessageState>(&format!("\"{word}\"")).unwrap(),
                state
            );
        }
        assert!("Sent".parse::<MessageState>().is_err());
        assert!(serde_json::from_str::<MessageState>("\"queued\"").is_err());
    }

    #[test]
    fn receipts_record_only_delivered_and_read() {
        for (receipt, word) in [
            (ReceiptState::Delivered, "delivered"),
            (ReceiptState::Read, "read"),
        ] {
            assert_eq!(receipt.as_str(), word);
            assert_eq!(MessageState::from(receipt).as_str(), word);
            assert_eq!(word.parse::<ReceiptState>(), Ok(receipt));
            assert_eq!(
                serde_json::to_string(&receipt).unwrap(),
                format!("\"{word}\"")
            );
        }
        for word in ["pending", "sent", "rejected", "READ"] {
            assert!(word.parse::<ReceiptState>().is_err());
            assert!(serde_json::from_str::<ReceiptState>(&format!("\"{word}\"")).is_err());
        }
        assert!(ReceiptState::Read > ReceiptState::Delivered);
    }
}
