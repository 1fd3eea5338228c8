//! Registered environments on a local cluster: versions built from a Docker
//! context on the nodes, named by jobs as `azureml:NAME@latest` or
//! `azureml:NAME:VERSION`, archived, built once for a registry, and a build
//! that fails.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use drover_tests::{JobDir, LocalUp, Registry, require_image, short_name};
use serde_json::Value;

/// Removes the images a test's environments were built as.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = Command::new("docker")
                .args(["image", "rm", "-f", image])
                .output();
        }
    }
}

/// An environment file with a build context whose image holds `marker`.
fn context(dir: &JobDir, folder: &str, name: &str, marker: &str) -> String {
    dir.write(
        &format!("{folder}/Dockerfile"),
        &format!("FROM drover/base:bookworm\nRUN echo {marker} > /env-marker\n"),
    );
    let file = format!("{folder}.yml");
    dir.write(
        &file,
        &format!(
            "$schema: https://azuremlschemas.azureedge.net/latest/environment.schema.json\nname: {name}\nbuild:\n  path: {folder}\ndescription: trainer from a Docker context\n"
        ),
    );
    dir.path(&file).display().to_string()
}

fn job_yaml(environment: &str, instances: u32) -> String {
    format!(
        "$schema: https://azuremlschemas.azureedge.net/latest/commandJob.schema.json\ncommand: echo marker=$(cat /env-marker)\nenvironment: {environment}\nresources:\n  instance_count: {instances}\n"
    )
}

/// Runs `yaml` on the cluster to completion; returns its markers and log.
fn run(up: &LocalUp, dir: &JobDir, file: &str, yaml: &str) -> (Vec<String>, String) {
    dir.write(file, yaml);
    let job = up.submit(&dir.path(file), &up.cluster);
    up.wait_job_state(&job, "completed", Duration::from_secs(240));
    let logs = up.cli_ok(&["job", "logs", &job]);
    let markers = logs
        .lines()
        .filter_map(|l| l.split("marker=").nth(1))
        .map(|m| m.trim().to_string())
        .collect();
    (markers, logs)
}

fn json(up: &LocalUp, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    serde_json::from_str(&up.cli_ok(&args)).expect("json")
}

