//! `POST /v1/messages`: the hot path, in the order it happens.
//!
//! authenticate → rate limit → read a body bounded in size and time → shed load if full →
//! refuse while the backlog is full → load facts from the cache → run the check chain →
//! derive the idempotency key, request digest and message id → publish to JetStream → (a
//! duplicate: retry, or key reused for another message? [`crate::duplicates`]) → 202
//! `pending`. Nothing here writes to Postgres; persisting is the consumers' job.
//!
//! The send slot (the in-flight bound) is taken only once the whole body is in hand: a client
//! that trickles its body holds a connection until the body timeout, never a slot, so slow
//! clients cannot turn other clients' sends into 503s.
//!
//! A `send` frame on a WebSocket (`routes::ws`) takes the same path from [`accept`] on: only
//! how the user and the body arrive differs.

use std::collections::HashSet;
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use hotpath_core::envelope::{ENVELOPE_VERSION, Envelope};
use hotpath_core::ids::{self, idempotency_key, message_id, request_digest};
use hotpath_core::rejection::Rejection;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::OwnedSemaphorePermit;
use uuid::Uuid;

use crate::facts::ConversationFacts;
use crate::http::{ApiError, authenticate, read_json, typed};
use crate::known_messages::Accepted;
use crate::state::AppState;

/// The body of a send, typed once the checks have passed.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendRequest {
    conversation_id: String,
    content: String,
    content_type: String,
    client_message_id: Option<String>,
    recipient_ids: Option<Vec<String>>,
    metadata: Option<Map<String, Value>>,
    priority: Option<String>,
}

/// The 202 answer, in the seed's shape.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SendAccepted {
    pub message_id: Uuid,
    pub correlation_id: Uuid,
    pub state: &'static str,
    pub accepted_at: chrono::DateTime<Utc>,
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

pub async fn send(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let millis = || started.elapsed().as_secs_f64() * 1000.0;
    match accept_http(&state, &headers, body).await {
        Ok(accepted) => (StatusCode::ACCEPTED, Json(accepted)).into_response(),
        Err(rejection) => {
            state.metrics.rejected(&rejection, millis());
            ApiError(rejection).into_response()
        }
    }
}

/// The HTTP framing of a send: what must happen before the body is even read.
async fn accept_http(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<SendAccepted, Rejection> {
    let started = Instant::now();

    // 1. Who is sending: the token's subject, never a body field.
    let user_id = authenticate(state, headers).await?;
    state.rate_limit.check(&user_id)?;

    // 2. The body, bounded in size and in time before parsing.
    let request = read_json(state, headers, body).await?;

    // Too many sends in progress: answer at once rather than queue until clients time out.
    let _slot = send_slot(state)?;

    accept(state, &user_id, request, correlation_id(headers), started).await
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
/// each has taken a send slot and checked the user's rate; `started` is when the caller began
/// handling the send, for the duration metric.
pub async fn accept(
    state: &AppState,
    user_id: &str,
    request: Value,
    correlation_id: Uuid,
    started: Instant,
) -> Result<SendAccepted, Rejection> {
    let user_id = user_id.to_string();

    // 3. Backpressure: while the consumers are a backlog's bound behind, refuse before
    //    anything is published (503 `BACKLOG_FULL`, Retry-After), so nothing accepted is at
    //    risk and the client retries later with the same key.
    state.backlog.admit()?;

    // 4. Facts for the checks, from memory on a warm path. A conversation id that is not a
    //    UUID cannot exist, so it costs no lookup.
    let conversation_id = request
        .get("conversationId")
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok());
    let conversation = match conversation_id {
        Some(id) => state.facts.conversation(id).await?,
        None => None,
    };
    let sender_blocks = state.facts.blocks(&user_id).await?;

    // 5. The policy chain (WebAssembly): schema, authorization, and whatever operators
    //    pushed. No chain loaded means nothing may pass.
    let chain = state.policies.load();
    if chain.is_empty() {
        return Err(Rejection::ServiceUnavailable {
            reason: "no policies are loaded".into(),
            retry_after_secs: 1,
        });
    }
    let normalized = chain.run(
        &state.policy_metrics,
        &user_id,
        &request,
        conversation.as_deref(),
        &sender_blocks,
    )?;
    let request: SendRequest = typed(normalized.unwrap_or(request))?;
    // The chain rejects sends to unknown conversations, so both are present here.
    let (Some(conversation_id), Some(conversation)) = (conversation_id, conversation) else {
        return Err(Rejection::ConversationNotFound {
            conversation_id: request.conversation_id,
        });
    };

    // 6. Identity: the idempotency key (which message the client means), the request digest
    //    (what it asks for) and the message id derived from both.
    let accepted_at = Utc::now();
    let key = idempotency_key(
        &user_id,
        request.client_message_id.as_deref(),
        &request.conversation_id,
        &request.content,
        accepted_at.timestamp(),
    );
    let metadata = request.metadata.unwrap_or_default();
    let priority = request.priority.unwrap_or_else(|| "normal".to_string());
    let digest = request_digest(&ids::Request {
        content: &request.content,
        content_type: &request.content_type,
        metadata: &metadata,
        recipient_ids: request.recipient_ids.as_deref(),
        priority: &priority,
    });
    let message_id = message_id(&key, &digest);
    let recipient_ids = recipients(
        request.recipient_ids,
        &conversation,
        &user_id,
        &sender_blocks,
    );
    let envelope = Envelope {
        version: ENVELOPE_VERSION,
        message_id,
        correlation_id,
        idempotency_key: key,
        conversation_id,
        sender_id: user_id,
        content: request.content,
        content_type: request.content_type,
        recipient_ids,
        metadata,
        priority,
        accepted_at,
        request_digest: Some(digest),
    };

    // 7. Publish; JetStream's PubAck says whether it had this key already, and if so, the
    //    message it kept tells a retry (answered with that message's id) from a reuse (409).
    let published = state.producer.publish(&envelope).await?;
    let message_id = if published.duplicate {
        crate::duplicates::retried(state, &envelope, &published).await?
    } else {
        message_id
    };
    state
        .messages
        .accepted(
            message_id,
            Accepted {
                sender_id: envelope.sender_id.clone(),
                conversation_id,
                accepted_at,
            },
        )
        .await;
    state.metrics.enqueued(
        &conversation.kind,
        &envelope.content_type,
        &envelope.priority,
        started.elapsed().as_secs_f64() * 1000.0,
    );

    // 8. 202: accepted, pending persistence.
    Ok(SendAccepted {
        message_id,
        correlation_id,
        state: "pending",
        accepted_at,
        idempotency_key: envelope.idempotency_key,
        idempotent_hit: published.duplicate,
        guidance: Guidance {
            eventual_consistency: "Message will be delivered asynchronously. Listen for state transitions via WebSocket.",
            state_transitions: "pending → sent → delivered → read",
            polling_endpoint: format!("/v1/messages/{message_id}/status"),
            websocket_event: "message.state.changed",
        },
    })
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

/// The caller's `X-Correlation-Id` if it is a UUID, else a fresh one.
fn correlation_id(headers: &HeaderMap) -> Uuid {
    headers
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v).ok())
        .unwrap_or_else(Uuid::new_v4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(members: &[&str]) -> ConversationFacts {
        ConversationFacts {
            id: Uuid::nil(),
            kind: "group".into(),
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
