//! Jobs: the kinds Drover runs, as the control plane stores them and agents
//! receive them.
//!
//! - [`JobSpec`] — a job of any kind, tagged by `type` like Azure ML's own
//!   job YAML (`command`; a top-level `parallel` job is read as the command
//!   job running Drover's parallel runtime, `parallel.rs`), with
//!   a `format` version in its JSON so that a control plane reads every job
//!   it stored before an upgrade.
//! - [`CommandJob`] — Azure ML's command job, read from v2 job YAML by
//!   [`CommandJob::from_yaml`] (`yaml.rs`), with Drover's own settings under
//!   one top-level `drover:` section. Relative paths are resolved against the
//!   directory of the YAML file, like the Azure ML CLI does. Parsing does no
//!   I/O: whether paths exist is checked by whoever runs the job.
//! - [`JobSpec::validate`] (`validate.rs`) — the rules every job meets,
//!   whichever door it came through: the YAML reader, `drover run`, and the
//!   server on every submission (a hand-written HTTP body meets the same
//!   rules as YAML).
//! - `placeholders.rs` — `${{inputs.x}}` substitution in `command`.
//! - `progress.rs` — the parallel runtime's progress line, read by the
//!   control plane and drawn by the CLI.

mod parallel;
mod placeholders;
mod progress;
mod validate;
mod wire;
mod yaml;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use self::parallel::PARALLEL_DRIVER_PATH;
use self::placeholders::substitute;
pub use self::progress::ParallelProgress;
pub use self::validate::{
    InvalidJob, MAX_COMMAND_BYTES, MAX_ENV_BYTES, MAX_GPUS_PER_INSTANCE, MAX_INSTANCES,
    MAX_PROCESSES_PER_INSTANCE, MAX_TIMEOUT_SECONDS, check_image_reference, check_job_identity,
    is_guid, is_valid_name, same_resource_id,
};
pub use self::wire::JOB_FORMAT;
use crate::docker_args::DockerArgs;
pub use crate::files::WORKSPACE_DATASTORE;
use crate::files::{BlobInfo, Digest, check_relative_path};
use crate::yaml::Diagnostic;

/// Where a job's `code` folder appears inside its container (also the working directory).
pub const CODE_DIR: &str = "/drover/code";
/// Parent of the container paths of path inputs (`/drover/inputs/NAME`).
pub const INPUTS_DIR: &str = "/drover/inputs";
/// Parent of the container paths of outputs (`/drover/outputs/NAME`).
pub const OUTPUTS_DIR: &str = "/drover/outputs";
/// Container paths under this prefix belong to Drover and cannot be mount targets.
pub const RESERVED_DIR: &str = "/drover";

/// A job of any kind. Its JSON is the kind's fields plus `"type"` (the
/// kind, `command` when absent, as in documents stored before kinds
/// existed) and `"format"` ([`JOB_FORMAT`]; 1 when absent).
#[derive(Debug, Clone, PartialEq)]
pub enum JobSpec {
    /// One command in one image on `resources.instance_count` nodes.
    Command(CommandJob),
}

impl From<CommandJob> for JobSpec {
    fn from(job: CommandJob) -> Self {
        JobSpec::Command(job)
    }
}

