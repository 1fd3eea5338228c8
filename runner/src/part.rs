//! One node's share of a job ("part"): planning its container, and running it
//! from pull to removal.
//!
//! [`plan_container`] is a pure function from a job and a [`Placement`] to a
//! [`ContainerConfig`]; [`run_part`] drives a [`ContainerRuntime`] through the
//! lifecycle and reports [`PartEvent`]s on a channel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drover_api::docker_args::{Ulimit, UlimitName};
use drover_api::job::{
    CODE_DIR, CommandJob, DistributionKind, Input, OUTPUTS_DIR, input_container_path,
};
use drover_api::labels;
use drover_api::wire::PartKey;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::{self, AuthError, RegistryAuth};
use crate::pull::{ImagePuller, PullError};
use crate::runtime::{
    Bind, ContainerConfig, ContainerRuntime, ContainerState, ContainerSummary, LogLine,
    PullProgress, RuntimeError,
};

/// Where drover-init is mounted in every job container.
pub const INIT_PATH: &str = "/drover/bin/drover-init";
/// Default port of the rank-0 rendezvous (`MASTER_PORT`, `AZ_BATCH_MASTER_NODE`).
pub const MASTER_PORT: u16 = 29500;
/// Port on which the parts of an MPI job other than node rank 0 wait for
/// `mpirun` to start its daemons (`drover-init launch-listen`).
pub const LAUNCH_PORT: u16 = 29450;
/// First port of a node's TensorFlow tasks in `TF_CONFIG` (the next task
/// on the same node takes the next port).
pub const TF_PORT: u16 = 2222;
/// Where a part's run folder (hostfile, launch secret) is bound, read-only.
pub const RUN_DIR: &str = "/drover/run";
/// The Open MPI hostfile in [`RUN_DIR`]: `<ip> slots=N` per node.
pub const HOSTFILE: &str = "hostfile";
/// The job attempt's launch secret in [`RUN_DIR`].
pub const LAUNCH_SECRET_FILE: &str = "launch-secret";
/// `/dev/shm` of a distributed part unless the job sets one: NCCL and
/// Gloo exchange through shared memory between local processes, and
/// Docker's 64 MiB default makes NCCL fail (Azure ML's default is 2g too).
pub const DISTRIBUTED_SHM_SIZE: u64 = 2 << 30;

/// Where one part runs and as what: everything a job spec does not say.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The part (job, attempt, node rank; also its container's labels).
    pub part: PartKey,
    /// Owner label value (`run` for `drover run`, the node id for an agent).
    pub owner: String,
    /// The IP of every node of the job, in node-rank order (a single-node
    /// part whose address is not known gets loopback; a multi-node part is
    /// never placed with a guessed address: see [`Placement::with_nodes`]).
    pub node_ips: Vec<String>,
    /// False on low-priority (spot) nodes.
    pub dedicated: bool,
    /// GPUs given to this part, by UUID.
    pub gpu_uuids: Vec<String>,
    /// Network mode for the container; engine default when `None`.
    pub network_mode: Option<String>,
    /// The host side of the job's files: its working directory, inputs
    /// and outputs, made ready by whoever runs the part.
    pub files: PartFiles,
    /// Host path of the static drover-init binary.
    pub init_binary: PathBuf,
    /// Seconds drover-init waits between SIGTERM and SIGKILL when one rank fails.
    pub rank_grace: Duration,
    /// Extra environment (identity endpoints and the like), applied last.
    pub extra_env: BTreeMap<String, String>,
    /// Host path of Drover's parallel runtime ([`crate::parallel::install`]),
    /// for a job that runs it (`drover.parallel_runtime`).
    pub parallel_driver: Option<PathBuf>,
}

/// How long drover-init waits between SIGTERM and SIGKILL for the other
/// ranks when one fails, unless told otherwise.
pub const DEFAULT_RANK_GRACE: Duration = Duration::from_secs(10);

/// The address of a single-node part's only node when it is not known:
/// its processes rendezvous on loopback. Never used for a multi-node job.
const LONE_NODE_IP: &str = "127.0.0.1";

/// A multi-node job's node has no known address: its part must not start
/// (its peers could not reach it, and a guessed address would hang them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "node {node} (node rank {rank}) of the job has no known address; the job's parts cannot reach each other"
)]
pub struct UnknownPeerAddress {
    /// The node's id (or its rank, when that is all there is).
    pub node: String,
    /// Its node rank.
    pub rank: u32,
}

impl Placement {
    /// `part` on this machine alone: one node at loopback, dedicated, no
    /// GPUs, the engine's default network, [`DEFAULT_RANK_GRACE`]. The one
    /// place a placement is made; callers change what differs.
    pub fn new(
        part: PartKey,
        owner: impl Into<String>,
        init_binary: PathBuf,
        files: PartFiles,
    ) -> Self {
        Placement {
            part,
            owner: owner.into(),
            node_ips: vec![LONE_NODE_IP.to_string()],
            dedicated: true,
            gpu_uuids: Vec::new(),
            network_mode: None,
            files,
            init_binary,
            rank_grace: DEFAULT_RANK_GRACE,
            extra_env: BTreeMap::new(),
            parallel_driver: None,
        }
    }

