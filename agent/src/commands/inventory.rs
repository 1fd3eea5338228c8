//! `drover-agent inventory`: print what this node has.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use drover_agent::inventory::{DEFAULT_NVML_LIB, InventoryCollector, InventoryConfig, table};

/// Arguments of `drover-agent inventory`.
#[derive(Debug, Args)]
pub struct InventoryArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// NVML library to load: a file name looked up like `dlopen` does, or a path.
    #[arg(long, value_name = "PATH", env = "DROVER_NVML_LIB", default_value = DEFAULT_NVML_LIB)]
    pub nvml_lib: PathBuf,
}

/// Collects the inventory once and prints it to stdout.
pub fn run(args: InventoryArgs) -> anyhow::Result<()> {
    let config = InventoryConfig {
        nvml_lib: args.nvml_lib,
        // One-shot: no events can arrive while we read, so no watcher thread.
        watch_events: false,
        ..InventoryConfig::default()
    };
    let inventory = InventoryCollector::open(&config).refresh();
    let text = if args.json {
        let mut s =
            serde_json::to_string_pretty(&inventory).context("serializing the inventory")?;
        s.push('\n');
        s
    } else {
        table::render(&inventory)
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("writing the inventory to stdout")
}
