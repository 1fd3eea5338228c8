//! A real cluster on this machine: one `drover server` process and two
//! `drover-agent run` processes as distinct nodes (both on this Docker
//! engine; the `drover.owner` label keeps their containers apart), driven
//! through the `drover` CLI.

use std::time::Duration;

use drover_tests::cluster::{Cluster, parts};
use drover_tests::{
    AgentProc, RANKS_COMMAND, ServerProc, check_ranks_output, containers_of_job, require_docker,
    unique_name, wait_until,
};

#[test]
fn a_job_runs_and_its_logs_and_exit_code_reach_job_show_and_logs() {
    let c = Cluster::start(40);
    let job = c.submit("echo hello-from-a-node; echo to-stderr >&2; exit 3", 1);
    c.server
        .wait_job_state(&job, "failed", Duration::from_secs(60));
    let info = c.server.job(&job);
    let p = parts(&info);
    assert_eq!(p.len(), 1, "{info}");
    assert_eq!(p[0]["exit_code"], 3, "{info}");
    assert_eq!(p[0]["state"], "failed", "{info}");
    let logs = c.logs(&job);
    assert!(logs.contains("hello-from-a-node"), "{logs}");
    assert!(logs.contains("to-stderr"), "{logs}");
    let show = c.server.cli_ok(&["job", "show", &job]);
    assert!(show.contains("failed"), "{show}");

    let ok = c.submit("echo fine", 1);
    c.server
        .wait_job_state(&ok, "completed", Duration::from_secs(60));
    assert_eq!(parts(&c.server.job(&ok))[0]["exit_code"], 0);
    c.assert_no_containers(&job);
    c.assert_no_containers(&ok);
}

#[test]
fn a_two_instance_job_waits_for_both_nodes_then_starts_on_both() {
    let c = Cluster::start(40);
    // One node busy: the gang job must wait for it, not start half.
    let blocker = c.submit("sleep 3", 1);
    c.server
        .wait_job_state(&blocker, "running", Duration::from_secs(90));
    let job = c.submit("sleep 1; echo rank-$NODE_RANK-of-$WORLD_SIZE", 2);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.server.job_state(&job), "queued");
    assert!(containers_of_job(&job).is_empty(), "no part starts alone");
    c.server
        .wait_job_state(&job, "completed", Duration::from_secs(90));
    let blocked = c.server.job(&blocker);
    assert_eq!(blocked["state"], "completed", "{blocked}");
    let info = c.server.job(&job);
    let (started, freed) = (info["started_at"].as_u64(), blocked["ended_at"].as_u64());
    assert!(
        started.is_some() && freed.is_some() && started >= freed,
        "started only once both nodes were free: {info} {blocked}"
    );
    let p = parts(&info);
    assert_eq!(p.len(), 2, "{info}");
    let mut nodes: Vec<&str> = p.iter().filter_map(|x| x["node"].as_str()).collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 2, "one part per node: {info}");
    let logs = c.logs(&job);
    // One process a node: each line says its node, not a rank.
    for line in ["[node 0] rank-0-of-2", "[node 1] rank-1-of-2"] {
        assert!(logs.lines().any(|l| l == line), "{line} missing: {logs}");
    }
    c.assert_no_containers(&job);
    c.assert_no_containers(&blocker);
}

#[test]
fn a_multi_process_jobs_logs_say_which_rank_wrote_each_line_and_lose_none() {
    let c = Cluster::start(40);
    let job = c.submit_yaml(&format!(
        "command: {RANKS_COMMAND}\nenvironment:\n  image: {}\n\
         distribution:\n  type: pytorch\n  process_count_per_instance: 3\n",
        drover_tests::BASE_IMAGE
    ));
    c.server
        .wait_job_state(&job, "completed", Duration::from_secs(90));
    let logs = c.logs(&job);
    check_ranks_output(&logs, &logs);
    // The rank is a field of its own in JSON lines.
    let json = c.server.cli_ok(&["job", "logs", &job, "--json"]);
    let ranked = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|l| l["text"] == "r2 done")
        .collect::<Vec<_>>();
    assert_eq!(ranked.len(), 1, "{json}");
    assert_eq!(ranked[0]["rank"], 2);
    assert_eq!(ranked[0]["node_rank"], 0);
    c.assert_no_containers(&job);
}

