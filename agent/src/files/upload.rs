//! After a part's container ends: its outputs uploaded as blobs and posted
//! to the control plane (`PartOutputs`) before its final state is reported.
//! Files are walked without following symbolic links: a link, a socket or
//! a device is skipped with why. Uploading again after a restart sends only
//! what the control plane lacks (a stored blob is skipped, a staged one
//! resumes).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use drover_api::files::{
    DEFAULT_OUTPUT, OutputFile, PartOutputs, PartOutputsAccepted, SkippedFile,
};
use drover_api::wire::PartKey;

use super::PartRecord;
use crate::control_client::ControlClient;

/// One file found in an output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its path inside the output.
    pub path: String,
    /// Where it is on this node.
    pub local: PathBuf,
    /// Its size.
    pub size: u64,
    /// Executable by its owner.
    pub executable: bool,
}

/// What an output holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Walked {
    /// Its regular files, in path order.
    pub files: Vec<Found>,
    /// What was not uploaded, and why.
    pub skipped: Vec<SkippedFile>,
}

/// Walks the folder `root`, naming what it finds `prefix/…` (or as it is
/// when `prefix` is empty). Symbolic links are never followed.
pub fn walk(root: &Path, prefix: &str, out: &mut Walked) {
    let mut stack = vec![(root.to_path_buf(), prefix.to_string())];
    while let Some((dir, name)) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir == root => continue,
            Err(e) => {
                out.skipped.push(SkippedFile {
                    path: if name.is_empty() { ".".into() } else { name },
                    reason: format!("cannot read the folder: {e}"),
                });
                continue;
            }
        };
        for entry in rd.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let path = if name.is_empty() {
                file_name
            } else {
                format!("{name}/{file_name}")
            };
            let local = entry.path();
            let meta = match std::fs::symlink_metadata(&local) {
                Ok(m) => m,
                Err(e) => {
                    out.skipped.push(SkippedFile {
                        path,
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            let ft = meta.file_type();
            if ft.is_symlink() {
                out.skipped.push(SkippedFile {
                    path,
                    reason: "a symbolic link".into(),
                });
            } else if ft.is_dir() {
                stack.push((local, path));
            } else if ft.is_file() {
                out.files.push(Found {
                    path,
                    local,
                    size: meta.len(),
                    executable: meta.permissions().mode() & 0o100 != 0,
                });
            } else {
                out.skipped.push(SkippedFile {
                    path,
                    reason: "not a regular file (a socket, a pipe or a device)".into(),
                });
            }
        }
    }
    out.files.sort_by(|a, b| a.path.cmp(&b.path));
    out.skipped.sort_by(|a, b| a.path.cmp(&b.path));
}

/// The part's outputs by name: the default output (`work/outputs`,
/// `work/logs`) and each named output.
pub fn walk_outputs(record: &PartRecord) -> BTreeMap<String, Walked> {
    let mut out = BTreeMap::new();
    let mut default = Walked::default();
    walk(&record.work.join("outputs"), "outputs", &mut default);
    walk(&record.work.join("logs"), "logs", &mut default);
    out.insert(DEFAULT_OUTPUT.to_string(), default);
    for (name, path) in &record.outputs {
        let mut w = Walked::default();
        walk(path, "", &mut w);
        out.insert(name.clone(), w);
    }
    out
}

/// An output that could not be uploaded.
#[derive(Debug, thiserror::Error)]
#[error("output {output}: {message}")]
pub struct UploadError {
    /// The output's name (or `all` for the post).
    pub output: String,
    /// Why.
    pub message: String,
    /// Trying again later may work.
    pub transient: bool,
    /// The control plane said the part is not (or no longer) this node's
    /// (403, 409): its outputs are not wanted.
    pub not_ours: bool,
}

/// Uploads every output file the control plane lacks and posts the part's
/// outputs. `Ok(None)` when the part left no file at all (nothing is posted).
pub async fn upload_outputs(
    client: &ControlClient,
    part: &PartKey,
    record: &PartRecord,
) -> Result<Option<PartOutputsAccepted>, UploadError> {
    let walked = {
        let record = record.clone();
        tokio::task::spawn_blocking(move || walk_outputs(&record))
            .await
            .map_err(|e| UploadError {
                output: DEFAULT_OUTPUT.into(),
                message: format!("walking the outputs stopped: {e}"),
                transient: false,
                not_ours: false,
            })?
    };
    let files: usize = walked.values().map(|w| w.files.len()).sum();
    let skipped: usize = walked.values().map(|w| w.skipped.len()).sum();
    if files == 0 && skipped == 0 {
        tracing::info!(part = %part, "the part left no outputs");
        return Ok(None);
    }
    let bytes: u64 = walked
        .values()
        .flat_map(|w| w.files.iter())
        .map(|f| f.size)
        .sum();
    tracing::info!(part = %part, files, bytes, "uploading outputs");
    let blobs = client.blob_client();
    let mut post = PartOutputs {
        part: part.clone(),
        outputs: BTreeMap::new(),
        skipped: BTreeMap::new(),
    };
    let mut sent = 0u64;
    for (name, w) in walked {
        let err = |message: String, transient: bool| UploadError {
            output: name.clone(),
            message,
            transient,
            not_ours: false,
        };
        let mut list = Vec::with_capacity(w.files.len());
        let mut skipped = w.skipped;
        for f in w.files {
            let local = f.local.clone();
            let hashed =
                tokio::task::spawn_blocking(move || drover_files::digest::sha256_file(&local))
                    .await
                    .map_err(|e| err(format!("hashing stopped: {e}"), false))?;
            let blob = match hashed {
                Ok(b) => b,
                Err(e) => {
                    skipped.push(SkippedFile {
                        path: f.path,
                        reason: format!("cannot read it: {e}"),
                    });
                    continue;
                }
            };
            let stored = blobs.stat(&blob.digest).await.map_err(|e| {
                err(
                    format!("cannot upload {}: {}", f.path, drover_api::error::chain(&e)),
                    e.is_transient(),
                )
            })?;
            if stored != Some(blob.size) {
                let up = blobs
                    .upload_file(&f.local, blob, &|_| {})
                    .await
                    .map_err(|e| {
                        err(
                            format!("cannot upload {}: {}", f.path, drover_api::error::chain(&e)),
                            e.is_transient(),
                        )
                    })?;
                sent += up.sent;
            }
            list.push(OutputFile {
                path: f.path,
                size: blob.size,
                digest: blob.digest,
                executable: f.executable,
            });
        }
        if !skipped.is_empty() {
            post.skipped.insert(name.clone(), skipped);
        }
        post.outputs.insert(name, list);
    }
    let accepted = client.post_outputs(&post).await.map_err(|e| UploadError {
        output: "all".into(),
        message: format!("posting them failed: {}", drover_api::error::chain(&e)),
        transient: e.is_transient(),
        not_ours: matches!(
            e,
            crate::control_client::ClientError::Rejected {
                status: 403 | 409,
                ..
            }
        ),
    })?;
    tracing::info!(part = %part, files = accepted.files, bytes = accepted.bytes, sent, "outputs posted");
    Ok(Some(accepted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walking_never_follows_links_and_names_files_under_their_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("outputs");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.txt"), b"a").unwrap();
        std::fs::write(root.join("sub/b.bin"), b"bb").unwrap();
        std::fs::set_permissions(
            root.join("sub/b.bin"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let outside = tmp.path().join("secret");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("key"), b"k").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("sub/pw")).unwrap();
        let mut w = Walked::default();
        walk(&root, "outputs", &mut w);
        let paths: Vec<(&str, u64, bool)> = w
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.size, f.executable))
            .collect();
        assert_eq!(
            paths,
            [("outputs/a.txt", 1, false), ("outputs/sub/b.bin", 2, true)]
        );
        let skipped: Vec<(&str, &str)> = w
            .skipped
            .iter()
            .map(|s| (s.path.as_str(), s.reason.as_str()))
            .collect();
        assert_eq!(
            skipped,
            [
                ("outputs/escape", "a symbolic link"),
                ("outputs/sub/pw", "a symbolic link")
            ]
        );
    }

    #[test]
    fn the_default_output_holds_outputs_and_logs_and_named_ones_their_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        std::fs::create_dir_all(work.join("outputs")).unwrap();
        std::fs::create_dir_all(work.join("logs")).unwrap();
        std::fs::write(work.join("outputs/x.txt"), b"x").unwrap();
        std::fs::write(work.join("logs/train.log"), b"l").unwrap();
        std::fs::write(work.join("not-an-output.py"), b"p").unwrap();
        let model = tmp.path().join("outputs/model");
        std::fs::create_dir_all(model.join("sub")).unwrap();
        std::fs::write(model.join("sub/w.bin"), b"w").unwrap();
        let rec = PartRecord {
            part: PartKey::new("j", 1, 0),
            phase: super::super::Phase::Uploading,
            work,
            outputs: [("model".to_string(), model)].into(),
        };
        let got = walk_outputs(&rec);
        let names =
            |n: &str| -> Vec<String> { got[n].files.iter().map(|f| f.path.clone()).collect() };
        assert_eq!(names("default"), ["logs/train.log", "outputs/x.txt"]);
        assert_eq!(names("model"), ["sub/w.bin"]);
    }
}
