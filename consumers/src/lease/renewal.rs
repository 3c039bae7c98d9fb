//! Renewing a held lease while its partition's worker runs, and ending that period: the
//! lease lost to another holder, lapsed for want of an answer, given up on shutdown, or
//! handed back to the partition's own replica ([`crate::failover`]).

use async_nats::jetstream::kv;
use hotpath_core::names::partition_lease_key;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Fence, Held, Holder, Leases};
use crate::failover::{self, Hold, Share};

/// Why a renewal did not go through.
enum RenewError {
    /// The key holds another holder's value, or none: the lease is gone.
    Lost(Option<Holder>),
    /// No answer or an error from NATS: try again while the deadline allows.
    Failed(anyhow::Error),
}

/// Why a holding period ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum End {
    Shutdown,
    /// A partition of another replica's share, given back now that replica is alive.
    HandedBack,
    /// The deadline passed without a successful renewal; the key may still be ours.
    Lapsed,
    Lost,
}

/// The outcome of one renewal attempt.
enum Renewal {
    Renewed,
    Lost,
    /// No answer: try again soon, while the deadline allows.
    Failed,
}

impl Leases {
    /// One compare-and-set on the revision this process last wrote; a lost answer to an
    /// earlier one is recognised by the value and taken back.
    async fn renew(&self, held: &mut Held) -> Result<(), RenewError> {
        let key = partition_lease_key(held.partition);
        let failed = |error: anyhow::Error| RenewError::Failed(error);
        match self
            .kv
            .update(&key, held.record.clone(), held.revision)
            .await
        {
            Ok(revision) => {
                held.revision = revision;
                return Ok(());
            }
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
            Err(error) => return Err(failed(error.into())),
        }
        let entry = self
            .kv
            .entry(&key)
            .await
            .map_err(|error| failed(error.into()))?;
        match entry {
            // A renewal of ours whose answer was lost moved the revision: still ours.
            Some(entry) if self.is_mine(&entry) => {
                held.revision = self
                    .kv
                    .update(&key, held.record.clone(), entry.revision)
                    .await
                    .map_err(|error| failed(error.into()))?;
                Ok(())
            }
            Some(entry) if entry.operation == kv::Operation::Put => {
                Err(RenewError::Lost(Self::holder_of(&entry)))
            }
            // Expired or deleted: no longer ours either.
            _ => Err(RenewError::Lost(None)),
        }
    }

    /// Renews `held` until `work_done`, cancelling the fence when the lease is lost or its
    /// deadline passes, or when a partition of another replica's `share` is to be handed back.
    /// On shutdown or hand-back it keeps renewing until the worker has handed its batch back,
    /// so the lease stays valid until it is released.
    pub(super) async fn renew_while_working(
        &self,
        mut held: Held,
        share: Share,
        fence: &Fence,
        work_done: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> (Held, End) {
        let partition = held.partition;
        let every = self.timing.renew_every();
        let mut end: Option<End> = None;
        let mut next = Instant::now() + every;
        loop {
            let renewing = matches!(end, None | Some(End::Shutdown | End::HandedBack));
            let deadline = fence.deadline();
            tokio::select! {
                () = work_done.cancelled() => {
                    // A worker stops only when told to, or when it found its fence closed a
                    // moment before the deadline fired here.
                    let stopped = if shutdown.is_cancelled() { End::Shutdown } else { End::Lapsed };
                    return (held, end.unwrap_or(stopped));
                }
                () = tokio::time::sleep_until(next), if renewing => {}
                () = tokio::time::sleep_until(deadline), if end.is_none() => {
                    tracing::error!(
                        partition,
                        "could not renew the partition lease in time; stopping the worker before the lease can expire"
                    );
                    fence.close();
                    end = Some(End::Lapsed);
                    continue;
                }
                () = shutdown.cancelled(), if end.is_none() => {
                    // The fence's token is a child of `shutdown`: the worker is stopping.
                    end = Some(End::Shutdown);
                    continue;
                }
            }
            let sent = Instant::now();
            match self.renew_once(&mut held).await {
                Renewal::Renewed => {
                    fence.extend(self.timing.deadline_after(sent));
                    next = sent + every;
                    if end.is_none() && self.hands_back(partition, share).await {
                        fence.close();
                        end = Some(End::HandedBack);
                    }
                }
                Renewal::Lost => {
                    fence.close();
                    end = Some(End::Lost);
                }
                Renewal::Failed => next = Instant::now() + self.timing.retry_after_failure(),
            }
        }
    }

    /// One renewal, bounded by the renewal period, its failures logged.
    async fn renew_once(&self, held: &mut Held) -> Renewal {
        let partition = held.partition;
        match tokio::time::timeout(self.timing.renew_every(), self.renew(held)).await {
            Ok(Ok(())) => Renewal::Renewed,
            Ok(Err(RenewError::Lost(holder))) => {
                tracing::error!(
                    partition,
                    holder = ?holder,
                    "the partition lease was taken over; stopping the worker"
                );
                Renewal::Lost
            }
            Ok(Err(RenewError::Failed(error))) => {
                tracing::warn!(
                    partition,
                    error = format!("{error:#}"),
                    "renewing the partition lease failed; retrying"
                );
                Renewal::Failed
            }
            Err(_) => {
                tracing::warn!(
                    partition,
                    "renewing the partition lease timed out; retrying"
                );
                Renewal::Failed
            }
        }
    }

    /// Whether the failover rule says to give `partition` back to its own replica now.
    async fn hands_back(&self, partition: u32, share: Share) -> bool {
        let Share::Foreign { preferred: replica } = share else {
            return false;
        };
        if failover::hold(share, self.preferred_liveness(share).await) == Hold::Keep {
            return false;
        }
        tracing::info!(
            partition,
            preferred_replica = replica,
            "the partition's own replica is alive again: handing the partition back"
        );
        true
    }
}
