//! `POST /v1/messages`: the hot path, in the order it happens.
//!
//! authenticate → rate limit → read a body bounded in size and time → shed load if full →
//! refuse while the backlog is full → load facts from the cache → run the check chain →
//! derive the idempotency key, request digest and message id → publish to JetStream → (a
//! duplicate: retry, or key reused for another message? [`crate::duplicates`]) → 202
//! `pending`. Nothing here writes to Postgres; persisting is the consumers' job.
//!
//! The first three steps are the handler's arguments, which axum runs in order: [`Sender`]
//! (the token's user, within their send rate), then the body ([`BoundedJson`]). So a client
//! without a valid token, or over its rate, never has its body read.
//!
//! The send slot (the in-flight bound, `HOTPATH_MAX_IN_FLIGHT_SENDS`) is taken only once the
//! whole body is in hand: a client that trickles its body holds a connection until the body
//! timeout, never a slot, so slow clients cannot turn other clients' sends into 503s. That is
//! why the bound is a step of the handler and not a tower load-shedding layer: a layer runs
//! before the body is read, and would let trickled bodies fill every slot.
//!
//! Every answer, 202 or rejection, is counted and timed by the route's layer ([`measured`]),
//! from the response; the handler only returns it.
//!
//! A `send` frame on a WebSocket (`routes::ws`) takes the same path from [`accept`] on: only
//! how the user and the body arrive differs.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use chrono::{DateTime, Utc};
use hotpath_core::domain::{ContentType, ConversationKind, MessageState, Priority};
use hotpath_core::envelope::{ENVELOPE_VERSION, Envelope};
use hotpath_core::ids::{self, idempotency_key, message_id, request_digest};
use hotpath_core::rejection::Rejection;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::OwnedSemaphorePermit;
use uuid::Uuid;

use crate::facts::ConversationFacts;
use crate::http::rejections::rejection_of;
use crate::http::{ApiError, AuthUser, BoundedJson, typed};
use crate::known_messages::Accepted;
use crate::state::AppState;

/// The body of a send, typed once the checks have passed.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendRequest {
    conversation_id: String,
    content: String,
    content_type: ContentType,
    client_message_id: Option<String>,
    recipient_ids: Option<Vec<String>>,
    metadata: Option<Map<String, Value>>,
    priority: Option<Priority>,
}

/// The 202 answer, in the seed's shape.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SendAccepted {
    pub message_id: Uuid,
    pub correlation_id: Uuid,
    pub state: MessageState,
    pub accepted_at: DateTime<Utc>,
    pub idempotency_key: String,
    pub idempotent_hit: bool,
    pub guidance: Guidance,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Guidance {
    pub eventual_consistency: &'static str,
    pub state_transitions: &'static str,
    pub polling_endpoint: String,
    pub websocket_event: &'static str,
}

/// `POST /v1/messages`: steps 1 and 2 are the extractors, the rest is [`accept`].
pub async fn send(
    State(state): State<AppState>,
    // 1. Who is sending: the token's subject, never a body field; within their rate.
    Sender(user_id): Sender,
    CorrelationId(correlation_id): CorrelationId,
    // 2. The body, bounded in size and in time before parsing.
    BoundedJson(request): BoundedJson<Value>,
) -> Result<(StatusCode, Json<SendAccepted>), ApiError> {
    // Too many sends in progress: answer at once rather than queue until clients time out.
    let _slot = send_slot(&state)?;
    let accepted = accept(&state, &user_id, request, correlation_id).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// The layer of the send route: counts and times every answer, accepted or rejected, and
/// traces the send.
pub async fn measured(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    // The send's span (or, tracing off, the client's trace context passed on).
    let response = crate::trace::send(request, next).await;
    let millis = started.elapsed().as_secs_f64() * 1000.0;
    state.metrics.answered(rejection_of(&response), millis);
    response
}

/// The authenticated sender, within their send rate (`HOTPATH_RATE_PER_USER`): checked before
/// the body is read, so a client over its rate costs no read.
pub struct Sender(pub String);

impl FromRequestParts<AppState> for Sender {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let AuthUser(user_id) = AuthUser::from_request_parts(parts, state).await?;
        state.rate_limit.check(&user_id)?;
        Ok(Sender(user_id))
    }
}

/// The caller's `X-Correlation-Id` if it is a UUID, else a fresh one.
pub struct CorrelationId(pub Uuid);

