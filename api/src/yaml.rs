//! Typed reading of YAML documents that keeps line numbers for every message.
//!
//! Azure ML definitions (jobs, computes) are read through [`Reader`]: each
//! accessor takes the node and its dotted key path, and on a type mismatch
//! records a [`Diagnostic`] naming the file, line and key instead of failing
//! at once, so the user sees every mistake of a file in one go.

use std::fmt;

use marked_yaml::{LoaderOptions, Node, types::MarkedMappingNode};

/// One message about a definition file, pointing at the line it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// File name as the user gave it (`job.yml`).
    pub file: String,
    /// 1-based line; 0 when the message concerns the whole file.
    pub line: usize,
    /// Dotted key path (`resources.instance_count`); empty for the document.
    pub path: String,
    /// What is wrong, lowercase, no trailing period.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A definition file that could not be accepted: every error found in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidDefinition {
    /// All errors, in document order.
    pub errors: Vec<Diagnostic>,
}

impl fmt::Display for InvalidDefinition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// 1-based line on which `node` starts; 0 for a node that came from a
/// `--set` override rather than from the file.
pub(crate) fn line_of(node: &Node) -> usize {
    node.span()
        .start()
        .filter(|m| m.source() == FILE_SOURCE)
        .map(|m| m.line())
        .unwrap_or(0)
}

/// Whether `node` came from a `--set` override.
fn from_set(node: &Node) -> bool {
    node.span()
        .start()
        .is_some_and(|m| m.source() != FILE_SOURCE)
}

/// The source number of the definition file's own nodes; `--set` values
/// are parsed as sources 1, 2, ….
const FILE_SOURCE: usize = 0;

/// One `--set KEY=VALUE` override of a definition file, as the Azure CLI
/// takes it (`az ml job create -f job.yml --set resources.instance_count=2`):
/// a dotted key path into the YAML and a YAML value (`2`, `azureml:cpu`,
/// `{type: uri_folder, path: ./data}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOverride {
    /// Dotted key path (`resources.instance_count`).
    pub path: String,
    /// The value, as YAML.
    pub value: String,
}

impl std::str::FromStr for SetOverride {
    type Err = String;

    fn from_str(arg: &str) -> Result<Self, String> {
        let (path, value) = arg
            .split_once('=')
            .ok_or_else(|| format!("expected KEY=VALUE, got {arg}"))?;
        let path = path.trim();
        if path.is_empty() || path.split('.').any(|k| k.trim().is_empty()) {
            return Err(format!(
                "expected a dotted key like resources.instance_count, got {path}"
            ));
        }
        Ok(SetOverride {
            path: path.to_string(),
            value: value.to_string(),
        })
    }
}

/// Parses `text` and applies `sets` over it: each key path is created as
/// needed, its value replaced. Problems with a value are later reported as
/// the key's, marked as coming from `--set`.
pub(crate) fn parse_mapping_with(
    file: &str,
    text: &str,
    sets: &[SetOverride],
) -> Result<Node, InvalidDefinition> {
    let mut root = parse_mapping(file, text)?;
    for (i, set) in sets.iter().enumerate() {
        let value = set_value(i + 1, &set.value);
        let mut node = &mut root;
        let keys: Vec<&str> = set.path.split('.').map(str::trim).collect();
        for (depth, key) in keys.iter().enumerate() {
            let Some(map) = node.as_mapping_mut() else {
                return Err(InvalidDefinition {
                    errors: vec![Diagnostic {
                        file: file.to_string(),
                        line: 0,
                        path: keys[..depth].join("."),
                        message: format!(
                            "--set {}: is not a mapping, so it has no key {key}",
                            set.path
                        ),
                    }],
                });
            };
            let k = marked_yaml::types::MarkedScalarNode::new(marked_yaml::Span::new_blank(), *key);
            if depth + 1 == keys.len() {
                map.insert(k, value);
                break;
            }
            node = map.entry(k).or_insert_with(|| {
                Node::Mapping(marked_yaml::types::MarkedMappingNode::new_empty(
                    marked_yaml::Span::new_blank(),
                ))
            });
        }
    }
    Ok(root)
}

/// A `--set` value as YAML (so numbers, lists and `{…}` mean what they
/// mean in the file); a value that is not YAML is taken as a string.
fn set_value(source: usize, value: &str) -> Node {
    marked_yaml::parse_yaml(source, format!("v: {value}"))
        .ok()
        .and_then(|n| n.as_mapping().and_then(|m| m.get_node("v")).cloned())
        .unwrap_or_else(|| {
            let mut span = marked_yaml::Span::new_blank();
            span.set_start(Some(marked_yaml::Marker::new(source, 0, 1, 1)));
            Node::Scalar(marked_yaml::types::MarkedScalarNode::new(span, value))
        })
}

