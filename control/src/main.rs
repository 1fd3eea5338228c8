//! `drover`: the user CLI and the control-plane server.
//! A dispatcher only: parse arguments, set up tracing, run one command, turn
//! its error into an exit code.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use drover_control::output::{self, CLOSED_PIPE_EXIT, OutputError};
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
    /// Run the control plane (HTTP API, scheduler, autoscaler).
    Server(commands::server::ServerArgs),
    /// Manage clusters (Azure ML compute).
    Compute(commands::compute::ComputeArgs),
    /// Datastores: named storage jobs read from and write to (`az ml datastore`).
    Datastore(commands::datastore::DatastoreArgs),
    /// Environments: registered, versioned images or Docker build contexts
    /// jobs run in (`az ml environment`).
    Environment(commands::environment::EnvironmentArgs),
    /// Submit and inspect jobs.
    Job(commands::job::JobArgs),
    /// Inspect nodes.
    Node(commands::node::NodeArgs),
    /// Start a local autoscaling cluster on this machine's Docker: builds
    /// the images it needs, starts the server in the background, creates
    /// the cluster `local`.
    Up(commands::up::UpArgs),
    /// Stop what `drover up` started and remove its containers and networks.
    Down(commands::up::DownArgs),
    /// Print a shell completion script, e.g. `drover completion bash >
    /// /etc/bash_completion.d/drover`, or `source <(drover completion zsh)`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
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

fn init_tracing(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal, and not under NO_COLOR: a log file
        // gets plain text.
        .with_ansi(output::escape_codes_allowed(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ))
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

/// `drover completion SHELL`: the script, written once it is whole.
fn completion(shell: clap_complete::Shell) -> anyhow::Result<i32> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "drover", &mut script);
    let script = String::from_utf8(script).context("the completion script is not utf-8")?;
    output::print(&script)?;
    Ok(0)
}

/// True when the command stopped because its standard output was closed.
fn stdout_closed(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| matches!(c.downcast_ref::<OutputError>(), Some(OutputError::Closed)))
}

/// A reader that closes the pipe (`drover … | head -1`) has read enough: a
/// `print!` that meets the closed pipe ends the command quietly with
/// [`CLOSED_PIPE_EXIT`] rather than with a panic message. The commands
/// write through [`output`], which says so without panicking; this covers
/// any `print!` that does not.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        let broken_pipe = std::io::Error::from(std::io::ErrorKind::BrokenPipe).to_string();
        if message.starts_with("failed printing to stdout")
            && (message.contains("os error 32") || message.contains(&broken_pipe))
        {
            std::process::exit(CLOSED_PIPE_EXIT);
        }
        default(info)
    }));
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    quiet_on_closed_stdout();
    // The server is a daemon: its info lines are its record. CLI commands
    // stay quiet unless something is wrong.
    init_tracing(match cli.command {
        Command::Server(_) => "info",
        _ => "warn,drover_runner=error",
    });
    let is_run = matches!(cli.command, Command::Run(_));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            output::note(format_args!("drover: cannot start the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Server(args) => commands::server::run(args).await,
            Command::Compute(args) => commands::compute::run(args).await,
            Command::Datastore(args) => commands::datastore::run(args).await,
            Command::Environment(args) => commands::environment::run(args).await,
            Command::Job(args) => commands::job::run(args).await,
            Command::Node(args) => commands::node::run(args).await,
            Command::Up(args) => commands::up::up(args).await,
            Command::Down(args) => commands::up::down(args).await,
            Command::Completion { shell } => completion(shell),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        // Not an error: the reader has what it wanted.
        Err(e) if stdout_closed(&e) => ExitCode::from(CLOSED_PIPE_EXIT as u8),
        Err(e) => {
            output::note(format_args!("drover: error: {e:#}"));
            // `drover run`: 125, like `docker run`: the job never ran, so no
            // code of its own applies. Other commands: 1.
            ExitCode::from(if is_run { 125 } else { 1 })
        }
    }
}
