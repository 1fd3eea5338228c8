//! `drover server`: the control plane over HTTP.
//!
//! - `core` — [`ControlPlane`]: every action as a plain async method over
//!   the store (behind a mutex, on blocking threads), plus the per-node
//!   watch channels that wake long polls and the scheduler's wake-up.
//! - `http` — the axum router; handlers authenticate and translate only.
//! - `error` — [`ControlError`], the one error of every action, and its
//!   mapping to HTTP statuses.
//!
//! Tasks (all named, all stopped by one [`CancellationToken`] and joined
//! before [`RunningServer::wait`] returns):
//!
//! ```text
//! http ──(poke)──► scheduler ── record_placement ──► wake(node watchers) ──► long polls
//!                    ▲  tick                       └► provider (static: errors recorded)
//! reaper ──(silent nodes → unusable, requeue; poke)┘
//! timeouts ──(running past limits.timeout → failed; poke)
//! ```

mod core;
mod error;
mod events;
mod http;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use self::core::{ControlPlane, CoreConfig, new_secret, now};
pub use self::error::ControlError;
pub use self::http::router;
use crate::artifacts::ArtifactStore;
use crate::provider::local::{LocalConfig, LocalProvider, LocalStartError};
use crate::provider::{Provider, Providers};
use crate::secrets::Secrets;
use crate::store::{Store, StoreConfig, StoreError};

/// The file in the data directory holding the first admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Settings of `drover server`. `Debug` redacts the token.
#[derive(Clone)]
pub struct ServerConfig {
    /// Where the database and the admin token live.
    pub data_dir: PathBuf,
    /// Address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// A user API token to accept (stored as `configured`), instead of or
    /// beside the generated admin token.
    pub token: Option<String>,
    /// A node silent this long becomes unusable.
    pub grace: Duration,
    /// How often the scheduler runs without being poked.
    pub schedule_tick: Duration,
    /// How often silent nodes and job timeouts are checked.
    pub check_interval: Duration,
    /// Store settings.
    pub store: StoreConfig,
    /// Core settings.
    pub core: CoreConfig,
    /// Run the local provider (nodes as containers) with these settings;
    /// its `server_port` is set to the bound port.
    pub local: Option<LocalConfig>,
    /// The artifact store (a folder; `<data dir>/artifacts` when `None`).
    pub artifacts: Option<String>,
    /// Run the azure-vmss provider against this ARM endpoint with this
    /// credential.
    pub azure: Option<(String, crate::provider::azure::arm::ArmCredential)>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("grace", &self.grace)
            .field("schedule_tick", &self.schedule_tick)
            .field("check_interval", &self.check_interval)
            .field("store", &self.store)
            .field("core", &self.core)
            .field("local", &self.local)
            .field("artifacts", &self.artifacts)
            .field("azure", &self.azure)
            .finish()
    }
}

