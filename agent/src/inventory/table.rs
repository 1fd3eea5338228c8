//! The human-readable form of an [`Inventory`], for `drover-agent inventory`.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use super::{GpuHealth, Inventory};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Renders the inventory as aligned text: a host section, then one row per GPU
/// with its health, then the reason for each unhealthy GPU.
pub fn render(inv: &Inventory) -> String {
    let mut out = String::new();
    let h = &inv.host;
    let dash = || "-".to_owned();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(out, "HOST");
    let _ = writeln!(
        out,
        "  hostname   {}",
        h.hostname.clone().unwrap_or_else(dash)
    );
    let _ = writeln!(
        out,
        "  os         {} (kernel {})",
        h.os.clone().unwrap_or_else(dash),
        h.kernel.clone().unwrap_or_else(dash)
    );
    let _ = writeln!(
        out,
        "  cpu        {} ({} logical, {} physical)",
        h.cpu_model.clone().unwrap_or_else(dash),
        h.logical_cores,
        h.physical_cores.map_or_else(dash, |n| n.to_string())
    );
    let _ = writeln!(
        out,
        "  memory     {:.1} GiB total, {:.1} GiB available",
        h.memory_total_bytes as f64 / GIB,
        h.memory_available_bytes as f64 / GIB
    );
    let _ = writeln!(
        out,
        "  load       {}",
        h.load_average
            .map_or_else(dash, |[a, b, c]| format!("{a:.2} {b:.2} {c:.2}"))
    );
    let _ = writeln!(
        out,
        "  uptime     {}",
        h.uptime_secs
            .map_or_else(dash, |s| humantime::format_duration(Duration::from_secs(s))
                .to_string())
    );
    for d in &h.disks {
        let _ = writeln!(
            out,
            "  disk       {:<24} {:<8} {:>9.1} GiB total {:>9.1} GiB free",
            d.mount_point,
            d.file_system,
            d.total_bytes as f64 / GIB,
            d.available_bytes as f64 / GIB
        );
    }
    let _ = writeln!(out);
    match &inv.driver {
        None => {
            let _ = writeln!(out, "GPUS       none (no NVML)");
            return out;
        }
        Some(d) => {
            let _ = writeln!(
                out,
                "GPUS       {} (driver {}, CUDA {})",
                inv.gpus.len(),
                d.driver_version.clone().unwrap_or_else(dash),
                d.cuda_version.clone().unwrap_or_else(dash)
            );
        }
    }
    if inv.gpus.is_empty() {
        return out;
    }
    let header = [
        "IDX",
        "NAME",
        "UUID",
        "PCI",
        "MEM USED/TOTAL",
        "UTIL",
        "TEMP",
        "POWER",
        "CC",
        "ECC",
        "UNCORR",
        "REMAP",
        "MIG",
        "HEALTH",
    ];
    let rows: Vec<[String; 14]> = inv
        .gpus
        .iter()
        .map(|g| {
            [
                g.index.to_string(),
                g.name.clone().unwrap_or_else(dash),
                g.uuid.clone().unwrap_or_else(dash),
                g.pci_bus_id.clone().unwrap_or_else(dash),
                g.memory.map_or_else(dash, |m| {
                    format!(
                        "{:.1}/{:.1} GiB",
                        m.used_bytes as f64 / GIB,
                        m.total_bytes as f64 / GIB
                    )
                }),
                g.utilization
                    .map_or_else(dash, |u| format!("{}%", u.gpu_percent)),
                g.temperature_c.map_or_else(dash, |t| format!("{t}C")),
                g.power_mw
                    .map_or_else(dash, |p| format!("{:.0}W", f64::from(p) / 1000.0)),
                g.compute_capability.clone().unwrap_or_else(dash),
                g.ecc
                    .map_or_else(dash, |e| if e.enabled { "on" } else { "off" }.to_owned()),
                g.ecc_uncorrected_volatile
                    .map_or_else(dash, |n| n.to_string()),
                g.remapped_rows.map_or_else(dash, |r| {
                    format!(
                        "{}/{}{}",
                        r.correctable,
                        r.uncorrectable,
                        if r.pending { " pending" } else { "" }
                    )
                }),
                g.mig
                    .map_or_else(dash, |m| if m.enabled { "on" } else { "off" }.to_owned()),
                match &g.health {
                    GpuHealth::Healthy => "healthy".to_owned(),
                    GpuHealth::Unhealthy { .. } => "UNHEALTHY".to_owned(),
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut l = String::new();
        for (cell, w) in cells.iter().zip(widths) {
            let _ = write!(l, "{cell:<w$}  ");
        }
        l.trim_end().to_owned()
    };
    let _ = writeln!(out, "{}", line(&header.map(str::to_owned)));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row));
    }
    for g in &inv.gpus {
        if let GpuHealth::Unhealthy {
            reason,
            since_unix_ms,
            recovers_at_unix_ms,
            ..
        } = &g.health
        {
            let at =
                |ms: u64| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms));
            let _ = writeln!(
                out,
                "gpu {}: unhealthy since {} ({reason}), healthy again at {} if no new error",
                g.index,
                at(*since_unix_ms),
                at(*recovers_at_unix_ms)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{DriverInfo, GpuInfo, GpuMemory, HostInfo};

    fn inventory(gpus: Vec<GpuInfo>, driver: bool) -> Inventory {
        Inventory {
            collected_at_unix_ms: 0,
            agent: Default::default(),
            vm: None,
            host: HostInfo {
                hostname: Some("node-0".into()),
                kernel: Some("6.1.0".into()),
                os: None,
                cpu_model: Some("Xeon".into()),
                logical_cores: 8,
                physical_cores: Some(4),
                memory_total_bytes: 16 << 30,
                memory_available_bytes: 8 << 30,
                disks: vec![],
                load_average: None,
                uptime_secs: Some(90),
            },
            driver: driver.then(|| DriverInfo {
                driver_version: Some("550.54.15".into()),
                cuda_version: Some("12.4".into()),
                nvml_version: None,
            }),
            gpus,
        }
    }

    fn gpu(index: u32, health: GpuHealth) -> GpuInfo {
        GpuInfo {
            index,
            name: Some("NVIDIA A10".into()),
            uuid: Some(format!("GPU-{index}")),
            serial: None,
            pci_bus_id: None,
            memory: Some(GpuMemory {
                total_bytes: 24 << 30,
                used_bytes: 1 << 30,
                free_bytes: 23 << 30,
            }),
            utilization: None,
            temperature_c: Some(40),
            power_mw: Some(61_000),
            compute_capability: Some("8.6".into()),
            ecc: None,
            ecc_uncorrected_volatile: None,
            ecc_uncorrected_aggregate: None,
            retired_pages: None,
            remapped_rows: None,
            mig: None,
            health,
        }
    }

    #[test]
    fn no_nvml() {
        let text = render(&inventory(vec![], false));
        assert!(text.contains("hostname   node-0"), "{text}");
        assert!(
            text.contains("cpu        Xeon (8 logical, 4 physical)"),
            "{text}"
        );
        assert!(
            text.contains("memory     16.0 GiB total, 8.0 GiB available"),
            "{text}"
        );
        assert!(text.contains("GPUS       none (no NVML)"), "{text}");
    }

    #[test]
    fn gpus_with_health() {
        let unhealthy = GpuHealth::Unhealthy {
            reason: "xid 79".into(),
            since_unix_ms: 1_700_000_000_000,
            last_event_unix_ms: 1_700_000_000_000,
            recovers_at_unix_ms: 1_700_000_600_000,
        };
        let text = render(&inventory(
            vec![gpu(0, GpuHealth::Healthy), gpu(1, unhealthy)],
            true,
        ));
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            text.contains("GPUS       2 (driver 550.54.15, CUDA 12.4)"),
            "{text}"
        );
        let row0 = lines.iter().find(|l| l.starts_with("0 ")).unwrap();
        assert!(
            row0.contains("NVIDIA A10")
                && row0.contains("1.0/24.0 GiB")
                && row0.ends_with("healthy"),
            "{row0}"
        );
        assert!(
            row0.contains("61W") && row0.contains("40C") && row0.contains("8.6"),
            "{row0}"
        );
        let row1 = lines.iter().find(|l| l.starts_with("1 ")).unwrap();
        assert!(row1.ends_with("UNHEALTHY"), "{row1}");
        assert!(
            text.contains("gpu 1: unhealthy since 2023-11-14T22:13:20Z (xid 79), healthy again at 2023-11-14T22:23:20Z"),
            "{text}"
        );
    }
}
