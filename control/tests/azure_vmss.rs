//! The azure-vmss provider against a local fake of the Azure Resource
//! Manager endpoints it calls, answering with Azure's published REST API
//! examples (`tests/fixtures/arm/`): scaling 0 → 3 with instances that are
//! Creating and then Succeeded, deleting two specific instances, a 429 with
//! `Retry-After`, long-running operations polled through
//! `Azure-AsyncOperation` and `Location`, service principal tokens, and ARM
//! refusals as the cluster's reason for resizing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use drover_api::compute::{ComputeSpec, ProviderKind, VmPriority};
use drover_control::provider::azure::AzureVmssProvider;
use drover_control::provider::azure::arm::{ArmClient, ArmCredential};
use drover_control::provider::{Provider, ProvisionState};
use drover_control::server::{self, ServerConfig};
use serde_json::{Value, json};

const SUB: &str = "00000000-1111-2222-3333-444444444444";
const SET: &str = "drover-gpu";
const SECRET: &str = "sp-secret-value";

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/arm/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture json")
}

fn set_path() -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/rg-ml/providers/Microsoft.Compute/virtualMachineScaleSets/{SET}"
    )
}

#[derive(Debug, Clone)]
struct Vm {
    id: u32,
    /// GETs of the list that have seen it: Creating on the first, then Succeeded.
    seen: u32,
    deleting: bool,
}

#[derive(Debug, Default)]
struct Fake {
    base: String,
    capacity: u32,
    next_id: u32,
    vms: Vec<Vm>,
    priority: Option<(&'static str, &'static str)>,
    /// Polls left per operation before it succeeds.
    operations: Vec<u32>,
    polls: u32,
    tokens: u32,
    bad_bearers: u32,
    /// The next scale set GETs answer 429 with Retry-After: 1.
    throttle: u32,
    throttled_at: Vec<Instant>,
    get_at: Vec<Instant>,
    /// Calls made with a managed identity's token.
    identity_calls: u32,
    /// The next PATCH fails with this error body.
    refuse_patch: Option<Value>,
    deleted: Vec<String>,
}

type Shared = Arc<Mutex<Fake>>;

/// The `aud` of a JWT's claims (unverified: the fake only routes on it).
fn jwt_audience(token: &str) -> Option<String> {
    use base64::Engine as _;
    let claims = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v["aud"].as_str().map(str::to_string)
}

fn vm_json(f: &Fake, vm: &Vm) -> Value {
    let mut item = fixture("vmss_vm_list.json")["item"].clone();
    item["name"] = json!(format!("{SET}_{}", vm.id));
    item["instanceId"] = json!(vm.id.to_string());
    item["id"] = json!(format!("{}/virtualMachines/{}", set_path(), vm.id));
    item["properties"]["vmId"] = json!(format!("00000000-0000-0000-0000-{:012}", vm.id));
    item["properties"]["provisioningState"] = json!(if vm.deleting {
        "Deleting"
    } else if vm.seen == 0 {
        "Creating"
    } else {
        "Succeeded"
    });
    let _ = f;
    item
}

fn operation(f: &mut Fake, polls: u32) -> String {
    f.operations.push(polls);
    format!("{}/operations/{}", f.base, f.operations.len() - 1)
}

