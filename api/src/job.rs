//! Command jobs, read from Azure ML v2 job YAML (`az ml job create -f job.yml`).
//!
//! [`JobSpec::from_yaml`] accepts the schema Azure ML users already write and
//! turns it into a plain, validated [`JobSpec`]. Drover's own settings live
//! under one top-level `drover:` section. Relative paths are resolved against
//! the directory of the YAML file, like the Azure ML CLI does. Parsing does no
//! I/O: whether paths exist is checked by whoever runs the job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use marked_yaml::Node;
use serde::{Deserialize, Serialize};

use crate::docker_args::{DockerArgs, parse_docker_args, split_words};
use crate::units::{parse_bytes, parse_duration};
use crate::yaml::{Diagnostic, InvalidDefinition, Reader, is_null, join, parse_mapping};

/// Where a job's `code` folder appears inside its container (also the working directory).
pub const CODE_DIR: &str = "/drover/code";
/// Parent of the container paths of path inputs (`/drover/inputs/NAME`).
pub const INPUTS_DIR: &str = "/drover/inputs";
/// Parent of the container paths of outputs (`/drover/outputs/NAME`).
pub const OUTPUTS_DIR: &str = "/drover/outputs";
/// Container paths under this prefix belong to Drover and cannot be mount targets.
pub const RESERVED_DIR: &str = "/drover";

/// A command job: what to run, in which image, on how many nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Job name, unique in a cluster; generated when the YAML has none.
    pub name: Option<String>,
    /// Human-friendly name shown in listings.
    pub display_name: Option<String>,
    /// Groups related jobs.
    pub experiment_name: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// Free-form tags.
    pub tags: BTreeMap<String, String>,
    /// The command as written, with `${{inputs.x}}` placeholders unresolved;
    /// see [`JobSpec::resolved_command`].
    pub command: String,
    /// Container image that carries the job's dependencies.
    pub image: String,
    /// Extra environment variables for every process of the job.
    pub environment_variables: BTreeMap<String, String>,
    /// Local folder mounted at [`CODE_DIR`] and used as the working directory.
    pub code: Option<PathBuf>,
    /// Target cluster (`compute: azureml:NAME` is read as `NAME`).
    pub compute: Option<String>,
    /// Node count and container resources.
    pub resources: Resources,
    /// How processes are laid out (MPI or PyTorch); `None` runs one process per node.
    pub distribution: Option<Distribution>,
    /// `limits.timeout`, in seconds: the job is stopped and reported as timed out after it.
    pub timeout_seconds: Option<u64>,
    /// Named inputs: literal values or local paths mounted read-only.
    pub inputs: BTreeMap<String, Input>,
    /// Named output folders, kept after the job.
    pub outputs: BTreeMap<String, Output>,
    /// Drover's own settings (the `drover:` section).
    pub drover: DroverOptions,
}

/// `resources:` of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// Number of nodes the job runs on (each runs one part).
    pub instance_count: u32,
    /// Requested VM size; informational on a single machine.
    pub instance_type: Option<String>,
    /// Size of `/dev/shm` in bytes.
    pub shm_size: Option<u64>,
    /// The checked `docker_args`.
    pub docker_args: DockerArgs,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            instance_count: 1,
            instance_type: None,
            shm_size: None,
            docker_args: DockerArgs::default(),
        }
    }
}

/// Distributed launch style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistributionKind {
    /// Open MPI: node-rank 0 runs `mpirun`.
    Mpi,
    /// PyTorch distributed: one launcher per node, `RANK`/`LOCAL_RANK`/`WORLD_SIZE` per process.
    Pytorch,
}

/// `distribution:` of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Distribution {
    /// MPI or PyTorch.
    pub kind: DistributionKind,
    /// Processes started on each node.
    pub process_count_per_instance: u32,
}

/// Kind of a path input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// A single file.
    UriFile,
    /// A folder.
    UriFolder,
}

/// One entry of `inputs:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Input {
    /// A literal (`lr: 0.01`), substituted as written.
    Literal {
        /// The value as written.
        value: String,
    },
    /// A local file or folder, mounted read-only.
    Path {
        /// File or folder.
        path_kind: PathKind,
        /// Absolute path on the machine that runs the job.
        path: PathBuf,
    },
}

/// One entry of `outputs:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// Where the folder is kept on the host; chosen by the runner when `None`.
    pub path: Option<PathBuf>,
}

/// When to pull the job's image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Pull only when the node does not have the image.
    #[default]
    IfNotPresent,
    /// Pull before every run (picks up a moved tag).
    Always,
    /// Never pull; fail when the image is missing.
    Never,
}

/// A bind mount the job asked for in `drover.mounts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// Absolute host path.
    pub source: PathBuf,
    /// Absolute container path.
    pub target: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Where a secret is read from; the secret itself never appears in a spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretSource {
    /// A file holding the secret (trailing newline ignored).
    File(PathBuf),
    /// An environment variable of the process that pulls.
    Env(String),
}

