//! The token endpoint's audit log: one JSON line per request in
//! `<data dir>/audit/identity.jsonl`, appended. Never the token, never a
//! secret. The only module that writes it.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The audit log's folder under the agent's data dir.
pub const AUDIT_DIR: &str = "audit";
/// The token endpoint's audit log in [`AUDIT_DIR`].
pub const AUDIT_FILE: &str = "identity.jsonl";

/// One request, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When it was answered (RFC 3339, UTC, milliseconds).
    pub time: String,
    /// The part whose secret it carried: its job…
    pub job: Option<String>,
    /// …attempt…
    pub attempt: Option<u32>,
    /// …and node rank (`None`: no secret, or none that a part holds).
    pub node_rank: Option<u32>,
    /// `azure_ml` or `app_service`.
    pub protocol: String,
    /// The identity asked for: `system`, `client_id:ID`, `object_id:ID` or
    /// `resource_id:ID` (the part's default when the request named none);
    /// `None` when the request was refused before that was known.
    pub identity: Option<String>,
    /// The resource (or scope) asked for.
    pub resource: Option<String>,
    /// `issued`, or why not (see `identity::Outcome`).
    pub outcome: String,
    /// The HTTP status answered.
    pub status: u16,
    /// From the request's arrival to its answer.
    pub latency_ms: f64,
    /// The ARM id of the identity a token was issued for (its `xms_mirid`).
    pub granted: Option<String>,
}

/// Why the audit log cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Its folder or file could not be made or opened.
    #[error("opening the identity audit log {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The audit log, open for appending.
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (creating) `<data_dir>/audit/identity.jsonl` for appending.
    pub fn open(data_dir: &Path) -> Result<Self, AuditError> {
        let dir = data_dir.join(AUDIT_DIR);
        let path = dir.join(AUDIT_FILE);
        let err = |source| AuditError::Open {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(err)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(err)?;
        Ok(AuditLog {
            path,
            file: Mutex::new(file),
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record: the whole line in one `write` on a file opened
    /// with `O_APPEND`, so lines never interleave, even with a reader (or a
    /// second writer) on the file. A failure is logged, not returned: the
    /// request was answered already.
    pub fn record(&self, record: &AuditRecord) {
        let mut line = match serde_json::to_vec(record) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "identity audit record does not serialize");
                return;
            }
        };
        line.push(b'\n');
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        // `&File` writes: the mutex keeps one line per write call.
        if let Err(e) = (&*file).write_all(&line) {
            tracing::error!(path = %self.path.display(), error = %e, "writing the identity audit log failed");
        }
    }
}

/// `t` as the audit log writes times.
pub fn audit_time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_whole_lines_appended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = AuditRecord {
            time: audit_time(SystemTime::UNIX_EPOCH),
            job: Some("j".into()),
            attempt: Some(1),
            node_rank: Some(0),
            protocol: "azure_ml".into(),
            identity: Some("system".into()),
            resource: Some("https://management.azure.com".into()),
            outcome: "issued".into(),
            status: 200,
            latency_ms: 0.5,
            granted: None,
        };
        {
            let log = AuditLog::open(dir.path()).expect("open");
            log.record(&record);
        }
        // Reopened (an agent restart): appended, not truncated.
        let log = AuditLog::open(dir.path()).expect("reopen");
        log.record(&AuditRecord {
            outcome: "no_secret".into(),
            ..record.clone()
        });
        let text = std::fs::read_to_string(log.path()).expect("read");
        let lines: Vec<AuditRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a json line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], record);
        assert_eq!(lines[1].outcome, "no_secret");
        assert_eq!(lines[0].time, "1970-01-01T00:00:00.000Z");
        assert!(text.ends_with('\n'));
    }
}
