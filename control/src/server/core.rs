//! The control plane's core: every action the HTTP API offers, as plain
//! async methods over the store. No HTTP here; `http.rs` only translates.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_api::cluster::{
    ClusterStatus, JobState, NodeState, NodeStateCounts, NodeSummary, Timestamp,
};
use drover_api::compute::{ComputeSpec, ComputeUpdate, Naming};
use drover_api::wire;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::error::ControlError;
use super::events::{Event, ServerMetrics};
use crate::autoscaler::{self, AutoscaleInput, AutoscalerConfig};
use crate::provider::{Provider, Providers, ProvisionState};
use crate::store::{
    Cluster, Heartbeat, Job, JobFilter, JobPart, NewJob, NewLogLine, NewNode, Node, NodeInventory,
    Store, StoreError, VersionBump,
};

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Attempts a job gets before losing nodes fails it.
    pub max_attempts: u32,
    /// Heartbeat interval the server asks agents for.
    pub heartbeat_interval: Duration,
    /// Long-poll timeout when the agent gives none.
    pub watch_timeout: Duration,
    /// The longest long-poll an agent may ask for.
    pub watch_timeout_max: Duration,
    /// Autoscaler settings.
    pub autoscaler: AutoscalerConfig,
    /// How long a machine a provider created may take to register before
    /// it is removed.
    pub register_timeout: Duration,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            max_attempts: 3,
            heartbeat_interval: Duration::from_secs(10),
            watch_timeout: Duration::from_secs(30),
            watch_timeout_max: Duration::from_secs(120),
            autoscaler: AutoscalerConfig::default(),
            register_timeout: Duration::from_secs(120),
        }
    }
}

/// What the scaling loop remembers per cluster between passes.
#[derive(Debug, Clone, Default)]
struct ScalingMemo {
    last_scale_action: Option<Timestamp>,
    provider_error: Option<String>,
    /// Machines the provider made whose agents have not registered yet,
    /// with when they were first seen: preparing nodes.
    pending: BTreeMap<String, Timestamp>,
    /// The join token handed to machines the provider creates; only its
    /// hash is stored, so a restarted server makes a new one.
    join_token: Option<String>,
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
    config: CoreConfig,
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

fn part_info(p: JobPart) -> wire::PartInfo {
    wire::PartInfo {
        attempt: p.attempt,
        node_rank: p.node_rank,
        node: p.node,
        state: p.state,
        exit_code: p.exit_code,
        started_at: p.started_at,
        ended_at: p.ended_at,
    }
}

fn job_info(job: Job, parts: Vec<JobPart>, with_spec: bool) -> wire::JobInfo {
    wire::JobInfo {
        instance_count: job.spec.resources.instance_count,
        spec: with_spec.then_some(job.spec),
        id: job.id,
        cluster: job.cluster,
        state: job.state,
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        submitted_at: job.submitted_at,
        started_at: job.started_at,
        ended_at: job.ended_at,
        failure_reason: job.failure_reason,
        parts: parts.into_iter().map(part_info).collect(),
    }
}

fn node_info(n: Node) -> wire::NodeInfo {
    wire::NodeInfo {
        id: n.id,
        cluster: n.cluster,
        state: n.state,
        ip: n.ip,
        healthy_gpus: n.inventory.healthy_gpus,
        total_gpus: n.inventory.total_gpus,
        registered_at: n.registered_at,
        last_heartbeat: n.last_heartbeat,
        current_job: n.current_job,
    }
}

/// A cluster's status, read in one store call.
struct ClusterView {
    cluster: Cluster,
    nodes: Vec<NodeSummary>,
    jobs: Vec<drover_api::cluster::JobSummary>,
    errors: Vec<drover_api::cluster::ScalingError>,
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

/// Why a registered node's machine is removed.
#[derive(Debug, Clone, Copy)]
enum Removal {
    /// Scale-down of an idle node.
    Idle,
    /// A lost or preempted node holding nothing.
    Dead,
}

/// Machines that have not registered yet count as preparing nodes.
fn add_pending(nodes: &mut Vec<NodeSummary>, pending: &BTreeMap<String, Timestamp>) {
    for (id, since) in pending {
        if nodes.iter().any(|n| &n.id == id) {
            continue;
        }
        nodes.push(NodeSummary {
            id: id.clone(),
            state: NodeState::Preparing,
            healthy_gpus: 0,
            total_gpus: 0,
            last_heartbeat: *since,
            free_since: None,
            current_job: None,
        });
    }
}

/// The GPU count of a cluster's nodes, when any has registered.
fn node_gpus(nodes: &[NodeSummary]) -> Option<u32> {
    nodes.iter().map(|n| n.total_gpus).max()
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
            config,
        }
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

