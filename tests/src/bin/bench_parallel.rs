//! Per-mini-batch overhead of Drover's parallel runtime
//! (`runner/parallel/driver.py`) against calling the same `run()` over the
//! same mini-batches in one plain Python loop.
//!
//! ```text
//! cargo run --release -p drover-tests --bin bench-parallel -- [--runs 5] [--batches 1000]
//! ```
//!
//! A folder of `--batches` small files, `mini_batch_size: 1`, one worker,
//! and a `run()` that reads its file: the work is near zero, so what is
//! measured is the runtime (queue, lease, result commit, report). Each run
//! times, side by side, the plain loop and the driver over `--batches` and
//! over a fifth of them; the overhead per mini-batch is the driver's extra
//! time between the two sizes divided by the extra mini-batches (start-up
//! and queue filling cancel out), less the loop's own per-batch time.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use drover_tests::{bench_arg, median, python3, repo_root};

const SCORE: &str = "def init():\n    pass\n\ndef run(mini_batch):\n    return [open(f).read().strip() for f in mini_batch]\n";

const LOOP: &str = r#"
import os, sys, time
sys.path.insert(0, sys.argv[2]); import score
files = sorted(os.path.join(sys.argv[1], f) for f in os.listdir(sys.argv[1]))
t = time.perf_counter(); score.init(); out = []
for i in range(len(files)):
    out += score.run(files[i:i+1])
print(time.perf_counter() - t)
"#;

fn folder(root: &Path, n: u32) -> std::path::PathBuf {
    let data = root.join(format!("data{n}"));
    std::fs::create_dir_all(&data).expect("mkdir");
    for i in 0..n {
        std::fs::write(data.join(format!("f{i:06}.txt")), format!("x{i}\n")).expect("write");
    }
    data
}

/// Seconds the driver takes over `data`.
fn driver(root: &Path, data: &Path, run: &str) -> f64 {
    let started = Instant::now();
    let out = Command::new(python3())
        .arg(repo_root().join("runner/parallel/driver.py"))
        .arg("--code")
        .arg(root.join("code"))
        .args(["--entry-script", "score.py", "--input"])
        .arg(data)
        .args(["--mini-batch-size", "1", "--workers", "1", "--work"])
        .arg(root.join(format!("{run}/work")))
        .arg("--logs")
        .arg(root.join(format!("{run}/logs")))
        .arg("--output")
        .arg(root.join(format!("{run}/out.txt")))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed().as_secs_f64()
}

/// Seconds the plain loop's `run()` calls take over `data`.
fn plain_loop(root: &Path, data: &Path) -> f64 {
    let out = Command::new(python3())
        .args(["-c", LOOP])
        .arg(data)
        .arg(root.join("code"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("seconds")
}

fn main() {
    let runs = bench_arg::<u32>("--runs", 5);
    let batches = bench_arg::<u32>("--batches", 1000).max(10);
    let small = batches / 5;
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    std::fs::create_dir_all(root.join("code")).expect("mkdir");
    std::fs::write(root.join("code/score.py"), SCORE).expect("write");
    let (big_data, small_data) = (folder(root, batches), folder(root, small));
    let (mut overhead, mut loop_per, mut driver_per) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let d_big = driver(root, &big_data, &format!("b{run}"));
        let d_small = driver(root, &small_data, &format!("s{run}"));
        let l_big = plain_loop(root, &big_data);
        let l_small = plain_loop(root, &small_data);
        let extra = f64::from(batches - small);
        let d = (d_big - d_small) / extra;
        let l = ((l_big - l_small) / extra).max(0.0);
        eprintln!(
            "run {run}: driver {d_big:.3}s/{batches} {d_small:.3}s/{small}, loop {l_big:.4}s {l_small:.4}s"
        );
        driver_per.push(d * 1000.0);
        loop_per.push(l * 1000.0);
        overhead.push((d - l) * 1000.0);
    }
    let (o, d, l) = (
        median(&mut overhead),
        median(&mut driver_per),
        median(&mut loop_per),
    );
    println!("| per mini-batch (median of {runs}) | ms |");
    println!("|---|---|");
    println!("| plain Python loop calling run() | {l:.3} |");
    println!("| Drover's parallel runtime, one worker | {d:.3} |");
    println!("| added by the runtime (goal ≤ 5 ms) | {o:.3} |");
}
