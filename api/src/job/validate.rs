//! The rules every job meets, whichever door it came through: the YAML
//! reader, `drover run`, the server on every submission, and the agent
//! before it starts a part. Messages name the field as it is spelled in the
//! job's JSON (`resources.docker_args.memory`); the YAML reader maps them to
//! the file's lines and keys.
//!
//! Every number and string that reaches the container engine, the kernel
//! (argument and environment sizes) or drover-init's fork loop is bounded
//! here, so that a bad value is refused with Drover's words at submission
//! rather than with the engine's (often misleading) ones on a node.

use std::fmt;
use std::path::Path;

use super::placeholders::substitute;
use super::{
    Code, CommandJob, DatastorePath, DistributionKind, Input, JobIdentity, JobSpec, PathKind,
    RESERVED_DIR, RegistryCredentials, SecretSource, is_plain_file_name, is_valid_datastore_name,
};
use crate::compute::{Identity, is_valid_compute_name, is_valid_vm_size};
use crate::docker_args::{MAX_ENTRIES, check_bytes, is_valid_env_name};
use crate::error::{FieldError, write_lines};
use crate::files::{DEFAULT_OUTPUT, MAX_CODE_BYTES, check_relative_path};

/// The most nodes one job may span (also the largest `max_instances`).
pub const MAX_INSTANCES: u32 = crate::compute::MAX_NODES;
/// The most processes drover-init starts on one node.
pub const MAX_PROCESSES_PER_INSTANCE: u32 = 1024;
/// The most GPUs a job may ask for per node.
pub const MAX_GPUS_PER_INSTANCE: u32 = 64;
/// The longest `command`, resolved: one argument of `sh -c`, which Linux
/// caps at 32 pages (`MAX_ARG_STRLEN`, 131072 bytes with its NUL).
pub const MAX_COMMAND_BYTES: usize = 128 * 1024 - 1;
/// The most bytes of `NAME=VALUE` environment a job may set in all; with
/// the command and Drover's own variables this stays under the kernel's
/// 2 MiB for arguments and environment together.
pub const MAX_ENV_BYTES: usize = 1024 * 1024;
/// The longest `limits.timeout`: a year.
pub const MAX_TIMEOUT_SECONDS: u64 = 365 * 86_400;
/// The largest job, as JSON: what one request to the server may carry,
/// less room for the request around it.
pub const MAX_JOB_BYTES: usize = crate::wire::MAX_REQUEST_BYTES - 64 * 1024;
/// The most inputs, outputs, mounts, tags or environment variables.
const MAX_NAMED: usize = 1024;

/// A job that could not be accepted: every problem found, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidJob {
    /// All problems, in field order.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for InvalidJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_lines(f, &self.errors)
    }
}

/// True for names Azure ML and Docker both accept: `[A-Za-z0-9][A-Za-z0-9_-]*`, ≤ 255.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name.len() <= 255
}

/// Input and output names: letters, digits, `_` and `-`.
fn is_valid_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A host path that becomes the source of a bind: absolute, and without the
/// `:` and `,` that separate the parts of Docker's bind syntax.
/// The longest URL an input may have.
pub const MAX_URL_BYTES: usize = 8 * 1024;

/// An input URL: `http://` or `https://`, a host, at most [`MAX_URL_BYTES`],
/// no whitespace or control characters.
fn check_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_URL_BYTES {
        return Err(format!(
            "the URL is {} bytes long, at most {MAX_URL_BYTES}",
            url.len()
        ));
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("`{url}` is not an http:// or https:// URL"))?;
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the URL holds whitespace or control characters".to_string());
    }
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit('@').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err(format!("`{url}` has no host"));
    }
    Ok(())
}

fn check_datastore_path(at: &DatastorePath) -> Result<(), String> {
    if !is_valid_datastore_name(&at.datastore) {
        return Err(format!(
            "`{}` is not a datastore name (letters, digits and `_`, starting with a letter)",
            at.datastore
        ));
    }
    if !at.path.is_empty() {
        check_relative_path(&at.path)?;
    }
    Ok(())
}

fn check_bind_source(path: &Path) -> Result<(), String> {
    let text = path.to_string_lossy();
    if !path.is_absolute() {
        return Err(format!("expected an absolute path, got {text}"));
    }
    if text.contains(':') || text.contains(',') {
        return Err(format!(
            "{text}: a host path to mount may not contain `:` or `,`"
        ));
    }
    if text.len() > 4096 {
        return Err("the path is longer than 4096 bytes".to_string());
    }
    Ok(())
}