    fn cluster_info(&self, mut view: ClusterView) -> wire::ClusterInfo {
        let memo = self.memo(&view.cluster.spec.name);
        add_pending(&mut view.nodes, &memo.pending);
        let decision = autoscaler::decide(
            &AutoscaleInput {
                spec: &view.cluster.spec,
                nodes: &view.nodes,
                jobs: &view.jobs,
                now: now(),
                last_scale_action: memo.last_scale_action,
                provider_error: memo.provider_error.as_deref(),
            },
            &self.config.autoscaler,
        );
        wire::ClusterInfo {
            status: ClusterStatus {
                allocation_state: decision.allocation_state,
                current_node_count: decision.current,
                target_node_count: decision.target,
                node_state_counts: NodeStateCounts::of(&view.nodes),
                errors: view.errors,
            },
            created_at: view.cluster.created_at,
            updated_at: view.cluster.updated_at,
            spec: view.cluster.spec,
        }
    }

    /// Creates a cluster and its join token.
    pub async fn create_cluster(
        &self,
        spec: ComputeSpec,
    ) -> Result<wire::ClusterCreated, ControlError> {
        spec.validate(Naming::Fields)?;
        let join_token = new_secret()?;
        let token = join_token.clone();
        let view = self
            .with_store(move |s| {
                s.create_cluster(&spec, &token, now())?;
                read_cluster_view(s, &spec.name)
            })
            .await?;
        self.poke();
        Ok(wire::ClusterCreated {
            cluster: self.cluster_info(view),
            join_token,
        })
    }

    /// Changes a cluster's node counts or idle time.
    pub async fn update_cluster(
        &self,
        name: String,
        update: ComputeUpdate,
    ) -> Result<wire::ClusterInfo, ControlError> {
        let view = self
            .with_store(
                move |s| -> Result<Result<ClusterView, ControlError>, StoreError> {
                    let current = s.cluster(&name)?;
                    let spec = match current.spec.updated(&update, Naming::Fields) {
                        Ok(spec) => spec,
                        Err(e) => return Ok(Err(e.into())),
                    };
                    s.update_cluster(&spec, now())?;
                    Ok(Ok(read_cluster_view(s, &name)?))
                },
            )
            .await??;
        self.poke();
        Ok(self.cluster_info(view))
    }

    /// One cluster with its status.
    pub async fn cluster(&self, name: String) -> Result<wire::ClusterInfo, ControlError> {
        let view = self
            .with_store(move |s| read_cluster_view(s, &name))
            .await?;
        Ok(self.cluster_info(view))
    }