    /// The job's nodes, by node rank, as `(id, address)` pairs from the
    /// control plane. A multi-node job needs every address: one that is
    /// missing is an error, never a guess. A single node without an
    /// address rendezvous on loopback.
    pub fn with_nodes<'a>(
        mut self,
        nodes: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Result<Self, UnknownPeerAddress> {
        let nodes: Vec<_> = nodes.into_iter().collect();
        if nodes.len() <= 1 {
            self.node_ips = vec![
                nodes
                    .first()
                    .and_then(|(_, ip)| *ip)
                    .unwrap_or(LONE_NODE_IP)
                    .to_string(),
            ];
            return Ok(self);
        }
        self.node_ips = nodes
            .iter()
            .enumerate()
            .map(|(rank, (id, ip))| {
                ip.map(str::to_string).ok_or_else(|| UnknownPeerAddress {
                    node: id.to_string(),
                    rank: rank as u32,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(self)
    }
}

/// The host side of a part's files, bound into its container by
/// [`plan_container`]. Whoever runs the part makes them ready first: `drover
/// run` from the job's local paths, an agent from the snapshots, uploads,
/// URLs and datastores it fetches into its cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartFiles {
    /// Host folder bound at [`CODE_DIR`], the working directory: the part's
    /// own copy of its code (or an empty folder), holding `outputs/` and
    /// `logs/` as on Azure ML. `None` keeps the image's working directory.
    pub work_dir: Option<PathBuf>,
    /// Host path of each path input (a file, or a folder), bound read-only
    /// at [`input_container_path`].
    pub inputs: BTreeMap<String, PathBuf>,
    /// Host folder of each output, bound read-write at `/drover/outputs/NAME`.
    pub outputs: BTreeMap<String, PathBuf>,
    /// Host folder bound read-only at [`RUN_DIR`]: what Drover gives the
    /// job's launchers (the MPI hostfile, the attempt's launch secret),
    /// written by [`write_run_files`].
    pub run_dir: Option<PathBuf>,
}

impl PartFiles {
    /// The files of a job run on this machine from its own paths (`drover
    /// run`): code and inputs where they are, outputs in their `path:` or
    /// under `outputs_root`, the working directory `work_dir`.
    pub fn local(job: &CommandJob, work_dir: Option<PathBuf>, outputs_root: &Path) -> PartFiles {
        PartFiles {
            work_dir,
            inputs: job
                .inputs
                .iter()
                .filter_map(|(name, input)| match input {
                    Input::Path { path, .. } => Some((name.clone(), path.clone())),
                    _ => None,
                })
                .collect(),
            outputs: job
                .outputs
                .iter()
                .map(|(name, o)| {
                    let path = o.path.clone().unwrap_or_else(|| outputs_root.join(name));
                    (name.clone(), path)
                })
                .collect(),
            run_dir: None,
        }
    }
}

/// Writes a part's run folder: the Open MPI hostfile of an MPI job (`<ip>
/// slots=N` per node, node-rank order) and, when given, the attempt's launch
/// secret (readable by whatever user the image runs as: the folder is the
/// part's own, bound into its container only). Replaces what is there, each
/// file written whole before it is renamed into place.
pub fn write_run_files(
    dir: &Path,
    job: &CommandJob,
    p: &Placement,
    launch_secret: Option<&str>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let put = |name: &str, text: &str| -> std::io::Result<()> {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))?;
        std::fs::rename(&tmp, dir.join(name))
    };
    let slots = job.processes_per_instance();
    let hostfile: String = p
        .node_ips
        .iter()
        .map(|ip| format!("{ip} slots={slots}\n"))
        .collect();
    put(HOSTFILE, &hostfile)?;
    if let Some(secret) = launch_secret {
        put(LAUNCH_SECRET_FILE, secret)?;
    }
    Ok(())
}

/// Container name of a part: `drover-<job>-<rank>-a<attempt>`.
pub fn container_name(part: &PartKey) -> String {
    format!("drover-{}-{}-a{}", part.job, part.node_rank, part.attempt)
}

/// The environment a training script written for Azure ML expects, for one node.
fn distributed_env(job: &CommandJob, p: &Placement) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let ips = if p.node_ips.is_empty() {
        vec![LONE_NODE_IP.to_string()]
    } else {
        p.node_ips.clone()
    };
    let master = ips[0].clone();
    let nodes = job.resources.instance_count.max(1);
    env.insert(
        "AZ_BATCH_MASTER_NODE".into(),
        format!("{master}:{MASTER_PORT}"),
    );
    env.insert("AZ_BATCHAI_MPI_MASTER_NODE".into(), master.clone());
    env.insert("AZ_BATCH_NODE_LIST".into(), ips.join(";"));
    env.insert("AZ_BATCH_HOST_LIST".into(), ips.join(","));
    env.insert(
        "AZ_BATCH_IS_CURRENT_NODE_MASTER".into(),
        (p.part.node_rank == 0).to_string(),
    );
    env.insert("AZ_BATCH_NODE_IS_DEDICATED".into(), p.dedicated.to_string());
    env.insert("MASTER_ADDR".into(), master);
    env.insert("MASTER_PORT".into(), MASTER_PORT.to_string());
    env.insert("NODE_RANK".into(), p.part.node_rank.to_string());
    env.insert("NODE_COUNT".into(), nodes.to_string());
    env.insert("WORLD_SIZE".into(), job.world_size().to_string());
    if let Some(d) = job.distribution {
        env.insert("DROVER_DISTRIBUTION".into(), d.kind.as_str().into());
        match d.kind {
            DistributionKind::Mpi => mpi_env(&mut env, p),
            DistributionKind::Tensorflow => tf_env(&mut env, job, &d, &ips, p.part.node_rank),
            DistributionKind::Pytorch => {}
        }
    }
    env.insert("DROVER_JOB_NAME".into(), p.part.job.clone());
    env.insert("AZUREML_RUN_ID".into(), p.part.job.clone());
    env.insert("DROVER_ATTEMPT".into(), p.part.attempt.to_string());
    env
}

/// Open MPI's settings for launching without SSH: node rank 0's `mpirun`
/// reads the hostfile and starts its daemons on the other nodes through
/// `drover-init rsh`, which asks their `drover-init launch-listen` with the
/// attempt's secret. Vader's single-copy mechanism (CMA) needs ptrace
/// rights containers lack; without turning it off every transfer between
/// local ranks logs an error.
fn mpi_env(env: &mut BTreeMap<String, String>, p: &Placement) {
    if p.files.run_dir.is_some() {
        env.insert(
            "OMPI_MCA_orte_default_hostfile".into(),
            format!("{RUN_DIR}/{HOSTFILE}"),
        );
        env.insert(
            "DROVER_LAUNCH_SECRET_FILE".into(),
            format!("{RUN_DIR}/{LAUNCH_SECRET_FILE}"),
        );
    }
    env.insert("OMPI_MCA_plm_rsh_agent".into(), format!("{INIT_PATH} rsh"));
    env.insert("OMPI_MCA_plm_rsh_no_tree_spawn".into(), "1".into());
    env.insert(
        "OMPI_MCA_btl_vader_single_copy_mechanism".into(),
        "none".into(),
    );
    env.insert("DROVER_LAUNCH_PORT".into(), LAUNCH_PORT.to_string());
}

/// `TF_CONFIG` as Azure ML writes it: the cluster's `worker` (then `ps`)
/// addresses and this process's task. Tasks are numbered across nodes in
/// node-rank order, workers first, [`TF_PORT`] onwards on each node. One
/// task per node is `TF_CONFIG` itself; with more, drover-init gives local
/// rank `i` the value of `DROVER_TF_CONFIG_<i>`.
fn tf_env(
    env: &mut BTreeMap<String, String>,
    job: &CommandJob,
    d: &drover_api::job::Distribution,
    ips: &[String],
    node_rank: u32,
) {
    let per_node = job.processes_per_instance();
    let (workers, ps) = d.tensorflow_tasks(job.resources.instance_count.max(1));
    let address = |task: u32| {
        let node = (task / per_node) as usize;
        let port = u32::from(TF_PORT) + task % per_node;
        format!(
            "{}:{port}",
            ips.get(node).map(String::as_str).unwrap_or(LONE_NODE_IP)
        )
    };
    let mut cluster = serde_json::Map::new();
    cluster.insert(
        "worker".into(),
        (0..workers).map(address).collect::<Vec<_>>().into(),
    );
    if ps > 0 {
        cluster.insert(
            "ps".into(),
            (workers..workers + ps)
                .map(address)
                .collect::<Vec<_>>()
                .into(),
        );
    }
    for local in 0..per_node {
        let task = node_rank * per_node + local;
        let (kind, index) = if task < workers {
            ("worker", task)
        } else {
            ("ps", task - workers)
        };
        let config = serde_json::json!({
            "cluster": cluster,
            "task": {"type": kind, "index": index},
            "environment": "cloud",
        })
        .to_string();
        if per_node == 1 {
            env.insert("TF_CONFIG".into(), config);
        } else {
            env.insert(format!("DROVER_TF_CONFIG_{local}"), config);
        }
    }
}

