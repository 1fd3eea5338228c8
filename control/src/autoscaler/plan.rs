//! One scaling pass as a plan: which machines are still preparing, which
//! never joined, how many to create, which idle nodes to drain and which
//! dead nodes' machines to reclaim.
//!
//! [`plan`] is pure, like [`super::decide`], which it wraps: it reconciles
//! what the provider reports (its machines and their states) with what has
//! registered, so that the control plane's scaling step only carries the
//! plan out. Rules:
//!
//! - A machine that has not registered is a `preparing` node (it counts
//!   toward the current size, so it is never created twice) until it
//!   registers, fails (the provider says why), or takes longer than the
//!   register timeout; then it *never joined* and is removed.
//! - A machine being deleted is neither preparing nor reclaimed.
//! - When the provider could not list its machines this pass, what was
//!   preparing stays preparing (nothing times out and nothing is reclaimed
//!   on a listing that failed), so a flaky listing never creates duplicates.
//! - A dead node (unusable, preempted, no work) is reclaimed only once its
//!   machine has stopped by itself (a preempted agent first stops its job
//!   with the grace period, then exits) or has been silent for longer than
//!   the register timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use drover_api::cluster::{JobSummary, NodeState, NodeSummary, Timestamp};
use drover_api::compute::ComputeSpec;

use super::{AutoscaleInput, AutoscalerConfig, ScaleAction, ScaleDecision, decide};
use crate::provider::{ProvisionState, ProvisionedNode};

/// Everything one scaling pass is planned from.
#[derive(Debug, Clone, Copy)]
pub struct ScalingInput<'a> {
    /// The cluster.
    pub spec: &'a ComputeSpec,
    /// Its registered nodes.
    pub nodes: &'a [NodeSummary],
    /// Its unfinished jobs.
    pub jobs: &'a [JobSummary],
    /// The provider's machines for the cluster; `None` when listing them
    /// failed this pass (or was not attempted).
    pub machines: Option<&'a [ProvisionedNode]>,
    /// Machines that had not registered at the last pass, with when they
    /// were first seen.
    pub pending: &'a BTreeMap<String, Timestamp>,
    /// The time of the pass.
    pub now: Timestamp,
    /// When the last scale action was taken.
    pub last_scale_action: Option<Timestamp>,
    /// The provider's errors at the last pass, the reason while resizing.
    pub provider_error: Option<&'a str>,
    /// How long a machine may take to register, and how long a dead node's
    /// running machine may stay silent before it is reclaimed anyway.
    pub register_timeout: Duration,
}

/// A machine that will never be a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeverJoined {
    /// The machine (and node) id.
    pub machine: String,
    /// Why, in words.
    pub why: String,
}

/// What one scaling pass does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalingPlan {
    /// The autoscaler's decision over registered and preparing nodes.
    pub decision: ScaleDecision,
    /// Machines that have not registered and may still: preparing nodes.
    pub pending: BTreeMap<String, Timestamp>,
    /// Machines to remove because they failed or never registered.
    pub never_joined: Vec<NeverJoined>,
    /// Machines to create.
    pub create: u32,
    /// Idle nodes to mark `leaving` and remove, in this order.
    pub drain: Vec<String>,
    /// Dead nodes whose machines are to be removed now.
    pub reclaim: Vec<String>,
}

impl ScalingPlan {
    /// True when the plan creates or removes nodes for the target (a scale
    /// action, which starts the cool-down).
    pub fn acts(&self) -> bool {
        self.create > 0 || !self.drain.is_empty()
    }
}

/// Machines that have not registered yet, as preparing nodes.
pub fn with_pending(
    nodes: &[NodeSummary],
    pending: &BTreeMap<String, Timestamp>,
) -> Vec<NodeSummary> {
    let mut all = nodes.to_vec();
    for (id, since) in pending {
        if nodes.iter().any(|n| &n.id == id) {
            continue;
        }
        all.push(NodeSummary {
            id: id.clone(),
            state: NodeState::Preparing,
            healthy_gpus: 0,
            total_gpus: 0,
            last_heartbeat: *since,
            free_since: None,
            current_job: None,
        });
    }
    all
}

