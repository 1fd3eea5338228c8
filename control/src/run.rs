//! `drover run job.yml`: one single-node job on this machine's Docker, with no
//! control plane. Shows pull progress, streams the job's output (each line of
//! a job with several processes prefixed `[node 0 rank R]`), and ends with
//! the job's exit code; Ctrl-C (or SIGTERM) stops and removes the container,
//! and so does closing its output (`drover run job.yml | head -1`), which
//! ends with [`CLOSED_PIPE_EXIT`].

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use drover_api::ParsedJob;
use drover_api::files::MAX_CODE_BYTES;
use drover_api::job::{Code, CommandJob, DistributionKind, Input, JobSpec};
use drover_api::wire::{LogStream, PartKey};
use drover_files::snapshot::{IgnoreRules, Scan, SnapshotError};
use drover_files::unpack_atomic;
use drover_runner::init_output::split_marker;
use drover_runner::part::{PartEvent, PartFiles, StopReason, write_run_files};
use drover_runner::runtime::{LogLine, PullProgress};
use drover_runner::{
    DockerRuntime, HostFacts, PartOutcome, PartRunner, Placement, PullLimits, RunOptions,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::output::{self, CLOSED_PIPE_EXIT, escape_codes_allowed, line_prefix, note};

/// Settings of `drover run` beyond the job file.
#[derive(Debug, Clone, Default)]
pub struct RunConfig {
    /// Path of the static drover-init binary; searched for when `None`.
    pub init_binary: Option<PathBuf>,
    /// Where outputs without a `path` are kept; `<job dir>/outputs/<job>` when `None`.
    pub outputs_root: Option<PathBuf>,
    /// GPU UUIDs to give the job (needed when it asks for GPUs).
    pub gpu_uuids: Vec<String>,
    /// Network mode for the container (`host`, a network, `container:<id>`).
    pub network: Option<String>,
    /// Override the job's name.
    pub name: Option<String>,
    /// Pull limits.
    pub pull_limits: PullLimits,
    /// Grace between SIGTERM and SIGKILL when stopping.
    pub stop_grace: Duration,
}

/// Errors of `drover run` before the job has an outcome.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The job file could not be read.
    #[error("cannot read {path}")]
    ReadJob {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The job file is not valid.
    #[error(transparent)]
    InvalidJob(#[from] drover_api::InvalidDefinition),
    /// The job cannot run on one machine as written.
    #[error("{0}")]
    Unsupported(String),
    /// drover-init was not found.
    #[error(
        "no statically linked drover-init found (looked in {looked}); build it with `make init` or pass --init PATH"
    )]
    InitNotFound {
        /// Places searched.
        looked: String,
    },
    /// Docker is not reachable.
    #[error(transparent)]
    Docker(#[from] drover_runner::runtime::RuntimeError),
    /// The part failed before it had an outcome.
    #[error(transparent)]
    Part(#[from] drover_runner::part::PartError),
    /// Drover's parallel runtime could not be written for the job.
    #[error("cannot write Drover's parallel runtime under {dir}")]
    ParallelRuntime {
        /// Where.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Finds a statically linked drover-init: `$DROVER_INIT` when set (used or
/// refused, never silently replaced), else the static build of a source
/// checkout, next to this executable, or `/usr/local/lib/drover` (see
/// [`drover_runner::init_binary::find`]).
pub fn find_init_binary() -> Result<PathBuf, RunError> {
    let named = std::env::var_os("DROVER_INIT").map(PathBuf::from);
    drover_runner::init_binary::find(named.as_deref())
        .map_err(|e| RunError::InitNotFound { looked: e.looked })
}

/// A default job name: the file's stem plus the time, like Azure ML's generated names.
fn default_name(path: &Path) -> String {
    let stem: String = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "job".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let stem = stem.trim_matches('-');
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!(
        "{}-{:x}{:x}",
        if stem.is_empty() { "job" } else { stem },
        secs,
        std::process::id() & 0xfff
    )
}

/// Builds a job's inline `environment.build` with this machine's Docker
/// (as a node would, under the same content name) and points the job at
/// it. A registered environment needs a control plane to resolve it.
async fn build_inline_environment(
    job: &mut CommandJob,
    runtime: &DockerRuntime,
    run_dir: &Path,
    file: &Path,
) -> Result<(), RunError> {
    use drover_runner::ContainerRuntime as _;
    let Some(env) = &job.environment else {
        return Ok(());
    };
    if env.name.is_some() {
        return Err(RunError::Unsupported(format!(
            "{}: environment: {} is a registered environment, which needs a control plane to resolve; `drover run` takes environment.image or environment.build — or submit the job to a cluster",
            file.display(),
            env.describe()
        )));
    }
    let Some(build) = env.build.clone() else {
        return Ok(());
    };
    let Code::Local(dir) = &build.context else {
        return Ok(());
    };
    let at = format!("{}: environment.build.path", file.display());
    let scan = Scan::of(dir, IgnoreRules::None)
        .map_err(|e| RunError::Unsupported(format!("{at}: {}", drover_api::error::chain(&e))))?;
    std::fs::create_dir_all(run_dir)
        .map_err(|e| RunError::Unsupported(format!("cannot create {}: {e}", run_dir.display())))?;
    let tar = run_dir.join("build-context.tar");
    let blob = scan
        .write_to_file(&tar)
        .map_err(|e| RunError::Unsupported(format!("{at}: {}", drover_api::error::chain(&e))))?;
    let uploaded = drover_api::environment::ImageBuild {
        context: Code::Snapshot(blob),
        dockerfile_path: build.dockerfile_path.clone(),
    };
    let image =
        drover_api::environment::build_image_name(None, None, &uploaded).unwrap_or_default();
    let digest = blob.digest.hex();
    let present = runtime
        .image_label(&image, drover_api::environment::CONTEXT_LABEL)
        .await?
        .flatten();
    if present.as_deref() != Some(digest.as_str()) {
        note(format_args!(
            "drover: building environment {image} from {}",
            dir.display()
        ));
        let request = drover_runner::runtime::ImageBuildRequest {
            tag: image.clone(),
            context_tar: tar.clone(),
            dockerfile: build.dockerfile_path.clone(),
            labels: [(drover_api::environment::CONTEXT_LABEL.to_string(), digest)].into(),
        };
        let mut progress = |line: &str| note(format_args!("  {line}"));
        runtime
            .build_image_from(&request, &mut progress)
            .await
            .map_err(|e| RunError::Unsupported(format!("{at}: building {image} failed: {e}")))?;
    }
    let _ = std::fs::remove_file(&tar);
    job.image = image;
    Ok(())
}

/// Reads and validates a job file, printing its warnings to stderr.
pub fn load_job(path: &Path) -> Result<ParsedJob, RunError> {
    let text = std::fs::read_to_string(path).map_err(|source| RunError::ReadJob {
        path: path.to_path_buf(),
        source,
    })?;
    let base = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."));
    let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
    let parsed = JobSpec::from_yaml(&path.display().to_string(), &text, &base)?;
    for w in &parsed.warnings {
        tracing::warn!("{w}");
    }
    Ok(parsed)
}

/// Where a key of the job file is, for messages (`job.yml:3: code`).
fn at(file: &Path, lines: &BTreeMap<String, usize>, key: &str) -> String {
    match lines.get(key) {
        Some(&line) if line > 0 => format!("{}:{line}: {key}", file.display()),
        _ => format!("{}: {key}", file.display()),
    }
}

/// The part's working directory under the run's folder: a copy of its code
/// made as a cluster node makes it (`.amlignore`d files left out, the same
/// size limit), with `outputs/` and `logs/` in it, so that a job that runs
/// here runs unchanged on a cluster.
fn prepare_work_dir(
    job: &CommandJob,
    run_dir: &Path,
    file: &Path,
    lines: &BTreeMap<String, usize>,
) -> Result<PathBuf, RunError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        RunError::Unsupported(format!("cannot {what} {}: {e}", p.display()))
    };
    let work = run_dir.join(WORK_DIR);
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| io("remove", &work, e))?;
    }
    match &job.code {
        Some(Code::Local(dir)) => {
            let code_at = at(file, lines, "code");
            let scan = Scan::of(dir, IgnoreRules::AmlOrGit).map_err(|e| match e {
                SnapshotError::Missing(p) => RunError::Unsupported(format!(
                    "{code_at}: code folder {} does not exist",
                    p.display()
                )),
                other => RunError::Unsupported(format!(
                    "{code_at}: {}",
                    drover_api::error::chain(&other)
                )),
            })?;
            if scan.bytes > MAX_CODE_BYTES {
                return Err(RunError::Unsupported(
                    scan.over_limit_message(&code_at, MAX_CODE_BYTES),
                ));
            }
            std::fs::create_dir_all(run_dir).map_err(|e| io("create", run_dir, e))?;
            let tar = run_dir.join(format!("{WORK_DIR}.tar"));
            let copied = scan
                .write_to_file(&tar)
                .map_err(|e| {
                    RunError::Unsupported(format!("{code_at}: {}", drover_api::error::chain(&e)))
                })
                .and_then(|_| {
                    let f = std::fs::File::open(&tar).map_err(|e| io("read", &tar, e))?;
                    unpack_atomic(std::io::BufReader::new(f), &work)
                        .map_err(|e| RunError::Unsupported(drover_api::error::chain(&e)))
                });
            let _ = std::fs::remove_file(&tar);
            copied?;
        }
        Some(Code::Snapshot(_)) => {
            return Err(RunError::Unsupported(format!(
                "{}: an uploaded snapshot is a cluster's; drover run takes a local folder",
                at(file, lines, "code")
            )));
        }
        None => std::fs::create_dir_all(&work).map_err(|e| io("create", &work, e))?,
    }
    for sub in ["outputs", "logs"] {
        let d = work.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| io("create", &d, e))?;
    }
    Ok(work)
}

