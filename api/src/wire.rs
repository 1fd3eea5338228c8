//! Bodies of the control plane's HTTP API (version [`API_VERSION`], under
//! `/v1`), shared by the `drover` CLI, `drover-agent` and `drover server`.
//!
//! API Boundary: plain serde data. Fields are only ever added (with
//! `#[serde(default)]` on the reading side), never renamed or removed, so a
//! newer server keeps talking to older agents. Times are [`Timestamp`]s
//! (milliseconds since the Unix epoch).
//!
//! Routes (all JSON; users authenticate with `Authorization: Bearer <api
//! token>`, agents with their node credential after registering):
//!
//! | route | body → answer |
//! |---|---|
//! | `POST /v1/clusters` | [`ClusterCreate`] → [`ClusterCreated`] |
//! | `GET /v1/clusters` | → [`ClusterList`] |
//! | `GET /v1/clusters/{name}` | → [`ClusterInfo`] |
//! | `PATCH /v1/clusters/{name}` | [`ComputeUpdate`] → [`ClusterInfo`] |
//! | `DELETE /v1/clusters/{name}[?force=true]` | → [`ClusterDeleted`] (idle nodes removed first; refused while jobs are unfinished unless `force` cancels them) |
//! | `POST /v1/jobs` | [`JobSubmit`] → [`JobInfo`] (201) |
//! | `GET /v1/jobs?compute=NAME` | → [`JobList`] |
//! | `GET /v1/jobs/{id}` | → [`JobInfo`] |
//! | `POST /v1/jobs/{id}/cancel` | → [`JobInfo`] |
//! | `GET /v1/jobs/{id}/logs?from=N&limit=M[&attempt=A]` | → [`LogPage`] (one attempt's lines: the current one unless `attempt` says) |
//! | `GET /v1/nodes?compute=NAME` | → [`NodeList`] |
//! | `GET /v1/nodes/{id}` | → [`NodeInfo`] |
//! | `POST /v1/nodes/{id}/evict` | → [`EvictResponse`] |
//! | `POST /v1/agent/register` (no auth header; the join token is in the body) | [`RegisterRequest`] → [`RegisterResponse`] |
//! | `POST /v1/agent/heartbeat` | [`HeartbeatRequest`] → [`HeartbeatResponse`] |
//! | `GET /v1/agent/assignments?version=N&timeout=S` | → [`Assignments`] (long poll) |
//! | `POST /v1/agent/logs` | [`LogBatch`] → [`LogBatchAccepted`] |
//!
//! Every error is [`ErrorBody`] with a stable [`ErrorCode`].

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::JobSpec;
use crate::cluster::{ClusterStatus, JobState, NodeState, Timestamp};
use crate::compute::ComputeSpec;
pub use crate::compute::ComputeUpdate;
use crate::error::FieldError;
use crate::inventory::{Inventory, InventorySummary, VmInfo};

/// The API version this module describes; the path prefix is `/` + it.
pub const API_VERSION: &str = "v1";

/// The largest request body the server reads (413 past it): agents split
/// log batches to stay under it.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// The most part reports one heartbeat may carry: a node runs one job's
/// part at a time and reports the few that ended while it was cut off.
pub const MAX_PART_REPORTS: usize = 256;

/// The longest request URI the server reads (414 past it).
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// The most header bytes (names and values) the server reads (431 past it).
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// The message of a 413, also given by clients that see a body is too large
/// before sending it.
pub fn too_large_message(size: Option<usize>) -> String {
    match size {
        Some(n) => format!(
            "the request body is {n} bytes, more than the server's limit of {MAX_REQUEST_BYTES} bytes"
        ),
        None => format!(
            "the request body is larger than the server's limit of {MAX_REQUEST_BYTES} bytes"
        ),
    }
}

/// A request body a strict door refused: every problem, naming its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidBody {
    /// The problems, in field order.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for InvalidBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::error::write_lines(f, &self.errors)
    }
}

impl From<Vec<FieldError>> for InvalidBody {
    fn from(errors: Vec<FieldError>) -> Self {
        InvalidBody { errors }
    }
}

fn parse_body(body: &[u8]) -> Result<serde_json::Value, InvalidBody> {
    serde_json::from_slice(body).map_err(|e| InvalidBody {
        errors: vec![FieldError::new("", format!("invalid json: {e}"))],
    })
}

