//! Before a part's container starts: its code unpacked into its working
//! directory and its inputs brought into the node cache, as the host paths
//! the runner binds (`PartFiles`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drover_api::files::{BlobInfo, check_relative_path};
use drover_api::job::{Code, CommandJob, DatastorePath, Input, PathKind};
use drover_runner::part::PartFiles;

use super::cache::{Cache, Pins, key_of};
use super::url::{Fetched, UrlClient};
use super::{PartDir, PartRecord, Phase};
use crate::control_client::{Backoff, ControlClient};
use drover_api::wire::PartKey;

/// Something a part needs that could not be made ready; the part fails
/// before any container starts.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct MaterializeError {
    /// What (`code`, `input csv`, `output model`, `the part directory`).
    pub what: String,
    /// Why, with its causes.
    pub message: String,
}

fn failed(what: &str, e: &dyn std::error::Error) -> MaterializeError {
    MaterializeError {
        what: what.to_string(),
        message: drover_api::error::chain(e),
    }
}

/// What materializing needs: the control plane (blobs, datastores), the
/// cache, and the URL client.
#[derive(Debug, Clone)]
pub struct Materializer {
    /// The control plane.
    pub client: ControlClient,
    /// The node cache.
    pub cache: Arc<Cache>,
    /// URL inputs.
    pub urls: UrlClient,
}

impl Materializer {
    /// Makes the part's directory and files ready; what the part uses in
    /// the cache is pinned in `pins`.
    pub async fn materialize(
        &self,
        part: &PartKey,
        job: &CommandJob,
        dir: &PartDir,
        pins: &mut Pins,
    ) -> Result<PartFiles, MaterializeError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| failed(&what, &e)
        };
        dir.remove().map_err(io("the part directory"))?;
        let mut record = PartRecord {
            part: part.clone(),
            phase: Phase::Materializing,
            work: dir.work(),
            outputs: BTreeMap::new(),
        };
        dir.set_record(&record).map_err(io("the part directory"))?;
        match &job.code {
            Some(Code::Snapshot(blob)) => {
                let tar = self.blob(*blob).await.map_err(|m| MaterializeError {
                    what: "code".into(),
                    message: m,
                })?;
                pins.add(tar.clone());
                let work = dir.work();
                unpack_into(tar, work).await.map_err(|m| MaterializeError {
                    what: "code".into(),
                    message: m,
                })?;
            }
            // A node folder (checked against the host path policy).
            Some(Code::Local(p)) => record.work = p.clone(),
            None => {}
        }
        for (name, o) in &job.outputs {
            let path = o.path.clone().unwrap_or_else(|| dir.output(name));
            record.outputs.insert(name.clone(), path);
        }
        dir.create_folders(std::iter::empty())
            .map_err(io("the working directory"))?;
        for (name, path) in &record.outputs {
            std::fs::create_dir_all(path).map_err(io(&format!("output {name}")))?;
        }
        let mut inputs = BTreeMap::new();
        for (name, input) in &job.inputs {
            let what = format!("input {name}");
            let msg = |message: String| MaterializeError {
                what: what.clone(),
                message,
            };
            let path = match input {
                Input::Literal { .. } => continue,
                Input::Path { path, .. } => path.clone(),
                Input::Blob {
                    path_kind, blob, ..
                } => {
                    let file = self.blob(*blob).await.map_err(msg)?;
                    match path_kind {
                        PathKind::UriFile => {
                            pins.add(file.clone());
                            file
                        }
                        PathKind::UriFolder => {
                            let tree = self.cache.tree(&blob.digest);
                            pins.add(tree.clone());
                            if tree.is_dir() {
                                Cache::touch(&tree);
                            } else {
                                unpack_into(file, tree.clone()).await.map_err(msg)?;
                            }
                            tree
                        }
                    }
                }
                Input::Url { url, .. } => {
                    let folder = self.cache.url(url);
                    pins.add(folder.clone());
                    let (file, how) = self
                        .urls
                        .fetch(url, &folder)
                        .await
                        .map_err(|e| failed(&what, &e))?;
                    match how {
                        Fetched::Downloaded(bytes) => {
                            tracing::info!(part = %part, input = %name, url = %url, bytes, "downloaded url input")
                        }
                        Fetched::Revalidated => {
                            tracing::info!(part = %part, input = %name, url = %url, "url input unchanged; cached copy used")
                        }
                    }
                    file
                }
                Input::Datastore { path_kind, at, .. } => {
                    self.datastore(at, *path_kind, pins).await.map_err(msg)?
                }
            };
            inputs.insert(name.clone(), path);
        }
        record.phase = Phase::Running;
        dir.set_record(&record).map_err(io("the part directory"))?;
        let cache = self.cache.clone();
        let _ = tokio::task::spawn_blocking(move || cache.evict()).await;
        Ok(PartFiles {
            work_dir: Some(record.work.clone()),
            inputs,
            outputs: record.outputs.clone(),
            run_dir: None,
        })
    }

    /// The cached file of a blob, fetched when the cache lacks it.
    /// A blob's file in the cache, fetched first when missing.
    pub(crate) async fn blob(&self, blob: BlobInfo) -> Result<PathBuf, String> {
        let dest = self.cache.blob(&blob.digest);
        if std::fs::metadata(&dest).is_ok_and(|m| m.is_file() && m.len() == blob.size) {
            Cache::touch(&dest);
            return Ok(dest);
        }
        self.client
            .blob_client()
            .download_to(blob, &dest, &|_| {})
            .await
            .map_err(|e| {
                format!(
                    "cannot fetch {}: {}",
                    blob.digest,
                    drover_api::error::chain(&e)
                )
            })?;
        Ok(dest)
    }

    /// A datastore file or folder through the control plane's proxy,
    /// cached by datastore, path and the versions of its files.
    async fn datastore(
        &self,
        at: &DatastorePath,
        kind: PathKind,
        pins: &mut Pins,
    ) -> Result<PathBuf, String> {
        let listing = retrying(
            || self.client.datastore_list(&at.datastore, &at.path),
            |e| e.is_transient(),
        )
        .await
        .map_err(|e| format!("cannot list {at}: {}", drover_api::error::chain(&e)))?;
        let single = listing.entries.len() == 1 && listing.entries[0].path.is_empty();
        if kind == PathKind::UriFile && !single {
            return Err(format!("{at} is a folder, not a file"));
        }
        let mut parts = vec![
            at.datastore.clone(),
            at.path.clone(),
            kind.as_str().to_string(),
        ];
        for e in &listing.entries {
            if !e.path.is_empty() {
                check_relative_path(&e.path)
                    .map_err(|why| format!("the listing of {at} is refused: {why}"))?;
            }
            parts.push(format!("{}\0{}\0{}", e.path, e.size, e.version));
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let folder = self.cache.datastore(&key_of(&refs));
        pins.add(folder.clone());
        let file_name = at
            .path
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("data")
            .to_string();
        let target = |folder: &Path| {
            if single && kind == PathKind::UriFile {
                folder.join("data")
            } else {
                folder.to_path_buf()
            }
        };
        if folder.is_dir() {
            Cache::touch(&folder);
            return Ok(target(&folder));
        }
        let staging =
            self.cache
                .staging()
                .join(format!("{}-{}", key_of(&refs), std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)
            .map_err(|e| format!("cannot write {}: {e}", staging.display()))?;
        for e in &listing.entries {
            let (full, rel) = if e.path.is_empty() {
                let rel = if kind == PathKind::UriFile {
                    "data".to_string()
                } else {
                    file_name.clone()
                };
                (at.path.clone(), rel)
            } else if at.path.is_empty() {
                (e.path.clone(), e.path.clone())
            } else {
                (format!("{}/{}", at.path, e.path), e.path.clone())
            };
            let dest = staging.join(&rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("cannot write {}: {e}", parent.display()))?;
            }
            retrying(
                || self.client.datastore_file(&at.datastore, &full, &dest),
                |e| e.is_transient(),
            )
            .await
            .map_err(|err| {
                format!(
                    "cannot fetch {}{}/paths/{full}: {}",
                    DatastorePath::PREFIX,
                    at.datastore,
                    drover_api::error::chain(&err)
                )
            })?;
        }
        if let Some(parent) = folder.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot write {}: {e}", parent.display()))?;
        }
        std::fs::rename(&staging, &folder)
            .map_err(|e| format!("cannot write {}: {e}", folder.display()))?;
        Ok(target(&folder))
    }
}

