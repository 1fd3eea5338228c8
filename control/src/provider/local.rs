//! The local provider: a cluster's nodes are containers on this machine's
//! Docker, each running the unchanged `drover-agent`.
//!
//! ```text
//!  host ─┬─ drover server (0.0.0.0:PORT) ── IMDS emulator (0.0.0.0:IMDS_PORT, in-process)
//!        │        ▲ http://GATEWAY:PORT           ▲ http://GATEWAY:IMDS_PORT
//!        └─ network drover-<cluster> (10.213.N.0/24, gateway .1)
//!              ├─ node container drover-<cluster>-<hex> (10.213.N.10) ─ drover-agent run
//!              │      └─ job containers: network_mode container:<node>, so the
//!              │         node's address is theirs, as on a VM
//!              └─ node container … (10.213.N.11)
//! ```
//!
//! Each node is registered in the emulator as a VM (name = node id, its IP,
//! the cluster's VM size, `Spot` priority for low-priority clusters, the
//! cluster's identities), and the emulator tells VMs apart by source address,
//! as Azure's IMDS does. Agents reach the docker engine through the host's
//! socket; the node's data directory and `drover-init` are bind-mounted at the
//! same path as on the host, because the job containers the agent creates are
//! the host engine's and their bind sources are host paths.
//!
//! Trust boundary: job containers share the node's network namespace and so
//! reach the emulator; its admin API is therefore off, and evictions are
//! injected through [`LocalProvider::evict`] (the control plane's API).
//!
//! State lives in Docker: node containers carry labels (cluster, control
//! plane, the VM record as JSON), so a restarted server re-registers its VMs
//! with a fresh emulator and lists its nodes again.
//!
//! Node images are shared by every control plane on the machine that runs
//! the same agent binary (`drover/node:<agent digest>`), so their upkeep
//! follows two rules: an image carries the label of the control plane that
//! built it, and a control plane marks the one it uses with a tag of its own
//! (`drover/node:used-by-<control plane>`). A control plane removes only
//! images it built that neither it nor any other control plane marks
//! ([`node_images_to_remove`]); and since an image can still disappear (a
//! `docker rmi`, an image pruned by its builder between a check and a mark),
//! the provider checks its image before creating nodes and builds it again
//! from its [`NodeImageSource`] when it is gone.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_api::compute::{
    ComputeSpec, Identity, ProviderKind, VmPriority, parse_identity_resource_id,
};
use drover_api::labels;
use drover_imds_emulator::{
    Emulator, EmulatorConfig, EventSpec, EventType, ManagedIdentity, Priority, RunningEmulator,
    ServeError, VmSpec,
};
use drover_runner::DockerRuntime;
use drover_runner::docker::ImageInfo;
use drover_runner::runtime::{
    Bind, ContainerRuntime, ContainerState, ContainerSummary, ContextFile, NodeContainerConfig,
    RuntimeError,
};
use sha2::{Digest, Sha256};

use super::{Operation, Provider, ProviderError, ProviderFuture, ProvisionState, ProvisionedNode};

/// The offline base image node images are built on (`images/build-offline.sh base`).
pub const BASE_IMAGE: &str = "drover/base:bookworm";
/// Repository of node images; the tag is the agent binary's digest.
pub const NODE_IMAGE_REPO: &str = "drover/node";
/// Prefix of the tag that marks the node image a control plane uses:
/// `drover/node:used-by-<control plane>`.
const IN_USE_TAG_PREFIX: &str = "used-by-";
/// Label on a node container holding its VM record (JSON).
const VM_LABEL: &str = "drover.vm";
/// Where the agent lives in the node image.
const AGENT_IN_IMAGE: &str = "/usr/local/bin/drover-agent";
/// The first host address given to nodes on a cluster network (`.10`).
const FIRST_NODE_HOST: u8 = 10;

/// Settings of the local provider.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Value of the `drover.control-plane` label on everything created, so
    /// two control planes on one machine never touch each other's nodes.
    pub control_plane: String,
    /// The port the server listens on (on an address the cluster networks
    /// reach, e.g. 0.0.0.0); agents use `http://GATEWAY:PORT`.
    pub server_port: u16,
    /// Where the IMDS emulator listens; its port must stay the same across
    /// restarts, since running agents keep the URL.
    pub imds_listen: SocketAddr,
    /// The node image (see [`ensure_node_image`]).
    pub node_image: String,
    /// What `node_image` was built from, so that the provider can build it
    /// again when it goes missing; `None` for an image given by name, which
    /// the provider cannot rebuild.
    pub node_image_source: Option<NodeImageSource>,
    /// Host path of the static `drover-init`.
    pub init_binary: PathBuf,
    /// Host folder holding one data folder per node.
    pub nodes_dir: PathBuf,
    /// The agents' heartbeat interval, seconds.
    pub heartbeat_seconds: f64,
    /// The agents' SIGTERM-to-SIGKILL grace for job containers, seconds.
    pub stop_grace_seconds: f64,
    /// The second octet-pair prefix of cluster subnets: `10.213` gives
    /// `10.213.N.0/24`.
    pub subnet_prefix: [u8; 2],
}