/// Reads a user's request body strictly: valid JSON, no NUL byte in any
/// string, type errors named by their field, and no field `T` does not
/// have (it would be dropped silently, so a misspelled or smuggled setting
/// would look accepted). The server's user routes read their bodies so.
pub fn decode_strict<T: DeserializeOwned + Serialize>(body: &[u8]) -> Result<T, InvalidBody> {
    crate::json::decode_strict(parse_body(body)?).map_err(InvalidBody::from)
}

/// Every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    pub code: ErrorCode,
    /// Lowercase human-readable message, no trailing period.
    pub message: String,
}

/// Stable error codes; each has one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request or its content is invalid.
    Invalid,
    /// 401: no credential, or not a valid one.
    Unauthorized,
    /// 403: a valid credential that does not allow this.
    Forbidden,
    /// 404: no such cluster, job or node.
    NotFound,
    /// 409: exists already, or not allowed in the current state.
    Conflict,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 413: the body is larger than [`MAX_REQUEST_BYTES`].
    TooLarge,
    /// 414: the URI is longer than [`MAX_URI_BYTES`].
    UriTooLong,
    /// 431: the headers are larger than [`MAX_HEADER_BYTES`].
    HeadersTooLarge,
    /// 503: the store is busy; retry.
    Busy,
    /// 500: the server failed.
    Internal,
    /// A code this client does not know (a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Invalid => "invalid",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UriTooLong => "uri_too_long",
            ErrorCode::HeadersTooLarge => "headers_too_large",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// The HTTP status code that carries it.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::Invalid => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::TooLarge => 413,
            ErrorCode::UriTooLong => 414,
            ErrorCode::HeadersTooLarge => 431,
            ErrorCode::Busy => 503,
            ErrorCode::Internal | ErrorCode::Unknown => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /v1/clusters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCreate {
    /// The definition (the server validates it again).
    pub spec: ComputeSpec,
}

/// Answer to [`ClusterCreate`]. `Debug` redacts the join token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCreated {
    /// The new cluster.
    pub cluster: ClusterInfo,
    /// The secret agents join this cluster with; shown only now.
    pub join_token: String,
}

/// Answer to `DELETE /v1/clusters/{name}[?force=true]`: what went with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterDeleted {
    /// The cluster.
    pub cluster: String,
    /// Its nodes, removed first.
    #[serde(default)]
    pub removed_nodes: Vec<String>,
    /// Its unfinished jobs, canceled first (with `force`).
    #[serde(default)]
    pub canceled_jobs: Vec<String>,
}

/// A cluster: its definition and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Its definition.
    pub spec: ComputeSpec,
    /// Allocation state, current and target node counts, node state counts
    /// and the latest scaling errors (oldest first).
    pub status: ClusterStatus,
    /// When it was created.
    pub created_at: Timestamp,
    /// When its definition last changed.
    pub updated_at: Timestamp,
}

/// `GET /v1/clusters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterList {
    /// By name.
    pub clusters: Vec<ClusterInfo>,
}

/// `POST /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSubmit {
    /// The parsed job (the CLI parses the YAML; paths are the submitter's).
    pub spec: JobSpec,
    /// The cluster, overriding `spec.compute`.
    #[serde(default)]
    pub compute: Option<String>,
}

impl JobSubmit {
    /// Reads a submission strictly (see [`decode_strict`]); the job's
    /// problems are named by their field in the job (`resources.shm_size`),
    /// as the YAML reader names them.
    pub fn decode_strict(body: &[u8]) -> Result<JobSubmit, InvalidBody> {
        let one = |field: &str, message: String| InvalidBody {
            errors: vec![FieldError::new(field, message)],
        };
        let serde_json::Value::Object(mut map) = parse_body(body)? else {
            return Err(one("", "expected a JSON object with `spec`".to_string()));
        };
        let compute = match map.remove("compute") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(c)) => Some(c),
            Some(other) => {
                return Err(one(
                    "compute",
                    format!("expected a cluster name, got {other}"),
                ));
            }
        };
        let Some(spec) = map.remove("spec") else {
            return Err(one("spec", "is required (the job)".to_string()));
        };
        if let Some(key) = map.keys().next() {
            return Err(one(
                key,
                "unknown field (a submission has spec and compute)".to_string(),
            ));
        }
        let spec = JobSpec::from_value_strict(spec)?;
        Ok(JobSubmit { spec, compute })
    }
}

/// State of one part (one node's share of one attempt of a job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartState {
    /// Assigned to its node; the agent has not picked it up yet.
    Assigned,
    /// The agent is pulling its image or creating its container.
    Preparing,
    /// Its container runs.
    Running,
    /// Its container exited 0.
    Succeeded,
    /// Its container exited non-zero or could not start.
    Failed,
    /// Stopped because the job ended.
    Stopped,
    /// Its node was lost or preempted.
    Lost,
}

