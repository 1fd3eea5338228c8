//! Why a queued job waits, as its user reads it (`drover job show`, the
//! `--stream` follower), derived from its cluster's scaling decision.
//!
//! [`waiting_reason`] is pure: the control plane passes the decision it
//! reports as the cluster's status, so a job never tells a different story
//! than its cluster.

use drover_api::cluster::JobState;

use super::ScaleDecision;

/// What [`waiting_reason`] reads of a job's cluster.
#[derive(Debug, Clone, Copy)]
pub struct ClusterProgress<'a> {
    /// The cluster's name.
    pub name: &'a str,
    /// Its scaling decision: current and target sizes, and why it is not at
    /// its target (the provider's errors of its last pass).
    pub decision: &'a ScaleDecision,
    /// Machines being created that have not registered yet (they count in
    /// `decision.current` as preparing nodes).
    pub creating: u32,
    /// Queued jobs of the cluster submitted before this one, oldest first:
    /// the queue is FIFO, so the job waits for them.
    pub ahead: &'a [String],
    /// The cluster's `max_nodes`.
    pub max_nodes: u32,
}

/// Why a job in `state` needing `instance_count` nodes still waits, or
/// `None` when it does not wait for its cluster:
///
/// - a queued job whose cluster is below its target and says why (a
///   provider error: a missing node image, a quota) gets that reason;
/// - otherwise a queued job whose cluster is growing (machines being
///   created, or a target above its size) waits for those nodes;
/// - otherwise a queued job with older queued jobs ahead of it waits
///   behind them (the queue is FIFO: a job never overtakes an older one);
/// - otherwise it waits for nodes held by running work on a cluster at
///   its maximum size;
/// - a job that is not queued gets `None`.
pub fn waiting_reason(
    state: JobState,
    instance_count: u32,
    cluster: &ClusterProgress<'_>,
) -> Option<String> {
    if state != JobState::Queued {
        return None;
    }
    let d = cluster.decision;
    let name = cluster.name;
    if d.current < d.target
        && let Some(reason) = &d.reason
    {
        return Some(format!(
            "cluster {name} cannot reach {}: {reason}",
            nodes(d.target)
        ));
    }
    if cluster.creating > 0 || d.current < d.target {
        let ready = d.current.saturating_sub(cluster.creating);
        return Some(format!(
            "waiting for {}: cluster {name} is resizing {ready} → {}",
            nodes(instance_count.max(1)),
            d.target
        ));
    }
    if let Some(head) = cluster.ahead.first() {
        let more = cluster.ahead.len() - 1;
        return Some(if more == 0 {
            format!("queued behind {head} (FIFO)")
        } else {
            format!("queued behind {head} and {more} more (FIFO)")
        });
    }
    if d.current >= cluster.max_nodes {
        return Some(format!(
            "waiting for {}: all {} of cluster {name} are busy (max_nodes {})",
            nodes(instance_count.max(1)),
            nodes(d.current),
            cluster.max_nodes
        ));
    }
    None
}

/// `1 node`, `2 nodes`.
fn nodes(n: u32) -> String {
    format!("{n} node{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use drover_api::cluster::AllocationState;

    use super::*;
    use crate::autoscaler::ScaleAction;

    fn decision(current: u32, target: u32, reason: Option<&str>) -> ScaleDecision {
        ScaleDecision {
            current,
            target,
            allocation_state: if current == target {
                AllocationState::Steady
            } else {
                AllocationState::Resizing
            },
            action: ScaleAction::None,
            reclaim: Vec::new(),
            reason: reason.map(str::to_string),
            cooldown_until: None,
        }
    }

    fn reason(state: JobState, instances: u32, d: &ScaleDecision, creating: u32) -> Option<String> {
        waiting_reason(
            state,
            instances,
            &ClusterProgress {
                name: "cpu",
                decision: d,
                creating,
                ahead: &[],
                max_nodes: 4,
            },
        )
    }

    const MISSING: &str = "the local provider failed to create nodes: node image drover/node:ab is missing and could not be rebuilt: drover/base:bookworm is missing";

    #[test]
    fn a_cluster_that_cannot_grow_gives_its_reason() {
        assert_eq!(
            reason(JobState::Queued, 1, &decision(0, 1, Some(MISSING)), 0).as_deref(),
            Some(format!("cluster cpu cannot reach 1 node: {MISSING}").as_str())
        );
        // Part of the nodes made, the rest failing: still the reason.
        assert!(
            reason(JobState::Queued, 2, &decision(1, 2, Some("quota")), 1)
                .is_some_and(|r| r.ends_with(": quota"))
        );
    }

    #[test]
    fn nodes_being_created_are_what_a_job_waits_for() {
        // Both machines made, not registered yet: they count in `current`.
        assert_eq!(
            reason(JobState::Queued, 2, &decision(2, 2, None), 2).as_deref(),
            Some("waiting for 2 nodes: cluster cpu is resizing 0 → 2")
        );
        // Decided, not yet asked of the provider.
        assert_eq!(
            reason(JobState::Queued, 1, &decision(0, 1, None), 0).as_deref(),
            Some("waiting for 1 node: cluster cpu is resizing 0 → 1")
        );
        // One node up, one more coming.
        assert_eq!(
            reason(JobState::Queued, 2, &decision(2, 2, None), 1).as_deref(),
            Some("waiting for 2 nodes: cluster cpu is resizing 1 → 2")
        );
    }

    #[test]
    fn a_job_behind_older_ones_or_busy_nodes_says_so() {
        let ahead = ["job-1".to_string(), "job-2".to_string()];
        let with = |ahead: &[String], d: &ScaleDecision, max_nodes: u32| {
            waiting_reason(
                JobState::Queued,
                1,
                &ClusterProgress {
                    name: "cpu",
                    decision: d,
                    creating: 0,
                    ahead,
                    max_nodes,
                },
            )
        };
        assert_eq!(
            with(&ahead[..1], &decision(2, 2, None), 4).as_deref(),
            Some("queued behind job-1 (FIFO)")
        );
        assert_eq!(
            with(&ahead, &decision(2, 2, None), 4).as_deref(),
            Some("queued behind job-1 and 1 more (FIFO)")
        );
        assert_eq!(
            with(&[], &decision(2, 2, None), 2).as_deref(),
            Some("waiting for 1 node: all 2 nodes of cluster cpu are busy (max_nodes 2)")
        );
    }

    #[test]
    fn no_reason_when_the_cluster_is_not_why() {
        // At its size, nothing being made: queued behind other work.
        assert_eq!(reason(JobState::Queued, 1, &decision(2, 2, None), 0), None);
        // An error of a shrinking cluster is not what a queued job waits for.
        assert_eq!(
            reason(
                JobState::Queued,
                1,
                &decision(3, 2, Some("remove failed")),
                0
            ),
            None
        );
        // Jobs that are not queued do not wait.
        for state in [
            JobState::Preparing,
            JobState::Running,
            JobState::Completed,
            JobState::Failed,
            JobState::Canceled,
        ] {
            assert_eq!(reason(state, 1, &decision(0, 1, Some(MISSING)), 1), None);
        }
    }
}
