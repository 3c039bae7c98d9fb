//! HTTP plumbing shared by the routes: rejections as responses, bounded body reading, auth.

use axum::Json;
use axum::body::Body;
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hotpath_core::rejection::Rejection;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;

use crate::state::AppState;

/// A rejection on its way to the client.
#[derive(Debug)]
pub struct ApiError(pub Rejection);

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> ApiError {
        ApiError(rejection)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let rejection = self.0;
        if let Rejection::Internal { reason } = &rejection {
            tracing::error!(%reason, "internal error");
        }
        let status =
            StatusCode::from_u16(rejection.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(rejection.body())).into_response();
        if let Some(seconds) = rejection.retry_after_secs() {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The authenticated user of a request. Waits on the network only for a token signed by a key
/// the identity provider's cached key set lacks (see [`TokenVerifier::verify_bearer_or_refetch`]).
///
/// [`TokenVerifier::verify_bearer_or_refetch`]: hotpath_core::auth::TokenVerifier::verify_bearer_or_refetch
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<String, Rejection> {
    let header = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    state
        .verifier
        .verify_bearer_or_refetch(header)
        .await
        .map(|verified| verified.user_id)
}

/// Reads at most `limit` bytes of body and parses them as JSON.
///
/// A declared `Content-Length` over the limit is refused before a byte is read; an undeclared
/// (chunked) body is cut off as soon as it passes the limit, so a hostile client can never make
/// the gateway buffer more than `limit` bytes.
pub async fn read_json(headers: &HeaderMap, body: Body, limit: usize) -> Result<Value, Rejection> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(Rejection::PayloadTooLarge { limit_bytes: limit });
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(Rejection::PayloadTooLarge { limit_bytes: limit });
        }
        Err(error) => {
            return Err(Rejection::InvalidSchema {
                message: format!("could not read the request body: {error}"),
                details: serde_json::json!({}),
            });
        }
    };
    serde_json::from_slice(&bytes).map_err(|error| Rejection::InvalidSchema {
        message: format!("request body is not valid JSON: {error}"),
        details: serde_json::json!({"line": error.line(), "column": error.column()}),
    })
}

/// Parses a typed body from already-read JSON, turning serde's complaint into INVALID_SCHEMA.
pub fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, Rejection> {
    serde_json::from_value(value).map_err(|error| Rejection::InvalidSchema {
        message: error.to_string(),
        details: serde_json::json!({}),
    })
}

/// A database error as the client should see it.
pub fn db_error(error: sqlx::Error) -> Rejection {
    if hotpath_core::db::is_transient(&error) {
        tracing::warn!(%error, "database unavailable");
        Rejection::ServiceUnavailable {
            reason: "the database is unavailable".into(),
            retry_after_secs: 1,
        }
    } else {
        Rejection::Internal {
            reason: error.to_string(),
        }
    }
}

/// The fallback for unknown routes, in the same error shape as everything else.
pub async fn not_found() -> ApiError {
    ApiError(Rejection::RouteNotFound)
}
