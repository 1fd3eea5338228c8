//! Azure ML v2 command-job YAML (`az ml job create -f job.yml`) to a
//! [`JobSpec`]. The reader checks shapes and types with file, line and key;
//! the rules on values are [`JobSpec::validate`]'s, whose problems are
//! reported at the lines of the keys they name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use marked_yaml::Node;

use super::{
    Code, CommandJob, DatastorePath, Distribution, DistributionKind, DroverOptions, Input,
    InputMode, InvalidJob, JobIdentity, JobSpec, MountSpec, Output, OutputMode, ParsedJob,
    PathKind, PullPolicy, RegistryCredentials, Resources, SecretSource, check_image_reference,
};
use crate::docker_args::{parse_docker_args, split_words};
use crate::environment::{EnvironmentRef, JobEnvironment};
use crate::units::{parse_bytes, parse_duration};
use crate::yaml::{
    InvalidDefinition, Reader, SetOverride, is_null, join, line_of, parse_mapping_with,
};

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
    "identity",
    "drover",
];

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

impl JobSpec {
    /// Parses Azure ML v2 job YAML (`type: command`, or no `type`), then
    /// checks the job with [`JobSpec::validate`], reporting its problems at
    /// the lines and keys they concern.
    ///
    /// `file` names the file in messages; `base_dir` anchors relative paths.
    pub fn from_yaml(
        file: &str,
        text: &str,
        base_dir: &Path,
    ) -> Result<ParsedJob, InvalidDefinition> {
        JobSpec::from_yaml_with(file, text, base_dir, &[])
    }

    /// [`JobSpec::from_yaml`] with `--set KEY=VALUE` overrides applied to
    /// the YAML first (`az ml job create -f job.yml --set …`).
    pub fn from_yaml_with(
        file: &str,
        text: &str,
        base_dir: &Path,
        sets: &[SetOverride],
    ) -> Result<ParsedJob, InvalidDefinition> {
        let root = parse_mapping_with(file, text, sets)?;
        let mut r = Reader::new(file);
        let mut lines = BTreeMap::new();
        let kind = root
            .as_mapping()
            .and_then(|m| m.get_node("type"))
            .filter(|n| n.as_scalar().is_some_and(|s| s.as_str() == "parallel"));
        let (root, parallel) = match kind {
            Some(n) => {
                r.warn(
                    n,
                    "type",
                    "a top-level parallel job is a Drover convenience (Azure ML runs parallel steps only inside pipeline jobs): it runs as a command job of Drover's parallel runtime",
                );
                match super::parallel::as_command_document(&mut r, &root) {
                    Some(doc) => (doc, true),
                    None => {
                        r.errors.sort_by_key(|d| d.line);
                        r.finish(None::<()>)?;
                        return Err(InvalidDefinition { errors: vec![] });
                    }
                }
            }
            None => (root, false),
        };
        let spec = read_job(&mut r, &root, base_dir, &mut lines).map(|mut job| {
            job.drover.parallel_runtime = parallel;
            JobSpec::Command(job)
        });
        if let Some(spec) = &spec
            && let Err(invalid) = spec.validate()
        {
            report_invalid(&mut r, &root, &invalid);
        }
        // The reader's and the rules' problems, in the file's order.
        r.errors.sort_by_key(|d| d.line);
        let (spec, warnings) = r.finish(spec)?;
        match spec {
            Some(spec) => Ok(ParsedJob {
                spec,
                warnings,
                lines,
            }),
            // read_job returns None only after recording an error.
            None => Err(InvalidDefinition { errors: vec![] }),
        }
    }
}

/// The YAML key path for a field of a job's JSON, where they differ.
fn yaml_path(field: &str, root: &Node) -> String {
    let has = |k: &str| root.as_mapping().and_then(|m| m.get_node(k)).is_some();
    if field == "image" {
        return if has("image") && !has("environment") {
            "image".to_string()
        } else {
            "environment.image".to_string()
        };
    }
    if field == "timeout_seconds" {
        return "limits.timeout".to_string();
    }
    field.to_string()
}

/// The deepest node of `root` along `path` (`a.b[2].c`), with the path to it.
fn locate<'a>(root: &'a Node, path: &str) -> (Option<&'a Node>, String) {
    let mut node = root;
    let mut found = String::new();
    for segment in path.split('.') {
        let (key, index) = match segment.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let Some(next) = node.as_mapping().and_then(|m| m.get_node(key)) else {
            break;
        };
        node = next;
        found = join(&found, key);
        if let Some(i) = index {
            let Some(item) = node.as_sequence().and_then(|s| s.get(i)) else {
                break;
            };
            node = item;
            found = format!("{found}[{i}]");
        }
    }
    ((!found.is_empty()).then_some(node), found)
}

/// Reports a job's validation problems at the lines and keys they concern,
/// skipping keys that already have an error of the reader.
fn report_invalid(r: &mut Reader, root: &Node, invalid: &InvalidJob) {
    for e in &invalid.errors {
        let path = yaml_path(&e.field, root);
        let (node, found) = locate(root, &path);
        // A problem inside a flag string (docker_args) is named by the key
        // the user wrote; its message names the flag.
        let key = if (path.starts_with("resources.docker_args")
            || path.starts_with("drover.mounts["))
            && !found.is_empty()
        {
            found.clone()
        } else {
            path.clone()
        };
        if r.errors.iter().any(|d| d.path == key) {
            continue;
        }
        match node {
            Some(n) => r.error(n, &key, e.message.clone()),
            None => r.error_at(0, &key, e.message.clone()),
        }
    }
}

