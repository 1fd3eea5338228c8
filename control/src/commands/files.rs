//! A job's files on the user's side: `job create` uploads its code folder
//! and local inputs to the control plane (each once, by digest) and sends
//! the job with what it uploaded; `job download` fetches its outputs.
//!
//! Snapshots of folders that have not changed are found again by their
//! scan signature (paths, sizes, times, inodes) in a small index in the
//! user's cache directory, so submitting the same code again costs a walk
//! of the folder and one HEAD request, not a re-pack.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use drover_api::environment::ImageBuild;
use drover_api::files::{BlobInfo, Digest, JobOutput, JobOutputs, MAX_CODE_BYTES, OutputFile};
use drover_api::job::{Code, CommandJob, Input, PathKind};
use drover_files::snapshot::{IgnoreRules, Scan, SnapshotError};
use drover_files::transfer::BlobClient;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use drover_control::output;

use super::output::bytes;

/// How many snapshots the index remembers.
const INDEX_ENTRIES: usize = 512;

/// The user's cache directory for Drover: `$XDG_CACHE_HOME/drover`, else
/// `~/.cache/drover`, else `./.drover-cache`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("drover");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache/drover"),
        None => PathBuf::from(".drover-cache"),
    }
}

/// Snapshots made before: scan signature → blob.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SnapshotIndex {
    entries: Vec<(Digest, BlobInfo)>,
}

impl SnapshotIndex {
    fn path() -> PathBuf {
        cache_dir().join("snapshots.json")
    }

    fn load() -> SnapshotIndex {
        // A missing or damaged index is an empty one: it only saves time.
        std::fs::read(Self::path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn find(&self, signature: &Digest) -> Option<BlobInfo> {
        self.entries
            .iter()
            .find(|(s, _)| s == signature)
            .map(|(_, b)| *b)
    }

    fn remember(signature: Digest, blob: BlobInfo) {
        let mut index = Self::load();
        index.entries.retain(|(s, _)| *s != signature);
        index.entries.push((signature, blob));
        let excess = index.entries.len().saturating_sub(INDEX_ENTRIES);
        index.entries.drain(..excess);
        let path = Self::path();
        let tmp = path.with_extension(format!("json.{}", std::process::id()));
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, serde_json::to_vec(&index).unwrap_or_default()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::debug!(error = %e, "cannot save the snapshot index");
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// Where a path-valued key is in the job file, for messages: `job.yml:7: code`.
pub struct Origin<'a> {
    /// The job file as the user named it.
    pub file: &'a str,
    /// Line of each path-valued key (from the YAML reader).
    pub lines: &'a BTreeMap<String, usize>,
}

impl Origin<'_> {
    fn at(&self, key: &str) -> String {
        match self.lines.get(key) {
            Some(&line) if line > 0 => format!("{}:{line}: {key}", self.file),
            _ => format!("{}: {key}", self.file),
        }
    }
}

/// Uploads what a job sent to a cluster needs from this machine — its code
/// folder and local path inputs — and rewrites the job to refer to the
/// uploads. Every folder and file is checked before anything is sent, so a
/// missing folder or code over the limit uploads nothing.
pub async fn upload_job_files(
    job: &mut CommandJob,
    blobs: &BlobClient,
    origin: &Origin<'_>,
) -> anyhow::Result<()> {
    enum Plan {
        Folder(Scan),
        File(PathBuf),
    }
    // First every check, then every upload.
    let mut plans: Vec<(String, Plan)> = Vec::new();
    if let Some(Code::Local(dir)) = &job.code {
        let scan = scan(
            dir,
            IgnoreRules::AmlOrGit,
            &origin.at("code"),
            "code folder",
        )?;
        if scan.bytes > MAX_CODE_BYTES {
            bail!(
                "{}",
                scan.over_limit_message(&origin.at("code"), MAX_CODE_BYTES)
            );
        }
        plans.push(("code".to_string(), Plan::Folder(scan)));
    }
    for (name, input) in &job.inputs {
        let Input::Path {
            path_kind, path, ..
        } = input
        else {
            continue;
        };
        let key = format!("inputs.{name}.path");
        let plan = match path_kind {
            PathKind::UriFolder => {
                Plan::Folder(scan(path, IgnoreRules::None, &origin.at(&key), "folder")?)
            }
            PathKind::UriFile => match std::fs::metadata(path) {
                Ok(m) if m.is_file() => Plan::File(path.clone()),
                Ok(_) => bail!(
                    "{}: {} is not a file (type: uri_file); use type: uri_folder for a folder",
                    origin.at(&key),
                    path.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    bail!(
                        "{}: file {} does not exist",
                        origin.at(&key),
                        path.display()
                    )
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("{}: cannot read {}", origin.at(&key), path.display())
                    });
                }
            },
        };
        plans.push((name.clone(), plan));
    }
    for (name, output) in &job.outputs {
        if let Some(path) = &output.path {
            bail!(
                "{}: {} is a folder of this machine; a cluster keeps a job's outputs in its artifact store (fetch them with `drover job download`) or writes them to azureml://datastores/NAME/paths/PATH — local output folders are for `drover run`",
                origin.at(&format!("outputs.{name}.path")),
                path.display()
            );
        }
    }

