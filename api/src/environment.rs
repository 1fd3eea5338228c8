//! Environments (Azure ML's `Environment` asset): a versioned name for the
//! Docker image a job runs in, given as an image reference or as a Docker
//! build context, registered with `drover environment create` and named by
//! jobs as `azureml:NAME:VERSION` or `azureml:NAME@latest`.
//!
//! A build context travels like a job's code: a content-addressed snapshot
//! the CLI uploads once. Nodes build it on first use (or pull it from the
//! control plane's registry when one is configured) and tag the result
//! [`build_image_name`], labelled with the context's digest
//! ([`CONTEXT_LABEL`]) so a node can tell its image is the right one.
//!
//! Architecture Invariant: no I/O here. `conda_file` is read by the CLI,
//! which turns it into a build context with [`conda_dockerfile`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use marked_yaml::Node;
use serde::{Deserialize, Serialize};

use crate::SetOverride;
use crate::cluster::Timestamp;
use crate::error::FieldError;
use crate::files::Digest;
use crate::job::{Code, check_image_reference};
use crate::yaml::{Diagnostic, InvalidDefinition, Reader, is_null, join, parse_mapping_with};

/// The label a built environment image carries: its build context's digest.
pub const CONTEXT_LABEL: &str = "drover.environment.context";

/// The repository prefix of images built from environments on nodes.
pub const BUILD_REPOSITORY: &str = "drover-env";

/// The longest name, version, description, and number of tags accepted.
const MAX_NAME: usize = 255;
const MAX_VERSION: usize = 30;
const MAX_DESCRIPTION: usize = 4096;
const MAX_TAGS: usize = 64;

/// A registered environment version, as created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentSpec {
    /// The environment's name.
    pub name: String,
    /// The version; `None` at creation takes the next integer.
    #[serde(default)]
    pub version: Option<String>,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Free-form tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Where the image comes from.
    pub source: EnvironmentSource,
    /// `conda_file` as given, for `show` (its contents; the build context
    /// made from it is in `source`).
    #[serde(default)]
    pub conda_file: Option<String>,
}

/// Where an environment's image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvironmentSource {
    /// An image from a registry, used as is.
    Image {
        /// The image reference.
        image: String,
    },
    /// A Docker build context, built on the nodes.
    Build(ImageBuild),
}

/// A Docker build: its context folder and the Dockerfile in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageBuild {
    /// The context: a folder on the CLI's machine until uploaded, then its
    /// snapshot (the same two forms as a job's code).
    pub context: Code,
    /// The Dockerfile's path inside the context.
    #[serde(default = "default_dockerfile")]
    pub dockerfile_path: String,
}

fn default_dockerfile() -> String {
    "Dockerfile".to_string()
}

impl ImageBuild {
    /// The uploaded context's digest, when uploaded.
    pub fn context_digest(&self) -> Option<Digest> {
        match &self.context {
            Code::Snapshot(b) => Some(b.digest),
            Code::Local(_) => None,
        }
    }

    /// The problems of this build's fields, named under `at`.
    pub fn check(&self, at: &str) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let p = Path::new(&self.dockerfile_path);
        if self.dockerfile_path.trim().is_empty()
            || p.is_absolute()
            || p.components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            || self.dockerfile_path.len() > 1024
            || self.dockerfile_path.chars().any(char::is_control)
        {
            errors.push(FieldError::new(
                join(at, "dockerfile_path"),
                format!(
                    "`{}` must be a relative path inside the build context",
                    self.dockerfile_path
                ),
            ));
        }
        errors
    }
}

/// An environment version's build state, as the control plane knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum BuildState {
    /// An image environment: nothing to build.
    Ready,
    /// No node has built it yet.
    NotBuilt,
    /// A node is building it (with a registry: the one the others wait for).
    Building {
        /// The node.
        node: String,
    },
    /// Built at least once (with a registry: pushed there).
    Built,
    /// Its build failed; jobs naming it are refused until a new version.
    Failed {
        /// The build's last lines.
        reason: String,
    },
}

