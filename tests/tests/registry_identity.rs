//! Environment images in a registry the nodes log in to with their
//! cluster's managed identity, as with Azure Container Registry: the IMDS
//! emulator issues the Entra token and is the registry's token service
//! (`/oauth2/exchange`, `/oauth2/token`); the registry is Debian's
//! `docker-registry` with token auth, trusting the emulator's certificate.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drover_tests::{
    AgentProc, JobDir, Registry, ServerProc, free_port, http_get, imds_emulator_bin, require_image,
    short_name, wait_until,
};
use serde_json::Value;

/// The emulator as its own process; killed on drop.
struct Emulator {
    child: Child,
    addr: String,
}

impl Emulator {
    fn start(dir: &Path) -> Emulator {
        let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
        let openssl = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=drover-test-registry-tokens", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl");
        assert!(
            openssl.status.success(),
            "{}",
            String::from_utf8_lossy(&openssl.stderr)
        );
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(imds_emulator_bin())
            .args([
                "--listen",
                &addr,
                "--vm",
                "acr-node",
                "--vm-address",
                "127.0.0.1",
            ])
            .args(["--no-rate-limit", "--registry-token-key"])
            .arg(&key)
            .arg("--registry-token-cert")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start drover-imds-emulator");
        let up = wait_until(Duration::from_secs(15), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        assert!(up, "the emulator did not start on {addr}");
        Emulator { child, addr }
    }

    fn stats(&self) -> Value {
        let answer = http_get(&self.addr, "/drover-emulator/stats");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(body).expect("stats json")
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent(server: &ServerProc, cluster: &str, join: &str, emulator: &Emulator) -> AgentProc {
    AgentProc::start_with_args(
        server,
        cluster,
        join,
        &short_name("n"),
        &[
            "--imds-url".into(),
            format!("http://{}", emulator.addr),
            // The firewall's own tests run in namespaces; not the host's.
            "--imds-firewall".into(),
            "false".into(),
        ],
    )
}

fn rmi(image: &str) {
    let _ = Command::new("docker")
        .args(["image", "rm", "-f", image])
        .output();
}

#[test]
fn nodes_log_in_to_the_registry_with_the_cluster_identity_to_push_and_pull_environments() {
    require_image("drover/base:bookworm");
    let dir = JobDir::new("");
    let emulator = Emulator::start(&dir.path("."));
    let realm = format!("http://{}/oauth2/token", emulator.addr);
    let registry = Registry::start_with_token_service(
        &realm,
        "Azure Container Registry",
        &dir.path("cert.pem"),
        0,
    );
    // Without a login the registry lets nobody in: the identity is needed.
    let anonymous = http_get(&registry.addr, "/v2/");
    assert!(
        anonymous.contains(" 401 Unauthorized") && anonymous.contains(&realm),
        "{anonymous}"
    );
    let prefix = format!("{}/envs", registry.addr);
    let server = ServerProc::start_with(40, &["--registry", &prefix, "--registry-identity"], &[]);
    let join = server.create_cluster_with("acr", 1, &["--assign-identity", "[system]"]);
    let node = agent(&server, "acr", &join, &emulator);

    let name = short_name("acr");
    let image = format!("{prefix}/{name}:1");
    dir.write(
        "ctx/Dockerfile",
        "FROM drover/base:bookworm\nRUN echo from-acr > /env-marker\n",
    );
    dir.write(
        "env.yml",
        &format!(
            "name: {name}\nbuild:\n  path: ctx\ndescription: pushed with the cluster identity\n"
        ),
    );
    server.cli_ok(&[
        "environment",
        "create",
        "-f",
        &dir.path("env.yml").display().to_string(),
    ]);
    let job_yaml =
        format!("command: echo marker=$(cat /env-marker)\nenvironment: azureml:{name}:1\n");
    dir.write("job.yml", &job_yaml);
    let run = |what: &str| {
        let job = server.submit(&dir.path("job.yml"), "acr");
        server.wait_job_state(&job, "completed", Duration::from_secs(240));
        let logs = server.cli_ok(&["job", "logs", &job]);
        assert!(logs.contains("marker=from-acr"), "{what}: {logs}");
        assert!(
            logs.contains("with the cluster's system-assigned identity"),
            "{what}: {logs}"
        );
        logs
    };

    // The first job builds and pushes with the identity's login.
    let logs = run("build");
    assert!(logs.contains("building environment"), "{logs}");
    assert!(logs.contains(&format!("pushing {image}")), "{logs}");
    let pushes = registry
        .log()
        .lines()
        .filter(|l| {
            l.contains(&format!("\"PUT /v2/envs/{name}/manifests/1")) && l.contains("\" 201 ")
        })
        .count();
    assert_eq!(pushes, 1, "{}", registry.log());
    let after_build = emulator.stats();
    assert_eq!(after_build["registry_refresh_tokens"], 1, "{after_build}");
    assert!(
        after_build["registry_access_tokens"].as_u64() >= Some(1),
        "{after_build}"
    );

    // Gone from the node: the next job pulls it, logging in from the kept
    // refresh token (no second exchange), the engine asking for a pull token.
    rmi(&image);
    let before = registry.manifest_gets(&format!("envs/{name}"));
    let logs = run("pull");
    assert!(logs.contains("pulling environment"), "{logs}");
    assert!(!logs.contains("building environment"), "{logs}");
    assert!(
        registry.manifest_gets(&format!("envs/{name}")) > before,
        "{}",
        registry.log()
    );
    let after_pull = emulator.stats();
    assert_eq!(after_pull["registry_refresh_tokens"], 1, "{after_pull}");
    assert!(
        after_pull["registry_access_tokens"].as_u64()
            > after_build["registry_access_tokens"].as_u64(),
        "{after_pull}"
    );
    let metrics = node.log_text();
    assert!(
        metrics.contains("registry login with the managed identity"),
        "{metrics}"
    );
    drop(node);

    // A cluster without an identity cannot log in: the part fails saying so.
    rmi(&image);
    let join = server.create_cluster_with("plain", 1, &[]);
    let _plain = agent(&server, "plain", &join, &emulator);
    let job = server.submit(&dir.path("job.yml"), "plain");
    server.wait_job_state(&job, "failed", Duration::from_secs(120));
    let logs = server.cli_ok(&["job", "logs", &job]);
    assert!(
        logs.contains("--registry-identity") && logs.contains("has none"),
        "{logs}"
    );
    rmi(&image);
}
