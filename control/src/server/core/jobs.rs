//! Jobs through the user API: submission (validated and checked against
//! the cluster and its host path policy), show, list, cancel and logs.

use std::path::PathBuf;

use drover_api::cluster::{JobState, NodeSummary};
use drover_api::host_paths::HostPathPolicy;
use drover_api::job::{InvalidJob, check_job_identity};
use drover_api::wire;

use super::wire_map::job_info;
use super::{ClusterView, ControlPlane, new_id, now, read_cluster_view};
use crate::autoscaler::{self, ClusterProgress};
use crate::server::error::ControlError;
use crate::store::{Job, JobFilter, NewJob, StoreError};

/// The GPU count of a cluster's nodes, when any has registered.
fn node_gpus(nodes: &[NodeSummary]) -> Option<u32> {
    nodes.iter().map(|n| n.total_gpus).max()
}

impl ControlPlane {
    /// Fills in why `info`, a queued job, waits, from its cluster's status.
    fn with_waiting_reason(&self, mut info: wire::JobInfo, view: &ClusterView) -> wire::JobInfo {
        let status = self.cluster_status(view);
        let mine = view
            .jobs
            .iter()
            .find(|j| j.id == info.id)
            .map(|j| j.submitted);
        let mut ahead: Vec<&drover_api::cluster::JobSummary> = view
            .jobs
            .iter()
            .filter(|j| j.state == JobState::Queued && mine.is_some_and(|m| j.submitted < m))
            .collect();
        ahead.sort_by_key(|j| j.submitted);
        let ahead: Vec<String> = ahead.into_iter().map(|j| j.id.clone()).collect();
        info.waiting_reason = autoscaler::waiting_reason(
            info.state,
            info.instance_count,
            &ClusterProgress {
                name: &view.cluster.spec.name,
                decision: &status.decision,
                creating: status.creating,
                ahead: &ahead,
                max_nodes: view.cluster.spec.max_nodes,
            },
        );
        info
    }

    /// Queues a job, refusing one that breaks a rule ([`JobSpec::validate`]),
    /// binds a host path its cluster does not allow, or could never start
    /// on its cluster. Nothing is stored for a refused job.
    pub async fn submit_job(&self, req: wire::JobSubmit) -> Result<wire::JobInfo, ControlError> {
        let wire::JobSubmit { mut spec, compute } = req;
        let cluster = compute
            .or_else(|| spec.compute().map(str::to_string))
            .ok_or_else(|| {
                ControlError::Invalid(
                    "the job names no cluster: set `compute:` in the job or pass --compute"
                        .to_string(),
                )
            })?;
        spec.set_compute(cluster.clone());
        let id = match spec.name() {
            Some(name) => name.to_string(),
            None => new_id("job")?,
        };
        spec.set_name(id.clone());
        self.resolve_environment(&mut spec).await?;
        spec.validate()?;
        self.check_job_blobs(&spec).await?;
        let max_attempts = self.config.max_attempts;
        let refused = self.config.refused_host_paths.clone();
        let job = self
            .with_store(move |s| -> Result<Result<Job, ControlError>, StoreError> {
                let c = s.cluster(&cluster)?;
                // The agents' data dirs, as their nodes report them, beside
                // the control plane's own.
                let agent_dirs: Vec<PathBuf> = s
                    .nodes(&cluster)?
                    .into_iter()
                    .filter_map(|n| n.inventory.details.agent.data_dir.map(PathBuf::from))
                    .collect();
                let policy = refused.iter().chain(&agent_dirs).fold(
                    HostPathPolicy::new(&c.spec.name, &c.spec.allowed_host_paths),
                    |p, dir| p.refuse(dir),
                );
                let mut errors = policy.check_job(&spec);
                errors.extend(check_job_identity(&spec, &c.spec.name, &c.spec.identity));
                if !errors.is_empty() {
                    return Ok(Err(InvalidJob { errors }.into()));
                }
                let known = super::datastores::known_datastores(s)?;
                let unknown = super::datastores::unknown_job_datastores(&spec, &known);
                if !unknown.is_empty() {
                    return Ok(Err(ControlError::Invalid(unknown.join("; "))));
                }
                let nodes = s.node_summaries(&cluster)?;
                if let Err(e) = autoscaler::check_submission(
                    &c.spec,
                    spec.instance_count(),
                    spec.gpus_per_instance(),
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

    /// One job with its parts and spec, and for a queued job why it waits.
    pub async fn job(&self, id: String) -> Result<wire::JobInfo, ControlError> {
        let (job, parts, progress, view) = self
            .with_store(move |s| {
                let job = s.job(&id)?;
                let parts = s.job_parts(&id)?;
                let progress = s.job_progress(&id)?;
                let view = match job.state {
                    JobState::Queued => Some(read_cluster_view(s, &job.cluster)?),
                    _ => None,
                };
                Ok((job, parts, progress, view))
            })
            .await?;
        let mut info = job_info(job, parts, true);
        info.progress = progress;
        Ok(match view {
            Some(view) => self.with_waiting_reason(info, &view),
            None => info,
        })
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

    /// A page of a job's log: one attempt's lines, the current attempt's
    /// unless `attempt` names another.
    pub async fn job_logs(
        &self,
        id: String,
        attempt: Option<u32>,
        from: u64,
        limit: usize,
    ) -> Result<wire::LogPage, ControlError> {
        let (page, state, attempt, attempts) = self
            .with_store(move |s| {
                let job = s.job(&id)?;
                let attempt = attempt.unwrap_or(job.attempt);
                Ok((
                    s.read_logs(&id, Some(attempt), from, limit)?,
                    job.state,
                    attempt,
                    job.attempt,
                ))
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
                    rank: l.rank,
                })
                .collect(),
            next_seq: page.next_seq,
            first_seq: page.first_seq,
            end_seq: page.end_seq,
            job_state: state,
            attempt,
            attempts,
        })
    }
}
