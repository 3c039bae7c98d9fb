//! `GET /v1/messages/{id}/status` and `GET /v1/conversations/{id}/messages`: reading back what
//! was persisted.

use axum::Json;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use hotpath_core::domain::MessageState;
use hotpath_core::rejection::Rejection;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::http::{ApiError, AuthUser, Path, Query, db_error};
use crate::state::AppState;
use crate::store;
use crate::store::message_rejections::RejectedMessage;
use crate::store::messages::{self, HistoryMessage, StoredMessage};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageStatus {
    pub message_id: Uuid,
    pub conversation_id: Uuid,
    pub sender_id: String,
    /// `pending` (accepted, in the stream) or `sent` (persisted); for the sender, `delivered` /
    /// `read` once any recipient reached that state (the furthest state any recipient reached),
    /// or `rejected` (accepted, then refused for good: see `reason`).
    pub state: MessageState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    pub accepted_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persisted_at: Option<DateTime<Utc>>,
    /// When a `rejected` message was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_at: Option<DateTime<Utc>>,
    /// Why a message is `rejected`: `{code, message, details}` as in an error body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Value>,
    /// Per-recipient receipts: only for the sender, and only once the message is persisted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<Vec<RecipientStatus>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecipientStatus {
    pub user_id: String,
    /// `sent`, `delivered` or `read`.
    pub state: MessageState,
    pub delivered_at: Option<DateTime<Utc>>,
    pub read_at: Option<DateTime<Utc>>,
}

/// Each recipient of the message with its receipt, in recipient order.
async fn recipients(state: &AppState, message_id: Uuid) -> Result<Vec<RecipientStatus>, Rejection> {
    let receipts = store::receipts::of_message(&state.queries, message_id)
        .await
        .map_err(db_error)?;
    Ok(receipts
        .into_iter()
        .map(|receipt| RecipientStatus {
            state: if receipt.read_at.is_some() {
                MessageState::Read
            } else if receipt.delivered_at.is_some() {
                MessageState::Delivered
            } else {
                MessageState::Sent
            },
            user_id: receipt.user_id,
            delivered_at: receipt.delivered_at,
            read_at: receipt.read_at,
        })
        .collect())
}

/// The status of a message refused after it was accepted.
fn rejected_status(refused: RejectedMessage, message_id: Uuid) -> MessageStatus {
    // `message_rejections.reason` has one possible value (its CHECK): a reused key.
    let reason = Rejection::IdempotencyKeyReused {
        original_message_id: refused.original_message_id,
    };
    MessageStatus {
        message_id,
        conversation_id: refused.conversation_id,
        sender_id: refused.sender_id,
        state: MessageState::Rejected,
        seq: None,
        accepted_at: refused.accepted_at,
        persisted_at: None,
        rejected_at: Some(refused.created_at),
        reason: Some(reason.reason()),
        recipients: None,
    }
}

/// What Postgres knows of a message: stored, or refused by the consumers.
enum Found {
    Stored(StoredMessage),
    Rejected(RejectedMessage),
}

async fn find(state: &AppState, message_id: Uuid) -> Result<Option<Found>, Rejection> {
    let pool = &state.queries;
    if let Some(stored) = messages::find(pool, message_id).await.map_err(db_error)? {
        return Ok(Some(Found::Stored(stored)));
    }
    let refused = store::message_rejections::find(pool, message_id)
        .await
        .map_err(db_error)?;
    Ok(refused.map(Found::Rejected))
}

