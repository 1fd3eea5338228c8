//! A client-side limiter so the agent never trips IMDS's own rate limits.
//!
//! IMDS allows 5 requests per second per VM in general and 20 per second on
//! the identity endpoint, and answers 429 beyond that
//! (<https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service#rate-limiting>).
//! A sliding log admits a burst of `limit` requests at once (no latency for
//! the common case of a few requests) and never more than `limit` in any
//! window. The window is slightly longer than one second so that jitter
//! between our clock and the server's cannot squeeze `limit + 1` requests into
//! the server's second.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// The margin added to IMDS's one-second window.
const WINDOW: Duration = Duration::from_millis(1050);

/// Admits at most `limit` requests per [`WINDOW`].
#[derive(Debug)]
pub(crate) struct RateLimiter {
    limit: usize,
    // A tokio mutex held across the sleep: waiters queue fairly (FIFO) behind
    // the one that is waiting for the window to slide.
    sent: Mutex<VecDeque<Instant>>,
}

impl RateLimiter {
    /// A limiter admitting `limit` requests per window (at least one).
    pub(crate) fn new(limit: u32) -> Self {
        let limit = usize::try_from(limit.max(1)).unwrap_or(usize::MAX);
        Self {
            limit,
            sent: Mutex::new(VecDeque::with_capacity(limit)),
        }
    }

    /// Waits until one more request may be sent, and records it as sent.
    pub(crate) async fn acquire(&self) {
        let mut sent = self.sent.lock().await;
        loop {
            let now = Instant::now();
            while sent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= WINDOW)
            {
                sent.pop_front();
            }
            if sent.len() < self.limit {
                sent.push_back(now);
                return;
            }
            if let Some(oldest) = sent.front() {
                let wait = (*oldest + WINDOW).saturating_duration_since(now);
                tracing::trace!(
                    wait_ms = wait.as_millis() as u64,
                    "imds request held by rate limiter"
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn never_more_than_limit_in_any_window() {
        let limiter = RateLimiter::new(5);
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..12 {
            limiter.acquire().await;
            times.push(start.elapsed());
        }
        // A burst of five, then five more one window later, then two more.
        assert!(
            times[..5].iter().all(|t| *t < Duration::from_millis(1)),
            "{times:?}"
        );
        assert!(
            times[5] >= WINDOW && times[9] < WINDOW + Duration::from_millis(1),
            "{times:?}"
        );
        assert!(times[10] >= WINDOW * 2, "{times:?}");
        for (i, t) in times.iter().enumerate().skip(5) {
            assert!(*t - times[i - 5] >= WINDOW, "{times:?}");
        }
    }
}
