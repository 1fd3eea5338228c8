//! The daemon against a stub control plane (axum on a free loopback port)
//! and the in-memory `FakeRuntime`: adoption without duplicates, the
//! two-phase removal, final states with logs, and the drain; scheduled
//! events against the IMDS emulator and against `mock_imds`, a stand-in for
//! Microsoft's scheduled-events mock server.

mod mock_imds;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use drover_agent::daemon::{self, DaemonConfig, InventorySource, NodeImds, VmFacts};
use drover_agent::inventory::{Inventory, InventoryCollector, NoGpus, VmInfo};
use drover_api::JobSpec;
use drover_api::cluster::NodeState;
use drover_api::files::{BlobInfo, Digest, PartOutputs, PartOutputsAccepted, UploadStatus};
use drover_api::wire::{
    Assignment, Assignments, HeartbeatRequest, HeartbeatResponse, LogBatch, LogBatchAccepted,
    LogCursor, NewLogLine, PartKey, PartState, RegisterRequest, RegisterResponse,
};
use drover_imds::{EventStatus, ImdsClient, ImdsConfig, RetryPolicy};
use drover_imds_emulator::{Emulator, EmulatorConfig, EventSpec, EventType, VmSpec};
use drover_runner::fake::{ExitScript, FakeRuntime, PullScript};
use drover_runner::runtime::{ContainerConfig, ContainerRuntime};
use drover_runner::{HostFacts, PartRunner, PullLimits, RunOptions};
use mock_imds::{MockImds, VM, VM_IP, iso, iso_in};
use tokio_util::sync::CancellationToken;

const NODE: &str = "n1";
const IMAGE: &str = "drover/base:bookworm";

#[derive(Default)]
struct Stub {
    assignments: Mutex<Option<Assignments>>,
    /// While false, watches fail (the control plane has not confirmed).
    answer_watch: AtomicBool,
    beats: Mutex<Vec<HeartbeatRequest>>,
    logs: Mutex<Vec<NewLogLine>>,
    /// Sizes of the log upload bodies.
    log_bodies: Mutex<Vec<usize>>,
    /// Registrations so far; the credential handed out is `cred-N`.
    registrations: AtomicU32,
    /// Blobs uploaded (hex → bytes).
    blobs: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Outputs posted, each with whether a final state of its part had
    /// been reported before it.
    outputs: Mutex<Vec<(PartOutputs, bool)>>,
    /// Blob bodies received.
    puts: AtomicU32,
}

impl Stub {
    fn accepts(&self, headers: &HeaderMap) -> bool {
        let want = format!("Bearer cred-{}", self.registrations.load(Ordering::SeqCst));
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(want.as_str())
    }
}

impl Stub {
    fn set(&self, version: u64, parts: Vec<Assignment>) {
        *self.assignments.lock().unwrap() = Some(Assignments { version, parts });
    }

    /// Whether a stderr line of `job` starting with `prefix` was uploaded.
    fn logged(&self, job: &str, prefix: &str) -> bool {
        self.logs.lock().unwrap().iter().any(|l| {
            l.job == job
                && l.stream == drover_api::wire::LogStream::Stderr
                && l.text.starts_with(prefix)
        })
    }

    fn states(&self) -> Vec<Option<NodeState>> {
        self.beats.lock().unwrap().iter().map(|b| b.state).collect()
    }

    fn reported(&self, job: &str) -> Vec<(PartState, Option<i64>)> {
        self.beats
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b.parts.iter())
            .filter(|p| p.part.job == job)
            .map(|p| (p.state, p.exit_code))
            .collect()
    }
}

#[derive(serde::Deserialize)]
struct WatchQuery {
    version: u64,
    timeout: f64,
}

async fn register(
    State(stub): State<Arc<Stub>>,
    Json(req): Json<RegisterRequest>,
) -> (StatusCode, Json<RegisterResponse>) {
    let n = stub.registrations.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        Json(RegisterResponse {
            node_id: req.node_id.unwrap_or_default(),
            credential: format!("cred-{n}"),
            heartbeat_interval_seconds: 1,
            grace_seconds: 40,
        }),
    )
}

async fn heartbeat(
    State(stub): State<Arc<Stub>>,
    headers: HeaderMap,
    Json(req): Json<HeartbeatRequest>,
) -> Response {
    if !stub.accepts(&headers) {
        return (StatusCode::UNAUTHORIZED, "{}").into_response();
    }
    stub.beats.lock().unwrap().push(req);
    Json(HeartbeatResponse {
        desired_version: 0,
        rejected: vec![],
    })
    .into_response()
}

