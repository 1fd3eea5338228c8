//! The agent's Prometheus metrics: one registry, fed by the heartbeat and
//! the part supervisors. `crate::http::metrics` serves them.

use std::sync::atomic::AtomicU64;

use drover_api::wire::PartStatus;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::inventory::{GpuHealth, Inventory};

type Labels = Vec<(String, String)>;

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// Heartbeat round trips, seconds.
    pub heartbeat_latency: Histogram,
    /// Heartbeats that failed.
    pub heartbeat_failures: Counter,
    /// Parts by state, as last reported.
    pub parts: Family<Labels, Gauge>,
    /// Parts that had to pull their image.
    pub pulls: Counter,
    /// GPU utilization, percent, by GPU.
    pub gpu_utilization: Family<Labels, Gauge>,
    /// GPU memory used, bytes, by GPU.
    pub gpu_memory_used: Family<Labels, Gauge<u64, AtomicU64>>,
    /// GPU memory installed, bytes, by GPU.
    pub gpu_memory_total: Family<Labels, Gauge<u64, AtomicU64>>,
    /// 1 when the GPU is healthy, by GPU.
    pub gpu_healthy: Family<Labels, Gauge>,
    /// IMDS firewall rules found missing and put back.
    pub imds_firewall_repairs: Counter,
    /// IMDS firewall checks that failed.
    pub imds_firewall_failures: Counter,
    /// Token endpoint requests, by protocol and outcome.
    pub identity_requests: Family<Labels, Counter>,
    /// Token endpoint answers, seconds from request to answer.
    pub identity_latency: Histogram,
    /// Environment images made ready for parts, by outcome (present,
    /// built, pulled, failed).
    pub environment_images: Family<Labels, Counter>,
    /// Registry logins with the managed identity, by outcome (exchanged,
    /// cached, anonymous, failed).
    pub registry_logins: Family<Labels, Counter>,
    /// Images removed by collection under disk pressure.
    pub image_gc_removed: Counter,
    /// Bytes those images held.
    pub image_gc_bytes: Counter,
    /// Removals that failed.
    pub image_gc_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("drover_agent");
        let heartbeat_latency = Histogram::new([
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let m = Metrics {
            heartbeat_latency,
            heartbeat_failures: Counter::default(),
            parts: Family::default(),
            pulls: Counter::default(),
            environment_images: Family::default(),
            registry_logins: Family::default(),
            image_gc_removed: Counter::default(),
            image_gc_bytes: Counter::default(),
            image_gc_failures: Counter::default(),
            gpu_utilization: Family::default(),
            gpu_memory_used: Family::default(),
            gpu_memory_total: Family::default(),
            gpu_healthy: Family::default(),
            imds_firewall_repairs: Counter::default(),
            imds_firewall_failures: Counter::default(),
            identity_requests: Family::default(),
            // Cached tokens answer in well under a millisecond; IMDS round
            // trips take milliseconds to seconds.
            identity_latency: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
            ]),
            registry: Registry::default(),
        };
        registry.register(
            "heartbeat_latency_seconds",
            "heartbeat round trip to the control plane",
            m.heartbeat_latency.clone(),
        );
        registry.register(
            "heartbeat_failures",
            "heartbeats that failed",
            m.heartbeat_failures.clone(),
        );
        registry.register("parts", "job parts on this node by state", m.parts.clone());
        registry.register("pulls", "parts that pulled their image", m.pulls.clone());
        registry.register(
            "image_gc_removed",
            "images removed by collection under disk pressure",
            m.image_gc_removed.clone(),
        );
        registry.register(
            "image_gc_freed_bytes",
            "bytes of the images collection removed",
            m.image_gc_bytes.clone(),
        );
        registry.register(
            "image_gc_failures",
            "image removals by collection that failed",
            m.image_gc_failures.clone(),
        );
        registry.register(
            "environment_images",
            "environment images made ready for parts, by outcome",
            m.environment_images.clone(),
        );
        registry.register(
            "registry_logins",
            "registry logins with the managed identity, by outcome",
            m.registry_logins.clone(),
        );
        registry.register(
            "imds_firewall_repairs",
            "imds firewall rules found missing and put back",
            m.imds_firewall_repairs.clone(),
        );
        registry.register(
            "imds_firewall_failures",
            "imds firewall checks that failed",
            m.imds_firewall_failures.clone(),
        );
        registry.register(
            "gpu_utilization_percent",
            "gpu utilization",
            m.gpu_utilization.clone(),
        );
        registry.register(
            "gpu_memory_used_bytes",
            "gpu memory in use",
            m.gpu_memory_used.clone(),
        );
        registry.register(
            "gpu_memory_total_bytes",
            "gpu memory installed",
            m.gpu_memory_total.clone(),
        );
        registry.register(
            "gpu_healthy",
            "1 when the gpu is healthy",
            m.gpu_healthy.clone(),
        );
        registry.register(
            "identity_requests",
            "token endpoint requests by protocol and outcome",
            m.identity_requests.clone(),
        );
        registry.register(
            "identity_request_latency_seconds",
            "token endpoint time from request to answer",
            m.identity_latency.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Records the GPUs of an inventory.
    pub fn observe_gpus(&self, inv: &Inventory) {
        for g in &inv.gpus {
            let labels = vec![
                ("gpu".to_string(), g.index.to_string()),
                ("uuid".to_string(), g.uuid.clone().unwrap_or_default()),
            ];
            if let Some(u) = g.utilization {
                self.gpu_utilization
                    .get_or_create(&labels)
                    .set(i64::from(u.gpu_percent));
            }
            if let Some(m) = g.memory {
                self.gpu_memory_used
                    .get_or_create(&labels)
                    .set(m.used_bytes);
                self.gpu_memory_total
                    .get_or_create(&labels)
                    .set(m.total_bytes);
            }
            let healthy = matches!(g.health, GpuHealth::Healthy);
            self.gpu_healthy
                .get_or_create(&labels)
                .set(i64::from(healthy));
        }
    }

    /// Records the part states a heartbeat carries.
    pub fn observe_parts(&self, parts: &[PartStatus]) {
        self.parts.clear();
        for p in parts {
            self.parts
                .get_or_create(&vec![("state".to_string(), p.state.as_str().to_string())])
                .inc();
        }
    }

    /// Records one token endpoint request.
    pub fn observe_identity(&self, protocol: &str, outcome: &str, latency: std::time::Duration) {
        self.identity_requests
            .get_or_create(&vec![
                ("protocol".to_string(), protocol.to_string()),
                ("outcome".to_string(), outcome.to_string()),
            ])
            .inc();
        self.identity_latency.observe(latency.as_secs_f64());
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_api::wire::PartKey;
    use drover_api::wire::PartState;

    #[test]
    fn renders_parts_and_latency() {
        let m = Metrics::default();
        m.heartbeat_latency.observe(0.02);
        m.observe_parts(&[PartStatus {
            part: PartKey::new("j", 1, 0),
            state: PartState::Running,
            exit_code: None,
        }]);
        let text = m.render();
        assert!(
            text.contains("drover_agent_heartbeat_latency_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("drover_agent_parts{state=\"running\"} 1"),
            "{text}"
        );
        assert!(text.contains("drover_agent_pulls_total 0"), "{text}");
    }
}
