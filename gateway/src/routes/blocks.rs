//! Blocks: a user blocks another, lists the blocks they made, lifts one.
//!
//! A block keeps a pair apart, whichever of the two made it: neither is a recipient of the
//! other's messages (`routes::send` leaves them out), so in a group the others still hear both,
//! and a direct message between them is refused (`USER_BLOCKED`, the `authz` policy). Each user
//! sees and lifts only the blocks they made; who blocked them is not listed. Every change is
//! announced like a membership change, so all gateways drop both users' cached block facts
//! before the next send.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use hotpath_core::auth::is_valid_user_id;
use hotpath_core::rejection::Rejection;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::conversations::invalid;
use crate::http::{ApiError, AuthUser, BoundedJson, Path, db_error};
use crate::state::AppState;
use crate::store::blocks;
use hotpath_core::announcements::FactsChanged;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlockRequest {
    user_id: String,
}

/// A block as its maker sees it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockView {
    pub blocker_id: String,
    pub blocked_id: String,
    pub created_at: DateTime<Utc>,
}

/// `POST /v1/blocks`: the caller blocks `userId`. 201 with the new block; 200 with the block as
/// it was when it already existed, so a retried request is no error and keeps its first time.
pub async fn block(
    State(state): State<AppState>,
    AuthUser(user_id): AuthUser,
    BoundedJson(request): BoundedJson<BlockRequest>,
) -> Result<(StatusCode, Json<BlockView>), ApiError> {
    let other = other_user(&user_id, &request.user_id)?;
    let recorded = blocks::insert(&state.pool, &user_id, other)
        .await
        .map_err(db_error)?;
    let status = if recorded.inserted {
        announce(&state, &user_id, other).await;
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let view = BlockView {
        blocker_id: user_id,
        blocked_id: other.to_string(),
        created_at: recorded.created_at,
    };
    Ok((status, Json(view)))
}

/// `DELETE /v1/blocks/{userId}`: the caller lifts their block of `userId`; 204, or 404
/// `BLOCK_NOT_FOUND` when they had none (a block the other user made stays: it is theirs).
pub async fn unblock(
    State(state): State<AppState>,
    Path(other): Path<String>,
    AuthUser(user_id): AuthUser,
) -> Result<StatusCode, ApiError> {
    if !is_valid_user_id(&other) {
        return Err(invalid("not a valid user id", "userId").into());
    }
    let deleted = blocks::delete(&state.pool, &user_id, &other)
        .await
        .map_err(db_error)?;
    if deleted == 0 {
        return Err(Rejection::BlockNotFound { user_id: other }.into());
    }
    announce(&state, &user_id, &other).await;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/blocks`: the blocks the caller made, newest first. Read from Postgres, not the
/// gateway's cache: the cache holds both directions without the time, and this is no hot path.
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user_id): AuthUser,
) -> Result<Json<serde_json::Value>, ApiError> {
    let blocks = blocks::made_by(&state.pool, &user_id)
        .await
        .map_err(db_error)?;
    Ok(Json(json!({ "blocks": blocks })))
}

/// The user to block: a valid user id other than the caller's own.
fn other_user<'a>(user_id: &str, other: &'a str) -> Result<&'a str, Rejection> {
    if !is_valid_user_id(other) {
        return Err(invalid("not a valid user id", "userId"));
    }
    if other == user_id {
        return Err(invalid("you cannot block yourself", "userId"));
    }
    Ok(other)
}

/// Both users' block facts changed: every gateway drops its copy of each.
async fn announce(state: &AppState, user_id: &str, other: &str) {
    state
        .facts
        .announce(FactsChanged::users(vec![
            user_id.to_string(),
            other.to_string(),
        ]))
        .await;
}
