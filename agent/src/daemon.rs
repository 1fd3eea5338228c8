//! `drover-agent run`: the node daemon. Named tokio tasks joined by bounded
//! channels:
//!
//! ```text
//!              ┌──────────── control plane (only through control_client) ───────────┐
//!              │ GET assignments (long poll)   POST heartbeat          POST logs      │
//!              ▼                               ▲                       ▲              │
//!           [watch] ──Input::Desired──┐   [heartbeat] ◄─beat now+ack─┐ [log-shipper]  │
//!                                     ▼      │   ▲ reads/clears      │      ▲ Ship (4096)
//!     Input::Acked/Rejected ──────► [reconciler] ─┘ Reports (Mutex)  │      │
//!             (mpsc 64)              │  reconcile() → Start/Adopt/Collect/Cancel/Stop
//!                                    ▼ spawns, one per part, own CancellationToken
//!                           [part supervisor] ── PartRunner::run / adopted wait+logs
//!                               │ PartEvent (256) → lines to log-shipper, states to Reports
//!                               └── Input::Ended (after its lines are flushed) ──► reconciler
//! ```
//!
//! With IMDS: `[imds-scheduled-events]` ──EventsUpdate (8)──► `[maintenance]`
//! ──Input::Maintenance──► reconciler (drain now, acknowledge after).
//!
//! Shutdown: the `shutdown` token (SIGTERM/SIGINT) or a maintenance event ends the reconciler's
//! loop and starts the drain (no new parts, heartbeat says `leaving`, parts
//! run until the drain deadline, then are canceled and stopped with the
//! grace period); once every supervisor has reported, a final heartbeat
//! goes out, scheduled events are acknowledged, and the `io` token stops
//! watch, heartbeat, log-shipper and the IMDS tasks, which are all joined
//! before [`run`] returns. Each part has its own token, canceled by the
//! reconciler.
//!
//! State that must survive the agent lives in Docker labels and the control
//! plane: containers are kept after they exit (`RunOptions::remove` is
//! false) until the server has accepted their final state, so a part that
//! ended while the agent was down is still reported with its exit code.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drover_api::wire::{
    Assignment, Assignments, GpuCounts, HeartbeatRequest, LogBatch, NewLogLine, PartState,
    PartStatus, RegisterRequest,
};
use drover_runner::PartRunner;
use drover_runner::part::{PartEvent, PartOutcome, Placement};
use drover_runner::runtime::{ContainerRuntime, LogStream};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::control_client::{Backoff, ClientError, ControlClient};
use crate::imds::ImdsClient;
use crate::imds::{DEFAULT_POLL_INTERVAL, EventType, EventsUpdate};
use crate::inventory::{GpuHealth, Inventory};
use crate::metrics::Metrics;
use crate::reconcile::{Action, Known, PartId, reconcile};

/// Everything the daemon needs to know.
#[derive(Clone)]
pub struct DaemonConfig {
    /// Control plane base URL.
    pub server: String,
    /// Cluster to join.
    pub cluster: String,
    /// Join token (needed only when no saved credential works).
    pub join_token: Option<String>,
    /// Node id to register under.
    pub node_id: String,
    /// Where the credential and job outputs are kept.
    pub data_dir: PathBuf,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// How long one assignments long poll may last.
    pub watch_timeout: Duration,
    /// How long running parts may go on after SIGTERM.
    pub drain_deadline: Duration,
    /// SIGTERM-to-SIGKILL grace when stopping a part.
    pub stop_grace: Duration,
    /// Host path of the static drover-init.
    pub init_binary: PathBuf,
    /// The address other nodes reach this one at.
    pub ip: Option<String>,
    /// False on low-priority (spot) nodes.
    pub dedicated: bool,
    /// Extra facts for the registration (IMDS instance metadata).
    pub instance: serde_json::Value,
    /// Where `/metrics` listens, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// IMDS and this VM's name there: scheduled events are watched when set.
    pub imds: Option<(ImdsClient, String)>,
    /// Docker network mode of job containers (`host` lets the ranks of a
    /// multi-node job reach each other at the node IPs); engine default when
    /// `None`.
    pub job_network: Option<String>,
}