async fn arm(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let mut f = state.lock().unwrap();
    if path.ends_with("/oauth2/v2.0/token") {
        let form = String::from_utf8_lossy(&body).to_string();
        assert!(form.contains("grant_type=client_credentials"), "{form}");
        assert!(
            form.contains("scope=https%3A%2F%2Fmanagement.azure.com%2F.default"),
            "{form}"
        );
        if !form.contains(&format!("client_secret={SECRET}")) {
            return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."}))).into_response();
        }
        f.tokens += 1;
        return axum::Json(
            json!({"token_type": "Bearer", "expires_in": 3599, "access_token": "arm-token-1"}),
        )
        .into_response();
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    // The service principal's token, or a managed identity's JWT for ARM.
    let for_arm = jwt_audience(&bearer).as_deref() == Some("https://management.azure.com/");
    if for_arm {
        f.identity_calls += 1;
    }
    if bearer != "arm-token-1" && !for_arm {
        f.bad_bearers += 1;
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": {"code": "InvalidAuthenticationToken", "message": "The access token is invalid."}}))).into_response();
    }
    if let Some(rest) = path.strip_prefix("/operations/") {
        f.polls += 1;
        let i: usize = rest.parse().unwrap();
        if f.operations[i] > 0 {
            f.operations[i] -= 1;
            return axum::Json(json!({"status": "InProgress"})).into_response();
        }
        return axum::Json(json!({"status": "Succeeded"})).into_response();
    }
    if let Some(rest) = path.strip_prefix("/locations/") {
        f.polls += 1;
        let i: usize = rest.parse().unwrap();
        if f.operations[i] > 0 {
            f.operations[i] -= 1;
            return StatusCode::ACCEPTED.into_response();
        }
        // Deleted instances go once the operation is done.
        f.vms.retain(|v| !v.deleting);
        return StatusCode::OK.into_response();
    }
    assert_eq!(uri.query(), Some("api-version=2024-07-01"), "{uri}");
    let base = set_path();
    match (method.as_str(), path.strip_prefix(&base)) {
        ("GET", Some("")) => {
            if f.throttle > 0 {
                f.throttle -= 1;
                f.throttled_at.push(Instant::now());
                return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1"), ("x-ms-ratelimit-remaining-subscription-reads", "0")], axum::Json(json!({"error": {"code": "TooManyRequests", "message": "The request is being throttled."}}))).into_response();
            }
            f.get_at.push(Instant::now());
            let mut body = fixture("vmss_get.json")["body"].clone();
            body["name"] = json!(SET);
            body["id"] = json!(base);
            body["sku"]["capacity"] = json!(f.capacity);
            if let Some((p, e)) = f.priority {
                body["properties"]["virtualMachineProfile"]["priority"] = json!(p);
                body["properties"]["virtualMachineProfile"]["evictionPolicy"] = json!(e);
            }
            axum::Json(body).into_response()
        }
        ("PATCH", Some("")) => {
            if let Some(err) = f.refuse_patch.take() {
                return (StatusCode::CONFLICT, axum::Json(err)).into_response();
            }
            let req: Value = serde_json::from_slice(&body).unwrap();
            let capacity = req["sku"]["capacity"].as_u64().expect("capacity") as u32;
            while (f.vms.iter().filter(|v| !v.deleting).count() as u32) < capacity {
                let id = f.next_id;
                f.next_id += 1;
                f.vms.push(Vm { id, seen: 0, deleting: false });
            }
            f.capacity = capacity;
            let op = operation(&mut f, 2);
            (StatusCode::ACCEPTED, [("azure-asyncoperation", op)], axum::Json(fixture("vmss_update.json")["body"].clone())).into_response()
        }
        ("GET", Some("/virtualMachines")) => {
            let value: Vec<Value> = f.vms.iter().map(|v| vm_json(&f, v)).collect();
            for v in f.vms.iter_mut() {
                v.seen += 1;
            }
            axum::Json(json!({ "value": value })).into_response()
        }
        ("POST", Some("/delete")) => {
            let req: Value = serde_json::from_slice(&body).unwrap();
            let shape = fixture("vmss_delete_instances.json");
            assert!(shape["request"]["instanceIds"].is_array());
            for id in req["instanceIds"].as_array().unwrap() {
                let id: u32 = id.as_str().unwrap().parse().unwrap();
                if let Some(v) = f.vms.iter_mut().find(|v| v.id == id) {
                    v.deleting = true;
                    f.deleted.push(format!("{SET}_{id}"));
                }
            }
            f.capacity = f.vms.iter().filter(|v| !v.deleting).count() as u32;
            f.operations.push(1);
            let location = format!("{}/locations/{}", f.base, f.operations.len() - 1);
            (StatusCode::ACCEPTED, [("location", location)]).into_response()
        }
        _ => (StatusCode::NOT_FOUND, axum::Json(json!({"error": {"code": "ResourceNotFound", "message": format!("{method} {path}")}}))).into_response(),
    }
}

async fn start_fake() -> (String, Shared) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state: Shared = Arc::new(Mutex::new(Fake {
        base: base.clone(),
        ..Default::default()
    }));
    let app = Router::new().fallback(arm).with_state(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, state)
}

