//! The one error type of the store.

use std::path::PathBuf;

use drover_api::cluster::JobState;

/// What a store operation can fail with.
///
/// Intended HTTP mapping, for the server's error layer:
///
/// | variant | status |
/// |---|---|
/// | [`StoreError::NotFound`] | 404 Not Found |
/// | [`StoreError::AlreadyExists`], [`StoreError::Conflict`], [`StoreError::InvalidTransition`] | 409 Conflict |
/// | [`StoreError::Invalid`] | 400 Bad Request (422 where the body parsed but its content is refused) |
/// | [`StoreError::Busy`] | 503 Service Unavailable, with `Retry-After` |
/// | [`StoreError::Sqlite`], [`StoreError::Corrupt`] | 500 Internal Server Error |
/// | [`StoreError::CreateDir`], [`StoreError::TooNew`], [`StoreError::Migration`] | at start-up only: the server refuses to start |
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named record does not exist.
    #[error("{kind} `{name}` not found")]
    NotFound {
        /// `cluster`, `node`, `job`, `job part` or `api token`.
        kind: &'static str,
        /// Its name or id.
        name: String,
    },
    /// A record with this name or id exists already.
    #[error("{kind} `{name}` already exists")]
    AlreadyExists {
        /// `cluster`, `node`, `job` or `api token`.
        kind: &'static str,
        /// Its name or id.
        name: String,
    },
    /// The change is refused in the current state (a cluster that still has
    /// nodes, a node that already holds a job part); the message says why.
    #[error("{0}")]
    Conflict(String),
    /// The job's state machine does not allow this step
    /// (see [`JobState::can_transition_to`]); nothing was written.
    #[error("job `{job}` cannot go from {from} to {to}")]
    InvalidTransition {
        /// The job.
        job: String,
        /// Its state now.
        from: JobState,
        /// The state asked for.
        to: JobState,
    },
    /// The request itself is malformed (a placement with the wrong number of
    /// nodes, a repeated node); the message says what.
    #[error("{0}")]
    Invalid(String),
    /// Another connection holds the database lock past the busy timeout.
    #[error("database is busy")]
    Busy(#[source] rusqlite::Error),
    /// Any other SQLite failure.
    #[error("database error")]
    Sqlite(#[source] rusqlite::Error),
    /// A stored JSON document no longer reads as its type.
    #[error("stored {what} is corrupt")]
    Corrupt {
        /// What was being read (`spec of job `x``).
        what: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The data directory could not be created.
    #[error("cannot create data directory {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The database was written by a newer Drover; opening it could lose data.
    #[error(
        "database schema version {found} is newer than this drover supports ({supported}); upgrade drover"
    )]
    TooNew {
        /// `PRAGMA user_version` of the file.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },
    /// A schema migration failed; the database stays at the version before it.
    #[error("migration to schema version {version} failed")]
    Migration {
        /// The version being applied.
        version: u32,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
}

impl From<rusqlite::Error> for StoreError {
    /// Lock contention is told apart from other failures so that the server
    /// can answer "retry" instead of "broken".
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StoreError::Busy(e)
            }
            _ => StoreError::Sqlite(e),
        }
    }
}

impl StoreError {
    /// A [`StoreError::NotFound`].
    pub(crate) fn not_found(kind: &'static str, name: &str) -> Self {
        StoreError::NotFound {
            kind,
            name: name.to_string(),
        }
    }
}
