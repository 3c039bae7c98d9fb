//! The devices a user registered for push notifications: register (or refresh) a token, list
//! them, forget one.
//!
//! A push token belongs to one app installation, so to one user at a time: registering a token
//! that another user had moves it to the caller (the newest sign-in on that phone wins). A user
//! keeps at most [`MAX_DEVICES_PER_USER`]; registering one more forgets the least recently
//! refreshed, which bounds the fan-out of every push. Tokens are credentials for reaching
//! someone's phone: they are never logged, and never echoed in an error.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use hotpath_core::announcements::{Announcement, DevicesChanged};
use hotpath_core::domain::Platform;
use hotpath_core::names::DEVICES_CHANGED_SUBJECT;
use hotpath_core::rejection::Rejection;
use serde::Deserialize;
use serde_json::json;

use crate::http::{ApiError, AuthUser, BoundedJson, Path, db_error};
use crate::state::AppState;
use crate::store::devices::{self, DeviceView, NewDevice, Registered};

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
pub struct RegisterDevice {
    platform: String,
    token: String,
    app_id: String,
    #[serde(default)]
    sandbox: bool,
}

/// `POST /v1/devices`: registers the caller's device, or refreshes it; 201 when the token is
/// new, 200 when it was known (to the caller or, until now, to someone else).
pub async fn register(
    State(state): State<AppState>,
    AuthUser(user_id): AuthUser,
    BoundedJson(mut request): BoundedJson<RegisterDevice>,
) -> Result<(StatusCode, Json<DeviceView>), ApiError> {
    let platform = validate(&request)?;
    if platform == Platform::Apns {
        request.token = apns_token(&request.token);
    }

    let mut tx = state.pool.begin().await.map_err(db_error)?;
    let new_device = NewDevice {
        token: &request.token,
        platform,
        user_id: &user_id,
        app_id: &request.app_id,
        sandbox: request.sandbox,
    };
    let Registered { device, inserted } = devices::upsert(&mut tx, &new_device)
        .await
        .map_err(db_error)?;
    // The device just registered always stays, with the most recently refreshed of the others.
    // Two registrations of the same user at the same moment may each keep their own and leave
    // one too many behind for a while; the next registration trims it.
    let forgotten =
        devices::forget_beyond(&mut tx, &user_id, &device.token, MAX_DEVICES_PER_USER - 1)
            .await
            .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    if forgotten > 0 {
        tracing::info!(user_id = %user_id, forgotten, "forgot devices beyond the per-user limit");
    }
    // The delivery consumers cache who has devices; a user who had none must be pushed from
    // now on. Best effort: a lost announcement is bounded by that cache's time to live.
    let changed = DevicesChanged {
        user_id: user_id.to_string(),
    };
    if let Err(error) = state
        .nats
        .publish(DEVICES_CHANGED_SUBJECT, changed.encode().into())
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
    AuthUser(user_id): AuthUser,
) -> Result<Json<serde_json::Value>, ApiError> {
    let devices = devices::of_user(&state.pool, &user_id)
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
    Path(token): Path<String>,
    AuthUser(user_id): AuthUser,
) -> Result<StatusCode, ApiError> {
    let deleted = devices::delete(&state.pool, &user_id, &token, &apns_token(&token))
        .await
        .map_err(db_error)?;
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

/// Checks what Postgres cannot: the platform, the token's shape for it, the app id's
/// alphabet; answers the platform. Messages name the rule, never the token.
fn validate(request: &RegisterDevice) -> Result<Platform, Rejection> {
    let platform: Platform = request
        .platform
        .parse()
        .map_err(|_| invalid("platform must be apns or fcm", "platform"))?;
    let is_apns = platform == Platform::Apns;
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
    Ok(platform)
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

    fn field_of(result: Result<Platform, Rejection>) -> Option<String> {
        match result {
            Ok(_) => None,
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
