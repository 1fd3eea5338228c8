//! Local clusters made by `drover up`: node containers on private Docker
//! networks, scaled by the autoscaler, lost, preempted and replaced for
//! real, and removed by `drover down`.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_tests::{
    JobDir, LocalUp, agent_bin, containers_labelled, networks_labelled, node_image_for, short_name,
    unique_name, wait_until,
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

    // Deleting a local cluster with an idle node, as Azure does: the node
    // goes first (its container), then the cluster and its network.
    assert!(!containers_labelled("drover.cluster", &b).is_empty());
    let said = up.cli_ok(&["compute", "delete", "-n", &b]);
    assert!(said.contains("removed node"), "{said}");
    assert!(containers_labelled("drover.cluster", &b).is_empty());
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
    // Each attempt has its own log: the current one by default.
    let logs = up.cli_ok(&["job", "logs", &job]);
    assert!(logs.contains("finished"), "{logs}");
    assert!(!logs.contains("got SIGTERM"), "{logs}");
    let first = up.cli_ok(&["job", "logs", &job, "--attempt", "1"]);
    assert!(first.contains("got SIGTERM"), "{first}");
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

/// Microsoft's `cluster-basic.yml`, unedited, on a `drover up` control
/// plane: it gets the local provider (the control plane's), so a job on it
/// runs; deleting the cluster afterwards removes its idle node.
#[test]
fn microsofts_cluster_yaml_runs_a_job_under_drover_up_without_edits() {
    let up = LocalUp::up(&["--max-nodes", "1"]);
    let dir = JobDir::new(
        "command: echo hello from basic-example\nenvironment:\n  image: drover/base:bookworm\ncompute: azureml:basic-example\n",
    );
    let compute = dir.path("cluster-basic.yml");
    std::fs::write(
        &compute,
        "$schema: https://azuremlschemas.azureedge.net/latest/amlCompute.schema.json\n\
         name: basic-example\ntype: amlcompute\nsize: STANDARD_DS3_v2\nmin_instances: 0\n\
         max_instances: 2\nidle_time_before_scale_down: 120\n",
    )
    .expect("write");
    up.cli_ok(&["compute", "create", "-f", &compute.display().to_string()]);
    let show = up.cli_ok(&["compute", "show", "-n", "basic-example"]);
    assert!(show.contains("provider:               local"), "{show}");
    let job = up.cli_ok(&[
        "job",
        "create",
        "-f",
        &dir.job_file().display().to_string(),
        "--stream",
    ]);
    assert!(job.contains("hello from basic-example"), "{job}");
    let said = up.cli_ok(&["compute", "delete", "-n", "basic-example"]);
    assert!(said.contains("removed node"), "{said}");
    assert!(containers_labelled("drover.cluster", "basic-example").is_empty());
}

/// A copy of the agent binary with `marker` appended: the same program, as
/// another build of it, so its digest (and node image tag) differ.
fn agent_copy(dir: &Path, marker: &str) -> PathBuf {
    let path = dir.join(format!("{marker}/drover-agent"));
    std::fs::create_dir_all(path.parent().expect("parent")).expect("agent dir");
    std::fs::copy(agent_bin(), &path).expect("copy the agent");
    let mut bytes = std::fs::read(&path).expect("read the copy");
    bytes.extend_from_slice(
        format!("\ndrover-test-build {marker} {}\n", unique_name("b")).as_bytes(),
    );
    std::fs::write(&path, bytes).expect("write the copy");
    path
}

/// The names (`repo:tag`) of a local image, or `None` when it is not there.
fn image_names(image: &str) -> Option<Vec<String>> {
    let out = Command::new("docker")
        .args([
            "image",
            "inspect",
            "--format",
            "{{join .RepoTags \" \"}}",
            image,
        ])
        .output()
        .expect("docker image inspect");
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    })
}