#[test]
fn registered_versions_latest_pinned_and_archived_run_on_two_nodes() {
    require_image("drover/base:bookworm");
    let up = LocalUp::up(&["--max-nodes", "2"]);
    let name = short_name("trainer");
    let _images = Images(vec![
        format!("drover-env/{name}:1"),
        format!("drover-env/{name}:2"),
    ]);
    let dir = JobDir::new("");

    let v1 = context(&dir, "ctx1", &name, "one");
    let said = up.cli_ok(&["environment", "create", "-f", &v1]);
    assert!(
        said.contains(&format!("created environment {name}:1")),
        "{said}"
    );

    // Two nodes, each builds (or finds) version 1.
    let (markers, logs) = run(
        &up,
        &dir,
        "j1.yml",
        &job_yaml(&format!("azureml:{name}@latest"), 2),
    );
    assert_eq!(markers, ["one", "one"], "{logs}");
    assert!(logs.contains("building environment"), "{logs}");

    // Version 2: @latest now runs it; a job pinned to :1 still runs 1.
    let v2 = context(&dir, "ctx2", &name, "two");
    let said = up.cli_ok(&["environment", "create", "-f", &v2]);
    assert!(said.contains(&format!("{name}:2")), "{said}");
    let (markers, logs) = run(
        &up,
        &dir,
        "j2.yml",
        &job_yaml(&format!("azureml:{name}@latest"), 1),
    );
    assert_eq!(markers, ["two"], "{logs}");
    let (markers, logs) = run(
        &up,
        &dir,
        "j3.yml",
        &job_yaml(&format!("azureml:{name}:1"), 1),
    );
    assert_eq!(markers, ["one"], "{logs}");

    // `show` of the job names the pinned version.
    let latest = json(
        &up,
        &["environment", "show", "-n", &name, "--label", "latest"],
    );
    assert_eq!(latest["version"], "2", "{latest}");
    assert_eq!(latest["build_state"]["state"], "built", "{latest}");
    assert_eq!(latest["image"], format!("drover-env/{name}:2"));

    // Archived: hidden from lists, still usable by a pinned reference.
    up.cli_ok(&["environment", "archive", "-n", &name, "-v", "1"]);
    let versions = json(&up, &["environment", "list", "-n", &name]);
    let listed: Vec<&str> = versions["environments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["2"], "{versions}");
    let all = json(
        &up,
        &["environment", "list", "-n", &name, "--include-archived"],
    );
    assert_eq!(all["environments"].as_array().unwrap().len(), 2, "{all}");
    let (markers, logs) = run(
        &up,
        &dir,
        "j4.yml",
        &job_yaml(&format!("azureml:{name}:1"), 1),
    );
    assert_eq!(markers, ["one"], "{logs}");

    // Update changes description and tags only.
    let updated = json(
        &up,
        &[
            "environment",
            "update",
            "-n",
            &name,
            "-v",
            "2",
            "-d",
            "v2 trainer",
            "--set",
            "tags.team=vision",
        ],
    );
    assert_eq!(updated["description"], "v2 trainer");
    assert_eq!(updated["tags"]["team"], "vision");

    // References that cannot resolve are refused at submission, naming it.
    dir.write("bad.yml", &job_yaml(&format!("azureml:{name}:7"), 1));
    let out = up.cli(&[
        "job",
        "create",
        "-f",
        &dir.path("bad.yml").display().to_string(),
        "-c",
        &up.cluster,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("no environment {name}:7")), "{err}");
}

#[test]
fn with_a_registry_one_node_builds_and_the_other_pulls() {
    require_image("drover/base:bookworm");
    let registry = Registry::start();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), &registry.password).unwrap();
    let prefix = format!("{}/envs", registry.addr);
    let up = LocalUp::up(&[
        "--max-nodes",
        "2",
        "--registry",
        &prefix,
        "--registry-username",
        &registry.user,
        "--registry-password-file",
        &secret.path().display().to_string(),
    ]);
    let name = short_name("reg");
    let image = format!("{prefix}/{name}:1");
    let _images = Images(vec![image.clone()]);
    let dir = JobDir::new("");
    let file = context(&dir, "ctx", &name, "from-registry");
    up.cli_ok(&["environment", "create", "-f", &file]);
    let shown = json(&up, &["environment", "show", "-n", &name, "-v", "1"]);
    assert_eq!(shown["image"], image);

    let (markers, logs) = run(
        &up,
        &dir,
        "j.yml",
        &job_yaml(&format!("azureml:{name}@latest"), 2),
    );
    assert_eq!(markers, ["from-registry", "from-registry"], "{logs}");
    let builds = logs.matches("building environment").count();
    assert_eq!(builds, 1, "one build for both nodes:\n{logs}");
    let pushes = registry
        .log()
        .lines()
        .filter(|l| l.contains(&format!("\"PUT /v2/envs/{name}/manifests/1")))
        .count();
    assert_eq!(pushes, 1, "one push:\n{}", registry.log());

    // A new node-local copy is gone: the next job pulls it, not builds it.
    let _ = Command::new("docker")
        .args(["image", "rm", "-f", &image])
        .output();
    let before = registry.manifest_gets(&format!("envs/{name}"));
    let (markers, logs) = run(
        &up,
        &dir,
        "j2.yml",
        &job_yaml(&format!("azureml:{name}:1"), 1),
    );
    assert_eq!(markers, ["from-registry"], "{logs}");
    assert!(logs.contains("pulling environment"), "{logs}");
    assert!(!logs.contains("building environment"), "{logs}");
    assert!(
        registry.manifest_gets(&format!("envs/{name}")) > before,
        "{}",
        registry.log()
    );
}