impl<S: Sync> FromRequestParts<S> for CorrelationId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let id = parts
            .headers
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Uuid::parse_str(v).ok())
            .unwrap_or_else(Uuid::new_v4);
        Ok(CorrelationId(id))
    }
}

/// One permit of the gateway's in-flight bound, or 503 at once when it is used up. Held for
/// the whole send.
pub fn send_slot(state: &AppState) -> Result<OwnedSemaphorePermit, Rejection> {
    state
        .send_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| Rejection::ServiceUnavailable {
            reason: "the gateway is at capacity".into(),
            retry_after_secs: 1,
        })
}

/// Turns one already-read request of an authenticated user into an accepted message or a
/// rejection. HTTP (`POST /v1/messages`) and WebSocket (`send` frames) both end up here, after
/// each has taken a send slot and checked the user's rate.
pub async fn accept(
    state: &AppState,
    user_id: &str,
    request: Value,
    correlation_id: Uuid,
) -> Result<SendAccepted, Rejection> {
    // 3. Backpressure: while the consumers are a backlog's bound behind, refuse before
    //    anything is published (503 `BACKLOG_FULL`, Retry-After), so nothing accepted is at
    //    risk and the client retries later with the same key.
    state.backlog.admit()?;

    // 4. Facts for the checks, from memory on a warm path.
    let facts = SendFacts::load(state, user_id, &request).await?;

    // 5. The policy chain (WebAssembly): schema, authorization, and whatever operators pushed.
    let request = checked(state, user_id, request, &facts)?;
    // The chain rejects sends to unknown conversations, so it is present here.
    let Some(conversation) = &facts.conversation else {
        return Err(Rejection::ConversationNotFound {
            conversation_id: request.conversation_id,
        });
    };

    // 6. Identity: the idempotency key (which message the client means), the request digest
    //    (what it asks for) and the message id derived from both.
    let envelope = envelope(
        user_id,
        request,
        conversation,
        &facts.sender_blocks,
        correlation_id,
    );

    // 7. Publish; JetStream's PubAck says whether it had this key already, and if so, the
    //    message it kept tells a retry (answered with that message's id) from a reuse (409).
    let published = state.producer.publish(&envelope).await?;
    let message_id = if published.duplicate {
        crate::duplicates::retried(state, &envelope, &published).await?
    } else {
        envelope.message_id
    };
    remember(state, message_id, &envelope, conversation.kind).await;

    // 8. 202: accepted, pending persistence.
    Ok(SendAccepted::pending(
        message_id,
        envelope,
        published.duplicate,
    ))
}

/// What the checks need to know besides the request, from memory on a warm path.
struct SendFacts {
    /// The request's conversation, if it exists. A conversation id that is not a UUID cannot,
    /// so it costs no lookup.
    conversation: Option<Arc<ConversationFacts>>,
    sender_blocks: Arc<HashSet<String>>,
}

impl SendFacts {
    async fn load(state: &AppState, user_id: &str, request: &Value) -> Result<Self, Rejection> {
        let conversation_id = request
            .get("conversationId")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok());
        let conversation = match conversation_id {
            Some(id) => state.facts.conversation(id).await?,
            None => None,
        };
        let sender_blocks = state.facts.blocks(user_id).await?;
        Ok(SendFacts {
            conversation,
            sender_blocks,
        })
    }
}

/// Runs the policy chain over the request and types what it lets through (as the last
/// normalising policy left it). No chain loaded means nothing may pass.
fn checked(
    state: &AppState,
    user_id: &str,
    request: Value,
    facts: &SendFacts,
) -> Result<SendRequest, Rejection> {
    let chain = state.policies.load();
    if chain.is_empty() {
        return Err(Rejection::ServiceUnavailable {
            reason: "no policies are loaded".into(),
            retry_after_secs: 1,
        });
    }
    let normalized = chain.run(
        &state.policy_metrics,
        user_id,
        &request,
        facts.conversation.as_deref(),
        &facts.sender_blocks,
    )?;
    typed(normalized.unwrap_or(request))
}

