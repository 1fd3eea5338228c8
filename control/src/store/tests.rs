//! Store tests: in memory for the operations, on disk for durability and
//! migrations.

use std::path::Path;
use std::time::Duration;

use drover_api::JobSpec;
use drover_api::cluster::{JobState, NodeState, ScalingError, Timestamp};
use drover_api::compute::{ComputeSpec, ComputeUpdate, Naming};
use drover_runner::runtime::LogStream;
use rusqlite::Connection;

use super::*;

fn t(secs: u64) -> Timestamp {
    Timestamp::from_secs(secs)
}

fn mem() -> Store {
    Store::open_in_memory().expect("in-memory store")
}

fn job_spec(instances: u32, gpus: u32) -> JobSpec {
    let yaml = format!(
        "command: echo hi\nenvironment:\n  image: busybox:latest\nresources:\n  instance_count: {instances}\ndrover:\n  gpus_per_instance: {gpus}\n"
    );
    JobSpec::from_yaml("job.yml", &yaml, Path::new("/tmp"))
        .expect("job yaml parses")
        .spec
}

fn inventory(gpus: u32) -> NodeInventory {
    NodeInventory {
        healthy_gpus: gpus,
        total_gpus: gpus,
        details: serde_json::from_value(serde_json::json!({
            "host": {"hostname": "vm"},
            "gpus": (0..gpus).map(|i| serde_json::json!({"index": i})).collect::<Vec<_>>(),
        }))
        .expect("inventory"),
    }
}

fn add_cluster(s: &mut Store, name: &str, max: u32) {
    s.create_cluster(
        &ComputeSpec::new(name, "STANDARD_D3_V2", max),
        "join-secret",
        t(1),
    )
    .expect("cluster created");
}

fn add_node(s: &mut Store, id: &str, cluster: &str, gpus: u32) -> Node {
    let ip = format!(
        "10.0.0.{}",
        id.bytes().map(u32::from).sum::<u32>() % 250 + 1
    );
    s.register_node(
        &NewNode {
            id,
            cluster,
            ip: Some(&ip),
            inventory: &inventory(gpus),
            credential: &format!("cred-{id}"),
        },
        t(2),
    )
    .expect("node registered")
}

fn submit(s: &mut Store, id: &str, cluster: &str, instances: u32, max_attempts: u32) -> Job {
    s.submit_job(
        &NewJob {
            id,
            cluster,
            spec: &job_spec(instances, 0),
            max_attempts,
        },
        t(3),
    )
    .expect("job submitted")
}

fn nodes(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// Every row of every table, as text: two equal dumps mean nothing was written.
fn dump(s: &Store) -> String {
    let mut out = String::new();
    for table in [
        "meta",
        "clusters",
        "nodes",
        "jobs",
        "job_parts",
        "job_logs",
        "scaling_errors",
        "api_tokens",
    ] {
        let mut stmt = s
            .conn
            .prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2"))
            .expect("prepare");
        let n = stmt.column_count();
        let mut rows = stmt.query([]).expect("query");
        while let Some(row) = rows.next().expect("row") {
            out.push_str(table);
            for i in 0..n {
                let v: rusqlite::types::Value = row.get(i).expect("value");
                out.push_str(&format!(" {v:?}"));
            }
            out.push('\n');
        }
    }
    out
}

// ---- opening, durability, migrations ----

#[test]
fn on_disk_store_keeps_data_across_reopen_and_migrates_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("nested/data");
    {
        let mut s = Store::open(&data).expect("open creates the directory");
        add_cluster(&mut s, "cpu", 4);
        add_node(&mut s, "n1", "cpu", 0);
        submit(&mut s, "j1", "cpu", 1, 3);
        let mode: String = s
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("journal mode");
        assert_eq!(mode, "wal");
        let fk: i64 = s
            .conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .expect("foreign keys");
        assert_eq!(fk, 1);
        let sync: i64 = s
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .expect("synchronous");
        assert_eq!(sync, 1, "NORMAL");
    }
    assert!(data.join(DB_FILE).exists());
    for _ in 0..2 {
        let s = Store::open(&data).expect("reopen");
        assert_eq!(s.schema_version().expect("version"), SCHEMA_VERSION);
        assert_eq!(s.cluster("cpu").expect("cluster kept").spec.max_nodes, 4);
        assert_eq!(s.node("n1").expect("node kept").state, NodeState::Idle);
        assert_eq!(s.job("j1").expect("job kept").state, JobState::Queued);
    }
}

#[test]
fn a_database_newer_than_the_code_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Store::open(dir.path()).expect("open"));
    let conn = Connection::open(dir.path().join(DB_FILE)).expect("raw open");
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .expect("set version");
    drop(conn);
    let err = Store::open(dir.path()).expect_err("newer schema refused");
    assert!(
        matches!(err, StoreError::TooNew { found, supported } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "database schema version {} is newer than this drover supports ({}); upgrade drover",
            SCHEMA_VERSION + 1,
            SCHEMA_VERSION
        )
    );
}

#[test]
fn a_failed_migration_leaves_the_previous_version_whole() {
    let mut conn = Connection::open_in_memory().expect("open");
    let scripts = [
        "CREATE TABLE a (x INTEGER);",
        "CREATE TABLE b (x INTEGER); INSERT INTO no_such_table VALUES (1);",
    ];
    let err = schema::migrate(&mut conn, &scripts).expect_err("second script fails");
    assert!(
        matches!(err, StoreError::Migration { version: 2, .. }),
        "{err:?}"
    );
    assert_eq!(schema::user_version(&conn).expect("version"), 1);
    let b: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'b'",
            [],
            |r| r.get(0),
        )
        .expect("query");
    assert_eq!(b, 0, "the failed script's table was rolled back");

    let fixed = ["CREATE TABLE a (x INTEGER);", "CREATE TABLE b (x INTEGER);"];
    assert_eq!(schema::migrate(&mut conn, &fixed).expect("migrates"), 2);
    assert_eq!(schema::migrate(&mut conn, &fixed).expect("idempotent"), 2);
}

#[test]
fn a_held_lock_past_the_busy_timeout_is_busy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        busy_timeout: Duration::from_millis(50),
        ..StoreConfig::default()
    };
    let mut s = Store::open_with(dir.path(), config).expect("open");
    let other = Connection::open(dir.path().join(DB_FILE)).expect("second connection");
    other
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let err = s
        .create_cluster(&ComputeSpec::new("cpu", "S", 1), "tok", t(1))
        .expect_err("locked");
    assert!(matches!(err, StoreError::Busy(_)), "{err:?}");
    other.execute_batch("ROLLBACK").expect("release");
    s.create_cluster(&ComputeSpec::new("cpu", "S", 1), "tok", t(1))
        .expect("works once released");
}

// ---- clusters ----