impl JobSpec {
    /// The kind's name, as in YAML's `type:`.
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Command(_) => "command",
        }
    }

    /// The command job, when this is one (what a node runs).
    pub fn as_command(&self) -> Option<&CommandJob> {
        match self {
            JobSpec::Command(c) => Some(c),
        }
    }

    /// The command job, to change, when this is one.
    pub fn as_command_mut(&mut self) -> Option<&mut CommandJob> {
        match self {
            JobSpec::Command(c) => Some(c),
        }
    }

    /// The command job, when this is one.
    pub fn into_command(self) -> Option<CommandJob> {
        match self {
            JobSpec::Command(c) => Some(c),
        }
    }

    /// The job's name.
    pub fn name(&self) -> Option<&str> {
        match self {
            JobSpec::Command(c) => c.name.as_deref(),
        }
    }

    /// Sets the job's name (the server picks one when the job has none).
    pub fn set_name(&mut self, name: String) {
        match self {
            JobSpec::Command(c) => c.name = Some(name),
        }
    }

    /// The cluster the job names.
    pub fn compute(&self) -> Option<&str> {
        match self {
            JobSpec::Command(c) => c.compute.as_deref(),
        }
    }

    /// Sets the cluster (`--compute` overrides the job's own).
    pub fn set_compute(&mut self, compute: String) {
        match self {
            JobSpec::Command(c) => c.compute = Some(compute),
        }
    }

    /// Nodes the job's parts need at once.
    pub fn instance_count(&self) -> u32 {
        match self {
            JobSpec::Command(c) => c.resources.instance_count,
        }
    }

    /// Healthy GPUs each of its nodes must have.
    pub fn gpus_per_instance(&self) -> u32 {
        match self {
            JobSpec::Command(c) => c.drover.gpus_per_instance,
        }
    }

    /// `limits.timeout` in seconds.
    pub fn timeout_seconds(&self) -> Option<u64> {
        match self {
            JobSpec::Command(c) => c.timeout_seconds,
        }
    }
}

/// A command job: what to run, in which image, on how many nodes.
///
/// Only `command` and `image` are required on the wire; every other field
/// has a default, so fields added later read as their default from older
/// documents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandJob {
    #[serde(default)]
    /// Job name, unique in a cluster; generated when the YAML has none.
    pub name: Option<String>,
    #[serde(default)]
    /// Human-friendly name shown in listings.
    pub display_name: Option<String>,
    #[serde(default)]
    /// Groups related jobs.
    pub experiment_name: Option<String>,
    #[serde(default)]
    /// Free text.
    pub description: Option<String>,
    #[serde(default)]
    /// Free-form tags.
    pub tags: BTreeMap<String, String>,
    /// The command as written, with `${{inputs.x}}` placeholders unresolved;
    /// see [`CommandJob::resolved_command`].
    pub command: String,
    /// Container image that carries the job's dependencies. Empty in a job
    /// that names a registered environment until the control plane
    /// resolves it (see [`CommandJob::environment`]).
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    /// The registered or inline environment the image comes from, when it
    /// is not a plain `image:`; its `build` is what a node builds first.
    pub environment: Option<crate::environment::JobEnvironment>,
    #[serde(default)]
    /// Extra environment variables for every process of the job.
    pub environment_variables: BTreeMap<String, String>,
    #[serde(default)]
    /// The job's code, copied to [`CODE_DIR`], its working directory.
    pub code: Option<Code>,
    #[serde(default)]
    /// Target cluster (`compute: azureml:NAME` is read as `NAME`).
    pub compute: Option<String>,
    #[serde(default)]
    /// Node count and container resources.
    pub resources: Resources,
    #[serde(default)]
    /// How processes are laid out (MPI or PyTorch); `None` runs one process per node.
    pub distribution: Option<Distribution>,
    #[serde(default)]
    /// `limits.timeout`, in seconds: the job is stopped and reported as timed out after it.
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    /// Named inputs: literal values, or files and folders the job reads.
    pub inputs: BTreeMap<String, Input>,
    #[serde(default)]
    /// Named outputs: folders (or files) the job writes, kept after it.
    pub outputs: BTreeMap<String, Output>,
    #[serde(default)]
    /// `identity:`: whose tokens the job's code gets from its node's token
    /// endpoint; `None` is the cluster's default identity, as on Azure ML.
    pub identity: Option<JobIdentity>,
    #[serde(default)]
    /// Drover's own settings (the `drover:` section).
    pub drover: DroverOptions,
}

