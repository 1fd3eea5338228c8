//! The container-runtime boundary: what the runner needs from a container
//! engine, in plain types. [`crate::docker::DockerRuntime`] implements it over
//! the Docker API; tests can implement it in memory.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use futures_util::stream::BoxStream;

use crate::auth::RegistryAuth;

/// Everything needed to create one container, independent of any engine API.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerConfig {
    /// Container name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Entrypoint (drover-init for job parts).
    pub entrypoint: Vec<String>,
    /// Arguments to the entrypoint.
    pub cmd: Vec<String>,
    /// Environment, `NAME=VALUE`.
    pub env: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Working directory.
    pub working_dir: Option<String>,
    /// User to run as.
    pub user: Option<String>,
    /// Bind mounts.
    pub binds: Vec<Bind>,
    /// `/dev/shm` size in bytes.
    pub shm_size: Option<u64>,
    /// Resource limits.
    pub ulimits: Vec<drover_api::docker_args::Ulimit>,
    /// GPUs by UUID (NVIDIA device request).
    pub gpu_uuids: Vec<String>,
    /// Host device paths passed through (e.g. `/dev/infiniband/uverbs0`).
    pub devices: Vec<String>,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// Memory + swap in bytes (-1 unlimited).
    pub memory_swap: Option<i64>,
    /// Soft memory limit in bytes.
    pub memory_reservation: Option<u64>,
    /// CPU quota in billionths of a core.
    pub nano_cpus: Option<i64>,
    /// Relative CPU weight.
    pub cpu_shares: Option<i64>,
    /// Allowed CPUs.
    pub cpuset_cpus: Option<String>,
    /// Process limit.
    pub pids_limit: Option<i64>,
    /// IPC mode.
    pub ipc_mode: Option<String>,
    /// Network mode: `host`, a network name, `container:<id>`; engine default when `None`.
    pub network_mode: Option<String>,
    /// tmpfs mounts: path → options.
    pub tmpfs: BTreeMap<String, String>,
    /// Read-only root filesystem.
    pub read_only_rootfs: bool,
    /// Seconds between SIGTERM and SIGKILL on stop.
    pub stop_timeout: Option<u64>,
}

/// A bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Host path.
    pub source: String,
    /// Container path.
    pub target: String,
    /// Read-only.
    pub read_only: bool,
}

/// One progress message of an image pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullProgress {
    /// The image being pulled.
    pub image: String,
    /// Layer id, empty for messages about the whole image.
    pub layer: String,
    /// Engine's status text (`Downloading`, `Pull complete`, …).
    pub status: String,
    /// Bytes done, when the engine reports them.
    pub current: Option<u64>,
    /// Bytes in total, when known.
    pub total: Option<u64>,
}

/// Which output stream a log line came from: the wire type itself, so a
/// line goes from the engine to the agent, the server and the store unchanged.
pub use drover_api::wire::LogStream;

/// One line of a container's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Stream.
    pub stream: LogStream,
    /// The engine's RFC 3339 timestamp of the line.
    pub timestamp: String,
    /// The text, without timestamp or trailing newline.
    pub text: String,
}

/// How a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code of PID 1.
    pub code: i64,
    /// The kernel's OOM killer ended a process in the container.
    pub oom_killed: bool,
}

/// Lifecycle state of a container as the engine reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    /// Created, not started.
    Created,
    /// Running (or paused/restarting).
    Running,
    /// Exited or dead.
    Exited,
}

/// A container found by label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSummary {
    /// Engine id.
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    /// All labels.
    pub labels: BTreeMap<String, String>,
    /// State.
    pub state: ContainerState,
}

/// A failure of the container engine, with the engine's own message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    /// The engine could not be reached at all.
    #[error("cannot reach the container engine: {0}")]
    Unreachable(String),
    /// The object does not exist (404).
    #[error("not found: {0}")]
    NotFound(String),
    /// A name is taken (409).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The registry refused or failed a pull or push.
    #[error("{0}")]
    Registry(String),
    /// Any other engine error.
    #[error("{0}")]
    Engine(String),
}

/// An image build from a Docker context on disk (an uncompressed tar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBuildRequest {
    /// The name to give the image (`drover-env/trainer:2`).
    pub tag: String,
    /// The context, as a tar file.
    pub context_tar: std::path::PathBuf,
    /// The Dockerfile's path inside the context.
    pub dockerfile: String,
    /// Labels the image gets.
    pub labels: BTreeMap<String, String>,
}