#[test]
fn clusters_create_get_list_update() {
    let mut s = mem();
    add_cluster(&mut s, "gpu", 8);
    add_cluster(&mut s, "cpu", 4);
    let err = s
        .create_cluster(&ComputeSpec::new("cpu", "X", 1), "t", t(5))
        .expect_err("duplicate");
    assert_eq!(err.to_string(), "cluster `cpu` already exists");

    let names: Vec<String> = s
        .clusters()
        .expect("list")
        .into_iter()
        .map(|c| c.spec.name)
        .collect();
    assert_eq!(names, ["cpu", "gpu"]);

    let before = s.cluster("cpu").expect("get");
    let spec = before
        .spec
        .updated(
            &ComputeUpdate {
                max_nodes: Some(10),
                ..ComputeUpdate::default()
            },
            Naming::Fields,
        )
        .expect("valid update");
    let after = s.update_cluster(&spec, t(9)).expect("updated");
    assert_eq!(after.spec.max_nodes, 10);
    assert_eq!(after.created_at, t(1));
    assert_eq!(after.updated_at, t(9));
    assert_eq!(s.cluster("cpu").expect("get"), after);

    let missing = ComputeSpec::new("nope", "X", 1);
    assert_eq!(
        s.update_cluster(&missing, t(9))
            .expect_err("missing")
            .to_string(),
        "cluster `nope` not found"
    );
    assert!(matches!(
        s.cluster("nope"),
        Err(StoreError::NotFound {
            kind: "cluster",
            ..
        })
    ));
}

