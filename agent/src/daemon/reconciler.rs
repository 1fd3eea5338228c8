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
use std::time::Duration;

use drover_api::wire::{Assignment, PartState};
use drover_runner::PartRunner;
use drover_runner::runtime::{ContainerRuntime, ContainerState};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::state::{Ended, HealthyGpus, SharedReports, lock};
use super::supervisor::{PartCtx, SupervisorKind, supervise};
use super::{DaemonConfig, Input, Ship};
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
    pub(super) supervisors: BTreeMap<PartKey, Supervisor>,
    pub(super) known: Known,
    pub(super) desired: Option<Vec<Assignment>>,
    /// Exited containers whose final state is reported but not yet removed.
    pub(super) collecting: std::collections::BTreeSet<PartKey>,
}

/// How often the reconciler re-reads Docker even when nothing happened.
const RESYNC: Duration = Duration::from_secs(5);

impl<R: ContainerRuntime> Reconciler<R> {
    /// Reconciles until shutdown or a maintenance event, then drains;
    /// returns the scheduled events to acknowledge.
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        beat: mpsc::Sender<oneshot::Sender<()>>,
        shutdown: CancellationToken,
    ) -> Vec<String> {
        let mut resync = tokio::time::interval(RESYNC);
        let mut deadline = self.config.drain_deadline;
        let mut ack = Vec::new();
        // First pass before any desired state: adopt and collect only.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = resync.tick() => {}
                Some(input) = rx.recv() => {
                    if let Input::Maintenance { event_ids, deadline: d, preempted } = input {
                        tracing::info!(events = ?event_ids, deadline_s = d.as_secs(), preempted, "scheduled maintenance; draining");
                        if preempted {
                            self.preempted.store(true, Ordering::Relaxed);
                        }
                        ack = event_ids;
                        deadline = d.min(deadline);
                        break;
                    }
                    self.handle(input).await;
                }
            }
            self.step().await;
        }
        self.drain(&mut rx, &beat, deadline).await;
        ack
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
                }
            }
            // Already draining: nothing more to do.
            Input::Maintenance { .. } => {}
            Input::CutOff => self.fence().await,
            Input::Reconnected => self.known.fenced = false,
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
                self.spawn(
                    part,
                    SupervisorKind::Adopt {
                        container,
                        log_from,
                        ship_logs: true,
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
            cancel: cancel.clone(),
        };
        let task = tokio::spawn(supervise(ctx, kind));
        self.known.supervised.insert(part.clone());
        self.supervisors.insert(part, Supervisor { cancel, task });
    }

    /// SIGTERM: take no new parts, tell the server the node is leaving, let
    /// running parts go on up to the drain deadline, then stop them, report
    /// their final states and return.
    async fn drain(
        &mut self,
        rx: &mut mpsc::Receiver<Input>,
        beat: &mpsc::Sender<oneshot::Sender<()>>,
        deadline: Duration,
    ) {
        self.draining.store(true, Ordering::Relaxed);
        self.known.draining = true;
        tracing::info!(
            parts = self.supervisors.len(),
            deadline_s = deadline.as_secs(),
            "draining"
        );
        // No time left (a preemption): SIGTERM now, while the heartbeat
        // tells the server, rather than after it.
        let mut stopped = deadline.is_zero();
        if stopped {
            for s in self.supervisors.values() {
                s.cancel.cancel();
            }
        }
        ask_beat(beat).await;
        let deadline = tokio::time::sleep(deadline);
        tokio::pin!(deadline);
        while !self.supervisors.is_empty() {
            tokio::select! {
                _ = &mut deadline, if !stopped => {
                    tracing::info!(parts = self.supervisors.len(), "drain deadline passed; stopping parts");
                    for s in self.supervisors.values() {
                        s.cancel.cancel();
                    }
                    stopped = true;
                }
                input = rx.recv() => match input {
                    // Everything still applies (a canceled job stops at
                    // once), except that draining starts nothing.
                    Some(i) => {
                        self.handle(i).await;
                        self.step().await;
                    }
                    None => break,
                },
            }
        }
        // Report the final states, then remove what the server accepted.
        ask_beat(beat).await;
        while let Ok(i) = rx.try_recv() {
            if let Input::Acked(_) = i {
                self.handle(i).await;
            }
        }
    }
}

async fn ask_beat(beat: &mpsc::Sender<oneshot::Sender<()>>) {
    let (tx, rx) = oneshot::channel();
    if beat.send(tx).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(20), rx).await;
    }
}
