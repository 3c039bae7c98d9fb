//! `GET /v1/ws`: the WebSocket (protocol in `docs/websocket.md`).
//!
//! The upgrade is authenticated like every other route, with the token in the
//! `Authorization: Bearer` header or, for browsers (which cannot set headers on a WebSocket),
//! in `?token=`. A refused upgrade gets the usual JSON error and status; an accepted one
//! becomes a [`crate::socket::connection`].

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
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

#[derive(Debug, Deserialize)]
pub struct WsQuery {
    token: Option<String>,
}

pub async fn upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<WsQuery>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let token = match authenticate(&state, &headers, query).await {
        Ok(token) => token,
        Err(rejection) => return ApiError(rejection).into_response(),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
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

/// The header's bearer token if there is one, else `?token=`: its user, and its expiry, at
/// which the socket closes unless the client refreshes it.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    query: Result<Query<WsQuery>, QueryRejection>,
) -> Result<Verified, Rejection> {
    let header = match headers.get(AUTHORIZATION) {
        Some(header) => header.to_str().ok().map(str::to_owned),
        None => query
            .ok()
            .and_then(|Query(q)| q.token)
            .map(|token| format!("Bearer {token}")),
    };
    state
        .verifier
        .verify_bearer_or_refetch(header.as_deref())
        .await
}