#[test]
fn cluster_delete_is_refused_while_in_use() {
    let mut s = mem();
    add_cluster(&mut s, "cpu", 4);
    add_node(&mut s, "n1", "cpu", 0);
    submit(&mut s, "queued", "cpu", 1, 1);
    submit(&mut s, "done", "cpu", 1, 1);
    s.cancel_job("done", t(4)).expect("cancel");
    s.record_scaling_error(
        "cpu",
        &ScalingError {
            at: t(4),
            message: "quota".into(),
        },
    )
    .expect("recorded");

    let before = dump(&s);
    let err = s.delete_cluster("cpu").expect_err("has a node");
    assert_eq!(
        err.to_string(),
        "cluster `cpu` still has 1 node(s); remove them first (nodes its provider created go once min nodes is 0 and they are idle)"
    );
    s.remove_node("n1").expect("remove node");
    let err = s.delete_cluster("cpu").expect_err("has a queued job");
    assert_eq!(
        err.to_string(),
        "cluster `cpu` still has 1 unfinished job(s); cancel them first"
    );
    assert_ne!(before, dump(&s), "only the node removal changed anything");
    s.cancel_job("queued", t(5)).expect("cancel");
    s.delete_cluster("cpu").expect("deleted");
    assert!(matches!(s.job("done"), Err(StoreError::NotFound { .. })));
    assert!(s.scaling_errors("cpu").expect("list").is_empty());
    assert!(matches!(
        s.delete_cluster("cpu"),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn join_tokens_are_stored_hashed() {
    let mut s = mem();
    add_cluster(&mut s, "cpu", 1);
    assert!(s.verify_join_token("cpu", "join-secret").expect("verify"));
    assert!(!s.verify_join_token("cpu", "guess").expect("verify"));
    assert!(!dump(&s).contains("join-secret"));
    let raw: Vec<u8> = s
        .conn
        .query_row("SELECT join_token_hash FROM clusters", [], |r| r.get(0))
        .expect("hash");
    assert_eq!(raw.len(), 32);
    assert!(!raw.windows(11).any(|w| w == b"join-secret"));

    s.set_join_token("cpu", "rotated").expect("rotate");
    assert!(!s.verify_join_token("cpu", "join-secret").expect("verify"));
    assert!(s.verify_join_token("cpu", "rotated").expect("verify"));
    assert!(matches!(
        s.verify_join_token("nope", "x"),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn api_tokens() {
    let mut s = mem();
    assert_eq!(s.api_token_count().expect("count"), 0);
    s.add_api_token("admin", "tok-1", t(1)).expect("add");
    assert_eq!(s.api_token_count().expect("count"), 1);
    assert_eq!(
        s.api_token_name("tok-1").expect("verify"),
        Some("admin".to_string())
    );
    assert_eq!(s.api_token_name("tok-2").expect("verify"), None);
    assert_eq!(
        s.add_api_token("admin", "tok-2", t(1))
            .expect_err("name taken")
            .to_string(),
        "api token `admin` already exists"
    );
    assert_eq!(
        s.add_api_token("ci", "tok-1", t(1))
            .expect_err("token reused")
            .to_string(),
        "this token is already registered"
    );
    assert!(!dump(&s).contains("tok-1"));
    s.remove_api_token("admin").expect("remove");
    assert_eq!(s.api_token_name("tok-1").expect("verify"), None);
    assert!(matches!(
        s.remove_api_token("admin"),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn scaling_errors_keep_the_newest() {
    let mut s = Store::open_in_memory_with(StoreConfig {
        scaling_errors_kept: 3,
        ..StoreConfig::default()
    })
    .expect("open");
    add_cluster(&mut s, "cpu", 1);
    add_cluster(&mut s, "gpu", 1);
    for i in 0..5 {
        let e = ScalingError {
            at: t(i),
            message: format!("e{i}"),
        };
        s.record_scaling_error("cpu", &e).expect("record");
    }
    s.record_scaling_error(
        "gpu",
        &ScalingError {
            at: t(9),
            message: "other".into(),
        },
    )
    .expect("record");
    let msgs: Vec<String> = s
        .scaling_errors("cpu")
        .expect("list")
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert_eq!(msgs, ["e2", "e3", "e4"]);
    assert_eq!(s.scaling_errors("gpu").expect("list").len(), 1);
    assert!(matches!(
        s.record_scaling_error(
            "nope",
            &ScalingError {
                at: t(1),
                message: "x".into()
            }
        ),
        Err(StoreError::NotFound { .. })
    ));
}

// ---- nodes ----

#[test]
fn nodes_register_heartbeat_and_authenticate() {
    let mut s = mem();
    add_cluster(&mut s, "gpu", 4);
    let n = add_node(&mut s, "n1", "gpu", 8);
    assert_eq!(n.state, NodeState::Idle);
    assert_eq!(n.registered_at, t(2));
    assert_eq!(n.free_since, Some(t(2)));
    assert!(n.desired_version > 0);
    assert_eq!(n.inventory, inventory(8));

    assert_eq!(
        s.register_node(
            &NewNode {
                id: "n1",
                cluster: "gpu",
                ip: None,
                inventory: &inventory(0),
                credential: "other",
            },
            t(3),
        )
        .expect_err("duplicate")
        .to_string(),
        "node `n1` already exists"
    );
    assert_eq!(
        s.register_node(
            &NewNode {
                id: "n2",
                cluster: "nope",
                ip: None,
                inventory: &inventory(0),
                credential: "other",
            },
            t(3),
        )
        .expect_err("unknown cluster")
        .to_string(),
        "cluster `nope` not found"
    );

    let by_cred = s
        .node_by_credential("cred-n1")
        .expect("lookup")
        .expect("found");
    assert_eq!(by_cred.id, "n1");
    assert_eq!(s.node_by_credential("cred-x").expect("lookup"), None);
    assert!(!dump(&s).contains("cred-n1"));

    // A heartbeat with nothing else changes only the time.
    s.heartbeat("n1", &Heartbeat::default(), t(10))
        .expect("heartbeat");
    let n = s.node("n1").expect("get");
    assert_eq!(n.last_heartbeat, t(10));
    assert_eq!(n.inventory, inventory(8));
    assert_eq!(n.free_since, Some(t(2)), "still free since registration");

    let mut degraded = inventory(8);
    degraded.healthy_gpus = 7;
    s.heartbeat(
        "n1",
        &Heartbeat {
            state: Some(NodeState::Leaving),
            ip: Some("10.1.1.1"),
            inventory: Some(&degraded),
        },
        t(11),
    )
    .expect("heartbeat");
    let n = s.node("n1").expect("get");
    assert_eq!(n.state, NodeState::Leaving);
    assert_eq!(n.ip.as_deref(), Some("10.1.1.1"));
    assert_eq!(n.summary().healthy_gpus, 7);
    assert_eq!(n.summary().total_gpus, 8);
    assert_eq!(s.node_summaries("gpu").expect("summaries"), [n.summary()]);
    assert_eq!(s.nodes("gpu").expect("nodes"), [n]);

    assert!(matches!(
        s.heartbeat("ghost", &Heartbeat::default(), t(1)),
        Err(StoreError::NotFound { kind: "node", .. })
    ));
    assert!(matches!(
        s.nodes("nope"),
        Err(StoreError::NotFound {
            kind: "cluster",
            ..
        })
    ));
}

#[test]
fn silent_nodes_are_the_live_ones_not_heard_from() {
    let mut s = mem();
    add_cluster(&mut s, "cpu", 4);
    for id in ["a", "b", "c", "d"] {
        add_node(&mut s, id, "cpu", 0);
    }
    s.heartbeat("b", &Heartbeat::default(), t(100))
        .expect("beat");
    s.mark_node_lost("c", NodeState::Unusable, "silent", t(50))
        .expect("lost");
    s.heartbeat(
        "d",
        &Heartbeat {
            state: Some(NodeState::Leaving),
            ..Heartbeat::default()
        },
        t(3),
    )
    .expect("beat");
    assert_eq!(s.silent_nodes(t(60)).expect("silent"), ["a", "d"]);
    assert!(s.silent_nodes(t(1)).expect("silent").is_empty());
}

#[test]
fn a_node_holding_a_job_cannot_be_removed() {
    let mut s = mem();
    add_cluster(&mut s, "cpu", 4);
    add_node(&mut s, "n1", "cpu", 0);
    submit(&mut s, "j", "cpu", 1, 1);
    s.record_placement("j", &nodes(&["n1"]), t(5))
        .expect("placed");
    assert_eq!(
        s.remove_node("n1").expect_err("busy").to_string(),
        "node `n1` still holds job `j`"
    );
    s.transition_job("j", JobState::Failed, Some("pull failed"), t(6))
        .expect("failed");
    s.remove_node("n1").expect("removed once free");
    assert_eq!(s.job_parts("j").expect("history stays").len(), 1);
}

// ---- jobs ----

#[test]
fn submission_order_is_monotonic_across_clusters() {
    let mut s = mem();
    add_cluster(&mut s, "a", 4);
    add_cluster(&mut s, "b", 4);
    let j1 = submit(&mut s, "j1", "a", 1, 3);
    let j2 = submit(&mut s, "j2", "b", 2, 3);
    let j3 = submit(&mut s, "j3", "a", 1, 3);
    assert!(j1.submitted < j2.submitted && j2.submitted < j3.submitted);
    assert_eq!(j1.state, JobState::Queued);
    assert_eq!(j1.attempt, 0);
    assert_eq!(j2.spec, job_spec(2, 0));
    assert_eq!(j2.summary().instance_count, 2);

    let cases: [(&str, &str, u32, &str); 3] = [
        ("j1", "a", 1, "job `j1` already exists"),
        ("j9", "nope", 1, "cluster `nope` not found"),
        ("j9", "a", 0, "max attempts must be at least 1"),
    ];
    let before = dump(&s);
    let mut none = job_spec(1, 0);
    match &mut none {
        JobSpec::Command(c) => c.resources.instance_count = 0,
    }
    let err = s
        .submit_job(
            &NewJob {
                id: "j0",
                cluster: "a",
                spec: &none,
                max_attempts: 1,
            },
            t(4),
        )
        .expect_err("no instances");
    assert_eq!(err.to_string(), "instance count must be at least 1");
    for (id, cluster, max_attempts, message) in cases {
        let err = s
            .submit_job(
                &NewJob {
                    id,
                    cluster,
                    spec: &job_spec(1, 0),
                    max_attempts,
                },
                t(4),
            )
            .expect_err(message);
        assert_eq!(err.to_string(), message);
    }
    assert_eq!(before, dump(&s));

    let ids = |s: &Store, f: JobFilter<'_>| -> Vec<String> {
        s.jobs(&f)
            .expect("list")
            .into_iter()
            .map(|j| j.id)
            .collect()
    };
    assert_eq!(ids(&s, JobFilter::default()), ["j1", "j2", "j3"]);
    assert_eq!(
        ids(
            &s,
            JobFilter {
                cluster: Some("a"),
                states: &[]
            }
        ),
        ["j1", "j3"]
    );
    s.cancel_job("j3", t(5)).expect("cancel");
    assert_eq!(
        ids(
            &s,
            JobFilter {
                cluster: Some("a"),
                states: &[JobState::Queued, JobState::Running]
            }
        ),
        ["j1"]
    );
    assert_eq!(
        ids(
            &s,
            JobFilter {
                cluster: None,
                states: &[JobState::Canceled]
            }
        ),
        ["j3"]
    );
    let summaries = s.job_summaries("a", &[]).expect("summaries");
    let expected: Vec<_> = [s.job("j1"), s.job("j3")]
        .into_iter()
        .map(|j| j.expect("job").summary())
        .collect();
    assert_eq!(summaries, expected);
}

/// Drives a fresh job on a fresh store to `state` (through the legal path).
fn store_with_job_in(state: JobState) -> Store {
    let mut s = mem();
    add_cluster(&mut s, "cpu", 4);
    add_node(&mut s, "n1", "cpu", 0);
    submit(&mut s, "j", "cpu", 1, 3);
    let path: &[JobState] = match state {
        JobState::Queued => &[],
        JobState::Preparing => &[JobState::Preparing],
        JobState::Running => &[JobState::Preparing, JobState::Running],
        JobState::Completed => &[JobState::Preparing, JobState::Running, JobState::Completed],
        JobState::Failed => &[JobState::Failed],
        JobState::Canceled => &[JobState::Canceled],
    };
    for step in path {
        if *step == JobState::Preparing {
            s.record_placement("j", &nodes(&["n1"]), t(5))
                .expect("placed");
        } else {
            s.transition_job("j", *step, None, t(6)).expect("step");
        }
    }
    assert_eq!(s.job("j").expect("job").state, state);
    s
}

#[test]
fn job_transitions_follow_the_state_machine() {
    for from in JobState::ALL {
        for to in JobState::ALL {
            let mut s = store_with_job_in(from);
            let before = dump(&s);
            let result = s.transition_job("j", to, Some("why"), t(7));
            let legal = from.can_transition_to(to);
            match result {
                Err(StoreError::InvalidTransition {
                    from: f, to: t2, ..
                }) => {
                    assert!(!legal, "{from} -> {to} refused");
                    assert_eq!((f, t2), (from, to));
                    assert_eq!(before, dump(&s), "{from} -> {to} wrote nothing");
                }
                Err(StoreError::Invalid(_)) => {
                    // Legal steps with their own operations.
                    assert!(legal, "{from} -> {to}");
                    assert!(matches!(to, JobState::Queued | JobState::Preparing));
                    assert_eq!(before, dump(&s), "{from} -> {to} wrote nothing");
                }
                Ok(tr) => {
                    assert!(legal, "{from} -> {to} allowed");
                    assert_eq!(tr.job.state, to);
                    if to.is_terminal() {
                        assert_eq!(tr.job.ended_at, Some(t(7)));
                        assert_eq!(tr.job.failure_reason.as_deref(), Some("why"));
                        let n = s.node("n1").expect("node");
                        assert_eq!(n.current_job, None, "{from} -> {to} released");
                        assert_eq!(n.state, NodeState::Idle);
                        assert_eq!(tr.bumped.len(), usize::from(from.holds_nodes()));
                    }
                    if to == JobState::Running {
                        assert_eq!(tr.job.started_at, Some(t(7)));
                    }
                }
                Err(e) => panic!("{from} -> {to}: unexpected {e:?}"),
            }
        }
    }
}

#[test]
fn placement_assigns_parts_and_bumps_versions() {
    let mut s = mem();
    add_cluster(&mut s, "gpu", 4);
    let v_before: Vec<u64> = ["a", "b", "c"]
        .iter()
        .map(|id| add_node(&mut s, id, "gpu", 8).desired_version)
        .collect();
    submit(&mut s, "j", "gpu", 2, 3);
    let placed = s
        .record_placement("j", &nodes(&["b", "a"]), t(10))
        .expect("placed");
    assert_eq!(placed.attempt, 1);
    let bumped: Vec<&str> = placed.bumped.iter().map(|b| b.node.as_str()).collect();
    assert_eq!(bumped, ["b", "a"]);
    assert!(placed.bumped.iter().all(|b| b.version > v_before[2]));

    let job = s.job("j").expect("job");
    assert_eq!((job.state, job.attempt), (JobState::Preparing, 1));
    for (id, rank) in [("b", 0), ("a", 1)] {
        let n = s.node(id).expect("node");
        assert_eq!(n.current_job.as_deref(), Some("j"));
        assert_eq!(n.state, NodeState::Preparing);
        assert_eq!(n.free_since, None);
        assert_eq!(s.desired_version(id).expect("version"), n.desired_version);
        let a = s.assignments(id).expect("assignments");
        assert_eq!(a.version, n.desired_version);
        assert_eq!(a.parts.len(), 1);
        let part = &a.parts[0];
        assert_eq!(
            (
                part.part.job.as_str(),
                part.part.attempt,
                part.part.node_rank
            ),
            ("j", 1, rank)
        );
        assert_eq!(part.state, PartState::Assigned);
        assert_eq!(part.spec, job_spec(2, 0));
        let order: Vec<&str> = part.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(order, ["b", "a"]);
        assert!(part.nodes.iter().all(|n| n.ip.is_some()));
    }
    let c = s.node("c").expect("node");
    assert_eq!(
        c.desired_version, v_before[2],
        "an unplaced node keeps its version"
    );
    assert!(s.assignments("c").expect("none").parts.is_empty());

    let parts = s.job_parts("j").expect("parts");
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0].node, "b");
    assert_eq!(parts[1].node, "a");
}

#[test]
fn a_refused_placement_writes_nothing() {
    type Setup = fn(&mut Store);
    let none: Setup = |_| {};
    let busy: Setup = |s| {
        submit(s, "other", "gpu", 1, 1);
        s.record_placement("other", &nodes(&["b"]), t(4))
            .expect("placed");
    };
    let leaving: Setup = |s| {
        s.heartbeat(
            "b",
            &Heartbeat {
                state: Some(NodeState::Leaving),
                ..Heartbeat::default()
            },
            t(4),
        )
        .expect("beat");
    };
    let canceled: Setup = |s| {
        s.cancel_job("j", t(4)).expect("canceled");
    };
    let cases: [(&str, Setup, &[&str], &str); 8] = [
        // The first node passes its checks and is written before the second
        // fails: the whole transaction must go.
        (
            "missing node",
            none,
            &["a", "ghost"],
            "node `ghost` not found",
        ),
        (
            "busy node",
            busy,
            &["a", "b"],
            "node `b` already holds job `other`",
        ),
        (
            "leaving node",
            leaving,
            &["a", "b"],
            "node `b` is leaving, not idle",
        ),
        (
            "other cluster",
            none,
            &["a", "x"],
            "node `x` belongs to cluster `cpu`, not `gpu`",
        ),
        (
            "too few gpus",
            none,
            &["a", "g"],
            "node `g` has 1 healthy GPU(s), job `j` needs 2",
        ),
        (
            "wrong count",
            none,
            &["a"],
            "job `j` needs 2 node(s), the placement has 1",
        ),
        (
            "repeated node",
            none,
            &["a", "a"],
            "node `a` appears twice in the placement of job `j`",
        ),
        (
            "job not queued",
            canceled,
            &["a", "b"],
            "job `j` cannot go from canceled to preparing",
        ),
    ];
    for (name, setup, on, message) in cases {
        let mut s = mem();
        add_cluster(&mut s, "gpu", 4);
        add_cluster(&mut s, "cpu", 4);
        add_node(&mut s, "a", "gpu", 2);
        add_node(&mut s, "b", "gpu", 2);
        add_node(&mut s, "x", "cpu", 2);
        add_node(&mut s, "g", "gpu", 1);
        s.submit_job(
            &NewJob {
                id: "j",
                cluster: "gpu",
                spec: &job_spec(2, 2),
                max_attempts: 3,
            },
            t(3),
        )
        .expect("submitted");
        setup(&mut s);
        let before = dump(&s);
        let err = s.record_placement("j", &nodes(on), t(5)).expect_err(name);
        assert_eq!(err.to_string(), message, "{name}");
        assert_eq!(before, dump(&s), "{name}: nothing written");
    }
}

#[test]
fn parts_report_their_states_once_ended_never_again() {
    let mut s = mem();
    add_cluster(&mut s, "cpu", 4);
    add_node(&mut s, "n1", "cpu", 0);
    submit(&mut s, "j", "cpu", 1, 1);
    s.record_placement("j", &nodes(&["n1"]), t(5))
        .expect("placed");

    let p = s
        .set_part_state("j", 1, 0, PartState::Running, None, t(6))
        .expect("running");
    assert_eq!(p.started_at, Some(t(6)));
    let again = s
        .set_part_state("j", 1, 0, PartState::Running, None, t(7))
        .expect("repeat is a no-op");
    assert_eq!(again, p);
    let p = s
        .set_part_state("j", 1, 0, PartState::Failed, Some(3), t(8))
        .expect("exited");
    assert_eq!((p.exit_code, p.ended_at), (Some(3), Some(t(8))));
    assert_eq!(p.started_at, Some(t(6)));
    assert_eq!(
        s.set_part_state("j", 1, 0, PartState::Running, None, t(9))
            .expect_err("ended")
            .to_string(),
        "part 0 of job `j` attempt 1 already ended as failed"
    );
    assert!(matches!(
        s.set_part_state("j", 2, 0, PartState::Running, None, t(9)),
        Err(StoreError::NotFound {
            kind: "job part",
            ..
        })
    ));
    assert!(matches!(
        s.job_parts("ghost"),
        Err(StoreError::NotFound { kind: "job", .. })
    ));
    // The ended part is no longer an assignment, though the job still holds
    // the node until the server fails the job.
    assert!(s.assignments("n1").expect("a").parts.is_empty());
}

#[test]
fn a_job_ending_releases_its_nodes_and_stops_live_parts() {
    let mut s = mem();
    add_cluster(&mut s, "cpu", 4);
    add_node(&mut s, "a", "cpu", 0);
    add_node(&mut s, "b", "cpu", 0);
    submit(&mut s, "j", "cpu", 2, 1);
    let placed = s
        .record_placement("j", &nodes(&["a", "b"]), t(5))
        .expect("placed");
    s.set_part_state("j", 1, 0, PartState::Running, None, t(6))
        .expect("running");
    s.set_part_state("j", 1, 1, PartState::Failed, Some(1), t(7))
        .expect("failed");
    let tr = s
        .transition_job("j", JobState::Failed, Some("part 1 exited 1"), t(8))
        .expect("failed");
    let states: Vec<PartState> = s
        .job_parts("j")
        .expect("parts")
        .into_iter()
        .map(|p| p.state)
        .collect();
    assert_eq!(states, [PartState::Stopped, PartState::Failed]);
    assert_eq!(tr.bumped.len(), 2);
    for (b, p) in tr.bumped.iter().zip(&placed.bumped) {
        assert_eq!(b.node, p.node);
        assert!(b.version > p.version);
    }
    for id in ["a", "b"] {
        let n = s.node(id).expect("node");
        assert_eq!(
            (n.state, n.current_job, n.free_since),
            (NodeState::Idle, None, Some(t(8)))
        );
        assert!(s.assignments(id).expect("a").parts.is_empty());
    }
}

#[test]
fn a_lost_node_requeues_its_job_until_attempts_run_out() {
    let mut s = mem();
    add_cluster(&mut s, "cpu", 4);
    for id in ["a", "b", "c"] {
        add_node(&mut s, id, "cpu", 0);
    }
    let submitted = submit(&mut s, "j", "cpu", 2, 2).submitted;
    s.record_placement("j", &nodes(&["a", "b"]), t(5))
        .expect("placed");
    s.transition_job("j", JobState::Running, None, t(6))
        .expect("running");

    let lost = s
        .mark_node_lost("a", NodeState::Preempted, "scheduled event", t(7))
        .expect("lost");
    assert_eq!(lost.job, Some(("j".to_string(), JobState::Queued)));
    let bumped: Vec<&str> = lost.bumped.iter().map(|b| b.node.as_str()).collect();
    assert_eq!(bumped, ["a", "b"]);
    let job = s.job("j").expect("job");
    assert_eq!(
        (job.state, job.attempt, job.started_at),
        (JobState::Queued, 1, None)
    );
    assert_eq!(job.submitted, submitted, "keeps its place in the queue");
    assert_eq!(
        job.failure_reason.as_deref(),
        Some("node `a` preempted: scheduled event")
    );
    assert_eq!(s.node("a").expect("a").state, NodeState::Preempted);
    assert_eq!(s.node("b").expect("b").state, NodeState::Idle);

    s.record_placement("j", &nodes(&["c", "b"]), t(8))
        .expect("placed again");
    assert_eq!(s.job("j").expect("job").attempt, 2);
    let lost = s
        .mark_node_lost("c", NodeState::Unusable, "silent for 40s", t(9))
        .expect("lost");
    assert_eq!(lost.job, Some(("j".to_string(), JobState::Failed)));
    let job = s.job("j").expect("job");
    assert_eq!(job.ended_at, Some(t(9)));
    assert_eq!(
        job.failure_reason.as_deref(),
        Some("node `c` unusable: silent for 40s; no attempts left (2 of 2)")
    );
    let history: Vec<(u32, u32, String, PartState)> = s
        .job_parts("j")
        .expect("parts")
        .into_iter()
        .map(|p| (p.attempt, p.node_rank, p.node, p.state))
        .collect();
    assert_eq!(
        history,
        [
            (1, 0, "a".to_string(), PartState::Lost),
            (1, 1, "b".to_string(), PartState::Lost),
            (2, 0, "c".to_string(), PartState::Lost),
            (2, 1, "b".to_string(), PartState::Lost),
        ]
    );
    assert_eq!(s.node("b").expect("b").current_job, None);

    // A node without a job is just marked.
    let lost = s
        .mark_node_lost("b", NodeState::Unusable, "silent", t(10))
        .expect("lost");
    assert_eq!((lost.job, lost.bumped.len()), (None, 0));
    assert!(matches!(
        s.mark_node_lost("b", NodeState::Idle, "x", t(10)),
        Err(StoreError::Invalid(_))
    ));
}

#[test]
fn requeue_needs_a_placed_job() {
    let mut s = store_with_job_in(JobState::Queued);
    let before = dump(&s);
    assert_eq!(
        s.requeue_job("j", "lost", t(9))
            .expect_err("queued")
            .to_string(),
        "job `j` cannot go from queued to queued"
    );
    assert_eq!(before, dump(&s));
    let mut s = store_with_job_in(JobState::Preparing);
    let tr = s
        .requeue_job("j", "image pull node lost", t(9))
        .expect("requeued");
    assert_eq!(tr.job.state, JobState::Queued);
    assert_eq!(tr.bumped.len(), 1);
}

#[test]
fn cancel_is_refused_once_ended() {
    let mut s = store_with_job_in(JobState::Running);
    let tr = s.cancel_job("j", t(9)).expect("canceled");
    assert_eq!(tr.job.state, JobState::Canceled);
    assert_eq!(tr.job.failure_reason.as_deref(), Some("canceled by user"));
    assert_eq!(
        s.cancel_job("j", t(10)).expect_err("ended").to_string(),
        "job `j` cannot go from canceled to canceled"
    );
    assert!(matches!(
        s.cancel_job("ghost", t(10)),
        Err(StoreError::NotFound { kind: "job", .. })
    ));
}

#[test]
fn store_summaries_drive_the_scheduler() {
    let mut s = mem();
    add_cluster(&mut s, "gpu", 4);
    add_node(&mut s, "small", "gpu", 2);
    add_node(&mut s, "big", "gpu", 8);
    s.submit_job(
        &NewJob {
            id: "j",
            cluster: "gpu",
            spec: &job_spec(1, 4),
            max_attempts: 3,
        },
        t(3),
    )
    .expect("submitted");
    let cluster = s.cluster("gpu").expect("cluster");
    let plan = crate::scheduler::schedule(
        &cluster.spec,
        &s.node_summaries("gpu").expect("nodes"),
        &s.job_summaries("gpu", &[JobState::Queued]).expect("jobs"),
    );
    assert_eq!(plan.placements.len(), 1);
    let p = &plan.placements[0];
    assert_eq!(p.nodes, ["big"]);
    s.record_placement(&p.job_id, &p.nodes, t(4))
        .expect("placed");
    let again = crate::scheduler::schedule(
        &cluster.spec,
        &s.node_summaries("gpu").expect("nodes"),
        &s.job_summaries("gpu", &[]).expect("jobs"),
    );
    assert!(again.placements.is_empty());
}

// ---- logs ----

fn line(text: &str) -> NewLogLine<'_> {
    NewLogLine {
        at: t(1),
        attempt: 1,
        node_rank: 0,
        stream: LogStream::Stdout,
        text,
        cursor: None,
        rank: None,
    }
}

#[test]
fn logs_are_capped_oldest_first_and_resumable() {
    let mut s = Store::open_in_memory_with(StoreConfig {
        log_cap_bytes: 100,
        ..StoreConfig::default()
    })
    .expect("open");
    add_cluster(&mut s, "cpu", 1);
    submit(&mut s, "j", "cpu", 1, 1);

    let texts: Vec<String> = (0..30).map(|i| format!("line {i:04}")).collect(); // 9 bytes
    let mut next = 0;
    for chunk in texts.chunks(7) {
        let lines: Vec<NewLogLine<'_>> = chunk.iter().map(|t| line(t)).collect();
        next = s.append_logs("j", &lines).expect("append").next_seq;
    }
    assert_eq!(next, 30);

    let page = s.read_logs("j", None, 0, 1000).expect("read");
    // 11 lines of 9 bytes fit in 100.
    assert_eq!((page.first_seq, page.end_seq, page.next_seq), (19, 30, 30));
    let got: Vec<&str> = page.lines.iter().map(|l| l.text.as_str()).collect();
    let want: Vec<&str> = texts[19..].iter().map(String::as_str).collect();
    assert_eq!(got, want);
    let seqs: Vec<u64> = page.lines.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, (19..30).collect::<Vec<_>>());

    let stored: i64 = s
        .conn
        .query_row(
            "SELECT (SELECT log_bytes FROM jobs WHERE id = 'j')
                  - (SELECT sum(length(CAST(line AS BLOB))) FROM job_logs WHERE job = 'j')",
            [],
            |r| r.get(0),
        )
        .expect("bytes");
    assert_eq!(stored, 0, "the byte count matches what is kept");

    // Following: a page at a time, then caught up.
    let page = s.read_logs("j", None, 25, 3).expect("read");
    assert_eq!(page.lines.len(), 3);
    assert_eq!(page.next_seq, 28);
    let page = s.read_logs("j", None, page.next_seq, 10).expect("read");
    assert_eq!((page.lines.len(), page.next_seq), (2, 30));
    let page = s.read_logs("j", None, 30, 10).expect("read");
    assert!(page.lines.is_empty());
    assert_eq!((page.next_seq, page.end_seq), (30, 30));

    s.append_logs(
        "j",
        &[NewLogLine {
            stream: LogStream::Stderr,
            rank: Some(3),
            ..line("new")
        }],
    )
    .expect("append");
    let page = s.read_logs("j", None, 29, 10).expect("read");
    assert_eq!(page.lines.len(), 2);
    assert_eq!(page.lines[1].stream, LogStream::Stderr);
    assert_eq!(page.lines[1].seq, 30);
    // The writing process is kept; a line without one has none.
    assert_eq!((page.lines[0].rank, page.lines[1].rank), (None, Some(3)));
}

#[test]
fn a_line_longer_than_the_cap_is_cut_to_it() {
    let mut s = Store::open_in_memory_with(StoreConfig {
        log_cap_bytes: 10,
        ..StoreConfig::default()
    })
    .expect("open");
    add_cluster(&mut s, "cpu", 1);
    submit(&mut s, "j", "cpu", 1, 1);
    // 'é' is two bytes: the cut must not split it.
    s.append_logs("j", &[line("aaaaaaaaaééé")]).expect("append");
    let page = s.read_logs("j", None, 0, 10).expect("read");
    assert_eq!(page.lines.len(), 1);
    assert_eq!(page.lines[0].text, "aaaaaaaaa");
    s.append_logs("j", &[line("0123456789")]).expect("append");
    let page = s.read_logs("j", None, 0, 10).expect("read");
    let got: Vec<&str> = page.lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(got, ["0123456789"]);
    assert_eq!(page.first_seq, 1);
    assert!(matches!(
        s.append_logs("ghost", &[line("x")]),
        Err(StoreError::NotFound { kind: "job", .. })
    ));
    assert!(matches!(
        s.read_logs("ghost", None, 0, 1),
        Err(StoreError::NotFound { kind: "job", .. })
    ));
}

#[test]
fn logs_go_with_their_job_when_the_cluster_is_deleted() {
    let mut s = mem();
    add_cluster(&mut s, "cpu", 1);
    submit(&mut s, "j", "cpu", 1, 1);
    s.append_logs("j", &[line("hello")]).expect("append");
    s.cancel_job("j", t(2)).expect("cancel");
    s.delete_cluster("cpu").expect("delete");
    let left: i64 = s
        .conn
        .query_row("SELECT count(*) FROM job_logs", [], |r| r.get(0))
        .expect("count");
    assert_eq!(left, 0);
}

// ---- part reports drive their job ----

/// A fresh 2-node job placed on `a` (rank 0) and `b` (rank 1).
fn placed_pair() -> Store {
    let mut s = mem();
    add_cluster(&mut s, "cpu", 4);
    add_node(&mut s, "a", "cpu", 0);
    add_node(&mut s, "b", "cpu", 0);
    submit(&mut s, "j", "cpu", 2, 3);
    s.record_placement("j", &nodes(&["a", "b"]), t(5))
        .expect("placed");
    s
}

#[test]
fn part_reports_move_the_job_as_one() {
    use PartState::{Assigned, Failed, Preparing, Running, Succeeded};
    // (reports as (rank, state, exit code), job state after each report)
    type Case = (
        &'static str,
        &'static [(u32, PartState, Option<i64>)],
        &'static [JobState],
    );
    let cases: [Case; 6] = [
        (
            "starts when every part runs",
            &[(0, Preparing, None), (0, Running, None), (1, Running, None)],
            &[JobState::Preparing, JobState::Preparing, JobState::Running],
        ),
        (
            "completes when every part succeeded",
            &[
                (0, Running, None),
                (1, Running, None),
                (1, Succeeded, Some(0)),
                (0, Succeeded, Some(0)),
            ],
            &[
                JobState::Preparing,
                JobState::Running,
                JobState::Running,
                JobState::Completed,
            ],
        ),
        (
            "a part that ends before the other starts still counts as started",
            &[
                (0, Succeeded, Some(0)),
                (1, Running, None),
                (1, Succeeded, Some(0)),
            ],
            &[JobState::Preparing, JobState::Running, JobState::Completed],
        ),
        (
            "parts that ended unseen complete a preparing job through running",
            &[(0, Succeeded, Some(0)), (1, Succeeded, Some(0))],
            &[JobState::Preparing, JobState::Completed],
        ),
        (
            "one failed part fails the job",
            &[(0, Running, None), (1, Failed, Some(2))],
            &[JobState::Preparing, JobState::Failed],
        ),
        (
            "a repeated report changes nothing",
            &[(0, Assigned, None), (0, Running, None), (0, Running, None)],
            &[
                JobState::Preparing,
                JobState::Preparing,
                JobState::Preparing,
            ],
        ),
    ];
    for (name, reports, expect) in cases {
        let mut s = placed_pair();
        for (i, ((rank, state, code), want)) in reports.iter().zip(expect).enumerate() {
            let r = s
                .report_part("j", 1, *rank, *state, *code, t(10 + i as u64))
                .expect(name);
            assert!(r.accepted, "{name}: report {i}");
            assert_eq!(r.part.state, *state, "{name}: report {i}");
            assert_eq!(s.job("j").expect("job").state, *want, "{name}: report {i}");
        }
    }
}

#[test]
fn a_failed_part_stops_the_others_and_says_why() {
    let mut s = placed_pair();
    s.report_part("j", 1, 0, PartState::Running, None, t(6))
        .expect("running");
    let r = s
        .report_part("j", 1, 1, PartState::Failed, Some(2), t(7))
        .expect("failed");
    let change = r.job.expect("the job changed");
    assert_eq!(change.job.state, JobState::Failed);
    assert_eq!(
        change.job.failure_reason.as_deref(),
        Some("part 1 on node `b` exited with code 2")
    );
    assert_eq!(change.bumped.len(), 2);
    let parts: Vec<(PartState, Option<i64>)> = s
        .job_parts("j")
        .expect("parts")
        .into_iter()
        .map(|p| (p.state, p.exit_code))
        .collect();
    assert_eq!(
        parts,
        [(PartState::Stopped, None), (PartState::Failed, Some(2))]
    );
    assert_eq!(s.node("a").expect("a").current_job, None);

    // The stopped part's agent reports it exited: ignored, not an error.
    let before = dump(&s);
    let late = s
        .report_part("j", 1, 0, PartState::Failed, Some(143), t(8))
        .expect("late report");
    assert!(!late.accepted);
    assert_eq!(late.part.state, PartState::Stopped);
    assert_eq!(late.job, None);
    assert_eq!(before, dump(&s));
}

#[test]
fn a_part_its_agent_reports_lost_requeues_its_job_at_once() {
    let mut s = placed_pair();
    s.report_part("j", 1, 0, PartState::Running, None, t(6))
        .expect("running");
    let r = s
        .report_part("j", 1, 1, PartState::Lost, Some(143), t(7))
        .expect("lost");
    assert!(r.accepted);
    let change = r.job.expect("the job changed");
    assert_eq!(change.job.state, JobState::Queued);
    assert_eq!(
        change.job.failure_reason.as_deref(),
        Some("part 1 on node `b` was lost: its VM is going away (scheduled event)")
    );
    let states: Vec<PartState> = s
        .job_parts("j")
        .expect("parts")
        .into_iter()
        .map(|p| p.state)
        .collect();
    assert_eq!(states, [PartState::Lost, PartState::Lost]);
    assert_eq!(s.node("b").expect("b").current_job, None);
}

#[test]
fn reports_about_an_earlier_attempt_are_ignored() {
    let mut s = placed_pair();
    s.mark_node_lost("a", NodeState::Preempted, "evicted", t(6))
        .expect("lost");
    add_node(&mut s, "c", "cpu", 0);
    s.record_placement("j", &nodes(&["c", "b"]), t(7))
        .expect("attempt 2");
    let old = s
        .report_part("j", 1, 1, PartState::Running, None, t(8))
        .expect("old attempt");
    assert!(!old.accepted);
    assert_eq!(old.part.state, PartState::Lost);
    let new = s
        .report_part("j", 2, 1, PartState::Running, None, t(8))
        .expect("new attempt");
    assert!(new.accepted);
    assert!(matches!(
        s.report_part("j", 3, 0, PartState::Running, None, t(8)),
        Err(StoreError::NotFound {
            kind: "job part",
            ..
        })
    ));
    let ids: Vec<String> = s
        .all_nodes()
        .expect("all")
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(ids, ["a", "b", "c"]);
}

/// A store written by the first released format (`tests/fixtures/store-v1.sql`,
/// dumped from a real `drover server` after a cluster was created from compute
/// YAML, a node registered with a real agent inventory, a job with every
/// field ran to completion and a second job was placed) opens with this build
/// and reads back as it was written.
#[test]
fn a_store_written_by_the_first_format_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let conn = Connection::open(dir.path().join(DB_FILE)).expect("create db");
        conn.execute_batch(include_str!("../../tests/fixtures/store-v1.sql"))
            .expect("load fixture");
    }
    let s = Store::open(dir.path()).expect("a v1 store opens");

    let cluster = s.cluster("gpu-a").expect("cluster");
    assert_eq!(cluster.spec.vm_size, "STANDARD_NC24ADS_A100_V4");
    assert_eq!(cluster.spec.max_nodes, 4);
    assert_eq!(cluster.spec.idle_seconds_before_scaledown, 300);
    assert_eq!(
        cluster.spec.vm_priority,
        drover_api::compute::VmPriority::LowPriority
    );
    assert_eq!(
        cluster.spec.identity,
        drover_api::compute::Identity::SystemAssigned
    );

    let job = s.job("train-old-format").expect("job");
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.attempt, 1);
    let spec = job.spec.as_command().expect("a v1 job is a command job");
    assert_eq!(spec.image, "drover/openmpi:bookworm");
    assert_eq!(spec.resources.shm_size, Some(2 << 30));
    let args = &spec.resources.docker_args;
    assert_eq!(args.cpus, Some(1.5));
    assert_eq!(args.memory, Some(1 << 30));
    assert_eq!(args.pids_limit, Some(100));
    assert_eq!(args.stop_timeout, Some(20));
    assert_eq!(args.ulimits.len(), 1);
    assert_eq!(args.labels, vec![("team".to_string(), "ml".to_string())]);
    assert_eq!(spec.processes_per_instance(), 2);
    assert_eq!(spec.timeout_seconds, Some(7200));
    assert_eq!(spec.drover.mounts.len(), 1);
    assert_eq!(
        spec.resolved_command(),
        "python train.py --lr 0.01 --data /drover/inputs/data --out /drover/outputs/model --bs 64"
    );
    let parts = s.job_parts("train-old-format").expect("parts");
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0].state, PartState::Succeeded);
    assert_eq!(parts[0].exit_code, Some(0));
    let logs = s.read_logs("train-old-format", None, 0, 10).expect("logs");
    let text: Vec<&str> = logs.lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(text, ["epoch 1 loss 0.5", "warning: slow"]);
    assert!(
        logs.lines.iter().all(|l| l.rank.is_none()),
        "lines stored before ranks were kept have none"
    );

    let queued = s.job("queued-old-format").expect("second job");
    assert_eq!(
        queued.spec.as_command().map(|c| c.command.as_str()),
        Some("echo queued")
    );
    // Written back in the current format, it reads the same.
    let json = serde_json::to_value(&queued.spec).expect("serialize");
    assert_eq!(json["format"], drover_api::job::JOB_FORMAT);
    assert_eq!(json["type"], "command");
    let back: JobSpec = serde_json::from_value(json).expect("read back");
    assert_eq!(back, queued.spec);
    let node = s.node("vm-old-0").expect("node");
    assert_eq!(node.current_job.as_deref(), Some("queued-old-format"));
    assert_eq!(node.ip.as_deref(), Some("10.0.0.4"));
    let inv = &node.inventory.details;
    assert_eq!(
        inv.host.logical_cores, 2,
        "the real agent inventory of the fixture"
    );
    assert!(inv.host.memory_total_bytes > 0);
}

