//! Part supervision: one task per part the reconciler starts or adopts.
//!
//! Reads: the part's own `CancellationToken` (canceled by the reconciler),
//! its container through `PartRunner` (`run_new`: `PartRunner::run` and its
//! `PartEvent`s, mpsc 256; `run_adopted`: wait and follow the logs of a
//! container this session did not start), `HealthyGpus`. Writes: live
//! states to `Reports`, log lines and then one flush to the `log-shipper`
//! (mpsc 4096), and, once that flush is answered, `Input::Ended` to the
//! reconciler (mpsc 64).
//!
//! Before a new part's container starts its code and inputs are made
//! ready (`files::materialize`); after its container ends (a new part's or
//! an adopted one's, whose upload a restart cut) its outputs are uploaded
//! and posted (`files::upload`) before its end is reported.

use crate::environments::{
    EnvironmentContext, EnvironmentError, EnvironmentOutcome, prepare_environment,
};
use crate::images::collect::record_use;
use crate::images::ledger::ImageOrigin;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_api::host_paths::HostPathPolicy;
use drover_api::job::{DistributionKind, InvalidJob};
use drover_api::wire::{Assignment, LogCursor, NewLogLine, PartState};
use drover_runner::part::{PartEvent, PartOutcome, Placement, write_run_files};
use drover_runner::runtime::{ContainerRuntime, LogLine, LogStream};
use drover_runner::{PartRunner, init_output};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::logs::MAX_LINE_BYTES;
use super::state::{Ended, HealthyGpus, SharedReports, lock};
use super::{DaemonConfig, Input, Ship};
use crate::control_client::Backoff;
use crate::files::materialize::Materializer;
use crate::files::upload::upload_outputs;
use crate::files::{PartDir, Phase};
use crate::identity::IdentityService;
use crate::metrics::Metrics;
use drover_api::wire::PartKey;

/// How many times a part's outputs are tried before the part fails.
const UPLOAD_ATTEMPTS: u32 = 6;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(super) enum SupervisorKind {
    Start(Box<Assignment>),
    /// A container that exists already (running, or ended while the agent
    /// was down), and where the control plane's log of it ends.
    Adopt {
        container: String,
        /// Ship its lines after this cursor (all when `None`)…
        log_from: Option<LogCursor>,
        /// …or none, for a container the control plane has no part for.
        ship_logs: bool,
        /// The control plane's assignment of the part, when it has one:
        /// its cluster's identity, for the part's saved token secret.
        assignment: Option<Box<Assignment>>,
    },
}

/// The cursors of a container's lines, in the order the engine gives them:
/// a line's timestamp and its place among lines with the same timestamp.
///
/// The engine stamps stdout and stderr lines as two readers take them and
/// may store a line after one stamped later (microseconds apart: a rank's
/// stdout and stderr forwarded by drover-init one after the other). A line
/// is never placed before the one it follows: one stamped earlier than the
/// last takes the last's time and the next place, so cursors only grow in
/// the engine's order, and a line is never taken for one already stored.
#[derive(Debug, Default)]
pub(super) struct LogPositions {
    last: Option<LogCursor>,
}

impl LogPositions {
    /// The cursor of the next line, stamped `timestamp` (RFC 3339 with
    /// nanoseconds, as the engine writes it); `None` when it does not parse.
    pub(super) fn next(&mut self, timestamp: &str) -> Option<LogCursor> {
        let at_ns = parse_engine_time(timestamp)?;
        let c = match self.last {
            Some(l) if at_ns <= l.at_ns => LogCursor {
                at_ns: l.at_ns,
                index: l.index + 1,
            },
            _ => LogCursor { at_ns, index: 1 },
        };
        self.last = Some(c);
        Some(c)
    }
}

/// How far before the stored cursor an adopted container's log is read
/// again: more than the engine's stamps are ever out of order, so every
/// line that could follow the cursor is read, and read with the cursor it
/// had (the skipped lines give the same running order).
const ADOPT_LOG_MARGIN_SECS: i64 = 1;

/// An engine log timestamp (`2026-12-01T21:34:43.123456789Z`) in ns since the epoch.
fn parse_engine_time(timestamp: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(timestamp)
        .or_else(|_| humantime::parse_rfc3339_weak(timestamp.trim_end_matches('Z')))
        .ok()?;
    let d = t.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(d.as_nanos()).ok()
}