/// `identity:` of a command job (Azure ML's `IdentityConfiguration`).
///
/// Only `managed` runs on Drover; the other two are read so that
/// [`JobSpec::validate`] can refuse them saying why, rather than as an
/// unknown type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobIdentity {
    /// One of the cluster's managed identities, named by at most one of
    /// its ids (none: the cluster's default). It becomes the part's
    /// default identity: requests that name no identity get its tokens,
    /// and `DEFAULT_IDENTITY_CLIENT_ID` is its client id.
    Managed {
        /// The identity's application (client) id, a GUID.
        #[serde(default)]
        client_id: Option<String>,
        /// The identity's principal (object) id, a GUID.
        #[serde(default)]
        object_id: Option<String>,
        /// A user-assigned identity's ARM resource id.
        #[serde(default)]
        msi_resource_id: Option<String>,
    },
    /// The submitting user's own Entra ID token (Azure ML passes it
    /// through); refused: Drover holds no user tokens.
    UserIdentity,
    /// An Azure ML workspace token; refused: Drover has no workspace.
    AmlToken,
}

/// `resources:` of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Resources {
    /// Number of nodes the job runs on (each runs one part).
    pub instance_count: u32,
    /// Requested VM size; informational on a single machine.
    pub instance_type: Option<String>,
    /// Size of `/dev/shm` in bytes.
    pub shm_size: Option<u64>,
    /// The checked `docker_args`.
    pub docker_args: DockerArgs,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            instance_count: 1,
            instance_type: None,
            shm_size: None,
            docker_args: DockerArgs::default(),
        }
    }
}

/// Distributed launch style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistributionKind {
    /// Open MPI: the command runs once, on node rank 0, and calls
    /// `mpirun` (or is started by the `mpirun` Drover adds); the other
    /// nodes' parts wait for `mpirun` to start its daemons in them.
    Mpi,
    /// PyTorch distributed: one launcher per node, `RANK`/`LOCAL_RANK`/`WORLD_SIZE` per process.
    Pytorch,
    /// TensorFlow's `TF_CONFIG`: `worker_count` workers, then
    /// `parameter_server_count` parameter servers, spread evenly over the
    /// nodes in node-rank order.
    Tensorflow,
}

impl DistributionKind {
    /// The name Azure ML's YAML gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            DistributionKind::Mpi => "mpi",
            DistributionKind::Pytorch => "pytorch",
            DistributionKind::Tensorflow => "tensorflow",
        }
    }
}

/// `distribution:` of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Distribution {
    /// MPI, PyTorch or TensorFlow.
    pub kind: DistributionKind,
    /// Processes started on each node (for TensorFlow, the tasks per node,
    /// worked out from the counts below).
    #[serde(default = "one")]
    pub process_count_per_instance: u32,
    /// TensorFlow: worker tasks (Azure ML's default: the instance count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_count: Option<u32>,
    /// TensorFlow: parameter-server tasks (default 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub parameter_server_count: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Distribution {
    /// `kind` with `process_count_per_instance` processes per node.
    pub fn new(kind: DistributionKind, process_count_per_instance: u32) -> Self {
        Distribution {
            kind,
            process_count_per_instance,
            worker_count: None,
            parameter_server_count: 0,
        }
    }

    /// TensorFlow's tasks: `(workers, parameter servers)` for a job on
    /// `instance_count` nodes.
    pub fn tensorflow_tasks(&self, instance_count: u32) -> (u32, u32) {
        (
            self.worker_count.unwrap_or(instance_count),
            self.parameter_server_count,
        )
    }
}

/// Where a job's code comes from.
///
/// Its JSON is a string for [`Code::Local`] (as every job stored before
/// snapshots) and `{"snapshot": "sha256:…", "size": N}` for [`Code::Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Code {
    /// A folder on the machine that runs the job: `drover run`'s, or, in a
    /// job sent to a cluster without the CLI, a folder every node has
    /// (checked against the cluster's host path policy).
    Local(PathBuf),
    /// A snapshot the CLI uploaded to the control plane (see
    /// [`crate::files`]); each node unpacks its own copy.
    Snapshot(BlobInfo),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum CodeJson {
    Local(PathBuf),
    Snapshot { snapshot: Digest, size: u64 },
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Code::Local(p) => CodeJson::Local(p.clone()),
            Code::Snapshot(b) => CodeJson::Snapshot {
                snapshot: b.digest,
                size: b.size,
            },
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        match value {
            serde_json::Value::String(p) => Ok(Code::Local(PathBuf::from(p))),
            serde_json::Value::Object(_) => match serde_json::from_value(value) {
                Ok(CodeJson::Snapshot { snapshot, size }) => Ok(Code::Snapshot(BlobInfo {
                    digest: snapshot,
                    size,
                })),
                Ok(CodeJson::Local(p)) => Ok(Code::Local(p)),
                Err(e) => Err(serde::de::Error::custom(format!(
                    "expected {{\"snapshot\": \"sha256:…\", \"size\": N}}: {e}"
                ))),
            },
            other => Err(serde::de::Error::custom(format!(
                "expected a folder path or a snapshot, got {other}"
            ))),
        }
    }
}