#[test]
fn a_line_is_stored_once_per_part_cursor_and_each_attempt_reads_its_own() {
    use drover_api::wire::LogCursor;
    let mut s = mem();
    add_cluster(&mut s, "cpu", 1);
    add_node(&mut s, "n1", "cpu", 0);
    submit(&mut s, "j", "cpu", 1, 3);
    s.record_placement("j", &nodes(&["n1"]), t(5))
        .expect("place");
    let at = |at_ns: u64, index: u32| Some(LogCursor { at_ns, index });
    let l = |text: &'static str, cursor| NewLogLine {
        cursor,
        ..line(text)
    };
    let a = s
        .append_logs(
            "j",
            &[l("a", at(10, 1)), l("b", at(10, 2)), l("c", at(11, 1))],
        )
        .expect("append");
    assert_eq!((a.stored, a.duplicates), (3, 0));
    // A retried batch and a restarted agent re-reading from its cursor:
    // only what is new is stored; agent lines without a cursor always are.
    let a = s
        .append_logs(
            "j",
            &[
                l("b", at(10, 2)),
                l("c", at(11, 1)),
                l("d", at(11, 2)),
                l("note", None),
            ],
        )
        .expect("append");
    assert_eq!((a.stored, a.duplicates), (2, 2));
    let texts = |page: LogPage| page.lines.into_iter().map(|l| l.text).collect::<Vec<_>>();
    assert_eq!(
        texts(s.read_logs("j", Some(1), 0, 100).expect("read")),
        ["a", "b", "c", "d", "note"]
    );
    let asg = s.assignments("n1").expect("assignments");
    assert_eq!(
        asg.parts[0].log_cursor,
        at(11, 2),
        "the cursor reaches the agent"
    );

    // Attempt 2's lines are read apart from attempt 1's; a short page
    // resumes at the log's end, so a follower of an old attempt stops.
    s.append_logs(
        "j",
        &[NewLogLine {
            attempt: 2,
            ..l("second", at(1, 1))
        }],
    )
    .expect("append");
    let first = s.read_logs("j", Some(1), 0, 100).expect("read");
    assert_eq!((first.next_seq, first.end_seq), (6, 6));
    assert_eq!(
        texts(s.read_logs("j", Some(2), 0, 100).expect("read")),
        ["second"]
    );
    assert_eq!(s.read_logs("j", None, 0, 100).expect("read").lines.len(), 6);
}

