//! How the consumers wait before trying again: one [`Backoff`] for every retry loop.
//!
//! A consumer that cannot reach NATS or Postgres keeps what it holds and tries again, so the
//! only policy to choose is how long to wait in between. The answer is the same everywhere:
//! start short (a blip costs a tenth of a second), double after each failure so a longer
//! outage is not hammered, stop doubling at a cap, and start short again once something
//! worked. The caps differ by what is at stake: setting up a consumer or a bucket waits up to
//! [`SETUP_MAX`]; holding a batch or a receipt waits at most a third of the ack wait, so the
//! in-progress signal sent before each retry always reaches JetStream before it would
//! redeliver; a push worker that cannot pull waits a fixed second ([`Backoff::fixed`]).
//!
//! The type only counts; it never reads the clock. [`Backoff::next`] says how long the next
//! wait is, which the table tests check, and [`Backoff::pause`] is that wait, cut short by
//! shutdown: every loop that waits must also stop promptly when the process does.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The first wait after a failure.
pub const INITIAL: Duration = Duration::from_millis(100);
/// The longest wait between attempts to set something up (a consumer, a bucket) or to pull.
pub const SETUP_MAX: Duration = Duration::from_secs(5);

/// Doubling waits from `initial` up to `max`, back to `initial` on [`reset`](Backoff::reset).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Waits of `initial`, twice that, and so on, never more than `max` (at least `initial`).
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The same wait every time.
    pub fn fixed(delay: Duration) -> Backoff {
        Backoff::new(delay, delay)
    }

    /// The wait before the next attempt; the one after it is twice as long, up to the cap.
    pub fn next(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Something worked: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// Waits [`next`](Backoff::next) unless `shutdown` comes first; false on shutdown.
    pub async fn pause(&mut self, shutdown: &CancellationToken) -> bool {
        sleep(self.next(), shutdown).await
    }
}

/// Sleeps for `delay` unless `shutdown` comes first; false on shutdown.
pub async fn sleep(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = shutdown.cancelled() => false,
    }
}

/// Runs `attempt` until it succeeds (NATS may be restarting: keep trying), pausing by
/// `backoff` between failures and logging each one with `what` it was setting up; `None` once
/// `shutdown` is cancelled.
pub async fn until_set_up<T, Attempt, Attempting>(
    what: &str,
    mut backoff: Backoff,
    shutdown: &CancellationToken,
    mut attempt: Attempt,
) -> Option<T>
where
    Attempt: FnMut() -> Attempting,
    Attempting: Future<Output = anyhow::Result<T>>,
{
    loop {
        match attempt().await {
            Ok(done) => return Some(done),
            Err(error) => tracing::warn!(
                what,
                error = format!("{error:#}"),
                "cannot set up; retrying"
            ),
        }
        if !backoff.pause(shutdown).await {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn waits(backoff: &mut Backoff, count: usize) -> Vec<Duration> {
        (0..count).map(|_| backoff.next()).collect()
    }

    #[test]
    fn waits_double_up_to_the_cap() {
        // (first wait, cap, the first eight waits), in milliseconds.
        let cases: [(u64, u64, [u64; 8]); 5] = [
            (100, 5000, [100, 200, 400, 800, 1600, 3200, 5000, 5000]),
            (100, 1000, [100, 200, 400, 800, 1000, 1000, 1000, 1000]),
            (100, 250, [100, 200, 250, 250, 250, 250, 250, 250]),
            (100, 100, [100; 8]),
            // A cap below the first wait is the first wait.
            (100, 10, [100; 8]),
        ];
        for (initial, max, expected) in cases {
            let expected: Vec<Duration> = expected.into_iter().map(ms).collect();
            let mut backoff = Backoff::new(ms(initial), ms(max));
            assert_eq!(
                waits(&mut backoff, 8),
                expected,
                "{initial} ms up to {max} ms"
            );
        }
    }

    #[test]
    fn fixed_waits_never_change() {
        let mut backoff = Backoff::fixed(Duration::from_secs(1));
        assert_eq!(waits(&mut backoff, 4), vec![Duration::from_secs(1); 4]);
    }

    #[test]
    fn reset_starts_again_from_the_first_wait() {
        let mut backoff = Backoff::new(INITIAL, SETUP_MAX);
        waits(&mut backoff, 5);
        backoff.reset();
        assert_eq!(waits(&mut backoff, 3), vec![ms(100), ms(200), ms(400)]);
    }

    #[tokio::test]
    async fn a_pause_ends_at_shutdown() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let mut backoff = Backoff::fixed(Duration::from_secs(3600));
        assert!(!backoff.pause(&shutdown).await);
    }

    #[tokio::test]
    async fn a_pause_without_shutdown_sleeps_its_wait() {
        let shutdown = CancellationToken::new();
        let mut backoff = Backoff::fixed(ms(20));
        let started = std::time::Instant::now();
        assert!(backoff.pause(&shutdown).await);
        assert!(started.elapsed() >= ms(20));
    }
}