/// The part's working directory, under the run's folder, while it runs.
const WORK_DIR: &str = ".work";
/// The run folder (an MPI job's hostfile) under the run's folder.
const RUN_DIR: &str = ".run";

/// Moves the working directory's `outputs/` and `logs/` to the run's
/// `artifacts/` (where `drover job download` puts a cluster job's) and
/// removes the rest.
fn keep_artifacts(work: &Path, run_dir: &Path) -> std::io::Result<PathBuf> {
    let artifacts = run_dir.join("artifacts");
    std::fs::create_dir_all(&artifacts)?;
    for sub in ["outputs", "logs"] {
        let from = work.join(sub);
        let to = artifacts.join(sub);
        if from.is_dir() {
            if to.exists() {
                std::fs::remove_dir_all(&to)?;
            }
            std::fs::rename(&from, &to)?;
        }
    }
    std::fs::remove_dir_all(work)?;
    Ok(artifacts)
}

/// Refuses inputs `drover run` cannot fetch; outputs bound for a datastore
/// are kept on this machine, with a note.
fn check_local(
    job: &CommandJob,
    file: &Path,
    lines: &BTreeMap<String, usize>,
) -> Result<(), RunError> {
    for (name, input) in &job.inputs {
        let key = format!("inputs.{name}.path");
        let why = match input {
            Input::Url { url, .. } => format!(
                "`{url}`: drover run does not download inputs; download it and give its local path, or submit the job to a cluster (its nodes download it)"
            ),
            Input::Datastore { at: d, .. } => format!(
                "`{d}`: datastores are a control plane's; give a local path, or submit the job to a cluster"
            ),
            Input::Blob { .. } => "an uploaded input is a cluster's; give a local path".to_string(),
            Input::Literal { .. } | Input::Path { .. } => continue,
        };
        return Err(RunError::Unsupported(format!(
            "{}: {why}",
            at(file, lines, &key)
        )));
    }
    for (name, output) in &job.outputs {
        if let Some(d) = &output.datastore {
            note(format_args!(
                "drover: output {name} goes to {d} on a cluster; drover run keeps it on this machine"
            ));
        }
    }
    Ok(())
}

