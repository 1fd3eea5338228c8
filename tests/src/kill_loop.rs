//! The agent kill loop: jobs that print numbered lines while their node's
//! agent is `kill -9`ed at a random moment and restarted 1–5 s later, the
//! way Kubernetes, Nomad and ECS test their node agents. Each job must
//! complete once, in one container, with every line in its log exactly
//! once. Shared by `tests/tests/cluster.rs` (a short loop) and the
//! `bench-kill-loop` binary (the long one whose numbers go to
//! BENCHMARKS.md).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::{AgentProc, BASE_IMAGE, ServerProc, containers_of_job, unique_name};

/// What a kill loop found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KillLoopReport {
    /// Jobs run.
    pub jobs: usize,
    /// Jobs that completed (exit 0) as their first attempt.
    pub completed: usize,
    /// Containers beyond one per job.
    pub duplicate_containers: usize,
    /// Numbered lines missing from the jobs' logs.
    pub lines_lost: usize,
    /// Numbered lines in the logs more than once (each extra copy counted).
    pub lines_duplicated: usize,
    /// One line per job that went wrong, for the report.
    pub problems: Vec<String>,
}

/// A small deterministic generator, so a failing run can be repeated from
/// its seed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    /// A duration in `lo..hi`.
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_millis().max(1) as u64;
        lo + Duration::from_millis(self.next() % span)
    }
}

/// Runs `jobs` jobs of `lines` numbered lines (one every 200 ms) one after
/// another on a one-node cluster, killing the agent once during each.
pub fn run(jobs: usize, lines: usize, seed: u64, release: bool) -> KillLoopReport {
    let server = if release {
        ServerProc::start_release(40)
    } else {
        ServerProc::start(40)
    };
    let cluster = "kill";
    let join = server.create_cluster(cluster, 1);
    let node = unique_name("kl");
    let mut agent = if release {
        AgentProc::start_release(&server, cluster, &join, &node, &[])
    } else {
        AgentProc::start(&server, cluster, &join, &node)
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Lcg(seed);
    let mut report = KillLoopReport {
        jobs,
        ..KillLoopReport::default()
    };
    let job_seconds = lines as f64 * 0.2;
    for n in 0..jobs {
        let name = unique_name(&format!("kl{n}"));
        let file = dir.path().join(format!("{name}.yml"));
        std::fs::write(
            &file,
            format!(
                "command: for i in $(seq 1 {lines}); do echo line-$i; sleep 0.2; done\nenvironment:\n  image: {BASE_IMAGE}\n"
            ),
        )
        .expect("write job");
        server.cli_ok(&[
            "job",
            "create",
            "-f",
            &file.display().to_string(),
            "--compute",
            cluster,
            "--name",
            &name,
        ]);
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let started = Instant::now();
        while server.job_state(&name) != "running" {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "job {name} never ran: {}\n{}",
                server.job(&name),
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Kill somewhere inside the job's run, restart 1–5 s later.
        let kill_at = rng.between(
            Duration::from_millis(200),
            Duration::from_secs_f64((job_seconds * 0.9).max(0.3)),
        );
        let down_for = rng.between(Duration::from_secs(1), Duration::from_secs(5));
        let t0 = Instant::now();
        while t0.elapsed() < kill_at {
            seen.extend(containers_of_job(&name));
            std::thread::sleep(Duration::from_millis(50));
        }
        agent.kill9();
        let t1 = Instant::now();
        while t1.elapsed() < down_for {
            seen.extend(containers_of_job(&name));
            std::thread::sleep(Duration::from_millis(100));
        }
        agent.spawn();
        let deadline = Instant::now() + Duration::from_secs(60 + job_seconds as u64);
        loop {
            seen.extend(containers_of_job(&name));
            let state = server.job_state(&name);
            if matches!(state.as_str(), "completed" | "failed" | "canceled") {
                break;
            }
            if Instant::now() > deadline {
                report
                    .problems
                    .push(format!("{name}: still {state} after the deadline"));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let info = server.job(&name);
        if info["state"] == "completed" && info["attempt"] == 1 {
            report.completed += 1;
        } else {
            report.problems.push(format!(
                "{name}: {} as attempt {}",
                info["state"], info["attempt"]
            ));
        }
        report.duplicate_containers += seen.len().saturating_sub(1);
        let logs = server.cli_ok(&["job", "logs", &name]);
        let got: Vec<&str> = logs.lines().filter(|l| l.starts_with("line-")).collect();
        for i in 1..=lines {
            let want = format!("line-{i}");
            match got.iter().filter(|l| **l == want).count() {
                0 => report.lines_lost += 1,
                1 => {}
                k => report.lines_duplicated += k - 1,
            }
        }
        let numbered: Vec<String> = (1..=lines).map(|i| format!("line-{i}")).collect();
        if got != numbered {
            report.problems.push(format!(
                "{name}: killed {} ms in, down {} ms: log {:?}",
                kill_at.as_millis(),
                down_for.as_millis(),
                got
            ));
        }
    }
    report
}