/// Parses `text` into a top-level mapping, or one diagnostic saying why not.
pub(crate) fn parse_mapping(file: &str, text: &str) -> Result<Node, InvalidDefinition> {
    let one = |line: usize, message: String| InvalidDefinition {
        errors: vec![Diagnostic {
            file: file.to_string(),
            line,
            path: String::new(),
            message,
        }],
    };
    // A UTF-8 byte order mark (editors on Windows write one) is not content.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if let Some(line) = second_document(text) {
        return Err(one(
            line,
            "a second yaml document starts here; a file holds one definition".to_string(),
        ));
    }
    let options = LoaderOptions::default().error_on_duplicate_keys(true);
    marked_yaml::parse_yaml_with_options(0, text, options).map_err(|e| {
        use marked_yaml::LoadError as E;
        let (line, message) = match &e {
            E::TopLevelMustBeMapping(m) => (
                m.line(),
                "the document must be a mapping of keys to values".to_string(),
            ),
            E::TopLevelMustBeSequence(m) => (m.line(), "expected a sequence".to_string()),
            E::UnexpectedAnchor(m) => (m.line(), "yaml anchors are not supported".to_string()),
            E::MappingKeyMustBeScalar(m) => (m.line(), "mapping keys must be plain values".into()),
            E::UnexpectedTag(m) => (m.line(), "yaml tags are not supported".to_string()),
            E::ScanError(m, se) => (m.line(), format!("invalid yaml: {}", se.info())),
            E::DuplicateKey(d) => (
                d.key.span().start().map(|m| m.line()).unwrap_or(0),
                format!(
                    "duplicate key `{}` (first defined on line {})",
                    d.key.as_str(),
                    d.prev_key.span().start().map(|m| m.line()).unwrap_or(0)
                ),
            ),
        };
        InvalidDefinition {
            errors: vec![Diagnostic {
                file: file.to_string(),
                line,
                path: String::new(),
                message,
            }],
        }
    })
}

/// The 1-based line where a second YAML document starts, if one does: a
/// `---` marker after content, or content after a `...` end marker. Markers
/// sit at column 0, which no scalar's continuation line may (YAML 1.2 §9.1),
/// so a line scan finds them exactly.
fn second_document(text: &str) -> Option<usize> {
    let mut content = false;
    let mut ended = false;
    for (i, line) in text.lines().enumerate() {
        let marker = |m: &str| {
            line.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '#']))
        };
        if marker("---") {
            if content || ended {
                return Some(i + 1);
            }
            continue;
        }
        if marker("...") {
            ended = content;
            continue;
        }
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') || line.starts_with('%') {
            continue;
        }
        if ended {
            return Some(i + 1);
        }
        content = true;
    }
    None
}

/// Collects diagnostics while a definition is read.
pub(crate) struct Reader {
    file: String,
    pub(crate) errors: Vec<Diagnostic>,
    pub(crate) warnings: Vec<Diagnostic>,
}

/// Joins a parent key path and a child key.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// A short rendering of a node for messages (`-1`, `a mapping`, `a list`).
fn describe(node: &Node) -> String {
    match node {
        Node::Scalar(s) => {
            let v = s.as_str();
            if v.chars().count() > 40 {
                format!("`{}…`", v.chars().take(40).collect::<String>())
            } else {
                v.to_string()
            }
        }
        Node::Mapping(_) => "a mapping".to_string(),
        Node::Sequence(_) => "a list".to_string(),
    }
}

/// True for YAML's null spellings (and an empty value).
pub(crate) fn is_null(node: &Node) -> bool {
    match node {
        Node::Scalar(s) => {
            s.may_coerce() && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL")
        }
        _ => false,
    }
}

