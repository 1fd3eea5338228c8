//! Copies of datastore outputs into their datastores, recorded so that a
//! restarted server resumes them.

use std::fmt;
use std::str::FromStr;

use drover_api::cluster::Timestamp;
use rusqlite::params;

use super::{Store, StoreError, count, ms, parse_col};

/// Where a copy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportState {
    /// To be copied (again).
    Pending,
    /// Copied.
    Done,
    /// Failed; the error says why.
    Failed,
}

impl ExportState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExportState::Pending => "pending",
            ExportState::Done => "done",
            ExportState::Failed => "failed",
        }
    }
}

impl fmt::Display for ExportState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown export state.
#[derive(Debug, thiserror::Error)]
#[error("unknown export state `{0}`")]
pub struct UnknownExportState(String);

impl FromStr for ExportState {
    type Err = UnknownExportState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(ExportState::Pending),
            "done" => Ok(ExportState::Done),
            "failed" => Ok(ExportState::Failed),
            other => Err(UnknownExportState(other.to_string())),
        }
    }
}

/// One output's copy into a datastore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The job.
    pub job: String,
    /// Its attempt.
    pub attempt: u32,
    /// The output.
    pub output: String,
    /// The datastore.
    pub datastore: String,
    /// The path in it, substituted.
    pub path: String,
    /// Where it stands.
    pub state: ExportState,
    /// Files copied by the last copy.
    pub files_done: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// Bumped by each post that asks for a copy.
    pub generation: u64,
}

const EXPORT_COLUMNS: &str =
    "job, attempt, output, datastore, path, state, files_done, error, generation";

fn read_export(r: &rusqlite::Row<'_>) -> rusqlite::Result<Export> {
    Ok(Export {
        job: r.get("job")?,
        attempt: count(r.get("attempt")?),
        output: r.get("output")?,
        datastore: r.get("datastore")?,
        path: r.get("path")?,
        state: parse_col(r, "state")?,
        files_done: u64::try_from(r.get::<_, i64>("files_done")?).unwrap_or(0),
        error: r.get("error")?,
        generation: u64::try_from(r.get::<_, i64>("generation")?).unwrap_or(0),
    })
}

impl Store {
    /// Asks for (another) copy of an output into its datastore.
    pub fn request_export(
        &mut self,
        job: &str,
        attempt: u32,
        output: &str,
        datastore: &str,
        path: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO output_exports (job, attempt, output, datastore, path, state, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6)
             ON CONFLICT (job, attempt, output) DO UPDATE
             SET state = 'pending', error = NULL, generation = generation + 1,
                 datastore = excluded.datastore, path = excluded.path,
                 updated_at = excluded.updated_at",
            params![job, attempt, output, datastore, path, ms(now)],
        )?;
        Ok(())
    }

    /// Copies still to make, oldest first.
    pub fn pending_exports(&self) -> Result<Vec<Export>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {EXPORT_COLUMNS} FROM output_exports WHERE state = 'pending' ORDER BY updated_at"
        ))?;
        Ok(stmt
            .query_map([], read_export)?
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// The copies of a job's attempt.
    pub fn exports(&self, job: &str, attempt: u32) -> Result<Vec<Export>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {EXPORT_COLUMNS} FROM output_exports WHERE job = ?1 AND attempt = ?2 ORDER BY output"
        ))?;
        Ok(stmt
            .query_map(params![job, attempt], read_export)?
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// Records how a copy of generation `generation` ended; a newer request
    /// made meanwhile stays pending. Returns whether it was recorded.
    pub fn finish_export(
        &mut self,
        export: &Export,
        state: ExportState,
        files_done: u64,
        error: Option<&str>,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "UPDATE output_exports SET state = ?4, files_done = ?5, error = ?6, updated_at = ?7
             WHERE job = ?1 AND attempt = ?2 AND output = ?3 AND generation = ?8",
            params![
                export.job,
                export.attempt,
                export.output,
                state.as_str(),
                i64::try_from(files_done).unwrap_or(i64::MAX),
                error,
                ms(now),
                i64::try_from(export.generation).unwrap_or(i64::MAX),
            ],
        )?;
        Ok(n > 0)
    }
}
