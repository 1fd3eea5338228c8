//! What each part's agent posted as its outputs (`POST /v1/agent/outputs`).

use drover_api::cluster::Timestamp;
use drover_api::files::PartOutputs;
use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError, from_json, ms, to_json};

/// A part's posted outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPartOutputs {
    /// The node that posted them.
    pub node: String,
    /// What it posted.
    pub outputs: PartOutputs,
}

impl Store {
    /// Records (replacing an earlier post) the outputs of a part that is
    /// `node`'s: [`StoreError::NotFound`] when the part does not exist,
    /// [`StoreError::Conflict`] when it runs on another node.
    pub fn record_part_outputs(
        &mut self,
        node: &str,
        outputs: &PartOutputs,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let key = &outputs.part;
        let tx = self.conn.transaction()?;
        let owner: Option<String> = tx
            .query_row(
                "SELECT node FROM job_parts WHERE job = ?1 AND attempt = ?2 AND node_rank = ?3",
                params![key.job, key.attempt, key.node_rank],
                |r| r.get(0),
            )
            .optional()?;
        let owner = owner.ok_or_else(|| {
            StoreError::not_found(
                "job part",
                &format!("{}/{}/{}", key.job, key.attempt, key.node_rank),
            )
        })?;
        if owner != node {
            return Err(StoreError::Conflict(format!(
                "part {} of attempt {} of job {} runs on node {owner}, not {node}",
                key.node_rank, key.attempt, key.job
            )));
        }
        let doc = to_json("part outputs", outputs)?;
        tx.execute(
            "INSERT INTO part_outputs (job, attempt, node_rank, node, outputs, posted_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (job, attempt, node_rank) DO UPDATE
             SET node = excluded.node, outputs = excluded.outputs, posted_at = excluded.posted_at",
            params![key.job, key.attempt, key.node_rank, node, doc, ms(now)],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The outputs posted for `job`'s attempt `attempt`, by node rank.
    pub fn part_outputs(
        &self,
        job: &str,
        attempt: u32,
    ) -> Result<Vec<StoredPartOutputs>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT node_rank, node, outputs FROM part_outputs
             WHERE job = ?1 AND attempt = ?2 ORDER BY node_rank",
        )?;
        let rows = stmt
            .query_map(params![job, attempt], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(rank, node, doc)| {
                Ok(StoredPartOutputs {
                    node,
                    outputs: from_json(
                        || format!("outputs of part {rank} of attempt {attempt} of job {job}"),
                        &doc,
                    )?,
                })
            })
            .collect()
    }
}
