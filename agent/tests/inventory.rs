//! Inventory through the real NVML code path, against the fake
//! `libnvidia-ml.so.1` from `tests/fake-nvml` configured with GPU profiles.

mod inventory_support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use drover_agent::inventory::health::unix_ms;
use drover_agent::inventory::nvml::NvmlGpus;
use drover_agent::inventory::{
    GpuDiscovery, GpuHealth, HealthPolicy, Inventory, InventoryCollector, InventoryConfig,
};
use inventory_support::{FakeNvml, Variant, wait_for};

const WAIT: Duration = Duration::from_secs(10);

fn refresh(fake: &FakeNvml) -> Inventory {
    let config = InventoryConfig {
        watch_events: false,
        ..fake.config()
    };
    InventoryCollector::open(&config).refresh()
}

fn assert_equals_profile(profile: &str) {
    let fake = FakeNvml::new(profile, Variant::Full);
    let inv = refresh(&fake);
    assert_eq!(inv.driver, Some(fake.expected_driver()), "{profile}");
    let expected = fake.expected_gpus();
    assert_eq!(inv.gpus.len(), expected.len(), "{profile}");
    for (got, want) in inv.gpus.iter().zip(&expected) {
        assert_eq!(got, want, "{profile}, gpu {}", want.index);
    }
    // The host half is there too.
    assert!(inv.host.logical_cores > 0 && inv.host.memory_total_bytes > 0);
}

#[test]
fn h100_8x_inventory_equals_profile() {
    assert_equals_profile("h100-8x.json");
}

#[test]
fn a10_inventory_equals_profile() {
    assert_equals_profile("a10-1x.json");
}

#[test]
fn v100_retired_pages_inventory_equals_profile() {
    assert_equals_profile("v100-retired-pages.json");
}

#[test]
fn h100_details_spot_check() {
    // Guards the expectations builder itself against agreeing with a wrong agent.
    let fake = FakeNvml::new("h100-8x.json", Variant::Full);
    let inv = refresh(&fake);
    let driver = inv.driver.unwrap();
    assert_eq!(driver.driver_version.as_deref(), Some("550.54.15"));
    assert_eq!(driver.cuda_version.as_deref(), Some("12.4"));
    assert_eq!(inv.gpus.len(), 8);
    let g5 = &inv.gpus[5];
    assert_eq!(g5.name.as_deref(), Some("NVIDIA H100 80GB HBM3"));
    assert_eq!(g5.pci_bus_id.as_deref(), Some("00000000:AB:00.0"));
    assert_eq!(g5.compute_capability.as_deref(), Some("9.0"));
    assert_eq!(g5.memory.unwrap().total_bytes, 85_520_809_984);
    assert_eq!(g5.ecc_uncorrected_aggregate, Some(2));
    assert_eq!(g5.remapped_rows.unwrap().uncorrectable, 2);
    assert_eq!(g5.retired_pages, None, "Hopper does not retire pages");
    assert!(!g5.mig.unwrap().enabled);
    assert_eq!(inv.gpus[2].utilization.unwrap().gpu_percent, 87);
    let uuids: std::collections::HashSet<_> = inv.gpus.iter().map(|g| g.uuid.clone()).collect();
    assert_eq!(uuids.len(), 8, "every GPU has its own UUID");
}

#[test]
fn library_with_no_gpus() {
    let fake = FakeNvml::new("no-gpus.json", Variant::Full);
    let inv = InventoryCollector::open(&fake.config()).refresh();
    assert_eq!(inv.driver, Some(fake.expected_driver()));
    assert!(inv.gpus.is_empty());
}

#[test]
fn no_library_means_zero_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let config = InventoryConfig {
        nvml_lib: dir.path().join("libnvidia-ml.so.1"),
        ..InventoryConfig::default()
    };
    assert!(NvmlGpus::open(&config).is_err());
    let inv = InventoryCollector::open(&config).refresh();
    assert_eq!(inv.driver, None);
    assert!(inv.gpus.is_empty());
    assert!(inv.host.memory_total_bytes > 0);
}