/// Whether `command` starts an MPI launcher itself (`mpirun …`, `mpiexec
/// …`, a path to either); else Drover puts `mpirun` in front of it.
pub fn starts_mpi_launcher(command: &str) -> bool {
    let first = command
        .split_whitespace()
        .find(|w| !w.contains('=') || w.starts_with('-'))
        .unwrap_or("");
    let name = first.rsplit('/').next().unwrap_or(first);
    matches!(name, "mpirun" | "mpiexec" | "orterun" | "horovodrun")
}

/// `text` as one word for `/bin/sh`.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// drover-init's arguments for a part: the ranks of a plain or PyTorch
/// part; for an MPI job, node rank 0 runs the command once (wrapped in
/// `mpirun` over every slot unless it calls a launcher itself) and the
/// other nodes wait for `mpirun`'s daemons.
fn init_args(job: &CommandJob, p: &Placement) -> Vec<String> {
    let grace = p.rank_grace.as_secs().to_string();
    let mpi = job
        .distribution
        .is_some_and(|d| d.kind == DistributionKind::Mpi);
    if !mpi {
        return vec![
            "--procs".to_string(),
            job.processes_per_instance().to_string(),
            "--grace".to_string(),
            grace,
            "--".to_string(),
            job.resolved_command(),
        ];
    }
    if p.part.node_rank > 0 {
        return vec!["launch-listen".to_string(), "--grace".to_string(), grace];
    }
    let command = job.resolved_command();
    let command = if starts_mpi_launcher(&command) {
        command
    } else {
        format!(
            "mpirun -np {} /bin/sh -c {}",
            job.world_size(),
            shell_quote(&command)
        )
    };
    vec![
        "--mpi".to_string(),
        "--grace".to_string(),
        grace,
        "--".to_string(),
        command,
    ]
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// What the host can give a container, probed once per runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// `/dev/infiniband/*` device nodes, passed through for RDMA between nodes.
    pub infiniband_devices: Vec<String>,
    /// Highest `memlock` limit the engine can set, -1 for unlimited.
    pub memlock_max: i64,
}

impl HostFacts {
    /// Reads the host's InfiniBand devices and the memlock limit it can grant.
    ///
    /// Raising `memlock` to unlimited needs `CAP_SYS_RESOURCE` (which the
    /// engine has on a normal VM, but not inside some sandboxes); without it
    /// runc fails the start with "error setting rlimit type 8". The engine
    /// runs on this host with this process's privileges, so its limits are
    /// read here and the request is clamped, with a warning, instead.
    pub fn probe() -> Self {
        let memlock_max = if has_cap_sys_resource() {
            -1
        } else {
            hard_memlock_limit().unwrap_or(-1)
        };
        HostFacts {
            infiniband_devices: infiniband_devices(Path::new("/dev/infiniband")),
            memlock_max,
        }
    }
}

impl Default for HostFacts {
    fn default() -> Self {
        HostFacts {
            infiniband_devices: Vec::new(),
            memlock_max: -1,
        }
    }
}

/// CAP_SYS_RESOURCE (bit 24) in this process's effective capabilities.
fn has_cap_sys_resource() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return true;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .map(|caps| caps & (1 << 24) != 0)
        .unwrap_or(true)
}

/// The hard `Max locked memory` of this process in bytes; `None` if unlimited or unknown.
fn hard_memlock_limit() -> Option<i64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))?;
    let hard = line.split_whitespace().nth(4)?;
    hard.parse().ok()
}

/// `/dev/infiniband/*` device nodes of the host, for RDMA between nodes.
pub fn infiniband_devices(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| path_string(&e.path()))
        .collect();
    out.sort();
    out
}

/// The process (and thread) limit of a part's container unless the job
/// asks for another with `--pids-limit`: room for 1024 threads per rank, at
/// least 32768, so a fork loop in a job cannot exhaust the node's pids.
pub fn default_pids_limit(processes_per_instance: u32) -> i64 {
    (i64::from(processes_per_instance) * 1024)
        .clamp(32_768, drover_api::docker_args::MAX_PIDS_LIMIT)
}

/// Plans the container of one part. Pure: the same job, placement and host
/// facts always give the same configuration.
pub fn plan_container(job: &CommandJob, p: &Placement, host: &HostFacts) -> ContainerConfig {
    let mut env = distributed_env(job, p);
    if !p.gpu_uuids.is_empty() {
        // What Azure ML sets on GPU nodes; the parallel runtime gives its
        // workers one GPU each from it.
        env.insert(
            "AZ_BATCHAI_GPU_COUNT_FOUND".to_string(),
            p.gpu_uuids.len().to_string(),
        );
    }
    for (k, v) in &job.environment_variables {
        env.insert(k.clone(), v.clone());
    }
    for (k, v) in &job.resources.docker_args.env {
        // `-e NAME` without a value takes it from the job's environment, as docker does from the shell's.
        let value = if v.is_empty() {
            job.environment_variables
                .get(k)
                .cloned()
                .unwrap_or_default()
        } else {
            v.clone()
        };
        env.insert(k.clone(), value);
    }
    for (k, v) in &p.extra_env {
        env.insert(k.clone(), v.clone());
    }

    let mut binds = vec![Bind {
        source: path_string(&p.init_binary),
        target: INIT_PATH.into(),
        read_only: true,
    }];
    if let Some(work_dir) = &p.files.work_dir {
        binds.push(Bind {
            source: path_string(work_dir),
            target: CODE_DIR.into(),
            read_only: false,
        });
    }
    if let Some(run) = &p.files.run_dir {
        binds.push(Bind {
            source: path_string(run),
            target: RUN_DIR.into(),
            read_only: true,
        });
    }
    if let Some(driver) = p
        .parallel_driver
        .as_ref()
        .filter(|_| job.drover.parallel_runtime)
    {
        binds.push(Bind {
            source: path_string(driver),
            target: drover_api::job::PARALLEL_DRIVER_PATH.into(),
            read_only: true,
        });
    }
    for (name, input) in &job.inputs {
        if let Some(path) = p.files.inputs.get(name) {
            binds.push(Bind {
                source: path_string(path),
                target: input_container_path(name, input),
                read_only: true,
            });
        }
    }
    for name in job.outputs.keys() {
        if let Some(path) = p.files.outputs.get(name) {
            binds.push(Bind {
                source: path_string(path),
                target: format!("{OUTPUTS_DIR}/{name}"),
                read_only: false,
            });
        }
    }
    for m in &job.drover.mounts {
        binds.push(Bind {
            source: path_string(&m.source),
            target: m.target.clone(),
            read_only: m.read_only,
        });
    }

    // memlock unlimited: RDMA and NCCL pin memory; later --ulimit entries override.
    let mut ulimits: Vec<Ulimit> = vec![Ulimit {
        name: UlimitName::Memlock,
        soft: -1,
        hard: -1,
    }];
    for u in &job.resources.docker_args.ulimits {
        ulimits.retain(|x| x.name != u.name);
        ulimits.push(u.clone());
    }
    if host.memlock_max >= 0 {
        let clamp = |v: i64| {
            if v < 0 || v > host.memlock_max {
                host.memlock_max
            } else {
                v
            }
        };
        for u in ulimits.iter_mut().filter(|u| u.name == UlimitName::Memlock) {
            u.soft = clamp(u.soft);
            u.hard = clamp(u.hard);
        }
    }

    let mut labels_map = BTreeMap::new();
    for (k, v) in &job.resources.docker_args.labels {
        labels_map.insert(k.clone(), v.clone());
    }
    labels_map.insert(labels::MANAGED.into(), "true".into());
    labels_map.insert(labels::JOB.into(), p.part.job.clone());
    labels_map.insert(labels::PART.into(), p.part.node_rank.to_string());
    labels_map.insert(labels::ATTEMPT.into(), p.part.attempt.to_string());
    labels_map.insert(labels::OWNER.into(), p.owner.clone());

    let args = &job.resources.docker_args;
    let cmd = init_args(job, p);
    ContainerConfig {
        name: container_name(&p.part),
        image: job.image.clone(),
        entrypoint: vec![INIT_PATH.to_string()],
        cmd,
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        labels: labels_map,
        // `--workdir` in docker_args is the user's word; else the part's
        // working directory, as on Azure ML.
        working_dir: args
            .workdir
            .clone()
            .or_else(|| p.files.work_dir.as_ref().map(|_| CODE_DIR.to_string())),
        user: args.user.clone(),
        binds,
        shm_size: job.shm_size().or_else(|| {
            (job.resources.instance_count > 1 || job.processes_per_instance() > 1)
                .then_some(DISTRIBUTED_SHM_SIZE)
        }),
        ulimits,
        gpu_uuids: p.gpu_uuids.clone(),
        devices: host.infiniband_devices.clone(),
        memory: args.memory,
        memory_swap: args.memory_swap,
        memory_reservation: args.memory_reservation,
        nano_cpus: args.cpus.map(|c| (c * 1e9) as i64),
        cpu_shares: args.cpu_shares,
        cpuset_cpus: args.cpuset_cpus.clone(),
        pids_limit: Some(
            args.pids_limit
                .unwrap_or_else(|| default_pids_limit(job.processes_per_instance())),
        ),
        ipc_mode: args.ipc.map(|m| m.as_str().to_string()),
        network_mode: p.network_mode.clone(),
        tmpfs: args.tmpfs.iter().cloned().collect(),
        read_only_rootfs: args.read_only,
        stop_timeout: args.stop_timeout,
    }
}

