//! The emulator's IMDS contract, checked over real HTTP with a plain client.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use drover_imds_emulator::{
    Emulator, EmulatorConfig, Endpoint, EventSpec, EventType, Fault, ManagedIdentity, Priority,
    RunningEmulator, VmSpec,
};
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use serde_json::Value;

const INSTANCE: &str = "/metadata/instance?api-version=2021-02-01";
const EVENTS: &str = "/metadata/scheduledevents?api-version=2020-07-01";

async fn start(config: EmulatorConfig, vms: Vec<VmSpec>) -> RunningEmulator {
    let emulator = Emulator::new(config);
    for vm in vms {
        emulator.add_vm(vm).expect("add vm");
    }
    emulator
        .bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind")
}

fn unlimited() -> EmulatorConfig {
    EmulatorConfig {
        general_rate_limit: None,
        identity_rate_limit: None,
        ..EmulatorConfig::default()
    }
}

async fn get(
    server: &RunningEmulator,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    get_from(&reqwest::Client::new(), server, path_and_query, headers).await
}

async fn get_from(
    client: &reqwest::Client,
    server: &RunningEmulator,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut req = client.get(format!("{}{path_and_query}", server.base_url()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    let body = resp.bytes().await.expect("body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

const MD: (&str, &str) = ("Metadata", "true");

#[tokio::test]
async fn missing_metadata_header_is_rejected() {
    let server = start(unlimited(), vec![VmSpec::new("vm0")]).await;
    let (status, body) = get(&server, INSTANCE, &[]).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"],
        "Bad request. Required metadata header not specified"
    );
    let (status, body) = get(&server, INSTANCE, &[("Metadata", "false")]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (
            400,
            Some("Bad request. Required metadata header not specified")
        )
    );
    let token =
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";
    let (status, body) = get(&server, token, &[]).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "bad_request_102");
    assert_eq!(
        body["error_description"],
        "Required metadata header not specified"
    );
    let (status, _) = get(&server, EVENTS, &[]).await;
    assert_eq!(status, 400);
    // Header name and value are case-insensitive.
    let (status, _) = get(&server, INSTANCE, &[("metadata", "True")]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn api_version_is_mandatory_and_checked() {
    let server = start(unlimited(), vec![VmSpec::new("vm0")]).await;
    for path in [
        "/metadata/instance",
        "/metadata/instance?api-version=2099-01-01",
        "/metadata/scheduledevents?api-version=latest",
    ] {
        let (status, body) = get(&server, path, &[MD]).await;
        assert_eq!(status, 400, "{path}");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("api-version is invalid or was not specified")),
            "{body}"
        );
        let newest: Vec<&str> = body["newest-versions"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(newest, ["2025-04-07", "2024-07-17", "2024-03-15"]);
    }
    let (status, _) = get(
        &server,
        "/metadata/instance?api-version=2021-02-01&api-version=2021-02-01",
        &[MD],
    )
    .await;
    assert_eq!(status, 400, "duplicate query parameters are rejected");
}

#[tokio::test]
async fn forwarded_requests_are_rejected() {
    let server = start(unlimited(), vec![VmSpec::new("vm0")]).await;
    let (status, body) = get(&server, INSTANCE, &[MD, ("X-Forwarded-For", "10.1.1.1")]).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("X-Forwarded-For")),
        "{body}"
    );
}

#[tokio::test]
async fn rate_limits_answer_429() {
    let server = start(EmulatorConfig::default(), vec![VmSpec::new("vm0")]).await;
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(get_from(&client, &server, INSTANCE, &[MD]).await.0);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    // Identity has its own, higher limit.
    let token = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=r";
    let mut ok = 0;
    let mut throttled = 0;
    for _ in 0..21 {
        match get_from(&client, &server, token, &[MD]).await.0 {
            200 => ok += 1,
            429 => throttled += 1,
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, throttled), (20, 1));
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(
        get_from(&client, &server, INSTANCE, &[MD]).await.0,
        200,
        "window slid"
    );
    assert_eq!(server.emulator().stats().throttled, 2);
}

#[tokio::test]
async fn instance_metadata_is_the_requesting_vms() {
    let mut spot = VmSpec::new("spot-1");
    spot.priority = Priority::Spot;
    spot.eviction_policy = "Delete".into();
    spot.source_addr = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    spot.tags = vec![("team".into(), "ml".into()), ("pool".into(), "a:b".into())];
    spot.user_data = "hello".into();
    spot.private_ip = "10.1.0.7".into();
    let mut regular = VmSpec::new("regular-0");
    regular.source_addr = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let server = start(unlimited(), vec![spot.clone(), regular.clone()]).await;

    let (status, body) = get(&server, INSTANCE, &[MD]).await;
    assert_eq!(status, 200);
    assert_eq!(body["compute"]["name"], "regular-0");
    assert_eq!(body["compute"]["priority"], "Regular");
    assert_eq!(
        body["compute"]["evictionPolicy"], "",
        "missing values are empty strings"
    );

    let from_2 = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        .build()
        .expect("client");
    let (status, body) = get_from(&from_2, &server, INSTANCE, &[MD]).await;
    assert_eq!(status, 200);
    let c = &body["compute"];
    assert_eq!(c["name"], "spot-1");
    assert_eq!(c["vmId"], spot.vm_id.as_str());
    assert_eq!(c["priority"], "Spot");
    assert_eq!(c["evictionPolicy"], "Delete");
    assert_eq!(c["tags"], "team:ml;pool:a:b");
    assert_eq!(c["tagsList"][1]["value"], "a:b");
    assert_eq!(c["userData"], "aGVsbG8=");
    assert_eq!(c["resourceId"], spot.resource_id().as_str());
    assert_eq!(c["platformFaultDomain"], "0", "primitives are strings");
    assert_eq!(
        body["network"]["interface"][0]["ipv4"]["ipAddress"][0]["privateIpAddress"],
        "10.1.0.7"
    );

    // Route parameters walk into the document.
    let (status, body) = get_from(
        &from_2,
        &server,
        "/metadata/instance/compute/vmSize?api-version=2021-02-01",
        &[MD],
    )
    .await;
    assert_eq!((status, body), (200, Value::from("Standard_D4s_v3")));

    // An address no VM claims, with two VMs registered: no answer.
    let from_3 = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)))
        .build()
        .expect("client");
    assert_eq!(get_from(&from_3, &server, INSTANCE, &[MD]).await.0, 404);
}

