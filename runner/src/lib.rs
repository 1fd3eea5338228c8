//! Runs one node's share of a Drover job ("part") as Docker containers.
//!
//! * [`runtime`] — the container-engine boundary in plain types, and
//!   [`docker`] — its only implementation over the Docker API.
//! * [`pull`] — shared, time-bounded image pulls with progress.
//! * [`auth`] — registry credentials from the job or `~/.docker/config.json`.
//! * [`part`] — planning a part's container and driving it to an outcome.
//! * [`init_binary`] — finding the static drover-init; [`init_output`] —
//!   the rank marker it puts on each line of a part with several ranks.
//! * [`fake`] — a scripted in-memory runtime for tests of the logic above.
//!
//! Architecture Invariant: this crate is the only one that imports bollard.
//! It knows job specs and placements, but nothing of the control plane,
//! scheduling or nodes.

pub mod auth;
pub mod docker;
pub mod fake;
pub mod init_binary;
pub mod parallel;
pub mod part;
pub mod pull;
pub mod runtime;
mod tar;

/// drover-init's output protocol: [`init_output::split_marker`] reads the
/// rank of a line of a part that runs more than one rank.
pub use drover_init as init_output;

pub use docker::DockerRuntime;
pub use part::{HostFacts, PartEvent, PartOutcome, PartRunner, Placement, RunOptions};
pub use pull::{ImagePuller, PullLimits};
pub use runtime::ContainerRuntime;