/// A label of a local image.
fn image_label(image: &str, label: &str) -> String {
    let out = Command::new("docker")
        .args([
            "image",
            "inspect",
            "--format",
            &format!("{{{{index .Config.Labels \"{label}\"}}}}"),
            image,
        ])
        .output()
        .expect("docker image inspect");
    assert!(out.status.success(), "{image} is not there");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Removes an image under every name it has (`docker rmi`, not forced).
fn remove_image(image: &str) {
    let Some(names) = image_names(image) else {
        return;
    };
    let out = Command::new("docker")
        .arg("rmi")
        .args(&names)
        .output()
        .expect("docker rmi");
    assert!(
        out.status.success(),
        "docker rmi {names:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes the node images a test built, under every name, when dropped.
/// Declared before the clusters using them, so it runs after their `down`.
struct BuiltImages(Vec<String>);

impl Drop for BuiltImages {
    fn drop(&mut self) {
        for image in &self.0 {
            if let Some(names) = image_names(image) {
                let _ = Command::new("docker")
                    .arg("rmi")
                    .args(&names)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Flags for a cluster of one node that goes back to zero nodes quickly.
const ONE_NODE_BRIEFLY: &[&str] = &[
    "--max-nodes",
    "1",
    "--idle-seconds-before-scaledown",
    "2",
    "--scale-down-cooldown-seconds",
    "0",
];

/// Waits until `cluster` is back at zero nodes with no node container left.
fn wait_for_zero_nodes(up: &LocalUp, cluster: &str) {
    let ok = wait_until(Duration::from_secs(60), || {
        let (current, target, alloc, _) = status(up, cluster);
        current == 0
            && target == 0
            && alloc == "Steady"
            && containers_labelled("drover.cluster", cluster).is_empty()
    });
    assert!(
        ok,
        "never back to 0: {:?}\n{}",
        status(up, cluster),
        up.log_text()
    );
}

/// Runs one small job on `up`'s cluster and checks that it completed.
fn run_a_job(up: &LocalUp, words: &str) {
    let file = job_file(&format!(
        "command: echo {words}\nenvironment:\n  image: drover/base:bookworm\n"
    ));
    let job = up.submit(&file.job_file(), &up.cluster);
    up.wait_job_state(&job, "completed", Duration::from_secs(90));
    let logs = up.cli_ok(&["job", "logs", &job]);
    assert!(logs.contains(words), "{logs}");
}

/// A second Drover build (another agent binary) in another data dir builds
/// its own node image while a first cluster sits at zero nodes: the first
/// cluster's image stays (each is labelled with the control plane that built
/// it), and the first cluster still scales up and runs a job afterwards.
#[test]
fn a_second_build_keeps_the_node_image_of_a_cluster_at_zero_nodes() {
    let agents = tempfile::tempdir().expect("tempdir");
    let (agent_a, agent_b) = (
        agent_copy(agents.path(), "first"),
        agent_copy(agents.path(), "second"),
    );
    let (image_a, image_b) = (node_image_for(&agent_a), node_image_for(&agent_b));
    assert_ne!(image_a, image_b);
    let _built = BuiltImages(vec![image_a.clone(), image_b.clone()]);

    let first = LocalUp::up_with_agent(&agent_a, ONE_NODE_BRIEFLY);
    let (current, target, _, _) = status(&first, &first.cluster);
    assert_eq!((current, target), (0, 0));
    assert!(image_names(&image_a).is_some(), "{image_a} was not built");
    let builder_a = image_label(&image_a, "drover.control-plane");
    assert!(!builder_a.is_empty(), "{image_a} carries no builder label");

    let mut second = LocalUp::up_with_agent(&agent_b, ONE_NODE_BRIEFLY);
    let names_b = image_names(&image_b).expect("the second build has its own node image");
    let builder_b = image_label(&image_b, "drover.control-plane");
    assert_ne!(builder_a, builder_b);
    // Marked as in use by the second control plane, while its server runs.
    assert!(
        names_b.contains(&format!("drover/node:used-by-{builder_b}")),
        "{names_b:?}"
    );
    let names_a = image_names(&image_a).unwrap_or_else(|| {
        panic!(
            "the second build removed {image_a}, the image of a cluster at zero nodes:\n{}",
            second.log_text()
        )
    });
    assert!(
        names_a.contains(&format!("drover/node:used-by-{builder_a}")),
        "{names_a:?}"
    );
    let said = second.down();
    assert!(said.contains("removed"), "{said}");
    // Its mark is dropped with its server; its image keeps its own name.
    assert_eq!(image_names(&image_b), Some(vec![image_b.clone()]));
    assert!(containers_labelled("drover.cluster", &second.cluster).is_empty());
    assert!(networks_labelled("drover.cluster", &second.cluster).is_empty());

    run_a_job(&first, "first-cluster-still-runs");
    assert!(image_names(&image_a).is_some());
}

/// With a cluster at zero nodes and its node image removed, a job submitted
/// makes the provider build the image again, and the job completes. When it
/// cannot (the agent binary is gone too), a job followed with `--stream`
/// says why within seconds, `job show` has a `waiting:` line, and once the
/// agent binary is back the image is rebuilt and the job completes.
#[test]
fn a_missing_node_image_is_rebuilt_and_a_job_that_waits_says_why() {
    let agents = tempfile::tempdir().expect("tempdir");
    let agent = agent_copy(agents.path(), "rebuild");
    let image = node_image_for(&agent);
    let _built = BuiltImages(vec![image.clone()]);
    let up = LocalUp::up_with_agent(&agent, ONE_NODE_BRIEFLY);
    let cluster = up.cluster.clone();

    remove_image(&image);
    assert_eq!(image_names(&image), None);
    run_a_job(&up, "ran-on-a-rebuilt-image");
    assert!(image_names(&image).is_some(), "{image} was not rebuilt");
    assert!(
        up.log_text().contains("node image rebuilt"),
        "{}",
        up.log_text()
    );
    wait_for_zero_nodes(&up, &cluster);

    // Now it cannot be rebuilt: no image, no agent binary.
    remove_image(&image);
    let away = agent.with_extension("away");
    std::fs::rename(&agent, &away).expect("move the agent away");
    let file =
        job_file("command: echo waited-then-ran\nenvironment:\n  image: drover/base:bookworm\n");
    let name = short_name("wait");
    let submitted = Instant::now();
    let mut follower = up
        .command(&[
            "job",
            "create",
            "-f",
            &file.job_file().display().to_string(),
            "-c",
            &cluster,
            "-n",
            &name,
            "--stream",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("drover job create --stream");
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut pipe = follower.stderr.take().expect("stderr");
    let sink = Arc::clone(&stderr);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = sink.lock() {
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    let said = |what: &str| stderr.lock().map(|s| s.contains(what)).unwrap_or(false);
    assert!(
        wait_until(Duration::from_secs(20), || said("could not be rebuilt")),
        "the follower never said why the job waits:\n{}\nserver log:\n{}",
        stderr.lock().map(|s| s.clone()).unwrap_or_default(),
        up.log_text()
    );
    let waited = submitted.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "said why only after {waited:?}"
    );
    let show = up.cli_ok(&["job", "show", &name]);
    let waiting = show
        .lines()
        .find(|l| l.starts_with("waiting:"))
        .unwrap_or_else(|| panic!("no waiting line:\n{show}"));
    for words in [
        image.as_str(),
        "is missing and could not be rebuilt",
        "cannot read the agent binary",
    ] {
        assert!(waiting.contains(words), "{words} not in {waiting}");
    }
    assert_eq!(up.job(&name)["state"], "queued");
    // The cluster says the same in its scaling errors.
    let errors = up.compute(&cluster)["status"]["errors"].to_string();
    assert!(errors.contains("could not be rebuilt"), "{errors}");

    // The agent binary is back: the next pass rebuilds and the job runs.
    std::fs::rename(&away, &agent).expect("move the agent back");
    let ended = wait_until(Duration::from_secs(120), || {
        matches!(follower.try_wait(), Ok(Some(_)))
    });
    if !ended {
        let _ = follower.kill();
    }
    let out = follower.wait_with_output().expect("follower output");
    let _ = reader.join();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = stderr.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(
        ended && out.status.success(),
        "the job did not complete after the rebuild ({:?}):\n{stdout}\n{stderr}\n{}",
        out.status,
        up.log_text()
    );
    assert!(stdout.contains("waited-then-ran"), "{stdout}");
    assert!(stderr.contains("queued: cluster"), "{stderr}");
    assert!(image_names(&image).is_some());
    assert!(
        up.job(&name)["waiting_reason"].is_null(),
        "{}",
        up.job(&name)
    );
}
