//! `drover-agent run`: the node daemon. Settings come from flags, then the
//! environment, then `--config agent.toml`, then defaults; the join
//! settings (`server`, `cluster`, `join_token`) that these leave missing
//! come from `--join-file` when it exists, then from IMDS user data with
//! `--join-from-user-data` (see `drover_agent::join`). The node id, when
//! none is given, is the VM's name from IMDS, else the host name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use drover_agent::daemon::{self, DaemonConfig, NodeImds, VmFacts};
use drover_agent::firewall::ImdsFirewall;
use drover_agent::identity::limit::RateLimit;
use drover_agent::images::collect::CollectConfig;
use drover_agent::inventory::{DEFAULT_NVML_LIB, InventoryCollector, InventoryConfig};
use drover_agent::join::JoinSettings;
use drover_imds::{ImdsClient, ImdsConfig, InstanceMetadata};
use drover_runner::{DockerRuntime, HostFacts, PartRunner, PullLimits, RunOptions};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Arguments of `drover-agent run`. No `Debug`: they may hold the join token.
#[derive(Args)]
pub struct RunArgs {
    /// TOML file with any of the settings below (keys as the flags, with `_`).
    #[arg(long, env = "DROVER_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Control plane URL, e.g. http://10.0.0.1:7340.
    #[arg(long, env = "DROVER_SERVER")]
    server: Option<String>,
    /// Cluster to join.
    #[arg(long, env = "DROVER_CLUSTER")]
    cluster: Option<String>,
    /// The cluster's join token.
    #[arg(long, env = "DROVER_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// File holding the join token.
    #[arg(long, env = "DROVER_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// A TOML file with the join settings still missing (`server`,
    /// `cluster`, `join_token`), read when it exists: where cloud-init puts
    /// them from a VM's custom data.
    #[arg(long, env = "DROVER_JOIN_FILE")]
    join_file: Option<PathBuf>,
    /// Read the join settings still missing after `--join-file` from the
    /// VM's IMDS user data (the same TOML; default false; needs --imds-url).
    #[arg(long, env = "DROVER_JOIN_FROM_USER_DATA", action = clap::ArgAction::Set)]
    join_from_user_data: Option<bool>,
    /// Node id (default: the VM's name from IMDS when --imds-url is given,
    /// else the host name).
    #[arg(long, env = "DROVER_NODE_ID")]
    node_id: Option<String>,
    /// Where the node credential and job outputs are kept.
    #[arg(long, env = "DROVER_AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Heartbeat interval in seconds (default 10).
    #[arg(long, env = "DROVER_HEARTBEAT_SECONDS")]
    heartbeat_seconds: Option<f64>,
    /// Seconds running parts may go on after SIGTERM (default 600).
    #[arg(long, env = "DROVER_DRAIN_SECONDS")]
    drain_seconds: Option<f64>,
    /// Seconds between SIGTERM and SIGKILL when a part is stopped (default 10).
    #[arg(long, env = "DROVER_STOP_GRACE_SECONDS")]
    stop_grace_seconds: Option<f64>,
    /// IMDS base URL; instance metadata is registered when it answers.
    #[arg(long, env = "DROVER_IMDS_URL")]
    imds_url: Option<String>,
    /// NVML library to load.
    #[arg(long, env = "DROVER_NVML_LIB")]
    nvml_lib: Option<PathBuf>,
    /// The static drover-init binary.
    #[arg(long, env = "DROVER_INIT")]
    init_binary: Option<PathBuf>,
    /// This node's address for other nodes of a job.
    #[arg(long, env = "DROVER_NODE_IP")]
    ip: Option<String>,
    /// Serve /metrics here (e.g. 127.0.0.1:9740).
    #[arg(long, env = "DROVER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Where the managed-identity token endpoint for job containers
    /// listens (`MSI_ENDPOINT`, `IDENTITY_ENDPOINT`), or `off` (default
    /// 127.0.0.1:46808; on a node whose single-node parts use Docker's
    /// default bridge, its gateway, e.g. 172.17.0.1:46808).
    #[arg(long, env = "DROVER_IDENTITY_LISTEN", value_name = "ADDR|off")]
    identity_listen: Option<String>,
    /// Token requests a second each part may make on average (default 50).
    #[arg(long, env = "DROVER_IDENTITY_RATE")]
    identity_rate: Option<f64>,
    /// Token requests each part may make at once (default 100).
    #[arg(long, env = "DROVER_IDENTITY_BURST")]
    identity_burst: Option<u32>,
    /// Docker network mode of single-node parts (the engine's default, a
    /// bridge of their own, when unset).
    #[arg(long, env = "DROVER_JOB_NETWORK")]
    job_network: Option<String>,
    /// The network mode that shares this node's own network, for
    /// multi-node parts: `host` (the default, for a VM) or
    /// `container:<id>` when the agent itself runs in a container.
    #[arg(long, env = "DROVER_NODE_NETWORK")]
    node_network: Option<String>,
    /// Stop every part when cut off from the control plane for longer than
    /// its grace period, so two attempts of a job never run together for
    /// long (default true; `false` for clusters that prefer running on).
    #[arg(long, env = "DROVER_SELF_FENCE", action = clap::ArgAction::Set)]
    self_fence: Option<bool>,
    /// The most bytes the node cache of code snapshots and inputs keeps
    /// (least recently used entries are evicted; default 20 GiB).
    #[arg(long, env = "DROVER_CACHE_MAX_BYTES")]
    cache_max_bytes: Option<u64>,
    /// Let only this agent's packets reach IMDS (a firewall rule, kept
    /// while the agent runs), so job containers get tokens only through the
    /// agent; default true when an IMDS URL is given. `false` lets job
    /// containers ask IMDS for any identity of the VM.
    #[arg(long, env = "DROVER_IMDS_FIREWALL", action = clap::ArgAction::Set)]
    imds_firewall: Option<bool>,
    /// The `iptables` program (default: `iptables` on the PATH).
    #[arg(long, env = "DROVER_IPTABLES")]
    iptables: Option<PathBuf>,
    /// Remove the least recently used images this agent pulled or built
    /// when the disk fills (default true; off when the disk cannot be
    /// measured).
    #[arg(long, env = "DROVER_IMAGE_GC", action = clap::ArgAction::Set)]
    image_gc: Option<bool>,
    /// Collect images when the engine's filesystem is fuller than this,
    /// percent (default 85).
    #[arg(long, env = "DROVER_IMAGE_GC_HIGH_PERCENT")]
    image_gc_high_percent: Option<f64>,
    /// Collect until it is expected below this, percent (default 80).
    #[arg(long, env = "DROVER_IMAGE_GC_LOW_PERCENT")]
    image_gc_low_percent: Option<f64>,
    /// Seconds between disk measurements (default 60; also after each part).
    #[arg(long, env = "DROVER_IMAGE_GC_INTERVAL_SECONDS")]
    image_gc_interval_seconds: Option<f64>,
    /// The folder whose filesystem is measured (default: the engine's data
    /// root, `docker info`'s DockerRootDir, when the agent sees it).
    #[arg(long, env = "DROVER_IMAGE_GC_PATH")]
    image_gc_path: Option<PathBuf>,
}