/// How often a datastore call cut by the network is tried.
const DATASTORE_ATTEMPTS: u32 = 4;

/// `call` until it succeeds, fails for good, or has been tried
/// [`DATASTORE_ATTEMPTS`] times, waiting with backoff between tries.
async fn retrying<T, E, F, Fut>(mut call: F, transient: impl Fn(&E) -> bool) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if transient(&e) && attempt < DATASTORE_ATTEMPTS => {
                attempt += 1;
                tokio::time::sleep(backoff.next_delay()).await;
            }
            r => return r,
        }
    }
}

/// Unpacks the snapshot `tar` into the folder `dest` (whole or not at all).
async fn unpack_into(tar: PathBuf, dest: PathBuf) -> Result<u64, String> {
    tokio::task::spawn_blocking(move || {
        let f =
            std::fs::File::open(&tar).map_err(|e| format!("cannot read {}: {e}", tar.display()))?;
        drover_files::unpack::unpack_atomic(std::io::BufReader::new(f), &dest)
            .map_err(|e| drover_api::error::chain(&e))
    })
    .await
    .map_err(|e| format!("unpacking stopped: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_tried_again_and_others_are_not() {
        let calls = AtomicU32::new(0);
        let r: Result<u32, &str> = retrying(
            || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => Err("busy"),
                    n => Ok(n),
                }
            },
            |e| *e == "busy",
        )
        .await;
        assert_eq!(r, Ok(2));
        calls.store(0, Ordering::SeqCst);
        let r: Result<u32, &str> = retrying(
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("missing")
            },
            |e| *e == "busy",
        )
        .await;
        assert_eq!((r, calls.load(Ordering::SeqCst)), (Err("missing"), 1));
        calls.store(0, Ordering::SeqCst);
        let r: Result<u32, &str> = retrying(
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("busy")
            },
            |e| *e == "busy",
        )
        .await;
        assert_eq!(
            (r, calls.load(Ordering::SeqCst)),
            (Err("busy"), DATASTORE_ATTEMPTS)
        );
    }
}