/// Plans one scaling pass.
pub fn plan(input: &ScalingInput<'_>, config: &AutoscalerConfig) -> ScalingPlan {
    let t = input.now;
    let timeout = input.register_timeout;
    let registered: BTreeSet<&str> = input.nodes.iter().map(|n| n.id.as_str()).collect();

    let mut pending = BTreeMap::new();
    let mut never_joined = Vec::new();
    let mut reclaimable: BTreeSet<&str> = BTreeSet::new();
    match input.machines {
        None => {
            pending.extend(
                input
                    .pending
                    .iter()
                    .filter(|(id, _)| !registered.contains(id.as_str()))
                    .map(|(id, since)| (id.clone(), *since)),
            );
        }
        Some(machines) => {
            for m in machines {
                if registered.contains(m.id.as_str()) {
                    let silent = input
                        .nodes
                        .iter()
                        .any(|n| n.id == m.id && t.since(n.last_heartbeat) > timeout);
                    if m.state != ProvisionState::Running || silent {
                        reclaimable.insert(m.id.as_str());
                    }
                    continue;
                }
                let since = input.pending.get(&m.id).copied().unwrap_or(t);
                let failed = match &m.state {
                    ProvisionState::Failed(why) => Some(why.clone()),
                    ProvisionState::Deleting => continue,
                    _ if t.since(since) > timeout => Some(format!(
                        "its agent did not register within {}s (see `docker logs {}`)",
                        timeout.as_secs(),
                        m.id
                    )),
                    _ => None,
                };
                match failed {
                    None => {
                        pending.insert(m.id.clone(), since);
                    }
                    Some(why) => never_joined.push(NeverJoined {
                        machine: m.id.clone(),
                        why,
                    }),
                }
            }
        }
    }

    let nodes = with_pending(input.nodes, &pending);
    let decision = decide(
        &AutoscaleInput {
            spec: input.spec,
            nodes: &nodes,
            jobs: input.jobs,
            now: t,
            last_scale_action: input.last_scale_action,
            provider_error: input.provider_error,
        },
        config,
    );
    let (create, drain) = match &decision.action {
        ScaleAction::None => (0, Vec::new()),
        ScaleAction::Add { count } => (*count, Vec::new()),
        ScaleAction::Remove { nodes } => (0, nodes.clone()),
    };
    let reclaim = decision
        .reclaim
        .iter()
        .filter(|n| reclaimable.contains(n.as_str()))
        .cloned()
        .collect();
    ScalingPlan {
        decision,
        pending,
        never_joined,
        create,
        drain,
        reclaim,
    }
}

#[cfg(test)]
mod tests {
    use drover_api::cluster::JobState;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(120);

    fn spec(min: u32, max: u32) -> ComputeSpec {
        let mut s = ComputeSpec::new("c", "STANDARD_D2_V3", max);
        s.min_nodes = min;
        s
    }

    fn node(id: &str, state: NodeState, heard_secs: u64, job: Option<&str>) -> NodeSummary {
        NodeSummary {
            id: id.to_string(),
            state,
            healthy_gpus: 0,
            total_gpus: 0,
            last_heartbeat: Timestamp::from_secs(heard_secs),
            free_since: Some(Timestamp::from_secs(heard_secs)),
            current_job: job.map(str::to_string),
        }
    }

    fn machine(id: &str, state: ProvisionState) -> ProvisionedNode {
        ProvisionedNode {
            id: id.to_string(),
            state,
        }
    }

    fn queued(instances: u32) -> JobSummary {
        JobSummary {
            id: "j".into(),
            state: JobState::Queued,
            instance_count: instances,
            gpus_per_instance: 0,
            submitted: 1,
            attempt: 0,
        }
    }

