//! Datastores: named places jobs read inputs from and write outputs to
//! (`azureml://datastores/NAME/paths/PATH`), read from Azure ML's datastore
//! YAML (`type: azure_blob`) and Drover's own `type: s3` and `type: local`.
//!
//! The control plane keeps a datastore's secrets encrypted and never
//! answers them back: [`DatastoreInfo`] says which kind of credential it
//! holds, never the credential. [`Secret`]'s `Debug` hides its value so a
//! secret cannot reach a log line by accident.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use marked_yaml::Node;
use serde::{Deserialize, Serialize};

use crate::cluster::Timestamp;
use crate::error::FieldError;
use crate::files::WORKSPACE_DATASTORE;
use crate::job::is_valid_datastore_name;
use crate::yaml::{
    Diagnostic, InvalidDefinition, Reader, SetOverride, is_null, join, parse_mapping_with,
};

/// A secret value (an account key, a SAS token, a secret access key). Sent
/// once, from the CLI to the control plane, which stores it encrypted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A datastore definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreSpec {
    /// Its name, as in `azureml://datastores/NAME/…`.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Free-form tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Where its data is.
    #[serde(flatten)]
    pub kind: DatastoreKind,
}

/// Where a datastore's data is, by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DatastoreKind {
    /// An Azure Blob Storage container.
    AzureBlob {
        /// The storage account.
        account_name: String,
        /// The container.
        container_name: String,
        /// The storage endpoint suffix (`core.windows.net`).
        #[serde(default = "default_endpoint")]
        endpoint: String,
        /// `https` (the default) or `http`.
        #[serde(default = "default_protocol")]
        protocol: String,
        /// How to sign in.
        #[serde(default)]
        credentials: BlobCredentials,
    },
    /// An S3 bucket, or a prefix in one (any S3-compatible service).
    S3 {
        /// The bucket.
        bucket: String,
        /// A prefix inside it; the datastore's paths are under it.
        #[serde(default)]
        prefix: String,
        /// The service's URL, for services other than AWS (`http://127.0.0.1:9000`).
        #[serde(default)]
        endpoint_url: Option<String>,
        /// The region (`us-east-1` when not given).
        #[serde(default)]
        region: Option<String>,
        /// How to sign in.
        #[serde(default)]
        credentials: S3Credentials,
    },
    /// A folder on the control plane's machine.
    Local {
        /// Its absolute path.
        path: PathBuf,
    },
}

fn default_endpoint() -> String {
    "core.windows.net".to_string()
}

fn default_protocol() -> String {
    "https".to_string()
}

/// How to sign in to an Azure Blob container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobCredentials {
    /// None given: the control plane's own identity (`AZURE_*` variables of
    /// its environment, or its managed identity), or anonymous access.
    #[default]
    None,
    /// A storage account key.
    AccountKey(Secret),
    /// A shared access signature.
    SasToken(Secret),
}

/// How to sign in to an S3 bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum S3Credentials {
    /// None given: the control plane's environment (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, …), by reference.
    #[default]
    Environment,
    /// An access key.
    AccessKey {
        /// The key's id.
        access_key_id: String,
        /// Its secret.
        secret_access_key: Secret,
    },
}

impl DatastoreKind {
    /// `type:` as in YAML.
    pub fn type_name(&self) -> &'static str {
        match self {
            DatastoreKind::AzureBlob { .. } => "azure_blob",
            DatastoreKind::S3 { .. } => "s3",
            DatastoreKind::Local { .. } => "local",
        }
    }

    /// Where the data is, as a person reads it (no secrets).
    pub fn location(&self) -> String {
        match self {
            DatastoreKind::AzureBlob {
                account_name,
                container_name,
                endpoint,
                protocol,
                ..
            } => format!("{protocol}://{account_name}.blob.{endpoint}/{container_name}"),
            DatastoreKind::S3 {
                bucket,
                prefix,
                endpoint_url,
                ..
            } => {
                let at = match endpoint_url {
                    Some(e) => format!(" at {e}"),
                    None => String::new(),
                };
                if prefix.is_empty() {
                    format!("s3://{bucket}{at}")
                } else {
                    format!("s3://{bucket}/{prefix}{at}")
                }
            }
            DatastoreKind::Local { path } => path.display().to_string(),
        }
    }

    /// Which kind of credential it holds (never the credential).
    pub fn credential_kind(&self) -> &'static str {
        match self {
            DatastoreKind::AzureBlob { credentials, .. } => match credentials {
                BlobCredentials::None => "none (the control plane's identity)",
                BlobCredentials::AccountKey(_) => "account_key (stored encrypted)",
                BlobCredentials::SasToken(_) => "sas_token (stored encrypted)",
            },
            DatastoreKind::S3 { credentials, .. } => match credentials {
                S3Credentials::Environment => "the control plane's environment (AWS_*)",
                S3Credentials::AccessKey { .. } => "access_key (stored encrypted)",
            },
            DatastoreKind::Local { .. } => "none (a folder of the control plane's machine)",
        }
    }
}