/// `drover.registry_credentials`: how to log in to the image's registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistryCredentials {
    /// A Docker `config.json` (as written by `docker login`).
    DockerConfig(PathBuf),
    /// A user name and a password read from a file or an environment variable.
    Login {
        /// Registry host; the image's registry when `None`.
        registry: Option<String>,
        /// User name.
        username: String,
        /// Where the password is.
        password: SecretSource,
    },
}

/// The `drover:` section: settings Azure ML has no key for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroverOptions {
    /// GPUs given to each node's part.
    pub gpus_per_instance: u32,
    /// Extra bind mounts.
    pub mounts: Vec<MountSpec>,
    /// Registry login for the image.
    pub registry_credentials: Option<RegistryCredentials>,
    /// When to pull.
    pub pull_policy: PullPolicy,
}

/// A parsed job with the warnings its file produced (unknown keys and the like).
#[derive(Debug, Clone)]
pub struct ParsedJob {
    /// The job.
    pub spec: JobSpec,
    /// Non-fatal findings, each with file and line.
    pub warnings: Vec<Diagnostic>,
}

const TOP_KEYS: &[&str] = &[
    "$schema",
    "type",
    "name",
    "display_name",
    "experiment_name",
    "description",
    "tags",
    "command",
    "code",
    "environment",
    "image",
    "environment_variables",
    "compute",
    "resources",
    "distribution",
    "limits",
    "inputs",
    "outputs",
    "drover",
];

/// True for names Azure ML and Docker both accept: `[A-Za-z0-9][A-Za-z0-9_-]*`, ≤ 255.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name.len() <= 255
}

fn resolve(base_dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        // Lexical clean-up of `./x`: keeps messages and mount sources readable.
        let mut out = base_dir.to_path_buf();
        for c in p.components() {
            match c {
                std::path::Component::CurDir => {}
                other => out.push(other),
            }
        }
        out
    }
}

/// Rejects remote data references, which a local run cannot mount.
fn local_path(r: &mut Reader, node: &Node, path: &str, base_dir: &Path) -> Option<PathBuf> {
    let s = r.non_empty(node, path)?;
    if s.contains("://") || s.starts_with("azureml:") {
        r.error(
            node,
            path,
            format!("only local paths are supported, got {s} (remote datastores are not)"),
        );
        return None;
    }
    Some(resolve(base_dir, s.strip_prefix("file:").unwrap_or(&s)))
}

impl JobSpec {
    /// Parses Azure ML v2 command-job YAML.
    ///
    /// `file` names the file in messages; `base_dir` anchors relative paths.
    pub fn from_yaml(
        file: &str,
        text: &str,
        base_dir: &Path,
    ) -> Result<ParsedJob, InvalidDefinition> {
        let root = parse_mapping(file, text)?;
        let mut r = Reader::new(file);
        let spec = read_job(&mut r, &root, base_dir);
        let (spec, warnings) = r.finish(spec)?;
        match spec {
            Some(spec) => Ok(ParsedJob { spec, warnings }),
            // read_job returns None only after recording an error.
            None => Err(InvalidDefinition { errors: vec![] }),
        }
    }

    /// The command with `${{inputs.NAME}}` and `${{outputs.NAME}}` replaced by
    /// literal values or container paths, and `$[[…]]` optional sections kept
    /// only when the inputs they mention are given.
    pub fn resolved_command(&self) -> String {
        substitute(&self.command, &|kind, name| {
            self.placeholder_value(kind, name)
        })
        .unwrap_or_else(|_| self.command.clone())
    }

    fn placeholder_value(&self, kind: &str, name: &str) -> Option<String> {
        match kind {
            "inputs" => self.inputs.get(name).map(|i| match i {
                Input::Literal { value } => value.clone(),
                Input::Path { .. } => input_container_path(name, i),
            }),
            "outputs" => self
                .outputs
                .get(name)
                .map(|_| format!("{OUTPUTS_DIR}/{name}")),
            _ => None,
        }
    }

    /// Total processes across all nodes.
    pub fn world_size(&self) -> u32 {
        self.resources.instance_count * self.processes_per_instance()
    }

    /// Processes started on each node (1 without distribution).
    pub fn processes_per_instance(&self) -> u32 {
        self.distribution
            .map(|d| d.process_count_per_instance)
            .unwrap_or(1)
    }

    /// Effective `/dev/shm` size: `resources.shm_size`, else `--shm-size` in docker_args.
    pub fn shm_size(&self) -> Option<u64> {
        self.resources
            .shm_size
            .or(self.resources.docker_args.shm_size)
    }
}

/// Container path of a path input: the folder itself, or the file inside
/// `/drover/inputs/NAME/` under its own name.
pub fn input_container_path(name: &str, input: &Input) -> String {
    match input {
        Input::Path {
            path_kind: PathKind::UriFile,
            path,
        } => {
            let file = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| name.to_string());
            format!("{INPUTS_DIR}/{name}/{file}")
        }
        _ => format!("{INPUTS_DIR}/{name}"),
    }
}

