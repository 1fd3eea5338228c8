//! The artifact store: where the control plane keeps blobs (code
//! snapshots, uploaded inputs, output files), by the sha256 of their bytes.
//!
//! Architecture Invariant: this is the only module that touches the
//! artifact store's storage; the HTTP layer hands it a stream of bytes and
//! gets back a blob or a reason.
//!
//! Backends: a local folder (the default, `<data dir>/artifacts`), S3
//! (`s3://bucket/prefix`, configured by the usual `AWS_*` variables,
//! `AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP` included) and Azure Blob
//! (`az://container/prefix`, `AZURE_STORAGE_*` variables). Blobs live at
//! `<root>/blobs/<hex>`.
//!
//! Uploads are staged to a local file on the server's disk (under
//! `<root>/staging/` for a folder, `<data dir>/artifacts-staging/` for a
//! remote store; streamed, never whole in memory), resumable by offset,
//! hashed when the last byte arrives and only then committed (a rename on
//! the same disk; a put or a multipart upload to a remote store), so a
//! blob is never half-written and nothing under `blobs/` is ever anything
//! but a whole, verified blob.
//!
//! Architecture Invariant: this is the only module that talks to
//! `object_store`.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use drover_api::files::{BlobInfo, Digest, MAX_BLOB_BYTES, UploadStatus};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

/// Why an artifact store action failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The blob is not stored.
    #[error("blob {0} is not stored")]
    NotFound(Digest),
    /// The upload's offset is not where the staged bytes end.
    #[error(
        "upload of {digest} has {staged} bytes staged, not {offset}; ask for the upload's status and send from there"
    )]
    WrongOffset {
        /// The blob.
        digest: Digest,
        /// Bytes staged.
        staged: u64,
        /// The offset the request gave.
        offset: u64,
    },
    /// The upload's total differs from the one already staged.
    #[error("upload of {digest} was started with size {staged_total}, not {total}")]
    WrongTotal {
        /// The blob.
        digest: Digest,
        /// The size of the staged upload.
        staged_total: u64,
        /// The size the request gave.
        total: u64,
    },
    /// The blob is over [`MAX_BLOB_BYTES`].
    #[error("a blob may be at most {MAX_BLOB_BYTES} bytes; this one is {0}")]
    TooLarge(u64),
    /// More bytes arrived than the upload's total.
    #[error(
        "upload of {digest} sent more than its size of {total} bytes; the staged bytes were discarded"
    )]
    TooMany {
        /// The blob.
        digest: Digest,
        /// Its announced size.
        total: u64,
    },
    /// The bytes do not hash to the blob's name.
    #[error("the {total} bytes uploaded for {digest} hash to {actual}; they were discarded")]
    Mismatch {
        /// The blob.
        digest: Digest,
        /// What they hash to.
        actual: Digest,
        /// How many.
        total: u64,
    },
    /// A range past the blob's end.
    #[error("blob {digest} is {size} bytes; cannot read from {from}")]
    BadRange {
        /// The blob.
        digest: Digest,
        /// Its size.
        size: u64,
        /// The asked start.
        from: u64,
    },
    /// The body broke off; what arrived is kept.
    #[error("the upload broke off after {staged} bytes were staged: {message}")]
    BrokenBody {
        /// Bytes staged now.
        staged: u64,
        /// The cause.
        message: String,
    },
    /// The disk failed.
    #[error("artifact store: {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An artifact store URL that is not one this build knows.
    #[error(
        "`{0}` is not an artifact store this server can use (a folder, s3://bucket/prefix or az://container/prefix)"
    )]
    BadUrl(String),
    /// The remote store failed.
    #[error("artifact store {location}: cannot {what} {key}")]
    Remote {
        /// The store.
        location: String,
        /// What was being done.
        what: &'static str,
        /// The object.
        key: String,
        /// The cause.
        #[source]
        source: Box<object_store::Error>,
    },
}

/// The result of a PUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The blob was already stored; nothing was read.
    AlreadyStored(BlobInfo),
    /// The last byte arrived and the blob is now stored.
    Stored(BlobInfo),
    /// Bytes were staged; more must follow (the new staged count).
    Staged(u64),
}

