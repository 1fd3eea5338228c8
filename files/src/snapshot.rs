//! A folder as a snapshot: an uncompressed tar whose bytes depend only on
//! the folder's tree (paths, contents, executable bits, link targets), so
//! the same code always has the same digest and is uploaded once.
//!
//! [`Scan::of`] walks the folder first, without reading a file's bytes, so
//! a folder over a size limit is refused at once with its largest files
//! named, and [`Scan::signature`] (a digest of every entry's path, size,
//! time and inode) lets a caller find the snapshot it made of an unchanged
//! folder without packing it again, as git's index does.

use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use drover_api::files::{BlobInfo, Digest};
use sha2::{Digest as _, Sha256};

use crate::digest::HashingWriter;

/// Which ignore files a scan honours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoreRules {
    /// Azure ML's, for code: the `.amlignore` files when the folder has one
    /// at its top, else its `.gitignore` files (in every subfolder, with
    /// git's syntax; no git repository is needed).
    AmlOrGit,
    /// Every file (data inputs).
    None,
}

/// What a snapshot entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File {
        /// Its size in bytes.
        size: u64,
        /// Any execute bit is set.
        executable: bool,
    },
    /// A folder.
    Dir,
    /// A symbolic link, kept as a link.
    Symlink {
        /// Where it points, as written.
        target: PathBuf,
    },
}

/// One entry of a scanned folder.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its path in the folder, `/`-separated.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Modification time (ns since the epoch), for [`Scan::signature`] only.
    mtime_ns: i128,
    /// Inode and device, for [`Scan::signature`] only.
    ino: (u64, u64),
}

/// A folder walked for a snapshot: its entries in byte order of their paths.
#[derive(Debug, Clone)]
pub struct Scan {
    /// The folder.
    pub root: PathBuf,
    /// Its entries (the folder itself is not one).
    pub entries: Vec<Entry>,
    /// The sum of its files' sizes.
    pub bytes: u64,
    /// Files (not folders or links) in it.
    pub files: u64,
    /// Which ignore file was honoured (`.amlignore`, `.gitignore`), if any.
    pub ignore_file: Option<&'static str>,
}

