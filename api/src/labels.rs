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
