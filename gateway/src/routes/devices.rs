//! The devices a user registered for push notifications: register (or refresh) a token, list
//! them, forget one.
//!
//! A push token belongs to one app installation, so to one user at a time: registering a token
//! that another user had moves it to the caller (the newest sign-in on that phone wins). A user
//! keeps at most [`MAX_DEVICES_PER_USER`]; registering one more forgets the least recently
//! refreshed, which bounds the fan-out of every push. Tokens are credentials for reaching
//! someone's phone: they are never logged, and never echoed in an error.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use hotpath_core::names::DEVICES_CHANGED_SUBJECT;
use hotpath_core::rejection::Rejection;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::http::{ApiError, authenticate, db_error, read_json, typed};
use crate::state::AppState;

/// The most devices one user keeps; older registrations beyond it are forgotten.
pub const MAX_DEVICES_PER_USER: i64 = 20;

/// The longest token accepted, of any platform.
const MAX_TOKEN_CHARS: usize = 4096;

/// APNS tokens are hex; today 64 characters (32 bytes), with room for Apple to grow them.
const APNS_TOKEN_CHARS: std::ops::RangeInclusive<usize> = 64..=200;

const MAX_APP_ID_CHARS: usize = 255;

/// Neither this nor [`DeviceView`] is `Debug`, so no log line can print a token by accident.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RegisterDevice {
    platform: String,
    token: String,
    app_id: String,
    #[serde(default)]
    sandbox: bool,
}

#[derive(Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct DeviceView {
    pub token: String,
    /// `apns` or `fcm`.
    pub platform: String,
    /// The APNS topic (bundle id) or the FCM app id the token was issued for.
    pub app_id: String,
    /// APNS only: the token belongs to a development build and goes to Apple's sandbox.
    pub sandbox: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `POST /v1/devices`: registers the caller's device, or refreshes it; 201 when the token is
/// new, 200 when it was known (to the caller or, until now, to someone else).
pub async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<DeviceView>), ApiError> {
    let user_id = authenticate(&state, &headers).await?;
    let mut request: RegisterDevice = typed(read_json(&state, &headers, body).await?)?;
    validate(&request)?;
    if request.platform == "apns" {
        request.token = apns_token(&request.token);
    }

    let mut tx = state.pool.begin().await.map_err(db_error)?;
    // `xmax = 0` only on a row this statement inserted: an updated row carries the id of the
    // transaction that replaced its previous version.
    let DeviceRow { device, inserted } = sqlx::query_as(
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
    .bind(&request.token)
    .bind(&request.platform)
    .bind(&user_id)
    .bind(&request.app_id)
    .bind(request.sandbox)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    // The device just registered always stays, with the most recently refreshed of the others.
    // Two registrations of the same user at the same moment may each keep their own and leave
    // one too many behind for a while; the next registration trims it.
    let forgotten = sqlx::query(
        "DELETE FROM devices
          WHERE user_id = $1 AND token <> $2
            AND token NOT IN (SELECT token FROM devices WHERE user_id = $1 AND token <> $2
                               ORDER BY updated_at DESC, token LIMIT $3)",
    )
    .bind(&user_id)
    .bind(&device.token)
    .bind(MAX_DEVICES_PER_USER - 1)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?
    .rows_affected();
    tx.commit().await.map_err(db_error)?;
    if forgotten > 0 {
        tracing::info!(user_id = %user_id, forgotten, "forgot devices beyond the per-user limit");
    }
    // The delivery consumers cache who has devices; a user who had none must be pushed from
    // now on. Best effort: a lost announcement is bounded by that cache's time to live.
    let changed = json!({ "userId": user_id }).to_string();
    if let Err(error) = state
        .nats
        .publish(DEVICES_CHANGED_SUBJECT, changed.into())
        .await
    {
        tracing::debug!(%error, "device change not announced");
    }

    let status = if inserted {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(device)))
}

/// `GET /v1/devices`: the caller's devices, the most recently registered first.
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let user_id = authenticate(&state, &headers).await?;
    let devices: Vec<DeviceView> = sqlx::query_as(
        "SELECT token, platform, app_id, sandbox, created_at, updated_at
           FROM devices WHERE user_id = $1
          ORDER BY updated_at DESC, token",
    )
    .bind(&user_id)
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)?;
    Ok(Json(json!({ "devices": devices })))
}

