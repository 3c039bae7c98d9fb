//! The `ack` frame: a recipient says it got (`delivered`) or showed (`read`) a message.
//!
//! The gateway checks that the caller is among the message's recipients (Postgres, with the
//! positive answers cached: recipients never change) and hands the receipt to the `RECEIPTS`
//! stream; the receipts consumer records it and tells the sender. Anyone who is not a recipient,
//! and any message not persisted (yet), gets `MESSAGE_NOT_FOUND`, so ids cannot be probed.

use chrono::Utc;
use hotpath_core::receipts::{Receipt, ReceiptState};
use hotpath_core::rejection::Rejection;
use uuid::Uuid;

use crate::http::db_error;
use crate::state::AppState;

/// Checks and publishes one receipt; `Ok` once JetStream stored it (or already had it).
pub async fn take(
    state: &AppState,
    user_id: &str,
    message_id: &str,
    receipt_state: ReceiptState,
) -> Result<(), Rejection> {
    let not_found = || Rejection::MessageNotFound {
        message_id: message_id.to_string(),
    };
    let message_id = Uuid::parse_str(message_id).map_err(|_| not_found())?;
    let key = (message_id, user_id.to_string());
    let conversation_id = match state.receipt_targets.get(&key).await {
        Some(conversation_id) => conversation_id,
        None => {
            let row: Option<(Uuid,)> = sqlx::query_as(
                "SELECT conversation_id FROM messages WHERE id = $1 AND $2 = ANY(recipient_ids)",
            )
            .bind(message_id)
            .bind(user_id)
            .fetch_optional(&state.pool)
            .await
            .map_err(db_error)?;
            let (conversation_id,) = row.ok_or_else(not_found)?;
            state.receipt_targets.insert(key, conversation_id).await;
            conversation_id
        }
    };
    let receipt = Receipt {
        message_id,
        conversation_id,
        user_id: user_id.to_string(),
        state: receipt_state,
        at: Utc::now(),
    };
    state.producer.publish_receipt(&receipt).await
}
