//! Clusters: create, update, show, list and delete, with the status the
//! autoscaler would report for each (allocation state, node counts, errors).

use drover_api::cluster::{ClusterStatus, JobState, JobSummary, NodeStateCounts, NodeSummary};
use drover_api::compute::{ComputeSpec, ComputeUpdate, Naming};
use drover_api::wire;

use super::{
    ClusterView, ControlPlane, new_secret, now, read_all_cluster_views, read_cluster_view,
};
use crate::autoscaler::{self, AutoscaleInput, ScaleDecision};
use crate::server::error::ControlError;
use crate::store::StoreError;

/// A cluster's scaling status as users see it.
pub(super) struct ClusterStatusView {
    /// Registered nodes plus the machines being created, as preparing nodes.
    pub nodes: Vec<NodeSummary>,
    /// Machines being created that have not registered.
    pub creating: u32,
    /// The autoscaler's decision now.
    pub decision: ScaleDecision,
}

impl ControlPlane {
    /// The status the autoscaler would report for the cluster of `view` now.
    pub(super) fn cluster_status(&self, view: &ClusterView) -> ClusterStatusView {
        let memo = self.memo(&view.cluster.spec.name);
        let nodes = autoscaler::with_pending(&view.nodes, &memo.pending);
        let reason = memo.reason();
        let decision = autoscaler::decide(
            &AutoscaleInput {
                spec: &view.cluster.spec,
                nodes: &nodes,
                jobs: &view.jobs,
                now: now(),
                last_scale_action: memo.last_scale_action,
                provider_error: reason.as_deref(),
            },
            &self.config.autoscaler,
        );
        ClusterStatusView {
            creating: u32::try_from(nodes.len().saturating_sub(view.nodes.len()))
                .unwrap_or(u32::MAX),
            nodes,
            decision,
        }
    }

    fn cluster_info(&self, view: ClusterView) -> wire::ClusterInfo {
        let ClusterStatusView {
            nodes, decision, ..
        } = self.cluster_status(&view);
        wire::ClusterInfo {
            status: ClusterStatus {
                allocation_state: decision.allocation_state,
                current_node_count: decision.current,
                target_node_count: decision.target,
                node_state_counts: NodeStateCounts::of(&nodes),
                errors: view.errors,
            },
            created_at: view.cluster.created_at,
            updated_at: view.cluster.updated_at,
            spec: view.cluster.spec,
        }
    }

    /// Creates a cluster and its join token.
    pub async fn create_cluster(
        &self,
        mut spec: ComputeSpec,
    ) -> Result<wire::ClusterCreated, ControlError> {
        spec.validate(Naming::Fields)?;
        // A definition that names no provider gets this control plane's
        // (local under `drover up`), stored so that it never changes.
        spec.provider = Some(
            spec.provider
                .unwrap_or_else(|| self.providers.default_kind()),
        );
        let join_token = new_secret()?;
        let token = join_token.clone();
        let view = self
            .with_store(move |s| {
                s.create_cluster(&spec, &token, now())?;
                read_cluster_view(s, &spec.name)
            })
            .await?;
        self.poke();
        Ok(wire::ClusterCreated {
            cluster: self.cluster_info(view),
            join_token,
        })
    }

    /// Changes a cluster's node counts or idle time.
    pub async fn update_cluster(
        &self,
        name: String,
        update: ComputeUpdate,
    ) -> Result<wire::ClusterInfo, ControlError> {
        let view = self
            .with_store(
                move |s| -> Result<Result<ClusterView, ControlError>, StoreError> {
                    let current = s.cluster(&name)?;
                    let spec = match current.spec.updated(&update, Naming::Fields) {
                        Ok(spec) => spec,
                        Err(e) => return Ok(Err(e.into())),
                    };
                    s.update_cluster(&spec, now())?;
                    Ok(Ok(read_cluster_view(s, &name)?))
                },
            )
            .await??;
        self.poke();
        Ok(self.cluster_info(view))
    }