/// A container path that is a mount target.
fn check_target(target: &str) -> Result<(), String> {
    if !target.starts_with('/') || target == "/" {
        return Err(format!(
            "the target must be an absolute path other than /, got {target}"
        ));
    }
    if target == RESERVED_DIR || target.starts_with("/drover/") {
        return Err(format!("{target} is reserved for Drover"));
    }
    if target.contains(':') || target.contains(',') || target.len() > 4096 {
        return Err(format!(
            "{target}: a mount target may not contain `:` or `,`"
        ));
    }
    Ok(())
}

fn check_len(field: &str, text: &str, max: usize, errors: &mut Vec<FieldError>) {
    if text.len() > max {
        errors.push(FieldError::new(
            field,
            format!("is {} bytes long, at most {max} are allowed", text.len()),
        ));
    }
}

impl JobSpec {
    /// Every problem with this job, or `Ok` when it meets every rule.
    pub fn validate(&self) -> Result<(), InvalidJob> {
        let mut errors = Vec::new();
        match self {
            JobSpec::Command(c) => c.check(&mut errors),
        }
        match serde_json::to_vec(self) {
            Ok(json) if json.len() > MAX_JOB_BYTES => errors.push(FieldError::new(
                "",
                format!(
                    "the job is {} as JSON; a job may be at most {} (the server accepts requests of at most {})",
                    crate::docker_args::human_bytes(json.len() as u64),
                    crate::docker_args::human_bytes(MAX_JOB_BYTES as u64),
                    crate::docker_args::human_bytes(crate::wire::MAX_REQUEST_BYTES as u64)
                ),
            )),
            _ => {}
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(InvalidJob { errors })
        }
    }
}

