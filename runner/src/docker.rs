//! [`ContainerRuntime`] over the Docker Engine API (bollard).
//!
//! Architecture Invariant: this is the only module in Drover that imports
//! bollard; everything else speaks the plain types of [`crate::runtime`].

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, DeviceMapping, DeviceRequest, HostConfig,
    ResourcesUlimits,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use crate::auth::RegistryAuth;
use crate::runtime::{
    ContainerConfig, ContainerRuntime, ContainerState, ContainerSummary, ContextFile, ExitStatus,
    ImageBuildRequest, LogLine, LogStream, NetworkInfo, NodeContainerConfig, PullProgress,
    RuntimeError,
};

/// The Docker engine, reached through its local socket (or `DOCKER_HOST`).
#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

/// A local image as [`DockerRuntime::images_labelled`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Its content id (`sha256:…`), which names it even once untagged.
    pub id: String,
    /// Its names (`repo:tag`); empty when untagged.
    pub tags: Vec<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

fn engine_error(e: BollardError) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => match status_code {
            404 => RuntimeError::NotFound(message),
            409 => RuntimeError::Conflict(message),
            _ => RuntimeError::Engine(message),
        },
        BollardError::DockerStreamError { error } => RuntimeError::Engine(error),
        e @ (BollardError::IOError { .. }
        | BollardError::HyperResponseError { .. }
        | BollardError::RequestTimeoutError
        | BollardError::SocketNotFoundError(_)) => RuntimeError::Unreachable(e.to_string()),
        other => RuntimeError::Engine(other.to_string()),
    }
}

/// A pull failure is the registry's (or engine's) reason, verbatim.
fn pull_error(e: BollardError) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError { message, .. } => RuntimeError::Registry(message),
        BollardError::DockerStreamError { error } => RuntimeError::Registry(error),
        other => engine_error(other),
    }
}

impl DockerRuntime {
    /// Connects to the local engine (`DOCKER_HOST` or `/var/run/docker.sock`)
    /// and agrees on an API version, so older engines (20.10) work too.
    pub async fn connect() -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| RuntimeError::Unreachable(e.to_string()))?
            // Long pulls and waits are bounded by the runner's own timeouts;
            // bollard's one request timeout would cut them off.
            .with_timeout(Duration::from_secs(24 * 3600));
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| RuntimeError::Unreachable(e.to_string()))?;
        Ok(DockerRuntime { docker })
    }

    /// Creates a container called `name`.
    async fn create_named(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<bollard::models::ContainerCreateResponse, RuntimeError> {
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(engine_error)
    }

    /// The engine's version string.
    pub async fn engine_version(&self) -> Result<String, RuntimeError> {
        let v = self.docker.version().await.map_err(engine_error)?;
        Ok(v.version.unwrap_or_default())
    }
}

/// The label filter of the engine's list calls.
fn label_filter(labels: &[(String, String)]) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_string(),
        labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
    )])
}

fn network_info(
    name: Option<String>,
    ipam: Option<bollard::models::Ipam>,
    labels: Option<HashMap<String, String>>,
) -> NetworkInfo {
    let first = ipam.and_then(|i| i.config).and_then(|c| {
        c.into_iter()
            .find(|c| c.subnet.as_deref().is_some_and(|s| s.contains('.')))
    });
    NetworkInfo {
        name: name.unwrap_or_default(),
        subnet: first.as_ref().and_then(|c| c.subnet.clone()),
        gateway: first.and_then(|c| c.gateway),
        labels: labels.unwrap_or_default().into_iter().collect(),
    }
}

