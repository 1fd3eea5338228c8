//! Job files through a real `drover server` over raw HTTP, bypassing the
//! CLI: the blob protocol's every door, outputs posted by agents and read
//! by users, datastores and the agents' proxy to them, and the job door's
//! checks of blobs and datastore names.

use std::path::Path;
use std::time::{Duration, Instant};

use drover_api::files::{BlobInfo, JobOutputs, UploadStatus};
use drover_api::wire::{self, ErrorBody};
use drover_control::server::{self, RunningServer, ServerConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Api {
    base: String,
    http: reqwest::Client,
    token: String,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder, token: Option<&str>) -> (StatusCode, Value) {
        let req = match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.get(self.url(path)), Some(&self.token))
            .await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(
            self.http.post(self.url(path)).json(&body),
            Some(&self.token),
        )
        .await
    }

    async fn put_blob(
        &self,
        prefix: &str,
        token: &str,
        digest: &str,
        size: u64,
        offset: u64,
        body: &'static [u8],
    ) -> (StatusCode, Value) {
        self.send(
            self.http
                .put(self.url(&format!(
                    "{prefix}/blobs/{digest}?size={size}&offset={offset}"
                )))
                .body(body),
            Some(token),
        )
        .await
    }
}

fn code_of(body: &Value) -> String {
    serde_json::from_value::<ErrorBody>(body.clone())
        .unwrap_or_else(|e| panic!("error body {body}: {e}"))
        .error
        .code
        .to_string()
}

fn message_of(body: &Value) -> String {
    serde_json::from_value::<ErrorBody>(body.clone())
        .unwrap_or_else(|e| panic!("error body {body}: {e}"))
        .error
        .message
}

async fn start(dir: &Path) -> (RunningServer, Api) {
    let mut c = ServerConfig::new(dir.to_path_buf());
    c.listen = "127.0.0.1:0".parse().expect("addr");
    let server = server::start(c).await.expect("server starts");
    let token = std::fs::read_to_string(dir.join(server::ADMIN_TOKEN_FILE))
        .expect("admin token")
        .trim()
        .to_string();
    let api = Api {
        base: format!("http://{}", server.addr),
        http: reqwest::Client::new(),
        token,
    };
    (server, api)
}

async fn stop(server: RunningServer) {
    server.shutdown();
    tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("stops in time")
        .expect("stops cleanly");
}

