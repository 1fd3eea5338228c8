//! GPU health as a pure function of the error events a GPU has reported and
//! the current time.
//!
//! The rule: a *critical* event (an XID outside the application-caused set, or
//! a double-bit ECC error) makes the GPU unhealthy; a GPU that reports no new
//! critical event for [`HealthPolicy::recovery_window`] is healthy again. The
//! recovery half matters as much as the failure half: a GPU that never
//! recovers from one transient XID is taken out of service forever, which is
//! the flaw operators most often report about GPU health checkers.
//!
//! Nothing here touches NVML or a clock: the watcher thread in
//! [`super::nvml`] records events, and [`evaluate`] is called with the
//! recorded events and `now`, so the whole state machine is table-tested.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_api::inventory::GpuHealth;
use serde::{Deserialize, Serialize};

/// XIDs that NVIDIA documents as caused by the application (bad memory access,
/// MMU fault from user code, graphics engine exception, preemptive cleanup,
/// video processor exception, ...), not by the GPU. A GPU reporting them is
/// still fit for the next job. See the NVIDIA "XID Errors" table.
pub const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// The XID value NVML reports when it cannot tell which XID happened
/// (`nvmlEventData_t.eventData == 999`). Treated as critical: an unknown
/// fault is not evidence the GPU is fine.
pub const UNKNOWN_XID: u64 = 999;

/// Default time a GPU must stay free of critical events to recover.
pub const DEFAULT_RECOVERY_WINDOW: Duration = Duration::from_secs(10 * 60);

/// How health is judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPolicy {
    /// How long a GPU must go without a new critical event to be healthy again.
    pub recovery_window: Duration,
    /// XIDs that do not affect health (application-caused).
    pub ignored_xids: Vec<u64>,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            recovery_window: DEFAULT_RECOVERY_WINDOW,
            ignored_xids: APPLICATION_XIDS.to_vec(),
        }
    }
}

/// What a GPU reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GpuEventKind {
    /// An XID error (`nvmlEventTypeXidCriticalError`) with its number.
    Xid {
        /// The XID number (999 when the driver could not tell).
        xid: u64,
    },
    /// A double-bit (uncorrectable) ECC error (`nvmlEventTypeDoubleBitEccError`).
    DoubleBitEcc,
}

/// One event reported by one GPU, stamped with when the agent received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuEvent {
    /// What happened.
    pub kind: GpuEventKind,
    /// When the watcher received it.
    pub at: SystemTime,
}

impl GpuEvent {
    /// Whether this event counts against the GPU under `policy`.
    pub fn is_critical(&self, policy: &HealthPolicy) -> bool {
        match self.kind {
            GpuEventKind::Xid { xid } => !policy.ignored_xids.contains(&xid),
            GpuEventKind::DoubleBitEcc => true,
        }
    }

    /// A short human-readable reason, e.g. `"xid 79"`.
    pub fn reason(&self) -> String {
        match self.kind {
            GpuEventKind::Xid { xid: UNKNOWN_XID } => "xid unknown".to_owned(),
            GpuEventKind::Xid { xid } => format!("xid {xid}"),
            GpuEventKind::DoubleBitEcc => "double-bit ecc error".to_owned(),
        }
    }
}

/// Judges one GPU's health from its events (in any order) at time `now`.
///
/// Events stamped after `now` are ignored, so replaying a log at an earlier
/// instant gives the answer the agent would have given then.
pub fn evaluate(policy: &HealthPolicy, events: &[GpuEvent], now: SystemTime) -> GpuHealth {
    let mut critical: Vec<&GpuEvent> = events
        .iter()
        .filter(|e| e.at <= now && e.is_critical(policy))
        .collect();
    critical.sort_by_key(|e| e.at);
    let Some(last) = critical.last() else {
        return GpuHealth::Healthy;
    };
    let recovers_at = last.at + policy.recovery_window;
    if now >= recovers_at {
        return GpuHealth::Healthy;
    }
    // Walk back while consecutive critical events are closer than the window:
    // the GPU has been unhealthy without a break since the first of them.
    let mut since = last.at;
    for pair in critical.windows(2).rev() {
        let (earlier, later) = (pair[0], pair[1]);
        if later.at.duration_since(earlier.at).unwrap_or_default() >= policy.recovery_window {
            break;
        }
        since = earlier.at;
    }
    GpuHealth::Unhealthy {
        reason: last.reason(),
        since_unix_ms: unix_ms(since),
        last_event_unix_ms: unix_ms(last.at),
        recovers_at_unix_ms: unix_ms(recovers_at),
    }
}

