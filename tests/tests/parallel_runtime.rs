//! Drover's runtime for parallel steps (`runner/parallel/driver.py`) with
//! real Python: mini-batches of a folder handed to worker processes that
//! run a user's entry script, retries, timeouts, thresholds, a worker
//! killed mid-job, and the appended output holding every item once.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use drover_tests::{python3, repo_root, wait_until};

const SCORE: &str = r#"
import argparse, os, time
def init():
    global args
    p = argparse.ArgumentParser()
    p.add_argument("--bad", default="")
    p.add_argument("--slow", default="")
    p.add_argument("--sleep", type=float, default=0)
    p.add_argument("--pids", default="")
    args, _ = p.parse_known_args()
    if args.pids:
        with open(os.path.join(args.pids, str(os.getpid())), "w") as f:
            f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
def run(mini_batch):
    out = []
    for f in mini_batch:
        name = os.path.basename(f)
        if name in args.bad.split(","):
            raise ValueError(f"cannot score {name}")
        if name in args.slow.split(","):
            time.sleep(30)
        time.sleep(args.sleep)
        out.append(f"{name} {open(f).read().strip()}")
    return out
"#;

/// A folder of 100 files, `f000.txt` … `f099.txt`, and the entry script.
struct Step {
    dir: tempfile::TempDir,
}

