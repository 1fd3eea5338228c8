//! The control plane's view of a cluster as plain data: node and job states,
//! the summaries the scheduler and autoscaler decide over, and what
//! `drover compute show` prints.
//!
//! API Boundary: states use the names Azure ML users know (nodes `idle |
//! running | preparing | unusable | leaving | preempted`, cluster
//! `allocationState Steady | Resizing`, jobs `queued → preparing → running →
//! completed | failed | canceled`). Times are [`Timestamp`]s passed in by the
//! caller; nothing here reads a clock.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
///
/// A plain number rather than `SystemTime` so that decisions take "now" as a
/// parameter and tests can state it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// A timestamp `secs` seconds after the epoch.
    pub fn from_secs(secs: u64) -> Self {
        Timestamp(secs.saturating_mul(1000))
    }

    /// Milliseconds since the epoch.
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// Time from `earlier` to `self`; zero when `earlier` is later (clocks of
    /// different machines disagree, and a negative age means "just now").
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// This timestamp moved `d` later (saturating).
    pub fn plus(self, d: Duration) -> Timestamp {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(ms))
    }
}

/// State of a node, as `drover node list` shows it (Azure ML's node states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Registered, healthy and without work.
    Idle,
    /// Running a job part.
    Running,
    /// Being set up, or setting up a job part (pulling its image).
    Preparing,
    /// Silent past the heartbeat grace period, or failed; its parts were requeued.
    Unusable,
    /// Draining before it goes away (scale-down, shutdown).
    Leaving,
    /// Taken back by the cloud (low-priority VM); its parts were requeued.
    Preempted,
}

impl NodeState {
    /// Every state, in display order.
    pub const ALL: [NodeState; 6] = [
        NodeState::Idle,
        NodeState::Running,
        NodeState::Preparing,
        NodeState::Unusable,
        NodeState::Leaving,
        NodeState::Preempted,
    ];

    /// The lowercase name (`idle`).
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Idle => "idle",
            NodeState::Running => "running",
            NodeState::Preparing => "preparing",
            NodeState::Unusable => "unusable",
            NodeState::Leaving => "leaving",
            NodeState::Preempted => "preempted",
        }
    }

    /// True for nodes that count toward a cluster's current size: those that
    /// run work or soon can. Unusable, leaving and preempted nodes are on
    /// their way out and are replaced, not counted.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            NodeState::Idle | NodeState::Running | NodeState::Preparing
        )
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// State of a job (Azure ML's job states, reduced to the ones Drover reaches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting in its cluster's queue.
    Queued,
    /// Placed on nodes; images are pulled and containers created.
    Preparing,
    /// Every part has started.
    Running,
    /// Every part exited 0.
    Completed,
    /// A part failed, the job timed out, or it ran out of attempts.
    Failed,
    /// Canceled by a user.
    Canceled,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Preparing,
        JobState::Running,
        JobState::Completed,
        JobState::Failed,
        JobState::Canceled,
    ];

    /// The lowercase name (`queued`).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Preparing => "preparing",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Canceled => "canceled",
        }
    }

    /// True once the job can never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Canceled
        )
    }

    /// True while the job holds nodes (placed, not yet ended).
    pub fn holds_nodes(self) -> bool {
        matches!(self, JobState::Preparing | JobState::Running)
    }

    /// Whether `self → next` is a legal step.
    ///
    /// Forward: `queued → preparing → running → completed | failed`. Any
    /// non-terminal state may be canceled or fail (a failed pull fails a
    /// preparing job). A placed job may go back to `queued` when a node is lost
    /// or preempted — a new attempt (see [`requeue_state`]). Terminal states
    /// never change, so a late report cannot resurrect a job.
    pub fn can_transition_to(self, next: JobState) -> bool {
        use JobState as S;
        match (self, next) {
            (from, _) if from.is_terminal() => false,
            (_, S::Canceled | S::Failed) => true,
            (S::Queued, S::Preparing) => true,
            (S::Preparing, S::Running) => true,
            (S::Running, S::Completed) => true,
            (S::Preparing | S::Running, S::Queued) => true,
            _ => false,
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state a placed job moves to when a node under it is lost or
/// preempted: back to the queue for another attempt, or failed once
/// `attempt` (1-based, the one that just ended) reaches `max_attempts`.
pub fn requeue_state(attempt: u32, max_attempts: u32) -> JobState {
    if attempt < max_attempts {
        JobState::Queued
    } else {
        JobState::Failed
    }
}

/// Cluster allocation state (Azure ML's `allocationState`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AllocationState {
    /// Current node count equals the target.
    #[default]
    Steady,
    /// Nodes are being added or removed, or the target cannot be reached.
    Resizing,
}

impl fmt::Display for AllocationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AllocationState::Steady => "Steady",
            AllocationState::Resizing => "Resizing",
        })
    }
}