impl std::fmt::Debug for DaemonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonConfig")
            .field("server", &self.server)
            .field("cluster", &self.cluster)
            .field(
                "join_token",
                &self.join_token.as_ref().map(|_| "<redacted>"),
            )
            .field("node_id", &self.node_id)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Registration was refused for good (wrong token, node id taken).
    #[error("registering node {node} with cluster {cluster} failed")]
    Register {
        /// Node id.
        node: String,
        /// Cluster.
        cluster: String,
        /// Cause.
        #[source]
        source: ClientError,
    },
    /// No saved credential and no join token to get one.
    #[error("node {0} has no saved credential and no join token was given")]
    NoJoinToken(String),
    /// The credential file could not be written.
    #[error("saving the node credential to {path} failed")]
    SaveCredential {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The control-plane client could not be built.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The metrics listener could not be bound.
    #[error("binding the metrics listener on {addr} failed")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The credential file in the data dir.
const CREDENTIAL_FILE: &str = "node-credential.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedCredential {
    server: String,
    cluster: String,
    node_id: String,
    credential: String,
}

/// A part's final state, kept until the server accepts it.
#[derive(Debug, Clone)]
struct Ended {
    state: PartState,
    exit_code: Option<i64>,
    container: Option<String>,
}

/// What heartbeats report: live part states and ended parts not yet acked.
#[derive(Debug, Default)]
struct Reports {
    live: BTreeMap<PartId, PartState>,
    ended: BTreeMap<PartId, Ended>,
    /// Wakes the heartbeat when a part changes state, so that the server
    /// (and the user) learn of a start or an end at once, not a heartbeat
    /// interval later.
    changed: Arc<tokio::sync::Notify>,
}

impl Reports {
    fn set_live(&mut self, part: PartId, state: PartState) {
        if self.live.insert(part, state) != Some(state) {
            self.changed.notify_one();
        }
    }

    fn end(&mut self, part: PartId, ended: Ended) {
        self.live.remove(&part);
        self.ended.insert(part, ended);
        self.changed.notify_one();
    }
}

type SharedReports = Arc<Mutex<Reports>>;

/// UUIDs of the GPUs that are healthy now, refreshed by every heartbeat.
type HealthyGpus = Arc<Mutex<Vec<String>>>;

fn healthy_uuids(inv: &Inventory) -> Vec<String> {
    inv.gpus
        .iter()
        .filter(|g| matches!(g.health, GpuHealth::Healthy))
        .filter_map(|g| g.uuid.clone())
        .collect()
}

fn lock(r: &SharedReports) -> std::sync::MutexGuard<'_, Reports> {
    // A panic while holding this lock leaves plain data behind; keep going.
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// Inputs of the reconciler loop.
#[derive(Debug)]
enum Input {
    /// The control plane's desired state.
    Desired(Assignments),
    /// A supervisor finished.
    Ended(PartId, Ended),
    /// The server accepted these final states: remove their containers.
    Acked(Vec<(PartId, Option<String>)>),
    /// The server no longer wants these parts.
    Rejected(Vec<PartId>),
    /// IMDS announced an event that ends this VM's containers: drain with
    /// this deadline, then acknowledge the events.
    Maintenance {
        /// Events to acknowledge once the parts are stopped.
        event_ids: Vec<String>,
        /// How long parts may still run.
        deadline: Duration,
        /// The VM is being preempted or deleted: the node says `preempted`
        /// at once, so its job is requeued without waiting for silence.
        preempted: bool,
    },
}

