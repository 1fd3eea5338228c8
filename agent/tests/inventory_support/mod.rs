//! Shared by `agent/tests/inventory.rs` and `agent/benches/inventory.rs`: a
//! private copy of the fake NVML library (`tests/fake-nvml`) set up with one
//! profile, loaded through the agent's real NVML code path.
//!
//! Each [`FakeNvml`] copies the library into its own temporary directory as
//! `libnvidia-ml.so.1`, with `fake-nvml-profile.json` beside it. A copy at its
//! own path is a separately loaded library with its own state, so tests may
//! run in parallel in one process without sharing an environment variable.

#![allow(dead_code)] // each user uses a different part

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use drover_agent::inventory::{
    DriverInfo, EccMode, GpuHealth, GpuInfo, GpuMemory, GpuUtilization, InventoryConfig, MigMode,
    RemappedRows, RetiredPages,
};
use serde_json::Value;

/// Which build of the fake library.
#[derive(Debug, Clone, Copy)]
pub enum Variant {
    /// Every export.
    Full,
    /// Without `nvmlDeviceGetPowerUsage`.
    NoPower,
}

impl Variant {
    fn file_name(self) -> &'static str {
        match self {
            Variant::Full => "libfake_nvml_full.so",
            Variant::NoPower => "libfake_nvml_no_power.so",
        }
    }
}

/// A private fake NVML library with a profile.
pub struct FakeNvml {
    dir: tempfile::TempDir,
    /// The library to pass as `nvml_lib`.
    pub lib: PathBuf,
    /// The profile it answers from, as JSON.
    pub profile: Value,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Target profile directories to look in: the one this binary was built in
/// (`target/<profile>/deps/<binary>`), then its sibling profiles.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(profile_dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
    {
        dirs.push(profile_dir.join("examples"));
        if let Some(target) = profile_dir.parent() {
            for p in ["debug", "release"] {
                dirs.push(target.join(p).join("examples"));
            }
        }
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        for p in ["debug", "release"] {
            dirs.push(PathBuf::from(&target).join(p).join("examples"));
        }
    }
    dirs
}

/// Finds the built fake library. `cargo test --workspace` builds it (as an
/// example of `fake-nvml`); when only this package was built, it is built
/// here with the same cargo.
pub fn library(variant: Variant) -> PathBuf {
    // Tests run in parallel; one of them builds, the others wait and find.
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(PoisonError::into_inner);
    let find = || {
        candidate_dirs()
            .into_iter()
            .map(|d| d.join(variant.file_name()))
            .find(|p| p.is_file())
    };
    if let Some(p) = find() {
        return p;
    }
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "fake-nvml", "--examples"])
        .current_dir(workspace_root())
        .status()
        .expect("run cargo build -p fake-nvml");
    assert!(
        status.success(),
        "cargo build -p fake-nvml --examples failed"
    );
    find().unwrap_or_else(|| {
        panic!(
            "{} not found in {:?}",
            variant.file_name(),
            candidate_dirs()
        )
    })
}

/// The path of a shipped profile.
pub fn profile_path(name: &str) -> PathBuf {
    workspace_root().join("tests/fake-nvml/profiles").join(name)
}

impl FakeNvml {
    /// A private library answering from `profiles/<profile>`.
    pub fn new(profile: &str, variant: Variant) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(library(variant), &lib).expect("copy fake nvml library");
        let text = std::fs::read_to_string(profile_path(profile)).expect("read profile");
        std::fs::write(dir.path().join("fake-nvml-profile.json"), &text).expect("write profile");
        let profile = serde_json::from_str(&text).expect("profile is JSON");
        Self { dir, lib, profile }
    }

    /// Inventory configuration loading this library, watching events with a
    /// short wait so tests stop quickly.
    pub fn config(&self) -> InventoryConfig {
        InventoryConfig {
            nvml_lib: self.lib.clone(),
            event_wait: Duration::from_millis(50),
            ..InventoryConfig::default()
        }
    }

    /// Raises an event, e.g. `"xid 3 79"` or `"dbe 1"`.
    pub fn inject(&self, line: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("fake-nvml-events"))
            .expect("open events file");
        writeln!(f, "{line}").expect("append event");
    }

    /// The driver the profile describes.
    pub fn expected_driver(&self) -> DriverInfo {
        let p = &self.profile;
        let v = p["cuda_driver_version"]
            .as_i64()
            .expect("cuda_driver_version");
        DriverInfo {
            driver_version: Some(s(&p["driver_version"])),
            cuda_version: Some(format!("{}.{}", v / 1000, (v % 1000) / 10)),
            nvml_version: Some(s(&p["nvml_version"])),
        }
    }

    /// The GPUs the profile describes, all healthy, as the agent should
    /// report them.
    pub fn expected_gpus(&self) -> Vec<GpuInfo> {
        let gpus = self.profile["gpus"].as_array().expect("gpus");
        gpus.iter()
            .enumerate()
            .map(|(i, g)| GpuInfo {
                index: u32::try_from(i).unwrap(),
                name: Some(s(&g["name"])),
                uuid: Some(s(&g["uuid"])),
                serial: Some(s(&g["serial"])),
                pci_bus_id: Some(s(&g["pci_bus_id"])),
                memory: Some(GpuMemory {
                    total_bytes: n(&g["memory_total"]),
                    used_bytes: n(&g["memory_used"]),
                    free_bytes: n(&g["memory_free"]),
                }),
                utilization: Some(GpuUtilization {
                    gpu_percent: n(&g["utilization_gpu"]) as u32,
                    memory_percent: n(&g["utilization_memory"]) as u32,
                }),
                temperature_c: Some(n(&g["temperature_c"]) as u32),
                power_mw: Some(n(&g["power_mw"]) as u32),
                compute_capability: Some(format!(
                    "{}.{}",
                    g["compute_capability"][0], g["compute_capability"][1]
                )),
                ecc: opt(&g["ecc"]).map(|e| EccMode {
                    enabled: b(&e["current"]),
                    pending_enabled: b(&e["pending"]),
                }),
                ecc_uncorrected_volatile: opt(&g["ecc_uncorrected_volatile"]).map(n),
                ecc_uncorrected_aggregate: opt(&g["ecc_uncorrected_aggregate"]).map(n),
                retired_pages: opt(&g["retired_pages"]).map(|r| RetiredPages {
                    single_bit_ecc: n(&r["single_bit_ecc"]) as u32,
                    double_bit_ecc: n(&r["double_bit_ecc"]) as u32,
                    pending: Some(b(&r["pending"])),
                }),
                remapped_rows: opt(&g["remapped_rows"]).map(|r| RemappedRows {
                    correctable: n(&r["correctable"]) as u32,
                    uncorrectable: n(&r["uncorrectable"]) as u32,
                    pending: b(&r["pending"]),
                    failed: b(&r["failed"]),
                }),
                mig: opt(&g["mig"]).map(|m| MigMode {
                    enabled: b(&m["current"]),
                    pending_enabled: b(&m["pending"]),
                }),
                health: GpuHealth::Healthy,
            })
            .collect()
    }
}

fn s(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a string: {v}"))
        .to_owned()
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn b(v: &Value) -> bool {
    v.as_bool().unwrap_or_else(|| panic!("not a bool: {v}"))
}

fn opt(v: &Value) -> Option<&Value> {
    (!v.is_null()).then_some(v)
}

/// Polls `f` until it returns `Some`, or panics after `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
