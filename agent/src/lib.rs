//! The Drover node agent: what a node has (inventory), who it is (IMDS), and
//! — in later stages — reconciling Docker toward the control plane's desired state.

pub mod imds;
pub mod inventory;
