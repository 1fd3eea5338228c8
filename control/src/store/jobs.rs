//! Jobs: submission, the state machine, placements, requeues and parts.

use drover_api::JobSpec;
use drover_api::cluster::{JobState, JobSummary, Timestamp, requeue_state};
use drover_api::job::DistributionKind;
use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};

use super::{
    Store, StoreError, VersionBump, bump_version, count, from_json, ms, parse_col, to_json, ts,
};

/// A job to submit.
#[derive(Debug, Clone, Copy)]
pub struct NewJob<'a> {
    /// Job id, unique in the control plane (the server picks it: the spec's
    /// name, or a generated one).
    pub id: &'a str,
    /// Its cluster.
    pub cluster: &'a str,
    /// What to run.
    pub spec: &'a JobSpec,
    /// Attempts before a job that keeps losing its nodes fails (≥ 1).
    pub max_attempts: u32,
}

/// A stored job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Job id.
    pub id: String,
    /// Its cluster.
    pub cluster: String,
    /// What to run.
    pub spec: JobSpec,
    /// Current state.
    pub state: JobState,
    /// Attempts so far: 0 until first placed, then 1, 2, … (each placement
    /// starts one; see [`JobSummary::attempt`]).
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Submission order, strictly increasing across the control plane; a
    /// requeued job keeps it, so it goes back to its place in the queue.
    pub submitted: u64,
    /// When it was submitted.
    pub submitted_at: Timestamp,
    /// When its current attempt started running.
    pub started_at: Option<Timestamp>,
    /// When it reached a terminal state.
    pub ended_at: Option<Timestamp>,
    /// When its row last changed.
    pub updated_at: Timestamp,
    /// Why it failed, was canceled, or was last requeued.
    pub failure_reason: Option<String>,
}

impl Job {
    /// What the scheduler and autoscaler read.
    pub fn summary(&self) -> JobSummary {
        JobSummary {
            id: self.id.clone(),
            state: self.state,
            instance_count: self.spec.instance_count(),
            gpus_per_instance: self.spec.gpus_per_instance(),
            submitted: self.submitted,
            attempt: self.attempt,
        }
    }
}

/// Which jobs [`Store::jobs`] lists.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobFilter<'a> {
    /// Only this cluster's.
    pub cluster: Option<&'a str>,
    /// Only jobs in one of these states; empty means any.
    pub states: &'a [JobState],
}

// One definition of a part's states for the wire and the store: the names
// are what the `job_parts.state` column holds.
pub use drover_api::wire::{PartState, UnknownPartState};

/// One part of one attempt of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPart {
    /// The job.
    pub job: String,
    /// The attempt (1-based).
    pub attempt: u32,
    /// Node rank within the attempt (0 runs `mpirun` / is `MASTER_ADDR`).
    pub node_rank: u32,
    /// The node it was placed on.
    pub node: String,
    /// Its state.
    pub state: PartState,
    /// Exit code of its container, once it exited.
    pub exit_code: Option<i64>,
    /// When its container started.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub ended_at: Option<Timestamp>,
}

/// The result of a placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The attempt the placement started.
    pub attempt: u32,
    /// The nodes whose desired state changed.
    pub bumped: Vec<VersionBump>,
}

/// The result of a job state change.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The job after the change.
    pub job: Job,
    /// The nodes whose desired state changed (released by the job).
    pub bumped: Vec<VersionBump>,
}

/// The result of [`Store::report_part`].
#[derive(Debug, Clone, PartialEq)]
pub struct PartReport {
    /// The part after the report (as it was, when not accepted).
    pub part: JobPart,
    /// False when the part had already ended and the report was ignored.
    pub accepted: bool,
    /// The job's state change the report caused, if any.
    pub job: Option<Transition>,
}

const JOB_COLUMNS: &str = "id, cluster, spec, state, attempt, max_attempts, seq, submitted_at, \
                           started_at, ended_at, updated_at, failure_reason";

