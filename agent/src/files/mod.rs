//! Job files on a node: each part's own directory under the agent's data
//! dir, the node cache its code and inputs come from, fetching them before
//! the container starts (`materialize`) and uploading its outputs after it
//! ends (`upload`).
//!
//! Layout under the data dir:
//!
//! ```text
//! parts/<job>-<attempt>-<rank>/
//!     part.json          the phase: materializing, running, uploading, posted
//!     work/              bound at /drover/code: the code, outputs/, logs/
//!     outputs/<NAME>/    each named output, bound at /drover/outputs/NAME
//! cache/blobs/<hex>      blobs (code snapshots, uploaded file inputs)
//! cache/trees/<hex>/     unpacked folder snapshots
//! cache/urls/<key>/      URL inputs (`body`, `meta.json` with ETag and Last-Modified)
//! cache/datastores/<key>/ datastore inputs, by datastore, path and version
//! ```
//!
//! Architecture Invariant: nothing here follows a symbolic link found in
//! an output, and nothing is written outside the agent's data dir.

pub mod cache;
pub mod materialize;
pub mod upload;
pub mod url;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use drover_api::wire::PartKey;
use serde::{Deserialize, Serialize};

/// Folder of the part directories under the data dir.
pub const PARTS_DIR: &str = "parts";
/// Folder of the node cache under the data dir.
pub const CACHE_DIR: &str = "cache";

/// Where a part's files are in their life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Code and inputs are being fetched.
    Materializing,
    /// The container runs.
    Running,
    /// The container ended; outputs are being uploaded.
    Uploading,
    /// The outputs are posted to the control plane.
    Posted,
}

/// `part.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    /// The part.
    pub part: PartKey,
    /// Its phase.
    pub phase: Phase,
    /// The working directory bound at `/drover/code` (`work/`, or a node
    /// folder a job without the CLI named).
    pub work: PathBuf,
    /// The host folder of each named output.
    #[serde(default)]
    pub outputs: BTreeMap<String, PathBuf>,
}

/// The name of a part's directory: `<job>-<attempt>-<rank>`.
pub fn part_dir_name(part: &PartKey) -> String {
    format!("{}-{}-{}", part.job, part.attempt, part.node_rank)
}

/// The part a directory name names, if it is one.
pub fn parse_part_dir_name(name: &str) -> Option<PartKey> {
    let mut it = name.rsplitn(3, '-');
    let rank = it.next()?.parse().ok()?;
    let attempt = it.next()?.parse().ok()?;
    let job = it.next().filter(|j| !j.is_empty())?;
    Some(PartKey::new(job, attempt, rank))
}

/// The part directories (by name) to remove: those that name no part in
/// `keep`, and those that name no part at all.
pub fn stale_part_dirs(names: &[String], keep: &BTreeSet<PartKey>) -> Vec<String> {
    names
        .iter()
        .filter(|n| parse_part_dir_name(n).is_none_or(|p| !keep.contains(&p)))
        .cloned()
        .collect()
}

/// One part's directory.
#[derive(Debug, Clone)]
pub struct PartDir {
    /// `parts/<job>-<attempt>-<rank>` under the data dir.
    pub root: PathBuf,
}

impl PartDir {
    /// The directory of `part` under `data_dir`.
    pub fn new(data_dir: &Path, part: &PartKey) -> Self {
        PartDir {
            root: data_dir.join(PARTS_DIR).join(part_dir_name(part)),
        }
    }

    /// The working directory, bound at `/drover/code`.
    pub fn work(&self) -> PathBuf {
        self.root.join("work")
    }

