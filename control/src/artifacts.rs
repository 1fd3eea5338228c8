//! The artifact store: where the control plane keeps blobs (code
//! snapshots, uploaded inputs, output files), by the sha256 of their bytes.
//!
//! Architecture Invariant: this is the only module that touches the
//! artifact store's storage; the HTTP layer hands it a stream of bytes and
//! gets back a blob or a reason.
//!
//! Uploads are staged to a local file under `<root>/staging/` (streamed,
//! never whole in memory), resumable by offset, hashed when the last byte
//! arrives and only then committed under `<root>/blobs/<hex>` (a rename on
//! the same disk), so a blob is never half-written and nothing under
//! `blobs/` is ever anything but a whole, verified blob.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use drover_api::files::{BlobInfo, Digest, MAX_BLOB_BYTES, UploadStatus};
use futures_util::{Stream, StreamExt};
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
    #[error("`{0}` is not an artifact store this server can use (a local folder path)")]
    BadUrl(String),
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

/// The artifact store.
#[derive(Debug)]
pub struct ArtifactStore {
    blobs: PathBuf,
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
            blobs,
            staging,
            locks: Mutex::new(HashMap::new()),
            location: root.display().to_string(),
        })
    }

    /// Opens the store `url` names: a local path (or `file://` URL).
    pub fn open(url: &str) -> Result<ArtifactStore, ArtifactError> {
        let path = url.strip_prefix("file://").unwrap_or(url);
        if path.contains("://") || path.is_empty() {
            return Err(ArtifactError::BadUrl(url.to_string()));
        }
        ArtifactStore::open_local(Path::new(path))
    }

    /// Where it is, for the start log line.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blobs.join(d.hex())
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
        let path = self.blob_path(d);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("cannot stat", &path)(e)),
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
        let _guard = lock.lock().await;
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
        let dest = self.blob_path(&d);
        tokio::fs::rename(&path, &dest)
            .await
            .map_err(io("cannot commit", &dest))?;
        self.discard(&d).await;
        tracing::info!(digest = %d, size = total, "blob stored");
        Ok(PutOutcome::Stored(BlobInfo {
            digest: d,
            size: total,
        }))
    }

    /// The blob's size and its bytes from `from` on.
    pub async fn read(
        &self,
        d: &Digest,
        from: u64,
    ) -> Result<(u64, tokio_util::io::ReaderStream<tokio::fs::File>), ArtifactError> {
        let path = self.blob_path(d);
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
            tokio_util::io::ReaderStream::with_capacity(file, 1 << 20),
        ))
    }

    /// The local file holding a stored blob (for copying it elsewhere).
    pub fn local_path(&self, d: &Digest) -> PathBuf {
        self.blob_path(d)
    }
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