pub(super) struct PartCtx<R: ContainerRuntime> {
    pub(super) part: PartKey,
    pub(super) runner: Arc<PartRunner<R>>,
    pub(super) config: DaemonConfig,
    pub(super) reports: SharedReports,
    pub(super) ship: mpsc::Sender<Ship>,
    pub(super) input: mpsc::Sender<Input>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) gpus: HealthyGpus,
    pub(super) materializer: Materializer,
    pub(super) images: super::PartImages,
    pub(super) identity: Option<Arc<IdentityService>>,
    pub(super) registry_login: crate::registry_login::RegistryLogin,
    pub(super) fenced: Arc<AtomicBool>,
    pub(super) cancel: CancellationToken,
}

impl<R: ContainerRuntime> Clone for PartCtx<R> {
    fn clone(&self) -> Self {
        PartCtx {
            part: self.part.clone(),
            runner: self.runner.clone(),
            config: self.config.clone(),
            reports: self.reports.clone(),
            ship: self.ship.clone(),
            input: self.input.clone(),
            metrics: self.metrics.clone(),
            gpus: self.gpus.clone(),
            materializer: self.materializer.clone(),
            images: self.images.clone(),
            identity: self.identity.clone(),
            registry_login: self.registry_login.clone(),
            fenced: self.fenced.clone(),
            cancel: self.cancel.clone(),
        }
    }
}

impl<R: ContainerRuntime> PartCtx<R> {
    /// A line of the part's own output, at its place in the container's
    /// log, with the rank drover-init's marker names (the marker is not
    /// part of the text).
    fn container_line(&self, line: LogLine, positions: &mut LogPositions) -> NewLogLine {
        let cursor = positions.next(&line.timestamp);
        let (rank, text) = match init_output::split_marker(&line.text) {
            (Some(rank), text) => (Some(rank), text.to_string()),
            (None, _) => (None, line.text),
        };
        NewLogLine {
            cursor,
            rank,
            ..self.line(line.stream, text)
        }
    }

    /// A line the agent writes itself into the part's log.
    fn line(&self, stream: LogStream, mut text: String) -> NewLogLine {
        if text.len() > MAX_LINE_BYTES {
            // One runaway line must not make a batch the server refuses.
            let mut cut = MAX_LINE_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str(" [truncated]");
        }
        NewLogLine {
            job: self.part.job.clone(),
            attempt: self.part.attempt,
            node_rank: self.part.node_rank,
            stream,
            at: drover_api::cluster::Timestamp(now_ms()),
            text,
            cursor: None,
            rank: None,
        }
    }

    fn set_live(&self, state: PartState) {
        lock(&self.reports).set_live(self.part.clone(), state);
    }
}

/// One part's supervisor task: runs (or adopts) it, ships its logs, and
/// reports its end once its logs are uploaded.
pub(super) async fn supervise<R: ContainerRuntime>(ctx: PartCtx<R>, kind: SupervisorKind) {
    let (ended, upload) = match kind {
        SupervisorKind::Start(a) => (run_new(&ctx, &a).await, true),
        SupervisorKind::Adopt {
            container,
            log_from,
            ship_logs,
            assignment,
        } => {
            // The part's token secret from before the restart, held again
            // until its container ends.
            let _identity = readopt_identity(&ctx, assignment.as_deref());
            (
                run_adopted(&ctx, &container, ship_logs.then_some(log_from)).await,
                ship_logs,
            )
        }
    };
    // Outputs are posted before the final state (a part no longer
    // assigned here has no outputs to post).
    let ended = if upload {
        finish_outputs(&ctx, ended).await
    } else {
        ended
    };
    // Final state only after the logs before it are stored.
    let (tx, rx) = oneshot::channel();
    if ctx.ship.send(Ship::Flush(tx)).await.is_ok() {
        let _ = rx.await;
    }
    let _ = ctx.input.send(Input::Ended(ctx.part.clone(), ended)).await;
}

/// Registers again the token secret an adopted part saved when it
/// started, so that its requests are answered as before the restart.
fn readopt_identity<R: ContainerRuntime>(
    ctx: &PartCtx<R>,
    assignment: Option<&Assignment>,
) -> Option<crate::identity::PartIdentity> {
    let (service, a) = (ctx.identity.as_ref()?, assignment?);
    let saved = PartDir::new(&ctx.config.data_dir, &ctx.part).identity_secret()?;
    let Some(secret) = crate::identity::PartSecret::from_saved(&saved) else {
        tracing::warn!(part = %ctx.part, "the part's saved identity secret is unreadable; its token requests will be refused");
        return None;
    };
    let job = a.spec.as_command().and_then(|c| c.identity.as_ref());
    Some(service.adopt_part(&ctx.part, secret, &a.identity, job))
}

