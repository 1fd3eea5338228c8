//! Azure ML's parallel job (`type: parallel`) as a top-level job, a Drover
//! convenience (Azure ML runs parallel steps only inside pipeline jobs;
//! its CLI refuses this). The document is read as the command job that
//! runs Drover's parallel runtime (`runner/parallel/driver.py`, mounted at
//! [`PARALLEL_DRIVER_PATH`]) over the step's input: the keys a command job
//! shares (`inputs`, `outputs`, `compute`, `resources`, …) keep their own
//! lines, `task.code` and `task.environment` become the job's, and the
//! parallel settings become the driver's arguments.

use marked_yaml::Node;
use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};

use super::CODE_DIR;
use crate::units::parse_bytes;
use crate::yaml::{Reader, is_null, join};

/// Where the parallel runtime is mounted in a parallel job's container.
pub const PARALLEL_DRIVER_PATH: &str = "/drover/parallel/driver.py";

/// Where the runtime keeps its mini-batch queue inside the container.
const WORK_DIR: &str = "/tmp/drover-parallel";

/// Keys of a command job a parallel job has too, copied as they are.
const SHARED_KEYS: &[&str] = &[
    "name",
    "display_name",
    "experiment_name",
    "description",
    "tags",
    "compute",
    "inputs",
    "outputs",
    "resources",
    "environment_variables",
    "identity",
    "drover",
];

const PARALLEL_KEYS: &[&str] = &[
    "$schema",
    "type",
    "input_data",
    "mini_batch_size",
    "partition_keys",
    "max_concurrency_per_instance",
    "mini_batch_error_threshold",
    "error_threshold",
    "retry_settings",
    "logging_level",
    "task",
];

const TASK_KEYS: &[&str] = &[
    "type",
    "code",
    "entry_script",
    "environment",
    "program_arguments",
    "append_row_to",
];