#[test]
fn cancel_stops_every_part() {
    let c = Cluster::start(40);
    let job = c.submit("sleep 600", 2);
    c.server
        .wait_job_state(&job, "running", Duration::from_secs(90));
    assert!(
        wait_until(Duration::from_secs(30), || containers_of_job(&job).len()
            == 2),
        "both parts should run: {:?}",
        containers_of_job(&job)
    );
    c.server.cli_ok(&["job", "cancel", &job]);
    c.server
        .wait_job_state(&job, "canceled", Duration::from_secs(30));
    c.assert_no_containers(&job);
}

#[test]
fn an_agent_killed_mid_job_and_restarted_finishes_it_with_one_container() {
    let mut c = Cluster::start(40);
    let job = c.submit(
        "echo before-the-kill; sleep 6; echo finished-after-restart",
        1,
    );
    let (_, i) = c.running_on(&job);
    c.agents[i].kill9();
    assert_eq!(containers_of_job(&job).len(), 1, "the part keeps running");
    std::thread::sleep(Duration::from_secs(1));
    c.agents[i].spawn();
    // Never a second container for the part, while it runs or after.
    let done = wait_until(Duration::from_secs(60), || {
        assert!(containers_of_job(&job).len() <= 1, "duplicate container");
        c.server.job_state(&job) == "completed"
    });
    let info = c.server.job(&job);
    assert!(done, "{info}\n{}", c.agents[i].log_text());
    assert_eq!(info["attempt"], 1, "{info}");
    assert_eq!(parts(&info)[0]["exit_code"], 0, "{info}");
    let logs = c.logs(&job);
    assert!(logs.contains("finished-after-restart"), "{logs}");
    // The adopting agent ships output from the adoption on, not again from the start.
    assert_eq!(logs.matches("before-the-kill").count(), 1, "{logs}");
    c.assert_no_containers(&job);
}

#[test]
fn a_server_restarted_mid_job_loses_nothing() {
    let mut c = Cluster::start(40);
    let job = c.submit("sleep 4; echo survived-the-restart", 1);
    c.server
        .wait_job_state(&job, "running", Duration::from_secs(90));
    c.server.restart();
    c.server
        .wait_job_state(&job, "completed", Duration::from_secs(60));
    let info = c.server.job(&job);
    assert_eq!(info["attempt"], 1, "{info}");
    let logs = c.logs(&job);
    assert!(logs.contains("survived-the-restart"), "{logs}");
    c.assert_no_containers(&job);
}

#[test]
fn an_agent_gone_past_the_grace_leaves_its_node_unusable_and_the_job_requeued() {
    let mut c = Cluster::start(3);
    let job = c.submit("sleep 5; echo done-somewhere", 1);
    let (node, i) = c.running_on(&job);
    c.agents[i].kill9();
    assert!(
        wait_until(Duration::from_secs(30), || c.node_state(&node)
            == "unusable"),
        "{}",
        c.nodes()
    );
    c.server
        .wait_job_state(&job, "completed", Duration::from_secs(90));
    let info = c.server.job(&job);
    assert_eq!(info["attempt"], 2, "requeued once: {info}");
    let last = parts(&info)
        .into_iter()
        .find(|p| p["attempt"] == 2)
        .expect("attempt 2");
    assert_ne!(last["node"], node.as_str(), "{info}");
    // The lost node's agent comes back and removes the orphan of attempt 1,
    // once the control plane has told it what it should run.
    c.agents[i].spawn();
    c.assert_no_containers(&job);
}

