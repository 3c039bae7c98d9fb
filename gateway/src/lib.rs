//! The gateway: the hot path from an HTTP request to a message in JetStream, plus the small
//! APIs around it (conversations, push devices, status, history, health, metrics), and the
//! socket node that holds users' WebSockets and delivers to them.
//!
//! Start reading at [`routes::send`], which tells the hot path in order, then [`socket`].

// Small functions read as their steps (see clippy.toml).
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

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
mod store;
mod trace;

use axum::routing::{delete, get, post, put};
use axum::{Router, middleware};
use hotpath_core::auth::TokenVerifier;
use hotpath_core::config::Config;
use hotpath_core::names::{FACTS_INVALIDATE_SUBJECT, HISTORY_INVALIDATE_SUBJECT};
use hotpath_core::presence::Presence;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
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
    let state = start(config, verifier, databases, nats, shutdown).await?;
    Ok(routes(state))
}

/// The shared state, with the background work that keeps it current running: presence,
/// the backlog's view, the policy chain, fact and history invalidations, rate-limiter
/// housekeeping.
async fn start(
    config: Config,
    verifier: TokenVerifier,
    databases: Databases,
    nats: async_nats::Client,
    shutdown: CancellationToken,
) -> anyhow::Result<AppState> {
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
    let samples = policies::DecisionSink::start(
        nats.clone(),
        gateway_id.clone(),
        state.policy_metrics.clone(),
        shutdown.clone(),
    );
    policies::sync::PolicySync::new(
        engine,
        store,
        state.policies.clone(),
        state.policy_metrics.clone(),
        gateway_id,
        Some(samples),
    )
    .start(shutdown.clone())
    .await?;

    let facts = state.facts.clone();
    until(
        &shutdown,
        facts.listen(nats.subscribe(FACTS_INVALIDATE_SUBJECT).await?),
    );
    let history_pages = state.history_pages.clone();
    until(
        &shutdown,
        history_pages.listen(nats.subscribe(HISTORY_INVALIDATE_SUBJECT).await?),
    );
    let limits = [
        state.rate_limit.clone(),
        state.ack_rate.clone(),
        state.membership_rate.clone(),
    ];
    until(
        &shutdown,
        futures::future::join_all(limits.map(|limit| limit.housekeeping())),
    );
    Ok(state)
}

/// Runs `work` on its own task until it ends or `shutdown` is cancelled.
fn until<F>(shutdown: &CancellationToken, work: F)
where
    F: Future + Send + 'static,
{
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = work => {}
            () = stop.cancelled() => {}
        }
    });
}

/// The route table, and the layers every request goes through.
///
/// Layers, outermost first: the log of every rejection ([`http::rejections`]), then the body
/// gap timeout (no gap in a request body longer than the body timeout; [`http::BoundedJson`]
/// also bounds the whole body by it). The send route has its own layer, which counts and
/// times each answer (`producer_*` metrics); `route_layer` keeps it off the 405 of a wrong
/// method, as before. Connection-level limits (header and idle timeouts, the connection cap)
/// are the server's ([`server`]), beneath the router.
fn routes(state: AppState) -> Router {
    let send = post(routes::send::send).route_layer(middleware::from_fn_with_state(
        state.clone(),
        routes::send::measured,
    ));
    Router::new()
        .route("/v1/messages", send)
        .route("/v1/messages/{id}/status", get(routes::status::status))
        .route(
            "/v1/conversations",
            post(routes::conversations::create).get(routes::conversations::list),
        )
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
        .route("/", get(routes::webclient::index))
        .route("/app/{file}", get(routes::webclient::asset))
        .fallback(http::not_found)
        .method_not_allowed_fallback(http::method_not_allowed)
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn(http::rejections::log_rejections))
                .layer(RequestBodyTimeoutLayer::new(
                    state.config.http_body_timeout(),
                )),
        )
        .with_state(state)
}
