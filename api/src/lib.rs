//! Drover's wire types and user-facing definitions.
//!
//! API Boundary: everything here is plain data plus parsing and validation.
//! Architecture Invariant: no I/O, no async runtime — the crate is shared by
//! the agent, the control plane and the CLI and must stay cheap to depend on.

pub mod cluster;
pub mod compute;
pub mod datastore;
pub mod docker_args;
pub mod environment;
pub mod error;
pub mod files;
pub mod host_paths;
pub mod inventory;
pub mod job;
mod json;
pub mod labels;
pub mod units;
pub mod wire;
pub mod yaml;

pub use job::{CommandJob, InvalidJob, JobSpec, ParsedJob};
pub use yaml::{Diagnostic, InvalidDefinition, SetOverride};
