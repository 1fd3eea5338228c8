//! Agent idle footprint: one release `drover-agent run` joined to a release
//! `drover server`, with the fake NVML library (`tests/fake-nvml`, release
//! build) answering as 8×H100, doing nothing but its idle work (heartbeats,
//! the assignments long-poll, inventory refreshes, the `gpu-events` watcher
//! thread) for a window of 60 s.
//!
//! ```text
//! cargo run --release -p drover-tests --bin bench-agent-idle -- [--seconds 60] [--settle 10] [--heartbeat-seconds 10]
//! ```
//!
//! Method. The fake library is copied into a temporary folder as
//! `libnvidia-ml.so.1` with `profiles/h100-8x.json` beside it as
//! `fake-nvml-profile.json`, and passed as `--nvml-lib`. The agent runs with
//! its default heartbeat interval (10 s) unless told otherwise. Once the node
//! is `idle` in `drover node list` and a settling time has passed, the
//! process's `/proc/<pid>/stat` (utime + stime, in clock ticks) and every
//! thread's `/proc/<pid>/task/<tid>/schedstat` (nanoseconds on CPU) are read
//! at the start and end of the window; `VmRSS` is sampled every second and
//! `VmHWM`, `RssAnon` and `RssFile` read at the end. CPU% is CPU time over the
//! window divided by the window (100% = one core).
//!
//! Prints the totals and a per-thread table as Markdown.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_tests::{
    ServerProc, agent_bin_release, init_bin_release, repo_root, require_docker, target_dir,
    unique_name, wait_until,
};

/// utime + stime of `/proc/<pid>/stat`, in clock ticks.
fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/pid/stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("stat has a comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f[11].parse().expect("utime");
    let stime: u64 = f[12].parse().expect("stime");
    utime + stime
}

/// Thread id → (name, nanoseconds on CPU).
fn threads(pid: u32) -> BTreeMap<u32, (String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let ns = std::fs::read_to_string(e.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        out.insert(tid, (comm, ns));
    }
    out
}

