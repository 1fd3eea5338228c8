//! The real `drover` binary against an in-process server on a free port:
//! compute and job commands, their tables and their errors.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use drover_control::server::{self, RunningServer, ServerConfig};

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