/// A job row before its spec is decoded.
struct JobRow {
    id: String,
    cluster: String,
    spec: String,
    state: JobState,
    attempt: i64,
    max_attempts: i64,
    seq: i64,
    submitted_at: i64,
    started_at: Option<i64>,
    ended_at: Option<i64>,
    updated_at: i64,
    failure_reason: Option<String>,
}

fn read_job(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        id: row.get("id")?,
        cluster: row.get("cluster")?,
        spec: row.get("spec")?,
        state: parse_col(row, "state")?,
        attempt: row.get("attempt")?,
        max_attempts: row.get("max_attempts")?,
        seq: row.get("seq")?,
        submitted_at: row.get("submitted_at")?,
        started_at: row.get("started_at")?,
        ended_at: row.get("ended_at")?,
        updated_at: row.get("updated_at")?,
        failure_reason: row.get("failure_reason")?,
    })
}

impl JobRow {
    fn decode(self) -> Result<Job, StoreError> {
        let id = self.id;
        Ok(Job {
            spec: from_json(|| format!("spec of job `{id}`"), &self.spec)?,
            id,
            cluster: self.cluster,
            state: self.state,
            attempt: count(self.attempt),
            max_attempts: count(self.max_attempts),
            submitted: u64::try_from(self.seq).unwrap_or(0),
            submitted_at: ts(self.submitted_at),
            started_at: self.started_at.map(ts),
            ended_at: self.ended_at.map(ts),
            updated_at: ts(self.updated_at),
            failure_reason: self.failure_reason,
        })
    }
}

fn load_job(conn: &rusqlite::Connection, id: &str) -> Result<Job, StoreError> {
    conn.prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row([id], read_job)
        .optional()?
        .ok_or_else(|| StoreError::not_found("job", id))?
        .decode()
}

fn read_part(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobPart> {
    Ok(JobPart {
        job: row.get("job")?,
        attempt: count(row.get("attempt")?),
        node_rank: count(row.get("node_rank")?),
        node: row.get("node")?,
        state: parse_col(row, "state")?,
        exit_code: row.get("exit_code")?,
        started_at: row.get::<_, Option<i64>>("started_at")?.map(ts),
        ended_at: row.get::<_, Option<i64>>("ended_at")?.map(ts),
    })
}

/// Ends every live part of `job`'s attempt `attempt` as `state`.
fn end_live_parts(
    tx: &Transaction<'_>,
    job: &str,
    attempt: u32,
    state: PartState,
    now: Timestamp,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE job_parts SET state = ?3, ended_at = ?4
         WHERE job = ?1 AND attempt = ?2
           AND state IN ('assigned', 'preparing', 'running')",
        params![job, attempt, state.as_str(), ms(now)],
    )?;
    Ok(())
}