/// The config file: the same settings as the flags.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    server: Option<String>,
    cluster: Option<String>,
    join_token: Option<String>,
    join_token_file: Option<PathBuf>,
    join_file: Option<PathBuf>,
    join_from_user_data: Option<bool>,
    node_id: Option<String>,
    data_dir: Option<PathBuf>,
    heartbeat_seconds: Option<f64>,
    drain_seconds: Option<f64>,
    stop_grace_seconds: Option<f64>,
    imds_url: Option<String>,
    nvml_lib: Option<PathBuf>,
    init_binary: Option<PathBuf>,
    ip: Option<String>,
    metrics_listen: Option<SocketAddr>,
    identity_listen: Option<String>,
    identity_rate: Option<f64>,
    identity_burst: Option<u32>,
    job_network: Option<String>,
    node_network: Option<String>,
    self_fence: Option<bool>,
    cache_max_bytes: Option<u64>,
    imds_firewall: Option<bool>,
    iptables: Option<PathBuf>,
    image_gc: Option<bool>,
    image_gc_high_percent: Option<f64>,
    image_gc_low_percent: Option<f64>,
    image_gc_interval_seconds: Option<f64>,
    image_gc_path: Option<PathBuf>,
}

/// Image collection's settings, checked.
fn image_gc(args: &RunArgs, file: &FileConfig) -> anyhow::Result<Option<CollectConfig>> {
    if !args.image_gc.or(file.image_gc).unwrap_or(true) {
        return Ok(None);
    }
    let d = CollectConfig::default();
    let high = args
        .image_gc_high_percent
        .or(file.image_gc_high_percent)
        .unwrap_or(d.high_percent);
    let low = args
        .image_gc_low_percent
        .or(file.image_gc_low_percent)
        .unwrap_or(d.low_percent);
    anyhow::ensure!(
        high.is_finite() && low.is_finite() && 0.0 < low && low < high && high <= 100.0,
        "--image-gc-low-percent ({low}) must be above 0 and below --image-gc-high-percent ({high}), at most 100"
    );
    let interval = seconds(
        args.image_gc_interval_seconds
            .or(file.image_gc_interval_seconds),
        d.interval.as_secs_f64(),
        "--image-gc-interval-seconds",
    )?
    .max(Duration::from_millis(100));
    Ok(Some(CollectConfig {
        high_percent: high,
        low_percent: low,
        interval,
        path: args.image_gc_path.clone().or(file.image_gc_path.clone()),
    }))
}

