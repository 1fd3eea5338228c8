//! The store through its public API, the way the server will drive it: a
//! job's life across a restart of the control plane.

use std::path::Path;

use drover_api::JobSpec;
use drover_api::cluster::{JobState, NodeState, Timestamp};
use drover_api::compute::ComputeSpec;
use drover_control::scheduler::schedule;
use drover_control::store::{
    Heartbeat, JobFilter, NewJob, NewLogLine, NewNode, NodeInventory, PartState, Store,
};
use drover_runner::runtime::LogStream;

fn t(secs: u64) -> Timestamp {
    Timestamp::from_secs(secs)
}

fn spec() -> JobSpec {
    let yaml = "command: python train.py\nenvironment:\n  image: busybox:latest\n\
                resources:\n  instance_count: 2\ndrover:\n  gpus_per_instance: 1\n";
    JobSpec::from_yaml("job.yml", yaml, Path::new("/tmp"))
        .expect("parses")
        .spec
}

#[test]
fn a_job_survives_a_control_plane_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inventory = NodeInventory {
        healthy_gpus: 1,
        total_gpus: 1,
        details: serde_json::from_value(
            serde_json::json!({"gpus": [{"index": 0, "uuid": "GPU-1"}]}),
        )
        .expect("inventory"),
    };
    let versions_before;
    {
        let mut s = Store::open(dir.path()).expect("open");
        s.create_cluster(&ComputeSpec::new("gpu", "STANDARD_NC6", 2), "join", t(1))
            .expect("cluster");
        for (id, ip) in [("n1", "10.0.0.4"), ("n2", "10.0.0.5")] {
            assert!(s.verify_join_token("gpu", "join").expect("token"));
            s.register_node(
                &NewNode {
                    id,
                    cluster: "gpu",
                    ip: Some(ip),
                    inventory: &inventory,
                    credential: &format!("secret-{id}"),
                },
                t(2),
            )
            .expect("register");
        }
        s.submit_job(
            &NewJob {
                id: "train",
                cluster: "gpu",
                spec: &spec(),
                max_attempts: 3,
            },
            t(3),
        )
        .expect("submit");

        let cluster = s.cluster("gpu").expect("cluster");
        let plan = schedule(
            &cluster.spec,
            &s.node_summaries("gpu").expect("nodes"),
            &s.job_summaries("gpu", &[JobState::Queued]).expect("jobs"),
        );
        let placement = &plan.placements[0];
        s.record_placement(&placement.job_id, &placement.nodes, t(4))
            .expect("placed");
        for rank in 0..2 {
            s.report_part("train", 1, rank, PartState::Running, None, t(5))
                .expect("running");
        }
        assert!(
            s.all_nodes()
                .expect("nodes")
                .iter()
                .all(|n| n.state == NodeState::Running)
        );
        s.append_logs(
            "train",
            &[NewLogLine {
                at: t(6),
                attempt: 1,
                node_rank: 0,
                stream: LogStream::Stdout,
                text: "epoch 1",
                cursor: None,
                rank: None,
            }],
        )
        .expect("logs");
        versions_before = [
            s.desired_version("n1").expect("v"),
            s.desired_version("n2").expect("v"),
        ];
        // Dropped without any shutdown step, like a killed server.
    }

    let mut s = Store::open(dir.path()).expect("reopen");
    let job = s.job("train").expect("job kept");
    assert_eq!((job.state, job.attempt), (JobState::Running, 1));
    for (i, id) in ["n1", "n2"].iter().enumerate() {
        let node = s
            .node_by_credential(&format!("secret-{id}"))
            .expect("lookup")
            .expect("credential still works");
        assert_eq!(node.desired_version, versions_before[i]);
        let a = s.assignments(id).expect("assignments");
        assert_eq!(a.parts.len(), 1, "{id} still runs its part");
        assert_eq!(a.parts[0].state, PartState::Running);
        let ips: Vec<Option<&str>> = a.parts[0].nodes.iter().map(|n| n.ip.as_deref()).collect();
        assert_eq!(ips.len(), 2);
        assert!(ips.iter().all(Option::is_some));
        s.heartbeat(id, &Heartbeat::default(), t(20))
            .expect("heartbeat");
    }
    let page = s.read_logs("train", None, 0, 10).expect("logs kept");
    assert_eq!(page.lines[0].text, "epoch 1");
    assert_eq!(page.next_seq, 1);

    s.report_part("train", 1, 1, PartState::Succeeded, Some(0), t(30))
        .expect("rank 1 done");
    let done = s
        .report_part("train", 1, 0, PartState::Succeeded, Some(0), t(31))
        .expect("rank 0 done")
        .job
        .expect("job completed");
    assert_eq!(done.job.state, JobState::Completed);
    assert!(
        done.bumped
            .iter()
            .all(|b| b.version > versions_before.into_iter().max().unwrap_or(0)),
        "versions keep growing across the restart"
    );
    let idle = s.all_nodes().expect("nodes");
    assert!(
        idle.iter()
            .all(|n| n.state == NodeState::Idle && n.current_job.is_none())
    );
    let finished = s
        .jobs(&JobFilter {
            cluster: Some("gpu"),
            states: &[JobState::Completed],
        })
        .expect("list");
    assert_eq!(finished.len(), 1);
}