/// Replaces `${{kind.name}}` placeholders through `lookup`. An unknown
/// placeholder is an error naming it; inside `$[[ … ]]` it drops the section.
fn substitute(text: &str, lookup: &dyn Fn(&str, &str) -> Option<String>) -> Result<String, String> {
    fn replace_all(
        text: &str,
        lookup: &dyn Fn(&str, &str) -> Option<String>,
    ) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 3..];
            let end = after
                .find("}}")
                .ok_or_else(|| "unterminated `${{` placeholder".to_string())?;
            let expr = after[..end].trim();
            let (kind, name) = expr.split_once('.').unwrap_or((expr, ""));
            match lookup(kind, name) {
                Some(v) => out.push_str(&v),
                None => {
                    return Err(match kind {
                        "inputs" | "outputs" => format!(
                            "`${{{{{expr}}}}}` refers to {kind}.{name}, which the job does not define"
                        ),
                        _ => format!(
                            "`${{{{{expr}}}}}` is not supported (use ${{{{inputs.NAME}}}} or ${{{{outputs.NAME}}}})"
                        ),
                    });
                }
            }
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }

    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("$[[") {
        out.push_str(&replace_all(&rest[..start], lookup)?);
        let after = &rest[start + 3..];
        let end = after
            .find("]]")
            .ok_or_else(|| "unterminated `$[[` optional section".to_string())?;
        // An optional section is kept only if every placeholder in it resolves.
        if let Ok(section) = replace_all(&after[..end], lookup) {
            out.push_str(&section);
        }
        rest = &after[end + 2..];
    }
    out.push_str(&replace_all(rest, lookup)?);
    Ok(out)
}

fn read_job(r: &mut Reader, root: &Node, base_dir: &Path) -> Option<JobSpec> {
    let top = r.mapping(root, "", TOP_KEYS)?;
    let get = |k: &str| top.get_node(k);

    if let Some(n) = get("type")
        && let Some(t) = r.string(n, "type")
        && t != "command"
    {
        r.error(
            n,
            "type",
            format!("only command jobs are supported, got {t}"),
        );
    }

    let opt_string = |r: &mut Reader, key: &str| -> Option<String> {
        let n = get(key)?;
        if is_null(n) {
            return None;
        }
        r.string(n, key)
    };
    let name = opt_string(r, "name");
    if let (Some(n), Some(name)) = (get("name"), &name)
        && !is_valid_name(name)
    {
        r.error(
                n,
                "name",
                format!(
                    "`{name}` is not a valid job name (letters, digits, `-` and `_`, starting with a letter or digit)"
                ),
            );
    }
    let display_name = opt_string(r, "display_name");
    let experiment_name = opt_string(r, "experiment_name");
    let description = opt_string(r, "description");
    let tags = get("tags")
        .map(|n| r.string_map(n, "tags"))
        .unwrap_or_default();

    let command_node = get("command");
    let command = match command_node {
        Some(n) => r.non_empty(n, "command"),
        None => {
            r.error_at(0, "command", "is required");
            None
        }
    };

    let image = read_image(r, get("environment"), get("image"));

    let environment_variables = get("environment_variables")
        .map(|n| r.string_map(n, "environment_variables"))
        .unwrap_or_default();
    for (k, _) in environment_variables.iter() {
        if (k.is_empty() || k.contains('='))
            && let Some(n) = get("environment_variables")
        {
            r.error(
                n,
                "environment_variables",
                format!("`{k}` is not a valid environment variable name"),
            );
        }
    }

    let code = get("code")
        .filter(|n| !is_null(n))
        .and_then(|n| local_path(r, n, "code", base_dir));

    let compute = get("compute").filter(|n| !is_null(n)).and_then(|n| {
        let c = r.non_empty(n, "compute")?;
        let c = c.strip_prefix("azureml:").unwrap_or(&c).to_string();
        if c.contains('/') || c.contains(':') {
            r.error(
                n,
                "compute",
                format!("expected a cluster name or azureml:NAME, got {c}"),
            );
            return None;
        }
        Some(c)
    });

    let resources = get("resources")
        .filter(|n| !is_null(n))
        .map(|n| read_resources(r, n))
        .unwrap_or_default();
    let distribution = get("distribution")
        .filter(|n| !is_null(n))
        .and_then(|n| read_distribution(r, n));

    let timeout_seconds = get("limits").filter(|n| !is_null(n)).and_then(|n| {
        let m = r.mapping(n, "limits", &["timeout"])?;
        let t = m.get_node("timeout")?;
        let s = r.string(t, "limits.timeout")?;
        match parse_duration(&s) {
            Ok(d) if d.as_secs() > 0 => Some(d.as_secs()),
            Ok(_) => {
                r.error(t, "limits.timeout", "must be at least 1 second");
                None
            }
            Err(e) => {
                r.error(t, "limits.timeout", e);
                None
            }
        }
    });

    let inputs = get("inputs")
        .filter(|n| !is_null(n))
        .map(|n| read_inputs(r, n, base_dir))
        .unwrap_or_default();
    let outputs = get("outputs")
        .filter(|n| !is_null(n))
        .map(|n| read_outputs(r, n, base_dir))
        .unwrap_or_default();
    let drover = get("drover")
        .filter(|n| !is_null(n))
        .map(|n| read_drover(r, n, base_dir))
        .unwrap_or_default();

    let command = command?;
    let spec = JobSpec {
        name,
        display_name,
        experiment_name,
        description,
        tags,
        command,
        image: image?,
        environment_variables,
        code,
        compute,
        resources,
        distribution,
        timeout_seconds,
        inputs,
        outputs,
        drover,
    };
    // Every placeholder must name a defined input or output.
    if let Err(e) = substitute(&spec.command, &|kind, name| {
        spec.placeholder_value(kind, name)
    }) && let Some(n) = command_node
    {
        r.error(n, "command", e);
    }
    Some(spec)
}

