//! The first job on a node with a registered build environment: how long
//! from submission to running when the node builds the environment itself,
//! when it pulls it from the control plane's registry (another node built
//! and pushed it), and when the image was prepulled (`drover-agent prepull`,
//! as a baked VM image has it).
//!
//! ```text
//! cargo run --release -p drover-tests --bin bench-environments -- [--runs 5] [--payload-mb 64]
//! ```
//!
//! One release `drover up` cluster with one warm node and `--registry` on a
//! local `docker-registry`. Each run registers a new version of an
//! environment whose Dockerfile (`FROM drover/base:bookworm`) adds a
//! `--payload-mb` file of random bytes (so the image has a layer to move),
//! and then, with the environment's image removed from the engine:
//! (a) build: a job runs it — the node builds and pushes it;
//! (b) pull: the local image is removed, a job runs it — the node pulls it;
//! (c) prepulled: the local image is removed, `drover-agent prepull
//!     --environment NAME:VERSION` pulls it, then a job runs it.
//! The time is the job's `started_at - submitted_at` (the control plane's
//! clock; the part reports running when its container started). The order
//! of the three is the same each run (each needs the one before); the
//! ratios are of medians over the runs.

use std::process::Command;
use std::time::Duration;

use drover_tests::{
    JobDir, LocalUp, Registry, agent_bin_release, bench_arg, median, require_image, short_name,
};

fn rmi(image: &str) {
    let _ = Command::new("docker")
        .args(["image", "rm", "-f", image])
        .output();
}

/// Submits a job on `environment`, waits for it, and returns
/// `started_at - submitted_at` in seconds.
fn first_job(up: &LocalUp, dir: &JobDir, environment: &str) -> f64 {
    let file = format!("{}.yml", short_name("job"));
    dir.write(
        &file,
        &format!("command: 'true'\nenvironment: {environment}\n"),
    );
    let job = up.submit(&dir.path(&file), &up.cluster);
    up.wait_job_state(&job, "completed", Duration::from_secs(600));
    let j = up.job(&job);
    let submitted = j["submitted_at"].as_f64().unwrap_or(0.0);
    let started = j["started_at"].as_f64().unwrap_or(0.0);
    (started - submitted) / 1000.0
}

fn main() {
    require_image("drover/base:bookworm");
    let runs = bench_arg::<u32>("--runs", 5);
    let payload = bench_arg::<u32>("--payload-mb", 64);
    let registry = Registry::start();
    let secret = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(secret.path(), &registry.password).expect("write password");
    let prefix = format!("{}/bench", registry.addr);
    let up = LocalUp::up_release(&[
        "--max-nodes",
        "1",
        "--idle-seconds-before-scaledown",
        "3600",
        "--registry",
        &prefix,
        "--registry-username",
        &registry.user,
        "--registry-password-file",
        &secret.path().display().to_string(),
    ]);
    let dir = JobDir::new("");
    // A warm node first: the runs measure the environment, not the node.
    dir.write(
        "warm.yml",
        "command: 'true'\nenvironment:\n  image: drover/base:bookworm\n",
    );
    let warm = up.submit(&dir.path("warm.yml"), &up.cluster);
    up.wait_job_state(&warm, "completed", Duration::from_secs(300));

    let name = short_name("bench-env");
    let server = format!("http://127.0.0.1:{}", up.port);
    let token = std::fs::read_to_string(up.data.path().join("admin.token"))
        .expect("admin token")
        .trim()
        .to_string();
    let (mut build, mut pull, mut prepulled) = (Vec::new(), Vec::new(), Vec::new());
    let mut images = Vec::new();
    for run in 1..=runs {
        let ctx = format!("ctx{run}");
        dir.write(
            &format!("{ctx}/Dockerfile"),
            &format!(
                "FROM drover/base:bookworm\nRUN head -c {payload}m /dev/urandom > /payload && echo run {run} {name} > /marker\n"
            ),
        );
        dir.write(
            &format!("{ctx}.yml"),
            &format!("name: {name}\nbuild:\n  path: {ctx}\n"),
        );
        up.cli_ok(&[
            "environment",
            "create",
            "-f",
            &dir.path(&format!("{ctx}.yml")).display().to_string(),
        ]);
        let version = run.to_string();
        let image = format!("{prefix}/{name}:{version}");
        images.push(image.clone());
        let reference = format!("azureml:{name}:{version}");

        let b = first_job(&up, &dir, &reference);
        rmi(&image);
        let p = first_job(&up, &dir, &reference);
        rmi(&image);
        let out = Command::new(agent_bin_release())
            .args([
                "prepull",
                "--environment",
                &format!("{name}:{version}"),
                "--from-server",
                &server,
            ])
            .env("DROVER_TOKEN", &token)
            .env("DOCKER_CONFIG", registry.docker_config())
            .output()
            .expect("drover-agent prepull");
        assert!(
            out.status.success(),
            "prepull failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let c = first_job(&up, &dir, &reference);
        println!("run {run}: build {b:.2} s, pull {p:.2} s, prepulled {c:.2} s");
        build.push(b);
        pull.push(p);
        prepulled.push(c);
    }
    for image in &images {
        rmi(image);
    }
    let (b, p, c) = (
        median(&mut build),
        median(&mut pull),
        median(&mut prepulled),
    );
    println!(
        "\nsubmission to running, median of {runs} ({payload} MB layer):\n  build on the node  {b:.2} s\n  pull from registry {p:.2} s  ({:.2}x build)\n  prepulled          {c:.2} s  ({:.2}x build, {:.2}x pull)",
        p / b,
        c / b,
        c / p
    );
}