impl PartState {
    /// Every state.
    pub const ALL: [PartState; 7] = [
        PartState::Assigned,
        PartState::Preparing,
        PartState::Running,
        PartState::Succeeded,
        PartState::Failed,
        PartState::Stopped,
        PartState::Lost,
    ];

    /// The lowercase name (also what the store's `job_parts.state` holds).
    pub fn as_str(self) -> &'static str {
        match self {
            PartState::Assigned => "assigned",
            PartState::Preparing => "preparing",
            PartState::Running => "running",
            PartState::Succeeded => "succeeded",
            PartState::Failed => "failed",
            PartState::Stopped => "stopped",
            PartState::Lost => "lost",
        }
    }

    /// True once the part can never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            PartState::Succeeded | PartState::Failed | PartState::Stopped | PartState::Lost
        )
    }
}

/// A part state name that is not one of [`PartState::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown part state `{0}`")]
pub struct UnknownPartState(pub String);

impl std::str::FromStr for PartState {
    type Err = UnknownPartState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PartState::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPartState(s.to_string()))
    }
}

impl fmt::Display for PartState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One part of a job as `job show` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    /// Attempt (1-based).
    pub attempt: u32,
    /// Node rank (0 is the master).
    pub node_rank: u32,
    /// The node it was placed on.
    pub node: String,
    /// Its state.
    pub state: PartState,
    /// Exit code once ended, when there was one.
    pub exit_code: Option<i64>,
    /// When it started running.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub ended_at: Option<Timestamp>,
}

/// A job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Job id (its name).
    pub id: String,
    /// Its cluster.
    pub cluster: String,
    /// State.
    pub state: JobState,
    /// Attempts so far (0 until first placed).
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Nodes it runs on.
    pub instance_count: u32,
    /// When it was submitted.
    pub submitted_at: Timestamp,
    /// When the current attempt started running.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub ended_at: Option<Timestamp>,
    /// Why it failed, was canceled, or was last requeued.
    pub failure_reason: Option<String>,
    /// Why a queued job is still waiting, when the server knows: its
    /// cluster's scaling error while the cluster cannot reach its target,
    /// or the nodes being created for it.
    #[serde(default)]
    pub waiting_reason: Option<String>,
    /// Its parts, by attempt then rank (empty in listings).
    #[serde(default)]
    pub parts: Vec<PartInfo>,
    /// A parallel job's mini-batches, from its runtime's newest progress
    /// line (absent in listings and for other jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::job::ParallelProgress>,
    /// What it runs (absent in listings).
    #[serde(default)]
    pub spec: Option<JobSpec>,
}

/// `GET /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobList {
    /// In submission order.
    pub jobs: Vec<JobInfo>,
}

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A stored log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Its number in the job's log (never reused).
    pub seq: u64,
    /// When it was written.
    pub at: Timestamp,
    /// The attempt that wrote it.
    pub attempt: u32,
    /// The node rank that wrote it.
    pub node_rank: u32,
    /// Which stream.
    pub stream: LogStream,
    /// The text, without a trailing newline.
    pub text: String,
    /// The process that wrote it (its `RANK`), in a part that runs more
    /// than one; `None` for a part's only process and for what drover-init
    /// or the agent wrote.
    #[serde(default)]
    pub rank: Option<u32>,
}

/// `GET /v1/jobs/{id}/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPage {
    /// The lines, in order.
    pub lines: Vec<LogLine>,
    /// Ask from this number next.
    pub next_seq: u64,
    /// The oldest number still kept (older lines were dropped by the cap).
    pub first_seq: u64,
    /// The number the next appended line will get.
    pub end_seq: u64,
    /// The job's state when read (a follower stops once it is terminal and
    /// `next_seq == end_seq`).
    pub job_state: JobState,
    /// The attempt whose lines these are.
    #[serde(default)]
    pub attempt: u32,
    /// The job's attempts so far (its current attempt).
    #[serde(default)]
    pub attempts: u32,
}