/// The message as it goes onto the stream, with its idempotency key, request digest and the
/// message id derived from both, to its [`recipients`].
fn envelope(
    user_id: &str,
    request: SendRequest,
    conversation: &ConversationFacts,
    sender_blocks: &HashSet<String>,
    correlation_id: Uuid,
) -> Envelope {
    let accepted_at = Utc::now();
    let key = idempotency_key(
        user_id,
        request.client_message_id.as_deref(),
        &request.conversation_id,
        &request.content,
        accepted_at.timestamp(),
    );
    let metadata = request.metadata.unwrap_or_default();
    let priority = request.priority.unwrap_or_default();
    let digest = request_digest(&ids::Request {
        content: &request.content,
        content_type: request.content_type.as_str(),
        metadata: &metadata,
        recipient_ids: request.recipient_ids.as_deref(),
        priority: priority.as_str(),
    });
    let recipient_ids = recipients(request.recipient_ids, conversation, user_id, sender_blocks);
    Envelope {
        version: ENVELOPE_VERSION,
        message_id: message_id(&key, &digest),
        correlation_id,
        idempotency_key: key,
        conversation_id: conversation.id,
        sender_id: user_id.to_string(),
        content: request.content,
        content_type: request.content_type,
        recipient_ids,
        metadata,
        priority,
        accepted_at,
        request_digest: Some(digest),
    }
}

/// Remembers the accepted message (its status is answered from memory until it is persisted)
/// and counts it.
async fn remember(state: &AppState, message_id: Uuid, envelope: &Envelope, kind: ConversationKind) {
    state
        .messages
        .accepted(
            message_id,
            Accepted {
                sender_id: envelope.sender_id.clone(),
                conversation_id: envelope.conversation_id,
                accepted_at: envelope.accepted_at,
            },
        )
        .await;
    state
        .metrics
        .enqueued(kind, &envelope.content_type, &envelope.priority);
}

impl SendAccepted {
    /// The 202 of an accepted message, pending persistence.
    fn pending(message_id: Uuid, envelope: Envelope, idempotent_hit: bool) -> SendAccepted {
        SendAccepted {
            message_id,
            correlation_id: envelope.correlation_id,
            state: MessageState::Pending,
            accepted_at: envelope.accepted_at,
            idempotency_key: envelope.idempotency_key,
            idempotent_hit,
            guidance: Guidance {
                eventual_consistency: "Message will be delivered asynchronously. Listen for state transitions via WebSocket.",
                state_transitions: "pending → sent → delivered → read",
                polling_endpoint: format!("/v1/messages/{message_id}/status"),
                websocket_event: "message.state.changed",
            },
        }
    }
}

/// Who the message goes to: the recipients the sender named, or else every other active
/// member, less everyone a block stands between with the sender (whichever of the two made
/// it). A block keeps the pair apart without silencing the sender for the rest of a group;
/// fanout and pushes follow these recipients, so the one kept apart hears nothing. A send
/// that blocks leave with nobody was refused by the policy chain (`authz`).
fn recipients(
    named: Option<Vec<String>>,
    conversation: &ConversationFacts,
    sender: &str,
    blocks: &HashSet<String>,
) -> Vec<String> {
    let mut recipients = named.unwrap_or_else(|| {
        conversation
            .active_members
            .iter()
            .filter(|m| *m != sender)
            .cloned()
            .collect()
    });
    recipients.retain(|r| !blocks.contains(r));
    recipients
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(members: &[&str]) -> ConversationFacts {
        ConversationFacts {
            id: Uuid::nil(),
            kind: ConversationKind::Group,
            is_active: true,
            active_members: members.iter().map(|m| m.to_string()).collect(),
        }
    }

    type Users = &'static [&'static str];

    fn list(users: &[&str]) -> Vec<String> {
        users.iter().map(|u| u.to_string()).collect()
    }

    #[test]
    fn a_block_leaves_only_the_pair_out() {
        let three = group(&["alice", "bob", "carol"]);
        // (recipients named in the request, the sender's blocks, the recipients)
        let cases: [(Option<Users>, Users, Users); 6] = [
            (None, &[], &["bob", "carol"]),
            (None, &["carol"], &["bob"]),
            (None, &["carol", "mallory"], &["bob"]),
            (None, &["bob", "carol"], &[]),
            (Some(&["carol", "bob"]), &["carol"], &["bob"]),
            (Some(&["bob"]), &["carol"], &["bob"]),
        ];
        for (named, blocks, expected) in cases {
            let blocks: HashSet<String> = list(blocks).into_iter().collect();
            assert_eq!(
                recipients(named.map(list), &three, "alice", &blocks),
                expected,
                "{named:?} with blocks {blocks:?}"
            );
        }
    }
}
