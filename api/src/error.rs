//! Pieces every error report of Drover shares: a problem with one named
//! field of a definition, and the one way an error's cause chain is written.

use std::fmt;

/// One problem with a definition given as flags or over the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field as the user named it (`--max-nodes`, `max_nodes`,
    /// `resources.docker_args.ipc`, `drover.mounts[0].source`).
    pub field: String,
    /// What is wrong, lowercase, no trailing period.
    pub message: String,
}

impl FieldError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Writes `errors` one per line.
pub(crate) fn write_lines(f: &mut fmt::Formatter<'_>, errors: &[FieldError]) -> fmt::Result {
    for (i, e) in errors.iter().enumerate() {
        if i > 0 {
            writeln!(f)?;
        }
        write!(f, "{e}")?;
    }
    Ok(())
}

/// An error and its causes, `: `-joined, the way `anyhow` prints `{:#}`.
///
/// A cause whose text the chain already ends with is written once: errors
/// that are `#[error(transparent)]` or that repeat their source in their own
/// message would otherwise print it twice.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot pull {0}")]
    struct Pull(&'static str, #[source] Io);

    #[derive(Debug, thiserror::Error)]
    #[error(transparent)]
    struct Wrapper(#[from] Pull);

    #[derive(Debug, thiserror::Error)]
    #[error("connection refused")]
    struct Io;

    #[test]
    fn chains_are_joined_once() {
        assert_eq!(chain(&Pull("x", Io)), "cannot pull x: connection refused");
        assert_eq!(
            chain(&Wrapper(Pull("x", Io))),
            "cannot pull x: connection refused"
        );
        assert_eq!(chain(&Io), "connection refused");
    }

    #[test]
    fn field_errors_print_their_field() {
        assert_eq!(
            FieldError::new("resources.docker_args.ipc", "bad").to_string(),
            "resources.docker_args.ipc: bad"
        );
        assert_eq!(FieldError::new("", "whole").to_string(), "whole");
    }
}
