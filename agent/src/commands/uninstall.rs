//! `drover-agent uninstall`: takes out what `drover-agent run` put into the
//! node beyond its data directory — the IMDS firewall rules. Run it after
//! the agent has stopped for good (a package's removal script, the VM
//! image's cleanup); while an agent runs it puts them back.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use drover_agent::firewall::ImdsFirewall;
use serde::Deserialize;

/// Arguments of `drover-agent uninstall`.
#[derive(Args)]
pub struct UninstallArgs {
    /// The agent's config file, for its `imds_url` and `iptables`.
    #[arg(long, env = "DROVER_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// The IMDS base URL the rules protect.
    #[arg(long, env = "DROVER_IMDS_URL")]
    imds_url: Option<String>,
    /// The `iptables` program (default: `iptables` on the PATH).
    #[arg(long, env = "DROVER_IPTABLES")]
    iptables: Option<PathBuf>,
}

/// The settings of the config file this command reads; the others are
/// `drover-agent run`'s.
#[derive(Default, Deserialize)]
struct FileConfig {
    imds_url: Option<String>,
    iptables: Option<PathBuf>,
}

/// Removes the IMDS firewall rules.
pub fn run(args: UninstallArgs) -> anyhow::Result<()> {
    let file: FileConfig = super::read_config(args.config.as_deref())?;
    let url = args
        .imds_url
        .or(file.imds_url)
        .unwrap_or_else(|| drover_imds::DEFAULT_BASE_URL.to_string());
    let iptables = args
        .iptables
        .or(file.iptables)
        .unwrap_or_else(|| PathBuf::from("iptables"));
    let fw = ImdsFirewall::for_url(&url, iptables)?;
    fw.remove().with_context(|| {
        format!(
            "removing the imds firewall rules for {}:{}",
            fw.address, fw.port
        )
    })?;
    tracing::info!(address = %fw.address, port = fw.port, "imds firewall rules removed");
    Ok(())
}
