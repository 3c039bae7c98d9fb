//! History pages as served, kept briefly: a reconnect storm asks for the same pages many
//! times, and each one is the same bytes.
//!
//! The cache is bounded by bytes (`HOTPATH_HISTORY_CACHE_BYTES`), not entries: a page holds up
//! to 500 messages of up to the body limit each, so a bound on entries would be no bound on
//! memory. moka weighs each page by its length and evicts the least useful ones past the
//! bound. A page of a conversation is dropped as soon as the consumers announce new messages
//! in it; the short time-to-live bounds a lost announcement.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use hotpath_core::announcements::{Announcement, HistoryChanged};
use moka::future::Cache;
use uuid::Uuid;

/// A page's request: (conversation, after_seq, limit).
pub type PageKey = (Uuid, i64, i64);

/// What an entry costs beyond its page: the key and moka's bookkeeping, roughly.
const ENTRY_OVERHEAD_BYTES: usize = 128;

#[derive(Clone)]
pub struct HistoryPages {
    pages: Cache<PageKey, Bytes>,
}

impl HistoryPages {
    pub fn new(max_bytes: u64, ttl: Duration) -> HistoryPages {
        HistoryPages {
            pages: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_key, page: &Bytes| {
                    u32::try_from(page.len() + ENTRY_OVERHEAD_BYTES).unwrap_or(u32::MAX)
                })
                .time_to_live(ttl)
                .support_invalidation_closures()
                .build(),
        }
    }

    pub async fn get(&self, key: &PageKey) -> Option<Bytes> {
        self.pages.get(key).await
    }

    pub async fn insert(&self, key: PageKey, page: Bytes) {
        self.pages.insert(key, page).await;
    }

    /// Drops every page of `conversation`.
    pub fn forget(&self, conversation: Uuid) {
        // Only fails when closures are not enabled on the cache, which they are.
        let _ = self
            .pages
            .invalidate_entries_if(move |key, _| key.0 == conversation);
    }

    /// Drops pages as the consumers announce new messages, until the subscription ends.
    pub async fn listen(self, mut announcements: async_nats::Subscriber) {
        while let Some(message) = announcements.next().await {
            if let Ok(changed) = HistoryChanged::decode(&message.payload) {
                self.forget(changed.conversation_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_cache_holds_at_most_its_bytes() {
        let max_bytes = 1024 * 1024;
        let pages = HistoryPages::new(max_bytes, Duration::from_secs(60));
        let page = Bytes::from(vec![b'x'; 64 * 1024]);
        for after_seq in 0..100 {
            pages
                .insert((Uuid::nil(), after_seq, 100), page.clone())
                .await;
        }
        pages.pages.run_pending_tasks().await;

        assert!(
            pages.pages.weighted_size() <= max_bytes,
            "{} bytes cached",
            pages.pages.weighted_size()
        );
        let per_page = (64 * 1024 + ENTRY_OVERHEAD_BYTES) as u64;
        assert!(pages.pages.entry_count() <= max_bytes / per_page);
        assert!(pages.pages.entry_count() > 0, "the cache keeps what fits");
    }
}