/// Items of the log shipper.
#[derive(Debug)]
enum Ship {
    Line(NewLogLine),
    /// Answered once every line sent before it is uploaded (or dropped at shutdown).
    Flush(oneshot::Sender<()>),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// GPU health counts of an inventory.
pub fn gpu_counts(inv: &Inventory) -> GpuCounts {
    GpuCounts {
        healthy: inv
            .gpus
            .iter()
            .filter(|g| matches!(g.health, GpuHealth::Healthy))
            .count() as u32,
        total: inv.gpus.len() as u32,
    }
}

/// Source of inventories (the real collector or a test stub).
pub type InventorySource = Arc<dyn Fn() -> Inventory + Send + Sync>;

/// Registers (or reuses the saved credential), then runs every task until
/// `shutdown` fires and the drain is over.
pub async fn run<R: ContainerRuntime>(
    config: DaemonConfig,
    runner: Arc<PartRunner<R>>,
    inventory: InventorySource,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let metrics = Arc::new(Metrics::default());
    let metrics_task = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?;
            tracing::info!(addr = %addr, "metrics listening");
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let inv = {
        let inventory = inventory.clone();
        tokio::task::spawn_blocking(move || inventory())
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    };
    metrics.observe_gpus(&inv);
    let gpus: HealthyGpus = Arc::new(Mutex::new(healthy_uuids(&inv)));
    let Some(client) = connect(&config, &inv, &shutdown).await? else {
        return Ok(());
    };
    tracing::info!(node = %config.node_id, cluster = %config.cluster, "agent joined");

    let reports: SharedReports = Arc::default();
    let draining = Arc::new(AtomicBool::new(false));
    let preempted = Arc::new(AtomicBool::new(false));
    // The I/O tasks outlive the drain so the last states reach the server.
    let io = CancellationToken::new();
    let (input_tx, input_rx) = mpsc::channel::<Input>(64);
    let (ship_tx, ship_rx) = mpsc::channel::<Ship>(4096);
    let (beat_tx, beat_rx) = mpsc::channel::<oneshot::Sender<()>>(4);

    let watch = tokio::spawn(watch_task(
        client.clone(),
        config.watch_timeout,
        input_tx.clone(),
        io.clone(),
    ));
    let heartbeat = tokio::spawn(heartbeat_task(HeartbeatCtx {
        client: client.clone(),
        config: config.clone(),
        interval: config.heartbeat_interval,
        reports: reports.clone(),
        draining: draining.clone(),
        preempted: preempted.clone(),
        inventory,
        input: input_tx.clone(),
        now: beat_rx,
        metrics: metrics.clone(),
        gpus: gpus.clone(),
        io: io.clone(),
    }));
    let shipper = tokio::spawn(ship_task(client.clone(), ship_rx, io.clone()));
    let mut maintenance = Vec::new();
    if let Some((imds, vm)) = &config.imds {
        let (tx, rx) = mpsc::channel::<EventsUpdate>(8);
        let watcher = imds.scheduled_events_watcher(vm);
        maintenance.push(tokio::spawn(watcher.run(
            DEFAULT_POLL_INTERVAL,
            tx,
            io.clone(),
        )));
        maintenance.push(tokio::spawn(maintenance_task(
            rx,
            input_tx.clone(),
            config.stop_grace,
        )));
    }
    let reconciler = Reconciler {
        config: config.clone(),
        runner,
        reports,
        draining,
        preempted,
        input: input_tx,
        ship: ship_tx,
        metrics,
        gpus,
        supervisors: BTreeMap::new(),
        known: Known::default(),
        desired: None,
        collecting: Default::default(),
    };
    let ack = reconciler.run(input_rx, beat_tx, shutdown.clone()).await;
    if let (Some((imds, _)), false) = (&config.imds, ack.is_empty()) {
        // The parts are stopped: the platform may go ahead now.
        match tokio::time::timeout(Duration::from_secs(10), imds.acknowledge_events(&ack)).await {
            Ok(Ok(())) => tracing::info!(events = ?ack, "scheduled events acknowledged"),
            Ok(Err(e)) => tracing::warn!(error = %e, "acknowledging scheduled events failed"),
            Err(_) => tracing::warn!("acknowledging scheduled events timed out"),
        }
    }
    io.cancel();
    for task in maintenance {
        let _ = task.await;
    }
    for (name, task) in [
        ("watch", watch),
        ("heartbeat", heartbeat),
        ("log-shipper", shipper),
    ] {
        if let Err(e) = task.await {
            tracing::error!(task = name, error = %e, "task panicked");
        }
    }
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// Reuses the saved credential when the server still accepts it, else
/// registers with the join token. Retries while the server is unreachable;
/// `None` when shut down first.
async fn connect(
    config: &DaemonConfig,
    inv: &Inventory,
    shutdown: &CancellationToken,
) -> Result<Option<ControlClient>, DaemonError> {
    let base = ControlClient::new(&config.server)?;
    let path = config.data_dir.join(CREDENTIAL_FILE);
    let saved = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<SavedCredential>(&b).ok())
        .filter(|s| {
            s.server == config.server && s.cluster == config.cluster && s.node_id == config.node_id
        });
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut saved = saved;
    loop {
        let attempt: Result<(), ClientError> = match &saved {
            Some(s) => {
                let client = base.clone().with_credential(s.credential.clone());
                // A restarted agent that drained before says it is back
                // (idle); the server refuses that while the node holds a
                // job, which then simply goes on.
                let back = HeartbeatRequest {
                    state: Some(drover_api::cluster::NodeState::Idle),
                    ..HeartbeatRequest::default()
                };
                let answer = match client.heartbeat(&back).await {
                    Err(ClientError::Rejected { status: 400, .. }) => {
                        client.heartbeat(&HeartbeatRequest::default()).await
                    }
                    other => other,
                };
                match answer {
                    Ok(_) => return Ok(Some(client)),
                    Err(e) if e.is_unauthorized() => {
                        tracing::warn!(node = %config.node_id, "saved credential refused, registering again");
                        saved = None;
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            None => match register(config, inv, &base).await {
                Ok(()) => return Ok(Some(base)),
                Err(RegisterError::Fatal(e)) => return Err(e),
                Err(RegisterError::Client(e)) => Err(e),
            },
        };
        if let Err(e) = attempt {
            if !e.is_transient() {
                return Err(DaemonError::Register {
                    node: config.node_id.clone(),
                    cluster: config.cluster.clone(),
                    source: e,
                });
            }
            let delay = backoff.next_delay();
            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "control plane unreachable");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return Ok(None),
            }
        }
    }
}

enum RegisterError {
    Client(ClientError),
    Fatal(DaemonError),
}

/// Registers with the join token, saves the credential and installs it in
/// `client` (and so in every clone of it).
async fn register(
    config: &DaemonConfig,
    inv: &Inventory,
    client: &ControlClient,
) -> Result<(), RegisterError> {
    let token = config
        .join_token
        .clone()
        .ok_or_else(|| RegisterError::Fatal(DaemonError::NoJoinToken(config.node_id.clone())))?;
    let req = RegisterRequest {
        cluster: config.cluster.clone(),
        join_token: token,
        node_id: Some(config.node_id.clone()),
        ip: config.ip.clone(),
        gpus: gpu_counts(inv),
        inventory: serde_json::json!({
            "inventory": inv,
            "instance": config.instance,
        }),
    };
    let resp = client.register(&req).await.map_err(RegisterError::Client)?;
    let s = SavedCredential {
        server: config.server.clone(),
        cluster: config.cluster.clone(),
        node_id: resp.node_id.clone(),
        credential: resp.credential.clone(),
    };
    save_credential(&config.data_dir.join(CREDENTIAL_FILE), &s).map_err(RegisterError::Fatal)?;
    client.set_credential(resp.credential);
    Ok(())
}

fn save_credential(path: &std::path::Path, s: &SavedCredential) -> Result<(), DaemonError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |source| DaemonError::SaveCredential {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec(s).map_err(|e| err(std::io::Error::other(e)))?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(&bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// The `watch` task: long-polls assignments with the last version seen and
/// hands every answer to the reconciler.
async fn watch_task(
    client: ControlClient,
    wait: Duration,
    input: mpsc::Sender<Input>,
    io: CancellationToken,
) {
    let mut version = 0;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let answer = tokio::select! {
            r = client.assignments(version, wait) => r,
            _ = io.cancelled() => return,
        };
        match answer {
            Ok(a) => {
                backoff.reset();
                version = a.version;
                tracing::debug!(version, parts = a.parts.len(), "assignments");
                if input.send(Input::Desired(a)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "watching assignments failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = io.cancelled() => return,
                }
            }
        }
    }
}

struct HeartbeatCtx {
    client: ControlClient,
    config: DaemonConfig,
    interval: Duration,
    reports: SharedReports,
    draining: Arc<AtomicBool>,
    preempted: Arc<AtomicBool>,
    inventory: InventorySource,
    input: mpsc::Sender<Input>,
    now: mpsc::Receiver<oneshot::Sender<()>>,
    metrics: Arc<Metrics>,
    gpus: HealthyGpus,
    io: CancellationToken,
}

/// The `heartbeat` task: every interval (or at once when asked) sends GPU
/// health, the drain state and every part state; accepted final states go
/// back to the reconciler so their containers can be removed.
async fn heartbeat_task(mut ctx: HeartbeatCtx) {
    let mut tick = tokio::time::interval(ctx.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let changed = Arc::clone(&lock(&ctx.reports).changed);
    let mut last_gpus = None;
    loop {
        let done = tokio::select! {
            _ = tick.tick() => None,
            _ = changed.notified() => None,
            Some(ack) = ctx.now.recv() => Some(ack),
            _ = ctx.io.cancelled() => return,
        };
        let inv = {
            let source = ctx.inventory.clone();
            match tokio::task::spawn_blocking(move || source()).await {
                Ok(inv) => Some(inv),
                Err(e) => {
                    tracing::error!(error = %e, "inventory refresh panicked");
                    None
                }
            }
        };
        let gpus = inv.as_ref().map(gpu_counts);
        if let Some(inv) = &inv {
            ctx.metrics.observe_gpus(inv);
            *ctx.gpus.lock().unwrap_or_else(|e| e.into_inner()) = healthy_uuids(inv);
        }
        let (parts, ended): (Vec<PartStatus>, Vec<(PartId, Option<String>)>) = {
            let r = lock(&ctx.reports);
            let status = |p: &PartId, state, exit_code| PartStatus {
                job: p.job.clone(),
                attempt: p.attempt,
                node_rank: p.node_rank,
                state,
                exit_code,
            };
            let mut parts: Vec<PartStatus> =
                r.live.iter().map(|(p, s)| status(p, *s, None)).collect();
            parts.extend(r.ended.iter().map(|(p, e)| status(p, e.state, e.exit_code)));
            let ended = r
                .ended
                .iter()
                .map(|(p, e)| (p.clone(), e.container.clone()))
                .collect();
            (parts, ended)
        };
        ctx.metrics.observe_parts(&parts);
        let req = HeartbeatRequest {
            state: if ctx.preempted.load(Ordering::Relaxed) {
                Some(drover_api::cluster::NodeState::Preempted)
            } else {
                ctx.draining
                    .load(Ordering::Relaxed)
                    .then_some(drover_api::cluster::NodeState::Leaving)
            },
            ip: None,
            gpus: if gpus != last_gpus { gpus } else { None },
            // The whole document only when what scheduling reads changed.
            inventory: if gpus != last_gpus && last_gpus.is_some() {
                inv.as_ref().and_then(|i| serde_json::to_value(i).ok())
            } else {
                None
            },
            parts,
        };
        let started = Instant::now();
        let answer = tokio::select! {
            r = ctx.client.heartbeat(&req) => r,
            _ = ctx.io.cancelled() => return,
        };
        ctx.metrics
            .heartbeat_latency
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Ok(resp) => {
                last_gpus = gpus;
                {
                    let mut r = lock(&ctx.reports);
                    for (p, _) in &ended {
                        r.ended.remove(p);
                    }
                }
                if !ended.is_empty() {
                    let _ = ctx.input.send(Input::Acked(ended)).await;
                }
                if !resp.rejected.is_empty() {
                    let keys = resp
                        .rejected
                        .into_iter()
                        .map(|k| PartId {
                            job: k.job,
                            attempt: k.attempt,
                            node_rank: k.node_rank,
                        })
                        .collect();
                    let _ = ctx.input.send(Input::Rejected(keys)).await;
                }
            }
            Err(e) if e.is_unauthorized() => {
                // The control plane forgot this node (its store was reset or
                // the node removed): join again; the next watch then tells
                // which of the running parts still count.
                ctx.metrics.heartbeat_failures.inc();
                tracing::warn!(node = %ctx.config.node_id, "node credential refused; registering again");
                if let Some(inv) = &inv {
                    match register(&ctx.config, inv, &ctx.client).await {
                        Ok(()) => tracing::info!(node = %ctx.config.node_id, "registered again"),
                        Err(RegisterError::Client(e)) => {
                            tracing::warn!(error = %e, "registering again failed")
                        }
                        Err(RegisterError::Fatal(e)) => {
                            tracing::error!(error = %e, "registering again failed")
                        }
                    }
                }
            }
            Err(e) => {
                ctx.metrics.heartbeat_failures.inc();
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
        if let Some(ack) = done {
            let _ = ack.send(());
        }
    }
}

/// The `maintenance` task: turns IMDS scheduled events for this VM into a
/// drain. Preempt and Terminate stop parts at once (SIGTERM, SIGKILL after
/// the grace); Reboot and Redeploy let them run until shortly before
/// `NotBefore`; Freeze (a pause of seconds) is only logged.
async fn maintenance_task(
    mut rx: mpsc::Receiver<EventsUpdate>,
    input: mpsc::Sender<Input>,
    stop_grace: Duration,
) {
    while let Some(update) = rx.recv().await {
        let mut ids = Vec::new();
        let mut deadline: Option<Duration> = None;
        let mut preempted = false;
        for e in &update.events {
            preempted |= matches!(e.event_type, EventType::Preempt | EventType::Terminate);
            let until = match e.event_type {
                EventType::Preempt | EventType::Terminate => Duration::ZERO,
                EventType::Reboot | EventType::Redeploy => e
                    .not_before_time()
                    .and_then(|t| t.duration_since(SystemTime::now()).ok())
                    .map_or(Duration::ZERO, |left| left.saturating_sub(stop_grace * 2)),
                EventType::Freeze | EventType::Unknown => {
                    tracing::info!(event = %e.event_id, kind = ?e.event_type, "scheduled event noted");
                    continue;
                }
            };
            ids.push(e.event_id.clone());
            deadline = Some(deadline.map_or(until, |d| d.min(until)));
        }
        if let Some(deadline) = deadline {
            let _ = input
                .send(Input::Maintenance {
                    event_ids: ids,
                    deadline,
                    preempted,
                })
                .await;
            return;
        }
    }
}

/// The `log-shipper` task: uploads lines in batches of at most
/// [`MAX_BATCH`], retrying with backoff while the server is unreachable.
async fn ship_task(client: ControlClient, mut rx: mpsc::Receiver<Ship>, io: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    // A line that did not fit the last batch starts the next one.
    let mut carry: Option<Ship> = None;
    loop {
        let first = match carry.take() {
            Some(item) => item,
            None => tokio::select! {
                item = rx.recv() => match item { Some(i) => i, None => return },
                _ = io.cancelled() => return,
            },
        };
        let mut lines = Vec::new();
        let mut bytes = 0;
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Ship::Line(l) => {
                    // The server reads at most MAX_REQUEST_BYTES per body.
                    let size = serde_json::to_vec(&l).map_or(0, |v| v.len()) + 1;
                    if !lines.is_empty() && bytes + size > MAX_BATCH_BYTES {
                        carry = Some(Ship::Line(l));
                        break;
                    }
                    bytes += size;
                    lines.push(l);
                }
                Ship::Flush(f) => flushes.push(f),
            }
            if lines.len() >= MAX_BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        while !lines.is_empty() {
            let batch = LogBatch { lines };
            let r = tokio::select! {
                r = client.upload_logs(&batch) => r,
                _ = io.cancelled() => return,
            };
            lines = batch.lines;
            match r {
                Ok(_) => {
                    backoff.reset();
                    lines.clear();
                }
                Err(e) if !e.is_transient() => {
                    // A refused batch (e.g. a part the server ended) is dropped.
                    tracing::warn!(error = %e, lines = lines.len(), "log batch refused");
                    lines.clear();
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "uploading logs failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = io.cancelled() => return,
                    }
                }
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

/// Lines per log upload.
pub const MAX_BATCH: usize = 500;

/// Bytes of one upload's lines as JSON: a quarter of the server's body limit.
pub const MAX_BATCH_BYTES: usize = drover_api::wire::MAX_REQUEST_BYTES / 4;

/// Bytes of one log line kept; the rest is cut.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

struct Supervisor {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// The `reconciler` task: owns what this agent supervises and acts on
/// [`reconcile`]'s decisions.
struct Reconciler<R: ContainerRuntime> {
    config: DaemonConfig,
    runner: Arc<PartRunner<R>>,
    reports: SharedReports,
    draining: Arc<AtomicBool>,
    preempted: Arc<AtomicBool>,
    input: mpsc::Sender<Input>,
    ship: mpsc::Sender<Ship>,
    metrics: Arc<Metrics>,
    gpus: HealthyGpus,
    supervisors: BTreeMap<PartId, Supervisor>,
    known: Known,
    desired: Option<Vec<Assignment>>,
    /// Exited containers whose final state is reported but not yet removed.
    collecting: std::collections::BTreeSet<PartId>,
}

/// How often the reconciler re-reads Docker even when nothing happened.
const RESYNC: Duration = Duration::from_secs(5);

impl<R: ContainerRuntime> Reconciler<R> {
    /// Reconciles until shutdown or a maintenance event, then drains;
    /// returns the scheduled events to acknowledge.
    async fn run(
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
                let pending: std::collections::BTreeSet<PartId> =
                    lock(&self.reports).ended.keys().cloned().collect();
                let listed: std::collections::BTreeSet<PartId> =
                    a.parts.iter().map(PartId::of_assignment).collect();
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
                    .and_then(|d| d.iter().find(|a| PartId::of_assignment(a) == part))
                    .cloned()
                else {
                    return;
                };
                tracing::info!(part = %part, image = %a.spec.image, "starting part");
                self.spawn(part, SupervisorKind::Start(Box::new(a)));
            }
            Action::Adopt {
                part,
                container,
                start,
            } => {
                if start {
                    tracing::info!(part = %part, container = %container, "starting container created before a restart");
                    if let Err(e) = self.runner.runtime.start(&container).await {
                        tracing::warn!(part = %part, container = %container, error = %e, "starting container failed");
                    }
                } else {
                    tracing::info!(part = %part, container = %container, "adopting running container");
                }
                self.spawn(part, SupervisorKind::Adopt(container));
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
                self.spawn(part.clone(), SupervisorKind::Adopt(container));
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

    fn spawn(&mut self, part: PartId, kind: SupervisorKind) {
        let cancel = CancellationToken::new();
        let initial = match kind {
            SupervisorKind::Start(_) => PartState::Preparing,
            SupervisorKind::Adopt(_) => PartState::Running,
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

enum SupervisorKind {
    Start(Box<Assignment>),
    Adopt(String),
}

struct PartCtx<R: ContainerRuntime> {
    part: PartId,
    runner: Arc<PartRunner<R>>,
    config: DaemonConfig,
    reports: SharedReports,
    ship: mpsc::Sender<Ship>,
    input: mpsc::Sender<Input>,
    metrics: Arc<Metrics>,
    gpus: HealthyGpus,
    cancel: CancellationToken,
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
            cancel: self.cancel.clone(),
        }
    }
}

impl<R: ContainerRuntime> PartCtx<R> {
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
        }
    }

    fn set_live(&self, state: PartState) {
        lock(&self.reports).set_live(self.part.clone(), state);
    }
}

/// One part's supervisor task: runs (or adopts) it, ships its logs, and
/// reports its end once its logs are uploaded.
async fn supervise<R: ContainerRuntime>(ctx: PartCtx<R>, kind: SupervisorKind) {
    let ended = match kind {
        SupervisorKind::Start(a) => run_new(&ctx, &a).await,
        SupervisorKind::Adopt(id) => run_adopted(&ctx, &id).await,
    };
    // Final state only after the logs before it are stored.
    let (tx, rx) = oneshot::channel();
    if ctx.ship.send(Ship::Flush(tx)).await.is_ok() {
        let _ = rx.await;
    }
    let _ = ctx.input.send(Input::Ended(ctx.part.clone(), ended)).await;
}

async fn run_new<R: ContainerRuntime>(ctx: &PartCtx<R>, a: &Assignment) -> Ended {
    // The node runs one job at a time (the scheduler places only on idle
    // nodes with enough healthy GPUs), so the part takes the first healthy ones.
    let want = a.spec.drover.gpus_per_instance as usize;
    let healthy = ctx.gpus.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if healthy.len() < want {
        let text = format!(
            "drover-agent: the part needs {want} healthy gpus but node {} has {}",
            ctx.config.node_id,
            healthy.len()
        );
        tracing::warn!(part = %ctx.part, error = %text, "part cannot run");
        let _ = ctx
            .ship
            .send(Ship::Line(ctx.line(LogStream::Stderr, text)))
            .await;
        return Ended {
            state: PartState::Failed,
            exit_code: None,
            container: None,
        };
    }
    let gpu_uuids: Vec<String> = healthy.into_iter().take(want).collect();
    let placement = Placement {
        job: a.job.clone(),
        node_rank: a.node_rank,
        attempt: a.attempt,
        owner: ctx.config.node_id.clone(),
        node_ips: a
            .nodes
            .iter()
            .map(|n| n.ip.clone().unwrap_or_else(|| "127.0.0.1".to_string()))
            .collect(),
        dedicated: ctx.config.dedicated,
        gpu_uuids,
        network_mode: ctx.config.job_network.clone(),
        outputs_root: ctx
            .config
            .data_dir
            .join("outputs")
            .join(&a.job)
            .join(a.attempt.to_string()),
        init_binary: ctx.config.init_binary.clone(),
        rank_grace: Duration::from_secs(10),
        extra_env: BTreeMap::new(),
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
                        let _ = ship.send(Ship::Line(lines.line(l.stream, l.text))).await;
                    }
                    PartEvent::Stopping { .. } => {}
                }
            }
        })
    };
    let outcome = ctx
        .runner
        .run(&a.spec, &placement, tx, ctx.cancel.clone())
        .await;
    let _ = forward.await;
    let container = container.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (state, exit_code) = match outcome {
        Ok(PartOutcome::Completed) => (PartState::Succeeded, Some(0)),
        Ok(PartOutcome::Failed { exit_code } | PartOutcome::OomKilled { exit_code }) => {
            (PartState::Failed, Some(exit_code))
        }
        Ok(PartOutcome::TimedOut) => (PartState::Failed, Some(124)),
        Ok(PartOutcome::Canceled) => (PartState::Stopped, None),
        Err(e) => {
            let text = format!(
                "drover-agent: running the part failed: {:#}",
                anyhow_chain(&e)
            );
            tracing::warn!(part = %ctx.part, error = %text, "part failed to run");
            let _ = ctx
                .ship
                .send(Ship::Line(ctx.line(LogStream::Stderr, text)))
                .await;
            (PartState::Failed, None)
        }
    };
    Ended {
        state,
        exit_code,
        container,
    }
}

/// The error and its sources, `: `-joined (the library has no anyhow).
fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Supervises a container this agent did not start in this session: ships
/// its output from now on and waits for it (stopping it when canceled).
async fn run_adopted<R: ContainerRuntime>(ctx: &PartCtx<R>, id: &str) -> Ended {
    let runtime = ctx.runner.runtime.clone();
    let since = SystemTime::now();
    let logs = {
        let mut stream = runtime.logs(id);
        let ship = ctx.ship.clone();
        let mk = ctx.clone();
        tokio::spawn(async move {
            while let Some(Ok(line)) = stream.next().await {
                // Lines from before the adoption were shipped by the agent that started it.
                let old = humantime::parse_rfc3339_weak(line.timestamp.trim_end_matches('Z'))
                    .ok()
                    .or_else(|| humantime::parse_rfc3339(&line.timestamp).ok())
                    .is_some_and(|t| t < since);
                if !old {
                    let _ = ship.send(Ship::Line(mk.line(line.stream, line.text))).await;
                }
            }
        })
    };
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
    let _ = tokio::time::timeout(Duration::from_secs(5), logs).await;
    let (state, exit_code) = match status {
        Ok(_) if stopped => (PartState::Stopped, None),
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