impl Step {
    fn new() -> Step {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        for i in 0..100 {
            std::fs::write(
                dir.path().join(format!("data/f{i:03}.txt")),
                format!("item {i}\n"),
            )
            .unwrap();
        }
        std::fs::create_dir_all(dir.path().join("code")).unwrap();
        std::fs::write(dir.path().join("code/score.py"), SCORE).unwrap();
        Step { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn command(&self, run: &str, driver: &[&str], program: &[&str]) -> Command {
        let mut c = Command::new(python3());
        c.arg(repo_root().join("runner/parallel/driver.py"))
            .arg("--code")
            .arg(self.path("code"))
            .args(["--entry-script", "score.py", "--input"])
            .arg(self.path("data"))
            .arg("--work")
            .arg(self.path(&format!("{run}/work")))
            .arg("--logs")
            .arg(self.path(&format!("{run}/logs")))
            .arg("--output")
            .arg(self.path(&format!("{run}/out/parallel_run_step.txt")))
            .args(["--node-name", "node-0"])
            .args(driver)
            .arg("--")
            .args(program);
        c
    }

    fn run(&self, run: &str, driver: &[&str], program: &[&str]) -> Output {
        self.command(run, driver, program)
            .output()
            .expect("python3 runs")
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    /// The output's lines, asserting none appears twice.
    fn output_lines(&self, run: &str) -> BTreeSet<String> {
        let text = self.read(&format!("{run}/out/parallel_run_step.txt"));
        let mut seen = BTreeSet::new();
        for line in text.lines() {
            assert!(
                seen.insert(line.to_string()),
                "{line} appears twice in the output"
            );
        }
        seen
    }

    /// `processed_mini-batches.csv` rows: (index, status, tries, errors).
    fn report(&self, run: &str) -> Vec<(u32, String, u32, String)> {
        self.read(&format!(
            "{run}/logs/sys/job_report/processed_mini-batches.csv"
        ))
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.splitn(6, ',').collect();
            (
                f[0].parse().unwrap(),
                f[1].to_string(),
                f[2].parse().unwrap(),
                f[5].to_string(),
            )
        })
        .collect()
    }
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn failing_items_fail_their_mini_batches_after_retries_and_the_thresholds_decide() {
    let step = Step::new();
    let bad = ["--bad", "f007.txt,f033.txt,f071.txt"];
    // Within the threshold: the job succeeds and says 3 failed. The
    // driver's own `--error_threshold` is accepted by a prefix, as
    // argparse accepts it; `--bad` reaches the script.
    let out = step.run(
        "ok",
        &[
            "--mini-batch-size",
            "5",
            "--workers",
            "2",
            "--mini-batch-error-threshold",
            "5",
        ],
        &[bad[0], bad[1], "--error_thr", "100"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let result = step.read("ok/logs/job_result.txt");
    assert!(
        result.contains("17 succeeded, 3 failed, 20 in all"),
        "{result}"
    );
    let lines = step.output_lines("ok");
    assert_eq!(lines.len(), 85);
    // Exactly the items of the mini-batches that did not fail (5-9, 30-34, 70-74).
    let expected: BTreeSet<String> = (0..100)
        .filter(|i| ![1, 6, 14].contains(&(i / 5)))
        .map(|i| format!("f{i:03}.txt item {i}"))
        .collect();
    assert_eq!(lines, expected);
    let failed: Vec<_> = step
        .report("ok")
        .into_iter()
        .filter(|r| r.1 == "failed")
        .collect();
    assert_eq!(failed.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 6, 14]);
    for (_, _, tries, errors) in &failed {
        assert_eq!(*tries, 3, "max_retries 2: three tries");
        assert!(errors.contains("ValueError: cannot score f0"), "{errors}");
    }

    // Past it: exit 42, and job_result.txt says why.
    let out = step.run(
        "fail",
        &[
            "--mini-batch-size",
            "5",
            "--workers",
            "2",
            "--mini-batch-error-threshold",
            "2",
        ],
        &bad,
    );
    assert_eq!(out.status.code(), Some(42), "{}", said(&out));
    let result = step.read("fail/logs/job_result.txt");
    assert!(
        result.contains("3 mini-batches failed, more than mini_batch_error_threshold 2"),
        "{result}"
    );
    assert!(
        step.read("fail/logs/job_error.txt")
            .contains("cannot score")
    );

    // error_threshold counts items: 15 failed items are more than 10.
    let out = step.run(
        "items",
        &["--mini-batch-size", "5", "--error-threshold", "10"],
        &bad,
    );
    assert_eq!(out.status.code(), Some(42), "{}", said(&out));
    assert!(
        step.read("items/logs/job_result.txt")
            .contains("more than error_threshold 10")
    );
}

#[test]
fn a_run_past_its_timeout_is_a_failed_try() {
    let step = Step::new();
    let out = step.run(
        "t",
        &[
            "--mini-batch-size",
            "10",
            "--workers",
            "2",
            "--timeout",
            "2",
            "--max-retries",
            "1",
        ],
        &["--slow", "f013.txt"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let report = step.report("t");
    let timed_out: Vec<_> = report.iter().filter(|r| r.1 == "failed").collect();
    assert_eq!(timed_out.len(), 1, "{report:?}");
    assert_eq!(timed_out[0].0, 1);
    assert_eq!(timed_out[0].2, 2, "two tries with max_retries 1");
    assert_eq!(
        timed_out[0].3.matches("timed out after 2s").count(),
        2,
        "{report:?}"
    );
    assert_eq!(step.output_lines("t").len(), 90);
}

#[test]
fn a_killed_worker_is_replaced_runs_init_again_and_every_item_is_output_once() {
    let step = Step::new();
    let pids = step.path("pids");
    std::fs::create_dir_all(&pids).unwrap();
    let child: Child = step
        .command(
            "k",
            &["--mini-batch-size", "5", "--workers", "2"],
            &["--sleep", "0.05", "--pids", &pids.display().to_string()],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let started = |n: usize| std::fs::read_dir(&pids).map(|d| d.count()).unwrap_or(0) >= n;
    assert!(
        wait_until(Duration::from_secs(20), || started(2)),
        "two workers start"
    );
    // Let it be mid-batch, then kill -9 one worker.
    std::thread::sleep(Duration::from_millis(400));
    let victim: i32 = std::fs::read_dir(&pids)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .next()
        .expect("a worker pid");
    // SAFETY: sends a signal to a process this test's child started.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    let out = child.wait_with_output().expect("driver ends");
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    assert!(started(3), "a replacement worker ran init() again");
    let lines = step.output_lines("k");
    assert_eq!(lines.len(), 100, "every item once");
    let expected: BTreeSet<String> = (0..100).map(|i| format!("f{i:03}.txt item {i}")).collect();
    assert_eq!(lines, expected);
    let report = step.report("k");
    assert!(report.iter().all(|r| r.1 == "succeeded"), "{report:?}");
    let logs = said(&out);
    assert!(logs.contains("died (signal 9)"), "{logs}");
}

#[test]
fn each_worker_gets_one_gpu_while_gpus_last() {
    let step = Step::new();
    let pids = step.path("pids");
    std::fs::create_dir_all(&pids).unwrap();
    let mut command = step.command(
        "g",
        &["--mini-batch-size", "10", "--workers", "3"],
        &["--sleep", "0.02", "--pids", &pids.display().to_string()],
    );
    // What the runner sets in a part's container with two GPUs.
    command.env("AZ_BATCHAI_GPU_COUNT_FOUND", "2");
    let out = command.output().expect("python3 runs");
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let mut seen: Vec<String> = std::fs::read_dir(&pids)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        ["", "0", "1"],
        "GPU 0, GPU 1, and none for the third worker"
    );
}