/// `--identity-listen`: an address, or `off`.
fn identity_listen(v: Option<&str>) -> anyhow::Result<Option<SocketAddr>> {
    let v = v.unwrap_or(drover_agent::identity::DEFAULT_LISTEN).trim();
    if v.eq_ignore_ascii_case("off") || v.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    v.parse().map(Some).with_context(|| {
        format!("--identity-listen must be an address like 127.0.0.1:46808 or `off`, got {v}")
    })
}

/// The token endpoint's per-part rate limit.
fn identity_rate(rate: Option<f64>, burst: Option<u32>) -> anyhow::Result<RateLimit> {
    let default = RateLimit::default();
    let per_second = rate.unwrap_or(default.per_second);
    anyhow::ensure!(
        per_second.is_finite() && per_second > 0.0,
        "--identity-rate must be a positive number of requests a second, got {per_second}"
    );
    let burst = burst.unwrap_or(default.burst);
    anyhow::ensure!(burst >= 1, "--identity-burst must be at least 1, got 0");
    Ok(RateLimit { per_second, burst })
}

fn seconds(v: Option<f64>, default: f64, what: &str) -> anyhow::Result<Duration> {
    let s = v.unwrap_or(default);
    anyhow::ensure!(
        s.is_finite() && s >= 0.0,
        "{what} must be a non-negative number of seconds, got {s}"
    );
    Ok(Duration::from_secs_f64(s))
}

pub(crate) fn default_data_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".local/share/drover-agent"))
        .unwrap_or_else(|| PathBuf::from("/var/lib/drover-agent"))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading the join token from {}", path.display()))?
        .trim()
        .to_string())
}

/// The local address this host reaches the server from (a UDP `connect`
/// sends nothing; it only picks the route), for other nodes of a job.
fn route_ip(server: &str) -> Option<String> {
    let rest = server.split("://").nth(1).unwrap_or(server);
    let authority = rest.split('/').next()?;
    let target = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip().to_string())
}

/// The node's IMDS at `url`: a client, and its instance metadata.
///
/// `wait`: a setting depends on the metadata (the node id is the VM's name,
/// or join settings are in its user data), so the client's whole retry
/// policy is waited for (IMDS answers 410 for a while when it is being
/// updated, as at a VM's first boot) and no answer is an error. Otherwise
/// only a quick answer is taken: the daemon registers without one and keeps
/// asking in the background. `address_from_imds`: no `--ip` was given.
async fn node_imds(
    url: &str,
    address_from_imds: bool,
    marked: bool,
    wait: bool,
) -> anyhow::Result<Option<(NodeImds, Option<InstanceMetadata>)>> {
    let config = ImdsConfig {
        base_url: url.to_string(),
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        // The firewall lets only marked packets reach IMDS.
        socket_mark: marked.then_some(drover_agent::firewall::IMDS_MARK),
        ..ImdsConfig::default()
    };
    let client = match ImdsClient::new(config) {
        Ok(client) => client,
        Err(e) if !wait => {
            tracing::warn!(url, error = %drover_api::error::chain(&e), "no imds client; running without imds");
            return Ok(None);
        }
        Err(e) => {
            return Err(e).with_context(|| format!("building the imds client for {url}"));
        }
    };
    let metadata = if wait {
        let m = client.instance_metadata().await.with_context(|| {
            format!(
                "reading this VM's instance metadata from imds at {url} failed \
                 (it names the node, or holds its join settings in user data)"
            )
        })?;
        Some(m)
    } else {
        match tokio::time::timeout(Duration::from_secs(3), client.instance_metadata()).await {
            Ok(Ok(m)) => Some(m),
            Ok(Err(e)) => {
                tracing::info!(
                    error = %drover_api::error::chain(&e),
                    "no instance metadata yet; registering without it and asking again in the background"
                );
                None
            }
            Err(_) => {
                tracing::info!(
                    "imds did not answer in time; registering without instance metadata and asking again in the background"
                );
                None
            }
        }
    };
    let imds = NodeImds {
        client,
        vm: metadata.as_ref().map(VmFacts::from_metadata),
        address_from_imds,
    };
    Ok(Some((imds, metadata)))
}