/// Where blobs are committed.
#[derive(Debug)]
enum Backend {
    /// A local folder: blobs are files under it.
    Local(PathBuf),
    /// An object store: blobs are objects under a prefix.
    Remote {
        store: Arc<dyn ObjectStore>,
        prefix: String,
    },
}

/// Bytes read from a blob.
pub type BlobStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// Objects up to this size are committed in one put; larger ones by a
/// multipart upload of parts this size, read from the staged file.
const PART_BYTES: usize = 16 * 1024 * 1024;

/// Splits `s3://bucket/prefix` (or `az://…`) into the bucket and the prefix.
pub fn split_bucket_url(rest: &str) -> Option<(String, String)> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return None;
    }
    Some((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// The artifact store.
#[derive(Debug)]
pub struct ArtifactStore {
    backend: Backend,
    staging: PathBuf,
    /// One writer per digest at a time.
    locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    location: String,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError {
    let path = path.to_path_buf();
    move |source| ArtifactError::Io { what, path, source }
}

/// Checks a PUT's numbers against what is staged: the pure part of
/// [`ArtifactStore::put`].
pub fn check_put(
    digest: Digest,
    total: u64,
    offset: u64,
    staged: Option<(u64, u64)>,
) -> Result<(), ArtifactError> {
    if total > MAX_BLOB_BYTES {
        return Err(ArtifactError::TooLarge(total));
    }
    let (staged_total, staged_len) = staged.unwrap_or((total, 0));
    if staged_total != total {
        return Err(ArtifactError::WrongTotal {
            digest,
            staged_total,
            total,
        });
    }
    if offset != staged_len {
        return Err(ArtifactError::WrongOffset {
            digest,
            staged: staged_len,
            offset,
        });
    }
    Ok(())
}

impl ArtifactStore {
    /// A store in a local folder (created when missing).
    pub fn open_local(root: &Path) -> Result<ArtifactStore, ArtifactError> {
        let blobs = root.join("blobs");
        let staging = root.join("staging");
        std::fs::create_dir_all(&blobs).map_err(io("cannot create", &blobs))?;
        std::fs::create_dir_all(&staging).map_err(io("cannot create", &staging))?;
        Ok(ArtifactStore {
            backend: Backend::Local(blobs),
            staging,
            locks: Mutex::new(HashMap::new()),
            location: root.display().to_string(),
        })
    }

    /// Opens the store `url` names: a folder (or `file://` URL),
    /// `s3://bucket/prefix` or `az://container/prefix`; remote uploads are
    /// staged under `data_dir`.
    pub fn open(url: &str, data_dir: &Path) -> Result<ArtifactStore, ArtifactError> {
        let bad = || ArtifactError::BadUrl(url.to_string());
        let remote = |store: Arc<dyn ObjectStore>, prefix: String| {
            let staging = data_dir.join("artifacts-staging");
            std::fs::create_dir_all(&staging).map_err(io("cannot create", &staging))?;
            Ok(ArtifactStore {
                backend: Backend::Remote { store, prefix },
                staging,
                locks: Mutex::new(HashMap::new()),
                location: url.to_string(),
            })
        };
        let built = |e: object_store::Error| ArtifactError::Remote {
            location: url.to_string(),
            what: "configure",
            key: String::new(),
            source: Box::new(e),
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = split_bucket_url(rest).ok_or_else(bad)?;
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
            if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
                b = b.with_endpoint(endpoint);
            }
            if std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true" || v == "1") {
                b = b.with_allow_http(true);
            }
            return remote(Arc::new(b.build().map_err(built)?), prefix);
        }
        if let Some(rest) = url.strip_prefix("az://") {
            let (container, prefix) = split_bucket_url(rest).ok_or_else(bad)?;
            let b = object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_container_name(container);
            return remote(Arc::new(b.build().map_err(built)?), prefix);
        }
        let path = url.strip_prefix("file://").unwrap_or(url);
        if path.contains("://") || path.is_empty() {
            return Err(bad());
        }
        ArtifactStore::open_local(Path::new(path))
    }

    fn object(prefix: &str, d: &Digest) -> ObjectPath {
        ObjectPath::from(under(prefix, &format!("blobs/{}", d.hex())))
    }

    fn remote_error(
        &self,
        what: &'static str,
        key: &ObjectPath,
    ) -> impl FnOnce(object_store::Error) -> ArtifactError {
        remote_error(&self.location, what, key.as_ref())
    }

    /// Where it is, for the start log line.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn blob_path(&self, blobs: &Path, d: &Digest) -> PathBuf {
        blobs.join(d.hex())
    }

    fn staged_path(&self, d: &Digest) -> PathBuf {
        self.staging.join(format!("{}.part", d.hex()))
    }

    fn total_path(&self, d: &Digest) -> PathBuf {
        self.staging.join(format!("{}.size", d.hex()))
    }

    fn lock(&self, d: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        match self.locks.lock() {
            Ok(mut m) => Arc::clone(m.entry(*d).or_default()),
            Err(_) => Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The blob's size when it is stored.
    pub async fn stat(&self, d: &Digest) -> Result<Option<u64>, ArtifactError> {
        match &self.backend {
            Backend::Local(blobs) => {
                let path = self.blob_path(blobs, d);
                match tokio::fs::metadata(&path).await {
                    Ok(m) => Ok(Some(m.len())),
                    Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io("cannot stat", &path)(e)),
                }
            }
            Backend::Remote { store, prefix } => {
                let key = Self::object(prefix, d);
                match store.head(&key).await {
                    Ok(meta) => Ok(Some(meta.size)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(self.remote_error("look up", &key)(e)),
                }
            }
        }
    }

    /// Which of `digests` are not stored, in their order.
    pub async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, ArtifactError> {
        let mut out = Vec::new();
        for d in digests {
            if self.stat(d).await?.is_none() {
                out.push(*d);
            }
        }
        Ok(out)
    }

    /// The staged upload's total and length.
    async fn staged(&self, d: &Digest) -> Result<Option<(u64, u64)>, ArtifactError> {
        let total_path = self.total_path(d);
        let total = match tokio::fs::read_to_string(&total_path).await {
            Ok(t) => match t.trim().parse::<u64>() {
                Ok(t) => t,
                Err(_) => return Ok(None),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("cannot read", &total_path)(e)),
        };
        let path = self.staged_path(d);
        let len = match tokio::fs::metadata(&path).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == ErrorKind::NotFound => 0,
            Err(e) => return Err(io("cannot stat", &path)(e)),
        };
        Ok(Some((total, len)))
    }

    /// How far the upload of `d` has come.
    pub async fn upload_status(&self, d: &Digest) -> Result<UploadStatus, ArtifactError> {
        if let Some(size) = self.stat(d).await? {
            return Ok(UploadStatus {
                digest: *d,
                offset: size,
                complete: true,
            });
        }
        let offset = self.staged(d).await?.map(|(_, len)| len).unwrap_or(0);
        Ok(UploadStatus {
            digest: *d,
            offset,
            complete: false,
        })
    }

    async fn discard(&self, d: &Digest) {
        for path in [self.staged_path(d), self.total_path(d)] {
            if let Err(e) = tokio::fs::remove_file(&path).await
                && e.kind() != ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove staged upload");
            }
        }
    }

    /// Appends `body` to the staged upload of `d` at `offset`; when it
    /// reaches `total` the bytes are hashed and stored or discarded.
    pub async fn put<S, E>(
        &self,
        d: Digest,
        total: u64,
        offset: u64,
        body: S,
    ) -> Result<PutOutcome, ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        if total > MAX_BLOB_BYTES {
            return Err(ArtifactError::TooLarge(total));
        }
        if let Some(size) = self.stat(&d).await? {
            return Ok(PutOutcome::AlreadyStored(BlobInfo { digest: d, size }));
        }
        let lock = self.lock(&d);
        let result = {
            let _guard = lock.lock().await;
            self.put_locked(d, total, offset, body).await
        };
        drop(lock);
        // Forget the digest's lock once nobody else holds it.
        if let Ok(mut locks) = self.locks.lock()
            && locks.get(&d).is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&d);
        }
        result
    }

    /// [`ArtifactStore::put`], holding the digest's lock.
    async fn put_locked<S, E>(
        &self,
        d: Digest,
        total: u64,
        offset: u64,
        body: S,
    ) -> Result<PutOutcome, ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        if let Some(size) = self.stat(&d).await? {
            return Ok(PutOutcome::AlreadyStored(BlobInfo { digest: d, size }));
        }
        let staged = self.staged(&d).await?;
        check_put(d, total, offset, staged)?;
        let total_path = self.total_path(&d);
        if staged.is_none() {
            tokio::fs::write(&total_path, total.to_string())
                .await
                .map_err(io("cannot write", &total_path))?;
        }
        let path = self.staged_path(&d);
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .await
            .map_err(io("cannot open", &path))?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io("cannot seek", &path))?;
        let mut len = offset;
        let mut body = body;
        let mut broken = None;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => {
                    len += bytes.len() as u64;
                    if len > total {
                        drop(file);
                        self.discard(&d).await;
                        return Err(ArtifactError::TooMany { digest: d, total });
                    }
                    file.write_all(&bytes)
                        .await
                        .map_err(io("cannot write", &path))?;
                }
                Err(e) => {
                    broken = Some(e.to_string());
                    break;
                }
            }
        }
        file.flush().await.map_err(io("cannot write", &path))?;
        drop(file);
        if let Some(message) = broken {
            tracing::info!(digest = %d, staged = len, error = %message, "upload broke off; staged bytes kept");
            return Err(ArtifactError::BrokenBody {
                staged: len,
                message,
            });
        }
        if len < total {
            return Ok(PutOutcome::Staged(len));
        }
        let hashed = path.clone();
        let actual = tokio::task::spawn_blocking(move || hash_file(&hashed))
            .await
            .map_err(|e| ArtifactError::Io {
                what: "cannot hash",
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(io("cannot hash", &path))?;
        if actual != d {
            self.discard(&d).await;
            return Err(ArtifactError::Mismatch {
                digest: d,
                actual,
                total,
            });
        }
        self.commit(&d, &path, total).await?;
        self.discard(&d).await;
        tracing::info!(digest = %d, size = total, "blob stored");
        Ok(PutOutcome::Stored(BlobInfo {
            digest: d,
            size: total,
        }))
    }

    /// Makes the verified staged file at `path` the blob `d`.
    async fn commit(&self, d: &Digest, path: &Path, total: u64) -> Result<(), ArtifactError> {
        match &self.backend {
            Backend::Local(blobs) => {
                let dest = self.blob_path(blobs, d);
                tokio::fs::rename(path, &dest)
                    .await
                    .map_err(io("cannot commit", &dest))
            }
            Backend::Remote { store, prefix } => {
                let key = Self::object(prefix, d);
                put_local_file(store, &key, path, total)
                    .await
                    .map_err(|e| match e {
                        PutError::Io(e) => io("cannot read", path)(e),
                        PutError::Store(e) => self.remote_error("store", &key)(e),
                    })?;
                Ok(())
            }
        }
    }

    /// The blob's size and its bytes from `from` on.
    pub async fn read(&self, d: &Digest, from: u64) -> Result<(u64, BlobStream), ArtifactError> {
        let blobs = match &self.backend {
            Backend::Local(blobs) => blobs,
            Backend::Remote { store, prefix } => {
                let key = Self::object(prefix, d);
                let size = self.stat(d).await?.ok_or(ArtifactError::NotFound(*d))?;
                if from > size {
                    return Err(ArtifactError::BadRange {
                        digest: *d,
                        size,
                        from,
                    });
                }
                if from == size {
                    return Ok((size, futures_util::stream::empty().boxed()));
                }
                let got = store
                    .get_opts(
                        &key,
                        GetOptions {
                            range: Some(GetRange::Offset(from)),
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| match e {
                        object_store::Error::NotFound { .. } => ArtifactError::NotFound(*d),
                        e => self.remote_error("read", &key)(e),
                    })?;
                let stream = got.into_stream().map_err(std::io::Error::other).boxed();
                return Ok((size, stream));
            }
        };
        let path = self.blob_path(blobs, d);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(ArtifactError::NotFound(*d)),
            Err(e) => return Err(io("cannot open", &path)(e)),
        };
        let size = file
            .metadata()
            .await
            .map_err(io("cannot stat", &path))?
            .len();
        if from > size {
            return Err(ArtifactError::BadRange {
                digest: *d,
                size,
                from,
            });
        }
        file.seek(std::io::SeekFrom::Start(from))
            .await
            .map_err(io("cannot seek", &path))?;
        Ok((
            size,
            tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).boxed(),
        ))
    }

    /// A local file holding the blob's bytes, for copying it elsewhere, and
    /// whether it is a temporary copy the caller removes.
    pub async fn local_copy(&self, d: &Digest) -> Result<(PathBuf, bool), ArtifactError> {
        if let Backend::Local(blobs) = &self.backend {
            return Ok((self.blob_path(blobs, d), false));
        }
        let (_, mut stream) = self.read(d, 0).await?;
        let mut nonce = [0u8; 8];
        getrandom::getrandom(&mut nonce).map_err(|e| ArtifactError::Io {
            what: "cannot name",
            path: self.staging.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let tmp = self.staging.join(format!(
            "copy-{}-{}",
            d.hex(),
            nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ));
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(io("cannot create", &tmp))?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(io("cannot fetch into", &tmp))?;
            file.write_all(&chunk)
                .await
                .map_err(io("cannot write", &tmp))?;
        }
        file.flush().await.map_err(io("cannot write", &tmp))?;
        Ok((tmp, true))
    }
}

