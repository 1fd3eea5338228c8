//! Autoscaling: how many nodes a cluster should have, and which ones leave.
//!
//! [`plan`] (in `plan.rs`) is one whole scaling pass as a pure function: it
//! matches the provider's machines with registered nodes (preparing, never
//! joined, reclaimable), calls [`decide`], and returns a [`ScalingPlan`]
//! that the control plane only carries out.
//!
//! [`waiting_reason`] (in `waiting.rs`) tells a queued job's user why it
//! waits, from the same decision.
//!
//! [`decide`] is a pure function over one cluster's spec, nodes and jobs, the
//! time, the time of the last scale action and the latest provider error; it
//! returns a [`ScaleDecision`] that the control plane hands to the cluster's
//! [`crate::provider::Provider`]. Rules (Azure ML's, plus a cool-down):
//!
//! - **Need.** Each job part takes a whole node, so the need is the sum of
//!   `instance_count` over jobs that hold nodes (preparing, running) and
//!   queued jobs that can ever start here (`instance_count <= max_nodes`). A
//!   job needing more than `max_nodes` is never scaled for — it would bring
//!   up nodes that can never run it; [`check_submission`] refuses it up front.
//! - **Target** = clamp(need, `min_nodes`, `max_nodes`) when adding. Nodes are
//!   added at once, without waiting for the cool-down: new work should never
//!   wait on a timer, and machines being created count as `preparing` nodes,
//!   so a repeated decision does not create them twice.
//! - **Removal.** When there are more live nodes than that, only nodes that
//!   are `idle` with no work and have been free for at least
//!   `idle_seconds_before_scaledown` leave, oldest-idle first, down to the
//!   clamp (so down to `min_nodes`, to zero when it is 0). Nodes above a
//!   lowered `max_nodes` leave as soon as they are idle, without waiting for
//!   the idle time. A node with work never leaves.
//! - **Cool-down.** No removal within [`AutoscalerConfig::cooldown`] of the
//!   last scale action (add or remove): a node just added is not removed
//!   before its job arrives, and a removal does not flap with a submission
//!   right behind it.
//! - **Allocation state** is `Resizing` while current != target, with the
//!   latest provider error (quota, "the static provider cannot create nodes:
//!   …") as the reason.
//! - **Reclaim.** `unusable` and `preempted` nodes without work do not count
//!   toward the current size (they are replaced by the normal scale-up) and
//!   are listed for the provider to delete, regardless of the cool-down.

mod plan;
mod waiting;

use std::time::Duration;

use drover_api::cluster::{
    AllocationState, JobState, JobSummary, NodeState, NodeSummary, Timestamp,
};
use drover_api::compute::ComputeSpec;

pub use self::plan::{NeverJoined, ScalingInput, ScalingPlan, plan, with_pending};
pub use self::waiting::{ClusterProgress, waiting_reason};

/// Default cool-down between a scale action and the next removal.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);

/// Autoscaler settings that are not part of a cluster's spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoscalerConfig {
    /// No node is removed within this long after the last scale action.
    pub cooldown: Duration,
}

impl Default for AutoscalerConfig {
    fn default() -> Self {
        AutoscalerConfig {
            cooldown: DEFAULT_COOLDOWN,
        }
    }
}

/// Everything one decision is made from.
#[derive(Debug, Clone, Copy)]
pub struct AutoscaleInput<'a> {
    /// The cluster.
    pub spec: &'a ComputeSpec,
    /// Its nodes, in any state and order.
    pub nodes: &'a [NodeSummary],
    /// Its jobs, in any state and order (terminal ones are ignored).
    pub jobs: &'a [JobSummary],
    /// The time of the decision.
    pub now: Timestamp,
    /// When the last scale action (add or remove) was taken, if ever.
    pub last_scale_action: Option<Timestamp>,
    /// The latest provider error for this cluster (quota, provider failure),
    /// reported as the reason while the target is not reached.
    pub provider_error: Option<&'a str>,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScaleAction {
    /// Nothing.
    None,
    /// Create this many nodes.
    Add {
        /// Nodes to create (≥ 1).
        count: u32,
    },
    /// Drain and remove these idle nodes, in this order.
    Remove {
        /// Node ids, oldest-idle first.
        nodes: Vec<String>,
    },
}

