//! Schema migrations: a numbered list of SQL scripts, applied in order.
//!
//! Script `i` (0-based) brings the database to version `i + 1`; the version is
//! kept in `PRAGMA user_version`, which lives in the file header and is written
//! in the same transaction as the script, so a crash leaves the database at
//! one version or the next, never between. Scripts are append-only: a
//! released script never changes, a new one is added at the end.

use rusqlite::{Connection, TransactionBehavior};

use super::StoreError;

/// The migrations, oldest first.
pub(crate) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6, V7, V8];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Version 1: clusters, nodes, jobs and their parts, logs, scaling errors,
/// API tokens, and the desired-state counter.
///
/// Times are milliseconds since the epoch ([`drover_api::cluster::Timestamp`]).
/// JSON documents (`spec`, `inventory`) are the `api` types as serde writes
/// them; columns queried on are copied out of them at write time.
const V1: &str = r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;
-- The global desired-state counter: every change to a node's assignments
-- takes the next value, so versions only grow, even across re-registration.
INSERT INTO meta (key, value) VALUES ('desired_version', 0);

CREATE TABLE clusters (
    name            TEXT PRIMARY KEY,
    spec            TEXT NOT NULL,
    provider        TEXT NOT NULL,
    min_nodes       INTEGER NOT NULL,
    max_nodes       INTEGER NOT NULL,
    join_token_hash BLOB NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
) STRICT;

