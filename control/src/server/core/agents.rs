//! The agent API: registration with a join token, heartbeats (with the
//! part reports they carry), the assignments long poll and log uploads,
//! plus the node listing users see.

use std::collections::HashMap;
use std::time::Duration;

use drover_api::cluster::{NodeState, Timestamp};
use drover_api::job::ParallelProgress;
use drover_api::wire;

use super::wire_map::{current_part, node_info};
use super::{ControlPlane, new_id, new_secret, now};
use crate::server::error::ControlError;
use crate::server::events::Event;
use crate::store::{
    Heartbeat, JobPart, NewLogLine, NewNode, Node, NodeInventory, Store, StoreError, VersionBump,
};

/// How long after a superseded part ended its own lines are still stored
/// (in its attempt's log): what a preempted job prints while it handles
/// SIGTERM (Azure gives at least 30 s notice, the agent a stop grace) is
/// worth keeping, a zombie attempt's output long after is not.
const SUPERSEDED_LOG_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether `line`, of an attempt that is no longer its job's current one,
/// was written (by its container's clock, else the agent's) before its
/// part ended or within [`SUPERSEDED_LOG_WINDOW`] after.
fn late_but_in_time(line: &wire::NewLogLine, parts: &[JobPart]) -> bool {
    let Some(ended) = parts
        .iter()
        .find(|p| p.attempt == line.attempt && p.node_rank == line.node_rank)
        .and_then(|p| p.ended_at)
    else {
        return false;
    };
    let written = line
        .cursor
        .map_or(line.at, |c| Timestamp(c.at_ns / 1_000_000));
    written <= ended.plus(SUPERSEDED_LOG_WINDOW)
}

/// What a heartbeat changed: versions to wake, rejected parts, whether the
/// scheduler should look again, and the node's desired-state version.
struct HeartbeatApplied {
    bumps: Vec<VersionBump>,
    rejected: Vec<wire::PartKey>,
    relevant: bool,
    version: u64,
    /// The node (it is the one heartbeating) said `preempted` just now.
    preempted: Option<String>,
}

/// An agent may say only `leaving`, `preempted` (its VM got a Preempt or
/// Terminate event), or `idle` while it holds no job.
fn check_requested_state(node: &Node, state: Option<NodeState>) -> Result<(), ControlError> {
    match state {
        None | Some(NodeState::Leaving | NodeState::Preempted) => Ok(()),
        Some(NodeState::Idle) if node.current_job.is_none() => Ok(()),
        Some(other) => Err(ControlError::Invalid(format!(
            "an agent may ask only for state leaving or preempted (or idle while it holds no job), not {other}"
        ))),
    }
}

/// Applies one heartbeat of `node` inside a store turn.
fn apply_heartbeat(
    s: &mut Store,
    node: &Node,
    req: wire::HeartbeatRequest,
) -> Result<HeartbeatApplied, StoreError> {
    let t = now();
    let inventory = match (req.gpus, req.inventory) {
        (None, None) => None,
        (gpus, details) => Some(NodeInventory {
            healthy_gpus: gpus.map_or(node.inventory.healthy_gpus, |g| g.healthy),
            total_gpus: gpus.map_or(node.inventory.total_gpus, |g| g.total),
            details: details.unwrap_or(node.inventory.details.clone()),
        }),
    };
    let mut bumps = Vec::new();
    let newly_preempted =
        node.state != NodeState::Preempted && req.state == Some(NodeState::Preempted);
    // A preempted node stays preempted whatever else it says while it goes.
    let state = if node.state == NodeState::Preempted {
        None
    } else if newly_preempted {
        // Its job is requeued now rather than after the grace period.
        let lost = s.mark_node_lost(
            &node.id,
            NodeState::Preempted,
            "the VM is being preempted (scheduled event)",
            t,
        )?;
        bumps.extend(lost.bumped);
        None
    } else {
        // A node marked unusable for silence that is heard from again,
        // holding nothing, is usable again.
        req.state.or_else(|| {
            (node.state == NodeState::Unusable && node.current_job.is_none())
                .then_some(NodeState::Idle)
        })
    };
    // Only what can change a scheduling decision wakes the
    // scheduler: 10,000 quiet heartbeats must not cost 10,000 passes.
    let relevant = !bumps.is_empty()
        || state.is_some_and(|s| s != node.state)
        || inventory.as_ref().is_some_and(|i| {
            i.healthy_gpus != node.inventory.healthy_gpus
                || i.total_gpus != node.inventory.total_gpus
        })
        || !req.parts.is_empty();
    s.heartbeat(
        &node.id,
        &Heartbeat {
            state,
            ip: req.ip.as_deref(),
            inventory: inventory.as_ref(),
        },
        t,
    )?;
    let mut rejected = Vec::new();
    for p in &req.parts {
        let key = &p.part;
        // A node reports only its own parts: a credential must
        // not let one node move another node's work.
        let own = match s.job_parts(&key.job) {
            Ok(parts) => parts.iter().any(|x| {
                x.attempt == key.attempt && x.node_rank == key.node_rank && x.node == node.id
            }),
            // A part the control plane never had (deleted job).
            Err(StoreError::NotFound { .. }) => false,
            Err(e) => return Err(e),
        };
        if !own {
            rejected.push(key.clone());
            continue;
        }
        let r = s.report_part(
            &key.job,
            key.attempt,
            key.node_rank,
            p.state,
            p.exit_code,
            t,
        )?;
        if !r.accepted {
            rejected.push(key.clone());
        }
        if let Some(tr) = r.job {
            bumps.extend(tr.bumped);
        }
    }
    Ok(HeartbeatApplied {
        bumps,
        rejected,
        relevant,
        version: s.desired_version(&node.id)?,
        preempted: newly_preempted.then(|| node.id.clone()),
    })
}