impl Code {
    /// The local folder, for code that is one.
    pub fn local(&self) -> Option<&Path> {
        match self {
            Code::Local(p) => Some(p),
            Code::Snapshot(_) => None,
        }
    }
}

/// Kind of a path input or output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// A single file.
    UriFile,
    /// A folder.
    #[default]
    UriFolder,
}

impl PathKind {
    /// As in YAML's `type:`.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::UriFile => "uri_file",
            PathKind::UriFolder => "uri_folder",
        }
    }
}

/// How an input reaches the job (`mode:`). Both give the job a read-only
/// local path: the node fetches the data into its cache and binds it
/// read-only; nothing is mounted over the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputMode {
    /// Azure ML's default: read in place.
    #[default]
    RoMount,
    /// Copied to the node before the job starts.
    Download,
}

/// How an output leaves the job (`mode:`). Both write to a local folder
/// that the node uploads when the part ends, success or failure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputMode {
    /// Azure ML's default: written in place.
    #[default]
    RwMount,
    /// Uploaded at the end.
    Upload,
}

/// A path on a registered datastore: `azureml://datastores/NAME/paths/PATH`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastorePath {
    /// The datastore's name ([`WORKSPACE_DATASTORE`] is the artifact store).
    pub datastore: String,
    /// The path inside it, `/`-separated, without a leading or trailing
    /// `/`; empty for the whole datastore.
    pub path: String,
}

impl DatastorePath {
    /// The URI prefix of a datastore path.
    pub const PREFIX: &'static str = "azureml://datastores/";

    /// Reads `azureml://datastores/NAME/paths/PATH` (a trailing `/` is dropped).
    pub fn parse(uri: &str) -> Result<DatastorePath, String> {
        let shape = || {
            format!(
                "`{uri}` is not a datastore path: expected azureml://datastores/NAME/paths/PATH"
            )
        };
        let rest = uri.strip_prefix(Self::PREFIX).ok_or_else(shape)?;
        let (datastore, path) = match rest.split_once("/paths") {
            Some((d, p)) if p.is_empty() || p.starts_with('/') => (d, p.trim_start_matches('/')),
            _ => return Err(shape()),
        };
        if !is_valid_datastore_name(datastore) {
            return Err(format!(
                "`{datastore}` is not a datastore name (letters, digits and `_`, starting with a letter)"
            ));
        }
        let path = path.trim_end_matches('/');
        if !path.is_empty() {
            check_relative_path(path)?;
        }
        Ok(DatastorePath {
            datastore: datastore.to_string(),
            path: path.to_string(),
        })
    }
}

impl std::fmt::Display for DatastorePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}/paths/{}", Self::PREFIX, self.datastore, self.path)
    }
}

