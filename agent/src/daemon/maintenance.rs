//! The `maintenance` task: IMDS scheduled events → drains.
//!
//! Reads: the VM's name (at start, or from the `imds-instance` task through
//! a oneshot once IMDS answers), then `EventsUpdate`s from the
//! `imds-scheduled-events` watcher (mpsc 8), which it starts and which
//! polls until the `io` token fires; one finish request from `run` (a
//! oneshot) once the reconciler is done. Writes: `Input::Maintenance` to
//! the reconciler (mpsc 64) each time what the events ask for changes, and,
//! on the finish request after a drain for events, their acknowledgement to
//! IMDS. Runs only when the agent has IMDS.
//!
//! What the events ask for is [`decide`], a pure function of this VM's
//! events, when each was first seen, and now.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use drover_imds::{DEFAULT_POLL_INTERVAL, EventStatus, EventType, ImdsClient, ScheduledEvent};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Input;

/// A drain that this VM's scheduled events ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Drain {
    /// When running parts must be stopped: the stop margin before the
    /// earliest event may start; at or before now to stop them at once.
    pub(super) stop_at: SystemTime,
    /// A Preempt or Terminate is among the events: the VM will not come
    /// back, and the node says `preempted`.
    pub(super) preempted: bool,
    /// The events to approve (`StartRequests`) once the parts are stopped:
    /// the scheduled ones this drain is for (a started one needs none).
    pub(super) acknowledge: Vec<String>,
    /// Why, for the logs of the parts it stops, e.g. `a scheduled Reboot
    /// (event …) not before 2026-12-01T20:04:21Z`.
    pub(super) reason: String,
}

/// What `events` (this VM's) ask of the agent at `now`: `None` when none
/// needs its parts stopped.
///
/// Preempt and Terminate stop parts at once. Reboot and Redeploy let them
/// run until `margin` before `NotBefore` (a started one: at once). A
/// `NotBefore` that is neither RFC 1123 nor RFC 3339 is taken as the least
/// notice Azure documents for the type, counted from when the event was
/// first seen (`first_seen`, else `now`): a guess that errs late would cost
/// the jobs, one that errs early only some of their time. Freeze (a pause
/// of seconds, memory kept) and unknown types stop nothing. Which events
/// need a drain is read from the events present now, not from their ids,
/// because an event's id may change when it starts (as Microsoft's mock
/// server does): an event gone from the document is over or cancelled.
pub(super) fn decide(
    events: &[ScheduledEvent],
    first_seen: &BTreeMap<String, SystemTime>,
    now: SystemTime,
    margin: Duration,
) -> Option<Drain> {
    let mut drain: Option<Drain> = None;
    for e in events {
        let kind = format!("{:?}", e.event_type);
        let (starts, preempted, reason) = match e.event_type {
            EventType::Freeze | EventType::Unknown => continue,
            EventType::Preempt | EventType::Terminate => {
                let reason = match e.not_before_time() {
                    Ok(Some(_)) => format!(
                        "a scheduled {kind} (event {}) not before {}",
                        e.event_id, e.not_before
                    ),
                    _ => format!("a scheduled {kind} (event {})", e.event_id),
                };
                (now, true, reason)
            }
            EventType::Reboot | EventType::Redeploy => {
                if e.event_status == EventStatus::Started {
                    (
                        now,
                        false,
                        format!("a {kind} (event {}) has started", e.event_id),
                    )
                } else {
                    match e.not_before_time() {
                        Ok(Some(at)) => (
                            at,
                            false,
                            format!(
                                "a scheduled {kind} (event {}) not before {}",
                                e.event_id, e.not_before
                            ),
                        ),
                        // Unreadable (or missing although scheduled).
                        _ => {
                            let notice = e.event_type.minimum_notice().unwrap_or_default();
                            let seen = first_seen.get(&e.event_id).copied().unwrap_or(now);
                            (
                                seen + notice,
                                false,
                                format!(
                                    "a scheduled {kind} (event {}) whose NotBefore {:?} is unreadable, so taken as the {} s of notice Azure documents",
                                    e.event_id,
                                    e.not_before,
                                    notice.as_secs()
                                ),
                            )
                        }
                    }
                }
            }
        };
        let stop_at = if preempted {
            now
        } else {
            starts.checked_sub(margin).unwrap_or(starts).max(now)
        };
        let acknowledge = (e.event_status == EventStatus::Scheduled).then(|| e.event_id.clone());
        match &mut drain {
            None => {
                drain = Some(Drain {
                    stop_at,
                    preempted,
                    acknowledge: acknowledge.into_iter().collect(),
                    reason,
                })
            }
            Some(d) => {
                if stop_at < d.stop_at {
                    d.stop_at = stop_at;
                    d.reason = reason;
                }
                d.preempted |= preempted;
                d.acknowledge.extend(acknowledge);
            }
        }
    }
    drain
}