#[test]
fn a_broken_dockerfile_fails_the_part_and_marks_the_environment_failed() {
    require_image("drover/base:bookworm");
    let up = LocalUp::up(&["--max-nodes", "1"]);
    let name = short_name("broken");
    let _images = Images(vec![format!("drover-env/{name}:1")]);
    let dir = JobDir::new("");
    dir.write(
        "ctx/Dockerfile",
        "FROM drover/base:bookworm\nRUN echo about to fail && exit 3\n",
    );
    dir.write("env.yml", &format!("name: {name}\nbuild:\n  path: ctx\n"));
    up.cli_ok(&[
        "environment",
        "create",
        "-f",
        &dir.path("env.yml").display().to_string(),
    ]);
    dir.write("j.yml", &job_yaml(&format!("azureml:{name}@latest"), 1));
    let job = up.submit(&dir.path("j.yml"), &up.cluster);
    up.wait_job_state(&job, "failed", Duration::from_secs(120));
    let logs = up.cli_ok(&["job", "logs", &job]);
    assert!(logs.contains("building environment"), "{logs}");
    assert!(logs.contains("about to fail"), "the build's output: {logs}");
    assert!(
        logs.contains("returned a non-zero code: 3"),
        "the build's error: {logs}"
    );

    let shown = json(&up, &["environment", "show", "-n", &name, "-v", "1"]);
    assert_eq!(shown["build_state"]["state"], "failed", "{shown}");
    let reason = shown["build_state"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("non-zero code: 3"), "{reason}");
    let text = up.cli_ok(&["environment", "show", "-n", &name, "-v", "1"]);
    assert!(text.contains("failed:"), "{text}");

    // The next job is refused at once, saying why.
    let out = up.cli(&[
        "job",
        "create",
        "-f",
        &dir.path("j.yml").display().to_string(),
        "-c",
        &up.cluster,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("failed to build") && err.contains("non-zero code: 3"),
        "{err}"
    );

    // A conda file on an image without conda fails its first step, saying so.
    dir.write("conda.yml", "name: x\ndependencies:\n  - python=3.10\n");
    dir.write(
        "conda-env.yml",
        &format!("name: {name}-conda\nimage: drover/base:bookworm\nconda_file: conda.yml\n"),
    );
    up.cli_ok(&[
        "environment",
        "create",
        "-f",
        &dir.path("conda-env.yml").display().to_string(),
    ]);
    let _conda_image = Images(vec![format!("drover-env/{name}-conda:1")]);
    dir.write("jc.yml", &job_yaml(&format!("azureml:{name}-conda:1"), 1));
    let job = up.submit(&dir.path("jc.yml"), &up.cluster);
    up.wait_job_state(&job, "failed", Duration::from_secs(120));
    let logs = up.cli_ok(&["job", "logs", &job]);
    assert!(logs.contains("conda_file needs conda or mamba"), "{logs}");
}

#[test]
fn an_inline_build_runs_without_registration_and_bad_definitions_are_refused() {
    require_image("drover/base:bookworm");
    let up = LocalUp::up(&["--max-nodes", "1"]);
    let dir = JobDir::new("");
    let marker = short_name("inline");
    dir.write(
        "ctx/Dockerfile",
        &format!("FROM drover/base:bookworm\nRUN echo {marker} > /env-marker\n"),
    );
    let yaml = "command: echo marker=$(cat /env-marker)\nenvironment:\n  build:\n    path: ./ctx\n";
    dir.write("j.yml", yaml);
    let job = up.submit(&dir.path("j.yml"), &up.cluster);
    up.wait_job_state(&job, "completed", Duration::from_secs(180));
    let shown = up.job(&job);
    let image = shown["spec"]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let _images = Images(vec![image.clone()]);
    assert!(image.starts_with("drover-env/anonymous:"), "{shown}");
    let logs = up.cli_ok(&["job", "logs", &job]);
    assert!(logs.contains(&format!("marker={marker}")), "{logs}");

    // Both image and build, as Azure ML words it.
    dir.write("both.yml", "name: x\nimage: busybox\nbuild:\n  path: ctx\n");
    let out = up.cli(&[
        "environment",
        "create",
        "-f",
        &dir.path("both.yml").display().to_string(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("both.yml:4: build: Docker image or Dockerfile should be provided not both"),
        "{err}"
    );
    // A context without its Dockerfile, before anything is uploaded.
    dir.write(
        "nodf.yml",
        "name: x\nbuild:\n  path: ctx\n  dockerfile_path: gpu.Dockerfile\n",
    );
    let out = up.cli(&[
        "environment",
        "create",
        "-f",
        &dir.path("nodf.yml").display().to_string(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no file gpu.Dockerfile"), "{err}");
    // Curated and registry environments say what to do instead.
    dir.write(
        "curated.yml",
        "command: x\nenvironment: azureml:AzureML-sklearn-1.0-ubuntu20.04-py38-cpu@latest\n",
    );
    let out = up.cli(&[
        "job",
        "create",
        "-f",
        &dir.path("curated.yml").display().to_string(),
        "-c",
        &up.cluster,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("curated environments"));
    assert!(Path::new(&dir.path("ctx")).exists());
}
