//! What the gateway knows about conversations and blocks, cached in memory.
//!
//! A warm send does no SQL: conversation records (with their active members) and each user's
//! block relations are loaded from Postgres on a miss and kept in a moka cache. Whoever changes
//! a fact announces it on [`FACTS_INVALIDATE_SUBJECT`]; every gateway listens and drops its
//! copy. A time-to-live bounds how long a lost announcement could leave a stale fact behind.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hotpath_core::announcements::{Announcement, FactsChanged};
use hotpath_core::domain::ConversationKind;
use hotpath_core::names::FACTS_INVALIDATE_SUBJECT;
use hotpath_core::rejection::Rejection;
use moka::future::Cache;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use sqlx::PgPool;
use uuid::Uuid;

use crate::store;

/// A conversation as the checks see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationFacts {
    pub id: Uuid,
    pub kind: ConversationKind,
    pub is_active: bool,
    pub active_members: BTreeSet<String>,
}

#[derive(Clone)]
pub struct Facts {
    /// This gateway's identity in announcements, so it can skip its own echo: applying it late
    /// would drop an entry loaded after the change, for nothing.
    origin: Uuid,
    pool: PgPool,
    nats: async_nats::Client,
    conversations: Cache<Uuid, Option<Arc<ConversationFacts>>>,
    blocks: Cache<String, Arc<HashSet<String>>>,
    invalidated: Counter<u64>,
}

impl Facts {
    pub fn new(pool: PgPool, nats: async_nats::Client, ttl: Duration) -> Facts {
        Facts {
            origin: Uuid::new_v4(),
            pool,
            nats,
            conversations: Cache::builder()
                .max_capacity(200_000)
                .time_to_live(ttl)
                .build(),
            blocks: Cache::builder()
                .max_capacity(500_000)
                .time_to_live(ttl)
                .build(),
            invalidated: hotpath_core::telemetry::meter()
                .u64_counter("gateway_facts_invalidated_total")
                .with_description("Cached facts dropped because they changed")
                .build(),
        }
    }

    /// The conversation, or `None` if it does not exist (remembered too, so a flood of sends to
    /// a made-up id costs one query).
    pub async fn conversation(
        &self,
        id: Uuid,
    ) -> Result<Option<Arc<ConversationFacts>>, Rejection> {
        let pool = self.pool.clone();
        self.conversations
            .try_get_with(id, async move { load_conversation(&pool, id).await })
            .await
            .map_err(|e| unavailable(&e))
    }

    /// Everyone `user_id` has blocked or is blocked by.
    pub async fn blocks(&self, user_id: &str) -> Result<Arc<HashSet<String>>, Rejection> {
        let pool = self.pool.clone();
        let user = user_id.to_string();
        self.blocks
            .try_get_with(user.clone(), async move { load_blocks(&pool, &user).await })
            .await
            .map_err(|e| unavailable(&e))
    }

    /// Drops the local copy and tells every other gateway to drop theirs.
    pub async fn announce(&self, mut invalidation: FactsChanged) {
        self.apply(&invalidation).await;
        invalidation.origin = Some(self.origin);
        if let Err(error) = self
            .nats
            .publish(FACTS_INVALIDATE_SUBJECT, invalidation.encode().into())
            .await
        {
            tracing::warn!(%error, "could not announce a fact change; other gateways fall back to the TTL");
        }
    }

    async fn apply(&self, invalidation: &FactsChanged) {
        if let Some(id) = invalidation.conversation_id {
            self.conversations.invalidate(&id).await;
            self.invalidated
                .add(1, &[KeyValue::new("cache_type", "conversation")]);
        }
        for user in &invalidation.user_ids {
            self.blocks.invalidate(user).await;
            self.invalidated
                .add(1, &[KeyValue::new("cache_type", "blocks")]);
        }
    }

    /// Listens for announcements until the subscription ends.
    pub async fn listen(self, mut subscription: async_nats::Subscriber) {
        while let Some(message) = subscription.next().await {
            match FactsChanged::decode(&message.payload) {
                Ok(invalidation) if invalidation.origin == Some(self.origin) => {}
                Ok(invalidation) => self.apply(&invalidation).await,
                Err(error) => tracing::warn!(%error, "ignoring a malformed invalidation"),
            }
        }
    }
}

fn unavailable(error: &sqlx::Error) -> Rejection {
    tracing::warn!(%error, "loading facts from Postgres failed");
    Rejection::ServiceUnavailable {
        reason: "conversation data is unavailable".into(),
        retry_after_secs: 1,
    }
}

async fn load_conversation(
    pool: &PgPool,
    id: Uuid,
) -> Result<Option<Arc<ConversationFacts>>, sqlx::Error> {
    let row = store::conversations::with_members(pool, id).await?;
    Ok(row.map(|row| {
        Arc::new(ConversationFacts {
            id,
            kind: row.kind,
            is_active: row.is_active,
            active_members: row.active_members.into_iter().collect(),
        })
    }))
}

async fn load_blocks(pool: &PgPool, user_id: &str) -> Result<Arc<HashSet<String>>, sqlx::Error> {
    let others = store::blocks::either_way(pool, user_id).await?;
    Ok(Arc::new(others.into_iter().collect()))
}
