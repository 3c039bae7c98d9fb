//! Partition leases: proof that this process, and no other, may process a partition now.
//!
//! A partition's order holds only while one worker at a time pulls its durable consumer (see
//! [`crate::partition`]). The k-of-n assignment (`HOTPATH_CONSUMER_REPLICA`/`_REPLICAS`) says
//! who *should* process a partition, but configuration can be wrong: two processes started with
//! the same replica index would both pull `delivery-<p>`, take interleaved batches, and each
//! delete and recreate the consumer (its rewind) while the other has a batch in flight. So who
//! *does* process a partition is proven, not assumed, by a lease.
//!
//! ## The protocol
//!
//! One key per partition (`partition-<p>`) in the KV bucket `PARTITION_LEASES`, whose value
//! names the holder (host, pid and a random id per process start; `nats kv get
//! PARTITION_LEASES partition-3` shows it). The bucket's `max_age` is the lease TTL: a value
//! that nobody rewrites disappears TTL after it was written.
//!
//! * **Acquire** with `create`, which the server refuses while the key holds a value: of two
//!   processes asking at once, exactly one gets it.
//! * **Renew** every third of the TTL with `update(key, value, revision)`, a compare-and-set on
//!   the revision the holder last wrote. If the revision moved, somebody else holds the lease:
//!   the worker is stopped at once.
//! * **Fence by a local deadline.** A holder that cannot renew (NATS unreachable, the process
//!   stalled) cannot learn that it lost the lease, so it stops on its own first: at the
//!   deadline `sent + TTL − margin`, where `sent` is when it sent its last successful write.
//!   The server stamped that write no earlier than `sent`, so the key lives until at least
//!   `sent + TTL`, and nobody else can acquire it before then: the two holders' periods never
//!   overlap. The worker checks the fence before each fetch and before a rewind (the only two
//!   things that touch the durable consumer), and its cancellation token fires at the deadline,
//!   cutting a long poll short.
//! * **Release** on shutdown, after the worker has handed its batch back: `delete` with the
//!   held revision (so a lease already lost is never deleted from under its new holder). A
//!   standby watches the key and takes over at once; a holder that died without releasing is
//!   replaced once its key expires, within the TTL plus one acquisition round.
//! * **Standby**: a process whose `create` fails waits, trying again every third of the TTL and
//!   whenever the key is deleted. It touches nothing meanwhile.
//! * **Covering** (with several replicas): a process also contends for the partitions of
//!   other replicas' shares, but only while their replica is gone, and gives such a partition
//!   back as soon as that replica is alive again: a hand-back is a release as on shutdown (the
//!   worker hands its batch back, then the key is deleted). [`crate::failover`] has the rule;
//!   a dead holder's partition gets a new holder within [`Timing::takeover_bound`].
//!
//! ## What the fence does not need to stop
//!
//! A batch fetched while the lease was held may still be committed after the lease is gone (a
//! slow Postgres transaction outlives the deadline). That is harmless: the batch is a contiguous
//! run of the partition starting at its first unacknowledged message, the next holder re-reads
//! from that same message, and the persist transaction locks the batch's conversations and
//! drops keys already stored. Whichever of the two commits a message first numbers it; the other finds it stored.
//! What *would* corrupt order is a second puller taking messages past the first one's batch, or
//! a rewind under a running worker — exactly what the fence rules out. And because a previous
//! holder's pull request may still be waiting at the server, a worker that has just taken a
//! lease always recreates its consumer before it fetches, which drops such requests.
//!
//! ## The TTL
//!
//! The bucket is the single source of the TTL: every process times its renewals and deadlines
//! by the bucket's `max_age`, not by its own setting. A process configured with a longer TTL
//! raises the bucket's `max_age` (safe for every running holder: their keys only live longer
//! than they count on); a shorter setting is not applied to an existing bucket, because
//! holders already running would count on a lifetime their keys no longer have.
//!
//! The submodule `fence` has the timing and the fence; `renewal` renews a held lease while
//! its worker runs and decides how that holding period ends.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use hotpath_core::names::{PARTITION_LEASES_BUCKET, partition_lease_key};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::failover::{self, Assignment, Contend, Liveness, Share};
use crate::holdings::Holdings;
use crate::liveness;

mod fence;
mod renewal;

pub use fence::{Fence, LeaseLost, Timing};
use renewal::End;