/// A part's container as found on the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartContainer {
    /// Engine id.
    pub id: String,
    /// Container name.
    pub name: String,
    /// The part its labels name.
    pub part: PartKey,
    /// Owner.
    pub owner: String,
    /// Engine state.
    pub state: ContainerState,
}

impl PartContainer {
    /// Reads the part identity from a container's labels; `None` for a
    /// container whose labels are incomplete (not created by Drover).
    pub fn from_summary(c: ContainerSummary) -> Option<Self> {
        let get = |k: &str| c.labels.get(k).cloned();
        Some(PartContainer {
            part: PartKey {
                job: get(labels::JOB)?,
                node_rank: get(labels::PART)?.parse().ok()?,
                attempt: get(labels::ATTEMPT)?.parse().ok()?,
            },
            owner: get(labels::OWNER)?,
            id: c.id,
            name: c.name,
            state: c.state,
        })
    }
}

/// Something that happened while a part ran, in order.
#[derive(Debug, Clone)]
pub enum PartEvent {
    /// Image pull progress.
    Pull(PullProgress),
    /// The container was created.
    Created {
        /// Container id.
        id: String,
    },
    /// The container started.
    Started {
        /// Container id.
        id: String,
    },
    /// A line of output.
    Log(LogLine),
    /// Stopping began (timeout or cancel).
    Stopping {
        /// Why.
        reason: StopReason,
    },
}

/// Why a part was stopped before it exited by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `limits.timeout` passed.
    Timeout,
    /// Canceled by the user or the control plane.
    Canceled,
}

/// How a part ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartOutcome {
    /// Exited with code 0.
    Completed,
    /// Exited with a non-zero code.
    Failed {
        /// The code.
        exit_code: i64,
    },
    /// A process was killed by the kernel's OOM killer.
    OomKilled {
        /// PID 1's exit code.
        exit_code: i64,
    },
    /// Stopped after `limits.timeout`.
    TimedOut,
    /// Stopped by cancellation.
    Canceled,
}

impl PartOutcome {
    /// The exit code a CLI should end with: the job's own, 124 for a timeout
    /// (like `timeout(1)`), 130 for cancellation (like Ctrl-C).
    pub fn exit_code(&self) -> i32 {
        match self {
            PartOutcome::Completed => 0,
            PartOutcome::Failed { exit_code } | PartOutcome::OomKilled { exit_code } => {
                (*exit_code).clamp(1, 255) as i32
            }
            PartOutcome::TimedOut => 124,
            PartOutcome::Canceled => 130,
        }
    }
}

/// Why a part could not be run to an outcome.
#[derive(Debug, thiserror::Error)]
pub enum PartError {
    /// A local path the job names does not exist.
    #[error("{what} {path} does not exist")]
    MissingPath {
        /// `code`, `inputs.x`, `drover.mounts[0]`, `drover-init`.
        what: String,
        /// The path.
        path: PathBuf,
    },
    /// A path input has no host path: whoever runs the part did not fetch it.
    #[error("input {name} was not made ready on this machine")]
    InputNotReady {
        /// The input.
        name: String,
    },
    /// An output folder could not be created.
    #[error("cannot create output folder {path}")]
    CreateOutput {
        /// The folder.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Registry credentials could not be read.
    #[error(transparent)]
    Credentials(#[from] AuthError),
    /// The image could not be made available.
    #[error(transparent)]
    Pull(#[from] PullError),
    /// The container could not be created.
    #[error("creating container {name} failed")]
    Create {
        /// Container name.
        name: String,
        /// Cause.
        #[source]
        source: RuntimeError,
    },
    /// The container could not be started; `cleanup` says whether removing it failed too.
    #[error("starting container {name} failed{}", cleanup.as_ref().map(|c| format!(" (and removing it failed too: {c})")).unwrap_or_default())]
    Start {
        /// Container name.
        name: String,
        /// Cause.
        #[source]
        source: RuntimeError,
        /// Error of the removal that followed, if it failed as well.
        cleanup: Option<RuntimeError>,
    },
    /// Waiting for or stopping the container failed.
    #[error("supervising container {name} failed")]
    Supervise {
        /// Container name.
        name: String,
        /// Cause.
        #[source]
        source: RuntimeError,
    },
}

/// Options of [`run_part`].
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// SIGTERM-to-SIGKILL grace when stopping for timeout or cancel.
    pub stop_grace: Duration,
    /// Remove the container once it has ended and its logs are drained.
    pub remove: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            stop_grace: Duration::from_secs(10),
            remove: true,
        }
    }
}

