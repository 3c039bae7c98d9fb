//! Every rejection, logged in one place.
//!
//! Handlers and extractors only return `Err(ApiError)`; [`ApiError`]'s conversion into a
//! response leaves the [`Rejection`] in the response's extensions, and [`log_rejections`], a
//! layer over the whole router, reads it back. So no handler logs, and none can forget to: an
//! internal error is logged with its reason (which the client never sees), any other rejection
//! at debug level with its telemetry label. The send route counts its rejections the same way,
//! from the response, in its own layer ([`crate::routes::send::measured`]); the WebSocket's
//! `send` frames, which are not HTTP requests, call [`log`] and the same metrics directly.
//!
//! [`ApiError`]: super::ApiError

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use hotpath_core::rejection::Rejection;

/// The rejection a response answers, if it is one of ours.
pub fn rejection_of(response: &Response) -> Option<&Rejection> {
    response.extensions().get::<Rejection>()
}

/// The one log line of a rejection.
pub fn log(rejection: &Rejection) {
    match rejection {
        Rejection::Internal { reason } => tracing::error!(%reason, "internal error"),
        other => tracing::debug!(
            reason = other.telemetry_label(),
            status = other.status(),
            "request rejected"
        ),
    }
}

/// The router-wide layer: logs the rejection of every response that is one.
pub async fn log_rejections(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if let Some(rejection) = rejection_of(&response) {
        log(rejection);
    }
    response
}