/// What the runner needs from a container engine.
///
/// Image builds, pushes and labels have default bodies that refuse: the
/// runner itself never needs them, only nodes that build environments do.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// The value of `label` on a local image: `None` when the image is not
    /// present, `Some(None)` when it is but lacks the label.
    fn image_label(
        &self,
        image: &str,
        label: &str,
    ) -> impl Future<Output = Result<Option<Option<String>>, RuntimeError>> + Send {
        let _ = (image, label);
        async {
            Err(RuntimeError::Engine(
                "this container engine cannot inspect image labels".into(),
            ))
        }
    }
    /// Builds an image, calling `progress` with each line of its output.
    fn build_image_from(
        &self,
        request: &ImageBuildRequest,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send {
        let _ = (request, progress);
        async {
            Err(RuntimeError::Engine(
                "this container engine cannot build images".into(),
            ))
        }
    }
    /// The engine's data root (`docker info`'s `DockerRootDir`): the
    /// folder whose filesystem images fill.
    fn data_root(&self) -> impl Future<Output = Result<std::path::PathBuf, RuntimeError>> + Send {
        async {
            Err(RuntimeError::Engine(
                "this container engine has no data root".into(),
            ))
        }
    }
    /// A local image's size in bytes, or `None` when it is not present.
    fn image_size(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Option<u64>, RuntimeError>> + Send {
        let _ = image;
        async {
            Err(RuntimeError::Engine(
                "this container engine cannot inspect images".into(),
            ))
        }
    }
    /// The images (as named at creation, and by id) of every container,
    /// running or not.
    fn images_in_use(
        &self,
    ) -> impl Future<Output = Result<std::collections::BTreeSet<String>, RuntimeError>> + Send {
        async {
            Err(RuntimeError::Engine(
                "this container engine cannot list containers' images".into(),
            ))
        }
    }
    /// Removes a local image's name (never forced: an image a container
    /// uses is refused with [`RuntimeError::Conflict`]).
    fn delete_image(&self, image: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send {
        let _ = image;
        async {
            Err(RuntimeError::Engine(
                "this container engine cannot remove images".into(),
            ))
        }
    }
    /// Pushes a local image to its registry, calling `progress` with each
    /// status line.
    fn push_image(
        &self,
        image: &str,
        auth: Option<RegistryAuth>,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send {
        let _ = (image, auth, progress);
        async {
            Err(RuntimeError::Engine(
                "this container engine cannot push images".into(),
            ))
        }
    }

    /// True if the image is present locally.
    fn image_present(&self, image: &str)
    -> impl Future<Output = Result<bool, RuntimeError>> + Send;
    /// Pulls an image, yielding progress until done; an `Err` item ends it.
    fn pull(
        &self,
        image: &str,
        auth: Option<RegistryAuth>,
    ) -> BoxStream<'static, Result<PullProgress, RuntimeError>>;
    /// Creates a container, returning its id.
    fn create(
        &self,
        config: &ContainerConfig,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// Starts a created container.
    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Follows a container's stdout/stderr until it exits: from its start,
    /// or from the lines stamped at or after `since_unix_secs` (0: all).
    fn logs(
        &self,
        id: &str,
        since_unix_secs: i64,
    ) -> BoxStream<'static, Result<LogLine, RuntimeError>>;
    /// Waits until the container exits.
    fn wait(&self, id: &str) -> impl Future<Output = Result<ExitStatus, RuntimeError>> + Send;
    /// Sends SIGTERM, then SIGKILL after `grace`.
    fn stop(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Removes a container (forcefully, with its anonymous volumes).
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Lists containers (running or not) carrying every given `label=value`.
    fn list(
        &self,
        labels: &[(String, String)],
    ) -> impl Future<Output = Result<Vec<ContainerSummary>, RuntimeError>> + Send;
}

/// A private Docker network of a local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInfo {
    /// Network name.
    pub name: String,
    /// Its IPv4 subnet in CIDR form, e.g. `10.213.4.0/24`.
    pub subnet: Option<String>,
    /// The host's address on it (where node containers reach the host).
    pub gateway: Option<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// A long-lived container on a named network with a fixed address: a local
/// cluster's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeContainerConfig {
    /// Container name (also its host name).
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Command (the image's entrypoint stays).
    pub cmd: Vec<String>,
    /// Environment, `NAME=VALUE`.
    pub env: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Bind mounts.
    pub binds: Vec<Bind>,
    /// The network to join.
    pub network: String,
    /// Its fixed IPv4 address on that network.
    pub ipv4: String,
    /// Capabilities added to Docker's default set (`NET_ADMIN`: the agent
    /// keeps the node's IMDS firewall and marks its own IMDS sockets).
    pub cap_add: Vec<String>,
}

/// One file of an image build context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextFile {
    /// Path inside the context.
    pub path: String,
    /// Unix mode bits.
    pub mode: u32,
    /// Contents.
    pub data: Vec<u8>,
}
