//! The minimum of conversation management needed to send anything: create a conversation,
//! add and remove members, deactivate it (blocks are `routes::blocks`). Every change of
//! membership or state is announced so all gateways drop their cached facts. Also the
//! conversation's push setting, which no gateway caches: the push workers read it for every
//! push.
//!
//! Two limits keep membership from becoming a way to hurt everyone else:
//! * a conversation has at most `HOTPATH_MAX_MEMBERS` active members (1,000 by default, the
//!   shipped `schema` policy's recipient limit), checked when it is created and on every add,
//!   under a lock on the conversation so that concurrent adds cannot pass it together: every
//!   send to it fans out to all of them;
//! * each user may make `HOTPATH_MEMBERSHIP_RATE_PER_MIN` membership changes a minute
//!   (creating a conversation, adding or removing a member): each one writes to Postgres and
//!   makes every gateway drop cached facts. Past it: 429 `RATE_LIMIT_EXCEEDED` + Retry-After.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use hotpath_core::auth::is_valid_user_id;
use hotpath_core::rejection::Rejection;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::facts::{ConversationFacts, Invalidation};
use crate::http::{ApiError, authenticate, db_error, read_json, typed};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateConversation {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    members: Vec<String>,
    #[serde(default = "previews_shown")]
    push_preview: bool,
}

