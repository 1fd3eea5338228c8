//! Datastores through the user API (create, list, show, delete; secrets
//! sealed, never answered back), the agents' proxy to their data, and the
//! checks a submitted job's files pass.

use std::collections::BTreeSet;

use drover_api::datastore::{
    BlobCredentials, DatastoreInfo, DatastoreKind, DatastoreList, DatastoreSpec, S3Credentials,
    Secret,
};
use drover_api::files::{BlobInfo, DataEntry, DataListing, WORKSPACE_DATASTORE};
use drover_api::job::{Code, Input, JobSpec};

use super::{ControlPlane, now};
use crate::datastores::{Datastore, DatastoreError};
use crate::server::error::ControlError;
use crate::store::{Store, StoreError};

/// `spec` with every secret emptied: what is stored in the clear.
pub fn without_secrets(spec: &DatastoreSpec) -> DatastoreSpec {
    let mut public = spec.clone();
    match &mut public.kind {
        DatastoreKind::AzureBlob { credentials, .. } => match credentials {
            BlobCredentials::None => {}
            BlobCredentials::AccountKey(s) | BlobCredentials::SasToken(s) => {
                *s = Secret(String::new())
            }
        },
        DatastoreKind::S3 { credentials, .. } => match credentials {
            S3Credentials::Environment => {}
            S3Credentials::AccessKey {
                secret_access_key, ..
            } => *secret_access_key = Secret(String::new()),
        },
        DatastoreKind::Local { .. } => {}
    }
    public
}

/// "no datastore named X (known: a, b, workspaceblobstore)".
pub fn unknown_datastore(name: &str, known: &BTreeSet<String>) -> String {
    let known: Vec<&str> = known.iter().map(String::as_str).collect();
    format!("no datastore named {name} (known: {})", known.join(", "))
}

/// The blobs a job's files name, each with the field that names it.
pub fn job_blobs(spec: &JobSpec) -> Vec<(String, BlobInfo)> {
    let Some(job) = spec.as_command() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(Code::Snapshot(b)) = &job.code {
        out.push(("code: snapshot".to_string(), *b));
    }
    if let Some(Code::Snapshot(b)) = job
        .environment
        .as_ref()
        .and_then(|e| e.build.as_ref())
        .map(|b| &b.context)
    {
        out.push(("environment.build: context".to_string(), *b));
    }
    for (name, input) in &job.inputs {
        if let Input::Blob { blob, .. } = input {
            out.push((format!("inputs.{name}: blob"), *blob));
        }
    }
    out
}

/// Every datastore a job's inputs and outputs name that is not `known`,
/// as field errors.
pub fn unknown_job_datastores(spec: &JobSpec, known: &BTreeSet<String>) -> Vec<String> {
    let Some(job) = spec.as_command() else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    for (name, input) in &job.inputs {
        if let Input::Datastore { at, .. } = input
            && !known.contains(&at.datastore)
        {
            errors.push(format!(
                "inputs.{name}: {}",
                unknown_datastore(&at.datastore, known)
            ));
        }
    }
    for (name, output) in &job.outputs {
        if let Some(at) = &output.datastore
            && !known.contains(&at.datastore)
        {
            errors.push(format!(
                "outputs.{name}: {}",
                unknown_datastore(&at.datastore, known)
            ));
        }
    }
    errors
}

/// The names of every datastore, the artifact store's included.
pub(super) fn known_datastores(s: &Store) -> Result<BTreeSet<String>, StoreError> {
    let mut known: BTreeSet<String> = s.datastores()?.into_iter().map(|d| d.public.name).collect();
    known.insert(WORKSPACE_DATASTORE.to_string());
    Ok(known)
}

fn datastore_error(e: DatastoreError) -> ControlError {
    match e {
        DatastoreError::NotFound { .. } => ControlError::NotFound(e.to_string()),
        DatastoreError::BadPath { .. } => ControlError::Invalid(e.to_string()),
        DatastoreError::Io { .. } | DatastoreError::Remote { .. } => {
            ControlError::Internal(drover_api::error::chain(&e))
        }
    }
}

impl ControlPlane {
    /// Refuses a job whose files name blobs that are not stored.
    pub(super) async fn check_job_blobs(&self, spec: &JobSpec) -> Result<(), ControlError> {
        let blobs = job_blobs(spec);
        if blobs.is_empty() {
            return Ok(());
        }
        let artifacts = self.artifacts()?;
        let mut errors = Vec::new();
        for (field, blob) in &blobs {
            match artifacts.stat(&blob.digest).await? {
                None => errors.push(format!(
                    "{field} {} is not stored; upload it first",
                    blob.digest
                )),
                Some(size) if size != blob.size => errors.push(format!(
                    "{field} {} is {size} bytes, not the {} the job says",
                    blob.digest, blob.size
                )),
                Some(_) => {}
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ControlError::Invalid(errors.join("; ")))
        }
    }

    fn artifact_store_info(&self) -> DatastoreInfo {
        DatastoreInfo {
            name: WORKSPACE_DATASTORE.to_string(),
            kind: "artifact_store".to_string(),
            location: self
                .artifacts
                .as_ref()
                .map(|a| a.location().to_string())
                .unwrap_or_default(),
            credentials: "none (the control plane's own)".to_string(),
            description: Some("the control plane's artifact store".to_string()),
            tags: Default::default(),
            is_default: true,
            created_at: Default::default(),
        }
    }

