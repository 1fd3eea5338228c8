//! Heartbeat capacity of one `drover server`: N simulated agents, each
//! registering once with the cluster's join token and then heartbeating every
//! `--interval` seconds (staggered), against the release server binary on
//! loopback. Reports sustained heartbeats/s, p50/p99 latency, the server's
//! CPU use over the heartbeat phase and its peak RSS.
//!
//! ```text
//! cargo run --release -p drover-tests --bin bench-heartbeat -- [--nodes 1000,5000,10000] [--seconds 30] [--interval 10]
//! ```
//!
//! The load generator shares the machine's cores with the server; its own
//! CPU use is reported beside the server's so the two can be told apart.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_api::compute::ComputeSpec;
use drover_api::wire::{
    ClusterCreate, ClusterCreated, GpuCounts, HeartbeatRequest, RegisterRequest, RegisterResponse,
};
use drover_tests::{drover_bin_release, free_port, wait_until};
use tokio::sync::Semaphore;

struct Server {
    child: Child,
    url: String,
    token: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let token = "bench-admin-token".to_string();
        let child = Command::new(drover_bin_release())
            .args(["server", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--token", &token, "--grace-seconds", "3600"])
            .env("DROVER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start drover server");
        let addr = format!("127.0.0.1:{port}");
        assert!(
            wait_until(Duration::from_secs(30), || std::net::TcpStream::connect(
                &addr
            )
            .is_ok()),
            "server did not start"
        );
        Server {
            child,
            url: format!("http://{addr}"),
            token,
            _dir: dir,
        }
    }

    /// (user+system CPU seconds, peak RSS in KiB) of the server process.
    fn usage(&self) -> (f64, u64) {
        proc_usage(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn proc_usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ')'.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; index 11 and 12 after ')'.
    let cpu = (ticks(11) + ticks(12)) / ticks_per_second();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (cpu, hwm)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run(nodes: usize, seconds: u64, interval: Duration) {
    let server = Server::start();
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(512)
        .build()
        .expect("client");
    let created: ClusterCreated = {
        let mut spec = ComputeSpec::new("bench", "STANDARD_ND96", nodes as u32);
        spec.min_nodes = 0;
        let resp = client
            .post(format!("{}/v1/clusters", server.url))
            .bearer_auth(&server.token)
            .json(&ClusterCreate { spec })
            .send()
            .await
            .expect("create cluster");
        assert!(
            resp.status().is_success(),
            "create cluster: {}",
            resp.status()
        );
        resp.json().await.expect("cluster created body")
    };

    // Registration, 64 at a time.
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(64));
    let mut regs = Vec::with_capacity(nodes);
    for i in 0..nodes {
        let (client, url, token, limit) = (
            client.clone(),
            server.url.clone(),
            created.join_token.clone(),
            limit.clone(),
        );
        regs.push(tokio::spawn(async move {
            let _permit = limit.acquire().await.expect("semaphore");
            let body = RegisterRequest {
                cluster: "bench".into(),
                join_token: token,
                node_id: Some(format!("node-{i:05}")),
                ip: Some(format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)),
                gpus: GpuCounts {
                    healthy: 8,
                    total: 8,
                },
                inventory: serde_json::from_value(serde_json::json!({
                    "host": {"cpu_model": "bench"},
                    "gpus": (0..8).map(|i| serde_json::json!({"index": i})).collect::<Vec<_>>(),
                }))
                .expect("inventory"),
            };
            let resp = client
                .post(format!("{url}/v1/agent/register"))
                .json(&body)
                .send()
                .await
                .expect("register");
            assert!(resp.status().is_success(), "register: {}", resp.status());
            let r: RegisterResponse = resp.json().await.expect("register body");
            r.credential
        }));
    }
    let mut credentials = Vec::with_capacity(nodes);
    for r in regs {
        credentials.push(r.await.expect("register task"));
    }
    let register_secs = started.elapsed().as_secs_f64();

    // Heartbeats: each node beats every `interval`, first beat staggered over one interval.
    let (cpu0, _) = server.usage();
    let (own0, _) = proc_usage(std::process::id());
    let phase = Instant::now();
    let deadline = phase + Duration::from_secs(seconds);
    let mut tasks = Vec::with_capacity(nodes);
    for (i, cred) in credentials.into_iter().enumerate() {
        let (client, url) = (client.clone(), server.url.clone());
        let offset = interval.mul_f64(i as f64 / nodes as f64);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut next = phase + offset;
            // Beats are due at phase + offset + k·interval, strictly before the deadline.
            while next < deadline {
                tokio::time::sleep_until(next.into()).await;
                let body = HeartbeatRequest {
                    gpus: Some(GpuCounts {
                        healthy: 8,
                        total: 8,
                    }),
                    ..Default::default()
                };
                let t = Instant::now();
                match client
                    .post(format!("{url}/v1/agent/heartbeat"))
                    .bearer_auth(&cred)
                    .json(&body)
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed());
                    }
                    _ => errors += 1,
                }
                next += interval;
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.expect("heartbeat task");
        all.extend(lat);
        errors += e;
    }
    let (cpu1, rss) = server.usage();
    let elapsed = phase.elapsed().as_secs_f64();
    let (own1, _) = proc_usage(std::process::id());
    all.sort();
    println!(
        "| {nodes} | {:.0} | {:.1} ms | {:.1} ms | {:.1} ms | {errors} | {:.0}% | {:.1} MiB | {:.0}% | {register_secs:.1} s |",
        all.len() as f64 / elapsed,
        percentile(&all, 0.5).as_secs_f64() * 1000.0,
        percentile(&all, 0.99).as_secs_f64() * 1000.0,
        percentile(&all, 1.0).as_secs_f64() * 1000.0,
        (cpu1 - cpu0) / elapsed * 100.0,
        rss as f64 / 1024.0,
        (own1 - own0) / elapsed * 100.0,
    );
}

fn main() {
    let mut nodes = vec![1000usize, 5000, 10000];
    let mut seconds = 30u64;
    let mut interval = 10u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--nodes" => {
                nodes = args
                    .next()
                    .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
                    .unwrap_or(nodes)
            }
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).unwrap_or(seconds),
            "--interval" => interval = args.next().and_then(|v| v.parse().ok()).unwrap_or(interval),
            other => {
                eprintln!(
                    "unknown argument {other}; usage: bench-heartbeat [--nodes 1000,5000,10000] [--seconds 30] [--interval 10]"
                );
                std::process::exit(2);
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "| nodes | heartbeats/s | p50 | p99 | max | errors | server CPU (of one core) | server peak RSS | load generator CPU | registration |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for n in nodes {
        rt.block_on(run(n, seconds, Duration::from_secs(interval)));
    }
}
