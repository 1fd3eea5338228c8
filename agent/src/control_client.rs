//! The agent's only door to the control plane: register, heartbeat, watch
//! assignments, upload logs, post outputs and fetch datastore files over the
//! `/v1/agent/*` routes (blobs through `drover_files`'s `BlobClient`, built
//! here with the agent's credential), plus the capped,
//! jittered exponential backoff the daemon retries with.
//!
//! Architecture Invariant: nothing else in the agent speaks HTTP to the
//! server.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use drover_api::files::{DataListing, PartOutputs, PartOutputsAccepted};
use drover_api::wire::{
    Assignments, ErrorBody, HeartbeatRequest, HeartbeatResponse, LogBatch, LogBatchAccepted,
    RegisterRequest, RegisterResponse,
};
use drover_files::transfer::{BlobClient, BlobRoutes};
use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A failed call to the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached or the connection failed (retry).
    #[error("cannot reach the control plane at {url}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("control plane refused {url}: {status} {message}")]
    Rejected {
        /// The URL called.
        url: String,
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The answer was not the expected JSON.
    #[error("control plane answered {url} with an unreadable body")]
    Decode {
        /// The URL called.
        url: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The HTTP client could not be built.
    #[error("building the http client failed")]
    Build(#[source] reqwest::Error),
}

impl ClientError {
    /// True when retrying later can help (unreachable, 5xx, 429).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Rejected { status, .. } => *status >= 500 || *status == 429,
            ClientError::Decode { .. } | ClientError::Build(_) => false,
        }
    }

    /// True when nothing listens at the server's address (the connection
    /// was refused): the control plane is down, so it cannot be giving this
    /// node's work to another node either.
    pub fn is_refused(&self) -> bool {
        let ClientError::Unreachable { source, .. } = self else {
            return false;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                return io.kind() == std::io::ErrorKind::ConnectionRefused;
            }
            cause = c.source();
        }
        false
    }

    /// True when the credential is not (or no longer) accepted.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, ClientError::Rejected { status: 401, .. })
    }
}