#[test]
fn sigterm_drains_and_the_agent_exits_zero() {
    let mut c = Cluster::start(40);
    let job = c.submit("sleep 2; echo drained-fine", 1);
    let (node, i) = c.running_on(&job);
    let code = c.agents[i].terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", c.agents[i].log_text());
    // The running part was let finish before the agent left.
    c.server
        .wait_job_state(&job, "completed", Duration::from_secs(10));
    assert_eq!(c.node_state(&node), "leaving", "{}", c.nodes());
    c.assert_no_containers(&job);
    // Back after the drain: the node takes work again.
    c.agents[i].spawn();
    assert!(
        wait_until(Duration::from_secs(30), || c.node_state(&node) == "idle"),
        "{}",
        c.nodes()
    );
}

#[test]
fn a_part_that_ended_while_its_agent_was_down_is_reported_with_its_exit_code() {
    let mut c = Cluster::start(40);
    let job = c.submit("sleep 3; exit 7", 1);
    let (_, i) = c.running_on(&job);
    c.agents[i].kill9();
    // The container exits while nobody watches; it is kept for its exit code.
    let exited = wait_until(Duration::from_secs(30), || {
        let out = std::process::Command::new("docker")
            .args(["ps", "-q", "--filter", &format!("label=drover.job={job}")])
            .output()
            .expect("docker ps");
        out.stdout.is_empty()
    });
    assert!(exited, "part should have exited");
    assert_eq!(containers_of_job(&job).len(), 1);
    assert_eq!(c.server.job_state(&job), "running");
    c.agents[i].spawn();
    c.server
        .wait_job_state(&job, "failed", Duration::from_secs(30));
    let info = c.server.job(&job);
    assert_eq!(parts(&info)[0]["exit_code"], 7, "{info}");
    assert_eq!(info["attempt"], 1, "{info}");
    c.assert_no_containers(&job);
}

#[test]
fn parts_go_on_while_the_server_is_down_and_are_reported_when_it_is_back() {
    let mut c = Cluster::start(40);
    let job = c.submit("sleep 2; echo ran-during-the-outage; sleep 2", 1);
    c.server
        .wait_job_state(&job, "running", Duration::from_secs(90));
    c.server.kill();
    // The part ends during the outage; the agent keeps retrying.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let out = std::process::Command::new("docker")
                .args(["ps", "-q", "--filter", &format!("label=drover.job={job}")])
                .output()
                .expect("docker ps");
            out.stdout.is_empty()
        }),
        "the part should run to its end without the server"
    );
    std::thread::sleep(Duration::from_secs(2));
    c.server.resume();
    c.server
        .wait_job_state(&job, "completed", Duration::from_secs(60));
    let logs = c.logs(&job);
    assert!(logs.contains("ran-during-the-outage"), "{logs}");
    assert_eq!(c.server.job(&job)["attempt"], 1);
    c.assert_no_containers(&job);
}

#[test]
fn bad_yaml_unknown_cluster_and_too_many_instances_are_clear_errors() {
    let c = Cluster::start(40);
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    let bad = write("bad.yml", "command: [unclosed\n");
    let err = c
        .server
        .cli(&["job", "create", "-f", &bad, "--compute", &c.name]);
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("bad.yml:1: invalid yaml")
            || String::from_utf8_lossy(&err.stderr).contains("bad.yml:2: invalid yaml"),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
    let ok = write(
        "ok.yml",
        &format!(
            "command: echo\nenvironment:\n  image: {}\n",
            drover_tests::BASE_IMAGE
        ),
    );
    let err = c
        .server
        .cli(&["job", "create", "-f", &ok, "--compute", "nope"]);
    assert!(!err.status.success());
    let text = String::from_utf8_lossy(&err.stderr).to_string();
    assert!(text.contains("cluster `nope` not found"), "{text}");
    let big = write(
        "big.yml",
        &format!(
            "command: echo\nenvironment:\n  image: {}\nresources:\n  instance_count: 3\n",
            drover_tests::BASE_IMAGE
        ),
    );
    let err = c
        .server
        .cli(&["job", "create", "-f", &big, "--compute", &c.name]);
    assert!(!err.status.success());
    let text = String::from_utf8_lossy(&err.stderr).to_string();
    assert!(
        text.contains("the job needs 3 nodes but cluster e2e has at most 2"),
        "{text}"
    );
}