    /// The run folder, bound read-only at `/drover/run` (the MPI hostfile
    /// and the attempt's launch secret).
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }

    /// The folder of the named output `name`.
    pub fn output(&self, name: &str) -> PathBuf {
        self.root.join("outputs").join(name)
    }

    fn record_path(&self) -> PathBuf {
        self.root.join("part.json")
    }

    /// Makes `work/outputs`, `work/logs` and each named output's folder
    /// (after the code, if any, is unpacked into `work/`).
    pub fn create_folders<'a>(&self, named: impl IntoIterator<Item = &'a str>) -> io::Result<()> {
        let work = self.work();
        std::fs::create_dir_all(work.join("outputs"))?;
        std::fs::create_dir_all(work.join("logs"))?;
        for name in named {
            std::fs::create_dir_all(self.output(name))?;
        }
        Ok(())
    }

    /// Reads `part.json`; `None` when it is missing or unreadable.
    pub fn record(&self) -> Option<PartRecord> {
        let bytes = std::fs::read(self.record_path()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes `part.json` (whole or not at all: written beside and renamed).
    pub fn set_record(&self, record: &PartRecord) -> io::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        let tmp = self.root.join(".part.json.tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, self.record_path())
    }

    /// The part's token endpoint secret, kept so that an agent that
    /// restarts while the part runs can go on answering it: in the part's
    /// directory (never bound into a container), readable by the agent
    /// only, and gone with the directory when the part's end is reported.
    fn identity_secret_path(&self) -> PathBuf {
        self.root.join("identity-secret")
    }

    /// Saves the part's token endpoint secret (mode 0600, written beside
    /// and renamed).
    pub fn save_identity_secret(&self, secret: &str) -> io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::create_dir_all(&self.root)?;
        let tmp = self.root.join(".identity-secret.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(secret.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.identity_secret_path())
    }

    /// The saved token endpoint secret, if any.
    pub fn identity_secret(&self) -> Option<String> {
        std::fs::read_to_string(self.identity_secret_path()).ok()
    }

    /// Removes the directory and everything in it (missing is fine).
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Removes the part directories under `data_dir` of parts not in `keep`.
pub fn remove_stale_part_dirs(data_dir: &Path, keep: &BTreeSet<PartKey>) {
    let parts = data_dir.join(PARTS_DIR);
    let Ok(rd) = std::fs::read_dir(&parts) else {
        return;
    };
    let names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for name in stale_part_dirs(&names, keep) {
        let path = parts.join(&name);
        tracing::info!(dir = %path.display(), "removing a part directory no part refers to");
        let removed = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(e) => Err(e),
        };
        if let Err(e) = removed {
            tracing::warn!(dir = %path.display(), error = %e, "removing a stale part directory failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_dir_names_round_trip_with_dashes_in_the_job() {
        let p = PartKey::new("my-job-7", 2, 1);
        assert_eq!(part_dir_name(&p), "my-job-7-2-1");
        assert_eq!(parse_part_dir_name("my-job-7-2-1"), Some(p));
        for bad in ["", "x", "job-1", "-1-0", "job-a-0", "job-1-b"] {
            assert_eq!(parse_part_dir_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn stale_dirs_are_those_no_kept_part_names() {
        let keep: BTreeSet<PartKey> = [PartKey::new("a", 1, 0)].into();
        let names = vec!["a-1-0".to_string(), "a-2-0".into(), "junk".into()];
        assert_eq!(stale_part_dirs(&names, &keep), ["a-2-0", "junk"]);
    }

    #[test]
    fn a_part_dir_has_its_folders_and_phase() {
        let tmp = tempfile::tempdir().unwrap();
        let part = PartKey::new("j", 1, 0);
        let d = PartDir::new(tmp.path(), &part);
        d.create_folders(["model"]).unwrap();
        assert!(d.work().join("outputs").is_dir());
        assert!(d.work().join("logs").is_dir());
        assert!(d.output("model").is_dir());
        assert_eq!(d.record(), None);
        let rec = PartRecord {
            part: part.clone(),
            phase: Phase::Uploading,
            work: d.work(),
            outputs: [("model".to_string(), d.output("model"))].into(),
        };
        d.set_record(&rec).unwrap();
        assert_eq!(d.record(), Some(rec));
        assert_eq!(d.identity_secret(), None);
        d.save_identity_secret("ab12").unwrap();
        assert_eq!(d.identity_secret().as_deref(), Some("ab12"));
        let mode = std::fs::metadata(d.root.join("identity-secret"))
            .unwrap()
            .permissions();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(mode.mode() & 0o777, 0o600, "the agent's only");
        remove_stale_part_dirs(tmp.path(), &BTreeSet::new());
        assert!(!d.root.exists());
    }
}