impl ServerConfig {
    /// Defaults: 127.0.0.1:7340, 40 s grace, checks every 2 s.
    pub fn new(data_dir: PathBuf) -> Self {
        ServerConfig {
            data_dir,
            listen: SocketAddr::from(([127, 0, 0, 1], 7340)),
            token: None,
            grace: Duration::from_secs(40),
            schedule_tick: Duration::from_secs(5),
            check_interval: Duration::from_secs(2),
            store: StoreConfig::default(),
            core: CoreConfig::default(),
            local: None,
            azure: None,
            artifacts: None,
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The azure-vmss provider could not be set up.
    #[error("cannot set up the azure-vmss provider: {0}")]
    Azure(String),
    /// The store could not be opened.
    #[error("cannot open the store in {}", path.display())]
    OpenStore {
        /// The data directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: StoreError,
    },
    /// The admin token could not be set up.
    #[error("cannot set up the api token")]
    Token(#[source] ControlError),
    /// The admin token file could not be written.
    #[error("cannot write {}", path.display())]
    WriteToken {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The local provider was asked for on a loopback address, which node
    /// containers cannot reach.
    #[error(
        "the local provider needs the server to listen where node containers reach it, not {0}; use e.g. --listen 0.0.0.0:7340"
    )]
    LocalOnLoopback(SocketAddr),
    /// The artifact store could not be opened.
    #[error("cannot open the artifact store")]
    Artifacts(#[source] crate::artifacts::ArtifactError),
    /// The datastore key could not be set up.
    #[error("cannot set up the datastore key")]
    Secrets(#[source] crate::secrets::SecretsError),
    /// The local provider could not start.
    #[error("cannot start the local provider")]
    Local(#[source] LocalStartError),
    /// The HTTP server failed.
    #[error("http server failed")]
    Serve(#[source] std::io::Error),
    /// A background task panicked.
    #[error("task {task} panicked")]
    TaskPanicked {
        /// Its name.
        task: &'static str,
    },
}

/// A started server. `Debug` redacts the admin token.
pub struct RunningServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// The admin token created at this start (first start only), which was
    /// also written to `<data dir>/admin.token`.
    pub new_admin_token: Option<String>,
    /// The core, for in-process callers (tests).
    pub core: Arc<ControlPlane>,
    shutdown: CancellationToken,
    tasks: Tasks,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("addr", &self.addr)
            .field(
                "new_admin_token",
                &self.new_admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("tasks", &self.tasks.names.values().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The server's named tasks.
#[derive(Debug, Default)]
struct Tasks {
    set: JoinSet<Result<(), ServerError>>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl Tasks {
    fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<(), ServerError>> + Send + 'static,
    ) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }
}

impl RunningServer {
    /// The token that stops every task.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Asks every task to stop.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for every task to end (after [`RunningServer::shutdown`] or a
    /// failure, which stops the others).
    pub async fn wait(mut self) -> Result<(), ServerError> {
        let mut result = Ok(());
        while let Some(joined) = self.tasks.set.join_next_with_id().await {
            // Any task ending ends the server: the others are told to stop.
            self.shutdown.cancel();
            let outcome = match joined {
                Ok((id, r)) => {
                    let task = self.tasks.names.get(&id).copied().unwrap_or("unknown");
                    tracing::debug!(task, "task stopped");
                    r
                }
                Err(e) => {
                    let task = self.tasks.names.get(&e.id()).copied().unwrap_or("unknown");
                    tracing::error!(task, error = %e, "task panicked");
                    Err(ServerError::TaskPanicked { task })
                }
            };
            if result.is_ok() {
                result = outcome;
            }
        }
        result
    }
}

fn write_token_file(path: &Path, token: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    // 0600 from the start: the file never exists readable by others.
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options.open(path)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    Ok(())
}

/// Opens the store, sets up tokens, binds and starts every task.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    let dir = config.data_dir.clone();
    let store_config = config.store.clone();
    let store = tokio::task::spawn_blocking(move || Store::open_with(&dir, store_config))
        .await
        .map_err(|_| ServerError::TaskPanicked { task: "open-store" })?
        .map_err(|source| ServerError::OpenStore {
            path: config.data_dir.clone(),
            source,
        })?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    let local = match config.local.clone() {
        Some(_) if addr.ip().is_loopback() => return Err(ServerError::LocalOnLoopback(addr)),
        Some(mut local) => {
            local.server_port = addr.port();
            let provider: Arc<dyn Provider> = Arc::new(
                LocalProvider::start(local)
                    .await
                    .map_err(ServerError::Local)?,
            );
            Some(provider)
        }
        None => None,
    };
    // No job may bind the control plane's own data (its store, its admin
    // token, local nodes' credentials).
    let mut core_config = config.core.clone();
    core_config.grace = config.grace;
    let data_dir =
        std::fs::canonicalize(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
    core_config.refused_host_paths.push(data_dir);
    let artifacts_url = config
        .artifacts
        .clone()
        .unwrap_or_else(|| config.data_dir.join("artifacts").display().to_string());
    let artifacts = Arc::new(
        ArtifactStore::open(&artifacts_url, &config.data_dir).map_err(ServerError::Artifacts)?,
    );
    let mut providers = Providers::new(local).with_server_url(agent_url(addr));
    if let Some((arm_url, credential)) = &config.azure {
        let arm = crate::provider::azure::arm::ArmClient::new(arm_url, credential.clone())
            .map_err(|e| ServerError::Azure(e.to_string()))?;
        providers = providers.with_vmss(Arc::new(crate::provider::azure::AzureVmssProvider::new(
            arm,
        )));
    }
    let core = Arc::new(
        ControlPlane::new(store, core_config)
            .with_providers(Arc::new(providers))
            .with_artifacts(Arc::clone(&artifacts))
            .with_secrets(Arc::new(
                Secrets::open(&config.data_dir).map_err(ServerError::Secrets)?,
            )),
    );

    let new_admin_token = setup_tokens(&core, &config).await?;

    tracing::info!(%addr, data_dir = %config.data_dir.display(), artifacts = %artifacts.location(), "drover server listening");

    let shutdown = core.shutdown_token();
    let mut tasks = Tasks::default();

    let app = router(Arc::clone(&core));
    let stop = shutdown.clone();
    tasks.spawn("http", async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
            .map_err(ServerError::Serve)
    });

    let (c, stop, tick) = (Arc::clone(&core), shutdown.clone(), config.schedule_tick);
    tasks.spawn("scheduler", async move {
        scheduler_loop(&c, &stop, tick).await;
        Ok(())
    });

    let (c, stop) = (Arc::clone(&core), shutdown.clone());
    let (grace, every) = (config.grace, config.check_interval);
    tasks.spawn("reaper", async move {
        reaper_loop(&c, &stop, grace, every).await;
        Ok(())
    });

    let (c, stop) = (Arc::clone(&core), shutdown.clone());
    tasks.spawn("exporter", async move {
        exporter_loop(&c, &stop).await;
        Ok(())
    });

    Ok(RunningServer {
        addr,
        new_admin_token,
        core,
        shutdown,
        tasks,
    })
}

/// The URL agents on other machines reach this server at: the listen
/// address, or this host's name when it listens on every address.
fn agent_url(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "THIS-HOST".to_string());
        format!("http://{host}:{}", addr.port())
    } else {
        format!("http://{addr}")
    }
}

/// First start: creates the `admin` token and writes it to the data dir.
/// A configured token is (re)stored as `configured`.
async fn setup_tokens(
    core: &ControlPlane,
    config: &ServerConfig,
) -> Result<Option<String>, ServerError> {
    if let Some(token) = config.token.clone() {
        core.with_store(move |s| {
            if s.api_token_name(&token)?.is_none() {
                match s.remove_api_token("configured") {
                    Ok(()) | Err(StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
                s.add_api_token("configured", &token, now())?;
            }
            Ok(())
        })
        .await
        .map_err(ServerError::Token)?;
    }
    if config.token.is_some() {
        return Ok(None);
    }
    let count = core
        .with_store(|s| s.api_token_count())
        .await
        .map_err(ServerError::Token)?;
    if count > 0 {
        return Ok(None);
    }
    let token = new_secret().map_err(ServerError::Token)?;
    let path = config.data_dir.join(ADMIN_TOKEN_FILE);
    write_token_file(&path, &token).map_err(|source| ServerError::WriteToken {
        path: path.clone(),
        source,
    })?;
    let t = token.clone();
    core.with_store(move |s| s.add_api_token("admin", &t, now()))
        .await
        .map_err(ServerError::Token)?;
    tracing::info!(path = %path.display(), "admin api token created");
    Ok(Some(token))
}

async fn scheduler_loop(core: &ControlPlane, stop: &CancellationToken, tick: Duration) {
    loop {
        if let Err(e) = core.schedule_pass().await {
            tracing::error!(error = %e.message(), "scheduling pass failed");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = core.changed() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

async fn reaper_loop(
    core: &ControlPlane,
    stop: &CancellationToken,
    grace: Duration,
    every: Duration,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = core.reap_silent_nodes(grace).await {
            tracing::error!(error = %e.message(), "checking silent nodes failed");
        }
        if let Err(e) = core.enforce_timeouts().await {
            tracing::error!(error = %e.message(), "checking job timeouts failed");
        }
    }
}

/// Copies datastore outputs into their datastores: what the store says is
/// pending at start (a restart resumes), then whenever a post asks.
async fn exporter_loop(core: &ControlPlane, stop: &CancellationToken) {
    loop {
        if let Err(e) = core.export_pass().await {
            tracing::error!(error = %e.message(), "copying outputs to datastores failed");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = core.exports_changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
