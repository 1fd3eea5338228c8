//! `drover server`: runs the control plane until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use drover_control::output;
use drover_control::provider::local::{
    LocalConfig, NodeImageSource, control_plane_id, ensure_node_image,
};
use drover_control::server::{self, ADMIN_TOKEN_FILE, ServerConfig};

use super::default_data_dir;

/// `drover server` options. No `Debug`: they may hold a token.
#[derive(clap::Args)]
pub struct ServerArgs {
    /// Where the database and the admin token live (default: $DROVER_DATA_DIR,
    /// else ~/.local/share/drover).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7340")]
    listen: SocketAddr,
    /// A user API token to accept (instead of generating an admin token).
    #[arg(long, env = "DROVER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Seconds without a heartbeat before a node becomes unusable.
    #[arg(long, default_value_t = 40)]
    grace_seconds: u64,
    /// Attempts a job gets when its nodes are lost.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// Log bytes kept per job.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    log_cap_bytes: u64,
    /// Heartbeat interval asked of agents, in seconds.
    #[arg(long, default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Seconds after a scale action before an idle node may be removed.
    #[arg(long, default_value_t = 30)]
    scale_down_cooldown_seconds: u64,
    /// Run the local provider: clusters with `provider: local` get their
    /// nodes as containers on this machine's Docker. Needs --listen on an
    /// address the containers reach (e.g. 0.0.0.0:7340).
    #[arg(long)]
    local: bool,
    /// Where blobs (code, inputs, outputs) are kept: a folder, `s3://bucket/prefix`
    /// (AWS_* variables: AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, …) or
    /// `az://container/prefix` (AZURE_STORAGE_* variables) (default: DATA_DIR/artifacts).
    #[arg(long, env = "DROVER_ARTIFACTS")]
    artifacts: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    azure: AzureArgs,
    #[command(flatten)]
    local_args: LocalArgs,
}

/// The azure-vmss provider's Azure Resource Manager access.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AzureArgs {
    /// Run the azure-vmss provider against this ARM endpoint
    /// (https://management.azure.com on Azure's public cloud).
    #[arg(long, value_name = "URL", env = "DROVER_AZURE_ARM")]
    pub azure_arm: Option<String>,
    /// A service principal's tenant (with --azure-client-id and
    /// --azure-client-secret-file); without them, the control plane's own
    /// managed identity is used, through IMDS.
    #[arg(long, env = "AZURE_TENANT_ID", requires = "azure_arm")]
    pub azure_tenant_id: Option<String>,
    /// The service principal's application (client) id, or the client id of
    /// the managed identity to use.
    #[arg(long, env = "AZURE_CLIENT_ID", requires = "azure_arm")]
    pub azure_client_id: Option<String>,
    /// A file holding the service principal's secret (never shown).
    #[arg(
        long,
        env = "DROVER_AZURE_CLIENT_SECRET_FILE",
        requires = "azure_tenant_id"
    )]
    pub azure_client_secret_file: Option<PathBuf>,
    /// Where client credentials are exchanged for tokens.
    #[arg(long, default_value = "https://login.microsoftonline.com")]
    pub azure_authority: String,
    /// The IMDS the managed identity's tokens come from.
    #[arg(long, default_value = drover_imds::DEFAULT_BASE_URL)]
    pub azure_imds_url: String,
}

