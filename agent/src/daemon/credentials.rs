//! Joining the control plane: the saved node credential (`node-credential.json`
//! in the data dir, mode 0600), `connect` at start-up and `register` with
//! the join token, which the `heartbeat` task also calls when the server
//! refuses the credential. No channel: `run` awaits `connect` before any
//! task starts, and `register` installs the credential in the shared
//! `ControlClient`, so every task's clone uses it at once.

use std::time::Duration;

use drover_api::wire::{HeartbeatRequest, RegisterRequest};
use tokio_util::sync::CancellationToken;

use super::{DaemonConfig, DaemonError, gpu_counts};
use crate::control_client::{Backoff, ClientError, ControlClient};
use crate::inventory::Inventory;

/// The credential file in the data dir.
const CREDENTIAL_FILE: &str = "node-credential.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedCredential {
    server: String,
    cluster: String,
    node_id: String,
    credential: String,
    /// The control plane's grace period when the node registered.
    #[serde(default = "default_grace_seconds")]
    grace_seconds: u64,
}

fn default_grace_seconds() -> u64 {
    40
}

/// A node joined to the control plane.
pub(super) struct Joined {
    /// The client, with the node's credential.
    pub(super) client: ControlClient,
    /// How long the control plane waits for a silent node before it
    /// requeues the node's work.
    pub(super) grace: Duration,
}

/// Reuses the saved credential when the server still accepts it, else
/// registers with the join token. Retries while the server is unreachable;
/// `None` when shut down first.
pub(super) async fn connect(
    config: &DaemonConfig,
    inv: &Inventory,
    shutdown: &CancellationToken,
) -> Result<Option<Joined>, DaemonError> {
    let base = ControlClient::new(&config.server)?;
    let path = config.data_dir.join(CREDENTIAL_FILE);
    let saved = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<SavedCredential>(&b).ok())
        .filter(|s| {
            s.server == config.server && s.cluster == config.cluster && s.node_id == config.node_id
        });
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut saved = saved;
    loop {
        let attempt: Result<(), ClientError> = match &saved {
            Some(s) => {
                let client = base.clone().with_credential(s.credential.clone());
                // A restarted agent that drained before says it is back
                // (idle); the server refuses that while the node holds a
                // job, which then simply goes on.
                let back = HeartbeatRequest {
                    state: Some(drover_api::cluster::NodeState::Idle),
                    ..HeartbeatRequest::default()
                };
                let answer = match client.heartbeat(&back).await {
                    Err(ClientError::Rejected { status: 400, .. }) => {
                        client.heartbeat(&HeartbeatRequest::default()).await
                    }
                    other => other,
                };
                match answer {
                    Ok(_) => {
                        return Ok(Some(Joined {
                            client,
                            grace: Duration::from_secs(s.grace_seconds),
                        }));
                    }
                    Err(e) if e.is_unauthorized() => {
                        tracing::warn!(node = %config.node_id, "saved credential refused, registering again");
                        saved = None;
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            None => match register(config, inv, &base).await {
                Ok(grace) => {
                    return Ok(Some(Joined {
                        client: base,
                        grace,
                    }));
                }
                Err(RegisterError::Fatal(e)) => return Err(e),
                Err(RegisterError::Client(e)) => Err(e),
            },
        };
        if let Err(e) = attempt {
            if !e.is_transient() {
                return Err(DaemonError::Register {
                    node: config.node_id.clone(),
                    cluster: config.cluster.clone(),
                    source: e,
                });
            }
            let delay = backoff.next_delay();
            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "control plane unreachable");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return Ok(None),
            }
        }
    }
}

pub(super) enum RegisterError {
    Client(ClientError),
    Fatal(DaemonError),
}

/// Registers with the join token, saves the credential and installs it in
/// `client` (and so in every clone of it); returns the control plane's
/// grace period.
pub(super) async fn register(
    config: &DaemonConfig,
    inv: &Inventory,
    client: &ControlClient,
) -> Result<Duration, RegisterError> {
    let token = config
        .join_token
        .clone()
        .ok_or_else(|| RegisterError::Fatal(DaemonError::NoJoinToken(config.node_id.clone())))?;
    let req = RegisterRequest {
        cluster: config.cluster.clone(),
        join_token: token,
        node_id: Some(config.node_id.clone()),
        ip: config.ip.clone(),
        gpus: gpu_counts(inv),
        inventory: inv.clone(),
    };
    let resp = client.register(&req).await.map_err(RegisterError::Client)?;
    let s = SavedCredential {
        server: config.server.clone(),
        cluster: config.cluster.clone(),
        node_id: resp.node_id.clone(),
        credential: resp.credential.clone(),
        grace_seconds: resp.grace_seconds,
    };
    save_credential(&config.data_dir.join(CREDENTIAL_FILE), &s).map_err(RegisterError::Fatal)?;
    client.set_credential(resp.credential);
    Ok(Duration::from_secs(resp.grace_seconds))
}

fn save_credential(path: &std::path::Path, s: &SavedCredential) -> Result<(), DaemonError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |source| DaemonError::SaveCredential {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec(s).map_err(|e| err(std::io::Error::other(e)))?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(&bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
