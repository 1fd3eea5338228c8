//! The Drover node agent: what a node has (inventory), who it is (IMDS), and
//! reconciling Docker toward the control plane's desired state (`reconcile`).

pub mod control_client;
pub mod daemon;
pub mod environments;
pub mod files;
pub mod firewall;
pub mod http;
pub mod identity;
pub mod images;
pub mod inventory;
pub mod join;
pub mod metrics;
pub mod reconcile;
pub mod registry_login;
