//! Path parameters and query strings: the [`Path`] and [`Query`] extractors.
//!
//! axum's own extractors answer a malformed path segment (one that is not UTF-8 once
//! percent-decoded) or query string (`?limit=ten`) in plain text. These wrap them so that the
//! refusal is the API's error like every other: 400 `INVALID_SCHEMA`, with axum's reason as the
//! message and the part of the request it was in as `details.in`. A handler writes
//! `Path(id): Path<String>` as with axum's.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use hotpath_core::rejection::Rejection;
use serde::de::DeserializeOwned;

use super::ApiError;

/// The route's path parameters as `T`.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(refused(rejection.status(), rejection.body_text(), "path")),
        }
    }
}

/// The request's query string as `T`.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::try_from_uri(&parts.uri) {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(refused(rejection.status(), rejection.body_text(), "query")),
        }
    }
}

/// The client's mistake as 400 `INVALID_SCHEMA`; anything else axum refuses with (a route
/// declared with parameters its handler does not match) is the server's own fault.
fn refused(status: StatusCode, reason: String, part: &str) -> ApiError {
    if status.is_client_error() {
        ApiError(Rejection::InvalidSchema {
            message: reason,
            details: serde_json::json!({ "in": part }),
        })
    } else {
        ApiError(Rejection::Internal { reason })
    }
}