impl Reader {
    pub(crate) fn new(file: &str) -> Self {
        Reader {
            file: file.to_string(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn diag(&self, line: usize, path: &str, message: String) -> Diagnostic {
        Diagnostic {
            file: self.file.clone(),
            line,
            path: path.to_string(),
            message,
        }
    }

    /// Records an error about `node` at `path`.
    pub(crate) fn error(&mut self, node: &Node, path: &str, message: impl Into<String>) {
        let path = if from_set(node) {
            format!("{path} (--set)")
        } else {
            path.to_string()
        };
        let d = self.diag(line_of(node), &path, message.into());
        self.errors.push(d);
    }

    /// Records an error at an explicit line.
    pub(crate) fn error_at(&mut self, line: usize, path: &str, message: impl Into<String>) {
        let d = self.diag(line, path, message.into());
        self.errors.push(d);
    }

    /// Records a warning about `node` at `path`.
    pub(crate) fn warn(&mut self, node: &Node, path: &str, message: impl Into<String>) {
        let d = self.diag(line_of(node), path, message.into());
        self.warnings.push(d);
    }

    /// Turns the collected errors into a result.
    pub(crate) fn finish<T>(self, value: T) -> Result<(T, Vec<Diagnostic>), InvalidDefinition> {
        if self.errors.is_empty() {
            Ok((value, self.warnings))
        } else {
            Err(InvalidDefinition {
                errors: self.errors,
            })
        }
    }

    /// `node` as a mapping whose keys must be among `known`; others warn.
    /// `known` empty means any key is accepted.
    pub(crate) fn mapping<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        known: &[&str],
    ) -> Option<&'n MarkedMappingNode> {
        match node {
            Node::Mapping(m) => {
                if !known.is_empty() {
                    for (k, v) in m.iter() {
                        if !known.contains(&k.as_str()) {
                            self.warn(
                                v,
                                &join(path, k.as_str()),
                                "unknown key, ignored".to_string(),
                            );
                        }
                    }
                }
                Some(m)
            }
            other => {
                self.error(
                    other,
                    path,
                    format!("expected a mapping, got {}", describe(other)),
                );
                None
            }
        }
    }

    /// A scalar as a string (numbers and booleans are accepted as written).
    pub(crate) fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match node {
            Node::Scalar(s) => Some(s.as_str().to_string()),
            other => {
                self.error(
                    other,
                    path,
                    format!("expected a string, got {}", describe(other)),
                );
                None
            }
        }
    }

    /// A non-empty string.
    pub(crate) fn non_empty(&mut self, node: &Node, path: &str) -> Option<String> {
        let s = self.string(node, path)?;
        if s.trim().is_empty() {
            self.error(node, path, "must not be empty");
            None
        } else {
            Some(s)
        }
    }

    /// An integer ≥ 1.
    pub(crate) fn positive(&mut self, node: &Node, path: &str) -> Option<u32> {
        match node.as_scalar().and_then(|s| s.as_i64()) {
            Some(n) if n >= 1 && n <= i64::from(u32::MAX) => Some(n as u32),
            _ => {
                self.error(
                    node,
                    path,
                    format!("expected a positive integer, got {}", describe(node)),
                );
                None
            }
        }
    }

    /// An integer ≥ 0.
    pub(crate) fn non_negative(&mut self, node: &Node, path: &str) -> Option<u64> {
        match node.as_scalar().and_then(|s| s.as_i64()) {
            Some(n) if n >= 0 => Some(n as u64),
            _ => {
                self.error(
                    node,
                    path,
                    format!("expected a non-negative integer, got {}", describe(node)),
                );
                None
            }
        }
    }

    /// A boolean (`true`/`false` and YAML's other spellings).
    pub(crate) fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        match node.as_scalar().and_then(|s| s.as_bool()) {
            Some(b) => Some(b),
            None => {
                self.error(
                    node,
                    path,
                    format!("expected true or false, got {}", describe(node)),
                );
                None
            }
        }
    }

    /// A mapping of string keys to scalar values (tags, environment variables).
    pub(crate) fn string_map(
        &mut self,
        node: &Node,
        path: &str,
    ) -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        if is_null(node) {
            return out;
        }
        if let Some(m) = self.mapping(node, path, &[]) {
            for (k, v) in m.iter() {
                let p = join(path, k.as_str());
                let value = if is_null(v) {
                    Some(String::new())
                } else {
                    self.string(v, &p)
                };
                if let Some(value) = value {
                    out.insert(k.as_str().to_string(), value);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnostic_renders_file_line_path_message() {
        let d = Diagnostic {
            file: "job.yml".into(),
            line: 7,
            path: "resources.instance_count".into(),
            message: "expected a positive integer, got -1".into(),
        };
        assert_eq!(
            d.to_string(),
            "job.yml:7: resources.instance_count: expected a positive integer, got -1"
        );
    }

    #[test]
    fn malformed_yaml_names_the_line() {
        let err = parse_mapping("job.yml", "command: echo\nresources: [a\n").unwrap_err();
        assert_eq!(err.errors.len(), 1);
        let text = err.to_string();
        assert!(text.starts_with("job.yml:"), "{text}");
        assert!(text.contains("invalid yaml"), "{text}");
    }

    #[test]
    fn top_level_list_is_refused() {
        let err = parse_mapping("job.yml", "- a\n- b\n").unwrap_err();
        assert!(err.to_string().contains("must be a mapping"), "{err}");
    }

    #[test]
    fn duplicate_keys_are_refused_with_both_lines() {
        let err = parse_mapping("job.yml", "command: a\nname: x\ncommand: b\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "job.yml:3: duplicate key `command` (first defined on line 1)"
        );
    }
}
