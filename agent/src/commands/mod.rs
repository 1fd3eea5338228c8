//! One module per `drover-agent` subcommand; `main` only dispatches here.

use std::path::Path;

use anyhow::Context as _;
use serde::de::DeserializeOwned;

pub mod inventory;
pub mod prepull;
pub mod run;
pub mod uninstall;

/// The settings `T` of the agent's config file (`--config agent.toml`),
/// or `T`'s defaults when no file is given.
pub fn read_config<T: DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    let Some(p) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("reading agent config {}", p.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing agent config {}", p.display()))
}