    struct Case<'a> {
        spec: ComputeSpec,
        nodes: Vec<NodeSummary>,
        jobs: Vec<JobSummary>,
        machines: Option<Vec<ProvisionedNode>>,
        pending: BTreeMap<String, Timestamp>,
        now: u64,
        last: Option<u64>,
        error: Option<&'a str>,
    }

    impl Case<'_> {
        fn plan(&self) -> ScalingPlan {
            plan(
                &ScalingInput {
                    spec: &self.spec,
                    nodes: &self.nodes,
                    jobs: &self.jobs,
                    machines: self.machines.as_deref(),
                    pending: &self.pending,
                    now: Timestamp::from_secs(self.now),
                    last_scale_action: self.last.map(Timestamp::from_secs),
                    provider_error: self.error,
                    register_timeout: TIMEOUT,
                },
                &AutoscalerConfig::default(),
            )
        }
    }

    fn case<'a>() -> Case<'a> {
        Case {
            spec: spec(0, 4),
            nodes: vec![],
            jobs: vec![],
            machines: Some(vec![]),
            pending: BTreeMap::new(),
            now: 1000,
            last: None,
            error: None,
        }
    }

    fn pending(entries: &[(&str, u64)]) -> BTreeMap<String, Timestamp> {
        entries
            .iter()
            .map(|(id, s)| (id.to_string(), Timestamp::from_secs(*s)))
            .collect()
    }

    #[test]
    fn a_queued_job_creates_what_it_needs_once() {
        let mut c = case();
        c.jobs = vec![queued(2)];
        let p = c.plan();
        assert_eq!((p.create, p.acts()), (2, true));
        // Next pass: the two machines exist but have not registered: they
        // are preparing nodes, so nothing more is created.
        c.machines = Some(vec![
            machine("m1", ProvisionState::Creating),
            machine("m2", ProvisionState::Running),
        ]);
        let p = c.plan();
        assert_eq!(p.create, 0);
        assert_eq!(p.pending, pending(&[("m1", 1000), ("m2", 1000)]));
        assert_eq!(p.decision.current, 2);
    }

    #[test]
    fn pending_machines_keep_their_first_sighting() {
        let mut c = case();
        c.machines = Some(vec![machine("m1", ProvisionState::Running)]);
        c.pending = pending(&[("m1", 950)]);
        assert_eq!(c.plan().pending, pending(&[("m1", 950)]));
    }

    #[test]
    fn failed_or_late_machines_never_join() {
        let mut c = case();
        c.machines = Some(vec![
            machine("bad", ProvisionState::Failed("image missing".into())),
            machine("late", ProvisionState::Running),
            machine("going", ProvisionState::Deleting),
        ]);
        c.pending = pending(&[("late", 1000 - 121)]);
        let p = c.plan();
        assert!(p.pending.is_empty(), "{:?}", p.pending);
        assert_eq!(
            p.never_joined,
            vec![
                NeverJoined {
                    machine: "bad".into(),
                    why: "image missing".into()
                },
                NeverJoined {
                    machine: "late".into(),
                    why: "its agent did not register within 120s (see `docker logs late`)".into()
                },
            ]
        );
    }

    #[test]
    fn a_failed_listing_keeps_what_was_preparing_and_reclaims_nothing() {
        let mut c = case();
        c.jobs = vec![queued(2)];
        c.machines = None;
        c.pending = pending(&[("m1", 100), ("m2", 100)]);
        c.nodes = vec![node("dead", NodeState::Unusable, 10, None)];
        let p = c.plan();
        assert_eq!(p.pending.len(), 2, "old sightings never time out blind");
        assert_eq!(p.create, 0, "no duplicates for machines being made");
        assert!(p.never_joined.is_empty());
        assert!(p.reclaim.is_empty());
    }

    #[test]
    fn a_registered_machine_is_no_longer_pending() {
        let mut c = case();
        c.nodes = vec![node("m1", NodeState::Idle, 1000, None)];
        c.machines = Some(vec![machine("m1", ProvisionState::Running)]);
        c.pending = pending(&[("m1", 990)]);
        assert!(c.plan().pending.is_empty());
        c.machines = None;
        assert!(c.plan().pending.is_empty());
    }

    #[test]
    fn dead_nodes_are_reclaimed_once_their_machine_stopped_or_went_silent() {
        let mut c = case();
        c.nodes = vec![
            node("stopped", NodeState::Preempted, 999, None),
            node("silent", NodeState::Unusable, 1000 - 121, None),
            node("still-up", NodeState::Unusable, 990, None),
            node("busy", NodeState::Unusable, 10, Some("job")),
        ];
        c.machines = Some(vec![
            machine("stopped", ProvisionState::Deleting),
            machine("silent", ProvisionState::Running),
            machine("still-up", ProvisionState::Running),
            machine("busy", ProvisionState::Running),
        ]);
        assert_eq!(c.plan().reclaim, vec!["silent", "stopped"]);
    }

    #[test]
    fn idle_nodes_past_their_idle_time_are_drained() {
        let mut c = case();
        c.nodes = vec![node("n1", NodeState::Idle, 1000 - 121, None)];
        c.machines = Some(vec![machine("n1", ProvisionState::Running)]);
        c.nodes[0].last_heartbeat = Timestamp::from_secs(1000);
        let p = c.plan();
        assert_eq!(p.drain, vec!["n1"]);
        assert!(p.acts());
        c.last = Some(990);
        let p = c.plan();
        assert!(p.drain.is_empty(), "cool-down holds removal back");
        assert!(!p.acts());
    }
}