impl CommandJob {
    /// Appends every problem of this command job to `errors`.
    fn check(&self, errors: &mut Vec<FieldError>) {
        let mut push = |field: &str, message: String| errors.push(FieldError::new(field, message));

        if let Some(name) = &self.name
            && !is_valid_name(name)
        {
            push(
                "name",
                format!(
                    "`{name}` is not a valid job name (letters, digits, `-` and `_`, starting with a letter or digit)"
                ),
            );
        }
        if self.command.trim().is_empty() {
            push("command", "is required".to_string());
        } else {
            match substitute(&self.command, &|kind, name| {
                self.placeholder_value(kind, name)
            }) {
                Err(e) => push("command", e),
                Ok(resolved) if resolved.len() > MAX_COMMAND_BYTES => push(
                    "command",
                    format!(
                        "is {} bytes long with its inputs substituted; a command may be at most {MAX_COMMAND_BYTES} bytes (one argument to sh -c); put long scripts in a file under code",
                        resolved.len()
                    ),
                ),
                Ok(_) => {}
            }
        }
        let unresolved = self
            .environment
            .as_ref()
            .is_some_and(|e| e.name.is_some() || e.build.is_some());
        if let Some(env) = &self.environment {
            if let Some(b) = &env.build {
                for e in b.check("environment.build") {
                    push(&e.field, e.message);
                }
            }
            if let Some(n) = &env.name
                && let Err(e) = crate::environment::check_name(n)
            {
                push("environment", e);
            }
            if let Some(v) = &env.version
                && let Err(e) = crate::environment::check_version(v)
            {
                push("environment", e);
            }
            if env.name.is_none() && env.build.is_none() {
                push(
                    "environment",
                    "names no registered environment and no build".to_string(),
                );
            }
        }
        if self.image.trim().is_empty() {
            // A registered or inline environment gets its image from the
            // control plane; everything else needs one now.
            if !unresolved {
                push(
                    "image",
                    "is required (environment: {image: REPO:TAG})".to_string(),
                );
            }
        } else if let Err(e) = check_image_reference(&self.image) {
            push("image", e);
        } else if self.image.len() > 1024 {
            push("image", "is longer than 1024 bytes".to_string());
        }
        if let Some(c) = &self.compute
            && !is_valid_compute_name(c)
        {
            push(
                "compute",
                format!("expected a cluster name or azureml:NAME, got {c}"),
            );
        }

        let mut env_bytes = 0usize;
        for name in self.environment_variables.keys() {
            if !is_valid_env_name(name) {
                push(
                    &format!("environment_variables.{name}"),
                    format!("`{name}` is not a valid environment variable name"),
                );
            }
        }
        for (k, v) in &self.environment_variables {
            env_bytes += k.len() + v.len() + 2;
        }
        for (k, v) in &self.resources.docker_args.env {
            env_bytes += k.len() + v.len() + 2;
        }
        if env_bytes > MAX_ENV_BYTES {
            push(
                "environment_variables",
                format!(
                    "the job's environment is {env_bytes} bytes; at most {MAX_ENV_BYTES} are allowed (pass large data as an input)"
                ),
            );
        }
        for (field, count) in [
            ("environment_variables", self.environment_variables.len()),
            ("tags", self.tags.len()),
            ("inputs", self.inputs.len()),
            ("outputs", self.outputs.len()),
        ] {
            if count > MAX_NAMED {
                push(field, format!("at most {MAX_NAMED} entries, got {count}"));
            }
        }
        if self.tags.keys().any(|k| k.trim().is_empty()) {
            push("tags", "tag names must not be empty".to_string());
        }
        match &self.code {
            Some(Code::Local(code)) => {
                if let Err(e) = check_bind_source(code) {
                    push("code", e);
                }
            }
            Some(Code::Snapshot(blob)) if blob.size > MAX_CODE_BYTES => push(
                "code",
                format!(
                    "the snapshot is {} bytes; code may be at most {MAX_CODE_BYTES} bytes (300 MB, as on Azure ML): list large files in .amlignore and pass data as inputs",
                    blob.size
                ),
            ),
            _ => {}
        }

        let res = &self.resources;
        if !(1..=MAX_INSTANCES).contains(&res.instance_count) {
            push(
                "resources.instance_count",
                format!(
                    "must be between 1 and {MAX_INSTANCES}, got {}",
                    res.instance_count
                ),
            );
        }
        if let Some(t) = &res.instance_type
            && !is_valid_vm_size(t)
        {
            push(
                "resources.instance_type",
                format!(
                    "`{t}` is not a valid vm size (letters, digits and `_`, like STANDARD_D3_V2)"
                ),
            );
        }
        if let Some(s) = res.shm_size
            && let Err(e) = check_bytes("shm_size", s, 1)
        {
            push(
                "resources.shm_size",
                e.trim_start_matches("shm_size: ").to_string(),
            );
        }
        if let Some(d) = &self.distribution
            && !(1..=MAX_PROCESSES_PER_INSTANCE).contains(&d.process_count_per_instance)
        {
            push(
                "distribution.process_count_per_instance",
                format!(
                    "must be between 1 and {MAX_PROCESSES_PER_INSTANCE}, got {}",
                    d.process_count_per_instance
                ),
            );
        }
        if let Some(d) = &self.distribution
            && d.kind == DistributionKind::Tensorflow
        {
            let nodes = res.instance_count.max(1);
            let (workers, ps) = d.tensorflow_tasks(nodes);
            let tasks = u64::from(workers) + u64::from(ps);
            if tasks != u64::from(d.process_count_per_instance) * u64::from(nodes) {
                push(
                    "distribution.worker_count",
                    format!(
                        "worker_count + parameter_server_count ({workers} + {ps}) must be a multiple of resources.instance_count ({nodes}): each node runs the same number of TensorFlow tasks"
                    ),
                );
            }
        }
        if let Some(t) = self.timeout_seconds
            && !(1..=MAX_TIMEOUT_SECONDS).contains(&t)
        {
            push(
                "limits.timeout",
                format!(
                    "must be between 1 second and {MAX_TIMEOUT_SECONDS} seconds (a year), got {t}"
                ),
            );
        }

        for (name, input) in &self.inputs {
            let field = format!("inputs.{name}");
            if !is_valid_port_name(name) {
                push(&field, "names are letters, digits, `_` and `-`".to_string());
                continue;
            }
            match input {
                Input::Literal { value } if value.len() > MAX_COMMAND_BYTES => push(
                    &field,
                    format!(
                        "the value is {} bytes, at most {MAX_COMMAND_BYTES}",
                        value.len()
                    ),
                ),
                Input::Literal { .. } => {}
                Input::Path { path, .. } => {
                    if let Err(e) = check_bind_source(path) {
                        push(&format!("{field}.path"), e);
                    }
                }
                Input::Blob {
                    path_kind,
                    file_name,
                    ..
                } => match (path_kind, file_name) {
                    (_, Some(f)) if !is_plain_file_name(f) => push(
                        &format!("{field}.file_name"),
                        format!("`{f}` is not a file name (one path component)"),
                    ),
                    (PathKind::UriFolder, Some(_)) => push(
                        &format!("{field}.file_name"),
                        "a folder input has no file name".to_string(),
                    ),
                    _ => {}
                },
                Input::Url { path_kind, url, .. } => {
                    if let Err(e) = check_url(url) {
                        push(&format!("{field}.path"), e);
                    } else if *path_kind == PathKind::UriFolder {
                        push(
                            &format!("{field}.type"),
                            format!(
                                "`{url}` is a URL: a URL input is a file (type: uri_file); folders come from local paths or datastores"
                            ),
                        );
                    }
                }
                Input::Datastore { at, .. } => {
                    if let Err(e) = check_datastore_path(at) {
                        push(&format!("{field}.path"), e);
                    }
                }
            }
        }
        for (name, output) in &self.outputs {
            let field = format!("outputs.{name}");
            if !is_valid_port_name(name) {
                push(&field, "names are letters, digits, `_` and `-`".to_string());
                continue;
            }
            if name == DEFAULT_OUTPUT {
                push(
                    &field,
                    format!(
                        "`{DEFAULT_OUTPUT}` is the name of the job's artifacts (./outputs and ./logs); pick another"
                    ),
                );
            }
            if let Some(path) = &output.path {
                if let Err(e) = check_bind_source(path) {
                    push(&format!("{field}.path"), e);
                }
                if output.path_kind == PathKind::UriFile {
                    push(
                        &format!("{field}.path"),
                        "a uri_file output is written to the artifact store or a datastore path; give a local folder to a uri_folder output".to_string(),
                    );
                }
                if output.datastore.is_some() {
                    push(
                        &format!("{field}.path"),
                        "an output has one path: a local folder or a datastore path".to_string(),
                    );
                }
            }
            if let Some(d) = &output.datastore {
                if let Err(e) = check_datastore_path(d) {
                    push(&format!("{field}.path"), e);
                }
                if output.path_kind == PathKind::UriFile && d.path.is_empty() {
                    push(
                        &format!("{field}.path"),
                        "a uri_file output's datastore path names the file".to_string(),
                    );
                }
            }
        }

        if let Some(identity) = &self.identity {
            check_identity(identity, &mut push);
        }
        let d = &self.drover;
        if d.gpus_per_instance > MAX_GPUS_PER_INSTANCE {
            push(
                "drover.gpus_per_instance",
                format!(
                    "must be at most {MAX_GPUS_PER_INSTANCE}, got {}",
                    d.gpus_per_instance
                ),
            );
        }
        if d.mounts.len() > MAX_ENTRIES {
            push(
                "drover.mounts",
                format!("at most {MAX_ENTRIES} mounts, got {}", d.mounts.len()),
            );
        }
        for (i, m) in d.mounts.iter().enumerate() {
            if let Err(e) = check_bind_source(&m.source) {
                push(&format!("drover.mounts[{i}].source"), e);
            }
            if let Err(e) = check_target(&m.target) {
                push(&format!("drover.mounts[{i}].target"), e);
            }
        }
        match &d.registry_credentials {
            None => {}
            Some(RegistryCredentials::DockerConfig(path)) if !path.is_absolute() => push(
                "drover.registry_credentials.docker_config",
                format!("expected an absolute path, got {}", path.display()),
            ),
            Some(RegistryCredentials::DockerConfig(_)) => {}
            Some(RegistryCredentials::Login {
                registry,
                username,
                password,
            }) => {
                if username.trim().is_empty() || username.len() > 256 {
                    push(
                        "drover.registry_credentials.username",
                        "must be 1 to 256 characters".to_string(),
                    );
                }
                if let Some(r) = registry
                    && (r.is_empty()
                        || r.len() > 256
                        || r.chars().any(|c| c.is_whitespace() || c == '/'))
                {
                    push(
                        "drover.registry_credentials.registry",
                        format!("expected a registry host like myregistry.azurecr.io, got `{r}`"),
                    );
                }
                match password {
                    SecretSource::File(path) if !path.is_absolute() => push(
                        "drover.registry_credentials.password_file",
                        format!("expected an absolute path, got {}", path.display()),
                    ),
                    SecretSource::Env(var) if !is_valid_env_name(var) => push(
                        "drover.registry_credentials.password_env",
                        format!("`{var}` is not a valid environment variable name"),
                    ),
                    _ => {}
                }
            }
        }

        errors.extend(res.docker_args.check("resources.docker_args"));
        for (field, text, max) in [
            ("display_name", self.display_name.as_deref(), 256),
            ("experiment_name", self.experiment_name.as_deref(), 256),
            ("description", self.description.as_deref(), 64 * 1024),
        ] {
            if let Some(text) = text {
                check_len(field, text, max, errors);
            }
        }
        for (k, v) in &self.tags {
            check_len(&format!("tags.{k}"), v, 4096, errors);
        }
        // Strings hold no NUL byte anywhere: C strings end there, so the
        // engine would see something else than what was checked.
        if let Ok(value) = serde_json::to_value(self) {
            crate::json::nul_strings(&value, "", errors);
        }
    }
}

