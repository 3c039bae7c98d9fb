//! `GET /v1/ws`: the WebSocket (protocol in `docs/websocket.md`).
//!
//! The upgrade is authenticated like every other route, with the token in the
//! `Authorization: Bearer` header or, for browsers (which cannot set headers on a WebSocket),
//! in `?token=`: so its user is a [`SocketUser`], the one route's own variant of
//! [`crate::http::AuthUser`], which also keeps the token's expiry. A refused upgrade gets the
//! usual JSON error and status, before the upgrade itself is checked; a request that is not a
//! WebSocket upgrade (a plain GET, a missing `Sec-WebSocket-Key`) is 400 `INVALID_SCHEMA` with
//! the reason; an accepted one becomes a [`crate::socket::connection`].

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use hotpath_core::auth::Verified;
use hotpath_core::rejection::Rejection;
use serde::Deserialize;

use crate::http::ApiError;
use crate::socket::connection;
use crate::state::AppState;

/// Frames up to this multiple of the body limit are read and answered `PAYLOAD_TOO_LARGE`
/// with the socket kept open; larger ones are refused by the WebSocket layer before they are
/// buffered, and the socket is closed (1009).
const HARD_LIMIT_FACTOR: usize = 4;

pub async fn upgrade(
    State(state): State<AppState>,
    SocketUser(token): SocketUser,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return not_an_upgrade(&rejection).into_response(),
    };
    let hard_limit = state
        .config
        .max_body_bytes
        .saturating_mul(HARD_LIMIT_FACTOR)
        .max(16 * 1024);
    upgrade
        .max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        .on_upgrade(move |socket| connection::serve(socket, state, token))
}

/// A request to the WebSocket route that cannot be upgraded, in the API's error shape.
fn not_an_upgrade(rejection: &WebSocketUpgradeRejection) -> ApiError {
    ApiError(Rejection::InvalidSchema {
        message: format!("not a WebSocket upgrade: {}", rejection.body_text()),
        details: serde_json::json!({}),
    })
}

/// The user of a WebSocket: [`crate::http::AuthUser`]'s check, with the token taken from the
/// header's bearer token if there is one, else from `?token=`, and kept whole: its expiry is
/// when the socket closes unless the client refreshes it.
pub struct SocketUser(pub Verified);

#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

impl FromRequestParts<AppState> for SocketUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = match parts.headers.get(AUTHORIZATION) {
            Some(header) => header.to_str().ok().map(str::to_owned),
            None => Query::<TokenQuery>::try_from_uri(&parts.uri)
                .ok()
                .and_then(|Query(q)| q.token)
                .map(|token| format!("Bearer {token}")),
        };
        let verified = state
            .verifier
            .verify_bearer_or_refetch(header.as_deref())
            .await?;
        Ok(SocketUser(verified))
    }
}
