//! Token lookup through `drover_imds`'s cache vs an uncached round trip to the
//! IMDS emulator on loopback, with 64 concurrent callers.
//!
//! ```text
//! cargo bench -p drover-imds --bench imds_token_cache
//! ```
//! Prints markdown rows for BENCHMARKS.md. Both sides run with rate limits off
//! (client and emulator): with them on, the uncached side is capped at IMDS's
//! 20 tokens/s by design, which says nothing about the cost of a round trip.
//! Environment: `IMDS_BENCH_CACHED_PER_TASK` (default 20000),
//! `IMDS_BENCH_UNCACHED_PER_TASK` (default 40).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use drover_imds::{Identity, ImdsClient, ImdsConfig};
use drover_imds_emulator::{Emulator, EmulatorConfig, VmSpec};

const TASKS: usize = 64;
const RESOURCE: &str = "https://management.azure.com/";

struct Run {
    tasks: usize,
    latencies: Vec<Duration>,
    wall: Duration,
}

impl Run {
    fn row(&mut self, what: &str) -> String {
        self.latencies.sort_unstable();
        let pct = |p: f64| {
            let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
            self.latencies[i]
        };
        let ops = self.latencies.len();
        format!(
            "| {what} | {} | {ops} | {:.2} µs | {:.2} µs | {:.0} |",
            self.tasks,
            pct(0.50).as_secs_f64() * 1e6,
            pct(0.99).as_secs_f64() * 1e6,
            ops as f64 / self.wall.as_secs_f64(),
        )
    }
}

async fn run_concurrent(
    client: &ImdsClient,
    tasks: usize,
    per_task: usize,
    cached: bool,
) -> anyhow::Result<Run> {
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_task);
                for _ in 0..per_task {
                    let t = Instant::now();
                    if cached {
                        client.token(RESOURCE, &Identity::System).await?;
                    } else {
                        client.fetch_token(RESOURCE, &Identity::System).await?;
                    }
                    latencies.push(t.elapsed());
                }
                Ok::<_, drover_imds::ImdsError>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(tasks * per_task);
    for task in handles {
        latencies.extend(
            task.await
                .context("join bench task")?
                .context("token lookup")?,
        );
    }
    Ok(Run {
        tasks,
        latencies,
        wall: start.elapsed(),
    })
}

fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("parse {name}={v}")),
        Err(_) => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; this harness has no options of its own.
    let cached_per_task = env_usize("IMDS_BENCH_CACHED_PER_TASK", 20_000)?;
    let uncached_per_task = env_usize("IMDS_BENCH_UNCACHED_PER_TASK", 40)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("build tokio runtime")?;
    runtime.block_on(async {
        let emulator = Emulator::new(EmulatorConfig {
            general_rate_limit: None,
            identity_rate_limit: None,
            ..EmulatorConfig::default()
        });
        emulator.add_vm(VmSpec::new("bench-vm")).context("add vm")?;
        let server = emulator
            .bind("127.0.0.1:0".parse()?)
            .await
            .context("bind emulator")?;
        let client = ImdsClient::new(ImdsConfig {
            base_url: server.base_url(),
            rate_limits: None,
            ..ImdsConfig::default()
        })
        .context("build client")?;

        // Warm up: the first token (cache fill) and the connection pool.
        client
            .token(RESOURCE, &Identity::System)
            .await
            .context("warm up")?;
        run_concurrent(&client, TASKS, 5, false).await?;

        let mut uncached = run_concurrent(&client, TASKS, uncached_per_task, false).await?;
        let mut cached = run_concurrent(&client, TASKS, cached_per_task, true).await?;
        // One caller at a time: the bare round trip, without queueing.
        let mut uncached_1 = run_concurrent(&client, 1, 500, false).await?;
        let mut cached_1 = run_concurrent(&client, 1, 100_000, true).await?;
        let issued = emulator.stats().tokens_issued;

        println!("| path | concurrent callers | lookups | p50 | p99 | lookups/s |");
        println!("|---|---|---|---|---|---|");
        println!("{}", cached.row("`ImdsClient::token` (cache hit)"));
        println!(
            "{}",
            uncached.row("`ImdsClient::fetch_token` (uncached HTTP round trip to the emulator)")
        );
        println!("{}", cached_1.row("`ImdsClient::token` (cache hit)"));
        println!(
            "{}",
            uncached_1.row("`ImdsClient::fetch_token` (uncached HTTP round trip to the emulator)")
        );
        println!();
        println!(
            "tokens issued by the emulator: {issued} (cache fill 1 + warm-up {} + uncached {})",
            TASKS * 5,
            TASKS * uncached_per_task + 500
        );
        server.shutdown().await;
        Ok(())
    })
}
