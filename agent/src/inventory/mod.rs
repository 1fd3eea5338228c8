//! Node inventory: what this node has — host resources (through sysinfo) and
//! GPUs with their health (through NVML).
//!
//! * [`host`]: CPU, memory, disks, load, uptime.
//! * [`GpuDiscovery`]: the boundary to the GPU driver. [`nvml::NvmlGpus`] is
//!   the real implementation (and the one tests drive, through the fake
//!   `libnvidia-ml.so.1` in `tests/fake-nvml`); [`NoGpus`] is a node without
//!   NVML. Only [`nvml`] touches NVML.
//! * [`health`]: GPU health as a pure function of XID/ECC events and time.
//! * [`table`]: the human-readable rendering used by `drover-agent inventory`.
//!
//! The inventory's types are `drover_api::inventory`'s (they travel to the
//! control plane in registration and heartbeats); this module collects them.

pub mod health;
pub mod host;
pub mod nvml;
pub mod table;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

pub use drover_api::inventory::{
    AgentInfo, DiskInfo, DriverInfo, EccMode, GpuHealth, GpuInfo, GpuMemory, GpuUtilization,
    HostInfo, Inventory, MigMode, RemappedRows, RetiredPages, VmInfo,
};
pub use health::{GpuEvent, GpuEventKind, HealthPolicy};
pub use host::HostProbe;

/// The NVML library the agent loads when nothing else is configured: the
/// versioned name the NVIDIA driver installs (the unversioned `.so` only comes
/// with development packages).
pub const DEFAULT_NVML_LIB: &str = "libnvidia-ml.so.1";

/// What a [`GpuDiscovery`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuReport {
    /// The driver, if there is one.
    pub driver: Option<DriverInfo>,
    /// GPUs in index order.
    pub gpus: Vec<GpuInfo>,
}

/// The boundary to the GPU driver: reads the GPUs and their health.
///
/// Infallible by design: a GPU fact that cannot be read is left out of the
/// report (and logged), because a node with a half-readable GPU must still
/// report the rest of itself.
pub trait GpuDiscovery: Send + Sync {
    /// Reads the GPUs now.
    fn discover(&self) -> GpuReport;
}

/// A node without NVML: no driver, no GPUs.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGpus;

impl GpuDiscovery for NoGpus {
    fn discover(&self) -> GpuReport {
        GpuReport::default()
    }
}

/// How the inventory is gathered.
#[derive(Debug, Clone)]
pub struct InventoryConfig {
    /// NVML library to load: a file name searched the way `dlopen` does, or a
    /// path.
    pub nvml_lib: PathBuf,
    /// How GPU health is judged.
    pub health: HealthPolicy,
    /// Whether to start the XID/ECC event watcher. A one-shot
    /// `drover-agent inventory` does not need it: health there is whatever
    /// the process saw, which is nothing.
    pub watch_events: bool,
    /// How long one blocking NVML event wait lasts; bounds how long stopping
    /// the watcher takes.
    pub event_wait: Duration,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        Self {
            nvml_lib: PathBuf::from(DEFAULT_NVML_LIB),
            health: HealthPolicy::default(),
            watch_events: true,
            event_wait: Duration::from_millis(500),
        }
    }
}

/// Gathers the inventory: owns the host probe and the GPU source.
pub struct InventoryCollector {
    host: HostProbe,
    gpus: Box<dyn GpuDiscovery>,
    agent: AgentInfo,
    vm: Option<VmInfo>,
}

impl InventoryCollector {
    /// Opens NVML as configured; a node without NVML gets [`NoGpus`] (see
    /// [`nvml::open_or_none`]).
    pub fn open(config: &InventoryConfig) -> Self {
        Self::with_gpus(nvml::open_or_none(config))
    }

    /// Uses the given GPU source.
    pub fn with_gpus(gpus: Box<dyn GpuDiscovery>) -> Self {
        Self {
            host: HostProbe::default(),
            gpus,
            agent: AgentInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
                data_dir: None,
            },
            vm: None,
        }
    }

    /// Reports `vm` as the VM the node is (from IMDS).
    pub fn with_vm(mut self, vm: Option<VmInfo>) -> Self {
        self.vm = vm;
        self
    }

    /// Reports `data_dir` as the agent's data directory (which no job on
    /// the node may bind).
    pub fn with_data_dir(mut self, data_dir: &std::path::Path) -> Self {
        self.agent.data_dir = Some(data_dir.display().to_string());
        self
    }

    /// Reads the whole inventory now.
    pub fn refresh(&mut self) -> Inventory {
        let host = self.host.collect();
        let GpuReport { driver, gpus } = self.gpus.discover();
        Inventory {
            collected_at_unix_ms: health::unix_ms(SystemTime::now()),
            agent: self.agent.clone(),
            vm: self.vm.clone(),
            host,
            driver,
            gpus,
        }
    }
}
