//! A node's inventory as it travels to the control plane: host resources,
//! the GPU driver and every GPU with its health, and the agent itself.
//!
//! API Boundary: plain serde data, collected by `drover-agent`'s inventory
//! module, stored by the control plane. Every struct defaults its missing
//! fields, so an older agent's document reads, and a newer agent's extra
//! fields are ignored.

use serde::{Deserialize, Serialize};

/// The agent that sent an inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentInfo {
    /// Its version (`drover-agent --version`).
    pub version: String,
    /// Its data directory, which no job on this node may bind.
    pub data_dir: Option<String>,
}

/// The VM a node is, as the cloud's Instance Metadata Service describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmInfo {
    /// The VM's unique id (`compute.vmId`).
    pub vm_id: String,
    /// Its name (`compute.name`), which scheduled events use.
    pub name: String,
    /// Its size, e.g. `Standard_ND96asr_v4`.
    pub vm_size: String,
    /// Its region.
    pub location: String,
    /// `Regular`, `Low` or `Spot`.
    pub priority: String,
    /// Its scale set, when in one.
    pub vm_scale_set_name: String,
    /// Its Azure resource id.
    pub resource_id: String,
}

/// Everything this node has, at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Inventory {
    /// When this inventory was collected (Unix ms).
    pub collected_at_unix_ms: u64,
    /// The agent that collected it.
    pub agent: AgentInfo,
    /// The VM, when the node's IMDS described it.
    pub vm: Option<VmInfo>,
    /// Host resources.
    pub host: HostInfo,
    /// The GPU driver, when NVML is present.
    pub driver: Option<DriverInfo>,
    /// GPUs in NVML index order; empty on a node without NVML.
    pub gpus: Vec<GpuInfo>,
}

/// The NVIDIA driver as NVML reports it; the same for every GPU on the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
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

/// The host's CPU, memory, disks and load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostInfo {
    /// Host name as the kernel reports it.
    pub hostname: Option<String>,
    /// Kernel version, e.g. `6.1.0-18-amd64`.
    pub kernel: Option<String>,
    /// Operating system, e.g. `Debian GNU/Linux 12 (bookworm)`.
    pub os: Option<String>,
    /// CPU model (brand string of the first CPU).
    pub cpu_model: Option<String>,
    /// Logical CPUs (hardware threads).
    pub logical_cores: usize,
    /// Physical cores, where the kernel tells.
    pub physical_cores: Option<usize>,
    /// Installed memory, bytes.
    pub memory_total_bytes: u64,
    /// Memory available to new work, bytes.
    pub memory_available_bytes: u64,
    /// Mounted file systems.
    pub disks: Vec<DiskInfo>,
    /// Load averages over 1, 5 and 15 minutes.
    pub load_average: Option<[f64; 3]>,
    /// Seconds since boot.
    pub uptime_secs: Option<u64>,
}

/// One mounted file system.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskInfo {
    /// Where it is mounted.
    pub mount_point: String,
    /// File system type, e.g. `ext4`.
    pub file_system: String,
    /// Size, bytes.
    pub total_bytes: u64,
    /// Space available to unprivileged users, bytes.
    pub available_bytes: u64,
}

/// A GPU's health, as carried in the inventory. Times are Unix milliseconds so
/// the wire form is plain numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum GpuHealth {
    /// No critical event within the recovery window.
    #[default]
    Healthy,
    /// A critical event within the recovery window.
    Unhealthy {
        /// Why: the most recent critical event, e.g. `"xid 79"`.
        reason: String,
        /// When the current run of critical events began (Unix ms).
        since_unix_ms: u64,
        /// When the most recent critical event arrived (Unix ms).
        last_event_unix_ms: u64,
        /// When the GPU becomes healthy if nothing else happens (Unix ms).
        recovers_at_unix_ms: u64,
    },
}

impl GpuHealth {
    /// Whether the GPU may be given to jobs.
    pub fn is_healthy(&self) -> bool {
        matches!(self, GpuHealth::Healthy)
    }
}

/// A node's inventory in short, as `drover node show` and `node list
/// --json` give it: the host, the GPU driver, and each GPU with its health.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct InventorySummary {
    /// When the inventory was collected (Unix ms).
    pub collected_at_unix_ms: u64,
    /// Host name.
    pub hostname: Option<String>,
    /// Operating system.
    pub os: Option<String>,
    /// Kernel version.
    pub kernel: Option<String>,
    /// CPU model.
    pub cpu_model: Option<String>,
    /// Logical CPUs.
    pub logical_cores: usize,
    /// Installed memory, bytes.
    pub memory_total_bytes: u64,
    /// The NVIDIA driver's version, when NVML is present.
    pub driver_version: Option<String>,
    /// The highest CUDA version the driver supports.
    pub cuda_version: Option<String>,
    /// GPUs in NVML index order.
    pub gpus: Vec<GpuSummary>,
}

