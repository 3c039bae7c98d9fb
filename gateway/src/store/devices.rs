//! The `devices` table: push tokens, one row per token, each belonging to one user at a time.

use chrono::{DateTime, Utc};
use hotpath_core::domain::Platform;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

/// A registered device, as its owner sees it. Not `Debug`, so no log line can print a token by
/// accident.
#[derive(Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct DeviceView {
    pub token: String,
    pub platform: Platform,
    /// The APNS topic (bundle id) or the FCM app id the token was issued for.
    pub app_id: String,
    /// APNS only: the token belongs to a development build and goes to Apple's sandbox.
    pub sandbox: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A device to register, as validated by the route.
pub struct NewDevice<'a> {
    pub token: &'a str,
    pub platform: Platform,
    pub user_id: &'a str,
    pub app_id: &'a str,
    pub sandbox: bool,
}

/// A device as the upsert returns it, with whether the row is new.
#[derive(sqlx::FromRow)]
pub struct Registered {
    #[sqlx(flatten)]
    pub device: DeviceView,
    pub inserted: bool,
}

/// Registers the device, or refreshes it; a token another user had moves to this one.
pub async fn upsert(
    conn: &mut PgConnection,
    device: &NewDevice<'_>,
) -> Result<Registered, sqlx::Error> {
    // `xmax = 0` only on a row this statement inserted: an updated row carries the id of the
    // transaction that replaced its previous version.
    sqlx::query_as(
        "INSERT INTO devices (token, platform, user_id, app_id, sandbox)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (token) DO UPDATE
            SET platform = EXCLUDED.platform,
                user_id = EXCLUDED.user_id,
                app_id = EXCLUDED.app_id,
                sandbox = EXCLUDED.sandbox,
                updated_at = now()
         RETURNING token, platform, app_id, sandbox, created_at, updated_at,
                   (xmax = 0) AS inserted",
    )
    .bind(device.token)
    .bind(device.platform)
    .bind(device.user_id)
    .bind(device.app_id)
    .bind(device.sandbox)
    .fetch_one(conn)
    .await
}

/// Deletes the user's devices other than `kept_token` beyond the `others_kept` most recently
/// refreshed; the rows deleted.
pub async fn forget_beyond(
    conn: &mut PgConnection,
    user_id: &str,
    kept_token: &str,
    others_kept: i64,
) -> Result<u64, sqlx::Error> {
    let deleted = sqlx::query(
        "DELETE FROM devices
          WHERE user_id = $1 AND token <> $2
            AND token NOT IN (SELECT token FROM devices WHERE user_id = $1 AND token <> $2
                               ORDER BY updated_at DESC, token LIMIT $3)",
    )
    .bind(user_id)
    .bind(kept_token)
    .bind(others_kept)
    .execute(conn)
    .await?;
    Ok(deleted.rows_affected())
}

/// The user's devices, the most recently refreshed first.
pub async fn of_user(pool: &PgPool, user_id: &str) -> Result<Vec<DeviceView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT token, platform, app_id, sandbox, created_at, updated_at
           FROM devices WHERE user_id = $1
          ORDER BY updated_at DESC, token",
    )
    .bind(user_id)
    .fetch_all(pool)
    .await
}

/// Deletes the user's device with `token` as given or, for APNS rows only, as `apns_token`
/// (its stored spelling); the rows deleted.
pub async fn delete(
    pool: &PgPool,
    user_id: &str,
    token: &str,
    apns_token: &str,
) -> Result<u64, sqlx::Error> {
    let deleted = sqlx::query(
        "DELETE FROM devices
          WHERE user_id = $2 AND (token = $1 OR (platform = 'apns' AND token = $3))",
    )
    .bind(token)
    .bind(user_id)
    .bind(apns_token)
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
}