/// Whether `name` can name a datastore: Azure ML's rule, letters, digits
/// and `_`, starting with a letter, at most 255 characters.
pub fn is_valid_datastore_name(name: &str) -> bool {
    name.len() <= 255
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One entry of `inputs:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Input {
    /// A literal (`lr: 0.01`), substituted as written.
    Literal {
        /// The value as written.
        value: String,
    },
    /// A file or folder on the machine that runs the job (`drover run`),
    /// bound read-only; the CLI uploads it instead for a cluster (a job
    /// sent without the CLI may name one every node has, under the
    /// cluster's host path policy).
    Path {
        /// File or folder.
        path_kind: PathKind,
        /// Absolute path.
        path: PathBuf,
        /// As written.
        #[serde(default)]
        mode: InputMode,
    },
    /// A file or folder the CLI uploaded: a file's bytes, or a folder's
    /// snapshot (see [`crate::files`]).
    Blob {
        /// File or folder.
        path_kind: PathKind,
        /// The uploaded blob.
        blob: BlobInfo,
        /// A file's name, kept so the job sees it under its own name.
        #[serde(default)]
        file_name: Option<String>,
        /// As written.
        #[serde(default)]
        mode: InputMode,
    },
    /// A file at an `http://` or `https://` URL, downloaded by the node
    /// (and cached there by URL and version).
    Url {
        /// Always a file.
        path_kind: PathKind,
        /// The URL.
        url: String,
        /// As written.
        #[serde(default)]
        mode: InputMode,
    },
    /// A file or folder on a registered datastore, fetched by the node
    /// through the control plane (which holds the credentials).
    Datastore {
        /// File or folder.
        path_kind: PathKind,
        /// Where it is.
        #[serde(flatten)]
        at: DatastorePath,
        /// As written.
        #[serde(default)]
        mode: InputMode,
    },
}

impl Input {
    /// File or folder; `None` for a literal.
    pub fn path_kind(&self) -> Option<PathKind> {
        match self {
            Input::Literal { .. } => None,
            Input::Path { path_kind, .. }
            | Input::Blob { path_kind, .. }
            | Input::Url { path_kind, .. }
            | Input::Datastore { path_kind, .. } => Some(*path_kind),
        }
    }

    /// The name of the file a `uri_file` input is seen under in the container.
    pub fn file_name(&self, input_name: &str) -> String {
        let name = match self {
            Input::Path { path, .. } => path.file_name().map(|f| f.to_string_lossy().into_owned()),
            Input::Blob { file_name, .. } => file_name.clone(),
            Input::Url { url, .. } => url
                .split(['?', '#'])
                .next()
                .and_then(|u| u.rsplit('/').next())
                .filter(|n| !n.is_empty() && !n.contains("://"))
                .map(str::to_string),
            Input::Datastore { at, .. } => at.path.rsplit('/').next().map(str::to_string),
            Input::Literal { .. } => None,
        };
        name.filter(|n| is_plain_file_name(n))
            .unwrap_or_else(|| input_name.to_string())
    }
}

/// A single path component a file can be named in a container folder.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
}

/// One entry of `outputs:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Output {
    /// A folder on the machine that runs the job where it is written
    /// (`drover run`; on a cluster, a folder on every node under its host
    /// path policy). When `None`, `drover run` picks one and a cluster
    /// keeps the output in its artifact store.
    pub path: Option<PathBuf>,
    /// Where a cluster also writes it: a path on a datastore.
    pub datastore: Option<DatastorePath>,
    /// Folder (the default) or file.
    #[serde(rename = "type")]
    pub path_kind: PathKind,
    /// As written.
    pub mode: OutputMode,
}

/// When to pull the job's image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Pull only when the node does not have the image.
    #[default]
    IfNotPresent,
    /// Pull before every run (picks up a moved tag).
    Always,
    /// Never pull; fail when the image is missing.
    Never,
}

/// A bind mount the job asked for in `drover.mounts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// Absolute host path.
    pub source: PathBuf,
    /// Absolute container path.
    pub target: String,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// Where a secret is read from; the secret itself never appears in a spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretSource {
    /// A file holding the secret (trailing newline ignored).
    File(PathBuf),
    /// An environment variable of the process that pulls.
    Env(String),
}

/// `drover.registry_credentials`: how to log in to the image's registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistryCredentials {
    /// A Docker `config.json` (as written by `docker login`).
    DockerConfig(PathBuf),
    /// A user name and a password read from a file or an environment variable.
    Login {
        /// Registry host; the image's registry when `None`.
        registry: Option<String>,
        /// User name.
        username: String,
        /// Where the password is.
        password: SecretSource,
    },
}