    /// One cluster with its status.
    pub async fn cluster(&self, name: String) -> Result<wire::ClusterInfo, ControlError> {
        let view = self
            .with_store(move |s| read_cluster_view(s, &name))
            .await?;
        Ok(self.cluster_info(view))
    }

    /// Every cluster with its status.
    pub async fn clusters(&self) -> Result<wire::ClusterList, ControlError> {
        let views = self.with_store(|s| read_all_cluster_views(s)).await?;
        Ok(wire::ClusterList {
            clusters: views.into_iter().map(|v| self.cluster_info(v)).collect(),
        })
    }

    /// Deletes a cluster as Azure does: its nodes are removed first (the
    /// provider's machines, or for a static cluster the node records; the
    /// machines' agents are then refused). While jobs are unfinished it is
    /// refused, naming them, unless `force` cancels them first.
    pub async fn delete_cluster(
        &self,
        name: String,
        force: bool,
    ) -> Result<wire::ClusterDeleted, ControlError> {
        let key = name.clone();
        let (spec, unfinished, nodes) = self
            .with_store(move |s| {
                let spec = s.cluster(&name)?.spec;
                let jobs = s.job_summaries(
                    &name,
                    &[JobState::Queued, JobState::Preparing, JobState::Running],
                )?;
                Ok((spec, jobs, s.node_summaries(&name)?))
            })
            .await?;
        if !unfinished.is_empty() && !force {
            let listed: Vec<String> = unfinished
                .iter()
                .map(|j| format!("{} ({})", j.id, j.state))
                .collect();
            return Err(ControlError::Store(StoreError::Conflict(format!(
                "cluster `{key}` has {} unfinished job(s): {}; cancel them, or delete with --force to cancel them first",
                unfinished.len(),
                listed.join(", ")
            ))));
        }
        // No scaling pass acts on the cluster from here on.
        self.scaling
            .lock()
            .map_err(|_| ControlError::Poisoned)?
            .entry(key.clone())
            .or_default()
            .deleting = true;
        let result = self.tear_down_cluster(&spec, &unfinished, &nodes).await;
        let mut memo = self.scaling.lock().map_err(|_| ControlError::Poisoned)?;
        match result {
            Ok(gone) => {
                memo.remove(&key);
                Ok(gone)
            }
            Err(e) => {
                if let Some(m) = memo.get_mut(&key) {
                    m.deleting = false;
                }
                Err(e)
            }
        }
    }

    async fn tear_down_cluster(
        &self,
        spec: &ComputeSpec,
        unfinished: &[JobSummary],
        nodes: &[NodeSummary],
    ) -> Result<wire::ClusterDeleted, ControlError> {
        let mut canceled = Vec::new();
        for j in unfinished {
            let id = j.id.clone();
            let t = self.with_store(move |s| s.cancel_job(&id, now())).await?;
            self.wake(&t.bumped);
            canceled.push(j.id.clone());
        }
        let provider = self.providers.for_cluster(spec);
        let mut removed = Vec::new();
        for n in nodes {
            if provider.creates_nodes() {
                provider.remove_node(spec, &n.id).await?;
            }
            let id = n.id.clone();
            self.with_store(move |s| s.remove_node(&id)).await?;
            removed.push(n.id.clone());
        }
        let name = spec.name.clone();
        self.with_store(move |s| s.delete_cluster(&name)).await?;
        // The cluster is gone either way; a leftover network is only logged.
        if let Err(e) = provider.cluster_deleted(spec).await {
            tracing::warn!(cluster = %spec.name, error = %e, "releasing the cluster's provider resources failed");
        }
        tracing::info!(cluster = %spec.name, nodes = removed.len(), jobs_canceled = canceled.len(), "cluster deleted");
        Ok(wire::ClusterDeleted {
            cluster: spec.name.clone(),
            removed_nodes: removed,
            canceled_jobs: canceled,
        })
    }
}