impl AzureArgs {
    /// The ARM endpoint and credential, when the provider is on.
    pub fn config(
        &self,
    ) -> anyhow::Result<Option<(String, drover_control::provider::azure::arm::ArmCredential)>> {
        use drover_control::provider::azure::arm::ArmCredential;
        let Some(url) = &self.azure_arm else {
            return Ok(None);
        };
        let credential = match (&self.azure_tenant_id, &self.azure_client_secret_file) {
            (Some(tenant), Some(file)) => {
                let Some(client_id) = &self.azure_client_id else {
                    anyhow::bail!("--azure-client-secret-file needs --azure-client-id");
                };
                let secret = std::fs::read_to_string(file)
                    .with_context(|| {
                        format!("--azure-client-secret-file: cannot read {}", file.display())
                    })?
                    .trim()
                    .to_string();
                ArmCredential::ClientSecret {
                    authority: self.azure_authority.clone(),
                    tenant: tenant.clone(),
                    client_id: client_id.clone(),
                    secret,
                }
            }
            (Some(_), None) => anyhow::bail!(
                "--azure-tenant-id names a service principal: give --azure-client-secret-file too (or neither, for the managed identity)"
            ),
            (None, _) => {
                let imds = drover_imds::ImdsClient::new(drover_imds::ImdsConfig {
                    base_url: self.azure_imds_url.clone(),
                    ..Default::default()
                })
                .context("--azure-imds-url")?;
                let identity = match &self.azure_client_id {
                    Some(id) => drover_imds::Identity::ClientId(id.clone()),
                    None => drover_imds::Identity::System,
                };
                ArmCredential::ManagedIdentity(imds, identity)
            }
        };
        Ok(Some((url.clone(), credential)))
    }
}

/// Where environment images are kept for every node.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// A registry for environment images, `HOST[:PORT]/PREFIX`: the first
    /// node to need a build environment builds and pushes it there, the
    /// others pull it (default: every node builds its own).
    #[arg(long, value_name = "HOST/PREFIX")]
    pub registry: Option<String>,
    /// The user nodes log in to the registry as.
    #[arg(long, requires = "registry")]
    pub registry_username: Option<String>,
    /// A file holding the registry password or token (sent to nodes with
    /// their assignments, never shown).
    #[arg(long, requires = "registry_username")]
    pub registry_password_file: Option<PathBuf>,
    /// Nodes log in to the registry with their cluster's managed identity
    /// (Azure Container Registry: the identity needs AcrPush to build and
    /// AcrPull to pull), exchanging its Entra token at the registry's
    /// token service; no password is kept anywhere.
    #[arg(long, requires = "registry", conflicts_with = "registry_username")]
    pub registry_identity: bool,
}

impl RegistryArgs {
    /// The registry the core hands to nodes.
    pub fn config(&self) -> anyhow::Result<Option<drover_api::environment::EnvironmentRegistry>> {
        let Some(prefix) = &self.registry else {
            return Ok(None);
        };
        drover_api::environment::EnvironmentRegistry::check_prefix(prefix)
            .map_err(|e| anyhow::anyhow!("--registry: {e}"))?;
        let password = match &self.registry_password_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| {
                        format!("--registry-password-file: cannot read {}", f.display())
                    })?
                    .trim_end()
                    .to_string(),
            ),
            None => None,
        };
        Ok(Some(drover_api::environment::EnvironmentRegistry {
            prefix: prefix.trim_end_matches('/').to_string(),
            username: self.registry_username.clone(),
            password,
            identity: self.registry_identity,
        }))
    }

    /// The same flags, for a server started by `drover up`.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut out = Vec::new();
        if let Some(r) = &self.registry {
            out.extend(["--registry".into(), r.into()]);
        }
        if let Some(u) = &self.registry_username {
            out.extend(["--registry-username".into(), u.into()]);
        }
        if let Some(f) = &self.registry_password_file {
            out.extend([
                "--registry-password-file".into(),
                f.clone().into_os_string(),
            ]);
        }
        if self.registry_identity {
            out.push("--registry-identity".into());
        }
        out
    }
}

