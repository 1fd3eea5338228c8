//! Periodic checks: nodes silent past the grace become unusable (their
//! jobs are requeued), and running jobs past `limits.timeout` fail.

use std::time::Duration;

use drover_api::cluster::{JobState, NodeState, Timestamp};

use super::{ControlPlane, now};
use crate::server::error::ControlError;
use crate::server::events::Event;
use crate::store::JobFilter;

impl ControlPlane {
    /// Marks nodes silent for longer than `grace` unusable and requeues
    /// their jobs. Returns the nodes marked.
    ///
    /// Every node gets a whole grace period from this control plane's start:
    /// heartbeats that could not arrive while it was down are no sign of a
    /// dead node (the kubelet's node lease and Nomad's heartbeat grace after a
    /// leader election do the same).
    pub async fn reap_silent_nodes(&self, grace: Duration) -> Result<Vec<String>, ControlError> {
        let t = now();
        if t.since(self.started) < grace {
            return Ok(Vec::new());
        }
        let before = Timestamp(t.as_millis().saturating_sub(grace.as_millis() as u64));
        let reason = format!("no heartbeat for {}s", grace.as_secs());
        let (lost, bumps) = self
            .with_store(move |s| {
                let mut lost = Vec::new();
                let mut bumps = Vec::new();
                for id in s.silent_nodes(before)? {
                    let l = s.mark_node_lost(&id, NodeState::Unusable, &reason, t)?;
                    bumps.extend(l.bumped);
                    lost.push(id);
                }
                Ok((lost, bumps))
            })
            .await?;
        if !lost.is_empty() {
            for node in &lost {
                self.metrics.emit(Event::NodeLost {
                    node,
                    state: NodeState::Unusable,
                });
            }
            self.wake(&bumps);
            self.poke();
        }
        Ok(lost)
    }

    /// Fails running jobs past their `limits.timeout`. Returns the jobs.
    pub async fn enforce_timeouts(&self) -> Result<Vec<String>, ControlError> {
        let t = now();
        let (ended, bumps) = self
            .with_store(move |s| {
                let jobs = s.jobs(&JobFilter {
                    cluster: None,
                    states: &[JobState::Running],
                })?;
                let mut ended = Vec::new();
                let mut bumps = Vec::new();
                for j in jobs {
                    let (Some(limit), Some(started)) = (j.spec.timeout_seconds(), j.started_at)
                    else {
                        continue;
                    };
                    if t.since(started) >= Duration::from_secs(limit) {
                        let reason = format!("timed out after {limit}s (limits.timeout)");
                        let tr = s.transition_job(&j.id, JobState::Failed, Some(&reason), t)?;
                        bumps.extend(tr.bumped);
                        ended.push(j.id);
                    }
                }
                Ok((ended, bumps))
            })
            .await?;
        if !ended.is_empty() {
            tracing::info!(jobs = ?ended, "jobs timed out");
            self.wake(&bumps);
            self.poke();
        }
        Ok(ended)
    }
}
