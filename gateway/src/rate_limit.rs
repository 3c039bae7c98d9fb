//! Per-user rate limiting (governor's GCRA), so one noisy user cannot crowd out the rest.
//!
//! The gateway keeps one limiter per kind of work, each with its own setting: sends, `ack`
//! frames (receipts, which a device sends for every message it gets, so they have a budget of
//! their own instead of eating into the user's sends), and membership changes (each one writes
//! to Postgres and makes every gateway drop cached facts).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hotpath_core::rejection::Rejection;

#[derive(Clone)]
pub struct RateLimit {
    limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
}

impl RateLimit {
    /// `per_second` sustained with bursts of `burst`; `per_second == 0` turns limiting off.
    pub fn new(per_second: u32, burst: u32) -> RateLimit {
        RateLimit::with_quota(NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            Quota::per_second(rate).allow_burst(burst)
        }))
    }

    /// `per_minute` sustained, all of it usable at once; `per_minute == 0` turns limiting off.
    pub fn per_minute(per_minute: u32) -> RateLimit {
        RateLimit::with_quota(NonZeroU32::new(per_minute).map(Quota::per_minute))
    }

    fn with_quota(quota: Option<Quota>) -> RateLimit {
        RateLimit {
            limiter: quota.map(|quota| Arc::new(RateLimiter::keyed(quota))),
        }
    }

    pub fn check(&self, user_id: &str) -> Result<(), Rejection> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(&user_id.to_string())
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Rejection::RateLimitExceeded {
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                }
            })
    }

    /// Forgets users who have been quiet long enough to be back at full burst, so the state
    /// stays proportional to active users. Runs until the process ends.
    pub async fn housekeeping(self) {
        let Some(limiter) = self.limiter else { return };
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_user_waits_while_others_do_not() {
        let limit = RateLimit::new(1, 3);
        for _ in 0..3 {
            limit.check("alice").unwrap();
        }
        let rejection = limit.check("alice").unwrap_err();
        assert_eq!(rejection.code(), "RATE_LIMIT_EXCEEDED");
        assert!(rejection.retry_after_secs().unwrap() >= 1);
        limit.check("bob").unwrap();
    }

    #[test]
    fn zero_turns_it_off() {
        for limit in [RateLimit::new(0, 0), RateLimit::per_minute(0)] {
            for _ in 0..1000 {
                limit.check("alice").unwrap();
            }
        }
    }

    #[test]
    fn a_minute_budget_is_spent_at_once_then_waits_seconds() {
        let limit = RateLimit::per_minute(6);
        for _ in 0..6 {
            limit.check("alice").unwrap();
        }
        let wait = limit
            .check("alice")
            .unwrap_err()
            .retry_after_secs()
            .unwrap();
        assert!((1..=10).contains(&wait), "{wait}");
    }
}
