//! What a gateway knows about message ids before asking Postgres.
//!
//! Two short memories, both in moka caches:
//!
//! * **accepted**: the messages this gateway accepted itself, for ten minutes, so the status
//!   route answers `pending` (not 404) between the 202 and the persist.
//! * **absent**: ids Postgres just said it has no message for (stored or refused), for
//!   `HOTPATH_NEGATIVE_CACHE_SECS`
//!   (5 s by default), so a client polling an unknown id (or a hostile one hammering it)
//!   costs one query per id and period, not one per request.
//!
//! An absent entry never hides a message this gateway accepted: accepting drops the entry,
//! and an entry is only consulted for ids this gateway has not accepted, so a lookup that
//! raced with the accept cannot hide it either. A message accepted by *another* gateway can
//! stay unseen here for at most the negative TTL, the same order as the moment between 202
//! and persist that every status poll already waits out.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hotpath_core::rejection::Rejection;
use moka::future::Cache;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use uuid::Uuid;

/// A message this gateway accepted that may not be in Postgres yet.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub sender_id: String,
    pub conversation_id: Uuid,
    pub accepted_at: DateTime<Utc>,
}

#[derive(Clone)]
pub struct KnownMessages {
    accepted: Cache<Uuid, Accepted>,
    absent: Cache<Uuid, ()>,
    lookups: Counter<u64>,
}

impl KnownMessages {
    pub fn new(negative_ttl: Duration) -> KnownMessages {
        KnownMessages {
            accepted: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
            absent: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(negative_ttl)
                .build(),
            lookups: hotpath_core::telemetry::meter()
                .u64_counter("gateway_message_lookups_total")
                .with_description(
                    "Message lookups of the status route, by source: postgres, or negative_cache \
                     for ids Postgres recently did not have",
                )
                .build(),
        }
    }

    /// Remembers a message this gateway accepted; it is no longer absent.
    pub async fn accepted(&self, message_id: Uuid, accepted: Accepted) {
        self.accepted.insert(message_id, accepted).await;
        self.absent.invalidate(&message_id).await;
    }

    /// The message, if this gateway accepted it recently.
    pub async fn recently_accepted(&self, message_id: &Uuid) -> Option<Accepted> {
        self.accepted.get(message_id).await
    }

    /// What Postgres has for `message_id`, read by `load`, unless Postgres said a moment ago
    /// that it has nothing (and this gateway has not accepted the message since).
    pub async fn in_postgres<T>(
        &self,
        message_id: Uuid,
        load: impl Future<Output = Result<Option<T>, Rejection>>,
    ) -> Result<Option<T>, Rejection> {
        let accepted_here = self.accepted.contains_key(&message_id);
        if !accepted_here && self.absent.contains_key(&message_id) {
            self.count("negative_cache");
            return Ok(None);
        }
        self.count("postgres");
        let found = load.await?;
        if found.is_none() && !self.accepted.contains_key(&message_id) {
            self.absent.insert(message_id, ()).await;
        }
        Ok(found)
    }

    fn count(&self, source: &'static str) {
        self.lookups.add(1, &[KeyValue::new("source", source)]);
    }
}