/// Networks and long-lived node containers: what the control plane's local
/// provider needs beyond running job parts.
impl DockerRuntime {
    /// The network called `name`, if it exists.
    pub async fn network(&self, name: &str) -> Result<Option<NetworkInfo>, RuntimeError> {
        match self
            .docker
            .inspect_network(
                name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
        {
            Ok(n) => Ok(Some(network_info(n.name, n.ipam, n.labels))),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(engine_error(e)),
        }
    }

    /// Every network; with `labels`, only those carrying all of them.
    pub async fn networks(
        &self,
        labels: &[(String, String)],
    ) -> Result<Vec<NetworkInfo>, RuntimeError> {
        let options = bollard::query_parameters::ListNetworksOptions {
            filters: (!labels.is_empty()).then(|| label_filter(labels)),
        };
        let found = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(engine_error)?;
        Ok(found
            .into_iter()
            .map(|n| network_info(n.name, n.ipam, n.labels))
            .collect())
    }

    /// Creates a bridge network with an explicit subnet and gateway.
    pub async fn create_network(
        &self,
        name: &str,
        subnet: &str,
        gateway: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let request = bollard::models::NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            ipam: Some(bollard::models::Ipam {
                config: Some(vec![bollard::models::IpamConfig {
                    subnet: Some(subnet.to_string()),
                    gateway: Some(gateway.to_string()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            labels: Some(labels.clone().into_iter().collect()),
            ..Default::default()
        };
        self.docker
            .create_network(request)
            .await
            .map(|_| ())
            .map_err(engine_error)
    }

    /// Removes a network; one that is already gone is not an error.
    pub async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        match self.docker.remove_network(name).await {
            Ok(())
            | Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(engine_error(e)),
        }
    }

    /// Creates a node container on its network at its fixed address, with
    /// Docker's own init as PID 1 (the agent it runs forks no zombies of its
    /// own, but the container must pass SIGTERM on).
    pub async fn create_node_container(
        &self,
        c: &NodeContainerConfig,
    ) -> Result<String, RuntimeError> {
        let endpoint = bollard::models::EndpointSettings {
            ipam_config: Some(bollard::models::EndpointIpamConfig {
                ipv4_address: Some(c.ipv4.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(c.image.clone()),
            cmd: Some(c.cmd.clone()),
            env: Some(c.env.clone()),
            hostname: Some(c.name.clone()),
            labels: Some(c.labels.clone().into_iter().collect()),
            host_config: Some(HostConfig {
                binds: Some(
                    c.binds
                        .iter()
                        .map(|b| {
                            let mode = if b.read_only { "ro" } else { "rw" };
                            format!("{}:{}:{mode}", b.source, b.target)
                        })
                        .collect(),
                ),
                network_mode: Some(c.network.clone()),
                init: Some(true),
                cap_add: (!c.cap_add.is_empty()).then(|| c.cap_add.clone()),
                ..Default::default()
            }),
            networking_config: Some(bollard::models::NetworkingConfig {
                endpoints_config: Some(HashMap::from([(c.network.clone(), endpoint)])),
            }),
            ..Default::default()
        };
        Ok(self.create_named(&c.name, body).await?.id)
    }

    /// Sends `signal` (e.g. `SIGKILL`) to a running container.
    pub async fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        let options = bollard::query_parameters::KillContainerOptions {
            signal: signal.to_string(),
        };
        self.docker
            .kill_container(id, Some(options))
            .await
            .map_err(engine_error)
    }

    /// The labels of a local image, or `None` when it is not present.
    pub async fn image_labels(
        &self,
        image: &str,
    ) -> Result<Option<BTreeMap<String, String>>, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(Some(
                i.config
                    .and_then(|c| c.labels)
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            )),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(engine_error(e)),
        }
    }

    /// Local images carrying every label of `labels`, untagged ones included.
    pub async fn images_labelled(
        &self,
        labels: &[(String, String)],
    ) -> Result<Vec<ImageInfo>, RuntimeError> {
        let options = bollard::query_parameters::ListImagesOptions {
            filters: Some(label_filter(labels)),
            ..Default::default()
        };
        let found = self
            .docker
            .list_images(Some(options))
            .await
            .map_err(engine_error)?;
        Ok(found
            .into_iter()
            .map(|i| ImageInfo {
                id: i.id,
                tags: i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect(),
                labels: i.labels.into_iter().collect(),
            })
            .collect())
    }

    /// Removes a local image by name, or by id (refused while several names
    /// share it); one a container uses is refused ([`RuntimeError::Conflict`]),
    /// never forced. Removing one of several names only drops that name.
    pub async fn remove_image(&self, name: &str) -> Result<(), RuntimeError> {
        self.docker
            .remove_image(
                name,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await
            .map(|_| ())
            .map_err(engine_error)
    }

    /// Gives a local image another name (`docker tag`).
    pub async fn tag_image(&self, image: &str, repo: &str, tag: &str) -> Result<(), RuntimeError> {
        let options = bollard::query_parameters::TagImageOptions {
            repo: Some(repo.to_string()),
            tag: Some(tag.to_string()),
        };
        self.docker
            .tag_image(image, Some(options))
            .await
            .map_err(engine_error)
    }

    /// Builds `tag` from a `Dockerfile` and the other files of `context`,
    /// calling `progress` with each line of the build's output.
    pub async fn build_image(
        &self,
        tag: &str,
        context: &[ContextFile],
        mut progress: impl FnMut(&str),
    ) -> Result<(), RuntimeError> {
        let options = bollard::query_parameters::BuildImageOptions {
            dockerfile: "Dockerfile".into(),
            t: Some(tag.to_string()),
            rm: true,
            forcerm: true,
            ..Default::default()
        };
        let tar = crate::tar::archive(context);
        let mut stream = self.docker.build_image(
            options,
            None,
            Some(bollard::body_full(bytes::Bytes::from(tar))),
        );
        while let Some(item) = stream.next().await {
            let info = item.map_err(engine_error)?;
            if let Some(message) = info.error_detail.and_then(|d| d.message) {
                return Err(RuntimeError::Engine(format!("building {tag}: {message}")));
            }
            if let Some(line) = info.stream {
                let line = line.trim_end();
                if !line.is_empty() {
                    progress(line);
                }
            }
        }
        Ok(())
    }
}

fn host_config(c: &ContainerConfig) -> HostConfig {
    let binds = c
        .binds
        .iter()
        .map(|b| {
            format!(
                "{}:{}:{}",
                b.source,
                b.target,
                if b.read_only { "ro" } else { "rw" }
            )
        })
        .collect();
    let ulimits = c
        .ulimits
        .iter()
        .map(|u| ResourcesUlimits {
            name: Some(u.name.to_string()),
            soft: Some(u.soft),
            hard: Some(u.hard),
        })
        .collect();
    let device_requests = (!c.gpu_uuids.is_empty()).then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            device_ids: Some(c.gpu_uuids.clone()),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]
    });
    let devices = (!c.devices.is_empty()).then(|| {
        c.devices
            .iter()
            .map(|d| DeviceMapping {
                path_on_host: Some(d.clone()),
                path_in_container: Some(d.clone()),
                cgroup_permissions: Some("rwm".into()),
            })
            .collect()
    });
    HostConfig {
        binds: Some(binds),
        shm_size: c.shm_size.map(|s| s as i64),
        ulimits: Some(ulimits),
        device_requests,
        devices,
        memory: c.memory.map(|m| m as i64),
        memory_swap: c.memory_swap,
        memory_reservation: c.memory_reservation.map(|m| m as i64),
        nano_cpus: c.nano_cpus,
        cpu_shares: c.cpu_shares,
        cpuset_cpus: c.cpuset_cpus.clone(),
        pids_limit: c.pids_limit,
        ipc_mode: c.ipc_mode.clone(),
        network_mode: c.network_mode.clone(),
        tmpfs: (!c.tmpfs.is_empty()).then(|| c.tmpfs.clone().into_iter().collect()),
        readonly_rootfs: Some(c.read_only_rootfs),
        // drover-init is PID 1; Docker's own init would sit in front of it.
        init: Some(false),
        ..Default::default()
    }
}

fn split_timestamp(line: &str) -> (String, String) {
    match line.split_once(' ') {
        Some((ts, rest)) if ts.len() >= 20 && ts.as_bytes()[4] == b'-' => {
            (ts.to_string(), rest.to_string())
        }
        _ => (String::new(), line.to_string()),
    }
}

/// `REPO:TAG` as bollard's push wants it: the name and the tag apart.
fn split_tag(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (image, "latest"),
    }
}

impl ContainerRuntime for DockerRuntime {
    async fn image_label(
        &self,
        image: &str,
        label: &str,
    ) -> Result<Option<Option<String>>, RuntimeError> {
        Ok(self
            .image_labels(image)
            .await?
            .map(|labels| labels.get(label).cloned()))
    }

    async fn build_image_from(
        &self,
        request: &ImageBuildRequest,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), RuntimeError> {
        use tokio::io::AsyncReadExt as _;
        let file = tokio::fs::File::open(&request.context_tar)
            .await
            .map_err(|e| {
                RuntimeError::Engine(format!(
                    "cannot read the build context {}: {e}",
                    request.context_tar.display()
                ))
            })?;
        // The context streams from disk: it may be large.
        let body = futures_util::stream::unfold(Some(file), |file| async move {
            let mut file = file?;
            let mut buf = vec![0u8; 1 << 20];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(bytes::Bytes::from(buf)), Some(file)))
                }
                Err(e) => Some((Err(e), None)),
            }
        });
        let options = bollard::query_parameters::BuildImageOptions {
            dockerfile: request.dockerfile.clone(),
            t: Some(request.tag.clone()),
            rm: true,
            forcerm: true,
            labels: Some(request.labels.clone().into_iter().collect()),
            ..Default::default()
        };
        let mut stream =
            self.docker
                .build_image(options, None, Some(bollard::body_try_stream(body)));
        while let Some(item) = stream.next().await {
            let info = match item {
                Ok(info) => info,
                Err(BollardError::DockerStreamError { error }) => {
                    return Err(RuntimeError::Engine(error));
                }
                Err(e) => return Err(engine_error(e)),
            };
            if let Some(message) = info.error_detail.and_then(|d| d.message) {
                return Err(RuntimeError::Engine(message));
            }
            if let Some(text) = info.stream {
                for line in text.lines() {
                    let line = line.trim_end();
                    if !line.is_empty() {
                        progress(line);
                    }
                }
            }
        }
        Ok(())
    }

    async fn push_image(
        &self,
        image: &str,
        auth: Option<RegistryAuth>,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), RuntimeError> {
        let (repo, tag) = split_tag(image);
        let options = bollard::query_parameters::PushImageOptions {
            tag: Some(tag.to_string()),
            ..Default::default()
        };
        let credentials = auth.map(|a| bollard::auth::DockerCredentials {
            username: Some(a.username),
            password: Some(a.password),
            serveraddress: Some(a.server),
            ..Default::default()
        });
        let mut stream = self.docker.push_image(repo, Some(options), credentials);
        let mut last = String::new();
        while let Some(item) = stream.next().await {
            let info = item.map_err(pull_error)?;
            if let Some(message) = info.error_detail.and_then(|d| d.message) {
                return Err(RuntimeError::Registry(format!(
                    "pushing {image}: {message}"
                )));
            }
            if let Some(status) = info.status
                && status != last
            {
                progress(&status);
                last = status;
            }
        }
        Ok(())
    }

    async fn data_root(&self) -> Result<std::path::PathBuf, RuntimeError> {
        let info = self.docker.info().await.map_err(engine_error)?;
        info.docker_root_dir
            .map(std::path::PathBuf::from)
            .ok_or_else(|| RuntimeError::Engine("docker info has no DockerRootDir".into()))
    }

    async fn image_size(&self, image: &str) -> Result<Option<u64>, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(Some(i.size.unwrap_or(0).max(0) as u64)),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(engine_error(e)),
        }
    }

    async fn images_in_use(&self) -> Result<std::collections::BTreeSet<String>, RuntimeError> {
        let options = bollard::query_parameters::ListContainersOptions {
            all: true,
            ..Default::default()
        };
        let found = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(engine_error)?;
        Ok(found
            .into_iter()
            .flat_map(|c| [c.image, c.image_id])
            .flatten()
            .collect())
    }

    async fn delete_image(&self, image: &str) -> Result<(), RuntimeError> {
        self.remove_image(image).await
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(engine_error(e)),
        }
    }

    fn pull(
        &self,
        image: &str,
        auth: Option<RegistryAuth>,
    ) -> BoxStream<'static, Result<PullProgress, RuntimeError>> {
        // fromImage takes the full reference; a bare name would pull every tag.
        let reference =
            if image.contains('@') || image.rsplit('/').next().is_some_and(|l| l.contains(':')) {
                image.to_string()
            } else {
                format!("{image}:latest")
            };
        let options = CreateImageOptions {
            from_image: Some(reference),
            ..Default::default()
        };
        let credentials = auth.map(|a| bollard::auth::DockerCredentials {
            username: Some(a.username),
            password: Some(a.password),
            serveraddress: Some(a.server),
            ..Default::default()
        });
        let image = image.to_string();
        self.docker
            .create_image(Some(options), None, credentials)
            .map(move |item| match item {
                Ok(info) => {
                    if let Some(err) = info.error_detail.and_then(|d| d.message) {
                        return Err(RuntimeError::Registry(err));
                    }
                    let detail = info.progress_detail.unwrap_or_default();
                    Ok(PullProgress {
                        image: image.clone(),
                        layer: info.id.unwrap_or_default(),
                        status: info.status.unwrap_or_default(),
                        current: detail.current.and_then(|c| u64::try_from(c).ok()),
                        total: detail.total.and_then(|t| u64::try_from(t).ok()),
                    })
                }
                Err(e) => Err(pull_error(e)),
            })
            .boxed()
    }

    async fn create(&self, c: &ContainerConfig) -> Result<String, RuntimeError> {
        let body = ContainerCreateBody {
            image: Some(c.image.clone()),
            entrypoint: Some(c.entrypoint.clone()),
            cmd: Some(c.cmd.clone()),
            env: Some(c.env.clone()),
            labels: Some(c.labels.clone().into_iter().collect::<HashMap<_, _>>()),
            working_dir: c.working_dir.clone(),
            user: c.user.clone(),
            stop_timeout: c.stop_timeout.map(|s| s as i64),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            tty: Some(false),
            host_config: Some(host_config(c)),
            ..Default::default()
        };
        let created = self.create_named(&c.name, body).await?;
        for w in created.warnings {
            tracing::warn!(container = %c.name, warning = %w, "engine warning on create");
        }
        Ok(created.id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.docker
            .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
            .await
            .map_err(engine_error)
    }

    fn logs(
        &self,
        id: &str,
        since_unix_secs: i64,
    ) -> BoxStream<'static, Result<LogLine, RuntimeError>> {
        let options = LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            timestamps: true,
            // The engine's API takes a 32-bit time.
            since: i32::try_from(since_unix_secs.max(0)).unwrap_or(i32::MAX),
            ..Default::default()
        };
        self.docker
            .logs(id, Some(options))
            .filter_map(|item| async move {
                match item {
                    Ok(out) => {
                        let stream = match out {
                            bollard::container::LogOutput::StdErr { .. } => LogStream::Stderr,
                            _ => LogStream::Stdout,
                        };
                        let bytes = out.into_bytes();
                        let line = String::from_utf8_lossy(&bytes);
                        let line = line.strip_suffix('\n').unwrap_or(&line);
                        let (timestamp, text) = split_timestamp(line);
                        Some(Ok(LogLine {
                            stream,
                            timestamp,
                            text,
                        }))
                    }
                    Err(e) => Some(Err(engine_error(e))),
                }
            })
            .boxed()
    }

    async fn wait(&self, id: &str) -> Result<ExitStatus, RuntimeError> {
        let mut s = self.docker.wait_container(
            id,
            Some(WaitContainerOptions {
                condition: "not-running".into(),
            }),
        );
        let code = match s.next().await {
            Some(Ok(r)) => r.status_code,
            // bollard reports a non-zero exit as an error carrying the code.
            Some(Err(BollardError::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => return Err(engine_error(e)),
            None => return Err(RuntimeError::Engine("wait ended without a status".into())),
        };
        let inspect = self
            .docker
            .inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .map_err(engine_error)?;
        let state = inspect.state.unwrap_or_default();
        Ok(ExitStatus {
            code: state.exit_code.unwrap_or(code),
            oom_killed: state.oom_killed.unwrap_or(false),
        })
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let options = StopContainerOptions {
            t: Some(grace.as_secs().min(i32::MAX as u64) as i32),
            ..Default::default()
        };
        match self.docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // 304: already stopped.
            Err(BollardError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(engine_error(e)),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        self.docker
            .remove_container(id, Some(options))
            .await
            .map_err(engine_error)
    }

    async fn list(
        &self,
        labels: &[(String, String)],
    ) -> Result<Vec<ContainerSummary>, RuntimeError> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(label_filter(labels)),
            ..Default::default()
        };
        let found = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(engine_error)?;
        Ok(found
            .into_iter()
            .map(|c| ContainerSummary {
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_string())
                    .unwrap_or_default(),
                labels: c.labels.unwrap_or_default().into_iter().collect(),
                state: match c.state {
                    Some(ContainerSummaryStateEnum::CREATED) => ContainerState::Created,
                    Some(
                        ContainerSummaryStateEnum::RUNNING
                        | ContainerSummaryStateEnum::PAUSED
                        | ContainerSummaryStateEnum::RESTARTING,
                    ) => ContainerState::Running,
                    _ => ContainerState::Exited,
                },
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Bind;

    #[test]
    fn gpus_are_requested_by_uuid_from_the_nvidia_driver() {
        let c = ContainerConfig {
            gpu_uuids: vec!["GPU-1".into(), "GPU-2".into()],
            binds: vec![Bind {
                source: "/a".into(),
                target: "/b".into(),
                read_only: true,
            }],
            devices: vec!["/dev/infiniband/uverbs0".into()],
            ..Default::default()
        };
        let h = host_config(&c);
        let req = h.device_requests.expect("device request");
        assert_eq!(req.len(), 1);
        assert_eq!(req[0].driver.as_deref(), Some("nvidia"));
        assert_eq!(
            req[0].device_ids,
            Some(vec!["GPU-1".to_string(), "GPU-2".to_string()])
        );
        assert_eq!(req[0].capabilities, Some(vec![vec!["gpu".to_string()]]));
        assert_eq!(h.binds, Some(vec!["/a:/b:ro".to_string()]));
        assert_eq!(h.init, Some(false));
        let dev = h.devices.expect("devices");
        assert_eq!(
            dev[0].path_on_host.as_deref(),
            Some("/dev/infiniband/uverbs0")
        );
        assert!(
            host_config(&ContainerConfig::default())
                .device_requests
                .is_none()
        );
    }

    #[test]
    fn log_timestamps_are_split_off() {
        assert_eq!(
            split_timestamp("2026-11-27T03:04:05.123456789Z hello world"),
            (
                "2026-11-27T03:04:05.123456789Z".to_string(),
                "hello world".to_string()
            )
        );
        assert_eq!(
            split_timestamp("no stamp"),
            (String::new(), "no stamp".to_string())
        );
    }
}