fn token_path(extra: &str) -> String {
    format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F{extra}"
    )
}

/// Verifies a compact ES256 JWS against the emulator's JWKS, returns its claims.
fn verify(jwks: &Value, token: &str) -> Value {
    let key = &jwks["keys"][0];
    assert_eq!(
        (
            key["kty"].as_str(),
            key["crv"].as_str(),
            key["alg"].as_str()
        ),
        (Some("EC"), Some("P-256"), Some("ES256"))
    );
    let coord = |name: &str| {
        URL_SAFE_NO_PAD
            .decode(key[name].as_str().expect("coordinate"))
            .expect("base64url")
    };
    let point = p256::EncodedPoint::from_affine_coordinates(
        coord("x").as_slice().into(),
        coord("y").as_slice().into(),
        false,
    );
    let verifying = VerifyingKey::from_encoded_point(&point).expect("public key");
    let (signing_input, signature) = token.rsplit_once('.').expect("three parts");
    let signature =
        Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).expect("sig")).expect("signature");
    verifying
        .verify(signing_input.as_bytes(), &signature)
        .expect("signature verifies");
    let (header, payload) = signing_input.split_once('.').expect("header.payload");
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).expect("b64")).expect("json");
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], key["kid"]);
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("b64")).expect("json")
}

#[tokio::test]
async fn tokens_are_signed_jwts_for_the_selected_identity() {
    let mut vm = VmSpec::new("vm0");
    let user = ManagedIdentity::user_assigned(&vm.subscription_id, &vm.resource_group, "uami-1");
    vm.user_identities.push(user.clone());
    let server = start(unlimited(), vec![vm.clone()]).await;
    let system = server.emulator().vms()[0]
        .system_identity
        .clone()
        .expect("system identity");
    assert_eq!(
        system.resource_id,
        vm.resource_id(),
        "system identity's resource id is the VM's"
    );
    let jwks = {
        let resp = reqwest::get(format!("{}/drover-emulator/jwks", server.base_url()))
            .await
            .expect("jwks");
        resp.json::<Value>().await.expect("json")
    };

    let (status, body) = get(&server, &token_path(""), &[MD]).await;
    assert_eq!(status, 200, "{body}");
    for field in ["expires_in", "expires_on", "not_before", "ext_expires_in"] {
        assert!(
            body[field]
                .as_str()
                .is_some_and(|s| s.parse::<u64>().is_ok()),
            "{field} is a numeric string: {body}"
        );
    }
    assert_eq!(body["refresh_token"], "");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["resource"], "https://management.azure.com/");
    assert_eq!(body["client_id"], system.client_id.as_str());
    assert_eq!(body["expires_in"], "86400");
    let claims = verify(&jwks, body["access_token"].as_str().expect("token"));
    assert_eq!(claims["aud"], "https://management.azure.com/");
    assert_eq!(claims["oid"], system.object_id.as_str());
    assert_eq!(claims["appid"], system.client_id.as_str());
    assert_eq!(claims["xms_mirid"], vm.resource_id().as_str());
    let iat = claims["iat"].as_u64().expect("iat");
    assert_eq!(claims["nbf"].as_u64(), Some(iat));
    assert_eq!(claims["exp"].as_u64(), Some(iat + 86400));
    assert_eq!(body["expires_on"], claims["exp"].to_string().as_str());

    // The user-assigned identity, by each of its three ids.
    for selector in [
        format!("&client_id={}", user.client_id),
        format!("&object_id={}", user.object_id),
        format!("&msi_res_id={}", user.resource_id.replace('/', "%2F")),
        format!("&mi_res_id={}", user.resource_id),
    ] {
        let (status, body) = get(&server, &token_path(&selector), &[MD]).await;
        assert_eq!(status, 200, "{selector}: {body}");
        assert_eq!(body["client_id"], user.client_id.as_str());
        let claims = verify(&jwks, body["access_token"].as_str().expect("token"));
        assert_eq!(claims["oid"], user.object_id.as_str());
        assert_eq!(claims["xms_mirid"], user.resource_id.as_str());
    }

    let (status, body) = get(
        &server,
        &token_path("&client_id=00000000-0000-0000-0000-000000000000"),
        &[MD],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        serde_json::json!({"error": "invalid_request", "error_description": "Identity not found"})
    );
    let (status, body) = get(
        &server,
        "/metadata/identity/oauth2/token?api-version=2018-02-01",
        &[MD],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    assert_eq!(server.emulator().stats().tokens_issued, 5);
}

