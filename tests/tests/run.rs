//! `drover run` end to end: the real CLI, a real Docker engine, drover-init.

use std::time::Duration;

use drover_tests::{
    BASE_IMAGE, JobDir, RANKS_COMMAND, check_ranks_output, containers_of_job, drover_run,
    drover_run_spawn, unique_name, wait_until,
};

fn job(command: &str, extra: &str) -> JobDir {
    JobDir::new(&format!(
        "command: {command}\nenvironment:\n  image: {BASE_IMAGE}\n{extra}"
    ))
}

#[test]
fn a_job_prints_and_exits_zero() {
    let j = job("echo hello-from-drover", "");
    let name = unique_name("hello");
    let r = drover_run(&j, &name, &[]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert!(
        r.stdout.contains("hello-from-drover"),
        "stdout: {}",
        r.stdout
    );
    assert!(r.stderr.contains("completed"), "stderr: {}", r.stderr);
    assert!(containers_of_job(&name).is_empty(), "container left behind");
}

#[test]
fn exit_code_propagates() {
    let j = job("'echo failing >&2; exit 3'", "");
    let r = drover_run(&j, &unique_name("exit3"), &[]);
    assert_eq!(r.code, Some(3), "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("failing"),
        "job stderr is streamed: {}",
        r.stderr
    );
    assert!(r.stderr.contains("failed with exit code 3"), "{}", r.stderr);
}

#[test]
fn a_job_past_its_timeout_is_stopped_and_reported() {
    let j = job("sleep 300", "limits:\n  timeout: 2\n");
    let name = unique_name("timeout");
    let r = drover_run(&j, &name, &["--stop-grace", "1"]);
    assert_eq!(r.code, Some(124), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("timed out after 2s"), "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(30), "took {:?}", r.elapsed);
    assert!(containers_of_job(&name).is_empty(), "container left behind");
}

#[test]
fn a_job_over_its_memory_limit_is_reported_oom_killed() {
    // `tail` (last 10 lines) keeps a newline-free input in memory: 400 MiB against 64 MiB.
    let j = job(
        "'head -c 400m /dev/zero | tail > /dev/null'",
        "resources:\n  docker_args: --memory 64m --memory-swap 64m\n",
    );
    let r = drover_run(&j, &unique_name("oom"), &[]);
    assert_eq!(r.code, Some(137), "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("running out of memory"),
        "expected an OOM report: {}",
        r.stderr
    );
}

#[test]
fn privileged_docker_args_are_refused_before_anything_runs() {
    let j = job(
        "echo should-not-run",
        "resources:\n  docker_args: --privileged\n",
    );
    let name = unique_name("priv");
    let r = drover_run(&j, &name, &[]);
    assert_eq!(r.code, Some(125), "stderr: {}", r.stderr);
    assert!(
        r.stderr
            .contains("job.yml:5: resources.docker_args: --privileged is not allowed"),
        "{}",
        r.stderr
    );
    assert!(!r.stdout.contains("should-not-run"));
    assert!(containers_of_job(&name).is_empty());
}

#[test]
fn malformed_yaml_names_file_and_line() {
    let j = JobDir::new(
        "command: echo hi\nresources:\n  instance_count: -1\nenvironment: {image: x}\n",
    );
    let r = drover_run(&j, &unique_name("bad"), &[]);
    assert_eq!(r.code, Some(125));
    assert!(
        r.stderr
            .contains("job.yml:3: resources.instance_count: expected a positive integer, got -1"),
        "{}",
        r.stderr
    );
}

#[test]
fn env_mounts_inputs_outputs_and_shm_are_visible_inside() {
    let j = job(
        r#"'echo "foo=$FOO"; cat code.txt; cat ${{inputs.data}}/d.txt; cat ${{inputs.one}}; echo "lr=${{inputs.lr}}"; cat /extra/e.txt; df -k /dev/shm | tail -1; ulimit -l; touch /extra/x 2>/dev/null || echo extra-is-ro; echo result > ${{outputs.model}}/m.txt; pwd'"#,
        r#"code: ./src
environment_variables:
  FOO: bar baz
inputs:
  lr: 0.01
  data:
    type: uri_folder
    path: ./data
  one:
    type: uri_file
    path: ./one.txt
outputs:
  model:
    type: uri_folder
    path: ./out
resources:
  shm_size: 256m
drover:
  mounts:
    - ./extra:/extra:ro
"#,
    );
    j.write("src/code.txt", "code-visible\n");
    j.write("data/d.txt", "folder-input-visible\n");
    j.write("one.txt", "file-input-visible\n");
    j.write("extra/e.txt", "mount-visible\n");
    let r = drover_run(&j, &unique_name("env"), &[]);
    assert_eq!(
        r.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    for expect in [
        "foo=bar baz",
        "code-visible",
        "folder-input-visible",
        "file-input-visible",
        "lr=0.01",
        "mount-visible",
        "extra-is-ro",
        "/drover/code",
    ] {
        assert!(
            r.stdout.contains(expect),
            "missing {expect:?} in:\n{}",
            r.stdout
        );
    }
    // df -k: 256 MiB of shm is 262144 KiB.
    assert!(r.stdout.contains(" 262144 "), "shm size:\n{}", r.stdout);
    // memlock: unlimited where the host can grant it, else the host's hard limit.
    let host = drover_runner::part::HostFacts::probe();
    let expect_memlock = if host.memlock_max < 0 {
        "unlimited".to_string()
    } else {
        (host.memlock_max / 1024).to_string()
    };
    assert!(
        r.stdout.lines().any(|l| l.trim() == expect_memlock),
        "memlock {expect_memlock}:\n{}",
        r.stdout
    );
    assert_eq!(
        std::fs::read_to_string(j.path("out/m.txt")).unwrap_or_default(),
        "result\n",
        "output folder kept after the job"
    );
}

#[test]
fn the_working_directory_is_a_copy_of_the_code_with_outputs_and_logs_as_on_azure_ml() {
    // Azure ML's hello-world-output, with code whose .amlignore leaves a file out.
    let j = job(
        r#"'ls; test -e secret.txt && echo secret-visible; echo "hello world" > ./outputs/helloworld.txt; echo step1 > ./logs/train.log; echo scratch > scratch.txt'"#,
        "code: src\n",
    );
    j.write("src/train.py", "print('hi')\n");
    j.write("src/secret.txt", "keep out\n");
    j.write("src/.amlignore", "secret.txt\n");
    let name = unique_name("artifacts");
    let r = drover_run(&j, &name, &[]);
    assert_eq!(
        r.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert!(r.stdout.contains("train.py"), "{}", r.stdout);
    assert!(!r.stdout.contains("secret-visible"), "{}", r.stdout);
    let artifacts = j.path(&format!("outputs/{name}/artifacts"));
    assert_eq!(
        std::fs::read_to_string(artifacts.join("outputs/helloworld.txt")).unwrap_or_default(),
        "hello world\n"
    );
    assert_eq!(
        std::fs::read_to_string(artifacts.join("logs/train.log")).unwrap_or_default(),
        "step1\n"
    );
    assert!(
        r.stderr.contains("artifacts (./outputs and ./logs)"),
        "{}",
        r.stderr
    );
    // The user's folder is as it was; the copy is gone.
    assert!(!j.path("src/scratch.txt").exists());
    assert!(!j.path("src/outputs").exists());
    assert!(!j.path(&format!("outputs/{name}/.work")).exists());

    // Without code the job still has ./outputs, as on Azure ML.
    let j = job(r#"'echo "hello world" > ./outputs/helloworld.txt'"#, "");
    let name = unique_name("nocode");
    let r = drover_run(&j, &name, &[]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert!(
        j.path(&format!("outputs/{name}/artifacts/outputs/helloworld.txt"))
            .is_file()
    );
}

#[test]
fn a_missing_code_folder_names_its_line() {
    let j = job("echo", "code: ./nope\n");
    let r = drover_run(&j, &unique_name("nocode"), &[]);
    assert_eq!(r.code, Some(125), "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("job.yml:4: code: code folder")
            && r.stderr.contains("nope does not exist"),
        "{}",
        r.stderr
    );
}

#[test]
fn three_local_ranks_get_rank_variables() {
    let j = job(
        r#"'echo "rank=$RANK local=$LOCAL_RANK world=$WORLD_SIZE"'"#,
        "distribution:\n  type: pytorch\n  process_count_per_instance: 3\n",
    );
    let r = drover_run(&j, &unique_name("ranks"), &[]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    let mut lines: Vec<&str> = r.stdout.lines().filter(|l| l.contains("rank=")).collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "[node 0 rank 0] rank=0 local=0 world=3",
            "[node 0 rank 1] rank=1 local=1 world=3",
            "[node 0 rank 2] rank=2 local=2 world=3"
        ]
    );
}

#[test]
fn each_line_of_a_multi_process_job_says_its_rank_and_none_is_lost() {
    let j = job(
        RANKS_COMMAND,
        "distribution:\n  type: pytorch\n  process_count_per_instance: 3\n",
    );
    let r = drover_run(&j, &unique_name("ranklines"), &[]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    check_ranks_output(&r.stdout, &r.stderr);
}

#[test]
fn a_single_process_job_prints_its_lines_unprefixed() {
    let j = job("'echo one; echo two >&2'", "");
    let r = drover_run(&j, &unique_name("plain"), &[]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(r.stdout, "one\n");
    assert!(r.stderr.starts_with("two\n"), "{}", r.stderr);
}

#[test]
fn closing_the_output_stops_the_job_removes_its_container_and_exits_141() {
    use std::io::BufRead;
    let j = job("'while true; do echo tick; sleep 0.1; done'", "");
    let name = unique_name("epipe");
    let mut child = drover_run_spawn(&j, &name);
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("a first line");
    assert_eq!(first, "tick\n");
    // What `| head -1` does once it has its line.
    drop(stdout);
    let out = child.wait_with_output().expect("wait drover");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "stderr: {stderr}");
    assert!(stderr.contains("its output was closed"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(containers_of_job(&name).is_empty(), "container left behind");
}

#[test]
fn one_failing_rank_fails_the_part_and_stops_the_others() {
    let j = job(
        r#"'if [ "$RANK" = 1 ]; then exit 7; fi; sleep 300'"#,
        "distribution:\n  type: pytorch\n  process_count_per_instance: 3\n",
    );
    let r = drover_run(&j, &unique_name("rankfail"), &[]);
    assert_eq!(r.code, Some(7), "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("rank 1 exited with code 7"),
        "{}",
        r.stderr
    );
    assert!(
        r.elapsed < Duration::from_secs(60),
        "others were not stopped: {:?}",
        r.elapsed
    );
}

#[test]
fn a_failing_ranks_last_words_come_before_its_exit_is_reported() {
    let j = job(
        r#"'if [ "$RANK" = 1 ]; then seq 1 2000 | sed "s/^/r1 /" >&2; echo "r1 last words" >&2; exit 3; fi; sleep 300'"#,
        "distribution:\n  type: pytorch\n  process_count_per_instance: 3\n",
    );
    let r = drover_run(&j, &unique_name("lastwords"), &["--stop-grace", "1"]);
    assert_eq!(r.code, Some(3), "stderr: {}", r.stderr);
    let last = r
        .stderr
        .find("[node 0 rank 1] r1 last words\n")
        .expect("the rank's last line");
    let reported = r
        .stderr
        .find("[node 0] drover-init: rank 1 exited with code 3")
        .expect("drover-init's report, on the node's own line");
    assert!(last < reported, "{}", r.stderr);
    let numbered = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("[node 0 rank 1] r1 ") && !l.ends_with("last words"))
        .count();
    assert_eq!(numbered, 2000, "{}", r.stderr);
}

#[test]
fn ctrl_c_stops_the_job_and_leaves_no_container() {
    let j = job("sleep 300", "");
    let name = unique_name("cancel");
    let child = drover_run_spawn(&j, &name);
    let running = wait_until(Duration::from_secs(30), || {
        !containers_of_job(&name).is_empty()
    });
    assert!(running, "job container never appeared");
    // The part is found on the engine by its labels (what an agent re-adopts).
    let parts = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let rt = std::sync::Arc::new(
                drover_runner::DockerRuntime::connect()
                    .await
                    .expect("docker"),
            );
            let runner = drover_runner::PartRunner::new(
                rt,
                drover_runner::PullLimits::default(),
                drover_runner::RunOptions::default(),
                drover_runner::HostFacts::default(),
            );
            runner.list_parts(Some("run")).await.expect("list parts")
        });
    let ours: Vec<_> = parts.iter().filter(|p| p.part.job == name).collect();
    assert_eq!(ours.len(), 1, "{parts:?}");
    assert_eq!((ours[0].part.node_rank, ours[0].part.attempt), (0, 1));
    // Give drover a moment to start supervising, then interrupt it like Ctrl-C.
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id() as i32;
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("wait drover");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "stderr: {stderr}");
    assert!(stderr.contains("canceled"), "{stderr}");
    assert!(containers_of_job(&name).is_empty(), "container left behind");
}

#[test]
fn open_mpi_and_mpi4py_run_inside_a_job() {
    const IMAGE: &str = "drover/openmpi:bookworm";
    let present = std::process::Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        present,
        "this test needs {IMAGE}; build it with `images/build-offline.sh`"
    );
    // A real MPI allreduce over 3 ranks on one node, launched by Open MPI's
    // own mpirun under drover-init, written as Azure ML's YAML writes it: no
    // -np (the hostfile has the slots), no run-as-root flags (drover-init
    // sets them for a root image); and the Azure SDK that job code uses.
    let j = JobDir::new(&format!(
        r#"command: >-
  mpirun
  python3 -c "from mpi4py import MPI; c = MPI.COMM_WORLD; s = c.allreduce(c.Get_rank()); print(f'mpi rank {{c.Get_rank()}} of {{c.Get_size()}} sum {{s}}')"
  && python3 -c "import azure.identity; print('azure-identity', azure.identity.__name__)"
environment:
  image: {IMAGE}
distribution:
  type: mpi
  process_count_per_instance: 3
"#
    ));
    let r = drover_run(&j, &unique_name("mpi"), &[]);
    assert_eq!(
        r.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    let mut ranks: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("mpi rank"))
        .collect();
    ranks.sort();
    assert_eq!(
        ranks,
        vec![
            "mpi rank 0 of 3 sum 3",
            "mpi rank 1 of 3 sum 3",
            "mpi rank 2 of 3 sum 3"
        ]
    );
    assert!(
        r.stdout.contains("azure-identity azure.identity"),
        "{}",
        r.stdout
    );
}

#[test]
fn an_inline_build_environment_is_built_here_and_a_registered_one_needs_a_cluster() {
    let marker = unique_name("built-here");
    let j = JobDir::new(
        "command: cat /env-marker\nenvironment:\n  build:\n    path: ./ctx\n    dockerfile_path: run.Dockerfile\n",
    );
    j.write(
        "ctx/run.Dockerfile",
        &format!("FROM {BASE_IMAGE}\nRUN echo {marker} > /env-marker\n"),
    );
    let r = drover_run(&j, &unique_name("inline-env"), &[]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert!(r.stdout.contains(&marker), "{}", r.stdout);
    assert!(
        r.stderr
            .contains("building environment drover-env/anonymous:"),
        "{}",
        r.stderr
    );
    let image = r
        .stderr
        .split("building environment ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    // The same context again: found, not built.
    let again = drover_run(&j, &unique_name("inline-env"), &[]);
    assert_eq!(again.code, Some(0), "stderr: {}", again.stderr);
    assert!(
        !again.stderr.contains("building environment"),
        "{}",
        again.stderr
    );
    let _ = std::process::Command::new("docker")
        .args(["image", "rm", "-f", &image])
        .output();

    let registered = JobDir::new("command: echo\nenvironment: azureml:trainer@latest\n");
    let r = drover_run(&registered, &unique_name("registered"), &[]);
    assert_eq!(r.code, Some(125), "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("needs a control plane to resolve"),
        "{}",
        r.stderr
    );
}
