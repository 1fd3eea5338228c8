//! The control plane's embedded store: clusters, nodes, jobs, their parts and
//! logs, scaling errors and API tokens, in one SQLite file (`drover.db`) in a
//! data directory.
//!
//! Plain synchronous methods over typed records, no HTTP: the server owns one
//! [`Store`] (behind a mutex, called from `spawn_blocking`) and translates
//! [`StoreError`] into status codes (the mapping is on [`StoreError`]).
//!
//! Architecture Invariant: only this module runs SQL. Every change that
//! touches more than one row is one transaction, so a crash or an error
//! half-way leaves nothing half-written; a refused change writes nothing.
//!
//! Architecture Invariant: secrets (join tokens, node credentials, API
//! tokens) are stored only as SHA-256 digests.
//!
//! Times are [`Timestamp`]s passed in by the caller; nothing here reads a clock.
//!
//! The desired-state version: every change to what a node should run (a
//! placement, a job ending or requeued) gives that node the next value of one
//! global counter. An agent long-polls with the last version it saw; the
//! operations that bump return the nodes and versions they bumped
//! ([`VersionBump`]) so the server can wake exactly those watchers.

mod clusters;
mod datastores;
mod environments;
mod error;
mod exports;
mod jobs;
mod logs;
mod nodes;
mod outputs;
mod schema;
#[cfg(test)]
mod tests;
mod tokens;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use drover_api::cluster::Timestamp;
use rusqlite::{Connection, OpenFlags, Row};

pub use clusters::Cluster;
pub use datastores::StoredDatastore;
pub use environments::{BuildRow, BuildRowState, StoredEnvironment, decide_build};
pub use error::StoreError;
pub use exports::{Export, ExportState};
pub use jobs::{
    Job, JobFilter, JobPart, NewJob, PartReport, PartState, Placed, Transition, UnknownPartState,
};
pub use logs::{Appended, LogPage, NewLogLine, StoredLogLine};
pub use nodes::{
    AssignedNode, Assignment, Assignments, Heartbeat, NewNode, Node, NodeInventory, NodeLost,
};
pub use outputs::StoredPartOutputs;
pub use schema::SCHEMA_VERSION;

/// The database file's name inside the data directory.
pub const DB_FILE: &str = "drover.db";

/// Settings of a [`Store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Log bytes kept per job; the oldest lines are dropped past it.
    pub log_cap_bytes: u64,
    /// Scaling errors kept per cluster, newest.
    pub scaling_errors_kept: u32,
    /// How long a write waits for another connection's lock before
    /// [`StoreError::Busy`].
    pub busy_timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            // 4 MiB: a training job's tail, not its whole history.
            log_cap_bytes: 4 * 1024 * 1024,
            scaling_errors_kept: 20,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// A node whose desired state changed, and its new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionBump {
    /// Node id.
    pub node: String,
    /// Its new desired-state version.
    pub version: u64,
}

/// The store: one SQLite connection.
///
/// `Send` but not `Sync`: share it behind a mutex. Reads take `&self`, writes
/// `&mut self`.
pub struct Store {
    conn: Connection,
    config: StoreConfig,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.conn.path())
            .field("config", &self.config)
            .finish()
    }
}

impl Store {
    /// Opens (creating it and `dir` when missing) `dir/drover.db` with the
    /// default [`StoreConfig`], and migrates it to [`SCHEMA_VERSION`].
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, StoreConfig::default())
    }

    /// [`Store::open`] with settings.
    pub fn open_with(dir: &Path, config: StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let store = Store::setup(conn, config)?;
        tracing::info!(path = %path.display(), version = SCHEMA_VERSION, "store opened");
        Ok(store)
    }

    /// A store that lives in memory only, for tests.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Store::open_in_memory_with(StoreConfig::default())
    }

    /// [`Store::open_in_memory`] with settings.
    pub fn open_in_memory_with(config: StoreConfig) -> Result<Store, StoreError> {
        Store::setup(Connection::open_in_memory()?, config)
    }

    fn setup(mut conn: Connection, config: StoreConfig) -> Result<Store, StoreError> {
        conn.busy_timeout(config.busy_timeout)?;
        // WAL: readers never block the writer and a commit is one append.
        // In memory the answer is "memory", which is fine.
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        // NORMAL under WAL: a power cut may lose the last commits, never
        // corrupt the file; agents re-report what was lost.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        schema::migrate(&mut conn, schema::MIGRATIONS)?;
        Ok(Store { conn, config })
    }

    /// The settings this store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        schema::user_version(&self.conn)
    }
}

/// A timestamp as SQLite stores it.
fn ms(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

/// A stored timestamp (negative values, which this module never writes,
/// read as the epoch).
fn ts(v: i64) -> Timestamp {
    Timestamp(u64::try_from(v).unwrap_or(0))
}

/// A stored non-negative count.
fn count(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// Reads a text column through `FromStr` (state names).
fn parse_col<T>(row: &Row<'_>, col: &str) -> rusqlite::Result<T>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let text: String = row.get(col)?;
    text.parse::<T>().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// Encodes an `api` type for a JSON column.
fn to_json<T: serde::Serialize>(what: &str, value: &T) -> Result<String, StoreError> {
    // api types serialize infallibly (string map keys, no custom impls); a
    // failure here is a programming error reported as a refused request.
    serde_json::to_string(value)
        .map_err(|e| StoreError::Invalid(format!("cannot encode {what}: {e}")))
}

/// Decodes a JSON column.
fn from_json<T: serde::de::DeserializeOwned>(
    what: impl FnOnce() -> String,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|source| StoreError::Corrupt {
        what: what(),
        source,
    })
}

/// Gives `node` the next desired-state version.
fn bump_version(tx: &rusqlite::Transaction<'_>, node: &str) -> Result<VersionBump, StoreError> {
    let version: i64 = tx.query_row(
        "UPDATE meta SET value = value + 1 WHERE key = 'desired_version' RETURNING value",
        [],
        |r| r.get(0),
    )?;
    tx.execute(
        "UPDATE nodes SET desired_version = ?1 WHERE id = ?2",
        rusqlite::params![version, node],
    )?;
    Ok(VersionBump {
        node: node.to_string(),
        version: u64::try_from(version).unwrap_or(0),
    })
}
