//! Docker labels that identify Drover's containers.
//!
//! They are the agent's memory: after a restart it re-adopts its containers
//! by these labels, so their names and meanings never change.

/// Present (value `true`) on every container Drover creates.
pub const MANAGED: &str = "drover.managed";
/// The job's name.
pub const JOB: &str = "drover.job";
/// The part's node rank (0 for single-node jobs).
pub const PART: &str = "drover.part";
/// Attempt number, from 1; preemption and node loss start a new attempt.
pub const ATTEMPT: &str = "drover.attempt";
/// Who created the container: `run` for `drover run`, the node id for an agent.
pub const OWNER: &str = "drover.owner";
/// On a local cluster's node container and its network: the cluster.
pub const CLUSTER: &str = "drover.cluster";
/// On a local cluster's node container: `node`.
pub const ROLE: &str = "drover.role";
/// On everything a local provider creates: which control plane created it
/// (so `drover down` removes exactly its own containers and networks).
pub const CONTROL_PLANE: &str = "drover.control-plane";
/// The value of [`ROLE`] on node containers.
pub const ROLE_NODE: &str = "node";