/// Frees the nodes that hold `job`: no current job, free from `now`, idle
/// when they were working (an unusable, leaving or preempted node keeps its
/// state), and a new desired-state version so their agents stop the parts.
fn release_nodes(
    tx: &Transaction<'_>,
    job: &str,
    now: Timestamp,
) -> Result<Vec<VersionBump>, StoreError> {
    let nodes = {
        let mut stmt = tx.prepare_cached(
            "UPDATE nodes SET current_job = NULL, free_since = ?2,
                 state = CASE WHEN state IN ('preparing', 'running') THEN 'idle' ELSE state END
             WHERE current_job = ?1 RETURNING id",
        )?;
        stmt.query_map(params![job, ms(now)], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?
    };
    let mut bumped = nodes
        .iter()
        .map(|n| bump_version(tx, n))
        .collect::<Result<Vec<_>, _>>()?;
    bumped.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(bumped)
}

/// Requeues (or fails, when out of attempts) a placed job inside `tx`.
pub(super) fn requeue_in(
    tx: &Transaction<'_>,
    id: &str,
    reason: &str,
    now: Timestamp,
) -> Result<Vec<VersionBump>, StoreError> {
    let job = load_job(tx, id)?;
    if !job.state.holds_nodes() {
        return Err(StoreError::InvalidTransition {
            job: id.to_string(),
            from: job.state,
            to: JobState::Queued,
        });
    }
    let next = requeue_state(job.attempt, job.max_attempts);
    end_live_parts(tx, id, job.attempt, PartState::Lost, now)?;
    let bumped = release_nodes(tx, id, now)?;
    match next {
        JobState::Queued => {
            tx.execute(
                "UPDATE jobs SET state = 'queued', started_at = NULL, updated_at = ?2,
                                 failure_reason = ?3
                 WHERE id = ?1",
                params![id, ms(now), reason],
            )?;
            tracing::info!(job = %id, attempt = job.attempt, reason, "job requeued");
        }
        _ => {
            let why = format!(
                "{reason}; no attempts left ({} of {})",
                job.attempt, job.max_attempts
            );
            tx.execute(
                "UPDATE jobs SET state = 'failed', ended_at = ?2, updated_at = ?2,
                                 failure_reason = ?3
                 WHERE id = ?1",
                params![id, ms(now), why],
            )?;
            tracing::info!(job = %id, attempt = job.attempt, reason, "job failed: out of attempts");
        }
    }
    Ok(bumped)
}

/// [`Store::transition_job`] inside `tx`.
fn transition_in(
    tx: &Transaction<'_>,
    id: &str,
    to: JobState,
    reason: Option<&str>,
    now: Timestamp,
) -> Result<Vec<VersionBump>, StoreError> {
    let job = load_job(tx, id)?;
    if !job.state.can_transition_to(to) {
        return Err(StoreError::InvalidTransition {
            job: id.to_string(),
            from: job.state,
            to,
        });
    }
    match to {
        JobState::Queued => Err(StoreError::Invalid(
            "a job goes back to the queue through requeue".to_string(),
        )),
        JobState::Preparing => Err(StoreError::Invalid(
            "a job starts preparing when it is placed".to_string(),
        )),
        JobState::Running => {
            tx.execute(
                "UPDATE jobs SET state = 'running', started_at = COALESCE(started_at, ?2),
                                 updated_at = ?2
                 WHERE id = ?1",
                params![id, ms(now)],
            )?;
            Ok(Vec::new())
        }
        JobState::Completed | JobState::Failed | JobState::Canceled => {
            tx.execute(
                "UPDATE jobs SET state = ?2, ended_at = ?3, updated_at = ?3,
                                 failure_reason = COALESCE(?4, failure_reason)
                 WHERE id = ?1",
                params![id, to.as_str(), ms(now), reason],
            )?;
            end_live_parts(tx, id, job.attempt, PartState::Stopped, now)?;
            release_nodes(tx, id, now)
        }
    }
}

/// Writes a part's new state inside `tx`; `Ok(None)` when the part has
/// already ended (and so was left as it is).
fn update_part_in(
    tx: &Transaction<'_>,
    job: &str,
    attempt: u32,
    node_rank: u32,
    state: PartState,
    exit_code: Option<i64>,
    now: Timestamp,
) -> Result<Result<JobPart, JobPart>, StoreError> {
    let part = tx
        .query_row(
            &format!("SELECT {PART_COLUMNS} FROM job_parts WHERE job = ?1 AND attempt = ?2 AND node_rank = ?3"),
            params![job, attempt, node_rank],
            read_part,
        )
        .optional()?
        .ok_or_else(|| StoreError::not_found("job part", &format!("{job}/{attempt}/{node_rank}")))?;
    if part.state == state {
        return Ok(Ok(part));
    }
    if part.state.is_terminal() {
        return Ok(Err(part));
    }
    let t = ms(now);
    let (started, ended) = match state {
        PartState::Running => (Some(t), None),
        s if s.is_terminal() => (None, Some(t)),
        _ => (None, None),
    };
    let part = tx.query_row(
        &format!(
            "UPDATE job_parts SET state = ?4, exit_code = COALESCE(?5, exit_code),
                 started_at = COALESCE(started_at, ?6), ended_at = COALESCE(ended_at, ?7)
             WHERE job = ?1 AND attempt = ?2 AND node_rank = ?3
             RETURNING {PART_COLUMNS}"
        ),
        params![
            job,
            attempt,
            node_rank,
            state.as_str(),
            exit_code,
            started,
            ended
        ],
        read_part,
    )?;
    tracing::debug!(job = %job, attempt, node_rank, state = %state, exit_code, "part state");
    Ok(Ok(part))
}

const PART_COLUMNS: &str = "job, attempt, node_rank, node, state, exit_code, started_at, ended_at";

impl Store {
    /// Queues a job at the end of its cluster's queue.
    pub fn submit_job(&mut self, new: &NewJob<'_>, now: Timestamp) -> Result<Job, StoreError> {
        if new.max_attempts == 0 {
            return Err(StoreError::Invalid(
                "max attempts must be at least 1".to_string(),
            ));
        }
        if new.spec.instance_count() == 0 {
            return Err(StoreError::Invalid(
                "instance count must be at least 1".to_string(),
            ));
        }
        let json = to_json("job spec", new.spec)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let cluster = tx
            .query_row(
                "SELECT 1 FROM clusters WHERE name = ?1",
                [new.cluster],
                |_| Ok(()),
            )
            .optional()?;
        if cluster.is_none() {
            return Err(StoreError::not_found("cluster", new.cluster));
        }
        let taken = tx
            .query_row("SELECT 1 FROM jobs WHERE id = ?1", [new.id], |_| Ok(()))
            .optional()?
            .is_some();
        if taken {
            return Err(StoreError::AlreadyExists {
                kind: "job",
                name: new.id.to_string(),
            });
        }
        tx.execute(
            "INSERT INTO jobs (id, cluster, spec, state, attempt, max_attempts, instance_count,
                               gpus_per_instance, submitted_at, updated_at)
             VALUES (?1, ?2, ?3, 'queued', 0, ?4, ?5, ?6, ?7, ?7)",
            params![
                new.id,
                new.cluster,
                json,
                new.max_attempts,
                new.spec.instance_count(),
                new.spec.gpus_per_instance(),
                ms(now)
            ],
        )?;
        let job = load_job(&tx, new.id)?;
        tx.commit()?;
        tracing::info!(job = %new.id, cluster = %new.cluster, submitted = job.submitted, "job submitted");
        Ok(job)
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<Job, StoreError> {
        load_job(&self.conn, id)
    }

    /// Jobs matching `filter`, in submission order.
    pub fn jobs(&self, filter: &JobFilter<'_>) -> Result<Vec<Job>, StoreError> {
        let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
        // States travel as one JSON array so the statement stays cacheable.
        let states_json = to_json("job states", &states)?;
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE (?1 IS NULL OR cluster = ?1)
               AND (?2 = '[]' OR state IN (SELECT value FROM json_each(?2)))
             ORDER BY seq"
        ))?;
        let rows = stmt
            .query_map(params![filter.cluster, states_json], read_job)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(JobRow::decode).collect()
    }

    /// What the scheduler and autoscaler need of a cluster's jobs in
    /// `states` (any state when empty), in submission order, without
    /// decoding specs.
    pub fn job_summaries(
        &self,
        cluster: &str,
        states: &[JobState],
    ) -> Result<Vec<JobSummary>, StoreError> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let states_json = to_json("job states", &states)?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, state, instance_count, gpus_per_instance, seq, attempt FROM jobs
             WHERE cluster = ?1
               AND (?2 = '[]' OR state IN (SELECT value FROM json_each(?2)))
             ORDER BY seq",
        )?;
        let jobs = stmt
            .query_map(params![cluster, states_json], |r| {
                Ok(JobSummary {
                    id: r.get("id")?,
                    state: parse_col(r, "state")?,
                    instance_count: count(r.get("instance_count")?),
                    gpus_per_instance: count(r.get("gpus_per_instance")?),
                    submitted: u64::try_from(r.get::<_, i64>("seq")?).unwrap_or(0),
                    attempt: count(r.get("attempt")?),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(jobs)
    }

    /// Moves a job to `to`, checked by [`JobState::can_transition_to`].
    ///
    /// `running` records the start; a terminal state records the end and
    /// `reason`, stops the attempt's live parts and releases the job's
    /// nodes. `preparing` is reached only through [`Store::record_placement`]
    /// and `queued` only through [`Store::requeue_job`], which do the
    /// bookkeeping those steps need; asking for them here is refused.
    pub fn transition_job(
        &mut self,
        id: &str,
        to: JobState,
        reason: Option<&str>,
        now: Timestamp,
    ) -> Result<Transition, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let bumped = transition_in(&tx, id, to, reason, now)?;
        let job = load_job(&tx, id)?;
        tx.commit()?;
        tracing::info!(job = %id, state = %to, reason, "job state changed");
        Ok(Transition { job, bumped })
    }

    /// Cancels a job that has not ended.
    pub fn cancel_job(&mut self, id: &str, now: Timestamp) -> Result<Transition, StoreError> {
        self.transition_job(id, JobState::Canceled, Some("canceled by user"), now)
    }

    /// Puts a placed job whose node was lost or preempted back in the queue
    /// for another attempt, or fails it when it has used its attempts (see
    /// [`requeue_state`]). The ended attempt's live parts become
    /// [`PartState::Lost`]; its history stays.
    pub fn requeue_job(
        &mut self,
        id: &str,
        reason: &str,
        now: Timestamp,
    ) -> Result<Transition, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let bumped = requeue_in(&tx, id, reason, now)?;
        let job = load_job(&tx, id)?;
        tx.commit()?;
        Ok(Transition { job, bumped })
    }

    /// Places a queued job on `nodes` (rank 0 first), all at once: the job
    /// becomes `preparing` with a new attempt, each node gets a part, holds
    /// the job and gets a new desired-state version. Refused, writing
    /// nothing, unless the job is queued and every node exists, belongs to
    /// the job's cluster, is idle without a job and has the healthy GPUs the
    /// job asks for.
    pub fn record_placement(
        &mut self,
        job_id: &str,
        nodes: &[String],
        now: Timestamp,
    ) -> Result<Placed, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let job = load_job(&tx, job_id)?;
        if job.state != JobState::Queued {
            return Err(StoreError::InvalidTransition {
                job: job_id.to_string(),
                from: job.state,
                to: JobState::Preparing,
            });
        }
        let wanted = job.spec.instance_count() as usize;
        if nodes.len() != wanted {
            return Err(StoreError::Invalid(format!(
                "job `{job_id}` needs {wanted} node(s), the placement has {}",
                nodes.len()
            )));
        }
        for (i, n) in nodes.iter().enumerate() {
            if nodes[..i].contains(n) {
                return Err(StoreError::Invalid(format!(
                    "node `{n}` appears twice in the placement of job `{job_id}`"
                )));
            }
        }
        let attempt = job.attempt + 1;
        // A new secret per attempt: the parts of an earlier attempt, still
        // running somewhere, cannot start processes in this one's.
        let mut secret = [0u8; 32];
        getrandom::getrandom(&mut secret).map_err(|e| {
            StoreError::Invalid(format!(
                "cannot get random bytes from the operating system: {e}"
            ))
        })?;
        let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        tx.execute(
            "UPDATE jobs SET state = 'preparing', attempt = ?2, started_at = NULL, updated_at = ?3,
                             launch_secret = ?4
             WHERE id = ?1",
            params![job_id, attempt, ms(now), secret],
        )?;
        let mut bumped = Vec::with_capacity(nodes.len());
        // Each node is checked as it is written: an error on a later node
        // drops the transaction, and with it the earlier nodes' rows.
        for (rank, node) in nodes.iter().enumerate() {
            let found: Option<(String, String, Option<String>, i64)> = tx
                .query_row(
                    "SELECT cluster, state, current_job, healthy_gpus FROM nodes WHERE id = ?1",
                    [node],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            let (cluster, state, current, healthy) =
                found.ok_or_else(|| StoreError::not_found("node", node))?;
            if cluster != job.cluster {
                return Err(StoreError::Invalid(format!(
                    "node `{node}` belongs to cluster `{cluster}`, not `{}`",
                    job.cluster
                )));
            }
            if let Some(other) = current {
                return Err(StoreError::Conflict(format!(
                    "node `{node}` already holds job `{other}`"
                )));
            }
            if state != "idle" {
                return Err(StoreError::Conflict(format!(
                    "node `{node}` is {state}, not idle"
                )));
            }
            let gpus = job.spec.gpus_per_instance();
            if count(healthy) < gpus {
                return Err(StoreError::Conflict(format!(
                    "node `{node}` has {healthy} healthy GPU(s), job `{job_id}` needs {gpus}"
                )));
            }
            tx.execute(
                "INSERT INTO job_parts (job, attempt, node_rank, node, state)
                 VALUES (?1, ?2, ?3, ?4, 'assigned')",
                params![job_id, attempt, rank, node],
            )?;
            tx.execute(
                "UPDATE nodes SET current_job = ?2, state = 'preparing', free_since = NULL
                 WHERE id = ?1",
                params![node, job_id],
            )?;
            bumped.push(bump_version(&tx, node)?);
        }
        tx.commit()?;
        tracing::info!(job = %job_id, attempt, nodes = ?nodes, "job placed");
        Ok(Placed { attempt, bumped })
    }

    /// Every part of every attempt of a job, by attempt then rank.
    pub fn job_parts(&self, job: &str) -> Result<Vec<JobPart>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {PART_COLUMNS} FROM job_parts WHERE job = ?1 ORDER BY attempt, node_rank"
        ))?;
        let parts = stmt
            .query_map([job], read_part)?
            .collect::<Result<Vec<_>, _>>()?;
        if parts.is_empty() {
            // Tell "no parts yet" from "no such job".
            load_job(&self.conn, job)?;
        }
        Ok(parts)
    }

    /// Sets a part's state without touching its job (the server's own
    /// corrections; agents' reports go through [`Store::report_part`]).
    /// `running` records the start, a terminal state the end and
    /// `exit_code`. A part that has ended never changes again, so a late or
    /// repeated report cannot revive it: that is a [`StoreError::Conflict`].
    pub fn set_part_state(
        &mut self,
        job: &str,
        attempt: u32,
        node_rank: u32,
        state: PartState,
        exit_code: Option<i64>,
        now: Timestamp,
    ) -> Result<JobPart, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        match update_part_in(&tx, job, attempt, node_rank, state, exit_code, now)? {
            Ok(part) => {
                tx.commit()?;
                Ok(part)
            }
            Err(ended) => Err(StoreError::Conflict(format!(
                "part {node_rank} of job `{job}` attempt {attempt} already ended as {}",
                ended.state
            ))),
        }
    }

    /// Records an agent's report of a part and, in the same transaction,
    /// moves the job as its parts say. A multi-node job lives or dies as one:
    /// any part failing fails the whole job and stops every part.
    ///
    /// - a part `failed` → the job fails, its other parts are stopped and its
    ///   nodes released;
    /// - every part of the attempt `succeeded` → the job completes; for an
    ///   MPI job, node rank 0 `succeeded` is enough (its `mpirun` was the
    ///   job; the other parts are stopped);
    /// - the job `preparing` and every part `running` or `succeeded` → the
    ///   job runs.
    ///
    /// A part reported `running` also moves its node from `preparing` to
    /// `running`.
    ///
    /// Unlike [`Store::set_part_state`], a report about a part that has
    /// already ended (a late report of an earlier attempt, a repeat after
    /// the job was canceled) is not an error: it is ignored and
    /// [`PartReport::accepted`] is false, so the agent can be told to stop it.
    pub fn report_part(
        &mut self,
        job: &str,
        attempt: u32,
        node_rank: u32,
        state: PartState,
        exit_code: Option<i64>,
        now: Timestamp,
    ) -> Result<PartReport, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let part = match update_part_in(&tx, job, attempt, node_rank, state, exit_code, now)? {
            Ok(part) => part,
            Err(ended) => {
                return Ok(PartReport {
                    part: ended,
                    accepted: false,
                    job: None,
                });
            }
        };
        if part.state == PartState::Running {
            // The node's state follows its part, in the same write.
            tx.execute(
                "UPDATE nodes SET state = 'running'
                 WHERE id = ?1 AND current_job = ?2 AND state = 'preparing'",
                params![part.node, job],
            )?;
        }
        let current = load_job(&tx, job)?;
        let mut change = None;
        if current.attempt == attempt
            && current.state.holds_nodes()
            && part.state == PartState::Lost
        {
            // The agent says its part is lost: its VM is going away (a
            // scheduled Reboot or Redeploy). The job goes back in the queue
            // now, not a grace period later.
            let why = format!(
                "part {node_rank} on node `{}` was lost: its VM is going away (scheduled event)",
                part.node
            );
            let bumped = requeue_in(&tx, job, &why, now)?;
            tracing::info!(job = %job, reason = %why, "job requeued by its part");
            change = Some(Transition {
                job: load_job(&tx, job)?,
                bumped,
            });
        } else if current.attempt == attempt && current.state.holds_nodes() {
            let states: Vec<PartState> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT state FROM job_parts WHERE job = ?1 AND attempt = ?2",
                )?;
                stmt.query_map(params![job, attempt], |r| parse_col(r, "state"))?
                    .collect::<Result<Vec<_>, _>>()?
            };
            // An MPI job is node rank 0's `mpirun`: the other parts only
            // host its daemons and wait to be stopped, so rank 0's success
            // is the job's.
            let mpi = current
                .spec
                .as_command()
                .and_then(|c| c.distribution)
                .is_some_and(|d| d.kind == DistributionKind::Mpi);
            let next = if part.state == PartState::Failed {
                let why = match part.exit_code {
                    Some(code) => format!(
                        "part {node_rank} on node `{}` exited with code {code}",
                        part.node
                    ),
                    None => format!("part {node_rank} on node `{}` failed", part.node),
                };
                Some((JobState::Failed, Some(why)))
            } else if states.iter().all(|s| *s == PartState::Succeeded)
                || (mpi && node_rank == 0 && part.state == PartState::Succeeded)
            {
                Some((JobState::Completed, None))
            } else if current.state == JobState::Preparing
                && states
                    .iter()
                    .all(|s| matches!(s, PartState::Running | PartState::Succeeded))
            {
                Some((JobState::Running, None))
            } else {
                None
            };
            if let Some((to, why)) = next {
                if to == JobState::Completed && current.state == JobState::Preparing {
                    // Parts that ended before any "running" report: the job
                    // still passes through running, the only way to completed.
                    transition_in(&tx, job, JobState::Running, None, now)?;
                }
                let bumped = transition_in(&tx, job, to, why.as_deref(), now)?;
                tracing::info!(job = %job, state = %to, reason = why, "job state changed by its parts");
                change = Some(Transition {
                    job: load_job(&tx, job)?,
                    bumped,
                });
            }
        }
        tx.commit()?;
        Ok(PartReport {
            part,
            accepted: true,
            job: change,
        })
    }
}
