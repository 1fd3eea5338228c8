//! The `fence` task: an agent cut off from the control plane for longer
//! than the control plane's grace period stops its parts itself.
//!
//! Past the grace the control plane has marked the node unusable and
//! requeued its work on another node; killing the parts here bounds how
//! long two attempts of one job run together to that grace (the kubelet and
//! Nomad clients do the same). Time counts only while the control plane is
//! silent: a refused connection means it is down, and a control plane that
//! is down requeues nothing (it gives every node a fresh grace period when
//! it starts), so an outage of the control plane alone never stops a job.
//! A frozen agent (SIGSTOP, a paused VM) fences the moment it runs again.
//!
//! Reads: `Contact` (written by the `heartbeat`), every second. Writes:
//! `Input::CutOff` and `Input::Reconnected` to the reconciler (mpsc 64).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Input;
use super::state::Contact;

/// How often the fence looks at the contact time.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What the fence does after one look, given how long the control plane
/// has been silent and whether the parts are fenced already.
pub(super) fn fence_step(silent: Duration, grace: Duration, fenced: bool) -> Option<bool> {
    match (silent > grace, fenced) {
        (true, false) => Some(true),
        (false, true) => Some(false),
        _ => None,
    }
}

/// The `fence` task; runs until `io` fires.
pub(super) async fn fence_task(
    contact: Contact,
    grace: Duration,
    input: mpsc::Sender<Input>,
    io: CancellationToken,
) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fenced = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = io.cancelled() => return,
        }
        let silent = contact.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
        match fence_step(silent, grace, fenced) {
            Some(true) => {
                tracing::warn!(
                    silent_s = silent.as_secs(),
                    grace_s = grace.as_secs(),
                    "cut off from the control plane past its grace; stopping every part (self-fencing)"
                );
                fenced = true;
                let _ = input.send(Input::CutOff).await;
            }
            Some(false) => {
                tracing::info!("the control plane answers again; parts may start");
                fenced = false;
                let _ = input.send(Input::Reconnected).await;
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_once_past_the_grace_and_lifts_when_heard_again() {
        let grace = Duration::from_secs(40);
        let s = Duration::from_secs;
        assert_eq!(fence_step(s(39), grace, false), None);
        assert_eq!(fence_step(s(41), grace, false), Some(true));
        assert_eq!(fence_step(s(90), grace, true), None, "fenced once");
        assert_eq!(fence_step(s(0), grace, true), Some(false));
        assert_eq!(fence_step(s(0), grace, false), None);
    }
}