/// One GPU in short.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuSummary {
    /// NVML index.
    pub index: u32,
    /// Product name.
    pub name: Option<String>,
    /// Stable identity (`GPU-…`).
    pub uuid: Option<String>,
    /// Frame-buffer memory, bytes.
    pub memory_total_bytes: Option<u64>,
    /// Health judged from XID and ECC events.
    pub health: GpuHealth,
}

/// The largest inventory a node may send, as JSON: room for hundreds of
/// GPUs and disks, not for a document that would weigh on the store.
pub const MAX_INVENTORY_BYTES: usize = 256 * 1024;

impl Inventory {
    /// Refuses an inventory larger than [`MAX_INVENTORY_BYTES`].
    pub fn check_size(&self) -> Result<(), String> {
        let size = serde_json::to_vec(self).map_or(usize::MAX, |v| v.len());
        if size > MAX_INVENTORY_BYTES {
            return Err(format!(
                "the inventory is {size} bytes as JSON; a node may send at most {MAX_INVENTORY_BYTES}"
            ));
        }
        Ok(())
    }

    /// The inventory in short (see [`InventorySummary`]).
    pub fn summary(&self) -> InventorySummary {
        let driver = self.driver.as_ref();
        InventorySummary {
            collected_at_unix_ms: self.collected_at_unix_ms,
            hostname: self.host.hostname.clone(),
            os: self.host.os.clone(),
            kernel: self.host.kernel.clone(),
            cpu_model: self.host.cpu_model.clone(),
            logical_cores: self.host.logical_cores,
            memory_total_bytes: self.host.memory_total_bytes,
            driver_version: driver.and_then(|d| d.driver_version.clone()),
            cuda_version: driver.and_then(|d| d.cuda_version.clone()),
            gpus: self
                .gpus
                .iter()
                .map(|g| GpuSummary {
                    index: g.index,
                    name: g.name.clone(),
                    uuid: g.uuid.clone(),
                    memory_total_bytes: g.memory.map(|m| m.total_bytes),
                    health: g.health.clone(),
                })
                .collect(),
        }
    }

    /// GPUs that are healthy, and in all.
    pub fn gpu_counts(&self) -> (u32, u32) {
        let total = u32::try_from(self.gpus.len()).unwrap_or(u32::MAX);
        let healthy = self.gpus.iter().filter(|g| g.health.is_healthy()).count();
        (u32::try_from(healthy).unwrap_or(u32::MAX), total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_and_newer_documents_read() {
        let old: Inventory = serde_json::from_str(
            r#"{"collected_at_unix_ms": 5, "host": {"hostname": "vm", "logical_cores": 2}, "gpus": [{"index": 0, "health": {"state": "healthy"}}]}"#,
        )
        .expect("an inventory without agent, driver and most fields");
        assert_eq!(old.host.logical_cores, 2);
        assert_eq!(old.agent, AgentInfo::default());
        assert_eq!(old.gpu_counts(), (1, 1));
        let newer: Inventory =
            serde_json::from_str(r#"{"host": {"numa_nodes": 2}, "later": true}"#)
                .expect("newer fields");
        assert_eq!(newer.host, HostInfo::default());
    }

    #[test]
    fn a_summary_keeps_each_gpu_and_its_health() {
        let sick = GpuHealth::Unhealthy {
            reason: "xid 79".into(),
            since_unix_ms: 1,
            last_event_unix_ms: 2,
            recovers_at_unix_ms: 3,
        };
        let inv = Inventory {
            collected_at_unix_ms: 9,
            host: HostInfo {
                hostname: Some("vm0".into()),
                logical_cores: 96,
                ..HostInfo::default()
            },
            driver: Some(DriverInfo {
                driver_version: Some("550.54.15".into()),
                cuda_version: Some("12.4".into()),
                nvml_version: None,
            }),
            gpus: vec![
                GpuInfo {
                    index: 0,
                    uuid: Some("GPU-a".into()),
                    memory: Some(GpuMemory {
                        total_bytes: 80,
                        used_bytes: 1,
                        free_bytes: 79,
                    }),
                    ..GpuInfo::default()
                },
                GpuInfo {
                    index: 1,
                    health: sick.clone(),
                    ..GpuInfo::default()
                },
            ],
            ..Inventory::default()
        };
        let s = inv.summary();
        assert_eq!(s.hostname.as_deref(), Some("vm0"));
        assert_eq!(s.logical_cores, 96);
        assert_eq!(s.driver_version.as_deref(), Some("550.54.15"));
        assert_eq!(s.gpus.len(), 2);
        assert_eq!(s.gpus[0].memory_total_bytes, Some(80));
        assert_eq!(s.gpus[0].health, GpuHealth::Healthy);
        assert_eq!(s.gpus[1].health, sick);
    }
}