/// Uploads and posts the outputs of a part whose container ran, unless
/// they are posted already (before a restart) or the node is fenced (the
/// part is another node's by now). Transient failures are tried again with
/// backoff; a part whose outputs cannot be uploaded fails, saying which.
async fn finish_outputs<R: ContainerRuntime>(ctx: &PartCtx<R>, ended: Ended) -> Ended {
    let dir = PartDir::new(&ctx.config.data_dir, &ctx.part);
    let mut record = match dir.record() {
        Some(r) if needs_upload(ended.container.is_some(), Some(r.phase)) => r,
        _ => return ended,
    };
    record.phase = Phase::Uploading;
    if let Err(e) = dir.set_record(&record) {
        tracing::warn!(part = %ctx.part, error = %e, "recording the upload phase failed");
    }
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    for attempt in 1..=UPLOAD_ATTEMPTS {
        if ctx.fenced.load(Ordering::Relaxed) {
            tracing::warn!(part = %ctx.part, "self-fenced: the part's outputs are not uploaded");
            return ended;
        }
        match upload_outputs(&ctx.materializer.client, &ctx.part, &record).await {
            Ok(_) => {
                record.phase = Phase::Posted;
                if let Err(e) = dir.set_record(&record) {
                    tracing::warn!(part = %ctx.part, error = %e, "recording the posted phase failed");
                }
                return ended;
            }
            Err(e) if e.not_ours => {
                tracing::warn!(part = %ctx.part, error = %e, "the control plane does not take the part's outputs: it is no longer this node's");
                return ended;
            }
            Err(e) if e.transient && attempt < UPLOAD_ATTEMPTS => {
                let wait = backoff.next_delay();
                tracing::warn!(part = %ctx.part, error = %e, attempt, wait_ms = wait.as_millis() as u64, "uploading outputs failed; trying again");
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                let why = format!("the part's outputs could not be uploaded: {e}");
                let failed = refuse(ctx, why).await;
                return Ended {
                    state: failed.state,
                    exit_code: ended.exit_code,
                    container: ended.container,
                };
            }
        }
    }
    ended
}

/// Whether a part that ended uploads its outputs: only when a container
/// ran (it may have written some) and the part directory says they are not
/// posted yet. No record: the directory is gone (its end was acked) or was
/// never made by this agent.
fn needs_upload(container_ran: bool, phase: Option<Phase>) -> bool {
    container_ran && matches!(phase, Some(Phase::Running | Phase::Uploading))
}

