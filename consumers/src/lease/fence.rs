//! The timing of the lease protocol and the fence a partition worker checks (see the parent
//! module for the protocol): every interval follows from the TTL alone, and the fence closes
//! at a local deadline that always comes before the lease could expire.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Every interval of the protocol, derived from the TTL alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub ttl: Duration,
}

impl Timing {
    /// How often a holder renews and a standby tries to acquire.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// How long before its key could expire a holder stops by itself: room for a fetch or a
    /// rewind begun just before the deadline, and for the timer that stops the worker.
    pub fn margin(&self) -> Duration {
        self.ttl / 4
    }

    /// The deadline earned by a write sent at `sent`.
    pub fn deadline_after(&self, sent: Instant) -> Instant {
        sent + self.ttl - self.margin()
    }

    /// How long after its holder died a partition waits, at most, for a new holder to take it
    /// (a standby, or a replica covering for a dead one, see [`crate::failover`]): the lease
    /// (and the dead replica's liveness key) expire a TTL after the holder's last write, and
    /// the contenders look every third of the TTL. The new holder's rewind comes on top.
    pub fn takeover_bound(&self) -> Duration {
        self.ttl + self.renew_every()
    }

    /// The pause before trying a renewal again after one that got no answer.
    pub(crate) fn retry_after_failure(&self) -> Duration {
        (self.ttl / 12).max(Duration::from_millis(100))
    }
}

/// The fence a worker checks before it touches its durable consumer.
#[derive(Clone)]
pub struct Fence {
    partition: u32,
    deadline: Arc<Mutex<Instant>>,
    token: CancellationToken,
}

/// The lease is no longer held (lost, lapsed or given up on shutdown).
#[derive(Debug)]
pub struct LeaseLost {
    pub partition: u32,
}

impl std::fmt::Display for LeaseLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the lease of partition {} is no longer held",
            self.partition
        )
    }
}

impl std::error::Error for LeaseLost {}

impl Fence {
    pub(super) fn new(partition: u32, deadline: Instant, token: CancellationToken) -> Fence {
        Fence {
            partition,
            deadline: Arc::new(Mutex::new(deadline)),
            token,
        }
    }

    /// Ok while the lease is held and its local deadline has not passed.
    pub fn check(&self) -> Result<(), LeaseLost> {
        if self.token.is_cancelled() || Instant::now() >= self.deadline() {
            return Err(LeaseLost {
                partition: self.partition,
            });
        }
        Ok(())
    }

    /// Cancelled when the lease is lost, lapses, or the process shuts down: the worker's
    /// shutdown signal.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Stops the worker: the lease is lost, lapsed, or to be handed back.
    pub(super) fn close(&self) {
        self.token.cancel();
    }

    pub(super) fn deadline(&self) -> Instant {
        // The lock is held only to copy an Instant and never across a panic.
        *self.deadline.lock().expect("fence deadline lock")
    }

    pub(super) fn extend(&self, deadline: Instant) {
        *self.deadline.lock().expect("fence deadline lock") = deadline;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_comes_before_the_key_can_expire_and_after_two_renewals() {
        let timing = Timing {
            ttl: Duration::from_secs(10),
        };
        let sent = Instant::now();
        let deadline = timing.deadline_after(sent);
        assert!(deadline < sent + timing.ttl, "stops before the key expires");
        assert!(
            deadline > sent + 2 * timing.renew_every(),
            "two renewals can fail before the worker stops"
        );
        assert_eq!(timing.margin(), Duration::from_millis(2500));
    }

    #[test]
    fn a_dead_holder_is_replaced_within_the_ttl_and_a_third() {
        // (TTL, the bound) in milliseconds.
        let cases = [(10_000, 13_333), (3_000, 4_000), (1_000, 1_333)];
        for (ttl, bound) in cases {
            let timing = Timing {
                ttl: Duration::from_millis(ttl),
            };
            assert_eq!(timing.takeover_bound().as_millis(), bound, "TTL {ttl} ms");
        }
    }
}
