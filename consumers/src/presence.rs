//! Who is online, as the delivery consumers ask it: fanout (to count a recipient online or
//! offline) and push scheduling (to push only the offline ones) both look recipients up here.
//!
//! The answer comes from the `PRESENCE` bucket the gateways keep ([`Presence`]), opened on
//! first use so the consumers persist whether or not presence works. Each answer is reused
//! for a second ([`CACHE_TTL`]): a busy conversation's recipients are looked up once per
//! second, not once per message, and a device that just connected is at most that late to be
//! seen, which costs at worst a push too many. Concurrent lookups of one user share one read,
//! and one batch's lookups run [`CONCURRENCY`] at a time, so a large group neither queues
//! its reads one by one nor floods the bucket.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hotpath_core::presence::Presence;
use moka::future::Cache;
use tokio::sync::OnceCell;

/// How long a presence answer is reused.
const CACHE_TTL: Duration = Duration::from_secs(1);
/// Presence lookups in flight at once for one batch of users.
const CONCURRENCY: usize = 32;

/// A user's open sockets on live nodes (0: offline), or why that could not be read.
pub type Sockets = Result<u32, Arc<anyhow::Error>>;

/// Who is online, from the `PRESENCE` bucket, with answers kept for a second. Shared by all
/// partitions of a process.
#[derive(Clone)]
pub struct PresenceLookup {
    js: async_nats::jetstream::Context,
    ttl: Duration,
    bucket: Arc<OnceCell<Presence>>,
    cache: Cache<String, u32>,
}

impl PresenceLookup {
    /// Reads the bucket whose entries live `ttl` (the gateways' presence TTL).
    pub fn new(js: async_nats::jetstream::Context, ttl: Duration) -> PresenceLookup {
        PresenceLookup {
            js,
            ttl,
            bucket: Arc::new(OnceCell::new()),
            cache: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(CACHE_TTL)
                .build(),
        }
    }

    /// The user's open sockets on live nodes (0: offline).
    pub async fn sockets(&self, user_id: &str) -> Sockets {
        self.cache
            .try_get_with_by_ref(user_id, async {
                let bucket = self
                    .bucket
                    .get_or_try_init(|| Presence::open(&self.js, self.ttl))
                    .await?;
                bucket.live_sockets(user_id).await
            })
            .await
    }

    /// Each of `users` with their sockets, in the order given.
    pub async fn sockets_of(
        &self,
        users: impl IntoIterator<Item = String>,
    ) -> Vec<(String, Sockets)> {
        // Owned values in the lookups keep the future `Send` for spawned tasks.
        futures::stream::iter(users)
            .map(|user_id| {
                let lookup = self.clone();
                async move {
                    let sockets = lookup.sockets(&user_id).await;
                    (user_id, sockets)
                }
            })
            .buffered(CONCURRENCY)
            .collect()
            .await
    }
}
