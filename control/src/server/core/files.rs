//! Job files: blobs through the artifact store, the outputs each part's
//! agent posts, and a job's outputs merged across its nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use drover_api::files::{
    DEFAULT_OUTPUT, Digest, JobOutput, JobOutputs, PartOutputs, PartOutputsAccepted, SkippedFile,
    check_relative_path,
};
use drover_api::job::DatastorePath;

use super::{ControlPlane, now};
use crate::artifacts::ArtifactStore;
use crate::server::error::ControlError;
use crate::store::{ExportState, Node, StoreError};

/// Checks a posted [`PartOutputs`]: output names, every path, and no path
/// twice in one output. Returns the digests it names, in order.
pub fn check_part_outputs(posted: &PartOutputs) -> Result<Vec<Digest>, String> {
    let mut digests = Vec::new();
    for (name, files) in &posted.outputs {
        if name.is_empty() || name.len() > 255 {
            return Err(format!("output name `{name}` is empty or too long"));
        }
        let mut seen = BTreeSet::new();
        for f in files {
            check_relative_path(&f.path).map_err(|e| format!("outputs.{name}: {e}"))?;
            if name == DEFAULT_OUTPUT
                && !(f.path.starts_with("outputs/") || f.path.starts_with("logs/"))
            {
                return Err(format!(
                    "outputs.{name}: `{}` is neither under outputs/ nor under logs/",
                    f.path
                ));
            }
            if !seen.insert(f.path.as_str()) {
                return Err(format!("outputs.{name}: `{}` is listed twice", f.path));
            }
            digests.push(f.digest);
        }
    }
    for (name, files) in &posted.skipped {
        for f in files {
            if f.path.len() > 4096 || f.reason.len() > 4096 {
                return Err(format!("skipped.{name}: an entry is too long"));
            }
        }
    }
    Ok(digests)
}

/// Substitutes `${{name}}` (the job) and `${{output_name}}` in a datastore
/// output's path.
pub fn export_path(path: &str, job: &str, output: &str) -> String {
    path.replace("${{name}}", job)
        .replace("${{output_name}}", output)
}

/// Where a declared output is also written, substituted.
pub fn destination(at: &DatastorePath, job: &str, output: &str) -> DatastorePath {
    DatastorePath {
        datastore: at.datastore.clone(),
        path: export_path(&at.path, job, output),
    }
}

/// Merges what each part posted into the job's outputs, as documented on
/// [`JobOutput`]: files in path order, the lowest node rank's kept where
/// two nodes wrote one path, different bytes there named as conflicts.
/// `declared` are the job's named outputs with their destinations; the
/// default output comes first, then the others by name.
pub fn merge_outputs(
    job: &str,
    attempt: u32,
    declared: &BTreeMap<String, Option<String>>,
    posted: &[PartOutputs],
) -> JobOutputs {
    let mut posted: Vec<&PartOutputs> = posted.iter().collect();
    posted.sort_by_key(|p| p.part.node_rank);
    let mut names: BTreeSet<&str> = declared.keys().map(String::as_str).collect();
    for p in &posted {
        names.extend(p.outputs.keys().map(String::as_str));
        names.extend(p.skipped.keys().map(String::as_str));
    }
    names.remove(DEFAULT_OUTPUT);
    let order = std::iter::once(DEFAULT_OUTPUT).chain(names);
    let outputs = order
        .map(|name| {
            let mut files = BTreeMap::new();
            let mut conflicts = BTreeSet::new();
            let mut skipped: Vec<SkippedFile> = Vec::new();
            let mut nodes = Vec::new();
            for p in &posted {
                if !p.outputs.contains_key(name) && !p.skipped.contains_key(name) {
                    continue;
                }
                nodes.push(p.part.node_rank);
                for f in p.outputs.get(name).into_iter().flatten() {
                    match files.get(&f.path) {
                        None => {
                            files.insert(f.path.clone(), f.clone());
                        }
                        Some(kept) if kept.digest != f.digest => {
                            conflicts.insert(f.path.clone());
                        }
                        Some(_) => {}
                    }
                }
                for s in p.skipped.get(name).into_iter().flatten() {
                    if !skipped.contains(s) {
                        skipped.push(s.clone());
                    }
                }
            }
            let files: Vec<_> = files.into_values().collect();
            JobOutput {
                name: name.to_string(),
                bytes: files.iter().map(|f| f.size).sum(),
                files,
                nodes,
                conflicts: conflicts.into_iter().collect(),
                skipped,
                destination: declared.get(name).cloned().flatten(),
            }
        })
        .collect();
    JobOutputs {
        job: job.to_string(),
        attempt,
        outputs,
    }
}

