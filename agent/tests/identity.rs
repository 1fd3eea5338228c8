//! The token endpoint over raw HTTP against the IMDS emulator: both
//! protocols' answers and shapes, every refusal in its protocol's shape
//! (and in the audit log), the per-part rate limit, and IMDS asked at most
//! once per (identity, resource) however many requests come.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use drover_agent::http;
use drover_agent::identity::audit::AuditLog;
use drover_agent::identity::limit::RateLimit;
use drover_agent::identity::{IdentityService, PartIdentity};
use drover_agent::metrics::Metrics;
use drover_api::compute::Identity;
use drover_api::job::JobIdentity;
use drover_api::wire::PartKey;
use drover_imds::{ImdsClient, ImdsConfig};
use drover_imds_emulator::{Emulator, EmulatorConfig, ManagedIdentity, RunningEmulator, VmSpec};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

const ARM: &str = "https://management.azure.com";
const VAULT: &str = "https://vault.azure.net";

/// The emulated node: a VM with its own identity and three user-assigned
/// ones, of which clusters grant `one` and `two` (never `stranger`).
struct Node {
    emulator: Emulator,
    _imds: RunningEmulator,
    vm: VmSpec,
    one: ManagedIdentity,
    two: ManagedIdentity,
    stranger: ManagedIdentity,
    service: Arc<IdentityService>,
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    data: tempfile::TempDir,
    shutdown: CancellationToken,
}

async fn node(limit: RateLimit) -> Node {
    let mut vm = VmSpec::new("node-0");
    let uai =
        |name: &str| ManagedIdentity::user_assigned(&vm.subscription_id, &vm.resource_group, name);
    let (one, two, stranger) = (uai("one"), uai("two"), uai("stranger"));
    vm.user_identities = vec![one.clone(), two.clone(), stranger.clone()];
    let emulator = Emulator::new(EmulatorConfig::default());
    emulator.add_vm(vm.clone()).expect("add vm");
    let vm = emulator.vms()[0].clone();
    let imds = emulator
        .bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind the emulator");
    let client = ImdsClient::new(ImdsConfig {
        base_url: imds.base_url(),
        ..ImdsConfig::default()
    })
    .expect("imds client");
    let data = tempfile::tempdir().expect("tempdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the endpoint");
    let addr = listener.local_addr().expect("addr");
    let metrics = Arc::new(Metrics::default());
    let service = Arc::new(IdentityService::new(
        format!("http://{addr}"),
        limit,
        Some(client),
        AuditLog::open(data.path()).expect("audit log"),
        metrics.clone(),
    ));
    let shutdown = CancellationToken::new();
    tokio::spawn(http::serve(
        listener,
        http::identity::router(service.clone()),
        shutdown.clone(),
    ));
    Node {
        emulator,
        _imds: imds,
        vm,
        one,
        two,
        stranger,
        service,
        metrics,
        addr,
        data,
        shutdown,
    }
}

impl Node {
    fn user_cluster(&self) -> Identity {
        Identity::UserAssigned {
            resource_ids: vec![self.one.resource_id.clone(), self.two.resource_id.clone()],
        }
    }

    async fn part(
        &self,
        job: &str,
        cluster: &Identity,
        job_identity: Option<JobIdentity>,
    ) -> PartIdentity {
        self.service
            .start_part(
                &PartKey::new(job, 1, 0),
                cluster,
                true,
                job_identity.as_ref(),
            )
            .await
            .expect("part identity")
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.data.path().join("audit/identity.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("an audit line is json"))
            .collect()
    }

    fn audit_text(&self) -> String {
        std::fs::read_to_string(self.data.path().join("audit/identity.jsonl")).unwrap_or_default()
    }
}

/// An HTTP answer read off the wire.
struct Raw {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Value,
}

/// Sends `request_line` and `headers` as they are and reads the answer.
async fn raw(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)]) -> Raw {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {target} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes()).await.expect("send");
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(20), conn.read_to_string(&mut text))
        .await
        .expect("an answer in time")
        .expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.lines();
    let status = lines.next().expect("a status line")[9..12]
        .parse()
        .expect("a status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Raw {
        status,
        headers,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

fn ml(query: &str) -> String {
    format!("/msi/token?api-version=2017-09-01&{query}")
}

fn app(query: &str) -> String {
    format!("/identity/token?api-version=2019-08-01&{query}")
}

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a jwt");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("json")
}

