//! Reaching registered datastores' data: listing and reading files for
//! agents (which never get a datastore's credentials) and writing outputs
//! into them. The one module that touches a datastore's storage.
//!
//! `type: local` is a folder of the control plane's machine; paths are
//! checked by [`check_relative_path`] before they are joined to it, and
//! symbolic links are neither listed nor followed out of it. `type: s3`
//! and `type: azure_blob` are reached through `control::artifacts`'
//! [`ObjectArea`] (the one door to `object_store`), with the credentials
//! the datastore holds.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use drover_api::datastore::{BlobCredentials, DatastoreKind, DatastoreSpec, S3Credentials};
use drover_api::files::{DataEntry, check_relative_path};
use futures_util::StreamExt;

use crate::artifacts::{AzureAccess, BlobStream, ObjectArea, S3Access};

/// Why a datastore could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    /// Nothing is at the path.
    #[error("datastore {datastore} has nothing at `{path}`")]
    NotFound {
        /// The datastore.
        datastore: String,
        /// The path.
        path: String,
    },
    /// A path that leaves the datastore.
    #[error("datastore {datastore}: {message}")]
    BadPath {
        /// The datastore.
        datastore: String,
        /// What is wrong.
        message: String,
    },
    /// The object store failed.
    #[error("datastore {datastore}")]
    Remote {
        /// The datastore.
        datastore: String,
        /// The cause.
        #[source]
        source: crate::artifacts::ArtifactError,
    },
    /// The storage failed.
    #[error("datastore {datastore}: cannot {what} {}", path.display())]
    Io {
        /// The datastore.
        datastore: String,
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A datastore's storage.
#[derive(Debug, Clone)]
pub struct Datastore {
    name: String,
    place: Place,
}

#[derive(Debug, Clone)]
enum Place {
    Folder(PathBuf),
    Objects(ObjectArea),
}

/// A folder datastore (its sync calls run on blocking threads).
#[derive(Debug, Clone)]
struct Folder {
    name: String,
    root: PathBuf,
}

/// What changes when a local file's bytes change: its time and size.
fn local_version(meta: &std::fs::Metadata) -> String {
    let ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{ns:x}-{:x}", meta.len())
}

impl Datastore {
    /// The storage of `spec` (its secrets in the clear).
    pub fn of(spec: &DatastoreSpec) -> Result<Datastore, DatastoreError> {
        let remote = |source| DatastoreError::Remote {
            datastore: spec.name.clone(),
            source,
        };
        let place = match &spec.kind {
            DatastoreKind::Local { path } => Place::Folder(path.clone()),
            DatastoreKind::S3 {
                bucket,
                prefix,
                endpoint_url,
                region,
                credentials,
            } => {
                let access = S3Access {
                    endpoint_url: endpoint_url.clone(),
                    region: region.clone(),
                    access_key: match credentials {
                        S3Credentials::Environment => None,
                        S3Credentials::AccessKey {
                            access_key_id,
                            secret_access_key,
                        } => Some((access_key_id.clone(), secret_access_key.0.clone())),
                    },
                };
                Place::Objects(ObjectArea::s3(bucket, prefix, &access).map_err(remote)?)
            }
            DatastoreKind::AzureBlob {
                account_name,
                container_name,
                endpoint,
                protocol,
                credentials,
            } => {
                let access = match credentials {
                    BlobCredentials::None => AzureAccess::Environment,
                    BlobCredentials::AccountKey(k) => AzureAccess::AccountKey(k.0.clone()),
                    BlobCredentials::SasToken(t) => AzureAccess::SasToken(t.0.clone()),
                };
                Place::Objects(
                    ObjectArea::azure(account_name, container_name, endpoint, protocol, &access)
                        .map_err(remote)?,
                )
            }
        };
        Ok(Datastore {
            name: spec.name.clone(),
            place,
        })
    }

    fn folder(&self, root: &Path) -> Folder {
        Folder {
            name: self.name.clone(),
            root: root.to_path_buf(),
        }
    }

    fn checked<'a>(&self, path: &'a str) -> Result<&'a str, DatastoreError> {
        let path = path.trim_matches('/');
        if !path.is_empty() {
            check_relative_path(path).map_err(|message| DatastoreError::BadPath {
                datastore: self.name.clone(),
                message,
            })?;
        }
        Ok(path)
    }

    fn remote(&self, source: crate::artifacts::ArtifactError) -> DatastoreError {
        DatastoreError::Remote {
            datastore: self.name.clone(),
            source,
        }
    }

    fn nothing_at(&self, path: &str) -> DatastoreError {
        DatastoreError::NotFound {
            datastore: self.name.clone(),
            path: path.to_string(),
        }
    }

    /// The files under `path` (recursively, in path order, each relative to
    /// it), or the one file it names (with an empty path).
    pub async fn list(&self, path: &str) -> Result<Vec<DataEntry>, DatastoreError> {
        let path = self.checked(path)?;
        match &self.place {
            Place::Folder(root) => {
                let (f, p) = (self.folder(root), path.to_string());
                blocking(move || f.list(&p)).await
            }
            Place::Objects(area) => match area.list(path).await.map_err(|e| self.remote(e))? {
                Some(objects) => Ok(objects
                    .into_iter()
                    .map(|o| DataEntry {
                        path: o.path,
                        size: o.size,
                        version: o.version,
                    })
                    .collect()),
                None => Err(self.nothing_at(path)),
            },
        }
    }

    /// The file at `path`: its size, version and bytes.
    pub async fn open(&self, path: &str) -> Result<(u64, String, BlobStream), DatastoreError> {
        let path = self.checked(path)?;
        match &self.place {
            Place::Folder(root) => {
                let (f, p) = (self.folder(root), path.to_string());
                let (size, version, file) = blocking(move || f.open(&p)).await?;
                let stream = tokio_util::io::ReaderStream::with_capacity(
                    tokio::fs::File::from_std(file),
                    1 << 20,
                )
                .boxed();
                Ok((size, version, stream))
            }
            Place::Objects(area) => area
                .get(path)
                .await
                .map_err(|e| self.remote(e))?
                .ok_or_else(|| self.nothing_at(path)),
        }
    }

    /// Writes the local file `from` at `path`, replacing what is there.
    pub async fn write_from(&self, path: &str, from: &Path) -> Result<(), DatastoreError> {
        let path = self.checked(path)?;
        match &self.place {
            Place::Folder(root) => {
                let (f, p, from) = (self.folder(root), path.to_string(), from.to_path_buf());
                blocking(move || f.write_from(&p, &from)).await
            }
            Place::Objects(area) => area.put_file(path, from).await.map_err(|e| self.remote(e)),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DatastoreError> + Send + 'static,
) -> Result<T, DatastoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DatastoreError::Io {
            datastore: String::new(),
            what: "finish",
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })?
}

