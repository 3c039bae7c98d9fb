//! `/healthz` (the process answers), `/readyz` (it can do its job), `/metrics` (Prometheus).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use serde_json::json;

use crate::state::AppState;
use crate::store;

pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Ready when NATS is connected, Postgres answers within a second, and a policy chain is loaded.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let nats = state.nats.connection_state() == async_nats::connection::State::Connected;
    let postgres = tokio::time::timeout(Duration::from_secs(1), store::ping(&state.pool))
        .await
        .is_ok_and(|r| r.is_ok());
    let policies = !state.policies.load().is_empty();
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let status = if nats && postgres && policies {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"nats": word(nats), "postgres": word(postgres), "policies": word(policies)});
    (status, Json(body))
}

/// A small page that connects to `/v1/ws` and shows the frames: watching messages arrive
/// needs nothing but a browser.
pub async fn live_page() -> impl IntoResponse {
    axum::response::Html(include_str!("../../static/live.html"))
}

/// The API's OpenAPI 3 description.
pub async fn openapi() -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "application/json")],
        include_str!("../../openapi.json"),
    )
}

pub async fn metrics() -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        hotpath_core::telemetry::render(),
    )
}
