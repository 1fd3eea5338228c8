//! `drover`: the user CLI (and, in later stages, the control-plane server).
//! A dispatcher only: parse arguments, set up tracing, run one command, turn
//! its error into an exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use drover_control::run::{RunConfig, run_job};
use drover_runner::PullLimits;

#[derive(Parser)]
#[command(
    name = "drover",
    version,
    about = "Drover: GPU compute clusters for ML jobs, self-hosted"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a single-node job (Azure ML command-job YAML) on this machine's Docker.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The job file (`az ml job create -f` format).
    job: PathBuf,
    /// Override the job's name.
    #[arg(long)]
    name: Option<String>,
    /// Path of the static drover-init binary (default: $DROVER_INIT, then next to drover).
    #[arg(long, env = "DROVER_INIT")]
    init: Option<PathBuf>,
    /// Folder for outputs without a path (default: <job dir>/outputs/<job name>).
    #[arg(long)]
    outputs: Option<PathBuf>,
    /// Comma-separated GPU UUIDs for jobs that set drover.gpus_per_instance.
    #[arg(long, value_delimiter = ',')]
    gpus: Vec<String>,
    /// Container network mode: host, a network name, or container:<id>.
    #[arg(long)]
    network: Option<String>,
    /// Longest a pull may take, in seconds.
    #[arg(long, default_value_t = 3600)]
    pull_timeout: u64,
    /// Longest a pull may go without progress, in seconds.
    #[arg(long, default_value_t = 300)]
    pull_stall_timeout: u64,
    /// Seconds between SIGTERM and SIGKILL when the job is stopped.
    #[arg(long, default_value_t = 10)]
    stop_grace: u64,
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,drover_runner=error")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let config = RunConfig {
        init_binary: args.init,
        outputs_root: args.outputs,
        gpu_uuids: args.gpus,
        network: args.network,
        name: args.name,
        pull_limits: PullLimits {
            total: Duration::from_secs(args.pull_timeout),
            no_progress: Duration::from_secs(args.pull_stall_timeout),
        },
        stop_grace: Duration::from_secs(args.stop_grace),
    };
    run_job(&args.job, config)
        .await
        .with_context(|| format!("drover run {}", args.job.display()))
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("drover: error: {e:#}");
            // 125, like `docker run`: the job never ran, so no code of its own applies.
            ExitCode::from(125)
        }
    }
}