/// A `kB` field of `/proc/<pid>/status`, in kB.
fn status_kb(pid: u32, field: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/pid/status");
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let mut seconds = 60u64;
    let mut settle = 10u64;
    let mut heartbeat = 10u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |d: u64| args.next().and_then(|v| v.parse().ok()).unwrap_or(d);
        match a.as_str() {
            "--seconds" => seconds = num(seconds),
            "--settle" => settle = num(settle),
            "--heartbeat-seconds" => heartbeat = num(heartbeat),
            other => {
                eprintln!(
                    "unknown argument {other}; usage: bench-agent-idle [--seconds N] [--settle N] [--heartbeat-seconds N]"
                );
                std::process::exit(2);
            }
        }
    }
    require_docker();
    let agent_path = agent_bin_release();
    let init = init_bin_release();
    let built = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "-q", "--release", "-p", "fake-nvml"])
        .current_dir(repo_root())
        .status()
        .expect("cargo build -p fake-nvml");
    assert!(built.success(), "cargo build --release -p fake-nvml failed");
    let nvml_dir = tempfile::tempdir().expect("tempdir");
    let lib = nvml_dir.path().join("libnvidia-ml.so.1");
    std::fs::copy(target_dir().join("release/libfake_nvml.so"), &lib)
        .expect("copy target/release/libfake_nvml.so");
    std::fs::copy(
        repo_root().join("tests/fake-nvml/profiles/h100-8x.json"),
        nvml_dir.path().join("fake-nvml-profile.json"),
    )
    .expect("copy profile");

    let server = ServerProc::start_release(60);
    let join = server.create_cluster("idle", 1);
    let data = tempfile::tempdir().expect("tempdir");
    let log_path = data.path().join("agent.log");
    let log = std::fs::File::create(&log_path).expect("agent log");
    let node = unique_name("idle");
    let agent = Agent(
        Command::new(&agent_path)
            .args(["run", "--server", &server.url(), "--cluster", "idle"])
            .args(["--node-id", &node, "--data-dir"])
            .arg(data.path().join("agent"))
            .args(["--heartbeat-seconds", &heartbeat.to_string()])
            .arg("--init-binary")
            .arg(&init)
            .arg("--nvml-lib")
            .arg(&lib)
            .env("DROVER_JOIN_TOKEN", &join)
            .env_remove("DROVER_LOG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start drover-agent"),
    );
    let pid = agent.0.id();
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let idle = wait_until(Duration::from_secs(60), || {
        let out = server.cli_ok(&["node", "list", "--json"]);
        out.contains(&node) && out.contains("\"idle\"")
    });
    assert!(idle, "node never became idle:\n{}", log_text());
    let nodes: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["node", "list", "--json"])).expect("node json");
    let ours = nodes["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["id"] == node.as_str())
        .cloned()
        .unwrap_or_default();
    eprintln!(
        "node idle with {}/{} healthy GPUs; settling {settle} s",
        ours["healthy_gpus"], ours["total_gpus"]
    );
    std::thread::sleep(Duration::from_secs(settle));

    let tck = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let t0 = Instant::now();
    let ticks0 = process_ticks(pid);
    let threads0 = threads(pid);
    let mut rss_max = 0u64;
    let mut rss_sum = 0u64;
    let mut n = 0u64;
    let window = Duration::from_secs(seconds);
    while t0.elapsed() < window {
        let rss = status_kb(pid, "VmRSS");
        rss_max = rss_max.max(rss);
        rss_sum += rss;
        n += 1;
        std::thread::sleep(Duration::from_secs(1).min(window.saturating_sub(t0.elapsed())));
    }
    let ticks1 = process_ticks(pid);
    let threads1 = threads(pid);
    let elapsed = t0.elapsed().as_secs_f64();
    let rss_end = status_kb(pid, "VmRSS");
    let hwm = status_kb(pid, "VmHWM");
    let anon = status_kb(pid, "RssAnon");
    let file = status_kb(pid, "RssFile");
    assert!(
        agent.0.id() == pid && std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "agent exited during the window:\n{}",
        log_text()
    );

    let cpu_s = (ticks1 - ticks0) as f64 / tck as f64;
    println!(
        "| window | heartbeat | RSS at end (anon + file) | RSS mean / max over window | peak RSS (VmHWM) | CPU over window (ticks) | CPU % of one core |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {elapsed:.1} s | {heartbeat} s | {:.1} MiB ({:.1} + {:.1}) | {:.1} / {:.1} MiB | {:.1} MiB | {:.2} s ({} ticks at {tck} Hz) | **{:.3} %** |",
        mib(rss_end),
        mib(anon),
        mib(file),
        mib(rss_sum / n.max(1)),
        mib(rss_max),
        mib(hwm),
        cpu_s,
        ticks1 - ticks0,
        cpu_s / elapsed * 100.0
    );
    println!();
    println!("| thread | CPU over window (schedstat) | % of one core |");
    println!("|---|---|---|");
    // Sum by thread name (tokio's workers share one).
    let mut by_name: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    for (tid, (name, ns1)) in &threads1 {
        let ns0 = threads0.get(tid).map_or(0, |(_, ns)| *ns);
        let e = by_name.entry(name.clone()).or_default();
        e.0 += ns1.saturating_sub(ns0);
        e.1 += 1;
    }
    let mut rows: Vec<_> = by_name.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1.0));
    for (name, (ns, count)) in rows {
        let label = if count > 1 {
            format!("`{name}` ×{count}")
        } else {
            format!("`{name}`")
        };
        println!(
            "| {label} | {:.1} ms | {:.3} % |",
            ns as f64 / 1e6,
            ns as f64 / 1e9 / elapsed * 100.0
        );
    }
}