/// A node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub id: String,
    /// Its cluster.
    pub cluster: String,
    /// State.
    pub state: NodeState,
    /// Its address, as reported.
    pub ip: Option<String>,
    /// GPUs that are healthy.
    pub healthy_gpus: u32,
    /// GPUs in total.
    pub total_gpus: u32,
    /// When it registered.
    pub registered_at: Timestamp,
    /// Last heartbeat.
    pub last_heartbeat: Timestamp,
    /// The job it holds.
    pub current_job: Option<String>,
    /// The part of that job it runs, when it has one.
    #[serde(default)]
    pub current_part: Option<NodePart>,
    /// Its VM, as the cloud's metadata service describes it (name, size,
    /// id, priority…); `None` where the node has no such service.
    #[serde(default)]
    pub vm: Option<VmInfo>,
    /// The version of its agent, when the agent said.
    #[serde(default)]
    pub agent_version: Option<String>,
    /// What it has, in short: host, GPU driver, each GPU and its health.
    #[serde(default)]
    pub inventory: Option<InventorySummary>,
}

/// The part a node runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePart {
    /// The part (its fields are inline on the wire).
    #[serde(flatten)]
    pub part: PartKey,
    /// Its state.
    pub state: PartState,
    /// When it started running.
    #[serde(default)]
    pub started_at: Option<Timestamp>,
}

/// `GET /v1/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeList {
    /// By cluster, then id.
    pub nodes: Vec<NodeInfo>,
}

/// Answer to `POST /v1/nodes/{id}/evict`: the injected scheduled event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictResponse {
    /// The node.
    pub node: String,
    /// The `Preempt` scheduled event's id (`EventId`).
    pub event_id: String,
}

/// GPU health counts of a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuCounts {
    /// GPUs that are healthy.
    pub healthy: u32,
    /// GPUs in total.
    pub total: u32,
}

/// `POST /v1/agent/register`: join a cluster. `Debug` redacts the join token.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The cluster to join.
    pub cluster: String,
    /// The cluster's join token.
    pub join_token: String,
    /// The id to register under (the VM name); the server makes one up
    /// when absent. Re-registering an id that holds no work replaces it.
    #[serde(default)]
    pub node_id: Option<String>,
    /// The node's address for other nodes of a job.
    #[serde(default)]
    pub ip: Option<String>,
    /// GPU health counts.
    #[serde(default)]
    pub gpus: GpuCounts,
    /// What the node has.
    #[serde(default)]
    pub inventory: Inventory,
}

/// Answer to [`RegisterRequest`]. `Debug` redacts the credential.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// The node id.
    pub node_id: String,
    /// The bearer credential for every later agent call; shown only now.
    pub credential: String,
    /// How often the server expects heartbeats.
    pub heartbeat_interval_seconds: u64,
    /// How long the server waits for a silent node before it requeues the
    /// node's work: an agent cut off for longer stops its parts itself.
    #[serde(default = "default_grace_seconds")]
    pub grace_seconds: u64,
}

fn default_grace_seconds() -> u64 {
    40
}

/// The state of one part as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartStatus {
    /// The part (its fields are inline on the wire).
    #[serde(flatten)]
    pub part: PartKey,
    /// Its state.
    pub state: PartState,
    /// Exit code, once ended.
    #[serde(default)]
    pub exit_code: Option<i64>,
}

/// `POST /v1/agent/heartbeat`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// A node state the agent asks for (`leaving` when draining).
    #[serde(default)]
    pub state: Option<NodeState>,
    /// A changed address.
    #[serde(default)]
    pub ip: Option<String>,
    /// GPU health counts, when known.
    #[serde(default)]
    pub gpus: Option<GpuCounts>,
    /// A changed inventory.
    #[serde(default)]
    pub inventory: Option<Inventory>,
    /// The state of the parts it runs or has finished since the last beat.
    #[serde(default)]
    pub parts: Vec<PartStatus>,
}

/// A part: one node's share of one attempt of a job. The one key of a part
/// everywhere — assignments, part reports, a container's labels, the
/// runner's placement, the agent's reconciler.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PartKey {
    /// Job id.
    pub job: String,
    /// Attempt (1-based).
    pub attempt: u32,
    /// Node rank (0 is the master).
    pub node_rank: u32,
}

impl PartKey {
    /// The key of `job`'s part `node_rank` in `attempt`.
    pub fn new(job: &str, attempt: u32, node_rank: u32) -> Self {
        PartKey {
            job: job.to_string(),
            attempt,
            node_rank,
        }
    }
}

impl fmt::Display for PartKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.job, self.attempt, self.node_rank)
    }
}

/// Answer to [`HeartbeatRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The node's desired-state version now (watch when it is newer than
    /// the one the agent has).
    pub desired_version: u64,
    /// Reported parts the control plane no longer wants (already ended
    /// there): stop them.
    #[serde(default)]
    pub rejected: Vec<PartKey>,
}