/// An area of an object store reached by path (a datastore on S3 or Azure
/// Blob), for `control::datastores`: listing, reading and writing objects
/// under a prefix.
#[derive(Debug, Clone)]
pub struct ObjectArea {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    location: String,
}

/// One object of an [`ObjectArea`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaObject {
    /// Its path under the listed one (empty for the listed path itself).
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Its ETag, else its time and size.
    pub version: String,
}

/// How to reach an S3 bucket for an [`ObjectArea`].
#[derive(Debug, Clone, Default)]
pub struct S3Access {
    /// The service's URL, for services other than AWS.
    pub endpoint_url: Option<String>,
    /// The region.
    pub region: Option<String>,
    /// An access key id and its secret; the environment's when `None`.
    pub access_key: Option<(String, String)>,
}

/// How to sign in to an Azure Blob container for an [`ObjectArea`].
#[derive(Debug, Clone)]
pub enum AzureAccess {
    /// The environment's (`AZURE_*`).
    Environment,
    /// An account key.
    AccountKey(String),
    /// A SAS token.
    SasToken(String),
}

fn version_of(meta: &object_store::ObjectMeta) -> String {
    match &meta.e_tag {
        Some(tag) => tag.trim_matches('"').to_string(),
        None => format!(
            "{:x}-{:x}",
            meta.last_modified.timestamp_millis(),
            meta.size
        ),
    }
}

