//! Gang scheduling: which queued jobs start now, and on which nodes.
//!
//! [`schedule`] is a pure function over one cluster's nodes and jobs; the
//! control plane calls it whenever either changes and applies its
//! [`Placement`]s in one store transaction. Re-running it on unchanged input
//! gives the same answer.
//!
//! Rules:
//! - **Gang.** A job of N instances starts only when N suitable nodes are free,
//!   and then on all N at once: a distributed job never holds some nodes while
//!   it waits for the rest (that deadlocks two half-placed jobs).
//! - **Strict FIFO.** Jobs are considered in submission order and a job that
//!   cannot start blocks every job behind it, even ones that would fit now.
//!   Letting small jobs overtake would starve a large gang job forever on a
//!   busy cluster: each time one node frees up, a one-node job would take it
//!   and the N nodes the big job needs would never be free together. The price
//!   is some idle capacity while the head waits; the autoscaler adds nodes for
//!   it meanwhile.
//! - **Suitable node:** state `idle`, no job part assigned, and at least the
//!   job's `gpus_per_instance` healthy GPUs.
//! - **Deterministic node choice** (see [`node_order`]): fewest healthy GPUs
//!   that still fit (best fit: whole healthy nodes stay for jobs that need
//!   them), then most recently freed first (work concentrates on warm nodes and
//!   long-idle ones age out, so the autoscaler can release them), then node id.
//!   The first chosen node is node rank 0.

use std::cmp::Reverse;

use drover_api::cluster::{JobState, JobSummary, NodeState, NodeSummary, Timestamp};
use drover_api::compute::ComputeSpec;

/// A job started on nodes: `nodes[i]` runs the part of node rank `i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The job.
    pub job_id: String,
    /// Its nodes, rank 0 first; exactly `instance_count` of them, all distinct.
    pub nodes: Vec<String>,
}

/// Why the head of the queue did not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The job at the head of the queue.
    pub job_id: String,
    /// Nodes it needs.
    pub needed: u32,
    /// Suitable nodes free for it now (fewer than `needed`).
    pub suitable: u32,
}

/// The outcome of one scheduling pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Jobs to start now, in queue order.
    pub placements: Vec<Placement>,
    /// The job that blocks the queue, if one does (every job behind it waits).
    pub blocked: Option<Blocked>,
    /// Queued jobs that can never start on this cluster (more instances than
    /// `max_nodes`, possible after `max_nodes` was lowered). They are skipped,
    /// not allowed to block the queue forever; the caller should fail them.
    pub unschedulable: Vec<String>,
}

/// True when `node` could take a part needing `gpus` healthy GPUs right now.
pub fn is_suitable(node: &NodeSummary, gpus: u32) -> bool {
    node.state == NodeState::Idle && node.current_job.is_none() && node.healthy_gpus >= gpus
}

/// The sort key that makes node choice deterministic: fewest healthy GPUs
/// first, then most recently freed (a node with no `free_since` counts as just
/// freed), then id.
pub fn node_order(node: &NodeSummary) -> (u32, Reverse<Timestamp>, &str) {
    (
        node.healthy_gpus,
        Reverse(node.free_since.unwrap_or(Timestamp(u64::MAX))),
        node.id.as_str(),
    )
}

