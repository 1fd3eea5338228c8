//! The real `drover` binary against an in-process server on a free port:
//! compute, job and node commands, their tables and their errors, and their
//! manners with pipes.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use drover_api::wire;
use drover_control::server::{self, RunningServer, ServerConfig};
use serde_json::json;

struct Cli {
    server: String,
    token: String,
    home: tempfile::TempDir,
}

impl Cli {
    /// Runs `drover ARGS` off the async workers (the server answers on them).
    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_drover"));
        cmd.args(args)
            .env("DROVER_SERVER", &self.server)
            .env("DROVER_TOKEN", &self.token)
            // Never read a real admin token of whoever runs the tests.
            .env("DROVER_DATA_DIR", self.home.path())
            .env_remove("DROVER_LOG");
        tokio::task::spawn_blocking(move || cmd.output().expect("drover runs"))
            .await
            .expect("join")
    }

    /// Runs `drover ARGS` with its stdout a pipe nobody reads any more:
    /// its first write meets a closed pipe.
    async fn run_into_closed_pipe(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        cmd.stdout(closed_pipe()).stderr(Stdio::piped());
        tokio::task::spawn_blocking(move || cmd.output().expect("drover runs"))
            .await
            .expect("join")
    }

    /// Runs `drover ARGS | READER` in bash; the exit status is drover's.
    async fn run_into(&self, reader: &str, args: &[&str]) -> Output {
        let mut cmd = std::process::Command::new("bash");
        cmd.arg("-c")
            .arg(format!(
                "\"$DROVER_BIN\" \"$@\" | {reader} > /dev/null; exit ${{PIPESTATUS[0]}}"
            ))
            .arg("drover")
            .args(args)
            .env("DROVER_BIN", env!("CARGO_BIN_EXE_drover"));
        self.env(&mut cmd);
        tokio::task::spawn_blocking(move || cmd.output().expect("bash runs"))
            .await
            .expect("join")
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_drover"));
        cmd.args(args);
        self.env(&mut cmd);
        cmd
    }

    fn env(&self, cmd: &mut std::process::Command) {
        cmd.env("DROVER_SERVER", &self.server)
            .env("DROVER_TOKEN", &self.token)
            .env("DROVER_DATA_DIR", self.home.path())
            .env_remove("DROVER_LOG");
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "drover {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    async fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert_eq!(out.status.code(), Some(1), "drover {args:?} should fail");
        String::from_utf8(out.stderr).expect("utf-8")
    }
}

/// The write end of a pipe whose read end is already closed.
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) fills both descriptors, which we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors, owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Stdio::from(write)
}

/// A command that met a closed pipe ended as a Unix tool does: status 0
/// (it had written everything before) or 141, and no word on stderr.
fn assert_quiet(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0) | Some(141)),
        "{what}: {:?}, stderr: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert_eq!(stderr, "", "{what}: nothing on stderr");
}