/// The outcome of one decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleDecision {
    /// Live nodes now (idle, running, preparing).
    pub current: u32,
    /// Nodes the cluster is heading to.
    pub target: u32,
    /// `Resizing` when `current != target`.
    pub allocation_state: AllocationState,
    /// What to do now toward the target.
    pub action: ScaleAction,
    /// Dead nodes (unusable, preempted) without work, for the provider to delete.
    pub reclaim: Vec<String>,
    /// Why the cluster is not at its target, when something said so.
    pub reason: Option<String>,
    /// Removal is held back until then by the cool-down.
    pub cooldown_until: Option<Timestamp>,
}

/// Nodes that `jobs` need now: each part takes a whole node.
///
/// Counts jobs holding nodes (preparing, running) and queued jobs that fit in
/// `max_nodes`; terminal jobs and queued jobs that can never start are not
/// counted. Saturates rather than overflows.
pub fn nodes_needed(spec: &ComputeSpec, jobs: &[JobSummary]) -> u32 {
    jobs.iter()
        .filter(|j| {
            j.state.holds_nodes()
                || (j.state == JobState::Queued && j.instance_count.max(1) <= spec.max_nodes)
        })
        .fold(0u32, |acc, j| acc.saturating_add(j.instance_count.max(1)))
}

/// Decides the cluster's target size and the action toward it.
pub fn decide(input: &AutoscaleInput<'_>, config: &AutoscalerConfig) -> ScaleDecision {
    let spec = input.spec;
    let live: Vec<&NodeSummary> = input.nodes.iter().filter(|n| n.state.is_live()).collect();
    let current = u32::try_from(live.len()).unwrap_or(u32::MAX);
    let want =
        nodes_needed(spec, input.jobs).clamp(spec.min_nodes, spec.max_nodes.max(spec.min_nodes));

    let mut reclaim: Vec<&NodeSummary> = input
        .nodes
        .iter()
        .filter(|n| {
            matches!(n.state, NodeState::Unusable | NodeState::Preempted) && n.current_job.is_none()
        })
        .collect();
    reclaim.sort_by(|a, b| a.id.cmp(&b.id));
    let reclaim: Vec<String> = reclaim.into_iter().map(|n| n.id.clone()).collect();

    let cooldown_until = input.last_scale_action.map(|t| t.plus(config.cooldown));
    let cooling = cooldown_until.is_some_and(|until| input.now < until);

    let (target, action, held_until) = if current < want {
        (
            want,
            ScaleAction::Add {
                count: want - current,
            },
            None,
        )
    } else if current > want {
        let leaving = removable(input, &live, current, want);
        let target = current
            - u32::try_from(leaving.len())
                .unwrap_or(u32::MAX)
                .min(current);
        if leaving.is_empty() {
            (target, ScaleAction::None, None)
        } else if cooling {
            (target, ScaleAction::None, cooldown_until)
        } else {
            (target, ScaleAction::Remove { nodes: leaving }, None)
        }
    } else {
        (want, ScaleAction::None, None)
    };

    let allocation_state = if current == target {
        AllocationState::Steady
    } else {
        AllocationState::Resizing
    };
    let reason = match allocation_state {
        AllocationState::Resizing => input.provider_error.map(str::to_string),
        AllocationState::Steady => None,
    };
    ScaleDecision {
        current,
        target,
        allocation_state,
        action,
        reclaim,
        reason,
        cooldown_until: held_until,
    }
}

