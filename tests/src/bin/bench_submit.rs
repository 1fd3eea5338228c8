//! Submit-to-running on a warm node: a job submitted with `drover job create`
//! to a release `drover server` with one idle release `drover-agent`, against
//! `docker run -d` of the same image on the same engine, interleaved (ABBA)
//! so that drift in the machine's load hits both sides alike.
//!
//! ```text
//! cargo run --release -p drover-tests --bin bench-submit -- [--runs 10] [--image drover/base:bookworm]
//! ```
//!
//! Method. Both sides run `sh -c 'date +%s.%N; sleep 3'` in the image, which
//! is present locally. The clock starts (`SystemTime`) just before the CLI
//! process (`drover job create …` or `docker run -d …`) is spawned. Two end
//! points, both read after the fact so that no polling loop sets the
//! resolution:
//!
//! * **started**: the engine's `State.StartedAt` of the container
//!   (`docker inspect -f '{{.State.StartedAt}}'`, RFC 3339 with nanoseconds; for Drover the
//!   container labelled `drover.job=<name>`), i.e. when the engine reports
//!   the container's process started; nanosecond timestamps from the same
//!   host clock;
//! * **command ran**: the first line the job's command prints, its own
//!   `date +%s.%N` (read back with `docker logs`), i.e. when the user's code
//!   is running; this includes drover-init's fork of `/bin/sh` for Drover.
//!
//! The Drover container is found by polling `docker ps` every 100 ms (that
//! only finds it; the timestamps come from the engine and the job). After each
//! run the Drover job is waited to `completed` and its container to be removed
//! by the agent (force-removed if still there after 20 s); the `docker run`
//! container is force-removed. One warm-up run of each side first.
//!
//! Prints medians, the spread, and the median added latency as Markdown.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_tests::{
    AgentProc, BASE_IMAGE, JobDir, ServerProc, containers_of_job, epoch_seconds, median,
    remove_job_containers, require_docker, unique_name, wait_until,
};

const COMMAND: &str = "date +%s.%N; sleep 3";

/// One measurement: seconds from submit to started, and to the command's first line.
struct Sample {
    started: f64,
    command: Option<f64>,
}

/// Reads both end points of container `id`, measured from `t0`.
fn sample(id: &str, t0: f64) -> Sample {
    // `State.StartedAt` is RFC 3339 with nanoseconds; zero (year 1) until started.
    let mut started_at = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let out = Command::new("docker")
            .args(["inspect", "-f", "{{.State.StartedAt}}", id])
            .output()
            .expect("docker inspect");
        started_at = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !started_at.is_empty() && !started_at.starts_with("0001-") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let parsed = Command::new("date")
        .args(["-d", &started_at, "+%s.%N"])
        .output()
        .expect("date -d");
    let started = String::from_utf8_lossy(&parsed.stdout)
        .trim()
        .parse::<f64>()
        .unwrap_or_else(|_| panic!("StartedAt of {id}: {started_at:?}"))
        - t0;
    // The command prints its time first; wait for it (it is running by now).
    let mut command = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while command.is_none() && Instant::now() < deadline {
        let logs = Command::new("docker")
            .args(["logs", id])
            .output()
            .expect("docker logs");
        command = String::from_utf8_lossy(&logs.stdout)
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<f64>().ok())
            .map(|t| t - t0);
        if command.is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Sample { started, command }
}

struct Bench {
    server: ServerProc,
    agent: AgentProc,
    job: JobDir,
    image: String,
}

impl Bench {
    fn drover(&self, i: usize) -> Sample {
        let name = unique_name(&format!("bs{i}"));
        let file = self.job.job_file().display().to_string();
        let t0 = epoch_seconds();
        self.server.cli_ok(&[
            "job",
            "create",
            "-f",
            &file,
            "--compute",
            "bench",
            "--name",
            &name,
        ]);
        let mut id = None;
        let found = wait_until(Duration::from_secs(30), || {
            id = containers_of_job(&name).into_iter().next();
            id.is_some()
        });
        let id = id.filter(|_| found).unwrap_or_else(|| {
            panic!(
                "no container for job {name}: {}\n{}",
                self.server.job(&name),
                self.agent.log_text()
            )
        });
        let s = sample(&id, t0);
        self.server
            .wait_job_state(&name, "completed", Duration::from_secs(30));
        if !wait_until(Duration::from_secs(20), || {
            containers_of_job(&name).is_empty()
        }) {
            eprintln!("container of {name} not removed by the agent; removing it");
            remove_job_containers(&name);
        }
        s
    }

