//! History pages as served, kept briefly: a reconnect storm asks for the same pages many
//! times, and each one is the same bytes.
//!
//! The cache is bounded by bytes (`HOTPATH_HISTORY_CACHE_BYTES`), not entries: a page holds up
//! to 500 messages of up to the body limit each, so a bound on entries would be no bound on
//! memory. moka weighs each page by its length and evicts the least useful ones past the
//! bound. A page of a conversation is dropped as soon as the consumers announce new messages
//! in it; the short time-to-live bounds a lost announcement.
//!
//! A page that came back shorter than its limit reached the end of the conversation as it was
//! then: it records that seq (`through`). The gateway also remembers, per conversation, the
//! highest seq it knows to be stored: from the announcements (which carry it) and from every
//! status it answers `sent`. A page whose `through` is below that is not served, so a client
//! told "sent, seq 7" never reads a page without 7 from this gateway, whether the announcement
//! is late, lost, or overtook a page read that started before it. A full page cannot change
//! (seqs are gap-free and messages immutable) and is served for its lifetime.

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

/// The most conversations whose stored seq is remembered.
const KNOWN_CONVERSATIONS: u64 = 100_000;

#[derive(Clone)]
pub struct HistoryPages {
    pages: Cache<PageKey, Page>,
    /// Per conversation, the highest seq known to be stored.
    stored: Cache<Uuid, i64>,
}

/// A page as served, and the seq it reads through when it reached the conversation's end.
#[derive(Clone)]
struct Page {
    body: Bytes,
    through: Option<i64>,
}

impl HistoryPages {
    pub fn new(max_bytes: u64, ttl: Duration) -> HistoryPages {
        HistoryPages {
            pages: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_key, page: &Page| {
                    u32::try_from(page.body.len() + ENTRY_OVERHEAD_BYTES).unwrap_or(u32::MAX)
                })
                .time_to_live(ttl)
                .support_invalidation_closures()
                .build(),
            // Only needed while a page could be cached: as long as a page lives.
            stored: Cache::builder()
                .max_capacity(KNOWN_CONVERSATIONS)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The page for `key`, unless it ends before a message known to be stored.
    pub async fn get(&self, key: &PageKey) -> Option<Bytes> {
        let page = self.pages.get(key).await?;
        if let Some(through) = page.through
            && self
                .stored
                .get(&key.0)
                .await
                .is_some_and(|seq| seq > through)
        {
            self.pages.invalidate(key).await;
            return None;
        }
        Some(page.body)
    }

    /// Keeps `body`, the page for `key`; `through`: the last seq it has when it came back
    /// shorter than its limit (it ends where the conversation ended), `None` when full.
    pub async fn insert(&self, key: PageKey, body: Bytes, through: Option<i64>) {
        self.pages.insert(key, Page { body, through }).await;
    }

    /// `seq` of `conversation` is stored: pages that end before it are stale.
    pub async fn stored(&self, conversation: Uuid, seq: i64) {
        self.stored
            .entry(conversation)
            .and_upsert_with(|known| async move {
                known.map_or(seq, |entry| seq.max(entry.into_value()))
            })
            .await;
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
                if let Some(seq) = changed.last_seq {
                    self.stored(changed.conversation_id, seq).await;
                }
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
                .insert((Uuid::nil(), after_seq, 100), page.clone(), None)
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

    #[tokio::test]
    async fn a_short_page_is_not_served_once_a_later_seq_is_known_to_be_stored() {
        let pages = HistoryPages::new(1024 * 1024, Duration::from_secs(60));
        let conversation = Uuid::from_u128(1);
        let (short, full) = ((conversation, 0, 100), (conversation, 0, 2));
        pages
            .insert(short, Bytes::from_static(b"1..3"), Some(3))
            .await;
        pages.insert(full, Bytes::from_static(b"1..2"), None).await;
        pages.stored(conversation, 3).await;
        assert!(pages.get(&short).await.is_some(), "it has seq 3");

        pages.stored(conversation, 4).await;
        // A lower seq learnt late changes nothing.
        pages.stored(conversation, 2).await;
        assert!(pages.get(&short).await.is_none(), "it ends before seq 4");
        assert!(
            pages.get(&full).await.is_some(),
            "a full page cannot change"
        );
        // A page read before seq 4 was stored, kept after it was announced, is not served.
        pages
            .insert(short, Bytes::from_static(b"1..3"), Some(3))
            .await;
        assert!(pages.get(&short).await.is_none());
        pages
            .insert(short, Bytes::from_static(b"1..4"), Some(4))
            .await;
        assert!(pages.get(&short).await.is_some());
    }
}
