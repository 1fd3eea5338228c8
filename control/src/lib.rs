//! The Drover control plane and user CLI (`drover`).
//!
//! `run` executes a job on this machine's Docker without a control plane.
//! `scheduler` and `autoscaler` are pure decisions over plain data.

pub mod autoscaler;
pub mod provider;
pub mod run;
pub mod scheduler;
pub mod server;
pub mod store;