/// `identity:`: `managed` with at most one well-formed id; the kinds
/// Drover cannot honour are refused saying what to use instead.
fn check_identity(identity: &JobIdentity, push: &mut impl FnMut(&str, String)) {
    let (client_id, object_id, resource_id) = match identity {
        JobIdentity::UserIdentity => {
            return push(
                "identity.type",
                "user_identity is not supported: Drover holds no user tokens to hand a job; \
                 use `type: managed` to run with a managed identity of the cluster"
                    .to_string(),
            );
        }
        JobIdentity::AmlToken => {
            return push(
                "identity.type",
                "aml_token is not supported: Drover has no Azure ML workspace to issue AML tokens; \
                 use `type: managed` to run with a managed identity of the cluster"
                    .to_string(),
            );
        }
        JobIdentity::Managed {
            client_id,
            object_id,
            msi_resource_id,
        } => (client_id, object_id, msi_resource_id),
    };
    let named = [client_id, object_id, resource_id]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if named > 1 {
        push(
            "identity",
            "give at most one of client_id, object_id and msi_resource_id".to_string(),
        );
    }
    for (field, value) in [
        ("identity.client_id", client_id),
        ("identity.object_id", object_id),
    ] {
        if let Some(v) = value
            && !is_guid(v)
        {
            push(
                field,
                format!("`{v}` is not a GUID (like 00000000-0000-0000-0000-000000000000)"),
            );
        }
    }
    if let Some(id) = resource_id
        && let Err(e) = crate::compute::parse_identity_resource_id(id)
    {
        push("identity.msi_resource_id", e.to_string());
    }
}

