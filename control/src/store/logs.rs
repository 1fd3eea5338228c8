//! Job logs, bounded per job.
//!
//! Each line gets the job's next sequence number; numbers are never reused,
//! so `drover job logs -f` resumes from the last number it saw. Past
//! [`super::StoreConfig::log_cap_bytes`] the oldest lines are dropped; a
//! reader learns it missed some from [`LogPage::first_seq`].

use std::collections::BTreeMap;

use drover_api::cluster::Timestamp;
use drover_api::job::ParallelProgress;
use drover_api::wire::LogCursor;
use drover_runner::runtime::LogStream;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{Store, StoreError, count, from_json, ms, to_json, ts};

/// A line to append.
#[derive(Debug, Clone, Copy)]
pub struct NewLogLine<'a> {
    /// When it was written.
    pub at: Timestamp,
    /// The attempt that wrote it.
    pub attempt: u32,
    /// The node rank that wrote it.
    pub node_rank: u32,
    /// Which stream.
    pub stream: LogStream,
    /// The text, without a trailing newline.
    pub text: &'a str,
    /// Its place in its container's log, when it came from one: a line at or
    /// before its part's cursor is already stored and is skipped.
    pub cursor: Option<LogCursor>,
    /// The process that wrote it, in a part that runs more than one.
    pub rank: Option<u32>,
}

/// What an append stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The number the next line will get.
    pub next_seq: u64,
    /// Lines stored.
    pub stored: u64,
    /// Lines skipped because their part's log already had them.
    pub duplicates: u64,
    /// The job's parallel progress when a stored line moved it: what it
    /// was before (if anything) and what it is now.
    pub progress: Option<(Option<ParallelProgress>, ParallelProgress)>,
}

/// A stored line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLogLine {
    /// Its sequence number within the job.
    pub seq: u64,
    /// When it was written.
    pub at: Timestamp,
    /// The attempt that wrote it.
    pub attempt: u32,
    /// The node rank that wrote it.
    pub node_rank: u32,
    /// Which stream.
    pub stream: LogStream,
    /// The text.
    pub text: String,
    /// The process that wrote it, in a part that runs more than one.
    pub rank: Option<u32>,
}

/// A slice of a job's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPage {
    /// Lines from the requested number on, oldest first.
    pub lines: Vec<StoredLogLine>,
    /// Where to resume: pass it as `from` next time.
    pub next_seq: u64,
    /// The oldest number still kept; a `from` below it lost lines to the cap.
    pub first_seq: u64,
    /// The number the next appended line will get (`next_seq == end_seq`:
    /// caught up).
    pub end_seq: u64,
}

fn stream_name(s: LogStream) -> &'static str {
    match s {
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
    }
}

fn stream_of(name: &str) -> LogStream {
    // Only this module writes the column; anything else reads as stdout
    // rather than failing a whole page.
    if name == "stderr" {
        LogStream::Stderr
    } else {
        LogStream::Stdout
    }
}

/// `text` cut to at most `max` bytes at a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn read_progress(
    conn: &rusqlite::Connection,
    job: &str,
) -> Result<Option<ParallelProgress>, StoreError> {
    let text: Option<String> = conn
        .query_row("SELECT progress FROM jobs WHERE id = ?1", [job], |r| {
            r.get(0)
        })
        .optional()?
        .flatten();
    text.map(|t| from_json(|| format!("progress of job `{job}`"), &t))
        .transpose()
}

