//! Local clusters made by `drover up`: node containers on private Docker
//! networks, scaled by the autoscaler, lost, preempted and replaced for
//! real, and removed by `drover down`.

use std::time::Duration;

use drover_tests::{
    JobDir, LocalUp, containers_labelled, networks_labelled, short_name, wait_until,
};
use serde_json::Value;

/// (current, target, allocation state, node state counts) of a cluster.
fn status(up: &LocalUp, cluster: &str) -> (u64, u64, String, Value) {
    let c = up.compute(cluster);
    let s = &c["status"];
    (
        s["current_node_count"].as_u64().unwrap_or(99),
        s["target_node_count"].as_u64().unwrap_or(99),
        s["allocation_state"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        s["node_state_counts"].clone(),
    )
}

fn count(counts: &Value, state: &str) -> u64 {
    counts[state].as_u64().unwrap_or(99)
}

/// Attempt 1 ran on `victim` and did not finish there; attempt 2 succeeded elsewhere.
fn assert_restarted_elsewhere(j: &Value, victim: &str) {
    let parts = j["parts"].as_array().cloned().unwrap_or_default();
    assert!(
        parts
            .iter()
            .any(|p| p["attempt"] == 1 && p["state"] == "lost" && p["node"] == victim),
        "{j}"
    );
    assert!(
        parts
            .iter()
            .any(|p| p["attempt"] == 2 && p["state"] == "succeeded" && p["node"] != victim),
        "{j}"
    );
}

/// Whether a container (any state) is called `name`.
fn container_named(name: &str) -> bool {
    let out = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("name=^/{name}$")])
        .output()
        .expect("docker ps");
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

/// The node's containers (its own and its jobs') and its record are gone.
fn assert_node_gone(up: &LocalUp, cluster: &str, node: &str) {
    assert!(
        wait_until(Duration::from_secs(30), || {
            containers_labelled("drover.owner", node).is_empty()
                && !container_named(node)
                && up.nodes(cluster).iter().all(|n| n["id"] != node)
        }),
        "node {node} was not removed:\n{}",
        up.log_text()
    );
}

fn job_file(yaml: &str) -> JobDir {
    JobDir::new(yaml)
}