    if let Some(build) = job.environment.as_mut().and_then(|e| e.build.as_mut()) {
        upload_build_context(build, blobs, &origin.at("environment.build")).await?;
    }
    for (name, plan) in plans {
        match plan {
            Plan::Folder(scan) => {
                let what = if name == "code" {
                    format!("code {}", scan.root.display())
                } else {
                    format!("input {name} ({})", scan.root.display())
                };
                let blob = upload_folder(&scan, blobs, &what).await?;
                if name == "code" {
                    job.code = Some(Code::Snapshot(blob));
                } else if let Some(input) = job.inputs.get_mut(&name) {
                    let mode = input_mode(input);
                    *input = Input::Blob {
                        path_kind: PathKind::UriFolder,
                        blob,
                        file_name: None,
                        mode,
                    };
                }
            }
            Plan::File(path) => {
                let what = format!("input {name} ({})", path.display());
                let blob = drover_files::sha256_file(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                send(blobs, &path, blob, &what).await?;
                if let Some(input) = job.inputs.get_mut(&name) {
                    let file_name = input.file_name(&name);
                    let mode = input_mode(input);
                    *input = Input::Blob {
                        path_kind: PathKind::UriFile,
                        blob,
                        file_name: Some(file_name),
                        mode,
                    };
                }
            }
        }
    }
    Ok(())
}

fn input_mode(input: &Input) -> drover_api::job::InputMode {
    match input {
        Input::Path { mode, .. }
        | Input::Blob { mode, .. }
        | Input::Url { mode, .. }
        | Input::Datastore { mode, .. } => *mode,
        Input::Literal { .. } => Default::default(),
    }
}

fn scan(dir: &Path, rules: IgnoreRules, at: &str, what: &str) -> anyhow::Result<Scan> {
    match Scan::of(dir, rules) {
        Ok(s) => Ok(s),
        Err(SnapshotError::Missing(p)) => bail!("{at}: {what} {} does not exist", p.display()),
        Err(SnapshotError::NotAFolder(p)) => bail!("{at}: {} is not a folder", p.display()),
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("{at}: cannot snapshot {}", dir.display())))
        }
    }
}

/// The largest build context accepted (Docker sends the whole folder too).
pub const MAX_CONTEXT_BYTES: u64 = 2 << 30;

/// Uploads a Docker build context (every file: the engine applies the
/// context's `.dockerignore` itself) and points `build` at its snapshot.
/// The Dockerfile must be in it; that is checked before anything is sent.
pub async fn upload_build_context(
    build: &mut ImageBuild,
    blobs: &BlobClient,
    at: &str,
) -> anyhow::Result<()> {
    let Code::Local(dir) = &build.context else {
        return Ok(());
    };
    let scan = scan(
        dir,
        IgnoreRules::None,
        &format!("{at}.path"),
        "build context",
    )?;
    if !scan.entries.iter().any(|e| {
        e.path == build.dockerfile_path
            && matches!(e.kind, drover_files::snapshot::EntryKind::File { .. })
    }) {
        bail!(
            "{at}.dockerfile_path: {} has no file {} (dockerfile_path is relative to build.path)",
            dir.display(),
            build.dockerfile_path
        );
    }
    if scan.bytes > MAX_CONTEXT_BYTES {
        bail!(
            "{}",
            scan.over_limit_message(&format!("{at}.path"), MAX_CONTEXT_BYTES)
        );
    }
    let what = format!("build context {}", dir.display());
    let blob = upload_folder(&scan, blobs, &what).await?;
    build.context = Code::Snapshot(blob);
    Ok(())
}

/// Uploads a folder's snapshot unless the control plane has it, and returns it.
async fn upload_folder(scan: &Scan, blobs: &BlobClient, what: &str) -> anyhow::Result<BlobInfo> {
    let signature = scan.signature();
    if let Some(blob) = SnapshotIndex::load().find(&signature)
        && blobs.stat(&blob.digest).await? == Some(blob.size)
    {
        tracing::debug!(what, digest = %blob.digest, "snapshot unchanged and stored");
        return Ok(blob);
    }
    let tmp_dir = cache_dir().join("tmp");
    std::fs::create_dir_all(&tmp_dir)
        .with_context(|| format!("cannot create {}", tmp_dir.display()))?;
    let tar = tempfile::Builder::new()
        .prefix("snapshot-")
        .suffix(".tar")
        .tempfile_in(&tmp_dir)
        .with_context(|| format!("cannot create a file in {}", tmp_dir.display()))?;
    let blob = {
        let scan = scan.clone();
        let path = tar.path().to_path_buf();
        tokio::task::spawn_blocking(move || scan.write_to_file(&path))
            .await
            .context("packing the snapshot stopped")??
    };
    send(blobs, tar.path(), blob, what).await?;
    SnapshotIndex::remember(signature, blob);
    Ok(blob)
}