/// Renders pull progress: one bar per layer on a terminal, a few lines
/// otherwise (and under `NO_COLOR`: no escape codes at all).
struct PullView {
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
    terminal: bool,
}

impl PullView {
    fn new() -> Self {
        let terminal = escape_codes_allowed(std::io::stderr().is_terminal());
        let target = if terminal {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        PullView {
            multi: MultiProgress::with_draw_target(target),
            bars: HashMap::new(),
            terminal,
        }
    }

    fn update(&mut self, p: &PullProgress) {
        if p.layer.is_empty() || p.status.starts_with("Pulling from") {
            self.line(&format!("pull {}: {} {}", p.image, p.status, p.layer));
            return;
        }
        let done = matches!(
            p.status.as_str(),
            "Pull complete" | "Already exists" | "Download complete"
        );
        if !self.terminal {
            if done && p.status != "Download complete" {
                self.line(&format!(
                    "pull {}: layer {} {}",
                    p.image,
                    p.layer,
                    p.status.to_lowercase()
                ));
            }
            return;
        }
        let bar = self.bars.entry(p.layer.clone()).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(p.total.unwrap_or(0)));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:.dim} {msg:<18} {bar:30} {bytes}/{total_bytes}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix(p.layer.clone());
            bar
        });
        if let Some(total) = p.total {
            bar.set_length(total);
        }
        if let Some(current) = p.current {
            bar.set_position(current);
        }
        bar.set_message(p.status.clone());
        if p.status == "Pull complete" || p.status == "Already exists" {
            bar.finish();
        }
    }

    fn line(&self, text: &str) {
        if self.terminal {
            let _ = self.multi.println(text);
        } else {
            note(text);
        }
    }

    fn clear(&mut self) {
        for (_, b) in self.bars.drain() {
            b.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}

/// Writes the job's output where `drover run` shows it: stdout and stderr,
/// each line of a multi-process job with the prefix of its rank.
struct JobOutput {
    /// The job runs more than one process: lines say which wrote them.
    multi: bool,
    stdout: std::io::Stdout,
    stderr: std::io::Stderr,
    /// Someone closed our stdout or stderr: the job is being stopped, and
    /// nothing more is written.
    closed: bool,
}

impl JobOutput {
    /// Writes one line of the job's; false when the output is closed.
    fn line(&mut self, line: &LogLine) -> bool {
        if self.closed {
            return false;
        }
        let (rank, text) = split_marker(&line.text);
        let prefix = line_prefix(self.multi, 0, rank);
        let written = match line.stream {
            LogStream::Stdout => writeln!(self.stdout, "{prefix}{text}"),
            LogStream::Stderr => writeln!(self.stderr, "{prefix}{text}"),
        };
        if let Err(e) = written
            && matches!(output::OutputError::from_io(e), output::OutputError::Closed)
        {
            self.closed = true;
        }
        !self.closed
    }
}

/// Runs the job in `path` and returns the exit code `drover run` should end with.
pub async fn run_job(path: &Path, config: RunConfig) -> Result<i32, RunError> {
    let parsed = load_job(path)?;
    let lines = parsed.lines;
    let spec = parsed.spec;
    let kind = spec.kind();
    let Some(mut job) = spec.into_command() else {
        return Err(RunError::Unsupported(format!(
            "{}: `drover run` runs command jobs; submit a {kind} job to a cluster",
            path.display()
        )));
    };
    if job.resources.instance_count > 1 {
        return Err(RunError::Unsupported(format!(
            "{}: resources.instance_count is {}; `drover run` runs single-node jobs — submit multi-node jobs to a cluster",
            path.display(),
            job.resources.instance_count
        )));
    }
    if job.drover.gpus_per_instance as usize != config.gpu_uuids.len() {
        return Err(RunError::Unsupported(format!(
            "the job asks for {} GPU(s) (drover.gpus_per_instance) but {} were given with --gpus",
            job.drover.gpus_per_instance,
            config.gpu_uuids.len()
        )));
    }
    let name = config
        .name
        .clone()
        .or_else(|| job.name.clone())
        .unwrap_or_else(|| default_name(path));
    if !drover_api::job::is_valid_name(&name) {
        return Err(RunError::Unsupported(format!(
            "--name: `{name}` is not a valid job name (letters, digits, `-` and `_`, starting with a letter or digit)"
        )));
    }
    job.name = Some(name.clone());
    let init_binary = match config.init_binary {
        Some(p) => p,
        None => find_init_binary()?,
    };
    let outputs_root = config.outputs_root.clone().unwrap_or_else(|| {
        path.parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
            .join("outputs")
            .join(&name)
    });
    let outputs_root = if outputs_root.is_absolute() {
        outputs_root
    } else {
        std::env::current_dir()
            .unwrap_or_default()
            .join(outputs_root)
    };

    check_local(&job, path, &lines)?;
    let work = prepare_work_dir(&job, &outputs_root, path, &lines)?;
    let runtime = Arc::new(DockerRuntime::connect().await?);
    build_inline_environment(&mut job, &runtime, &outputs_root, path).await?;
    let mut placement = Placement {
        gpu_uuids: config.gpu_uuids.clone(),
        network_mode: config.network.clone(),
        ..Placement::new(
            PartKey::new(&name, 1, 0),
            "run",
            init_binary,
            PartFiles::local(&job, Some(work.clone()), &outputs_root),
        )
    };
    if job.drover.parallel_runtime {
        let dir = std::env::temp_dir().join("drover-runtime");
        let driver =
            drover_runner::parallel::install(&dir).map_err(|source| RunError::ParallelRuntime {
                dir: dir.clone(),
                source,
            })?;
        placement.parallel_driver = Some(driver);
    }
    if job
        .distribution
        .is_some_and(|d| d.kind == DistributionKind::Mpi)
    {
        // One node: mpirun needs its hostfile (N slots here), no launch secret.
        let run = outputs_root.join(RUN_DIR);
        write_run_files(&run, &job, &placement, None)
            .map_err(|e| RunError::Unsupported(format!("cannot write {}: {e}", run.display())))?;
        placement.files.run_dir = Some(run);
    }
    let host = HostFacts::probe();
    if host.memlock_max >= 0 {
        tracing::info!(
            memlock_max = host.memlock_max,
            "this host cannot grant an unlimited memlock limit (no CAP_SYS_RESOURCE); job containers get its hard limit"
        );
    }
    let runner = PartRunner::new(
        runtime,
        config.pull_limits,
        RunOptions {
            stop_grace: config.stop_grace,
            remove: true,
        },
        host,
    );

    let cancel = CancellationToken::new();
    let signals = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let term_recv = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term_recv => {}
            }
            cancel.cancel();
        })
    };

    let (tx, mut rx) = mpsc::channel::<PartEvent>(1024);
    let mut out = JobOutput {
        multi: job.processes_started_per_instance() > 1,
        stdout: std::io::stdout(),
        stderr: std::io::stderr(),
        closed: false,
    };
    let printer = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut view = PullView::new();
            // Every event is taken, written or not: the part never waits on us.
            while let Some(ev) = rx.recv().await {
                match ev {
                    PartEvent::Pull(p) => view.update(&p),
                    PartEvent::Created { .. } => view.clear(),
                    PartEvent::Started { .. } => {}
                    PartEvent::Log(line) => {
                        if !out.line(&line) && !cancel.is_cancelled() {
                            // Nobody reads the job's output: stop it, as
                            // Ctrl-C would, and leave no container behind.
                            cancel.cancel();
                        }
                    }
                    PartEvent::Stopping { reason } => {
                        let why = match reason {
                            StopReason::Timeout => "limits.timeout reached",
                            StopReason::Canceled if out.closed => "its output was closed",
                            StopReason::Canceled => "interrupted",
                        };
                        note(format_args!("drover: stopping the job ({why})"));
                    }
                }
            }
            let _ = out.stdout.flush();
            out.closed
        })
    };

    let result = runner.run(&job, &placement, tx, cancel).await;
    signals.abort();
    let closed = printer.await.unwrap_or(false);
    let outcome = result?;
    match outcome {
        PartOutcome::Completed => note(format_args!("drover: job {name} completed")),
        PartOutcome::Failed { exit_code } => note(format_args!(
            "drover: job {name} failed with exit code {exit_code}"
        )),
        PartOutcome::OomKilled { exit_code } => note(format_args!(
            "drover: job {name} was killed for running out of memory (exit code {exit_code}); raise --memory in resources.docker_args"
        )),
        PartOutcome::TimedOut => note(format_args!(
            "drover: job {name} timed out after {}s (limits.timeout) and was stopped",
            job.timeout_seconds.unwrap_or(0)
        )),
        PartOutcome::Canceled => note(format_args!(
            "drover: job {name} canceled; its container was removed"
        )),
    }
    match keep_artifacts(&work, &outputs_root) {
        Ok(dir) => note(format_args!(
            "drover: artifacts (./outputs and ./logs): {}",
            dir.display()
        )),
        Err(e) => note(format_args!(
            "drover: cannot keep ./outputs and ./logs of {}: {e}",
            work.display()
        )),
    }
    if !job.outputs.is_empty() {
        for out in job.outputs.keys() {
            note(format_args!(
                "drover: output {out}: {}",
                placement
                    .files
                    .outputs
                    .get(out)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ));
        }
    }
    // Like a process that SIGPIPE ended, whatever the job itself did after.
    if closed && outcome == PartOutcome::Canceled {
        return Ok(CLOSED_PIPE_EXIT);
    }
    Ok(outcome.exit_code())
}