/// Another node of a job, for the distributed environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    /// Node id.
    pub id: String,
    /// Its address.
    pub ip: Option<String>,
}

/// One part a node should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// The part (its fields are inline on the wire).
    #[serde(flatten)]
    pub part: PartKey,
    /// The part's state as the control plane knows it.
    pub state: PartState,
    /// What to run.
    pub spec: JobSpec,
    /// Every node of the attempt, by rank.
    pub nodes: Vec<PeerNode>,
    /// Host folders the cluster lets its jobs bind (the node checks the
    /// job's host paths against them with their real, resolved paths).
    #[serde(default)]
    pub allowed_host_paths: Vec<String>,
    /// Where the control plane's log of this part ends (`None`: it has no
    /// line of it yet); an agent that adopts the part's container ships
    /// from there.
    #[serde(default)]
    pub log_cursor: Option<LogCursor>,
    /// The attempt's launch secret, given to the nodes of the attempt
    /// only: an MPI job's `mpirun` proves with it that it may start
    /// processes in the job's other containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_secret: Option<LaunchSecret>,
    /// The cluster's managed identity: the only identities the node's
    /// token endpoint hands this part tokens for. Absent from an older
    /// control plane: none, so such a part gets no token.
    #[serde(default)]
    pub identity: crate::compute::Identity,
    /// Whether the part also gets the App Service identity protocol's
    /// variables (the cluster's `app_service_identity`).
    #[serde(default = "yes")]
    pub app_service_identity: bool,
    /// The registry the control plane keeps environment images in, with
    /// its login: a node builds and pushes there, or pulls from there, the
    /// images of environments whose name is under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment_registry: Option<crate::environment::EnvironmentRegistry>,
}

fn yes() -> bool {
    true
}

/// A job attempt's launch secret (hex). `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LaunchSecret(pub String);

impl std::fmt::Debug for LaunchSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LaunchSecret(***)")
    }
}

/// `GET /v1/agent/assignments`: what the node should run now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignments {
    /// The desired-state version this reflects.
    pub version: u64,
    /// Live parts of the node's placed jobs.
    pub parts: Vec<Assignment>,
}

/// Where a part's log stands: the container-engine timestamp of a line
/// (nanoseconds since the epoch) and its place among the lines stamped with
/// that same time (from 1). Lines of a container are in cursor order, so
/// an agent that restarts ships from where the control plane's log for the
/// part ends, and the control plane stores a line at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LogCursor {
    /// The line's timestamp, ns since the Unix epoch.
    pub at_ns: u64,
    /// Its place among lines with the same timestamp, from 1.
    pub index: u32,
}

/// A log line from an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewLogLine {
    /// Job id.
    pub job: String,
    /// Attempt.
    pub attempt: u32,
    /// Node rank.
    pub node_rank: u32,
    /// Which stream.
    pub stream: LogStream,
    /// When it was written.
    pub at: Timestamp,
    /// The text, without a trailing newline.
    pub text: String,
    /// Its place in the container's log; `None` for lines the agent writes
    /// itself (which are stored whenever they arrive).
    #[serde(default)]
    pub cursor: Option<LogCursor>,
    /// The process that wrote it (its `RANK`), read from drover-init's
    /// marker in a part that runs more than one; `None` otherwise.
    #[serde(default)]
    pub rank: Option<u32>,
}

/// `POST /v1/agent/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBatch {
    /// Lines, in order per part.
    pub lines: Vec<NewLogLine>,
}

/// Answer to [`LogBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBatchAccepted {
    /// Lines stored.
    pub accepted: u64,
    /// Lines already stored (at or before their part's cursor), skipped.
    #[serde(default)]
    pub duplicates: u64,
    /// Parts of attempts that are no longer current: their lines were not
    /// stored (a superseded attempt never writes into the new one's log).
    #[serde(default)]
    pub rejected: Vec<PartKey>,
}

/// What `Debug` shows instead of a secret.
const REDACTED: &str = "<redacted>";

impl fmt::Debug for ClusterCreated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCreated")
            .field("cluster", &self.cluster)
            .field("join_token", &REDACTED)
            .finish()
    }
}

impl fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("cluster", &self.cluster)
            .field("join_token", &REDACTED)
            .field("node_id", &self.node_id)
            .field("ip", &self.ip)
            .field("gpus", &self.gpus)
            .field("inventory", &self.inventory)
            .finish()
    }
}

