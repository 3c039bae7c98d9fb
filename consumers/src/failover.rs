//! Failover across consumer replicas: which partitions a process contends for, and when it
//! takes or gives back a partition of another replica's share. The rule is decided here, with
//! no clock and no NATS; [`crate::lease`] asks it at each round and [`crate::liveness`] reads
//! and writes what it needs to know.
//!
//! Replica k of n *prefers* the partitions p with p mod n == k: its own share. It contends for
//! them at once and keeps them (a second process with the same index is a standby, see
//! [`crate::lease`]). Without failover a dead replica's share would wait for a process with
//! that index to come back; so every replica also *covers* the other shares:
//!
//! * **Takes over** a partition of replica j's share only when j is gone, which it knows by
//!   two keys of the `PARTITION_LEASES` bucket: the partition's lease (nobody holds it, so
//!   `create` succeeds) and j's liveness key `replica-<j>-of-<n>`, which every process running
//!   as replica j renews every third of the lease TTL ([`crate::liveness`]). Both expire a TTL
//!   after their writer died, and a covering replica looks every third of the TTL: a dead
//!   replica's share is taken over within **TTL + TTL/3** (13.3 s with the default 10 s TTL),
//!   plus the new holder's rewind.
//! * **Never races the preferred replica.** While j's liveness key is present (j runs, perhaps
//!   restarting its workers, or a standby of j is about to take over) nobody else contends; a
//!   covering replica that cannot read the key does not contend either. A covering replica
//!   also polls instead of watching for a release, so a standby of j, which does watch, takes
//!   a released partition first.
//! * **Gives back** a covered partition as soon as it sees j's liveness key again, at its next
//!   renewal (within TTL/3 of j's start): the worker hands its batch back as on shutdown and
//!   the lease is deleted, and j, standing by for it with a watch on the key, takes it at once.
//! * **Settles first.** A process starts covering only a TTL after it opened the bucket, so at
//!   a cold start every replica has written its liveness key before any other could mistake it
//!   for dead and take its share, only to hand it back moments later.
//!
//! Exactly-once and order do not depend on any of this: whoever takes a partition holds its
//! lease, is fenced by it, and replays from the first unacknowledged message
//! (`docs/adr/0006-partition-leases.md`); failover only decides *who* contends when.

use hotpath_core::config::Config;

/// Whose share a partition is, from this process's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// p mod n == k: this replica's own.
    Own,
    /// Another replica's share, covered for while that replica is gone.
    Foreign { preferred: u32 },
}

/// What this process knows of a replica's liveness key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The key holds a value: some process runs as that replica.
    Alive,
    /// The key is absent (expired, or deleted on a clean shutdown).
    Gone,
    /// NATS did not answer: nothing can be concluded.
    Unknown,
}

/// What a process that does not hold a partition does this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contend {
    /// Try to create the lease (which the server grants to one contender only).
    Acquire,
    /// Leave it to its preferred replica.
    Wait,
}

/// What the holder of a partition does at a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    Keep,
    /// Stop the worker, release the lease: the preferred replica takes it.
    HandBack,
}

/// Whether a process that does not hold a partition contends for it: always for its own
/// share; for another share only once it has `settled` and the preferred replica is known to
/// be gone. (For an own partition the preferred replica is this process: alive.)
pub fn contend(share: Share, preferred: Liveness, settled: bool) -> Contend {
    match (share, preferred, settled) {
        (Share::Own, _, _) => Contend::Acquire,
        (Share::Foreign { .. }, Liveness::Gone, true) => Contend::Acquire,
        (Share::Foreign { .. }, _, _) => Contend::Wait,
    }
}

/// Whether the holder of a partition keeps it: always its own; another share's only while its
/// preferred replica is not known to be alive.
pub fn hold(share: Share, preferred: Liveness) -> Hold {
    match (share, preferred) {
        (Share::Foreign { .. }, Liveness::Alive) => Hold::HandBack,
        _ => Hold::Keep,
    }
}

/// Replica k of n over the stream's partitions (`HOTPATH_CONSUMER_REPLICA`, `_REPLICAS`,
/// `HOTPATH_PARTITIONS`), for a process that owns something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub replica: u32,
    pub replicas: u32,
    pub partitions: u32,
}