/// `prefix/path` without empty components.
fn under(prefix: &str, path: &str) -> String {
    [prefix.trim_matches('/'), path.trim_matches('/')]
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/")
}

/// The error of an object store call on `key` at `location`.
fn remote_error(
    location: &str,
    what: &'static str,
    key: &str,
) -> impl FnOnce(object_store::Error) -> ArtifactError + use<> {
    let (location, key) = (location.to_string(), key.to_string());
    move |source| ArtifactError::Remote {
        location,
        what,
        key,
        source: Box::new(source),
    }
}

impl ObjectArea {
    fn failed(
        &self,
        what: &'static str,
        key: &str,
    ) -> impl FnOnce(object_store::Error) -> ArtifactError {
        remote_error(&self.location, what, key)
    }

    /// A bucket (and a prefix in it).
    pub fn s3(bucket: &str, prefix: &str, access: &S3Access) -> Result<ObjectArea, ArtifactError> {
        let location = format!("s3://{bucket}/{prefix}");
        let mut b = match &access.access_key {
            None => object_store::aws::AmazonS3Builder::from_env(),
            Some((id, secret)) => object_store::aws::AmazonS3Builder::new()
                .with_access_key_id(id)
                .with_secret_access_key(secret),
        }
        .with_bucket_name(bucket);
        if let Some(region) = &access.region {
            b = b.with_region(region);
        } else if access.access_key.is_some() {
            b = b.with_region("us-east-1");
        }
        if let Some(endpoint) = &access.endpoint_url {
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let store = b.build().map_err(|e| ArtifactError::Remote {
            location: location.clone(),
            what: "configure",
            key: String::new(),
            source: Box::new(e),
        })?;
        Ok(ObjectArea {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            location,
        })
    }

    /// An Azure Blob container.
    pub fn azure(
        account: &str,
        container: &str,
        endpoint: &str,
        protocol: &str,
        access: &AzureAccess,
    ) -> Result<ObjectArea, ArtifactError> {
        let location = format!("{protocol}://{account}.blob.{endpoint}/{container}");
        let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_account(account)
            .with_container_name(container);
        if endpoint != "core.windows.net" || protocol != "https" {
            b = b
                .with_endpoint(format!("{protocol}://{account}.blob.{endpoint}"))
                .with_allow_http(protocol == "http");
        }
        b = match access {
            AzureAccess::Environment => b,
            AzureAccess::AccountKey(k) => b.with_access_key(k),
            AzureAccess::SasToken(t) => b.with_config(
                object_store::azure::AzureConfigKey::SasKey,
                t.trim_start_matches('?'),
            ),
        };
        let store = b.build().map_err(|e| ArtifactError::Remote {
            location: location.clone(),
            what: "configure",
            key: String::new(),
            source: Box::new(e),
        })?;
        Ok(ObjectArea {
            store: Arc::new(store),
            prefix: String::new(),
            location,
        })
    }

    /// The objects under `path` (in path order, each relative to it), the
    /// one object it names (with an empty path), or `None` when nothing is
    /// there.
    pub async fn list(&self, path: &str) -> Result<Option<Vec<AreaObject>>, ArtifactError> {
        let key = under(&self.prefix, path);
        if !key.is_empty() {
            match self.store.head(&ObjectPath::from(key.as_str())).await {
                Ok(meta) => {
                    return Ok(Some(vec![AreaObject {
                        path: String::new(),
                        size: meta.size,
                        version: version_of(&meta),
                    }]));
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.failed("look up", &key)(e)),
            }
        }
        let base = (!key.is_empty()).then(|| ObjectPath::from(key.as_str()));
        let mut listing = self.store.list(base.as_ref());
        let strip = if key.is_empty() {
            String::new()
        } else {
            format!("{key}/")
        };
        let mut out = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(self.failed("list", &key))?;
            let full = meta.location.to_string();
            let Some(rel) = full.strip_prefix(&strip) else {
                continue;
            };
            out.push(AreaObject {
                path: rel.to_string(),
                size: meta.size,
                version: version_of(&meta),
            });
        }
        if out.is_empty() {
            return Ok(None);
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Some(out))
    }