CREATE TABLE jobs (
    -- Submission order: AUTOINCREMENT never reuses a value, even after the
    -- newest job is deleted, so the order is strictly monotonic.
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    cluster           TEXT NOT NULL REFERENCES clusters(name) ON DELETE CASCADE,
    spec              TEXT NOT NULL,
    state             TEXT NOT NULL,
    attempt           INTEGER NOT NULL,
    max_attempts      INTEGER NOT NULL,
    instance_count    INTEGER NOT NULL,
    gpus_per_instance INTEGER NOT NULL,
    submitted_at      INTEGER NOT NULL,
    started_at        INTEGER,
    ended_at          INTEGER,
    updated_at        INTEGER NOT NULL,
    failure_reason    TEXT,
    log_bytes         INTEGER NOT NULL DEFAULT 0,
    log_next_seq      INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX jobs_by_cluster_state ON jobs (cluster, state, seq);

CREATE TABLE nodes (
    id              TEXT PRIMARY KEY,
    cluster         TEXT NOT NULL REFERENCES clusters(name),
    state           TEXT NOT NULL,
    ip              TEXT,
    inventory       TEXT NOT NULL,
    healthy_gpus    INTEGER NOT NULL,
    total_gpus      INTEGER NOT NULL,
    credential_hash BLOB NOT NULL UNIQUE,
    registered_at   INTEGER NOT NULL,
    last_heartbeat  INTEGER NOT NULL,
    free_since      INTEGER,
    current_job     TEXT REFERENCES jobs(id),
    desired_version INTEGER NOT NULL
) STRICT;
CREATE INDEX nodes_by_cluster ON nodes (cluster, id);
CREATE INDEX nodes_by_heartbeat ON nodes (last_heartbeat);

-- One row per node of each attempt. `node` has no foreign key on purpose:
-- history outlives the node that ran it.
CREATE TABLE job_parts (
    job        TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    attempt    INTEGER NOT NULL,
    node_rank  INTEGER NOT NULL,
    node       TEXT NOT NULL,
    state      TEXT NOT NULL,
    exit_code  INTEGER,
    started_at INTEGER,
    ended_at   INTEGER,
    PRIMARY KEY (job, attempt, node_rank)
) STRICT, WITHOUT ROWID;
CREATE INDEX job_parts_by_node ON job_parts (node, state);

CREATE TABLE job_logs (
    job       TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq       INTEGER NOT NULL,
    at        INTEGER NOT NULL,
    attempt   INTEGER NOT NULL,
    node_rank INTEGER NOT NULL,
    stream    TEXT NOT NULL,
    line      TEXT NOT NULL,
    PRIMARY KEY (job, seq)
) STRICT, WITHOUT ROWID;

CREATE TABLE scaling_errors (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL REFERENCES clusters(name) ON DELETE CASCADE,
    at      INTEGER NOT NULL,
    message TEXT NOT NULL
) STRICT;
CREATE INDEX scaling_errors_by_cluster ON scaling_errors (cluster, id);

CREATE TABLE api_tokens (
    name       TEXT PRIMARY KEY,
    hash       BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
) STRICT;
"#;

/// Version 2: where each part's log ends (the container-engine timestamp
/// of its last stored line and its place among lines of that time), so an
/// agent that restarts ships from there and no line is stored twice; and
/// reading one attempt's lines by index.
const V2: &str = r#"
ALTER TABLE job_parts ADD COLUMN log_at_ns INTEGER;
ALTER TABLE job_parts ADD COLUMN log_index INTEGER;
CREATE INDEX job_logs_by_attempt ON job_logs (job, attempt, seq);
"#;

/// Version 3: the process (its `RANK`) that wrote each log line of a part
/// that runs more than one; `NULL` for a part's only process, for what
/// drover-init or the agent wrote, and for every line stored before.
const V3: &str = r#"
ALTER TABLE job_logs ADD COLUMN rank INTEGER;
"#;

/// Version 4: the outputs each part's agent posted (`POST
/// /v1/agent/outputs`), one row per part, replaced when posted again: the
/// [`drover_api::files::PartOutputs`] document as serde writes it.
const V4: &str = r#"
CREATE TABLE part_outputs (
    job       TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    attempt   INTEGER NOT NULL,
    node_rank INTEGER NOT NULL,
    node      TEXT NOT NULL,
    outputs   TEXT NOT NULL,
    posted_at INTEGER NOT NULL,
    PRIMARY KEY (job, attempt, node_rank)
) STRICT, WITHOUT ROWID;
"#;

/// Version 5: registered datastores (the definition without secrets, and
/// the whole definition sealed by `control::secrets`), and the copies of
/// datastore outputs into their datastores, so a restarted server resumes
/// them.
const V5: &str = r#"
CREATE TABLE datastores (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    sealed     BLOB NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE output_exports (
    job        TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    attempt    INTEGER NOT NULL,
    output     TEXT NOT NULL,
    datastore  TEXT NOT NULL,
    path       TEXT NOT NULL,
    state      TEXT NOT NULL,
    files_done INTEGER NOT NULL DEFAULT 0,
    -- Bumped by every post that changes what is to be copied; a copy
    -- marks the export done only when it copied the latest generation.
    generation INTEGER NOT NULL DEFAULT 0,
    error      TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (job, attempt, output)
) STRICT, WITHOUT ROWID;
CREATE INDEX output_exports_by_state ON output_exports (state);
"#;

/// Version 6: each attempt's launch secret (hex, new at every placement):
/// the nodes of the attempt get it with their assignments, and an MPI job's
/// `mpirun` proves with it that it may start processes in the job's other
/// containers. `NULL` for jobs placed before.
const V6: &str = r#"
ALTER TABLE jobs ADD COLUMN launch_secret TEXT;
"#;

/// Version 7: registered environments, one row per version (`seq` orders
/// them by creation: `@latest` is the newest one not archived), and the
/// builds of environment images, one row per image name: who builds it for
/// the registry, whether it was built, and why it failed.
const V7: &str = r#"
CREATE TABLE environments (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL,
    version    TEXT NOT NULL,
    spec       TEXT NOT NULL,
    archived   INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (name, version)
) STRICT;

CREATE TABLE image_builds (
    image      TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    node       TEXT,
    started_at INTEGER NOT NULL,
    ended_at   INTEGER,
    failure    TEXT
) STRICT;
"#;

/// Version 8: a parallel job's progress, the newest progress line of its
/// runtime read from its log (JSON of `drover_api::job::ParallelProgress`).
const V8: &str = r#"
ALTER TABLE jobs ADD COLUMN progress TEXT;
"#;

/// Brings `conn` to the newest of `scripts`, one transaction per script.
///
/// Refuses a database whose version is above `scripts.len()`: it was written
/// by a newer build, and running against it could lose what that build wrote.
pub(crate) fn migrate(conn: &mut Connection, scripts: &[&str]) -> Result<u32, StoreError> {
    let supported = u32::try_from(scripts.len()).unwrap_or(u32::MAX);
    let found = user_version(conn)?;
    if found > supported {
        return Err(StoreError::TooNew { found, supported });
    }
    for (index, script) in scripts.iter().enumerate().skip(found as usize) {
        let version = u32::try_from(index + 1).unwrap_or(u32::MAX);
        let fail = |source| StoreError::Migration { version, source };
        // IMMEDIATE: two servers opening one file must not both migrate.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail)?;
        // Another process may have migrated while we waited for the lock.
        let now = tx
            .query_row("PRAGMA user_version", [], |r| r.get::<_, u32>(0))
            .map_err(fail)?;
        if now >= version {
            continue;
        }
        tx.execute_batch(script).map_err(fail)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(fail)?;
        tx.commit().map_err(fail)?;
        tracing::info!(version, "store schema migrated");
    }
    user_version(conn)
}

/// `PRAGMA user_version`.
pub(crate) fn user_version(conn: &Connection) -> Result<u32, StoreError> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get::<_, u32>(0))?)
}
