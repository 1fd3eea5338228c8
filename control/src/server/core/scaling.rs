//! The scheduling and scaling pass: placements, then for each cluster the
//! provider's machines are read, [`crate::autoscaler::plan`] plans, and
//! this module only carries the plan out.

use drover_api::cluster::{JobState, Timestamp};
use drover_api::compute::ComputeSpec;

use super::{ControlPlane, new_secret, now, read_all_cluster_views};
use crate::autoscaler::{self, ScalingInput};
use crate::provider::Provider;
use crate::server::error::ControlError;
use crate::server::events::Event;

/// Why a registered node's machine is removed.
#[derive(Debug, Clone, Copy)]
enum Removal {
    /// Scale-down of an idle node.
    Idle,
    /// A lost or preempted node holding nothing.
    Dead,
}

impl ControlPlane {
    /// One scheduling and scaling pass over every cluster: places what can
    /// start (waking those nodes' watchers) and asks the provider for what
    /// the autoscaler wants, remembering its errors.
    pub async fn schedule_pass(&self) -> Result<(), ControlError> {
        let t = now();
        let views = self.with_store(|s| read_all_cluster_views(s)).await?;
        for view in views {
            let plan = crate::scheduler::schedule(&view.cluster.spec, &view.nodes, &view.jobs);
            for placement in plan.placements {
                let job = placement.job_id.clone();
                match self
                    .with_store(move |s| {
                        s.record_placement(&placement.job_id, &placement.nodes, now())
                    })
                    .await
                {
                    Ok(placed) => self.wake(&placed.bumped),
                    // A heartbeat or cancel raced the pass; the next pass sees it.
                    Err(e) => tracing::debug!(job = %job, error = %e, "placement refused"),
                }
            }
            self.scale(&view.cluster.spec, t).await?;
        }
        Ok(())
    }

    /// The join token for machines the provider creates in `cluster`: made
    /// (and its hash stored) on first use after a start.
    async fn provision_token(&self, cluster: &str) -> Result<String, ControlError> {
        if let Some(t) = self.memo(cluster).join_token {
            return Ok(t);
        }
        let token = new_secret()?;
        let (name, t) = (cluster.to_string(), token.clone());
        self.with_store(move |s| s.set_join_token(&name, &t))
            .await?;
        let mut all = self.scaling.lock().map_err(|_| ControlError::Poisoned)?;
        all.entry(cluster.to_string()).or_default().join_token = Some(token.clone());
        Ok(token)
    }

