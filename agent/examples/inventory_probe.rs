//! Real-hardware probe: what the agent's inventory does against the NVML the
//! machine really has (no fake).
//!
//! It opens the collector the way `drover-agent run` does — with the XID/ECC
//! event watcher on its own thread — lets the watcher block in NVML for a few
//! seconds, times a number of full refreshes, and prints one JSON object:
//! whether the watcher is running, the refresh times, and the inventory.
//!
//! ```text
//! cargo build --release -p drover-agent --example inventory_probe
//! target/release/examples/inventory_probe [REFRESHES] [WATCH_SECONDS]
//! ```
//! `DROVER_NVML_LIB` names another library, as for `drover-agent inventory`.

use std::time::{Duration, Instant};

use drover_agent::inventory::nvml::NvmlGpus;
use drover_agent::inventory::{InventoryCollector, InventoryConfig};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let refreshes: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200);
    let watch_seconds: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);

    let mut config = InventoryConfig {
        // PROBE_NO_WATCH=1: without the event watcher, to see what it costs.
        watch_events: std::env::var_os("PROBE_NO_WATCH").is_none(),
        ..InventoryConfig::default()
    };
    if let Some(lib) = std::env::var_os("DROVER_NVML_LIB") {
        config.nvml_lib = lib.into();
    }

    // The watcher is started here exactly as in the daemon.
    let gpus = match NvmlGpus::open(&config) {
        Ok(gpus) => gpus,
        Err(error) => anyhow::bail!("nvml did not open: {error:#}"),
    };
    let watching = gpus.is_watching();
    // What an idle agent pays for NVML: memory with the library loaded and
    // the watcher blocked in it, and the CPU the watcher uses meanwhile.
    let cpu_before = cpu_seconds();
    let idle_started = Instant::now();
    std::thread::sleep(Duration::from_secs(watch_seconds));
    let idle_cpu_percent =
        (cpu_seconds() - cpu_before) / idle_started.elapsed().as_secs_f64().max(1e-9) * 100.0;
    let idle_rss_kib = rss_kib();
    let mut collector = InventoryCollector::with_gpus(Box::new(gpus));

    let mut times_us = Vec::with_capacity(refreshes);
    let mut last = collector.refresh();
    for _ in 0..refreshes {
        let started = Instant::now();
        last = collector.refresh();
        times_us.push(started.elapsed().as_secs_f64() * 1e6);
    }
    times_us.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        times_us
            .get(((times_us.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    let report = serde_json::json!({
        "event_watcher_running": watching,
        "idle_seconds": watch_seconds,
        "idle_rss_kib": idle_rss_kib,
        "idle_cpu_percent": idle_cpu_percent,
        "refreshes": refreshes,
        "refresh_us": { "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": pick(1.0) },
        "inventory": last,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// This process's resident memory, KiB: `VmRSS` and its parts (`RssAnon`
/// is private; `RssFile` is mapped files such as the NVML library's code,
/// shared with every other process that loads it; `RssShmem`).
fn rss_kib() -> serde_json::Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    serde_json::json!({
        "total": field("VmRSS:"),
        "anon": field("RssAnon:"),
        "file": field("RssFile:"),
        "shmem": field("RssShmem:"),
    })
}

/// CPU time this process used (user + system), seconds. Clock ticks are
/// 100 per second on Linux for /proc (USER_HZ).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 here, counting from 0.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}