impl Assignment {
    /// `None` when the configuration gives this process no partition: it contends for none,
    /// covers for nobody and reports itself misconfigured (see [`crate::holdings`]).
    pub fn of(config: &Config) -> Option<Assignment> {
        if config.owns_nothing_because().is_some() {
            return None;
        }
        Some(Assignment {
            replica: config.consumer_replica,
            replicas: config.consumer_replicas.max(1),
            partitions: config.partitions,
        })
    }

    /// The replica whose share `partition` is.
    pub fn preferred(&self, partition: u32) -> u32 {
        partition % self.replicas
    }

    pub fn share_of(&self, partition: u32) -> Share {
        match self.preferred(partition) {
            preferred if preferred == self.replica => Share::Own,
            preferred => Share::Foreign { preferred },
        }
    }

    /// Every partition, each with its share: a process contends for its own and covers the
    /// rest. With one replica all are its own.
    pub fn contended(&self) -> Vec<(u32, Share)> {
        (0..self.partitions)
            .map(|partition| (partition, self.share_of(partition)))
            .collect()
    }

    /// Whether there are other replicas, to cover for and to be covered by: only then is the
    /// liveness key written.
    pub fn has_peers(&self) -> bool {
        self.replicas > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Liveness::{Alive, Gone, Unknown};

    const FOREIGN: Share = Share::Foreign { preferred: 1 };

    #[test]
    fn who_contends_for_a_partition_it_does_not_hold() {
        // (share, the preferred replica's liveness, settled, decision)
        let cases = [
            (Share::Own, Alive, true, Contend::Acquire),
            (Share::Own, Alive, false, Contend::Acquire),
            (Share::Own, Gone, false, Contend::Acquire),
            (Share::Own, Unknown, true, Contend::Acquire),
            (FOREIGN, Gone, true, Contend::Acquire),
            (FOREIGN, Gone, false, Contend::Wait),
            (FOREIGN, Alive, true, Contend::Wait),
            (FOREIGN, Alive, false, Contend::Wait),
            (FOREIGN, Unknown, true, Contend::Wait),
            (FOREIGN, Unknown, false, Contend::Wait),
        ];
        for (share, preferred, settled, expected) in cases {
            assert_eq!(
                contend(share, preferred, settled),
                expected,
                "{share:?}, preferred replica {preferred:?}, settled {settled}"
            );
        }
    }

    #[test]
    fn who_keeps_a_partition_it_holds() {
        // (share, the preferred replica's liveness, decision)
        let cases = [
            (Share::Own, Alive, Hold::Keep),
            (Share::Own, Gone, Hold::Keep),
            (Share::Own, Unknown, Hold::Keep),
            (FOREIGN, Alive, Hold::HandBack),
            (FOREIGN, Gone, Hold::Keep),
            (FOREIGN, Unknown, Hold::Keep),
        ];
        for (share, preferred, expected) in cases {
            assert_eq!(
                hold(share, preferred),
                expected,
                "{share:?}, preferred replica {preferred:?}"
            );
        }
    }

    #[test]
    fn a_replica_prefers_its_share_and_covers_the_others() {
        let own = Share::Own;
        let of = |preferred| Share::Foreign { preferred };
        // (replica, replicas, partitions, every partition's share)
        let cases = [
            (0, 2, 4, vec![own, of(1), own, of(1)]),
            (1, 2, 4, vec![of(0), own, of(0), own]),
            (2, 3, 5, vec![of(0), of(1), own, of(0), of(1)]),
            (0, 1, 3, vec![own, own, own]),
        ];
        for (replica, replicas, partitions, shares) in cases {
            let assignment = Assignment {
                replica,
                replicas,
                partitions,
            };
            let expected: Vec<(u32, Share)> = (0..partitions).zip(shares).collect();
            assert_eq!(
                assignment.contended(),
                expected,
                "replica {replica} of {replicas}"
            );
            assert_eq!(assignment.has_peers(), replicas > 1);
        }
    }

    #[test]
    fn a_process_that_owns_nothing_contends_for_nothing() {
        let mut config = Config::from_env().expect("default config");
        config.partitions = 4;
        config.consumer_replicas = 2;
        config.consumer_replica = 2;
        assert_eq!(Assignment::of(&config), None);
        config.consumer_replica = 1;
        let assignment = Assignment::of(&config).expect("replica 1 of 2 owns something");
        assert_eq!(assignment.share_of(3), Share::Own);
        assert_eq!(assignment.share_of(2), Share::Foreign { preferred: 0 });
    }
}