/// A datastore as the control plane shows it: everything but its secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreInfo {
    /// Its name.
    pub name: String,
    /// `azure_blob`, `s3` or `local`; `artifact_store` for [`WORKSPACE_DATASTORE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Where its data is.
    pub location: String,
    /// Which kind of credential it holds.
    pub credentials: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Free-form tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// True for [`WORKSPACE_DATASTORE`], which is always there and cannot be deleted.
    #[serde(default)]
    pub is_default: bool,
    /// When it was created (0 for the default).
    #[serde(default)]
    pub created_at: Timestamp,
}

/// `POST /v1/datastores`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreCreate {
    /// The definition.
    pub spec: DatastoreSpec,
}

/// `GET /v1/datastores`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreList {
    /// Every datastore, the default first.
    pub datastores: Vec<DatastoreInfo>,
}

impl DatastoreSpec {
    /// What the control plane shows of it.
    pub fn info(&self, created_at: Timestamp) -> DatastoreInfo {
        DatastoreInfo {
            name: self.name.clone(),
            kind: self.kind.type_name().to_string(),
            location: self.kind.location(),
            credentials: self.kind.credential_kind().to_string(),
            description: self.description.clone(),
            tags: self.tags.clone(),
            is_default: false,
            created_at,
        }
    }