/// The join settings in this VM's user data, when there is any.
fn user_data_join(metadata: Option<&InstanceMetadata>) -> anyhow::Result<JoinSettings> {
    let Some(m) = metadata else {
        return Ok(JoinSettings::default());
    };
    let Some(bytes) = m.compute.user_data() else {
        anyhow::bail!("the user data in this VM's instance metadata is not base64");
    };
    let settings = JoinSettings::from_user_data(&bytes)?;
    tracing::info!(
        server = settings.server.is_some(),
        cluster = settings.cluster.is_some(),
        join_token = settings.join_token.is_some(),
        "join settings read from imds user data"
    );
    Ok(settings)
}

/// The node id: the one given, else the VM's name from IMDS, else the
/// host name.
fn node_id(given: Option<String>, metadata: Option<&InstanceMetadata>) -> String {
    given
        .or_else(|| {
            metadata
                .map(|m| m.compute.name.trim().to_string())
                .filter(|n| !n.is_empty())
        })
        .unwrap_or_else(hostname)
}

/// Runs the daemon until SIGTERM/SIGINT and the drain end.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let file: FileConfig = super::read_config(args.config.as_deref())?;
    let image_gc = image_gc(&args, &file)?;
    let join_token = match (
        args.join_token.or(file.join_token),
        args.join_token_file.or(file.join_token_file),
    ) {
        (Some(t), _) => Some(t),
        (None, Some(p)) => Some(read_token(&p)?),
        (None, None) => None,
    };
    let given = JoinSettings {
        server: args.server.or(file.server),
        cluster: args.cluster.or(file.cluster),
        join_token,
    };
    let join = match args.join_file.or(file.join_file) {
        Some(path) if !given.is_complete() => {
            let from_file = JoinSettings::read_file(&path)?;
            if from_file.is_some() {
                tracing::info!(file = %path.display(), "join settings read from the join file");
            }
            given.or(from_file.unwrap_or_default())
        }
        _ => given,
    };
    let join_from_user_data = args
        .join_from_user_data
        .or(file.join_from_user_data)
        .unwrap_or(false);
    let node_id_given = args.node_id.or(file.node_id);
    let init_binary =
        drover_runner::init_binary::find(args.init_binary.or(file.init_binary).as_deref())?;
    let nvml_lib = args
        .nvml_lib
        .or(file.nvml_lib)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_NVML_LIB));
    let imds_url = args.imds_url.or(file.imds_url);
    anyhow::ensure!(
        imds_url.is_some() || !join_from_user_data,
        "--join-from-user-data needs --imds-url: user data is read from IMDS"
    );
    let imds_firewall = match &imds_url {
        Some(url) if args.imds_firewall.or(file.imds_firewall).unwrap_or(true) => {
            let iptables = args
                .iptables
                .or(file.iptables)
                .unwrap_or_else(|| PathBuf::from("iptables"));
            let fw = ImdsFirewall::for_url(url, iptables)?;
            // Before anything can start a job container.
            let repair = fw.ensure().with_context(|| {
                format!(
                    "cannot install the firewall that keeps job containers from IMDS at {}:{} \
                     (the agent needs CAP_NET_ADMIN and iptables); pass --imds-firewall false \
                     to run without it, letting job containers ask IMDS for any identity of this VM",
                    fw.address, fw.port
                )
            })?;
            tracing::info!(address = %fw.address, port = fw.port, added = repair.added.len(), "imds firewall in place");
            Some(fw)
        }
        _ => None,
    };
    let stop_grace = seconds(
        args.stop_grace_seconds.or(file.stop_grace_seconds),
        10.0,
        "stop grace",
    )?;
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(default_data_dir);
    let heartbeat_interval = seconds(
        args.heartbeat_seconds.or(file.heartbeat_seconds),
        10.0,
        "heartbeat interval",
    )?
    .max(Duration::from_millis(100));
    let drain_deadline = seconds(
        args.drain_seconds.or(file.drain_seconds),
        600.0,
        "drain deadline",
    )?;
    let identity_listen = identity_listen(
        args.identity_listen
            .as_deref()
            .or(file.identity_listen.as_deref()),
    )?;
    let identity_rate = identity_rate(
        args.identity_rate.or(file.identity_rate),
        args.identity_burst.or(file.identity_burst),
    )?;
    let ip = args.ip.or(file.ip);
    let metrics_listen = args.metrics_listen.or(file.metrics_listen);
    let job_network = args.job_network.or(file.job_network);
    let node_network = args
        .node_network
        .or(file.node_network)
        .unwrap_or_else(|| "host".to_string());
    let self_fence = args.self_fence.or(file.self_fence).unwrap_or(true);
    let cache_max_bytes = args
        .cache_max_bytes
        .or(file.cache_max_bytes)
        .unwrap_or(drover_agent::files::cache::DEFAULT_CACHE_MAX_BYTES);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        // The settings that need IMDS wait for its answer.
        let need_user_data = join_from_user_data && !join.is_complete();
        let wait = node_id_given.is_none() || need_user_data;
        let (imds, metadata) = match &imds_url {
            Some(url) => {
                match node_imds(url, ip.is_none(), imds_firewall.is_some(), wait).await? {
                    Some((imds, metadata)) => (Some(imds), metadata),
                    None => (None, None),
                }
            }
            None => (None, None),
        };
        let join = if need_user_data {
            join.or(user_data_join(metadata.as_ref())?)
        } else {
            join
        };
        let where_else = if join_from_user_data {
            "the join file or IMDS user data"
        } else {
            "the join file (--join-file)"
        };
        let mut config = DaemonConfig {
            server: join.server.with_context(|| {
                format!("no control plane given: pass --server, set DROVER_SERVER or put server in {where_else}")
            })?,
            cluster: join.cluster.with_context(|| {
                format!("no cluster given: pass --cluster, set DROVER_CLUSTER or put cluster in {where_else}")
            })?,
            join_token: join.join_token,
            node_id: node_id(node_id_given, metadata.as_ref()),
            data_dir,
            heartbeat_interval,
            watch_timeout: Duration::from_secs(30),
            drain_deadline,
            stop_grace,
            init_binary,
            ip,
            dedicated: true,
            metrics_listen,
            identity_listen,
            identity_rate,
            job_network,
            node_network,
            imds: None,
            self_fence,
            cache_max_bytes,
            imds_firewall,
            image_gc,
        };
        let mut vm = None;
        if let Some(facts) = imds.as_ref().and_then(|i| i.vm.clone()) {
            vm = Some(facts.vm);
            config.dedicated = facts.dedicated;
            if config.ip.is_none() {
                config.ip = facts.ip;
            }
        }
        config.imds = imds;
        if config.ip.is_none() {
            config.ip = route_ip(&config.server);
        }
        let collector = Arc::new(Mutex::new(
            InventoryCollector::open(&InventoryConfig {
                nvml_lib,
                ..InventoryConfig::default()
            })
            .with_data_dir(&config.data_dir)
            .with_vm(vm),
        ));
        let inventory: daemon::InventorySource = Arc::new(move || {
            collector
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .refresh()
        });
        let docker = Arc::new(
            DockerRuntime::connect()
                .await
                .context("connecting to docker")?,
        );
        let runner = Arc::new(PartRunner::new(
            docker,
            PullLimits::default(),
            RunOptions {
                stop_grace,
                // Exited containers stay until the server has their final
                // state, so an agent restart can still read the exit code.
                remove: false,
            },
            HostFacts::probe(),
        ));
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(wait_for_signal(shutdown.clone()));
        let node = config.node_id.clone();
        let result = daemon::run(config, runner, inventory, shutdown.clone()).await;
        signals.abort();
        result.with_context(|| format!("drover-agent on node {node} failed"))
    })
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received; draining");
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(name: &str, user_data: &str) -> InstanceMetadata {
        let mut m = InstanceMetadata::default();
        m.compute.name = name.to_string();
        m.compute.user_data_base64 = user_data.to_string();
        m
    }

    #[test]
    fn the_node_id_is_the_given_one_then_the_vms_name_then_the_host_name() {
        let m = metadata("vmss_3", "");
        assert_eq!(node_id(Some("n1".into()), Some(&m)), "n1");
        assert_eq!(node_id(None, Some(&m)), "vmss_3");
        assert_eq!(node_id(None, Some(&metadata(" ", ""))), hostname());
        assert_eq!(node_id(None, None), hostname());
    }

    #[test]
    fn join_settings_come_from_user_data_when_there_is_some() {
        // base64 of `cluster = "gpu"`
        let m = metadata("vm", "Y2x1c3RlciA9ICJncHUi");
        let s = user_data_join(Some(&m)).unwrap();
        assert_eq!(s.cluster.as_deref(), Some("gpu"));
        assert_eq!(
            user_data_join(Some(&metadata("vm", ""))).unwrap(),
            JoinSettings::default()
        );
        assert_eq!(user_data_join(None).unwrap(), JoinSettings::default());
        let e = user_data_join(Some(&metadata("vm", "not base64!"))).unwrap_err();
        assert!(e.to_string().contains("not base64"), "{e}");
    }
}