/// The message's state: `sent` with its seq once persisted, `pending` while it is only in the
/// stream, `rejected` with the reason if the consumers refused it. For the sender, a persisted
/// message also lists its recipients with their receipts, and its state is the furthest any
/// recipient reached (`delivered`, `read`). Only the sender or a member of the conversation
/// may see it, and only the sender a rejected one (nobody else ever saw it); to anyone else it
/// does not exist (404), so ids cannot be probed. An id Postgres just did not have is answered
/// from memory for a few seconds (`known_messages`).
pub async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
    AuthUser(user_id): AuthUser,
) -> Result<Json<MessageStatus>, ApiError> {
    let not_found = || Rejection::MessageNotFound {
        message_id: id.clone(),
    };
    let message_id = Uuid::parse_str(&id).map_err(|_| not_found())?;

    let found = state
        .messages
        .in_postgres(message_id, find(&state, message_id))
        .await?;

    let mut status = match found {
        // Refused after it was accepted: nobody but its sender ever knew of it.
        Some(Found::Rejected(refused)) => {
            if refused.sender_id != user_id {
                return Err(not_found().into());
            }
            return Ok(Json(rejected_status(refused, message_id)));
        }
        Some(Found::Stored(stored)) => {
            // Whoever asks next for a page of it from this gateway sees this message.
            state
                .history_pages
                .stored(stored.conversation_id, stored.seq)
                .await;
            MessageStatus {
                message_id,
                conversation_id: stored.conversation_id,
                sender_id: stored.sender_id,
                state: MessageState::Sent,
                seq: Some(stored.seq),
                accepted_at: stored.accepted_at,
                persisted_at: Some(stored.persisted_at),
                rejected_at: None,
                reason: None,
                recipients: None,
            }
        }
        None => {
            let accepted = state
                .messages
                .recently_accepted(&message_id)
                .await
                .ok_or_else(not_found)?;
            MessageStatus {
                message_id,
                conversation_id: accepted.conversation_id,
                sender_id: accepted.sender_id,
                state: MessageState::Pending,
                seq: None,
                accepted_at: accepted.accepted_at,
                persisted_at: None,
                rejected_at: None,
                reason: None,
                recipients: None,
            }
        }
    };

    if status.sender_id != user_id && !is_member(&state, status.conversation_id, &user_id).await? {
        return Err(not_found().into());
    }
    if status.sender_id == user_id && status.persisted_at.is_some() {
        let recipients = recipients(&state, message_id).await?;
        if recipients.iter().any(|r| r.read_at.is_some()) {
            status.state = MessageState::Read;
        } else if recipients.iter().any(|r| r.delivered_at.is_some()) {
            status.state = MessageState::Delivered;
        }
        status.recipients = Some(recipients);
    }
    Ok(Json(status))
}

async fn is_member(
    state: &AppState,
    conversation_id: Uuid,
    user_id: &str,
) -> Result<bool, Rejection> {
    let conversation = state.facts.conversation(conversation_id).await?;
    Ok(conversation.is_some_and(|c| c.active_members.contains(user_id)))
}

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    after_seq: Option<i64>,
    limit: Option<i64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryPage {
    pub conversation_id: Uuid,
    pub messages: Vec<HistoryMessage>,
    /// Pass as `after_seq` to read on; equal to the request's `after_seq` when nothing is new.
    pub next_after_seq: i64,
}

pub const MAX_HISTORY_PAGE: i64 = 500;

/// History by per-conversation `seq`, for catch-up after a reconnect: members only.
pub async fn history(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HistoryQuery>,
    AuthUser(user_id): AuthUser,
) -> Result<Response, ApiError> {
    let conversation_id = crate::routes::conversations::member_of(&state, &id, &user_id)
        .await?
        .id;
    let after_seq = query.after_seq.unwrap_or(0).max(0);
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_HISTORY_PAGE);

    let key = (conversation_id, after_seq, limit);
    let body = match state.history_pages.get(&key).await {
        Some(body) => body,
        None => {
            let page = read_history(&state, conversation_id, after_seq, limit).await?;
            let (page_len, next_after_seq) = (page.messages.len() as i64, page.next_after_seq);
            let body =
                bytes::Bytes::from(serde_json::to_vec(&page).map_err(|e| Rejection::Internal {
                    reason: e.to_string(),
                })?);
            // A short page reached the conversation's end as it was.
            let through = (page_len < limit).then_some(next_after_seq);
            state.history_pages.insert(key, body.clone(), through).await;
            body
        }
    };
    Ok(([(CONTENT_TYPE, "application/json")], body).into_response())
}

/// One page of a conversation's history after `after_seq`, in seq order.
async fn read_history(
    state: &AppState,
    conversation_id: Uuid,
    after_seq: i64,
    limit: i64,
) -> Result<HistoryPage, Rejection> {
    let messages = messages::history(&state.queries, conversation_id, after_seq, limit)
        .await
        .map_err(db_error)?;
    let next_after_seq = messages.last().map_or(after_seq, |m| m.seq);
    Ok(HistoryPage {
        conversation_id,
        messages,
        next_after_seq,
    })
}