impl BuildState {
    /// The word `list` and `show` print.
    pub fn word(&self) -> &'static str {
        match self {
            BuildState::Ready => "ready",
            BuildState::NotBuilt => "not built",
            BuildState::Building { .. } => "building",
            BuildState::Built => "built",
            BuildState::Failed { .. } => "failed",
        }
    }
}

/// A version name: Azure ML's rules (letters, digits, `-`, `_`, `.`, at
/// most 30, starting with a letter or digit), which also make it a valid
/// Docker tag.
pub fn check_version(v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= MAX_VERSION
        && v.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{v}` is not a valid version: use letters, digits, `-`, `_` and `.` (at most {MAX_VERSION}), starting with a letter or digit"
        ))
    }
}

/// An environment name: Azure ML's rules (letters, digits, `-`, `_`, `.`,
/// at most 255, starting with a letter or digit).
pub fn check_name(n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= MAX_NAME
        && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{n}` is not a valid environment name: use letters, digits, `-`, `_` and `.` (at most {MAX_NAME}), starting with a letter or digit"
        ))
    }
}

/// Checks a description and tags (bounded: they are stored and shown).
pub fn check_metadata(
    description: Option<&str>,
    tags: &BTreeMap<String, String>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if description.is_some_and(|d| d.len() > MAX_DESCRIPTION || d.contains('\0')) {
        errors.push(FieldError::new(
            "description",
            format!("must be at most {MAX_DESCRIPTION} bytes, without NUL"),
        ));
    }
    if tags.len() > MAX_TAGS {
        errors.push(FieldError::new("tags", format!("at most {MAX_TAGS} tags")));
    }
    for (k, v) in tags {
        if k.is_empty() || k.len() > 256 || v.len() > 1024 || k.contains('\0') || v.contains('\0') {
            errors.push(FieldError::new(
                format!("tags.{k}"),
                "tag keys are 1 to 256 bytes and values at most 1024, without NUL",
            ));
        }
    }
    errors
}