/// What the scheduler and autoscaler know of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    /// Node id, unique in the control plane.
    pub id: String,
    /// Current state.
    pub state: NodeState,
    /// GPUs the node reports healthy.
    pub healthy_gpus: u32,
    /// All GPUs of the node.
    pub total_gpus: u32,
    /// When the last heartbeat arrived.
    pub last_heartbeat: Timestamp,
    /// Since when the node has had no job part; `None` while it has one
    /// (or before it ever became free).
    pub free_since: Option<Timestamp>,
    /// The job whose part the node holds (assigned or running), if any.
    pub current_job: Option<String>,
}

impl NodeSummary {
    /// True when the node has work: a job part assigned or running.
    pub fn has_work(&self) -> bool {
        self.current_job.is_some() || matches!(self.state, NodeState::Running)
    }
}

/// What the scheduler and autoscaler know of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    /// Job id.
    pub id: String,
    /// Current state.
    pub state: JobState,
    /// Nodes the job runs on, one part each (≥ 1).
    pub instance_count: u32,
    /// Healthy GPUs each of its nodes must have.
    pub gpus_per_instance: u32,
    /// Submission order within the control plane: smaller was submitted
    /// first. A requeued job keeps its number, so it goes back to its place.
    pub submitted: u64,
    /// Attempts so far (1 for the first run; 0 while never placed).
    pub attempt: u32,
}

/// How many nodes of a cluster are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStateCounts {
    /// Nodes in [`NodeState::Idle`].
    pub idle: u32,
    /// Nodes in [`NodeState::Running`].
    pub running: u32,
    /// Nodes in [`NodeState::Preparing`].
    pub preparing: u32,
    /// Nodes in [`NodeState::Unusable`].
    pub unusable: u32,
    /// Nodes in [`NodeState::Leaving`].
    pub leaving: u32,
    /// Nodes in [`NodeState::Preempted`].
    pub preempted: u32,
}

impl NodeStateCounts {
    /// Counts `nodes` by state.
    pub fn of(nodes: &[NodeSummary]) -> Self {
        let mut c = NodeStateCounts::default();
        for n in nodes {
            let slot = match n.state {
                NodeState::Idle => &mut c.idle,
                NodeState::Running => &mut c.running,
                NodeState::Preparing => &mut c.preparing,
                NodeState::Unusable => &mut c.unusable,
                NodeState::Leaving => &mut c.leaving,
                NodeState::Preempted => &mut c.preempted,
            };
            *slot += 1;
        }
        c
    }

    /// The count for one state.
    pub fn get(&self, state: NodeState) -> u32 {
        match state {
            NodeState::Idle => self.idle,
            NodeState::Running => self.running,
            NodeState::Preparing => self.preparing,
            NodeState::Unusable => self.unusable,
            NodeState::Leaving => self.leaving,
            NodeState::Preempted => self.preempted,
        }
    }
}

/// One scaling problem, kept for `drover compute show` (a cluster stuck
/// resizing must say why).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScalingError {
    /// When it happened.
    pub at: Timestamp,
    /// What went wrong (provider error, quota, …), lowercase.
    pub message: String,
}