/// Drops events that can no longer change any answer [`evaluate`] gives for
/// times at or after the newest event, so a long-running watcher keeps a
/// bounded log: non-critical events, and critical events before the last gap
/// of a full recovery window. Under an event storm the log is further capped
/// at `max_len` events, keeping the first of the current run (which fixes
/// `since`) and the newest ones; if the dropped middle events were what kept
/// the run unbroken, `since` may then be reported later than it was.
pub fn prune(policy: &HealthPolicy, events: &mut Vec<GpuEvent>, max_len: usize) {
    events.retain(|e| e.is_critical(policy));
    events.sort_by_key(|e| e.at);
    let run_start = events
        .windows(2)
        .rposition(|pair| {
            pair[1].at.duration_since(pair[0].at).unwrap_or_default() >= policy.recovery_window
        })
        .map_or(0, |i| i + 1);
    events.drain(..run_start);
    if events.len() > max_len && max_len >= 2 {
        let excess = events.len() - max_len;
        events.drain(1..=excess);
    }
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn xid(xid: u64, at: u64) -> GpuEvent {
        GpuEvent {
            kind: GpuEventKind::Xid { xid },
            at: t(at),
        }
    }

    fn dbe(at: u64) -> GpuEvent {
        GpuEvent {
            kind: GpuEventKind::DoubleBitEcc,
            at: t(at),
        }
    }

    /// Expected outcome: `None` = healthy, `Some((reason, since, last))` =
    /// unhealthy with those values (seconds relative to `t(0)`).
    type Expect = Option<(&'static str, u64, u64)>;

    fn check(events: &[GpuEvent], now: u64, expect: Expect) {
        let policy = HealthPolicy::default();
        let got = evaluate(&policy, events, t(now));
        let want = match expect {
            None => GpuHealth::Healthy,
            Some((reason, since, last)) => GpuHealth::Unhealthy {
                reason: reason.to_owned(),
                since_unix_ms: unix_ms(t(since)),
                last_event_unix_ms: unix_ms(t(last)),
                recovers_at_unix_ms: unix_ms(t(last + 10 * MIN)),
            },
        };
        assert_eq!(got, want, "events {events:?} at now=+{now}s");
    }

    #[test]
    fn health_table() {
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<GpuEvent>, u64, Expect)> = vec![
            ("no events", vec![], 0, None),
            ("xid 79 just now", vec![xid(79, 100)], 100, Some(("xid 79", 100, 100))),
            ("xid 79 9 min ago", vec![xid(79, 100)], 100 + 9 * MIN, Some(("xid 79", 100, 100))),
            ("xid 79 exactly 10 min ago recovers", vec![xid(79, 100)], 100 + 10 * MIN, None),
            ("xid 79 11 min ago recovers", vec![xid(79, 100)], 100 + 11 * MIN, None),
            ("xid 13 is the application's", vec![xid(13, 100)], 101, None),
            ("xid 31 is the application's", vec![xid(31, 100)], 101, None),
            ("xid 43 is the application's", vec![xid(43, 100)], 101, None),
            ("xid 45 is the application's", vec![xid(45, 100)], 101, None),
            ("xid 68 is the application's", vec![xid(68, 100)], 101, None),
            ("xid 109 is the application's", vec![xid(109, 100)], 101, None),
            ("xid 48 (dbe) is critical", vec![xid(48, 100)], 101, Some(("xid 48", 100, 100))),
            ("unknown xid is critical", vec![xid(UNKNOWN_XID, 100)], 101, Some(("xid unknown", 100, 100))),
            ("double-bit ecc", vec![dbe(100)], 200, Some(("double-bit ecc error", 100, 100))),
            ("app xid after critical keeps window", vec![xid(79, 100), xid(13, 200)], 100 + 10 * MIN, None),
            ("new critical restarts window", vec![xid(79, 100), xid(94, 100 + 5 * MIN)], 100 + 12 * MIN,
                Some(("xid 94", 100, 100 + 5 * MIN))),
            ("run after a full gap starts fresh", vec![xid(79, 100), xid(94, 100 + 20 * MIN)], 100 + 21 * MIN,
                Some(("xid 94", 100 + 20 * MIN, 100 + 20 * MIN))),
            ("order of input does not matter", vec![xid(94, 100 + 5 * MIN), xid(79, 100)], 100 + 6 * MIN,
                Some(("xid 94", 100, 100 + 5 * MIN))),
            ("future events ignored", vec![xid(79, 500)], 400, None),
            ("recovered then failed again", vec![xid(79, 0), xid(79, 30 * MIN)], 31 * MIN,
                Some(("xid 79", 30 * MIN, 30 * MIN))),
        ];
        for (name, events, now, expect) in cases {
            eprintln!("case: {name}");
            check(&events, now, expect);
        }
    }

    #[test]
    fn custom_window_and_ignored_set() {
        let policy = HealthPolicy {
            recovery_window: Duration::from_secs(5),
            ignored_xids: vec![79],
        };
        assert!(evaluate(&policy, &[xid(79, 0)], t(1)).is_healthy());
        assert!(!evaluate(&policy, &[xid(13, 0)], t(4)).is_healthy());
        assert!(evaluate(&policy, &[xid(13, 0)], t(5)).is_healthy());
    }

    #[test]
    fn prune_keeps_answers_unchanged() {
        let policy = HealthPolicy::default();
        let events = vec![
            xid(79, 0),
            xid(13, 10),
            xid(94, 30 * MIN),
            xid(79, 32 * MIN),
            xid(13, 33 * MIN),
            dbe(35 * MIN),
        ];
        let mut pruned = events.clone();
        prune(&policy, &mut pruned, 64);
        assert_eq!(
            pruned,
            vec![xid(94, 30 * MIN), xid(79, 32 * MIN), dbe(35 * MIN)]
        );
        for now in [35 * MIN, 40 * MIN, 44 * MIN, 45 * MIN, 50 * MIN] {
            assert_eq!(
                evaluate(&policy, &events, t(now)),
                evaluate(&policy, &pruned, t(now)),
                "now=+{now}s"
            );
        }
    }

    #[test]
    fn prune_caps_a_storm_but_keeps_run_start() {
        let policy = HealthPolicy::default();
        let mut events: Vec<GpuEvent> = (0..100).map(|i| xid(79, i)).collect();
        prune(&policy, &mut events, 8);
        assert_eq!(events.len(), 8);
        assert_eq!(events[0], xid(79, 0));
        assert_eq!(events[7], xid(79, 99));
        assert_eq!(
            evaluate(&policy, &events, t(100)),
            GpuHealth::Unhealthy {
                reason: "xid 79".into(),
                since_unix_ms: unix_ms(t(0)),
                last_event_unix_ms: unix_ms(t(99)),
                recovers_at_unix_ms: unix_ms(t(99 + 10 * MIN)),
            }
        );
    }
}