/// Idle nodes that may leave, oldest-idle first: at most `current - want` of
/// them; those above `max_nodes` regardless of idle time, the rest only once
/// idle for the cluster's idle time.
fn removable(
    input: &AutoscaleInput<'_>,
    live: &[&NodeSummary],
    current: u32,
    want: u32,
) -> Vec<String> {
    let idle_for = Duration::from_secs(input.spec.idle_seconds_before_scaledown);
    let over_max = current.saturating_sub(input.spec.max_nodes) as usize;
    let excess = (current - want) as usize;

    let mut idle: Vec<&NodeSummary> = live
        .iter()
        .copied()
        .filter(|n| n.state == NodeState::Idle && !n.has_work())
        .collect();
    // Oldest-idle first; a node with no `free_since` has an unknown idle time
    // and sorts last (eligible only above max_nodes).
    idle.sort_by(|a, b| {
        let key = |n: &NodeSummary| (n.free_since.is_none(), n.free_since, n.id.clone());
        key(a).cmp(&key(b))
    });

    let mut out = Vec::new();
    for n in idle {
        if out.len() >= excess {
            break;
        }
        let expired = n
            .free_since
            .is_some_and(|since| input.now.since(since) >= idle_for);
        if expired || out.len() < over_max {
            out.push(n.id.clone());
        }
    }
    out
}

/// Why a job cannot be submitted to a cluster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmissionError {
    /// The job asks for no nodes.
    #[error("a job needs at least 1 instance, got 0")]
    NoInstances,
    /// The job needs more nodes than the cluster may ever have.
    #[error(
        "the job needs {instance_count} nodes but cluster {cluster} has at most {max_nodes} (max_nodes); \
         lower resources.instance_count or raise the cluster's max_nodes"
    )]
    TooManyInstances {
        /// The cluster.
        cluster: String,
        /// Nodes the job asks for.
        instance_count: u32,
        /// The cluster's `max_nodes`.
        max_nodes: u32,
    },
    /// The job needs more GPUs per node than the cluster's nodes have.
    #[error(
        "the job needs {gpus_per_instance} gpus per node but the nodes of cluster {cluster} have {node_gpus}"
    )]
    TooManyGpus {
        /// The cluster.
        cluster: String,
        /// GPUs per node the job asks for.
        gpus_per_instance: u32,
        /// GPUs a node of the cluster has.
        node_gpus: u32,
    },
}

