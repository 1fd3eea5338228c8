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
//!                           [part supervisor] ── materialize, PartRunner::run / adopted wait+logs, upload
//!                               │ PartEvent (256) → lines to log-shipper, states to Reports
//!                               └── Input::Ended (after outputs are posted, lines flushed) ──► reconciler
//! ```
//!
//! With IMDS: `[imds-scheduled-events]` ──EventsUpdate (8)──► `[maintenance]`
//! ──Input::Maintenance──► reconciler (drain, shorten or end a drain;
//! acknowledge after). When IMDS did not answer before start,
//! `[imds-instance]` keeps asking, then reports the VM (a heartbeat with its
//! address and inventory, `Input::Vm`) and hands its name to `[maintenance]`.
//!
//! With `--metrics-listen`: `[metrics]` (`crate::http::serve` with
//! `crate::http::metrics::router`) answers `GET /metrics` from the
//! `Metrics` that heartbeat and supervisors update.
//!
//! With `--identity-listen` (on by default): `[identity]`
//! (`crate::http::serve` with `crate::http::identity::router`) answers job
//! containers' token requests from `crate::identity::IdentityService`,
//! whose part secrets the supervisors register while their parts run, and
//! asks IMDS through the node's `drover_imds` client (its token cache).
//!
//! Shutdown: the `shutdown` token (SIGTERM/SIGINT) or a maintenance event ends the reconciler's
//! loop and starts the drain (no new parts, heartbeat says `leaving`, parts
//! run until the drain deadline, then are canceled and stopped with the
//! grace period); once every supervisor has reported, a final heartbeat
//! goes out, scheduled events are acknowledged, and the `io` token stops
//! watch, heartbeat, log-shipper and the IMDS tasks, which are all joined
//! before [`run`] returns. Each part has its own token, canceled by the
//! reconciler. The metrics endpoint stops on `shutdown` (or when the
//! agent ends), the identity endpoint once every part has stopped; both are
//! joined last.
//!
//! State that must survive the agent lives in Docker labels and the control
//! plane: containers are kept after they exit (`RunOptions::remove` is
//! false) until the server has accepted their final state, so a part that
//! ended while the agent was down is still reported with its exit code.
//!
//! One module per task, each saying what it reads and writes:
//! `credentials` (the saved credential, `connect`, `register`), `watch`,
//! `heartbeat`, `maintenance`, `instance` (`imds-instance`), `logs`
//! (`log-shipper`), `reconciler`,
//! `supervisor` (one task per part); `state` holds what they share behind
//! mutexes (`Reports`, `HealthyGpus`). This module wires them: it makes the
//! channels and tokens, spawns the tasks and joins them.

mod credentials;
mod fence;
mod heartbeat;
mod instance;
mod logs;
mod maintenance;
mod reconciler;
mod state;
mod supervisor;
mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_api::wire::{Assignments, GpuCounts, NewLogLine};
use drover_runner::PartRunner;
use drover_runner::runtime::ContainerRuntime;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::control_client::ClientError;
use crate::inventory::{GpuHealth, Inventory};
use crate::metrics::Metrics;
use crate::reconcile::Known;
use credentials::connect;
use drover_api::wire::PartKey;
use heartbeat::{HeartbeatCtx, heartbeat_task};
pub use instance::{NodeImds, VmFacts};
use logs::ship_task;
pub use logs::{MAX_BATCH, MAX_BATCH_BYTES, MAX_LINE_BYTES};
use reconciler::Reconciler;
use state::{Contact, Ended, HealthyGpus, SharedReports, healthy_uuids};
use watch::watch_task;

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
    /// Where `/metrics` listens, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the token endpoint listens (`None`: nowhere, and parts get no
    /// identity variables).
    pub identity_listen: Option<SocketAddr>,
    /// Each part's rate limit on the token endpoint.
    pub identity_rate: crate::identity::limit::RateLimit,
    /// The node's IMDS: scheduled events are watched once the VM's name is
    /// known.
    pub imds: Option<NodeImds>,
    /// Docker network mode of single-node parts; the engine's default (a
    /// bridge of their own) when `None`.
    pub job_network: Option<String>,
    /// Docker network mode that puts a container in the node's own network,
    /// so that its address is the node's: `host` on a VM, the node
    /// container's namespace (`container:<id>`) on a local cluster. Every
    /// multi-node part runs in it: its peers reach it at the node address
    /// the control plane lists, whatever `job_network` says.
    pub node_network: String,
    /// Stop every part when cut off from the control plane for longer than
    /// its grace period (see `fence`); off for clusters that prefer their
    /// jobs to run on through a partition.
    pub self_fence: bool,
    /// The most bytes the node cache (code snapshots and inputs) keeps
    /// after evicting its least recently used entries.
    pub cache_max_bytes: u64,
    /// The IMDS firewall, installed before the daemon starts and kept
    /// while it runs (`None`: no IMDS, or the firewall is turned off).
    pub imds_firewall: Option<crate::firewall::ImdsFirewall>,
    /// Image collection by disk pressure (`None`: off).
    pub image_gc: Option<crate::images::collect::CollectConfig>,
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