impl EnvironmentSpec {
    /// Every rule an environment meets, whichever door it came through.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        if let Err(e) = check_name(&self.name) {
            errors.push(FieldError::new("name", e));
        }
        if let Some(v) = &self.version
            && let Err(e) = check_version(v)
        {
            errors.push(FieldError::new("version", e));
        }
        errors.extend(check_metadata(self.description.as_deref(), &self.tags));
        match &self.source {
            EnvironmentSource::Image { image } => {
                if let Err(e) = check_image_reference(image) {
                    errors.push(FieldError::new("image", e));
                }
            }
            EnvironmentSource::Build(b) => errors.extend(b.check("build")),
        }
        if self.conda_file.as_ref().is_some_and(|c| c.len() > 1 << 20) {
            errors.push(FieldError::new("conda_file", "must be at most 1 MiB"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// The image name of a built environment: `drover-env/NAME:VERSION` for a
/// registered one, `drover-env/anonymous:HASH` for an inline one (the hash
/// of its context and Dockerfile path), under `registry` (`HOST/PREFIX`)
/// when the control plane has one.
pub fn build_image_name(
    registry: Option<&str>,
    registered: Option<(&str, &str)>,
    build: &ImageBuild,
) -> Option<String> {
    let digest = build.context_digest()?;
    let (repo, tag) = match registered {
        Some((name, version)) => (name.to_ascii_lowercase(), version.to_string()),
        None => {
            let mut key = digest.hex();
            key.push('\0');
            key.push_str(&build.dockerfile_path);
            let h = sha256_hex(key.as_bytes());
            ("anonymous".to_string(), h[..24].to_string())
        }
    };
    Some(match registry {
        Some(r) => format!("{}/{repo}:{tag}", r.trim_end_matches('/')),
        None => format!("{BUILD_REPOSITORY}/{repo}:{tag}"),
    })
}

/// What a job's `environment:` names, as written (before the control plane
/// resolves it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvironmentRef {
    /// `azureml:NAME:VERSION`.
    Version {
        /// The name.
        name: String,
        /// The version.
        version: String,
    },
    /// `azureml:NAME@latest`: the most recently created version, pinned at
    /// submission.
    Latest {
        /// The name.
        name: String,
    },
}

impl EnvironmentRef {
    /// Reads `azureml:NAME:VERSION` or `azureml:NAME@latest`, refusing the
    /// forms Drover cannot serve with what to do instead.
    pub fn parse(s: &str) -> Result<EnvironmentRef, String> {
        let s = s.trim();
        if s.starts_with("azureml://registries/") {
            return Err(format!(
                "`{s}` names an environment in an Azure ML registry, which Drover cannot reach: register it here with `drover environment create` (image: or build:) and use azureml:NAME:VERSION"
            ));
        }
        let Some(rest) = s.strip_prefix("azureml:") else {
            return Err(format!(
                "expected azureml:NAME:VERSION, azureml:NAME@latest or a mapping with image: or build:, got {s}"
            ));
        };
        let (name, r) = if let Some((n, label)) = rest.split_once('@') {
            if label != "latest" {
                return Err(format!(
                    "`{s}`: the only label is `latest` (azureml:{n}@latest)"
                ));
            }
            (
                n,
                EnvironmentRef::Latest {
                    name: n.to_string(),
                },
            )
        } else if let Some((n, v)) = rest.split_once(':') {
            check_version(v)?;
            (
                n,
                EnvironmentRef::Version {
                    name: n.to_string(),
                    version: v.to_string(),
                },
            )
        } else {
            return Err(format!(
                "`{s}` names no version: write azureml:{rest}:VERSION or azureml:{rest}@latest"
            ));
        };
        if name.starts_with("AzureML-") {
            return Err(format!(
                "`{s}` is one of Azure ML's curated environments, which Drover does not have: register an environment with the image or Dockerfile you need (`drover environment create`) and name it instead"
            ));
        }
        check_name(name)?;
        Ok(r)
    }

    /// The environment's name.
    pub fn name(&self) -> &str {
        match self {
            EnvironmentRef::Version { name, .. } | EnvironmentRef::Latest { name } => name,
        }
    }
}

/// A job's environment beyond its image: which registered version it
/// names, and what the node builds. The control plane fills `version` and
/// `build` of a registered reference at submission, and sets the job's
/// image to what the environment runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEnvironment {
    /// The registered name; `None` for an inline environment.
    #[serde(default)]
    pub name: Option<String>,
    /// The version; `None` until `@latest` is resolved.
    #[serde(default)]
    pub version: Option<String>,
    /// The label as submitted (`latest`), kept for `show`.
    #[serde(default)]
    pub label: Option<String>,
    /// The build the node runs before the job, for a build environment.
    #[serde(default)]
    pub build: Option<ImageBuild>,
}

impl JobEnvironment {
    /// A job's environment from its reference.
    pub fn from_ref(r: &EnvironmentRef) -> JobEnvironment {
        match r {
            EnvironmentRef::Version { name, version } => JobEnvironment {
                name: Some(name.clone()),
                version: Some(version.clone()),
                label: None,
                build: None,
            },
            EnvironmentRef::Latest { name } => JobEnvironment {
                name: Some(name.clone()),
                version: None,
                label: Some("latest".to_string()),
                build: None,
            },
        }
    }

    /// `NAME:VERSION`, `NAME@latest`, or `inline`, for messages.
    pub fn describe(&self) -> String {
        match (&self.name, &self.version, &self.label) {
            (Some(n), Some(v), _) => format!("{n}:{v}"),
            (Some(n), None, Some(l)) => format!("{n}@{l}"),
            (Some(n), None, None) => n.clone(),
            (None, ..) => "inline".to_string(),
        }
    }
}

/// The Dockerfile Azure ML generates for an image with a `conda_file`: a
/// conda environment under `/azureml-envs/`, made from the file (copied into
/// the context as `conda_file_name`), on `PATH`, and named by
/// `AZUREML_CONDA_ENVIRONMENT_PATH`. A base image without `conda` or
/// `mamba` fails the build's first step saying so.
pub fn conda_dockerfile(base_image: &str, conda_file_name: &str, env_name: &str) -> String {
    let env = format!("/azureml-envs/{env_name}");
    format!(
        "FROM {base_image}\n\
         USER root\n\
         RUN command -v mamba >/dev/null 2>&1 || command -v conda >/dev/null 2>&1 || \\\n    \
         {{ echo 'conda_file needs conda or mamba in the base image, and {base_image} has neither: use a base image with conda (such as mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04) or install the dependencies in a Dockerfile (build:)' >&2; exit 1; }}\n\
         COPY {conda_file_name} /azureml-environment-setup/{conda_file_name}\n\
         RUN CONDA=$(command -v mamba || command -v conda) && \\\n    \
         \"$CONDA\" env create -p {env} -f /azureml-environment-setup/{conda_file_name} && \\\n    \
         rm -rf \"$HOME/.cache/pip\" && (\"$CONDA\" clean -aqy || true)\n\
         ENV PATH={env}/bin:$PATH\n\
         ENV AZUREML_CONDA_ENVIRONMENT_PATH={env}\n\
         ENV LD_LIBRARY_PATH={env}/lib:$LD_LIBRARY_PATH\n\
         ENV AZUREML_ENVIRONMENT_IMAGE=True\n\
         CMD [\"bash\"]\n"
    )
}

/// The conda environment's folder name for a conda file's contents, as
/// Azure ML names it (`azureml_` and a hash of the file).
pub fn conda_env_name(conda_file: &str) -> String {
    let h = sha256_hex(conda_file.as_bytes());
    format!("azureml_{}", &h[..32])
}

/// An environment read from YAML, with the warnings its file produced.
#[derive(Debug, Clone)]
pub struct ParsedEnvironment {
    /// The environment; a `conda_file` is in `conda_path` until the CLI
    /// reads it and makes the build context.
    pub spec: EnvironmentSpec,
    /// `conda_file:`, resolved against the YAML's folder.
    pub conda_path: Option<PathBuf>,
    /// Unknown keys, each with file and line.
    pub warnings: Vec<Diagnostic>,
}

const TOP_KEYS: &[&str] = &[
    "$schema",
    "name",
    "version",
    "description",
    "tags",
    "image",
    "build",
    "conda_file",
    "os_type",
    "inference_config",
    "properties",
];

/// The message Azure ML gives for both or neither of `image` and `build`.
pub const IMAGE_OR_BUILD: &str = "Docker image or Dockerfile should be provided not both";

impl EnvironmentSpec {
    /// Parses Azure ML's environment YAML (`az ml environment create -f`),
    /// with `--set KEY=VALUE` overrides applied first; relative paths are
    /// resolved lexically against `base_dir`.
    pub fn from_yaml_with(
        file: &str,
        text: &str,
        base_dir: &Path,
        sets: &[SetOverride],
    ) -> Result<ParsedEnvironment, InvalidDefinition> {
        let root = parse_mapping_with(file, text, sets)?;
        let mut r = Reader::new(file);
        let parsed = read_environment(&mut r, &root, base_dir);
        if let Some((spec, _)) = &parsed
            && let Err(errors) = spec.validate()
        {
            for e in errors {
                let line = top_line(&root, &e.field);
                r.error_at(line, &e.field, e.message);
            }
        }
        r.errors.sort_by_key(|d| d.line);
        let (parsed, warnings) = r.finish(parsed)?;
        match parsed {
            Some((spec, conda_path)) => Ok(ParsedEnvironment {
                spec,
                conda_path,
                warnings,
            }),
            None => Err(InvalidDefinition { errors: vec![] }),
        }
    }
}

fn top_line(root: &Node, field: &str) -> usize {
    let key = field.split('.').next().unwrap_or(field);
    root.as_mapping()
        .and_then(|m| m.get_node(key))
        .map_or(0, crate::yaml::line_of)
}

fn read_environment(
    r: &mut Reader,
    root: &Node,
    base_dir: &Path,
) -> Option<(EnvironmentSpec, Option<PathBuf>)> {
    let top = r.mapping(root, "", TOP_KEYS)?;
    let get = |k: &str| top.get_node(k).filter(|n| !is_null(n));
    let name = match get("name") {
        Some(n) => r.non_empty(n, "name").map(|s| s.trim().to_string()),
        None => {
            r.error_at(0, "name", "is required");
            None
        }
    };
    let version =
        get("version").and_then(|n| r.non_empty(n, "version").map(|s| s.trim().to_string()));
    let description = get("description").and_then(|n| r.string(n, "description"));
    let tags = get("tags")
        .map(|n| r.string_map(n, "tags"))
        .unwrap_or_default();
    if let Some(n) = get("os_type")
        && let Some(os) = r.string(n, "os_type")
        && !os.eq_ignore_ascii_case("linux")
    {
        r.error(
            n,
            "os_type",
            format!("`{os}` is not supported: Drover runs linux containers"),
        );
    }
    if let Some(n) = get("inference_config") {
        r.warn(
            n,
            "inference_config",
            "is for online endpoints, which Drover does not have; ignored",
        );
    }
    let image = get("image").and_then(|n| r.non_empty(n, "image").map(|s| s.trim().to_string()));
    let build = get("build").and_then(|n| read_build(r, n, "build", base_dir));
    let conda = get("conda_file").and_then(|n| r.non_empty(n, "conda_file").map(|s| (n, s)));
    let source = match (image, build, get("image"), get("build")) {
        (_, _, Some(_), Some(b)) => {
            r.error(b, "build", IMAGE_OR_BUILD);
            None
        }
        (Some(image), None, _, None) => Some(EnvironmentSource::Image { image }),
        (None, Some(b), None, _) => Some(EnvironmentSource::Build(b)),
        (None, None, None, None) => {
            r.error_at(
                0,
                "image",
                IMAGE_OR_BUILD.replace("not both", "(one of image: or build:)"),
            );
            None
        }
        _ => None,
    };
    let conda_path = match (conda, &source) {
        (Some((n, _)), Some(EnvironmentSource::Build(_))) => {
            r.error(
                n,
                "conda_file",
                "goes with image:, not build: (install the conda environment in the Dockerfile)",
            );
            None
        }
        (Some((_, path)), _) => Some(resolve(base_dir, path.trim())),
        (None, _) => None,
    };
    Some((
        EnvironmentSpec {
            name: name?,
            version,
            description,
            tags,
            source: source?,
            conda_file: None,
        },
        conda_path,
    ))
}

/// Reads a `build:` mapping (`path`, `dockerfile_path`), used by both
/// environment files and a job's inline environment.
pub(crate) fn read_build(
    r: &mut Reader,
    n: &Node,
    at: &str,
    base_dir: &Path,
) -> Option<ImageBuild> {
    let m = r.mapping(n, at, &["path", "dockerfile_path"])?;
    let path = match m.get_node("path").filter(|p| !is_null(p)) {
        Some(p) => {
            let s = r.non_empty(p, &join(at, "path"))?;
            let s = s.trim();
            if s.contains("://") || s.starts_with("azureml:") {
                r.error(
                    p,
                    &join(at, "path"),
                    format!("`{s}` is not supported: give a local folder with the Dockerfile"),
                );
                return None;
            }
            resolve(base_dir, s)
        }
        None => {
            r.error(
                n,
                &join(at, "path"),
                "is required (the folder with the Dockerfile)",
            );
            return None;
        }
    };
    let dockerfile_path = match m.get_node("dockerfile_path").filter(|p| !is_null(p)) {
        Some(p) => r
            .non_empty(p, &join(at, "dockerfile_path"))?
            .trim()
            .to_string(),
        None => default_dockerfile(),
    };
    let b = ImageBuild {
        context: Code::Local(path),
        dockerfile_path,
    };
    for e in b.check(at) {
        r.error(n, &e.field, e.message);
    }
    Some(b)
}

fn resolve(base_dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p.strip_prefix("file:").unwrap_or(p));
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let mut out = base_dir.to_path_buf();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The next version when none is given: one more than the largest integer
/// version, or `1`.
pub fn next_version<'a>(existing: impl IntoIterator<Item = &'a str>) -> String {
    let max = existing
        .into_iter()
        .filter_map(|v| v.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

/// `POST /v1/environments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentCreate {
    /// The environment; a build's context must already be uploaded.
    pub spec: EnvironmentSpec,
}

/// `PATCH /v1/environments/{name}/versions/{version}`: what `update` may
/// change (as on Azure ML, only description and tags).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentUpdate {
    /// A new description.
    #[serde(default)]
    pub description: Option<String>,
    /// Tags to set (merged into the existing ones).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Tags to remove.
    #[serde(default)]
    pub remove_tags: Vec<String>,
}