impl Folder {
    fn io(&self, what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DatastoreError {
        let (datastore, path) = (self.name.clone(), path.to_path_buf());
        move |source| DatastoreError::Io {
            datastore,
            what,
            path,
            source,
        }
    }

    fn not_found(&self, path: &str) -> DatastoreError {
        DatastoreError::NotFound {
            datastore: self.name.clone(),
            path: path.to_string(),
        }
    }

    /// `path` under the root, checked (empty is the root itself).
    fn join(&self, path: &str) -> Result<PathBuf, DatastoreError> {
        let path = path.trim_matches('/');
        if path.is_empty() {
            return Ok(self.root.clone());
        }
        check_relative_path(path).map_err(|message| DatastoreError::BadPath {
            datastore: self.name.clone(),
            message,
        })?;
        Ok(self.root.join(path))
    }

    /// The files under `path` (recursively, in path order, each relative to
    /// it), or the one file it names (with an empty path).
    pub fn list(&self, path: &str) -> Result<Vec<DataEntry>, DatastoreError> {
        let full = self.join(path)?;
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(self.not_found(path));
            }
            Err(e) => return Err(self.io("read", &full)(e)),
        };
        if meta.is_file() {
            return Ok(vec![DataEntry {
                path: String::new(),
                size: meta.len(),
                version: local_version(&meta),
            }]);
        }
        if !meta.is_dir() {
            return Err(self.not_found(path));
        }
        let mut entries = Vec::new();
        let mut stack = vec![(full, String::new())];
        while let Some((dir, rel)) = stack.pop() {
            for entry in std::fs::read_dir(&dir).map_err(self.io("list", &dir))? {
                let entry = entry.map_err(self.io("list", &dir))?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let child = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let meta = entry.metadata().map_err(self.io("read", &entry.path()))?;
                if meta.is_dir() {
                    stack.push((entry.path(), child));
                } else if meta.is_file() {
                    entries.push(DataEntry {
                        path: child,
                        size: meta.len(),
                        version: local_version(&meta),
                    });
                }
            }
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(entries)
    }

    /// Opens the file at `path`: its size, version and bytes.
    pub fn open(&self, path: &str) -> Result<(u64, String, std::fs::File), DatastoreError> {
        let full = self.join(path)?;
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Err(self.not_found(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(self.not_found(path));
            }
            Err(e) => return Err(self.io("read", &full)(e)),
        };
        let file = std::fs::File::open(&full).map_err(self.io("open", &full))?;
        Ok((meta.len(), local_version(&meta), file))
    }

    /// Writes the bytes of the local file `from` at `path` (replacing what
    /// is there; written beside it first, so a reader sees the old or the
    /// new file, never half of one).
    pub fn write_from(&self, path: &str, from: &Path) -> Result<(), DatastoreError> {
        let full = self.join(path)?;
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent).map_err(self.io("create", parent))?;
        }
        let tmp = full.with_file_name(format!(
            ".{}.drover-tmp",
            full.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        std::fs::copy(from, &tmp).map_err(self.io("write", &tmp))?;
        std::fs::rename(&tmp, &full).map_err(self.io("write", &full))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(dir: &Path) -> Folder {
        Folder {
            name: "d".into(),
            root: dir.to_path_buf(),
        }
    }

    #[test]
    fn listings_are_relative_in_path_order_and_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data/sub")).unwrap();
        std::fs::write(dir.path().join("data/b.csv"), "b").unwrap();
        std::fs::write(dir.path().join("data/sub/a.csv"), "aa").unwrap();
        std::fs::write(dir.path().join("data/a.csv"), "a").unwrap();
        let ds = local(dir.path());
        let paths: Vec<String> = ds
            .list("data")
            .unwrap()
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(paths, ["a.csv", "b.csv", "sub/a.csv"]);
        let one = ds.list("data/sub/a.csv").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].path.as_str(), one[0].size), ("", 2));
        assert!(matches!(
            ds.list("nothing"),
            Err(DatastoreError::NotFound { .. })
        ));
        assert!(matches!(
            ds.list("../etc"),
            Err(DatastoreError::BadPath { .. })
        ));
        let (size, _, _) = ds.open("data/a.csv").unwrap();
        assert_eq!(size, 1);
        assert!(ds.open("data").is_err());
        ds.write_from("out/x/y.txt", &dir.path().join("data/b.csv"))
            .unwrap();
        assert_eq!(std::fs::read(dir.path().join("out/x/y.txt")).unwrap(), b"b");
    }
}