    /// The object at `path`: its size, version and bytes; `None` when
    /// nothing is there.
    pub async fn get(
        &self,
        path: &str,
    ) -> Result<Option<(u64, String, BlobStream)>, ArtifactError> {
        let key = under(&self.prefix, path);
        match self.store.get(&ObjectPath::from(key.as_str())).await {
            Ok(got) => {
                let (size, version) = (got.meta.size, version_of(&got.meta));
                Ok(Some((
                    size,
                    version,
                    got.into_stream().map_err(std::io::Error::other).boxed(),
                )))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed("read", &key)(e)),
        }
    }

    /// Writes the local file `from` as the object at `path`.
    pub async fn put_file(&self, path: &str, from: &Path) -> Result<(), ArtifactError> {
        let key = under(&self.prefix, path);
        let object = ObjectPath::from(key.as_str());
        let size = tokio::fs::metadata(from)
            .await
            .map_err(io("cannot stat", from))?
            .len();
        put_local_file(&self.store, &object, from, size)
            .await
            .map_err(|e| match e {
                PutError::Io(e) => io("cannot read", from)(e),
                PutError::Store(e) => self.failed("write", &key)(e),
            })
    }
}

enum PutError {
    Io(std::io::Error),
    Store(object_store::Error),
}

/// Stores a local file as an object: one put when small, else a
/// multipart upload of [`PART_BYTES`] parts, at most two in flight.
async fn put_local_file(
    store: &Arc<dyn ObjectStore>,
    key: &ObjectPath,
    path: &Path,
    size: u64,
) -> Result<(), PutError> {
    if size <= PART_BYTES as u64 {
        let bytes = tokio::fs::read(path).await.map_err(PutError::Io)?;
        store
            .put(key, PutPayload::from(bytes))
            .await
            .map_err(PutError::Store)?;
        return Ok(());
    }
    let upload = store.put_multipart(key).await.map_err(PutError::Store)?;
    let mut write = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    let mut file = tokio::fs::File::open(path).await.map_err(PutError::Io)?;
    let mut buf = vec![0u8; PART_BYTES];
    loop {
        use tokio::io::AsyncReadExt;
        let n = file.read(&mut buf).await.map_err(PutError::Io)?;
        if n == 0 {
            break;
        }
        write.wait_for_capacity(2).await.map_err(PutError::Store)?;
        write.write(&buf[..n]);
    }
    write.finish().await.map_err(PutError::Store)?;
    Ok(())
}