fn credential(base: &str, secret: &str) -> ArmCredential {
    ArmCredential::ClientSecret {
        authority: base.to_string(),
        tenant: "tenant-1".into(),
        client_id: "app-1".into(),
        secret: secret.into(),
    }
}

fn cluster() -> ComputeSpec {
    let mut c = ComputeSpec::new("gpu", "STANDARD_NC6", 4);
    c.provider = Some(ProviderKind::AzureVmss);
    c.scale_set = Some(set_path());
    c
}

fn provider(base: &str) -> AzureVmssProvider {
    let mut arm = ArmClient::new(base, credential(base, SECRET)).unwrap();
    arm.default_wait = Duration::from_millis(50);
    AzureVmssProvider::new(arm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_from_zero_to_three_and_deletes_two_specific_instances() {
    let (base, fake) = start_fake().await;
    let p = provider(&base);
    let c = cluster();
    // A 429 with Retry-After is waited out, then the call goes on.
    fake.lock().unwrap().throttle = 1;
    let made = p.create_nodes(&c, 3, "").await.expect("scale out");
    let names: Vec<&str> = made.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(names, ["drover-gpu_0", "drover-gpu_1", "drover-gpu_2"]);
    assert!(
        made.iter().all(|n| n.state == ProvisionState::Creating),
        "{made:?}"
    );
    {
        let f = fake.lock().unwrap();
        assert_eq!(f.capacity, 3);
        assert_eq!(f.tokens, 1, "one token for every call");
        assert_eq!(f.bad_bearers, 0);
        assert!(
            f.polls >= 3,
            "the update's operation was polled until it succeeded: {}",
            f.polls
        );
        let waited = f.get_at[0].duration_since(f.throttled_at[0]);
        assert!(
            waited >= Duration::from_secs(1),
            "Retry-After: 1 was not honoured: {waited:?}"
        );
    }
    // The next listing: they are up.
    let listed = p.list_nodes(&c).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert!(
        listed.iter().all(|n| n.state == ProvisionState::Running),
        "{listed:?}"
    );

    // The autoscaler picked two idle nodes: exactly those go.
    p.remove_node(&c, "drover-gpu_0").await.expect("remove 0");
    p.remove_node(&c, "00000000-0000-0000-0000-000000000002")
        .await
        .expect("remove 2 by vm id");
    // Removing one that is gone already succeeds.
    p.remove_node(&c, "drover-gpu_0").await.expect("again");
    let f = fake.lock().unwrap();
    assert_eq!(f.deleted, ["drover-gpu_0", "drover-gpu_2"]);
    assert_eq!(f.capacity, 1);
    let left: Vec<u32> = f.vms.iter().map(|v| v.id).collect();
    assert_eq!(left, [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_what_azure_said() {
    let (base, fake) = start_fake().await;
    let p = provider(&base);
    let c = cluster();
    let errors = fixture("arm_errors.json");
    for (key, code) in [
        ("quota", "OperationNotAllowed"),
        ("sku_not_available", "SkuNotAvailable"),
        ("image_not_found", "ImageNotFound"),
    ] {
        fake.lock().unwrap().refuse_patch = Some(errors[key].clone());
        let e = p.create_nodes(&c, 2, "").await.expect_err("refused");
        let text = e.message();
        assert!(
            text.starts_with("the azure-vmss provider failed to create nodes: azure refused ("),
            "{text}"
        );
        assert!(text.contains(code), "{text}");
        assert!(
            text.contains(errors[key]["error"]["message"].as_str().unwrap()),
            "{text}"
        );
    }
    // A low-priority cluster on a Regular scale set, and a wrong secret.
    let mut spot = cluster();
    spot.vm_priority = VmPriority::LowPriority;
    let e = p
        .create_nodes(&spot, 1, "")
        .await
        .expect_err("regular scale set");
    assert!(
        e.message().contains("use a Spot scale set"),
        "{}",
        e.message()
    );
    fake.lock().unwrap().priority = Some(("Spot", "Delete"));
    p.create_nodes(&spot, 1, "")
        .await
        .expect("a Spot scale set with Delete serves it");
    let mut bad = ArmClient::new(&base, credential(&base, "wrong")).unwrap();
    bad.default_wait = Duration::from_millis(10);
    let e = AzureVmssProvider::new(bad)
        .list_nodes(&c)
        .await
        .expect_err("bad secret");
    assert!(
        e.message().contains("Invalid client secret"),
        "{}",
        e.message()
    );
    assert!(!e.message().contains("wrong"), "the secret is never shown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_error_is_the_clusters_resizing_reason_and_bad_ids_are_refused_at_the_door() {
    let (base, fake) = start_fake().await;
    fake.lock().unwrap().refuse_patch = Some(fixture("arm_errors.json")["quota"].clone());
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(dir.path().to_path_buf());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.azure = Some((base.clone(), credential(&base, SECRET)));
    let server = server::start(config).await.expect("server");
    let token = std::fs::read_to_string(dir.path().join(server::ADMIN_TOKEN_FILE)).unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://{}", server.addr);
    let post = |body: Value| {
        http.post(format!("{url}/v1/clusters"))
            .bearer_auth(token.trim())
            .json(&body)
            .send()
    };
    // The door refuses what the rules refuse.
    let mut bad = cluster();
    bad.scale_set = Some(
        "/subscriptions/x/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1".into(),
    );
    let r = post(json!({"spec": bad})).await.unwrap();
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.contains("is not a scale set resource id"), "{text}");
    let mut none = cluster();
    none.scale_set = None;
    let text = post(json!({"spec": none}))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("scale_set: is required with the azure-vmss provider"),
        "{text}"
    );

    let mut c = cluster();
    c.min_nodes = 2;
    let r = post(json!({"spec": c})).await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let mut reason = String::new();
    for _ in 0..100 {
        let v: Value = http
            .get(format!("{url}/v1/clusters/gpu"))
            .bearer_auth(token.trim())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        reason = v.to_string();
        if reason.contains("OperationNotAllowed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reason.contains("azure refused (OperationNotAllowed): Operation could not be completed as it results in exceeding approved standardNCFamily Cores quota"), "{reason}");
    server.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(10), server.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_planes_managed_identity_gets_the_arm_token_through_imds() {
    let (base, fake) = start_fake().await;
    let emulator =
        drover_imds_emulator::Emulator::new(drover_imds_emulator::EmulatorConfig::default());
    emulator
        .add_vm(drover_imds_emulator::VmSpec::new("drover-control"))
        .expect("vm");
    let running = emulator
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .expect("emulator");
    let imds = drover_imds::ImdsClient::new(drover_imds::ImdsConfig {
        base_url: running.base_url(),
        ..Default::default()
    })
    .unwrap();
    let mut arm = ArmClient::new(
        &base,
        ArmCredential::ManagedIdentity(imds, drover_imds::Identity::System),
    )
    .unwrap();
    arm.default_wait = Duration::from_millis(50);
    let p = AzureVmssProvider::new(arm);
    let c = cluster();
    p.create_nodes(&c, 1, "")
        .await
        .expect("scale out with the managed identity");
    p.list_nodes(&c).await.expect("list");
    let calls = fake.lock().unwrap().identity_calls;
    assert!(
        calls >= 4,
        "every ARM call carried the identity's token: {calls}"
    );
    assert_eq!(
        emulator.stats().identity,
        1,
        "one IMDS token for every call"
    );
    running.shutdown().await;
}