impl LocalConfig {
    /// Defaults for a server listening on `server_port` with data in `data_dir`.
    pub fn new(
        data_dir: &Path,
        server_port: u16,
        node_image: String,
        init_binary: PathBuf,
    ) -> Self {
        LocalConfig {
            control_plane: control_plane_id(data_dir),
            server_port,
            imds_listen: SocketAddr::from(([0, 0, 0, 0], 7341)),
            node_image,
            node_image_source: None,
            init_binary,
            nodes_dir: data_dir.join("local-nodes"),
            heartbeat_seconds: 2.0,
            stop_grace_seconds: 10.0,
            subnet_prefix: [10, 213],
        }
    }
}

/// What a node image is built from: [`ensure_node_image`]'s input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeImageSource {
    /// The `drover-agent` binary put into the image; its digest is the tag.
    pub agent_binary: PathBuf,
    /// The image it is built on.
    pub base_image: String,
}

impl NodeImageSource {
    /// `agent_binary` on [`BASE_IMAGE`].
    pub fn new(agent_binary: PathBuf) -> Self {
        NodeImageSource {
            agent_binary,
            base_image: BASE_IMAGE.to_string(),
        }
    }
}

/// A stable id for the control plane whose data lives in `data_dir`.
pub fn control_plane_id(data_dir: &Path) -> String {
    let digest = Sha256::digest(data_dir.display().to_string().as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Why the local provider could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalStartError {
    /// Docker is not reachable.
    #[error("the local provider needs Docker")]
    Docker(#[source] RuntimeError),
    /// The emulator could not listen.
    #[error("starting the IMDS emulator on {addr} failed")]
    Imds {
        /// Where it tried.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: ServeError,
    },
    /// The node image is not there.
    #[error("node image {0} not found; `drover up` builds it")]
    NoNodeImage(String),
    /// The node image is not there and could not be built again.
    #[error(transparent)]
    NodeImage(MissingNodeImage),
    /// The nodes' data folder could not be made.
    #[error("cannot create {path}")]
    NodesDir {
        /// The folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `drover-init` is not there.
    #[error("drover-init not found at {0}; build it with `make init`")]
    NoInit(PathBuf),
}

/// Nodes as containers on this machine's Docker.
pub struct LocalProvider {
    docker: DockerRuntime,
    imds: RunningEmulator,
    config: LocalConfig,
    /// The image new nodes get: `config.node_image`, or what a rebuild made
    /// of it. Held across a check and a rebuild, so only one rebuild runs.
    node_image: tokio::sync::Mutex<String>,
}

/// The node image is missing and could not be built again; creating nodes
/// waits until it is back.
#[derive(Debug, thiserror::Error)]
#[error("node image {image} is missing and could not be rebuilt")]
pub struct MissingNodeImage {
    /// The image.
    pub image: String,
    /// Why it could not be rebuilt, with what to do.
    #[source]
    pub source: NodeImageError,
}

fn backend(
    operation: Operation,
    e: impl std::error::Error + Send + Sync + 'static,
) -> ProviderError {
    ProviderError::Backend {
        provider: ProviderKind::Local,
        operation,
        source: Box::new(e),
    }
}

/// The Docker network of `cluster`.
pub fn network_name(cluster: &str) -> String {
    format!("drover-{cluster}")
}

impl LocalProvider {
    /// Connects to Docker, checks the node image and `drover-init`, starts the
    /// IMDS emulator and re-registers the nodes that already exist.
    pub async fn start(mut config: LocalConfig) -> Result<Self, LocalStartError> {
        // Bind sources must be absolute host paths.
        std::fs::create_dir_all(&config.nodes_dir)
            .and_then(|()| std::fs::canonicalize(&config.nodes_dir))
            .map(|dir| config.nodes_dir = dir)
            .map_err(|source| LocalStartError::NodesDir {
                path: config.nodes_dir.clone(),
                source,
            })?;
        let docker = DockerRuntime::connect()
            .await
            .map_err(LocalStartError::Docker)?;
        if !docker
            .image_present(&config.node_image)
            .await
            .map_err(LocalStartError::Docker)?
        {
            // Gone between its build and now (pruned, `docker rmi`).
            let Some(source) = &config.node_image_source else {
                return Err(LocalStartError::NoNodeImage(config.node_image.clone()));
            };
            tracing::warn!(image = %config.node_image, "node image is missing; rebuilding it");
            config.node_image = ensure_node_image(&docker, source, &config.control_plane, |line| {
                tracing::debug!(line, "node image build");
            })
            .await
            .map_err(|source| {
                LocalStartError::NodeImage(MissingNodeImage {
                    image: config.node_image.clone(),
                    source,
                })
            })?;
        }
        // Marked before anything else: from now on no other control plane
        // removes it, and the images this one no longer uses can go.
        if let Err(e) = adopt_node_image(&docker, &config.control_plane, &config.node_image).await {
            tracing::warn!(image = %config.node_image, error = %e, "cannot mark the node image as in use");
        }
        if !config.init_binary.is_file() {
            return Err(LocalStartError::NoInit(config.init_binary.clone()));
        }
        let emulator = Emulator::new(EmulatorConfig {
            // Job containers share the nodes' network namespaces.
            admin_api: false,
            ..EmulatorConfig::default()
        });
        let imds =
            emulator
                .bind(config.imds_listen)
                .await
                .map_err(|source| LocalStartError::Imds {
                    addr: config.imds_listen,
                    source,
                })?;
        let provider = LocalProvider {
            docker,
            imds,
            node_image: tokio::sync::Mutex::new(config.node_image.clone()),
            config,
        };
        let existing = provider
            .node_containers(&[])
            .await
            .map_err(LocalStartError::Docker)?;
        for vm in existing.iter().filter_map(vm_record) {
            let _ = provider.imds.emulator().add_vm(vm);
        }
        tracing::info!(
            imds = %provider.imds.local_addr(),
            image = %provider.config.node_image,
            "local provider ready"
        );
        Ok(provider)
    }

    /// The address the IMDS emulator listens on.
    pub fn imds_addr(&self) -> SocketAddr {
        self.imds.local_addr()
    }

    /// The node image, built again first when it has gone missing (a
    /// `docker rmi`, or pruned by the control plane that built it before
    /// this one marked it). A rebuild from an agent binary that changed
    /// since the start names a new image, which new nodes then get.
    async fn present_node_image(&self) -> Result<String, ProviderError> {
        let fail = |e| backend(Operation::CreateNodes, e);
        let mut image = self.node_image.lock().await;
        if self.docker.image_present(&image).await.map_err(fail)? {
            return Ok(image.clone());
        }
        let missing = |source| {
            backend(
                Operation::CreateNodes,
                MissingNodeImage {
                    image: image.clone(),
                    source,
                },
            )
        };
        let Some(source) = &self.config.node_image_source else {
            return Err(missing(NodeImageError::Named));
        };
        tracing::warn!(
            image = %image,
            agent = %source.agent_binary.display(),
            base = %source.base_image,
            "node image is missing; rebuilding it"
        );
        let rebuilt = ensure_node_image(&self.docker, source, &self.config.control_plane, |line| {
            tracing::debug!(line, "node image build");
        })
        .await
        .map_err(missing)?;
        if rebuilt != *image {
            tracing::warn!(was = %image, now = %rebuilt, "the agent binary changed since the server started; new nodes get the new node image");
        }
        tracing::info!(image = %rebuilt, "node image rebuilt");
        if let Err(e) = adopt_node_image(&self.docker, &self.config.control_plane, &rebuilt).await {
            tracing::warn!(image = %rebuilt, error = %e, "cannot mark the node image as in use");
        }
        *image = rebuilt.clone();
        Ok(rebuilt)
    }

    /// Node containers of this control plane, filtered by more labels.
    async fn node_containers(
        &self,
        extra: &[(String, String)],
    ) -> Result<Vec<ContainerSummary>, RuntimeError> {
        let mut filter = vec![
            (labels::ROLE.to_string(), labels::ROLE_NODE.to_string()),
            (
                labels::CONTROL_PLANE.to_string(),
                self.config.control_plane.clone(),
            ),
        ];
        filter.extend_from_slice(extra);
        self.docker.list(&filter).await
    }

    /// The cluster's network, created with a free /24 if missing; returns
    /// (network name, subnet base `a.b.c`, gateway).
    async fn ensure_network(
        &self,
        cluster: &str,
    ) -> Result<(String, String, String), RuntimeError> {
        let name = network_name(cluster);
        if let Some(n) = self.docker.network(&name).await? {
            let owner = n.labels.get(labels::CONTROL_PLANE);
            if owner != Some(&self.config.control_plane) {
                return Err(RuntimeError::Conflict(format!(
                    "network {name} exists but was not created by this control plane ({}); \
                     name the cluster differently or remove the network",
                    owner.map_or("no drover label", String::as_str)
                )));
            }
            let (Some(subnet), Some(gateway)) = (n.subnet, n.gateway) else {
                return Err(RuntimeError::Engine(format!(
                    "network {name} exists without an IPv4 subnet and gateway; remove it (docker network rm {name})"
                )));
            };
            let base = subnet_base(&subnet).ok_or_else(|| {
                RuntimeError::Engine(format!("network {name} has subnet {subnet}, not a /24"))
            })?;
            return Ok((name, base, gateway));
        }
        let taken: Vec<String> = self
            .docker
            .networks(&[])
            .await?
            .into_iter()
            .filter_map(|n| n.subnet)
            .collect();
        let [a, b] = self.config.subnet_prefix;
        let base = (0..=255u8)
            .map(|c| format!("{a}.{b}.{c}"))
            .find(|base| !taken.iter().any(|t| t.starts_with(&format!("{base}."))))
            .ok_or_else(|| RuntimeError::Engine(format!("no free /24 left in {a}.{b}.0.0/16")))?;
        let gateway = format!("{base}.1");
        let net_labels = BTreeMap::from([
            (labels::MANAGED.to_string(), "true".to_string()),
            (labels::CLUSTER.to_string(), cluster.to_string()),
            (
                labels::CONTROL_PLANE.to_string(),
                self.config.control_plane.clone(),
            ),
        ]);
        match self
            .docker
            .create_network(&name, &format!("{base}.0/24"), &gateway, &net_labels)
            .await
        {
            Ok(()) => {
                tracing::info!(network = %name, subnet = %format!("{base}.0/24"), "cluster network created");
                Ok((name, base, gateway))
            }
            // Created meanwhile by another pass: use it.
            Err(RuntimeError::Conflict(_)) => Box::pin(self.ensure_network(cluster)).await,
            Err(e) => Err(e),
        }
    }

    fn vm_spec(&self, cluster: &ComputeSpec, id: &str, ip: &str) -> VmSpec {
        let mut vm = VmSpec::new(id);
        vm.vm_size = cluster.vm_size.clone();
        if let Some(l) = &cluster.location {
            vm.location = l.clone();
        }
        if cluster.vm_priority == VmPriority::LowPriority {
            vm.priority = Priority::Spot;
            vm.eviction_policy = "Delete".into();
        }
        vm.vm_scale_set_name = cluster.name.clone();
        vm.private_ip = ip.to_string();
        vm.tags = cluster
            .tags
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match &cluster.identity {
            Identity::None => vm.system_identity = None,
            Identity::SystemAssigned => {}
            Identity::UserAssigned { resource_ids } => {
                vm.system_identity = None;
                vm.user_identities = resource_ids
                    .iter()
                    .filter_map(|r| parse_identity_resource_id(r).ok())
                    .map(|r| {
                        ManagedIdentity::user_assigned(
                            &r.subscription_id,
                            &r.resource_group,
                            &r.name,
                        )
                    })
                    .collect();
            }
        }
        vm
    }

    async fn create_one(
        &self,
        cluster: &ComputeSpec,
        image: &str,
        join_token: &str,
        net: &ClusterNet,
        used: &mut Vec<String>,
    ) -> Result<ProvisionedNode, ProviderError> {
        let ClusterNet {
            name: network,
            base,
            gateway,
        } = net;
        let fail = |e| backend(Operation::CreateNodes, e);
        let host = (FIRST_NODE_HOST..=254)
            .find(|h| !used.contains(&format!("{base}.{h}")))
            .ok_or_else(|| {
                fail(RuntimeError::Engine(format!(
                    "network {network} has no free address left"
                )))
            })?;
        let ip = format!("{base}.{host}");
        used.push(ip.clone());
        let id = format!("drover-{}-{}", cluster.name, random_hex(3));
        let data_dir = self.config.nodes_dir.join(&id);
        std::fs::create_dir_all(&data_dir).map_err(|e| backend(Operation::CreateNodes, e))?;
        let vm = self.vm_spec(cluster, &id, &ip);
        let vm_json = serde_json::to_string(&vm).unwrap_or_default();
        let init = self.config.init_binary.display().to_string();
        let data = data_dir.display().to_string();
        let imds_port = self.imds.local_addr().port();
        let env = vec![
            format!("DROVER_SERVER=http://{gateway}:{}", self.config.server_port),
            format!("DROVER_CLUSTER={}", cluster.name),
            format!("DROVER_JOIN_TOKEN={join_token}"),
            format!("DROVER_NODE_ID={id}"),
            format!("DROVER_AGENT_DATA_DIR={data}"),
            format!("DROVER_INIT={init}"),
            format!("DROVER_IMDS_URL=http://{gateway}:{imds_port}"),
            // The node's network is its container's namespace: multi-node
            // parts join it to be reachable at the node's address, and so
            // do single-node parts here, which reach the IMDS emulator
            // as their node, as a job on a VM reaches its VM's IMDS.
            format!("DROVER_NODE_NETWORK=container:{id}"),
            format!("DROVER_JOB_NETWORK=container:{id}"),
            format!("DROVER_NODE_IP={ip}"),
            format!("DROVER_HEARTBEAT_SECONDS={}", self.config.heartbeat_seconds),
            format!(
                "DROVER_STOP_GRACE_SECONDS={}",
                self.config.stop_grace_seconds
            ),
            "DROVER_LOG=info".to_string(),
        ];
        let node_labels = BTreeMap::from([
            (labels::MANAGED.to_string(), "true".to_string()),
            (labels::ROLE.to_string(), labels::ROLE_NODE.to_string()),
            (labels::CLUSTER.to_string(), cluster.name.clone()),
            (
                labels::CONTROL_PLANE.to_string(),
                self.config.control_plane.clone(),
            ),
            (VM_LABEL.to_string(), vm_json),
        ]);
        let spec = NodeContainerConfig {
            name: id.clone(),
            image: image.to_string(),
            cmd: vec!["run".to_string()],
            env,
            labels: node_labels,
            binds: vec![
                Bind {
                    source: "/var/run/docker.sock".into(),
                    target: "/var/run/docker.sock".into(),
                    read_only: false,
                },
                Bind {
                    source: data.clone(),
                    target: data,
                    read_only: false,
                },
                Bind {
                    source: init.clone(),
                    target: init,
                    read_only: true,
                },
            ]
            .into_iter()
            .chain(allowed_host_paths(cluster))
            .collect(),
            network: network.to_string(),
            ipv4: ip.clone(),
            // The agent keeps the IMDS firewall of the node's namespace,
            // which its job containers share (they never get NET_ADMIN).
            cap_add: vec!["NET_ADMIN".to_string()],
        };
        // Registered first: the agent asks IMDS who it is as it starts.
        if let Err(e) = self.imds.emulator().add_vm(vm) {
            return Err(fail(RuntimeError::Engine(e.to_string())));
        }
        let created = async {
            let cid = self.docker.create_node_container(&spec).await?;
            self.docker.start(&cid).await
        }
        .await;
        if let Err(e) = created {
            let _ = self.imds.emulator().remove_vm(&id);
            let _ = self.docker.remove(&id).await;
            return Err(fail(e));
        }
        tracing::info!(cluster = %cluster.name, node = %id, ip = %ip, "node container started");
        Ok(ProvisionedNode {
            id,
            state: ProvisionState::Creating,
        })
    }
}

/// A cluster's network, as nodes are put on it.
struct ClusterNet {
    /// Its name.
    name: String,
    /// Its subnet's `a.b.c`.
    base: String,
    /// The host's address on it.
    gateway: String,
}

/// The host folders a cluster lets its jobs bind, bound into its node
/// containers at the same paths, so that a node sees (and checks) the files
/// its jobs' binds will get from the host's engine, as a VM sees its disks.
/// Folders that do not exist on the host are left out (the engine would
/// create them, owned by root).
fn allowed_host_paths(cluster: &ComputeSpec) -> Vec<Bind> {
    cluster
        .allowed_host_paths
        .iter()
        .filter(|p| {
            let exists = Path::new(p).is_dir();
            if !exists {
                tracing::warn!(cluster = %cluster.name, path = %p, "allowed host path does not exist on this machine; not given to nodes");
            }
            exists
        })
        .map(|p| Bind {
            source: p.clone(),
            target: p.clone(),
            read_only: false,
        })
        .collect()
}

/// The VM record a node container carries in its labels.
fn vm_record(c: &ContainerSummary) -> Option<VmSpec> {
    serde_json::from_str(c.labels.get(VM_LABEL)?).ok()
}

/// `a.b.c` of an `a.b.c.0/24` subnet.
fn subnet_base(subnet: &str) -> Option<String> {
    let (addr, len) = subnet.split_once('/')?;
    if len != "24" {
        return None;
    }
    let ip: IpAddr = addr.parse().ok()?;
    let IpAddr::V4(v4) = ip else { return None };
    let [a, b, c, _] = v4.octets();
    Some(format!("{a}.{b}.{c}"))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // A failing CSPRNG only makes names collide; Docker then refuses the create.
    let _ = getrandom::getrandom(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn node_state(c: &ContainerSummary) -> ProvisionState {
    match c.state {
        ContainerState::Created => ProvisionState::Creating,
        ContainerState::Running => ProvisionState::Running,
        ContainerState::Exited => ProvisionState::Failed("the node container exited".into()),
    }
}

impl Provider for LocalProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Local
    }

    fn creates_nodes(&self) -> bool {
        true
    }

    fn create_nodes<'a>(
        &'a self,
        cluster: &'a ComputeSpec,
        count: u32,
        join_token: &'a str,
    ) -> ProviderFuture<'a, Vec<ProvisionedNode>> {
        Box::pin(async move {
            let fail = |e| backend(Operation::CreateNodes, e);
            let image = self.present_node_image().await?;
            let (name, base, gateway) = self.ensure_network(&cluster.name).await.map_err(fail)?;
            let net = ClusterNet {
                name,
                base,
                gateway,
            };
            let mut used: Vec<String> = self
                .node_containers(&[(labels::CLUSTER.to_string(), cluster.name.clone())])
                .await
                .map_err(fail)?
                .iter()
                .filter_map(vm_record)
                .map(|vm| vm.private_ip)
                .collect();
            let mut created = Vec::new();
            for _ in 0..count {
                created.push(
                    self.create_one(cluster, &image, join_token, &net, &mut used)
                        .await?,
                );
            }
            Ok(created)
        })
    }

    fn remove_node<'a>(
        &'a self,
        cluster: &'a ComputeSpec,
        node_id: &'a str,
    ) -> ProviderFuture<'a, ()> {
        Box::pin(async move {
            let fail = |e| backend(Operation::RemoveNode, e);
            let mine = self
                .node_containers(&[(labels::CLUSTER.to_string(), cluster.name.clone())])
                .await
                .map_err(fail)?
                .into_iter()
                .find(|c| c.name == node_id);
            if let Some(node) = &mine
                && node.state == ContainerState::Running
            {
                // SIGTERM: the agent drains (an idle node at once) and exits.
                let grace = Duration::from_secs_f64(self.config.stop_grace_seconds + 5.0);
                if let Err(e) = self.docker.stop(&node.id, grace).await {
                    tracing::warn!(node = %node_id, error = %e, "stopping the node container failed; removing it");
                }
            }
            // Its job containers, whatever state they are in.
            let jobs = self
                .docker
                .list(&[(labels::OWNER.to_string(), node_id.to_string())])
                .await
                .map_err(fail)?;
            for j in jobs {
                match self.docker.remove(&j.id).await {
                    Ok(()) | Err(RuntimeError::NotFound(_)) => {}
                    Err(e) => return Err(fail(e)),
                }
            }
            if let Some(node) = mine {
                match self.docker.remove(&node.id).await {
                    Ok(()) | Err(RuntimeError::NotFound(_)) => {}
                    Err(e) => return Err(fail(e)),
                }
            }
            let _ = self.imds.emulator().remove_vm(node_id);
            tracing::info!(cluster = %cluster.name, node = %node_id, "node container removed");
            Ok(())
        })
    }

    fn list_nodes<'a>(
        &'a self,
        cluster: &'a ComputeSpec,
    ) -> ProviderFuture<'a, Vec<ProvisionedNode>> {
        Box::pin(async move {
            let found = self
                .node_containers(&[(labels::CLUSTER.to_string(), cluster.name.clone())])
                .await
                .map_err(|e| backend(Operation::ListNodes, e))?;
            Ok(found
                .iter()
                .map(|c| ProvisionedNode {
                    id: c.name.clone(),
                    state: node_state(c),
                })
                .collect())
        })
    }

    fn cluster_deleted<'a>(&'a self, cluster: &'a ComputeSpec) -> ProviderFuture<'a, ()> {
        Box::pin(async move {
            let name = network_name(&cluster.name);
            let fail = |e| backend(Operation::RemoveNode, e);
            let ours = self
                .docker
                .network(&name)
                .await
                .map_err(fail)?
                .is_some_and(|n| {
                    n.labels.get(labels::CONTROL_PLANE) == Some(&self.config.control_plane)
                });
            if ours {
                self.docker.remove_network(&name).await.map_err(fail)?;
                tracing::info!(network = %name, "cluster network removed");
            }
            Ok(())
        })
    }

    fn evict<'a>(
        &'a self,
        cluster: &'a ComputeSpec,
        node_id: &'a str,
    ) -> ProviderFuture<'a, String> {
        Box::pin(async move {
            let known = self
                .imds
                .emulator()
                .vms()
                .iter()
                .any(|vm| vm.name == node_id && vm.vm_scale_set_name == cluster.name);
            if !known {
                return Err(ProviderError::NodeNotFound {
                    provider: ProviderKind::Local,
                    node: node_id.to_string(),
                });
            }
            // Azure gives a spot VM at least 30 s of notice.
            let event = EventSpec::new(EventType::Preempt, node_id, Duration::from_secs(30));
            self.imds
                .emulator()
                .schedule_event(event)
                .map_err(|e| backend(Operation::Evict, RuntimeError::Engine(e.to_string())))
        })
    }
}