/// The IMDS tasks of one daemon: `maintenance` and the watcher it starts.
pub(super) struct Maintenance {
    finish: Option<oneshot::Sender<(bool, oneshot::Sender<()>)>>,
    task: JoinHandle<()>,
}

/// Where the VM's name comes from.
pub(super) enum VmName {
    /// Known at start.
    Known(String),
    /// Sent by the `imds-instance` task once IMDS answers.
    Later(oneshot::Receiver<String>),
}

/// Starts the `maintenance` task for `vm`, stopping parts `margin` before
/// an event may start.
pub(super) fn spawn(
    imds: ImdsClient,
    vm: VmName,
    input: mpsc::Sender<Input>,
    margin: Duration,
    io: CancellationToken,
) -> Maintenance {
    let (finish, finish_rx) = oneshot::channel();
    let task = tokio::spawn(maintenance_task(imds, vm, input, margin, io, finish_rx));
    Maintenance {
        finish: Some(finish),
        task,
    }
}

impl Maintenance {
    /// Once the reconciler is done: when it drained for scheduled events
    /// (`drained_for_events`), acknowledges the events the drain was for, so
    /// that the platform may go ahead now rather than at `NotBefore`.
    /// Bounded: the agent's exit never waits long on IMDS.
    pub(super) async fn finish(&mut self, drained_for_events: bool) {
        let Some(finish) = self.finish.take() else {
            return;
        };
        let (done, answered) = oneshot::channel();
        if finish.send((drained_for_events, done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), answered).await;
        }
    }

    /// Waits for the task (and its watcher) after the `io` token fired.
    pub(super) async fn join(self) {
        if let Err(e) = self.task.await {
            tracing::error!(task = "maintenance", error = %e, "task panicked");
        }
    }
}

type Finish = oneshot::Receiver<(bool, oneshot::Sender<()>)>;

async fn maintenance_task(
    imds: ImdsClient,
    vm: VmName,
    input: mpsc::Sender<Input>,
    margin: Duration,
    io: CancellationToken,
    mut finish: Finish,
) {
    let name = match vm {
        VmName::Known(name) => name,
        VmName::Later(rx) => tokio::select! {
            name = rx => match name {
                Ok(name) => name,
                // IMDS never answered: no events to watch.
                Err(_) => return answer_finish(finish, io).await,
            },
            asked = &mut finish => {
                if let Ok((_, done)) = asked {
                    let _ = done.send(());
                }
                return;
            }
            () = io.cancelled() => return,
        },
    };
    if name.is_empty() {
        tracing::warn!(
            "instance metadata has no compute.name; scheduled events cannot be matched to this vm"
        );
        return answer_finish(finish, io).await;
    }
    tracing::info!(vm = %name, "watching scheduled events");
    let (tx, mut rx) = mpsc::channel(8);
    let watcher = tokio::spawn(imds.scheduled_events_watcher(&name).run(
        DEFAULT_POLL_INTERVAL,
        tx,
        io.clone(),
    ));
    let mut first_seen: BTreeMap<String, SystemTime> = BTreeMap::new();
    let mut current: Option<Drain> = None;
    loop {
        tokio::select! {
            update = rx.recv() => {
                // The watcher stops with the `io` token.
                let Some(update) = update else { break };
                let now = SystemTime::now();
                first_seen.retain(|id, _| update.events.iter().any(|e| &e.event_id == id));
                for e in &update.events {
                    if first_seen.contains_key(&e.event_id) {
                        continue;
                    }
                    first_seen.insert(e.event_id.clone(), now);
                    tracing::info!(
                        event = %e.event_id, kind = ?e.event_type, status = ?e.event_status,
                        not_before = %e.not_before, source = %e.event_source,
                        "scheduled event"
                    );
                    if let Err(error) = e.not_before_time() {
                        let notice = e.event_type.minimum_notice().unwrap_or_default();
                        tracing::warn!(
                            event = %e.event_id, kind = ?e.event_type, error = %error,
                            notice_s = notice.as_secs(),
                            "unreadable NotBefore; assuming the least notice Azure documents"
                        );
                    }
                }
                let next = decide(&update.events, &first_seen, now, margin);
                if next != current {
                    if next.is_none() {
                        tracing::info!(incarnation = update.incarnation, "no scheduled event needs a drain any more");
                    }
                    // The reconciler may be gone (the agent is stopping).
                    let _ = input.send(Input::Maintenance(next.clone())).await;
                    current = next;
                }
            }
            asked = &mut finish => {
                if let Ok((drained_for_events, done)) = asked {
                    if drained_for_events {
                        // `run` stops waiting after a while and fires `io`.
                        tokio::select! {
                            () = acknowledge(&imds, current.as_ref()) => {}
                            () = io.cancelled() => {}
                        }
                    }
                    let _ = done.send(());
                }
                break;
            }
        }
    }
    // A watcher blocked on a full channel ends once nobody listens.
    drop(rx);
    if let Err(e) = watcher.await {
        tracing::error!(task = "imds-scheduled-events", error = %e, "task panicked");
    }
}

