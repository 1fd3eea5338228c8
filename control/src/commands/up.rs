//! `drover up` and `drover down`: a whole autoscaling cluster on this
//! machine's Docker with one command, and its removal.
//!
//! `up` builds what is missing (the base image, offline when no registry
//! answers; the node image), starts `drover server --local` in the
//! background with its log and pid in the data directory, creates the
//! default cluster and says how to submit a job. `down` stops that server,
//! removes every container and network its local provider created, and
//! drops its mark on the node image it used.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use drover_api::compute::{ComputeSpec, ProviderKind, VmPriority};
use drover_api::wire;
use drover_control::output;
use drover_control::provider::local::{
    BASE_IMAGE, LocalConfig, control_plane_id, release_node_image, tear_down,
};
use drover_runner::DockerRuntime;
use drover_runner::runtime::ContainerRuntime;
use futures_util::StreamExt;
use reqwest::Method;

use super::client::{Client, ClientArgs, encode};
use super::default_data_dir;
use super::server::LocalArgs;

/// The server's pid file in the data directory.
const PID_FILE: &str = "server.pid";
/// The server's log in the data directory.
const LOG_FILE: &str = "server.log";
/// The image `up` tries first for the base when a registry answers.
const PULL_BASE: &str = "debian:bookworm-slim";

/// `drover up` options.
#[derive(clap::Args)]
pub struct UpArgs {
    /// Where the server keeps its data, log and pid (default: $DROVER_DATA_DIR,
    /// else ~/.local/share/drover).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Port of the server (it listens on all addresses, so node containers reach it).
    #[arg(long, default_value_t = 7340)]
    port: u16,
    /// Name of the default cluster.
    #[arg(long, default_value = "local")]
    cluster: String,
    /// Its most nodes.
    #[arg(long, default_value_t = 4)]
    max_nodes: u32,
    /// Its idle time before a node is removed, in seconds.
    #[arg(long, default_value_t = 120)]
    idle_seconds_before_scaledown: u64,
    /// `dedicated` or `lowpriority` (spot nodes that can be evicted).
    #[arg(long, default_value = "dedicated")]
    vm_priority: String,
    /// Seconds without a heartbeat before a node is unusable and its job requeued.
    #[arg(long, default_value_t = 40)]
    grace_seconds: u64,
    /// Seconds after a scale action before an idle node may be removed.
    #[arg(long, default_value_t = 30)]
    scale_down_cooldown_seconds: u64,
    /// Where the server keeps blobs (see `drover server --artifacts`).
    #[arg(long)]
    artifacts: Option<String>,
    #[command(flatten)]
    registry: super::server::RegistryArgs,
    #[command(flatten)]
    local: LocalArgs,
}

/// `drover down` options.
#[derive(clap::Args)]
pub struct DownArgs {
    /// The data directory `drover up` used.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Also delete the data directory (database, tokens, job outputs).
    #[arg(long)]
    purge: bool,
}

fn data_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = given.unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // The control plane's id is derived from this path: one spelling only.
    std::fs::canonicalize(&dir).with_context(|| format!("cannot resolve {}", dir.display()))
}

fn step(text: &str) {
    output::note(format_args!("==> {text}"));
}

