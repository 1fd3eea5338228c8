//! The control plane's notable events and its Prometheus metrics.
//!
//! Every notable event is one typed [`Event`]; [`ServerMetrics::emit`] turns
//! it into both a log line and a counter, so the two can never disagree.
//! Gauges (nodes by state, current and target sizes, queued jobs) are read
//! from the store when `/metrics` is scraped, never kept twice.

use drover_api::cluster::NodeState;
use drover_api::job::ParallelProgress;
use drover_api::wire;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Something the control plane did or saw that operators care about.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// The provider created nodes for a cluster.
    NodesCreated {
        /// The cluster.
        cluster: &'a str,
        /// How many.
        count: usize,
    },
    /// An idle node was drained and its machine removed (scale-down).
    NodeRemoved {
        /// The cluster.
        cluster: &'a str,
        /// The node.
        node: &'a str,
    },
    /// A dead node's machine was removed (after loss or preemption).
    NodeReclaimed {
        /// The cluster.
        cluster: &'a str,
        /// The node.
        node: &'a str,
    },
    /// A created machine died or never registered and was removed.
    NodeNeverJoined {
        /// The cluster.
        cluster: &'a str,
        /// The machine.
        node: &'a str,
        /// Why it was given up.
        why: &'a str,
    },
    /// A node stopped being usable: silent past the grace period
    /// (`unusable`) or told preempted; its job was requeued.
    NodeLost {
        /// The node.
        node: &'a str,
        /// `unusable` or `preempted`.
        state: NodeState,
    },
    /// A parallel job's runtime reported mini-batches finished since its
    /// last report.
    MiniBatchesFinished {
        /// The job's cluster.
        cluster: &'a str,
        /// The job.
        job: &'a str,
        /// Newly succeeded mini-batches.
        succeeded: u64,
        /// Newly failed mini-batches (after their retries).
        failed: u64,
        /// Where the job stands now.
        progress: &'a ParallelProgress,
    },
    /// A provider call failed (a new error, recorded as a scaling error).
    ScalingFailed {
        /// The cluster.
        cluster: &'a str,
        /// The provider's message, with its causes.
        message: &'a str,
    },
}

impl Event<'_> {
    /// The value of the `event` label.
    pub fn name(&self) -> &'static str {
        match self {
            Event::NodesCreated { .. } => "nodes_created",
            Event::NodeRemoved { .. } => "node_removed",
            Event::NodeReclaimed { .. } => "node_reclaimed",
            Event::NodeNeverJoined { .. } => "node_never_joined",
            Event::NodeLost { .. } => "node_lost",
            Event::ScalingFailed { .. } => "scaling_failed",
            Event::MiniBatchesFinished { .. } => "minibatches_finished",
        }
    }
}

/// The server's metrics registry.
pub struct ServerMetrics {
    registry: Registry,
    /// Notable events by cluster (or node state, for losses) and kind.
    events: Family<Labels, Counter>,
    /// Heartbeats accepted.
    heartbeats: Counter,
    /// Mini-batches of parallel jobs finished, by cluster and outcome.
    minibatches: Family<Labels, Counter>,
}

impl std::fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerMetrics").finish_non_exhaustive()
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("drover_server");
        let events = Family::<Labels, Counter>::default();
        let heartbeats = Counter::default();
        let minibatches = Family::<Labels, Counter>::default();
        registry.register(
            "minibatches",
            "mini-batches of parallel jobs finished (outcome: succeeded, failed), as their runtimes report them",
            minibatches.clone(),
        );
        registry.register(
            "events",
            "notable control-plane events (nodes created, removed, reclaimed, lost; scaling failures)",
            events.clone(),
        );
        registry.register(
            "heartbeats",
            "agent heartbeats accepted",
            heartbeats.clone(),
        );
        ServerMetrics {
            registry,
            events,
            heartbeats,
            minibatches,
        }
    }
}