impl ControlPlane {
    /// The artifact store.
    pub fn artifacts(&self) -> Result<&Arc<ArtifactStore>, ControlError> {
        self.artifacts
            .as_ref()
            .ok_or_else(|| ControlError::Invalid("this server has no artifact store".to_string()))
    }

    /// Records a part's outputs, posted by its node's agent once every
    /// file is a stored blob.
    pub async fn post_outputs(
        &self,
        node: Node,
        posted: PartOutputs,
    ) -> Result<PartOutputsAccepted, ControlError> {
        let digests = check_part_outputs(&posted).map_err(ControlError::Invalid)?;
        let unique: Vec<Digest> = digests
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let artifacts = self.artifacts()?;
        let mut stored = BTreeMap::new();
        for d in &unique {
            stored.insert(*d, artifacts.stat(d).await?);
        }
        let missing = stored.values().filter(|s| s.is_none()).count();
        let files = posted
            .outputs
            .iter()
            .flat_map(|(n, fs)| fs.iter().map(move |f| (n, f)));
        for (name, f) in files {
            match stored.get(&f.digest).copied().flatten() {
                None => {
                    return Err(ControlError::Invalid(format!(
                        "outputs.{name}: {}: blob {} is not stored; upload it first ({missing} of the files' blobs are missing)",
                        f.path, f.digest
                    )));
                }
                Some(size) if size != f.size => {
                    return Err(ControlError::Invalid(format!(
                        "outputs.{name}: {}: blob {} is {size} bytes, not {}",
                        f.path, f.digest, f.size
                    )));
                }
                Some(_) => {}
            }
        }
        let accepted = PartOutputsAccepted {
            files: posted.outputs.values().map(|f| f.len() as u64).sum(),
            bytes: posted.outputs.values().flatten().map(|f| f.size).sum(),
        };
        let node_id = node.id.clone();
        let key = posted.part.clone();
        self.with_store(move |s| {
            match s.record_part_outputs(&node_id, &posted, now()) {
                Err(StoreError::Conflict(m)) => return Ok(Err(ControlError::Forbidden(m))),
                r => r?,
            }
            super::exports::request_exports(s, &posted.part.job, posted.part.attempt)?;
            Ok(Ok(()))
        })
        .await??;
        self.wake_exporter();
        tracing::info!(
            node = %node.id,
            job = %key.job,
            attempt = key.attempt,
            node_rank = key.node_rank,
            files = accepted.files,
            bytes = accepted.bytes,
            "part outputs recorded"
        );
        Ok(accepted)
    }