/// The node image of `source`: `drover/node:<agent digest>` on its base
/// image, built only when missing, labelled with the control plane that
/// built it. `progress` gets each build line. It neither marks nor prunes:
/// that is [`adopt_node_image`]'s, run by the control plane that uses it.
pub async fn ensure_node_image(
    docker: &DockerRuntime,
    source: &NodeImageSource,
    control_plane: &str,
    progress: impl FnMut(&str),
) -> Result<String, NodeImageError> {
    let agent = std::fs::read(&source.agent_binary).map_err(|e| NodeImageError::ReadAgent {
        path: source.agent_binary.clone(),
        source: e,
    })?;
    let digest: String = Sha256::digest(&agent)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let tag = format!("{NODE_IMAGE_REPO}:{digest}");
    if docker
        .image_present(&tag)
        .await
        .map_err(NodeImageError::Docker)?
    {
        return Ok(tag);
    }
    let base = &source.base_image;
    if !docker
        .image_present(base)
        .await
        .map_err(NodeImageError::Docker)?
    {
        return Err(NodeImageError::NoBase(base.clone()));
    }
    // The builder's label comes last, so that the layers before it are
    // shared by the same agent's images built by other control planes.
    let dockerfile = format!(
        "FROM {base}\nCOPY drover-agent {AGENT_IN_IMAGE}\nLABEL {}=true\nENTRYPOINT [\"{AGENT_IN_IMAGE}\"]\nCMD [\"run\"]\nLABEL {}={control_plane}\n",
        labels::MANAGED,
        labels::CONTROL_PLANE,
    );
    let context = [
        ContextFile {
            path: "Dockerfile".into(),
            mode: 0o644,
            data: dockerfile.into_bytes(),
        },
        ContextFile {
            path: "drover-agent".into(),
            mode: 0o755,
            data: agent,
        },
    ];
    docker
        .build_image(&tag, &context, progress)
        .await
        .map_err(NodeImageError::Docker)?;
    tracing::info!(image = %tag, control_plane, "node image built");
    Ok(tag)
}

