//! The `devices` table: the push tokens users registered (the gateway writes them), read to
//! schedule and send pushes, and cleaned of tokens a provider says are dead.

use hotpath_core::domain::Platform;
use sqlx::PgPool;
use uuid::Uuid;

/// `(user id, platform)` for every platform each of `users` has a device on.
pub(crate) async fn platforms_of(
    pool: &PgPool,
    users: &[&str],
) -> Result<Vec<(String, Platform)>, sqlx::Error> {
    sqlx::query_as("SELECT DISTINCT user_id, platform FROM devices WHERE user_id = ANY($1)")
        .bind(users)
        .fetch_all(pool)
        .await
}

/// `(token, app id, sandbox)` of `user_id`'s devices on `platform` that have not been pushed
/// message `message_id` yet (`push_deliveries`), the most recently registered first.
pub(crate) async fn not_yet_pushed(
    pool: &PgPool,
    user_id: &str,
    platform: Platform,
    message_id: Uuid,
) -> Result<Vec<(String, String, bool)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT d.token, d.app_id, d.sandbox FROM devices d
          WHERE d.user_id = $1 AND d.platform = $2
            AND NOT EXISTS (SELECT 1 FROM push_deliveries p
                             WHERE p.message_id = $3 AND p.token = d.token)
          ORDER BY d.updated_at DESC",
    )
    .bind(user_id)
    .bind(platform)
    .bind(message_id)
    .fetch_all(pool)
    .await
}

/// Deletes `token` if it still belongs to `user_id` (it may have been registered again, by
/// someone else, meanwhile).
pub(crate) async fn delete(pool: &PgPool, user_id: &str, token: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM devices WHERE token = $1 AND user_id = $2")
        .bind(token)
        .bind(user_id)
        .execute(pool)
        .await?;
    Ok(())
}
