//! Per-user rate limiting (governor's GCRA), so one noisy sender cannot crowd out the rest.

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
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            Arc::new(RateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            ))
        });
        RateLimit { limiter }
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
        let limit = RateLimit::new(0, 0);
        for _ in 0..1000 {
            limit.check("alice").unwrap();
        }
    }
}
