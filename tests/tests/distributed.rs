//! Distributed jobs on a local cluster made by `drover up` (node containers,
//! each with its own address): Open MPI's `mpirun` across three nodes
//! without SSH, PyTorch's `env://` rendezvous with Gloo, TensorFlow's
//! `TF_CONFIG`, all-or-nothing failure, and the launch path's refusals.
//! Written as Azure ML's own distributed examples write their YAML.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use drover_tests::{JobDir, LocalUp, containers_of_job, key_values, require_image, wait_until};
use serde_json::Value;

const MPI_IMAGE: &str = "drover/openmpi:bookworm";
const TORCH_IMAGE: &str = "drover/pytorch:bookworm";
/// The port of `drover-init launch-listen` (runner::part::LAUNCH_PORT).
const LAUNCH_PORT: u16 = 29450;

fn up(max_nodes: u32) -> LocalUp {
    LocalUp::up(&[
        "--max-nodes",
        &max_nodes.to_string(),
        "--grace-seconds",
        "4",
        "--idle-seconds-before-scaledown",
        "600",
        "--node-stop-grace-seconds",
        "2",
    ])
}

/// Node addresses of a job's current attempt, by node rank.
fn node_ips(up: &LocalUp, job: &Value) -> Vec<String> {
    let attempt = job["attempt"].as_u64().unwrap_or(1);
    let nodes = up.nodes(&up.cluster);
    let mut parts: Vec<&Value> = job["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["attempt"].as_u64() == Some(attempt))
        .collect();
    parts.sort_by_key(|p| p["node_rank"].as_u64());
    parts
        .iter()
        .map(|p| {
            nodes
                .iter()
                .find(|n| n["id"] == p["node"])
                .and_then(|n| n["ip"].as_str())
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

const ALLREDUCE_PY: &str = r#"import os, socket
from mpi4py import MPI
comm = MPI.COMM_WORLD
total = comm.allreduce(comm.Get_rank(), op=MPI.SUM)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((os.environ["AZ_BATCHAI_MPI_MASTER_NODE"], 9))
print(f"mpi rank={comm.Get_rank()} size={comm.Get_size()} sum={total} addr={s.getsockname()[0]} ompi_size={os.environ['OMPI_COMM_WORLD_SIZE']}", flush=True)
"#;

#[test]
fn mpirun_spans_three_nodes_without_ssh_and_a_failed_rank_fails_the_job_everywhere() {
    require_image(MPI_IMAGE);
    let up = up(3);
    let dir = JobDir::new(&format!(
        "$schema: https://azuremlschemas.azureedge.net/latest/commandJob.schema.json\n\
         code: src\n\
         command: mpirun python3 allreduce.py\n\
         environment:\n  image: {MPI_IMAGE}\n\
         compute: azureml:{}\n\
         resources:\n  instance_count: 3\n\
         distribution:\n  type: mpi\n  process_count_per_instance: 2\n",
        up.cluster
    ));
    dir.write("src/allreduce.py", ALLREDUCE_PY);
    let job = up.submit(&dir.job_file(), &up.cluster);
    up.wait_job_state(&job, "completed", Duration::from_secs(240));
    let logs = up.cli_ok(&["job", "logs", &job]);
    let ranks = key_values(&logs, "mpi rank=");
    assert_eq!(ranks.len(), 6, "six ranks report: {logs}");
    let seen: BTreeSet<&str> = ranks.iter().map(|r| r["rank"].as_str()).collect();
    assert_eq!(seen.len(), 6, "{logs}");
    for r in &ranks {
        assert_eq!(r["size"], "6", "COMM_WORLD is 3 nodes x 2: {logs}");
        assert_eq!(r["ompi_size"], "6", "{logs}");
        assert_eq!(r["sum"], "15", "the allreduce of ranks 0..5: {logs}");
    }
    let addrs: BTreeSet<&str> = ranks.iter().map(|r| r["addr"].as_str()).collect();
    let info = up.job(&job);
    let ips = node_ips(&up, &info);
    assert_eq!(addrs.len(), 3, "three distinct node addresses: {logs}");
    assert_eq!(
        addrs,
        ips.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        "the ranks run at the nodes' addresses: {logs}"
    );
    // The job is node rank 0's mpirun: it succeeded, the others were stopped.
    let parts = info["parts"].as_array().cloned().unwrap_or_default();
    assert!(
        parts
            .iter()
            .any(|p| p["node_rank"] == 0 && p["state"] == "succeeded"),
        "{info}"
    );
    assert!(
        wait_until(Duration::from_secs(30), || containers_of_job(&job)
            .is_empty()),
        "the job's containers are removed"
    );

    // Without a launcher in the command, Drover runs mpirun over every slot.
    let wrapped = JobDir::new(&format!(
        "code: src\ncommand: python3 allreduce.py\nenvironment:\n  image: {MPI_IMAGE}\n\
         resources:\n  instance_count: 3\ndistribution:\n  type: mpi\n  process_count_per_instance: 2\n"
    ));
    wrapped.write("src/allreduce.py", ALLREDUCE_PY);
    let job = up.submit(&wrapped.job_file(), &up.cluster);
    up.wait_job_state(&job, "completed", Duration::from_secs(180));
    let logs = up.cli_ok(&["job", "logs", &job]);
    let ranks = key_values(&logs, "mpi rank=");
    assert_eq!(ranks.len(), 6, "{logs}");
    assert!(ranks.iter().all(|r| r["sum"] == "15"), "{logs}");

    // A rank that exits 1: mpirun fails, so does the job, on every node,
    // with no container left running anywhere.
    let failing = JobDir::new(&format!(
        "command: >-\n  mpirun sh -c 'if [ $OMPI_COMM_WORLD_RANK = 3 ]; then echo rank 3 fails; exit 1; fi; sleep 60'\n\
         environment:\n  image: {MPI_IMAGE}\n\
         resources:\n  instance_count: 3\ndistribution:\n  type: mpi\n  process_count_per_instance: 2\n"
    ));
    let job = up.submit(&failing.job_file(), &up.cluster);
    let started = Instant::now();
    up.wait_job_state(&job, "failed", Duration::from_secs(120));
    let info = up.job(&job);
    assert!(
        info["failure_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("part 0"),
        "rank 0's mpirun decides: {info}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "failed well before the ranks' sleep ended"
    );
    assert!(
        wait_until(Duration::from_secs(30), || containers_of_job(&job)
            .is_empty()),
        "no container of the failed job is left: {:?}",
        containers_of_job(&job)
    );
    let logs = up.cli_ok(&["job", "logs", &job]);
    assert!(logs.contains("rank 3 fails"), "{logs}");
}

const TORCH_PY: &str = r#"import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank())])
dist.all_reduce(t)
print(f"torch rank={dist.get_rank()} world={dist.get_world_size()} sum={int(t.item())} master={os.environ['MASTER_ADDR']} local={os.environ['LOCAL_RANK']} node={os.environ['NODE_RANK']}", flush=True)
dist.destroy_process_group()
"#;

#[test]
fn pytorch_rendezvous_over_env_and_tensorflow_config_on_every_node() {
    require_image(TORCH_IMAGE);
    require_image(MPI_IMAGE);
    let up = up(3);
    let dir = JobDir::new(&format!(
        "$schema: https://azuremlschemas.azureedge.net/latest/commandJob.schema.json\n\
         code: src\n\
         command: python3 train.py\n\
         environment:\n  image: {TORCH_IMAGE}\n\
         resources:\n  instance_count: 3\n\
         distribution:\n  type: pytorch\n  process_count_per_instance: 2\n"
    ));
    dir.write("src/train.py", TORCH_PY);
    let job = up.submit(&dir.job_file(), &up.cluster);
    up.wait_job_state(&job, "completed", Duration::from_secs(240));
    let logs = up.cli_ok(&["job", "logs", &job]);
    let ranks = key_values(&logs, "torch rank=");
    assert_eq!(ranks.len(), 6, "{logs}");
    let info = up.job(&job);
    let ips = node_ips(&up, &info);
    for r in &ranks {
        assert_eq!(r["world"], "6", "{logs}");
        assert_eq!(r["sum"], "15", "{logs}");
        assert_eq!(
            r["master"], ips[0],
            "MASTER_ADDR is node 0's address: {logs}"
        );
    }
    let seen: BTreeSet<&str> = ranks.iter().map(|r| r["rank"].as_str()).collect();
    assert_eq!(seen.len(), 6, "{logs}");
    // Lines say which node and process wrote them.
    assert!(logs.contains("[node 2 rank 5]"), "{logs}");

    // TensorFlow: two workers, one per node, TF_CONFIG as Azure ML writes it.
    let tf = JobDir::new(&format!(
        "command: >-\n  python3 -c 'import json, os; c = json.loads(os.environ[\"TF_CONFIG\"]); print(\"tf node=\" + os.environ[\"NODE_RANK\"], \"workers=\" + \",\".join(c[\"cluster\"][\"worker\"]), \"type=\" + c[\"task\"][\"type\"], \"index=\" + str(c[\"task\"][\"index\"]))'\n\
         environment:\n  image: {MPI_IMAGE}\n\
         resources:\n  instance_count: 2\n\
         distribution:\n  type: tensorflow\n  worker_count: 2\n"
    ));
    let job = up.submit(&tf.job_file(), &up.cluster);
    up.wait_job_state(&job, "completed", Duration::from_secs(120));
    let logs = up.cli_ok(&["job", "logs", &job]);
    let tasks = key_values(&logs, "tf node=");
    assert_eq!(tasks.len(), 2, "{logs}");
    let ips = node_ips(&up, &up.job(&job));
    let workers = format!("{}:2222,{}:2222", ips[0], ips[1]);
    for t in &tasks {
        assert_eq!(t["workers"], workers, "{logs}");
        assert_eq!(t["type"], "worker", "{logs}");
        assert_eq!(t["index"], t["node"], "task index is the node rank: {logs}");
    }
}

/// Speaks the launch protocol by hand: greeting, then a request.
fn raw_launch(ip: &str, request: &str) -> String {
    let stream = TcpStream::connect((ip, LAUNCH_PORT)).expect("connect to the launch listener");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut greeting = String::new();
    reader.read_line(&mut greeting).expect("greeting");
    assert!(greeting.starts_with("DROVER-LAUNCH 1 "), "{greeting}");
    (&stream).write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    reader.read_line(&mut answer).expect("answer");
    answer.trim().to_string()
}

fn container_of(job: &str, rank: u32) -> String {
    let out = Command::new("docker")
        .args([
            "ps",
            "-q",
            "--filter",
            &format!("label=drover.job={job}"),
            "--filter",
            &format!("label=drover.part={rank}"),
        ])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `drover-init rsh` run inside a container with extra environment.
fn rsh_from(container: &str, env: &[(&str, &str)], host: &str) -> std::process::Output {
    let mut cmd = Command::new("docker");
    cmd.arg("exec");
    for (k, v) in env {
        cmd.args(["-e", &format!("{k}={v}")]);
    }
    cmd.args([
        "-e",
        "DROVER_LAUNCH_CONNECT_TIMEOUT=5",
        container,
        "/drover/bin/drover-init",
        "rsh",
        host,
        "echo",
        "launched",
    ]);
    cmd.output().expect("docker exec")
}

#[test]
fn the_launch_path_refuses_strangers_and_other_jobs_and_a_lost_node_ends_the_job() {
    require_image(MPI_IMAGE);
    let up = up(4);
    let waiting = |tag: &str| {
        JobDir::new(&format!(
            "command: mpirun --version && echo {tag} up && sleep 300\n\
             environment:\n  image: {MPI_IMAGE}\n\
             resources:\n  instance_count: 2\ndistribution:\n  type: mpi\n"
        ))
    };
    let (a_dir, b_dir) = (waiting("a"), waiting("b"));
    let a = up.submit(&a_dir.job_file(), &up.cluster);
    let b = up.submit(&b_dir.job_file(), &up.cluster);
    up.wait_job_state(&a, "running", Duration::from_secs(120));
    up.wait_job_state(&b, "running", Duration::from_secs(120));
    let a_ips = node_ips(&up, &up.job(&a));
    let b_ips = node_ips(&up, &up.job(&b));
    assert!(
        wait_until(Duration::from_secs(30), || {
            up.cli_ok(&["job", "logs", &b])
                .contains("waiting for launches")
        }),
        "{}",
        up.cli_ok(&["job", "logs", &b])
    );

    // Its own job's launcher gets in.
    let a0 = container_of(&a, 0);
    let own = rsh_from(&a0, &[], &a_ips[1]);
    assert!(
        own.status.success() && String::from_utf8_lossy(&own.stdout).contains("launched"),
        "{own:?}"
    );
    // Job a's container, aiming at job b's node (named as a's node rank 1):
    // a's name and secret open nothing of b's.
    let host_list = format!("{},{}", a_ips[0], b_ips[1]);
    let other = rsh_from(&a0, &[("AZ_BATCH_HOST_LIST", &host_list)], &b_ips[1]);
    assert_eq!(other.status.code(), Some(255), "{other:?}");
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("wrong job"),
        "{other:?}"
    );
    // Claiming to be job b, without b's secret.
    let attempt = up.job(&b)["attempt"].to_string();
    let forged = rsh_from(
        &a0,
        &[
            ("AZ_BATCH_HOST_LIST", &host_list),
            ("DROVER_JOB_NAME", &b),
            ("DROVER_ATTEMPT", &attempt),
        ],
        &b_ips[1],
    );
    assert_eq!(forged.status.code(), Some(255), "{forged:?}");
    assert!(
        String::from_utf8_lossy(&forged.stderr).contains("bad secret"),
        "{forged:?}"
    );
    // A stranger on the network, by hand.
    let answer = raw_launch(
        &b_ips[1],
        &format!("LAUNCH {b} {attempt} 1 {} 4\ntrue", "0".repeat(64)),
    );
    assert_eq!(answer, "DENY bad secret");
    let answer = raw_launch(&b_ips[1], "GET / HTTP/1.1\r\n");
    assert_eq!(answer, "DENY bad request");
    // Each refusal is in the refusing part's log.
    let b_logs = up.cli_ok(&["job", "logs", &b]);
    assert!(
        b_logs.matches("refused launch").count() >= 4,
        "every refusal is logged: {b_logs}"
    );

    // A node lost mid-job: killed outright, the job does not hang.
    let b_nodes: Vec<String> = up.job(&b)["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["node_rank"] == 1)
        .filter_map(|p| p["node"].as_str().map(str::to_string))
        .collect();
    let victim = b_nodes.last().expect("b's node rank 1").clone();
    let killed = Instant::now();
    let out = Command::new("docker")
        .args(["kill", &victim])
        .output()
        .expect("docker kill");
    assert!(out.status.success(), "{out:?}");
    let ended = wait_until(Duration::from_secs(10), || {
        let j = up.job(&b);
        j["attempt"].as_u64() != Some(1) || j["state"] == "failed" || j["state"] == "queued"
    });
    assert!(
        ended,
        "the job was neither requeued nor failed 10 s after its node died: {}",
        up.job(&b)
    );
    eprintln!(
        "job {b} left its lost node behind in {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    // Its other part is stopped: nothing of attempt 1 runs on the node that lives.
    assert!(
        wait_until(Duration::from_secs(15), || {
            let c = container_of(&b, 0);
            c.is_empty()
                || Command::new("docker")
                    .args(["inspect", "-f", "{{.Config.Labels}}", &c])
                    .output()
                    .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains("drover.attempt:1"))
        }),
        "attempt 1's part 0 still runs"
    );
    up.cli_ok(&["job", "cancel", &a]);
    up.cli_ok(&["job", "cancel", &b]);
}