/// The tag with which `control_plane` marks the node image it uses.
pub fn in_use_tag(control_plane: &str) -> String {
    format!("{NODE_IMAGE_REPO}:{IN_USE_TAG_PREFIX}{control_plane}")
}

/// Of the images `control_plane` built (`images`: those carrying its
/// label), the ids of those it may remove now that it uses `current`.
///
/// Kept: `current` (by any of its names); any image carrying another
/// control plane's label (never this one's to remove) or marked in use by
/// another control plane (its `used-by-` tag); any image with a name outside
/// [`NODE_IMAGE_REPO`] (someone gave it one). Images are removed by id, so
/// that a mark added after this decision makes the engine refuse.
pub fn node_images_to_remove(
    images: &[ImageInfo],
    control_plane: &str,
    current: &str,
) -> Vec<String> {
    let repo_prefix = format!("{NODE_IMAGE_REPO}:");
    let mine = in_use_tag(control_plane);
    images
        .iter()
        .filter(|i| i.labels.get(labels::CONTROL_PLANE).map(String::as_str) == Some(control_plane))
        .filter(|i| i.id != current && !i.tags.iter().any(|t| t == current || *t == mine))
        .filter(|i| {
            i.tags.iter().all(|t| {
                t.strip_prefix(&repo_prefix)
                    .is_some_and(|tag| !tag.starts_with(IN_USE_TAG_PREFIX))
            })
        })
        .map(|i| i.id.clone())
        .collect()
}