/// What supervisors share about images: the ledger, the images assigned
/// parts need, and the collector's wake-up.
#[derive(Debug, Clone)]
pub(crate) struct PartImages {
    pub(crate) ledger: Arc<crate::images::ledger::ImageLedger>,
    pub(crate) needed: crate::images::collect::NeededImages,
    pub(crate) wake: Arc<tokio::sync::Notify>,
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The image ledger in the data dir cannot be read.
    #[error("cannot open the image ledger: {0}")]
    Images(String),
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
    /// The token endpoint's listener could not be bound.
    #[error(
        "binding the identity token endpoint on {addr} failed (another agent on this host? give each its own --identity-listen)"
    )]
    IdentityListen {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The token endpoint's audit log could not be opened.
    #[error(transparent)]
    IdentityAudit(#[from] crate::identity::audit::AuditError),
}

/// Inputs of the reconciler loop.
#[derive(Debug)]
enum Input {
    /// The control plane's desired state.
    Desired(Assignments),
    /// A supervisor finished.
    Ended(PartKey, Ended),
    /// The server accepted these final states: remove their containers.
    Acked(Vec<(PartKey, Option<String>)>),
    /// The server no longer wants these parts.
    Rejected(Vec<PartKey>),
    /// Cut off from the control plane past its grace: stop every part now.
    CutOff,
    /// The control plane answers again after a cut-off.
    Reconnected,
    /// What IMDS's scheduled events now ask for (sent at each change): a
    /// drain that ends this VM's containers (a Preempt or Terminate also
    /// makes the node say `preempted`, so its job is requeued without
    /// waiting for silence), or `None` when no event needs one any more.
    Maintenance(Option<maintenance::Drain>),
    /// The instance metadata came after start: parts started from now on
    /// are told whether the VM is dedicated.
    Vm {
        /// False on spot and low-priority VMs.
        dedicated: bool,
    },
}

/// Items of the log shipper.
#[derive(Debug)]
enum Ship {
    Line(NewLogLine),
    /// Answered once every line sent before it is uploaded (or dropped at shutdown).
    Flush(oneshot::Sender<()>),
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
    // Its own token: the daemon also ends without `shutdown` (after a drain
    // the VM's scheduled events asked for).
    let firewall_stop = CancellationToken::new();
    let firewall_task = config.imds_firewall.clone().map(|fw| {
        tokio::spawn(crate::firewall::keep(
            fw,
            metrics.clone(),
            firewall_stop.clone(),
        ))
    });
    // The endpoints stop when the agent does: metrics at `shutdown` or
    // at the end (a drain for scheduled events fires no `shutdown`), the
    // token endpoint only once every part has stopped (parts draining
    // still need tokens).
    let metrics_stop = shutdown.child_token();
    let identity_stop = CancellationToken::new();
    // …and on every early return below.
    let _stop_endpoints = (
        metrics_stop.clone().drop_guard(),
        identity_stop.clone().drop_guard(),
    );
    let metrics_task = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?;
            tracing::info!(addr = %addr, "metrics listening");
            Some(tokio::spawn(crate::http::serve(
                listener,
                crate::http::metrics::router(metrics.clone()),
                metrics_stop.clone(),
            )))
        }
        None => None,
    };
    let identity = match config.identity_listen {
        Some(addr) => Some(start_identity(&config, addr, &metrics, &identity_stop).await?),
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
    let Some(joined) = connect(&config, &inv, &shutdown).await? else {
        return Ok(());
    };
    let client = joined.client;
    tracing::info!(node = %config.node_id, cluster = %config.cluster, "agent joined");
    let materializer = crate::files::materialize::Materializer {
        client: client.clone(),
        cache: crate::files::cache::Cache::new(
            config.data_dir.join(crate::files::CACHE_DIR),
            config.cache_max_bytes,
        ),
        urls: crate::files::url::UrlClient::new().map_err(ClientError::Build)?,
    };

    // A VM learnt after start joins the inventories from then on.
    let late_vm = instance::LateVm::default();
    let inventory = late_vm.overlay(inventory);
    let reports: SharedReports = Arc::default();
    let draining = Arc::new(AtomicBool::new(false));
    let preempted = Arc::new(AtomicBool::new(false));
    // The I/O tasks outlive the drain so the last states reach the server.
    let io = CancellationToken::new();
    let (input_tx, input_rx) = mpsc::channel::<Input>(64);
    let (ship_tx, ship_rx) = mpsc::channel::<Ship>(4096);
    let (beat_tx, beat_rx) = mpsc::channel::<oneshot::Sender<()>>(4);
    let contact: Contact = Arc::new(Mutex::new(std::time::Instant::now()));

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
        inventory: inventory.clone(),
        input: input_tx.clone(),
        now: beat_rx,
        metrics: metrics.clone(),
        gpus: gpus.clone(),
        contact: contact.clone(),
        io: io.clone(),
    }));
    let fence = config.self_fence.then(|| {
        tokio::spawn(fence::fence_task(
            contact,
            joined.grace,
            input_tx.clone(),
            io.clone(),
        ))
    });
    let shipper = tokio::spawn(ship_task(client.clone(), ship_rx, io.clone()));
    let mut instance_task = None;
    let mut maintenance = config.imds.clone().map(|imds| {
        let vm = match &imds.vm {
            Some(facts) => maintenance::VmName::Known(facts.vm.name.clone()),
            None => {
                let (vm_name, later) = oneshot::channel();
                instance_task = Some(tokio::spawn(instance::instance_task(
                    instance::InstanceCtx {
                        imds: imds.client.clone(),
                        address_from_imds: imds.address_from_imds,
                        control: client.clone(),
                        inventory: inventory.clone(),
                        late: late_vm.clone(),
                        input: input_tx.clone(),
                        vm_name,
                        io: io.clone(),
                    },
                )));
                maintenance::VmName::Later(later)
            }
        };
        // Parts are stopped twice their grace before an event may start.
        maintenance::spawn(
            imds.client,
            vm,
            input_tx.clone(),
            config.stop_grace * 2,
            io.clone(),
        )
    });
    // The images this agent brought here, and their collection.
    let images = PartImages {
        ledger: Arc::new(
            crate::images::ledger::ImageLedger::open(&config.data_dir)
                .map_err(|e| DaemonError::Images(e.to_string()))?,
        ),
        needed: crate::images::collect::NeededImages::default(),
        wake: Arc::new(tokio::sync::Notify::new()),
    };
    let collector_stop = CancellationToken::new();
    let collector = config.image_gc.clone().map(|gc| {
        tokio::spawn(crate::images::collect::collector_task(
            runner.clone(),
            images.ledger.clone(),
            images.needed.clone(),
            gc,
            metrics.clone(),
            images.wake.clone(),
            collector_stop.clone(),
        ))
    });
    let registry_login = crate::registry_login::RegistryLogin::new(
        config.imds.as_ref().map(|i| i.client.clone()),
        metrics.clone(),
    );
    let reconciler = Reconciler {
        images,
        config: config.clone(),
        runner,
        reports,
        draining,
        preempted,
        input: input_tx,
        ship: ship_tx,
        metrics,
        gpus,
        materializer,
        identity: identity.as_ref().map(|(service, _)| service.clone()),
        registry_login,
        fenced: Arc::new(AtomicBool::new(false)),
        supervisors: BTreeMap::new(),
        known: Known::default(),
        desired: None,
        collecting: Default::default(),
    };
    let drained_for_events = reconciler.run(input_rx, beat_tx, shutdown.clone()).await;
    if let Some(m) = &mut maintenance {
        // The parts are stopped: the platform may go ahead now.
        m.finish(drained_for_events).await;
    }
    io.cancel();
    if let Some(m) = maintenance {
        m.join().await;
    }
    if let Some(t) = instance_task
        && let Err(e) = t.await
    {
        tracing::error!(task = "imds-instance", error = %e, "task panicked");
    }
    if let Some(task) = fence {
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
    metrics_stop.cancel();
    identity_stop.cancel();
    collector_stop.cancel();
    if let Some(t) = collector {
        let _ = t.await;
    }
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    // The rules stay after the agent stops: job containers outlive it
    // (they are adopted after a restart) and must not reach IMDS meanwhile.
    firewall_stop.cancel();
    if let Some(t) = firewall_task {
        let _ = t.await;
    }
    if let Some((_, t)) = identity {
        let _ = t.await;
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// Binds the token endpoint, opens its audit log and serves it until
/// `stop` (the `[identity]` task). Parts reach it at the address
/// bound: loopback when that is unspecified (`0.0.0.0`), as job
/// containers sharing the node's network reach the agent there.
async fn start_identity(
    config: &DaemonConfig,
    addr: SocketAddr,
    metrics: &Arc<Metrics>,
    stop: &CancellationToken,
) -> Result<
    (
        Arc<crate::identity::IdentityService>,
        tokio::task::JoinHandle<()>,
    ),
    DaemonError,
> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::IdentityListen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| DaemonError::IdentityListen { addr, source })?;
    let host = match bound.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
        ip if ip.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let endpoint = format!("http://{host}:{}", bound.port());
    let audit = crate::identity::audit::AuditLog::open(&config.data_dir)?;
    tracing::info!(addr = %bound, endpoint = %endpoint, audit = %audit.path().display(), "identity token endpoint listening");
    let service = Arc::new(crate::identity::IdentityService::new(
        endpoint,
        config.identity_rate,
        config.imds.as_ref().map(|i| i.client.clone()),
        audit,
        metrics.clone(),
    ));
    let task = tokio::spawn(crate::http::serve(
        listener,
        crate::http::identity::router(service.clone()),
        stop.clone(),
    ));
    Ok((service, task))
}