fn read_job(
    r: &mut Reader,
    root: &Node,
    base_dir: &Path,
    lines: &mut BTreeMap<String, usize>,
) -> Option<CommandJob> {
    let top = r.mapping(root, "", TOP_KEYS)?;
    let get = |k: &str| top.get_node(k);

    if let Some(n) = get("type")
        && let Some(t) = r.string(n, "type")
        && t != "command"
    {
        r.error(
            n,
            "type",
            format!("only command jobs (and, as a Drover convenience, top-level parallel jobs) are supported, got {t}"),
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
    let display_name = opt_string(r, "display_name");
    let experiment_name = opt_string(r, "experiment_name");
    let description = opt_string(r, "description");
    let tags = get("tags")
        .map(|n| r.string_map(n, "tags"))
        .unwrap_or_default();

    let command = match get("command") {
        Some(n) if is_null(n) => {
            r.error(n, "command", "is required (the command to run)");
            None
        }
        Some(n) => r.non_empty(n, "command"),
        None => {
            r.error_at(0, "command", "is required");
            None
        }
    };

    let (image, environment) = match read_image(r, get("environment"), get("image"), base_dir) {
        Some(ImageSource::Image(i)) => (Some(i), None),
        Some(ImageSource::Environment(e)) => (Some(String::new()), Some(e)),
        None => (None, None),
    };

    let environment_variables = get("environment_variables")
        .map(|n| r.string_map(n, "environment_variables"))
        .unwrap_or_default();

    let code = get("code").filter(|n| !is_null(n)).and_then(|n| {
        lines.insert("code".to_string(), line_of(n));
        match read_path_value(r, n, "code", base_dir)? {
            PathValue::Local(p) => Some(Code::Local(p)),
            PathValue::Url(_) | PathValue::Datastore(_) => {
                r.error(
                    n,
                    "code",
                    "must be a local folder (the CLI uploads it as a snapshot)",
                );
                None
            }
        }
    });

    let compute = get("compute").filter(|n| !is_null(n)).and_then(|n| {
        let c = r.non_empty(n, "compute")?;
        Some(c.strip_prefix("azureml:").unwrap_or(&c).to_string())
    });

    let resources = get("resources")
        .filter(|n| !is_null(n))
        .map(|n| read_resources(r, n))
        .unwrap_or_default();
    let distribution = get("distribution")
        .filter(|n| !is_null(n))
        .and_then(|n| read_distribution(r, n, resources.instance_count));

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
        .map(|n| read_inputs(r, n, base_dir, lines))
        .unwrap_or_default();
    let outputs = get("outputs")
        .filter(|n| !is_null(n))
        .map(|n| read_outputs(r, n, base_dir, lines))
        .unwrap_or_default();
    let identity = get("identity")
        .filter(|n| !is_null(n))
        .and_then(|n| read_identity(r, n));
    let drover = get("drover")
        .filter(|n| !is_null(n))
        .map(|n| read_drover(r, n, base_dir))
        .unwrap_or_default();

    Some(CommandJob {
        name,
        display_name,
        experiment_name,
        description,
        tags,
        command: command?,
        image: image?,
        environment,
        environment_variables,
        code,
        compute,
        resources,
        distribution,
        timeout_seconds,
        inputs,
        outputs,
        identity,
        drover,
    })
}

/// `identity:` (Azure ML's `IdentityConfiguration`): its `type` and, for
/// `managed`, at most one id. Whether the kind and ids are acceptable is
/// [`JobSpec::validate`]'s to say (at this mapping's lines).
fn read_identity(r: &mut Reader, n: &Node) -> Option<JobIdentity> {
    let m = r.mapping(
        n,
        "identity",
        &["type", "client_id", "object_id", "msi_resource_id"],
    )?;
    let Some(t) = m.get_node("type") else {
        r.error(
            n,
            "identity.type",
            "is required (managed, user_identity or aml_token)",
        );
        return None;
    };
    let kind = r.string(t, "identity.type")?;
    let mut id = |key: &str| {
        let node = m.get_node(key).filter(|v| !is_null(v))?;
        r.non_empty(node, &join("identity", key))
            .map(|v| v.trim().to_string())
    };
    let (client_id, object_id, msi_resource_id) =
        (id("client_id"), id("object_id"), id("msi_resource_id"));
    let managed = || JobIdentity::Managed {
        client_id,
        object_id,
        msi_resource_id,
    };
    match kind.trim() {
        // Azure ML's schema takes both spellings.
        "managed" | "managed_identity" => Some(managed()),
        "user_identity" => Some(JobIdentity::UserIdentity),
        "aml_token" => Some(JobIdentity::AmlToken),
        other => {
            r.error(
                t,
                "identity.type",
                format!("expected managed, user_identity or aml_token, got {other}"),
            );
            None
        }
    }
}

/// Where a job's image comes from.
enum ImageSource {
    /// An image reference.
    Image(String),
    /// A registered environment, or an inline one with `build:`.
    Environment(JobEnvironment),
}

fn read_image(
    r: &mut Reader,
    env: Option<&Node>,
    bare: Option<&Node>,
    base_dir: &Path,
) -> Option<ImageSource> {
    let from_env = match env.filter(|n| !is_null(n)) {
        None => None,
        Some(n @ Node::Scalar(s)) => {
            let v = s.as_str();
            match EnvironmentRef::parse(v) {
                Ok(reference) => {
                    if let Some(b) = bare.filter(|b| !is_null(b)) {
                        r.error(
                            b,
                            "image",
                            format!("conflicts with environment ({v}); give only one"),
                        );
                        return None;
                    }
                    return Some(ImageSource::Environment(JobEnvironment::from_ref(
                        &reference,
                    )));
                }
                Err(e) => {
                    r.error(n, "environment", e);
                    return None;
                }
            }
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
            if let Some(u) = m.get_node("conda_file") {
                r.error(
                    u,
                    "environment.conda_file",
                    "is not supported inline: register the environment (`drover environment create -f env.yml` with image: and conda_file:) and use azureml:NAME@latest",
                );
            }
            if let Some(b) = m.get_node("build").filter(|b| !is_null(b)) {
                if let Some(i) = m.get_node("image").filter(|i| !is_null(i)) {
                    r.error(i, "environment.image", crate::environment::IMAGE_OR_BUILD);
                    return None;
                }
                if let Some(i) = bare.filter(|i| !is_null(i)) {
                    r.error(
                        i,
                        "image",
                        "conflicts with environment.build; give only one",
                    );
                    return None;
                }
                let build = crate::environment::read_build(r, b, "environment.build", base_dir)?;
                return Some(ImageSource::Environment(JobEnvironment {
                    name: None,
                    version: None,
                    label: None,
                    build: Some(build),
                }));
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
            // `environment: ~` or `image: ~` says nothing either.
            let null = [(env, "environment"), (bare, "image")]
                .into_iter()
                .find_map(|(n, key)| n.filter(|n| is_null(n)).map(|n| (n, key)));
            match null {
                Some((n, key)) if env.is_none_or(is_null) && bare.is_none_or(is_null) => {
                    r.error(n, key, "is required (environment: {image: REPO:TAG})");
                }
                None if env.is_none() && bare.is_none() => r.error_at(
                    0,
                    "environment",
                    "is required (environment: {image: REPO:TAG})",
                ),
                _ => {}
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
    Some(ImageSource::Image(image))
}

/// A light check of a Docker image reference (`[host[:port]/]path[:tag][@digest]`).
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

fn read_distribution(r: &mut Reader, n: &Node, instance_count: u32) -> Option<Distribution> {
    let m = r.mapping(
        n,
        "distribution",
        &[
            "type",
            "process_count_per_instance",
            "worker_count",
            "parameter_server_count",
            "$schema",
        ],
    )?;
    let kind = match m.get_node("type") {
        Some(t) => {
            let v = r.string(t, "distribution.type")?;
            match v.to_ascii_lowercase().as_str() {
                "mpi" => DistributionKind::Mpi,
                "pytorch" => DistributionKind::Pytorch,
                "tensorflow" => DistributionKind::Tensorflow,
                other => {
                    r.error(
                        t,
                        "distribution.type",
                        format!("expected mpi, pytorch or tensorflow, got {other}"),
                    );
                    return None;
                }
            }
        }
        None => {
            r.error(
                n,
                "distribution.type",
                "is required (mpi, pytorch or tensorflow)",
            );
            return None;
        }
    };
    if kind != DistributionKind::Tensorflow {
        for key in ["worker_count", "parameter_server_count"] {
            if let Some(k) = m.get_node(key) {
                r.error(
                    k,
                    &format!("distribution.{key}"),
                    format!("applies to type tensorflow only, not {}", kind.as_str()),
                );
            }
        }
        let process_count_per_instance = match m.get_node("process_count_per_instance") {
            Some(c) => r.positive(c, "distribution.process_count_per_instance")?,
            None => 1,
        };
        return Some(Distribution::new(kind, process_count_per_instance));
    }
    if let Some(c) = m.get_node("process_count_per_instance") {
        r.error(
            c,
            "distribution.process_count_per_instance",
            "does not apply to type tensorflow: give worker_count and parameter_server_count",
        );
    }
    let worker_count = match m.get_node("worker_count") {
        Some(c) => Some(r.positive(c, "distribution.worker_count")?),
        None => None,
    };
    let parameter_server_count = match m.get_node("parameter_server_count") {
        Some(c) => {
            let v = r.non_negative(c, "distribution.parameter_server_count")?;
            match u32::try_from(v) {
                Ok(v) => v,
                Err(_) => {
                    r.error(
                        c,
                        "distribution.parameter_server_count",
                        format!("must be at most {}, got {v}", u32::MAX),
                    );
                    return None;
                }
            }
        }
        None => 0,
    };
    let mut d = Distribution {
        worker_count,
        parameter_server_count,
        ..Distribution::new(kind, 1)
    };
    // Tasks are spread evenly over the nodes; an uneven count is refused by
    // `JobSpec::validate`, which sees the job whichever door it came through.
    let (workers, ps) = d.tensorflow_tasks(instance_count.max(1));
    let tasks = workers.saturating_add(ps);
    d.process_count_per_instance = (tasks / instance_count.max(1)).max(1);
    Some(d)
}

/// Where a path input's or output's `path:` points.
enum PathValue {
    Local(PathBuf),
    Url(String),
    Datastore(DatastorePath),
}

/// Reads a `path:`: a local path (relative to the YAML's folder; `file:`
/// allowed), an `http(s)://` URL, or `azureml://datastores/NAME/paths/PATH`.
fn read_path_value(r: &mut Reader, node: &Node, path: &str, base_dir: &Path) -> Option<PathValue> {
    let s = r.non_empty(node, path)?;
    let s = s.trim();
    if s.starts_with("http://") || s.starts_with("https://") {
        return Some(PathValue::Url(s.to_string()));
    }
    if s.starts_with(DatastorePath::PREFIX) {
        return match DatastorePath::parse(s) {
            Ok(d) => Some(PathValue::Datastore(d)),
            Err(e) => {
                r.error(node, path, e);
                None
            }
        };
    }
    if s.starts_with("azureml:") {
        r.error(
            node,
            path,
            format!(
                "`{s}` is not supported: use a local path, an https:// URL or azureml://datastores/NAME/paths/PATH (registered data assets and job outputs by URI are not supported yet)"
            ),
        );
        return None;
    }
    if let Some((scheme, _)) = s.split_once("://") {
        r.error(
            node,
            path,
            format!(
                "`{scheme}://` paths are not supported: use a local path, an https:// URL, or register the storage as a datastore (`drover datastore create`) and use azureml://datastores/NAME/paths/PATH"
            ),
        );
        return None;
    }
    Some(PathValue::Local(resolve(
        base_dir,
        s.strip_prefix("file:").unwrap_or(s),
    )))
}

/// Reads `type:` of a path input or output: `uri_file`, `uri_folder`, and
/// Azure ML's model types, which are folders (or files) to a job; an input
/// (`what` not empty) may also be an `mltable`, a folder.
fn read_path_kind(r: &mut Reader, node: &Node, path: &str, what: &str) -> Option<PathKind> {
    let t = r.string(node, path)?;
    match t.as_str() {
        "uri_file" => Some(PathKind::UriFile),
        "uri_folder" => Some(PathKind::UriFolder),
        // A table is its folder (the MLTable file and the data it names),
        // read by whoever consumes it (the parallel runtime, `mltable`).
        "mltable" if !what.is_empty() => Some(PathKind::UriFolder),
        "custom_model" | "mlflow_model" | "triton_model" => {
            r.warn(
                node,
                path,
                format!("{t} is read as uri_folder (a folder of files)"),
            );
            Some(PathKind::UriFolder)
        }
        other => {
            r.error(
                node,
                path,
                format!("expected uri_file or uri_folder{what}, got {other}"),
            );
            None
        }
    }
}

fn read_inputs(
    r: &mut Reader,
    n: &Node,
    base_dir: &Path,
    lines: &mut BTreeMap<String, usize>,
) -> BTreeMap<String, Input> {
    let mut out = BTreeMap::new();
    let Some(m) = r.mapping(n, "inputs", &[]) else {
        return out;
    };
    for (k, v) in m.iter() {
        let path = join("inputs", k.as_str());
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
                let type_node = im.get_node("type");
                let is_literal = match type_node {
                    None => im.get_node("path").is_none(),
                    Some(t) => matches!(
                        t.as_scalar().map(|s| s.as_str()),
                        Some("string" | "number" | "integer" | "boolean")
                    ),
                };
                if is_literal {
                    match im.get_node("value").or_else(|| im.get_node("default")) {
                        Some(val) => r
                            .string(val, &join(&path, "value"))
                            .map(|value| Input::Literal { value }),
                        None => {
                            r.error(v, &path, "a literal input needs value or default");
                            None
                        }
                    }
                } else {
                    let path_kind = match type_node {
                        Some(t) => read_path_kind(
                            r,
                            t,
                            &join(&path, "type"),
                            ", string, number, integer or boolean",
                        ),
                        None => Some(PathKind::UriFolder),
                    };
                    let mode = match im.get_node("mode").filter(|n| !is_null(n)) {
                        None => Some(InputMode::RoMount),
                        Some(mn) => match r.string(mn, &join(&path, "mode")).as_deref() {
                            Some("ro_mount") => Some(InputMode::RoMount),
                            Some("download") => Some(InputMode::Download),
                            Some(
                                other @ ("direct" | "eval_mount" | "eval_download" | "rw_mount"),
                            ) => {
                                r.error(
                                    mn,
                                    &join(&path, "mode"),
                                    format!("{other} is not supported for inputs; use ro_mount or download"),
                                );
                                None
                            }
                            Some(other) => {
                                r.error(
                                    mn,
                                    &join(&path, "mode"),
                                    format!("expected ro_mount or download, got {other}"),
                                );
                                None
                            }
                            None => None,
                        },
                    };
                    let value = match im.get_node("path") {
                        Some(p) => {
                            lines.insert(join(&path, "path"), line_of(p));
                            read_path_value(r, p, &join(&path, "path"), base_dir)
                        }
                        None => {
                            r.error(v, &join(&path, "path"), "is required");
                            None
                        }
                    };
                    match (path_kind, mode, value) {
                        (Some(path_kind), Some(mode), Some(value)) => Some(match value {
                            PathValue::Local(p) => Input::Path {
                                path_kind,
                                path: p,
                                mode,
                            },
                            PathValue::Url(url) => Input::Url {
                                path_kind,
                                url,
                                mode,
                            },
                            PathValue::Datastore(at) => Input::Datastore {
                                path_kind,
                                at,
                                mode,
                            },
                        }),
                        _ => None,
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

fn read_outputs(
    r: &mut Reader,
    n: &Node,
    base_dir: &Path,
    lines: &mut BTreeMap<String, usize>,
) -> BTreeMap<String, Output> {
    let mut out = BTreeMap::new();
    let Some(m) = r.mapping(n, "outputs", &[]) else {
        return out;
    };
    for (k, v) in m.iter() {
        let path = join("outputs", k.as_str());
        let output = if is_null(v) {
            Output::default()
        } else if let Some(om) = r.mapping(v, &path, &["type", "path", "mode", "description"]) {
            let mut output = Output::default();
            if let Some(t) = om.get_node("type")
                && let Some(kind) = read_path_kind(r, t, &join(&path, "type"), "")
            {
                output.path_kind = kind;
            }
            if let Some(mn) = om.get_node("mode").filter(|n| !is_null(n)) {
                match r.string(mn, &join(&path, "mode")).as_deref() {
                    Some("rw_mount") => output.mode = OutputMode::RwMount,
                    Some("upload") => output.mode = OutputMode::Upload,
                    Some(other) => r.error(
                        mn,
                        &join(&path, "mode"),
                        format!("expected rw_mount or upload, got {other}"),
                    ),
                    None => {}
                }
            }
            if let Some(p) = om.get_node("path").filter(|n| !is_null(n)) {
                lines.insert(join(&path, "path"), line_of(p));
                match read_path_value(r, p, &join(&path, "path"), base_dir) {
                    Some(PathValue::Local(local)) => output.path = Some(local),
                    Some(PathValue::Datastore(d)) => output.datastore = Some(d),
                    Some(PathValue::Url(u)) => r.error(
                        p,
                        &join(&path, "path"),
                        format!(
                            "`{u}`: outputs cannot be written to a URL; register the storage as a datastore and use azureml://datastores/NAME/paths/PATH"
                        ),
                    ),
                    None => {}
                }
            }
            output
        } else {
            continue;
        };
        out.insert(k.as_str().to_string(), output);
    }
    out
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
    use crate::job::MAX_COMMAND_BYTES;
    use crate::yaml::SetOverride;

    fn parse(yaml: &str) -> Result<ParsedJob, InvalidDefinition> {
        JobSpec::from_yaml("job.yml", yaml, Path::new("/jobs/demo"))
    }

    /// The command job of `yaml`, which must parse.
    fn command(yaml: &str) -> CommandJob {
        parse(yaml)
            .expect("parses")
            .spec
            .into_command()
            .expect("a command job")
    }

    /// Asserts that `yaml` is refused with exactly `expect` among its errors.
    #[test]
    fn registered_and_inline_environments_are_read_and_left_to_resolve() {
        let j = command("command: python train.py\nenvironment: azureml:trainer@latest\n");
        assert_eq!(j.image, "");
        let e = j.environment.unwrap();
        assert_eq!(
            (e.name.as_deref(), e.version.as_deref()),
            (Some("trainer"), None)
        );
        assert_eq!(e.label.as_deref(), Some("latest"));
        let j = command("command: x\nenvironment: azureml:trainer:1\n");
        assert_eq!(j.environment.unwrap().version.as_deref(), Some("1"));
        let j = command(
            "command: x\nenvironment:\n  build:\n    path: ./ctx\n    dockerfile_path: gpu.Dockerfile\n",
        );
        let b = j.environment.unwrap().build.unwrap();
        assert_eq!(b.context, Code::Local("/jobs/demo/ctx".into()));
        assert_eq!(b.dockerfile_path, "gpu.Dockerfile");
        check_error(
            "command: x\nenvironment: azureml:trainer:1\nimage: busybox\n",
            "job.yml:3: image: conflicts with environment (azureml:trainer:1); give only one",
        );
        check_error(
            "command: x\nenvironment:\n  image: busybox\n  build:\n    path: .\n",
            "job.yml:3: environment.image: Docker image or Dockerfile should be provided not both",
        );
    }

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
        let j = parsed.spec.into_command().unwrap();
        assert_eq!(j.name.as_deref(), Some("train-1"));
        assert_eq!(j.display_name.as_deref(), Some("Train"));
        assert_eq!(j.experiment_name.as_deref(), Some("mnist"));
        assert_eq!(j.tags.get("team").map(String::as_str), Some("ml"));
        assert_eq!(j.code, Some(Code::Local(PathBuf::from("/jobs/demo/src"))));
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
            Some(Distribution::new(DistributionKind::Pytorch, 8))
        );
        assert_eq!(j.world_size(), 16);
        assert_eq!(j.timeout_seconds, Some(7200));
        assert_eq!(
            j.inputs.get("data"),
            Some(&Input::Path {
                path_kind: PathKind::UriFolder,
                path: PathBuf::from("/jobs/demo/data"),
                mode: InputMode::RoMount,
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
        let j = command("command: echo hi\nimage: busybox\n");
        assert_eq!(j.image, "busybox");
        assert_eq!(j.resources.instance_count, 1);
        assert_eq!(j.processes_per_instance(), 1);
        assert_eq!(j.drover.pull_policy, PullPolicy::IfNotPresent);
        assert_eq!(j.timeout_seconds, None);
    }

    #[test]
    fn file_inputs_appear_under_their_own_name() {
        let j = command(
            "command: cat ${{inputs.f}}\nimage: x\ninputs:\n  f: {type: uri_file, path: ./a/b.csv}\n",
        );
        assert_eq!(j.resolved_command(), "cat /drover/inputs/f/b.csv");
    }

    #[test]
    fn a_managed_identity_is_read_and_the_others_are_refused_at_their_line() {
        let j = command("command: echo\nimage: x\nidentity:\n  type: managed\n");
        assert_eq!(
            j.identity,
            Some(JobIdentity::Managed {
                client_id: None,
                object_id: None,
                msi_resource_id: None
            })
        );
        let j = command(
            "command: echo\nimage: x\nidentity:\n  type: managed_identity\n  client_id: 6f4c2a58-21c5-4b0e-9c1c-7a5d1e0f3b2a\n",
        );
        assert_eq!(
            j.identity,
            Some(JobIdentity::Managed {
                client_id: Some("6f4c2a58-21c5-4b0e-9c1c-7a5d1e0f3b2a".into()),
                object_id: None,
                msi_resource_id: None
            })
        );
        let uai = "/subscriptions/8d10da13-8125-4ba9-a717-bf7490507b3d/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/trainer";
        let j = command(&format!(
            "command: echo\nimage: x\nidentity:\n  type: managed\n  msi_resource_id: {uai}\n"
        ));
        assert!(
            matches!(j.identity, Some(JobIdentity::Managed { msi_resource_id: Some(ref r), .. }) if r == uai)
        );
        for (yaml, expect) in [
            (
                "command: echo\nimage: x\nidentity:\n  type: user_identity\n",
                "job.yml:4: identity.type: user_identity is not supported: Drover holds no user tokens to hand a job; use `type: managed` to run with a managed identity of the cluster",
            ),
            (
                "command: echo\nimage: x\nidentity:\n  type: aml_token\n",
                "job.yml:4: identity.type: aml_token is not supported: Drover has no Azure ML workspace to issue AML tokens; use `type: managed` to run with a managed identity of the cluster",
            ),
            (
                "command: echo\nimage: x\nidentity:\n  type: workload\n",
                "job.yml:4: identity.type: expected managed, user_identity or aml_token, got workload",
            ),
            (
                "command: echo\nimage: x\nidentity:\n  client_id: x\n",
                "job.yml:4: identity.type: is required (managed, user_identity or aml_token)",
            ),
            (
                "command: echo\nimage: x\nidentity:\n  type: managed\n  client_id: not-a-guid\n",
                "job.yml:5: identity.client_id: `not-a-guid` is not a GUID (like 00000000-0000-0000-0000-000000000000)",
            ),
            (
                "command: echo\nimage: x\nidentity:\n  type: managed\n  msi_resource_id: /subscriptions/x\n",
                "job.yml:5: identity.msi_resource_id: `/subscriptions/x` is not a user-assigned identity resource id (expected /subscriptions/GUID/resourceGroups/GROUP/providers/Microsoft.ManagedIdentity/userAssignedIdentities/NAME)",
            ),
            (
                "command: echo\nimage: x\nidentity:\n  type: managed\n  client_id: 6f4c2a58-21c5-4b0e-9c1c-7a5d1e0f3b2a\n  object_id: 6f4c2a58-21c5-4b0e-9c1c-7a5d1e0f3b2b\n",
                "job.yml:4: identity: give at most one of client_id, object_id and msi_resource_id",
            ),
        ] {
            check_error(yaml, expect);
        }
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
                "command: echo\nenvironment: azureml:AzureML-sklearn-1.0@latest\n",
                "job.yml:2: environment: `azureml:AzureML-sklearn-1.0@latest` is one of Azure ML's curated environments, which Drover does not have: register an environment with the image or Dockerfile you need (`drover environment create`) and name it instead",
            ),
            (
                "command: echo\nenvironment:\n  conda_file: env.yml\n  image: x\n",
                "job.yml:3: environment.conda_file: is not supported inline: register the environment (`drover environment create -f env.yml` with image: and conda_file:) and use azureml:NAME@latest",
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
                "command: echo\nimage: x\ndistribution:\n  type: horovod\n",
                "job.yml:4: distribution.type: expected mpi, pytorch or tensorflow, got horovod",
            ),
            (
                "command: echo\nimage: x\ndistribution:\n  type: mpi\n  worker_count: 2\n",
                "job.yml:5: distribution.worker_count: applies to type tensorflow only, not mpi",
            ),
            (
                "command: echo\nimage: x\nresources:\n  instance_count: 2\ndistribution:\n  type: tensorflow\n  worker_count: 2\n  parameter_server_count: 1\n",
                "job.yml:7: distribution.worker_count: worker_count + parameter_server_count (2 + 1) must be a multiple of resources.instance_count (2): each node runs the same number of TensorFlow tasks",
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
                "command: echo\nimage: x\ninputs:\n  d: {type: uri_folder, path: wasbs://c@a.blob.core.windows.net/y}\n",
                "job.yml:4: inputs.d.path: `wasbs://` paths are not supported: use a local path, an https:// URL, or register the storage as a datastore (`drover datastore create`) and use azureml://datastores/NAME/paths/PATH",
            ),
            (
                "command: echo\nimage: x\ninputs:\n  d: {type: uri_folder, path: azureml://datastores/x-y/paths/y}\n",
                "job.yml:4: inputs.d.path: `x-y` is not a datastore name (letters, digits and `_`, starting with a letter)",
            ),
            (
                "command: echo\nimage: x\ninputs:\n  d: {type: uri_folder, path: azureml://datastores/x/paths/../etc}\n",
                "job.yml:4: inputs.d.path: `../etc` has an empty, `.` or `..` component; paths stay inside their folder",
            ),
            (
                "command: echo\nimage: x\ninputs:\n  d: {type: uri_folder, path: 'https://example.com/data'}\n",
                "job.yml:4: inputs.d.type: `https://example.com/data` is a URL: a URL input is a file (type: uri_file); folders come from local paths or datastores",
            ),
            (
                "command: echo\nimage: x\ninputs:\n  d: {type: uri_file, path: 'https://example.com/d.csv', mode: direct}\n",
                "job.yml:4: inputs.d.mode: direct is not supported for inputs; use ro_mount or download",
            ),
            (
                "command: echo\nimage: x\ninputs:\n  d: {type: uri_file, path: azureml:my-data:1}\n",
                "job.yml:4: inputs.d.path: `azureml:my-data:1` is not supported: use a local path, an https:// URL or azureml://datastores/NAME/paths/PATH (registered data assets and job outputs by URI are not supported yet)",
            ),
            (
                "command: echo\nimage: x\noutputs:\n  default: {type: uri_folder}\n",
                "job.yml:4: outputs.default: `default` is the name of the job's artifacts (./outputs and ./logs); pick another",
            ),
            (
                "command: echo\nimage: x\noutputs:\n  o: {type: uri_file, path: ./model.pkl}\n",
                "job.yml:4: outputs.o.path: a uri_file output is written to the artifact store or a datastore path; give a local folder to a uri_folder output",
            ),
            (
                "command: echo\nimage: x\noutputs:\n  o: {type: mltable}\n",
                "job.yml:4: outputs.o.type: expected uri_file or uri_folder, got mltable",
            ),
            (
                "command: echo\nimage: x\ncode: azureml://datastores/x/paths/src\n",
                "job.yml:3: code: must be a local folder (the CLI uploads it as a snapshot)",
            ),
            (
                "command: echo\nimage: x\ntype: sweep\n",
                "job.yml:3: type: only command jobs (and, as a Drover convenience, top-level parallel jobs) are supported, got sweep",
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
    fn values_that_reach_the_engine_are_bounded() {
        let big = "x".repeat(MAX_COMMAND_BYTES + 1);
        for (yaml, expect) in [
            (
                "command: echo\nimage: x\ndistribution:\n  type: mpi\n  process_count_per_instance: 4294967295\n".to_string(),
                "job.yml:5: distribution.process_count_per_instance: must be between 1 and 1024, got 4294967295",
            ),
            (
                "command: echo\nimage: x\nresources:\n  instance_count: 4294967295\n".to_string(),
                "job.yml:4: resources.instance_count: must be between 1 and 10000, got 4294967295",
            ),
            (
                "command: echo\nimage: x\nresources:\n  shm_size: 100000t\n".to_string(),
                "job.yml:4: resources.shm_size: must be at most 64 TiB, got 100000 TiB",
            ),
            (
                "command: echo\nimage: x\nresources:\n  docker_args: --memory 1k\n".to_string(),
                "job.yml:4: resources.docker_args: --memory: must be at least 6 MiB, got 1 KiB",
            ),
            (
                "command: echo\nimage: x\nresources:\n  docker_args: --cpus 1e300\n".to_string(),
                "job.yml:4: resources.docker_args: --cpus: must be between 0.01 and 4096, got 1e300",
            ),
            (
                "command: echo\nimage: x\nresources:\n  docker_args: --stop-timeout 18446744073709551615\n".to_string(),
                "job.yml:4: resources.docker_args: --stop-timeout: must be at most 3600 seconds, got 18446744073709551615",
            ),
            (
                "command: echo\nimage: x\nresources:\n  docker_args: --pids-limit -1\n".to_string(),
                "job.yml:4: resources.docker_args: --pids-limit: must be between 1 and 4194304, got -1 (unlimited is not allowed on a shared node)",
            ),
            (
                "command: echo\nimage: x\nresources:\n  docker_args: --ipc container:abc\n".to_string(),
                "job.yml:4: resources.docker_args: --ipc=container:abc is not allowed: it joins another container's IPC namespace",
            ),
            (
                "command: echo\nimage: x\nresources:\n  docker_args: --label com.docker.x=1\n".to_string(),
                "job.yml:4: resources.docker_args: --label com.docker.x: the com.docker. label prefix is reserved",
            ),
            (
                "command: echo\nimage: x\nresources:\n  docker_args: --tmpfs /t:exec,uid=x\n".to_string(),
                "job.yml:4: resources.docker_args: --tmpfs: option `uid=x` is not allowed (size=, mode=, uid=, gid=, nr_inodes=, ro, rw, [no]exec, [no]suid, [no]dev, [no|rel]atime)",
            ),
            (
                "command: echo\nimage: x\nresources:\n  docker_args: [--user, '--privileged']\n".to_string(),
                "job.yml:4: resources.docker_args: --user: expected NAME|UID[:GROUP|GID], got `--privileged`",
            ),
            (
                format!("command: {big}\nimage: x\n"),
                "job.yml:1: command: is 131072 bytes long with its inputs substituted; a command may be at most 131071 bytes (one argument to sh -c); put long scripts in a file under code",
            ),
            (
                "command: \"echo \\0 x\"\nimage: x\n".to_string(),
                "job.yml:1: command: contains a NUL byte",
            ),
            (
                "command: echo\nimage: x\nenvironment_variables:\n  A=B: x\n".to_string(),
                "job.yml:4: environment_variables.A=B: `A=B` is not a valid environment variable name",
            ),
            (
                "command: echo\nimage: x\nlimits:\n  timeout: 1000d\n".to_string(),
                "job.yml:4: limits.timeout: must be between 1 second and 31536000 seconds (a year), got 86400000",
            ),
            (
                "command: echo\nimage: x\ndrover:\n  mounts: ['/a,b:/c']\n".to_string(),
                "job.yml:4: drover.mounts[0]: /a,b: a host path to mount may not contain `:` or `,`",
            ),
            (
                "command: echo\nimage: x\ndrover:\n  gpus_per_instance: 4294967296\n".to_string(),
                "job.yml:4: drover.gpus_per_instance: must be at most 64, got 4294967295",
            ),
        ] {
            check_error(&yaml, expect);
        }
    }

    #[test]
    fn nothing_is_a_command_or_an_image() {
        check_error(
            "command: ~\nimage: x\n",
            "job.yml:1: command: is required (the command to run)",
        );
        check_error(
            "command: echo\nimage: ~\n",
            "job.yml:2: image: is required (environment: {image: REPO:TAG})",
        );
        check_error(
            "command: echo\nenvironment: ~\n",
            "job.yml:2: environment: is required (environment: {image: REPO:TAG})",
        );
        check_error(
            "command: '  '\nimage: x\n",
            "job.yml:1: command: must not be empty",
        );
    }

    #[test]
    fn a_byte_order_mark_is_read_past_and_a_second_document_is_refused() {
        let j = command("\u{feff}command: echo hi\nimage: busybox\n");
        assert_eq!(j.command, "echo hi");
        let j = command("---\n# a job\ncommand: echo hi\nimage: busybox\n...\n");
        assert_eq!(j.image, "busybox");
        check_error(
            "command: echo\nimage: x\n---\ncommand: rm -rf /\nimage: y\n",
            "job.yml:3: a second yaml document starts here; a file holds one definition",
        );
        check_error(
            "command: echo\nimage: x\n...\ncommand: again\n",
            "job.yml:4: a second yaml document starts here; a file holds one definition",
        );
        // `---` inside a block scalar is indented: content, not a marker.
        let j = command("command: |\n  echo a\n  ---\n  echo b\nimage: x\n");
        assert!(j.command.contains("---"));
    }

    #[test]
    fn set_overrides_apply_to_the_yaml_as_the_azure_cli_does() {
        let sets: Vec<SetOverride> = [
            "resources.instance_count=2",
            "compute=azureml:gpu",
            "environment_variables.MODE=fast",
            "inputs.data={type: uri_folder, path: ./other}",
            "display_name=run: with a colon",
        ]
        .iter()
        .map(|s| s.parse().expect("set"))
        .collect();
        let j = JobSpec::from_yaml_with(
            "job.yml",
            "command: echo ${{inputs.data}}\nimage: x\ninputs:\n  data: {type: uri_folder, path: ./d}\n",
            Path::new("/jobs"),
            &sets,
        )
        .expect("valid")
        .spec
        .into_command()
        .expect("command");
        assert_eq!(j.resources.instance_count, 2);
        assert_eq!(j.compute.as_deref(), Some("gpu"));
        assert_eq!(
            j.environment_variables.get("MODE").map(String::as_str),
            Some("fast")
        );
        assert_eq!(
            j.inputs.get("data"),
            Some(&Input::Path {
                path_kind: PathKind::UriFolder,
                path: "/jobs/other".into(),
                mode: InputMode::RoMount,
            })
        );
        assert_eq!(j.display_name.as_deref(), Some("run: with a colon"));
        // A bad value is the key's problem, marked as from --set.
        let err = JobSpec::from_yaml_with(
            "job.yml",
            "command: echo\nimage: x\n",
            Path::new("/jobs"),
            &["resources.instance_count=two".parse().expect("set")],
        )
        .expect_err("invalid");
        assert_eq!(
            err.to_string(),
            "job.yml: resources.instance_count (--set): expected a positive integer, got two"
        );
        assert!("resources.=1".parse::<SetOverride>().is_err());
        assert!("noequals".parse::<SetOverride>().is_err());
    }

    const PARALLEL: &str = r#"$schema: https://azuremlschemas.azureedge.net/latest/parallelJob.schema.json
type: parallel
display_name: batch score
compute: azureml:cpu-cluster
inputs:
  job_data_path:
    type: mltable
    path: ./table
outputs:
  job_output_path:
    type: uri_folder
input_data: ${{inputs.job_data_path}}
mini_batch_size: "10kb"
resources:
  instance_count: 1
max_concurrency_per_instance: 2
mini_batch_error_threshold: 5
error_threshold: -1
retry_settings:
  max_retries: 3
  timeout: 30
logging_level: DEBUG
environment_variables:
  MODEL: m1
task:
  type: run_function
  code: ./src
  entry_script: score.py
  environment:
    image: drover/base:bookworm
  program_arguments: --model ${{inputs.job_data_path}} --error_threshold 10
  append_row_to: ${{outputs.job_output_path}}
"#;

    #[test]
    fn a_parallel_job_is_the_command_job_of_the_parallel_runtime() {
        let parsed = parse(PARALLEL).expect("parses");
        assert!(
            parsed
                .warnings
                .iter()
                .any(|w| w.to_string().contains("Drover convenience")),
            "{:?}",
            parsed.warnings
        );
        let job = parsed.spec.into_command().expect("a command job");
        assert!(job.drover.parallel_runtime);
        assert_eq!(job.display_name.as_deref(), Some("batch score"));
        assert_eq!(job.compute.as_deref(), Some("cpu-cluster"));
        assert_eq!(job.environment_variables["MODEL"], "m1");
        assert_eq!(job.image, "drover/base:bookworm");
        assert!(matches!(&job.code, Some(Code::Local(p)) if p == Path::new("/jobs/demo/src")));
        assert!(matches!(
            &job.inputs["job_data_path"],
            Input::Path { path, .. } if path == Path::new("/jobs/demo/table")
        ));
        assert_eq!(
            job.command,
            "python3 /drover/parallel/driver.py --code /drover/code --entry-script score.py \
             --input-kind mltable --input ${{inputs.job_data_path}} --mini-batch-size 10240 \
             --work /tmp/drover-parallel --logs logs --workers 2 --max-retries 3 --timeout 30 \
             --mini-batch-error-threshold 5 --error-threshold -1 --node-name \"$(hostname)\" \
             --output ${{outputs.job_output_path}}/parallel_run_step.txt \
             -- --model ${{inputs.job_data_path}} --error_threshold 10"
        );
        assert!(
            job.resolved_command()
                .contains("--input /drover/inputs/job_data_path"),
            "{}",
            job.resolved_command()
        );
    }

    #[test]
    fn parallel_jobs_with_bad_bindings_or_settings_are_file_line_errors() {
        let bad = |from: &str, to: &str, expect: &str| {
            assert!(PARALLEL.contains(from), "{from}");
            check_error(&PARALLEL.replacen(from, to, 1), expect);
        };
        bad(
            "input_data: ${{inputs.job_data_path}}",
            "input_data: ${{inputs.nope}}",
            "job.yml:12: input_data: names input nope, which `inputs` does not declare",
        );
        bad(
            "input_data: ${{inputs.job_data_path}}",
            "input_data: ./data",
            "job.yml:12: input_data: expected ${{inputs.NAME}}, got ./data",
        );
        bad(
            "append_row_to: ${{outputs.job_output_path}}",
            "append_row_to: ${{outputs.scores}}",
            "job.yml:32: task.append_row_to: names output scores, which `outputs` does not declare",
        );
        bad(
            "mini_batch_size: \"10kb\"",
            "mini_batch_size: lots",
            "job.yml:13: mini_batch_size: expected a size such as \"10kb\" or \"1mb\" for tabular input, got lots",
        );
        bad(
            "  instance_count: 1",
            "  instance_count: 2",
            "job.yml:15: resources.instance_count: a top-level parallel job runs on one node for now (its mini-batch queue is the node's); use max_concurrency_per_instance for more workers",
        );
        bad(
            "  entry_script: score.py",
            "  entry_script: ../score.py",
            "job.yml:28: task.entry_script: `../score.py` must be a relative path in the code folder (letters, digits, `_`, `-`, `.`, `/`)",
        );
        bad(
            "  type: run_function",
            "  type: run_script",
            "job.yml:26: task.type: only run_function is supported, got run_script",
        );
        bad(
            "error_threshold: -1",
            "error_threshold: -2",
            "job.yml:18: error_threshold: expected an integer, -1 to ignore failures",
        );
        bad(
            "    type: mltable",
            "    type: uri_file",
            "job.yml:7: inputs.job_data_path: a parallel job's input_data must be a uri_folder or an mltable, got uri_file",
        );
        bad(
            "logging_level: DEBUG",
            "logging_level: LOUD",
            "job.yml:22: logging_level: expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got LOUD",
        );
        let no_task = PARALLEL
            .split("task:")
            .next()
            .unwrap_or_default()
            .to_string();
        check_error(
            &no_task,
            "job.yml:1: task: is required: {type: run_function, code, entry_script, environment}",
        );
        // A uri_folder's mini_batch_size is a file count.
        let folder = PARALLEL.replacen("    type: mltable", "    type: uri_folder", 1);
        check_error(
            &folder,
            "job.yml:13: mini_batch_size: expected a file count (a positive integer) for uri_folder input",
        );
        let folder = folder.replacen("mini_batch_size: \"10kb\"", "mini_batch_size: 5", 1);
        let job = command(&folder);
        assert!(
            job.command.contains("--input-kind uri_folder"),
            "{}",
            job.command
        );
        assert!(
            job.command.contains("--mini-batch-size 5 "),
            "{}",
            job.command
        );
    }

    #[test]
    fn errors_come_in_line_order() {
        let err = parse(
            "name: has space\ncommand: echo\nimage: x\nresources:\n  instance_count: -1\ndrover:\n  gpus_per_instance: 999\n",
        )
        .unwrap_err();
        let lines: Vec<usize> = err.errors.iter().map(|d| d.line).collect();
        let mut sorted = lines.clone();
        sorted.sort();
        assert_eq!(lines, sorted, "{err}");
        assert_eq!(lines.len(), 3, "{err}");
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
        let j = command("command: echo\nimage: x\ncompute: azureml:cpu\n");
        assert_eq!(j.compute.as_deref(), Some("cpu"));
        let j = command("command: echo\nimage: x\ncompute: cpu\n");
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
    fn remote_inputs_and_datastore_outputs_read_as_azure_ml_writes_them() {
        let j = command(
            "command: python train.py --data ${{inputs.data}} --csv ${{inputs.csv}} --model ${{outputs.model}} --score ${{outputs.score}}\nimage: x\ninputs:\n  data:\n    type: uri_folder\n    path: azureml://datastores/workspaceblobstore/paths/datasets/iris/\n    mode: download\n  csv:\n    type: uri_file\n    path: https://azuremlexamples.blob.core.windows.net/datasets/iris.csv\noutputs:\n  model:\n    type: custom_model\n  score:\n    type: uri_file\n    path: azureml://datastores/results/paths/run1/score.json\n    mode: upload\n",
        );
        assert_eq!(
            j.inputs["data"],
            Input::Datastore {
                path_kind: PathKind::UriFolder,
                at: DatastorePath {
                    datastore: "workspaceblobstore".into(),
                    path: "datasets/iris".into()
                },
                mode: InputMode::Download,
            }
        );
        assert_eq!(
            j.inputs["csv"],
            Input::Url {
                path_kind: PathKind::UriFile,
                url: "https://azuremlexamples.blob.core.windows.net/datasets/iris.csv".into(),
                mode: InputMode::RoMount,
            }
        );
        assert_eq!(j.outputs["model"].path_kind, PathKind::UriFolder);
        assert_eq!(j.outputs["score"].mode, OutputMode::Upload);
        assert_eq!(
            j.resolved_command(),
            "python train.py --data /drover/inputs/data --csv /drover/inputs/csv/iris.csv --model /drover/outputs/model --score /drover/outputs/score/score.json"
        );
        // The JSON round-trips, and a stored job of format 2 (code as a
        // string) still reads.
        let spec = JobSpec::Command(CommandJob {
            code: Some(Code::Snapshot(crate::files::BlobInfo {
                digest: "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                    .parse()
                    .unwrap(),
                size: 10240,
            })),
            ..j
        });
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["code"]["size"], 10240);
        assert_eq!(JobSpec::from_value_strict(json).unwrap(), spec);
        let old = serde_json::json!({"type": "command", "format": 2, "command": "x", "image": "y", "code": "/srv/code",
            "inputs": {"d": {"kind": "path", "path_kind": "uri_folder", "path": "/srv/d"}}, "outputs": {"o": {"path": null}}});
        let old = JobSpec::from_value(old).unwrap().into_command().unwrap();
        assert_eq!(old.code, Some(Code::Local("/srv/code".into())));
        assert_eq!(old.outputs["o"], Output::default());
    }
}