    fn secrets(&self) -> Result<&crate::secrets::Secrets, ControlError> {
        self.secrets
            .as_deref()
            .ok_or_else(|| ControlError::Invalid("this server keeps no datastore secrets".into()))
    }

    /// Registers a datastore, its secrets sealed.
    pub async fn create_datastore(
        &self,
        spec: DatastoreSpec,
    ) -> Result<DatastoreInfo, ControlError> {
        spec.validate().map_err(|errors| {
            ControlError::Invalid(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        let whole = serde_json::to_vec(&spec)
            .map_err(|e| ControlError::Invalid(format!("cannot encode the datastore: {e}")))?;
        let sealed = self.secrets()?.seal(&whole)?;
        let public = without_secrets(&spec);
        let at = now();
        let p = public.clone();
        self.with_store(move |s| s.add_datastore(&p, &sealed, at))
            .await?;
        tracing::info!(datastore = %public.name, kind = public.kind.type_name(), "datastore created");
        Ok(public.info(at))
    }

    /// Every datastore, the artifact store first.
    pub async fn datastores(&self) -> Result<DatastoreList, ControlError> {
        let stored = self.with_store(|s| s.datastores()).await?;
        let mut datastores = vec![self.artifact_store_info()];
        datastores.extend(stored.into_iter().map(|d| d.public.info(d.created_at)));
        Ok(DatastoreList { datastores })
    }

    async fn stored_datastore(
        &self,
        name: String,
    ) -> Result<crate::store::StoredDatastore, ControlError> {
        self.with_store(move |s| match s.datastore(&name) {
            Ok(d) => Ok(Ok(d)),
            Err(StoreError::NotFound { .. }) => {
                let known = known_datastores(s)?;
                Ok(Err(ControlError::NotFound(unknown_datastore(
                    &name, &known,
                ))))
            }
            Err(e) => Err(e),
        })
        .await?
    }

    /// One datastore, without its secrets.
    pub async fn datastore(&self, name: String) -> Result<DatastoreInfo, ControlError> {
        if name == WORKSPACE_DATASTORE {
            return Ok(self.artifact_store_info());
        }
        let d = self.stored_datastore(name).await?;
        Ok(d.public.info(d.created_at))
    }

    /// Removes a datastore (not its data).
    pub async fn delete_datastore(&self, name: String) -> Result<(), ControlError> {
        if name == WORKSPACE_DATASTORE {
            return Err(ControlError::Invalid(format!(
                "{WORKSPACE_DATASTORE} is the control plane's artifact store; it cannot be deleted"
            )));
        }
        self.stored_datastore(name.clone()).await?;
        let n = name.clone();
        self.with_store(move |s| s.remove_datastore(&n)).await?;
        tracing::info!(datastore = %name, "datastore deleted");
        Ok(())
    }

    /// The storage of a datastore, its secrets opened.
    pub(super) async fn open_datastore(&self, name: &str) -> Result<Datastore, ControlError> {
        if name == WORKSPACE_DATASTORE {
            return Err(ControlError::Invalid(format!(
                "{WORKSPACE_DATASTORE} is the artifact store, which holds blobs by digest, not paths"
            )));
        }
        let stored = self.stored_datastore(name.to_string()).await?;
        let whole = self.secrets()?.unseal(&stored.sealed)?;
        let spec: DatastoreSpec = serde_json::from_slice(&whole).map_err(|e| {
            ControlError::Internal(format!("datastore {name} does not decode: {e}"))
        })?;
        Datastore::of(&spec).map_err(datastore_error)
    }

    /// The files under `path` of a datastore, for an agent.
    pub async fn list_datastore(
        &self,
        name: String,
        path: String,
    ) -> Result<DataListing, ControlError> {
        let ds = self.open_datastore(&name).await?;
        let entries: Vec<DataEntry> = ds.list(&path).await.map_err(datastore_error)?;
        Ok(DataListing {
            datastore: name,
            path,
            entries,
        })
    }

    /// One file of a datastore, for an agent: size, version, bytes.
    pub async fn datastore_file(
        &self,
        name: String,
        path: String,
    ) -> Result<(u64, String, crate::artifacts::BlobStream), ControlError> {
        let ds = self.open_datastore(&name).await?;
        ds.open(&path).await.map_err(datastore_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_emptied_and_unknown_names_listed() {
        let spec = DatastoreSpec {
            name: "s".into(),
            description: None,
            tags: Default::default(),
            kind: DatastoreKind::S3 {
                bucket: "b".into(),
                prefix: String::new(),
                endpoint_url: None,
                region: None,
                credentials: S3Credentials::AccessKey {
                    access_key_id: "id".into(),
                    secret_access_key: Secret("hunter2".into()),
                },
            },
        };
        let public = serde_json::to_string(&without_secrets(&spec)).unwrap();
        assert!(!public.contains("hunter2"), "{public}");
        assert!(public.contains("access_key"), "{public}");
        let known: BTreeSet<String> =
            ["workspaceblobstore".to_string(), "shared_data".to_string()].into();
        assert_eq!(
            unknown_datastore("nosuch", &known),
            "no datastore named nosuch (known: shared_data, workspaceblobstore)"
        );
    }
}
