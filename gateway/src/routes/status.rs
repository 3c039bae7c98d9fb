//! `GET /v1/messages/{id}/status` and `GET /v1/conversations/{id}/messages`: reading back what
//! was persisted.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use hotpath_core::rejection::Rejection;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::http::{ApiError, authenticate, db_error};
use crate::state::AppState;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageStatus {
    pub message_id: Uuid,
    pub conversation_id: Uuid,
    pub sender_id: String,
    /// `pending` (accepted, in the stream) or `sent` (persisted); for the sender, `delivered` /
    /// `read` once any recipient reached that state (the furthest state any recipient reached),
    /// or `rejected` (accepted, then refused for good: see `reason`).
    pub state: &'static str,
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
    pub state: &'static str,
    pub delivered_at: Option<DateTime<Utc>>,
    pub read_at: Option<DateTime<Utc>>,
}

/// A recipient with the times its receipts were recorded.
type ReceiptRow = (String, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// Each recipient of the message with its receipt, in recipient order.
async fn recipients(state: &AppState, message_id: Uuid) -> Result<Vec<RecipientStatus>, Rejection> {
    let rows: Vec<ReceiptRow> = sqlx::query_as(
        "SELECT r.user_id, mr.delivered_at, mr.read_at
           FROM messages m
          CROSS JOIN LATERAL unnest(m.recipient_ids) WITH ORDINALITY AS r(user_id, n)
           LEFT JOIN message_receipts mr ON mr.message_id = m.id AND mr.user_id = r.user_id
          WHERE m.id = $1
          ORDER BY r.n",
    )
    .bind(message_id)
    .fetch_all(&state.queries)
    .await
    .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|(user_id, delivered_at, read_at)| RecipientStatus {
            user_id,
            state: if read_at.is_some() {
                "read"
            } else if delivered_at.is_some() {
                "delivered"
            } else {
                "sent"
            },
            delivered_at,
            read_at,
        })
        .collect())
}

/// A message refused after it was accepted (`message_rejections`).
#[derive(sqlx::FromRow)]
struct RejectedMessage {
    conversation_id: Uuid,
    sender_id: String,
    original_message_id: Uuid,
    accepted_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
}

impl RejectedMessage {
    fn status(self, message_id: Uuid) -> MessageStatus {
        // `message_rejections.reason` has one possible value (its CHECK): a reused key.
        let reason = Rejection::IdempotencyKeyReused {
            original_message_id: self.original_message_id,
        };
        MessageStatus {
            message_id,
            conversation_id: self.conversation_id,
            sender_id: self.sender_id,
            state: "rejected",
            seq: None,
            accepted_at: self.accepted_at,
            persisted_at: None,
            rejected_at: Some(self.created_at),
            reason: Some(reason.reason()),
            recipients: None,
        }
    }
}

async fn rejected(
    state: &AppState,
    message_id: Uuid,
) -> Result<Option<RejectedMessage>, Rejection> {
    sqlx::query_as(
        "SELECT conversation_id, sender_id, original_message_id, accepted_at, created_at
           FROM message_rejections WHERE message_id = $1",
    )
    .bind(message_id)
    .fetch_optional(&state.queries)
    .await
    .map_err(db_error)
}

/// What Postgres knows of a message: stored, or refused by the consumers.
enum Found {
    Stored(StoredMessage),
    Rejected(RejectedMessage),
}

async fn find(state: &AppState, message_id: Uuid) -> Result<Option<Found>, Rejection> {
    let stored: Option<StoredMessage> = sqlx::query_as(
        "SELECT conversation_id, sender_id, seq, accepted_at, persisted_at FROM messages WHERE id = $1",
    )
    .bind(message_id)
    .fetch_optional(&state.queries)
    .await
    .map_err(db_error)?;
    match stored {
        Some(stored) => Ok(Some(Found::Stored(stored))),
        None => Ok(rejected(state, message_id).await?.map(Found::Rejected)),
    }
}

#[derive(sqlx::FromRow)]
struct StoredMessage {
    conversation_id: Uuid,
    sender_id: String,
    seq: i64,
    accepted_at: DateTime<Utc>,
    persisted_at: DateTime<Utc>,
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
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<MessageStatus>, ApiError> {
    let user_id = authenticate(&state, &headers).await?;
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
            return Ok(Json(refused.status(message_id)));
        }
        Some(Found::Stored(stored)) => MessageStatus {
            message_id,
            conversation_id: stored.conversation_id,
            sender_id: stored.sender_id,
            state: "sent",
            seq: Some(stored.seq),
            accepted_at: stored.accepted_at,
            persisted_at: Some(stored.persisted_at),
            rejected_at: None,
            reason: None,
            recipients: None,
        },
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
                state: "pending",
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
            status.state = "read";
        } else if recipients.iter().any(|r| r.delivered_at.is_some()) {
            status.state = "delivered";
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

#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct HistoryMessage {
    pub message_id: Uuid,
    pub seq: i64,
    pub sender_id: String,
    pub content: String,
    pub content_type: String,
    pub metadata: sqlx::types::Json<Value>,
    pub priority: String,
    pub correlation_id: Uuid,
    pub accepted_at: DateTime<Utc>,
    pub persisted_at: DateTime<Utc>,
}

pub const MAX_HISTORY_PAGE: i64 = 500;

/// History by per-conversation `seq`, for catch-up after a reconnect: members only.
pub async fn history(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    let user_id = authenticate(&state, &headers).await?;
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
            let body =
                bytes::Bytes::from(serde_json::to_vec(&page).map_err(|e| Rejection::Internal {
                    reason: e.to_string(),
                })?);
            state.history_pages.insert(key, body.clone()).await;
            body
        }
    };
    Ok(([(CONTENT_TYPE, "application/json")], body).into_response())
}

/// One page of a conversation's history after `after_seq`, in seq order.
pub(crate) async fn read_history(
    state: &AppState,
    conversation_id: Uuid,
    after_seq: i64,
    limit: i64,
) -> Result<HistoryPage, Rejection> {
    let messages: Vec<HistoryMessage> = sqlx::query_as(
        "SELECT id AS message_id, seq, sender_id, content, content_type, metadata, priority,
                correlation_id, accepted_at, persisted_at
           FROM messages
          WHERE conversation_id = $1 AND seq > $2
          ORDER BY seq
          LIMIT $3",
    )
    .bind(conversation_id)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(&state.queries)
    .await
    .map_err(db_error)?;
    let next_after_seq = messages.last().map_or(after_seq, |m| m.seq);
    Ok(HistoryPage {
        conversation_id,
        messages,
        next_after_seq,
    })
}
