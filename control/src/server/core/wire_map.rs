//! Store records to the `/v1` wire types users see.

use drover_api::inventory::Inventory;
use drover_api::wire;

use crate::store::{Job, JobPart, Node};

pub(super) fn part_info(p: JobPart) -> wire::PartInfo {
    wire::PartInfo {
        attempt: p.attempt,
        node_rank: p.node_rank,
        node: p.node,
        state: p.state,
        exit_code: p.exit_code,
        started_at: p.started_at,
        ended_at: p.ended_at,
    }
}

pub(super) fn job_info(job: Job, parts: Vec<JobPart>, with_spec: bool) -> wire::JobInfo {
    wire::JobInfo {
        instance_count: job.spec.instance_count(),
        spec: with_spec.then_some(job.spec),
        id: job.id,
        cluster: job.cluster,
        state: job.state,
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        submitted_at: job.submitted_at,
        started_at: job.started_at,
        ended_at: job.ended_at,
        failure_reason: job.failure_reason,
        waiting_reason: None,
        parts: parts.into_iter().map(part_info).collect(),
        progress: None,
    }
}

/// A node as users see it, with the part it runs (`part`, one of its
/// current job's parts on it) and its inventory in short.
pub(super) fn node_info(n: Node, part: Option<JobPart>) -> wire::NodeInfo {
    let details = &n.inventory.details;
    let agent_version = Some(details.agent.version.clone()).filter(|v| !v.is_empty());
    wire::NodeInfo {
        current_part: part.map(|p| wire::NodePart {
            part: wire::PartKey::new(&p.job, p.attempt, p.node_rank),
            state: p.state,
            started_at: p.started_at,
        }),
        vm: details.vm.clone(),
        agent_version,
        // A node that never sent an inventory has none to sum up.
        inventory: (*details != Inventory::default()).then(|| details.summary()),
        id: n.id,
        cluster: n.cluster,
        state: n.state,
        ip: n.ip,
        healthy_gpus: n.inventory.healthy_gpus,
        total_gpus: n.inventory.total_gpus,
        registered_at: n.registered_at,
        last_heartbeat: n.last_heartbeat,
        current_job: n.current_job,
    }
}

/// The part of its current job a node runs: its newest part of that job
/// on the node, a live one before an ended one.
pub(super) fn current_part(node: &Node, parts: Vec<JobPart>) -> Option<JobPart> {
    parts
        .into_iter()
        .filter(|p| p.node == node.id)
        .max_by_key(|p| (!p.state.is_terminal(), p.attempt))
}