/// Sends a file the control plane may not have, with progress on a terminal.
async fn send(blobs: &BlobClient, path: &Path, blob: BlobInfo, what: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let bar = progress_bar(blob.size, &format!("uploading {what}"));
    let done = blobs
        .upload_file(path, blob, &|n| bar.set_position(n))
        .await
        .with_context(|| format!("cannot upload {what}"))?;
    bar.finish_and_clear();
    if !done.already_stored {
        output::note(format_args!(
            "drover: uploaded {what}: {} in {:.1} s",
            bytes(blob.size),
            started.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

/// A byte progress bar on stderr when it is a terminal that takes escape
/// codes; hidden otherwise.
fn progress_bar(total: u64, message: &str) -> ProgressBar {
    use std::io::IsTerminal;
    if !output::escape_codes_allowed(std::io::stderr().is_terminal()) || total < 1 << 20 {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(message.to_string());
    bar
}

/// Which of a job's outputs `job download` fetches.
pub enum Wanted {
    /// The default output (the artifacts).
    Default,
    /// One named output.
    Named(String),
    /// Every output.
    All,
}

/// Where an output is downloaded to, as `az ml job download` lays it out:
/// `DIR/artifacts` for the default output, `DIR/named-outputs/NAME` for others.
pub fn output_dir(dir: &Path, output: &str) -> PathBuf {
    if output == drover_api::files::DEFAULT_OUTPUT {
        dir.join("artifacts")
    } else {
        dir.join("named-outputs").join(output)
    }
}

/// Downloads the chosen outputs into `dir`; returns (files, bytes) written.
pub async fn download_outputs(
    outputs: &JobOutputs,
    wanted: &Wanted,
    dir: &Path,
    blobs: &BlobClient,
) -> anyhow::Result<(u64, u64)> {
    let chosen: Vec<&JobOutput> = match wanted {
        Wanted::All => outputs.outputs.iter().collect(),
        Wanted::Default => outputs
            .outputs
            .iter()
            .filter(|o| o.name == drover_api::files::DEFAULT_OUTPUT)
            .collect(),
        Wanted::Named(name) => {
            let found: Vec<&JobOutput> =
                outputs.outputs.iter().filter(|o| &o.name == name).collect();
            if found.is_empty() {
                let known: Vec<&str> = outputs.outputs.iter().map(|o| o.name.as_str()).collect();
                bail!(
                    "job {} has no output named {name} (its outputs: {})",
                    outputs.job,
                    if known.is_empty() {
                        "none yet".to_string()
                    } else {
                        known.join(", ")
                    }
                );
            }
            found
        }
    };
    let total: u64 = chosen.iter().map(|o| o.bytes).sum();
    let bar = progress_bar(total, &format!("downloading {}", outputs.job));
    let mut done_before = 0u64;
    let (mut files, mut written) = (0u64, 0u64);
    // The same bytes in two places are fetched once and copied.
    let mut fetched: BTreeMap<Digest, PathBuf> = BTreeMap::new();
    for output in chosen {
        let root = output_dir(dir, &output.name);
        for f in &output.files {
            let dest = safe_join(&root, f)?;
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            match fetched.get(&f.digest) {
                Some(first) => {
                    std::fs::copy(first, &dest).with_context(|| {
                        format!("cannot copy {} to {}", first.display(), dest.display())
                    })?;
                }
                None => {
                    let base = done_before;
                    blobs
                        .download_to(
                            BlobInfo {
                                digest: f.digest,
                                size: f.size,
                            },
                            &dest,
                            &|n| bar.set_position(base + n),
                        )
                        .await
                        .with_context(|| format!("cannot download {}", dest.display()))?;
                    fetched.insert(f.digest, dest.clone());
                }
            }
            set_executable(&dest, f.executable)?;
            done_before += f.size;
            files += 1;
            written += f.size;
        }
    }
    bar.finish_and_clear();
    Ok((files, written))
}

/// `root/path` for a path the control plane gave, which must stay in `root`.
fn safe_join(root: &Path, f: &OutputFile) -> anyhow::Result<PathBuf> {
    drover_api::files::check_relative_path(&f.path).map_err(|e| {
        anyhow::anyhow!("the control plane sent an output file path that is refused: {e}")
    })?;
    Ok(root.join(&f.path))
}

fn set_executable(path: &Path, executable: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downloads_land_where_az_ml_puts_them() {
        let d = Path::new("/tmp/x");
        assert_eq!(output_dir(d, "default"), Path::new("/tmp/x/artifacts"));
        assert_eq!(
            output_dir(d, "model"),
            Path::new("/tmp/x/named-outputs/model")
        );
    }
}
