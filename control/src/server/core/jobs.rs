//! Jobs through the user API: submission (validated and checked against
//! the cluster), show, list, cancel and logs.

use drover_api::cluster::NodeSummary;
use drover_api::wire;

use super::wire_map::job_info;
use super::{ControlPlane, new_id, now};
use crate::autoscaler;
use crate::server::error::ControlError;
use crate::store::{Job, JobFilter, NewJob, StoreError};

/// The GPU count of a cluster's nodes, when any has registered.
fn node_gpus(nodes: &[NodeSummary]) -> Option<u32> {
    nodes.iter().map(|n| n.total_gpus).max()
}

impl ControlPlane {
    /// Queues a job, refusing one that could never start on its cluster.
    pub async fn submit_job(&self, req: wire::JobSubmit) -> Result<wire::JobInfo, ControlError> {
        let wire::JobSubmit { mut spec, compute } = req;
        let cluster = compute.or_else(|| spec.compute.clone()).ok_or_else(|| {
            ControlError::Invalid(
                "the job names no cluster: set `compute:` in the job or pass --compute".to_string(),
            )
        })?;
        spec.compute = Some(cluster.clone());
        let id = match &spec.name {
            Some(name) if drover_api::job::is_valid_name(name) => name.clone(),
            Some(name) => {
                return Err(ControlError::Invalid(format!(
                    "job name `{name}` is not valid: use letters, digits, `_` and `-`, starting with a letter or digit"
                )));
            }
            None => new_id("job")?,
        };
        spec.name = Some(id.clone());
        let max_attempts = self.config.max_attempts;
        let job = self
            .with_store(move |s| -> Result<Result<Job, ControlError>, StoreError> {
                let c = s.cluster(&cluster)?;
                let nodes = s.node_summaries(&cluster)?;
                if let Err(e) = autoscaler::check_submission(
                    &c.spec,
                    spec.resources.instance_count,
                    spec.drover.gpus_per_instance,
                    node_gpus(&nodes),
                ) {
                    return Ok(Err(e.into()));
                }
                let job = s.submit_job(
                    &NewJob {
                        id: &id,
                        cluster: &cluster,
                        spec: &spec,
                        max_attempts,
                    },
                    now(),
                )?;
                Ok(Ok(job))
            })
            .await??;
        self.poke();
        Ok(job_info(job, Vec::new(), true))
    }

    /// One job with its parts and spec.
    pub async fn job(&self, id: String) -> Result<wire::JobInfo, ControlError> {
        let (job, parts) = self
            .with_store(move |s| Ok((s.job(&id)?, s.job_parts(&id)?)))
            .await?;
        Ok(job_info(job, parts, true))
    }

    /// Jobs, optionally of one cluster, in submission order.
    pub async fn jobs(&self, cluster: Option<String>) -> Result<wire::JobList, ControlError> {
        let jobs = self
            .with_store(move |s| {
                if let Some(c) = &cluster {
                    s.cluster(c)?;
                }
                s.jobs(&JobFilter {
                    cluster: cluster.as_deref(),
                    states: &[],
                })
            })
            .await?;
        Ok(wire::JobList {
            jobs: jobs
                .into_iter()
                .map(|j| job_info(j, Vec::new(), false))
                .collect(),
        })
    }

    /// Cancels a job that has not ended; its nodes' agents are woken.
    pub async fn cancel_job(&self, id: String) -> Result<wire::JobInfo, ControlError> {
        let (t, parts) = self
            .with_store(move |s| {
                let t = s.cancel_job(&id, now())?;
                let parts = s.job_parts(&id)?;
                Ok((t, parts))
            })
            .await?;
        self.wake(&t.bumped);
        self.poke();
        Ok(job_info(t.job, parts, true))
    }

    /// A page of a job's log.
    pub async fn job_logs(
        &self,
        id: String,
        from: u64,
        limit: usize,
    ) -> Result<wire::LogPage, ControlError> {
        let (page, state) = self
            .with_store(move |s| {
                let state = s.job(&id)?.state;
                Ok((s.read_logs(&id, from, limit)?, state))
            })
            .await?;
        Ok(wire::LogPage {
            lines: page
                .lines
                .into_iter()
                .map(|l| wire::LogLine {
                    seq: l.seq,
                    at: l.at,
                    attempt: l.attempt,
                    node_rank: l.node_rank,
                    stream: l.stream,
                    text: l.text,
                })
                .collect(),
            next_seq: page.next_seq,
            first_seq: page.first_seq,
            end_seq: page.end_seq,
            job_state: state,
        })
    }
}
