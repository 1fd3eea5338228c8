//! The client side of the blob protocol ([`drover_api::files`]): the CLI
//! uploads code and inputs and downloads outputs with it, the agent fetches
//! snapshots and inputs and uploads outputs.
//!
//! Uploads resume: the control plane keeps every byte that reached it, so
//! after a cut connection (or a killed agent) the upload asks how far it
//! got and sends the rest; a blob already stored is not sent again.
//! Downloads resume from a `.partial` file beside the destination and are
//! hashed as they are written: a file that does not match its digest never
//! takes the destination's name.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_api::files::{BlobInfo, Digest, UploadStatus};
use drover_api::wire::ErrorBody;
use futures_util::StreamExt;
use reqwest::{Method, StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use crate::digest::Hasher;

/// Whose routes a client uses: the user's (`/v1/blobs`) or an agent's
/// (`/v1/agent/blobs`), each with its own token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobRoutes {
    /// `/v1/blobs/…` and `/v1/uploads/…` with a user token.
    User,
    /// `/v1/agent/blobs/…` and `/v1/agent/uploads/…` with an agent token.
    Agent,
}

/// How often a transfer cut by the network is tried again before giving up.
const ATTEMPTS: u32 = 6;

/// Called with the bytes done so far (of the whole blob, resumed or not).
pub type Progress<'a> = &'a (dyn Fn(u64) + Send + Sync);

/// A transfer that failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The control plane could not be reached, after every retry.
    #[error("cannot reach the control plane at {url}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The control plane answered with an error.
    #[error("the control plane refused {what}: {message} (HTTP {status})")]
    Refused {
        /// What was asked (`upload of sha256:…`).
        what: String,
        /// The HTTP status.
        status: u16,
        /// Its message.
        message: String,
    },
    /// The bytes received do not hash to the blob's digest.
    #[error("{what}: the bytes received hash to {got}, not {want}")]
    DigestMismatch {
        /// What was transferred.
        what: String,
        /// The expected digest.
        want: Digest,
        /// What they hashed to.
        got: Digest,
    },
    /// The local file changed or could not be read or written.
    #[error("{what}: {path}")]
    Local {
        /// What failed (`cannot read`, `cannot write`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl TransferError {
    /// True when trying again later may work (the network or the control
    /// plane's store), false when the request itself is wrong.
    pub fn is_transient(&self) -> bool {
        match self {
            TransferError::Unreachable { .. } => true,
            TransferError::Refused { status, .. } => *status == 503 || *status >= 500,
            _ => false,
        }
    }
}

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uploaded {
    /// The blob.
    pub blob: BlobInfo,
    /// Bytes sent by this call (0 when the control plane had the blob).
    pub sent: u64,
    /// The control plane had every byte before this call.
    pub already_stored: bool,
}

/// A client of one control plane's blob routes.
#[derive(Debug, Clone)]
pub struct BlobClient {
    http: reqwest::Client,
    base: String,
    routes: BlobRoutes,
    token: String,
}

impl BlobClient {
    /// A client of the control plane at `server` (`http://host:port`).
    /// `http` should have a connect timeout but no overall one: a large
    /// blob takes as long as it takes.
    pub fn new(
        http: reqwest::Client,
        server: &str,
        routes: BlobRoutes,
        token: impl Into<String>,
    ) -> Self {
        BlobClient {
            http,
            base: server.trim_end_matches('/').to_string(),
            routes,
            token: token.into(),
        }
    }

    fn url(&self, kind: &str, digest: &Digest) -> String {
        let prefix = match self.routes {
            BlobRoutes::User => "/v1",
            BlobRoutes::Agent => "/v1/agent",
        };
        format!("{}{prefix}/{kind}/{}", self.base, digest.hex())
    }