    /// Every cluster with its status.
    pub async fn clusters(&self) -> Result<wire::ClusterList, ControlError> {
        let views = self
            .with_store(|s| {
                s.clusters()?
                    .iter()
                    .map(|c| read_cluster_view(s, &c.spec.name))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        Ok(wire::ClusterList {
            clusters: views.into_iter().map(|v| self.cluster_info(v)).collect(),
        })
    }

    /// Deletes a cluster without nodes or unfinished jobs.
    pub async fn delete_cluster(&self, name: String) -> Result<(), ControlError> {
        let key = name.clone();
        let spec = self
            .with_store(move |s| {
                let spec = s.cluster(&name)?.spec;
                s.delete_cluster(&name)?;
                Ok(spec)
            })
            .await?;
        if let Ok(mut m) = self.scaling.lock() {
            m.remove(&key);
        }
        // The cluster is gone either way; a leftover network is only logged.
        if let Err(e) = self
            .providers
            .for_cluster(&spec)
            .cluster_deleted(&spec)
            .await
        {
            tracing::warn!(cluster = %key, error = %e, "releasing the cluster's provider resources failed");
        }
        Ok(())
    }

    /// Queues a job, refusing one that could never start on its cluster.
    pub async fn submit_job(&self, req: wire::JobSubmit) -> Result<wire::JobInfo, ControlError> {
        let wire::JobSubmit { mut spec, compute } = req;
        let cluster = compute.or_else(|| spec.compute.clone()).ok_or_else(|| {
            ControlError::Invalid(
                "the job names no cluster: set `compute:` in the job or pass --compute".to_string(),
            )
        })?;
        spec.compute = Some(cluster.clone());
        let id = match &spec.name {
            Some(name) if drover_api::job::is_valid_name(name) => name.clone(),
            Some(name) => {
                return Err(ControlError::Invalid(format!(
                    "job name `{name}` is not valid: use letters, digits, `_` and `-`, starting with a letter or digit"
                )));
            }
            None => new_id("job")?,
        };
        spec.name = Some(id.clone());
        let max_attempts = self.config.max_attempts;
        let job = self
            .with_store(move |s| -> Result<Result<Job, ControlError>, StoreError> {
                let c = s.cluster(&cluster)?;
                let nodes = s.node_summaries(&cluster)?;
                if let Err(e) = autoscaler::check_submission(
                    &c.spec,
                    spec.resources.instance_count,
                    spec.drover.gpus_per_instance,
                    node_gpus(&nodes),
                ) {
                    return Ok(Err(e.into()));
                }
                let job = s.submit_job(
                    &NewJob {
                        id: &id,
                        cluster: &cluster,
                        spec: &spec,
                        max_attempts,
                    },
                    now(),
                )?;
                Ok(Ok(job))
            })
            .await??;
        self.poke();
        Ok(job_info(job, Vec::new(), true))
    }

    /// One job with its parts and spec.
    pub async fn job(&self, id: String) -> Result<wire::JobInfo, ControlError> {
        let (job, parts) = self
            .with_store(move |s| Ok((s.job(&id)?, s.job_parts(&id)?)))
            .await?;
        Ok(job_info(job, parts, true))
    }

    /// Jobs, optionally of one cluster, in submission order.
    pub async fn jobs(&self, cluster: Option<String>) -> Result<wire::JobList, ControlError> {
        let jobs = self
            .with_store(move |s| {
                if let Some(c) = &cluster {
                    s.cluster(c)?;
                }
                s.jobs(&JobFilter {
                    cluster: cluster.as_deref(),
                    states: &[],
                })
            })
            .await?;
        Ok(wire::JobList {
            jobs: jobs
                .into_iter()
                .map(|j| job_info(j, Vec::new(), false))
                .collect(),
        })
    }

    /// Cancels a job that has not ended; its nodes' agents are woken.
    pub async fn cancel_job(&self, id: String) -> Result<wire::JobInfo, ControlError> {
        let (t, parts) = self
            .with_store(move |s| {
                let t = s.cancel_job(&id, now())?;
                let parts = s.job_parts(&id)?;
                Ok((t, parts))
            })
            .await?;
        self.wake(&t.bumped);
        self.poke();
        Ok(job_info(t.job, parts, true))
    }

    /// A page of a job's log.
    pub async fn job_logs(
        &self,
        id: String,
        from: u64,
        limit: usize,
    ) -> Result<wire::LogPage, ControlError> {
        let (page, state) = self
            .with_store(move |s| {
                let state = s.job(&id)?.state;
                Ok((s.read_logs(&id, from, limit)?, state))
            })
            .await?;
        Ok(wire::LogPage {
            lines: page
                .lines
                .into_iter()
                .map(|l| wire::LogLine {
                    seq: l.seq,
                    at: l.at,
                    attempt: l.attempt,
                    node_rank: l.node_rank,
                    stream: l.stream,
                    text: l.text,
                })
                .collect(),
            next_seq: page.next_seq,
            first_seq: page.first_seq,
            end_seq: page.end_seq,
            job_state: state,
        })
    }

    /// Nodes, optionally of one cluster.
    pub async fn nodes(&self, cluster: Option<String>) -> Result<wire::NodeList, ControlError> {
        let nodes = self
            .with_store(move |s| match &cluster {
                Some(c) => s.nodes(c),
                None => s.all_nodes(),
            })
            .await?;
        Ok(wire::NodeList {
            nodes: nodes.into_iter().map(node_info).collect(),
        })
    }

    /// Registers a node that presents its cluster's join token.
    pub async fn register(
        &self,
        req: wire::RegisterRequest,
    ) -> Result<wire::RegisterResponse, ControlError> {
        let node_id = match req.node_id.clone() {
            Some(id) if drover_api::job::is_valid_name(&id) => id,
            Some(id) => {
                return Err(ControlError::Invalid(format!(
                    "node id `{id}` is not valid: use letters, digits, `_` and `-`"
                )));
            }
            None => new_id("node")?,
        };
        let credential = new_secret()?;
        let cred = credential.clone();
        let id = node_id.clone();
        let registered = self
            .with_store(move |s| -> Result<Result<Node, ControlError>, StoreError> {
                // Unknown cluster and wrong token answer alike, so the
                // endpoint does not tell which cluster names exist.
                match s.verify_join_token(&req.cluster, &req.join_token) {
                    Ok(true) => {}
                    Ok(false) | Err(StoreError::NotFound { .. }) => {
                        return Ok(Err(ControlError::Unauthorized(format!(
                            "invalid join token for cluster `{}`",
                            req.cluster
                        ))));
                    }
                    Err(e) => return Err(e),
                }
                let inventory = NodeInventory {
                    healthy_gpus: req.gpus.healthy,
                    total_gpus: req.gpus.total,
                    details: req.inventory,
                };
                // An agent that lost its credential (a reinstalled machine)
                // may take its id back as long as the old node holds no work.
                if let Ok(old) = s.node(&id) {
                    if old.cluster != req.cluster || old.current_job.is_some() {
                        return Err(StoreError::AlreadyExists {
                            kind: "node",
                            name: id,
                        });
                    }
                    s.remove_node(&id)?;
                }
                let node = s.register_node(
                    &NewNode {
                        id: &id,
                        cluster: &req.cluster,
                        ip: req.ip.as_deref(),
                        inventory: &inventory,
                        credential: &cred,
                    },
                    now(),
                )?;
                Ok(Ok(node))
            })
            .await??;
        tracing::info!(node = %registered.id, cluster = %registered.cluster, "agent registered");
        self.poke();
        Ok(wire::RegisterResponse {
            node_id,
            credential,
            heartbeat_interval_seconds: self.config.heartbeat_interval.as_secs(),
        })
    }

    /// Records a heartbeat and the part states it carries, authenticating
    /// the node by its credential in the same turn through the store. The heartbeat is the server's hottest call
    /// (one per node every 10 s); a separate turn just to authenticate would
    /// double its queueing behind the store's single connection.
    pub async fn heartbeat_with_credential(
        &self,
        credential: &str,
        req: wire::HeartbeatRequest,
    ) -> Result<wire::HeartbeatResponse, ControlError> {
        let credential = credential.to_string();
        let applied = self
            .with_store(move |s| {
                let Some(node) = s.node_by_credential(&credential)? else {
                    return Ok(Err(ControlError::Unauthorized(
                        "invalid node credential".to_string(),
                    )));
                };
                if let Err(e) = check_requested_state(&node, req.state) {
                    return Ok(Err(e));
                }
                apply_heartbeat(s, &node, req).map(Ok)
            })
            .await??;
        Ok(self.heartbeat_applied(applied))
    }

    fn heartbeat_applied(&self, applied: HeartbeatApplied) -> wire::HeartbeatResponse {
        let HeartbeatApplied {
            bumps,
            rejected,
            relevant,
            version,
            preempted,
        } = applied;
        self.metrics.heartbeat();
        if let Some(node) = &preempted {
            self.metrics.emit(Event::NodeLost {
                node,
                state: NodeState::Preempted,
            });
        }
        self.wake(&bumps);
        if relevant {
            self.poke();
        }
        wire::HeartbeatResponse {
            desired_version: version,
            rejected,
        }
    }

    /// What `node` should run: at once when its version is newer than
    /// `seen`, else when it changes, else after `timeout` (capped).
    pub async fn assignments(
        &self,
        node: String,
        seen: u64,
        timeout: Option<Duration>,
    ) -> Result<wire::Assignments, ControlError> {
        let timeout = timeout
            .unwrap_or(self.config.watch_timeout)
            .min(self.config.watch_timeout_max);
        // Subscribe before reading the version so that a bump between the
        // read and the wait is not missed.
        let mut rx = self.subscribe(&node)?;
        let id = node.clone();
        let current = self.with_store(move |s| s.desired_version(&id)).await?;
        if current <= seen {
            let wait = async {
                loop {
                    if rx.changed().await.is_err() {
                        break;
                    }
                    if *rx.borrow_and_update() > seen {
                        break;
                    }
                }
            };
            // Timing out is the normal end of a quiet poll; at shutdown the
            // agent gets what it has now and polls the next server.
            tokio::select! {
                _ = tokio::time::timeout(timeout, wait) => {}
                _ = self.shutdown.cancelled() => {}
            }
        }
        self.unsubscribe(&node, rx);
        let a = self.with_store(move |s| s.assignments(&node)).await?;
        Ok(wire::Assignments {
            version: a.version,
            parts: a
                .parts
                .into_iter()
                .map(|p| wire::Assignment {
                    job: p.job,
                    attempt: p.attempt,
                    node_rank: p.node_rank,
                    state: p.state,
                    spec: p.spec,
                    nodes: p
                        .nodes
                        .into_iter()
                        .map(|n| wire::PeerNode { id: n.id, ip: n.ip })
                        .collect(),
                })
                .collect(),
        })
    }

    /// Stores log lines of parts placed on `node`.
    pub async fn upload_logs(
        &self,
        node: String,
        batch: wire::LogBatch,
    ) -> Result<wire::LogBatchAccepted, ControlError> {
        let accepted = self
            .with_store(move |s| -> Result<Result<u64, ControlError>, StoreError> {
                let mut by_job: HashMap<&str, Vec<&wire::NewLogLine>> = HashMap::new();
                for l in &batch.lines {
                    by_job.entry(l.job.as_str()).or_default().push(l);
                }
                let mut accepted = 0u64;
                for (job, lines) in by_job {
                    let parts = s.job_parts(job)?;
                    // A node writes only the logs of parts it was given.
                    let own = |l: &&wire::NewLogLine| {
                        parts.iter().any(|p| {
                            p.node == node && p.attempt == l.attempt && p.node_rank == l.node_rank
                        })
                    };
                    if !lines.iter().all(own) {
                        return Ok(Err(ControlError::Forbidden(format!(
                            "node `{node}` holds no such part of job `{job}`"
                        ))));
                    }
                    let new: Vec<NewLogLine<'_>> = lines
                        .iter()
                        .map(|l| NewLogLine {
                            at: l.at,
                            attempt: l.attempt,
                            node_rank: l.node_rank,
                            stream: l.stream,
                            text: &l.text,
                        })
                        .collect();
                    s.append_logs(job, &new)?;
                    accepted += new.len() as u64;
                }
                Ok(Ok(accepted))
            })
            .await??;
        Ok(wire::LogBatchAccepted { accepted })
    }

    /// One scheduling and scaling pass over every cluster: places what can
    /// start (waking those nodes' watchers) and asks the provider for what
    /// the autoscaler wants, remembering its errors.
    pub async fn schedule_pass(&self) -> Result<(), ControlError> {
        let t = now();
        let views = self
            .with_store(|s| {
                s.clusters()?
                    .iter()
                    .map(|c| read_cluster_view(s, &c.spec.name))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        for view in views {
            let plan = crate::scheduler::schedule(&view.cluster.spec, &view.nodes, &view.jobs);
            for placement in plan.placements {
                let job = placement.job_id.clone();
                match self
                    .with_store(move |s| {
                        s.record_placement(&placement.job_id, &placement.nodes, now())
                    })
                    .await
                {
                    Ok(placed) => self.wake(&placed.bumped),
                    // A heartbeat or cancel raced the pass; the next pass sees it.
                    Err(e) => tracing::debug!(job = %job, error = %e, "placement refused"),
                }
            }
            self.scale(&view.cluster.spec, t).await?;
        }
        Ok(())
    }

    /// The join token for machines the provider creates in `cluster`: made
    /// (and its hash stored) on first use after a start.
    async fn provision_token(&self, cluster: &str) -> Result<String, ControlError> {
        if let Some(t) = self.memo(cluster).join_token {
            return Ok(t);
        }
        let token = new_secret()?;
        let (name, t) = (cluster.to_string(), token.clone());
        self.with_store(move |s| s.set_join_token(&name, &t))
            .await?;
        let mut all = self.scaling.lock().map_err(|_| ControlError::Poisoned)?;
        all.entry(cluster.to_string()).or_default().join_token = Some(token.clone());
        Ok(token)
    }

    /// One autoscaling step for a cluster: reads what is registered and what
    /// the provider has, decides, and acts. Errors of the provider are kept
    /// as the cluster's scaling errors, never returned.
    async fn scale(&self, spec: &ComputeSpec, t: Timestamp) -> Result<(), ControlError> {
        let provider = self.providers.for_cluster(spec);
        let name = spec.name.clone();
        let (mut nodes, jobs) = self
            .with_store(move |s| {
                Ok((
                    s.node_summaries(&name)?,
                    s.job_summaries(
                        &name,
                        &[JobState::Queued, JobState::Preparing, JobState::Running],
                    )?,
                ))
            })
            .await?;
        let mut errors: Vec<String> = Vec::new();
        let owned = match provider.list_nodes(spec).await {
            Ok(owned) => owned,
            Err(e) => {
                errors.push(e.message());
                Vec::new()
            }
        };
        // A dead node's machine goes once it has stopped by itself (a
        // preempted agent first stops its job with the grace period, then
        // exits) or has been silent for long.
        let reclaimable: HashSet<&str> = owned
            .iter()
            .filter(|m| {
                m.state != ProvisionState::Running
                    || nodes.iter().any(|n| {
                        n.id == m.id && t.since(n.last_heartbeat) > self.config.register_timeout
                    })
            })
            .map(|m| m.id.as_str())
            .collect();

        // Machines whose agents have not registered: preparing nodes, unless
        // they died or took too long, in which case they go.
        let memo = self.memo(&spec.name);
        let registered: HashSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        let mut pending = BTreeMap::new();
        for m in owned.iter().filter(|m| !registered.contains(m.id.as_str())) {
            let since = memo.pending.get(&m.id).copied().unwrap_or(t);
            let failed = match &m.state {
                ProvisionState::Failed(why) => Some(why.clone()),
                ProvisionState::Deleting => continue,
                _ if t.since(since) > self.config.register_timeout => Some(format!(
                    "its agent did not register within {}s (see `docker logs {}`)",
                    self.config.register_timeout.as_secs(),
                    m.id
                )),
                _ => None,
            };
            match failed {
                None => {
                    pending.insert(m.id.clone(), since);
                }
                Some(why) => {
                    self.metrics.emit(Event::NodeNeverJoined {
                        cluster: &spec.name,
                        node: &m.id,
                        why: &why,
                    });
                    errors.push(format!("node {} failed before registering: {why}", m.id));
                    if let Err(e) = provider.remove_node(spec, &m.id).await {
                        errors.push(e.message());
                    }
                }
            }
        }
        add_pending(&mut nodes, &pending);

        let decision = autoscaler::decide(
            &AutoscaleInput {
                spec,
                nodes: &nodes,
                jobs: &jobs,
                now: t,
                last_scale_action: memo.last_scale_action,
                provider_error: memo.provider_error.as_deref(),
            },
            &self.config.autoscaler,
        );
        let mut acted = false;
        match &decision.action {
            autoscaler::ScaleAction::None => {}
            autoscaler::ScaleAction::Add { count } => {
                acted = true;
                let token = if provider.creates_nodes() {
                    self.provision_token(&spec.name).await?
                } else {
                    String::new()
                };
                match provider.create_nodes(spec, *count, &token).await {
                    Ok(made) => {
                        self.metrics.emit(Event::NodesCreated {
                            cluster: &spec.name,
                            count: made.len(),
                        });
                        pending.extend(made.into_iter().map(|m| (m.id, t)));
                    }
                    Err(e) => errors.push(e.message()),
                }
            }
            autoscaler::ScaleAction::Remove { nodes: leaving } => {
                acted = true;
                for n in leaving {
                    if provider.creates_nodes() {
                        let id = n.clone();
                        // Nothing may be placed on it while it goes.
                        if !self.with_store(move |s| s.mark_node_leaving(&id)).await? {
                            continue;
                        }
                    }
                    self.remove_machine(provider, spec, n, Removal::Idle, &mut errors)
                        .await?;
                }
            }
        }
        // Dead nodes (lost, preempted) that hold nothing: their machines go,
        // and so do their records, once the provider has removed them.
        for n in decision
            .reclaim
            .iter()
            .filter(|n| reclaimable.contains(n.as_str()))
        {
            self.remove_machine(provider, spec, n, Removal::Dead, &mut errors)
                .await?;
        }

        let error = errors.pop();
        let changed = {
            let mut all = self.scaling.lock().map_err(|_| ControlError::Poisoned)?;
            let m = all.entry(spec.name.clone()).or_default();
            m.pending = pending;
            if acted && error.is_none() {
                m.last_scale_action = Some(t);
            }
            let changed = error.is_some() && error != m.provider_error;
            if acted || error.is_some() {
                m.provider_error = error.clone();
            }
            changed
        };
        // Only a new error is recorded: the loop runs every few seconds and
        // must not fill the cluster's error list with repeats.
        if let (true, Some(message)) = (changed, error) {
            self.metrics.emit(Event::ScalingFailed {
                cluster: &spec.name,
                message: &message,
            });
            let name = spec.name.clone();
            self.with_store(move |s| {
                s.record_scaling_error(&name, &drover_api::cluster::ScalingError { at: t, message })
            })
            .await?;
        }
        Ok(())
    }

    /// Removes a registered node's machine through the provider and then its
    /// record; a provider failure is kept in `errors` and the record stays.
    async fn remove_machine(
        &self,
        provider: &dyn Provider,
        spec: &ComputeSpec,
        node: &str,
        why: Removal,
        errors: &mut Vec<String>,
    ) -> Result<(), ControlError> {
        match provider.remove_node(spec, node).await {
            Ok(()) => {
                let cluster = spec.name.as_str();
                self.metrics.emit(match why {
                    Removal::Idle => Event::NodeRemoved { cluster, node },
                    Removal::Dead => Event::NodeReclaimed { cluster, node },
                });
                self.forget_node(node).await
            }
            Err(e) => {
                errors.push(e.message());
                Ok(())
            }
        }
    }

    /// Deletes the record of a node whose machine is gone.
    async fn forget_node(&self, id: &str) -> Result<(), ControlError> {
        let id = id.to_string();
        match self.with_store(move |s| s.remove_node(&id)).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e.message(), "forgetting a removed node failed");
                Ok(())
            }
        }
    }

    /// Injects a preemption of `node` through its cluster's provider (a
    /// `Preempt` scheduled event on local clusters); returns the event id.
    pub async fn evict_node(&self, node: String) -> Result<String, ControlError> {
        let id = node.clone();
        let spec = self
            .with_store(move |s| {
                let n = s.node(&id)?;
                Ok(s.cluster(&n.cluster)?.spec)
            })
            .await?;
        let event = self
            .providers
            .for_cluster(&spec)
            .evict(&spec, &node)
            .await?;
        tracing::info!(node = %node, event = %event, "preemption injected");
        Ok(event)
    }

    /// Marks nodes silent for longer than `grace` unusable and requeues
    /// their jobs. Returns the nodes marked.
    pub async fn reap_silent_nodes(&self, grace: Duration) -> Result<Vec<String>, ControlError> {
        let t = now();
        let before = Timestamp(t.as_millis().saturating_sub(grace.as_millis() as u64));
        let reason = format!("no heartbeat for {}s", grace.as_secs());
        let (lost, bumps) = self
            .with_store(move |s| {
                let mut lost = Vec::new();
                let mut bumps = Vec::new();
                for id in s.silent_nodes(before)? {
                    let l = s.mark_node_lost(&id, NodeState::Unusable, &reason, t)?;
                    bumps.extend(l.bumped);
                    lost.push(id);
                }
                Ok((lost, bumps))
            })
            .await?;
        if !lost.is_empty() {
            for node in &lost {
                self.metrics.emit(Event::NodeLost {
                    node,
                    state: NodeState::Unusable,
                });
            }
            self.wake(&bumps);
            self.poke();
        }
        Ok(lost)
    }

    /// Fails running jobs past their `limits.timeout`. Returns the jobs.
    pub async fn enforce_timeouts(&self) -> Result<Vec<String>, ControlError> {
        let t = now();
        let (ended, bumps) = self
            .with_store(move |s| {
                let jobs = s.jobs(&JobFilter {
                    cluster: None,
                    states: &[JobState::Running],
                })?;
                let mut ended = Vec::new();
                let mut bumps = Vec::new();
                for j in jobs {
                    let (Some(limit), Some(started)) = (j.spec.timeout_seconds, j.started_at)
                    else {
                        continue;
                    };
                    if t.since(started) >= Duration::from_secs(limit) {
                        let reason = format!("timed out after {limit}s (limits.timeout)");
                        let tr = s.transition_job(&j.id, JobState::Failed, Some(&reason), t)?;
                        bumps.extend(tr.bumped);
                        ended.push(j.id);
                    }
                }
                Ok((ended, bumps))
            })
            .await?;
        if !ended.is_empty() {
            tracing::info!(jobs = ?ended, "jobs timed out");
            self.wake(&bumps);
            self.poke();
        }
        Ok(ended)
    }
}

/// What a heartbeat changed: versions to wake, rejected parts, whether the
/// scheduler should look again, and the node's desired-state version.
struct HeartbeatApplied {
    bumps: Vec<VersionBump>,
    rejected: Vec<wire::PartKey>,
    relevant: bool,
    version: u64,
    /// The node (it is the one heartbeating) said `preempted` just now.
    preempted: Option<String>,
}

/// An agent may say only `leaving`, `preempted` (its VM got a Preempt or
/// Terminate event), or `idle` while it holds no job.
fn check_requested_state(node: &Node, state: Option<NodeState>) -> Result<(), ControlError> {
    match state {
        None | Some(NodeState::Leaving | NodeState::Preempted) => Ok(()),
        Some(NodeState::Idle) if node.current_job.is_none() => Ok(()),
        Some(other) => Err(ControlError::Invalid(format!(
            "an agent may ask only for state leaving or preempted (or idle while it holds no job), not {other}"
        ))),
    }
}

/// Applies one heartbeat of `node` inside a store turn.
fn apply_heartbeat(
    s: &mut Store,
    node: &Node,
    req: wire::HeartbeatRequest,
) -> Result<HeartbeatApplied, StoreError> {
    let t = now();
    let inventory = match (req.gpus, req.inventory) {
        (None, None) => None,
        (gpus, details) => Some(NodeInventory {
            healthy_gpus: gpus.map_or(node.inventory.healthy_gpus, |g| g.healthy),
            total_gpus: gpus.map_or(node.inventory.total_gpus, |g| g.total),
            details: details.unwrap_or(node.inventory.details.clone()),
        }),
    };
    let mut bumps = Vec::new();
    let newly_preempted =
        node.state != NodeState::Preempted && req.state == Some(NodeState::Preempted);
    // A preempted node stays preempted whatever else it says while it goes.
    let state = if node.state == NodeState::Preempted {
        None
    } else if newly_preempted {
        // Its job is requeued now rather than after the grace period.
        let lost = s.mark_node_lost(
            &node.id,
            NodeState::Preempted,
            "the VM is being preempted (scheduled event)",
            t,
        )?;
        bumps.extend(lost.bumped);
        None
    } else {
        // A node marked unusable for silence that is heard from again,
        // holding nothing, is usable again.
        req.state.or_else(|| {
            (node.state == NodeState::Unusable && node.current_job.is_none())
                .then_some(NodeState::Idle)
        })
    };
    // Only what can change a scheduling decision wakes the
    // scheduler: 10,000 quiet heartbeats must not cost 10,000 passes.
    let relevant = !bumps.is_empty()
        || state.is_some_and(|s| s != node.state)
        || inventory.as_ref().is_some_and(|i| {
            i.healthy_gpus != node.inventory.healthy_gpus
                || i.total_gpus != node.inventory.total_gpus
        })
        || !req.parts.is_empty();
    s.heartbeat(
        &node.id,
        &Heartbeat {
            state,
            ip: req.ip.as_deref(),
            inventory: inventory.as_ref(),
        },
        t,
    )?;
    let mut rejected = Vec::new();
    for p in &req.parts {
        let key = || wire::PartKey {
            job: p.job.clone(),
            attempt: p.attempt,
            node_rank: p.node_rank,
        };
        // A node reports only its own parts: a credential must
        // not let one node move another node's work.
        let own = match s.job_parts(&p.job) {
            Ok(parts) => parts
                .iter()
                .any(|x| x.attempt == p.attempt && x.node_rank == p.node_rank && x.node == node.id),
            // A part the control plane never had (deleted job).
            Err(StoreError::NotFound { .. }) => false,
            Err(e) => return Err(e),
        };
        if !own {
            rejected.push(key());
            continue;
        }
        let r = s.report_part(&p.job, p.attempt, p.node_rank, p.state, p.exit_code, t)?;
        if !r.accepted {
            rejected.push(key());
        }
        if let Some(tr) = r.job {
            bumps.extend(tr.bumped);
        }
    }
    Ok(HeartbeatApplied {
        bumps,
        rejected,
        relevant,
        version: s.desired_version(&node.id)?,
        preempted: newly_preempted.then(|| node.id.clone()),
    })
}