fn read_image(r: &mut Reader, env: Option<&Node>, bare: Option<&Node>) -> Option<String> {
    let from_env = match env.filter(|n| !is_null(n)) {
        None => None,
        Some(n @ Node::Scalar(s)) => {
            let v = s.as_str();
            if v.starts_with("azureml:") {
                r.error(
                    n,
                    "environment",
                    format!(
                        "`{v}` refers to a registered environment, which Drover does not support yet; \
                         give the image inline (environment: {{image: REPO:TAG}})"
                    ),
                );
            } else {
                r.error(
                    n,
                    "environment",
                    format!("expected `image:` inside environment or azureml:NAME@latest, got {v}"),
                );
            }
            return None;
        }
        Some(n) => {
            let m = r.mapping(
                n,
                "environment",
                &[
                    "image",
                    "name",
                    "version",
                    "description",
                    "tags",
                    "conda_file",
                    "build",
                    "os_type",
                    "$schema",
                ],
            )?;
            for unsupported in ["conda_file", "build"] {
                if let Some(u) = m.get_node(unsupported) {
                    r.error(
                        u,
                        &join("environment", unsupported),
                        "is not supported: bake dependencies into an image and set environment.image",
                    );
                }
            }
            match m.get_node("image") {
                Some(i) => r.non_empty(i, "environment.image"),
                None => {
                    r.error(n, "environment", "environment.image is required");
                    None
                }
            }
        }
    };
    let from_bare = bare
        .filter(|n| !is_null(n))
        .and_then(|n| r.non_empty(n, "image"));
    let image = match (from_env, from_bare) {
        (Some(a), Some(b)) if a != b => {
            if let Some(n) = bare {
                r.error(
                    n,
                    "image",
                    format!("conflicts with environment.image ({a}); give only one"),
                );
            }
            return None;
        }
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => {
            if env.is_none() && bare.is_none() {
                r.error_at(
                    0,
                    "environment",
                    "is required (environment: {image: REPO:TAG})",
                );
            }
            return None;
        }
    };
    if let Err(e) = check_image_reference(&image) {
        let n = env.or(bare);
        match n {
            Some(n) => r.error(n, "environment.image", e),
            None => r.error_at(0, "environment.image", e),
        }
        return None;
    }
    Some(image)
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

fn read_resources(r: &mut Reader, n: &Node) -> Resources {
    let mut res = Resources::default();
    let Some(m) = r.mapping(
        n,
        "resources",
        &[
            "instance_count",
            "instance_type",
            "shm_size",
            "docker_args",
            "properties",
            "locations",
        ],
    ) else {
        return res;
    };
    if let Some(c) = m.get_node("instance_count")
        && let Some(v) = r.positive(c, "resources.instance_count")
    {
        res.instance_count = v;
    }
    if let Some(t) = m.get_node("instance_type").filter(|t| !is_null(t)) {
        res.instance_type = r.non_empty(t, "resources.instance_type");
    }
    if let Some(s) = m.get_node("shm_size").filter(|s| !is_null(s))
        && let Some(v) = r.string(s, "resources.shm_size")
    {
        match parse_bytes(&v) {
            Ok(b) if b > 0 => res.shm_size = Some(b),
            Ok(_) => r.error(s, "resources.shm_size", "must be larger than 0"),
            Err(e) => r.error(s, "resources.shm_size", e),
        }
    }
    if let Some(d) = m.get_node("docker_args").filter(|d| !is_null(d)) {
        let words = match d {
            Node::Scalar(s) => split_words(s.as_str()).map_err(|e| e.to_string()),
            Node::Sequence(seq) => {
                let mut words = Vec::new();
                for item in seq.iter() {
                    if let Some(w) = r.string(item, "resources.docker_args") {
                        words.push(w);
                    }
                }
                Ok(words)
            }
            Node::Mapping(_) => Err("expected a string or a list of flags".to_string()),
        };
        match words.and_then(|w| parse_docker_args(&w)) {
            Ok(args) => res.docker_args = args,
            Err(e) => r.error(d, "resources.docker_args", e),
        }
    }
    res
}

fn read_distribution(r: &mut Reader, n: &Node) -> Option<Distribution> {
    let m = r.mapping(
        n,
        "distribution",
        &["type", "process_count_per_instance", "$schema"],
    )?;
    let kind = match m.get_node("type") {
        Some(t) => {
            let v = r.string(t, "distribution.type")?;
            match v.to_ascii_lowercase().as_str() {
                "mpi" => DistributionKind::Mpi,
                "pytorch" => DistributionKind::Pytorch,
                other => {
                    r.error(
                        t,
                        "distribution.type",
                        format!("expected mpi or pytorch, got {other}"),
                    );
                    return None;
                }
            }
        }
        None => {
            r.error(n, "distribution.type", "is required (mpi or pytorch)");
            return None;
        }
    };
    let process_count_per_instance = match m.get_node("process_count_per_instance") {
        Some(c) => r.positive(c, "distribution.process_count_per_instance")?,
        None => 1,
    };
    Some(Distribution {
        kind,
        process_count_per_instance,
    })
}

fn check_input_name(r: &mut Reader, node: &Node, path: &str, name: &str) -> bool {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        r.error(
            node,
            path,
            "names are letters, digits, `_` and `-`".to_string(),
        );
    }
    ok
}