    fn docker(&self) -> Sample {
        let t0 = epoch_seconds();
        let out = Command::new("docker")
            .args(["run", "-d", "--label", "drover-bench=submit", &self.image])
            .args(["sh", "-c", COMMAND])
            .stderr(Stdio::inherit())
            .output()
            .expect("docker run -d");
        assert!(out.status.success(), "docker run -d failed");
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let s = sample(&id, t0);
        let _ = Command::new("docker")
            .args(["rm", "-f", &id])
            .stdout(Stdio::null())
            .status();
        s
    }
}

fn summary(v: &[f64]) -> String {
    let mut v = v.to_vec();
    let m = median(&mut v);
    format!(
        "{:.0} ms ({:.0}–{:.0})",
        m * 1e3,
        v.first().copied().unwrap_or(f64::NAN) * 1e3,
        v.last().copied().unwrap_or(f64::NAN) * 1e3
    )
}

fn main() {
    let mut runs = 10usize;
    let mut image = BASE_IMAGE.to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(runs),
            "--image" => image = args.next().unwrap_or(image),
            other => {
                eprintln!(
                    "unknown argument {other}; usage: bench-submit [--runs N] [--image IMAGE]"
                );
                std::process::exit(2);
            }
        }
    }
    require_docker();
    let server = ServerProc::start_release(30);
    let join = server.create_cluster("bench", 1);
    let agent = AgentProc::start_release(&server, "bench", &join, &unique_name("bn"), &[]);
    let idle = wait_until(Duration::from_secs(60), || {
        let out = server.cli_ok(&["node", "list", "--json"]);
        out.contains("\"idle\"")
    });
    assert!(idle, "node never became idle:\n{}", agent.log_text());
    let job = JobDir::new(&format!(
        "command: '{COMMAND}'\nenvironment:\n  image: {image}\n"
    ));
    let b = Bench {
        server,
        agent,
        job,
        image,
    };

    // Warm up both paths.
    b.drover(1000);
    b.docker();
    let (mut d, mut k) = (Vec::new(), Vec::new());
    for i in 0..runs {
        if i % 2 == 0 {
            d.push(b.drover(i));
            k.push(b.docker());
        } else {
            k.push(b.docker());
            d.push(b.drover(i));
        }
        eprintln!(
            "run {i}: drover started {:.0} ms, docker started {:.0} ms",
            d[i].started * 1e3,
            k[i].started * 1e3
        );
    }
    let ds: Vec<f64> = d.iter().map(|s| s.started).collect();
    let ks: Vec<f64> = k.iter().map(|s| s.started).collect();
    let dc: Vec<f64> = d.iter().filter_map(|s| s.command).collect();
    let kc: Vec<f64> = k.iter().filter_map(|s| s.command).collect();
    let added = |a: &[f64], b: &[f64]| {
        let mut diffs: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
        median(&mut diffs) * 1e3
    };
    let med = |v: &[f64]| median(&mut v.to_vec()) * 1e3;
    println!(
        "| end point | runs | `drover job create` median (min–max) | `docker run -d` median (min–max) | added (difference of medians) | added (median of paired differences) |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| container started (`State.StartedAt`) | {runs} | {} | {} | **{:+.0} ms** | {:+.0} ms |",
        summary(&ds),
        summary(&ks),
        med(&ds) - med(&ks),
        added(&ds, &ks)
    );
    if dc.len() == runs && kc.len() == runs {
        println!(
            "| command ran (its own `date +%s.%N`) | {runs} | {} | {} | **{:+.0} ms** | {:+.0} ms |",
            summary(&dc),
            summary(&kc),
            med(&dc) - med(&kc),
            added(&dc, &kc)
        );
    } else {
        println!(
            "| command ran | {}/{runs} read | {} | {} | n/a | n/a |",
            dc.len().min(kc.len()),
            summary(&dc),
            summary(&kc)
        );
    }
}
