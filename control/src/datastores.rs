//! Reaching registered datastores' data: listing and reading files for
//! agents (which never get a datastore's credentials) and writing outputs
//! into them. The one module that touches a datastore's storage.
//!
//! `type: local` is a folder of the control plane's machine; paths are
//! checked by [`check_relative_path`] before they are joined to it, and
//! symbolic links are neither listed nor followed out of it.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use drover_api::datastore::{DatastoreKind, DatastoreSpec};
use drover_api::files::{DataEntry, check_relative_path};

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
    /// A kind this server cannot reach yet.
    #[error(
        "datastore {datastore} is of type {kind}, which this server cannot reach yet (only type local)"
    )]
    Unsupported {
        /// The datastore.
        datastore: String,
        /// Its type.
        kind: &'static str,
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
    /// The storage of `spec`.
    pub fn of(spec: &DatastoreSpec) -> Result<Datastore, DatastoreError> {
        match &spec.kind {
            DatastoreKind::Local { path } => Ok(Datastore {
                name: spec.name.clone(),
                root: path.clone(),
            }),
            other => Err(DatastoreError::Unsupported {
                datastore: spec.name.clone(),
                kind: other.type_name(),
            }),
        }
    }

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

    fn local(dir: &Path) -> Datastore {
        Datastore {
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