fn read_inputs(r: &mut Reader, n: &Node, base_dir: &Path) -> BTreeMap<String, Input> {
    let mut out = BTreeMap::new();
    let Some(m) = r.mapping(n, "inputs", &[]) else {
        return out;
    };
    for (k, v) in m.iter() {
        let path = join("inputs", k.as_str());
        if !check_input_name(r, v, &path, k.as_str()) {
            continue;
        }
        let input = match v {
            Node::Scalar(s) => Some(Input::Literal {
                value: s.as_str().to_string(),
            }),
            Node::Sequence(_) => {
                r.error(v, &path, "expected a value or a mapping with type and path");
                None
            }
            Node::Mapping(im) => {
                r.mapping(
                    v,
                    &path,
                    &[
                        "type",
                        "path",
                        "mode",
                        "default",
                        "value",
                        "description",
                        "optional",
                    ],
                );
                let kind = im
                    .get_node("type")
                    .and_then(|t| r.string(t, &join(&path, "type")));
                match kind.as_deref() {
                    Some("uri_file") | Some("uri_folder") => {
                        let path_kind = if kind.as_deref() == Some("uri_file") {
                            PathKind::UriFile
                        } else {
                            PathKind::UriFolder
                        };
                        match im.get_node("path") {
                            Some(p) => local_path(r, p, &join(&path, "path"), base_dir)
                                .map(|p| Input::Path { path_kind, path: p }),
                            None => {
                                r.error(v, &join(&path, "path"), "is required");
                                None
                            }
                        }
                    }
                    Some("string" | "number" | "integer" | "boolean") | None => {
                        match im.get_node("value").or_else(|| im.get_node("default")) {
                            Some(val) => r
                                .string(val, &join(&path, "value"))
                                .map(|value| Input::Literal { value }),
                            None => {
                                r.error(v, &path, "a literal input needs value or default");
                                None
                            }
                        }
                    }
                    Some(other) => {
                        r.error(
                            v,
                            &join(&path, "type"),
                            format!(
                                "expected uri_file, uri_folder, string, number, integer or boolean, got {other}"
                            ),
                        );
                        None
                    }
                }
            }
        };
        if let Some(input) = input {
            out.insert(k.as_str().to_string(), input);
        }
    }
    out
}

fn read_outputs(r: &mut Reader, n: &Node, base_dir: &Path) -> BTreeMap<String, Output> {
    let mut out = BTreeMap::new();
    let Some(m) = r.mapping(n, "outputs", &[]) else {
        return out;
    };
    for (k, v) in m.iter() {
        let path = join("outputs", k.as_str());
        if !check_input_name(r, v, &path, k.as_str()) {
            continue;
        }
        let output = if is_null(v) {
            Output { path: None }
        } else if let Some(om) = r.mapping(v, &path, &["type", "path", "mode", "description"]) {
            if let Some(t) = om.get_node("type")
                && let Some(t_str) = r.string(t, &join(&path, "type"))
                && t_str != "uri_folder"
            {
                r.error(
                    t,
                    &join(&path, "type"),
                    format!("only uri_folder outputs are supported, got {t_str}"),
                );
            }
            Output {
                path: om
                    .get_node("path")
                    .and_then(|p| local_path(r, p, &join(&path, "path"), base_dir)),
            }
        } else {
            continue;
        };
        out.insert(k.as_str().to_string(), output);
    }
    out
}

fn check_target(r: &mut Reader, node: &Node, path: &str, target: &str) -> bool {
    if !target.starts_with('/') || target == "/" {
        r.error(
            node,
            path,
            format!("the target must be an absolute path other than /, got {target}"),
        );
        return false;
    }
    if target == RESERVED_DIR || target.starts_with("/drover/") {
        r.error(node, path, format!("{target} is reserved for Drover"));
        return false;
    }
    true
}