/// A node and the part of its current job it runs.
fn with_part(s: &Store, n: Node) -> Result<(Node, Option<JobPart>), StoreError> {
    let part = match &n.current_job {
        Some(job) => current_part(&n, s.job_parts(job)?),
        None => None,
    };
    Ok((n, part))
}

/// A parallel job whose runtime reported progress in a log upload.
struct Progressed {
    cluster: String,
    job: String,
    before: Option<ParallelProgress>,
    now: ParallelProgress,
}

impl ControlPlane {
    /// Nodes, optionally of one cluster, each with the part it runs.
    pub async fn nodes(&self, cluster: Option<String>) -> Result<wire::NodeList, ControlError> {
        let nodes = self
            .with_store(move |s| {
                let nodes = match &cluster {
                    Some(c) => s.nodes(c)?,
                    None => s.all_nodes()?,
                };
                nodes
                    .into_iter()
                    .map(|n| with_part(s, n))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        Ok(wire::NodeList {
            nodes: nodes.into_iter().map(|(n, p)| node_info(n, p)).collect(),
        })
    }

    /// One node, with the part it runs.
    pub async fn node(&self, id: String) -> Result<wire::NodeInfo, ControlError> {
        let (n, p) = self
            .with_store(move |s| {
                let n = s.node(&id)?;
                with_part(s, n)
            })
            .await?;
        Ok(node_info(n, p))
    }

    /// Registers a node that presents its cluster's join token.
    pub async fn register(
        &self,
        req: wire::RegisterRequest,
    ) -> Result<wire::RegisterResponse, ControlError> {
        let node_id = match req.node_id.clone() {
            Some(id) if drover_api::job::is_valid_name(&id) => id,
            Some(id) => {
                return Err(ControlError::Invalid(format!(
                    "node id `{id}` is not valid: use letters, digits, `_` and `-`"
                )));
            }
            None => new_id("node")?,
        };
        req.inventory
            .check_size()
            .map_err(|e| ControlError::Invalid(format!("inventory: {e}")))?;
        let credential = new_secret()?;
        let cred = credential.clone();
        let id = node_id.clone();
        let registered = self
            .with_store(move |s| -> Result<Result<Node, ControlError>, StoreError> {
                // Unknown cluster and wrong token answer alike, so the
                // endpoint does not tell which cluster names exist.
                match s.verify_join_token(&req.cluster, &req.join_token) {
                    Ok(true) => {}
                    Ok(false) | Err(StoreError::NotFound { .. }) => {
                        return Ok(Err(ControlError::Unauthorized(format!(
                            "invalid join token for cluster `{}`",
                            req.cluster
                        ))));
                    }
                    Err(e) => return Err(e),
                }
                let inventory = NodeInventory {
                    healthy_gpus: req.gpus.healthy,
                    total_gpus: req.gpus.total,
                    details: req.inventory,
                };
                // An agent that lost its credential (a reinstalled machine)
                // may take its id back as long as the old node holds no work.
                if let Ok(old) = s.node(&id) {
                    if old.cluster != req.cluster || old.current_job.is_some() {
                        return Err(StoreError::AlreadyExists {
                            kind: "node",
                            name: id,
                        });
                    }
                    s.remove_node(&id)?;
                }
                let node = s.register_node(
                    &NewNode {
                        id: &id,
                        cluster: &req.cluster,
                        ip: req.ip.as_deref(),
                        inventory: &inventory,
                        credential: &cred,
                    },
                    now(),
                )?;
                Ok(Ok(node))
            })
            .await??;
        tracing::info!(node = %registered.id, cluster = %registered.cluster, "agent registered");
        self.poke();
        Ok(wire::RegisterResponse {
            node_id,
            credential,
            heartbeat_interval_seconds: self.config.heartbeat_interval.as_secs(),
            grace_seconds: self.config.grace.as_secs(),
        })
    }

    /// Records a heartbeat and the part states it carries, authenticating
    /// the node by its credential in the same turn through the store. The heartbeat is the server's hottest call
    /// (one per node every 10 s); a separate turn just to authenticate would
    /// double its queueing behind the store's single connection.
    pub async fn heartbeat_with_credential(
        &self,
        credential: &str,
        req: wire::HeartbeatRequest,
    ) -> Result<wire::HeartbeatResponse, ControlError> {
        if req.parts.len() > wire::MAX_PART_REPORTS {
            return Err(ControlError::Invalid(format!(
                "parts: a heartbeat may carry at most {} part reports, got {}",
                wire::MAX_PART_REPORTS,
                req.parts.len()
            )));
        }
        if let Some(inv) = &req.inventory {
            inv.check_size()
                .map_err(|e| ControlError::Invalid(format!("inventory: {e}")))?;
        }
        let credential = credential.to_string();
        let applied = self
            .with_store(move |s| {
                let Some(node) = s.node_by_credential(&credential)? else {
                    return Ok(Err(ControlError::Unauthorized(
                        "invalid node credential".to_string(),
                    )));
                };
                if let Err(e) = check_requested_state(&node, req.state) {
                    return Ok(Err(e));
                }
                apply_heartbeat(s, &node, req).map(Ok)
            })
            .await??;
        Ok(self.heartbeat_applied(applied))
    }

    fn heartbeat_applied(&self, applied: HeartbeatApplied) -> wire::HeartbeatResponse {
        let HeartbeatApplied {
            bumps,
            rejected,
            relevant,
            version,
            preempted,
        } = applied;
        self.metrics.heartbeat();
        if let Some(node) = &preempted {
            self.metrics.emit(Event::NodeLost {
                node,
                state: NodeState::Preempted,
            });
        }
        self.wake(&bumps);
        if relevant {
            self.poke();
        }
        wire::HeartbeatResponse {
            desired_version: version,
            rejected,
        }
    }

    /// What `node` should run: at once when its version is newer than
    /// `seen`, else when it changes, else after `timeout` (capped).
    pub async fn assignments(
        &self,
        node: String,
        seen: u64,
        timeout: Option<Duration>,
    ) -> Result<wire::Assignments, ControlError> {
        let timeout = timeout
            .unwrap_or(self.config.watch_timeout)
            .min(self.config.watch_timeout_max);
        // Subscribe before reading the version so that a bump between the
        // read and the wait is not missed.
        let mut rx = self.subscribe(&node)?;
        let id = node.clone();
        let current = self.with_store(move |s| s.desired_version(&id)).await?;
        if current <= seen {
            let wait = async {
                loop {
                    if rx.changed().await.is_err() {
                        break;
                    }
                    if *rx.borrow_and_update() > seen {
                        break;
                    }
                }
            };
            // Timing out is the normal end of a quiet poll; at shutdown the
            // agent gets what it has now and polls the next server.
            tokio::select! {
                _ = tokio::time::timeout(timeout, wait) => {}
                _ = self.shutdown.cancelled() => {}
            }
        }
        self.unsubscribe(&node, rx);
        let (a, cluster) = self
            .with_store(move |s| {
                let a = s.assignments(&node)?;
                let cluster = s.node(&node)?.cluster;
                Ok((a, s.cluster(&cluster)?.spec))
            })
            .await?;
        Ok(wire::Assignments {
            version: a.version,
            parts: a
                .parts
                .into_iter()
                .map(|p| wire::Assignment {
                    part: p.part,
                    state: p.state,
                    spec: p.spec,
                    allowed_host_paths: cluster.allowed_host_paths.clone(),
                    identity: cluster.identity.clone(),
                    app_service_identity: cluster.app_service_identity,
                    log_cursor: p.log_cursor,
                    launch_secret: p.launch_secret.map(wire::LaunchSecret),
                    environment_registry: self.config.environment_registry.clone(),
                    nodes: p
                        .nodes
                        .into_iter()
                        .map(|n| wire::PeerNode { id: n.id, ip: n.ip })
                        .collect(),
                })
                .collect(),
        })
    }

    /// Stores log lines of parts placed on `node`, each in its attempt's
    /// log. Lines of an attempt that is no longer the job's current one are
    /// stored only if written by the time the part ended (or shortly after:
    /// [`SUPERSEDED_LOG_WINDOW`]); the rest are refused and their parts come
    /// back in `rejected`. Lines at or before their part's cursor are
    /// already stored and are skipped.
    pub async fn upload_logs(
        &self,
        node: String,
        batch: wire::LogBatch,
    ) -> Result<wire::LogBatchAccepted, ControlError> {
        let who = node.clone();
        let answer = self
            .with_store(
                move |s| -> Result<
                    Result<(wire::LogBatchAccepted, Vec<Progressed>), ControlError>,
                    StoreError,
                > {
                    let mut by_job: HashMap<&str, Vec<&wire::NewLogLine>> = HashMap::new();
                    for l in &batch.lines {
                        by_job.entry(l.job.as_str()).or_default().push(l);
                    }
                    let mut answer = wire::LogBatchAccepted {
                        accepted: 0,
                        duplicates: 0,
                        rejected: Vec::new(),
                    };
                    let mut progressed = Vec::new();
                    for (job, lines) in by_job {
                        let parts = s.job_parts(job)?;
                        // A node writes only the logs of parts it was given.
                        let own = |l: &&wire::NewLogLine| {
                            parts.iter().any(|p| {
                                p.node == node
                                    && p.attempt == l.attempt
                                    && p.node_rank == l.node_rank
                            })
                        };
                        if !lines.iter().all(own) {
                            return Ok(Err(ControlError::Forbidden(format!(
                                "node `{node}` holds no such part of job `{job}`"
                            ))));
                        }
                        let record = s.job(job)?;
                        let current = record.attempt;
                        let mut new: Vec<NewLogLine<'_>> = Vec::with_capacity(lines.len());
                        for l in lines {
                            if l.attempt != current && !late_but_in_time(l, &parts) {
                                let key = wire::PartKey::new(job, l.attempt, l.node_rank);
                                if !answer.rejected.contains(&key) {
                                    answer.rejected.push(key);
                                }
                                continue;
                            }
                            new.push(NewLogLine {
                                at: l.at,
                                attempt: l.attempt,
                                node_rank: l.node_rank,
                                stream: l.stream,
                                text: &l.text,
                                cursor: l.cursor,
                                rank: l.rank,
                            });
                        }
                        if new.is_empty() {
                            continue;
                        }
                        let appended = s.append_logs(job, &new)?;
                        answer.accepted += appended.stored;
                        answer.duplicates += appended.duplicates;
                        if let Some((before, now)) = appended.progress {
                            progressed.push(Progressed {
                                cluster: record.cluster,
                                job: job.to_string(),
                                before,
                                now,
                            });
                        }
                    }
                    Ok(Ok((answer, progressed)))
                },
            )
            .await??;
        let (answer, progressed) = answer;
        for p in &progressed {
            let (succeeded, failed) = p.now.finished_since(p.before.as_ref());
            self.metrics.emit(Event::MiniBatchesFinished {
                cluster: &p.cluster,
                job: &p.job,
                succeeded,
                failed,
                progress: &p.now,
            });
        }
        if !answer.rejected.is_empty() {
            tracing::info!(node = %who, parts = ?answer.rejected, "log lines of superseded attempts refused");
        }
        Ok(answer)
    }
}
