//! The gateway: the hot path from an HTTP request to a message in JetStream, plus the small
//! APIs around it (conversations, push devices, status, history, health, metrics), and the
//! socket node that holds users' WebSockets and delivers to them.
//!
//! Start reading at [`routes::send`], which tells the hot path in order, then [`socket`].

mod backlog;
mod databases;
mod duplicates;
pub mod facts;
mod history_pages;
mod http;
mod known_messages;
mod metrics;
pub mod policies;
mod producer;
mod rate_limit;
pub mod routes;
mod server;
pub mod socket;
mod state;

use axum::Router;
use axum::routing::{delete, get, post, put};
use hotpath_core::auth::TokenVerifier;
use hotpath_core::config::Config;
use hotpath_core::names::FACTS_INVALIDATE_SUBJECT;
use hotpath_core::presence::Presence;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::RequestBodyTimeoutLayer;

pub use databases::Databases;
pub use server::{ServerLimits, serve};
use socket::SocketNode;
pub use state::AppState;

/// Builds the gateway's router and starts its background work (listening for fact changes,
/// rate-limiter housekeeping, refreshing presence), which stops when `shutdown` is cancelled.
pub async fn router(
    config: Config,
    verifier: TokenVerifier,
    databases: Databases,
    nats: async_nats::Client,
    shutdown: CancellationToken,
) -> anyhow::Result<Router> {
    let body_timeout = config.http_body_timeout();
    let js = async_nats::jetstream::new(nats.clone());
    // This gateway's name in policy reports and as a socket node in presence.
    let gateway_id = format!("gateway-{}", uuid::Uuid::new_v4().simple());
    let presence = Presence::open(&js, config.presence_ttl()).await?;
    let sockets = SocketNode::new(gateway_id.clone(), nats.clone(), presence, shutdown.clone());
    tokio::spawn(sockets.clone().refresh_presence());
    let state = AppState::new(config, verifier, databases, nats.clone(), sockets);
    state
        .backlog
        .start_polling(js.clone(), shutdown.clone())
        .await;

    // The policy chain, loaded before the router exists so the gateway is ready only with it.
    let store = hotpath_core::policy_store::PolicyStore::open(&js).await?;
    let engine = hotpath_policy_host::PolicyEngine::new()?;
    policies::sync::PolicySync::new(
        engine,
        store,
        state.policies.clone(),
        state.policy_metrics.clone(),
        gateway_id,
    )
    .start(shutdown.clone())
    .await?;

    let subscription = nats.subscribe(FACTS_INVALIDATE_SUBJECT).await?;
    let facts = state.facts.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = facts.listen(subscription) => {}
            () = stop.cancelled() => {}
        }
    });
    let history_changes = nats
        .subscribe(hotpath_core::names::HISTORY_INVALIDATE_SUBJECT)
        .await?;
    let history_pages = state.history_pages.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = history_pages.listen(history_changes) => {}
            () = stop.cancelled() => {}
        }
    });
    let limits = [
        state.rate_limit.clone(),
        state.ack_rate.clone(),
        state.membership_rate.clone(),
    ];
    tokio::spawn(async move {
        let housekeeping = futures::future::join_all(limits.map(|limit| limit.housekeeping()));
        tokio::select! {
            _ = housekeeping => {}
            () = shutdown.cancelled() => {}
        }
    });

    Ok(Router::new()
        .route("/v1/messages", post(routes::send::send))
        .route("/v1/messages/{id}/status", get(routes::status::status))
        .route("/v1/conversations", post(routes::conversations::create))
        .route(
            "/v1/conversations/{id}/messages",
            get(routes::status::history),
        )
        .route(
            "/v1/conversations/{id}/members",
            post(routes::conversations::add_member),
        )
        .route(
            "/v1/conversations/{id}/members/{user_id}",
            delete(routes::conversations::remove_member),
        )
        .route(
            "/v1/conversations/{id}/deactivate",
            post(routes::conversations::deactivate),
        )
        .route(
            "/v1/conversations/{id}/settings",
            put(routes::conversations::update_settings),
        )
        .route(
            "/v1/blocks",
            post(routes::blocks::block).get(routes::blocks::list),
        )
        .route("/v1/blocks/{user_id}", delete(routes::blocks::unblock))
        .route(
            "/v1/devices",
            post(routes::devices::register).get(routes::devices::list),
        )
        .route("/v1/devices/{token}", delete(routes::devices::remove))
        .route("/v1/ws", get(routes::ws::upgrade))
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(routes::health::metrics))
        .route("/v1/openapi.json", get(routes::health::openapi))
        .route("/live", get(routes::health::live_page))
        .fallback(http::not_found)
        // No gap in any request body longer than the body timeout; `http::read_json` also
        // bounds the whole body by it.
        .layer(RequestBodyTimeoutLayer::new(body_timeout))
        .with_state(state))
}