fn read_drover(r: &mut Reader, n: &Node, base_dir: &Path) -> DroverOptions {
    let mut out = DroverOptions::default();
    let Some(m) = r.mapping(
        n,
        "drover",
        &[
            "gpus_per_instance",
            "mounts",
            "registry_credentials",
            "pull_policy",
        ],
    ) else {
        return out;
    };
    if let Some(g) = m.get_node("gpus_per_instance")
        && let Some(v) = r.non_negative(g, "drover.gpus_per_instance")
    {
        out.gpus_per_instance = v.min(u64::from(u32::MAX)) as u32;
    }
    if let Some(p) = m.get_node("pull_policy")
        && let Some(v) = r.string(p, "drover.pull_policy")
    {
        match v.as_str() {
            "if-not-present" | "if_not_present" | "IfNotPresent" => {
                out.pull_policy = PullPolicy::IfNotPresent
            }
            "always" | "Always" => out.pull_policy = PullPolicy::Always,
            "never" | "Never" => out.pull_policy = PullPolicy::Never,
            other => r.error(
                p,
                "drover.pull_policy",
                format!("expected if-not-present, always or never, got {other}"),
            ),
        }
    }
    if let Some(ms) = m.get_node("mounts").filter(|n| !is_null(n)) {
        match ms {
            Node::Sequence(seq) => {
                for (i, item) in seq.iter().enumerate() {
                    let path = format!("drover.mounts[{i}]");
                    if let Some(mount) = read_mount(r, item, &path, base_dir) {
                        out.mounts.push(mount);
                    }
                }
            }
            other => r.error(other, "drover.mounts", "expected a list of mounts"),
        }
    }
    if let Some(c) = m.get_node("registry_credentials").filter(|n| !is_null(n)) {
        out.registry_credentials = read_credentials(r, c, base_dir);
    }
    out
}

fn read_mount(r: &mut Reader, n: &Node, path: &str, base_dir: &Path) -> Option<MountSpec> {
    let (source, target, read_only) = match n {
        Node::Scalar(s) => {
            let parts: Vec<&str> = s.as_str().split(':').collect();
            match parts.as_slice() {
                [src, dst] => (src.to_string(), dst.to_string(), false),
                [src, dst, "ro"] => (src.to_string(), dst.to_string(), true),
                [src, dst, "rw"] => (src.to_string(), dst.to_string(), false),
                _ => {
                    r.error(
                        n,
                        path,
                        format!("expected SOURCE:TARGET[:ro], got {}", s.as_str()),
                    );
                    return None;
                }
            }
        }
        _ => {
            let m = r.mapping(n, path, &["source", "target", "read_only"])?;
            let source = r.non_empty(m.get_node("source").unwrap_or(n), &join(path, "source"))?;
            let target = r.non_empty(m.get_node("target").unwrap_or(n), &join(path, "target"))?;
            let ro = match m.get_node("read_only") {
                Some(b) => r.boolean(b, &join(path, "read_only"))?,
                None => false,
            };
            (source, target, ro)
        }
    };
    if !check_target(r, n, path, &target) {
        return None;
    }
    Some(MountSpec {
        source: resolve(base_dir, &source),
        target,
        read_only,
    })
}