#[test]
fn an_agent_configured_by_file_serves_metrics() {
    require_docker();
    let server = ServerProc::start(40);
    let join = server.create_cluster("metrics", 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = drover_tests::free_port();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("metrics_listen = \"127.0.0.1:{port}\"\ndrain_seconds = 5\n"),
    )
    .expect("write config");
    let mut agent = AgentProc::start_with_args(
        &server,
        "metrics",
        &join,
        &unique_name("m"),
        &["--config".to_string(), config.display().to_string()],
    );
    let scrape = || -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return String::new();
        };
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let ok = wait_until(Duration::from_secs(30), || {
        scrape().contains("drover_agent_heartbeat_latency_seconds_count")
    });
    assert!(ok, "no metrics: {}\n{}", scrape(), agent.log_text());
    let text = scrape();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("drover_agent_pulls_total"), "{text}");
    assert_eq!(agent.terminate(Duration::from_secs(20)), Some(0));
}

#[test]
fn host_paths_are_the_clusters_policy_checked_by_the_server_and_again_by_the_node() {
    let allowed = tempfile::tempdir().expect("allowed dir");
    let allowed = std::fs::canonicalize(allowed.path()).expect("canonical");
    std::fs::create_dir_all(allowed.join("data")).expect("data dir");
    std::fs::write(
        allowed.join("data/greeting.txt"),
        "hello-from-an-allowed-path\n",
    )
    .expect("file");
    // A link under the allowed prefix that leads out of it.
    std::os::unix::fs::symlink("/etc", allowed.join("escape")).expect("symlink");
    let prefix = allowed.display().to_string();
    let c = Cluster::start_with(40, &["--allow-host-path", &prefix]);
    let yaml = |mount: &str| {
        format!(
            "command: cat /d/greeting.txt\nenvironment:\n  image: {}\ndrover:\n  mounts: ['{mount}:/d:ro']\n",
            drover_tests::BASE_IMAGE
        )
    };

    // Under the allowed prefix: it runs and sees the file.
    let ok = c.submit_yaml(&yaml(&format!("{prefix}/data")));
    c.server
        .wait_job_state(&ok, "completed", Duration::from_secs(90));
    assert!(
        c.logs(&ok).contains("hello-from-an-allowed-path"),
        "{}",
        c.logs(&ok)
    );

    // The Docker socket, /etc and paths outside the prefix are refused at
    // submission: nothing is stored, nothing runs.
    for (mount, expect) in [
        ("/var/run/docker.sock", "is a container engine's socket"),
        ("/etc", "is never allowed: /etc is under /etc"),
        ("/opt/data", "is not under a host path cluster e2e allows"),
    ] {
        let name = unique_name("refused");
        let out = c.submit_args(&yaml(mount), &name);
        assert!(!out.status.success(), "{mount} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("drover.mounts[0].source: "), "{err}");
        assert!(err.contains(expect), "{mount}: {err}");
        assert!(!c.server.cli(&["job", "show", &name]).status.success());
    }

    // A link out of the prefix passes the server's lexical check; the node,
    // which sees the real path, refuses it before anything reaches Docker.
    let escape = c.submit_yaml(&yaml(&format!("{prefix}/escape")));
    c.server
        .wait_job_state(&escape, "failed", Duration::from_secs(90));
    let logs = c.logs(&escape);
    assert!(
        logs.contains(&format!(
            "{prefix}/escape resolves to /etc, which is never allowed"
        )),
        "{logs}"
    );
    assert!(
        containers_of_job(&escape).is_empty(),
        "no container was created"
    );
}

#[test]
fn agents_killed_at_random_moments_lose_and_repeat_no_log_line() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(7);
    let report = drover_tests::kill_loop::run(5, 20, seed, false);
    assert_eq!(
        (
            report.completed,
            report.duplicate_containers,
            report.lines_lost,
            report.lines_duplicated
        ),
        (5, 0, 0, 0),
        "seed {seed}: {report:#?}"
    );
}

