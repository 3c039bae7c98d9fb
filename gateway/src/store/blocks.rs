//! The `blocks` table: one row per (blocker, blocked) pair, made by the blocker.
//!
//! A block keeps both users apart whichever made it, so the facts cache reads both directions;
//! the blocker alone lists and lifts it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// A block as the row holds it after [`insert`], new or not.
#[derive(Debug)]
pub struct Recorded {
    pub created_at: DateTime<Utc>,
    /// Whether this insert made the row (it did not exist before).
    pub inserted: bool,
}

/// Records that `blocker_id` blocks `blocked_id`; a block that already existed keeps its
/// time.
pub async fn insert(
    pool: &PgPool,
    blocker_id: &str,
    blocked_id: &str,
) -> Result<Recorded, sqlx::Error> {
    // Always the row, new or old; `xmax = 0` only on a row this statement inserted (an updated
    // row carries the id of the transaction that replaced its previous version).
    let (created_at, inserted): (DateTime<Utc>, bool) = sqlx::query_as(
        "INSERT INTO blocks (blocker_id, blocked_id) VALUES ($1, $2)
         ON CONFLICT (blocker_id, blocked_id) DO UPDATE SET blocked_id = EXCLUDED.blocked_id
         RETURNING created_at, xmax = 0",
    )
    .bind(blocker_id)
    .bind(blocked_id)
    .fetch_one(pool)
    .await?;
    Ok(Recorded {
        created_at,
        inserted,
    })
}

/// Lifts the block `blocker_id` made of `blocked_id`; the rows deleted (0 or 1).
pub async fn delete(pool: &PgPool, blocker_id: &str, blocked_id: &str) -> Result<u64, sqlx::Error> {
    let deleted = sqlx::query("DELETE FROM blocks WHERE blocker_id = $1 AND blocked_id = $2")
        .bind(blocker_id)
        .bind(blocked_id)
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected())
}

/// One entry of `GET /v1/blocks`: a user the caller blocked, and since when.
#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct BlockedUser {
    pub user_id: String,
    pub created_at: DateTime<Utc>,
}

/// The blocks `blocker_id` made, newest first.
pub async fn made_by(pool: &PgPool, blocker_id: &str) -> Result<Vec<BlockedUser>, sqlx::Error> {
    sqlx::query_as(
        "SELECT blocked_id AS user_id, created_at FROM blocks WHERE blocker_id = $1
          ORDER BY created_at DESC, blocked_id",
    )
    .bind(blocker_id)
    .fetch_all(pool)
    .await
}

/// Everyone `user_id` has blocked or is blocked by.
pub async fn either_way(pool: &PgPool, user_id: &str) -> Result<Vec<String>, sqlx::Error> {
    let others: Vec<(String,)> = sqlx::query_as(
        "SELECT blocked_id FROM blocks WHERE blocker_id = $1
         UNION
         SELECT blocker_id FROM blocks WHERE blocked_id = $1",
    )
    .bind(user_id)
    .fetch_all(pool)
    .await?;
    Ok(others.into_iter().map(|(id,)| id).collect())
}
