//! `drover server` over real HTTP on a free 127.0.0.1 port, with a temp data
//! dir: authentication, clusters, jobs, a fake agent registering, heart-
//! beating and long-polling its assignments, node loss and restarts.

use std::path::Path;
use std::time::{Duration, Instant};

use drover_api::JobSpec;
use drover_api::cluster::{JobState, NodeState};
use drover_api::compute::ComputeSpec;
use drover_api::wire::{self, ErrorBody, ErrorCode};
use drover_control::server::{self, RunningServer, ServerConfig};
use reqwest::StatusCode;
use serde_json::json;

/// A server on a free port. The grace period is the default 40 s, so that
/// nodes of tests that do not heartbeat stay alive on a loaded machine; the
/// node-loss test shortens it.
fn config(dir: &Path) -> ServerConfig {
    let mut c = ServerConfig::new(dir.to_path_buf());
    c.listen = "127.0.0.1:0".parse().expect("addr");
    c.check_interval = Duration::from_millis(200);
    c
}

struct Api {
    base: String,
    http: reqwest::Client,
    token: String,
}

impl Api {
    fn new(server: &RunningServer, token: &str) -> Api {
        Api {
            base: format!("http://{}", server.addr),
            http: reqwest::Client::new(),
            token: token.to_string(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        token: Option<&str>,
    ) -> (StatusCode, serde_json::Value) {
        let req = match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let body = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("json body: {text}"))
        };
        (status, body)
    }

    async fn get(&self, path: &str) -> (StatusCode, serde_json::Value) {
        self.send(self.http.get(self.url(path)), Some(&self.token))
            .await
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
        self.send(
            self.http.post(self.url(path)).json(&body),
            Some(&self.token),
        )
        .await
    }

    async fn agent_post(
        &self,
        cred: &str,
        path: &str,
        body: serde_json::Value,
    ) -> (StatusCode, serde_json::Value) {
        self.send(self.http.post(self.url(path)).json(&body), Some(cred))
            .await
    }

    async fn create_cluster(&self, name: &str, max: u32) -> String {
        let spec = ComputeSpec::new(name, "STANDARD_D3_V2", max);
        let (status, body) = self.post("/v1/clusters", json!({ "spec": spec })).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let created: wire::ClusterCreated = serde_json::from_value(body).expect("created");
        created.join_token
    }