/// Checks the host paths a part needs and creates its output folders.
pub fn prepare_host_paths(job: &CommandJob, p: &Placement) -> Result<(), PartError> {
    let missing = |what: String, path: &Path| PartError::MissingPath {
        what,
        path: path.to_path_buf(),
    };
    if !p.init_binary.is_file() {
        return Err(missing("drover-init binary".into(), &p.init_binary));
    }
    if job.drover.parallel_runtime {
        match &p.parallel_driver {
            Some(driver) if driver.is_file() => {}
            Some(driver) => return Err(missing("Drover's parallel runtime".into(), driver)),
            None => {
                return Err(missing(
                    "Drover's parallel runtime (this runner was given none)".into(),
                    Path::new(drover_api::job::PARALLEL_DRIVER_PATH),
                ));
            }
        }
    }
    if let Some(work_dir) = &p.files.work_dir
        && !work_dir.is_dir()
    {
        return Err(missing("working directory".into(), work_dir));
    }
    for (name, input) in &job.inputs {
        match p.files.inputs.get(name) {
            Some(path) if !path.exists() => {
                return Err(missing(format!("input {name}:"), path));
            }
            None if input.path_kind().is_some() => {
                return Err(PartError::InputNotReady { name: name.clone() });
            }
            _ => {}
        }
    }
    for (i, m) in job.drover.mounts.iter().enumerate() {
        if !m.source.exists() {
            return Err(missing(format!("drover.mounts[{i}] source"), &m.source));
        }
    }
    for path in p.files.outputs.values() {
        std::fs::create_dir_all(path).map_err(|source| PartError::CreateOutput {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Runs parts on one container runtime: the runtime, its shared puller, the
/// host's facts and the run options, held together so every part of a node
/// shares one puller (and so one pull per image).
pub struct PartRunner<R: ContainerRuntime> {
    /// The container engine.
    pub runtime: Arc<R>,
    /// Shared image puller over `runtime`.
    pub puller: ImagePuller<R>,
    /// How parts are stopped and cleaned up.
    pub options: RunOptions,
    /// What the host can give containers.
    pub host: HostFacts,
}

impl<R: ContainerRuntime> PartRunner<R> {
    /// A runner over `runtime` with its own puller.
    pub fn new(
        runtime: Arc<R>,
        limits: crate::pull::PullLimits,
        options: RunOptions,
        host: HostFacts,
    ) -> Self {
        let puller = ImagePuller::new(runtime.clone(), limits);
        PartRunner {
            runtime,
            puller,
            options,
            host,
        }
    }

    /// Every part container this runner's engine holds (any state), found by
    /// the `drover.*` labels; with `owner`, only that owner's. This is what an
    /// agent re-adopts after a restart: state lives in Docker, not in memory.
    pub async fn list_parts(
        &self,
        owner: Option<&str>,
    ) -> Result<Vec<PartContainer>, RuntimeError> {
        let mut filter = vec![(labels::MANAGED.to_string(), "true".to_string())];
        if let Some(o) = owner {
            filter.push((labels::OWNER.to_string(), o.to_string()));
        }
        let found = self.runtime.list(&filter).await?;
        Ok(found
            .into_iter()
            .filter_map(PartContainer::from_summary)
            .collect())
    }

    /// Runs one part to its end: pull, create, start, stream logs, wait
    /// (bounded by `limits.timeout` and `cancel`), stop if needed, remove.
    /// Events go to `events`; a closed channel never fails the part.
    pub async fn run(
        &self,
        job: &CommandJob,
        placement: &Placement,
        events: mpsc::Sender<PartEvent>,
        cancel: CancellationToken,
    ) -> Result<PartOutcome, PartError> {
        run_part(self, job, placement, events, cancel).await
    }
}

async fn run_part<R: ContainerRuntime>(
    runner: &PartRunner<R>,
    job: &CommandJob,
    placement: &Placement,
    events: mpsc::Sender<PartEvent>,
    cancel: CancellationToken,
) -> Result<PartOutcome, PartError> {
    let PartRunner {
        runtime,
        puller,
        options,
        host,
    } = runner;
    prepare_host_paths(job, placement)?;
    let auth: Option<RegistryAuth> =
        auth::resolve(&job.image, job.drover.registry_credentials.as_ref())?;

    // Pull, forwarding progress; cancellation aborts the wait (the shared pull goes on).
    let (ptx, mut prx) = mpsc::channel::<PullProgress>(256);
    let forward = {
        let events = events.clone();
        tokio::spawn(async move {
            while let Some(p) = prx.recv().await {
                let _ = events.send(PartEvent::Pull(p)).await;
            }
        })
    };
    let pulled = tokio::select! {
        r = puller.ensure(&job.image, job.drover.pull_policy, auth, Some(ptx)) => Some(r),
        _ = cancel.cancelled() => None,
    };
    let _ = forward.await;
    match pulled {
        None => return Ok(PartOutcome::Canceled),
        Some(r) => r?,
    }

    let config = plan_container(job, placement, host);
    let name = config.name.clone();
    let id = runtime
        .create(&config)
        .await
        .map_err(|source| PartError::Create {
            name: name.clone(),
            source,
        })?;
    let _ = events.send(PartEvent::Created { id: id.clone() }).await;
    tracing::debug!(container = %name, id = %id, "container created");

    if cancel.is_cancelled() {
        let _ = runtime.remove(&id).await;
        return Ok(PartOutcome::Canceled);
    }
    if let Err(source) = runtime.start(&id).await {
        let cleanup = runtime.remove(&id).await.err();
        return Err(PartError::Start {
            name,
            source,
            cleanup,
        });
    }
    let _ = events.send(PartEvent::Started { id: id.clone() }).await;

    let logs = {
        let mut stream = runtime.logs(&id, 0);
        let events = events.clone();
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(line) => {
                        let _ = events.send(PartEvent::Log(line)).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "log stream ended with an error");
                        break;
                    }
                }
            }
        })
    };

    let timeout = job.timeout_seconds.map(Duration::from_secs);
    let sleep = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let supervise = |source| PartError::Supervise {
        name: name.clone(),
        source,
    };
    let outcome = tokio::select! {
        status = runtime.wait(&id) => {
            let status = status.map_err(supervise)?;
            if status.oom_killed {
                PartOutcome::OomKilled { exit_code: status.code }
            } else if status.code == 0 {
                PartOutcome::Completed
            } else {
                PartOutcome::Failed { exit_code: status.code }
            }
        }
        _ = sleep => {
            let _ = events.send(PartEvent::Stopping { reason: StopReason::Timeout }).await;
            runtime.stop(&id, options.stop_grace).await.map_err(supervise)?;
            PartOutcome::TimedOut
        }
        _ = cancel.cancelled() => {
            let _ = events.send(PartEvent::Stopping { reason: StopReason::Canceled }).await;
            runtime.stop(&id, options.stop_grace).await.map_err(supervise)?;
            PartOutcome::Canceled
        }
    };
    // The log stream ends when the container does; bound the wait in case the engine lags.
    let _ = tokio::time::timeout(Duration::from_secs(5), logs).await;
    if options.remove
        && let Err(e) = runtime.remove(&id).await
    {
        tracing::warn!(container = %name, error = %e, "removing container failed");
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{ExitScript, FakeRuntime, PullScript};
    use crate::pull::PullLimits;

    fn job(yaml: &str) -> CommandJob {
        drover_api::JobSpec::from_yaml("job.yml", yaml, Path::new("/jobs"))
            .expect("valid job")
            .spec
            .into_command()
            .expect("a command job")
    }

    fn placement(dir: &Path) -> Placement {
        let init = dir.join("drover-init");
        std::fs::write(&init, b"#!").expect("init");
        Placement {
            dedicated: false,
            gpu_uuids: vec!["GPU-aaaa".into(), "GPU-bbbb".into()],
            network_mode: Some("container:node-a".into()),
            extra_env: BTreeMap::from([("MSI_ENDPOINT".into(), "http://x".into())]),
            ..Placement::new(
                PartKey::new("j1", 2, 1),
                "node-a",
                init,
                PartFiles::default(),
            )
            .with_nodes([("node-a", Some("10.0.0.4")), ("node-b", Some("10.0.0.5"))])
            .expect("every address is known")
        }
    }

    fn env_of(c: &ContainerConfig) -> BTreeMap<String, String> {
        c.env
            .iter()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn plan_sets_identity_labels_distributed_env_and_resources() {
        let dir = tempfile::tempdir().unwrap();
        let j = job(
            "command: python t.py ${{inputs.lr}}\nimage: img:1\ninputs: {lr: 0.1}\nresources:\n  instance_count: 2\n  shm_size: 1g\n  docker_args: --memory 2g --cpus 1.5 --ulimit memlock=1024 -e X=1\ndistribution: {type: pytorch, process_count_per_instance: 4}\nenvironment_variables: {A: b}\n",
        );
        let p = placement(dir.path());
        let c = plan_container(&j, &p, &HostFacts::default());
        assert_eq!(c.name, "drover-j1-1-a2");
        assert_eq!(c.entrypoint, vec![INIT_PATH]);
        assert_eq!(
            c.cmd,
            vec!["--procs", "4", "--grace", "10", "--", "python t.py 0.1"]
        );
        assert_eq!(c.labels.get(labels::JOB).map(String::as_str), Some("j1"));
        assert_eq!(c.labels.get(labels::PART).map(String::as_str), Some("1"));
        assert_eq!(c.labels.get(labels::ATTEMPT).map(String::as_str), Some("2"));
        assert_eq!(
            c.labels.get(labels::OWNER).map(String::as_str),
            Some("node-a")
        );
        assert_eq!(
            c.labels.get(labels::MANAGED).map(String::as_str),
            Some("true")
        );
        let env = env_of(&c);
        for (k, v) in [
            ("AZ_BATCH_MASTER_NODE", "10.0.0.4:29500"),
            ("AZ_BATCHAI_MPI_MASTER_NODE", "10.0.0.4"),
            ("AZ_BATCH_NODE_LIST", "10.0.0.4;10.0.0.5"),
            ("AZ_BATCH_HOST_LIST", "10.0.0.4,10.0.0.5"),
            ("AZ_BATCH_IS_CURRENT_NODE_MASTER", "false"),
            ("AZ_BATCH_NODE_IS_DEDICATED", "false"),
            ("MASTER_ADDR", "10.0.0.4"),
            ("MASTER_PORT", "29500"),
            ("NODE_RANK", "1"),
            ("WORLD_SIZE", "8"),
            ("A", "b"),
            ("X", "1"),
            ("MSI_ENDPOINT", "http://x"),
        ] {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
        }
        assert_eq!(c.shm_size, Some(1 << 30));
        assert_eq!(c.memory, Some(2 << 30));
        assert_eq!(c.nano_cpus, Some(1_500_000_000));
        assert_eq!(c.gpu_uuids, vec!["GPU-aaaa", "GPU-bbbb"]);
        assert_eq!(env_of(&c)["AZ_BATCHAI_GPU_COUNT_FOUND"], "2");
        assert_eq!(c.network_mode.as_deref(), Some("container:node-a"));
        // The job's own memlock wins over the unlimited default.
        assert_eq!(
            c.ulimits,
            vec![Ulimit {
                name: UlimitName::Memlock,
                soft: 1024,
                hard: 1024
            }]
        );
        assert_eq!(c.binds[0].target, INIT_PATH);
        assert!(c.binds[0].read_only);
        // No --pids-limit: the default bounds the container's processes.
        assert_eq!(c.pids_limit, Some(32_768));
        let j = job(
            "command: x\nimage: i\nresources:\n  docker_args: --pids-limit 100 --ipc shareable\ndistribution: {type: mpi, process_count_per_instance: 64}\n",
        );
        let c = plan_container(&j, &p, &HostFacts::default());
        assert_eq!(c.pids_limit, Some(100));
        assert_eq!(c.ipc_mode.as_deref(), Some("shareable"));
        assert_eq!(default_pids_limit(64), 65_536);
        assert_eq!(default_pids_limit(1024), 1_048_576);
    }

    #[test]
    fn the_parts_files_are_bound_where_the_job_sees_them() {
        let dir = tempfile::tempdir().unwrap();
        let j = job(
            "command: x\nimage: i\ncode: src\ninputs:\n  d: {type: uri_folder, path: data}\n  f: {type: uri_file, path: https://example.com/a/iris.csv}\n  lr: 0.1\noutputs:\n  model: {type: uri_folder}\n",
        );
        let files = PartFiles {
            work_dir: Some("/node/parts/p/wd".into()),
            inputs: BTreeMap::from([
                ("d".to_string(), PathBuf::from("/node/cache/trees/1")),
                ("f".to_string(), PathBuf::from("/node/cache/urls/2/data")),
            ]),
            outputs: BTreeMap::from([(
                "model".to_string(),
                PathBuf::from("/node/parts/p/out/model"),
            )]),
            run_dir: None,
        };
        let p = Placement {
            files,
            ..placement(dir.path())
        };
        let c = plan_container(&j, &p, &HostFacts::default());
        let binds: Vec<(&str, &str, bool)> = c
            .binds
            .iter()
            .skip(1)
            .map(|b| (b.source.as_str(), b.target.as_str(), b.read_only))
            .collect();
        assert_eq!(
            binds,
            [
                ("/node/parts/p/wd", CODE_DIR, false),
                ("/node/cache/trees/1", "/drover/inputs/d", true),
                ("/node/cache/urls/2/data", "/drover/inputs/f/iris.csv", true),
                ("/node/parts/p/out/model", "/drover/outputs/model", false),
            ]
        );
        assert_eq!(c.working_dir.as_deref(), Some(CODE_DIR));
        // An input nobody fetched is the runner's caller's mistake, said so.
        let p = Placement {
            files: PartFiles::default(),
            ..placement(dir.path())
        };
        assert!(matches!(
            prepare_host_paths(&j, &p),
            Err(PartError::InputNotReady { name }) if name == "d"
        ));
    }

    #[test]
    fn a_multi_node_placement_never_guesses_an_address() {
        let p = Placement::new(
            PartKey::new("j", 1, 0),
            "run",
            "/init".into(),
            PartFiles::default(),
        );
        assert_eq!(p.node_ips, ["127.0.0.1"]);
        assert_eq!(p.rank_grace, DEFAULT_RANK_GRACE);
        let err = p
            .clone()
            .with_nodes([("a", Some("10.0.0.4")), ("b", None)])
            .unwrap_err();
        assert_eq!(
            err,
            UnknownPeerAddress {
                node: "b".into(),
                rank: 1
            }
        );
        assert!(err.to_string().contains("node b (node rank 1)"), "{err}");
        // One node alone rendezvous on loopback when its address is unknown.
        let lone = p.clone().with_nodes([("a", None)]).unwrap();
        assert_eq!(lone.node_ips, ["127.0.0.1"]);
        let lone = p.clone().with_nodes([("a", Some("10.0.0.9"))]).unwrap();
        assert_eq!(lone.node_ips, ["10.0.0.9"]);
        assert_eq!(p.with_nodes([]).unwrap().node_ips, ["127.0.0.1"]);
    }

    fn on_node(dir: &Path, rank: u32, run_dir: Option<PathBuf>) -> Placement {
        let base = placement(dir);
        let nodes = [
            ("n0", Some("10.0.0.4")),
            ("n1", Some("10.0.0.5")),
            ("n2", Some("10.0.0.6")),
        ];
        Placement {
            part: PartKey::new("j1", 2, rank),
            files: PartFiles {
                run_dir,
                ..PartFiles::default()
            },
            ..base.with_nodes(nodes).unwrap()
        }
    }

    #[test]
    fn an_mpi_job_runs_its_command_once_on_node_zero_and_listens_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let j = job(
            "command: mpirun python3 allreduce.py\nimage: i\nresources: {instance_count: 3}\ndistribution: {type: mpi, process_count_per_instance: 2}\nenvironment_variables: {NCCL_DEBUG: INFO, UCX_TLS: tcp}\n",
        );
        let run = dir.path().join("run");
        let plan = |rank| {
            plan_container(
                &j,
                &on_node(dir.path(), rank, Some(run.clone())),
                &HostFacts::default(),
            )
        };
        let c0 = plan(0);
        assert_eq!(
            c0.cmd,
            [
                "--mpi",
                "--grace",
                "10",
                "--",
                "mpirun python3 allreduce.py"
            ]
        );
        let c2 = plan(2);
        assert_eq!(c2.cmd, ["launch-listen", "--grace", "10"]);
        let env = env_of(&c2);
        for (k, v) in [
            ("OMPI_MCA_plm_rsh_agent", "/drover/bin/drover-init rsh"),
            ("OMPI_MCA_orte_default_hostfile", "/drover/run/hostfile"),
            ("DROVER_LAUNCH_SECRET_FILE", "/drover/run/launch-secret"),
            ("DROVER_LAUNCH_PORT", "29450"),
            ("AZ_BATCH_HOST_LIST", "10.0.0.4,10.0.0.5,10.0.0.6"),
            ("WORLD_SIZE", "6"),
            ("NODE_RANK", "2"),
            ("DROVER_DISTRIBUTION", "mpi"),
            // The job's fabric settings reach every node untouched.
            ("NCCL_DEBUG", "INFO"),
            ("UCX_TLS", "tcp"),
        ] {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
        }
        // Open MPI's root switch is drover-init's to set, where the image runs as root.
        assert!(!env.contains_key("OMPI_ALLOW_RUN_AS_ROOT"));
        assert!(
            c2.binds
                .iter()
                .any(|b| b.target == RUN_DIR && b.read_only && b.source == run.to_string_lossy())
        );
        // NCCL's shared memory: a distributed part gets 2 GiB unless it says.
        assert_eq!(c2.shm_size, Some(DISTRIBUTED_SHM_SIZE));

        // A command without a launcher gets mpirun over every slot.
        let j = job(
            "command: python3 'train.py'\nimage: i\nresources: {instance_count: 3, shm_size: 1g}\ndistribution: {type: mpi, process_count_per_instance: 2}\n",
        );
        let c0 = plan_container(
            &j,
            &on_node(dir.path(), 0, Some(run.clone())),
            &HostFacts::default(),
        );
        assert_eq!(
            c0.cmd.last().map(String::as_str),
            Some(r#"mpirun -np 6 /bin/sh -c 'python3 '\''train.py'\'''"#)
        );
        assert_eq!(c0.shm_size, Some(1 << 30));

        write_run_files(&run, &j, &on_node(dir.path(), 0, None), Some("s3cr3t")).unwrap();
        assert_eq!(
            std::fs::read_to_string(run.join(HOSTFILE)).unwrap(),
            "10.0.0.4 slots=2\n10.0.0.5 slots=2\n10.0.0.6 slots=2\n"
        );
        assert_eq!(
            std::fs::read_to_string(run.join(LAUNCH_SECRET_FILE)).unwrap(),
            "s3cr3t"
        );
    }

    #[test]
    fn launchers_are_recognised_behind_paths_and_variables() {
        for c in [
            "mpirun python3 x.py",
            "/usr/bin/mpiexec -n 2 a",
            "FOO=1 mpirun a",
            "horovodrun -np 4 python t.py",
        ] {
            assert!(starts_mpi_launcher(c), "{c}");
        }
        for c in ["python3 mpirun.py", "sh -c 'mpirun a'", ""] {
            assert!(!starts_mpi_launcher(c), "{c}");
        }
    }

    #[test]
    fn tensorflow_parts_get_tf_config_as_azure_ml_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let j = job(
            "command: python3 t.py\nimage: i\nresources: {instance_count: 3}\ndistribution: {type: tensorflow, worker_count: 2, parameter_server_count: 1}\n",
        );
        let tf = |rank| {
            let env = env_of(&plan_container(
                &j,
                &on_node(dir.path(), rank, None),
                &HostFacts::default(),
            ));
            serde_json::from_str::<serde_json::Value>(&env["TF_CONFIG"]).unwrap()
        };
        let cluster = serde_json::json!({"worker": ["10.0.0.4:2222", "10.0.0.5:2222"], "ps": ["10.0.0.6:2222"]});
        assert_eq!(
            tf(0),
            serde_json::json!({"cluster": cluster, "task": {"type": "worker", "index": 0}, "environment": "cloud"})
        );
        assert_eq!(
            tf(1)["task"],
            serde_json::json!({"type": "worker", "index": 1})
        );
        assert_eq!(tf(2)["task"], serde_json::json!({"type": "ps", "index": 0}));

        // Two tasks per node: each local process gets its own.
        let j = job(
            "command: python3 t.py\nimage: i\nresources: {instance_count: 2}\ndistribution: {type: tensorflow, worker_count: 4}\n",
        );
        let c = plan_container(&j, &on_node(dir.path(), 1, None), &HostFacts::default());
        assert_eq!(c.cmd[..2], ["--procs", "2"]);
        let env = env_of(&c);
        assert!(!env.contains_key("TF_CONFIG"));
        let local1: serde_json::Value = serde_json::from_str(&env["DROVER_TF_CONFIG_1"]).unwrap();
        assert_eq!(
            local1["task"],
            serde_json::json!({"type": "worker", "index": 3})
        );
        assert_eq!(local1["cluster"]["worker"][3], "10.0.0.5:2223");
    }

    #[test]
    fn memlock_defaults_to_unlimited_and_is_clamped_where_the_host_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let j = job("command: x\nimage: i\n");
        let p = placement(dir.path());
        let c = plan_container(&j, &p, &HostFacts::default());
        assert_eq!((c.ulimits[0].soft, c.ulimits[0].hard), (-1, -1));
        let limited = HostFacts {
            infiniband_devices: vec!["/dev/infiniband/uverbs0".into()],
            memlock_max: 8 << 20,
        };
        let c = plan_container(&j, &p, &limited);
        assert_eq!((c.ulimits[0].soft, c.ulimits[0].hard), (8 << 20, 8 << 20));
        assert_eq!(c.devices, vec!["/dev/infiniband/uverbs0"]);
    }

    #[test]
    fn infiniband_devices_are_listed_sorted() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["uverbs1", "rdma_cm", "uverbs0"] {
            std::fs::write(dir.path().join(d), b"").unwrap();
        }
        let found = infiniband_devices(dir.path());
        let names: Vec<&str> = found.iter().filter_map(|p| p.rsplit('/').next()).collect();
        assert_eq!(names, vec!["rdma_cm", "uverbs0", "uverbs1"]);
        assert!(infiniband_devices(&dir.path().join("absent")).is_empty());
    }

    async fn run_with(
        rt: FakeRuntime,
        yaml: &str,
        cancel: CancellationToken,
    ) -> (Arc<FakeRuntime>, Result<PartOutcome, PartError>) {
        let dir = tempfile::tempdir().unwrap();
        let rt = Arc::new(rt);
        rt.present.lock().unwrap().push("img:1".into());
        let runner = PartRunner::new(
            rt.clone(),
            PullLimits::default(),
            RunOptions::default(),
            HostFacts::default(),
        );
        let (tx, mut rx) = mpsc::channel(64);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let r = runner
            .run(&job(yaml), &placement(dir.path()), tx, cancel)
            .await;
        (rt, r)
    }

    #[tokio::test(start_paused = true)]
    async fn exit_codes_and_oom_become_outcomes_and_containers_are_removed() {
        for (code, oom, expect) in [
            (0, false, PartOutcome::Completed),
            (3, false, PartOutcome::Failed { exit_code: 3 }),
            (137, true, PartOutcome::OomKilled { exit_code: 137 }),
        ] {
            let rt = FakeRuntime::new(
                PullScript::Fail("unused".into()),
                ExitScript::After {
                    delay: Duration::from_secs(1),
                    code,
                    oom,
                },
            );
            let (rt, r) =
                run_with(rt, "command: x\nimage: img:1\n", CancellationToken::new()).await;
            assert_eq!(r.unwrap(), expect);
            let rec = rt.record();
            assert_eq!(rec.created.len(), 1);
            assert_eq!(rec.removed.len(), 1);
            assert!(rec.stopped.is_empty());
            assert_eq!(rec.pulls, 0, "a present image is not pulled");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_part_past_its_timeout_is_stopped() {
        let rt = FakeRuntime::new(PullScript::Fail("unused".into()), ExitScript::UntilStopped);
        let (rt, r) = run_with(
            rt,
            "command: x\nimage: img:1\nlimits: {timeout: 30}\n",
            CancellationToken::new(),
        )
        .await;
        assert_eq!(r.unwrap(), PartOutcome::TimedOut);
        assert_eq!(PartOutcome::TimedOut.exit_code(), 124);
        let rec = rt.record();
        assert_eq!(rec.stopped.len(), 1);
        assert_eq!(rec.removed.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_and_removes() {
        let rt = FakeRuntime::new(PullScript::Fail("unused".into()), ExitScript::UntilStopped);
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            c2.cancel();
        });
        let (rt, r) = run_with(rt, "command: x\nimage: img:1\n", cancel).await;
        assert_eq!(r.unwrap(), PartOutcome::Canceled);
        let rec = rt.record();
        assert_eq!((rec.stopped.len(), rec.removed.len()), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn running_parts_are_listed_by_label() {
        let rt = Arc::new(FakeRuntime::new(
            PullScript::Fail("unused".into()),
            ExitScript::UntilStopped,
        ));
        rt.present.lock().unwrap().push("img:1".into());
        let runner = Arc::new(PartRunner::new(
            rt.clone(),
            PullLimits::default(),
            RunOptions::default(),
            HostFacts::default(),
        ));
        let dir = tempfile::tempdir().unwrap();
        let p = placement(dir.path());
        let cancel = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel(64);
        let task = {
            let (runner, cancel) = (runner.clone(), cancel.clone());
            tokio::spawn(async move {
                runner
                    .run(&job("command: x\nimage: img:1\n"), &p, tx, cancel)
                    .await
            })
        };
        // Wait until the part has started.
        while let Some(ev) = rx.recv().await {
            if matches!(ev, PartEvent::Started { .. }) {
                break;
            }
        }
        let parts = runner.list_parts(Some("node-a")).await.unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(
            (&parts[0].part, parts[0].state),
            (&PartKey::new("j1", 2, 1), ContainerState::Running)
        );
        assert!(runner.list_parts(Some("node-b")).await.unwrap().is_empty());
        cancel.cancel();
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        assert_eq!(task.await.unwrap().unwrap(), PartOutcome::Canceled);
        assert!(runner.list_parts(None).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_failed_start_and_a_failed_cleanup_are_both_reported() {
        let mut rt = FakeRuntime::new(PullScript::Fail("unused".into()), ExitScript::UntilStopped);
        rt.fail_start = Some("no such device".into());
        rt.fail_remove = Some("engine busy".into());
        let (_, r) = run_with(rt, "command: x\nimage: img:1\n", CancellationToken::new()).await;
        let err = r.unwrap_err();
        assert_eq!(
            err.to_string(),
            "starting container drover-j1-1-a2 failed (and removing it failed too: engine busy)"
        );
        let source = std::error::Error::source(&err).map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("no such device"));
    }

    #[tokio::test]
    async fn a_failed_pull_fails_the_part_with_the_registry_reason() {
        let rt = FakeRuntime::new(
            PullScript::Fail("manifest for x:9 not found: manifest unknown".into()),
            ExitScript::UntilStopped,
        );
        let (rt, r) = run_with(rt, "command: x\nimage: x:9\n", CancellationToken::new()).await;
        assert_eq!(
            r.unwrap_err().to_string(),
            "pulling x:9 failed: manifest for x:9 not found: manifest unknown"
        );
        assert!(rt.record().created.is_empty());
    }
}
