//! Which IMDS answers are retried, and when.
//!
//! Microsoft's guidance: retry 404, 410, 429 and 5xx (and timeouts) with
//! exponential backoff, never other 4xx; keep retrying 410 for up to 70 s, as
//! IMDS answers 410 while it is being updated.
//! <https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service#errors-and-debugging>,
//! <https://learn.microsoft.com/entra/identity/managed-identities-azure-resources/how-to-use-vm-token#retry-guidance>.

use std::time::{Duration, SystemTime};

/// When to retry a failed IMDS request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Waits before the 2nd, 3rd, ... try. The default, 2, 4, 8 and 16 s,
    /// makes five tries at about 0, 2, 6, 14 and 30 s. Tests inject a
    /// millisecond schedule.
    pub delays: Vec<Duration>,
    /// How long 410 Gone keeps being retried (with the last delay) after the
    /// schedule is used up, counted from the first try.
    pub gone_budget: Duration,
    /// The longest `Retry-After` honoured; a longer one is cut to this.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            delays: [2, 4, 8, 16].into_iter().map(Duration::from_secs).collect(),
            gone_budget: Duration::from_secs(70),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The same policy with every scheduled wait cut to `max`. A poller that
    /// asks every `max` anyway must not sleep longer between tries than
    /// between polls: after an outage it would see IMDS's first good answer
    /// only at the end of its longest backoff step. `Retry-After` is still
    /// honoured, and 410 is still retried for the whole `gone_budget`.
    pub fn capped(&self, max: Duration) -> RetryPolicy {
        RetryPolicy {
            delays: self.delays.iter().map(|d| (*d).min(max)).collect(),
            ..self.clone()
        }
    }

    /// The wait before the next try, or `None` to give up.
    ///
    /// `failures` counts the failed tries so far (at least 1), `elapsed` is the
    /// time since the first try, `gone` says the last answer was 410 and
    /// `retry_after` is the server's `Retry-After`, if any.
    pub fn next_delay(
        &self,
        failures: usize,
        elapsed: Duration,
        gone: bool,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        let scheduled = match self.delays.get(failures.saturating_sub(1)) {
            Some(d) => *d,
            None if gone => {
                let last = self
                    .delays
                    .last()
                    .copied()
                    .unwrap_or(Duration::from_secs(1));
                if elapsed + last > self.gone_budget {
                    return None;
                }
                last
            }
            None => return None,
        };
        Some(match retry_after {
            Some(server) => scheduled.max(server.min(self.max_retry_after)),
            None => scheduled,
        })
    }
}

/// Whether an HTTP status from IMDS is worth another try.
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 404 | 410 | 429 | 500..=599)
}

/// Parses `Retry-After`: delta-seconds or an HTTP date (RFC 9110 §10.2.3).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Five tries at about 0, 2, 6, 14 and 30 s, then give up (non-410).
    #[test]
    fn default_schedule_is_microsofts() {
        let policy = RetryPolicy::default();
        let mut at = Duration::ZERO;
        let mut tries = vec![at];
        let mut failures = 1;
        while let Some(d) = policy.next_delay(failures, at, false, None) {
            at += d;
            tries.push(at);
            failures += 1;
        }
        assert_eq!(tries, vec![secs(0), secs(2), secs(6), secs(14), secs(30)]);
    }

    /// 410 keeps going with the last delay until 70 s have passed.
    #[test]
    fn gone_is_retried_for_70_seconds() {
        let policy = RetryPolicy::default();
        let mut at = Duration::ZERO;
        let mut tries = vec![at];
        let mut failures = 1;
        while let Some(d) = policy.next_delay(failures, at, true, None) {
            at += d;
            tries.push(at);
            failures += 1;
        }
        assert_eq!(
            tries,
            vec![
                secs(0),
                secs(2),
                secs(6),
                secs(14),
                secs(30),
                secs(46),
                secs(62)
            ]
        );
    }

    /// Capped at 1 s: tries every second, 410 still for 70 s, and a
    /// server's `Retry-After` still wins.
    #[test]
    fn a_capped_policy_tries_every_second() {
        let policy = RetryPolicy::default().capped(secs(1));
        assert_eq!(policy.delays, vec![secs(1); 4]);
        assert_eq!(policy.next_delay(5, secs(4), false, None), None);
        assert_eq!(policy.next_delay(5, secs(4), true, None), Some(secs(1)));
        assert_eq!(policy.next_delay(70, secs(69), true, None), Some(secs(1)));
        assert_eq!(policy.next_delay(71, secs(70), true, None), None);
        assert_eq!(
            policy.next_delay(1, Duration::ZERO, false, Some(secs(5))),
            Some(secs(5))
        );
    }

    #[test]
    fn retry_after_is_honoured_but_capped() {
        let policy = RetryPolicy::default();
        assert_eq!(
            policy.next_delay(1, Duration::ZERO, false, Some(secs(5))),
            Some(secs(5))
        );
        assert_eq!(
            policy.next_delay(1, Duration::ZERO, false, Some(secs(1))),
            Some(secs(2))
        );
        assert_eq!(
            policy.next_delay(1, Duration::ZERO, false, Some(secs(600))),
            Some(secs(60))
        );
    }

    #[test]
    fn only_microsofts_statuses_are_retried() {
        for s in [404, 410, 429, 500, 503, 599] {
            assert!(is_retryable_status(s), "{s}");
        }
        for s in [400, 401, 403, 405, 409, 422] {
            assert!(!is_retryable_status(s), "{s}");
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
