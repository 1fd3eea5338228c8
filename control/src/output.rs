//! What the output of every `drover` command shares: a standard output that
//! may be a closed pipe (`drover job logs X | head -1`), notes on stderr
//! that never fail a command, escape codes only where they are welcome,
//! and the prefix that says which process of a job wrote a log line.

use std::fmt;
use std::io::{self, Write};

/// The exit status of a command whose standard output was closed: 128 +
/// SIGPIPE, what a shell reports for a process that a closed pipe ended.
pub const CLOSED_PIPE_EXIT: i32 = 141;

/// Writing to standard output failed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Nobody reads it any more (a closed pipe): the command stops quietly
    /// with [`CLOSED_PIPE_EXIT`].
    #[error("standard output is closed")]
    Closed,
    /// Any other failure.
    #[error("cannot write to standard output")]
    Write(#[source] io::Error),
}

impl OutputError {
    /// `e` as an output error: a broken pipe is [`OutputError::Closed`].
    pub fn from_io(e: io::Error) -> OutputError {
        if e.kind() == io::ErrorKind::BrokenPipe {
            OutputError::Closed
        } else {
            OutputError::Write(e)
        }
    }
}

/// Writes `text` to standard output as it is, and flushes it.
pub fn print(text: &str) -> Result<(), OutputError> {
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(OutputError::from_io)
}

/// Writes `text` and a newline to standard output.
pub fn println(text: impl fmt::Display) -> Result<(), OutputError> {
    print(&format!("{text}\n"))
}

/// Writes a line to standard error. A standard error nobody reads is not
/// the command's failure: there is nowhere left to say anything.
pub fn note(text: impl fmt::Display) {
    let _ = writeln!(io::stderr(), "{text}");
}

/// Whether escape codes (colours, progress bars that redraw) may go to a
/// stream: only to a terminal, and not when `NO_COLOR` is set to anything
/// but the empty string (<https://no-color.org>).
pub fn escape_codes_allowed(is_terminal: bool) -> bool {
    is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The prefix that says which process of a job wrote a log line:
/// `[node 1 rank 3] ` for a line of a rank, `[node 1] ` for one of a node
/// of a multi-node or multi-process job (its only process, or drover-init
/// and the agent), nothing for a single process on a single node
/// (`multi` false).
pub fn line_prefix(multi: bool, node_rank: u32, rank: Option<u32>) -> String {
    match rank {
        Some(rank) => format!("[node {node_rank} rank {rank}] "),
        None if multi => format!("[node {node_rank}] "),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_name_the_node_and_the_rank_when_there_is_more_than_one() {
        assert_eq!(line_prefix(false, 0, None), "");
        assert_eq!(line_prefix(true, 1, None), "[node 1] ");
        assert_eq!(line_prefix(true, 1, Some(3)), "[node 1 rank 3] ");
        // A ranked line says so whatever the caller guessed.
        assert_eq!(line_prefix(false, 0, Some(2)), "[node 0 rank 2] ");
    }

    #[test]
    fn a_broken_pipe_is_a_closed_output_and_other_errors_are_not() {
        let closed = OutputError::from_io(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(matches!(closed, OutputError::Closed));
        let full = OutputError::from_io(io::Error::from(io::ErrorKind::StorageFull));
        assert!(matches!(full, OutputError::Write(_)));
    }
}