/// Checks `token`'s ES256 signature against the emulator's JWKS.
fn verify_signature(emulator: &Emulator, token: &str) {
    use p256::ecdsa::signature::Verifier as _;
    let jwks = emulator.jwks();
    let key = &jwks["keys"][0];
    let coord = |k: &str| {
        URL_SAFE_NO_PAD
            .decode(key[k].as_str().expect("coordinate"))
            .expect("base64url")
    };
    // SEC1's uncompressed point: 0x04, x, y.
    let point: Vec<u8> = [vec![4u8], coord("x"), coord("y")].concat();
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).expect("a p-256 key");
    let (signed, signature) = token.rsplit_once('.').expect("a signature");
    let signature =
        p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).expect("base64url"))
            .expect("an es256 signature");
    key.verify(signed.as_bytes(), &signature)
        .expect("the token verifies under the emulator's key");
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_protocols_hand_out_the_clusters_identities_in_their_shapes() {
    let node = node(RateLimit::default()).await;
    let part = node.part("j1", &node.user_cluster(), None).await;
    let env = part.env();
    let secret = env["MSI_SECRET"].clone();
    assert_eq!(env["IDENTITY_HEADER"], secret);
    assert_eq!(
        env["MSI_ENDPOINT"],
        format!("http://{}/msi/token", node.addr)
    );
    assert_eq!(
        env["IDENTITY_ENDPOINT"],
        format!("http://{}/identity/token", node.addr)
    );
    // Learnt from IMDS: the cluster's first identity is the default.
    assert_eq!(env["DEFAULT_IDENTITY_CLIENT_ID"], node.one.client_id);

    // Azure ML, no identity named, a scope as Python sends it (the SDK cuts
    // `/.default`; a raw scope is taken too).
    let r = raw(
        node.addr,
        "GET",
        &ml(&format!("resource={ARM}/.default")),
        &[("secret", &secret)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(
        keys(&r.body),
        ["access_token", "expires_on", "resource", "token_type"]
    );
    assert!(r.body["expires_on"].is_u64(), "an integer: {}", r.body);
    assert_eq!(
        r.body["resource"],
        format!("{ARM}/.default"),
        "echoed as sent"
    );
    assert_eq!(r.body["token_type"], "Bearer");
    let token = r.body["access_token"].as_str().expect("token");
    verify_signature(&node.emulator, token);
    let c = claims(token);
    assert_eq!(c["aud"], ARM);
    assert_eq!(c["xms_mirid"], node.one.resource_id.as_str());
    assert_eq!(c["appid"], node.one.client_id.as_str());
    assert_eq!(r.body["expires_on"], c["exp"]);

    // Azure ML by `clientid`, as Go and .NET send it.
    let r = raw(
        node.addr,
        "GET",
        &ml(&format!("resource={VAULT}&clientid={}", node.two.client_id)),
        &[("secret", &secret)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        claims(r.body["access_token"].as_str().unwrap())["xms_mirid"],
        node.two.resource_id.as_str()
    );

    // App Service by client id, object id and resource id.
    for selector in [
        format!("client_id={}", node.two.client_id),
        format!("object_id={}", node.two.object_id),
        format!("mi_res_id={}", node.two.resource_id),
    ] {
        let r = raw(
            node.addr,
            "GET",
            &app(&format!("resource={VAULT}&{selector}")),
            &[("X-IDENTITY-HEADER", &secret)],
        )
        .await;
        assert_eq!(r.status, 200, "{selector}: {}", r.body);
        assert_eq!(
            keys(&r.body),
            [
                "access_token",
                "client_id",
                "expires_on",
                "resource",
                "token_type"
            ]
        );
        let token = r.body["access_token"].as_str().unwrap();
        let c = claims(token);
        assert_eq!(c["xms_mirid"], node.two.resource_id.as_str(), "{selector}");
        assert_eq!(c["aud"], VAULT);
        assert_eq!(r.body["client_id"], node.two.client_id.as_str());
        // A string, as the Rust azure_identity crate requires.
        assert_eq!(r.body["expires_on"], c["exp"].to_string());
        verify_signature(&node.emulator, token);
    }

    // A job naming an identity by object id makes it its part's default.
    let chosen = node
        .part(
            "j2",
            &node.user_cluster(),
            Some(JobIdentity::Managed {
                client_id: None,
                object_id: Some(node.two.object_id.clone()),
                msi_resource_id: None,
            }),
        )
        .await;
    assert_eq!(
        chosen.env()["DEFAULT_IDENTITY_CLIENT_ID"],
        node.two.client_id
    );
    let r = raw(
        node.addr,
        "GET",
        &app(&format!("resource={ARM}")),
        &[("x-identity-header", &chosen.env()["IDENTITY_HEADER"])],
    )
    .await;
    assert_eq!(
        claims(r.body["access_token"].as_str().unwrap())["xms_mirid"],
        node.two.resource_id.as_str()
    );

    // A system-assigned cluster: the node's own identity, and only it.
    let system = node.part("j3", &Identity::SystemAssigned, None).await;
    let s = system.env()["MSI_SECRET"].clone();
    let own = node.vm.system_identity.clone().expect("a system identity");
    assert_eq!(system.env()["DEFAULT_IDENTITY_CLIENT_ID"], own.client_id);
    let r = raw(
        node.addr,
        "GET",
        &ml(&format!("resource={ARM}")),
        &[("secret", &s)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        claims(r.body["access_token"].as_str().unwrap())["xms_mirid"],
        node.vm.resource_id().as_str()
    );
    let r = raw(
        node.addr,
        "GET",
        &ml(&format!("resource={ARM}&clientid={}", own.client_id)),
        &[("secret", &s)],
    )
    .await;
    assert_eq!(
        r.status, 200,
        "the system identity by its client id: {}",
        r.body
    );
    let r = raw(
        node.addr,
        "GET",
        &ml(&format!("resource={ARM}&clientid={}", node.one.client_id)),
        &[("secret", &s)],
    )
    .await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (403, Some("identity_not_granted")),
        "{}",
        r.body
    );

    // Audited: every request, with its part, never a token or secret.
    let audit = node.audit();
    assert_eq!(audit.len(), 9);
    assert!(
        audit
            .iter()
            .take(8)
            .all(|a| a["outcome"] == "issued" && a["status"] == 200)
    );
    assert_eq!(audit[0]["job"], "j1");
    assert_eq!(audit[0]["attempt"], 1);
    assert_eq!(audit[0]["node_rank"], 0);
    assert_eq!(audit[0]["protocol"], "azure_ml");
    assert_eq!(
        audit[0]["identity"],
        format!("resource_id:{}", node.one.resource_id)
    );
    assert_eq!(audit[0]["resource"], format!("{ARM}/.default"));
    assert_eq!(audit[0]["granted"], node.one.resource_id.as_str());
    assert!(audit[0]["latency_ms"].as_f64().is_some());
    assert_eq!(audit[2]["protocol"], "app_service");
    assert_eq!(audit[8]["outcome"], "identity_not_granted");
    assert_eq!(audit[8]["job"], "j3");
    let text = node.audit_text();
    for secret in [&secret, &s] {
        assert!(
            !text.contains(secret.as_str()),
            "no secret in the audit log"
        );
    }
    assert!(!text.contains("eyJ"), "no token in the audit log");
    let metrics = node.metrics.render();
    assert!(
        metrics.contains(
            "drover_agent_identity_requests_total{protocol=\"app_service\",outcome=\"issued\"} 4"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("drover_agent_identity_request_latency_seconds_count 9"),
        "{metrics}"
    );
    node.shutdown.cancel();
}

/// A refused request: its target, its headers, the status and outcome
/// expected.
type Case<'a> = (String, Vec<(&'a str, &'a str)>, u16, &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_in_the_protocols_shape_and_audited() {
    let node = node(RateLimit::default()).await;
    let part = node.part("j1", &node.user_cluster(), None).await;
    let secret = part.env()["MSI_SECRET"].clone();
    let other = node.part("j2", &node.user_cluster(), None).await;
    let ended = other.env()["MSI_SECRET"].clone();
    drop(other);
    assert_eq!(
        node.service.parts(),
        1,
        "an ended part's secret is forgotten"
    );
    let none = node.part("j3", &Identity::None, None).await;
    assert_eq!(none.env()["DEFAULT_IDENTITY_CLIENT_ID"], "clientid");
    let none_secret = none.env()["MSI_SECRET"].clone();
    let forged = "0".repeat(64);
    let q = format!("resource={ARM}");

    // The Azure ML `error` and the audit outcome are the same word.
    let cases: Vec<Case> = vec![
        (ml(&q), vec![], 401, "no_secret"),
        (ml(&q), vec![("secret", "")], 401, "no_secret"),
        (ml(&q), vec![("secret", &forged)], 401, "bad_secret"),
        (ml(&q), vec![("secret", &ended)], 401, "bad_secret"),
        // A secret sent in the other protocol's header is no secret here.
        (
            ml(&q),
            vec![("x-identity-header", &secret)],
            401,
            "no_secret",
        ),
        (
            ml(&q),
            vec![("secret", &secret), ("secret", &secret)],
            400,
            "invalid_request",
        ),
        (
            ml(&format!("{q}&clientid={}", node.stranger.client_id)),
            vec![("secret", &secret)],
            403,
            "identity_not_granted",
        ),
        (
            ml(&format!("{q}&msi_res_id={}", node.stranger.resource_id)),
            vec![("secret", &secret)],
            403,
            "identity_not_granted",
        ),
        (
            ml(&format!(
                "{q}&clientid=00000000-0000-0000-0000-000000000000"
            )),
            vec![("secret", &secret)],
            400,
            "imds_rejected",
        ),
        (ml(&q), vec![("secret", &none_secret)], 403, "no_identity"),
        // Go and .NET send DEFAULT_IDENTITY_CLIENT_ID=clientid.
        (
            ml(&format!("{q}&clientid=clientid")),
            vec![("secret", &none_secret)],
            403,
            "no_identity",
        ),
        (
            "/msi/token?resource=x".to_string(),
            vec![("secret", &secret)],
            400,
            "invalid_request",
        ),
        (
            ml("resource=a%20b"),
            vec![("secret", &secret)],
            400,
            "invalid_request",
        ),
        (
            ml(&format!("{q}&principal_id=x")),
            vec![("secret", &secret)],
            400,
            "invalid_request",
        ),
        (app(&q), vec![], 401, "no_secret"),
        (
            app(&q),
            vec![("x-identity-header", &forged)],
            401,
            "bad_secret",
        ),
        (
            app(&format!("{q}&client_id={}", node.stranger.client_id)),
            vec![("x-identity-header", &secret)],
            403,
            "identity_not_granted",
        ),
        (
            app(&q),
            vec![("x-identity-header", &none_secret)],
            403,
            "no_identity",
        ),
        (
            format!("/identity/token?api-version=2017-09-01&{q}"),
            vec![("x-identity-header", &secret)],
            400,
            "invalid_request",
        ),
    ];
    for (target, headers, status, outcome) in &cases {
        let r = raw(node.addr, "GET", target, headers).await;
        assert_eq!(r.status, *status, "{target} {headers:?}: {}", r.body);
        if target.starts_with("/msi/") {
            assert_eq!(keys(&r.body), ["error", "error_description"], "{target}");
            assert_eq!(r.body["error"], *outcome, "{target}: {}", r.body);
        } else {
            assert_eq!(
                keys(&r.body),
                ["correlationId", "message", "statusCode"],
                "{target}"
            );
            assert_eq!(r.body["statusCode"], *status);
        }
    }
    let audit = node.audit();
    assert_eq!(audit.len(), cases.len(), "one line per request");
    for (line, (target, _, status, outcome)) in audit.iter().zip(&cases) {
        assert_eq!(line["outcome"], *outcome, "{target}");
        assert_eq!(line["status"], *status, "{target}");
    }
    // Without a known secret there is no part to name; with one, there is.
    assert_eq!(audit[2]["job"], Value::Null);
    assert_eq!(audit[6]["job"], "j1");
    assert_eq!(
        audit[6]["identity"],
        format!("client_id:{}", node.stranger.client_id)
    );
    assert_eq!(audit[9]["job"], "j3");
    let text = node.audit_text();
    for s in [&secret, &ended, &none_secret] {
        assert!(!text.contains(s.as_str()));
    }

    // Other methods and paths, as JSON.
    let r = raw(node.addr, "POST", &ml(&q), &[("secret", &secret)]).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "GET,HEAD");
    assert_eq!(r.body["error"], "method_not_allowed");
    let r = raw(node.addr, "GET", "/metadata/identity/oauth2/token", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"], "not_found");
    node.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_over_its_rate_is_told_when_to_come_back() {
    let node = node(RateLimit {
        per_second: 0.5,
        burst: 3,
    })
    .await;
    let part = node.part("j1", &node.user_cluster(), None).await;
    let other = node.part("j2", &node.user_cluster(), None).await;
    let target = ml(&format!("resource={ARM}"));
    for _ in 0..3 {
        let r = raw(
            node.addr,
            "GET",
            &target,
            &[("secret", &part.env()["MSI_SECRET"])],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = raw(
        node.addr,
        "GET",
        &target,
        &[("secret", &part.env()["MSI_SECRET"])],
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["error"], "rate_limited");
    assert_eq!(r.headers["retry-after"], "2");
    let r = raw(
        node.addr,
        "GET",
        &app(&format!("resource={ARM}")),
        &[("x-identity-header", &part.env()["MSI_SECRET"])],
    )
    .await;
    assert_eq!(r.status, 429, "one bucket per part, whatever the protocol");
    assert_eq!(r.body["statusCode"], 429);
    // Another part has a bucket of its own.
    let r = raw(
        node.addr,
        "GET",
        &target,
        &[("secret", &other.env()["MSI_SECRET"])],
    )
    .await;
    assert_eq!(r.status, 200);
    let audit = node.audit();
    assert_eq!(audit[3]["outcome"], "rate_limited");
    assert_eq!(audit[3]["status"], 429);
    node.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_cost_imds_one_token_per_identity_and_resource() {
    let node = node(RateLimit {
        per_second: 1e6,
        burst: 10_000,
    })
    .await;
    let part = node.part("j1", &node.user_cluster(), None).await;
    let before = node.emulator.stats();
    let secret = part.env()["MSI_SECRET"].clone();
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let base = format!("http://{}", node.addr);
    let mut tasks = Vec::new();
    for worker in 0..20 {
        let (http, base, secret) = (http.clone(), base.clone(), secret.clone());
        let two = node.two.client_id.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..50 {
                // Half for the default identity over Azure ML, half for
                // `two` over App Service: two (identity, resource) pairs.
                let request = if (worker + i) % 2 == 0 {
                    http.get(format!("{base}/msi/token?api-version=2017-09-01&resource={VAULT}"))
                        .header("secret", &secret)
                } else {
                    http.get(format!(
                        "{base}/identity/token?api-version=2019-08-01&resource={VAULT}&client_id={two}"
                    ))
                    .header("x-identity-header", &secret)
                };
                let r = request.send().await.expect("send");
                if r.status() == 200 {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.expect("worker");
    }
    assert_eq!(ok, 1000);
    let after = node.emulator.stats();
    assert_eq!(
        after.tokens_issued - before.tokens_issued,
        2,
        "one IMDS token per (identity, resource): {before:?} → {after:?}"
    );
    assert_eq!(after.identity - before.identity, 2);
    assert_eq!(node.audit().len(), 1000);
    node.shutdown.cancel();
}
