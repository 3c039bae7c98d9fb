//! Presence: which socket nodes (gateways) hold a user's open WebSockets.
//!
//! One key per user in the KV bucket [`PRESENCE_BUCKET`] (the key is [`presence_key`]), whose
//! value lists the nodes holding the user's sockets and when each last said so:
//!
//! ```json
//! {"nodes": {"gateway-5f0c…": {"sockets": 2, "refreshedAt": "2025-01-01T12:00:00Z"}}}
//! ```
//!
//! * A node writes its own entry when a socket of the user opens or closes, and rewrites all of
//!   its entries every third of the TTL. Writes are compare-and-set on the key's revision, so
//!   two nodes changing the same user never lose each other's entry.
//! * Nothing has to clean up after a node that died: readers ignore an entry not refreshed
//!   within the TTL, writers drop such entries when they next write the key, and the bucket's
//!   `max_age` (the same TTL) removes a key nobody refreshes any more.
//! * One key per user (rather than one per user and node) makes the lookup the delivery
//!   consumers do for every recipient a single direct get, not a listing of keys.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::names::{PRESENCE_BUCKET, presence_key};

/// Writers give up after this many lost compare-and-set races in a row; the next refresh
/// writes the key again anyway.
const MAX_WRITE_ATTEMPTS: usize = 16;

/// The value stored under a user's key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PresenceRecord {
    /// Node id → that node's sockets of the user.
    pub nodes: BTreeMap<String, NodePresence>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePresence {
    pub sockets: u32,
    pub refreshed_at: DateTime<Utc>,
}

impl PresenceRecord {
    /// Open sockets on nodes that refreshed within `ttl` of `now`.
    pub fn live_sockets(&self, now: DateTime<Utc>, ttl: Duration) -> u32 {
        self.nodes
            .values()
            .filter(|node| is_fresh(node, now, ttl))
            .map(|node| node.sockets)
            .sum()
    }

    fn drop_stale(&mut self, now: DateTime<Utc>, ttl: Duration) {
        self.nodes.retain(|_, node| is_fresh(node, now, ttl));
    }
}

fn is_fresh(node: &NodePresence, now: DateTime<Utc>, ttl: Duration) -> bool {
    let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    node.refreshed_at + ttl > now
}

/// The `PRESENCE` bucket.
#[derive(Clone)]
pub struct Presence {
    kv: kv::Store,
    ttl: Duration,
}

/// The bucket as set-up creates it: entries expire `ttl` after their last write.
fn bucket_config(ttl: Duration, replicas: usize) -> kv::Config {
    crate::streams::expiring_bucket(
        PRESENCE_BUCKET,
        "Which socket nodes hold each user's WebSockets",
        ttl,
        replicas,
    )
}

/// Set-up: creates the bucket with `max_age = ttl` and `replicas`, or brings an existing
/// one to `replicas` (the rest of it is left as an operator may have tuned it).
pub async fn ensure_bucket(
    js: &jetstream::Context,
    ttl: Duration,
    replicas: usize,
) -> anyhow::Result<()> {
    crate::streams::ensure_key_value(js, bucket_config(ttl, replicas)).await
}

impl Presence {
    /// Opens the bucket, creating it with `max_age = ttl` (one replica) if set-up has not
    /// ([`ensure_bucket`]). A bucket that already exists is used as it is (an operator may
    /// have tuned it).
    pub async fn open(js: &jetstream::Context, ttl: Duration) -> anyhow::Result<Presence> {
        let kv = match js.get_key_value(PRESENCE_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => {
                let created = js.create_key_value(bucket_config(ttl, 1)).await;
                match created {
                    Ok(kv) => kv,
                    // Another process may have created it in the meantime.
                    Err(error) => js.get_key_value(PRESENCE_BUCKET).await.map_err(|_| error)?,
                }
            }
        };
        Ok(Presence { kv, ttl })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The user's record as stored now (stale entries included), if there is one.
    pub async fn record(&self, user_id: &str) -> anyhow::Result<Option<PresenceRecord>> {
        Ok(self.read(&presence_key(user_id)).await?.0)
    }

    /// How many WebSockets the user has open on live nodes; 0 means offline.
    pub async fn live_sockets(&self, user_id: &str) -> anyhow::Result<u32> {
        let record = self.record(user_id).await?;
        Ok(record.map_or(0, |r| r.live_sockets(Utc::now(), self.ttl)))
    }

    /// Records that `node` holds `sockets()` of the user's sockets (none: its entry goes, and
    /// the key with it when no node is left).
    ///
    /// `sockets` is asked again on every attempt, after the key was read: whichever write lands
    /// last therefore carries a count taken after the previous write landed, so concurrent
    /// opens and closes on one node can never leave an outdated count behind.
    pub async fn set_node(
        &self,
        user_id: &str,
        node: &str,
        sockets: impl Fn() -> u32,
    ) -> anyhow::Result<()> {
        let key = presence_key(user_id);
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let (record, revision) = self.read(&key).await?;
            let had_record = record.is_some();
            let mut record = record.unwrap_or_default();
            let now = Utc::now();
            record.drop_stale(now, self.ttl);
            match sockets() {
                0 => {
                    record.nodes.remove(node);
                }
                sockets => {
                    record.nodes.insert(
                        node.to_string(),
                        NodePresence {
                            sockets,
                            refreshed_at: now,
                        },
                    );
                }
            }
            let written = if record.nodes.is_empty() {
                if !had_record {
                    return Ok(());
                }
                self.kv.delete_expect_revision(&key, Some(revision)).await
            } else {
                let value = serde_json::to_vec(&record)?;
                // Revision 0 means "the key has no value yet", which makes this a create.
                self.kv
                    .update(&key, value.into(), revision)
                    .await
                    .map(|_| ())
            };
            match written {
                Ok(()) => return Ok(()),
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(error) => {
                    return Err(error).with_context(|| format!("writing presence of {user_id}"));
                }
            }
        }
        anyhow::bail!("presence of {user_id} kept changing under us")
    }

    /// The stored record (None when the key is absent or deleted) and the revision to write
    /// over (0 when the key has no message at all).
    async fn read(&self, key: &str) -> anyhow::Result<(Option<PresenceRecord>, u64)> {
        let entry = self
            .kv
            .entry(key)
            .await
            .with_context(|| format!("reading presence key {key}"))?;
        Ok(match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                // A value that does not parse is treated as empty and overwritten.
                (serde_json::from_slice(&entry.value).ok(), entry.revision)
            }
            Some(entry) => (None, entry.revision),
            None => (None, 0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fresh_nodes_count() {
        let now = Utc::now();
        let mut record = PresenceRecord::default();
        record.nodes.insert(
            "a".into(),
            NodePresence {
                sockets: 2,
                refreshed_at: now - chrono::Duration::seconds(5),
            },
        );
        record.nodes.insert(
            "dead".into(),
            NodePresence {
                sockets: 7,
                refreshed_at: now - chrono::Duration::seconds(31),
            },
        );
        assert_eq!(record.live_sockets(now, Duration::from_secs(30)), 2);
        record.drop_stale(now, Duration::from_secs(30));
        assert_eq!(record.nodes.len(), 1);
    }
}