/// Pushes show message content unless the members say otherwise, as the column's default.
fn previews_shown() -> bool {
    true
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationView {
    pub conversation_id: Uuid,
    #[serde(rename = "type")]
    pub kind: String,
    pub is_active: bool,
    pub members: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// Whether pushes may show message content. Like `created_at`, only in the answer to a
    /// creation: the cached facts that answer membership changes do not carry it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_preview: Option<bool>,
}

/// `POST /v1/conversations`: `direct` (exactly two people) or `group`; the creator is a member.
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<ConversationView>), ApiError> {
    let user_id = authenticate(&state, &headers).await?;
    state.membership_rate.check(&user_id)?;
    let request: CreateConversation = typed(read_json(&state, &headers, body).await?)?;

    let mut members: BTreeSet<String> = BTreeSet::new();
    members.insert(user_id.clone());
    for member in &request.members {
        if !is_valid_user_id(member) {
            return Err(invalid(&format!("not a valid user id: {member:?}"), "members").into());
        }
        members.insert(member.clone());
    }
    match request.kind.as_str() {
        "direct" if members.len() != 2 => {
            return Err(invalid(
                "a direct conversation has exactly two distinct members",
                "members",
            )
            .into());
        }
        "direct" | "group" => {}
        _ => return Err(invalid("type must be direct or group", "type").into()),
    }
    if members.len() > state.config.max_members {
        return Err(Rejection::ConversationFull {
            max_members: state.config.max_members,
            conversation_id: None,
        }
        .into());
    }

    let id = Uuid::new_v4();
    let member_list: Vec<String> = members.into_iter().collect();
    let mut tx = state.pool.begin().await.map_err(db_error)?;
    let (created_at,): (DateTime<Utc>,) = sqlx::query_as(
        "INSERT INTO conversations (id, type, created_by, push_preview) VALUES ($1, $2, $3, $4)
         RETURNING created_at",
    )
    .bind(id)
    .bind(&request.kind)
    .bind(&user_id)
    .bind(request.push_preview)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    sqlx::query(
        "INSERT INTO conversation_members (conversation_id, user_id) SELECT $1, unnest($2::text[])",
    )
    .bind(id)
    .bind(&member_list)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    state.facts.announce(Invalidation::conversation(id)).await;

    let view = ConversationView {
        conversation_id: id,
        kind: request.kind,
        is_active: true,
        members: member_list,
        created_at: Some(created_at),
        push_preview: Some(request.push_preview),
    };
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AddMember {
    user_id: String,
}

/// `POST /v1/conversations/{id}/members`: an active member adds someone to an active group
/// that has room (adding someone who is already a member changes nothing).
pub async fn add_member(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<ConversationView>, ApiError> {
    let user_id = authenticate(&state, &headers).await?;
    state.membership_rate.check(&user_id)?;
    let request: AddMember = typed(read_json(&state, &headers, body).await?)?;
    let conversation = member_of(&state, &id, &user_id).await?;
    active(&conversation)?;
    if !is_valid_user_id(&request.user_id) {
        return Err(invalid("not a valid user id", "userId").into());
    }
    if conversation.kind == "direct" && !conversation.active_members.contains(&request.user_id) {
        return Err(invalid("members of a direct conversation cannot change", "userId").into());
    }
    let mut tx = state.pool.begin().await.map_err(db_error)?;
    // Concurrent adds to one conversation count its members one after the other.
    sqlx::query("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE")
        .bind(conversation.id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    let (members, already_in): (i64, bool) = sqlx::query_as(
        "SELECT count(*), coalesce(bool_or(user_id = $2), false)
           FROM conversation_members WHERE conversation_id = $1 AND is_active",
    )
    .bind(conversation.id)
    .bind(&request.user_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    if !already_in && members as usize >= state.config.max_members {
        return Err(Rejection::ConversationFull {
            max_members: state.config.max_members,
            conversation_id: Some(conversation.id.to_string()),
        }
        .into());
    }
    sqlx::query(
        "INSERT INTO conversation_members (conversation_id, user_id) VALUES ($1, $2)
         ON CONFLICT (conversation_id, user_id) DO UPDATE SET is_active = true, left_at = NULL",
    )
    .bind(conversation.id)
    .bind(&request.user_id)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    changed(&state, &conversation).await
}

/// `DELETE /v1/conversations/{id}/members/{userId}`: an active member removes someone (or
/// leaves). Removing someone who is not a member is a no-op.
pub async fn remove_member(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((id, member)): Path<(String, String)>,
) -> Result<Json<ConversationView>, ApiError> {
    let user_id = authenticate(&state, &headers).await?;
    state.membership_rate.check(&user_id)?;
    let conversation = member_of(&state, &id, &user_id).await?;
    sqlx::query(
        "UPDATE conversation_members SET is_active = false, left_at = now()
          WHERE conversation_id = $1 AND user_id = $2 AND is_active",
    )
    .bind(conversation.id)
    .bind(&member)
    .execute(&state.pool)
    .await
    .map_err(db_error)?;
    changed(&state, &conversation).await
}

/// `POST /v1/conversations/{id}/deactivate`: no more messages can be sent to it.
pub async fn deactivate(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<ConversationView>, ApiError> {
    let user_id = authenticate(&state, &headers).await?;
    let conversation = member_of(&state, &id, &user_id).await?;
    sqlx::query("UPDATE conversations SET is_active = false WHERE id = $1")
        .bind(conversation.id)
        .execute(&state.pool)
        .await
        .map_err(db_error)?;
    changed(&state, &conversation).await
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Settings {
    push_preview: bool,
}

/// `PUT /v1/conversations/{id}/settings`: an active member decides whether the conversation's
/// pushes may show message content (`pushPreview`). With `false`, a push says only that there is
/// a new message. Nothing is announced: no gateway caches the setting.
pub async fn update_settings(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let user_id = authenticate(&state, &headers).await?;
    let request: Settings = typed(read_json(&state, &headers, body).await?)?;
    // Someone outside the conversation learns nothing of its settings, not even that it exists.
    let conversation =
        member_of(&state, &id, &user_id)
            .await
            .map_err(|rejection| match rejection {
                Rejection::NotConversationMember { .. } => Rejection::ConversationNotFound {
                    conversation_id: id.clone(),
                },
                other => other,
            })?;
    sqlx::query("UPDATE conversations SET push_preview = $2 WHERE id = $1")
        .bind(conversation.id)
        .bind(request.push_preview)
        .execute(&state.pool)
        .await
        .map_err(db_error)?;
    Ok(Json(json!({
        "conversationId": conversation.id,
        "pushPreview": request.push_preview,
    })))
}

/// The conversation `id`, if it exists and `user_id` is an active member of it.
pub async fn member_of(
    state: &AppState,
    id: &str,
    user_id: &str,
) -> Result<Arc<ConversationFacts>, Rejection> {
    let not_found = || Rejection::ConversationNotFound {
        conversation_id: id.to_string(),
    };
    let uuid = Uuid::parse_str(id).map_err(|_| not_found())?;
    let conversation = state
        .facts
        .conversation(uuid)
        .await?
        .ok_or_else(not_found)?;
    if !conversation.active_members.contains(user_id) {
        return Err(Rejection::NotConversationMember {
            user_id: user_id.into(),
            conversation_id: id.into(),
        });
    }
    Ok(conversation)
}

fn active(conversation: &ConversationFacts) -> Result<(), Rejection> {
    if conversation.is_active {
        Ok(())
    } else {
        Err(Rejection::ConversationInactive {
            conversation_id: conversation.id.to_string(),
        })
    }
}

/// Announces the change and answers with the conversation as it is now.
async fn changed(
    state: &AppState,
    before: &ConversationFacts,
) -> Result<Json<ConversationView>, ApiError> {
    state
        .facts
        .announce(Invalidation::conversation(before.id))
        .await;
    let now = state.facts.conversation(before.id).await?.ok_or_else(|| {
        Rejection::ConversationNotFound {
            conversation_id: before.id.to_string(),
        }
    })?;
    Ok(Json(ConversationView {
        conversation_id: now.id,
        kind: now.kind.clone(),
        is_active: now.is_active,
        members: now.active_members.iter().cloned().collect(),
        created_at: None,
        push_preview: None,
    }))
}

pub(crate) fn invalid(message: &str, field: &str) -> Rejection {
    Rejection::InvalidSchema {
        message: message.into(),
        details: json!({"field": field}),
    }
}
