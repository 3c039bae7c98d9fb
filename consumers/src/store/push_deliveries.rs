//! The `push_deliveries` table: which device token was pushed which message, so a retried or
//! replayed push task never pushes a device twice. Rows are kept for a retention period and
//! then pruned.

use sqlx::PgPool;
use uuid::Uuid;

/// Remembers that `token` was pushed `message_id` (again: nothing changes).
pub(crate) async fn record(
    pool: &PgPool,
    message_id: Uuid,
    token: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO push_deliveries (message_id, token) VALUES ($1, $2)
         ON CONFLICT DO NOTHING",
    )
    .bind(message_id)
    .bind(token)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes what was sent more than `retention_days` ago; returns how many rows went.
pub(crate) async fn prune(pool: &PgPool, retention_days: i32) -> Result<u64, sqlx::Error> {
    let pruned = sqlx::query(
        "DELETE FROM push_deliveries WHERE sent_at < now() - make_interval(days => $1)",
    )
    .bind(retention_days)
    .execute(pool)
    .await?;
    Ok(pruned.rows_affected())
}
