//! A circuit breaker per push provider.
//!
//! Closed, it lets every push through and counts consecutive provider failures (unavailable,
//! rate limited, timed out, credentials refused). At `failures_to_open` it opens: the worker
//! stops pulling tasks, which wait in the stream instead of spending their retries against a
//! provider that is down. After `open_for` it lets one trial through (half-open): a success
//! closes it, a failure opens it again for twice as long, up to ten times `open_for`.
//!
//! An answer about a device or a request (an unregistered token, a payload refused) is still
//! an answer: the provider is up, so it counts as a success.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Breaker {
    failures_to_open: u32,
    open_for: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Closed,
    Open {
        until: Instant,
    },
    /// One trial is out; everything else waits for its answer.
    HalfOpen,
}

struct State {
    mode: Mode,
    consecutive_failures: u32,
    /// The open period to use next time; doubles while trials fail.
    next_open: Duration,
}

/// What the worker may do now.
#[derive(Debug, PartialEq)]
pub enum Permit {
    /// Send.
    Go,
    /// Do not send (nor pull) for this long.
    Wait(Duration),
}

impl Breaker {
    pub fn new(failures_to_open: u32, open_for: Duration) -> Breaker {
        Breaker {
            failures_to_open: failures_to_open.max(1),
            open_for,
            state: Mutex::new(State {
                mode: Mode::Closed,
                consecutive_failures: 0,
                next_open: open_for,
            }),
        }
    }

    /// Asks to send one push. When the open period is over, the first caller gets the trial.
    pub fn permit(&self, now: Instant) -> Permit {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.mode {
            Mode::Closed => Permit::Go,
            Mode::Open { until } if now >= until => {
                state.mode = Mode::HalfOpen;
                Permit::Go
            }
            Mode::Open { until } => Permit::Wait(until - now),
            // The trial's answer decides; look again shortly.
            Mode::HalfOpen => Permit::Wait(Duration::from_millis(200)),
        }
    }

    /// How long to hold off pulling new tasks, if at all.
    pub fn holding_off(&self, now: Instant) -> Option<Duration> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.mode {
            Mode::Open { until } if now < until => Some(until - now),
            Mode::HalfOpen => Some(Duration::from_millis(200)),
            _ => None,
        }
    }

    /// The provider answered (even with a refusal about one device).
    pub fn success(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.mode = Mode::Closed;
        state.consecutive_failures = 0;
        state.next_open = self.open_for;
    }

    /// The provider failed (unavailable, too slow, refused our credentials). Returns true when
    /// this failure opened the breaker.
    pub fn failure(&self, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.consecutive_failures += 1;
        let open = match state.mode {
            Mode::HalfOpen => true,
            Mode::Closed => state.consecutive_failures >= self.failures_to_open,
            Mode::Open { .. } => false,
        };
        if open {
            let period = state.next_open;
            state.mode = Mode::Open {
                until: now + period,
            };
            state.next_open = (period * 2).min(self.open_for * 10);
        }
        open
    }

    /// The attempt that was let through never reached the provider (nothing to send, Postgres
    /// unavailable): if it was the trial, the next caller gets one instead.
    pub fn release(&self, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.mode == Mode::HalfOpen {
            state.mode = Mode::Open { until: now };
        }
    }

    pub fn is_open(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.mode != Mode::Closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_lets_one_trial_through() {
        let breaker = Breaker::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!breaker.failure(t0));
        assert!(!breaker.failure(t0));
        assert_eq!(breaker.permit(t0), Permit::Go);
        assert!(breaker.failure(t0), "the third failure opens it");
        assert_eq!(breaker.permit(t0), Permit::Wait(Duration::from_secs(10)));
        assert!(breaker.holding_off(t0).is_some());

        let later = t0 + Duration::from_secs(10);
        assert_eq!(breaker.permit(later), Permit::Go, "the trial");
        assert!(
            matches!(breaker.permit(later), Permit::Wait(_)),
            "only one trial at a time"
        );
        assert!(breaker.failure(later), "a failed trial opens it again");
        assert_eq!(
            breaker.permit(later),
            Permit::Wait(Duration::from_secs(20)),
            "for twice as long"
        );

        let much_later = later + Duration::from_secs(20);
        assert_eq!(breaker.permit(much_later), Permit::Go);
        breaker.success();
        assert!(!breaker.is_open());
        assert_eq!(breaker.holding_off(much_later), None);
        assert!(!breaker.failure(much_later), "the count starts over");
    }

    #[test]
    fn a_trial_that_never_reached_the_provider_is_given_to_the_next_caller() {
        let breaker = Breaker::new(1, Duration::from_secs(5));
        let now = Instant::now();
        breaker.failure(now);
        let later = now + Duration::from_secs(5);
        assert_eq!(breaker.permit(later), Permit::Go);
        breaker.release(later);
        assert_eq!(breaker.permit(later), Permit::Go, "a new trial at once");
        breaker.release(later);
        breaker.success();
        breaker.release(later);
        assert!(
            !breaker.is_open(),
            "releasing a closed breaker changes nothing"
        );
    }

    #[test]
    fn a_success_resets_the_count() {
        let breaker = Breaker::new(2, Duration::from_secs(1));
        let now = Instant::now();
        assert!(!breaker.failure(now));
        breaker.success();
        assert!(!breaker.failure(now));
        assert!(breaker.failure(now));
    }

    #[test]
    fn open_periods_stop_growing() {
        let breaker = Breaker::new(1, Duration::from_secs(1));
        let mut now = Instant::now();
        breaker.failure(now);
        for _ in 0..10 {
            now += Duration::from_secs(60);
            assert_eq!(breaker.permit(now), Permit::Go);
            breaker.failure(now);
        }
        assert_eq!(breaker.permit(now), Permit::Wait(Duration::from_secs(10)));
    }
}
