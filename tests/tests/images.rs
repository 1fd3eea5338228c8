//! Images on a node: `drover-agent prepull` makes a job start without a
//! pull, and collection under disk pressure removes only what the agent
//! brought and no part needs.

use std::process::Command;
use std::time::Duration;

use drover_tests::{
    AgentProc, JobDir, LocalUp, Registry, ServerProc, agent_bin, image_exists, require_image,
    short_name, wait_until,
};

/// Removes the test's images at the end, whatever happened.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        for i in &self.0 {
            let _ = Command::new("docker")
                .args(["image", "rm", "-f", i])
                .output();
        }
    }
}

/// A tiny image of its own (a layer on the base), built locally as `tag`.
fn tiny(tag: &str) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM drover/base:bookworm\nRUN echo {tag} > /which\n"),
    )
    .unwrap();
    let out = Command::new("docker")
        .args(["build", "-q", "-t", tag])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Percent used of the filesystem holding Docker's data root.
fn docker_disk_percent() -> f64 {
    let root = Command::new("docker")
        .args(["info", "-f", "{{.DockerRootDir}}"])
        .output()
        .unwrap();
    let root = String::from_utf8_lossy(&root.stdout).trim().to_string();
    let df = Command::new("df")
        .args(["--output=size,avail", "-B1", &root])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&df.stdout);
    let nums: Vec<f64> = text
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    (nums[0] - nums[1]) * 100.0 / nums[0]
}

fn prepull(data_dir: &std::path::Path, registry: &Registry, args: &[&str]) -> std::process::Output {
    Command::new(agent_bin())
        .arg("prepull")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env("DOCKER_CONFIG", registry.docker_config())
        .output()
        .expect("drover-agent prepull")
}

#[test]
fn prepulled_images_start_without_a_pull_and_collection_keeps_what_is_needed() {
    require_image("drover/base:bookworm");
    let registry = Registry::start();
    let id = short_name("gc");
    let repo = |n: &str| format!("{id}/{n}");
    let mut names = Vec::new();
    for n in ["unused", "pinned", "running"] {
        let local = format!("drover-test/{id}-{n}:1");
        tiny(&local);
        names.push(registry.push(&local, &format!("{}:1", repo(n))));
        let _ = Command::new("docker")
            .args(["image", "rm", &local])
            .output();
    }
    let unrecorded = format!("drover-test/{id}-unrecorded:1");
    tiny(&unrecorded);
    let mut all = names.clone();
    all.push(unrecorded.clone());
    let _cleanup = Images(all);
    let (unused, pinned, running) = (&names[0], &names[1], &names[2]);

    let server = ServerProc::start(40);
    let dir = JobDir::new("");
    dir.write("pw", &registry.password);
    let allowed = std::fs::canonicalize(dir.path(".")).unwrap();
    let join = server.create_cluster_with(
        "gc",
        1,
        &["--allow-host-path", &allowed.display().to_string()],
    );
    // Collect as soon as anything collectable is there: thresholds just
    // under what the disk holds now.
    let now = docker_disk_percent();
    let high = format!("{:.3}", (now - 1.0).max(0.5));
    let low = format!("{:.3}", (now - 1.5).max(0.1));
    let mut agent = AgentProc::start_with_args(
        &server,
        "gc",
        &join,
        &short_name("n"),
        &[
            "--image-gc-high-percent".into(),
            high,
            "--image-gc-low-percent".into(),
            low,
            "--image-gc-interval-seconds".into(),
            "1".into(),
        ],
    );

    // Prepull pins `pinned`; a job on it then makes no registry request.
    let out = prepull(agent.data_dir(), &registry, &["--image", pinned]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("ready as") && said.contains("(pinned)"),
        "{said}"
    );
    let before = registry.manifest_gets(&repo("pinned"));
    let job = |file: &str, image: &str, command: &str| {
        dir.write(
            file,
            &format!(
                "command: {command}\nenvironment:\n  image: {image}\ndrover:\n  registry_credentials:\n    username: {}\n    password_file: ./pw\n",
                registry.user
            ),
        );
        server.submit(&dir.path(file), "gc")
    };
    let j = job("pinned.yml", pinned, "cat /which");
    server.wait_job_state(&j, "completed", Duration::from_secs(90));
    assert_eq!(
        registry.manifest_gets(&repo("pinned")),
        before,
        "the prepulled image was pulled again:\n{}",
        registry.log()
    );

    // A part keeps `running` in use; `unused` is pulled, used and left.
    let r = job("running.yml", running, "sleep 60");
    server.wait_job_state(&r, "running", Duration::from_secs(90));
    let u = job("unused.yml", unused, "'true'");
    // One node runs one job at a time: `unused` waits for `running`.
    server.cli_ok(&["job", "cancel", &r]);
    server.wait_job_state(&u, "completed", Duration::from_secs(120));
    let r2 = job("running2.yml", running, "sleep 60");
    server.wait_job_state(&r2, "running", Duration::from_secs(90));

    let gone = wait_until(Duration::from_secs(60), || !image_exists(unused));
    assert!(
        gone,
        "the unused image was not collected:\n{}",
        agent.log_text()
    );
    assert!(image_exists(pinned), "the pinned image went");
    assert!(image_exists(running), "the running part's image went");
    assert!(
        image_exists(&unrecorded),
        "an image the agent never brought went"
    );
    assert!(image_exists("drover/base:bookworm"));
    let log = agent.log_text();
    assert!(
        log.contains("image collected") && log.contains(unused.as_str()),
        "{log}"
    );
    server.cli_ok(&["job", "cancel", &r2]);
    server.wait_job_state(&r2, "canceled", Duration::from_secs(60));
    let _ = agent.terminate(Duration::from_secs(30));
}

#[test]
fn a_prepulled_environment_runs_its_first_job_without_a_build() {
    require_image("drover/base:bookworm");
    let up = LocalUp::up(&["--max-nodes", "1"]);
    let name = short_name("pre");
    let image = format!("drover-env/{name}:1");
    let _cleanup = Images(vec![image.clone()]);
    let dir = JobDir::new("");
    dir.write(
        "ctx/Dockerfile",
        "FROM drover/base:bookworm\nRUN echo prepulled > /marker\n",
    );
    dir.write("env.yml", &format!("name: {name}\nbuild:\n  path: ctx\n"));
    up.cli_ok(&[
        "environment",
        "create",
        "-f",
        &dir.path("env.yml").display().to_string(),
    ]);
    let data = tempfile::tempdir().unwrap();
    let token = std::fs::read_to_string(up.data.path().join("admin.token")).unwrap();
    let out = Command::new(agent_bin())
        .args(["prepull", "--environment", &name, "--from-server"])
        .arg(format!("http://127.0.0.1:{}", up.port))
        .arg("--data-dir")
        .arg(data.path())
        .env("DROVER_TOKEN", token.trim())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains(&format!("building environment {name}:1")),
        "{said}"
    );
    assert!(image_exists(&image));
    dir.write(
        "job.yml",
        &format!("command: cat /marker\nenvironment: azureml:{name}@latest\n"),
    );
    let job = up.submit(&dir.path("job.yml"), &up.cluster);
    up.wait_job_state(&job, "completed", Duration::from_secs(120));
    let logs = up.cli_ok(&["job", "logs", &job]);
    assert!(logs.contains("prepulled"), "{logs}");
    assert!(
        !logs.contains("building environment"),
        "built again: {logs}"
    );
    // Unknown environments and missing servers are errors, per item.
    let out = Command::new(agent_bin())
        .args(["prepull", "--environment", "nope:3"])
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--environment needs --from-server"));
}