/// A snapshot that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The folder is not there.
    #[error("folder {0} does not exist")]
    Missing(PathBuf),
    /// It is not a folder.
    #[error("{0} is not a folder")]
    NotAFolder(PathBuf),
    /// A file name is not UTF-8, which a snapshot cannot carry on every system.
    #[error("{0} has a name that is not UTF-8")]
    NotUtf8(PathBuf),
    /// Something in it is neither a file, a folder nor a link (a socket, a device).
    #[error("{0} is neither a file, a folder nor a symbolic link")]
    Special(PathBuf),
    /// Walking or reading failed.
    #[error("cannot read {path}")]
    Read {
        /// What could not be read.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An ignore file could not be read.
    #[error("cannot walk {root}: {message}")]
    Walk {
        /// The folder.
        root: PathBuf,
        /// The walker's words.
        message: String,
    },
    /// Writing the snapshot failed.
    #[error("cannot write the snapshot of {root}")]
    Write {
        /// The folder.
        root: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl Scan {
    /// Walks `root` (links are not followed), honouring `rules`.
    pub fn of(root: &Path, rules: IgnoreRules) -> Result<Scan, SnapshotError> {
        let meta = match std::fs::metadata(root) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SnapshotError::Missing(root.to_path_buf()));
            }
            Err(source) => {
                return Err(SnapshotError::Read {
                    path: root.to_path_buf(),
                    source,
                });
            }
        };
        if !meta.is_dir() {
            return Err(SnapshotError::NotAFolder(root.to_path_buf()));
        }
        let mut walk = ignore::WalkBuilder::new(root);
        walk.standard_filters(false).follow_links(false);
        let ignore_file = match rules {
            IgnoreRules::None => None,
            IgnoreRules::AmlOrGit if root.join(".amlignore").is_file() => {
                walk.add_custom_ignore_filename(".amlignore");
                Some(".amlignore")
            }
            IgnoreRules::AmlOrGit => {
                walk.add_custom_ignore_filename(".gitignore");
                root.join(".gitignore").is_file().then_some(".gitignore")
            }
        };
        let mut entries = Vec::new();
        let (mut bytes, mut files) = (0u64, 0u64);
        for item in walk.build() {
            let item = item.map_err(|e| walk_error(root, e))?;
            if item.depth() == 0 {
                continue;
            }
            let abs = item.path();
            let rel = abs.strip_prefix(root).unwrap_or(abs);
            let path = rel
                .to_str()
                .ok_or_else(|| SnapshotError::NotUtf8(abs.to_path_buf()))?
                .to_string();
            let meta = std::fs::symlink_metadata(abs).map_err(|source| SnapshotError::Read {
                path: abs.to_path_buf(),
                source,
            })?;
            let ft = meta.file_type();
            let kind = if ft.is_symlink() {
                let target = std::fs::read_link(abs).map_err(|source| SnapshotError::Read {
                    path: abs.to_path_buf(),
                    source,
                })?;
                EntryKind::Symlink { target }
            } else if ft.is_dir() {
                EntryKind::Dir
            } else if ft.is_file() {
                bytes += meta.len();
                files += 1;
                EntryKind::File {
                    size: meta.len(),
                    executable: meta.permissions().mode() & 0o111 != 0,
                }
            } else {
                return Err(SnapshotError::Special(abs.to_path_buf()));
            };
            entries.push(Entry {
                path,
                kind,
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
                ino: (meta.ino(), meta.dev()),
            });
        }
        entries.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        Ok(Scan {
            root: root.to_path_buf(),
            entries,
            bytes,
            files,
            ignore_file,
        })
    }

    /// The `n` largest files, largest first.
    pub fn largest(&self, n: usize) -> Vec<(&str, u64)> {
        let mut files: Vec<(&str, u64)> = self
            .entries
            .iter()
            .filter_map(|e| match e.kind {
                EntryKind::File { size, .. } => Some((e.path.as_str(), size)),
                _ => None,
            })
            .collect();
        files.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        files.truncate(n);
        files
    }

    /// What to tell a user whose folder at `at` (`job.yml:3: code`) is
    /// over `limit` bytes: its size, its largest files, and what to do.
    pub fn over_limit_message(&self, at: &str, limit: u64) -> String {
        use drover_api::units::format_bytes;
        let mut msg = format!(
            "{at}: {} is {} in {} files; code may be at most {} (as on Azure ML). Its largest files:",
            self.root.display(),
            format_bytes(self.bytes),
            self.files,
            format_bytes(limit)
        );
        for (path, size) in self.largest(5) {
            msg.push_str(&format!("\n  {:>10}  {path}", format_bytes(size)));
        }
        let file = match self.ignore_file {
            Some(f) => format!("add them to its {f}"),
            None => "list them in a .amlignore file in the folder (gitignore syntax)".to_string(),
        };
        msg.push_str(&format!(
            "\n{file}, and pass data as inputs (type: uri_folder) instead of code"
        ));
        msg
    }

    /// A digest of the tree as the file system describes it (paths, kinds,
    /// sizes, modes, times, inodes), not of its bytes: equal signatures
    /// mean an unchanged folder, and so the same snapshot.
    pub fn signature(&self) -> Digest {
        let mut h = Sha256::new();
        h.update(self.root.as_os_str().as_encoded_bytes());
        for e in &self.entries {
            h.update(e.path.as_bytes());
            h.update([0]);
            match &e.kind {
                EntryKind::File { size, executable } => {
                    h.update([b'f', u8::from(*executable)]);
                    h.update(size.to_le_bytes());
                }
                EntryKind::Dir => h.update([b'd']),
                EntryKind::Symlink { target } => {
                    h.update([b'l']);
                    h.update(target.as_os_str().as_encoded_bytes());
                }
            }
            h.update(e.mtime_ns.to_le_bytes());
            h.update(e.ino.0.to_le_bytes());
            h.update(e.ino.1.to_le_bytes());
        }
        Digest(h.finalize().into())
    }

    /// Writes the snapshot to `out` and returns its digest and size. Files
    /// are read as they are now; one that changed size since the scan is
    /// written as it is now.
    pub fn write_tar<W: Write>(&self, out: W) -> Result<(W, BlobInfo), SnapshotError> {
        let werr = |source: io::Error| SnapshotError::Write {
            root: self.root.clone(),
            source,
        };
        let mut builder = tar::Builder::new(HashingWriter::new(out));
        builder.mode(tar::HeaderMode::Deterministic);
        builder.follow_symlinks(false);
        for e in &self.entries {
            let abs = self.root.join(&e.path);
            let mut header = tar::Header::new_gnu();
            // Deterministic: no owner, group or time; modes by kind.
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            match &e.kind {
                EntryKind::Dir => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(0o755);
                    header.set_size(0);
                    builder
                        .append_data(&mut header, &e.path, io::empty())
                        .map_err(werr)?;
                }
                EntryKind::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    builder
                        .append_link(&mut header, &e.path, target)
                        .map_err(werr)?;
                }
                EntryKind::File { executable, .. } => {
                    let file = std::fs::File::open(&abs).map_err(|source| SnapshotError::Read {
                        path: abs.clone(),
                        source,
                    })?;
                    let size = file
                        .metadata()
                        .map_err(|source| SnapshotError::Read {
                            path: abs.clone(),
                            source,
                        })?
                        .len();
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(if *executable { 0o755 } else { 0o644 });
                    header.set_size(size);
                    // A file that shrinks while it is read would leave a
                    // short entry: read exactly `size` bytes, zero-filled.
                    let data = file.take(size).chain(io::repeat(0)).take(size);
                    builder
                        .append_data(&mut header, &e.path, data)
                        .map_err(werr)?;
                }
            }
        }
        let hashing = builder.into_inner().map_err(werr)?;
        let (mut out, info) = hashing.finish();
        out.flush().map_err(werr)?;
        Ok((out, info))
    }

    /// Writes the snapshot to the file `dest` (created or truncated).
    pub fn write_to_file(&self, dest: &Path) -> Result<BlobInfo, SnapshotError> {
        let file = std::fs::File::create(dest).map_err(|source| SnapshotError::Write {
            root: self.root.clone(),
            source,
        })?;
        let (file, info) = self.write_tar(io::BufWriter::with_capacity(1 << 20, file))?;
        file.into_inner()
            .map_err(|e| SnapshotError::Write {
                root: self.root.clone(),
                source: e.into_error(),
            })?
            .sync_all()
            .map_err(|source| SnapshotError::Write {
                root: self.root.clone(),
                source,
            })?;
        Ok(info)
    }
}