#[test]
fn a_server_down_longer_than_the_grace_loses_and_repeats_nothing() {
    // The grace is 4 s; the server stays down 10 s, once stopped cleanly and
    // once killed.
    let mut c = Cluster::start(4);
    for how in ["SIGTERM", "SIGKILL"] {
        let job = c.submit("echo started-once; sleep 12; echo finished-once", 1);
        c.running_on(&job);
        std::thread::sleep(Duration::from_secs(1));
        match how {
            "SIGTERM" => c.server.terminate(),
            _ => c.server.kill(),
        }
        std::thread::sleep(Duration::from_secs(10));
        c.server.resume();
        c.server
            .wait_job_state(&job, "completed", Duration::from_secs(60));
        let info = c.server.job(&job);
        assert_eq!(info["attempt"], 1, "{how}: {info}");
        assert_eq!(parts(&info).len(), 1, "{how}: {info}");
        let logs = c.logs(&job);
        assert_eq!(logs.matches("started-once").count(), 1, "{how}: {logs}");
        assert_eq!(logs.matches("finished-once").count(), 1, "{how}: {logs}");
        c.assert_no_containers(&job);
    }
}

#[test]
fn a_frozen_agent_is_fenced_when_it_wakes_and_its_old_attempt_writes_nothing() {
    let c = Cluster::start(3);
    let job = c.submit("for i in $(seq 1 100); do echo tick-$i; sleep 0.2; done", 1);
    let (first, i) = c.running_on(&job);
    let frozen_container = containers_of_job(&job);
    assert_eq!(frozen_container.len(), 1);
    c.agents[i].signal("STOP");
    // Past the grace the job is requeued on the other node as attempt 2.
    let moved = wait_until(Duration::from_secs(30), || {
        let info = c.server.job(&job);
        info["attempt"] == 2 && info["state"] == "running"
    });
    let info = c.server.job(&job);
    assert!(moved, "{info}");
    let second = parts(&info)
        .into_iter()
        .find(|p| p["attempt"] == 2)
        .and_then(|p| p["node"].as_str().map(str::to_string))
        .expect("attempt 2's node");
    assert_ne!(second, first);
    // The frozen agent's container still runs: nobody watched it.
    let running = |id: &str| {
        let out = std::process::Command::new("docker")
            .args(["inspect", "-f", "{{.State.Running}}", id])
            .output()
            .expect("docker inspect");
        String::from_utf8_lossy(&out.stdout).trim() == "true"
    };
    assert!(running(&frozen_container[0]));
    c.agents[i].signal("CONT");
    let woke = std::time::Instant::now();
    let stopped = wait_until(Duration::from_secs(10), || !running(&frozen_container[0]));
    let took = woke.elapsed();
    assert!(
        stopped,
        "attempt 1 kept running:\n{}",
        c.agents[i].log_text()
    );
    assert!(
        took <= Duration::from_secs(2),
        "attempt 1 stopped {} ms after its agent woke",
        took.as_millis()
    );
    c.server
        .wait_job_state(&job, "completed", Duration::from_secs(60));
    // Attempt 2's log is attempt 2's alone: 100 ticks, none of attempt 1's.
    let out = c.server.cli_ok(&["job", "logs", &job, "--json"]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert!(lines.iter().all(|l| l["attempt"] == 2), "{out}");
    let ticks = lines
        .iter()
        .filter(|l| l["text"].as_str().is_some_and(|t| t.starts_with("tick-")))
        .count();
    assert_eq!(ticks, 100, "{out}");
    let first_attempt = c.server.cli_ok(&["job", "logs", &job, "--attempt", "1"]);
    assert!(first_attempt.contains("tick-1"), "{first_attempt}");
}