#[tokio::test]
async fn a_vm_without_identities_has_none() {
    let mut vm = VmSpec::new("bare");
    vm.system_identity = None;
    let server = start(unlimited(), vec![vm]).await;
    let (status, body) = get(&server, &token_path(""), &[MD]).await;
    assert_eq!(status, 400);
    assert_eq!(body["error_description"], "Identity not found");
}

async fn post_ack(server: &RunningEmulator, body: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{}{EVENTS}", server.base_url()))
        .header("Metadata", "true")
        .body(body.to_owned())
        .send()
        .await
        .expect("post")
        .status()
        .as_u16()
}

#[tokio::test]
async fn scheduled_events_lifecycle() {
    let mut vm0 = VmSpec::new("vm0");
    vm0.source_addr = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let server = start(unlimited(), vec![vm0, VmSpec::new("vm1")]).await;
    let emulator = server.emulator();
    let (status, doc) = get(&server, EVENTS, &[MD]).await;
    assert_eq!(status, 200);
    assert_eq!(
        doc,
        serde_json::json!({"DocumentIncarnation": 1, "Events": []})
    );

    let mut preempt = EventSpec::new(EventType::Preempt, "vm0", Duration::from_secs(30));
    preempt.started_for = Duration::from_millis(300);
    let id = emulator.schedule_event(preempt).expect("schedule");
    let mut freeze = EventSpec::new(EventType::Freeze, "vm1", Duration::from_millis(200));
    freeze.started_for = Duration::from_secs(60);
    let freeze_id = emulator.schedule_event(freeze).expect("schedule");

    let (_, doc) = get(&server, EVENTS, &[MD]).await;
    assert_eq!(doc["DocumentIncarnation"], 3);
    let events = doc["Events"].as_array().expect("events");
    assert_eq!(events.len(), 2, "every VM of the set sees every event");
    let e = &events[0];
    assert_eq!(e["EventId"], id.as_str());
    assert_eq!(e["EventType"], "Preempt");
    assert_eq!(e["EventStatus"], "Scheduled");
    assert_eq!(e["ResourceType"], "VirtualMachine");
    assert_eq!(e["Resources"], serde_json::json!(["vm0"]));
    assert_eq!(e["EventSource"], "Platform");
    let not_before =
        httpdate::parse_http_date(e["NotBefore"].as_str().expect("NotBefore")).expect("RFC 1123");
    let notice = not_before
        .duration_since(std::time::SystemTime::now())
        .expect("in the future");
    assert!(notice > Duration::from_secs(28), "{notice:?}");

    // The freeze passes its NotBefore and starts on its own.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (_, doc) = get(&server, EVENTS, &[MD]).await;
    assert_eq!(doc["DocumentIncarnation"], 4);
    assert_eq!(doc["Events"][1]["EventId"], freeze_id.as_str());
    assert_eq!(doc["Events"][1]["EventStatus"], "Started");
    assert_eq!(
        doc["Events"][1]["NotBefore"], "",
        "NotBefore is blank once started"
    );

    // Malformed and unknown acknowledgements are 400; a valid one starts the event.
    assert_eq!(post_ack(&server, "not json").await, 400);
    assert_eq!(
        post_ack(&server, r#"{"StartRequests":[{"EventId":"nope"}]}"#).await,
        400
    );
    // vm0 may not approve an event that only names vm1.
    let not_mine = format!(r#"{{"StartRequests":[{{"EventId":"{freeze_id}"}}]}}"#);
    assert_eq!(post_ack(&server, &not_mine).await, 400);
    assert_eq!(
        post_ack(
            &server,
            &format!(r#"{{"StartRequests":[{{"EventId":"{id}"}}]}}"#)
        )
        .await,
        200
    );
    let (_, doc) = get(&server, EVENTS, &[MD]).await;
    assert_eq!(doc["DocumentIncarnation"], 5);
    assert_eq!(doc["Events"][0]["EventStatus"], "Started");
    // Acknowledging again changes nothing.
    assert_eq!(
        post_ack(
            &server,
            &format!(r#"{{"StartRequests":[{{"EventId":"{id}"}}]}}"#)
        )
        .await,
        200
    );
    assert_eq!(emulator.incarnation(), 5);

    // Once it has happened the event is gone.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (_, doc) = get(&server, EVENTS, &[MD]).await;
    assert_eq!(doc["DocumentIncarnation"], 6);
    assert_eq!(doc["Events"].as_array().map(Vec::len), Some(1));
    assert_eq!(doc["Events"][0]["EventId"], freeze_id.as_str());
}

#[tokio::test]
async fn injected_faults() {
    let server = start(unlimited(), vec![VmSpec::new("vm0")]).await;
    let emulator = server.emulator();
    emulator.inject_fault(Fault::status_times(500, 2, Some(Endpoint::Instance)));
    emulator.inject_fault(Fault::status_times(429, 1, None));
    assert_eq!(
        get(&server, EVENTS, &[MD]).await.0,
        429,
        "the instance fault does not match events"
    );
    assert_eq!(get(&server, INSTANCE, &[MD]).await.0, 500);
    assert_eq!(get(&server, INSTANCE, &[MD]).await.0, 500);
    assert_eq!(get(&server, INSTANCE, &[MD]).await.0, 200);
    // Contract violations are answered before any fault.
    emulator.inject_fault(Fault::status_times(410, 1, None));
    assert_eq!(get(&server, INSTANCE, &[]).await.0, 400);
    assert_eq!(get(&server, INSTANCE, &[MD]).await.0, 410);

    emulator.inject_fault(Fault::status_for(410, Duration::from_millis(300), None));
    assert_eq!(get(&server, INSTANCE, &[MD]).await.0, 410);
    assert_eq!(get(&server, INSTANCE, &[MD]).await.0, 410);
    tokio::time::sleep(Duration::from_millis(320)).await;
    assert_eq!(get(&server, INSTANCE, &[MD]).await.0, 200);

    emulator.inject_fault(Fault::slow_times(Duration::from_millis(300), 1, None));
    let t = Instant::now();
    assert_eq!(get(&server, INSTANCE, &[MD]).await.0, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    let t = Instant::now();
    assert_eq!(get(&server, INSTANCE, &[MD]).await.0, 200);
    assert!(t.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn admin_api_drives_the_emulator() {
    let server = start(unlimited(), vec![]).await;
    let admin = format!("{}/drover-emulator", server.base_url());
    let client = reqwest::Client::new();
    let vm = serde_json::json!({"name": "node-7", "vm_size": "Standard_NC24ads_A100_v4", "priority": "Spot", "tags": [["a", "b"]]});
    let status = client
        .post(format!("{admin}/vms"))
        .header("content-type", "application/json")
        .body(vm.to_string())
        .send()
        .await
        .expect("post")
        .status();
    assert_eq!(status.as_u16(), 201);
    let again = client
        .post(format!("{admin}/vms"))
        .header("content-type", "application/json")
        .body(vm.to_string())
        .send()
        .await
        .expect("post")
        .status();
    assert_eq!(again.as_u16(), 409);

    let (status, body) = get(&server, INSTANCE, &[MD]).await;
    assert_eq!(status, 200);
    assert_eq!(body["compute"]["name"], "node-7");
    assert_eq!(body["compute"]["vmSize"], "Standard_NC24ads_A100_v4");
    assert_eq!(body["compute"]["priority"], "Spot");
    assert_eq!(body["compute"]["tags"], "a:b");

    let event = serde_json::json!({"event_type": "Terminate", "resources": ["node-7"], "not_before_in": 300, "duration_in_seconds": -1, "started_for": 5, "description": "bye", "source": "User"});
    let resp = client
        .post(format!("{admin}/events"))
        .header("content-type", "application/json")
        .body(event.to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 201);
    let id = resp.json::<Value>().await.expect("json")["EventId"]
        .as_str()
        .expect("id")
        .to_owned();
    let (_, doc) = get(&server, EVENTS, &[MD]).await;
    assert_eq!(doc["Events"][0]["EventId"], id.as_str());
    assert_eq!(doc["Events"][0]["EventSource"], "User");

    let fault =
        serde_json::json!({"kind": {"Status": 503}, "limit": {"Requests": 1}, "endpoint": null});
    let status = client
        .post(format!("{admin}/faults"))
        .header("content-type", "application/json")
        .body(fault.to_string())
        .send()
        .await
        .expect("post")
        .status();
    assert_eq!(status.as_u16(), 201);
    assert_eq!(get(&server, INSTANCE, &[MD]).await.0, 503);

    let stats: Value = client
        .get(format!("{admin}/stats"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["instance"], 2);
    let status = client
        .delete(format!("{admin}/vms/node-7"))
        .send()
        .await
        .expect("delete")
        .status();
    assert_eq!(status.as_u16(), 204);
    assert_eq!(get(&server, INSTANCE, &[MD]).await.0, 404);
}
