//! The `message_receipts` table: one row per (message, recipient), its `delivered_at` and
//! `read_at` each set once and never cleared, so recording a receipt again changes nothing.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// Whether any recipient of message `id` has reached `delivered`, and `read`, so far.
pub(crate) async fn reached(tx: &mut PgConnection, id: Uuid) -> Result<(bool, bool), sqlx::Error> {
    sqlx::query_as(
        "SELECT coalesce(bool_or(delivered_at IS NOT NULL), false),
                coalesce(bool_or(read_at IS NOT NULL), false)
           FROM message_receipts WHERE message_id = $1",
    )
    .bind(id)
    .fetch_one(tx)
    .await
}

/// Records that `user_id` got message `id` at `at` (and read it then, if `read`), keeping any
/// time already recorded.
pub(crate) async fn upsert(
    tx: &mut PgConnection,
    id: Uuid,
    user_id: &str,
    at: DateTime<Utc>,
    read: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO message_receipts (message_id, user_id, delivered_at, read_at)
         VALUES ($1, $2, $3, CASE WHEN $4 THEN $3::timestamptz END)
         ON CONFLICT (message_id, user_id) DO UPDATE
            SET delivered_at = coalesce(message_receipts.delivered_at, EXCLUDED.delivered_at),
                read_at = coalesce(message_receipts.read_at, EXCLUDED.read_at)",
    )
    .bind(id)
    .bind(user_id)
    .bind(at)
    .bind(read)
    .execute(tx)
    .await?;
    Ok(())
}
