//! Blocks: a user blocks another, lists the blocks they made, lifts one.
//!
//! A block keeps a pair apart, whichever of the two made it: neither is a recipient of the
//! other's messages (`routes::send` leaves them out), so in a group the others still hear both,
//! and a direct message between them is refused (`USER_BLOCKED`, the `authz` policy). Each user
//! sees and lifts only the blocks they made; who blocked them is not listed. Every change is
//! announced like a membership change, so all gateways drop both users' cached block facts
//! before the next send.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use hotpath_core::auth::is_valid_user_id;
use hotpath_core::rejection::Rejection;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::conversations::invalid;
use crate::facts::Invalidation;
use crate::http::{ApiError, authenticate, db_error, read_json, typed};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BlockRequest {
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

/// One entry of `GET /v1/blocks`.
#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct BlockedUser {
    pub user_id: String,
    pub created_at: DateTime<Utc>,
}

/// `POST /v1/blocks`: the caller blocks `userId`. 201 with the new block; 200 with the block as
/// it was when it already existed, so a retried request is no error and keeps its first time.
pub async fn block(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<BlockView>), ApiError> {
    let user_id = authenticate(&state, &headers).await?;
    let request: BlockRequest = typed(read_json(&state, &headers, body).await?)?;
    let other = other_user(&user_id, &request.user_id)?;
    // Always the row, new or old; `xmax = 0` only on a row this statement inserted (an updated
    // row carries the id of the transaction that replaced its previous version).
    let (created_at, inserted): (DateTime<Utc>, bool) = sqlx::query_as(
        "INSERT INTO blocks (blocker_id, blocked_id) VALUES ($1, $2)
         ON CONFLICT (blocker_id, blocked_id) DO UPDATE SET blocked_id = EXCLUDED.blocked_id
         RETURNING created_at, xmax = 0",
    )
    .bind(&user_id)
    .bind(other)
    .fetch_one(&state.pool)
    .await
    .map_err(db_error)?;
    let status = if inserted {
        announce(&state, &user_id, other).await;
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let view = BlockView {
        blocker_id: user_id,
        blocked_id: other.to_string(),
        created_at,
    };
    Ok((status, Json(view)))
}

/// `DELETE /v1/blocks/{userId}`: the caller lifts their block of `userId`; 204, or 404
/// `BLOCK_NOT_FOUND` when they had none (a block the other user made stays: it is theirs).
pub async fn unblock(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(other): Path<String>,
) -> Result<StatusCode, ApiError> {
    let user_id = authenticate(&state, &headers).await?;
    if !is_valid_user_id(&other) {
        return Err(invalid("not a valid user id", "userId").into());
    }
    let deleted = sqlx::query("DELETE FROM blocks WHERE blocker_id = $1 AND blocked_id = $2")
        .bind(&user_id)
        .bind(&other)
        .execute(&state.pool)
        .await
        .map_err(db_error)?
        .rows_affected();
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
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let user_id = authenticate(&state, &headers).await?;
    let blocks: Vec<BlockedUser> = sqlx::query_as(
        "SELECT blocked_id AS user_id, created_at FROM blocks WHERE blocker_id = $1
          ORDER BY created_at DESC, blocked_id",
    )
    .bind(&user_id)
    .fetch_all(&state.pool)
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
        .announce(Invalidation::users(vec![
            user_id.to_string(),
            other.to_string(),
        ]))
        .await;
}