/// Refuses, at submission, a job that could never start on `spec`: a job
/// larger than `max_nodes` would sit at the head of the FIFO queue forever
/// and block everything behind it.
///
/// `node_gpus` is the GPU count of the cluster's nodes when known (from
/// registered nodes or the VM size); `None` skips the GPU check.
pub fn check_submission(
    spec: &ComputeSpec,
    instance_count: u32,
    gpus_per_instance: u32,
    node_gpus: Option<u32>,
) -> Result<(), SubmissionError> {
    if instance_count == 0 {
        return Err(SubmissionError::NoInstances);
    }
    if instance_count > spec.max_nodes {
        return Err(SubmissionError::TooManyInstances {
            cluster: spec.name.clone(),
            instance_count,
            max_nodes: spec.max_nodes,
        });
    }
    if let Some(node_gpus) = node_gpus.filter(|g| gpus_per_instance > *g) {
        return Err(SubmissionError::TooManyGpus {
            cluster: spec.name.clone(),
            gpus_per_instance,
            node_gpus,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `id:state[:free_since_secs][:job]`, e.g. `n1:idle:100`.
    fn node(text: &str) -> NodeSummary {
        let parts: Vec<&str> = text.split(':').collect();
        let state: NodeState = parts[1].parse().expect("node state");
        NodeSummary {
            id: parts[0].to_string(),
            state,
            healthy_gpus: 0,
            total_gpus: 0,
            last_heartbeat: Timestamp::from_secs(1000),
            free_since: parts
                .get(2)
                .filter(|s| !s.is_empty())
                .map(|s| Timestamp::from_secs(s.parse().expect("secs"))),
            current_job: parts.get(3).map(|s| s.to_string()),
        }
    }

    /// `id:state:instances`, e.g. `j1:queued:2`.
    fn job(text: &str) -> JobSummary {
        let parts: Vec<&str> = text.split(':').collect();
        let state: JobState = parts[1].parse().expect("job state");
        JobSummary {
            id: parts[0].to_string(),
            state,
            instance_count: parts[2].parse().expect("instances"),
            gpus_per_instance: 0,
            submitted: 0,
            attempt: 0,
        }
    }

    /// One table row: the cluster's min/max/idle seconds, the world, and the
    /// expected decision rendered as `current->target State action [reclaim] [reason] [until]`.
    struct Case<'a> {
        name: &'a str,
        min: u32,
        max: u32,
        idle: u64,
        nodes: &'a [&'a str],
        jobs: &'a [&'a str],
        now: u64,
        last_action: Option<u64>,
        provider_error: Option<&'a str>,
        expect: &'a str,
    }

    const BASE: Case<'static> = Case {
        name: "",
        min: 0,
        max: 4,
        idle: 120,
        nodes: &[],
        jobs: &[],
        now: 1000,
        last_action: None,
        provider_error: None,
        expect: "",
    };

    fn render(d: &ScaleDecision) -> String {
        let mut out = format!("{}->{} {}", d.current, d.target, d.allocation_state);
        match &d.action {
            ScaleAction::None => out.push_str(" none"),
            ScaleAction::Add { count } => out.push_str(&format!(" add {count}")),
            ScaleAction::Remove { nodes } => out.push_str(&format!(" remove {}", nodes.join(","))),
        }
        if !d.reclaim.is_empty() {
            out.push_str(&format!(" reclaim {}", d.reclaim.join(",")));
        }
        if let Some(r) = &d.reason {
            out.push_str(&format!(" because {r}"));
        }
        if let Some(t) = d.cooldown_until {
            out.push_str(&format!(" until {}", t.as_millis() / 1000));
        }
        out
    }

    fn run(cases: &[Case<'_>]) {
        for c in cases {
            let mut spec = ComputeSpec::new("cpu", "STANDARD_D3_V2", c.max);
            spec.min_nodes = c.min;
            spec.idle_seconds_before_scaledown = c.idle;
            let nodes: Vec<NodeSummary> = c.nodes.iter().map(|n| node(n)).collect();
            let jobs: Vec<JobSummary> = c.jobs.iter().map(|j| job(j)).collect();
            let input = AutoscaleInput {
                spec: &spec,
                nodes: &nodes,
                jobs: &jobs,
                now: Timestamp::from_secs(c.now),
                last_scale_action: c.last_action.map(Timestamp::from_secs),
                provider_error: c.provider_error,
            };
            let d = decide(&input, &AutoscalerConfig::default());
            assert_eq!(render(&d), c.expect, "case: {}", c.name);
            // Invariants, whatever the case.
            assert_eq!(
                d.allocation_state == AllocationState::Steady,
                d.current == d.target,
                "{}",
                c.name
            );
            if let ScaleAction::Remove { nodes: gone } = &d.action {
                for id in gone {
                    let n = nodes
                        .iter()
                        .find(|n| &n.id == id)
                        .expect("removed node exists");
                    assert!(
                        !n.has_work() && n.state == NodeState::Idle,
                        "{}: removed busy {id}",
                        c.name
                    );
                }
                assert!(d.target >= spec.min_nodes, "{}: below min", c.name);
            }
            if let ScaleAction::Add { count } = d.action {
                assert!(d.current + count <= spec.max_nodes, "{}: above max", c.name);
            }
        }
    }

    #[test]
    fn scale_up() {
        run(&[
            Case {
                name: "empty cluster stays at zero",
                expect: "0->0 Steady none",
                ..BASE
            },
            Case {
                name: "min_nodes is kept",
                min: 2,
                expect: "0->2 Resizing add 2",
                ..BASE
            },
            Case {
                name: "one queued job from zero",
                jobs: &["j1:queued:1"],
                expect: "0->1 Resizing add 1",
                ..BASE
            },
            Case {
                name: "queued and running jobs add up",
                nodes: &["n1:running::jr"],
                jobs: &["jr:running:1", "j1:queued:2"],
                expect: "1->3 Resizing add 2",
                ..BASE
            },
            Case {
                name: "need is clamped to max",
                jobs: &["j1:queued:3", "j2:queued:3"],
                expect: "0->4 Resizing add 4",
                ..BASE
            },
            Case {
                name: "a job larger than max is never scaled for",
                jobs: &["huge:queued:5"],
                expect: "0->0 Steady none",
                ..BASE
            },
            Case {
                name: "but the schedulable jobs around it are",
                jobs: &["huge:queued:5", "j1:queued:2"],
                expect: "0->2 Resizing add 2",
                ..BASE
            },
            Case {
                name: "terminal jobs need nothing",
                jobs: &["a:completed:2", "b:failed:1", "c:canceled:3"],
                expect: "0->0 Steady none",
                ..BASE
            },
            Case {
                name: "preparing nodes count: no double creation",
                nodes: &["n1:preparing", "n2:preparing"],
                jobs: &["j1:queued:2"],
                expect: "2->2 Steady none",
                ..BASE
            },
            Case {
                name: "scale-up ignores the cool-down",
                jobs: &["j1:queued:1"],
                last_action: Some(995),
                expect: "0->1 Resizing add 1",
                ..BASE
            },
            Case {
                name: "dead nodes are not counted, replaced and reclaimed",
                nodes: &[
                    "n1:unusable",
                    "n2:preempted",
                    "n3:leaving",
                    "n4:running::j1",
                ],
                jobs: &["j1:running:1", "j2:queued:1"],
                expect: "1->2 Resizing add 1 reclaim n1,n2",
                ..BASE
            },
            Case {
                name: "a dead node still holding a part is not reclaimed yet",
                nodes: &["n1:unusable::j1"],
                jobs: &["j1:running:1"],
                expect: "0->1 Resizing add 1",
                ..BASE
            },
        ]);
    }

    #[test]
    fn unreachable_target_says_why() {
        run(&[
            Case {
                name: "static provider: the target it would want, and the manual step",
                jobs: &["j1:queued:2"],
                provider_error: Some(
                    "the static provider cannot create nodes: start drover-agent with the join token of cluster cpu on 2 more machine(s)",
                ),
                expect: "0->2 Resizing add 2 because the static provider cannot create nodes: \
                         start drover-agent with the join token of cluster cpu on 2 more machine(s)",
                ..BASE
            },
            Case {
                name: "quota: stuck resizing 0 -> 1 with the reason",
                jobs: &["j1:queued:1"],
                provider_error: Some(
                    "quota exceeded: asked for 1 node(s), 0 available: standard dv2 family vcpus",
                ),
                expect: "0->1 Resizing add 1 because quota exceeded: asked for 1 node(s), 0 available: standard dv2 family vcpus",
                ..BASE
            },
            Case {
                name: "a stale error is not shown once steady",
                nodes: &["n1:running::j1"],
                jobs: &["j1:running:1"],
                provider_error: Some("quota exceeded"),
                expect: "1->1 Steady none",
                ..BASE
            },
        ]);
    }

    #[test]
    fn scale_down() {
        run(&[
            Case {
                name: "idle past the idle time leaves, to zero",
                nodes: &["n1:idle:800"],
                expect: "1->0 Resizing remove n1",
                ..BASE
            },
            Case {
                name: "exactly the idle time is enough",
                nodes: &["n1:idle:880"],
                expect: "1->0 Resizing remove n1",
                ..BASE
            },
            Case {
                name: "idle for less than the idle time stays",
                nodes: &["n1:idle:881"],
                expect: "1->1 Steady none",
                ..BASE
            },
            Case {
                name: "idle time 0 releases at once",
                idle: 0,
                nodes: &["n1:idle:1000"],
                expect: "1->0 Resizing remove n1",
                ..BASE
            },
            Case {
                name: "down to min only, oldest-idle first",
                min: 1,
                nodes: &["new:idle:700", "old:idle:100", "mid:idle:500"],
                expect: "3->1 Resizing remove old,mid",
                ..BASE
            },
            Case {
                name: "only as many as the need allows",
                nodes: &["a:idle:100", "b:idle:200", "c:running::j1"],
                jobs: &["j1:running:1", "j2:queued:1"],
                expect: "3->2 Resizing remove a",
                ..BASE
            },
            Case {
                name: "never a node with work",
                nodes: &[
                    "busy:running:100:j1",
                    "assigned:idle:100:j2",
                    "prep:preparing:100",
                ],
                jobs: &["j1:completed:1"],
                expect: "3->3 Steady none",
                ..BASE
            },
            Case {
                name: "unknown idle time is not expired",
                nodes: &["n1:idle"],
                expect: "1->1 Steady none",
                ..BASE
            },
            Case {
                name: "cool-down holds removal, still reporting the target",
                nodes: &["n1:idle:100"],
                last_action: Some(980),
                expect: "1->0 Resizing none until 1010",
                ..BASE
            },
            Case {
                name: "after the cool-down, removal goes ahead",
                nodes: &["n1:idle:100"],
                last_action: Some(970),
                expect: "1->0 Resizing remove n1",
                ..BASE
            },
        ]);
    }

    #[test]
    fn lowered_max_releases_idle_nodes_at_once() {
        run(&[
            Case {
                name: "above max: idle nodes leave without waiting for the idle time",
                max: 2,
                nodes: &["a:idle:990", "b:idle:995", "c:idle:999", "d:running::j1"],
                jobs: &["j1:running:1"],
                expect: "4->2 Resizing remove a,b",
                ..BASE
            },
            Case {
                name: "above max with busy nodes: they finish first",
                max: 1,
                nodes: &["a:running::j1", "b:running::j2"],
                jobs: &["j1:running:1", "j2:running:1"],
                expect: "2->2 Steady none",
                ..BASE
            },
            Case {
                name: "above max, unknown idle time still leaves",
                max: 1,
                nodes: &["a:idle", "b:running::j1"],
                jobs: &["j1:running:1"],
                expect: "2->1 Resizing remove a",
                ..BASE
            },
        ]);
    }

    #[test]
    fn need_counts() {
        let spec = ComputeSpec::new("cpu", "STANDARD_D3_V2", 4);
        let check = |jobs: &[&str], expect: u32| {
            let jobs: Vec<JobSummary> = jobs.iter().map(|j| job(j)).collect();
            assert_eq!(nodes_needed(&spec, &jobs), expect, "{jobs:?}");
        };
        check(&[], 0);
        check(&["a:queued:2", "b:preparing:1", "c:running:3"], 6);
        check(&["a:queued:5"], 0);
        check(&["a:running:5"], 5);
        check(&["a:queued:0"], 1);
        let big: Vec<String> = (0..3)
            .map(|i| format!("j{i}:running:{}", u32::MAX))
            .collect();
        let big: Vec<&str> = big.iter().map(String::as_str).collect();
        check(&big, u32::MAX);
    }

    #[test]
    fn submissions() {
        let spec = ComputeSpec::new("cpu", "STANDARD_D3_V2", 4);
        let check = |instances, gpus, node_gpus, expect: Result<(), &str>| {
            assert_eq!(
                check_submission(&spec, instances, gpus, node_gpus).map_err(|e| e.to_string()),
                expect.map_err(str::to_string),
                "{instances} x {gpus} on {node_gpus:?}"
            );
        };
        check(1, 0, None, Ok(()));
        check(4, 8, Some(8), Ok(()));
        check(4, 8, None, Ok(()));
        check(0, 0, None, Err("a job needs at least 1 instance, got 0"));
        check(
            5,
            0,
            None,
            Err(
                "the job needs 5 nodes but cluster cpu has at most 4 (max_nodes); \
                 lower resources.instance_count or raise the cluster's max_nodes",
            ),
        );
        check(
            2,
            8,
            Some(4),
            Err("the job needs 8 gpus per node but the nodes of cluster cpu have 4"),
        );
    }
}