/// Who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The host name (in Kubernetes, the pod's name).
    pub host: String,
    pub pid: u32,
    /// Random for each process start: tells two processes apart even when host and pid agree
    /// (a restarted container is often pid 1 again).
    pub id: String,
}

impl Holder {
    pub fn of_this_process() -> Holder {
        let uname = rustix::system::uname();
        Holder {
            host: uname.nodename().to_string_lossy().into_owned(),
            pid: std::process::id(),
            id: uuid::Uuid::new_v4().simple().to_string(),
        }
    }
}

/// The value stored under a partition's key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseRecord {
    #[serde(flatten)]
    holder: Holder,
    partition: u32,
    acquired_at: DateTime<Utc>,
}

/// A lease this process holds: the revision its next compare-and-set must name.
struct Held {
    partition: u32,
    revision: u64,
    record: Bytes,
}

enum Acquire {
    Acquired(Held),
    /// Held by someone else (`None`: the key changed while it was being read).
    Taken(Option<Holder>),
}

/// The `PARTITION_LEASES` bucket, as this process uses it: its partitions' leases and the
/// replicas' liveness keys.
#[derive(Clone)]
pub struct Leases {
    kv: kv::Store,
    timing: Timing,
    holder: Holder,
    assignment: Assignment,
    /// When this process starts covering other replicas' shares (see [`crate::failover`]).
    covering_from: Instant,
}

fn bucket_config(ttl: Duration, replicas: usize) -> kv::Config {
    hotpath_core::streams::expiring_bucket(
        PARTITION_LEASES_BUCKET,
        "Which consumer process holds each partition (see docs/adr/0006)",
        ttl,
        replicas,
    )
}

/// Set-up: creates the bucket with `max_age = ttl` and `replicas`, or brings an existing one
/// to `replicas` and raises a shorter `max_age` to `ttl` (see the module doc's TTL).
pub async fn ensure_bucket(
    js: &jetstream::Context,
    ttl: Duration,
    replicas: usize,
) -> anyhow::Result<()> {
    hotpath_core::streams::ensure_key_value(js, bucket_config(ttl, replicas)).await?;
    let kv = js
        .get_key_value(PARTITION_LEASES_BUCKET)
        .await
        .context("opening the PARTITION_LEASES bucket")?;
    raise_ttl(js, kv, ttl).await?;
    Ok(())
}

/// Raises the bucket's `max_age` to `ttl` if it is shorter, keeping its replicas; returns the
/// bucket and the TTL it has now.
async fn raise_ttl(
    js: &jetstream::Context,
    kv: kv::Store,
    ttl: Duration,
) -> anyhow::Result<(kv::Store, Duration)> {
    let info = kv.stream.cached_info().config.clone();
    if info.max_age >= ttl {
        return Ok((kv, info.max_age));
    }
    tracing::info!(
        from_secs = info.max_age.as_secs_f64(),
        to_secs = ttl.as_secs_f64(),
        "raising the partition lease TTL"
    );
    let kv = js
        .update_key_value(bucket_config(ttl, info.num_replicas))
        .await
        .context("raising the PARTITION_LEASES bucket's max age")?;
    Ok((kv, ttl))
}

