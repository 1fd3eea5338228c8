//! Clusters: create, update, show, list and delete, with the status the
//! autoscaler would report for each (allocation state, node counts, errors).

use drover_api::cluster::{ClusterStatus, NodeStateCounts, NodeSummary};
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
        spec: ComputeSpec,
    ) -> Result<wire::ClusterCreated, ControlError> {
        spec.validate(Naming::Fields)?;
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

    /// Deletes a cluster without nodes or unfinished jobs.
    pub async fn delete_cluster(&self, name: String) -> Result<(), ControlError> {
        let key = name.clone();
        let spec = self
            .with_store(move |s| {
                let spec = s.cluster(&name)?.spec;
                s.delete_cluster(&name)?;
                Ok(spec)
            })
            .await?;
        if let Ok(mut m) = self.scaling.lock() {
            m.remove(&key);
        }
        // The cluster is gone either way; a leftover network is only logged.
        if let Err(e) = self
            .providers
            .for_cluster(&spec)
            .cluster_deleted(&spec)
            .await
        {
            tracing::warn!(cluster = %key, error = %e, "releasing the cluster's provider resources failed");
        }
        Ok(())
    }
}