/// A client for one server. Cheap to clone.
#[derive(Clone)]
pub struct ControlClient {
    base: String,
    http: reqwest::Client,
    /// Shared by every clone, so a new credential (after registering
    /// again) reaches every task at once.
    credential: std::sync::Arc<std::sync::RwLock<Option<String>>>,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient")
            .field("base", &self.base)
            .field(
                "credential",
                &self.current_credential().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl ControlClient {
    /// A client for the server at `base` (e.g. `http://10.0.0.1:7340`).
    pub fn new(base: &str) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if base.starts_with("http://") {
            // No TLS to set up: a node image without CA certificates still
            // reaches a plain-HTTP control plane.
            builder = builder.tls_certs_only(Vec::<reqwest::Certificate>::new());
        }
        let http = builder.build().map_err(ClientError::Build)?;
        Ok(ControlClient {
            base: base.trim_end_matches('/').to_string(),
            http,
            credential: Default::default(),
        })
    }

    /// The same client, authenticating with a node credential.
    pub fn with_credential(self, credential: String) -> Self {
        self.set_credential(credential);
        self
    }

    /// Replaces the credential for this client and all its clones.
    pub fn set_credential(&self, credential: String) {
        *self.credential.write().unwrap_or_else(|e| e.into_inner()) = Some(credential);
    }

    fn current_credential(&self) -> Option<String> {
        self.credential
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `POST /v1/agent/register` with the join token in the body.
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        self.post("/v1/agent/register", req, Duration::from_secs(30))
            .await
    }

    /// `POST /v1/agent/heartbeat`.
    pub async fn heartbeat(
        &self,
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ClientError> {
        self.post("/v1/agent/heartbeat", req, Duration::from_secs(15))
            .await
    }

    /// `GET /v1/agent/assignments`: returns at once when the node's version
    /// is newer than `version`, else when it changes or after `wait`.
    pub async fn assignments(
        &self,
        version: u64,
        wait: Duration,
    ) -> Result<Assignments, ClientError> {
        let path = format!(
            "/v1/agent/assignments?version={version}&timeout={}",
            wait.as_secs_f64()
        );
        let url = format!("{}{path}", self.base);
        let req = self.http.get(&url).timeout(wait + Duration::from_secs(15));
        self.send(url, req).await
    }

    /// `POST /v1/agent/builds`: may this node build an environment image now?
    pub async fn request_build(
        &self,
        req: &drover_api::environment::BuildRequest,
    ) -> Result<drover_api::environment::BuildDecision, ClientError> {
        self.post("/v1/agent/builds", req, Duration::from_secs(30))
            .await
    }

    /// `POST /v1/agent/builds/report`: how this node's build ended.
    pub async fn report_build(
        &self,
        report: &drover_api::environment::BuildReport,
    ) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .post("/v1/agent/builds/report", report, Duration::from_secs(30))
            .await?;
        Ok(())
    }

    /// `GET /v1/agent/environments/{name}/versions/{version}` (`latest` too).
    pub async fn environment(
        &self,
        name: &str,
        version: &str,
    ) -> Result<drover_api::environment::EnvironmentInfo, ClientError> {
        let path = format!(
            "/v1/agent/environments/{}/versions/{}",
            query_value(name),
            query_value(version)
        );
        let url = format!("{}{path}", self.base);
        let req = self.http.get(&url).timeout(Duration::from_secs(30));
        self.send(url, req).await
    }

    /// `POST /v1/agent/logs`.
    pub async fn upload_logs(&self, batch: &LogBatch) -> Result<LogBatchAccepted, ClientError> {
        self.post("/v1/agent/logs", batch, Duration::from_secs(30))
            .await
    }

    /// `POST /v1/agent/outputs`: the part's uploaded outputs, before its final state.
    pub async fn post_outputs(
        &self,
        outputs: &PartOutputs,
    ) -> Result<PartOutputsAccepted, ClientError> {
        self.post("/v1/agent/outputs", outputs, Duration::from_secs(60))
            .await
    }

    /// `GET /v1/agent/datastores/{name}/list?path=P`: the files under `path`.
    pub async fn datastore_list(
        &self,
        datastore: &str,
        path: &str,
    ) -> Result<DataListing, ClientError> {
        let url = format!(
            "{}/v1/agent/datastores/{datastore}/list?path={}",
            self.base,
            query_value(path)
        );
        let req = self.http.get(&url).timeout(Duration::from_secs(60));
        self.send(url, req).await
    }

    /// `GET /v1/agent/datastores/{name}/file?path=P`, its bytes written to
    /// `dest` (replaced). Returns the bytes written.
    pub async fn datastore_file(
        &self,
        datastore: &str,
        path: &str,
        dest: &std::path::Path,
    ) -> Result<u64, DatastoreFileError> {
        use tokio::io::AsyncWriteExt;
        let url = format!(
            "{}/v1/agent/datastores/{datastore}/file?path={}",
            self.base,
            query_value(path)
        );
        let mut req = self.http.get(&url);
        if let Some(c) = self.current_credential() {
            req = req.bearer_auth(c);
        }
        let unreachable = |source| ClientError::Unreachable {
            url: url.clone(),
            source,
        };
        let mut resp = req.send().await.map_err(unreachable)?;
        if resp.status() != StatusCode::OK {
            let status = resp.status().as_u16();
            let bytes = resp.bytes().await.unwrap_or_default();
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Rejected {
                url,
                status,
                message,
            }
            .into());
        }
        let local = |source| DatastoreFileError::Local {
            path: dest.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::create(dest).await.map_err(local)?;
        let mut written = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
            file.write_all(&chunk).await.map_err(local)?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(local)?;
        file.sync_all().await.map_err(local)?;
        Ok(written)
    }

    /// A blob client over the agent's routes, with the current credential
    /// (built per use: the credential may be rotated).
    pub fn blob_client(&self) -> BlobClient {
        BlobClient::new(
            self.http.clone(),
            &self.base,
            BlobRoutes::Agent,
            self.current_credential().unwrap_or_default(),
        )
    }

    /// The control plane's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let bytes = serde_json::to_vec(body).map_err(|source| ClientError::Decode {
            url: url.clone(),
            source,
        })?;
        let req = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(bytes)
            .timeout(timeout);
        self.send(url, req).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        url: String,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let req = match self.current_credential() {
            Some(c) => req.bearer_auth(c),
            None => req,
        };
        let unreachable = |source| ClientError::Unreachable {
            url: url.clone(),
            source,
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        if status != StatusCode::OK && status != StatusCode::CREATED {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Rejected {
                url,
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode { url, source })
    }
}

/// `value` percent-encoded for a query string (`/` kept).
fn query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A datastore file that could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreFileError {
    /// The control plane did not give it.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Writing it failed.
    #[error("cannot write {path}")]
    Local {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl DatastoreFileError {
    /// True when trying again later may work.
    pub fn is_transient(&self) -> bool {
        matches!(self, DatastoreFileError::Client(c) if c.is_transient())
    }
}

/// Capped exponential backoff with full jitter: the n-th wait is uniform in
/// `[base·2ⁿ/2, base·2ⁿ]`, never above `cap`, so many agents that lost the
/// same server do not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff from `base` up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        // Half fixed, half random: spreads retries yet keeps progress.
        let half = exp / 2;
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let jitter = half.mul_f64((random % 1000) as f64 / 1000.0);
        half + jitter
    }

    /// Back to the first, short wait (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(2), "{d:?}");
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_secs(1), "{late:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            query_value("datasets/iris a&b=c"),
            "datasets/iris%20a%26b%3Dc"
        );
    }

    #[test]
    fn transient_and_auth_errors_are_told_apart() {
        let rejected = |status| ClientError::Rejected {
            url: "u".into(),
            status,
            message: "m".into(),
        };
        assert!(rejected(503).is_transient());
        assert!(rejected(429).is_transient());
        assert!(!rejected(400).is_transient());
        assert!(rejected(401).is_unauthorized());
        assert!(
            !format!(
                "{:?}",
                ControlClient::new("http://x")
                    .unwrap()
                    .with_credential("s3cret".into())
            )
            .contains("s3cret")
        );
    }
}
