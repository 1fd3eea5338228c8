//! The artifact store on a real S3 API: `moto` in server mode on
//! 127.0.0.1, a `drover server --artifacts s3://…` process, and the blob
//! protocol through `BlobClient` (upload, resume from a staged offset,
//! ranged and whole downloads). Skipped, saying why, only when moto is
//! missing and cannot be installed.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_files::{BlobClient, BlobRoutes, sha256_file};

const BUCKET: &str = "drover-artifacts";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn moto_available() -> Result<(), String> {
    let has = || {
        Command::new("python3")
            .args(["-c", "import moto.server"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has() {
        return Ok(());
    }
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--break-system-packages",
            "moto[server]",
        ])
        .output()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if has() {
        Ok(())
    } else {
        Err(format!(
            "moto is not installed and pip could not install it: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ))
    }
}

/// Kills its process when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_ok(http: &reqwest::Client, url: &str, token: Option<&str>) {
    let start = Instant::now();
    loop {
        let mut req = http.get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Ok(r) = req.send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{url} never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn read_token(dir: &Path) -> String {
    let start = Instant::now();
    loop {
        if let Ok(t) = std::fs::read_to_string(dir.join("admin.token"))
            && !t.trim().is_empty()
        {
            return t.trim().to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no admin token");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_go_to_and_come_back_from_an_s3_artifact_store() {
    if let Err(why) = moto_available() {
        println!("SKIPPED: no S3 API server to test against: {why}");
        return;
    }
    let http = reqwest::Client::new();
    let moto_port = free_port();
    let _moto = Proc(
        Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &moto_port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto"),
    );
    let s3 = format!("http://127.0.0.1:{moto_port}");
    wait_ok(&http, &format!("{s3}/"), None).await;
    let made = http
        .put(format!("{s3}/{BUCKET}"))
        .send()
        .await
        .expect("create bucket");
    assert!(made.status().is_success(), "{:?}", made.text().await);

    let data = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let log = std::fs::File::create(data.path().join("server.log")).expect("log");
    let _server = Proc(
        Command::new(env!("CARGO_BIN_EXE_drover"))
            .arg("server")
            .arg("--data-dir")
            .arg(data.path())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--artifacts", &format!("s3://{BUCKET}/team/a")])
            .env("AWS_ENDPOINT_URL", &s3)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env_remove("DROVER_TOKEN")
            .stderr(log.try_clone().expect("log"))
            .stdout(log)
            .spawn()
            .expect("start drover server"),
    );
    let token = read_token(data.path());
    let server = format!("http://127.0.0.1:{port}");
    wait_ok(&http, &format!("{server}/v1/datastores"), Some(&token)).await;
    let said = std::fs::read_to_string(data.path().join("server.log")).unwrap_or_default();
    assert!(said.contains(&format!("s3://{BUCKET}/team/a")), "{said}");

    // 20 MiB: past one put, so committed by a multipart upload.
    let file = data.path().join("model.bin");
    let bytes: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &bytes).expect("write");
    let blob = sha256_file(&file).expect("hash");
    let client = BlobClient::new(http.clone(), &server, BlobRoutes::User, token.clone());
    assert_eq!(client.stat(&blob.digest).await.expect("stat"), None);

    // Half of it staged by a raw PUT, as a cut connection would leave it.
    let half = bytes.len() / 2;
    let r = http
        .put(format!(
            "{server}/v1/blobs/{}?size={}&offset=0",
            blob.digest.hex(),
            blob.size
        ))
        .bearer_auth(&token)
        .body(bytes[..half].to_vec())
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    let status = client.upload_status(&blob.digest).await.expect("status");
    assert_eq!(status.offset, half as u64);
    let up = client
        .upload_file(&file, blob, &|_| {})
        .await
        .expect("upload");
    assert_eq!(
        up.sent,
        (bytes.len() - half) as u64,
        "resumed from the staged offset"
    );
    assert_eq!(
        client.stat(&blob.digest).await.expect("stat"),
        Some(blob.size)
    );

    // The object is in the bucket under the prefix.
    let object = http
        .head(format!("{s3}/{BUCKET}/team/a/blobs/{}", blob.digest.hex()))
        .send()
        .await
        .expect("head object");
    assert!(object.status().is_success(), "{}", object.status());
    assert!(
        std::fs::read_dir(data.path().join("artifacts-staging"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "nothing left staged"
    );

    // Ranged, then whole, downloads.
    let r = http
        .get(format!("{server}/v1/blobs/{}", blob.digest.hex()))
        .bearer_auth(&token)
        .header("range", format!("bytes={}-", bytes.len() - 10))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), reqwest::StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.bytes().await.expect("body").as_ref(),
        &bytes[bytes.len() - 10..]
    );
    let dest = data.path().join("back.bin");
    client
        .download_to(blob, &dest, &|_| {})
        .await
        .expect("download");
    assert_eq!(sha256_file(&dest).expect("hash"), blob);

    // An S3 datastore on the same service, read by an agent through the
    // control plane (which alone holds its key).
    for (key, body) in [("data/iris/b.csv", "b\n"), ("data/iris/sub/a.csv", "a\n")] {
        let r = http
            .put(format!("{s3}/{BUCKET}/{key}"))
            .body(body)
            .send()
            .await
            .expect("put object");
        assert!(r.status().is_success());
    }
    let ds = serde_json::json!({"spec": {"name": "lake", "type": "s3", "bucket": BUCKET,
        "prefix": "data", "endpoint_url": s3, "region": "us-east-1",
        "credentials": {"access_key": {"access_key_id": "testing", "secret_access_key": "testing"}}}});
    let r = http
        .post(format!("{server}/v1/datastores"))
        .bearer_auth(&token)
        .json(&ds)
        .send()
        .await
        .expect("create datastore");
    assert_eq!(
        r.status(),
        reqwest::StatusCode::CREATED,
        "{:?}",
        r.text().await
    );
    let spec = drover_api::compute::ComputeSpec::new("cpu", "STANDARD_D3_V2", 1);
    let created: drover_api::wire::ClusterCreated = http
        .post(format!("{server}/v1/clusters"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "spec": spec }))
        .send()
        .await
        .expect("cluster")
        .json()
        .await
        .expect("created");
    let registered: drover_api::wire::RegisterResponse = http
        .post(format!("{server}/v1/agent/register"))
        .json(
            &serde_json::json!({"cluster": "cpu", "join_token": created.join_token,
            "node_id": "n1", "inventory": {"cpus": 4}}),
        )
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("registered");
    let listing: drover_api::files::DataListing = http
        .get(format!("{server}/v1/agent/datastores/lake/list?path=iris"))
        .bearer_auth(&registered.credential)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("listing");
    let paths: Vec<&str> = listing.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["b.csv", "sub/a.csv"]);
    let r = http
        .get(format!(
            "{server}/v1/agent/datastores/lake/file?path=iris/sub/a.csv"
        ))
        .bearer_auth(&registered.credential)
        .send()
        .await
        .expect("file");
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    assert!(r.headers().contains_key("etag"));
    assert_eq!(r.text().await.expect("body"), "a\n");
    let r = http
        .get(format!(
            "{server}/v1/agent/datastores/lake/list?path=nothing"
        ))
        .bearer_auth(&registered.credential)
        .send()
        .await
        .expect("list");
    assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND);
}