/// Makes `image` the node image `control_plane` uses: marks it with the
/// control plane's `used-by-` tag (moving the mark off the one it used
/// before), then removes the images it built and no longer uses
/// ([`node_images_to_remove`]; the engine refuses those a container still
/// uses). Returns the ids removed.
pub async fn adopt_node_image(
    docker: &DockerRuntime,
    control_plane: &str,
    image: &str,
) -> Result<Vec<String>, RuntimeError> {
    docker
        .tag_image(
            image,
            NODE_IMAGE_REPO,
            &format!("{IN_USE_TAG_PREFIX}{control_plane}"),
        )
        .await?;
    let built = docker
        .images_labelled(&[(labels::CONTROL_PLANE.to_string(), control_plane.to_string())])
        .await?;
    let mut removed = Vec::new();
    for old in node_images_to_remove(&built, control_plane, image) {
        match docker.remove_image(&old).await {
            Ok(()) => {
                tracing::info!(image = %old, control_plane, "removed a node image this control plane no longer uses");
                removed.push(old);
            }
            Err(e) => tracing::debug!(image = %old, error = %e, "node image kept"),
        }
    }
    Ok(removed)
}

/// Drops `control_plane`'s mark on the node image it used (`drover down`):
/// the image stays for the other names it has, and goes if this mark was its
/// last one and no container uses it. Returns whether there was a mark.
pub async fn release_node_image(
    docker: &DockerRuntime,
    control_plane: &str,
) -> Result<bool, RuntimeError> {
    match docker.remove_image(&in_use_tag(control_plane)).await {
        Ok(()) => Ok(true),
        Err(RuntimeError::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// What [`tear_down`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TornDown {
    /// Node containers.
    pub nodes: usize,
    /// Job containers of those nodes.
    pub jobs: usize,
    /// Cluster networks.
    pub networks: usize,
}

/// Removes every node container, job container and network the local
/// provider of `control_plane` created (`drover down`). Safe to repeat.
pub async fn tear_down(
    docker: &DockerRuntime,
    control_plane: &str,
) -> Result<TornDown, RuntimeError> {
    let mut done = TornDown::default();
    let mine = (labels::CONTROL_PLANE.to_string(), control_plane.to_string());
    let nodes = docker
        .list(&[
            (labels::ROLE.to_string(), labels::ROLE_NODE.to_string()),
            mine.clone(),
        ])
        .await?;
    for node in &nodes {
        // The node first, so its agent starts nothing new meanwhile.
        match docker.remove(&node.id).await {
            Ok(()) | Err(RuntimeError::NotFound(_)) => done.nodes += 1,
            Err(e) => return Err(e),
        }
        for job in docker
            .list(&[(labels::OWNER.to_string(), node.name.clone())])
            .await?
        {
            match docker.remove(&job.id).await {
                Ok(()) | Err(RuntimeError::NotFound(_)) => done.jobs += 1,
                Err(e) => return Err(e),
            }
        }
    }
    for net in docker.networks(&[mine]).await? {
        docker.remove_network(&net.name).await?;
        done.networks += 1;
    }
    Ok(done)
}

/// Why the node image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NodeImageError {
    /// The agent binary could not be read.
    #[error("cannot read the agent binary {path}")]
    ReadAgent {
        /// The path tried.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The base image is missing.
    #[error("{0} is missing; build it with `images/build-offline.sh base` (or run `drover up`)")]
    NoBase(String),
    /// The image was given by name (`--node-image`), not built from an agent
    /// binary: there is nothing to build it from.
    #[error(
        "the server was given it with --node-image, so it cannot build it; build or pull it again, or restart the server without --node-image"
    )]
    Named,
    /// Docker failed.
    #[error("docker")]
    Docker(#[source] RuntimeError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_slash_24_bases() {
        assert_eq!(subnet_base("10.213.4.0/24").as_deref(), Some("10.213.4"));
        assert_eq!(subnet_base("10.213.4.0/16"), None);
        assert_eq!(subnet_base("fd00::/64"), None);
        assert_eq!(network_name("cpu"), "drover-cpu");
    }

    /// `id tag,tag built-by` (`-` for no tags, no label).
    fn image(text: &str) -> ImageInfo {
        let f: Vec<&str> = text.split(' ').collect();
        ImageInfo {
            id: f[0].to_string(),
            tags: match f[1] {
                "-" => Vec::new(),
                tags => tags.split(',').map(str::to_string).collect(),
            },
            labels: match f[2] {
                "-" => BTreeMap::new(),
                cp => BTreeMap::from([(labels::CONTROL_PLANE.to_string(), cp.to_string())]),
            },
        }
    }

    #[test]
    fn a_control_plane_prunes_only_images_it_built_and_nobody_uses() {
        let images: Vec<ImageInfo> = [
            // What `a` uses now, marked.
            "sha256:cur drover/node:cur,drover/node:used-by-a a",
            // `a` built it, nobody uses it: removed.
            "sha256:old drover/node:old a",
            // `a` built it, `b` adopted it: kept while `b` uses it.
            "sha256:shared drover/node:shared,drover/node:used-by-b a",
            // `b` built it (b sits at zero nodes): never `a`'s to remove.
            "sha256:theirs drover/node:theirs b",
            // Built before images carried their builder: nobody's.
            "sha256:legacy drover/node:legacy -",
            // `a` built it, someone named it elsewhere: kept.
            "sha256:named drover/node:named,mine/agent:1 a",
            // `a` built it, its name moved to a newer build: removed.
            "sha256:untagged - a",
        ]
        .iter()
        .map(|t| image(t))
        .collect();
        assert_eq!(
            node_images_to_remove(&images, "a", "drover/node:cur"),
            ["sha256:old", "sha256:untagged"]
        );
        // `b` removes none of `a`'s, and keeps its own current one.
        assert!(node_images_to_remove(&images, "b", "drover/node:theirs").is_empty());
        // `b` moved on from `theirs`: it goes; `shared` stays `a`'s.
        assert_eq!(
            node_images_to_remove(&images, "b", "drover/node:new"),
            ["sha256:theirs"]
        );
        // The current image is kept whichever name it is given by.
        assert!(
            !node_images_to_remove(&images, "a", "sha256:old").contains(&"sha256:old".to_string())
        );
        assert_eq!(in_use_tag("a"), "drover/node:used-by-a");
    }

    #[test]
    fn control_plane_ids_are_stable_and_differ_by_data_dir() {
        let a = control_plane_id(Path::new("/var/lib/drover"));
        assert_eq!(a, control_plane_id(Path::new("/var/lib/drover")));
        assert_ne!(a, control_plane_id(Path::new("/tmp/other")));
        assert_eq!(a.len(), 12);
    }
}