async fn assignments(State(stub): State<Arc<Stub>>, Query(q): Query<WatchQuery>) -> Response {
    let deadline = Instant::now() + Duration::from_secs_f64(q.timeout.min(1.0));
    loop {
        if stub.answer_watch.load(Ordering::SeqCst) {
            let current = stub.assignments.lock().unwrap().clone();
            if let Some(a) = current
                && (a.version > q.version || Instant::now() >= deadline)
            {
                return Json(a).into_response();
            }
        } else if Instant::now() >= deadline {
            return (StatusCode::SERVICE_UNAVAILABLE, "{}").into_response();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn logs(State(stub): State<Arc<Stub>>, body: axum::body::Bytes) -> Json<LogBatchAccepted> {
    stub.log_bodies.lock().unwrap().push(body.len());
    let b: LogBatch = serde_json::from_slice(&body).unwrap();
    let n = b.lines.len() as u64;
    stub.logs.lock().unwrap().extend(b.lines);
    Json(LogBatchAccepted {
        accepted: n,
        duplicates: 0,
        rejected: vec![],
    })
}

async fn blob_head(
    State(stub): State<Arc<Stub>>,
    axum::extract::Path(hex): axum::extract::Path<String>,
) -> Response {
    match stub.blobs.lock().unwrap().get(&hex) {
        Some(b) => (StatusCode::OK, [("content-length", b.len().to_string())]).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn upload_status(
    State(stub): State<Arc<Stub>>,
    axum::extract::Path(hex): axum::extract::Path<String>,
) -> Json<UploadStatus> {
    Json(UploadStatus {
        digest: hex.parse().unwrap(),
        offset: 0,
        complete: stub.blobs.lock().unwrap().contains_key(&hex),
    })
}

async fn blob_put(
    State(stub): State<Arc<Stub>>,
    axum::extract::Path(hex): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let digest: Digest = hex.parse().unwrap();
    let size = body.len() as u64;
    stub.puts.fetch_add(1, Ordering::SeqCst);
    stub.blobs.lock().unwrap().insert(hex, body.to_vec());
    (StatusCode::CREATED, Json(BlobInfo { digest, size })).into_response()
}

async fn outputs(
    State(stub): State<Arc<Stub>>,
    headers: HeaderMap,
    Json(post): Json<PartOutputs>,
) -> Response {
    if !stub.accepts(&headers) {
        return (StatusCode::UNAUTHORIZED, "{}").into_response();
    }
    let ended = stub
        .reported(&post.part.job)
        .iter()
        .any(|(s, _)| matches!(s, PartState::Succeeded | PartState::Failed));
    let files = post.outputs.values().map(|f| f.len() as u64).sum();
    stub.outputs.lock().unwrap().push((post, ended));
    Json(PartOutputsAccepted { files, bytes: 0 }).into_response()
}

async fn serve(stub: Arc<Stub>) -> String {
    let app = axum::Router::new()
        .route(
            "/v1/agent/blobs/{hex}",
            axum::routing::head(blob_head).put(blob_put),
        )
        .route("/v1/agent/uploads/{hex}", get(upload_status))
        .route("/v1/agent/outputs", post(outputs))
        .route("/v1/agent/register", post(register))
        .route("/v1/agent/heartbeat", post(heartbeat))
        .route("/v1/agent/assignments", get(assignments))
        .route("/v1/agent/logs", post(logs))
        .layer(axum::extract::DefaultBodyLimit::max(
            drover_api::wire::MAX_REQUEST_BYTES,
        ))
        .with_state(stub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn spec() -> JobSpec {
    JobSpec::from_yaml(
        "job.yml",
        &format!("command: echo hi\nenvironment:\n  image: {IMAGE}\n"),
        Path::new("/tmp"),
    )
    .unwrap()
    .spec
}

fn assignment(job: &str, state: PartState) -> Assignment {
    Assignment {
        part: PartKey::new(job, 1, 0),
        state,
        spec: spec(),
        nodes: vec![],
        allowed_host_paths: vec![],
        log_cursor: None,
        launch_secret: None,
        identity: Default::default(),
        app_service_identity: true,
        environment_registry: None,
    }
}

fn labels(job: &str) -> BTreeMap<String, String> {
    [
        ("drover.managed", "true"),
        ("drover.job", job),
        ("drover.part", "0"),
        ("drover.attempt", "1"),
        ("drover.owner", NODE),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A container the agent would have created before it was killed.
async fn leftover(rt: &FakeRuntime, job: &str) -> String {
    let id = rt
        .create(&ContainerConfig {
            name: format!("drover-{job}-0-1"),
            image: IMAGE.into(),
            labels: labels(job),
            ..ContainerConfig::default()
        })
        .await
        .unwrap();
    rt.start(&id).await.unwrap();
    id
}

fn inventory() -> InventorySource {
    let inv: Inventory = InventoryCollector::with_gpus(Box::new(NoGpus)).refresh();
    Arc::new(move || inv.clone())
}

struct Agent {
    runtime: Arc<FakeRuntime>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), daemon::DaemonError>>,
    _dir: tempfile::TempDir,
}

fn start(server: String, runtime: Arc<FakeRuntime>, drain: Duration) -> Agent {
    start_with(server, runtime, drain, None)
}

fn start_with(
    server: String,
    runtime: Arc<FakeRuntime>,
    drain: Duration,
    imds: Option<NodeImds>,
) -> Agent {
    start_in(tempfile::tempdir().unwrap(), server, runtime, drain, imds)
}

/// An agent whose data dir is `dir`/data (what a killed agent left there).
fn start_in(
    dir: tempfile::TempDir,
    server: String,
    runtime: Arc<FakeRuntime>,
    drain: Duration,
    imds: Option<NodeImds>,
) -> Agent {
    // A port of its own: tests run in parallel on one host.
    let any_port = "127.0.0.1:0".parse().unwrap();
    start_at(dir, server, runtime, drain, imds, any_port)
}

/// [`start_in`] with the token endpoint on `identity`.
fn start_at(
    dir: tempfile::TempDir,
    server: String,
    runtime: Arc<FakeRuntime>,
    drain: Duration,
    imds: Option<NodeImds>,
    identity: std::net::SocketAddr,
) -> Agent {
    let init = dir.path().join("drover-init");
    std::fs::write(&init, b"not run by the fake").unwrap();
    let config = DaemonConfig {
        server,
        cluster: "cpu".into(),
        join_token: Some("join".into()),
        node_id: NODE.into(),
        data_dir: dir.path().join("data"),
        heartbeat_interval: Duration::from_millis(100),
        watch_timeout: Duration::from_secs(1),
        drain_deadline: drain,
        stop_grace: Duration::from_millis(100),
        init_binary: init,
        ip: Some("127.0.0.1".into()),
        dedicated: true,
        metrics_listen: None,
        identity_listen: Some(identity),
        identity_rate: Default::default(),
        job_network: None,
        node_network: "host".into(),
        imds_firewall: None,
        image_gc: None,
        imds,
        self_fence: true,
        cache_max_bytes: 1 << 30,
    };
    let runner = Arc::new(PartRunner::new(
        runtime.clone(),
        PullLimits::default(),
        RunOptions {
            stop_grace: Duration::from_millis(100),
            remove: false,
        },
        HostFacts::default(),
    ));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(daemon::run(config, runner, inventory(), shutdown.clone()));
    Agent {
        runtime,
        shutdown,
        task,
        _dir: dir,
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting until {what}");
}

fn fake(exit: ExitScript) -> Arc<FakeRuntime> {
    let rt = FakeRuntime::new(
        PullScript::Progress {
            n: 0,
            every: Duration::ZERO,
        },
        exit,
    );
    rt.present.lock().unwrap().push(IMAGE.into());
    Arc::new(rt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_collects_and_removes_only_after_confirmation() {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    let rt = fake(ExitScript::UntilStopped);
    let running = leftover(&rt, "run").await;
    let ended = leftover(&rt, "ended").await;
    rt.stop(&ended, Duration::ZERO).await.unwrap();
    let stray = leftover(&rt, "stray").await;

    // The control plane has not answered yet: nothing is adopted, collected
    // or stopped (the agent does not know where its logs end yet).
    let agent = start(server, rt.clone(), Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let record = agent.runtime.record();
    assert_eq!(record.created.len(), 3, "nothing new was created");
    assert!(
        record.stopped.iter().all(|c| c == &ended),
        "unconfirmed: kept"
    );
    assert!(record.removed.is_empty());
    assert!(stub.reported("ended").is_empty());

    // Confirmed: `run` and `ended` are assigned (never started twice),
    // `stray` is not.
    stub.set(
        1,
        vec![
            assignment("run", PartState::Running),
            assignment("ended", PartState::Running),
        ],
    );
    stub.answer_watch.store(true, Ordering::SeqCst);
    eventually("the ended part is reported with its exit code", || {
        stub.reported("ended")
            .contains(&(PartState::Failed, Some(143)))
    })
    .await;
    eventually("the ended container is removed once reported", || {
        agent.runtime.record().removed.contains(&ended)
    })
    .await;
    eventually("the running part is reported running", || {
        stub.reported("run").contains(&(PartState::Running, None))
    })
    .await;
    eventually("the unassigned container is stopped and removed", || {
        let r = agent.runtime.record();
        r.stopped.contains(&stray) && r.removed.contains(&stray)
    })
    .await;
    assert_eq!(agent.runtime.record().created.len(), 3);
    assert!(!agent.runtime.record().stopped.contains(&running));

    // Unassigned later (job canceled): stopped, reported, removed.
    stub.set(2, vec![]);
    eventually("the canceled part is stopped", || {
        stub.reported("run")
            .contains(&(PartState::Stopped, Some(143)))
            && agent.runtime.record().removed.contains(&running)
    })
    .await;
    agent.shutdown.cancel();
    agent.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_part_ships_from_where_the_control_planes_log_ends() {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    let mut rt = FakeRuntime::new(
        PullScript::Progress {
            n: 0,
            every: Duration::ZERO,
        },
        ExitScript::UntilStopped,
    );
    rt.present.lock().unwrap().push(IMAGE.into());
    // Two lines per stamp, as fast output gets: the cursor tells them apart.
    rt.log_lines = (1..=8).map(|i| format!("line {i}")).collect();
    let rt = Arc::new(rt);
    let done = leftover(&rt, "done").await;
    rt.stop(&done, Duration::ZERO).await.unwrap();
    leftover(&rt, "live").await;

    // The control plane has lines 1..=5 of `done` (line 5 is the first of
    // its stamp) and none of `live`.
    let stored = drover_runner::fake::fake_log_timestamp(4);
    let at = humantime::parse_rfc3339(&stored).unwrap();
    let at_ns = at.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut a = assignment("done", PartState::Running);
    a.log_cursor = Some(LogCursor { at_ns, index: 1 });
    stub.set(1, vec![a, assignment("live", PartState::Running)]);
    stub.answer_watch.store(true, Ordering::SeqCst);
    let agent = start(server, rt.clone(), Duration::from_secs(5));
    eventually("the ended part is reported", || {
        !stub.reported("done").is_empty()
    })
    .await;
    eventually("the live part's lines arrive", || {
        stub.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.job == "live")
            .count()
            == 8
    })
    .await;
    let logs = stub.logs.lock().unwrap().clone();
    let done_lines: Vec<&str> = logs
        .iter()
        .filter(|l| l.job == "done")
        .map(|l| l.text.as_str())
        .collect();
    assert_eq!(
        done_lines,
        ["line 6", "line 7", "line 8"],
        "only what the log lacks"
    );
    assert!(
        logs.iter().all(|l| l.cursor.is_some()),
        "every container line has its cursor"
    );
    let live: Vec<LogCursor> = logs
        .iter()
        .filter(|l| l.job == "live")
        .filter_map(|l| l.cursor)
        .collect();
    let mut sorted = live.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, live, "cursors grow line by line");
    agent.shutdown.cancel();
    agent.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parts_outputs_are_uploaded_and_posted_before_its_end_and_links_are_skipped() {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    stub.set(1, vec![assignment("out", PartState::Assigned)]);
    stub.answer_watch.store(true, Ordering::SeqCst);
    let rt = fake(ExitScript::After {
        delay: Duration::from_millis(1500),
        code: 0,
        oom: false,
    });
    let agent = start(server, rt, Duration::from_secs(5));
    let part_dir = agent._dir.path().join("data/parts/out-1-0");
    eventually("the part's working directory is made", || {
        !agent.runtime.record().created.is_empty()
    })
    .await;
    // What the job writes while its container runs.
    let work = part_dir.join("work");
    std::fs::write(work.join("outputs/x.txt"), b"hello world\n").unwrap();
    std::fs::write(work.join("logs/train.log"), b"step\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", work.join("outputs/pw")).unwrap();
    eventually("the part succeeds", || {
        stub.reported("out")
            .contains(&(PartState::Succeeded, Some(0)))
    })
    .await;
    let posts = stub.outputs.lock().unwrap().clone();
    assert_eq!(posts.len(), 1, "{posts:?}");
    let (post, after_end) = &posts[0];
    assert!(!after_end, "outputs are posted before the final state");
    let files: Vec<&str> = post.outputs["default"]
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(files, ["logs/train.log", "outputs/x.txt"]);
    assert_eq!(post.skipped["default"][0].path, "outputs/pw");
    assert_eq!(post.skipped["default"][0].reason, "a symbolic link");
    let blobs = stub.blobs.lock().unwrap().clone();
    assert!(blobs.values().any(|b| b == b"hello world\n"));
    assert!(
        !blobs.values().any(|b| b.starts_with(b"root:")),
        "no link followed"
    );
    eventually("the part directory goes once the end is acked", || {
        !part_dir.exists()
    })
    .await;
    agent.shutdown.cancel();
    agent.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_by_a_restart_resumes_and_sends_only_what_the_control_plane_lacks() {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    // A part whose container exited and whose upload a kill -9 cut: one
    // file's blob reached the control plane, the other did not.
    let dir = tempfile::tempdir().unwrap();
    let part = PartKey::new("res", 1, 0);
    let part_dir = dir.path().join("data/parts/res-1-0");
    let work = part_dir.join("work");
    std::fs::create_dir_all(work.join("outputs")).unwrap();
    std::fs::create_dir_all(work.join("logs")).unwrap();
    std::fs::write(work.join("outputs/a.txt"), b"already there\n").unwrap();
    std::fs::write(work.join("outputs/b.txt"), b"not yet\n").unwrap();
    let record =
        serde_json::json!({"part": part, "phase": "uploading", "work": work, "outputs": {}});
    std::fs::write(part_dir.join("part.json"), record.to_string()).unwrap();
    let stored = drover_files::digest::sha256_bytes(b"already there\n");
    stub.blobs
        .lock()
        .unwrap()
        .insert(stored.hex(), b"already there\n".to_vec());
    // A part directory nothing refers to any more.
    std::fs::create_dir_all(dir.path().join("data/parts/gone-1-0/work")).unwrap();

    let rt = fake(ExitScript::After {
        delay: Duration::ZERO,
        code: 0,
        oom: false,
    });
    leftover(&rt, "res").await;
    stub.set(1, vec![assignment("res", PartState::Running)]);
    stub.answer_watch.store(true, Ordering::SeqCst);
    let agent = start_in(dir, server, rt, Duration::from_secs(5), None);
    eventually("the part succeeds", || {
        stub.reported("res")
            .contains(&(PartState::Succeeded, Some(0)))
    })
    .await;
    let posts = stub.outputs.lock().unwrap().clone();
    assert_eq!(posts.len(), 1);
    assert!(!posts[0].1, "posted before the final state");
    let files: Vec<&str> = posts[0].0.outputs["default"]
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(files, ["outputs/a.txt", "outputs/b.txt"]);
    assert_eq!(
        stub.puts.load(Ordering::SeqCst),
        1,
        "only the missing blob is sent"
    );
    assert!(
        agent.runtime.record().created.len() == 1,
        "nothing started again"
    );
    assert!(!agent._dir.path().join("data/parts/gone-1-0").exists());
    agent.shutdown.cancel();
    agent.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_that_cannot_be_fetched_fails_the_part_before_any_container_naming_it() {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    let mut a = assignment("url", PartState::Assigned);
    a.spec = JobSpec::from_yaml(
        "job.yml",
        &format!(
            "command: cat ${{{{inputs.csv}}}}\nenvironment:\n  image: {IMAGE}\ninputs:\n  csv:\n    type: uri_file\n    path: http://127.0.0.1:9/x.csv\n"
        ),
        Path::new("/tmp"),
    )
    .unwrap()
    .spec;
    stub.set(1, vec![a]);
    stub.answer_watch.store(true, Ordering::SeqCst);
    let agent = start(
        server,
        fake(ExitScript::UntilStopped),
        Duration::from_secs(5),
    );
    eventually("the part fails", || {
        stub.reported("url")
            .iter()
            .any(|(s, _)| *s == PartState::Failed)
    })
    .await;
    assert!(
        stub.logged(
            "url",
            "drover-agent: input csv: cannot download http://127.0.0.1:9/x.csv"
        ),
        "{:?}",
        stub.logs.lock().unwrap()
    );
    assert!(agent.runtime.record().created.is_empty(), "no container");
    assert!(stub.outputs.lock().unwrap().is_empty(), "nothing posted");
    agent.shutdown.cancel();
    agent.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assigned_part_runs_once_and_its_logs_come_before_its_exit_code() {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    stub.set(1, vec![assignment("j", PartState::Assigned)]);
    stub.answer_watch.store(true, Ordering::SeqCst);
    let rt = fake(ExitScript::After {
        delay: Duration::from_millis(100),
        code: 3,
        oom: false,
    });
    let agent = start(server, rt, Duration::from_secs(5));
    eventually("the exit code is reported", || {
        stub.reported("j").contains(&(PartState::Failed, Some(3)))
    })
    .await;
    assert!(
        stub.logs.lock().unwrap().iter().any(|l| l.text == "hello"),
        "logs are uploaded before the final state"
    );
    eventually("the container is removed", || {
        agent.runtime.record().removed.len() == 1
    })
    .await;
    // The control plane still lists it (a stale answer): never started again.
    stub.set(2, vec![assignment("j", PartState::Running)]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(agent.runtime.record().created.len(), 1);
    agent.shutdown.cancel();
    agent.task.await.unwrap().unwrap();
}

/// A raw `GET` of `url` with `header: value`: the status and the body.
async fn raw_get(url: &str, header: (&str, &str)) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://").expect("an http url");
    let (authority, path) = rest.split_at(rest.find('/').expect("a path"));
    let mut conn = tokio::net::TcpStream::connect(authority)
        .await
        .expect("connect");
    let request = format!(
        "GET {path}?api-version=2017-09-01&resource=https://management.azure.com/ HTTP/1.1\r\nhost: {authority}\r\n{}: {}\r\nconnection: close\r\n\r\n",
        header.0, header.1
    );
    conn.write_all(request.as_bytes()).await.expect("send");
    let mut raw = String::new();
    conn.read_to_string(&mut raw).await.expect("read");
    let status = raw[9..12].parse().expect("a status");
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_gets_its_own_identity_secret_which_dies_with_it() {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    stub.set(1, vec![assignment("idj", PartState::Assigned)]);
    stub.answer_watch.store(true, Ordering::SeqCst);
    let rt = fake(ExitScript::After {
        delay: Duration::from_secs(2),
        code: 0,
        oom: false,
    });
    let agent = start(server, rt, Duration::from_secs(5));
    eventually("the part runs", || {
        stub.reported("idj").contains(&(PartState::Running, None))
    })
    .await;
    let env: BTreeMap<String, String> = agent.runtime.record().created[0]
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let secret = env["MSI_SECRET"].clone();
    assert_eq!(secret.len(), 64, "{env:?}");
    assert!(secret.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(env["IDENTITY_HEADER"], secret, "one secret, both protocols");
    // The cluster (the stub's) grants no identity: Azure ML's literal.
    assert_eq!(env["DEFAULT_IDENTITY_CLIENT_ID"], "clientid");
    let msi = env["MSI_ENDPOINT"].clone();
    assert!(
        msi.starts_with("http://127.0.0.1:") && msi.ends_with("/msi/token"),
        "{msi}"
    );
    assert!(env["IDENTITY_ENDPOINT"].ends_with("/identity/token"));
    // While it runs its secret is known (and its cluster has no identity)…
    let (status, body) = raw_get(&msi, ("secret", &secret)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("no_identity")),
        "{body}"
    );
    eventually("the part ends", || {
        stub.reported("idj")
            .contains(&(PartState::Succeeded, Some(0)))
    })
    .await;
    // …and once it has ended, it is forgotten.
    let (status, body) = raw_get(&msi, ("secret", &secret)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("bad_secret")),
        "{body}"
    );
    let audit = std::fs::read_to_string(agent._dir.path().join("data/audit/identity.jsonl"))
        .expect("the audit log");
    let outcomes: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(outcomes.len(), 2, "{audit}");
    assert_eq!(outcomes[0]["job"], "idj");
    assert_eq!(outcomes[0]["outcome"], "no_identity");
    assert_eq!(outcomes[1]["job"], serde_json::Value::Null);
    assert_eq!(outcomes[1]["outcome"], "bad_secret");
    assert!(
        !audit.contains(&secret),
        "the audit log never holds a secret"
    );
    agent.shutdown.cancel();
    agent.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_adopted_after_a_restart_keeps_its_identity_secret_until_it_ends() {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    // What an agent killed while the part ran left: its container and the
    // part's saved secret.
    let dir = tempfile::tempdir().unwrap();
    let part_dir = dir.path().join("data/parts/adp-1-0");
    std::fs::create_dir_all(&part_dir).unwrap();
    let secret = "ab".repeat(32);
    std::fs::write(part_dir.join("identity-secret"), &secret).unwrap();
    let rt = fake(ExitScript::UntilStopped);
    leftover(&rt, "adp").await;
    stub.set(1, vec![assignment("adp", PartState::Running)]);
    stub.answer_watch.store(true, Ordering::SeqCst);
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let agent = start_at(dir, server, rt, Duration::from_secs(5), None, addr);
    eventually("the part is adopted", || {
        stub.reported("adp").contains(&(PartState::Running, None))
    })
    .await;
    let url = format!("http://{addr}/msi/token");
    // The secret is the adopted part's again (its cluster has no identity).
    let (status, body) = raw_get(&url, ("secret", &secret)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("no_identity")),
        "{body}"
    );
    let (status, _) = raw_get(&url, ("secret", &"cd".repeat(32))).await;
    assert_eq!(status, 401, "a secret no part saved");
    // Unassigned: stopped, and its secret forgotten.
    stub.set(2, vec![]);
    eventually("the part is stopped", || {
        stub.reported("adp")
            .iter()
            .any(|(s, _)| *s == PartState::Stopped)
    })
    .await;
    let (status, body) = raw_get(&url, ("secret", &secret)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("bad_secret")),
        "{body}"
    );
    agent.shutdown.cancel();
    agent.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_line_carries_the_rank_drover_init_marked_it_with_and_not_the_marker() {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    stub.set(1, vec![assignment("ranks", PartState::Assigned)]);
    stub.answer_watch.store(true, Ordering::SeqCst);
    let mut rt = FakeRuntime::new(
        PullScript::Progress {
            n: 0,
            every: Duration::ZERO,
        },
        ExitScript::After {
            delay: Duration::from_millis(50),
            code: 0,
            oom: false,
        },
    );
    rt.present.lock().unwrap().push(IMAGE.into());
    rt.log_lines = vec![
        "\x1erank 2\x1fhello from 2".into(),
        "\x1erank 0\x1f".into(),
        "drover-init: a line of drover-init itself".into(),
        // Only a whole marker at the start is one.
        "\x1erank x\x1fnot a marker".into(),
        "\x1erank 1\x1f\x1erank 5\x1fforged".into(),
    ];
    let agent = start(server, Arc::new(rt), Duration::from_secs(5));
    eventually("the part's success is reported", || {
        stub.reported("ranks")
            .contains(&(PartState::Succeeded, Some(0)))
    })
    .await;
    let logs: Vec<(Option<u32>, String)> = stub
        .logs
        .lock()
        .unwrap()
        .iter()
        .map(|l| (l.rank, l.text.clone()))
        .collect();
    assert_eq!(
        logs,
        vec![
            (Some(2), "hello from 2".to_string()),
            (Some(0), String::new()),
            (
                None,
                "drover-init: a line of drover-init itself".to_string()
            ),
            (None, "\x1erank x\x1fnot a marker".to_string()),
            (Some(1), "\x1erank 5\x1fforged".to_string()),
        ]
    );
    agent.shutdown.cancel();
    agent.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_says_leaving_and_stops_parts_at_the_deadline() {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    stub.set(1, vec![assignment("long", PartState::Assigned)]);
    stub.answer_watch.store(true, Ordering::SeqCst);
    let agent = start(
        server,
        fake(ExitScript::UntilStopped),
        Duration::from_millis(300),
    );
    eventually("the part runs", || {
        stub.reported("long").contains(&(PartState::Running, None))
    })
    .await;
    let started = Instant::now();
    agent.shutdown.cancel();
    agent.task.await.unwrap().unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "drain waited"
    );
    assert!(
        stub.beats
            .lock()
            .unwrap()
            .iter()
            .any(|b| b.state == Some(NodeState::Leaving)),
        "told the server it is leaving"
    );
    // SIGTERM is no scheduled event: the part is stopped, with its code.
    assert!(
        stub.reported("long")
            .contains(&(PartState::Stopped, Some(143)))
    );
    assert_eq!(agent.runtime.record().stopped.len(), 1);
    assert!(stub.logged(
        "long",
        "drover-agent: stopping the part: the agent was told to stop and its drain deadline passed"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credential_makes_the_agent_register_again() {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    stub.set(1, vec![]);
    stub.answer_watch.store(true, Ordering::SeqCst);
    let agent = start(
        server,
        fake(ExitScript::UntilStopped),
        Duration::from_secs(1),
    );
    eventually("the agent heartbeats", || {
        !stub.beats.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(stub.registrations.load(Ordering::SeqCst), 1);
    // The control plane forgets the node: the credential now fails.
    stub.registrations.fetch_add(100, Ordering::SeqCst);
    let before = stub.beats.lock().unwrap().len();
    eventually(
        "the agent registers again and heartbeats with the new credential",
        || {
            stub.registrations.load(Ordering::SeqCst) == 102
                && stub.beats.lock().unwrap().len() > before
        },
    )
    .await;
    agent.shutdown.cancel();
    agent.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_shipped_in_batches_under_the_servers_body_limit() {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    stub.set(1, vec![assignment("chatty", PartState::Assigned)]);
    stub.answer_watch.store(true, Ordering::SeqCst);
    let mut rt = FakeRuntime::new(
        PullScript::Progress {
            n: 0,
            every: Duration::ZERO,
        },
        ExitScript::After {
            delay: Duration::from_millis(50),
            code: 0,
            oom: false,
        },
    );
    rt.present.lock().unwrap().push(IMAGE.into());
    // 3 MB of output, and one line far over the per-line cap.
    rt.log_lines = (0..300)
        .map(|i| format!("{i:04} {}", "x".repeat(10_000)))
        .collect();
    rt.log_lines.push("y".repeat(100_000));
    let agent = start(server, Arc::new(rt), Duration::from_secs(5));
    eventually("the part's success is reported", || {
        stub.reported("chatty")
            .contains(&(PartState::Succeeded, Some(0)))
    })
    .await;
    let logs = stub.logs.lock().unwrap().clone();
    assert_eq!(
        logs.len(),
        301,
        "every line arrives, before the final state"
    );
    assert!(
        logs[..300]
            .iter()
            .enumerate()
            .all(|(i, l)| l.text.starts_with(&format!("{i:04} ")))
    );
    assert!(logs[300].text.len() <= daemon::MAX_LINE_BYTES + 20);
    assert!(logs[300].text.ends_with("[truncated]"));
    let bodies = stub.log_bodies.lock().unwrap().clone();
    assert!(bodies.len() >= 3, "{bodies:?}");
    assert!(
        bodies
            .iter()
            .all(|b| *b <= drover_api::wire::MAX_REQUEST_BYTES),
        "{bodies:?}"
    );
    agent.shutdown.cancel();
    agent.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preemption_notice_stops_parts_then_acknowledges_the_event() {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    stub.set(1, vec![assignment("spot", PartState::Assigned)]);
    stub.answer_watch.store(true, Ordering::SeqCst);
    let emulator = Emulator::new(EmulatorConfig::default());
    emulator.add_vm(VmSpec::new("vm-a")).unwrap();
    let imds_server = emulator.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let imds = ImdsClient::new(ImdsConfig {
        base_url: imds_server.base_url(),
        ..ImdsConfig::default()
    })
    .unwrap();
    let agent = start_with(
        server,
        fake(ExitScript::UntilStopped),
        Duration::from_secs(600),
        Some(known_vm(imds.clone(), "vm-a")),
    );
    eventually("the part runs", || {
        stub.reported("spot").contains(&(PartState::Running, None))
    })
    .await;
    let id = imds_server
        .emulator()
        .schedule_event(EventSpec::new(
            EventType::Preempt,
            "vm-a",
            Duration::from_secs(30),
        ))
        .unwrap();
    // Well before NotBefore: the part is stopped, the server told, the event acked.
    tokio::time::timeout(Duration::from_secs(15), agent.task)
        .await
        .expect("the agent drains and stops well before NotBefore")
        .unwrap()
        .unwrap();
    assert_eq!(agent.runtime.record().stopped.len(), 1);
    // Lost with SIGTERM's code (its VM goes away, its job did not end), and
    // its log says why.
    assert!(
        stub.reported("spot")
            .contains(&(PartState::Lost, Some(143)))
    );
    assert!(stub.logged(
        "spot",
        &format!("drover-agent: stopping the part: a scheduled Preempt (event {id}) not before")
    ));
    // The node says `preempted` (its job is requeued at once), never `leaving`.
    let states: Vec<Option<NodeState>> =
        stub.beats.lock().unwrap().iter().map(|b| b.state).collect();
    assert!(states.contains(&Some(NodeState::Preempted)), "{states:?}");
    assert!(!states.contains(&Some(NodeState::Leaving)), "{states:?}");
    let doc = imds.scheduled_events().await.unwrap();
    let event = doc.events.iter().find(|e| e.event_id == id).expect("event");
    assert_eq!(event.event_status, EventStatus::Started, "acknowledged");
}

/// IMDS whose instance metadata was read before start: the VM `name`.
fn known_vm(client: ImdsClient, name: &str) -> NodeImds {
    NodeImds {
        client,
        vm: Some(VmFacts {
            vm: VmInfo {
                name: name.to_string(),
                priority: "Spot".into(),
                ..VmInfo::default()
            },
            dedicated: false,
            ip: Some(VM_IP.into()),
        }),
        address_from_imds: true,
    }
}

/// A client of `url` with Microsoft's retry schedule (2, 4, 8, 16 s).
fn imds_client(url: String) -> ImdsClient {
    ImdsClient::new(ImdsConfig {
        base_url: url,
        ..ImdsConfig::default()
    })
    .unwrap()
}

/// A control plane assigning one long part `job`, a mock IMDS, and an agent
/// whose VM is known (SIGTERM gives parts `drain`), with the part running.
async fn running_with_mock(job: &str, drain: Duration) -> (Arc<Stub>, MockImds, Agent) {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    stub.set(1, vec![assignment(job, PartState::Assigned)]);
    stub.answer_watch.store(true, Ordering::SeqCst);
    let (mock, url) = MockImds::serve().await;
    let agent = start_with(
        server,
        fake(ExitScript::UntilStopped),
        drain,
        Some(known_vm(imds_client(url), VM)),
    );
    eventually("the part runs", || {
        stub.reported(job).contains(&(PartState::Running, None))
    })
    .await;
    (stub, mock, agent)
}

/// Waits for the agent to exit on its own.
async fn exits(agent: &mut Agent, within: Duration) {
    let task = std::mem::replace(&mut agent.task, tokio::spawn(async { Ok(()) }));
    tokio::time::timeout(within, task)
        .await
        .expect("the agent drains and exits in time")
        .unwrap()
        .unwrap();
}

const LONG: Duration = Duration::from_secs(600);

/// A Reboot whose `NotBefore` is ISO 8601, as Microsoft's mock server
/// writes it, lets the part run until shortly before it (not, as a misread
/// date did, stop it at once, 15 minutes early).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_with_an_iso_not_before_drains_until_shortly_before_it() {
    let (stub, mock, mut agent) = running_with_mock("long", LONG).await;
    let scheduled = Instant::now();
    let not_before = SystemTime::now() + Duration::from_secs(4);
    // Whole seconds, as the mock writes them: 3 to 4 s from now.
    let id = mock.schedule("Reboot", iso(not_before));
    eventually("the node says it is leaving", || {
        stub.states().contains(&Some(NodeState::Leaving))
    })
    .await;
    tokio::time::sleep_until((scheduled + Duration::from_millis(2500)).into()).await;
    assert!(
        agent.runtime.record().stopped.is_empty(),
        "still running well before NotBefore"
    );
    exits(&mut agent, Duration::from_secs(10)).await;
    assert!(
        scheduled.elapsed() < Duration::from_secs(6),
        "{:?}",
        scheduled.elapsed()
    );
    assert_eq!(agent.runtime.record().stopped.len(), 1);
    assert!(!stub.states().contains(&Some(NodeState::Preempted)));
    assert_eq!(mock.acknowledged(), vec![id], "approved once drained");
}

/// A `NotBefore` that is no date is taken as the 15 minutes of notice
/// Azure promises for a Reboot, not as "now".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_not_before_is_taken_as_the_documented_notice() {
    let (stub, mock, agent) = running_with_mock("long", Duration::from_millis(300)).await;
    mock.schedule("Reboot", "in a while".into());
    eventually("the node says it is leaving", || {
        stub.states().contains(&Some(NodeState::Leaving))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        agent.runtime.record().stopped.is_empty(),
        "not stopped at once"
    );
    // SIGTERM's deadline comes first: the part is stopped for it.
    agent.shutdown.cancel();
    agent.task.await.unwrap().unwrap();
    assert!(
        stub.reported("long")
            .contains(&(PartState::Stopped, Some(143)))
    );
}

/// A part stopped for a Reboot is reported before the agent exits: `lost`
/// with SIGTERM's exit code 143 (its job did not end; its VM goes away),
/// after a line in its log that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_stopped_for_a_reboot_is_reported_lost_with_its_code_and_why() {
    let (stub, mock, mut agent) = running_with_mock("j", LONG).await;
    let id = mock.schedule("Reboot", iso_in(Duration::from_secs(1)));
    exits(&mut agent, Duration::from_secs(10)).await;
    assert_eq!(agent.runtime.record().stopped.len(), 1);
    assert!(
        stub.reported("j").contains(&(PartState::Lost, Some(143))),
        "{:?}",
        stub.reported("j")
    );
    assert!(stub.logged(
        "j",
        &format!("drover-agent: stopping the part: a scheduled Reboot (event {id}) not before 20")
    ));
    assert!(
        !stub
            .reported("j")
            .contains(&(PartState::Running, Some(143)))
    );
    assert_eq!(mock.acknowledged(), vec![id]);
}

/// A Preempt during a Reboot drain stops the part at once and makes the
/// node say `preempted`; both events are approved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempt_during_a_reboot_drain_stops_parts_at_once() {
    let (stub, mock, mut agent) = running_with_mock("spot", LONG).await;
    let reboot = mock.schedule("Reboot", iso_in(Duration::from_secs(600)));
    eventually("the node says it is leaving", || {
        stub.states().contains(&Some(NodeState::Leaving))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(agent.runtime.record().stopped.is_empty());
    let preempt = mock.schedule("Preempt", iso_in(Duration::from_secs(30)));
    exits(&mut agent, Duration::from_secs(10)).await;
    assert_eq!(agent.runtime.record().stopped.len(), 1);
    assert!(stub.states().contains(&Some(NodeState::Preempted)));
    assert!(
        stub.reported("spot")
            .contains(&(PartState::Lost, Some(143)))
    );
    assert!(stub.logged(
        "spot",
        &format!("drover-agent: stopping the part: a scheduled Preempt (event {preempt})")
    ));
    let mut acked = mock.acknowledged();
    acked.sort();
    let mut want = vec![reboot, preempt];
    want.sort();
    assert_eq!(acked, want);
    assert_eq!(mock.posts().len(), 1, "one StartRequests for both");
}

/// A Reboot cancelled before its drain deadline ends the drain: the part
/// goes on, the node takes new work, and the agent keeps watching, so a
/// later event is acted on (and only that one approved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_reboot_ends_the_drain_and_later_events_are_still_seen() {
    let (stub, mock, mut agent) = running_with_mock("first", LONG).await;
    let reboot = mock.schedule("Reboot", iso_in(Duration::from_secs(600)));
    eventually("the node says it is leaving", || {
        stub.states().contains(&Some(NodeState::Leaving))
    })
    .await;
    mock.cancel(&reboot);
    let beats = stub.beats.lock().unwrap().len();
    eventually("the node no longer says it is leaving", || {
        let b = stub.beats.lock().unwrap();
        b.len() > beats && b.last().is_some_and(|b| b.state.is_none())
    })
    .await;
    stub.set(
        2,
        vec![
            assignment("first", PartState::Running),
            assignment("second", PartState::Assigned),
        ],
    );
    eventually("new work starts", || {
        stub.reported("second")
            .contains(&(PartState::Running, None))
    })
    .await;
    assert!(agent.runtime.record().stopped.is_empty(), "nothing stopped");
    let preempt = mock.schedule("Preempt", iso_in(Duration::from_secs(30)));
    exits(&mut agent, Duration::from_secs(10)).await;
    assert_eq!(agent.runtime.record().stopped.len(), 2);
    assert!(stub.states().contains(&Some(NodeState::Preempted)));
    assert_eq!(mock.acknowledged(), vec![preempt]);
}

/// Microsoft's mock renames an event when it starts: that is the Reboot
/// beginning (stop now), not a cancellation; a started event needs no
/// approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_started_under_a_new_id_stops_parts_rather_than_ending_the_drain() {
    let (stub, mock, mut agent) = running_with_mock("long", LONG).await;
    let reboot = mock.schedule("Reboot", iso_in(Duration::from_secs(600)));
    eventually("the node says it is leaving", || {
        stub.states().contains(&Some(NodeState::Leaving))
    })
    .await;
    let started = mock.start(&reboot);
    assert_ne!(started, reboot);
    exits(&mut agent, Duration::from_secs(10)).await;
    assert_eq!(agent.runtime.record().stopped.len(), 1);
    assert!(
        stub.reported("long")
            .contains(&(PartState::Lost, Some(143)))
    );
    assert!(stub.logged(
        "long",
        &format!("drover-agent: stopping the part: a Reboot (event {started}) has started")
    ));
    assert!(mock.posts().is_empty(), "nothing left to approve");
}

/// IMDS answering 410 at start-up (it does while being updated) no longer
/// leaves the node without metadata for good: the agent keeps asking, then
/// reports the VM and its address, starts later parts as spot parts, and
/// watches scheduled events, so a Preempt is acted on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imds_gone_at_start_up_is_retried_and_a_later_preempt_is_handled() {
    let stub = Arc::new(Stub::default());
    let server = serve(stub.clone()).await;
    stub.set(1, vec![]);
    stub.answer_watch.store(true, Ordering::SeqCst);
    let (mock, url) = MockImds::serve().await;
    mock.gone_for(Duration::from_millis(1500));
    // Microsoft's schedule scaled down 20x; 410 retried for 2 s a round.
    let client = ImdsClient::new(ImdsConfig {
        base_url: url,
        retry: RetryPolicy {
            delays: [100, 200, 400, 800]
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            gone_budget: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(1),
        },
        ..ImdsConfig::default()
    })
    .unwrap();
    // What `drover-agent run` passes when IMDS did not answer in time.
    let imds = NodeImds {
        client,
        vm: None,
        address_from_imds: true,
    };
    let mut agent = start_with(server, fake(ExitScript::UntilStopped), LONG, Some(imds));
    eventually("the node's vm and address reach the server", || {
        stub.beats.lock().unwrap().iter().any(|b| {
            b.ip.as_deref() == Some(VM_IP)
                && b.inventory
                    .as_ref()
                    .and_then(|i| i.vm.as_ref())
                    .is_some_and(|vm| vm.name == VM && vm.priority == "Spot")
        })
    })
    .await;
    assert!(mock.instance_gets() > 1, "asked again after the 410s");
    stub.set(2, vec![assignment("spot", PartState::Assigned)]);
    eventually("the part runs", || {
        stub.reported("spot").contains(&(PartState::Running, None))
    })
    .await;
    let env = agent.runtime.record().created[0].env.clone();
    assert!(
        env.contains(&"AZ_BATCH_NODE_IS_DEDICATED=false".to_string()),
        "{env:?}"
    );
    assert!(mock.event_gets() > 0, "scheduled events are watched");
    let preempt = mock.schedule("Preempt", iso_in(Duration::from_secs(30)));
    exits(&mut agent, Duration::from_secs(10)).await;
    assert_eq!(agent.runtime.record().stopped.len(), 1);
    assert!(stub.states().contains(&Some(NodeState::Preempted)));
    assert_eq!(mock.acknowledged(), vec![preempt]);
}

/// After an IMDS outage the agent sees a Preempt within about a second of
/// IMDS answering again, not at the end of the client's backoff step
/// (Microsoft's schedule retries at 2, 6, 14 and 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_imds_outage_a_preempt_is_seen_within_a_second() {
    let (stub, mock, mut agent) = running_with_mock("spot", LONG).await;
    let outage = Duration::from_secs(3);
    mock.failing_for(outage);
    let began = Instant::now();
    mock.schedule("Preempt", iso_in(Duration::from_secs(30)));
    eventually("the node says preempted", || {
        stub.states().contains(&Some(NodeState::Preempted))
    })
    .await;
    let late = began.elapsed().saturating_sub(outage);
    assert!(
        late < Duration::from_millis(1800),
        "seen {late:?} after IMDS recovered"
    );
    exits(&mut agent, Duration::from_secs(10)).await;
}