/// Answers the finish request (nothing to acknowledge) or stops with `io`.
async fn answer_finish(finish: Finish, io: CancellationToken) {
    tokio::select! {
        asked = finish => {
            if let Ok((_, done)) = asked {
                let _ = done.send(());
            }
        }
        () = io.cancelled() => {}
    }
}

/// Approves the scheduled events `drain` is for.
async fn acknowledge(imds: &ImdsClient, drain: Option<&Drain>) {
    let Some(ids) = drain.map(|d| &d.acknowledge).filter(|ids| !ids.is_empty()) else {
        return;
    };
    match imds.acknowledge_events(ids).await {
        Ok(()) => tracing::info!(events = ?ids, "scheduled events acknowledged"),
        Err(e) => tracing::warn!(
            events = ?ids,
            error = %drover_api::error::chain(&e),
            "acknowledging scheduled events failed"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARGIN: Duration = Duration::from_secs(20);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn event(id: &str, kind: &str, status: &str, not_before: &str) -> ScheduledEvent {
        serde_json::from_value(serde_json::json!({
            "EventId": id,
            "EventType": kind,
            "EventStatus": status,
            "Resources": ["vm"],
            "NotBefore": not_before,
        }))
        .expect("event")
    }

    /// The base instant, 1_800_000_000, is 2027-01-15T08:00:00Z (a Friday);
    /// `secs` stays within the day.
    fn clock(secs: u64) -> String {
        let s = 8 * 3600 + secs;
        format!("{:02}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
    }

    /// `at(secs)` as Microsoft's mock server writes it (RFC 3339).
    fn iso(secs: u64) -> String {
        format!("2027-01-15T{}Z", clock(secs))
    }

    /// `at(secs)` as Azure documents it (RFC 1123).
    fn rfc1123(secs: u64) -> String {
        format!("Fri, 15 Jan 2027 {} GMT", clock(secs))
    }

    struct Case {
        name: &'static str,
        events: Vec<ScheduledEvent>,
        first_seen: &'static [(&'static str, u64)],
        /// (stop at, preempted, acknowledged ids); `None`: no drain.
        expect: Option<(u64, bool, &'static [&'static str])>,
    }

    #[test]
    fn what_the_events_ask_for() {
        let now = 100;
        let cases = vec![
            Case {
                name: "nothing scheduled",
                events: vec![],
                first_seen: &[],
                expect: None,
            },
            Case {
                name: "a Freeze stops nothing",
                events: vec![event("f", "Freeze", "Scheduled", &iso(400))],
                first_seen: &[],
                expect: None,
            },
            Case {
                name: "an unknown type stops nothing",
                events: vec![event("u", "Hibernate", "Scheduled", &iso(400))],
                first_seen: &[],
                expect: None,
            },
            Case {
                name: "a Reboot with an ISO NotBefore runs until the margin before it",
                events: vec![event("r", "Reboot", "Scheduled", &iso(1000))],
                first_seen: &[("r", 90)],
                expect: Some((980, false, &["r"])),
            },
            Case {
                name: "the same with an RFC 1123 NotBefore",
                events: vec![event("r", "Redeploy", "Scheduled", &rfc1123(700))],
                first_seen: &[],
                expect: Some((680, false, &["r"])),
            },
            Case {
                name: "a NotBefore closer than the margin stops at once",
                events: vec![event("r", "Reboot", "Scheduled", &iso(110))],
                first_seen: &[],
                expect: Some((100, false, &["r"])),
            },
            Case {
                name: "a NotBefore in the past stops at once",
                events: vec![event("r", "Reboot", "Scheduled", &iso(50))],
                first_seen: &[],
                expect: Some((100, false, &["r"])),
            },
            Case {
                name: "an unreadable Reboot NotBefore is 15 min from when it was first seen",
                events: vec![event("r", "Reboot", "Scheduled", "next tuesday")],
                first_seen: &[("r", 40)],
                expect: Some((40 + 900 - 20, false, &["r"])),
            },
            Case {
                name: "an unreadable Redeploy NotBefore is 10 min, from now when never seen",
                events: vec![event("r", "Redeploy", "Scheduled", "2027-01-15 08:00")],
                first_seen: &[],
                expect: Some((100 + 600 - 20, false, &["r"])),
            },
            Case {
                name: "a scheduled Reboot without a NotBefore is treated as unreadable",
                events: vec![event("r", "Reboot", "Scheduled", "")],
                first_seen: &[("r", 100)],
                expect: Some((100 + 900 - 20, false, &["r"])),
            },
            Case {
                name: "a started Reboot stops at once and needs no approval",
                events: vec![event("r2", "Reboot", "Started", "")],
                first_seen: &[],
                expect: Some((100, false, &[])),
            },
            Case {
                name: "a Preempt stops at once and the node is preempted",
                events: vec![event("p", "Preempt", "Scheduled", &iso(130))],
                first_seen: &[],
                expect: Some((100, true, &["p"])),
            },
            Case {
                name: "a Terminate with an unreadable date too",
                events: vec![event("t", "Terminate", "Scheduled", "??")],
                first_seen: &[],
                expect: Some((100, true, &["t"])),
            },
            Case {
                name: "a Preempt during a Reboot: at once, preempted, both approved",
                events: vec![
                    event("r", "Reboot", "Scheduled", &iso(1000)),
                    event("p", "Preempt", "Scheduled", &iso(130)),
                ],
                first_seen: &[("r", 10), ("p", 95)],
                expect: Some((100, true, &["r", "p"])),
            },
            Case {
                name: "two maintenance events: the earlier wins",
                events: vec![
                    event("r", "Reboot", "Scheduled", &iso(1000)),
                    event("d", "Redeploy", "Scheduled", &iso(600)),
                    event("f", "Freeze", "Scheduled", &iso(200)),
                ],
                first_seen: &[],
                expect: Some((580, false, &["r", "d"])),
            },
            Case {
                name: "an event with an unknown status is drained for but not approved",
                events: vec![event("r", "Reboot", "Pending", &iso(1000))],
                first_seen: &[],
                expect: Some((980, false, &[])),
            },
        ];
        for case in cases {
            let first_seen: BTreeMap<String, SystemTime> = case
                .first_seen
                .iter()
                .map(|(id, t)| ((*id).to_string(), at(*t)))
                .collect();
            let got = decide(&case.events, &first_seen, at(now), MARGIN);
            let got = got.map(|d| {
                (
                    d.stop_at
                        .duration_since(at(0))
                        .expect("after base")
                        .as_secs(),
                    d.preempted,
                    d.acknowledge,
                )
            });
            let want = case.expect.map(|(stop, preempted, ids)| {
                (
                    stop,
                    preempted,
                    ids.iter().map(|s| (*s).to_string()).collect::<Vec<_>>(),
                )
            });
            assert_eq!(got, want, "{}", case.name);
        }
    }

    #[test]
    fn the_reason_names_the_event_that_sets_the_stop() {
        let events = vec![
            event("r", "Reboot", "Scheduled", &iso(1000)),
            event("d", "Redeploy", "Scheduled", &iso(600)),
        ];
        let d = decide(&events, &BTreeMap::new(), at(100), MARGIN).expect("drain");
        assert_eq!(
            d.reason,
            format!("a scheduled Redeploy (event d) not before {}", iso(600))
        );
        let events = vec![event("x", "Reboot", "Scheduled", "soon")];
        let d = decide(&events, &BTreeMap::new(), at(100), MARGIN).expect("drain");
        assert_eq!(
            d.reason,
            "a scheduled Reboot (event x) whose NotBefore \"soon\" is unreadable, so taken as the 900 s of notice Azure documents"
        );
        let events = vec![event("p", "Preempt", "Scheduled", &iso(130))];
        let d = decide(&events, &BTreeMap::new(), at(100), MARGIN).expect("drain");
        assert_eq!(
            d.reason,
            format!("a scheduled Preempt (event p) not before {}", iso(130))
        );
    }

    /// Microsoft's mock server renames an event when it starts: the drain
    /// goes on (shortened to now), it is not taken for a cancellation.
    #[test]
    fn a_renamed_started_event_keeps_the_drain() {
        let scheduled = vec![event("a", "Reboot", "Scheduled", &iso(1000))];
        let started = vec![event("b", "Reboot", "Started", "")];
        let before = decide(&scheduled, &BTreeMap::new(), at(100), MARGIN).expect("drain");
        let after = decide(&started, &BTreeMap::new(), at(200), MARGIN).expect("still a drain");
        assert_eq!(before.stop_at, at(980));
        assert_eq!(after.stop_at, at(200));
        assert!(after.acknowledge.is_empty());
        assert_eq!(decide(&[], &BTreeMap::new(), at(300), MARGIN), None);
    }
}
