//! One full inventory refresh (host through sysinfo + 8 GPUs through NVML)
//! against the fake library with the 8×H100 profile.
//!
//! `cargo bench -p drover-agent --bench inventory`; the median is in
//! `target/criterion/inventory_refresh/*/new/estimates.json`.

#[path = "../tests/inventory_support/mod.rs"]
mod inventory_support;

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use drover_agent::inventory::nvml::NvmlGpus;
use drover_agent::inventory::{GpuDiscovery, InventoryCollector};
use inventory_support::{FakeNvml, Variant};

fn refresh(c: &mut Criterion) {
    let fake = FakeNvml::new("h100-8x.json", Variant::Full);
    let mut group = c.benchmark_group("inventory_refresh");

    // What the agent does on each heartbeat: the watcher thread runs beside it.
    let mut collector = InventoryCollector::open(&fake.config());
    assert_eq!(collector.refresh().gpus.len(), 8);
    group.bench_function("full_h100_8x", |b| {
        b.iter(|| black_box(collector.refresh()))
    });

    // The NVML half alone.
    let gpus = NvmlGpus::open(&fake.config()).expect("open fake nvml");
    group.bench_function("gpus_only_h100_8x", |b| {
        b.iter(|| black_box(gpus.discover()))
    });
    group.finish();
}

criterion_group!(benches, refresh);
criterion_main!(benches);