fn read_credentials(r: &mut Reader, n: &Node, base_dir: &Path) -> Option<RegistryCredentials> {
    let path = "drover.registry_credentials";
    let m = r.mapping(
        n,
        path,
        &[
            "docker_config",
            "registry",
            "username",
            "password_file",
            "password_env",
            "password",
        ],
    )?;
    if let Some(p) = m.get_node("password") {
        r.error(
            p,
            &join(path, "password"),
            "inline passwords are not accepted; use password_file or password_env",
        );
        return None;
    }
    if let Some(cfg) = m.get_node("docker_config") {
        let p = r.non_empty(cfg, &join(path, "docker_config"))?;
        return Some(RegistryCredentials::DockerConfig(resolve(base_dir, &p)));
    }
    let Some(u) = m.get_node("username") else {
        r.error(
            n,
            path,
            "expected docker_config, or username with password_file or password_env",
        );
        return None;
    };
    let username = r.non_empty(u, &join(path, "username"))?;
    let password = match (m.get_node("password_file"), m.get_node("password_env")) {
        (Some(f), None) => SecretSource::File(resolve(
            base_dir,
            &r.non_empty(f, &join(path, "password_file"))?,
        )),
        (None, Some(e)) => SecretSource::Env(r.non_empty(e, &join(path, "password_env"))?),
        _ => {
            r.error(
                n,
                path,
                "give exactly one of password_file and password_env",
            );
            return None;
        }
    };
    let registry = match m.get_node("registry") {
        Some(reg) => Some(r.non_empty(reg, &join(path, "registry"))?),
        None => None,
    };
    Some(RegistryCredentials::Login {
        registry,
        username,
        password,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<ParsedJob, InvalidDefinition> {
        JobSpec::from_yaml("job.yml", yaml, Path::new("/jobs/demo"))
    }

    /// Asserts that `yaml` is refused with exactly `expect` among its errors.
    fn check_error(yaml: &str, expect: &str) {
        let err = parse(yaml).expect_err(expect);
        let text = err.to_string();
        assert!(
            text.lines().any(|l| l == expect),
            "expected line {expect:?} in:\n{text}"
        );
    }

    const FULL: &str = r#"$schema: https://azuremlschemas.azureedge.net/latest/commandJob.schema.json
type: command
name: train-1
display_name: Train
experiment_name: mnist
description: a test
tags: {team: ml, stage: 1}
code: ./src
command: >-
  python train.py --lr ${{inputs.lr}} --data ${{inputs.data}}
  --out ${{outputs.model}} $[[--opt ${{inputs.missing}}]] $[[--bs ${{inputs.bs}}]]
environment:
  image: mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest
environment_variables:
  NCCL_DEBUG: INFO
compute: azureml:gpu-cluster
resources:
  instance_count: 2
  instance_type: Standard_ND96asr_v4
  shm_size: 16g
  docker_args: --ulimit nofile=65536 --cpus 4
distribution:
  type: pytorch
  process_count_per_instance: 8
limits:
  timeout: 2h
inputs:
  lr: 0.01
  bs:
    type: integer
    default: 64
  data:
    type: uri_folder
    path: ./data
  labels:
    type: uri_file
    path: /abs/labels.csv
outputs:
  model:
    type: uri_folder
drover:
  gpus_per_instance: 8
  pull_policy: always
  mounts:
    - /datasets:/datasets:ro
    - {source: ./cache, target: /cache}
  registry_credentials:
    username: puller
    password_env: ACR_PASSWORD
"#;

    #[test]
    fn a_full_azure_ml_job_is_read() {
        let parsed = parse(FULL).unwrap();
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        let j = parsed.spec;
        assert_eq!(j.name.as_deref(), Some("train-1"));
        assert_eq!(j.display_name.as_deref(), Some("Train"));
        assert_eq!(j.experiment_name.as_deref(), Some("mnist"));
        assert_eq!(j.tags.get("team").map(String::as_str), Some("ml"));
        assert_eq!(j.code, Some(PathBuf::from("/jobs/demo/src")));
        assert_eq!(
            j.image,
            "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"
        );
        assert_eq!(j.compute.as_deref(), Some("gpu-cluster"));
        assert_eq!(j.resources.instance_count, 2);
        assert_eq!(j.resources.shm_size, Some(16 << 30));
        assert_eq!(j.resources.docker_args.cpus, Some(4.0));
        assert_eq!(
            j.distribution,
            Some(Distribution {
                kind: DistributionKind::Pytorch,
                process_count_per_instance: 8
            })
        );
        assert_eq!(j.world_size(), 16);
        assert_eq!(j.timeout_seconds, Some(7200));
        assert_eq!(
            j.inputs.get("data"),
            Some(&Input::Path {
                path_kind: PathKind::UriFolder,
                path: PathBuf::from("/jobs/demo/data")
            })
        );
        assert_eq!(
            j.inputs.get("bs"),
            Some(&Input::Literal { value: "64".into() })
        );
        assert_eq!(j.drover.gpus_per_instance, 8);
        assert_eq!(j.drover.pull_policy, PullPolicy::Always);
        assert_eq!(
            j.drover.mounts,
            vec![
                MountSpec {
                    source: "/datasets".into(),
                    target: "/datasets".into(),
                    read_only: true
                },
                MountSpec {
                    source: "/jobs/demo/cache".into(),
                    target: "/cache".into(),
                    read_only: false
                },
            ]
        );
        assert_eq!(
            j.drover.registry_credentials,
            Some(RegistryCredentials::Login {
                registry: None,
                username: "puller".into(),
                password: SecretSource::Env("ACR_PASSWORD".into())
            })
        );
        assert_eq!(
            j.resolved_command(),
            "python train.py --lr 0.01 --data /drover/inputs/data --out /drover/outputs/model  --bs 64"
        );
    }

    #[test]
    fn defaults_and_bare_image() {
        let j = parse("command: echo hi\nimage: busybox\n").unwrap().spec;
        assert_eq!(j.image, "busybox");
        assert_eq!(j.resources.instance_count, 1);
        assert_eq!(j.processes_per_instance(), 1);
        assert_eq!(j.drover.pull_policy, PullPolicy::IfNotPresent);
        assert_eq!(j.timeout_seconds, None);
    }

    #[test]
    fn file_inputs_appear_under_their_own_name() {
        let j = parse(
            "command: cat ${{inputs.f}}\nimage: x\ninputs:\n  f: {type: uri_file, path: ./a/b.csv}\n",
        )
        .unwrap()
        .spec;
        assert_eq!(j.resolved_command(), "cat /drover/inputs/f/b.csv");
    }

    #[test]
    fn unknown_keys_warn_with_line() {
        let parsed =
            parse("command: echo\nimage: x\nresorces: {}\nresources:\n  gpu: 1\n").unwrap();
        let w: Vec<String> = parsed.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            w,
            vec![
                "job.yml:3: resorces: unknown key, ignored",
                "job.yml:5: resources.gpu: unknown key, ignored"
            ]
        );
    }

    #[test]
    fn errors_name_file_line_and_key() {
        for (yaml, expect) in [
            (
                "command: echo\nimage: x\nresources:\n  instance_count: -1\n",
                "job.yml:4: resources.instance_count: expected a positive integer, got -1",
            ),
            (
                "command: echo\nimage: x\nresources:\n  instance_count: two\n",
                "job.yml:4: resources.instance_count: expected a positive integer, got two",
            ),
            ("image: x\n", "job.yml: command: is required"),
            (
                "command: echo\n",
                "job.yml: environment: is required (environment: {image: REPO:TAG})",
            ),
            (
                "command: echo\nenvironment: azureml:pytorch-env@latest\n",
                "job.yml:2: environment: `azureml:pytorch-env@latest` refers to a registered environment, which Drover does not support yet; give the image inline (environment: {image: REPO:TAG})",
            ),
            (
                "command: echo\nenvironment:\n  conda_file: env.yml\n  image: x\n",
                "job.yml:3: environment.conda_file: is not supported: bake dependencies into an image and set environment.image",
            ),
            (
                "command: echo\nimage: Bad Image\n",
                "job.yml:2: environment.image: `Bad Image` is not a valid image reference: contains whitespace",
            ),
            (
                "command: echo\nimage: UPPER/case\n",
                "job.yml:2: environment.image: `UPPER/case` is not a valid image reference: repository names are lowercase letters, digits, `.`, `_` and `-`",
            ),
            (
                "command: echo\nimage: x\nresources:\n  docker_args: --privileged\n",
                "job.yml:4: resources.docker_args: --privileged is not allowed: gives the job full control of the node",
            ),
            (
                "command: echo\nimage: x\nresources:\n  docker_args: [--memory, 1g, -v, /:/host]\n",
                "job.yml:4: resources.docker_args: -v is not allowed: mounts host paths; use code, inputs, outputs or drover.mounts",
            ),
            (
                "command: echo\nimage: x\nresources:\n  shm_size: big\n",
                "job.yml:4: resources.shm_size: expected a size like 512m or 16g, got big",
            ),
            (
                "command: echo\nimage: x\ndistribution:\n  type: tensorflow\n",
                "job.yml:4: distribution.type: expected mpi or pytorch, got tensorflow",
            ),
            (
                "command: echo\nimage: x\ndistribution:\n  type: mpi\n  process_count_per_instance: 0\n",
                "job.yml:5: distribution.process_count_per_instance: expected a positive integer, got 0",
            ),
            (
                "command: echo\nimage: x\nlimits:\n  timeout: soon\n",
                "job.yml:4: limits.timeout: expected a duration like 3600 or 2h, got soon",
            ),
            (
                "command: echo ${{inputs.nope}}\nimage: x\n",
                "job.yml:1: command: `${{inputs.nope}}` refers to inputs.nope, which the job does not define",
            ),
            (
                "command: echo ${{jobs.x}}\nimage: x\n",
                "job.yml:1: command: `${{jobs.x}}` is not supported (use ${{inputs.NAME}} or ${{outputs.NAME}})",
            ),
            (
                "command: echo\nimage: x\ninputs:\n  d: {type: uri_folder, path: azureml://datastores/x/paths/y}\n",
                "job.yml:4: inputs.d.path: only local paths are supported, got azureml://datastores/x/paths/y (remote datastores are not)",
            ),
            (
                "command: echo\nimage: x\ntype: sweep\n",
                "job.yml:3: type: only command jobs are supported, got sweep",
            ),
            (
                "command: echo\nimage: x\nname: has space\n",
                "job.yml:3: name: `has space` is not a valid job name (letters, digits, `-` and `_`, starting with a letter or digit)",
            ),
            (
                "command: echo\nimage: x\ndrover:\n  pull_policy: sometimes\n",
                "job.yml:4: drover.pull_policy: expected if-not-present, always or never, got sometimes",
            ),
            (
                "command: echo\nimage: x\ndrover:\n  mounts: ['/a:/drover/bin']\n",
                "job.yml:4: drover.mounts[0]: /drover/bin is reserved for Drover",
            ),
            (
                "command: echo\nimage: x\ndrover:\n  registry_credentials: {username: u, password: hunter2}\n",
                "job.yml:4: drover.registry_credentials.password: inline passwords are not accepted; use password_file or password_env",
            ),
            (
                "command: echo\nimage: x\ncompute: azureml:/subscriptions/x\n",
                "job.yml:3: compute: expected a cluster name or azureml:NAME, got /subscriptions/x",
            ),
        ] {
            check_error(yaml, expect);
        }
    }

    #[test]
    fn every_error_of_a_file_is_reported_at_once() {
        let err =
            parse("command: echo\nimage: x\nresources:\n  instance_count: 0\n  shm_size: x\n")
                .unwrap_err();
        assert_eq!(err.errors.len(), 2, "{err}");
    }

    #[test]
    fn compute_prefix_is_stripped_and_name_kept() {
        let j = parse("command: echo\nimage: x\ncompute: azureml:cpu\n")
            .unwrap()
            .spec;
        assert_eq!(j.compute.as_deref(), Some("cpu"));
        let j = parse("command: echo\nimage: x\ncompute: cpu\n")
            .unwrap()
            .spec;
        assert_eq!(j.compute.as_deref(), Some("cpu"));
    }

    #[test]
    fn specs_round_trip_through_json() {
        let j = parse(FULL).unwrap().spec;
        let json = serde_json::to_string(&j).unwrap();
        let back: JobSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(j, back);
        assert!(!json.contains("hunter2"));
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
