//! The `reconciler` task: the one owner of what this agent supervises.
//!
//! Reads: `Input`s (mpsc 64) from `watch` (desired state), `heartbeat`
//! (acked and rejected parts), `maintenance` and the part supervisors
//! (ended parts); Docker's labelled containers every `RESYNC`; the
//! `shutdown` token. Writes: the supervisors it spawns (one
//! `CancellationToken` each), ended parts to `Reports`, the drain flags, and
//! beat-now requests to `heartbeat` (mpsc 4) during the drain.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_api::wire::{Assignment, LogStream, NewLogLine, PartState};
use drover_runner::PartRunner;
use drover_runner::runtime::{ContainerRuntime, ContainerState};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::maintenance::Drain;
use super::state::{Ended, HealthyGpus, SharedReports, lock};
use super::supervisor::{PartCtx, SupervisorKind, supervise};
use super::{DaemonConfig, Input, Ship};
use crate::files::materialize::Materializer;
use crate::files::{PartDir, remove_stale_part_dirs};
use crate::metrics::Metrics;
use crate::reconcile::{Action, Known, reconcile};
use drover_api::wire::PartKey;

pub(super) struct Supervisor {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// The `reconciler` task: owns what this agent supervises and acts on
/// [`reconcile`]'s decisions.
pub(super) struct Reconciler<R: ContainerRuntime> {
    pub(super) config: DaemonConfig,
    pub(super) runner: Arc<PartRunner<R>>,
    pub(super) reports: SharedReports,
    pub(super) draining: Arc<AtomicBool>,
    pub(super) preempted: Arc<AtomicBool>,
    pub(super) input: mpsc::Sender<Input>,
    pub(super) ship: mpsc::Sender<Ship>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) gpus: HealthyGpus,
    /// Fetches parts' code and inputs, and their outputs' control plane.
    pub(super) materializer: Materializer,
    /// The image ledger and what parts need.
    pub(super) images: super::PartImages,
    /// The token endpoint, when it listens: new parts get a secret there.
    pub(super) identity: Option<Arc<crate::identity::IdentityService>>,
    /// Registry logins with the cluster's managed identity.
    pub(super) registry_login: crate::registry_login::RegistryLogin,
    /// Cut off past the grace: parts that end now do not upload.
    pub(super) fenced: Arc<AtomicBool>,
    pub(super) supervisors: BTreeMap<PartKey, Supervisor>,
    pub(super) known: Known,
    pub(super) desired: Option<Vec<Assignment>>,
    /// Exited containers whose final state is reported but not yet removed.
    pub(super) collecting: std::collections::BTreeSet<PartKey>,
}

/// How often the reconciler re-reads Docker even when nothing happened.
const RESYNC: Duration = Duration::from_secs(5);

