//! The minimum of conversation management needed to send anything: create a conversation,
//! list the caller's, add and remove members, deactivate it (blocks are `routes::blocks`). Every change of
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
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use hotpath_core::auth::is_valid_user_id;
use hotpath_core::domain::ConversationKind;
use hotpath_core::rejection::Rejection;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use hotpath_core::announcements::FactsChanged;

use crate::facts::ConversationFacts;
use crate::http::{ApiError, AuthUser, BoundedJson, Path, Query, db_error};
use crate::state::AppState;
use crate::store::conversations;

/// The body of `POST /v1/conversations`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateConversation {
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

/// The body of `POST /v1/conversations/{id}/members`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddMember {
    user_id: String,
}

/// The body of `PUT /v1/conversations/{id}/settings`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    push_preview: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationView {
    pub conversation_id: Uuid,
    #[serde(rename = "type")]
    pub kind: ConversationKind,
    pub is_active: bool,
    pub members: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// Whether pushes may show message content. Like `created_at`, only in the answer to a
    /// creation: the cached facts that answer membership changes do not carry it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_preview: Option<bool>,
}

/// The authenticated user of a membership change, within their budget of membership changes:
/// checked before the body is read.
pub struct MembershipEditor(pub String);

impl FromRequestParts<AppState> for MembershipEditor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let AuthUser(user_id) = AuthUser::from_request_parts(parts, state).await?;
        state.membership_rate.check(&user_id)?;
        Ok(MembershipEditor(user_id))
    }
}

/// `POST /v1/conversations`: `direct` (exactly two people) or `group`; the creator is a member.
pub async fn create(
    State(state): State<AppState>,
    MembershipEditor(user_id): MembershipEditor,
    BoundedJson(request): BoundedJson<CreateConversation>,
) -> Result<(StatusCode, Json<ConversationView>), ApiError> {
    let mut members: BTreeSet<String> = BTreeSet::new();
    members.insert(user_id.clone());
    for member in &request.members {
        if !is_valid_user_id(member) {
            return Err(invalid(&format!("not a valid user id: {member:?}"), "members").into());
        }
        members.insert(member.clone());
    }
    let kind: ConversationKind = request
        .kind
        .parse()
        .map_err(|_| invalid("type must be direct or group", "type"))?;
    if kind == ConversationKind::Direct && members.len() != 2 {
        return Err(invalid(
            "a direct conversation has exactly two distinct members",
            "members",
        )
        .into());
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
    let created_at = conversations::insert(&mut tx, id, kind, &user_id, request.push_preview)
        .await
        .map_err(db_error)?;
    conversations::insert_members(&mut tx, id, &member_list)
        .await
        .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    state.facts.announce(FactsChanged::conversation(id)).await;

    let view = ConversationView {
        conversation_id: id,
        kind,
        is_active: true,
        members: member_list,
        created_at: Some(created_at),
        push_preview: Some(request.push_preview),
    };
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<i64>,
}

/// Most conversations one `GET /v1/conversations` lists.
pub const MAX_LISTED_CONVERSATIONS: i64 = 500;

/// `GET /v1/conversations`: the conversations the caller is an active member of, newest first,
/// each with its members and `lastSeq` (where a client starts reading history backwards).
pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
    AuthUser(user_id): AuthUser,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = query
        .limit
        .unwrap_or(100)
        .clamp(1, MAX_LISTED_CONVERSATIONS);
    let listed = conversations::of_member(&state.queries, &user_id, limit)
        .await
        .map_err(db_error)?;
    Ok(Json(json!({ "conversations": listed })))
}

/// `POST /v1/conversations/{id}/members`: an active member adds someone to an active group
/// that has room (adding someone who is already a member changes nothing).
pub async fn add_member(
    State(state): State<AppState>,
    Path(id): Path<String>,
    MembershipEditor(user_id): MembershipEditor,
    BoundedJson(request): BoundedJson<AddMember>,
) -> Result<Json<ConversationView>, ApiError> {
    let conversation = member_of(&state, &id, &user_id).await?;
    active(&conversation)?;
    if !is_valid_user_id(&request.user_id) {
        return Err(invalid("not a valid user id", "userId").into());
    }
    if conversation.kind == ConversationKind::Direct
        && !conversation.active_members.contains(&request.user_id)
    {
        return Err(invalid("members of a direct conversation cannot change", "userId").into());
    }
    let mut tx = state.pool.begin().await.map_err(db_error)?;
    // Concurrent adds to one conversation count its members one after the other.
    conversations::lock(&mut tx, conversation.id)
        .await
        .map_err(db_error)?;
    let membership = conversations::membership(&mut tx, conversation.id, &request.user_id)
        .await
        .map_err(db_error)?;
    if !membership.is_member && membership.active_members as usize >= state.config.max_members {
        return Err(Rejection::ConversationFull {
            max_members: state.config.max_members,
            conversation_id: Some(conversation.id.to_string()),
        }
        .into());
    }
    conversations::add_member(&mut tx, conversation.id, &request.user_id)
        .await
        .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    changed(&state, &conversation).await
}

/// `DELETE /v1/conversations/{id}/members/{userId}`: an active member removes someone (or
/// leaves). Removing someone who is not a member is a no-op.
pub async fn remove_member(
    State(state): State<AppState>,
    Path((id, member)): Path<(String, String)>,
    MembershipEditor(user_id): MembershipEditor,
) -> Result<Json<ConversationView>, ApiError> {
    let conversation = member_of(&state, &id, &user_id).await?;
    conversations::remove_member(&state.pool, conversation.id, &member)
        .await
        .map_err(db_error)?;
    changed(&state, &conversation).await
}

/// `POST /v1/conversations/{id}/deactivate`: no more messages can be sent to it.
pub async fn deactivate(
    State(state): State<AppState>,
    Path(id): Path<String>,
    AuthUser(user_id): AuthUser,
) -> Result<Json<ConversationView>, ApiError> {
    let conversation = member_of(&state, &id, &user_id).await?;
    conversations::deactivate(&state.pool, conversation.id)
        .await
        .map_err(db_error)?;
    changed(&state, &conversation).await
}

/// `PUT /v1/conversations/{id}/settings`: an active member decides whether the conversation's
/// pushes may show message content (`pushPreview`). With `false`, a push says only that there is
/// a new message. Nothing is announced: no gateway caches the setting.
pub async fn update_settings(
    State(state): State<AppState>,
    Path(id): Path<String>,
    AuthUser(user_id): AuthUser,
    BoundedJson(request): BoundedJson<Settings>,
) -> Result<Json<serde_json::Value>, ApiError> {
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
    conversations::set_push_preview(&state.pool, conversation.id, request.push_preview)
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
        .announce(FactsChanged::conversation(before.id))
        .await;
    let now = state.facts.conversation(before.id).await?.ok_or_else(|| {
        Rejection::ConversationNotFound {
            conversation_id: before.id.to_string(),
        }
    })?;
    Ok(Json(ConversationView {
        conversation_id: now.id,
        kind: now.kind,
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
