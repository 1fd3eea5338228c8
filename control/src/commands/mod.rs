//! One module per `drover` command group; each exposes its clap arguments and
//! one `run` function returning the process exit code. Only these functions
//! print.

pub mod client;
pub mod compute;
pub mod datastore;
pub mod environment;
pub mod files;
pub mod job;
pub mod node;
pub mod output;
pub mod server;
pub mod up;

use std::path::PathBuf;

/// The data directory when none is given: `$DROVER_DATA_DIR`, else
/// `$XDG_DATA_HOME/drover`, else `~/.local/share/drover`, else `./drover-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DROVER_DATA_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("drover");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/drover"),
        None => PathBuf::from("drover-data"),
    }
}
