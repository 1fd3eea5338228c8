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
//! The types here are plain serde structs because the inventory travels to
//! the control plane in heartbeats; they are expected to move to `drover-api`
//! once the heartbeat wire format is defined.

pub mod health;
pub mod host;
pub mod nvml;
pub mod table;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use health::{GpuEvent, GpuEventKind, GpuHealth, HealthPolicy};
pub use host::{DiskInfo, HostInfo, HostProbe};

/// The NVML library the agent loads when nothing else is configured: the
/// versioned name the NVIDIA driver installs (the unversioned `.so` only comes
/// with development packages).
pub const DEFAULT_NVML_LIB: &str = "libnvidia-ml.so.1";

/// Everything this node has, at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    /// When this inventory was collected (Unix ms).
    pub collected_at_unix_ms: u64,
    /// Host resources.
    pub host: HostInfo,
    /// The GPU driver, when NVML is present.
    pub driver: Option<DriverInfo>,
    /// GPUs in NVML index order; empty on a node without NVML.
    pub gpus: Vec<GpuInfo>,
}

/// The NVIDIA driver as NVML reports it; the same for every GPU on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverInfo {
    /// Kernel driver version, e.g. `550.54.15`.
    pub driver_version: Option<String>,
    /// Highest CUDA version the driver supports, e.g. `12.4`.
    pub cuda_version: Option<String>,
    /// NVML library version, e.g. `12.550.54.15`.
    pub nvml_version: Option<String>,
}

/// One GPU. Every fact NVML may be unable to give (an older driver lacking the
/// function, a GPU generation not supporting it) is an `Option`, absent rather
/// than an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// NVML index (not necessarily the CUDA index, which depends on
    /// `CUDA_DEVICE_ORDER`).
    pub index: u32,
    /// Product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: Option<String>,
    /// Stable identity, e.g. `GPU-5f1c...`; what Docker device requests use.
    pub uuid: Option<String>,
    /// Board serial number.
    pub serial: Option<String>,
    /// PCI bus id, e.g. `00000000:18:00.0`.
    pub pci_bus_id: Option<String>,
    /// Frame-buffer memory.
    pub memory: Option<GpuMemory>,
    /// Utilization over the driver's last sample period.
    pub utilization: Option<GpuUtilization>,
    /// Die temperature, °C.
    pub temperature_c: Option<u32>,
    /// Power draw, milliwatts.
    pub power_mw: Option<u32>,
    /// CUDA compute capability, e.g. `9.0`.
    pub compute_capability: Option<String>,
    /// ECC mode.
    pub ecc: Option<EccMode>,
    /// Uncorrected ECC errors since the driver loaded.
    pub ecc_uncorrected_volatile: Option<u64>,
    /// Uncorrected ECC errors over the GPU's lifetime.
    pub ecc_uncorrected_aggregate: Option<u64>,
    /// Retired memory pages (pre-Ampere GPUs; Ampere and later remap rows).
    pub retired_pages: Option<RetiredPages>,
    /// Remapped memory rows (Ampere and later).
    pub remapped_rows: Option<RemappedRows>,
    /// Multi-Instance GPU mode (A100/H100 class GPUs).
    pub mig: Option<MigMode>,
    /// Health judged from XID and ECC events.
    pub health: GpuHealth,
}

/// Frame-buffer memory, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuMemory {
    /// Installed.
    pub total_bytes: u64,
    /// Allocated (includes the driver's reservation).
    pub used_bytes: u64,
    /// Unallocated.
    pub free_bytes: u64,
}

/// Utilization, percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuUtilization {
    /// Time a kernel was running.
    pub gpu_percent: u32,
    /// Time device memory was being read or written.
    pub memory_percent: u32,
}

/// ECC mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EccMode {
    /// ECC is on now.
    pub enabled: bool,
    /// ECC will be on after the next reboot.
    pub pending_enabled: bool,
}

/// Retired pages by cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredPages {
    /// Retired after repeated single-bit errors.
    pub single_bit_ecc: u32,
    /// Retired after a double-bit error.
    pub double_bit_ecc: u32,
    /// Pages wait for a reboot to be retired.
    pub pending: Option<bool>,
}

/// Row remapping state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemappedRows {
    /// Rows remapped after correctable errors.
    pub correctable: u32,
    /// Rows remapped after uncorrectable errors.
    pub uncorrectable: u32,
    /// A remapping waits for a GPU reset.
    pub pending: bool,
    /// A remapping failed: the GPU should be replaced.
    pub failed: bool,
}

/// Multi-Instance GPU mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigMode {
    /// MIG is on now.
    pub enabled: bool,
    /// MIG will be on after the next GPU reset.
    pub pending_enabled: bool,
}

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
        }
    }

    /// Reads the whole inventory now.
    pub fn refresh(&mut self) -> Inventory {
        let host = self.host.collect();
        let GpuReport { driver, gpus } = self.gpus.discover();
        Inventory {
            collected_at_unix_ms: health::unix_ms(SystemTime::now()),
            host,
            driver,
            gpus,
        }
    }
}