/// `DELETE /v1/devices/{token}`: forgets one of the caller's devices (at sign-out). Someone
/// else's token is as unknown as a made-up one.
///
/// The path does not say the platform, so the token is looked up as given (an FCM token is
/// opaque, its case part of it) and, for APNS rows only, in the form registration stored.
pub async fn remove(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Result<StatusCode, ApiError> {
    let user_id = authenticate(&state, &headers).await?;
    let deleted = sqlx::query(
        "DELETE FROM devices
          WHERE user_id = $2 AND (token = $1 OR (platform = 'apns' AND token = $3))",
    )
    .bind(&token)
    .bind(&user_id)
    .bind(apns_token(&token))
    .execute(&state.pool)
    .await
    .map_err(db_error)?
    .rows_affected();
    if deleted == 0 {
        return Err(Rejection::DeviceNotFound.into());
    }
    Ok(StatusCode::NO_CONTENT)
}

/// An APNS token as it is stored: hex, which Apple's clients print in either case, kept in
/// lower case so that one device is one row and every spelling finds it.
fn apns_token(token: &str) -> String {
    token.to_ascii_lowercase()
}

/// A device as the upsert returns it, with whether the row is new.
#[derive(sqlx::FromRow)]
struct DeviceRow {
    #[sqlx(flatten)]
    device: DeviceView,
    inserted: bool,
}

/// Checks what Postgres cannot: the token's shape for its platform, the app id's alphabet.
/// Messages name the rule, never the token.
fn validate(request: &RegisterDevice) -> Result<(), Rejection> {
    let is_apns = match request.platform.as_str() {
        "apns" => true,
        "fcm" => false,
        _ => return Err(invalid("platform must be apns or fcm", "platform")),
    };
    let token = &request.token;
    if token.is_empty() || token.len() > MAX_TOKEN_CHARS {
        return Err(invalid(
            &format!("token must be 1 to {MAX_TOKEN_CHARS} characters"),
            "token",
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "token must be visible ASCII without whitespace",
            "token",
        ));
    }
    if is_apns
        && (!APNS_TOKEN_CHARS.contains(&token.len())
            || !token.len().is_multiple_of(2)
            || !token.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(invalid(
            "an APNS token is an even number of hex digits, 64 to 200 of them",
            "token",
        ));
    }
    let app_id = &request.app_id;
    if app_id.is_empty()
        || app_id.len() > MAX_APP_ID_CHARS
        || !app_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            &format!("appId must be 1 to {MAX_APP_ID_CHARS} of A-Z a-z 0-9 . _ -"),
            "appId",
        ));
    }
    if request.sandbox && !is_apns {
        return Err(invalid("sandbox is for APNS tokens only", "sandbox"));
    }
    Ok(())
}

fn invalid(message: &str, field: &str) -> Rejection {
    Rejection::InvalidSchema {
        message: message.into(),
        details: json!({"field": field}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(platform: &str, token: &str, app_id: &str, sandbox: bool) -> RegisterDevice {
        RegisterDevice {
            platform: platform.into(),
            token: token.into(),
            app_id: app_id.into(),
            sandbox,
        }
    }

    fn field_of(result: Result<(), Rejection>) -> Option<String> {
        match result {
            Ok(()) => None,
            Err(rejection) => Some(rejection.details()["field"].as_str()?.to_string()),
        }
    }

    #[test]
    fn well_formed_registrations_pass() {
        let apns = "ab".repeat(32);
        assert_eq!(
            field_of(validate(&request("apns", &apns, "com.example.App", true))),
            None
        );
        assert_eq!(
            field_of(validate(&request("fcm", "d1:APA91b-x_y", "app-1", false))),
            None
        );
        assert_eq!(
            field_of(validate(&request("apns", &"F".repeat(200), "a", false))),
            None
        );
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let apns = "ab".repeat(32);
        let cases = [
            (request("webpush", "t", "a", false), "platform"),
            (request("fcm", "", "a", false), "token"),
            (request("fcm", &"t".repeat(4097), "a", false), "token"),
            (request("fcm", "with space", "a", false), "token"),
            (request("fcm", "tab\there", "a", false), "token"),
            (request("fcm", "café", "a", false), "token"),
            (request("apns", &"ab".repeat(31), "a", false), "token"),
            (request("apns", &"a".repeat(65), "a", false), "token"),
            (request("apns", &"ab".repeat(101), "a", false), "token"),
            (request("apns", &"zz".repeat(32), "a", false), "token"),
            (request("fcm", "t", "", false), "appId"),
            (request("fcm", "t", &"a".repeat(256), false), "appId"),
            (request("fcm", "t", "com/example", false), "appId"),
            (request("fcm", "t", "a", true), "sandbox"),
            (request("apns", &apns, "bad id", false), "appId"),
        ];
        for (case, (request, field)) in cases.iter().enumerate() {
            assert_eq!(
                field_of(validate(request)).as_deref(),
                Some(*field),
                "case {case}"
            );
        }
    }
}
