//! HTTP plumbing shared by the routes: what every request goes through besides its handler.
//!
//! A handler is about its domain; what is the same for every request lives here, as axum
//! extractors (who is asking, [`auth`]; the bounded body, [`body`]) and as layers around the
//! router (logging rejections, [`rejections`]). A handler takes the user and the body as
//! arguments and answers `Result<_, ApiError>`: the status, code, message and `Retry-After` of
//! an error all come from its [`Rejection`], and the layers read the rejection back from the
//! response.

mod auth;
mod body;
mod params;
pub mod rejections;
mod verified_tokens;

use axum::Json;
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hotpath_core::rejection::Rejection;

pub use auth::AuthUser;
pub use body::{BoundedJson, typed};
pub use params::{Path, Query};
pub use verified_tokens::VerifiedTokens;

/// A rejection on its way to the client. Its response carries the [`Rejection`] in its
/// extensions, for [`rejections`].
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
        let status =
            StatusCode::from_u16(rejection.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(rejection.body())).into_response();
        if let Some(seconds) = rejection.retry_after_secs() {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        // For the layers that log and count rejections (`rejections`).
        response.extensions_mut().insert(rejection);
        response
    }
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

/// The fallback for a known route asked with a method it does not take; the router adds the
/// `Allow` header.
pub async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError(Rejection::MethodNotAllowed {
        method: method.to_string(),
    })
}