impl fmt::Debug for RegisterResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterResponse")
            .field("node_id", &self.node_id)
            .field("credential", &REDACTED)
            .field(
                "heartbeat_interval_seconds",
                &self.heartbeat_interval_seconds,
            )
            .field("grace_seconds", &self.grace_seconds)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_shape() {
        let body = ErrorBody {
            error: ErrorDetail {
                code: ErrorCode::NotFound,
                message: "cluster `x` not found".to_string(),
            },
        };
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {"code": "not_found", "message": "cluster `x` not found"}})
        );
        let unknown: ErrorBody =
            serde_json::from_str(r#"{"error":{"code":"teapot","message":"m"}}"#).unwrap();
        assert_eq!(unknown.error.code, ErrorCode::Unknown);
    }

    #[test]
    fn codes_and_statuses() {
        for (code, name, status) in [
            (ErrorCode::Invalid, "invalid", 400),
            (ErrorCode::Unauthorized, "unauthorized", 401),
            (ErrorCode::Forbidden, "forbidden", 403),
            (ErrorCode::NotFound, "not_found", 404),
            (ErrorCode::Conflict, "conflict", 409),
            (ErrorCode::MethodNotAllowed, "method_not_allowed", 405),
            (ErrorCode::TooLarge, "too_large", 413),
            (ErrorCode::UriTooLong, "uri_too_long", 414),
            (ErrorCode::HeadersTooLarge, "headers_too_large", 431),
            (ErrorCode::Busy, "busy", 503),
            (ErrorCode::Internal, "internal", 500),
        ] {
            assert_eq!(code.as_str(), name);
            assert_eq!(code.status(), status);
            assert_eq!(serde_json::to_value(code).unwrap(), name);
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let req = RegisterRequest {
            cluster: "cpu".into(),
            join_token: "s3cret-join".into(),
            node_id: None,
            ip: None,
            gpus: GpuCounts::default(),
            inventory: Inventory::default(),
        };
        let resp = RegisterResponse {
            node_id: "n1".into(),
            credential: "s3cret-cred".into(),
            heartbeat_interval_seconds: 10,
            grace_seconds: 40,
        };
        for text in [format!("{req:?}"), format!("{resp:?}")] {
            assert!(!text.contains("s3cret"), "{text}");
            assert!(text.contains(REDACTED), "{text}");
        }
    }

    #[test]
    fn log_lines_and_nodes_of_older_writers_read() {
        let line: NewLogLine = serde_json::from_str(
            r#"{"job":"j","attempt":1,"node_rank":0,"stream":"stdout","at":5,"text":"t"}"#,
        )
        .unwrap();
        assert_eq!((line.rank, line.cursor), (None, None));
        let stored: LogLine = serde_json::from_str(
            r#"{"seq":0,"at":5,"attempt":1,"node_rank":0,"stream":"stderr","text":"t"}"#,
        )
        .unwrap();
        assert_eq!(stored.rank, None);
        let node: NodeInfo = serde_json::from_str(
            r#"{"id":"n","cluster":"c","state":"idle","ip":null,"healthy_gpus":0,"total_gpus":0,
                "registered_at":1,"last_heartbeat":2,"current_job":null}"#,
        )
        .unwrap();
        assert_eq!(
            (
                node.vm,
                node.agent_version,
                node.inventory,
                node.current_part
            ),
            (None, None, None, None)
        );
        let part = NodePart {
            part: PartKey::new("j", 2, 1),
            state: PartState::Running,
            started_at: None,
        };
        assert_eq!(
            serde_json::to_value(&part).unwrap(),
            serde_json::json!({"job":"j","attempt":2,"node_rank":1,"state":"running","started_at":null})
        );
    }

    #[test]
    fn heartbeat_fields_default() {
        let beat: HeartbeatRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(beat, HeartbeatRequest::default());
        let text = r#"{"job":"j","attempt":1,"node_rank":0,"state":"running"}"#;
        let part: PartStatus = serde_json::from_str(text).unwrap();
        assert_eq!(part.part, PartKey::new("j", 1, 0));
        assert_eq!(part.state, PartState::Running);
        assert_eq!(part.exit_code, None);
        // The key stays inline: agents and servers of before read it.
        let back = serde_json::to_value(&part).unwrap();
        assert_eq!(
            back,
            serde_json::json!({"job":"j","attempt":1,"node_rank":0,"state":"running","exit_code":null})
        );
    }
}