/// The command-job document a parallel job runs as; `None` after errors.
pub(super) fn as_command_document(r: &mut Reader, root: &Node) -> Option<Node> {
    let known: Vec<&str> = SHARED_KEYS.iter().chain(PARALLEL_KEYS).copied().collect();
    let top = r.mapping(root, "", &known)?;
    let get = |k: &str| top.get_node(k).filter(|n| !is_null(n));
    let span = *root.span();
    let scalar = |text: &str| MarkedScalarNode::new(span, text.to_string());

    let mut ok = true;
    let input = get("input_data").and_then(|n| {
        let text = r.non_empty(n, "input_data")?;
        match binding(&text, "inputs") {
            Some(name) => Some((name, n.clone())),
            None => {
                r.error(
                    n,
                    "input_data",
                    format!("expected ${{{{inputs.NAME}}}}, got {text}"),
                );
                None
            }
        }
    });
    if get("input_data").is_none() {
        r.error(
            root,
            "input_data",
            "is required: the input to split into mini-batches, ${{inputs.NAME}}",
        );
    }
    let kind = input.as_ref().and_then(|(name, node)| {
        let declared = get("inputs")
            .and_then(|i| i.as_mapping())
            .and_then(|i| i.get_node(name));
        let Some(declared) = declared else {
            r.error(node, "input_data", format!("names input {name}, which `inputs` does not declare"));
            return None;
        };
        let kind = declared
            .as_mapping()
            .and_then(|m| m.get_scalar("type"))
            .map(|t| t.as_str().to_string())
            .unwrap_or_else(|| "uri_folder".to_string());
        match kind.as_str() {
            "uri_folder" | "mltable" => Some(kind),
            other => {
                r.error(
                    declared,
                    &join("inputs", name),
                    format!("a parallel job's input_data must be a uri_folder or an mltable, got {other}"),
                );
                None
            }
        }
    });
    if input.is_some() && kind.is_none() {
        ok = false;
    }
    let mini_batch_size = match (get("mini_batch_size"), kind.as_deref()) {
        (None, Some("mltable")) => "1mb".to_string(),
        (None, _) => "10".to_string(),
        (Some(n), Some("mltable")) => {
            let text = r.non_empty(n, "mini_batch_size").unwrap_or_default();
            match parse_bytes(&text) {
                Ok(b) if b > 0 => format!("{b}"),
                _ => {
                    r.error(n, "mini_batch_size", format!("expected a size such as \"10kb\" or \"1mb\" for tabular input, got {text}"));
                    String::new()
                }
            }
        }
        (Some(n), _) => match n
            .as_scalar()
            .and_then(|s| s.as_str().trim().parse::<u32>().ok())
        {
            Some(count) if count >= 1 => count.to_string(),
            _ => {
                r.error(
                    n,
                    "mini_batch_size",
                    "expected a file count (a positive integer) for uri_folder input",
                );
                String::new()
            }
        },
    };
    if let Some(n) = get("partition_keys") {
        r.error(
            n,
            "partition_keys",
            "partitioning by keys is not supported yet; use mini_batch_size",
        );
    }
    let workers = get("max_concurrency_per_instance")
        .and_then(|n| r.positive(n, "max_concurrency_per_instance"))
        .unwrap_or(1);
    let threshold = |r: &mut Reader, key: &str| -> i64 {
        match get(key) {
            None => -1,
            Some(n) => match n.as_scalar().and_then(|s| s.as_i64()) {
                Some(v) if v >= -1 => v,
                _ => {
                    r.error(n, key, "expected an integer, -1 to ignore failures");
                    -1
                }
            },
        }
    };
    let mini_batch_errors = threshold(r, "mini_batch_error_threshold");
    let item_errors = threshold(r, "error_threshold");
    let (mut max_retries, mut timeout) = (2u64, 60u64);
    if let Some(n) = get("retry_settings")
        && let Some(m) = r.mapping(n, "retry_settings", &["max_retries", "timeout"])
    {
        if let Some(v) = m.get_node("max_retries") {
            max_retries = r.non_negative(v, "retry_settings.max_retries").unwrap_or(2);
        }
        if let Some(v) = m.get_node("timeout") {
            timeout = r.non_negative(v, "retry_settings.timeout").unwrap_or(60);
        }
    }
    if let Some(n) = get("logging_level") {
        let level = r.string(n, "logging_level").unwrap_or_default();
        if !["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
            .contains(&level.to_uppercase().as_str())
        {
            r.error(
                n,
                "logging_level",
                format!("expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {level}"),
            );
        }
    }
    if let Some(n) = get("resources")
        .and_then(|res| res.as_mapping())
        .and_then(|res| res.get_node("instance_count"))
        && n.as_scalar().and_then(|s| s.as_i64()) != Some(1)
    {
        r.error(n, "resources.instance_count", "a top-level parallel job runs on one node for now (its mini-batch queue is the node's); use max_concurrency_per_instance for more workers");
    }

    let Some(task_node) = get("task") else {
        r.error(
            root,
            "task",
            "is required: {type: run_function, code, entry_script, environment}",
        );
        return None;
    };
    let task = r.mapping(task_node, "task", TASK_KEYS)?;
    let task_get = |k: &str| task.get_node(k).filter(|n| !is_null(n));
    if let Some(n) = task_get("type")
        && let Some(t) = r.string(n, "task.type")
        && t != "run_function"
    {
        r.error(
            n,
            "task.type",
            format!("only run_function is supported, got {t}"),
        );
    }
    let entry_script = match task_get("entry_script") {
        None => {
            r.error(
                task_node,
                "task.entry_script",
                "is required: the script with init() and run(mini_batch)",
            );
            None
        }
        Some(n) => {
            let text = r.non_empty(n, "task.entry_script");
            match text {
                Some(s) if is_plain_path(&s) => Some(s),
                Some(s) => {
                    r.error(n, "task.entry_script", format!("`{s}` must be a relative path in the code folder (letters, digits, `_`, `-`, `.`, `/`)"));
                    None
                }
                None => None,
            }
        }
    };
    if task_get("environment").is_none() {
        r.error(task_node, "task.environment", "is required: the environment the entry script runs in (it needs python3; pandas for mltable input)");
        ok = false;
    }
    let program_arguments = task_get("program_arguments")
        .and_then(|n| r.string(n, "task.program_arguments"))
        .unwrap_or_default();
    let output = task_get("append_row_to").and_then(|n| {
        let text = r.non_empty(n, "task.append_row_to")?;
        let Some(name) = binding(&text, "outputs") else {
            r.error(
                n,
                "task.append_row_to",
                format!("expected ${{{{outputs.NAME}}}}, got {text}"),
            );
            return None;
        };
        let declared = get("outputs")
            .and_then(|o| o.as_mapping())
            .is_some_and(|o| o.get_node(&name).is_some());
        if !declared {
            r.error(
                n,
                "task.append_row_to",
                format!("names output {name}, which `outputs` does not declare"),
            );
            return None;
        }
        Some(name)
    });

    let (Some((input_name, _)), Some(kind), Some(entry_script), true) =
        (input, kind, entry_script, ok && !mini_batch_size.is_empty())
    else {
        return None;
    };
    let mut command = format!(
        "python3 {PARALLEL_DRIVER_PATH} --code {CODE_DIR} --entry-script {entry_script} \
         --input-kind {kind} --input ${{{{inputs.{input_name}}}}} --mini-batch-size {mini_batch_size} \
         --work {WORK_DIR} --logs logs --workers {workers} --max-retries {max_retries} \
         --timeout {timeout} --mini-batch-error-threshold {mini_batch_errors} \
         --error-threshold {item_errors} --node-name \"$(hostname)\""
    );
    if let Some(out) = output {
        command.push_str(&format!(
            " --output ${{{{outputs.{out}}}}}/parallel_run_step.txt"
        ));
    }
    command.push_str(" --");
    if !program_arguments.trim().is_empty() {
        command.push(' ');
        command.push_str(program_arguments.trim());
    }

    let mut entries: Vec<(MarkedScalarNode, Node)> = Vec::new();
    for (k, v) in top.iter() {
        if SHARED_KEYS.contains(&k.as_str()) {
            entries.push((k.clone(), v.clone()));
        }
    }
    entries.push((
        scalar("command"),
        Node::Scalar(MarkedScalarNode::new(*task_node.span(), command)),
    ));
    for key in ["code", "environment"] {
        if let Some((k, v)) = task.iter().find(|(k, _)| k.as_str() == key) {
            entries.push((k.clone(), v.clone()));
        }
    }
    let mut mapping: MarkedMappingNode = entries.into_iter().collect();
    *mapping.span_mut() = span;
    Some(Node::Mapping(mapping))
}

/// `NAME` of `${{KIND.NAME}}`.
fn binding(text: &str, kind: &str) -> Option<String> {
    let inner = text.trim().strip_prefix("${{")?.strip_suffix("}}")?.trim();
    let name = inner.strip_prefix(kind)?.strip_prefix('.')?;
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .then(|| name.to_string())
}

/// A relative path a shell word can carry unquoted.
fn is_plain_path(s: &str) -> bool {
    !s.starts_with('/')
        && !s.split('/').any(|c| c == "..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_and_entry_scripts_are_read_strictly() {
        assert_eq!(
            binding("${{inputs.job_data}}", "inputs").as_deref(),
            Some("job_data")
        );
        assert_eq!(
            binding(" ${{ outputs.out }} ", "outputs").as_deref(),
            Some("out")
        );
        assert_eq!(binding("${{inputs.a}}", "outputs"), None);
        assert_eq!(binding("${{inputs.a;rm}}", "inputs"), None);
        assert_eq!(binding("./data", "inputs"), None);
        assert!(is_plain_path("score.py") && is_plain_path("src/batch_score.py"));
        assert!(!is_plain_path("../x.py") && !is_plain_path("/x.py") && !is_plain_path("a b.py"));
        assert!(!is_plain_path("x.py;rm -rf /"));
    }
}