#[test]
fn library_without_a_profile_is_driver_not_loaded() {
    // The fake with no profile beside it (and none in the environment, which
    // these tests never set) behaves like a driver that is not loaded:
    // present but unusable, so zero GPUs, not an error.
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libnvidia-ml.so.1");
    std::fs::copy(inventory_support::library(Variant::Full), &lib).unwrap();
    if std::env::var_os("FAKE_NVML_PROFILE").is_some() {
        return;
    }
    let config = InventoryConfig {
        nvml_lib: lib,
        ..InventoryConfig::default()
    };
    let err = NvmlGpus::open(&config).err().expect("init must fail");
    assert!(
        err.to_string().contains("failed to initialise nvml"),
        "{err}"
    );
    let inv = InventoryCollector::open(&config).refresh();
    assert_eq!(inv.driver, None);
    assert!(inv.gpus.is_empty());
}

#[test]
fn library_missing_a_symbol_leaves_that_field_out() {
    let fake = FakeNvml::new("h100-8x.json", Variant::NoPower);
    let gpus = NvmlGpus::open(&fake.config()).expect("open nvml");
    assert!(gpus.is_watching(), "event functions are all there");
    for _ in 0..2 {
        // Twice: the missing function stays a `None`, not a failure later.
        let report = gpus.discover();
        let mut expected = fake.expected_gpus();
        for g in &mut expected {
            g.power_mw = None;
        }
        assert_eq!(report.gpus, expected);
    }
    // Health still works on this library.
    fake.inject("xid 1 79");
    wait_for(WAIT, "gpu 1 unhealthy", || {
        (!gpus.discover().gpus[1].health.is_healthy()).then_some(())
    });
}

/// Opens the fake with the watcher running.
fn watched(profile: &str, policy: HealthPolicy) -> (FakeNvml, NvmlGpus) {
    let fake = FakeNvml::new(profile, Variant::Full);
    let config = InventoryConfig {
        health: policy,
        ..fake.config()
    };
    let gpus = NvmlGpus::open(&config).expect("open nvml");
    assert!(gpus.is_watching());
    (fake, gpus)
}

fn health(gpus: &NvmlGpus) -> Vec<GpuHealth> {
    gpus.discover().gpus.into_iter().map(|g| g.health).collect()
}

#[test]
fn xid_79_marks_gpu_3_unhealthy_and_only_it() {
    let (fake, gpus) = watched("h100-8x.json", HealthPolicy::default());
    assert!(health(&gpus).iter().all(GpuHealth::is_healthy));
    let before = SystemTime::now();
    fake.inject("xid 3 79");
    let h = wait_for(WAIT, "gpu 3 unhealthy", || {
        let h = health(&gpus);
        (!h[3].is_healthy()).then_some(h)
    });
    let GpuHealth::Unhealthy {
        reason,
        since_unix_ms,
        last_event_unix_ms,
        recovers_at_unix_ms,
    } = &h[3]
    else {
        unreachable!()
    };
    assert_eq!(reason, "xid 79");
    let before_ms = unix_ms(before);
    assert!(*since_unix_ms >= before_ms && since_unix_ms == last_event_unix_ms);
    assert_eq!(
        *recovers_at_unix_ms,
        last_event_unix_ms + 600_000,
        "default window is 10 minutes"
    );
    for (i, g) in h.iter().enumerate() {
        if i != 3 {
            assert!(g.is_healthy(), "gpu {i}: {g:?}");
        }
    }
}

#[test]
fn application_xid_13_leaves_gpu_healthy() {
    let (fake, gpus) = watched("h100-8x.json", HealthPolicy::default());
    for xid in [13, 31, 43, 45, 68, 109] {
        fake.inject(&format!("xid 3 {xid}"));
    }
    // A critical event after them on another GPU: once it shows, the
    // application XIDs (delivered in order before it) have been judged.
    fake.inject("xid 6 48");
    let h = wait_for(WAIT, "gpu 6 unhealthy", || {
        let h = health(&gpus);
        (!h[6].is_healthy()).then_some(h)
    });
    assert!(h[3].is_healthy(), "{:?}", h[3]);
}

