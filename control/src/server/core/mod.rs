//! The control plane's core: every action the HTTP API offers, as plain
//! async methods over the store. No HTTP here; `http.rs` only translates.
//!
//! [`ControlPlane`] and its store turn, wake-up channels and scaling memory
//! live here; its methods are grouped by concern:
//! - `clusters` — the user API over clusters;
//! - `jobs` — the user API over jobs;
//! - `agents` — registration, heartbeats, assignments, log uploads;
//! - `scaling` — the scheduling pass and carrying out scaling plans;
//! - `reaping` — silent nodes and job timeouts;
//! - `wire_map` — store records to wire types.

mod agents;
mod clusters;
mod datastores;
mod environments;

pub use environments::VersionSelector;
mod exports;
mod files;
mod jobs;
mod reaping;
mod scaling;
mod wire_map;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_api::cluster::{JobState, NodeSummary, Timestamp};
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::error::ControlError;
use super::events::ServerMetrics;
use crate::autoscaler::AutoscalerConfig;
use crate::provider::Providers;
use crate::store::{Cluster, Node, Store, StoreError, VersionBump};

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Attempts a job gets before losing nodes fails it.
    pub max_attempts: u32,
    /// Heartbeat interval the server asks agents for.
    pub heartbeat_interval: Duration,
    /// How long a node may be silent before its work is requeued; agents
    /// are told, so that one cut off for longer stops its parts itself.
    pub grace: Duration,
    /// Long-poll timeout when the agent gives none.
    pub watch_timeout: Duration,
    /// The longest long-poll an agent may ask for.
    pub watch_timeout_max: Duration,
    /// Autoscaler settings.
    pub autoscaler: AutoscalerConfig,
    /// How long a machine a provider created may take to register before
    /// it is removed.
    pub register_timeout: Duration,
    /// Host folders no job may bind beside [`drover_api::host_paths::ALWAYS_REFUSED`]:
    /// the control plane's data directory (its store and admin token).
    pub refused_host_paths: Vec<PathBuf>,
    /// Where environment images are kept for every node (`None`: each node
    /// builds its own).
    pub environment_registry: Option<drover_api::environment::EnvironmentRegistry>,
    /// How long a node building an image for the registry holds the build
    /// before another node may take it.
    pub build_lease: Duration,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            max_attempts: 3,
            heartbeat_interval: Duration::from_secs(10),
            grace: Duration::from_secs(40),
            watch_timeout: Duration::from_secs(30),
            watch_timeout_max: Duration::from_secs(120),
            autoscaler: AutoscalerConfig::default(),
            register_timeout: Duration::from_secs(120),
            refused_host_paths: Vec::new(),
            environment_registry: None,
            build_lease: Duration::from_secs(30 * 60),
        }
    }
}

/// What the scaling loop remembers per cluster between passes.
#[derive(Debug, Clone, Default)]
struct ScalingMemo {
    last_scale_action: Option<Timestamp>,
    /// Every error of the provider at the last pass that acted or failed.
    provider_errors: Vec<String>,
    /// Machines the provider made whose agents have not registered yet,
    /// with when they were first seen: preparing nodes.
    pending: BTreeMap<String, Timestamp>,
    /// The join token handed to machines the provider creates; only its
    /// hash is stored, so a restarted server makes a new one.
    join_token: Option<String>,
    /// The cluster is being deleted: no scaling pass acts on it.
    deleting: bool,
}

impl ScalingMemo {
    /// Why the cluster may not reach its target: every provider error of
    /// the last pass, in the order they happened.
    fn reason(&self) -> Option<String> {
        (!self.provider_errors.is_empty()).then(|| self.provider_errors.join("; "))
    }
}

/// The control plane: the store plus the in-memory wake-up machinery.
///
/// Architecture Invariant: every store call goes through
/// [`ControlPlane::with_store`], on a blocking thread, one at a time.
#[derive(Debug)]
pub struct ControlPlane {
    store: Arc<Mutex<Store>>,
    /// One store call at a time: callers queue here as cheap async waiters
    /// instead of as blocking threads parked on the mutex.
    store_turn: Semaphore,
    /// One channel per node that someone watches: the latest version bumped.
    watchers: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Wakes the scheduling loop after any change that may allow a placement.
    changed: Notify,
    scaling: Mutex<HashMap<String, ScalingMemo>>,
    /// What creates and removes each cluster's machines.
    providers: Arc<Providers>,
    /// Counters of notable events.
    metrics: ServerMetrics,
    /// Ends long polls at shutdown, so that the HTTP server's graceful
    /// shutdown does not wait out every agent's poll timeout.
    shutdown: CancellationToken,
    /// When this control plane started: no node is silent before a whole
    /// grace period has passed since.
    started: Timestamp,
    config: CoreConfig,
    /// Where blobs are kept.
    artifacts: Option<Arc<crate::artifacts::ArtifactStore>>,
    /// Seals datastore secrets.
    secrets: Option<Arc<crate::secrets::Secrets>>,
    /// Wakes the exporter of datastore outputs.
    exports_wake: Notify,
}

/// The current time.
pub fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// A new random secret: 32 bytes from the OS, hex.
pub fn new_secret() -> Result<String, ControlError> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(ControlError::Random)?;
    Ok(hex(&bytes))
}

