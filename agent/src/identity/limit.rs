//! The per-part rate limit of the token endpoint: a token bucket. Pure:
//! the caller passes the time, so tests run it on paused time.

use std::time::Duration;

use tokio::time::Instant;

/// A rate limit: `per_second` requests a second on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// The sustained rate.
    pub per_second: f64,
    /// How many requests may come at once after a quiet spell.
    pub burst: u32,
}

impl Default for RateLimit {
    /// 50 a second, 100 at once: far above what an SDK asks (it caches
    /// tokens for hours), low enough that a runaway loop in one part cannot
    /// crowd the others or the node's IMDS.
    fn default() -> Self {
        RateLimit {
            per_second: 50.0,
            burst: 100,
        }
    }
}

/// A token bucket: full at first, refilled at the limit's rate, never
/// above its burst.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket for `limit`, as of `now`.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        TokenBucket {
            limit,
            tokens: f64::from(limit.burst),
            last: now,
        }
    }

    /// Takes one request's token at `now`; when there is none, how long
    /// until there is.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        let burst = f64::from(self.limit.burst);
        self.tokens = (self.tokens + elapsed * self.limit.per_second).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if self.limit.per_second <= 0.0 {
            // A limit of nothing never refills: say "a while" rather than forever.
            return Err(Duration::from_secs(60));
        }
        Err(Duration::from_secs_f64(
            (1.0 - self.tokens) / self.limit.per_second,
        ))
    }
}

/// The `Retry-After` header's whole seconds for a wait: rounded up, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate() {
        let limit = RateLimit {
            per_second: 50.0,
            burst: 100,
        };
        let mut bucket = TokenBucket::new(limit, Instant::now());
        for i in 0..100 {
            assert!(
                bucket.take(Instant::now()).is_ok(),
                "request {i} of the burst"
            );
        }
        let wait = bucket.take(Instant::now()).expect_err("the burst is spent");
        assert_eq!(wait, Duration::from_millis(20));
        assert_eq!(retry_after_seconds(wait), 1);
        // 20 ms later one more token has come, and only one.
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(bucket.take(Instant::now()).is_ok());
        assert!(bucket.take(Instant::now()).is_err());
        // A second later: 50 more.
        tokio::time::advance(Duration::from_secs(1)).await;
        let granted = (0..100)
            .filter(|_| bucket.take(Instant::now()).is_ok())
            .count();
        assert_eq!(granted, 50);
        // A long quiet spell refills to the burst, no further.
        tokio::time::advance(Duration::from_secs(3600)).await;
        let granted = (0..1000)
            .filter(|_| bucket.take(Instant::now()).is_ok())
            .count();
        assert_eq!(granted, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_time_before_the_last_does_not_refill() {
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut bucket = TokenBucket::new(
            RateLimit {
                per_second: 1.0,
                burst: 1,
            },
            Instant::now(),
        );
        assert!(bucket.take(Instant::now()).is_ok());
        assert!(bucket.take(start).is_err());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_seconds(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
    }
}