/// The pid of a running server started by `up`, if any.
fn running_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Signal 0 checks that the process exists without touching it.
    // SAFETY: kill(2) with signal 0 has no effect on the process.
    (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

/// Runs `drover up`.
pub async fn up(args: UpArgs) -> anyhow::Result<i32> {
    let dir = data_dir(args.data_dir.clone())?;
    let docker = DockerRuntime::connect()
        .await
        .context("drover up needs a running Docker engine (check `docker info`)")?;
    ensure_base_image(&docker).await?;
    step("node image");
    let local = args.local.config(&dir).await?;
    output::note(format_args!(
        "    {} (drover-init: {})",
        local.node_image,
        local.init_binary.display()
    ));

    let server = format!("http://127.0.0.1:{}", args.port);
    match running_pid(&dir) {
        Some(pid) => step(&format!("server already running (pid {pid})")),
        None => {
            step(&format!("starting drover server on 0.0.0.0:{}", args.port));
            start_server(&dir, &args, &local)?;
        }
    }
    let client = wait_for_server(&dir, &server).await?;
    ensure_cluster(&client, &args).await?;
    let token_file = dir.join(drover_control::server::ADMIN_TOKEN_FILE);
    output::println(format_args!(
        "Drover is up: server {server} (log {}), cluster `{}` (0 to {} nodes; idle nodes go after {}s).",
        dir.join(LOG_FILE).display(),
        args.cluster,
        args.max_nodes,
        args.idle_seconds_before_scaledown
    ))?;
    output::println("Submit the example job and follow it:")?;
    if dir != std::fs::canonicalize(default_data_dir()).unwrap_or_default() || args.port != 7340 {
        output::println(format_args!(
            "  export DROVER_SERVER={server} DROVER_TOKEN=$(cat {})",
            token_file.display()
        ))?;
    }
    output::println(format_args!(
        "  drover job create -f examples/hello.yml --compute {} --stream",
        args.cluster
    ))?;
    output::println("Remove everything with: drover down")?;
    Ok(0)
}

/// The offline base image: present, or pulled when a registry answers, or
/// built with debootstrap (`images/build-offline.sh base` of a checkout).
async fn ensure_base_image(docker: &DockerRuntime) -> anyhow::Result<()> {
    if docker.image_present(BASE_IMAGE).await? {
        return Ok(());
    }
    step(&format!(
        "base image {BASE_IMAGE}: trying to pull {PULL_BASE}"
    ));
    let pulled = tokio::time::timeout(Duration::from_secs(60), async {
        let mut progress = docker.pull(PULL_BASE, None);
        while let Some(p) = progress.next().await {
            p?;
        }
        Ok::<_, drover_runner::runtime::RuntimeError>(())
    })
    .await;
    match pulled {
        Ok(Ok(())) => {
            let (repo, tag) = BASE_IMAGE.split_once(':').unwrap_or((BASE_IMAGE, "latest"));
            docker.tag_image(PULL_BASE, repo, tag).await?;
            return Ok(());
        }
        Ok(Err(e)) => output::note(format_args!("    no registry: {e}")),
        Err(_) => output::note("    no registry answered within 60 s"),
    }
    let script = find_offline_script().context(
        "the base image is missing, no registry answered, and images/build-offline.sh is not found; \
         run drover up from a Drover checkout or build the base image there with `images/build-offline.sh base`",
    )?;
    step(&format!(
        "building {BASE_IMAGE} offline with {} (a few minutes)",
        script.display()
    ));
    let status = tokio::process::Command::new("bash")
        .arg(&script)
        .arg("base")
        .status()
        .await
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() {
        bail!("{} base failed ({status})", script.display());
    }
    Ok(())
}

fn find_offline_script() -> Option<PathBuf> {
    let mut starts = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    starts
        .iter()
        .flat_map(|s| s.ancestors().map(Path::to_path_buf).collect::<Vec<_>>())
        .map(|d| d.join("images/build-offline.sh"))
        .find(|p| p.is_file())
}

fn start_server(dir: &Path, args: &UpArgs, local: &LocalConfig) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().context("locating drover")?;
    let log_path = dir.join(LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let err = log
        .try_clone()
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut command = std::process::Command::new(exe);
    command.arg("server").arg("--local");
    if let Some(artifacts) = &args.artifacts {
        command.arg("--artifacts").arg(artifacts);
    }
    command.args(args.registry.to_args());
    // The agent binary rather than the image it built: the server then knows
    // how to build the image again should it go missing.
    match &local.node_image_source {
        Some(source) => command.arg("--agent-binary").arg(&source.agent_binary),
        None => command.arg("--node-image").arg(&local.node_image),
    };
    let child = command
        .arg("--data-dir")
        .arg(dir)
        .arg("--listen")
        .arg(format!("0.0.0.0:{}", args.port))
        .arg("--init")
        .arg(&local.init_binary)
        .arg("--grace-seconds")
        .arg(args.grace_seconds.to_string())
        .arg("--scale-down-cooldown-seconds")
        .arg(args.scale_down_cooldown_seconds.to_string())
        .arg("--imds-listen")
        .arg(args.local.imds_listen.to_string())
        .arg("--node-heartbeat-seconds")
        .arg(args.local.node_heartbeat_seconds.to_string())
        .arg("--node-stop-grace-seconds")
        .arg(args.local.node_stop_grace_seconds.to_string())
        // Its token is the admin token in its data dir, which `up` reads.
        .env_remove("DROVER_TOKEN")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        // Its own process group: Ctrl-C in this terminal later does not stop it.
        .process_group(0)
        .spawn()
        .context("cannot start drover server")?;
    std::fs::write(dir.join(PID_FILE), format!("{}\n", child.id()))
        .with_context(|| format!("cannot write {}", dir.join(PID_FILE).display()))?;
    Ok(())
}

/// Waits until the server answers with the admin token.
async fn wait_for_server(dir: &Path, server: &str) -> anyhow::Result<Client> {
    let token_file = dir.join(drover_control::server::ADMIN_TOKEN_FILE);
    let started = Instant::now();
    loop {
        let token = std::fs::read_to_string(&token_file)
            .ok()
            .map(|t| t.trim().to_string());
        if let Some(token) = token {
            let client = Client::new(&ClientArgs {
                server: server.to_string(),
                token: Some(token),
                json: false,
            })?;
            if client
                .call::<(), wire::ClusterList>(Method::GET, "/v1/clusters", None::<&()>)
                .await
                .is_ok()
            {
                return Ok(client);
            }
        }
        if running_pid(dir).is_none() || started.elapsed() > Duration::from_secs(60) {
            let log = std::fs::read_to_string(dir.join(LOG_FILE)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "drover server did not come up; the end of {}:\n{}",
                dir.join(LOG_FILE).display(),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn ensure_cluster(client: &Client, args: &UpArgs) -> anyhow::Result<()> {
    let path = format!("/v1/clusters/{}", encode(&args.cluster));
    if client
        .call::<(), wire::ClusterInfo>(Method::GET, &path, None::<&()>)
        .await
        .is_ok()
    {
        step(&format!("cluster `{}` exists", args.cluster));
        return Ok(());
    }
    let mut spec = ComputeSpec::new(&args.cluster, "Standard_D4s_v3", args.max_nodes);
    spec.min_nodes = 0;
    spec.idle_seconds_before_scaledown = args.idle_seconds_before_scaledown;
    spec.provider = Some(ProviderKind::Local);
    spec.vm_priority = match args.vm_priority.as_str() {
        "dedicated" => VmPriority::Dedicated,
        "lowpriority" | "low_priority" => VmPriority::LowPriority,
        other => bail!("--vm-priority: expected dedicated or lowpriority, got {other}"),
    };
    let _: wire::ClusterCreated = client
        .call(
            Method::POST,
            "/v1/clusters",
            Some(&wire::ClusterCreate { spec }),
        )
        .await
        .with_context(|| format!("cannot create cluster {}", args.cluster))?;
    step(&format!("cluster `{}` created", args.cluster));
    Ok(())
}

/// Runs `drover down`.
pub async fn down(args: DownArgs) -> anyhow::Result<i32> {
    let dir = data_dir(args.data_dir)?;
    if let Some(pid) = running_pid(&dir) {
        step(&format!("stopping drover server (pid {pid})"));
        // SAFETY: sending SIGTERM to a pid we started and checked exists.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let started = Instant::now();
        while running_pid(&dir).is_some() {
            if started.elapsed() > Duration::from_secs(20) {
                output::note("    still running after 20 s; killing it");
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let _ = std::fs::remove_file(dir.join(PID_FILE));
    let docker = DockerRuntime::connect()
        .await
        .context("drover down needs the Docker engine to remove the nodes")?;
    let control_plane = control_plane_id(&dir);
    let done = tear_down(&docker, &control_plane)
        .await
        .context("removing the local cluster's containers and networks")?;
    step(&format!(
        "removed {} node container(s), {} job container(s), {} network(s)",
        done.nodes, done.jobs, done.networks
    ));
    // No server uses the node image any more: another control plane that
    // built it may remove it; `drover up` builds it again when needed.
    if let Err(e) = release_node_image(&docker, &control_plane).await {
        output::note(format_args!(
            "    cannot release the node image: {}",
            drover_api::error::chain(&e)
        ));
    }
    if args.purge {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot delete {}", dir.display()))?;
        step(&format!("deleted {}", dir.display()));
    } else {
        output::note(format_args!(
            "    data (database, job outputs) kept in {}; `drover down --purge` deletes it",
            dir.display()
        ));
    }
    Ok(0)
}