/// A short random id with a prefix (`job-1a2b3c4d`).
pub fn new_id(prefix: &str) -> Result<String, ControlError> {
    let mut bytes = [0u8; 4];
    getrandom::getrandom(&mut bytes).map_err(ControlError::Random)?;
    Ok(format!("{prefix}-{}", hex(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A cluster's status, read in one store call.
struct ClusterView {
    cluster: Cluster,
    nodes: Vec<NodeSummary>,
    jobs: Vec<drover_api::cluster::JobSummary>,
    errors: Vec<drover_api::cluster::ScalingError>,
}

/// Every cluster's status, read in one store call.
fn read_all_cluster_views(store: &Store) -> Result<Vec<ClusterView>, StoreError> {
    store
        .clusters()?
        .iter()
        .map(|c| read_cluster_view(store, &c.spec.name))
        .collect()
}

fn read_cluster_view(store: &Store, name: &str) -> Result<ClusterView, StoreError> {
    let cluster = store.cluster(name)?;
    Ok(ClusterView {
        nodes: store.node_summaries(name)?,
        jobs: store.job_summaries(
            name,
            &[JobState::Queued, JobState::Preparing, JobState::Running],
        )?,
        errors: store.scaling_errors(name)?,
        cluster,
    })
}

impl ControlPlane {
    /// A control plane over `store`.
    pub fn new(store: Store, config: CoreConfig) -> Self {
        ControlPlane {
            store: Arc::new(Mutex::new(store)),
            store_turn: Semaphore::new(1),
            watchers: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            scaling: Mutex::new(HashMap::new()),
            providers: Arc::new(Providers::default()),
            metrics: ServerMetrics::default(),
            shutdown: CancellationToken::new(),
            started: now(),
            config,
            artifacts: None,
            secrets: None,
            exports_wake: Notify::new(),
        }
    }

    /// Keeps blobs in `artifacts`.
    pub fn with_artifacts(mut self, artifacts: Arc<crate::artifacts::ArtifactStore>) -> Self {
        self.artifacts = Some(artifacts);
        self
    }

    /// Seals datastore secrets with `secrets`.
    pub fn with_secrets(mut self, secrets: Arc<crate::secrets::Secrets>) -> Self {
        self.secrets = Some(secrets);
        self
    }

    /// Uses `providers` for scaling (the default has only the static one).
    pub fn with_providers(mut self, providers: Arc<Providers>) -> Self {
        self.providers = providers;
        self
    }

    /// The server's metrics, as Prometheus text.
    pub async fn metrics_text(&self) -> Result<String, ControlError> {
        let clusters = self.clusters().await?;
        Ok(self.metrics.render(&clusters))
    }

    /// The providers scaling uses.
    pub fn providers(&self) -> &Providers {
        &self.providers
    }

    /// The token that stops the server; cancelling it also ends long polls.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The settings.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Runs `f` on the store on a blocking thread: SQLite calls block, and
    /// must not stall the async workers that answer long polls.
    pub async fn with_store<T, F>(&self, f: F) -> Result<T, ControlError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    {
        // Closed only if someone closes it, which nothing does.
        let _turn = self
            .store_turn
            .acquire()
            .await
            .map_err(|_| ControlError::Poisoned)?;
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || {
            let mut guard = store.lock().map_err(|_| ControlError::Poisoned)?;
            f(&mut guard).map_err(ControlError::from)
        })
        .await
        .map_err(ControlError::StoreTask)?
    }

    /// Waits until something changed that the scheduler should look at.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Tells the scheduler to look again.
    pub fn poke(&self) {
        self.changed.notify_one();
    }

    /// Wakes the watchers of the bumped nodes.
    pub fn wake(&self, bumps: &[VersionBump]) {
        let Ok(watchers) = self.watchers.lock() else {
            return;
        };
        for b in bumps {
            if let Some(tx) = watchers.get(&b.node) {
                tx.send_if_modified(|v| {
                    let newer = b.version > *v;
                    if newer {
                        *v = b.version;
                    }
                    newer
                });
            }
        }
    }

    fn subscribe(&self, node: &str) -> Result<watch::Receiver<u64>, ControlError> {
        let mut watchers = self.watchers.lock().map_err(|_| ControlError::Poisoned)?;
        Ok(watchers
            .entry(node.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe())
    }

    /// Drops a node's channel once nobody watches it, so the map stays as
    /// small as the set of agents currently polling.
    fn unsubscribe(&self, node: &str, rx: watch::Receiver<u64>) {
        drop(rx);
        let Ok(mut watchers) = self.watchers.lock() else {
            return;
        };
        if watchers
            .get(node)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            watchers.remove(node);
        }
    }

    /// The name of the user API token `token`.
    pub async fn authenticate_user(&self, token: &str) -> Result<String, ControlError> {
        let token = token.to_string();
        self.with_store(move |s| s.api_token_name(&token))
            .await?
            .ok_or_else(|| ControlError::Unauthorized("invalid api token".to_string()))
    }

    /// The node whose credential is `credential`.
    pub async fn authenticate_node(&self, credential: &str) -> Result<Node, ControlError> {
        let credential = credential.to_string();
        self.with_store(move |s| s.node_by_credential(&credential))
            .await?
            .ok_or_else(|| ControlError::Unauthorized("invalid node credential".to_string()))
    }

    fn memo(&self, cluster: &str) -> ScalingMemo {
        self.scaling
            .lock()
            .ok()
            .and_then(|m| m.get(cluster).cloned())
            .unwrap_or_default()
    }
}