async fn start(dir: &Path) -> (RunningServer, Cli) {
    let mut c = ServerConfig::new(dir.to_path_buf());
    c.listen = "127.0.0.1:0".parse().expect("addr");
    let server = server::start(c).await.expect("server starts");
    let token = server.new_admin_token.clone().expect("first start token");
    let cli = Cli {
        server: format!("http://{}", server.addr),
        token,
        home: tempfile::tempdir().expect("tempdir"),
    };
    (server, cli)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_and_job_commands_over_the_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, cli) = start(dir.path()).await;

    let out = cli
        .ok(&[
            "compute",
            "create",
            "--name",
            "cpu",
            "--vm-size",
            "STANDARD_D3_V2",
            "--min-nodes",
            "0",
            "--max-nodes",
            "2",
            "--vm-priority",
            "lowpriority",
            "--idle-seconds-before-scaledown",
            "120",
            "--assign-identity",
            "[system]",
        ])
        .await;
    assert!(out.starts_with("created cluster cpu\n"), "{out}");
    assert!(out.contains("join token"), "{out}");

    let yml = dir.path().join("compute.yml");
    std::fs::write(
        &yml,
        "type: amlcompute\nname: gpu\nsize: STANDARD_NC6\ntier: dedicated\nmin_instances: 0\nmax_instances: 1\n",
    )
    .expect("write");
    cli.ok(&["compute", "create", "-f", yml.to_str().expect("path")])
        .await;

    let err = cli
        .fails(&[
            "compute",
            "create",
            "--name",
            "bad",
            "--vm-size",
            "X",
            "--min-nodes",
            "3",
            "--max-nodes",
            "1",
        ])
        .await;
    assert!(err.contains("--max-nodes"), "{err}");

    let list = cli.ok(&["compute", "list"]).await;
    assert!(list.starts_with("NAME"), "{list}");
    assert!(list.contains("cpu") && list.contains("gpu"), "{list}");

    let show = cli.ok(&["compute", "show", "cpu"]).await;
    assert!(show.contains("allocation state:"), "{show}");
    assert!(show.contains("system-assigned"), "{show}");
    assert!(show.contains("lowpriority"), "{show}");
    assert!(
        show.contains("azure ml (MSI_ENDPOINT), app service (IDENTITY_ENDPOINT)"),
        "on by default: {show}"
    );

    let updated = cli
        .ok(&["compute", "update", "cpu", "--max-nodes", "3"])
        .await;
    assert!(updated.contains("min 0, max 3"), "{updated}");

    let job = dir.path().join("job.yml");
    std::fs::write(
        &job,
        "command: echo hi\nenvironment:\n  image: busybox:latest\ncompute: azureml:cpu\nresources:\n  instance_count: 1\n",
    )
    .expect("write");
    let out = cli
        .ok(&["job", "create", "-f", job.to_str().expect("path")])
        .await;
    assert!(
        out.starts_with("job job-") && out.contains("queued on cluster cpu"),
        "{out}"
    );
    let id = out.split_whitespace().nth(1).expect("id").to_string();

    let json = cli.ok(&["job", "show", &id, "--json"]).await;
    let info: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(info["state"], "queued");
    let table = cli.ok(&["job", "list", "--compute", "cpu"]).await;
    assert!(table.contains(&id), "{table}");
    let out = cli.ok(&["job", "cancel", &id]).await;
    assert_eq!(out, format!("job {id} is canceled\n"));
    let logs = cli.ok(&["job", "logs", &id, "-f"]).await;
    assert_eq!(logs, "");
    let nodes = cli.ok(&["node", "list"]).await;
    assert!(nodes.starts_with("NODE"), "{nodes}");

    // Errors say what went wrong, with the server's words.
    let big = dir.path().join("big.yml");
    std::fs::write(
        &big,
        "command: echo\nenvironment:\n  image: busybox\nresources:\n  instance_count: 9\n",
    )
    .expect("write");
    let err = cli
        .fails(&[
            "job",
            "create",
            "-f",
            big.to_str().expect("path"),
            "--compute",
            "cpu",
        ])
        .await;
    assert!(err.contains("needs 9 nodes"), "{err}");
    let err = cli
        .fails(&[
            "job",
            "create",
            "-f",
            job.to_str().expect("path"),
            "--compute",
            "nope",
        ])
        .await;
    assert!(err.contains("cluster `nope` not found"), "{err}");
    let bad = dir.path().join("bad.yml");
    std::fs::write(&bad, "command: [\n").expect("write");
    let err = cli
        .fails(&["job", "create", "-f", bad.to_str().expect("path")])
        .await;
    assert!(err.contains("invalid job definition"), "{err}");
    let err = cli.fails(&["compute", "show", "nope"]).await;
    assert!(err.contains("cluster `nope` not found"), "{err}");

    let mut anon = std::process::Command::new(env!("CARGO_BIN_EXE_drover"));
    anon.args(["compute", "list"])
        .env("DROVER_SERVER", &cli.server)
        .env_remove("DROVER_TOKEN")
        .env("DROVER_DATA_DIR", cli.home.path());
    let out = tokio::task::spawn_blocking(move || anon.output().expect("runs"))
        .await
        .expect("join");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing bearer token") && err.contains("DROVER_TOKEN"),
        "{err}"
    );

    server.shutdown();
    tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("stops")
        .expect("clean");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_reported_plainly() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let cli = Cli {
        server: format!("http://127.0.0.1:{port}"),
        token: "t".to_string(),
        home: tempfile::tempdir().expect("tempdir"),
    };
    let err = cli.fails(&["compute", "list"]).await;
    assert!(
        err.contains(&format!(
            "cannot reach the drover server at http://127.0.0.1:{port}: connection refused — is `drover server` running?"
        )),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_binary_prints_its_token_once_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    for first in [true, false] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(["server", "--data-dir"])
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env_remove("DROVER_TOKEN")
            .env("DROVER_LOG", "warn")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("server starts");
        let token_file = data.join(server::ADMIN_TOKEN_FILE);
        // Up when it answers (the token file is written before it listens).
        let start = std::time::Instant::now();
        let token = loop {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "server never answered"
            );
            if let Ok(t) = std::fs::read_to_string(&token_file) {
                let cli = Cli {
                    server: format!("http://127.0.0.1:{port}"),
                    token: t.trim().to_string(),
                    home: tempfile::tempdir().expect("tempdir"),
                };
                if cli.run(&["compute", "list"]).await.status.success() {
                    break cli;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if first {
            token
                .ok(&[
                    "compute",
                    "create",
                    "--name",
                    "cpu",
                    "--vm-size",
                    "D2",
                    "--max-nodes",
                    "1",
                ])
                .await;
        } else {
            // The restarted server still has the cluster.
            let list = token.ok(&["compute", "list"]).await;
            assert!(list.contains("cpu"), "{list}");
        }
        let pid = child.id().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(killed.success());
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().expect("wait"))
            .await
            .expect("join");
        assert!(out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.contains("created the admin api token"),
            first,
            "{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_file_too_large_for_the_server_is_refused_with_its_size_not_a_broken_pipe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, cli) = start(dir.path()).await;
    cli.ok(&[
        "compute",
        "create",
        "--name",
        "cpu",
        "--vm-size",
        "STANDARD_D3_V2",
        "--max-nodes",
        "1",
    ])
    .await;
    // 10 MB of literal inputs: each within its own bound, too large as a whole.
    let mut yaml = String::from("command: echo hi\nimage: busybox\ncompute: cpu\ninputs:\n");
    let value = "v".repeat(100 * 1024);
    for i in 0..100 {
        yaml.push_str(&format!("  in{i}: {value}\n"));
    }
    let file = cli.home.path().join("big.yml");
    std::fs::write(&file, &yaml).expect("write job");
    assert!(yaml.len() > 10_000_000);
    let err = cli
        .fails(&["job", "create", "-f", &file.display().to_string()])
        .await;
    assert!(
        err.contains("the job is 9.8 MiB as JSON; a job may be at most 3.9 MiB (the server accepts requests of at most 4 MiB)"),
        "{err}"
    );
    assert!(!err.to_lowercase().contains("broken pipe"), "{err}");
    server.shutdown();
    server.wait().await.expect("server stops");
}

/// Registers node `n1` of cluster `gpu` as an agent would: a VM from IMDS,
/// two GPUs of which one is unhealthy, an agent version. Returns its
/// credential.
async fn register_gpu_node(cli: &Cli, join: &str) -> String {
    let body = json!({
        "cluster": "gpu", "join_token": join, "node_id": "n1", "ip": "10.0.0.4",
        "gpus": {"healthy": 1, "total": 2},
        "inventory": {
            "collected_at_unix_ms": 1,
            "agent": {"version": "0.1.0-test", "data_dir": "/var/lib/drover-agent"},
            "vm": {"vm_id": "02aab8a4-74ef-476e-8182-f6d2ba4166a6", "name": "vm-gpu-0",
                   "vm_size": "Standard_ND96asr_v4", "priority": "Spot", "location": "westeurope"},
            "host": {"hostname": "vm-gpu-0", "os": "Debian GNU/Linux 12 (bookworm)",
                     "logical_cores": 96, "memory_total_bytes": 1_000_000_000_000u64},
            "driver": {"driver_version": "550.54.15", "cuda_version": "12.4"},
            "gpus": [
                {"index": 0, "name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-0aa",
                 "memory": {"total_bytes": 85_899_345_920u64, "used_bytes": 0, "free_bytes": 85_899_345_920u64},
                 "health": {"state": "healthy"}},
                {"index": 1, "name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-1bb",
                 "health": {"state": "unhealthy", "reason": "xid 79", "since_unix_ms": 1,
                            "last_event_unix_ms": 1, "recovers_at_unix_ms": 4_000_000_000_000u64}}
            ]
        }
    });
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/agent/register", cli.server))
        .json(&body)
        .send()
        .await
        .expect("register");
    assert_eq!(resp.status(), reqwest::StatusCode::CREATED);
    let r: wire::RegisterResponse = resp.json().await.expect("registered");
    r.credential
}

async fn agent_post(cli: &Cli, cred: &str, path: &str, body: serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", cli.server))
        .bearer_auth(cred)
        .json(&body)
        .send()
        .await
        .expect("agent call");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert!(status.is_success(), "{path}: {status} {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_show_and_list_give_the_vm_the_gpus_and_the_part_it_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, cli) = start(dir.path()).await;
    let created = cli
        .ok(&[
            "compute",
            "create",
            "--name",
            "gpu",
            "--vm-size",
            "ND96",
            "--max-nodes",
            "1",
        ])
        .await;
    let join = created
        .lines()
        .last()
        .expect("join token")
        .trim()
        .to_string();
    let cred = register_gpu_node(&cli, &join).await;
    let job = dir.path().join("job.yml");
    std::fs::write(
        &job,
        "name: train\ncommand: python train.py\nenvironment:\n  image: busybox\ncompute: gpu\n\
         distribution: {type: pytorch, process_count_per_instance: 3}\n",
    )
    .expect("write");
    cli.ok(&["job", "create", "-f", job.to_str().expect("path")])
        .await;
    agent_post(
        &cli,
        &cred,
        "/v1/agent/heartbeat",
        json!({"parts": [{"job": "train", "attempt": 1, "node_rank": 0, "state": "running"}]}),
    )
    .await;

    let text = cli.ok(&["node", "show", "n1"]).await;
    for want in [
        "node:           n1\n",
        "compute:        gpu\n",
        "state:          running\n",
        "address:        10.0.0.4\n",
        "vm name:        vm-gpu-0\n",
        "vm size:        Standard_ND96asr_v4\n",
        "vm id:          02aab8a4-74ef-476e-8182-f6d2ba4166a6\n",
        "priority:       Spot\n",
        "job:            train (attempt 1, node rank 0, running",
        "heartbeat:      ",
        "agent:          0.1.0-test\n",
        "host:           vm-gpu-0, Debian GNU/Linux 12 (bookworm), 96 cpus, 931.3 GiB memory\n",
        "driver:         550.54.15 (cuda 12.4)\n",
        "gpus:           1 of 2 healthy\n",
        "GPU-0aa",
        "80.0 GiB",
        "unhealthy: xid 79",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    // The same facts, as JSON, for one node and in the list.
    let one: serde_json::Value =
        serde_json::from_str(&cli.ok(&["node", "show", "n1", "--json"]).await).expect("json");
    let list: serde_json::Value =
        serde_json::from_str(&cli.ok(&["node", "list", "--json"]).await).expect("one document");
    assert_eq!(list["nodes"][0], one);
    assert_eq!(one["vm"]["name"], "vm-gpu-0");
    assert_eq!(one["vm"]["vm_size"], "Standard_ND96asr_v4");
    assert_eq!(one["vm"]["priority"], "Spot");
    assert_eq!(one["agent_version"], "0.1.0-test");
    assert_eq!(one["current_job"], "train");
    assert_eq!(one["current_part"]["job"], "train");
    assert_eq!(one["current_part"]["node_rank"], 0);
    assert_eq!(one["current_part"]["state"], "running");
    assert_eq!(one["inventory"]["driver_version"], "550.54.15");
    assert_eq!(one["inventory"]["gpus"][0]["health"]["state"], "healthy");
    assert_eq!(one["inventory"]["gpus"][1]["health"]["state"], "unhealthy");
    assert_eq!(one["inventory"]["gpus"][1]["health"]["reason"], "xid 79");
    assert_eq!(
        (one["healthy_gpus"].as_u64(), one["total_gpus"].as_u64()),
        (Some(1), Some(2))
    );

    // The table stays short: one line a node, the columns of before.
    let table = cli.ok(&["node", "list"]).await;
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows[0].starts_with("NODE") && rows[0].ends_with("JOB"),
        "{table}"
    );
    assert!(rows[1].contains("n1") && rows[1].contains("1/2"), "{table}");
    assert!(!table.contains("Standard_ND96asr_v4"), "{table}");

    let err = cli.fails(&["node", "show", "nope"]).await;
    assert!(
        err.contains("cannot show node nope") && err.contains("not found"),
        "{err}"
    );

    server.shutdown();
    server.wait().await.expect("server stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_say_which_process_wrote_each_line_and_closed_pipes_end_commands_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, cli) = start(dir.path()).await;
    let created = cli
        .ok(&[
            "compute",
            "create",
            "--name",
            "gpu",
            "--vm-size",
            "ND96",
            "--max-nodes",
            "1",
        ])
        .await;
    let join = created
        .lines()
        .last()
        .expect("join token")
        .trim()
        .to_string();
    let cred = register_gpu_node(&cli, &join).await;
    let job = dir.path().join("job.yml");
    std::fs::write(
        &job,
        "name: ranks\ncommand: python train.py\nenvironment:\n  image: busybox\ncompute: gpu\n\
         distribution: {type: pytorch, process_count_per_instance: 3}\n",
    )
    .expect("write");
    cli.ok(&["job", "create", "-f", job.to_str().expect("path")])
        .await;
    agent_post(
        &cli,
        &cred,
        "/v1/agent/heartbeat",
        json!({"parts": [{"job": "ranks", "attempt": 1, "node_rank": 0, "state": "running"}]}),
    )
    .await;
    // Lines of each rank, one of drover-init's own, and enough of them
    // (about 1 MB) that a reader who stops early closes a full pipe.
    let line = |rank: Option<u32>, text: String| {
        json!({"job": "ranks", "attempt": 1, "node_rank": 0, "stream": "stdout", "at": 1,
               "text": text, "rank": rank})
    };
    let mut lines = vec![
        line(Some(0), "hello from 0".into()),
        line(Some(2), "hello from 2".into()),
        line(None, "drover-init: rank 1 exited with code 3".into()),
    ];
    lines.extend((0..10_000).map(|i| line(Some(i % 3), format!("{i:05} {}", "x".repeat(100)))));
    for chunk in lines.chunks(2_000) {
        agent_post(&cli, &cred, "/v1/agent/logs", json!({ "lines": chunk })).await;
    }

    let text = cli.ok(&["job", "logs", "ranks"]).await;
    let first: Vec<&str> = text.lines().take(4).collect();
    assert_eq!(
        first,
        [
            "[node 0 rank 0] hello from 0",
            "[node 0 rank 2] hello from 2",
            "[node 0] drover-init: rank 1 exited with code 3",
            &format!("[node 0 rank 0] 00000 {}", "x".repeat(100)),
        ]
    );
    assert_eq!(text.lines().count(), 10_003, "every line");
    // --json: one document a line, the rank a field of its own.
    let json_lines = cli.ok(&["job", "logs", "ranks", "--json"]).await;
    let docs: Vec<serde_json::Value> = json_lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON document a line"))
        .collect();
    assert_eq!(docs.len(), 10_003);
    assert_eq!(
        (docs[1]["rank"].as_u64(), docs[1]["text"].as_str()),
        (Some(2), Some("hello from 2"))
    );
    assert!(docs[2]["rank"].is_null(), "{}", docs[2]);

    // Closed pipes: a reader that has enough ends the command, quietly.
    for args in [
        &["job", "logs", "ranks"][..],
        &["job", "logs", "ranks", "--json"],
        &["job", "list", "--json"],
        &["job", "list"],
        &["job", "show", "ranks"],
        &["job", "show", "ranks", "--json"],
        &["node", "list", "--json"],
        &["node", "list"],
        &["node", "show", "n1"],
        &["compute", "list"],
        &["compute", "list", "--json"],
        &["completion", "bash"],
        &["--help"],
    ] {
        let out = cli.run_into_closed_pipe(args).await;
        assert_quiet(&out, &format!("drover {args:?} > closed pipe"));
    }
    let out = cli.run_into("head -1", &["job", "logs", "ranks"]).await;
    assert_quiet(&out, "drover job logs ranks | head -1");
    assert_eq!(out.status.code(), Some(141), "the pipe closed mid-log");
    let out = cli.run_into("head -c1", &["job", "list", "--json"]).await;
    assert_quiet(&out, "drover job list --json | head -c1");
    let out = cli
        .run_into("head -c1", &["job", "logs", "ranks", "--json"])
        .await;
    assert_quiet(&out, "drover job logs ranks --json | head -c1");

    // Errors still go to stderr with a status, whatever stdout is.
    let out = cli.run_into_closed_pipe(&["job", "logs", "nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("job `nope` not found"));

    server.shutdown();
    server.wait().await.expect("server stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_scripts_for_bash_zsh_and_fish() {
    let cli = Cli {
        server: "http://127.0.0.1:9".to_string(),
        token: "t".to_string(),
        home: tempfile::tempdir().expect("tempdir"),
    };
    for (shell, mark) in [
        ("bash", "complete -F _drover"),
        ("zsh", "#compdef drover"),
        ("fish", "complete -c drover"),
    ] {
        let script = cli.ok(&["completion", shell]).await;
        assert!(script.contains(mark), "{shell}: {script}");
        for command in ["compute", "job", "node", "completion"] {
            assert!(script.contains(command), "{shell} misses {command}");
        }
    }
    let err = cli.run(&["completion", "tcsh"]).await;
    assert_eq!(err.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&err.stderr).contains("invalid value"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_cli_v2_spellings_round_trip_through_show() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, cli) = start(dir.path()).await;
    let uai = "/subscriptions/00000000-1111-2222-3333-444444444444/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/trainer";
    // az ml compute create -n gpu --type amlcompute --size … --min-instances …
    cli.ok(&[
        "compute",
        "create",
        "-n",
        "gpu",
        "--type",
        "amlcompute",
        "--size",
        "STANDARD_NC6",
        "--min-instances",
        "1",
        "--max-instances",
        "3",
        "--tier",
        "low_priority",
        "--idle-time-before-scale-down",
        "300",
        "--identity-type",
        "UserAssigned",
        "--user-assigned-identities",
        uai,
        "--location",
        "westeurope",
        "--tags",
        "team=ml",
        "stage=dev",
        "--description",
        "v2 flags",
        "--app-service-identity",
        "false",
    ])
    .await;
    let show: serde_json::Value =
        serde_json::from_str(&cli.ok(&["compute", "show", "-n", "gpu", "--json"]).await)
            .expect("json");
    let spec = &show["spec"];
    assert_eq!(spec["vm_size"], "STANDARD_NC6");
    assert_eq!(
        (spec["min_nodes"].as_u64(), spec["max_nodes"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(spec["vm_priority"], "lowpriority");
    assert_eq!(spec["idle_seconds_before_scaledown"], 300);
    assert_eq!(spec["identity"]["type"], "user-assigned");
    assert_eq!(spec["identity"]["resource_ids"][0], uai);
    assert_eq!(spec["location"], "westeurope");
    assert_eq!(spec["tags"]["team"], "ml");
    assert_eq!(spec["tags"]["stage"], "dev");
    assert_eq!(spec["description"], "v2 flags");
    assert_eq!(spec["provider"], "static", "the control plane's default");
    assert_eq!(spec["app_service_identity"], false);
    let text = cli.ok(&["compute", "show", "-n", "gpu"]).await;
    assert!(
        text.contains("identity protocols:     azure ml (MSI_ENDPOINT)\n"),
        "{text}"
    );

    // Azure's defaults where Azure has them.
    cli.ok(&["compute", "create", "-n", "plain", "--type", "amlcompute"])
        .await;
    let plain: serde_json::Value =
        serde_json::from_str(&cli.ok(&["compute", "show", "plain", "--json"]).await).expect("json");
    assert_eq!(plain["spec"]["vm_size"], "STANDARD_DS3_V2");
    assert_eq!(
        (
            plain["spec"]["min_nodes"].as_u64(),
            plain["spec"]["max_nodes"].as_u64()
        ),
        (Some(0), Some(4))
    );
    assert_eq!(plain["spec"]["idle_seconds_before_scaledown"], 120);

    // Microsoft's YAML unchanged, with --set and flags as overrides.
    let yml = dir.path().join("cluster-basic.yml");
    std::fs::write(
        &yml,
        "$schema: https://azuremlschemas.azureedge.net/latest/amlCompute.schema.json\nname: basic-example\ntype: amlcompute\nsize: STANDARD_DS3_v2\nmin_instances: 0\nmax_instances: 2\nidle_time_before_scale_down: 120\n",
    )
    .expect("write");
    let file = yml.to_str().expect("path");
    cli.ok(&[
        "compute",
        "create",
        "-f",
        file,
        "--set",
        "max_instances=5",
        "--provider",
        "static",
    ])
    .await;
    let basic: serde_json::Value = serde_json::from_str(
        &cli.ok(&["compute", "show", "-n", "basic-example", "--json"])
            .await,
    )
    .expect("json");
    assert_eq!(basic["spec"]["max_nodes"], 5);
    let err = cli
        .fails(&[
            "compute",
            "create",
            "-f",
            file,
            "-n",
            "other",
            "--set",
            "max_instances=zero",
        ])
        .await;
    assert!(
        err.contains("max_instances (--set): expected a positive integer, got zero"),
        "{err}"
    );
    let err = cli
        .fails(&[
            "compute",
            "create",
            "-n",
            "x",
            "--max-instances",
            "0",
            "--tier",
            "spot",
        ])
        .await;
    assert!(
        err.contains("--max-instances: must be at least 1, got 0")
            && err.contains("--tier: expected dedicated or low_priority, got spot"),
        "v2 names in v2 messages: {err}"
    );

    // update and delete with -n, v2 spellings.
    let up = cli
        .ok(&[
            "compute",
            "update",
            "-n",
            "gpu",
            "--max-instances",
            "6",
            "--idle-time-before-scale-down",
            "60",
        ])
        .await;
    assert!(up.contains("min 1, max 6"), "{up}");
    let gone = cli.ok(&["compute", "delete", "-n", "plain", "--yes"]).await;
    assert!(gone.ends_with("deleted cluster plain\n"), "{gone}");

    // Jobs: -f with --set and -n; show, cancel with -n; --web refused.
    let job = dir.path().join("job.yml");
    std::fs::write(
        &job,
        "command: echo hi\nenvironment:\n  image: busybox:latest\n",
    )
    .expect("write");
    let jf = job.to_str().expect("path");
    cli.ok(&[
        "job",
        "create",
        "-f",
        jf,
        "-n",
        "mine",
        "--set",
        "compute=azureml:gpu",
        "--set",
        "resources.instance_count=2",
    ])
    .await;
    let info: serde_json::Value =
        serde_json::from_str(&cli.ok(&["job", "show", "-n", "mine", "--json"]).await)
            .expect("json");
    assert_eq!(info["cluster"], "gpu");
    assert_eq!(info["instance_count"], 2);
    let out = cli.ok(&["job", "cancel", "-n", "mine"]).await;
    assert_eq!(out, "job mine is canceled\n");
    let err = cli
        .fails(&["job", "create", "-f", jf, "--compute", "gpu", "--web"])
        .await;
    assert!(
        err.contains("--web opens Azure ML studio, which Drover does not have"),
        "{err}"
    );
    let err = cli.fails(&["job", "show", "-n", "mine", "--web"]).await;
    assert!(err.contains("--web"), "{err}");
    server.shutdown();
    server.wait().await.expect("server stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_jobs_stream_says_why_within_two_seconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, cli) = start(dir.path()).await;
    cli.ok(&["compute", "create", "-n", "cpu", "--max-instances", "1"])
        .await;
    let job = dir.path().join("job.yml");
    std::fs::write(
        &job,
        "command: echo hi\nenvironment:\n  image: busybox:latest\ncompute: cpu\n",
    )
    .expect("write");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_drover"));
    cmd.args([
        "job",
        "create",
        "-f",
        job.to_str().expect("path"),
        "--stream",
    ])
    .env("DROVER_SERVER", &cli.server)
    .env("DROVER_TOKEN", &cli.token)
    .env("DROVER_DATA_DIR", cli.home.path())
    .env_remove("DROVER_LOG")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    let started = std::time::Instant::now();
    let mut child = cmd.spawn().expect("drover runs");
    let stderr = child.stderr.take().expect("stderr");
    let first = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("queued:"))
    });
    let line = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("a reason in time")
        .expect("join")
        .expect("a queued: line");
    let took = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        took < Duration::from_secs(2),
        "the reason came after {took:?}"
    );
    assert!(
        line.contains("cluster cpu cannot reach 1 node: the static provider cannot create nodes: start drover-agent with the join token of cluster cpu on 1 more machine(s): drover-agent run --server http://127.0.0.1:"),
        "{line}"
    );
    server.shutdown();
    server.wait().await.expect("server stops");
}
