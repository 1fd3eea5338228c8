//! The Drover control plane and user CLI (`drover`).
//!
//! `run` executes a job on this machine's Docker without a control plane.
//! `scheduler` and `autoscaler` are pure decisions over plain data.
//! `output` is what every command's output shares (closed pipes, escape
//! codes, log line prefixes).

pub mod artifacts;
pub mod autoscaler;
pub mod datastores;
pub mod output;
pub mod provider;
pub mod run;
pub mod scheduler;
pub mod secrets;
pub mod server;
pub mod store;