/// One environment version, as the control plane answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentInfo {
    /// The name.
    pub name: String,
    /// The version.
    pub version: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Where the image comes from.
    pub source: EnvironmentSource,
    /// `conda_file`'s contents, when it had one.
    #[serde(default)]
    pub conda_file: Option<String>,
    /// The image jobs run in.
    pub image: String,
    /// The build's state.
    pub build_state: BuildState,
    /// Hidden from lists; still usable by a pinned version.
    pub archived: bool,
    /// When this version was created.
    pub created_at: Timestamp,
}

/// `GET /v1/environments` and `GET /v1/environments/{name}/versions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentList {
    /// Newest first.
    pub environments: Vec<EnvironmentInfo>,
}

/// `POST /v1/agent/builds`: a node is about to build `image`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRequest {
    /// The image it would build.
    pub image: String,
}

/// The control plane's answer to [`BuildRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "decision")]
pub enum BuildDecision {
    /// Build it (and push it, with a registry).
    Build,
    /// Another node is building it for the registry: wait, then pull.
    Wait {
        /// The node building it.
        node: String,
    },
    /// It is in the registry: pull it.
    Pull,
    /// Its build failed before; do not try again.
    Failed {
        /// Why.
        reason: String,
    },
}

/// `POST /v1/agent/builds/report`: how a node's build ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildReport {
    /// The image.
    pub image: String,
    /// `None` when it was built (and pushed); the build's last lines when not.
    #[serde(default)]
    pub failure: Option<String>,
    /// The build worked but the node could not finish (its push failed):
    /// it gives the build up, and the next node to ask takes it, instead of
    /// the environment being marked failed.
    #[serde(default)]
    pub released: bool,
}