fn walk_error(root: &Path, e: ignore::Error) -> SnapshotError {
    match e.io_error() {
        Some(io) => SnapshotError::Read {
            path: root.to_path_buf(),
            source: io::Error::new(io.kind(), e.to_string()),
        },
        None => SnapshotError::Walk {
            root: root.to_path_buf(),
            message: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree(root: &Path, files: &[(&str, &str)]) {
        for (path, body) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
    }

    fn paths(scan: &Scan) -> Vec<&str> {
        scan.entries.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn amlignore_wins_over_gitignore_and_both_work_in_subfolders() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        tree(
            root,
            &[
                ("main.py", "print(1)"),
                ("data/big.bin", "x"),
                ("sub/.gitignore", "*.tmp\n"),
                ("sub/a.tmp", ""),
                ("sub/b.py", ""),
                (".gitignore", "data/\n"),
            ],
        );
        let git = Scan::of(root, IgnoreRules::AmlOrGit).unwrap();
        assert_eq!(git.ignore_file, Some(".gitignore"));
        assert_eq!(
            paths(&git),
            [".gitignore", "main.py", "sub", "sub/.gitignore", "sub/b.py"]
        );
        std::fs::write(root.join(".amlignore"), "main.py\n").unwrap();
        let aml = Scan::of(root, IgnoreRules::AmlOrGit).unwrap();
        assert_eq!(aml.ignore_file, Some(".amlignore"));
        assert_eq!(
            paths(&aml),
            [
                ".amlignore",
                ".gitignore",
                "data",
                "data/big.bin",
                "sub",
                "sub/.gitignore",
                "sub/a.tmp",
                "sub/b.py"
            ]
        );
        let all = Scan::of(root, IgnoreRules::None).unwrap();
        assert_eq!(all.files, 7);
    }

    #[test]
    fn the_same_tree_makes_the_same_snapshot_and_a_change_a_new_one() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for root in [a.path(), b.path()] {
            tree(
                root,
                &[("z.py", "z"), ("a/b.txt", "b"), ("run.sh", "#!/bin/sh")],
            );
            std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            symlink("a/b.txt", root.join("link")).unwrap();
        }
        // Different times and owners' umask do not matter.
        std::fs::set_permissions(
            b.path().join("z.py"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let sa = Scan::of(a.path(), IgnoreRules::None).unwrap();
        let sb = Scan::of(b.path(), IgnoreRules::None).unwrap();
        let (bytes_a, ia) = sa.write_tar(Vec::new()).unwrap();
        let (_, ib) = sb.write_tar(Vec::new()).unwrap();
        assert_eq!(ia, ib);
        assert_eq!(ia.size, bytes_a.len() as u64);
        assert_eq!(ia.digest, crate::digest::sha256_bytes(&bytes_a));
        // The signature is of this folder as it is on disk.
        assert_ne!(sa.signature(), sb.signature());
        assert_eq!(
            sa.signature(),
            Scan::of(a.path(), IgnoreRules::None).unwrap().signature()
        );
        std::fs::write(a.path().join("z.py"), "zz").unwrap();
        let changed = Scan::of(a.path(), IgnoreRules::None).unwrap();
        assert_ne!(changed.signature(), sa.signature());
        assert_ne!(changed.write_tar(Vec::new()).unwrap().1, ia);
        assert_eq!(changed.largest(2), [("run.sh", 9), ("z.py", 2)]);
        let msg = changed.over_limit_message("job.yml:3: code", 10);
        assert!(msg.starts_with("job.yml:3: code: "), "{msg}");
        assert!(msg.contains("9 B  run.sh"), "{msg}");
        assert!(msg.contains("list them in a .amlignore file"), "{msg}");
    }

    #[test]
    fn missing_and_odd_folders_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("src");
        assert!(
            matches!(Scan::of(&gone, IgnoreRules::AmlOrGit), Err(SnapshotError::Missing(p)) if p == gone)
        );
        std::fs::write(&gone, "").unwrap();
        assert!(matches!(
            Scan::of(&gone, IgnoreRules::AmlOrGit),
            Err(SnapshotError::NotAFolder(_))
        ));
    }
}
