//! Replica liveness: the key `replica-<k>-of-<n>` of the `PARTITION_LEASES` bucket, present
//! while some process runs as consumer replica k of n. The other replicas read it to decide
//! whether k's share needs covering, and whether a partition of k's share they cover must be
//! given back ([`crate::failover`] has the rule).
//!
//! Every process with a replica index, when there are other replicas, writes the key as soon
//! as it has opened the bucket and again every third of the lease TTL; the bucket's `max_age`
//! (the TTL) removes it once nobody writes it. So a key outlives its last writer by at most a
//! TTL, exactly as a partition lease does. The value says who wrote it last
//! (`nats kv get PARTITION_LEASES replica-1-of-2`). A clean shutdown deletes the key, if
//! nobody wrote it since (a standby of the same index keeps it alive), so the other replicas
//! cover the share at their next look instead of a TTL later.
//!
//! The index count is part of the name: a process started with another replica count divides
//! the partitions differently, and its liveness says nothing about a share of this division.

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use hotpath_core::names::replica_liveness_key;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::failover::{Assignment, Liveness};
use crate::lease::{Holder, Timing};

/// The value of a liveness key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LivenessRecord {
    #[serde(flatten)]
    holder: Holder,
    replica: u32,
    replicas: u32,
    started_at: DateTime<Utc>,
}

fn record(holder: Holder, assignment: Assignment) -> Bytes {
    let record = LivenessRecord {
        holder,
        replica: assignment.replica,
        replicas: assignment.replicas,
        started_at: Utc::now(),
    };
    // A struct of strings and integers always serialises.
    serde_json::to_vec(&record)
        .expect("liveness record serialises")
        .into()
}

/// Writes this replica's liveness key every third of the TTL until `shutdown`, then deletes
/// it unless somebody wrote it since.
pub async fn announce(
    kv: kv::Store,
    timing: Timing,
    holder: Holder,
    assignment: Assignment,
    shutdown: CancellationToken,
) {
    let key = replica_liveness_key(assignment.replica, assignment.replicas);
    let value = record(holder, assignment);
    let mut written: Option<u64> = None;
    loop {
        let put = tokio::time::timeout(timing.renew_every(), kv.put(&key, value.clone())).await;
        let wait = match put {
            Ok(Ok(revision)) => {
                if written.is_none() {
                    tracing::info!(key = key.as_str(), "announced this consumer replica");
                }
                written = Some(revision);
                timing.renew_every()
            }
            Ok(Err(error)) => {
                tracing::warn!(key = key.as_str(), %error, "renewing the replica's liveness key failed; retrying");
                timing.retry_after_failure()
            }
            Err(_) => {
                tracing::warn!(
                    key = key.as_str(),
                    "renewing the replica's liveness key timed out; retrying"
                );
                timing.retry_after_failure()
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => break,
        }
    }
    let Some(revision) = written else { return };
    let deleted = tokio::time::timeout(
        timing.renew_every(),
        kv.delete_expect_revision(&key, Some(revision)),
    )
    .await;
    if let Ok(Ok(())) = deleted {
        tracing::info!(key = key.as_str(), "withdrew the replica's liveness key");
    }
}

/// What the liveness key of `replica` of `replicas` says now.
pub async fn read(kv: &kv::Store, replica: u32, replicas: u32) -> Liveness {
    match kv.entry(replica_liveness_key(replica, replicas)).await {
        Ok(Some(entry)) if entry.operation == kv::Operation::Put => Liveness::Alive,
        Ok(_) => Liveness::Gone,
        Err(error) => {
            tracing::debug!(replica, %error, "cannot read the replica's liveness key");
            Liveness::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_liveness_value_names_the_process_and_its_replica() {
        let record = LivenessRecord {
            holder: Holder {
                host: "consumers-1".into(),
                pid: 1,
                id: "9a1b".into(),
            },
            replica: 1,
            replicas: 2,
            started_at: DateTime::from_timestamp(0, 0).expect("epoch"),
        };
        let value: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"host": "consumers-1", "pid": 1, "id": "9a1b", "replica": 1,
                               "replicas": 2, "startedAt": "1970-01-01T00:00:00Z"})
        );
    }
}