/// The sha256 of a file's bytes.
fn hash_file(path: &Path) -> std::io::Result<Digest> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest(hasher.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(b: &[u8]) -> Digest {
        Digest(Sha256::digest(b).into())
    }

    fn body(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, String>> + Unpin {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn put_numbers_are_checked_against_the_staged_upload() {
        let d = digest_of(b"x");
        assert!(check_put(d, 10, 0, None).is_ok());
        assert!(matches!(
            check_put(d, 10, 3, None),
            Err(ArtifactError::WrongOffset { staged: 0, .. })
        ));
        assert!(check_put(d, 10, 4, Some((10, 4))).is_ok());
        assert!(matches!(
            check_put(d, 11, 4, Some((10, 4))),
            Err(ArtifactError::WrongTotal { .. })
        ));
        assert!(matches!(
            check_put(d, MAX_BLOB_BYTES + 1, 0, None),
            Err(ArtifactError::TooLarge(_))
        ));
    }

    #[tokio::test]
    async fn an_upload_resumes_then_is_verified_and_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open_local(dir.path()).unwrap();
        let d = digest_of(b"hello world");
        assert_eq!(store.upload_status(&d).await.unwrap().offset, 0);
        let out = store.put(d, 11, 0, body(&[b"hello"])).await.unwrap();
        assert_eq!(out, PutOutcome::Staged(5));
        assert_eq!(store.upload_status(&d).await.unwrap().offset, 5);
        assert!(matches!(
            store.put(d, 11, 3, body(&[b"x"])).await,
            Err(ArtifactError::WrongOffset { staged: 5, .. })
        ));
        let out = store.put(d, 11, 5, body(&[b" wor", b"ld"])).await.unwrap();
        assert!(matches!(out, PutOutcome::Stored(_)));
        assert_eq!(store.stat(&d).await.unwrap(), Some(11));
        assert!(store.upload_status(&d).await.unwrap().complete);
        let (size, mut s) = store.read(&d, 6).await.unwrap();
        assert_eq!(size, 11);
        let mut got = Vec::new();
        while let Some(c) = s.next().await {
            got.extend_from_slice(&c.unwrap());
        }
        assert_eq!(got, b"world");
        assert_eq!(
            std::fs::read_dir(dir.path().join("staging"))
                .unwrap()
                .count(),
            0
        );
        assert!(store.locks.lock().unwrap().is_empty(), "no lock kept");
    }

    #[tokio::test]
    async fn a_mismatch_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open_local(dir.path()).unwrap();
        let d = digest_of(b"abc");
        assert!(matches!(
            store.put(d, 3, 0, body(&[b"abd"])).await,
            Err(ArtifactError::Mismatch { .. })
        ));
        assert_eq!(store.stat(&d).await.unwrap(), None);
        assert_eq!(store.upload_status(&d).await.unwrap().offset, 0);
        assert_eq!(
            std::fs::read_dir(dir.path().join("blobs")).unwrap().count(),
            0
        );
        assert!(matches!(
            store.put(d, 3, 0, body(&[b"abcd"])).await,
            Err(ArtifactError::TooMany { .. })
        ));
        assert_eq!(store.upload_status(&d).await.unwrap().offset, 0);
    }
}
