//! What every request handler shares.
//!
//! axum hands each handler and layer its own copy of the state, several times per request;
//! so [`AppState`] is one pointer to the shared parts ([`Shared`]), and a copy costs one
//! reference count, not one per cache, pool and client inside.

use std::sync::Arc;
use std::time::Duration;

use hotpath_core::auth::TokenVerifier;
use hotpath_core::config::Config;
use moka::future::Cache;
use sqlx::PgPool;
use uuid::Uuid;

use crate::backlog::{Backlog, Bound};
use crate::databases::Databases;
use crate::facts::Facts;
use crate::history_pages::HistoryPages;
use crate::http::VerifiedTokens;
use crate::known_messages::KnownMessages;
use crate::metrics::ProducerMetrics;
use crate::policies::{ActiveChain, PolicyMetrics};
use crate::producer::Producer;
use crate::rate_limit::RateLimit;
use crate::socket::SocketNode;
use crate::socket::receipt::{RECEIPT_MEMORY, ReceiptTarget};

/// The state of a gateway's routes: a cheap handle on [`Shared`], which it dereferences to.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub config: Arc<Config>,
    pub verifier: Arc<TokenVerifier>,
    /// Tokens verified within the last minute, so a request with one costs no signature check.
    pub verified_tokens: VerifiedTokens,
    /// The pool of writes (conversations, devices), readiness, and the send path's rare
    /// duplicate lookups (`duplicates`).
    pub pool: PgPool,
    /// The pool of reads on request paths (status, history, sync, receipt checks); facts
    /// have their own (`databases.rs`).
    pub queries: PgPool,
    pub nats: async_nats::Client,
    pub facts: Facts,
    /// The policies in force; swapped whole by [`crate::policies::sync`].
    pub policies: Arc<arc_swap::ArcSwap<ActiveChain>>,
    pub policy_metrics: PolicyMetrics,
    pub producer: Producer,
    /// This gateway's view of the backlog (accepted, not yet persisted): sends are refused
    /// while it is at its bound.
    pub backlog: Backlog,
    pub rate_limit: RateLimit,
    /// Per-user budget of `ack` frames, apart from sends.
    pub ack_rate: RateLimit,
    /// Per-user budget of membership changes (create, add, remove).
    pub membership_rate: RateLimit,
    /// Messages accepted here, and ids Postgres recently did not have.
    pub messages: KnownMessages,
    pub history_pages: HistoryPages,
    /// One permit per send being handled: the load-shedding bound.
    pub send_slots: Arc<tokio::sync::Semaphore>,
    pub metrics: ProducerMetrics,
    /// This gateway's WebSockets, by user.
    pub sockets: SocketNode,
    /// (message, user) pairs found to be a recipient of the message, with its conversation
    /// (a message's recipients never change, so a positive answer can be kept) and the
    /// furthest receipt this gateway already published for them, which a repeat need not.
    pub receipt_targets: Cache<(Uuid, String), ReceiptTarget>,
}

impl AppState {
    pub fn new(
        config: Config,
        verifier: TokenVerifier,
        databases: Databases,
        nats: async_nats::Client,
        sockets: SocketNode,
    ) -> AppState {
        let facts = Facts::new(databases.facts, nats.clone(), config.facts_ttl());
        let backlog = Backlog::new(Bound {
            max_messages: config.backlog_max_msgs,
            max_bytes: config.backlog_max_bytes,
        });
        let producer = Producer::new(
            nats.clone(),
            config.partitions,
            config.publish_timeout(),
            backlog.clone(),
        );
        let rate_limit = RateLimit::new(config.rate_per_user, config.rate_burst);
        let ack_rate = RateLimit::new(config.ack_rate_per_user, config.ack_rate_burst);
        let membership_rate = RateLimit::per_minute(config.membership_rate_per_min);
        AppState(Arc::new(Shared {
            verifier: Arc::new(verifier),
            verified_tokens: VerifiedTokens::new(config.jwt_leeway_secs),
            pool: databases.writes,
            queries: databases.queries,
            nats,
            facts,
            policies: Arc::new(arc_swap::ArcSwap::from_pointee(ActiveChain::default())),
            policy_metrics: PolicyMetrics::new(),
            producer,
            backlog,
            rate_limit,
            ack_rate,
            membership_rate,
            history_pages: HistoryPages::new(config.history_cache_bytes, Duration::from_secs(5)),
            messages: KnownMessages::new(config.negative_cache_ttl()),
            metrics: ProducerMetrics::new(),
            send_slots: Arc::new(tokio::sync::Semaphore::new(
                config.max_in_flight_sends.max(1),
            )),
            sockets,
            receipt_targets: Cache::builder()
                .max_capacity(200_000)
                .time_to_live(RECEIPT_MEMORY)
                .build(),
            config: Arc::new(config),
        }))
    }
}