    /// A job's outputs for one attempt (the latest by default).
    pub async fn job_outputs(
        &self,
        id: String,
        attempt: Option<u32>,
    ) -> Result<JobOutputs, ControlError> {
        self.with_store(move |s| {
            let job = s.job(&id)?;
            let attempt = attempt.unwrap_or(job.attempt.max(1));
            if attempt == 0 || attempt > job.attempt.max(1) {
                return Ok(Err(ControlError::Invalid(format!(
                    "job {id} has no attempt {attempt} (it has had {})",
                    job.attempt
                ))));
            }
            let posted: Vec<PartOutputs> = s
                .part_outputs(&id, attempt)?
                .into_iter()
                .map(|p| p.outputs)
                .collect();
            let declared: BTreeMap<String, Option<String>> = job
                .spec
                .as_command()
                .map(|c| {
                    c.outputs
                        .iter()
                        .map(|(name, o)| {
                            (
                                name.clone(),
                                o.datastore
                                    .as_ref()
                                    .map(|d| destination(d, &id, name).to_string()),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut merged = merge_outputs(&id, attempt, &declared, &posted);
            for e in s.exports(&id, attempt)? {
                if let Some(o) = merged.outputs.iter_mut().find(|o| o.name == e.output)
                    && let Some(d) = &mut o.destination
                {
                    match e.state {
                        ExportState::Done => {}
                        ExportState::Pending => d.push_str(" (copying)"),
                        ExportState::Failed => {
                            d.push_str(&format!(" (copy failed: {})", e.error.unwrap_or_default()))
                        }
                    }
                }
            }
            Ok(Ok(merged))
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_api::files::OutputFile;
    use drover_api::wire::PartKey;

    fn file(path: &str, byte: u8) -> OutputFile {
        OutputFile {
            path: path.to_string(),
            size: 1,
            digest: Digest([byte; 32]),
            executable: false,
        }
    }

    fn posted(rank: u32, outputs: &[(&str, Vec<OutputFile>)]) -> PartOutputs {
        PartOutputs {
            part: PartKey::new("j", 1, rank),
            outputs: outputs
                .iter()
                .map(|(n, f)| (n.to_string(), f.clone()))
                .collect(),
            skipped: BTreeMap::new(),
        }
    }

    #[test]
    fn outputs_merge_across_nodes_lowest_rank_first() {
        let declared: BTreeMap<String, Option<String>> = [
            ("model".to_string(), None),
            (
                "empty".to_string(),
                Some("azureml://datastores/d/paths/j".to_string()),
            ),
        ]
        .into();
        let parts = vec![
            posted(
                1,
                &[
                    (
                        DEFAULT_OUTPUT,
                        vec![file("outputs/a", 2), file("logs/x", 3)],
                    ),
                    ("model", vec![file("m.pt", 9)]),
                ],
            ),
            posted(
                0,
                &[(
                    DEFAULT_OUTPUT,
                    vec![file("outputs/a", 1), file("outputs/b", 1)],
                )],
            ),
        ];
        let merged = merge_outputs("j", 1, &declared, &parts);
        let names: Vec<&str> = merged.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, [DEFAULT_OUTPUT, "empty", "model"]);
        let d = &merged.outputs[0];
        let paths: Vec<&str> = d.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["logs/x", "outputs/a", "outputs/b"]);
        assert_eq!(d.files[1].digest, Digest([1; 32]), "rank 0's kept");
        assert_eq!(d.conflicts, ["outputs/a"]);
        assert_eq!(d.nodes, [0, 1]);
        assert_eq!(d.bytes, 3);
        assert!(merged.outputs[1].files.is_empty());
        assert_eq!(
            merged.outputs[1].destination.as_deref(),
            Some("azureml://datastores/d/paths/j")
        );
        assert_eq!(merged.outputs[2].nodes, [1]);
    }

    #[test]
    fn posted_outputs_are_checked() {
        let ok = posted(
            0,
            &[
                (DEFAULT_OUTPUT, vec![file("outputs/a", 1)]),
                ("m", vec![file("x/y", 2)]),
            ],
        );
        assert_eq!(check_part_outputs(&ok).unwrap().len(), 2);
        for bad in [
            posted(0, &[("m", vec![file("../x", 1)])]),
            posted(0, &[("m", vec![file("/etc/passwd", 1)])]),
            posted(0, &[(DEFAULT_OUTPUT, vec![file("src/a", 1)])]),
            posted(0, &[("m", vec![file("a", 1), file("a", 2)])]),
            posted(0, &[("", vec![])]),
        ] {
            assert!(check_part_outputs(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn export_paths_name_the_job_and_output() {
        assert_eq!(
            export_path("runs/${{name}}/${{output_name}}", "job-1", "model"),
            "runs/job-1/model"
        );
        assert_eq!(export_path("plain", "j", "o"), "plain");
    }
}