/// What a job's `identity:` asks of its cluster, as far as the cluster's
/// definition tells: a managed identity needs a cluster that has one, and
/// one named by resource id must be among the cluster's user-assigned
/// identities. (Client and object ids are known only to IMDS: the node's
/// token endpoint judges those by the tokens IMDS issues.)
pub fn check_job_identity(job: &JobSpec, cluster: &str, granted: &Identity) -> Vec<FieldError> {
    let Some(JobIdentity::Managed {
        msi_resource_id, ..
    }) = job.as_command().and_then(|c| c.identity.as_ref())
    else {
        return Vec::new();
    };
    let problem = match (granted, msi_resource_id) {
        (Identity::None, _) => Some((
            "identity",
            format!("cluster {cluster} has no managed identity for the job to use"),
        )),
        (Identity::SystemAssigned, Some(id)) => Some((
            "identity.msi_resource_id",
            format!(
                "cluster {cluster} has a system-assigned identity, not the user-assigned identity {id}"
            ),
        )),
        (Identity::UserAssigned { resource_ids }, Some(id))
            if !resource_ids.iter().any(|r| same_resource_id(r, id)) =>
        {
            Some((
                "identity.msi_resource_id",
                format!("{id} is not one of cluster {cluster}'s user-assigned identities"),
            ))
        }
        _ => None,
    };
    problem
        .map(|(field, message)| FieldError::new(field, message))
        .into_iter()
        .collect()
}

