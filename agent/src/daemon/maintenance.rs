//! The `maintenance` task: IMDS scheduled events → a drain.
//!
//! Reads: `EventsUpdate`s from the `imds-scheduled-events` watcher
//! (mpsc 8). Writes: one `Input::Maintenance` to the reconciler (mpsc 64),
//! after which it ends; the reconciler drains and `run` acknowledges the
//! events. Runs only when the agent has IMDS.

use std::time::{Duration, SystemTime};

use drover_imds::{EventType, EventsUpdate};
use tokio::sync::mpsc;

use super::Input;

/// The `maintenance` task: turns IMDS scheduled events for this VM into a
/// drain. Preempt and Terminate stop parts at once (SIGTERM, SIGKILL after
/// the grace); Reboot and Redeploy let them run until shortly before
/// `NotBefore`; Freeze (a pause of seconds) is only logged.
pub(super) async fn maintenance_task(
    mut rx: mpsc::Receiver<EventsUpdate>,
    input: mpsc::Sender<Input>,
    stop_grace: Duration,
) {
    while let Some(update) = rx.recv().await {
        let mut ids = Vec::new();
        let mut deadline: Option<Duration> = None;
        let mut preempted = false;
        for e in &update.events {
            preempted |= matches!(e.event_type, EventType::Preempt | EventType::Terminate);
            let until = match e.event_type {
                EventType::Preempt | EventType::Terminate => Duration::ZERO,
                EventType::Reboot | EventType::Redeploy => e
                    .not_before_time()
                    .ok()
                    .flatten()
                    .and_then(|t| t.duration_since(SystemTime::now()).ok())
                    .map_or(Duration::ZERO, |left| left.saturating_sub(stop_grace * 2)),
                EventType::Freeze | EventType::Unknown => {
                    tracing::info!(event = %e.event_id, kind = ?e.event_type, "scheduled event noted");
                    continue;
                }
            };
            ids.push(e.event_id.clone());
            deadline = Some(deadline.map_or(until, |d| d.min(until)));
        }
        if let Some(deadline) = deadline {
            let _ = input
                .send(Input::Maintenance {
                    event_ids: ids,
                    deadline,
                    preempted,
                })
                .await;
            return;
        }
    }
}