impl Leases {
    /// Opens the bucket, creating it with `max_age = ttl` on first use, raising a shorter
    /// `max_age` to `ttl`; the timing then follows the bucket (see the module doc).
    pub async fn open(
        js: &jetstream::Context,
        ttl: Duration,
        holder: Holder,
        assignment: Assignment,
    ) -> anyhow::Result<Leases> {
        let kv = match js.get_key_value(PARTITION_LEASES_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => match js.create_key_value(bucket_config(ttl, 1)).await {
                Ok(kv) => kv,
                // Another process may have created it in the meantime.
                Err(error) => js
                    .get_key_value(PARTITION_LEASES_BUCKET)
                    .await
                    .map_err(|_| error)
                    .context("opening the PARTITION_LEASES bucket")?,
            },
        };
        let (kv, bucket_ttl) = raise_ttl(js, kv, ttl).await?;
        anyhow::ensure!(
            !bucket_ttl.is_zero(),
            "the PARTITION_LEASES bucket has no max age, so leases would never expire"
        );
        if bucket_ttl != ttl {
            tracing::warn!(
                configured_secs = ttl.as_secs_f64(),
                bucket_secs = bucket_ttl.as_secs_f64(),
                "HOTPATH_LEASE_TTL_SECS is shorter than the PARTITION_LEASES bucket's max age; \
                 using the bucket's (to shorten it, stop every consumer process and delete the bucket)"
            );
        }
        Ok(Leases {
            kv,
            timing: Timing { ttl: bucket_ttl },
            holder,
            assignment,
            covering_from: Instant::now() + bucket_ttl,
        })
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Keeps this replica's liveness key written until `shutdown` (see [`crate::liveness`]).
    pub async fn announce_liveness(self, shutdown: CancellationToken) {
        liveness::announce(self.kv, self.timing, self.holder, self.assignment, shutdown).await;
    }

    /// The liveness of the replica whose share a partition is: this process itself for its
    /// own share; for another, what its liveness key says (unknown without an answer soon).
    async fn preferred_liveness(&self, share: Share) -> Liveness {
        let Share::Foreign { preferred } = share else {
            return Liveness::Alive;
        };
        let read = liveness::read(&self.kv, preferred, self.assignment.replicas);
        tokio::time::timeout(self.timing.renew_every() / 2, read)
            .await
            .unwrap_or(Liveness::Unknown)
    }

    /// Whether this process has run long enough to cover other replicas' shares.
    fn settled(&self) -> bool {
        Instant::now() >= self.covering_from
    }

    fn record(&self, partition: u32) -> Bytes {
        let record = LeaseRecord {
            holder: self.holder.clone(),
            partition,
            acquired_at: Utc::now(),
        };
        // A struct of strings and integers always serialises.
        serde_json::to_vec(&record)
            .expect("lease record serialises")
            .into()
    }

    /// The holder named by a stored value; `None` for a value that is not a lease record.
    fn holder_of(entry: &kv::Entry) -> Option<Holder> {
        serde_json::from_slice::<LeaseRecord>(&entry.value)
            .ok()
            .map(|record| record.holder)
    }

    fn is_mine(&self, entry: &kv::Entry) -> bool {
        entry.operation == kv::Operation::Put
            && Self::holder_of(entry).is_some_and(|holder| holder.id == self.holder.id)
    }

    async fn try_acquire(&self, partition: u32) -> anyhow::Result<Acquire> {
        let key = partition_lease_key(partition);
        let record = self.record(partition);
        match self.kv.create(&key, record.clone()).await {
            Ok(revision) => {
                return Ok(Acquire::Acquired(Held {
                    partition,
                    revision,
                    record,
                }));
            }
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(error) => return Err(error.into()),
        }
        let entry = match self.kv.entry(&key).await? {
            Some(entry) if entry.operation == kv::Operation::Put => entry,
            // Released or expired while we read it: the next round tries again.
            _ => return Ok(Acquire::Taken(None)),
        };
        if !self.is_mine(&entry) {
            return Ok(Acquire::Taken(Self::holder_of(&entry)));
        }
        // Our own value: a create whose answer was lost, or a lease this process let lapse
        // while NATS was away. Nobody else can hold it; take it back with a compare-and-set.
        match self.kv.update(&key, record.clone(), entry.revision).await {
            Ok(revision) => Ok(Acquire::Acquired(Held {
                partition,
                revision,
                record,
            })),
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Ok(Acquire::Taken(None))
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn release(&self, held: &Held) {
        let key = partition_lease_key(held.partition);
        let deleted = tokio::time::timeout(
            self.timing.renew_every(),
            self.kv.delete_expect_revision(&key, Some(held.revision)),
        )
        .await;
        match deleted {
            Ok(Ok(())) => {
                tracing::info!(partition = held.partition, "released the partition lease")
            }
            Ok(Err(error)) => tracing::warn!(
                partition = held.partition,
                %error,
                "could not release the partition lease; it expires by itself"
            ),
            Err(_) => tracing::warn!(
                partition = held.partition,
                "releasing the partition lease timed out; it expires by itself"
            ),
        }
    }

    /// Stands by until the lease of `partition` is acquired; `None` on shutdown. Returns when
    /// the acquiring write was sent, from which its deadline counts. A partition of another
    /// replica's `share` is contended for only while the failover rule says so, and by
    /// looking every round, not by watching for its release (which its own replica's standby
    /// does, and so comes first).
    async fn acquire(
        &self,
        partition: u32,
        share: Share,
        holdings: &Holdings,
        shutdown: &CancellationToken,
    ) -> Option<(Held, Instant)> {
        let key = partition_lease_key(partition);
        let mut released: Option<kv::Watch> = None;
        loop {
            let preferred = self.preferred_liveness(share).await;
            if failover::contend(share, preferred, self.settled()) == Contend::Acquire {
                let sent = Instant::now();
                let tried =
                    tokio::time::timeout(self.timing.renew_every(), self.try_acquire(partition));
                match tried.await {
                    Ok(Ok(Acquire::Acquired(held))) => return Some((held, sent)),
                    Ok(Ok(Acquire::Taken(holder))) if share == Share::Own => {
                        holdings.standby(partition, holder)
                    }
                    Ok(Ok(Acquire::Taken(_))) => {}
                    Ok(Err(error)) => tracing::warn!(
                        partition,
                        error = format!("{error:#}"),
                        "cannot try to acquire the partition lease; retrying"
                    ),
                    Err(_) => tracing::warn!(partition, "acquiring the partition lease timed out"),
                }
            }
            if share == Share::Own && released.is_none() {
                // Best effort: without the watch a release is noticed at the next round.
                released = self.kv.watch(&key).await.ok();
            }
            tokio::select! {
                () = tokio::time::sleep(self.timing.renew_every()) => {}
                () = next_release(&mut released) => {}
                () = shutdown.cancelled() => return None,
            }
        }
    }
}

/// Resolves when the watched key is deleted or purged (a holder released it), or when the
/// watch ends (it is dropped, and the caller's timer takes over). Never resolves without one.
async fn next_release(watch: &mut Option<kv::Watch>) {
    let Some(entries) = watch.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        match entries.next().await {
            Some(Ok(entry)) if entry.operation == kv::Operation::Put => continue,
            Some(Ok(_)) => return,
            Some(Err(_)) | None => {
                *watch = None;
                return;
            }
        }
    }
}

/// Contends for the lease of `partition` (of `share`, see [`crate::failover`]) until
/// `shutdown`: stands by while another process holds it (or, for another replica's share,
/// while that replica is alive); while this process holds it, runs `work` with the lease's
/// [`Fence`] and renews the lease; once `work` has stopped, releases it (on shutdown, or to
/// hand it back to its own replica) or goes back to standing by.
///
/// `work` must return soon after the fence's token is cancelled (the partition worker does:
/// it hands its batch back, as on shutdown). It runs inside this future, not on a task of its
/// own, so a process killed on the spot leaves no worker running without a lease.
pub async fn keep<Work, Working>(
    partition: u32,
    share: Share,
    leases: Leases,
    holdings: Holdings,
    shutdown: CancellationToken,
    mut work: Work,
) where
    Work: FnMut(Fence) -> Working,
    Working: Future<Output = ()>,
{
    loop {
        let Some((held, sent)) = leases.acquire(partition, share, &holdings, &shutdown).await
        else {
            return;
        };
        if let Share::Foreign { preferred } = share {
            tracing::warn!(
                partition,
                preferred_replica = preferred,
                "covering for a replica that is gone: took over the partition, whose lease had expired"
            );
        }
        holdings.held(partition);
        let fence = Fence::new(
            partition,
            leases.timing.deadline_after(sent),
            shutdown.child_token(),
        );
        let work_done = CancellationToken::new();
        let working = async {
            work(fence.clone()).await;
            work_done.cancel();
        };
        let ((), (held, end)) = tokio::join!(
            working,
            leases.renew_while_working(held, share, &fence, &work_done, &shutdown)
        );
        holdings.not_held(partition);
        match end {
            End::Shutdown => {
                leases.release(&held).await;
                return;
            }
            // Released for the partition's own replica, which stands by for it; the next
            // round leaves it alone while that replica is alive.
            End::HandedBack => leases.release(&held).await,
            // Not released: if the key is still ours, the next round takes it back.
            End::Lapsed | End::Lost => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_value_names_host_pid_and_process_id() {
        let holder = Holder {
            host: "consumers-0".into(),
            pid: 1,
            id: "5f0c".into(),
        };
        let record = LeaseRecord {
            holder: holder.clone(),
            partition: 3,
            acquired_at: DateTime::from_timestamp(0, 0).expect("epoch"),
        };
        let value: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"host": "consumers-0", "pid": 1, "id": "5f0c", "partition": 3,
                               "acquiredAt": "1970-01-01T00:00:00Z"})
        );
    }
}