#[test]
fn exports_stay_pending_until_the_latest_generation_is_copied_and_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut s = Store::open(dir.path()).expect("open");
        add_cluster(&mut s, "cpu", 2);
        submit(&mut s, "j", "cpu", 1, 3);
        s.request_export("j", 1, "scores", "d", "results/j", t(1))
            .expect("request");
        let first = s.pending_exports().expect("pending").remove(0);
        // Another post asks again while the first copy runs.
        s.request_export("j", 1, "scores", "d", "results/j", t(2))
            .expect("again");
        assert!(
            !s.finish_export(&first, super::ExportState::Done, 1, None, t(3))
                .expect("finish"),
            "a stale copy does not mark it done"
        );
        assert_eq!(s.pending_exports().expect("pending").len(), 1);
    }
    let mut s = Store::open(dir.path()).expect("reopen");
    let pending = s.pending_exports().expect("pending");
    assert_eq!(pending.len(), 1, "a restart resumes it");
    assert!(
        s.finish_export(&pending[0], super::ExportState::Done, 1, None, t(4))
            .expect("finish")
    );
    assert!(s.pending_exports().expect("pending").is_empty());
    assert_eq!(
        s.exports("j", 1).expect("exports")[0].state,
        super::ExportState::Done
    );
}

#[test]
fn datastores_are_added_once_listed_and_removed() {
    use drover_api::datastore::{DatastoreKind, DatastoreSpec};
    let mut s = mem();
    let spec = DatastoreSpec {
        name: "d".into(),
        description: None,
        tags: Default::default(),
        kind: DatastoreKind::Local {
            path: "/data".into(),
        },
    };
    s.add_datastore(&spec, b"sealed", t(1)).expect("add");
    assert!(matches!(
        s.add_datastore(&spec, b"sealed", t(2)),
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(s.datastores().expect("list").len(), 1);
    assert_eq!(s.datastore("d").expect("get").sealed, b"sealed");
    s.remove_datastore("d").expect("remove");
    assert!(matches!(
        s.remove_datastore("d"),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn an_mpi_job_ends_with_node_rank_zero_and_every_attempt_has_its_own_launch_secret() {
    let mut s = mem();
    add_cluster(&mut s, "cpu", 4);
    add_node(&mut s, "a", "cpu", 0);
    add_node(&mut s, "b", "cpu", 0);
    let spec = JobSpec::from_yaml(
        "job.yml",
        "command: mpirun python3 x.py\nimage: i\nresources: {instance_count: 2}\ndistribution: {type: mpi, process_count_per_instance: 2}\n",
        Path::new("/tmp"),
    )
    .expect("job yaml parses")
    .spec;
    s.submit_job(
        &NewJob {
            id: "j",
            cluster: "cpu",
            spec: &spec,
            max_attempts: 3,
        },
        t(3),
    )
    .expect("submitted");
    s.record_placement("j", &nodes(&["a", "b"]), t(5))
        .expect("placed");
    let secret_of = |s: &Store, node: &str| {
        let a = s.assignments(node).expect("assignments");
        a.parts[0].launch_secret.clone().expect("a launch secret")
    };
    let first = secret_of(&s, "a");
    assert_eq!(first.len(), 64);
    assert_eq!(first, secret_of(&s, "b"), "one secret for the attempt");
    for rank in [0, 1] {
        s.report_part("j", 1, rank, PartState::Running, None, t(6))
            .expect("running");
    }
    // Node rank 0's mpirun ended well: the job completes, the waiting part is stopped.
    let r = s
        .report_part("j", 1, 0, PartState::Succeeded, Some(0), t(7))
        .expect("succeeded");
    assert_eq!(r.job.expect("changed").job.state, JobState::Completed);
    let states: Vec<PartState> = s
        .job_parts("j")
        .expect("parts")
        .into_iter()
        .map(|p| p.state)
        .collect();
    assert_eq!(states, [PartState::Succeeded, PartState::Stopped]);

    // A new attempt gets a new secret.
    let mut s2 = placed_pair();
    let one = secret_of(&s2, "a");
    s2.requeue_job("j", "node lost", t(8)).expect("requeued");
    s2.record_placement("j", &nodes(&["b", "a"]), t(9))
        .expect("placed again");
    assert_ne!(one, secret_of(&s2, "a"));
}