/// Decides which queued jobs of one cluster start now and where.
///
/// `jobs` may hold jobs in any state and any order: only `queued` ones are
/// considered, by (`submitted`, `id`). A job with `instance_count` 0 is
/// treated as needing one node (submission refuses 0; see
/// [`crate::autoscaler::check_submission`]).
pub fn schedule(cluster: &ComputeSpec, nodes: &[NodeSummary], jobs: &[JobSummary]) -> Schedule {
    let mut queue: Vec<&JobSummary> = jobs
        .iter()
        .filter(|j| j.state == JobState::Queued)
        .collect();
    queue.sort_by(|a, b| (a.submitted, &a.id).cmp(&(b.submitted, &b.id)));

    let mut free: Vec<&NodeSummary> = nodes.iter().filter(|n| is_suitable(n, 0)).collect();
    free.sort_by(|a, b| node_order(a).cmp(&node_order(b)));

    let mut out = Schedule::default();
    for job in queue {
        let needed = job.instance_count.max(1);
        if needed > cluster.max_nodes {
            out.unschedulable.push(job.id.clone());
            continue;
        }
        let fitting: Vec<usize> = free
            .iter()
            .enumerate()
            .filter(|(_, n)| n.healthy_gpus >= job.gpus_per_instance)
            .map(|(i, _)| i)
            .take(needed as usize)
            .collect();
        if fitting.len() < needed as usize {
            let suitable = free
                .iter()
                .filter(|n| n.healthy_gpus >= job.gpus_per_instance)
                .count();
            out.blocked = Some(Blocked {
                job_id: job.id.clone(),
                needed,
                suitable: u32::try_from(suitable).unwrap_or(u32::MAX),
            });
            // Strict FIFO: nothing behind a blocked job starts (see module docs).
            break;
        }
        let chosen: Vec<String> = fitting.iter().map(|&i| free[i].id.clone()).collect();
        // Remove from the back so earlier indices stay valid.
        for &i in fitting.iter().rev() {
            free.remove(i);
        }
        out.placements.push(Placement {
            job_id: job.id.clone(),
            nodes: chosen,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `id:state:healthy_gpus[:free_since_secs][:job]`, e.g. `n1:idle:8:100`.
    fn node(text: &str) -> NodeSummary {
        let parts: Vec<&str> = text.split(':').collect();
        let state: NodeState = parts[1].parse().expect("node state");
        let gpus: u32 = parts[2].parse().expect("gpus");
        NodeSummary {
            id: parts[0].to_string(),
            state,
            healthy_gpus: gpus,
            total_gpus: 8,
            last_heartbeat: Timestamp::from_secs(1000),
            free_since: parts
                .get(3)
                .filter(|s| !s.is_empty())
                .map(|s| Timestamp::from_secs(s.parse().expect("secs"))),
            current_job: parts.get(4).map(|s| s.to_string()),
        }
    }

    /// `id:state:instances:gpus:submitted`, e.g. `j1:queued:2:8:1`.
    fn job(text: &str) -> JobSummary {
        let parts: Vec<&str> = text.split(':').collect();
        let state: JobState = parts[1].parse().expect("job state");
        JobSummary {
            id: parts[0].to_string(),
            state,
            instance_count: parts[2].parse().expect("instances"),
            gpus_per_instance: parts[3].parse().expect("gpus"),
            submitted: parts[4].parse().expect("submitted"),
            attempt: 0,
        }
    }

    /// Renders a schedule compactly: `j1=[n1,n2] j2=[n3] | blocked j3 2/1 | never j9`.
    fn render(s: &Schedule) -> String {
        let mut out: Vec<String> = s
            .placements
            .iter()
            .map(|p| format!("{}=[{}]", p.job_id, p.nodes.join(",")))
            .collect();
        if let Some(b) = &s.blocked {
            out.push(format!(
                "| blocked {} {}/{}",
                b.job_id, b.needed, b.suitable
            ));
        }
        if !s.unschedulable.is_empty() {
            out.push(format!("| never {}", s.unschedulable.join(",")));
        }
        out.join(" ")
    }

    fn check(max_nodes: u32, nodes: &[&str], jobs: &[&str], expect: &str) {
        let cluster = ComputeSpec::new("gpu", "Standard_ND96", max_nodes);
        let nodes: Vec<NodeSummary> = nodes.iter().map(|n| node(n)).collect();
        let jobs: Vec<JobSummary> = jobs.iter().map(|j| job(j)).collect();
        let got = schedule(&cluster, &nodes, &jobs);
        assert_eq!(render(&got), expect, "nodes {nodes:?}\njobs {jobs:?}");
        // Every placement has exactly its instance count of distinct, free nodes.
        let mut used: Vec<&String> = Vec::new();
        for p in &got.placements {
            let j = jobs
                .iter()
                .find(|j| j.id == p.job_id)
                .expect("placed job exists");
            assert_eq!(p.nodes.len(), j.instance_count.max(1) as usize);
            for n in &p.nodes {
                assert!(!used.contains(&n), "node {n} placed twice");
                used.push(n);
            }
        }
    }

    #[test]
    fn empty_inputs() {
        check(4, &[], &[], "");
        check(4, &["n1:idle:0:10"], &[], "");
        check(4, &[], &["j1:queued:1:0:1"], "| blocked j1 1/0");
    }

    #[test]
    fn single_node_jobs_fill_free_nodes_in_fifo_order() {
        check(
            4,
            &["n1:idle:0:10", "n2:idle:0:20"],
            &["j2:queued:1:0:2", "j1:queued:1:0:1", "j3:queued:1:0:3"],
            "j1=[n2] j2=[n1] | blocked j3 1/0",
        );
    }

    #[test]
    fn gang_starts_on_all_nodes_at_once_or_not_at_all() {
        // Two of three nodes free: the 3-instance job takes none of them.
        check(
            4,
            &["n1:idle:8:10", "n2:idle:8:10", "n3:running:8::jx"],
            &["j1:queued:3:8:1"],
            "| blocked j1 3/2",
        );
        // All three free: one placement with all three.
        check(
            4,
            &["n1:idle:8:10", "n2:idle:8:10", "n3:idle:8:10"],
            &["j1:queued:3:8:1"],
            "j1=[n1,n2,n3]",
        );
    }

    #[test]
    fn strict_fifo_a_blocked_head_blocks_the_queue() {
        // j1 needs 2 nodes, 1 is free; j2 would fit but must not overtake,
        // or j1 could starve while single-node jobs keep taking freed nodes.
        check(
            4,
            &["n1:idle:0:10", "n2:running:0::jx"],
            &["j1:queued:2:0:1", "j2:queued:1:0:2"],
            "| blocked j1 2/1",
        );
        // Jobs ahead of the blocked one still start.
        check(
            4,
            &["n1:idle:0:10", "n2:idle:0:10"],
            &["j1:queued:1:0:1", "j2:queued:2:0:2", "j3:queued:1:0:3"],
            "j1=[n1] | blocked j2 2/1",
        );
    }

    #[test]
    fn only_idle_nodes_without_work_and_with_enough_healthy_gpus_are_suitable() {
        check(
            4,
            &[
                "a:running:8:10",
                "b:preparing:8:10",
                "c:unusable:8:10",
                "d:leaving:8:10",
                "e:preempted:8:10",
                // Idle but already assigned a part (not yet started).
                "f:idle:8:10:jx",
                // Idle with too few healthy GPUs for an 8-GPU part.
                "g:idle:7:10",
                "h:idle:8:10",
            ],
            &["j1:queued:2:8:1"],
            "| blocked j1 2/1",
        );
        check(
            4,
            &["g:idle:7:10", "h:idle:8:10"],
            &["j1:queued:1:8:1"],
            "j1=[h]",
        );
    }

    #[test]
    fn node_choice_is_best_fit_then_most_recently_freed_then_id() {
        // Fewest healthy GPUs that still fit first: the 4-GPU job takes the
        // node with a failed GPU, keeping the whole one for 8-GPU work.
        check(
            4,
            &["full:idle:8:10", "degraded:idle:7:10"],
            &["j1:queued:1:4:1", "j2:queued:1:8:2"],
            "j1=[degraded] j2=[full]",
        );
        // Same GPUs: most recently freed first (long-idle nodes age out).
        check(
            4,
            &["old:idle:0:10", "new:idle:0:50", "mid:idle:0:30"],
            &["j1:queued:2:0:1"],
            "j1=[new,mid]",
        );
        // Unknown free_since counts as just freed.
        check(
            4,
            &["old:idle:0:10", "fresh:idle:0"],
            &["j1:queued:1:0:1"],
            "j1=[fresh]",
        );
        // Full tie: by id.
        check(
            4,
            &["n3:idle:0:10", "n1:idle:0:10", "n2:idle:0:10"],
            &["j1:queued:2:0:1"],
            "j1=[n1,n2]",
        );
    }

    #[test]
    fn same_submission_number_orders_by_id() {
        check(
            4,
            &["n1:idle:0:10"],
            &["jb:queued:1:0:5", "ja:queued:1:0:5"],
            "ja=[n1] | blocked jb 1/0",
        );
    }

    #[test]
    fn only_queued_jobs_are_scheduled() {
        check(
            4,
            &["n1:idle:0:10", "n2:idle:0:10"],
            &[
                "done:completed:1:0:1",
                "bad:failed:1:0:2",
                "gone:canceled:1:0:3",
                "busy:running:1:0:4",
                "prep:preparing:1:0:5",
                "j1:queued:1:0:6",
            ],
            "j1=[n1]",
        );
    }

    #[test]
    fn jobs_larger_than_the_cluster_are_skipped_not_blocking() {
        check(
            2,
            &["n1:idle:0:10", "n2:idle:0:10"],
            &["huge:queued:3:0:1", "j1:queued:2:0:2"],
            "j1=[n1,n2] | never huge",
        );
    }

    #[test]
    fn zero_instances_counts_as_one() {
        check(4, &["n1:idle:0:10"], &["j1:queued:0:0:1"], "j1=[n1]");
    }

    #[test]
    fn deterministic_for_any_input_order() {
        let nodes = [
            "n1:idle:8:10",
            "n2:idle:8:20",
            "n3:idle:4:30",
            "n4:idle:8:40",
        ];
        let jobs = ["j1:queued:1:4:1", "j2:queued:2:8:2", "j3:queued:1:0:3"];
        let expect = "j1=[n3] j2=[n4,n2] j3=[n1]";
        check(4, &nodes, &jobs, expect);
        let mut rn = nodes;
        rn.reverse();
        let mut rj = jobs;
        rj.reverse();
        check(4, &rn, &rj, expect);
    }
}
