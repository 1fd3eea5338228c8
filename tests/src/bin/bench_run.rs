//! Container-start overhead: a no-op job (`true`) through `drover run` vs
//! `docker run --rm` of the same image, interleaved so that drift in the
//! machine's load hits both sides alike.
//!
//! ```text
//! cargo run --release -p drover-tests --bin bench-run -- [--runs 20] [--image drover/base:bookworm]
//! ```
//!
//! Prints medians, the spread, and the ratio of medians as a Markdown table.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_tests::{BASE_IMAGE, JobDir, drover_bin_release, init_bin, require_docker};

fn time(cmd: &mut Command) -> Duration {
    let started = Instant::now();
    let status = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let elapsed = started.elapsed();
    assert!(status.success(), "{cmd:?} failed: {status}");
    elapsed
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let mut runs = 20usize;
    let mut image = BASE_IMAGE.to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(runs),
            "--image" => image = args.next().unwrap_or(image),
            other => {
                eprintln!("unknown argument {other}; usage: bench-run [--runs N] [--image IMAGE]");
                std::process::exit(2);
            }
        }
    }
    require_docker();
    let drover = drover_bin_release();
    let init = init_bin();
    let job = JobDir::new(&format!(
        "command: 'true'\nenvironment:\n  image: {image}\n"
    ));

    let drover_run = |i: usize| {
        let mut c = Command::new(&drover);
        c.arg("run")
            .arg(job.job_file())
            .args(["--name", &format!("bench-{}-{i}", std::process::id())])
            .env("DROVER_INIT", &init);
        c
    };
    let docker_run = || {
        let mut c = Command::new("docker");
        c.args(["run", "--rm", &image, "true"]);
        c
    };

    // Warm up both paths (page cache, engine caches).
    for i in 0..2 {
        time(&mut drover_run(1000 + i));
        time(&mut docker_run());
    }
    let mut d = Vec::with_capacity(runs);
    let mut k = Vec::with_capacity(runs);
    for i in 0..runs {
        // ABBA order: neither side always goes first.
        if i % 2 == 0 {
            d.push(time(&mut drover_run(i)));
            k.push(time(&mut docker_run()));
        } else {
            k.push(time(&mut docker_run()));
            d.push(time(&mut drover_run(i)));
        }
    }
    let (dmin, kmin) = (
        *d.iter().min().unwrap_or(&Duration::ZERO),
        *k.iter().min().unwrap_or(&Duration::ZERO),
    );
    let (dmax, kmax) = (
        *d.iter().max().unwrap_or(&Duration::ZERO),
        *k.iter().max().unwrap_or(&Duration::ZERO),
    );
    let dm = median(&mut d);
    let km = median(&mut k);
    println!(
        "| runs | `drover run` median (min–max) | `docker run --rm` median (min–max) | ratio of medians |"
    );
    println!("|---|---|---|---|");
    println!(
        "| {runs} | {:.0} ms ({:.0}–{:.0}) | {:.0} ms ({:.0}–{:.0}) | {:.2}× |",
        ms(dm),
        ms(dmin),
        ms(dmax),
        ms(km),
        ms(kmin),
        ms(kmax),
        dm.as_secs_f64() / km.as_secs_f64()
    );
}