/// Whether two ARM resource ids name the same resource: ARM ids are
/// compared without regard to case (`resourceGroups`/`resourcegroups`).
pub fn same_resource_id(a: &str, b: &str) -> bool {
    a.trim()
        .trim_end_matches('/')
        .eq_ignore_ascii_case(b.trim().trim_end_matches('/'))
}

/// A GUID in its usual text form: 8-4-4-4-12 hex digits.
pub fn is_guid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// A light check of a Docker image reference (`[host[:port]/]path[:tag][@digest]`).
pub fn check_image_reference(image: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("`{image}` is not a valid image reference: {why}"));
    if image.is_empty() {
        return bad("empty");
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains whitespace");
    }
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest
        && !d.contains(':')
    {
        return bad("a digest looks like sha256:…");
    }
    let last = name.rsplit('/').next().unwrap_or(name);
    let (repo_last, tag) = match last.split_once(':') {
        Some((r, t)) => (r, Some(t)),
        None => (last, None),
    };
    if let Some(t) = tag
        && (t.is_empty()
            || t.len() > 128
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'))
    {
        return bad("a tag has letters, digits, `_`, `.` and `-`");
    }
    let path_parts: Vec<&str> = name.split('/').collect();
    let n = path_parts.len();
    for (i, part) in path_parts.iter().enumerate() {
        let part: &str = if i == n - 1 { repo_last } else { part };
        let is_host =
            i == 0 && n > 1 && (part.contains('.') || part.contains(':') || part == "localhost");
        if part.is_empty() {
            return bad("empty path component");
        }
        if !is_host
            && !part.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            })
        {
            return bad("repository names are lowercase letters, digits, `.`, `_` and `-`");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jobs_identity_must_be_one_its_cluster_has() {
        let uai = |n: &str| {
            format!(
                "/subscriptions/8d10da13-8125-4ba9-a717-bf7490507b3d/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{n}"
            )
        };
        let job = |identity: Option<JobIdentity>| {
            let mut j: CommandJob =
                serde_json::from_value(serde_json::json!({"command": "x", "image": "y"}))
                    .expect("job");
            j.identity = identity;
            JobSpec::Command(j)
        };
        let managed = |msi_resource_id: Option<String>| {
            Some(JobIdentity::Managed {
                client_id: None,
                object_id: None,
                msi_resource_id,
            })
        };
        let user = Identity::UserAssigned {
            resource_ids: vec![uai("one")],
        };
        let fields = |spec: &JobSpec, granted: &Identity| -> Vec<String> {
            check_job_identity(spec, "c1", granted)
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        // No identity asked: nothing to check, whatever the cluster has.
        assert!(fields(&job(None), &Identity::None).is_empty());
        assert_eq!(
            fields(&job(managed(None)), &Identity::None),
            ["identity: cluster c1 has no managed identity for the job to use"]
        );
        assert!(fields(&job(managed(None)), &Identity::SystemAssigned).is_empty());
        assert!(fields(&job(managed(None)), &user).is_empty());
        // ARM ids compare without regard to case.
        let other_case = uai("ONE").replace("resourceGroups", "resourcegroups");
        assert!(fields(&job(managed(Some(other_case))), &user).is_empty());
        assert_eq!(
            fields(&job(managed(Some(uai("two")))), &user),
            [format!(
                "identity.msi_resource_id: {} is not one of cluster c1's user-assigned identities",
                uai("two")
            )]
        );
        assert_eq!(
            fields(&job(managed(Some(uai("one")))), &Identity::SystemAssigned).len(),
            1
        );
        assert!(is_guid("6F4C2A58-21c5-4b0e-9c1c-7a5d1e0f3b2a"));
        assert!(!is_guid("6f4c2a5821c54b0e9c1c7a5d1e0f3b2a"));
        assert!(!is_guid("clientid"));
    }

    #[test]
    fn image_references() {
        for ok in [
            "busybox",
            "drover/base:bookworm",
            "127.0.0.1:5000/drover/tiny:1",
            "localhost/x",
            "nvcr.io/nvidia/pytorch:24.01-py3",
            "x@sha256:0123abcd",
        ] {
            assert!(check_image_reference(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "x:", "Upper", "x:tag:more", "x@nodigest", "a//b"] {
            assert!(check_image_reference(bad).is_err(), "{bad}");
        }
    }
}