#[test]
fn double_bit_ecc_marks_gpu_unhealthy() {
    let (fake, gpus) = watched("a10-1x.json", HealthPolicy::default());
    fake.inject("sbe 0");
    fake.inject("dbe 0");
    let h = wait_for(WAIT, "gpu 0 unhealthy", || {
        let h = health(&gpus);
        (!h[0].is_healthy()).then_some(h)
    });
    assert!(
        matches!(&h[0], GpuHealth::Unhealthy { reason, .. } if reason == "double-bit ecc error"),
        "{:?}",
        h[0]
    );
}

#[test]
fn events_for_a_gpu_outside_the_profile_are_ignored() {
    let (fake, gpus) = watched("a10-1x.json", HealthPolicy::default());
    fake.inject("xid 7 79");
    fake.inject("garbage line");
    fake.inject("xid 0 94");
    let h = wait_for(WAIT, "gpu 0 unhealthy", || {
        let h = health(&gpus);
        (!h[0].is_healthy()).then_some(h)
    });
    assert_eq!(h.len(), 1);
    assert!(matches!(&h[0], GpuHealth::Unhealthy { reason, .. } if reason == "xid 94"));
}

#[test]
fn gpu_recovers_after_the_window() {
    let window = Duration::from_millis(1500);
    let (fake, gpus) = watched(
        "h100-8x.json",
        HealthPolicy {
            recovery_window: window,
            ..HealthPolicy::default()
        },
    );
    fake.inject("xid 3 79");
    let last_event_ms = wait_for(WAIT, "gpu 3 unhealthy", || match &health(&gpus)[3] {
        GpuHealth::Unhealthy {
            last_event_unix_ms, ..
        } => Some(*last_event_unix_ms),
        GpuHealth::Healthy => None,
    });
    wait_for(WAIT, "gpu 3 healthy again", || {
        health(&gpus)[3].is_healthy().then_some(())
    });
    // Not before the window has passed since the event.
    let now_ms = unix_ms(SystemTime::now());
    let window_ms = u64::try_from(window.as_millis()).unwrap();
    assert!(
        now_ms >= last_event_ms + window_ms,
        "healthy at {now_ms}, event at {last_event_ms}"
    );

    // A new critical event makes it unhealthy again: recovery is not immunity.
    fake.inject("xid 3 79");
    wait_for(WAIT, "gpu 3 unhealthy again", || {
        (!health(&gpus)[3].is_healthy()).then_some(())
    });
}

#[test]
fn watcher_stops_promptly_on_drop() {
    let (_fake, gpus) = watched("h100-8x.json", HealthPolicy::default());
    let start = Instant::now();
    drop(gpus);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_drover-agent"))
}

#[test]
fn cli_prints_json_and_table() {
    let fake = FakeNvml::new("h100-8x.json", Variant::Full);
    let out = agent()
        .args(["inventory", "--json", "--nvml-lib"])
        .arg(&fake.lib)
        .env_remove("DROVER_NVML_LIB")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inv: Inventory = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inv.gpus, fake.expected_gpus());

    let out = agent()
        .args(["inventory", "--nvml-lib"])
        .arg(&fake.lib)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("GPUS       8 (driver 550.54.15, CUDA 12.4)"),
        "{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("NVIDIA H100 80GB HBM3"))
            .count(),
        8,
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.ends_with("healthy")).count(),
        8,
        "{text}"
    );
}

#[test]
fn cli_without_nvml_reports_no_gpus() {
    let missing = PathBuf::from("/nonexistent/libnvidia-ml.so.1");
    let out = agent()
        .args(["inventory", "--json", "--nvml-lib"])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inv: Inventory = serde_json::from_slice(&out.stdout).unwrap();
    assert!(inv.gpus.is_empty() && inv.driver.is_none());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("no nvml library").count(), 1, "{stderr}");
}