/// A two-instance job scales an empty cluster to two nodes, runs on both
/// (each with its own address), and the cluster goes back to zero; a job
/// wider than `max_nodes` is refused; a second cluster of the same control
/// plane keeps its own nodes and network; a node killed mid-job is replaced
/// and its job completes as attempt 2; `drover down` leaves nothing behind.
#[test]
fn scale_from_zero_and_back_node_loss_isolation_and_down() {
    let mut up = LocalUp::up(&[
        "--max-nodes",
        "3",
        "--idle-seconds-before-scaledown",
        "3",
        "--scale-down-cooldown-seconds",
        "0",
        "--grace-seconds",
        "6",
    ]);
    let a = up.cluster.clone();
    let (current, target, alloc, _) = status(&up, &a);
    assert_eq!((current, target, alloc.as_str()), (0, 0, "Steady"));

    // Wider than max_nodes: refused at submission, clearly.
    let wide = job_file(
        "command: 'true'\nenvironment:\n  image: drover/base:bookworm\nresources:\n  instance_count: 4\n",
    );
    let out = up.cli(&[
        "job",
        "create",
        "-f",
        &wide.job_file().display().to_string(),
        "-c",
        &a,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("4") && err.contains("3"), "{err}");

    // A second cluster of the same control plane.
    let b = short_name("b");
    up.cli_ok(&[
        "compute",
        "create",
        "-n",
        &b,
        "-s",
        "Standard_D2s_v3",
        "--provider",
        "local",
        "--min-nodes",
        "1",
        "--max-nodes",
        "1",
        "--idle-seconds-before-scaledown",
        "1",
    ]);

    let two = job_file(
        "command: echo ip=$(hostname -i) nodes=$AZ_BATCH_NODE_LIST; sleep 4\n\
         environment:\n  image: drover/base:bookworm\nresources:\n  instance_count: 2\n",
    );
    let job = up.submit(&two.job_file(), &a);
    let ok = wait_until(Duration::from_secs(60), || {
        let (current, target, _, counts) = status(&up, &a);
        current == 2 && target == 2 && count(&counts, "running") == 2
    });
    assert!(
        ok,
        "never 2 running nodes: {:?}\n{}",
        status(&up, &a),
        up.log_text()
    );
    up.wait_job_state(&job, "completed", Duration::from_secs(60));
    let logs = up.cli_ok(&["job", "logs", &job]);
    let ips: Vec<&str> = logs
        .lines()
        .filter_map(|l| l.split("ip=").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or_default())
        .collect();
    assert_eq!(ips.len(), 2, "{logs}");
    assert_ne!(ips[0], ips[1], "each node has its own address: {logs}");

    // The other cluster has its own node (min 1) on its own network.
    assert!(wait_until(Duration::from_secs(30), || up.nodes(&b).len() == 1));
    let a_nodes = up.nodes(&a);
    let b_nodes = up.nodes(&b);
    assert!(a_nodes.iter().all(|n| n["cluster"] == a.as_str()));
    let b_ip = b_nodes[0]["ip"].as_str().unwrap_or_default().to_string();
    assert!(
        a_nodes.iter().all(|n| {
            let ip = n["ip"].as_str().unwrap_or_default();
            ip.rsplit_once('.').map(|x| x.0) != b_ip.rsplit_once('.').map(|x| x.0)
        }),
        "clusters share a subnet: {a_nodes:?} {b_nodes:?}"
    );
    assert_eq!(networks_labelled("drover.cluster", &a).len(), 1);
    assert_eq!(networks_labelled("drover.cluster", &b).len(), 1);

    // Idle for 3 s: back to zero.
    let ok = wait_until(Duration::from_secs(40), || {
        let (current, target, alloc, _) = status(&up, &a);
        current == 0 && target == 0 && alloc == "Steady"
    });
    assert!(
        ok,
        "never back to 0: {:?}\n{}",
        status(&up, &a),
        up.log_text()
    );
    assert!(wait_until(Duration::from_secs(30), || containers_labelled(
        "drover.cluster",
        &a
    )
    .is_empty()));

    // Node loss: kill the node mid-job; after the grace the job is requeued,
    // a replacement is created and the job completes as attempt 2.
    let long = job_file(
        "command: echo start on $(hostname); sleep 12; echo finished\n\
         environment:\n  image: drover/base:bookworm\n",
    );
    let job = up.submit(&long.job_file(), &a);
    up.wait_job_state(&job, "running", Duration::from_secs(60));
    let victim = up.job(&job)["parts"][0]["node"]
        .as_str()
        .expect("node of part")
        .to_string();
    let killed = std::process::Command::new("docker")
        .args(["kill", &victim])
        .output()
        .expect("docker kill");
    assert!(killed.status.success());
    let ok = wait_until(Duration::from_secs(30), || {
        let (current, _, alloc, counts) = status(&up, &a);
        // Seen either as unusable or already replaced by a preparing node.
        (count(&counts, "unusable") == 1 && current == 0 && alloc == "Resizing")
            || up.job(&job)["attempt"] == 2
    });
    assert!(ok, "the lost node was never noticed: {:?}", status(&up, &a));
    up.wait_job_state(&job, "completed", Duration::from_secs(90));
    let j = up.job(&job);
    assert_eq!(j["attempt"], 2, "{j}");
    assert_restarted_elsewhere(&j, &victim);
    // The dead node's container is gone, its record too.
    assert_node_gone(&up, &a, &victim);

    // The same story in the server's metrics.
    let metrics = up.metrics();
    for line in [
        format!(r#"drover_server_events_total{{cluster="{a}",event="nodes_created"}}"#),
        format!(r#"drover_server_events_total{{cluster="{a}",event="node_removed"}}"#),
        format!(r#"drover_server_events_total{{cluster="{a}",event="node_reclaimed"}}"#),
        r#"drover_server_events_total{state="unusable",event="node_lost"} 1"#.to_string(),
        format!(r#"drover_cluster_nodes{{cluster="{b}",state="idle"}} 1"#),
    ] {
        assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    }

    // Deleting a local cluster: refused while it has a node, with what to
    // do; with min nodes 0 its idle node goes, and with the cluster its network.
    let out = up.cli(&["compute", "delete", &b]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("min nodes is 0"), "{err}");
    up.cli_ok(&["compute", "update", &b, "--min-nodes", "0"]);
    assert!(
        wait_until(Duration::from_secs(40), || up.nodes(&b).is_empty()
            && containers_labelled("drover.cluster", &b).is_empty()),
        "{}",
        up.log_text()
    );
    up.cli_ok(&["compute", "delete", &b]);
    assert!(networks_labelled("drover.cluster", &b).is_empty());

    // drover down: no server, no container, no network of either cluster.
    let said = up.down();
    assert!(said.contains("removed"), "{said}");
    for c in [&a, &b] {
        assert!(containers_labelled("drover.cluster", c).is_empty(), "{c}");
        assert!(networks_labelled("drover.cluster", c).is_empty(), "{c}");
    }
    assert!(!up.data.path().join("server.pid").exists());
}

/// A job on a low-priority cluster is preempted mid-run: the agent says
/// `preempted` at once, its container gets SIGTERM, the job is requeued and
/// completes on a new node; `drover job show` shows both attempts and why.
#[test]
fn a_preempted_low_priority_node_restarts_its_job_on_a_new_node() {
    let up = LocalUp::up(&[
        "--vm-priority",
        "lowpriority",
        "--max-nodes",
        "2",
        "--idle-seconds-before-scaledown",
        "60",
    ]);
    let spot = up.cluster.clone();
    let file = job_file(
        "command: trap 'echo got SIGTERM; exit 143' TERM; echo dedicated=$AZ_BATCH_NODE_IS_DEDICATED on $(hostname); \
         for i in $(seq 1 8); do sleep 1; done; echo finished\n\
         environment:\n  image: drover/base:bookworm\n",
    );
    let job = up.submit(&file.job_file(), &spot);
    up.wait_job_state(&job, "running", Duration::from_secs(60));
    assert!(wait_until(Duration::from_secs(20), || up
        .cli_ok(&["job", "logs", &job])
        .contains("dedicated=false")));
    let victim = up.job(&job)["parts"][0]["node"]
        .as_str()
        .expect("node")
        .to_string();

    let said = up.cli_ok(&["node", "evict", &victim]);
    assert!(said.contains("Preempt"), "{said}");
    // Within the 30 s notice: requeued, so attempt 2, without any grace wait.
    assert!(
        wait_until(Duration::from_secs(15), || up.job(&job)["attempt"] == 2),
        "not requeued at once: {}\n{}",
        up.job(&job),
        up.log_text()
    );
    up.wait_job_state(&job, "completed", Duration::from_secs(90));
    let logs = up.cli_ok(&["job", "logs", &job]);
    assert!(logs.contains("got SIGTERM"), "{logs}");
    assert!(logs.contains("finished"), "{logs}");
    let show = up.cli_ok(&["job", "show", &job]);
    assert!(show.contains("preempted"), "{show}");
    assert!(
        show.contains("attempt:        2 of 3") || show.contains("2 of 3"),
        "{show}"
    );
    assert_restarted_elsewhere(&up.job(&job), &victim);
    // The preempted node's container is reclaimed, its record too.
    assert_node_gone(&up, &spot, &victim);
}
