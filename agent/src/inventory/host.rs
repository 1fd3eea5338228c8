//! Host facts through sysinfo: what the VM has, independent of GPUs.

use drover_api::inventory::{DiskInfo, HostInfo};
use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, System};

/// Reads host facts. Holds sysinfo's state so repeated refreshes reuse it
/// instead of re-reading the CPU list each time.
pub struct HostProbe {
    /// `None` where sysinfo does not support this OS.
    system: Option<System>,
    /// `None` where sysinfo cannot list disks on this OS.
    disks: Option<Disks>,
    /// Kernel, OS and physical core count: fixed until reboot, and reading
    /// them (`/etc/os-release`, all of `/proc/cpuinfo`) would otherwise be
    /// most of a refresh.
    kernel: Option<String>,
    os: Option<String>,
    physical_cores: Option<usize>,
}

impl Default for HostProbe {
    fn default() -> Self {
        let mut system = ok("system", System::new());
        if let Some(system) = &mut system {
            // The CPU list (and brand) does not change while the agent runs.
            system.refresh_cpu_list(CpuRefreshKind::nothing());
        }
        Self {
            system,
            disks: ok("disks", Disks::new()),
            kernel: ok("kernel", System::kernel_version()),
            os: ok("os", System::long_os_version()),
            physical_cores: ok("physical_cores", System::physical_core_count()),
        }
    }
}

impl HostProbe {
    /// Reads the current host facts. Each fact the OS will not give is left
    /// out (`None`) and logged at debug, never an error: an inventory with a
    /// missing load average is still an inventory.
    pub fn collect(&mut self) -> HostInfo {
        if let Some(system) = &mut self.system {
            system.refresh_memory();
        }
        let system = self.system.as_ref();
        let mut disks: Vec<DiskInfo> = Vec::new();
        if let Some(list) = &mut self.disks {
            // Re-list each time: mounts come and go (scratch disks, volumes).
            // Sizes only; per-disk I/O counters are not inventory.
            list.refresh_specifics(true, DiskRefreshKind::nothing().with_storage());
            disks = list
                .iter()
                .map(|d| DiskInfo {
                    mount_point: d.mount_point().to_string_lossy().into_owned(),
                    file_system: d.file_system().to_string_lossy().into_owned(),
                    total_bytes: d.total_space(),
                    available_bytes: d.available_space(),
                })
                .collect();
        }
        disks.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
        HostInfo {
            // Read each time: cloud-init may set it after the agent started.
            hostname: ok("hostname", System::host_name()),
            kernel: self.kernel.clone(),
            os: self.os.clone(),
            cpu_model: system
                .and_then(|s| s.cpus().first())
                .map(|c| c.brand().trim().to_owned())
                .filter(|b| !b.is_empty()),
            logical_cores: system.map_or(0, |s| s.cpus().len()),
            physical_cores: self.physical_cores,
            memory_total_bytes: system.map_or(0, System::total_memory),
            memory_available_bytes: system.map_or(0, System::available_memory),
            disks,
            load_average: ok("load_average", System::load_average())
                .map(|l| [l.one, l.five, l.fifteen]),
            uptime_secs: ok("uptime", System::uptime()),
        }
    }
}

fn ok<T>(field: &'static str, r: Result<T, sysinfo::Error>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(error) => {
            tracing::debug!(field, %error, "host fact unavailable");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_facts_match_the_os() {
        let info = HostProbe::default().collect();
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        // available_parallelism may be limited by affinity or cgroups, never above the CPU count.
        assert!(info.logical_cores >= cpus, "{info:?}");
        assert!(info.memory_total_bytes > 0);
        assert!(info.memory_available_bytes <= info.memory_total_bytes);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert_eq!(info.memory_total_bytes, kib * 1024);
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(info.hostname.as_deref(), Some(hostname.trim()));
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(info.kernel.as_deref(), Some(release.trim()));
        assert!(info.disks.iter().any(|d| d.total_bytes > 0), "{info:?}");
        assert!(info.uptime_secs.unwrap() > 0);
    }
}