fn blobs_in(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("artifacts/blobs"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Cluster `cpu`, node `n1` (and `n2`) registered; returns their credentials.
async fn cluster_with_nodes(api: &Api) -> (String, String) {
    let spec = drover_api::compute::ComputeSpec::new("cpu", "STANDARD_D3_V2", 2);
    let (status, body) = api.post("/v1/clusters", json!({ "spec": spec })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let created: wire::ClusterCreated = serde_json::from_value(body).expect("created");
    let mut creds = Vec::new();
    for id in ["n1", "n2"] {
        let (status, body) = api
            .send(
                api.http.post(api.url("/v1/agent/register")).json(&json!({
                    "cluster": "cpu", "join_token": created.join_token, "node_id": id,
                    "ip": "10.0.0.4", "gpus": {"healthy": 0, "total": 0}, "inventory": {"cpus": 4}
                })),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let r: wire::RegisterResponse = serde_json::from_value(body).expect("register");
        creds.push(r.credential);
    }
    (creds.remove(0), creds.remove(0))
}

fn job(extra: Value) -> Value {
    let mut job =
        json!({"name": "train", "command": "echo hi", "image": "busybox:latest", "compute": "cpu"});
    if let (Value::Object(j), Value::Object(e)) = (&mut job, extra) {
        j.extend(e);
    }
    json!({ "spec": job })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blob_doors_refuse_bad_uploads_and_store_only_whole_verified_blobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, api) = start(dir.path()).await;
    let t = api.token.clone();
    let d = hex(b"hello world");

    // Not a digest.
    let (status, body) = api.put_blob("/v1", &t, "xyz", 11, 0, b"hello world").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(code_of(&body), "invalid");
    // No token, a wrong one, a user's on the agent door.
    let (status, _) = api.put_blob("/v1", "nope", &d, 11, 0, b"x").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = api.put_blob("/v1/agent", &t, &d, 11, 0, b"x").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _) = api
        .send(api.http.get(api.url(&format!("/v1/uploads/{d}"))), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Over the limit.
    let (status, body) = api
        .put_blob(
            "/v1",
            &t,
            &d,
            drover_api::files::MAX_BLOB_BYTES + 1,
            0,
            b"x",
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(code_of(&body), "too_large");
    // Bytes that do not hash to the name: 400, nothing stored or staged.
    let (status, body) = api.put_blob("/v1", &t, &d, 11, 0, b"hello WORLD").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(message_of(&body).contains("discarded"), "{body}");
    assert_eq!(blobs_in(dir.path()), 0);
    let (status, body) = api.get(&format!("/v1/uploads/{d}")).await;
    assert_eq!(status, StatusCode::OK);
    let up: UploadStatus = serde_json::from_value(body).expect("status");
    assert_eq!((up.offset, up.complete), (0, false));
    // A body longer than what is left.
    let (status, _) = api.put_blob("/v1", &t, &d, 3, 0, b"hello world").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Part of it, then the wrong offset (409, naming the staged count),
    // then the rest from where it stands.
    let (status, body) = api.put_blob("/v1", &t, &d, 11, 0, b"hello").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, body) = api.put_blob("/v1", &t, &d, 11, 3, b"lo world").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(message_of(&body).contains("5 bytes staged"), "{body}");
    let (status, body) = api.put_blob("/v1", &t, &d, 12, 5, b" world").await;
    assert_eq!(status, StatusCode::CONFLICT, "a different total: {body}");
    let (_, body) = api.get(&format!("/v1/uploads/{d}")).await;
    let up: UploadStatus = serde_json::from_value(body).expect("status");
    assert_eq!(up.offset, 5);
    let (status, body) = api.put_blob("/v1", &t, &d, 11, 5, b" world").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let info: BlobInfo = serde_json::from_value(body).expect("info");
    assert_eq!(info.size, 11);
    assert_eq!(blobs_in(dir.path()), 1);
    // Stored: 200 at once.
    let (status, _) = api.put_blob("/v1", &t, &d, 11, 0, b"hello world").await;
    assert_eq!(status, StatusCode::OK);

    // HEAD, GET, a ranged GET.
    let head = api
        .http
        .head(api.url(&format!("/v1/blobs/{d}")))
        .bearer_auth(&t)
        .send()
        .await
        .expect("head");
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-length"], "11");
    let missing = hex(b"nothing");
    let head = api
        .http
        .head(api.url(&format!("/v1/blobs/{missing}")))
        .bearer_auth(&t)
        .send()
        .await
        .expect("head");
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    let (status, body) = api.get(&format!("/v1/blobs/{missing}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(code_of(&body), "not_found");
    let resp = api
        .http
        .get(api.url(&format!("/v1/blobs/{d}")))
        .bearer_auth(&t)
        .header("range", "bytes=6-")
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.text().await.expect("body"), "world");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_are_posted_by_their_node_only_and_read_merged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, api) = start(dir.path()).await;
    let (n1, n2) = cluster_with_nodes(&api).await;
    let (status, body) = api.post("/v1/jobs", job(json!({}))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let start = Instant::now();
    let owner = loop {
        let (_, body) = api.get("/v1/jobs/train").await;
        let info: wire::JobInfo = serde_json::from_value(body).expect("job");
        if let Some(p) = info.parts.first() {
            break p.node.clone();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never placed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (mine, other) = if owner == "n1" {
        (&n1, &n2)
    } else {
        (&n2, &n1)
    };
    let d = hex(b"model");
    let (status, body) = api.put_blob("/v1/agent", mine, &d, 5, 0, b"model").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let post = |path: &str, digest: &str| {
        json!({"part": {"job": "train", "attempt": 1, "node_rank": 0},
               "outputs": {"default": [{"path": path, "size": 5, "digest": format!("sha256:{digest}")}]}})
    };
    let agent_post = |cred: &String, body: Value| {
        let req = api
            .http
            .post(api.url("/v1/agent/outputs"))
            .json(&body)
            .bearer_auth(cred.clone());
        api.send(req, None)
    };
    // An unstored blob, a path out of its folder, a user's token, another node.
    let unstored = hex(b"never uploaded");
    let (status, body) = agent_post(mine, post("outputs/m.bin", &unstored)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(message_of(&body).contains(&unstored), "{body}");
    let wrong_size = json!({"part": {"job": "train", "attempt": 1, "node_rank": 0},
        "outputs": {"default": [{"path": "outputs/m.bin", "size": 6, "digest": format!("sha256:{d}")}]}});
    let (status, body) = agent_post(mine, wrong_size).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(message_of(&body).contains("is 5 bytes, not 6"), "{body}");
    let (status, body) = agent_post(mine, post("../x", &d)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = agent_post(&api.token, post("outputs/m.bin", &d)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = agent_post(other, post("outputs/m.bin", &d)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (_, body) = api.get("/v1/jobs/train/outputs").await;
    let outs: JobOutputs = serde_json::from_value(body).expect("outputs");
    assert!(outs.outputs[0].files.is_empty(), "nothing recorded yet");

    // Posted, then posted again (replacing).
    let (status, body) = agent_post(mine, post("outputs/m.bin", &d)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = agent_post(mine, post("outputs/model.bin", &d)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["files"], 1);
    let (status, body) = api.get("/v1/jobs/train/outputs").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let outs: JobOutputs = serde_json::from_value(body).expect("outputs");
    assert_eq!(outs.attempt, 1);
    let paths: Vec<&str> = outs.outputs[0]
        .files
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(paths, ["outputs/model.bin"]);
    assert_eq!(outs.outputs[0].nodes, [0]);
    let (status, body) = api.get("/v1/jobs/nosuch/outputs").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(code_of(&body), "not_found");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datastores_keep_their_secrets_and_agents_read_through_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("data");
    std::fs::create_dir_all(data.path().join("iris/sub")).expect("mkdir");
    std::fs::write(data.path().join("iris/b.csv"), "b\n").expect("write");
    std::fs::write(data.path().join("iris/sub/a.csv"), "a\n").expect("write");
    let (server, api) = start(dir.path()).await;
    let (n1, _) = cluster_with_nodes(&api).await;

    let local = json!({"spec": {"name": "shared_data", "type": "local", "path": data.path()}});
    let (status, body) = api.post("/v1/datastores", local.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = api.post("/v1/datastores", local).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let s3 = json!({"spec": {"name": "bucket", "type": "s3", "bucket": "my-bucket",
        "credentials": {"access_key": {"access_key_id": "AKIA", "secret_access_key": "hunter2"}}}});
    let (status, body) = api.post("/v1/datastores", s3).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(!body.to_string().contains("hunter2"), "{body}");
    let (status, body) = api
        .post(
            "/v1/datastores",
            json!({"spec": {"name": "bad-name", "type": "local", "path": "rel"}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = api
        .post(
            "/v1/datastores",
            json!({"spec": {"name": "x", "type": "local", "path": "/x"}, "extra": 1}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "unknown fields refused: {body}"
    );
    let (_, body) = api.get("/v1/datastores").await;
    let names: Vec<&str> = body["datastores"]
        .as_array()
        .expect("list")
        .iter()
        .map(|d| d["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["workspaceblobstore", "bucket", "shared_data"]);
    assert!(!body.to_string().contains("hunter2"));
    let db = std::fs::read(dir.path().join("drover.db")).expect("db");
    assert!(
        !db.windows(7).any(|w| w == b"hunter2"),
        "secret stored in the clear"
    );
    let (status, body) = api.get("/v1/datastores/nosuch").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(
        message_of(&body)
            .contains("no datastore named nosuch (known: bucket, shared_data, workspaceblobstore)"),
        "{body}"
    );
    let (status, _) = api
        .send(
            api.http
                .delete(api.url("/v1/datastores/workspaceblobstore")),
            Some(&api.token),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The agents' proxy.
    let agent_get = |path: String| api.send(api.http.get(api.url(&path)), Some(&n1));
    let (status, body) = agent_get("/v1/agent/datastores/shared_data/list?path=iris".into()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let paths: Vec<&str> = body["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["path"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(paths, ["b.csv", "sub/a.csv"]);
    let (_, body) = agent_get("/v1/agent/datastores/shared_data/list?path=iris/b.csv".into()).await;
    assert_eq!(body["entries"][0]["path"], "");
    let (status, body) =
        agent_get("/v1/agent/datastores/shared_data/list?path=nothing".into()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(message_of(&body).contains("shared_data") && message_of(&body).contains("nothing"));
    let (status, _) = agent_get("/v1/agent/datastores/shared_data/list?path=../etc".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = agent_get("/v1/agent/datastores/nosuch/list?path=x".into()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        message_of(&body).contains("no datastore named nosuch"),
        "{body}"
    );
    let resp = api
        .http
        .get(api.url("/v1/agent/datastores/shared_data/file?path=iris/sub/a.csv"))
        .bearer_auth(&n1)
        .send()
        .await
        .expect("file");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("etag"));
    assert_eq!(resp.text().await.expect("body"), "a\n");
    let (status, _) = api
        .send(
            api.http
                .get(api.url("/v1/agent/datastores/shared_data/list?path=iris")),
            Some(&api.token),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a user's token is no agent's"
    );

    // The job door: unknown datastores and unstored blobs, nothing queued.
    let (status, body) = api
        .post(
            "/v1/jobs",
            job(
                json!({"inputs": {"d": {"kind": "datastore", "path_kind": "uri_folder",
            "datastore": "nosuch", "path": "x"}}}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        message_of(&body).contains(
            "inputs.d: no datastore named nosuch (known: bucket, shared_data, workspaceblobstore)"
        ),
        "{body}"
    );
    let unstored = hex(b"code");
    let (status, body) = api
        .post(
            "/v1/jobs",
            job(json!({"code": {"snapshot": format!("sha256:{unstored}"), "size": 4}})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        message_of(&body).contains(&format!(
            "code: snapshot sha256:{unstored} is not stored; upload it first"
        )),
        "{body}"
    );
    let stored = hex(b"stored");
    let (status, body) = api
        .put_blob("/v1", &api.token, &stored, 6, 0, b"stored")
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = api
        .post(
            "/v1/jobs",
            job(
                json!({"inputs": {"f": {"kind": "blob", "path_kind": "uri_file",
                "blob": {"digest": format!("sha256:{stored}"), "size": 7}}}}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        message_of(&body).contains(&format!(
            "inputs.f: blob sha256:{stored} is 6 bytes, not the 7"
        )),
        "{body}"
    );
    let (status, _) = api.get("/v1/jobs/train").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was queued");
    let (status, _) = api
        .send(
            api.http.delete(api.url("/v1/datastores/bucket")),
            Some(&api.token),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datastore_output_is_copied_into_its_datastore_and_shown_as_its_destination() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("data");
    let (server, api) = start(dir.path()).await;
    let (n1, n2) = cluster_with_nodes(&api).await;
    let local = json!({"spec": {"name": "shared_data", "type": "local", "path": data.path()}});
    let (status, body) = api.post("/v1/datastores", local).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let outputs = json!({"outputs": {"scores": {"type": "uri_folder",
        "datastore": {"datastore": "shared_data", "path": "results/${{name}}/${{output_name}}"}}}});
    let (status, body) = api.post("/v1/jobs", job(outputs)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let start = Instant::now();
    let owner = loop {
        let (_, body) = api.get("/v1/jobs/train").await;
        let info: wire::JobInfo = serde_json::from_value(body).expect("job");
        if let Some(p) = info.parts.first() {
            break p.node.clone();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never placed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cred = if owner == "n1" { &n1 } else { &n2 };
    let d = hex(b"scored\n");
    let (status, body) = api.put_blob("/v1/agent", cred, &d, 7, 0, b"scored\n").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let post = json!({"part": {"job": "train", "attempt": 1, "node_rank": 0},
        "outputs": {"scores": [{"path": "sub/s.txt", "size": 7, "digest": format!("sha256:{d}")}]}});
    let (status, body) = api
        .send(
            api.http.post(api.url("/v1/agent/outputs")).json(&post),
            Some(cred),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let copied = data.path().join("results/train/scores/sub/s.txt");
    let start = Instant::now();
    while !copied.is_file() {
        assert!(start.elapsed() < Duration::from_secs(10), "never copied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(std::fs::read_to_string(&copied).expect("read"), "scored\n");
    let start = Instant::now();
    loop {
        let (_, body) = api.get("/v1/jobs/train/outputs").await;
        let outs: JobOutputs = serde_json::from_value(body).expect("outputs");
        let scores = outs
            .outputs
            .iter()
            .find(|o| o.name == "scores")
            .expect("scores");
        if scores.destination.as_deref()
            == Some("azureml://datastores/shared_data/paths/results/train/scores")
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{scores:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(server).await;
}