/// The `drover:` section: settings Azure ML has no key for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DroverOptions {
    /// GPUs given to each node's part.
    pub gpus_per_instance: u32,
    /// Extra bind mounts.
    pub mounts: Vec<MountSpec>,
    /// Registry login for the image.
    pub registry_credentials: Option<RegistryCredentials>,
    /// When to pull.
    pub pull_policy: PullPolicy,
    /// The job runs Drover's parallel runtime (a `type: parallel` job):
    /// the node mounts it at [`PARALLEL_DRIVER_PATH`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub parallel_runtime: bool,
}

fn one() -> u32 {
    1
}

/// A parsed job with the warnings its file produced (unknown keys and the like).
#[derive(Debug, Clone)]
pub struct ParsedJob {
    /// The job.
    pub spec: JobSpec,
    /// Non-fatal findings, each with file and line.
    pub warnings: Vec<Diagnostic>,
    /// The line of each path-valued key (`code`, `inputs.x.path`,
    /// `outputs.x.path`), for messages about what the path names (a folder
    /// that does not exist is found by whoever reads it, not by parsing).
    pub lines: BTreeMap<String, usize>,
}

impl CommandJob {
    /// The command with `${{inputs.NAME}}` and `${{outputs.NAME}}` replaced by
    /// literal values or container paths, and `$[[…]]` optional sections kept
    /// only when the inputs they mention are given.
    pub fn resolved_command(&self) -> String {
        substitute(&self.command, &|kind, name| {
            self.placeholder_value(kind, name)
        })
        .unwrap_or_else(|_| self.command.clone())
    }

    fn placeholder_value(&self, kind: &str, name: &str) -> Option<String> {
        match kind {
            "inputs" => self.inputs.get(name).map(|i| match i {
                Input::Literal { value } => value.clone(),
                _ => input_container_path(name, i),
            }),
            "outputs" => self
                .outputs
                .get(name)
                .map(|o| output_container_path(name, o)),
            _ => None,
        }
    }

    /// Total processes across all nodes.
    pub fn world_size(&self) -> u32 {
        self.resources.instance_count * self.processes_per_instance()
    }

    /// Processes started on each node (1 without distribution).
    pub fn processes_per_instance(&self) -> u32 {
        self.distribution
            .map(|d| d.process_count_per_instance)
            .unwrap_or(1)
    }

    /// Processes drover-init itself starts on each node: one `mpirun` for an
    /// MPI job (its ranks are mpirun's), else [`Self::processes_per_instance`].
    pub fn processes_started_per_instance(&self) -> u32 {
        match self.distribution {
            Some(d) if d.kind == DistributionKind::Mpi => 1,
            _ => self.processes_per_instance(),
        }
    }

    /// Effective `/dev/shm` size: `resources.shm_size`, else `--shm-size` in docker_args.
    pub fn shm_size(&self) -> Option<u64> {
        self.resources
            .shm_size
            .or(self.resources.docker_args.shm_size)
    }
}

/// Container path of a path input: the folder itself, or the file inside
/// `/drover/inputs/NAME/` under its own name.
pub fn input_container_path(name: &str, input: &Input) -> String {
    match input.path_kind() {
        Some(PathKind::UriFile) => format!("{INPUTS_DIR}/{name}/{}", input.file_name(name)),
        _ => format!("{INPUTS_DIR}/{name}"),
    }
}

/// Container path of an output: its folder `/drover/outputs/NAME`, or for a
/// `uri_file` output the file inside it, named as the last component of its
/// datastore path or local path, else as the output.
pub fn output_container_path(name: &str, output: &Output) -> String {
    match output.path_kind {
        PathKind::UriFolder => format!("{OUTPUTS_DIR}/{name}"),
        PathKind::UriFile => {
            let file = output
                .datastore
                .as_ref()
                .and_then(|d| d.path.rsplit('/').next().map(str::to_string))
                .or_else(|| {
                    output
                        .path
                        .as_ref()
                        .and_then(|p| p.file_name())
                        .map(|f| f.to_string_lossy().into_owned())
                })
                .filter(|f| is_plain_file_name(f))
                .unwrap_or_else(|| name.to_string());
            format!("{OUTPUTS_DIR}/{name}/{file}")
        }
    }
}