    /// The rules every datastore meets, at every door: its name, a bucket,
    /// account and container that can be named, an absolute local path,
    /// secrets and URLs of sane sizes. Each problem names its field.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut push = |field: &str, message: String| errors.push(FieldError::new(field, message));
        if !is_valid_datastore_name(&self.name) {
            push(
                "name",
                format!(
                    "`{}` is not a datastore name (letters, digits and `_`, starting with a letter, at most 255)",
                    self.name
                ),
            );
        } else if self.name.eq_ignore_ascii_case(WORKSPACE_DATASTORE) {
            push(
                "name",
                format!("{WORKSPACE_DATASTORE} is the control plane's own artifact store"),
            );
        }
        let short = |field: &str, v: &str, max: usize, push: &mut dyn FnMut(&str, String)| {
            if v.len() > max {
                push(field, format!("is {} bytes long, at most {max}", v.len()));
            }
            if v.contains('\0') {
                push(field, "holds a NUL byte".to_string());
            }
        };
        if let Some(d) = &self.description {
            short("description", d, 64 * 1024, &mut push);
        }
        match &self.kind {
            DatastoreKind::AzureBlob {
                account_name,
                container_name,
                endpoint,
                protocol,
                credentials,
            } => {
                // Azure's own rules: accounts 3–24 lowercase letters and
                // digits; containers 3–63 of lowercase letters, digits, `-`.
                if !(3..=24).contains(&account_name.len())
                    || !account_name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                {
                    push(
                        "account_name",
                        format!(
                            "`{account_name}` is not a storage account name (3 to 24 lowercase letters and digits)"
                        ),
                    );
                }
                if !(3..=63).contains(&container_name.len())
                    || !container_name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    || container_name.starts_with('-')
                {
                    push(
                        "container_name",
                        format!(
                            "`{container_name}` is not a container name (3 to 63 lowercase letters, digits and `-`)"
                        ),
                    );
                }
                if endpoint.is_empty()
                    || !endpoint
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
                {
                    push(
                        "endpoint",
                        format!("`{endpoint}` is not a storage endpoint (core.windows.net)"),
                    );
                }
                if protocol != "https" && protocol != "http" {
                    push(
                        "protocol",
                        format!("expected https or http, got {protocol}"),
                    );
                }
                match credentials {
                    BlobCredentials::AccountKey(s) => {
                        short("credentials.account_key", &s.0, 4096, &mut push)
                    }
                    BlobCredentials::SasToken(s) => {
                        short("credentials.sas_token", &s.0, 16 * 1024, &mut push)
                    }
                    BlobCredentials::None => {}
                }
            }
            DatastoreKind::S3 {
                bucket,
                prefix,
                endpoint_url,
                region,
                credentials,
            } => {
                // S3's bucket rule: 3–63 of lowercase letters, digits, `.`, `-`.
                if !(3..=63).contains(&bucket.len())
                    || !bucket.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-'
                    })
                {
                    push(
                        "bucket",
                        format!(
                            "`{bucket}` is not a bucket name (3 to 63 lowercase letters, digits, `.` and `-`)"
                        ),
                    );
                }
                if !prefix.is_empty()
                    && let Err(e) = crate::files::check_relative_path(prefix)
                {
                    push("prefix", e);
                }
                if let Some(e) = endpoint_url
                    && !(e.starts_with("http://") || e.starts_with("https://"))
                {
                    push(
                        "endpoint_url",
                        format!("`{e}` is not an http:// or https:// URL"),
                    );
                }
                if let Some(e) = endpoint_url {
                    short("endpoint_url", e, 2048, &mut push);
                }
                if let Some(r) = region {
                    short("region", r, 64, &mut push);
                }
                if let S3Credentials::AccessKey {
                    access_key_id,
                    secret_access_key,
                } = credentials
                {
                    short("credentials.access_key_id", access_key_id, 256, &mut push);
                    short(
                        "credentials.secret_access_key",
                        &secret_access_key.0,
                        4096,
                        &mut push,
                    );
                }
            }
            DatastoreKind::Local { path } => {
                if !path.is_absolute() {
                    push(
                        "path",
                        format!("`{}` is not an absolute path", path.display()),
                    );
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Reads a datastore's YAML (Azure ML's `azure_blob` schema, or Drover's
    /// `s3` and `local`), then checks it with [`DatastoreSpec::validate`].
    pub fn from_yaml(file: &str, text: &str) -> Result<ParsedDatastore, InvalidDefinition> {
        DatastoreSpec::from_yaml_with(file, text, &[])
    }

    /// [`DatastoreSpec::from_yaml`] with `--set KEY=VALUE` overrides applied first.
    pub fn from_yaml_with(
        file: &str,
        text: &str,
        sets: &[SetOverride],
    ) -> Result<ParsedDatastore, InvalidDefinition> {
        let root = parse_mapping_with(file, text, sets)?;
        let mut r = Reader::new(file);
        let spec = read_datastore(&mut r, &root);
        if let Some(spec) = &spec
            && let Err(errors) = spec.validate()
        {
            for e in errors {
                let line = field_line(&root, &e.field);
                r.error_at(line, &e.field, e.message);
            }
        }
        r.errors.sort_by_key(|d| d.line);
        let (spec, warnings) = r.finish(spec)?;
        match spec {
            Some(spec) => Ok(ParsedDatastore { spec, warnings }),
            None => Err(InvalidDefinition { errors: vec![] }),
        }
    }
}

/// A datastore read from YAML, with the warnings its file produced.
#[derive(Debug, Clone)]
pub struct ParsedDatastore {
    /// The datastore.
    pub spec: DatastoreSpec,
    /// Unknown or unsupported keys, each with file and line.
    pub warnings: Vec<Diagnostic>,
}

/// The line of a dotted field in the document (0 when it is not there).
fn field_line(root: &Node, field: &str) -> usize {
    let mut node = root;
    for key in field.split('.') {
        match node.as_mapping().and_then(|m| m.get_node(key)) {
            Some(n) => node = n,
            None => break,
        }
    }
    crate::yaml::line_of(node)
}

const TOP_KEYS: &[&str] = &[
    "$schema",
    "name",
    "type",
    "description",
    "tags",
    "account_name",
    "container_name",
    "endpoint",
    "protocol",
    "credentials",
    "bucket",
    "prefix",
    "endpoint_url",
    "region",
    "path",
];

fn read_datastore(r: &mut Reader, root: &Node) -> Option<DatastoreSpec> {
    let top = r.mapping(root, "", TOP_KEYS)?;
    let get = |k: &str| top.get_node(k).filter(|n| !is_null(n));
    let name = match top.get_node("name") {
        Some(n) => r.non_empty(n, "name").map(|s| s.trim().to_string()),
        None => {
            r.error_at(0, "name", "is required");
            None
        }
    };
    let description = get("description").and_then(|n| r.string(n, "description"));
    let tags = get("tags")
        .map(|n| r.string_map(n, "tags"))
        .unwrap_or_default();
    let required = |r: &mut Reader, key: &str, why: &str| match get(key) {
        Some(n) => r.non_empty(n, key).map(|s| s.trim().to_string()),
        None => {
            r.error_at(0, key, format!("is required ({why})"));
            None
        }
    };
    let kind = match get("type") {
        None => {
            r.error_at(0, "type", "is required (azure_blob, s3 or local)");
            None
        }
        Some(t) => match r.string(t, "type").as_deref() {
            Some("azure_blob") => {
                let account_name = required(r, "account_name", "the storage account");
                let container_name = required(r, "container_name", "the blob container");
                let endpoint = get("endpoint")
                    .and_then(|n| r.non_empty(n, "endpoint"))
                    .unwrap_or_else(default_endpoint);
                let protocol = get("protocol")
                    .and_then(|n| r.non_empty(n, "protocol"))
                    .unwrap_or_else(default_protocol);
                let credentials = match get("credentials") {
                    None => Some(BlobCredentials::None),
                    Some(c) => read_blob_credentials(r, c),
                };
                Some(DatastoreKind::AzureBlob {
                    account_name: account_name?,
                    container_name: container_name?,
                    endpoint,
                    protocol,
                    credentials: credentials?,
                })
            }
            Some("s3") => {
                let bucket = required(r, "bucket", "the bucket");
                let prefix = get("prefix")
                    .and_then(|n| r.string(n, "prefix"))
                    .map(|p| p.trim_matches('/').to_string())
                    .unwrap_or_default();
                let endpoint_url = get("endpoint_url").and_then(|n| r.non_empty(n, "endpoint_url"));
                let region = get("region").and_then(|n| r.non_empty(n, "region"));
                let credentials = match get("credentials") {
                    None => Some(S3Credentials::Environment),
                    Some(c) => read_s3_credentials(r, c),
                };
                Some(DatastoreKind::S3 {
                    bucket: bucket?,
                    prefix,
                    endpoint_url,
                    region,
                    credentials: credentials?,
                })
            }
            Some("local") => {
                required(r, "path", "a folder on the control plane's machine").map(|p| {
                    DatastoreKind::Local {
                        path: PathBuf::from(p),
                    }
                })
            }
            Some(
                other @ ("azure_file"
                | "azure_data_lake_gen1"
                | "azure_data_lake_gen2"
                | "one_lake"),
            ) => {
                r.error(
                    t,
                    "type",
                    format!("{other} datastores are not supported; use azure_blob, s3 or local"),
                );
                None
            }
            Some(other) => {
                r.error(
                    t,
                    "type",
                    format!("expected azure_blob, s3 or local, got {other}"),
                );
                None
            }
            None => None,
        },
    };
    Some(DatastoreSpec {
        name: name?,
        description,
        tags,
        kind: kind?,
    })
}

fn read_blob_credentials(r: &mut Reader, n: &Node) -> Option<BlobCredentials> {
    let m = r.mapping(n, "credentials", &["account_key", "sas_token"])?;
    let key = m.get_node("account_key").filter(|n| !is_null(n));
    let sas = m.get_node("sas_token").filter(|n| !is_null(n));
    match (key, sas) {
        (Some(_), Some(s)) => {
            r.error(s, "credentials", "give account_key or sas_token, not both");
            None
        }
        (Some(k), None) => r
            .non_empty(k, "credentials.account_key")
            .map(|v| BlobCredentials::AccountKey(Secret(v))),
        (None, Some(s)) => r
            .non_empty(s, "credentials.sas_token")
            .map(|v| BlobCredentials::SasToken(Secret(v.trim_start_matches('?').to_string()))),
        (None, None) => Some(BlobCredentials::None),
    }
}

fn read_s3_credentials(r: &mut Reader, n: &Node) -> Option<S3Credentials> {
    let m = r.mapping(n, "credentials", &["access_key_id", "secret_access_key"])?;
    let id = m.get_node("access_key_id").filter(|n| !is_null(n));
    let secret = m.get_node("secret_access_key").filter(|n| !is_null(n));
    match (id, secret) {
        (Some(i), Some(s)) => {
            let id = r.non_empty(i, "credentials.access_key_id");
            let secret = r.non_empty(s, "credentials.secret_access_key");
            Some(S3Credentials::AccessKey {
                access_key_id: id?,
                secret_access_key: Secret(secret?),
            })
        }
        (None, None) => Some(S3Credentials::Environment),
        (Some(_), None) => {
            r.error(
                n,
                &join("credentials", "secret_access_key"),
                "is required with access_key_id",
            );
            None
        }
        (None, Some(_)) => {
            r.error(
                n,
                &join("credentials", "access_key_id"),
                "is required with secret_access_key",
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microsofts_blob_datastore_yaml_reads() {
        // As in Azure ML's docs (reference-yaml-datastore-blob).
        let text = "$schema: https://azuremlschemas.azureedge.net/latest/azureBlob.schema.json\nname: blob_example\ntype: azure_blob\ndescription: Datastore pointing to a blob container.\naccount_name: mytestblobstore\ncontainer_name: data-container\ncredentials:\n  account_key: XXXxxxXXXxXXXXxxXXXXXxXXXXXxXxxXxXXXxXXXxXXxxxXXxxXXXxXxXXXxxXxxXXXXxxxxxXXxxxxxxXXXxXXX\n";
        let d = DatastoreSpec::from_yaml("blob.yml", text).unwrap();
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        assert_eq!(d.spec.name, "blob_example");
        assert!(matches!(
            &d.spec.kind,
            DatastoreKind::AzureBlob { account_name, container_name, endpoint, credentials: BlobCredentials::AccountKey(_), .. }
                if account_name == "mytestblobstore" && container_name == "data-container" && endpoint == "core.windows.net"
        ));
        assert_eq!(
            d.spec.kind.location(),
            "https://mytestblobstore.blob.core.windows.net/data-container"
        );
        // The secret never reaches Debug output.
        assert!(!format!("{:?}", d.spec).contains("XXXxxx"));
        // Its JSON round-trips (it travels once, to the control plane).
        let json = serde_json::to_string(&d.spec).unwrap();
        assert_eq!(
            serde_json::from_str::<DatastoreSpec>(&json).unwrap(),
            d.spec
        );
    }

    #[test]
    fn s3_and_local_datastores_read() {
        let s3 = DatastoreSpec::from_yaml(
            "s3.yml",
            "name: raw_data\ntype: s3\nbucket: my-bucket\nprefix: /team/a/\nendpoint_url: http://127.0.0.1:9000\ncredentials:\n  access_key_id: AKIA\n  secret_access_key: shh\n",
        )
        .unwrap();
        assert!(matches!(
            &s3.spec.kind,
            DatastoreKind::S3 { bucket, prefix, credentials: S3Credentials::AccessKey { .. }, .. }
                if bucket == "my-bucket" && prefix == "team/a"
        ));
        assert_eq!(
            s3.spec.kind.location(),
            "s3://my-bucket/team/a at http://127.0.0.1:9000"
        );
        let local =
            DatastoreSpec::from_yaml("l.yml", "name: shared\ntype: local\npath: /srv/data\n")
                .unwrap();
        assert_eq!(
            local.spec.kind,
            DatastoreKind::Local {
                path: "/srv/data".into()
            }
        );
    }

    #[test]
    fn bad_datastores_say_what_is_wrong_and_where() {
        let e = DatastoreSpec::from_yaml(
            "d.yml",
            "name: 9bad\ntype: azure_blob\naccount_name: Not_Valid\ncontainer_name: ok-container\ncredentials:\n  account_key: a\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("d.yml:1: name: `9bad` is not a datastore name"),
            "{e}"
        );
        assert!(e.contains("d.yml:3: account_name: `Not_Valid`"), "{e}");
        let e = DatastoreSpec::from_yaml(
            "d.yml",
            "name: a\ntype: azure_blob\naccount_name: acct\ncontainer_name: ok-container\ncredentials:\n  account_key: a\n  sas_token: b\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("d.yml:7: credentials: give account_key or sas_token, not both"),
            "{e}"
        );
        let e = DatastoreSpec::from_yaml("d.yml", "name: a\ntype: azure_file\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("d.yml:2: type: azure_file datastores are not supported"),
            "{e}"
        );
        let e = DatastoreSpec::from_yaml(
            "d.yml",
            "name: workspaceblobstore\ntype: local\npath: rel\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("the control plane's own artifact store"), "{e}");
        assert!(
            e.contains("d.yml:3: path: `rel` is not an absolute path"),
            "{e}"
        );
        let e = DatastoreSpec::from_yaml("d.yml", "name: a\ntype: s3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bucket: is required"), "{e}");
    }
}