    fn request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        self.http.request(method, url).bearer_auth(&self.token)
    }

    /// The size of the blob when the control plane has it.
    pub async fn stat(&self, digest: &Digest) -> Result<Option<u64>, TransferError> {
        let url = self.url("blobs", digest);
        let resp = self
            .send_retrying(&url, || self.request(Method::HEAD, &url))
            .await?;
        match resp.status() {
            StatusCode::OK => Ok(resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(refused(format!("the lookup of {digest}"), resp).await),
        }
    }

    /// How far an upload of the blob has come.
    pub async fn upload_status(&self, digest: &Digest) -> Result<UploadStatus, TransferError> {
        let url = self.url("uploads", digest);
        let resp = self
            .send_retrying(&url, || self.request(Method::GET, &url))
            .await?;
        if !resp.status().is_success() {
            return Err(refused(format!("the upload status of {digest}"), resp).await);
        }
        let body = resp
            .bytes()
            .await
            .map_err(|source| TransferError::Unreachable { url, source })?;
        serde_json::from_slice::<UploadStatus>(&body).map_err(|e| TransferError::Refused {
            what: format!("the upload status of {digest}"),
            status: 200,
            message: format!("the answer is not an upload status: {e}"),
        })
    }

    /// Uploads the file at `path`, whose digest and size are `blob`,
    /// sending only what the control plane does not have yet.
    pub async fn upload_file(
        &self,
        path: &Path,
        blob: BlobInfo,
        progress: Progress<'_>,
    ) -> Result<Uploaded, TransferError> {
        let what = format!("the upload of {} ({})", path.display(), blob.digest);
        let mut sent = 0u64;
        let mut last_error = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            let status = match self.upload_status(&blob.digest).await {
                Ok(s) => s,
                Err(e) if e.is_transient() => {
                    last_error = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if status.complete {
                progress(blob.size);
                return Ok(Uploaded {
                    blob,
                    sent,
                    already_stored: attempt == 0,
                });
            }
            let offset = status.offset.min(blob.size);
            progress(offset);
            let local = |source| TransferError::Local {
                what: "cannot read",
                path: path.to_path_buf(),
                source,
            };
            let mut file = tokio::fs::File::open(path).await.map_err(local)?;
            let len = file.metadata().await.map_err(local)?.len();
            if len != blob.size {
                return Err(TransferError::Local {
                    what: "changed while it was uploaded",
                    path: path.to_path_buf(),
                    source: std::io::Error::other(format!(
                        "it is {len} bytes now, {} when it was hashed",
                        blob.size
                    )),
                });
            }
            file.seek(SeekFrom::Start(offset)).await.map_err(local)?;
            let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(offset));
            let body = {
                let counted = counted.clone();
                ReaderStream::with_capacity(file.take(blob.size - offset), 1 << 20).map(
                    move |chunk| {
                        if let Ok(c) = &chunk {
                            counted.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        }
                        chunk
                    },
                )
            };
            let url = format!(
                "{}?size={}&offset={offset}",
                self.url("blobs", &blob.digest),
                blob.size
            );
            // Progress while the body streams, from the bytes it has read.
            let watch = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    progress(counted.load(std::sync::atomic::Ordering::Relaxed));
                }
            };
            let put = self
                .request(Method::PUT, &url)
                .header(header::CONTENT_LENGTH, blob.size - offset)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(reqwest::Body::wrap_stream(body))
                .send();
            let result = tokio::select! {
                r = put => r,
                () = watch => unreachable!("the progress loop never ends"),
            };
            let resp = match result {
                Ok(r) => r,
                Err(source) => {
                    sent += counted.load(std::sync::atomic::Ordering::Relaxed) - offset;
                    tracing::warn!(file = %path.display(), digest = %blob.digest, error = %source, attempt, "upload cut; resuming");
                    last_error = Some(TransferError::Unreachable { url, source });
                    continue;
                }
            };
            let status = resp.status();
            if status.is_success() {
                sent += blob.size - offset;
                progress(blob.size);
                return Ok(Uploaded {
                    blob,
                    sent,
                    already_stored: false,
                });
            }
            let e = refused(what.clone(), resp).await;
            if status == StatusCode::CONFLICT || e.is_transient() {
                // Another writer moved the offset, or the store was busy:
                // ask again where the upload stands.
                last_error = Some(e);
                continue;
            }
            return Err(e);
        }
        Err(last_error.unwrap_or(TransferError::Refused {
            what,
            status: 0,
            message: "no attempt was made".into(),
        }))
    }

    /// Downloads the blob into the file `dest`, resuming from
    /// `dest.partial` when an earlier download was cut, and checking its
    /// digest before it takes `dest`'s name.
    pub async fn download_to(
        &self,
        blob: BlobInfo,
        dest: &Path,
        progress: Progress<'_>,
    ) -> Result<(), TransferError> {
        let partial = partial_path(dest);
        let what = format!("the download of {} to {}", blob.digest, dest.display());
        let local = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| TransferError::Local { what, path, source }
        };
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(local("cannot create", parent))?;
        }
        let mut last_error = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            // What an earlier try left, hashed again (it is not trusted).
            let (mut hasher, have) = match hash_prefix(&partial, blob.size).await {
                Ok(v) => v,
                Err(source) => {
                    return Err(TransferError::Local {
                        what: "cannot read",
                        path: partial,
                        source,
                    });
                }
            };
            progress(have);
            if have < blob.size || blob.size == 0 {
                let url = self.url("blobs", &blob.digest);
                let mut req = self.request(Method::GET, &url);
                if have > 0 {
                    req = req.header(header::RANGE, format!("bytes={have}-"));
                }
                let resp = match req.send().await {
                    Ok(r) => r,
                    Err(source) => {
                        last_error = Some(TransferError::Unreachable { url, source });
                        continue;
                    }
                };
                let mut file = match resp.status() {
                    StatusCode::PARTIAL_CONTENT if have > 0 => tokio::fs::OpenOptions::new()
                        .append(true)
                        .open(&partial)
                        .await
                        .map_err(local("cannot write", &partial))?,
                    StatusCode::OK => {
                        hasher = Hasher::new();
                        tokio::fs::File::create(&partial)
                            .await
                            .map_err(local("cannot write", &partial))?
                    }
                    _ => {
                        let e = refused(what.clone(), resp).await;
                        if e.is_transient() {
                            last_error = Some(e);
                            continue;
                        }
                        return Err(e);
                    }
                };
                let mut stream = resp.bytes_stream();
                let mut cut = None;
                let mut last_report = std::time::Instant::now();
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(bytes) => {
                            if hasher.size() + bytes.len() as u64 > blob.size {
                                return Err(TransferError::Refused {
                                    what,
                                    status: 200,
                                    message: format!(
                                        "the control plane sent more than the blob's {} bytes",
                                        blob.size
                                    ),
                                });
                            }
                            hasher.update(&bytes);
                            file.write_all(&bytes)
                                .await
                                .map_err(local("cannot write", &partial))?;
                            if last_report.elapsed() > Duration::from_millis(200) {
                                progress(hasher.size());
                                last_report = std::time::Instant::now();
                            }
                        }
                        Err(e) => {
                            cut = Some(e);
                            break;
                        }
                    }
                }
                file.flush()
                    .await
                    .map_err(local("cannot write", &partial))?;
                file.sync_all()
                    .await
                    .map_err(local("cannot write", &partial))?;
                if let Some(source) = cut {
                    tracing::warn!(digest = %blob.digest, error = %source, attempt, "download cut; resuming");
                    last_error = Some(TransferError::Unreachable { url, source });
                    continue;
                }
                if hasher.size() < blob.size {
                    last_error = Some(TransferError::Refused {
                        what: what.clone(),
                        status: 200,
                        message: format!(
                            "the answer ended after {} of {} bytes",
                            hasher.size(),
                            blob.size
                        ),
                    });
                    continue;
                }
            }
            let got = hasher.finish();
            if got.digest != blob.digest {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(TransferError::DigestMismatch {
                    what,
                    want: blob.digest,
                    got: got.digest,
                });
            }
            tokio::fs::rename(&partial, dest)
                .await
                .map_err(local("cannot write", dest))?;
            progress(blob.size);
            return Ok(());
        }
        Err(last_error.unwrap_or(TransferError::Refused {
            what,
            status: 0,
            message: "no attempt was made".into(),
        }))
    }

    /// Sends a request built by `build`, again on connection errors.
    async fn send_retrying(
        &self,
        url: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, TransferError> {
        let mut attempt = 0;
        loop {
            match build().send().await {
                Ok(r)
                    if r.status() == StatusCode::SERVICE_UNAVAILABLE && attempt + 1 < ATTEMPTS => {}
                Ok(r) => return Ok(r),
                Err(source)
                    if attempt + 1 >= ATTEMPTS
                        || !(source.is_connect() || source.is_timeout() || source.is_request()) =>
                {
                    return Err(TransferError::Unreachable {
                        url: url.to_string(),
                        source,
                    });
                }
                Err(_) => {}
            }
            attempt += 1;
            tokio::time::sleep(backoff(attempt)).await;
        }
    }
}

/// Where a download to `dest` keeps its bytes until they are verified.
pub fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    dest.with_file_name(name)
}

/// The hash and length of the first bytes of `path` (at most `max`);
/// nothing when it does not exist. A longer file is cut to `max`.
async fn hash_prefix(path: &Path, max: u64) -> std::io::Result<(Hasher, u64)> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Hasher::new(), 0)),
        Err(e) => return Err(e),
    };
    let len = file.metadata().await?.len();
    if len > max {
        drop(file);
        tokio::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .await?
            .set_len(max)
            .await?;
        file = tokio::fs::File::open(path).await?;
    }
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let have = hasher.size();
    Ok((hasher, have))
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200 * 2u64.pow(attempt.min(5)))
}

async fn refused(what: String, resp: reqwest::Response) -> TransferError {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<ErrorBody>(&text)
        .map(|b| b.error.message)
        .unwrap_or_else(|_| {
            if text.is_empty() {
                format!("HTTP {status}")
            } else {
                text.chars().take(300).collect()
            }
        });
    TransferError::Refused {
        what,
        status,
        message,
    }
}
