//! HTTP plumbing shared by the routes: rejections as responses, bounded body reading, auth.

use axum::Json;
use axum::body::Body;
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hotpath_core::rejection::Rejection;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;
use tower_http::timeout::TimeoutError;

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

/// Reads the body, bounded in size (`HOTPATH_MAX_BODY_BYTES`) and in time
/// (`HOTPATH_HTTP_BODY_TIMEOUT_SECS`), and parses it as JSON.
///
/// A declared `Content-Length` over the limit is refused before a byte is read; an undeclared
/// (chunked) body is cut off as soon as it passes the limit, so a hostile client can never make
/// the gateway buffer more than the limit. The whole body must arrive within the timeout (the
/// router's tower layer only bounds each gap between its frames), so a client that trickles
/// a byte at a time gets 408 and its connection closed, instead of holding the request open.
pub async fn read_json(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, Rejection> {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.http_body_timeout();
    let too_late = || Rejection::RequestTimeout {
        timeout_secs: timeout.as_secs(),
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(Rejection::PayloadTooLarge { limit_bytes: limit });
    }
    let read = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await;
    let bytes = match read {
        Err(_elapsed) => return Err(too_late()),
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(Rejection::PayloadTooLarge { limit_bytes: limit });
        }
        Ok(Err(error)) if is_body_timeout(&*error) => return Err(too_late()),
        Ok(Err(error)) => {
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

/// True when a body error is, or was caused by, the body timeout layer's.
fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| e.is::<TimeoutError>())
}

/// Parses a typed body from already-read JSON, turning serde's complaint into INVALID_SCHEMA.
pub fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, Rejection> {
    serde_json::from_value(value).map_err(|error| Rejection::InvalidSchema {
        message: error.to_string(),
        details: serde_json::json!({}),
    })
}

/// A database error as the client should see it: 503 with Retry-After when waiting may
/// help (Postgres down, the pool busy past its acquire timeout, a statement past its
/// timeout), 500 otherwise.
pub fn db_error(error: sqlx::Error) -> Rejection {
    if hotpath_core::db::is_transient(&error) {
        tracing::warn!(%error, "database unavailable");
        let reason = if matches!(error, sqlx::Error::PoolTimedOut) {
            "the database is busy"
        } else if hotpath_core::db::is_query_cancelled(&error) {
            "the database did not answer in time"
        } else {
            "the database is unavailable"
        };
        Rejection::ServiceUnavailable {
            reason: reason.into(),
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