impl ServerMetrics {
    /// Logs the event and counts it.
    pub fn emit(&self, event: Event<'_>) {
        let (scope, value) = match event {
            Event::NodesCreated { cluster, count } => {
                tracing::info!(cluster, count, "nodes created");
                ("cluster", cluster.to_string())
            }
            Event::NodeRemoved { cluster, node } => {
                tracing::info!(cluster, node, "idle node removed");
                ("cluster", cluster.to_string())
            }
            Event::NodeReclaimed { cluster, node } => {
                tracing::info!(cluster, node, "dead node reclaimed");
                ("cluster", cluster.to_string())
            }
            Event::NodeNeverJoined { cluster, node, why } => {
                tracing::warn!(cluster, node, why, "created node given up");
                ("cluster", cluster.to_string())
            }
            Event::NodeLost { node, state } => {
                tracing::warn!(node, state = %state, "node lost; its job is requeued");
                ("state", state.to_string())
            }
            Event::ScalingFailed { cluster, message } => {
                tracing::warn!(cluster, error = message, "scaling failed");
                ("cluster", cluster.to_string())
            }
            Event::MiniBatchesFinished {
                cluster,
                job,
                succeeded,
                failed,
                progress,
            } => {
                tracing::info!(cluster, job, progress = %progress, "parallel job progress");
                for (outcome, n) in [("succeeded", succeeded), ("failed", failed)] {
                    self.minibatches
                        .get_or_create(&vec![
                            ("cluster".to_string(), cluster.to_string()),
                            ("outcome".to_string(), outcome.to_string()),
                        ])
                        .inc_by(n);
                }
                // Counted above by outcome, not as one event per report.
                return;
            }
        };
        self.events
            .get_or_create(&vec![
                (scope.to_string(), value),
                ("event".to_string(), event.name().to_string()),
            ])
            .inc();
    }

    /// Counts an accepted heartbeat.
    pub fn heartbeat(&self) {
        self.heartbeats.inc();
    }

    /// Prometheus text: the counters, then per-cluster gauges from `clusters`.
    pub fn render(&self, clusters: &wire::ClusterList) -> String {
        let mut registry = Registry::with_prefix("drover_cluster");
        let nodes = Family::<Labels, Gauge>::default();
        let current = Family::<Labels, Gauge>::default();
        let target = Family::<Labels, Gauge>::default();
        registry.register("nodes", "nodes by state", nodes.clone());
        registry.register("current_nodes", "live nodes", current.clone());
        registry.register(
            "target_nodes",
            "nodes the autoscaler heads to",
            target.clone(),
        );
        for c in &clusters.clusters {
            let name = c.spec.name.clone();
            let cluster = vec![("cluster".to_string(), name.clone())];
            current
                .get_or_create(&cluster)
                .set(i64::from(c.status.current_node_count));
            target
                .get_or_create(&cluster)
                .set(i64::from(c.status.target_node_count));
            for state in NodeState::ALL {
                nodes
                    .get_or_create(&vec![
                        ("cluster".to_string(), name.clone()),
                        ("state".to_string(), state.to_string()),
                    ])
                    .set(i64::from(c.status.node_state_counts.get(state)));
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        let mut gauges = String::new();
        let _ = encode(&mut gauges, &registry);
        // Both end with `# EOF`; keep one, at the end.
        out.truncate(
            out.trim_end()
                .strip_suffix("# EOF")
                .map_or(out.len(), str::len),
        );
        out.push_str(&gauges);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_counted_by_cluster_and_kind() {
        let m = ServerMetrics::default();
        m.emit(Event::NodesCreated {
            cluster: "cpu",
            count: 2,
        });
        m.emit(Event::NodeReclaimed {
            cluster: "cpu",
            node: "n1",
        });
        m.emit(Event::NodeLost {
            node: "n1",
            state: NodeState::Preempted,
        });
        m.heartbeat();
        let text = m.render(&wire::ClusterList { clusters: vec![] });
        assert!(
            text.contains(r#"drover_server_events_total{cluster="cpu",event="nodes_created"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"drover_server_events_total{state="preempted",event="node_lost"} 1"#),
            "{text}"
        );
        assert!(text.contains("drover_server_heartbeats_total 1"), "{text}");
        let progress = ParallelProgress {
            attempt: 1,
            done: 5,
            failed: 1,
            total: 9,
            items: 40,
        };
        for (succeeded, failed) in [(3, 0), (1, 1)] {
            m.emit(Event::MiniBatchesFinished {
                cluster: "cpu",
                job: "j",
                succeeded,
                failed,
                progress: &progress,
            });
        }
        let text = m.render(&wire::ClusterList { clusters: vec![] });
        assert!(
            text.contains(
                r#"drover_server_minibatches_total{cluster="cpu",outcome="succeeded"} 4"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"drover_server_minibatches_total{cluster="cpu",outcome="failed"} 1"#),
            "{text}"
        );
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