/// The registry environment images go to when the control plane has one:
/// the first node to build an image pushes it there and the others pull it.
/// `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentRegistry {
    /// `HOST[:PORT]/PREFIX` (images are `PREFIX/NAME:VERSION` on `HOST`).
    pub prefix: String,
    /// The user to log in as, if the registry needs a login.
    #[serde(default)]
    pub username: Option<String>,
    /// Its password or token.
    #[serde(default)]
    pub password: Option<String>,
    /// Nodes log in with their cluster's managed identity instead (Azure
    /// Container Registry's token exchange; `--registry-identity`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub identity: bool,
}

impl std::fmt::Debug for EnvironmentRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvironmentRegistry")
            .field("prefix", &self.prefix)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("identity", &self.identity)
            .finish()
    }
}

impl EnvironmentRegistry {
    /// The registry's host (`HOST[:PORT]`).
    pub fn host(&self) -> &str {
        self.prefix.split('/').next().unwrap_or(&self.prefix)
    }

    /// Whether `image` is one of this registry's environment images.
    pub fn holds(&self, image: &str) -> bool {
        image
            .strip_prefix(self.prefix.trim_end_matches('/'))
            .is_some_and(|rest| rest.starts_with('/'))
    }

    /// Checks `--registry`: a host with a port or a dot (as Docker tells a
    /// registry from a Docker Hub user) and a lowercase path.
    pub fn check_prefix(prefix: &str) -> Result<(), String> {
        let (host, path) = prefix.split_once('/').unwrap_or((prefix, ""));
        let host_ok =
            !host.is_empty() && (host.contains('.') || host.contains(':') || host == "localhost");
        let probe = format!("{}/x:1", prefix.trim_end_matches('/'));
        if !host_ok || path.is_empty() || check_image_reference(&probe).is_err() {
            return Err(format!(
                "`{prefix}` is not a registry prefix: expected HOST[:PORT]/PREFIX, such as 127.0.0.1:5000/drover-env or myregistry.azurecr.io/envs"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::BlobInfo;

    fn parse(text: &str) -> Result<ParsedEnvironment, String> {
        EnvironmentSpec::from_yaml_with("env.yml", text, Path::new("/src"), &[])
            .map_err(|e| e.to_string())
    }

    #[test]
    fn azure_ml_docs_files_parse() {
        let p = parse(
            "$schema: https://azuremlschemas.azureedge.net/latest/environment.schema.json\n\
             name: docker-image-example\n\
             image: pytorch/pytorch:latest\n\
             description: Environment created from a Docker image.\n",
        )
        .unwrap();
        assert_eq!(p.spec.name, "docker-image-example");
        assert_eq!(p.spec.version, None);
        assert_eq!(
            p.spec.source,
            EnvironmentSource::Image {
                image: "pytorch/pytorch:latest".into()
            }
        );
        let p = parse(
            "name: docker-context-example\nversion: 3\nbuild:\n  path: docker-contexts/python-and-pip\n",
        )
        .unwrap();
        assert_eq!(p.spec.version.as_deref(), Some("3"));
        let EnvironmentSource::Build(b) = &p.spec.source else {
            panic!("not a build")
        };
        assert_eq!(
            b.context,
            Code::Local("/src/docker-contexts/python-and-pip".into())
        );
        assert_eq!(b.dockerfile_path, "Dockerfile");
        let p = parse(
            "name: docker-image-plus-conda-example\nimage: mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu20.04\nconda_file: conda-yamls/pydata.yml\n",
        )
        .unwrap();
        assert_eq!(p.conda_path, Some("/src/conda-yamls/pydata.yml".into()));
    }

    #[test]
    fn both_or_neither_of_image_and_build_is_refused_as_azure_words_it() {
        let e = parse("name: x\nimage: a\nbuild:\n  path: .\n").unwrap_err();
        assert_eq!(
            e,
            "env.yml:4: build: Docker image or Dockerfile should be provided not both"
        );
        let e = parse("name: x\n").unwrap_err();
        assert!(
            e.contains("env.yml: image: Docker image or Dockerfile"),
            "{e}"
        );
        let e = parse("name: x\nbuild:\n  path: .\nconda_file: c.yml\n").unwrap_err();
        assert!(e.contains("env.yml:4: conda_file: goes with image:"), "{e}");
        let e =
            parse("name: x\nbuild:\n  path: .\n  dockerfile_path: ../Dockerfile\n").unwrap_err();
        assert!(
            e.contains("must be a relative path inside the build context"),
            "{e}"
        );
        let e = parse("name: bad name\nimage: a\n").unwrap_err();
        assert!(
            e.contains("env.yml:1: name: `bad name` is not a valid environment name"),
            "{e}"
        );
        let e = parse("name: x\nversion: -1\nimage: a\nos_type: windows\n").unwrap_err();
        assert!(e.contains("env.yml:2: version:"), "{e}");
        assert!(
            e.contains("env.yml:4: os_type: `windows` is not supported"),
            "{e}"
        );
    }

    #[test]
    fn references_parse_and_unsupported_ones_say_what_to_do() {
        assert_eq!(
            EnvironmentRef::parse("azureml:trainer@latest"),
            Ok(EnvironmentRef::Latest {
                name: "trainer".into()
            })
        );
        assert_eq!(
            EnvironmentRef::parse("azureml:trainer:2"),
            Ok(EnvironmentRef::Version {
                name: "trainer".into(),
                version: "2".into()
            })
        );
        let e = EnvironmentRef::parse("azureml:AzureML-sklearn-1.0-ubuntu20.04-py38-cpu@latest")
            .unwrap_err();
        assert!(e.contains("curated environments"), "{e}");
        let e = EnvironmentRef::parse(
            "azureml://registries/azureml/environments/sklearn-1.5/labels/latest",
        )
        .unwrap_err();
        assert!(e.contains("Azure ML registry"), "{e}");
        let e = EnvironmentRef::parse("azureml:trainer").unwrap_err();
        assert!(
            e.contains("azureml:trainer:VERSION or azureml:trainer@latest"),
            "{e}"
        );
        let e = EnvironmentRef::parse("azureml:trainer@stable").unwrap_err();
        assert!(e.contains("the only label is `latest`"), "{e}");
    }

    #[test]
    fn versions_count_up_from_the_largest_integer() {
        assert_eq!(next_version([]), "1");
        assert_eq!(next_version(["1", "2", "beta", "10"]), "11");
        assert_eq!(next_version(["v1"]), "1");
    }

    #[test]
    fn built_images_are_named_by_environment_or_by_content() {
        let b = ImageBuild {
            context: Code::Snapshot(BlobInfo {
                digest: Digest([7; 32]),
                size: 1,
            }),
            dockerfile_path: "Dockerfile".into(),
        };
        assert_eq!(
            build_image_name(None, Some(("Trainer", "2")), &b).unwrap(),
            "drover-env/trainer:2"
        );
        assert_eq!(
            build_image_name(Some("127.0.0.1:5000/envs/"), Some(("t", "1")), &b).unwrap(),
            "127.0.0.1:5000/envs/t:1"
        );
        let anon = build_image_name(None, None, &b).unwrap();
        assert!(anon.starts_with("drover-env/anonymous:"), "{anon}");
        let other = ImageBuild {
            dockerfile_path: "gpu.Dockerfile".into(),
            ..b.clone()
        };
        assert_ne!(build_image_name(None, None, &other).unwrap(), anon);
        let local = ImageBuild {
            context: Code::Local("/x".into()),
            ..b
        };
        assert_eq!(build_image_name(None, None, &local), None);
    }

    #[test]
    fn the_conda_dockerfile_checks_for_conda_first_and_sets_the_paths() {
        let name = conda_env_name("dependencies: [python=3.10]\n");
        assert!(name.starts_with("azureml_"));
        let d = conda_dockerfile("debian:12", "conda.yml", &name);
        let check = d.find("command -v mamba").unwrap();
        let create = d.find("env create").unwrap();
        assert!(check < create);
        assert!(d.contains(&format!(
            "ENV AZUREML_CONDA_ENVIRONMENT_PATH=/azureml-envs/{name}"
        )));
        assert!(d.contains(&format!("ENV PATH=/azureml-envs/{name}/bin:$PATH")));
    }
}
