//! `drover-agent`: the node daemon's command line. A dispatcher only: parse
//! arguments, set up tracing, run one command, turn its error into an exit code.

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "drover-agent", version, about = "Drover node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print this node's inventory: host resources and GPUs with health.
    Inventory(commands::inventory::InventoryArgs),
    /// Run the node daemon: join the cluster, heartbeat, run assigned job parts.
    Run(Box<commands::run::RunArgs>),
    /// Pull images, or pull or build registered environments, ahead of
    /// any job (while a VM image is baked), and pin them so image
    /// collection keeps them.
    Prepull(commands::prepull::PrepullArgs),
    /// Remove what `run` installed on the node beyond its data directory
    /// (the IMDS firewall rules); run it once the agent is stopped for good.
    Uninstall(commands::uninstall::UninstallArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Inventory(args) => commands::inventory::run(args),
        Command::Run(args) => commands::run::run(*args),
        Command::Uninstall(args) => commands::uninstall::run(args),
        Command::Prepull(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(commands::prepull::run(args)),
    }
}