/// A cluster's scale status, as `drover compute show` prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Steady or Resizing.
    pub allocation_state: AllocationState,
    /// Live nodes (idle, running, preparing).
    pub current_node_count: u32,
    /// Nodes the autoscaler wants.
    pub target_node_count: u32,
    /// Nodes per state.
    pub node_state_counts: NodeStateCounts,
    /// The latest scaling errors, newest last.
    pub errors: Vec<ScalingError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_transitions() {
        use JobState::*;
        let all = [Queued, Preparing, Running, Completed, Failed, Canceled];
        let allowed = [
            (Queued, Preparing),
            (Queued, Failed),
            (Queued, Canceled),
            (Preparing, Running),
            (Preparing, Queued),
            (Preparing, Failed),
            (Preparing, Canceled),
            (Running, Completed),
            (Running, Queued),
            (Running, Failed),
            (Running, Canceled),
        ];
        for from in all {
            for to in all {
                assert_eq!(
                    from.can_transition_to(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn requeue_until_attempts_run_out() {
        let check = |attempt, max, expect| {
            assert_eq!(requeue_state(attempt, max), expect, "{attempt}/{max}");
        };
        check(1, 3, JobState::Queued);
        check(2, 3, JobState::Queued);
        check(3, 3, JobState::Failed);
        check(1, 1, JobState::Failed);
        check(5, 3, JobState::Failed);
    }

    #[test]
    fn states_serialize_as_azure_ml_names() {
        let names: Vec<String> = NodeState::ALL
            .iter()
            .map(|s| serde_json::to_string(s).expect("serializes"))
            .collect();
        assert_eq!(
            names,
            [
                "\"idle\"",
                "\"running\"",
                "\"preparing\"",
                "\"unusable\"",
                "\"leaving\"",
                "\"preempted\""
            ]
        );
        for s in NodeState::ALL {
            assert_eq!(format!("\"{s}\""), serde_json::to_string(&s).expect("ok"));
        }
        assert_eq!(
            serde_json::to_string(&JobState::Canceled).expect("ok"),
            "\"canceled\""
        );
        assert_eq!(
            serde_json::to_string(&AllocationState::Resizing).expect("ok"),
            "\"Resizing\""
        );
        assert_eq!(AllocationState::Steady.to_string(), "Steady");
        assert_eq!(serde_json::to_string(&Timestamp(5)).expect("ok"), "5");
    }

    #[test]
    fn counts_by_state() {
        let node = |id: &str, state| NodeSummary {
            id: id.into(),
            state,
            healthy_gpus: 0,
            total_gpus: 0,
            last_heartbeat: Timestamp(0),
            free_since: None,
            current_job: None,
        };
        let nodes = [
            node("a", NodeState::Idle),
            node("b", NodeState::Idle),
            node("c", NodeState::Running),
            node("d", NodeState::Preempted),
        ];
        let c = NodeStateCounts::of(&nodes);
        assert_eq!(
            c,
            NodeStateCounts {
                idle: 2,
                running: 1,
                preempted: 1,
                ..NodeStateCounts::default()
            }
        );
        assert_eq!(NodeState::ALL.iter().map(|s| c.get(*s)).sum::<u32>(), 4);
        let live: Vec<bool> = NodeState::ALL.iter().map(|s| s.is_live()).collect();
        assert_eq!(live, [true, true, true, false, false, false]);
    }

    #[test]
    fn timestamps() {
        let t = Timestamp::from_secs(100);
        assert_eq!(t.as_millis(), 100_000);
        assert_eq!(t.since(Timestamp::from_secs(40)), Duration::from_secs(60));
        assert_eq!(Timestamp::from_secs(40).since(t), Duration::ZERO);
        assert_eq!(t.plus(Duration::from_millis(1500)), Timestamp(101_500));
        assert_eq!(
            Timestamp(u64::MAX).plus(Duration::from_secs(1)),
            Timestamp(u64::MAX)
        );
    }
}

/// A state name that is not one of the known states.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} state `{name}`")]
pub struct UnknownState {
    /// `node` or `job`.
    pub kind: &'static str,
    /// The name given.
    pub name: String,
}

impl std::str::FromStr for NodeState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeState::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| UnknownState {
                kind: "node",
                name: s.to_string(),
            })
    }
}

impl std::str::FromStr for JobState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|j| j.as_str() == s)
            .ok_or_else(|| UnknownState {
                kind: "job",
                name: s.to_string(),
            })
    }
}

#[cfg(test)]
mod from_str_tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for n in NodeState::ALL {
            assert_eq!(n.as_str().parse::<NodeState>(), Ok(n));
        }
        for j in JobState::ALL {
            assert_eq!(j.as_str().parse::<JobState>(), Ok(j));
        }
        assert_eq!(
            "lost".parse::<NodeState>().unwrap_err().to_string(),
            "unknown node state `lost`"
        );
    }
}
