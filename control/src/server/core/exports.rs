//! Copies of datastore outputs into their datastores, in the background:
//! asked for (in the store) each time a part posts its outputs, made from
//! the artifact store's blobs, resumed after a restart because what is
//! pending is read back from the store.

use drover_api::files::WORKSPACE_DATASTORE;

use super::{ControlPlane, now};
use crate::server::error::ControlError;
use crate::store::{Export, ExportState, Store, StoreError};

/// Asks for a copy of each of the job's datastore outputs (of `attempt`).
pub(super) fn request_exports(s: &mut Store, job: &str, attempt: u32) -> Result<(), StoreError> {
    let spec = s.job(job)?.spec;
    let Some(command) = spec.as_command() else {
        return Ok(());
    };
    for (name, output) in &command.outputs {
        if let Some(at) = &output.datastore
            && at.datastore != WORKSPACE_DATASTORE
        {
            let dest = super::files::destination(at, job, name);
            s.request_export(job, attempt, name, &dest.datastore, &dest.path, now())?;
        }
    }
    Ok(())
}

/// `prefix/path`, or `path` alone at the datastore's root.
pub fn export_file_path(prefix: &str, path: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        path.to_string()
    } else {
        format!("{prefix}/{path}")
    }
}

impl ControlPlane {
    /// Wakes the exporter.
    pub(super) fn wake_exporter(&self) {
        self.exports_wake.notify_one();
    }

    /// Waits until an export may be pending.
    pub async fn exports_changed(&self) {
        self.exports_wake.notified().await;
    }

    /// Makes every pending copy; returns how many were made.
    pub async fn export_pass(&self) -> Result<usize, ControlError> {
        let pending = self.with_store(|s| s.pending_exports()).await?;
        let mut made = 0;
        for export in pending {
            let outcome = self.export_one(&export).await;
            let (state, files, error) = match outcome {
                Ok(files) => (ExportState::Done, files, None),
                Err(e) => (ExportState::Failed, 0, Some(e.message())),
            };
            match &error {
                None => {
                    tracing::info!(job = %export.job, output = %export.output, datastore = %export.datastore, path = %export.path, files, "output copied to its datastore")
                }
                Some(e) => {
                    tracing::warn!(job = %export.job, output = %export.output, datastore = %export.datastore, error = %e, "output copy failed")
                }
            }
            let e2 = export.clone();
            self.with_store(move |s| s.finish_export(&e2, state, files, error.as_deref(), now()))
                .await?;
            made += 1;
        }
        Ok(made)
    }

    async fn export_one(&self, export: &Export) -> Result<u64, ControlError> {
        let ds = self.open_datastore(&export.datastore).await?;
        let outputs = self
            .job_outputs(export.job.clone(), Some(export.attempt))
            .await?;
        let Some(output) = outputs
            .outputs
            .into_iter()
            .find(|o| o.name == export.output)
        else {
            return Ok(0);
        };
        let artifacts = self.artifacts()?;
        let n = output.files.len() as u64;
        for f in output.files {
            let (from, temporary) = artifacts.local_copy(&f.digest).await?;
            let written = ds
                .write_from(&export_file_path(&export.path, &f.path), &from)
                .await;
            if temporary && let Err(e) = tokio::fs::remove_file(&from).await {
                tracing::warn!(path = %from.display(), error = %e, "cannot remove a temporary copy");
            }
            written.map_err(|e| ControlError::Internal(drover_api::error::chain(&e)))?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_files_go_under_the_prefix() {
        assert_eq!(export_file_path("results/j/", "s.txt"), "results/j/s.txt");
        assert_eq!(export_file_path("", "a/b"), "a/b");
    }
}