impl<R: ContainerRuntime> Reconciler<R> {
    /// Reconciles until shutdown or until scheduled events ask for a
    /// drain, then drains. A drain for events that are cancelled before
    /// its deadline ends, and reconciling goes on. Returns whether the
    /// final drain was for scheduled events (they are then acknowledged).
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        beat: mpsc::Sender<oneshot::Sender<()>>,
        shutdown: CancellationToken,
    ) -> bool {
        let mut resync = tokio::time::interval(RESYNC);
        self.remove_stale_part_dirs().await;
        loop {
            let mut events = None;
            // First pass before any desired state: adopt and collect only.
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = resync.tick() => {}
                    Some(input) = rx.recv() => {
                        if let Input::Maintenance(Some(drain)) = input {
                            events = Some(drain);
                            break;
                        }
                        self.handle(input).await;
                    }
                }
                self.step().await;
            }
            if let Some(for_events) = self.drain(&mut rx, &beat, &shutdown, events).await {
                return for_events;
            }
        }
    }

    /// At start: part directories whose part has no container here are
    /// left from parts whose end the control plane has (or that never got
    /// as far as a container, and start again from nothing).
    async fn remove_stale_part_dirs(&self) {
        match self.runner.list_parts(Some(&self.config.node_id)).await {
            Ok(parts) => {
                let keep = parts.into_iter().map(|c| c.part).collect();
                remove_stale_part_dirs(&self.config.data_dir, &keep);
            }
            Err(e) => {
                tracing::warn!(error = %e, "listing part containers to clean part directories failed")
            }
        }
    }

    async fn handle(&mut self, input: Input) {
        match input {
            Input::Desired(a) => {
                // Forget finished parts the control plane no longer lists and
                // whose final state it has: ended parts never become live
                // again, so the set stays as small as the node's work.
                let pending: std::collections::BTreeSet<PartKey> =
                    lock(&self.reports).ended.keys().cloned().collect();
                let listed: std::collections::BTreeSet<PartKey> = a
                    .parts
                    .iter()
                    .map(|a: &Assignment| a.part.clone())
                    .collect();
                self.known.finished.retain(|p| {
                    listed.contains(p) || pending.contains(p) || self.collecting.contains(p)
                });
                self.desired = Some(a.parts);
            }
            Input::Ended(part, ended) => {
                if let Some(s) = self.supervisors.remove(&part) {
                    let _ = s.task.await;
                }
                self.known.supervised.remove(&part);
                self.known.finished.insert(part.clone());
                if ended.container.is_some() {
                    // Its exited container stays until the server accepts the state.
                    self.collecting.insert(part.clone());
                }
                tracing::info!(part = %part, state = %ended.state, exit_code = ?ended.exit_code, "part ended");
                lock(&self.reports).end(part, ended);
            }
            Input::Acked(parts) => {
                for (part, container) in parts {
                    if let Some(id) = container
                        && let Err(e) = self.runner.runtime.remove(&id).await
                    {
                        tracing::warn!(part = %part, container = %id, error = %e, "removing container failed");
                    }
                    self.collecting.remove(&part);
                    if let Err(e) = PartDir::new(&self.config.data_dir, &part).remove() {
                        tracing::warn!(part = %part, error = %e, "removing the part directory failed");
                    }
                }
            }
            // Drains are `run`'s and `drain`'s.
            Input::Maintenance(_) => {}
            Input::Vm { dedicated } => self.config.dedicated = dedicated,
            Input::CutOff => self.fence().await,
            Input::Reconnected => {
                self.known.fenced = false;
                self.fenced.store(false, Ordering::Relaxed);
            }
            Input::Rejected(parts) => {
                for part in parts {
                    if let Some(s) = self.supervisors.get(&part) {
                        tracing::info!(part = %part, "control plane rejected the part; stopping it");
                        s.cancel.cancel();
                    }
                }
            }
        }
    }

    /// Stops every part of this node at once: the control plane has given
    /// them to other nodes by now. Containers are killed rather than given
    /// the grace (another attempt of the job already runs); supervisors then
    /// see them end and report them, and nothing new starts until the
    /// control plane answers again.
    async fn fence(&mut self) {
        self.known.fenced = true;
        self.fenced.store(true, Ordering::Relaxed);
        match self.runner.list_parts(Some(&self.config.node_id)).await {
            Ok(parts) => {
                for c in parts.iter().filter(|c| c.state != ContainerState::Exited) {
                    tracing::warn!(part = %c.part, container = %c.id, "self-fencing: killing the part");
                    if let Err(e) = self.runner.runtime.stop(&c.id, Duration::ZERO).await {
                        tracing::warn!(part = %c.part, error = %e, "killing the part failed");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing part containers to fence failed"),
        }
        for s in self.supervisors.values() {
            s.cancel.cancel();
        }
    }

    /// One reconcile pass over Docker's current containers.
    async fn step(&mut self) {
        let actual = match self.runner.list_parts(Some(&self.config.node_id)).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "listing part containers failed");
                return;
            }
        };
        self.known.draining = self.draining.load(Ordering::Relaxed);
        for action in reconcile(self.desired.as_deref(), &actual, &self.known) {
            self.act(action).await;
        }
    }

    async fn act(&mut self, action: Action) {
        match action {
            Action::Start(part) => {
                let Some(a) = self
                    .desired
                    .as_ref()
                    .and_then(|d| d.iter().find(|a| a.part.clone() == part))
                    .cloned()
                else {
                    return;
                };
                tracing::info!(part = %part, kind = a.spec.kind(), "starting part");
                self.spawn(part, SupervisorKind::Start(Box::new(a)));
            }
            Action::Adopt {
                part,
                container,
                start,
                log_from,
            } => {
                if start {
                    tracing::info!(part = %part, container = %container, "starting container created before a restart");
                    if let Err(e) = self.runner.runtime.start(&container).await {
                        tracing::warn!(part = %part, container = %container, error = %e, "starting container failed");
                    }
                } else {
                    tracing::info!(part = %part, container = %container, "adopting running container");
                }
                let assignment = self
                    .desired
                    .as_ref()
                    .and_then(|d| d.iter().find(|a| a.part == part))
                    .cloned()
                    .map(Box::new);
                self.spawn(
                    part,
                    SupervisorKind::Adopt {
                        container,
                        log_from,
                        ship_logs: true,
                        assignment,
                    },
                );
            }
            Action::Collect { part, container } => {
                if !self.collecting.insert(part.clone()) {
                    return;
                }
                let ended = match self.runner.runtime.wait(&container).await {
                    Ok(status) => Ended {
                        state: if status.code == 0 {
                            PartState::Succeeded
                        } else {
                            PartState::Failed
                        },
                        exit_code: Some(status.code),
                        container: Some(container),
                    },
                    Err(e) => {
                        tracing::warn!(part = %part, error = %e, "reading exit status failed");
                        self.collecting.remove(&part);
                        return;
                    }
                };
                tracing::info!(part = %part, exit_code = ?ended.exit_code, "collected part that ended unsupervised");
                self.known.finished.insert(part.clone());
                lock(&self.reports).end(part, ended);
            }
            Action::Cancel(part) => {
                if let Some(s) = self.supervisors.get(&part) {
                    tracing::info!(part = %part, "part no longer assigned; stopping it");
                    s.cancel.cancel();
                }
            }
            Action::StopContainer { part, container } => {
                tracing::info!(part = %part, container = %container, "stopping container the control plane no longer assigns");
                // No log: the control plane has no part for its lines.
                self.spawn(
                    part.clone(),
                    SupervisorKind::Adopt {
                        container,
                        assignment: None,
                        log_from: None,
                        ship_logs: false,
                    },
                );
                if let Some(s) = self.supervisors.get(&part) {
                    s.cancel.cancel();
                }
            }
            Action::ReportMissing(part) => {
                tracing::warn!(part = %part, "part has no container here; reporting it failed");
                self.known.finished.insert(part.clone());
                lock(&self.reports).end(
                    part,
                    Ended {
                        state: PartState::Failed,
                        exit_code: None,
                        container: None,
                    },
                );
            }
        }
    }

    fn spawn(&mut self, part: PartKey, kind: SupervisorKind) {
        let cancel = CancellationToken::new();
        let initial = match kind {
            SupervisorKind::Start(_) => PartState::Preparing,
            SupervisorKind::Adopt { .. } => PartState::Running,
        };
        lock(&self.reports).set_live(part.clone(), initial);
        let ctx = PartCtx {
            part: part.clone(),
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
            cancel: cancel.clone(),
        };
        let task = tokio::spawn(supervise(ctx, kind));
        self.known.supervised.insert(part.clone());
        self.supervisors.insert(part, Supervisor { cancel, task });
    }

    /// Drains: takes no new parts, tells the server the node is leaving (or
    /// preempted), lets running parts go on until the deadline — the drain
    /// deadline after SIGTERM or what the scheduled events ask for,
    /// whichever comes first — then stops them, reports their final states
    /// and returns whether it drained for scheduled events. Events keep
    /// coming meanwhile: a Preempt shortens the drain to now; when the
    /// events disappear before the deadline (cancelled) and no SIGTERM came,
    /// the drain ends (`None`) and the node takes work again.
    async fn drain(
        &mut self,
        rx: &mut mpsc::Receiver<Input>,
        beat: &mpsc::Sender<oneshot::Sender<()>>,
        shutdown: &CancellationToken,
        events: Option<Drain>,
    ) -> Option<bool> {
        self.draining.store(true, Ordering::Relaxed);
        self.known.draining = true;
        let mut signalled = shutdown.is_cancelled().then(Instant::now);
        let mut events = events.map(|d| self.note_events(d));
        let mut deadline = self.drain_deadline(signalled, events.as_ref());
        tracing::info!(
            parts = self.supervisors.len(),
            deadline_s = deadline.saturating_duration_since(Instant::now()).as_secs(),
            "draining"
        );
        let mut stopped = false;
        let mut stopped_for_events = false;
        let mut beat_now = true;
        loop {
            // No time left (a preemption): SIGTERM now, while the heartbeat
            // tells the server, rather than after it.
            if !stopped && deadline <= Instant::now() {
                // For the events when theirs is the deadline that passed.
                let for_events = events.as_ref().filter(|(_, at)| *at <= Instant::now());
                stopped_for_events = for_events.is_some();
                self.stop_parts(for_events.map(|(d, _)| d.reason.as_str()))
                    .await;
                stopped = true;
            }
            if beat_now {
                ask_beat(beat).await;
                beat_now = false;
            }
            if self.supervisors.is_empty() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline), if !stopped => {}
                _ = shutdown.cancelled(), if signalled.is_none() => signalled = Some(Instant::now()),
                input = rx.recv() => match input {
                    Some(Input::Maintenance(Some(next))) => {
                        // A Preempt now: the server hears of it at once.
                        beat_now |= next.preempted && !self.preempted.load(Ordering::Relaxed);
                        events = Some(self.note_events(next));
                    }
                    Some(Input::Maintenance(None)) if !stopped && signalled.is_none() => {
                        tracing::info!(parts = self.supervisors.len(), "the scheduled events are gone (cancelled); taking work again");
                        self.draining.store(false, Ordering::Relaxed);
                        self.known.draining = false;
                        ask_beat(beat).await;
                        return None;
                    }
                    Some(Input::Maintenance(None)) => events = None,
                    Some(Input::Ended(part, ended)) => {
                        let ended = if stopped {
                            self.settle(&part, ended, stopped_for_events).await
                        } else {
                            ended
                        };
                        self.handle(Input::Ended(part, ended)).await;
                        self.step().await;
                    }
                    // Everything else still applies (a canceled job stops at
                    // once), except that draining starts nothing.
                    Some(i) => {
                        self.handle(i).await;
                        self.step().await;
                    }
                    None => break,
                },
            }
            deadline = self.drain_deadline(signalled, events.as_ref());
        }
        // Report the final states, then remove what the server accepted.
        ask_beat(beat).await;
        while let Ok(i) = rx.try_recv() {
            if let Input::Acked(_) = i {
                self.handle(i).await;
            }
        }
        Some(stopped_for_events || events.is_some())
    }

    /// Logs what the events ask for, marks the node preempted when they say
    /// so, and pins their stop time to this process's clock.
    fn note_events(&self, d: Drain) -> (Drain, Instant) {
        let left = d
            .stop_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tracing::info!(
            reason = %d.reason, stop_in_s = left.as_secs(), preempted = d.preempted,
            events = ?d.acknowledge, "scheduled events ask for a drain"
        );
        if d.preempted {
            self.preempted.store(true, Ordering::Relaxed);
        }
        (d, Instant::now() + left)
    }

    /// When running parts must be stopped: the earlier of the drain
    /// deadline after SIGTERM and the events' stop time.
    fn drain_deadline(
        &self,
        signalled: Option<Instant>,
        events: Option<&(Drain, Instant)>,
    ) -> Instant {
        let by_signal = signalled.map(|t| t + self.config.drain_deadline);
        match (by_signal, events.map(|(_, at)| *at)) {
            (Some(a), Some(b)) => a.min(b),
            (Some(at), None) | (None, Some(at)) => at,
            // Neither: the events went away after the parts were stopped.
            (None, None) => Instant::now(),
        }
    }

    /// Stops every part, first telling its log why (the line is shipped
    /// before the part's final flush, so it comes before its final state).
    async fn stop_parts(&self, events: Option<&str>) {
        let why = match events {
            Some(reason) => format!("drover-agent: stopping the part: {reason}"),
            None => "drover-agent: stopping the part: the agent was told to stop and its drain deadline passed".to_string(),
        };
        tracing::info!(parts = self.supervisors.len(), reason = %why, "drain deadline passed; stopping parts");
        let at = drover_api::cluster::Timestamp(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        );
        for (part, s) in &self.supervisors {
            if s.cancel.is_cancelled() {
                continue;
            }
            let line = NewLogLine {
                job: part.job.clone(),
                attempt: part.attempt,
                node_rank: part.node_rank,
                stream: LogStream::Stderr,
                at,
                text: why.clone(),
                // The agent's own line: it has no place in the container's log.
                cursor: None,
                rank: None,
            };
            let _ = self.ship.send(Ship::Line(line)).await;
            s.cancel.cancel();
        }
    }

    /// The final state of a part this drain stopped: its container's exit
    /// code (143 after SIGTERM, 137 after SIGKILL), and `lost` when the
    /// stop was for scheduled events — the part ended because its VM is
    /// going away, not because its job did.
    async fn settle(&self, part: &PartKey, mut ended: Ended, lost: bool) -> Ended {
        if ended.state != PartState::Stopped {
            return ended;
        }
        if ended.exit_code.is_none()
            && let Some(id) = &ended.container
        {
            // The container has exited: this answers at once.
            match tokio::time::timeout(Duration::from_secs(5), self.runner.runtime.wait(id)).await {
                Ok(Ok(status)) => ended.exit_code = Some(status.code),
                Ok(Err(e)) => {
                    tracing::warn!(part = %part, error = %e, "reading the stopped part's exit code failed")
                }
                Err(_) => {
                    tracing::warn!(part = %part, "reading the stopped part's exit code timed out")
                }
            }
        }
        if lost {
            ended.state = PartState::Lost;
        }
        ended
    }
}

async fn ask_beat(beat: &mpsc::Sender<oneshot::Sender<()>>) {
    let (tx, rx) = oneshot::channel();
    if beat.send(tx).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(20), rx).await;
    }
}