impl Store {
    /// Appends lines to a job's log, dropping the oldest past the cap. A
    /// line longer than the whole cap is cut to it. A line with a cursor is
    /// stored only if it comes after its part's cursor, which then moves to
    /// it: an agent that ships a line twice (a retried upload, a restart)
    /// stores it once.
    pub fn append_logs(
        &mut self,
        job: &str,
        lines: &[NewLogLine<'_>],
    ) -> Result<Appended, StoreError> {
        let cap = self.config.log_cap_bytes;
        let max_line = usize::try_from(cap).unwrap_or(usize::MAX);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (mut next, mut bytes): (i64, i64) = tx
            .query_row(
                "SELECT log_next_seq, log_bytes FROM jobs WHERE id = ?1",
                [job],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| StoreError::not_found("job", job))?;
        // Each part's cursor, read once and written back once.
        let mut cursors: BTreeMap<(u32, u32), (Option<LogCursor>, bool)> = BTreeMap::new();
        let (mut stored, mut duplicates) = (0u64, 0u64);
        let mut newest: Option<ParallelProgress> = None;
        {
            let mut read_cursor = tx.prepare_cached(
                "SELECT log_at_ns, log_index FROM job_parts
                 WHERE job = ?1 AND attempt = ?2 AND node_rank = ?3",
            )?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO job_logs (job, seq, at, attempt, node_rank, stream, line, rank)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for line in lines {
                if let Some(c) = line.cursor {
                    let key = (line.attempt, line.node_rank);
                    let entry = match cursors.entry(key) {
                        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::btree_map::Entry::Vacant(e) => {
                            let known: Option<(Option<i64>, Option<i64>)> = read_cursor
                                .query_row(params![job, line.attempt, line.node_rank], |r| {
                                    Ok((r.get(0)?, r.get(1)?))
                                })
                                .optional()?;
                            let known = match known {
                                Some((Some(at), Some(index))) => Some(LogCursor {
                                    at_ns: u64::try_from(at).unwrap_or(0),
                                    index: count(index),
                                }),
                                _ => None,
                            };
                            e.insert((known, false))
                        }
                    };
                    if entry.0.is_some_and(|known| c <= known) {
                        duplicates += 1;
                        continue;
                    }
                    *entry = (Some(c), true);
                }
                let text = truncate(line.text, max_line);
                if let Some(p) = ParallelProgress::parse_line(text, line.attempt)
                    && newest.is_none_or(|n: ParallelProgress| p.attempt >= n.attempt)
                {
                    newest = Some(p);
                }
                insert.execute(params![
                    job,
                    next,
                    ms(line.at),
                    line.attempt,
                    line.node_rank,
                    stream_name(line.stream),
                    text,
                    line.rank
                ])?;
                next += 1;
                stored += 1;
                bytes += i64::try_from(text.len()).unwrap_or(i64::MAX);
            }
            let mut write_cursor = tx.prepare_cached(
                "UPDATE job_parts SET log_at_ns = ?4, log_index = ?5
                 WHERE job = ?1 AND attempt = ?2 AND node_rank = ?3",
            )?;
            for ((attempt, rank), (cursor, moved)) in &cursors {
                if let (true, Some(c)) = (moved, cursor) {
                    write_cursor.execute(params![
                        job,
                        attempt,
                        rank,
                        i64::try_from(c.at_ns).unwrap_or(i64::MAX),
                        c.index
                    ])?;
                }
            }
        }
        let cap = i64::try_from(cap).unwrap_or(i64::MAX);
        if bytes > cap {
            // Find the newest line that must go so that the rest fits, then
            // drop it and everything older in one statement.
            let mut excess = bytes - cap;
            let mut cutoff = None;
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT seq, length(CAST(line AS BLOB)) FROM job_logs
                     WHERE job = ?1 ORDER BY seq",
                )?;
                let mut rows = stmt.query([job])?;
                while let Some(row) = rows.next()? {
                    let (seq, len): (i64, i64) = (row.get(0)?, row.get(1)?);
                    excess -= len;
                    bytes -= len;
                    cutoff = Some(seq);
                    if excess <= 0 {
                        break;
                    }
                }
            }
            if let Some(cutoff) = cutoff {
                let dropped = tx.execute(
                    "DELETE FROM job_logs WHERE job = ?1 AND seq <= ?2",
                    params![job, cutoff],
                )?;
                tracing::debug!(job = %job, dropped, "log lines dropped past the cap");
            }
        }
        tx.execute(
            "UPDATE jobs SET log_next_seq = ?2, log_bytes = ?3 WHERE id = ?1",
            params![job, next, bytes],
        )?;
        let progress = match newest {
            Some(now) => {
                let before = read_progress(&tx, job)?;
                // A late line of an earlier attempt does not turn it back.
                if before.is_some_and(|b| b.attempt > now.attempt) {
                    None
                } else {
                    tx.execute(
                        "UPDATE jobs SET progress = ?2 WHERE id = ?1",
                        params![job, to_json("progress", &now)?],
                    )?;
                    Some((before, now))
                }
            }
            None => None,
        };
        tx.commit()?;
        Ok(Appended {
            next_seq: u64::try_from(next).unwrap_or(0),
            stored,
            duplicates,
            progress,
        })
    }

    /// A parallel job's progress: its runtime's newest progress line, of
    /// its newest attempt that wrote one.
    pub fn job_progress(&self, job: &str) -> Result<Option<ParallelProgress>, StoreError> {
        read_progress(&self.conn, job)
    }

    /// Up to `limit` lines of a job's log from number `from` on, of one
    /// attempt or of all.
    pub fn read_logs(
        &self,
        job: &str,
        attempt: Option<u32>,
        from: u64,
        limit: usize,
    ) -> Result<LogPage, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let end: i64 = tx
            .query_row("SELECT log_next_seq FROM jobs WHERE id = ?1", [job], |r| {
                r.get(0)
            })
            .optional()?
            .ok_or_else(|| StoreError::not_found("job", job))?;
        // -1: every attempt.
        let attempt_i = attempt.map_or(-1, i64::from);
        let first: Option<i64> = tx.query_row(
            "SELECT min(seq) FROM job_logs WHERE job = ?1 AND (?2 < 0 OR attempt = ?2)",
            params![job, attempt_i],
            |r| r.get(0),
        )?;
        let from_i = i64::try_from(from).unwrap_or(i64::MAX);
        let limit_i = i64::try_from(limit).unwrap_or(i64::MAX);
        let lines = {
            let mut stmt = tx.prepare_cached(
                "SELECT seq, at, attempt, node_rank, stream, line, rank FROM job_logs
                 WHERE job = ?1 AND seq >= ?2 AND (?4 < 0 OR attempt = ?4)
                 ORDER BY seq LIMIT ?3",
            )?;
            stmt.query_map(params![job, from_i, limit_i, attempt_i], |r| {
                Ok(StoredLogLine {
                    seq: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                    at: ts(r.get(1)?),
                    attempt: count(r.get(2)?),
                    node_rank: count(r.get(3)?),
                    stream: stream_of(&r.get::<_, String>(4)?),
                    text: r.get(5)?,
                    rank: r
                        .get::<_, Option<i64>>(6)?
                        .and_then(|r| u32::try_from(r).ok()),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?
        };
        tx.finish()?;
        let end_seq = u64::try_from(end).unwrap_or(0);
        // With nothing kept, the next line will be the oldest.
        let first_seq = first.map_or(end_seq, |f| u64::try_from(f).unwrap_or(0));
        // A short page has every line there is: the next one of this
        // attempt can only come at `end_seq` or later.
        let next_seq = match lines.last() {
            Some(l) if lines.len() >= limit => l.seq + 1,
            Some(_) => end_seq,
            None => from.max(first_seq).max(end_seq),
        };
        Ok(LogPage {
            lines,
            next_seq,
            first_seq,
            end_seq,
        })
    }
}
