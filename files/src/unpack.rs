//! A snapshot back into a folder. Every entry must land inside the folder:
//! absolute paths, `..`, devices, FIFOs and hard links to outside are
//! refused, and nothing is written through a symbolic link the archive
//! made (the tar crate checks each entry's parent against the folder).
//! [`unpack_atomic`] unpacks beside the destination and renames, so a
//! folder that exists is a whole snapshot.

use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

/// A snapshot that could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry would land outside the folder, or is of a refused kind.
    #[error("the snapshot's entry `{path}` is refused: {why}")]
    Refused {
        /// The entry's path as written.
        path: String,
        /// Why.
        why: &'static str,
    },
    /// Reading the archive or writing the folder failed.
    #[error("cannot unpack into {dest}")]
    Io {
        /// The folder.
        dest: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Unpacks the tar `archive` into the folder `dest` (created if missing),
/// keeping modes, and returns the bytes of file data written.
pub fn unpack<R: Read>(archive: R, dest: &Path) -> Result<u64, UnpackError> {
    let io_err = |source: io::Error| UnpackError::Io {
        dest: dest.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dest).map_err(io_err)?;
    let mut archive = tar::Archive::new(archive);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(false);
    archive.set_overwrite(true);
    let mut bytes = 0u64;
    for entry in archive.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        let path = entry.path().map_err(io_err)?.into_owned();
        let shown = path.display().to_string();
        if path.is_absolute()
            || path
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(UnpackError::Refused {
                path: shown,
                why: "it is absolute or climbs out with `..`",
            });
        }
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                bytes += entry.size();
            }
            tar::EntryType::Directory | tar::EntryType::Symlink => {}
            tar::EntryType::Link => {
                let target = entry.link_name().map_err(io_err)?.unwrap_or_default();
                if target.is_absolute()
                    || target
                        .components()
                        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
                {
                    return Err(UnpackError::Refused {
                        path: shown,
                        why: "a hard link to outside the snapshot",
                    });
                }
            }
            // Extended headers are read by the tar crate itself.
            tar::EntryType::XHeader | tar::EntryType::XGlobalHeader => continue,
            _ => {
                return Err(UnpackError::Refused {
                    path: shown,
                    why: "only files, folders and links are unpacked",
                });
            }
        }
        // `unpack_in` refuses entries whose parent resolves outside `dest`.
        if !entry.unpack_in(dest).map_err(io_err)? {
            return Err(UnpackError::Refused {
                path: shown,
                why: "it would land outside the folder",
            });
        }
    }
    Ok(bytes)
}

/// Unpacks into a fresh folder beside `dest` and renames it to `dest`: a
/// reader of `dest` sees the whole snapshot or nothing. An existing `dest`
/// is replaced.
pub fn unpack_atomic<R: Read>(archive: R, dest: &Path) -> Result<u64, UnpackError> {
    let io_err = |source: io::Error| UnpackError::Io {
        dest: dest.to_path_buf(),
        source,
    };
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err)?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    let staging = parent.join(format!(".{name}.unpacking-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let result = unpack(archive, &staging).and_then(|bytes| {
        if dest.exists() {
            std::fs::remove_dir_all(dest).map_err(io_err)?;
        }
        std::fs::rename(&staging, dest).map_err(io_err)?;
        Ok(bytes)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{IgnoreRules, Scan};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_snapshot_unpacks_to_the_same_tree() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/c.txt"), "hello").unwrap();
        std::fs::write(src.path().join("run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            src.path().join("run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let long = "x".repeat(200);
        std::fs::write(src.path().join(&long), "long name").unwrap();
        std::os::unix::fs::symlink("a/b/c.txt", src.path().join("link")).unwrap();
        let scan = Scan::of(src.path(), IgnoreRules::None).unwrap();
        let (tar, _) = scan.write_tar(Vec::new()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("code");
        let bytes = unpack_atomic(tar.as_slice(), &dest).unwrap();
        assert_eq!(bytes, 5 + 10 + 9);
        assert_eq!(
            std::fs::read_to_string(dest.join("a/b/c.txt")).unwrap(),
            "hello"
        );
        assert_eq!(
            std::fs::read_to_string(dest.join(&long)).unwrap(),
            "long name"
        );
        assert_eq!(std::fs::read_to_string(dest.join("link")).unwrap(), "hello");
        let mode = std::fs::metadata(dest.join("run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111);
        // Nothing is left beside it.
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 1);
    }

    fn raw_tar(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, kind, link) in entries {
            let mut h = tar::Header::new_old();
            {
                let bytes = &mut h.as_old_mut().name;
                bytes[..path.len()].copy_from_slice(path.as_bytes());
            }
            h.set_entry_type(*kind);
            h.set_size(if *kind == tar::EntryType::Regular {
                1
            } else {
                0
            });
            h.set_mode(0o644);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            if *kind == tar::EntryType::Regular {
                let mut block = [0u8; 512];
                block[0] = b'x';
                out.extend_from_slice(&block);
            }
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    #[test]
    fn entries_that_would_escape_are_refused_and_nothing_is_left() {
        let out = tempfile::tempdir().unwrap();
        let cases = [
            raw_tar(&[("../evil", tar::EntryType::Regular, "")]),
            raw_tar(&[("/etc/evil", tar::EntryType::Regular, "")]),
            raw_tar(&[("dev", tar::EntryType::Char, "")]),
            raw_tar(&[("h", tar::EntryType::Link, "/etc/passwd")]),
            // A link out, then a file written through it.
            raw_tar(&[
                ("up", tar::EntryType::Symlink, "/tmp"),
                ("up/evil", tar::EntryType::Regular, ""),
            ]),
        ];
        for (i, tar) in cases.iter().enumerate() {
            let dest = out.path().join(format!("d{i}"));
            let e = unpack_atomic(tar.as_slice(), &dest).unwrap_err();
            assert!(
                matches!(e, UnpackError::Refused { .. } | UnpackError::Io { .. }),
                "{i}: {e}"
            );
            assert!(!dest.exists(), "{i}");
        }
        assert!(!Path::new("/tmp/evil").exists());
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    }
}