/// `path` with every symbolic link resolved: its deepest existing ancestor
/// canonicalized, the rest appended (a path the part will create resolves
/// where it will be created).
fn real_path(path: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut existing = path;
    loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            return missing.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                existing = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Fails a part that cannot run (or could not run) on this node, telling
/// its log why.
async fn refuse<R: ContainerRuntime>(ctx: &PartCtx<R>, why: String) -> Ended {
    let text = format!("drover-agent: {why}");
    tracing::warn!(part = %ctx.part, error = %text, "part cannot run");
    let _ = ctx
        .ship
        .send(Ship::Line(ctx.line(LogStream::Stderr, text)))
        .await;
    Ended {
        state: PartState::Failed,
        exit_code: None,
        container: None,
    }
}

async fn run_new<R: ContainerRuntime>(ctx: &PartCtx<R>, a: &Assignment) -> Ended {
    let Some(job) = a.spec.as_command() else {
        let kind = a.spec.kind();
        return refuse(ctx, format!("this agent cannot run a {kind} job")).await;
    };
    // The control plane validated the job; the node checks again before
    // anything reaches its Docker engine (every door checks).
    if let Err(invalid) = a.spec.validate() {
        return refuse(ctx, format!("the job is not valid: {invalid}")).await;
    }
    // Host paths as this node resolves them: a link under an allowed
    // prefix must not lead to the Docker socket or the agent's credential.
    let policy = HostPathPolicy::new(&ctx.config.cluster, &a.allowed_host_paths)
        .refuse(&ctx.config.data_dir);
    let refused = policy.check_job_resolved(&a.spec, real_path);
    if !refused.is_empty() {
        let why = InvalidJob { errors: refused };
        return refuse(
            ctx,
            format!("the job binds host paths this node refuses: {why}"),
        )
        .await;
    }
    // The node runs one job at a time (the scheduler places only on idle
    // nodes with enough healthy GPUs), so the part takes the first healthy ones.
    let want = job.drover.gpus_per_instance as usize;
    let healthy = ctx.gpus.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if healthy.len() < want {
        let why = format!(
            "the part needs {want} healthy gpus but node {} has {}",
            ctx.config.node_id,
            healthy.len()
        );
        return refuse(ctx, why).await;
    }
    let gpu_uuids: Vec<String> = healthy.into_iter().take(want).collect();
    // Image collection keeps the part's image from here on.
    let _needed = ctx.images.needed.hold(&job.image);
    // Code and inputs before any container: one that cannot be fetched
    // fails the part, naming it.
    let dir = PartDir::new(&ctx.config.data_dir, &a.part);
    let mut pins = ctx.materializer.cache.pins();
    let files = tokio::select! {
        r = ctx.materializer.materialize(&a.part, job, &dir, &mut pins) => r,
        _ = ctx.cancel.cancelled() => {
            return Ended { state: PartState::Stopped, exit_code: None, container: None };
        }
    };
    let files = match files {
        Ok(f) => f,
        Err(e) => return refuse(ctx, e.to_string()).await,
    };
    // The environment's image before any container: found, pulled from
    // the control plane's registry, or built here; its output goes to the
    // part's log.
    let job_for_run;
    let job = if job.environment.as_ref().is_some_and(|e| e.build.is_some()) {
        let (log_tx, mut log_rx) = mpsc::unbounded_channel::<String>();
        let forward = {
            let ship = ctx.ship.clone();
            let lines = ctx.clone();
            tokio::spawn(async move {
                while let Some(text) = log_rx.recv().await {
                    let line = lines.line(LogStream::Stderr, format!("drover-agent: {text}"));
                    let _ = ship.send(Ship::Line(line)).await;
                }
            })
        };
        let env_ctx = EnvironmentContext {
            runtime: &ctx.runner.runtime,
            materializer: &ctx.materializer,
            registry: a.environment_registry.as_ref(),
            registry_login: &ctx.registry_login,
            identity: crate::identity::authorize::Grant::from(&a.identity).default_identity(),
            log: log_tx,
            cancel: &ctx.cancel,
        };
        let prepared = prepare_environment(&env_ctx, job, &ctx.metrics).await;
        drop(env_ctx);
        let _ = forward.await;
        match prepared {
            Ok(outcome) => {
                let brought = match outcome {
                    EnvironmentOutcome::Built => Some(ImageOrigin::Built),
                    EnvironmentOutcome::Pulled => Some(ImageOrigin::Pulled),
                    EnvironmentOutcome::Present | EnvironmentOutcome::NotNeeded => None,
                };
                record_use(&ctx.images.ledger, &job.image, brought);
            }
            Err(EnvironmentError::Canceled(_)) => {
                return Ended {
                    state: PartState::Stopped,
                    exit_code: None,
                    container: None,
                };
            }
            Err(e) => return refuse(ctx, e.to_string()).await,
        }
        // The image is this node's own now: never pulled by its name.
        let mut local = job.clone();
        local.drover.pull_policy = drover_api::job::PullPolicy::IfNotPresent;
        job_for_run = local;
        &job_for_run
    } else {
        job
    };
    // A multi-node part lives in the node's own network: its peers reach
    // it at the node address the control plane lists. One node alone keeps
    // the isolation the agent is configured with.
    let network_mode = if a.nodes.len() > 1 {
        Some(ctx.config.node_network.clone())
    } else {
        ctx.config.job_network.clone()
    };
    let placement = Placement::new(
        a.part.clone(),
        &ctx.config.node_id,
        ctx.config.init_binary.clone(),
        files,
    )
    .with_nodes(a.nodes.iter().map(|n| (n.id.as_str(), n.ip.as_deref())));
    let mut placement = match placement {
        Ok(p) => Placement {
            dedicated: ctx.config.dedicated,
            gpu_uuids,
            network_mode,
            ..p
        },
        Err(e) => return refuse(ctx, e.to_string()).await,
    };
    if job.drover.parallel_runtime {
        let dir = ctx.config.data_dir.join("runtime");
        match drover_runner::parallel::install(&dir) {
            Ok(driver) => placement.parallel_driver = Some(driver),
            Err(e) => {
                let why = format!(
                    "cannot write Drover's parallel runtime under {}: {e}",
                    dir.display()
                );
                return refuse(ctx, why).await;
            }
        }
    }
    if job
        .distribution
        .is_some_and(|d| d.kind == DistributionKind::Mpi)
    {
        let secret = a.launch_secret.as_ref().map(|s| s.0.as_str());
        if a.nodes.len() > 1 && secret.is_none() {
            return refuse(
                ctx,
                "the control plane sent no launch secret for this multi-node MPI job (is it older than this agent?)".to_string(),
            )
            .await;
        }
        let run = dir.run();
        if let Err(e) = write_run_files(&run, job, &placement, secret) {
            return refuse(ctx, format!("cannot write {}: {e}", run.display())).await;
        }
        placement.files.run_dir = Some(run);
    }
    // The part's secret on the token endpoint lives as long as this
    // function: until its container has ended.
    let _identity = match &ctx.identity {
        Some(service) => match service
            .start_part(
                &a.part,
                &a.identity,
                a.app_service_identity,
                job.identity.as_ref(),
            )
            .await
        {
            Ok(identity) => {
                placement
                    .extra_env
                    .extend(identity.env().iter().map(|(k, v)| (k.clone(), v.clone())));
                Some(identity)
            }
            Err(e) => {
                return refuse(ctx, drover_api::error::chain(&e)).await;
            }
        },
        None => None,
    };
    let (tx, mut rx) = mpsc::channel::<PartEvent>(256);
    let container = Arc::new(Mutex::new(None::<String>));
    let forward = {
        let container = container.clone();
        let ship = ctx.ship.clone();
        let reports = ctx.reports.clone();
        let part = ctx.part.clone();
        let metrics = ctx.metrics.clone();
        let lines = ctx.clone();
        tokio::spawn(async move {
            let mut pulling = false;
            let mut positions = LogPositions::default();
            while let Some(ev) = rx.recv().await {
                match ev {
                    PartEvent::Pull(_) if !pulling => {
                        pulling = true;
                        metrics.pulls.inc();
                    }
                    PartEvent::Pull(_) => {}
                    PartEvent::Created { id } => {
                        *container.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
                    }
                    PartEvent::Started { .. } => {
                        lock(&reports).set_live(part.clone(), PartState::Running);
                    }
                    PartEvent::Log(l) => {
                        let line = lines.container_line(l, &mut positions);
                        let _ = ship.send(Ship::Line(line)).await;
                    }
                    PartEvent::Stopping { .. } => {}
                }
            }
            pulling
        })
    };
    let outcome = ctx
        .runner
        .run(job, &placement, tx, ctx.cancel.clone())
        .await;
    let pulled = forward.await.unwrap_or(false);
    record_use(
        &ctx.images.ledger,
        &job.image,
        pulled.then_some(ImageOrigin::Pulled),
    );
    // A part's end may leave an image unneeded: collection looks again.
    ctx.images.wake.notify_one();
    let container = container.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (state, exit_code) = match outcome {
        Ok(PartOutcome::Completed) => (PartState::Succeeded, Some(0)),
        Ok(PartOutcome::Failed { exit_code } | PartOutcome::OomKilled { exit_code }) => {
            (PartState::Failed, Some(exit_code))
        }
        Ok(PartOutcome::TimedOut) => (PartState::Failed, Some(124)),
        Ok(PartOutcome::Canceled) => {
            // The stopped container's own code (143 after SIGTERM, 137 after
            // SIGKILL), when it got as far as a container.
            let code = match &container {
                Some(id) => {
                    tokio::time::timeout(Duration::from_secs(5), ctx.runner.runtime.wait(id))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .map(|s| s.code)
                }
                None => None,
            };
            (PartState::Stopped, code)
        }
        Err(e) => {
            let why = format!("running the part failed: {}", drover_api::error::chain(&e));
            let ended = refuse(ctx, why).await;
            (ended.state, ended.exit_code)
        }
    };
    Ended {
        state,
        exit_code,
        container,
    }
}

/// Supervises a container this agent did not start in this session: ships
/// its output from where the control plane's log of it ends (`log_from`;
/// from its start when `None`), so that lines written while no agent
/// watched reach the log and none is sent twice, and waits for it
/// (stopping it when canceled). A container that has already exited is
/// shipped to its last line and reported with its exit code.
async fn run_adopted<R: ContainerRuntime>(
    ctx: &PartCtx<R>,
    id: &str,
    ship: Option<Option<LogCursor>>,
) -> Ended {
    let runtime = ctx.runner.runtime.clone();
    let logs = ship.map(|log_from| {
        // The engine filters by whole seconds; the cursor skips the rest.
        let since = log_from.map_or(0, |c| {
            i64::try_from(c.at_ns / 1_000_000_000)
                .unwrap_or(0)
                .saturating_sub(ADOPT_LOG_MARGIN_SECS)
                .max(0)
        });
        let mut stream = runtime.logs(id, since);
        let ship = ctx.ship.clone();
        let mk = ctx.clone();
        tokio::spawn(async move {
            let mut positions = LogPositions::default();
            while let Some(Ok(line)) = stream.next().await {
                let l = mk.container_line(line, &mut positions);
                if let (Some(from), Some(at)) = (log_from, l.cursor)
                    && at <= from
                {
                    continue;
                }
                let _ = ship.send(Ship::Line(l)).await;
            }
        })
    });
    ctx.set_live(PartState::Running);
    let mut stopped = false;
    let status = tokio::select! {
        s = runtime.wait(id) => s,
        _ = ctx.cancel.cancelled() => {
            stopped = true;
            if let Err(e) = runtime.stop(id, ctx.config.stop_grace).await {
                tracing::warn!(part = %ctx.part, error = %e, "stopping container failed");
            }
            // Bounded: a container that never started never exits.
            match tokio::time::timeout(ctx.config.stop_grace + Duration::from_secs(10), runtime.wait(id)).await {
                Ok(r) => r,
                Err(_) => Ok(drover_runner::runtime::ExitStatus { code: 137, oom_killed: false }),
            }
        }
    };
    if let Some(logs) = logs {
        let _ = tokio::time::timeout(Duration::from_secs(5), logs).await;
    }
    let (state, exit_code) = match status {
        Ok(s) if stopped => (PartState::Stopped, Some(s.code)),
        Ok(s) if s.code == 0 => (PartState::Succeeded, Some(0)),
        Ok(s) => (PartState::Failed, Some(s.code)),
        Err(e) => {
            tracing::warn!(part = %ctx.part, error = %e, "waiting for adopted container failed");
            (PartState::Failed, None)
        }
    };
    Ended {
        state,
        exit_code,
        container: Some(id.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursors(stamps: &[&str]) -> Vec<(u64, u32)> {
        let mut p = LogPositions::default();
        stamps
            .iter()
            .map(|t| {
                p.next(t)
                    .map(|c| (c.at_ns % 1_000_000_000, c.index))
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn only_a_part_whose_container_ran_and_whose_outputs_are_not_posted_uploads() {
        assert!(needs_upload(true, Some(Phase::Running)));
        assert!(
            needs_upload(true, Some(Phase::Uploading)),
            "a restart resumes"
        );
        assert!(!needs_upload(true, Some(Phase::Posted)), "never twice");
        assert!(!needs_upload(true, Some(Phase::Materializing)));
        assert!(!needs_upload(true, None), "no part directory");
        assert!(
            !needs_upload(false, Some(Phase::Running)),
            "no container ran"
        );
    }

    #[test]
    fn lines_of_one_time_get_places_in_order() {
        assert_eq!(
            cursors(&[
                "2026-12-01T21:34:43.000000100Z",
                "2026-12-01T21:34:43.000000100Z",
                "2026-12-01T21:34:43.000000200Z",
            ]),
            [(100, 1), (100, 2), (200, 1)]
        );
    }

    #[test]
    fn a_line_stamped_before_the_one_it_follows_still_comes_after_it() {
        // What the engine does with a stderr line read a moment before a
        // stdout line but stored after it.
        let got = cursors(&[
            "2026-12-01T21:34:43.433318646Z",
            "2026-12-01T21:34:43.432992115Z",
            "2026-12-01T21:34:43.433318646Z",
            "2026-12-01T21:34:43.5Z",
        ]);
        assert_eq!(
            got,
            [
                (433_318_646, 1),
                (433_318_646, 2),
                (433_318_646, 3),
                (500_000_000, 1)
            ]
        );
        assert!(got.windows(2).all(|w| w[0] < w[1]), "cursors only grow");
    }

    #[test]
    fn reading_again_from_a_second_earlier_gives_the_same_cursors() {
        let all = [
            "2026-12-01T21:34:41.9Z",
            "2026-12-01T21:34:42.5Z",
            "2026-12-01T21:34:42.4Z",
            "2026-12-01T21:34:43.1Z",
        ];
        let full = cursors(&all);
        // Read again from 21:34:42 (a cursor at 43.1 minus the margin).
        let again = cursors(&all[1..]);
        assert_eq!(full[1..], again[..]);
    }
}