    async fn register(&self, cluster: &str, join: &str, id: &str) -> String {
        let (status, body) = self
            .send(
                self.http.post(self.url("/v1/agent/register")).json(&json!({
                    "cluster": cluster, "join_token": join, "node_id": id,
                    "ip": "10.0.0.4", "gpus": {"healthy": 0, "total": 0},
                    "inventory": {"cpus": 4}
                })),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let r: wire::RegisterResponse = serde_json::from_value(body).expect("register");
        assert_eq!(r.node_id, id);
        r.credential
    }

    async fn submit(&self, yaml: &str, compute: Option<&str>) -> (StatusCode, serde_json::Value) {
        let spec = JobSpec::from_yaml("job.yml", yaml, Path::new("/tmp"))
            .expect("job parses")
            .spec;
        self.post("/v1/jobs", json!({ "spec": spec, "compute": compute }))
            .await
    }

    async fn job(&self, id: &str) -> wire::JobInfo {
        let (status, body) = self.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value(body).expect("job")
    }

    async fn watch(&self, cred: &str, version: u64, timeout: f64) -> wire::Assignments {
        let (status, body) = self
            .send(
                self.http.get(self.url(&format!(
                    "/v1/agent/assignments?version={version}&timeout={timeout}"
                ))),
                Some(cred),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value(body).expect("assignments")
    }

    /// Polls a job until `pred` holds, or fails after `within`.
    async fn wait_job(
        &self,
        id: &str,
        within: Duration,
        pred: impl Fn(&wire::JobInfo) -> bool,
    ) -> wire::JobInfo {
        let start = Instant::now();
        loop {
            let job = self.job(id).await;
            if pred(&job) {
                return job;
            }
            assert!(start.elapsed() < within, "job never got there: {job:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn error_of(body: &serde_json::Value) -> wire::ErrorDetail {
    serde_json::from_value::<ErrorBody>(body.clone())
        .unwrap_or_else(|e| panic!("error body {body}: {e}"))
        .error
}

fn job_yaml(name: &str, instances: u32) -> String {
    format!(
        "name: {name}\ncommand: echo hi\nenvironment:\n  image: busybox:latest\n\
         compute: azureml:cpu\nresources:\n  instance_count: {instances}\n"
    )
}

async fn start(dir: &Path) -> (RunningServer, String) {
    start_with(config(dir)).await
}

async fn start_with(config: ServerConfig) -> (RunningServer, String) {
    let dir = config.data_dir.clone();
    let server = server::start(config).await.expect("server starts");
    let token = std::fs::read_to_string(dir.join(server::ADMIN_TOKEN_FILE))
        .expect("admin token file")
        .trim()
        .to_string();
    (server, token)
}

/// A server with the given grace, cluster `cpu` with node `n1` registered
/// (its credential returned) and job `train` (1 instance) submitted.
async fn one_node_one_job(dir: &Path, grace: Duration) -> (RunningServer, Api, String) {
    let mut c = config(dir);
    c.grace = grace;
    let (server, token) = start_with(c).await;
    let api = Api::new(&server, &token);
    let join = api.create_cluster("cpu", 2).await;
    let cred = api.register("cpu", &join, "n1").await;
    let (status, body) = api.submit(&job_yaml("train", 1), None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    (server, api, cred)
}

async fn stop(server: RunningServer) {
    server.shutdown();
    tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("server stops in time")
        .expect("server stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_is_required_and_each_credential_opens_only_its_door() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, token) = start(dir.path()).await;
    assert_eq!(server.new_admin_token.as_deref(), Some(token.as_str()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(server::ADMIN_TOKEN_FILE))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let api = Api::new(&server, &token);

    let (status, body) = api.send(api.http.get(api.url("/v1/clusters")), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&body).code, ErrorCode::Unauthorized);
    assert_eq!(error_of(&body).message, "missing bearer token");
    let (status, body) = api
        .send(api.http.get(api.url("/v1/clusters")), Some("not-a-token"))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&body).message, "invalid api token");
    let (status, _) = api.get("/v1/clusters").await;
    assert_eq!(status, StatusCode::OK);

    let cpu_join = api.create_cluster("cpu", 2).await;
    let gpu_join = api.create_cluster("gpu", 2).await;
    // A join token opens only its own cluster.
    let (status, body) = api
        .send(
            api.http.post(api.url("/v1/agent/register")).json(&json!({
                "cluster": "cpu", "join_token": gpu_join, "node_id": "n1"
            })),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        error_of(&body).message,
        "invalid join token for cluster `cpu`"
    );
    let cred = api.register("cpu", &cpu_join, "n1").await;
    // Node credentials are not user tokens, and user tokens are not node credentials.
    let (status, _) = api
        .send(api.http.get(api.url("/v1/clusters")), Some(&cred))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api
        .agent_post(&token, "/v1/agent/heartbeat", json!({}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = api
        .agent_post(&cred, "/v1/agent/heartbeat", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, body) = api.get("/v1/nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&body).code, ErrorCode::NotFound);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_are_created_shown_updated_and_deleted_with_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, token) = start(dir.path()).await;
    let api = Api::new(&server, &token);

    api.create_cluster("cpu", 4).await;
    let spec = ComputeSpec::new("cpu", "STANDARD_D3_V2", 4);
    let (status, body) = api.post("/v1/clusters", json!({ "spec": spec })).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_of(&body).message, "cluster `cpu` already exists");

    let mut bad = ComputeSpec::new("bad", "STANDARD_D3_V2", 1);
    bad.min_nodes = 3;
    let (status, body) = api.post("/v1/clusters", json!({ "spec": bad })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let e = error_of(&body);
    assert_eq!(e.code, ErrorCode::Invalid);
    assert!(e.message.contains("max_nodes"), "{}", e.message);

    let huge = "x".repeat(wire::MAX_REQUEST_BYTES + 1);
    let (status, body) = api.post("/v1/clusters", json!({ "spec": huge })).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(error_of(&body).code, ErrorCode::TooLarge);

    // The App Service protocol switch is a boolean, and only that.
    let mut switched =
        serde_json::to_value(ComputeSpec::new("as", "STANDARD_D3_V2", 1)).expect("json");
    switched["app_service_identity"] = json!("no");
    let (status, body) = api.post("/v1/clusters", json!({ "spec": switched })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        error_of(&body).message.contains("app_service_identity"),
        "{body}"
    );
    switched["app_service_identity"] = json!(false);
    let (status, body) = api.post("/v1/clusters", json!({ "spec": switched })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, body) = api.get("/v1/clusters/as").await;
    assert_eq!(body["spec"]["app_service_identity"], false, "{body}");
    let (status, body) = api
        .send(api.http.delete(api.url("/v1/clusters/as")), Some(&token))
        .await;
    assert!(status.is_success(), "{body}");

    let (status, body) = api.post("/v1/clusters", json!({ "spec": 1 })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&body).message.starts_with("invalid request body"),
        "{body}"
    );

    let (status, body) = api.get("/v1/clusters/cpu").await;
    assert_eq!(status, StatusCode::OK);
    let info: wire::ClusterInfo = serde_json::from_value(body).expect("info");
    assert_eq!(info.spec.max_nodes, 4);
    assert_eq!(info.status.current_node_count, 0);
    assert_eq!(info.status.target_node_count, 0);

    let (status, body) = api
        .send(
            api.http
                .patch(api.url("/v1/clusters/cpu"))
                .json(&json!({"max_nodes": 6, "idle_seconds_before_scaledown": 30})),
            Some(&token),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let info: wire::ClusterInfo = serde_json::from_value(body).expect("info");
    assert_eq!(
        (info.spec.max_nodes, info.spec.idle_seconds_before_scaledown),
        (6, 30)
    );
    for (update, needle) in [
        (json!({"min_nodes": 7}), "min_nodes"),
        (json!({}), "give at least one of"),
    ] {
        let (status, body) = api
            .send(
                api.http.patch(api.url("/v1/clusters/cpu")).json(&update),
                Some(&token),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{update}");
        assert!(error_of(&body).message.contains(needle), "{body}");
    }

    let (status, body) = api.get("/v1/clusters").await;
    assert_eq!(status, StatusCode::OK);
    let list: wire::ClusterList = serde_json::from_value(body).expect("list");
    assert_eq!(list.clusters.len(), 1);

    let (status, body) = api
        .send(api.http.delete(api.url("/v1/clusters/cpu")), Some(&token))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"cluster": "cpu", "removed_nodes": [], "canceled_jobs": []})
    );
    let (status, body) = api.get("/v1/clusters/cpu").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&body).message, "cluster `cpu` not found");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_that_can_never_run_are_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, token) = start(dir.path()).await;
    let api = Api::new(&server, &token);
    api.create_cluster("cpu", 2).await;

    let (status, body) = api.submit(&job_yaml("big", 3), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let e = error_of(&body);
    assert!(
        e.message.contains("needs 3 nodes") && e.message.contains("max_nodes"),
        "{}",
        e.message
    );

    let (status, body) = api.submit(&job_yaml("lost", 1), Some("nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&body).message, "cluster `nope` not found");

    let yaml = "command: echo\nenvironment:\n  image: busybox\n";
    let (status, body) = api.submit(yaml, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&body).message.contains("names no cluster"),
        "{body}"
    );

    let (status, body) = api.post("/v1/jobs", json!({"spec": {"command": 1}})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&body).message.starts_with("invalid request body"));

    // A job without a name gets one.
    let (status, body) = api.submit(yaml, Some("cpu")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let job: wire::JobInfo = serde_json::from_value(body).expect("job");
    assert!(job.id.starts_with("job-"), "{}", job.id);
    assert_eq!(job.state, JobState::Queued);

    // With no node to run it, the static provider says what would help,
    // and the cluster shows Resizing with that reason.
    let start = Instant::now();
    let info = loop {
        let (_, body) = api.get("/v1/clusters/cpu").await;
        let info: wire::ClusterInfo = serde_json::from_value(body).expect("info");
        if !info.status.errors.is_empty() {
            break info;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        info.status.allocation_state,
        drover_api::cluster::AllocationState::Resizing
    );
    assert_eq!(
        (
            info.status.current_node_count,
            info.status.target_node_count
        ),
        (0, 1)
    );
    assert!(
        info.status.errors[0]
            .message
            .contains("the static provider cannot create nodes"),
        "{:?}",
        info.status.errors
    );
    let (status, body) = api.submit(&job_yaml(&job.id, 1), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    let (status, body) = api.get("/v1/jobs/missing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&body).message, "job `missing` not found");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_wakes_the_nodes_long_poll_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, token) = start(dir.path()).await;
    let api = Api::new(&server, &token);
    let join = api.create_cluster("cpu", 2).await;
    let cred = api.register("cpu", &join, "n1").await;

    // First poll answers at once (version 0 is older than any node's).
    let first = api.watch(&cred, 0, 5.0).await;
    assert!(first.version > 0);
    assert!(first.parts.is_empty());

    // A quiet poll waits its timeout.
    let t = Instant::now();
    let quiet = api.watch(&cred, first.version, 0.3).await;
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(quiet.version, first.version);

    let watcher = {
        let (http, url, cred) = (
            api.http.clone(),
            api.url(&format!(
                "/v1/agent/assignments?version={}&timeout=20",
                first.version
            )),
            cred.clone(),
        );
        tokio::spawn(async move {
            let resp = http.get(url).bearer_auth(cred).send().await.expect("watch");
            let a: wire::Assignments = resp.json().await.expect("assignments");
            (a, Instant::now())
        })
    };
    // Let the poll reach its wait.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let submitted = Instant::now();
    let (status, body) = api.submit(&job_yaml("train", 1), None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (assigned, woke) = watcher.await.expect("watcher");
    let latency = woke.duration_since(submitted);
    eprintln!("watch returned {latency:?} after the submission");
    assert!(latency < Duration::from_secs(2), "{latency:?}");
    assert!(assigned.version > first.version);
    assert_eq!(assigned.parts.len(), 1);
    let part = &assigned.parts[0];
    assert_eq!(
        (
            part.part.job.as_str(),
            part.part.attempt,
            part.part.node_rank
        ),
        ("train", 1, 0)
    );
    assert_eq!(part.state, wire::PartState::Assigned);
    assert_eq!(part.nodes[0].ip.as_deref(), Some("10.0.0.4"));

    // The agent reports the part running: the job runs.
    let running =
        json!({"parts": [{"job": "train", "attempt": 1, "node_rank": 0, "state": "running"}]});
    let (status, body) = api.agent_post(&cred, "/v1/agent/heartbeat", running).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let job = api.job("train").await;
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.parts[0].state, wire::PartState::Running);

    // Logs go up through the agent and come back to the user.
    let lines = json!({"lines": [
        {"job": "train", "attempt": 1, "node_rank": 0, "stream": "stdout", "at": 1, "text": "epoch 1"},
        {"job": "train", "attempt": 1, "node_rank": 0, "stream": "stderr", "at": 2, "text": "warn"}
    ]});
    let (status, body) = api.agent_post(&cred, "/v1/agent/logs", lines).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 2);
    let (status, body) = api.get("/v1/jobs/train/logs?from=0").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let page: wire::LogPage = serde_json::from_value(body).expect("page");
    let texts: Vec<&str> = page.lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["epoch 1", "warn"]);
    assert_eq!(page.job_state, JobState::Running);

    // Cancel: the job ends, the node's poll answers at once with nothing to run.
    let (status, body) = api.post("/v1/jobs/train/cancel", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let job: wire::JobInfo = serde_json::from_value(body).expect("job");
    assert_eq!(job.state, JobState::Canceled);
    let t = Instant::now();
    let after = api.watch(&cred, assigned.version, 10.0).await;
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(after.parts.is_empty());
    let (status, body) = api.post("/v1/jobs/train/cancel", json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // A late report of the canceled part is refused: the agent must stop it.
    let late =
        json!({"parts": [{"job": "train", "attempt": 1, "node_rank": 0, "state": "running"}]});
    let (status, body) = api.agent_post(&cred, "/v1/agent/heartbeat", late).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let beat: wire::HeartbeatResponse = serde_json::from_value(body).expect("beat");
    assert_eq!(beat.rejected.len(), 1);

    let (status, body) = api.get("/v1/nodes?compute=cpu").await;
    assert_eq!(status, StatusCode::OK);
    let nodes: wire::NodeList = serde_json::from_value(body).expect("nodes");
    assert_eq!(nodes.nodes.len(), 1);
    assert_eq!(nodes.nodes[0].current_job, None);

    // Shutdown ends a waiting long poll instead of waiting out its timeout.
    let pending = {
        let (http, url, cred) = (
            api.http.clone(),
            api.url(&format!(
                "/v1/agent/assignments?version={}&timeout=60",
                after.version
            )),
            cred.clone(),
        );
        tokio::spawn(async move { http.get(url).bearer_auth(cred).send().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    stop(server).await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let resp = pending.await.expect("join").expect("answered");
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_becomes_unusable_and_its_job_is_requeued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, api, cred) = one_node_one_job(dir.path(), Duration::from_secs(2)).await;
    // Placed (and maybe already lost again on a slow machine).
    api.wait_job("train", Duration::from_secs(5), |j| j.attempt >= 1)
        .await;

    // No more heartbeats: past the 2 s grace the node is lost.
    let job = api
        .wait_job("train", Duration::from_secs(8), |j| {
            j.state == JobState::Queued
        })
        .await;
    assert_eq!(job.attempt, 1);
    assert_eq!(job.parts[0].state, wire::PartState::Lost);
    assert!(
        job.failure_reason
            .as_deref()
            .is_some_and(|r| r.contains("no heartbeat")),
        "{job:?}"
    );
    let (_, body) = api.get("/v1/nodes").await;
    let nodes: wire::NodeList = serde_json::from_value(body).expect("nodes");
    assert_eq!(nodes.nodes[0].state, NodeState::Unusable);
    let (_, body) = api.get("/v1/clusters/cpu").await;
    let info: wire::ClusterInfo = serde_json::from_value(body).expect("info");
    assert_eq!(info.status.node_state_counts.unusable, 1);

    // Heard from again, the node is usable and the job goes back on it.
    let (status, _) = api
        .agent_post(&cred, "/v1/agent/heartbeat", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let job = api
        .wait_job("train", Duration::from_secs(5), |j| {
            j.state == JobState::Preparing
        })
        .await;
    assert_eq!(job.attempt, 2);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_past_its_timeout_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, token) = start(dir.path()).await;
    let api = Api::new(&server, &token);
    let join = api.create_cluster("cpu", 1).await;
    let cred = api.register("cpu", &join, "n1").await;
    let yaml = format!("{}limits:\n  timeout: 1\n", job_yaml("short", 1));
    let (status, body) = api.submit(&yaml, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    api.wait_job("short", Duration::from_secs(5), |j| {
        j.state == JobState::Preparing
    })
    .await;
    let running =
        json!({"parts": [{"job": "short", "attempt": 1, "node_rank": 0, "state": "running"}]});
    let (status, _) = api.agent_post(&cred, "/v1/agent/heartbeat", running).await;
    assert_eq!(status, StatusCode::OK);
    let job = api
        .wait_job("short", Duration::from_secs(5), |j| {
            j.state == JobState::Failed
        })
        .await;
    assert!(
        job.failure_reason
            .as_deref()
            .is_some_and(|r| r.contains("timed out")),
        "{job:?}"
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_clusters_jobs_and_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, token) = start(dir.path()).await;
    let api = Api::new(&server, &token);
    let join = api.create_cluster("cpu", 2).await;
    let (status, _) = api.submit(&job_yaml("train", 2), None).await;
    assert_eq!(status, StatusCode::CREATED);
    stop(server).await;

    let server = server::start(config(dir.path())).await.expect("restart");
    assert_eq!(server.new_admin_token, None, "the first token stays");
    let api = Api::new(&server, &token);
    let (status, body) = api.get("/v1/clusters/cpu").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(api.job("train").await.state, JobState::Queued);
    // The join token survives too.
    api.register("cpu", &join, "n1").await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_can_move_only_its_own_parts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, token) = start(dir.path()).await;
    let api = Api::new(&server, &token);
    let join = api.create_cluster("cpu", 2).await;
    let a = api.register("cpu", &join, "a").await;
    let b = api.register("cpu", &join, "b").await;
    let (status, _) = api.submit(&job_yaml("train", 1), None).await;
    assert_eq!(status, StatusCode::CREATED);
    let job = api
        .wait_job("train", Duration::from_secs(5), |j| {
            j.state == JobState::Preparing
        })
        .await;
    let (owner, other) = if job.parts[0].node == "a" {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let running =
        json!({"parts": [{"job": "train", "attempt": 1, "node_rank": 0, "state": "running"}]});
    let (status, body) = api
        .agent_post(other, "/v1/agent/heartbeat", running.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let beat: wire::HeartbeatResponse = serde_json::from_value(body).expect("beat");
    assert_eq!(beat.rejected.len(), 1);
    assert_eq!(api.job("train").await.state, JobState::Preparing);
    // Nor write its logs.
    let lines = json!({"lines": [{"job": "train", "attempt": 1, "node_rank": 0,
                                   "stream": "stdout", "at": 1, "text": "x"}]});
    let (status, body) = api.agent_post(other, "/v1/agent/logs", lines).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    let (status, body) = api.agent_post(owner, "/v1/agent/heartbeat", running).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(api.job("train").await.state, JobState::Running);

    // Agents cannot set arbitrary node states.
    let (status, body) = api
        .agent_post(owner, "/v1/agent/heartbeat", json!({"state": "idle"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = api
        .agent_post(other, "/v1/agent/heartbeat", json!({"state": "leaving"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_heartbeat_requeues_the_job_at_once_and_the_node_stays_preempted() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Long grace: only the agent's word can requeue within the test.
    let (server, api, cred) = one_node_one_job(dir.path(), Duration::from_secs(600)).await;
    api.wait_job("train", Duration::from_secs(5), |j| {
        j.attempt == 1 && j.state == JobState::Preparing
    })
    .await;

    let (status, body) = api
        .agent_post(&cred, "/v1/agent/heartbeat", json!({"state": "preempted"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let job = api
        .wait_job("train", Duration::from_secs(2), |j| {
            j.state == JobState::Queued
        })
        .await;
    assert_eq!(job.parts[0].state, wire::PartState::Lost);
    assert!(
        job.failure_reason
            .as_deref()
            .is_some_and(|r| r.contains("preempted")),
        "{job:?}"
    );
    // Its last words (`leaving`, the stopped part) do not revive it.
    let (status, body) = api
        .agent_post(
            &cred,
            "/v1/agent/heartbeat",
            json!({"state": "leaving", "parts": [{"job": "train", "attempt": 1, "node_rank": 0, "state": "stopped"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, body) = api.get("/v1/nodes").await;
    let nodes: wire::NodeList = serde_json::from_value(body).expect("nodes");
    assert_eq!(nodes.nodes[0].state, NodeState::Preempted);
    assert_eq!(api.job("train").await.state, JobState::Queued);

    // Evicting a node of a static cluster is refused with what to do.
    let (status, body) = api.post("/v1/nodes/n1/evict", json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        error_of(&body).message.contains("only the local provider"),
        "{body}"
    );
    stop(server).await;
}

/// A job as a hand-written body would have it: the fields that matter here.
fn raw_job(extra: serde_json::Value) -> serde_json::Value {
    let mut job = json!({"command": "echo hi", "image": "busybox:latest", "compute": "cpu"});
    let (serde_json::Value::Object(j), serde_json::Value::Object(e)) = (&mut job, extra) else {
        panic!("objects");
    };
    j.extend(e);
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_door_refuses_over_raw_http_what_the_rules_refuse_and_runs_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let allowed = tempfile::tempdir().expect("allowed dir");
    let allowed_path = std::fs::canonicalize(allowed.path()).expect("canonical");
    let data_dir = std::fs::canonicalize(dir.path()).expect("canonical");
    let (server, token) = start(dir.path()).await;
    let api = Api::new(&server, &token);
    let mut spec = ComputeSpec::new("cpu", "STANDARD_D3_V2", 2);
    spec.allowed_host_paths = vec![allowed_path.display().to_string()];
    let (status, body) = api.post("/v1/clusters", json!({ "spec": spec })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let created: wire::ClusterCreated = serde_json::from_value(body).expect("created");
    // A node whose agent keeps its data under the allowed prefix.
    let agent_dir = allowed_path.join("agent-data");
    let (status, body) = api
        .send(
            api.http.post(api.url("/v1/agent/register")).json(&json!({
                "cluster": "cpu", "join_token": created.join_token, "node_id": "n1",
                "inventory": {"agent": {"version": "0.1.0", "data_dir": agent_dir}}
            })),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let mount = |source: &str| json!({"drover": {"mounts": [{"source": source, "target": "/m"}]}});
    let args = |a: serde_json::Value| json!({"resources": {"docker_args": a}});
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            args(json!({"ipc": "host"})),
            "resources.docker_args.ipc: --ipc=host is not allowed",
        ),
        (
            args(json!({"ipc": "container:x"})),
            "resources.docker_args.ipc: --ipc=container:x is not allowed",
        ),
        (
            mount("/var/run/docker.sock"),
            "drover.mounts[0].source: is never allowed: /var/run/docker.sock is a container engine's socket",
        ),
        (
            mount("/"),
            "drover.mounts[0].source: is never allowed: / is the whole node",
        ),
        (
            mount("/etc"),
            "drover.mounts[0].source: is never allowed: /etc is under /etc",
        ),
        (
            mount("/var/lib/drover/node-credential.json"),
            "drover.mounts[0].source: is never allowed",
        ),
        (
            mount(&data_dir.join("drover.db").display().to_string()),
            "drover.mounts[0].source: is never allowed",
        ),
        (
            mount("/home/someone"),
            "drover.mounts[0].source: /home/someone is not under a host path cluster cpu allows",
        ),
        (
            mount(&format!("{}/../etc", allowed_path.display())),
            "contains `..`",
        ),
        (json!({"privileged": true}), "privileged: unknown field"),
        (
            args(json!({"privileged": true})),
            "resources.docker_args.privileged: unknown field",
        ),
        (
            args(json!({"pid": "host"})),
            "resources.docker_args.pid: unknown field",
        ),
        (
            args(json!({"network": "host"})),
            "resources.docker_args.network: unknown field",
        ),
        (
            args(json!({"cap_add": ["SYS_ADMIN"]})),
            "resources.docker_args.cap_add: unknown field",
        ),
        (
            json!({"drover": {"devices": ["/dev/sda"]}}),
            "drover.devices: unknown field",
        ),
        (
            args(json!({"labels": [["drover.job", "other"]]})),
            "resources.docker_args.labels[0]: --label drover.job: the drover. label prefix is reserved",
        ),
        (
            args(json!({"env": [["A=B", "x"]]})),
            "resources.docker_args.env[0]: --env: `A=B` is not a valid environment variable name",
        ),
        (
            json!({"environment_variables": {"A=B": "x"}}),
            "environment_variables.A=B: `A=B` is not a valid environment variable name",
        ),
        (
            args(json!({"cpuset_cpus": "--privileged"})),
            "resources.docker_args.cpuset_cpus: --cpuset-cpus: expected CPU numbers",
        ),
        (
            args(json!({"user": "--privileged"})),
            "resources.docker_args.user: --user: expected NAME|UID[:GROUP|GID]",
        ),
        (
            args(json!({"tmpfs": [["relative", ""]]})),
            "resources.docker_args.tmpfs[0]: --tmpfs expects an absolute path",
        ),
        (
            args(json!({"workdir": "x"})),
            "resources.docker_args.workdir: --workdir: expected an absolute path",
        ),
        (
            args(json!({"memory": 1})),
            "resources.docker_args.memory: --memory: must be at least 6 MiB",
        ),
        (
            args(json!({"cpus": 1e9})),
            "resources.docker_args.cpus: --cpus: must be between 0.01 and 4096",
        ),
        (
            args(json!({"stop_timeout": 18446744073709551615u64})),
            "resources.docker_args.stop_timeout: --stop-timeout: must be at most 3600 seconds",
        ),
        (
            args(json!({"pids_limit": -1})),
            "resources.docker_args.pids_limit: --pids-limit: must be between 1 and 4194304",
        ),
        (
            json!({"distribution": {"kind": "mpi", "process_count_per_instance": 4294967295u32}}),
            "distribution.process_count_per_instance: must be between 1 and 1024",
        ),
        (
            json!({"distribution": {"kind": "tensorflow", "worker_count": 3}, "resources": {"instance_count": 2}}),
            "distribution.worker_count: worker_count + parameter_server_count (3 + 0) must be a multiple of resources.instance_count (2)",
        ),
        (
            json!({"distribution": {"kind": "tensorflow", "worker_count": 0, "process_count_per_instance": 1}}),
            "distribution.worker_count: worker_count + parameter_server_count (0 + 0) must be a multiple",
        ),
        (
            json!({"distribution": {"kind": "horovod"}}),
            "distribution.kind: unknown variant `horovod`",
        ),
        (
            json!({"identity": {"type": "user_identity"}}),
            "identity.type: user_identity is not supported: Drover holds no user tokens",
        ),
        (
            json!({"identity": {"type": "aml_token"}}),
            "identity.type: aml_token is not supported",
        ),
        (
            json!({"identity": {"type": "managed", "client_id": "not-a-guid"}}),
            "identity.client_id: `not-a-guid` is not a GUID",
        ),
        (
            json!({"identity": {"type": "managed"}}),
            "identity: cluster cpu has no managed identity for the job to use",
        ),
        (
            json!({"identity": {"type": "managed", "scope": "all"}}),
            "identity.scope: unknown field",
        ),
        (
            json!({"resources": {"instance_count": 0}}),
            "resources.instance_count: must be between 1 and 10000",
        ),
        (
            json!({"resources": {"shm_size": 18446744073709551615u64}}),
            "resources.shm_size: must be at most 64 TiB",
        ),
        (json!({"command": ""}), "command: is required"),
        (
            json!({"command": "echo \u{0} x"}),
            "command: contains a NUL byte",
        ),
        (
            json!({"image": null}),
            "image: invalid type: null, expected a string",
        ),
        (json!({"image": ""}), "image: is required"),
        (
            json!({"image": "Bad Image"}),
            "image: `Bad Image` is not a valid image reference",
        ),
        (
            json!({"name": "has space"}),
            "name: `has space` is not a valid job name",
        ),
        (
            json!({"code": "/"}),
            "code: is never allowed: / is the whole node",
        ),
        (
            json!({"outputs": {"o": {"path": "/etc"}}}),
            "outputs.o.path: is never allowed: /etc is under /etc",
        ),
        (
            json!({"inputs": {"i": {"kind": "path", "path_kind": "uri_folder", "path": "/proc"}}}),
            "inputs.i.path: is never allowed",
        ),
        (
            json!({"drover": {"registry_credentials": {"login": {"registry": null, "username": "u", "password": {"env": "DROVER_JOIN_TOKEN"}}}}}),
            "drover.registry_credentials.password_env: `DROVER_JOIN_TOKEN` would be read from the agent's environment",
        ),
        (
            json!({"drover": {"registry_credentials": {"login": {"registry": null, "username": "u", "password": {"file": "/etc/shadow"}}}}}),
            "drover.registry_credentials.password_file: is never allowed",
        ),
        (
            json!({"format": 99}),
            "format: the job was written in format 99 by a newer drover",
        ),
        (
            json!({"type": "sweep"}),
            "type: job type `sweep` is not supported",
        ),
        (
            json!({"timeout_seconds": 0}),
            "limits.timeout: must be between 1 second",
        ),
    ];
    for (extra, expect) in cases {
        let (status, body) = api
            .post("/v1/jobs", json!({ "spec": raw_job(extra.clone()) }))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {body}");
        let e = error_of(&body);
        assert_eq!(e.code, ErrorCode::Invalid);
        assert!(
            e.message.contains(expect),
            "{extra}:\n  got {}\n  expected {expect}",
            e.message
        );
    }
    // The submission around the job is strict too.
    let (status, body) = api
        .post(
            "/v1/jobs",
            json!({ "spec": raw_job(json!({})), "priority": 1 }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&body).message.contains("priority: unknown field"),
        "{body}"
    );
    let (_, body) = api.get("/v1/jobs").await;
    assert_eq!(body["jobs"], json!([]), "a refused job is not stored");

    // Under the allowed prefix the same mount is accepted, and a minimal
    // hand-written body is a whole job.
    let ok = allowed_path.join("data");
    let (status, body) = api
        .post(
            "/v1/jobs",
            json!({ "spec": raw_job(mount(&ok.display().to_string())) }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let job: wire::JobInfo = serde_json::from_value(body).expect("job");
    let spec = job.spec.expect("spec").into_command().expect("command job");
    assert_eq!(spec.drover.mounts[0].source, ok);
    assert_eq!(spec.resources.instance_count, 1);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_path_prefixes_are_checked_when_a_cluster_is_defined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, token) = start(dir.path()).await;
    let api = Api::new(&server, &token);
    for (prefix, expect) in [
        (
            "/",
            "allowed_host_paths: / cannot be allowed: / is the whole node",
        ),
        (
            "/etc",
            "allowed_host_paths: /etc cannot be allowed: /etc is under /etc",
        ),
        (
            "/var",
            "allowed_host_paths: /var cannot be allowed: /var contains /var/run",
        ),
        ("data", "allowed_host_paths: data is not an absolute path"),
    ] {
        let mut spec = ComputeSpec::new("cpu", "STANDARD_D3_V2", 2);
        spec.allowed_host_paths = vec![prefix.to_string()];
        let (status, body) = api.post("/v1/clusters", json!({ "spec": spec })).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{prefix}");
        assert!(error_of(&body).message.contains(expect), "{body}");
    }
    let (status, body) = api
        .post(
            "/v1/clusters",
            json!({"spec": {"name": "cpu", "max_nodes": 1, "allow_host_path": ["/data"]}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&body)
            .message
            .contains("spec.allow_host_path: unknown field"),
        "{body}"
    );
    let (status, body) = api
        .post(
            "/v1/clusters",
            json!({"spec": {"name": "cpu", "max_nodes": 4294967295u32}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&body)
            .message
            .contains("max_nodes: must be at most 10000, got 4294967295"),
        "{body}"
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_carry_the_documented_error_body() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, token) = start(dir.path()).await;
    let api = Api::new(&server, &token);
    let (status, body) = api
        .send(api.http.delete(api.url("/v1/jobs")), Some(&token))
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_of(&body).code, ErrorCode::MethodNotAllowed);
    assert_eq!(error_of(&body).message, "DELETE is not allowed on /v1/jobs");

    let long = "x".repeat(wire::MAX_URI_BYTES + 1);
    let (status, body) = api.get(&format!("/v1/jobs?compute={long}")).await;
    assert_eq!(status, StatusCode::URI_TOO_LONG);
    assert_eq!(error_of(&body).code, ErrorCode::UriTooLong);

    let big = "y".repeat(wire::MAX_HEADER_BYTES + 1);
    let (status, body) = api
        .send(
            api.http.get(api.url("/v1/jobs")).header("x-big", big),
            Some(&token),
        )
        .await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(error_of(&body).code, ErrorCode::HeadersTooLarge);

    let huge =
        json!({"spec": raw_job(json!({"description": "z".repeat(wire::MAX_REQUEST_BYTES)}))});
    let (status, body) = api.post("/v1/jobs", huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_of(&body).code, ErrorCode::TooLarge);
    assert_eq!(error_of(&body).message, wire::too_large_message(None));

    let (status, body) = api
        .send(
            api.http
                .post(api.url("/v1/jobs"))
                .header("content-type", "application/json")
                .body("{not json"),
            Some(&token),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&body)
            .message
            .starts_with("invalid request body: invalid json:"),
        "{body}"
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_gives_every_node_a_fresh_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let grace = Duration::from_secs(2);
    let (server, api, cred) = one_node_one_job(dir.path(), grace).await;
    api.wait_job("train", Duration::from_secs(5), |j| j.attempt >= 1)
        .await;
    let running =
        json!({"parts": [{"job": "train", "attempt": 1, "node_rank": 0, "state": "running"}]});
    let (status, _) = api
        .agent_post(&cred, "/v1/agent/heartbeat", running.clone())
        .await;
    assert_eq!(status, StatusCode::OK);
    stop(server).await;

    // Down for longer than the grace: no heartbeat could arrive.
    tokio::time::sleep(grace + Duration::from_secs(1)).await;
    let mut c = config(dir.path());
    c.grace = grace;
    let (server, token) = start_with(c).await;
    let api = Api::new(&server, &token);
    // A grace period from the start: the node is live and its job runs on.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let job = api.job("train").await;
    assert_eq!((job.state, job.attempt), (JobState::Running, 1), "{job:?}");
    let (status, _) = api.agent_post(&cred, "/v1/agent/heartbeat", running).await;
    assert_eq!(status, StatusCode::OK);
    // Silent for a whole grace after the start: then it is lost.
    let job = api
        .wait_job("train", Duration::from_secs(8), |j| {
            j.state == JobState::Queued
        })
        .await;
    assert_eq!(job.parts[0].state, wire::PartState::Lost);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_attempt_writes_nothing_and_each_attempt_has_its_own_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, api, cred1) = one_node_one_job(dir.path(), Duration::from_secs(1)).await;
    api.wait_job("train", Duration::from_secs(5), |j| j.attempt == 1)
        .await;
    let line = |attempt: u32, text: &str, at_ns: u64| {
        json!({"job": "train", "attempt": attempt, "node_rank": 0, "stream": "stdout",
               "at": 1, "text": text, "cursor": {"at_ns": at_ns, "index": 1}})
    };
    let (status, body) = api
        .agent_post(
            &cred1,
            "/v1/agent/logs",
            json!({"lines": [line(1, "one-a", 1), line(1, "one-b", 2)]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 2);
    // Sent again (a retried upload): stored once.
    let (_, body) = api
        .agent_post(
            &cred1,
            "/v1/agent/logs",
            json!({"lines": [line(1, "one-b", 2)]}),
        )
        .await;
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (Some(0), Some(1))
    );

    // n1 goes silent past the grace: the job is requeued.
    api.wait_job("train", Duration::from_secs(8), |j| {
        j.state == JobState::Queued
    })
    .await;
    // Heard from again, n1 is the only node: attempt 2 goes there.
    let (status, _) = api
        .agent_post(&cred1, "/v1/agent/heartbeat", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    api.wait_job("train", Duration::from_secs(5), |j| j.attempt == 2)
        .await;
    // Attempt 1's container went on printing long after its part ended: a
    // line written within the window is kept in attempt 1's log (what a job
    // prints while it handles SIGTERM), one written later is refused.
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    let (status, body) = api
        .agent_post(
            &cred1,
            "/v1/agent/logs",
            json!({"lines": [
                line(1, "one-sigterm", now_ns),
                line(1, "stale", now_ns + 120_000_000_000),
                line(2, "two-a", 1)
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 2);
    assert_eq!(
        body["rejected"],
        json!([{"job": "train", "attempt": 1, "node_rank": 0}]),
        "the superseded attempt's line is refused"
    );
    let texts = |body: &serde_json::Value| -> Vec<String> {
        body["lines"]
            .as_array()
            .expect("lines")
            .iter()
            .map(|l| l["text"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let (_, body) = api.get("/v1/jobs/train/logs").await;
    assert_eq!(texts(&body), ["two-a"], "the current attempt by default");
    assert_eq!(
        (body["attempt"].as_u64(), body["attempts"].as_u64()),
        (Some(2), Some(2))
    );
    let (_, body) = api.get("/v1/jobs/train/logs?attempt=1").await;
    assert_eq!(texts(&body), ["one-a", "one-b", "one-sigterm"]);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_carries_only_what_a_node_can_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, api, cred) = one_node_one_job(dir.path(), Duration::from_secs(40)).await;
    let parts: Vec<serde_json::Value> = (0..wire::MAX_PART_REPORTS + 1)
        .map(|i| json!({"job": format!("j{i}"), "attempt": 1, "node_rank": 0, "state": "running"}))
        .collect();
    let (status, body) = api
        .agent_post(&cred, "/v1/agent/heartbeat", json!({ "parts": parts }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&body)
            .message
            .starts_with("parts: a heartbeat may carry at most 256 part reports"),
        "{body}"
    );
    let disks: Vec<serde_json::Value> = (0..4000)
        .map(|i| json!({"mount_point": format!("/var/lib/docker/overlay2/{i:064}/merged"), "file_system": "overlay"}))
        .collect();
    let (status, body) = api
        .agent_post(
            &cred,
            "/v1/agent/heartbeat",
            json!({ "inventory": {"host": {"disks": disks}} }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&body)
            .message
            .starts_with("inventory: the inventory is"),
        "{body}"
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_idle_nodes_and_refuses_running_jobs_unless_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, api, cred) = one_node_one_job(dir.path(), Duration::from_secs(40)).await;
    api.wait_job("train", Duration::from_secs(5), |j| j.attempt == 1)
        .await;
    let (status, body) = api
        .send(
            api.http.delete(api.url("/v1/clusters/cpu")),
            Some(&api.token),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(
        error_of(&body).message,
        "cluster `cpu` has 1 unfinished job(s): train (preparing); cancel them, or delete with --force to cancel them first"
    );
    // --force: the job is canceled, the node removed, then the cluster.
    let (status, body) = api
        .send(
            api.http.delete(api.url("/v1/clusters/cpu?force=true")),
            Some(&api.token),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"cluster": "cpu", "removed_nodes": ["n1"], "canceled_jobs": ["train"]})
    );
    let (_, body) = api.get("/v1/nodes").await;
    assert_eq!(body["nodes"], json!([]));
    // The removed node's credential opens nothing any more.
    let (status, _) = api
        .agent_post(&cred, "/v1/agent/heartbeat", json!({}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_a_provider_gets_the_control_planes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, token) = start(dir.path()).await;
    let api = Api::new(&server, &token);
    let (status, body) = api
        .post(
            "/v1/clusters",
            json!({"spec": {"name": "basic", "max_nodes": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        body["cluster"]["spec"]["provider"], "static",
        "no local provider here"
    );
    assert_eq!(body["cluster"]["spec"]["vm_size"], "STANDARD_DS3_V2");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_door_refuses_over_raw_http_what_the_rules_refuse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, token) = start(dir.path()).await;
    let api = Api::new(&server, &token);
    api.create_cluster("cpu", 2).await;
    let image =
        |name: &str| json!({"spec": {"name": name, "source": {"image": {"image": "busybox:1"}}}});
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            image("bad name"),
            "`bad name` is not a valid environment name",
        ),
        (
            json!({"spec": {"name": "x", "version": "-1", "source": {"image": {"image": "busybox"}}}}),
            "version: `-1` is not a valid version",
        ),
        (
            json!({"spec": {"name": "x", "source": {"image": {"image": "Bad Image"}}}}),
            "image: `Bad Image` is not a valid image reference",
        ),
        (
            json!({"spec": {"name": "x", "source": {"build": {"context": "/home/me/ctx"}}}}),
            "is a folder of the client's machine",
        ),
        (
            json!({"spec": {"name": "x", "source": {"build": {"context": {"snapshot": format!("sha256:{}", "ab".repeat(32)), "size": 10}}}}}),
            "is not stored; upload it first",
        ),
        (
            json!({"spec": {"name": "x", "source": {"build": {"context": "/c", "dockerfile_path": "../Dockerfile"}}}}),
            "must be a relative path inside the build context",
        ),
        (
            json!({"spec": {"name": "x", "source": {"image": {"image": "busybox"}}, "colour": 1}}),
            "spec.colour",
        ),
    ];
    for (body, want) in cases {
        let (status, answer) = api.post("/v1/environments", body.clone()).await;
        assert!(status.is_client_error(), "{body} -> {status} {answer}");
        let e = error_of(&answer);
        assert!(e.message.contains(want), "{body}: {}", e.message);
    }
    // Versions count up; a taken version is a conflict.
    let (status, body) = api.post("/v1/environments", image("t")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["version"], "1");
    let (_, body) = api.post("/v1/environments", image("t")).await;
    assert_eq!(body["version"], "2");
    let (status, body) = api
        .post(
            "/v1/environments",
            json!({"spec": {"name": "t", "version": "2", "source": {"image": {"image": "busybox"}}}}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    // Update refuses what it may not change.
    let (status, body) = api
        .send(
            api.http
                .patch(api.url("/v1/environments/t/versions/1"))
                .json(&json!({"image": "other"})),
            Some(&token),
        )
        .await;
    assert!(status.is_client_error(), "{body}");
    // A job that names an unknown version is refused; one that names a
    // known one gets its image, whatever image the client claimed.
    let job = |env: &str| {
        json!({"spec": {"command": "echo", "image": "attacker/own:1", "compute": "cpu",
            "environment": {"name": "t", "version": env}}})
    };
    let (status, body) = api.post("/v1/jobs", job("9")).await;
    assert!(status.is_client_error(), "{body}");
    assert!(
        error_of(&body).message.contains("no environment t:9"),
        "{body}"
    );
    let (status, body) = api.post("/v1/jobs", job("1")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    let info = api.job(&id).await;
    let spec = info.spec.expect("spec");
    assert_eq!(
        spec.as_command().map(|c| c.image.as_str()),
        Some("busybox:1")
    );
    // Agent routes need a node's credential, and a node may ask only
    // about the builds of its own parts.
    let (status, _) = api.post("/v1/agent/builds", json!({"image": "x"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let join = api.create_cluster("gpu", 1).await;
    let cred = api.register("gpu", &join, "n9").await;
    for (path, body) in [
        ("/v1/agent/builds", json!({"image": "drover-env/t:1"})),
        (
            "/v1/agent/builds/report",
            json!({"image": "drover-env/t:1", "failure": "sabotage"}),
        ),
    ] {
        let (status, body) = api.agent_post(&cred, path, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            error_of(&body)
                .message
                .contains("has no assigned part that builds"),
            "{body}"
        );
    }
    stop(server).await;
}
