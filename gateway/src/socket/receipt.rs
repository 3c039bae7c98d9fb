//! The `ack` frame: a recipient says it got (`delivered`) or showed (`read`) a message.
//!
//! The gateway checks that the caller is among the message's recipients (Postgres, with the
//! positive answers cached: recipients never change) and hands the receipt to the `RECEIPTS`
//! stream; the receipts consumer records it and tells the sender. Anyone who is not a recipient,
//! and any message not persisted (yet), gets `MESSAGE_NOT_FOUND`, so ids cannot be probed.
//!
//! What a client can push into `RECEIPTS` is bounded three ways, however many acks it sends:
//! * only a recipient of a persisted message can ack it, so the distinct receipts a user can
//!   give are two per message it received;
//! * each user has a budget of acks (`HOTPATH_ACK_RATE_PER_USER`, `HOTPATH_ACK_RATE_BURST`);
//!   past it an ack is answered `RATE_LIMIT_EXCEEDED` with the seconds to wait, and not taken;
//! * the gateway remembers, per (message, recipient), the furthest receipt it published, for
//!   [`RECEIPT_MEMORY`], which outlasts the stream's two-minute duplicate window. A repeat, or
//!   a `delivered` after a `read` (which implies it), is answered `ack.ok` at once and not
//!   published again. So each (message, recipient, state) enters the stream at most once per
//!   [`RECEIPT_MEMORY`] per gateway, however often a client (or all of the user's sockets on
//!   this gateway) repeats it; the memory is per gateway, not per socket, so reconnecting does
//!   not reset it.

use std::time::Duration;

use chrono::Utc;
use hotpath_core::domain::ReceiptState;
use hotpath_core::receipts::Receipt;
use hotpath_core::rejection::Rejection;
use uuid::Uuid;

use crate::http::db_error;
use crate::state::AppState;
use crate::store::messages;

/// How long a gateway remembers a (message, recipient) pair and what it published for it.
pub const RECEIPT_MEMORY: Duration = Duration::from_secs(600);

/// What the gateway keeps of one (message, recipient) pair.
#[derive(Debug, Clone, Copy)]
pub struct ReceiptTarget {
    /// The message's conversation, whose partition the receipt is published to.
    pub conversation_id: Uuid,
    /// The furthest receipt this gateway published for the pair, if any.
    pub published: Option<ReceiptState>,
}

impl ReceiptTarget {
    /// Whether a receipt of `state` would add nothing to what was published.
    fn covers(&self, state: ReceiptState) -> bool {
        self.published.is_some_and(|published| published >= state)
    }
}

/// Checks and publishes one receipt; `Ok` once JetStream stored it (or already had it).
pub async fn take(
    state: &AppState,
    user_id: &str,
    message_id: &str,
    receipt_state: ReceiptState,
) -> Result<(), Rejection> {
    state.ack_rate.check(user_id)?;
    let not_found = || Rejection::MessageNotFound {
        message_id: message_id.to_string(),
    };
    let message_id = Uuid::parse_str(message_id).map_err(|_| not_found())?;
    let key = (message_id, user_id.to_string());
    let target = match state.receipt_targets.get(&key).await {
        Some(target) => target,
        None => {
            let conversation_id =
                messages::conversation_of_recipient(&state.queries, message_id, user_id)
                    .await
                    .map_err(db_error)?
                    .ok_or_else(not_found)?;
            let target = ReceiptTarget {
                conversation_id,
                published: None,
            };
            state.receipt_targets.insert(key.clone(), target).await;
            target
        }
    };
    if target.covers(receipt_state) {
        return Ok(());
    }
    let receipt = Receipt {
        message_id,
        conversation_id: target.conversation_id,
        user_id: user_id.to_string(),
        state: receipt_state,
        at: Utc::now(),
    };
    state.producer.publish_receipt(&receipt).await?;
    // Another socket of the user may have published meanwhile: keep the furthest.
    state
        .receipt_targets
        .entry(key)
        .and_upsert_with(|existing| {
            let before = existing.and_then(|entry| entry.into_value().published);
            std::future::ready(ReceiptTarget {
                published: before.max(Some(receipt_state)),
                ..target
            })
        })
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_read_covers_delivered_but_not_the_other_way() {
        let target = |published| ReceiptTarget {
            conversation_id: Uuid::nil(),
            published,
        };
        let (delivered, read) = (ReceiptState::Delivered, ReceiptState::Read);
        assert!(!target(None).covers(delivered));
        assert!(target(Some(delivered)).covers(delivered));
        assert!(!target(Some(delivered)).covers(read));
        assert!(target(Some(read)).covers(delivered));
        assert!(target(Some(read)).covers(read));
    }
}