/// The local provider's options.
#[derive(clap::Args, Clone)]
pub struct LocalArgs {
    /// Node image, used as it is: never built, nor rebuilt when it goes
    /// missing (default: built from the agent binary on drover/base:bookworm
    /// when missing, and rebuilt from it when it goes missing).
    #[arg(long)]
    pub node_image: Option<String>,
    /// The drover-agent put into the node image (default: next to drover).
    #[arg(long, env = "DROVER_AGENT_BINARY")]
    pub agent_binary: Option<PathBuf>,
    /// The static drover-init given to job containers (default: $DROVER_INIT, then next to drover).
    #[arg(long, env = "DROVER_INIT")]
    pub init: Option<PathBuf>,
    /// Where the local clusters' IMDS emulator listens.
    #[arg(long, default_value = "0.0.0.0:7341")]
    pub imds_listen: SocketAddr,
    /// Heartbeat interval of local nodes' agents, in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub node_heartbeat_seconds: f64,
    /// Seconds between SIGTERM and SIGKILL when a local node stops a job.
    #[arg(long, default_value_t = 10.0)]
    pub node_stop_grace_seconds: f64,
}

impl LocalArgs {
    /// The local provider's settings, building the node image if needed.
    pub async fn config(&self, data_dir: &Path) -> anyhow::Result<LocalConfig> {
        let init = drover_runner::init_binary::find(self.init.as_deref())
            .context("the local provider gives drover-init to job containers")?;
        let (image, source) = match &self.node_image {
            Some(i) => (i.clone(), None),
            None => {
                let agent = match &self.agent_binary {
                    Some(p) => p.clone(),
                    None => std::env::current_exe()
                        .context("locating drover")?
                        .with_file_name("drover-agent"),
                };
                // Absolute: the server rebuilds from it later, and `drover up`
                // hands it to a server that may run elsewhere.
                let agent = std::path::absolute(&agent)
                    .with_context(|| format!("cannot resolve {}", agent.display()))?;
                let source = NodeImageSource::new(agent);
                let docker = drover_runner::DockerRuntime::connect()
                    .await
                    .context("the local provider needs Docker")?;
                let image =
                    ensure_node_image(&docker, &source, &control_plane_id(data_dir), |line| {
                        output::note(format_args!("  {line}"))
                    })
                    .await
                    .with_context(|| {
                        format!(
                            "building the node image from {}",
                            source.agent_binary.display()
                        )
                    })?;
                (image, Some(source))
            }
        };
        let mut config = LocalConfig::new(data_dir, 0, image, init);
        config.node_image_source = source;
        config.imds_listen = self.imds_listen;
        config.heartbeat_seconds = self.node_heartbeat_seconds;
        config.stop_grace_seconds = self.node_stop_grace_seconds;
        Ok(config)
    }
}

/// Runs the server until a signal stops it.
pub async fn run(args: ServerArgs) -> anyhow::Result<i32> {
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    let mut config = ServerConfig::new(data_dir.clone());
    config.listen = args.listen;
    config.token = args.token;
    config.grace = Duration::from_secs(args.grace_seconds);
    config.check_interval =
        Duration::from_secs(args.grace_seconds.clamp(1, 8) / 4).max(Duration::from_millis(250));
    config.core.max_attempts = args.max_attempts.max(1);
    config.core.heartbeat_interval = Duration::from_secs(args.heartbeat_seconds.max(1));
    config.store.log_cap_bytes = args.log_cap_bytes;
    config.core.autoscaler.cooldown = Duration::from_secs(args.scale_down_cooldown_seconds);
    config.artifacts = args.artifacts;
    config.core.environment_registry = args.registry.config()?;
    config.azure = args.azure.config()?;
    if args.local {
        config.local = Some(args.local_args.config(&data_dir).await?);
    }
    let running = server::start(config).await.with_context(|| {
        format!(
            "cannot start drover server (data dir {})",
            data_dir.display()
        )
    })?;
    if let Some(token) = &running.new_admin_token {
        output::note(format_args!(
            "drover: created the admin api token (shown once; also in {}, mode 0600):\n  {token}",
            data_dir.join(ADMIN_TOKEN_FILE).display()
        ));
    }
    let artifacts = running
        .core
        .artifacts()
        .map(|a| a.location().to_string())
        .unwrap_or_default();
    output::note(format_args!(
        "drover: server listening on http://{} (artifacts in {artifacts})",
        running.addr
    ));
    let stop = running.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    running.wait().await.context("drover server failed")?;
    Ok(0)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
