//! The request body: the [`BoundedJson`] extractor.
//!
//! A body is read bounded in size (`HOTPATH_MAX_BODY_BYTES`) and in time
//! (`HOTPATH_HTTP_BODY_TIMEOUT_SECS`) before it is parsed. A declared `Content-Length` over the
//! limit is refused (413) before a byte is read; an undeclared (chunked) body is cut off as soon
//! as it passes the limit, so a hostile client can never make the gateway buffer more than the
//! limit.
//!
//! Two timeouts bound a slow body. The router's `RequestBodyTimeoutLayer` (a tower layer) bounds
//! each gap between frames; the whole body must also arrive within the same time from when the
//! handler starts reading it, which only the reader can know, so that deadline lives here. A
//! client that trickles a byte at a time gets 408 and its connection closed, instead of holding
//! the request open.
//!
//! The body is parsed in two steps, each with its own `INVALID_SCHEMA` message: first as JSON
//! (with the line and column of a syntax error), then as the route's type (with serde's
//! complaint about the field).

use axum::extract::{FromRequest, Request};
use axum::http::HeaderMap;
use axum::http::header::CONTENT_LENGTH;
use hotpath_core::rejection::Rejection;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tower_http::timeout::TimeoutError;

use super::ApiError;
use crate::state::AppState;

/// A JSON body of type `T`, read within the gateway's size and time bounds. Must be the last
/// argument of a handler: reading it consumes the request.
#[derive(Debug)]
pub struct BoundedJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for BoundedJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let (parts, body) = request.into_parts();
        let json = read_json(state, &parts.headers, body).await?;
        Ok(BoundedJson(typed(json)?))
    }
}

/// Reads the body within the bounds and parses it as JSON.
async fn read_json(
    state: &AppState,
    headers: &HeaderMap,
    body: axum::body::Body,
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
pub fn typed<T: DeserializeOwned>(value: Value) -> Result<T, Rejection> {
    serde_json::from_value(value).map_err(|error| Rejection::InvalidSchema {
        message: error.to_string(),
        details: serde_json::json!({}),
    })
}
