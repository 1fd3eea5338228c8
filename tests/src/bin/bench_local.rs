//! Local clusters: scale-up (submission to the job running on a node created
//! for it) and preemption reaction (a Preempt event injected to SIGTERM in
//! the job container and the node marked preempted), on a release `drover
//! up` cluster.
//!
//! ```text
//! cargo run --release -p drover-tests --bin bench-local -- [--runs 10]
//! ```
//!
//! Scale-up. A dedicated cluster (min 0, max 1, idle 0 s, no cool-down) is
//! at zero nodes; the clock starts (host `SystemTime`) just before `drover job
//! create` is spawned; the job runs `date +%s.%N; sleep 1`. End points, read
//! after the fact: **running**, the server's `started_at` of the job (ms;
//! set when the node reports the part running); **command ran**, the job's
//! first line, its own `date` inside the container. Between runs the cluster
//! goes back to zero nodes and the node container is gone, so every run
//! creates a node (the node image is present).
//!
//! Preemption. A low-priority cluster (max 2) runs a job that traps SIGTERM
//! and prints `date +%s.%N` when it arrives. The clock starts just before
//! `drover node evict` is spawned. End points: **SIGTERM**, the time the job
//! printed; **node preempted**, the timestamp of the server's `node lost …
//! state=preempted` log line. The job is then cancelled and the cluster left
//! to settle (the replacement node is reused by the next run).

use std::time::{Duration, UNIX_EPOCH};

use drover_tests::{
    JobDir, LocalUp, containers_labelled, epoch_seconds, median, short_name, wait_until,
};

fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.0}–{:.0} ms", min * 1000.0, max * 1000.0)
}

/// Seconds since the epoch printed by `date +%s.%N` after `marker` in the logs.
fn printed_time(logs: &str, marker: &str) -> Option<f64> {
    logs.lines()
        .find_map(|l| l.split(marker).nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|t| t.parse().ok())
}

/// The time of the server's `node lost` line for `node`, in seconds.
fn preempted_at(log: &str, node: &str) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains("node lost") && l.contains(node) && l.contains("preempted"))
        .find_map(|l| l.split_whitespace().next())
        .and_then(|ts| humantime::parse_rfc3339(ts).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
}

fn main() {
    let mut runs = 10usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(runs),
            other => {
                eprintln!("unknown argument {other}; usage: bench-local [--runs 10]");
                std::process::exit(2);
            }
        }
    }
    let up = LocalUp::up_release(&[
        "--max-nodes",
        "1",
        "--idle-seconds-before-scaledown",
        "0",
        "--scale-down-cooldown-seconds",
        "0",
    ]);
    let cluster = up.cluster.clone();

    // Scale-up.
    let job = JobDir::new(
        "command: echo ran $(date +%s.%N); sleep 1\nenvironment:\n  image: drover/base:bookworm\n",
    );
    let mut running = Vec::new();
    let mut ran = Vec::new();
    for i in 0..=runs {
        let settled = wait_until(Duration::from_secs(60), || {
            containers_labelled("drover.cluster", &cluster).is_empty()
                && up.nodes(&cluster).is_empty()
        });
        assert!(
            settled,
            "the cluster never went back to zero:\n{}",
            up.log_text()
        );
        let t0 = epoch_seconds();
        let name = up.submit(&job.job_file(), &cluster);
        up.wait_job_state(&name, "completed", Duration::from_secs(60));
        let j = up.job(&name);
        let started = j["started_at"].as_u64().unwrap_or(0) as f64 / 1000.0;
        let logs = up.cli_ok(&["job", "logs", &name]);
        let first = printed_time(&logs, "ran ").unwrap_or(f64::NAN);
        eprintln!(
            "scale-up run {i}: running after {:.0} ms, command ran after {:.0} ms",
            (started - t0) * 1000.0,
            (first - t0) * 1000.0
        );
        // The first run warms the page cache and the engine.
        if i > 0 {
            running.push(started - t0);
            ran.push(first - t0);
        }
    }

    // Preemption.
    let spot = short_name("s");
    up.cli_ok(&[
        "compute",
        "create",
        "-n",
        &spot,
        "-s",
        "Standard_D4s_v3",
        "--provider",
        "local",
        "--vm-priority",
        "lowpriority",
        "--min-nodes",
        "0",
        "--max-nodes",
        "2",
        "--idle-seconds-before-scaledown",
        "600",
    ]);
    let victim_job = JobDir::new(
        "command: trap 'echo term $(date +%s.%N); exit 143' TERM; echo ready; while true; do sleep 0.1; done\n\
         environment:\n  image: drover/base:bookworm\n",
    );
    let mut term = Vec::new();
    let mut marked = Vec::new();
    for i in 0..runs {
        let name = up.submit(&victim_job.job_file(), &spot);
        up.wait_job_state(&name, "running", Duration::from_secs(60));
        assert!(wait_until(Duration::from_secs(30), || up
            .cli_ok(&["job", "logs", &name])
            .contains("ready")));
        let node = up.job(&name)["parts"][0]["node"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let t0 = epoch_seconds();
        up.cli_ok(&["node", "evict", &node]);
        let seen = wait_until(Duration::from_secs(20), || {
            up.cli_ok(&["job", "logs", &name]).contains("term ")
                && preempted_at(&up.log_text(), &node).is_some()
        });
        assert!(
            seen,
            "no reaction to the eviction of {node}:\n{}",
            up.log_text()
        );
        let t_term = printed_time(&up.cli_ok(&["job", "logs", &name]), "term ").unwrap_or(f64::NAN);
        let t_marked = preempted_at(&up.log_text(), &node).unwrap_or(f64::NAN);
        eprintln!(
            "preemption run {i}: SIGTERM after {:.0} ms, node preempted after {:.0} ms",
            (t_term - t0) * 1000.0,
            (t_marked - t0) * 1000.0
        );
        term.push(t_term - t0);
        marked.push(t_marked - t0);
        up.cli_ok(&["job", "cancel", &name]);
        // Let the preempted node be reclaimed before the next run.
        assert!(wait_until(Duration::from_secs(60), || containers_labelled(
            "drover.owner",
            &node
        )
        .is_empty()));
    }

    println!("| what | median | spread | runs |");
    println!("|---|---|---|---|");
    let row = |what: &str, v: &mut Vec<f64>| {
        let s = spread(v);
        println!(
            "| {what} | {:.0} ms | {s} | {} |",
            median(v) * 1000.0,
            v.len()
        );
    };
    row(
        "scale-up: submission → job running on a new node (server `started_at`)",
        &mut running,
    );
    row(
        "scale-up: submission → the job's command ran on the new node",
        &mut ran,
    );
    row(
        "preemption: Preempt injected → SIGTERM in the job container",
        &mut term,
    );
    row(
        "preemption: Preempt injected → node marked preempted (job requeued)",
        &mut marked,
    );
}