    /// One autoscaling step for a cluster: reads what is registered and what
    /// the provider has, plans ([`autoscaler::plan`]) and carries the plan
    /// out. Errors of the provider are kept as the cluster's scaling errors,
    /// every one of them, never returned.
    async fn scale(&self, spec: &ComputeSpec, t: Timestamp) -> Result<(), ControlError> {
        let provider = self.providers.for_cluster(spec);
        let name = spec.name.clone();
        let (nodes, jobs) = self
            .with_store(move |s| {
                Ok((
                    s.node_summaries(&name)?,
                    s.job_summaries(
                        &name,
                        &[JobState::Queued, JobState::Preparing, JobState::Running],
                    )?,
                ))
            })
            .await?;
        let mut errors: Vec<String> = Vec::new();
        let machines = match provider.list_nodes(spec).await {
            Ok(machines) => Some(machines),
            Err(e) => {
                errors.push(e.message());
                None
            }
        };
        let memo = self.memo(&spec.name);
        if memo.deleting {
            return Ok(());
        }
        let reason = memo.reason();
        let plan = autoscaler::plan(
            &ScalingInput {
                spec,
                nodes: &nodes,
                jobs: &jobs,
                machines: machines.as_deref(),
                pending: &memo.pending,
                now: t,
                last_scale_action: memo.last_scale_action,
                provider_error: reason.as_deref(),
                register_timeout: self.config.register_timeout,
            },
            &self.config.autoscaler,
        );
        let mut pending = plan.pending.clone();

        for gone in &plan.never_joined {
            self.metrics.emit(Event::NodeNeverJoined {
                cluster: &spec.name,
                node: &gone.machine,
                why: &gone.why,
            });
            errors.push(format!(
                "node {} failed before registering: {}",
                gone.machine, gone.why
            ));
            if let Err(e) = provider.remove_node(spec, &gone.machine).await {
                errors.push(e.message());
            }
        }
        if plan.create > 0 {
            let token = if provider.creates_nodes() {
                self.provision_token(&spec.name).await?
            } else {
                String::new()
            };
            match provider.create_nodes(spec, plan.create, &token).await {
                Ok(made) => {
                    self.metrics.emit(Event::NodesCreated {
                        cluster: &spec.name,
                        count: made.len(),
                    });
                    pending.extend(made.into_iter().map(|m| (m.id, t)));
                }
                Err(e) => errors.push(e.message()),
            }
        }
        for n in &plan.drain {
            if provider.creates_nodes() {
                let id = n.clone();
                // Nothing may be placed on it while it goes.
                if !self.with_store(move |s| s.mark_node_leaving(&id)).await? {
                    continue;
                }
            }
            self.remove_machine(provider, spec, n, Removal::Idle, &mut errors)
                .await?;
        }
        // Dead nodes (lost, preempted) that hold nothing: their machines go,
        // and so do their records, once the provider has removed them.
        for n in &plan.reclaim {
            self.remove_machine(provider, spec, n, Removal::Dead, &mut errors)
                .await?;
        }

        let acted = plan.acts();
        let new_errors = {
            let mut all = self.scaling.lock().map_err(|_| ControlError::Poisoned)?;
            let m = all.entry(spec.name.clone()).or_default();
            m.pending = pending;
            if acted && errors.is_empty() {
                m.last_scale_action = Some(t);
            }
            let new: Vec<String> = errors
                .iter()
                .filter(|e| !m.provider_errors.contains(e))
                .cloned()
                .collect();
            if acted || !errors.is_empty() {
                m.provider_errors = errors;
            }
            new
        };
        // Only new errors are recorded: the loop runs every few seconds and
        // must not fill the cluster's error list with repeats.
        for message in new_errors {
            self.metrics.emit(Event::ScalingFailed {
                cluster: &spec.name,
                message: &message,
            });
            let name = spec.name.clone();
            self.with_store(move |s| {
                s.record_scaling_error(&name, &drover_api::cluster::ScalingError { at: t, message })
            })
            .await?;
        }
        Ok(())
    }

    /// Removes a registered node's machine through the provider and then its
    /// record; a provider failure is kept in `errors` and the record stays.
    async fn remove_machine(
        &self,
        provider: &dyn Provider,
        spec: &ComputeSpec,
        node: &str,
        why: Removal,
        errors: &mut Vec<String>,
    ) -> Result<(), ControlError> {
        match provider.remove_node(spec, node).await {
            Ok(()) => {
                let cluster = spec.name.as_str();
                self.metrics.emit(match why {
                    Removal::Idle => Event::NodeRemoved { cluster, node },
                    Removal::Dead => Event::NodeReclaimed { cluster, node },
                });
                self.forget_node(node).await
            }
            Err(e) => {
                errors.push(e.message());
                Ok(())
            }
        }
    }

    /// Deletes the record of a node whose machine is gone.
    async fn forget_node(&self, id: &str) -> Result<(), ControlError> {
        let id = id.to_string();
        match self.with_store(move |s| s.remove_node(&id)).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e.message(), "forgetting a removed node failed");
                Ok(())
            }
        }
    }

    /// Injects a preemption of `node` through its cluster's provider (a
    /// `Preempt` scheduled event on local clusters); returns the event id.
    pub async fn evict_node(&self, node: String) -> Result<String, ControlError> {
        let id = node.clone();
        let spec = self
            .with_store(move |s| {
                let n = s.node(&id)?;
                Ok(s.cluster(&n.cluster)?.spec)
            })
            .await?;
        let event = self
            .providers
            .for_cluster(&spec)
            .evict(&spec, &node)
            .await?;
        tracing::info!(node = %node, event = %event, "preemption injected");
        Ok(event)
    }
}
