//! The IMDS client parses the sample bodies from Microsoft's IMDS documentation
//! (`fixtures/imds/`, sources in its README), served verbatim by a minimal
//! HTTP server so the whole client path runs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_imds::{
    EventStatus, EventType, Identity, ImdsClient, ImdsConfig, Priority, RetryPolicy,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/imds/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Serves `body` with `status` to every request; returns the base URL.
async fn serve(status: u16, body: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                // Read the request head (these requests have tiny or no bodies).
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(body.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

async fn client_for(status: u16, file: &str) -> ImdsClient {
    ImdsClient::new(ImdsConfig {
        base_url: serve(status, fixture(file)).await,
        retry: RetryPolicy {
            delays: vec![],
            ..RetryPolicy::default()
        },
        ..ImdsConfig::default()
    })
    .expect("client")
}

#[tokio::test]
async fn documented_instance_metadata() {
    let md = client_for(200, "instance-2021-02-01.json")
        .await
        .instance_metadata()
        .await
        .expect("parse");
    let c = &md.compute;
    assert_eq!(c.vm_id, "02aab8a4-74ef-476e-8182-f6d2ba4166a6");
    assert_eq!(c.name, "examplevmname");
    assert_eq!(c.vm_size, "Standard_A3");
    assert_eq!(c.location, "westus");
    assert_eq!(c.priority(), Priority::Regular);
    assert_eq!(c.eviction_policy, "");
    assert_eq!(c.vm_scale_set_name, "crpteste9vflji9");
    assert!(c.resource_id.ends_with("/virtualMachines/examplevmname"));
    assert_eq!(c.zone, "1");
    assert_eq!(c.tags, "baz:bash;foo:bar");
    assert_eq!(c.tag_map().get("foo").map(String::as_str), Some("bar"));
    assert_eq!(c.user_data().as_deref(), Some(&b"foobar"[..]));
    assert_eq!(
        md.private_ipv4(),
        vec!["10.144.133.132".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert_eq!(md.network.interface[0].mac_address, "0011AAFFBB22");
}

#[tokio::test]
async fn documented_scheduled_events_sequence() {
    let mut incarnations = Vec::new();
    for n in 1..=4 {
        let client = client_for(200, &format!("scheduledevents-{n}.json")).await;
        let doc = client.scheduled_events().await.expect("parse");
        incarnations.push(doc.document_incarnation);
        match n {
            2 | 3 => {
                let e = &doc.events[0];
                assert_eq!(e.event_id, "C7061BAC-AFDC-4513-B24B-AA5F13A16123");
                assert_eq!(e.event_type, EventType::Freeze);
                assert_eq!(e.resource_type, "VirtualMachine");
                assert!(e.affects("WestNO_1") && !e.affects("WestNO_2"));
                assert_eq!(e.duration_in_seconds, Some(5));
                assert_eq!(e.event_source, "Platform");
                if n == 2 {
                    assert_eq!(e.event_status, EventStatus::Scheduled);
                    let at = e
                        .not_before_time()
                        .expect("RFC 1123 NotBefore")
                        .expect("scheduled: has one");
                    assert_eq!(
                        at.duration_since(UNIX_EPOCH)
                            .expect("after epoch")
                            .as_secs(),
                        1_649_716_018
                    );
                } else {
                    assert_eq!(e.event_status, EventStatus::Started);
                    assert_eq!(e.not_before_time(), Ok(None));
                }
            }
            _ => assert!(doc.events.is_empty()),
        }
    }
    assert_eq!(incarnations, [1, 2, 3, 4]);
}

/// Microsoft's mock server writes `NotBefore` in ISO 8601 and gives the
/// event a new `EventId` when it starts.
#[tokio::test]
async fn mock_server_scheduled_events() {
    let scheduled = client_for(200, "scheduledevents-mock-scheduled.json")
        .await
        .scheduled_events()
        .await
        .expect("parse");
    let started = client_for(200, "scheduledevents-mock-started.json")
        .await
        .scheduled_events()
        .await
        .expect("parse");
    let (before, after) = (&scheduled.events[0], &started.events[0]);
    assert_eq!(before.event_type, EventType::Reboot);
    assert_eq!(before.event_status, EventStatus::Scheduled);
    assert!(before.affects("vmss_vm1"));
    assert_eq!(before.duration_in_seconds, Some(-1));
    let at = before
        .not_before_time()
        .expect("ISO 8601 NotBefore")
        .expect("scheduled: has one");
    assert_eq!(
        at.duration_since(UNIX_EPOCH)
            .expect("after epoch")
            .as_secs(),
        1_796_155_461,
        "2026-12-01T20:04:21Z"
    );
    assert_eq!(after.event_status, EventStatus::Started);
    assert_eq!(after.not_before_time(), Ok(None));
    assert_ne!(before.event_id, after.event_id, "the mock renames it");
    assert_eq!(
        (scheduled.document_incarnation, started.document_incarnation),
        (2, 3)
    );
}

/// A `NotBefore` that is no date is an error, never "now".
#[tokio::test]
async fn an_unreadable_not_before_is_an_error() {
    let body = fixture("scheduledevents-mock-scheduled.json")
        .replace("2026-12-01T20:04:21Z", "in a while");
    let client = ImdsClient::new(ImdsConfig {
        base_url: serve(200, body).await,
        ..ImdsConfig::default()
    })
    .expect("client");
    let doc = client.scheduled_events().await.expect("parse");
    let err = doc.events[0].not_before_time().expect_err("not a date");
    assert_eq!(err.text, "in a while");
}

#[tokio::test]
async fn documented_token_response() {
    let client = client_for(200, "token.json").await;
    let token = client
        .fetch_token("https://management.azure.com/", &Identity::System)
        .await
        .expect("parse");
    assert_eq!(token.token, "eyJ0eXAi...");
    assert_eq!(
        token.expires_on,
        UNIX_EPOCH + Duration::from_secs(1_506_484_173)
    );
    assert_eq!(
        token.not_before,
        UNIX_EPOCH + Duration::from_secs(1_506_480_273)
    );
    assert_eq!(token.resource, "https://management.azure.com/");
    assert_eq!(token.token_type, "Bearer");
    assert_eq!(token.client_id, "", "absent in the documented sample");
    // 3599 s of life from receipt: refreshed 5 minutes before that, not yet.
    assert!(!token.needs_refresh());
    assert!(
        token.expires_on < SystemTime::now(),
        "the sample is from 2017"
    );
}

#[tokio::test]
async fn documented_errors_are_surfaced() {
    let err = client_for(400, "error-no-version.json")
        .await
        .instance_metadata()
        .await
        .expect_err("400");
    let (error, description) = err.rejection().expect("rejection");
    assert!(
        error.starts_with("Bad request. api-version is invalid"),
        "{error}"
    );
    assert_eq!(description, "");
    let err = client_for(400, "error-identity-not-found.json")
        .await
        .token("r", &Identity::ClientId("x".into()))
        .await
        .expect_err("400");
    assert_eq!(
        err.rejection(),
        Some(("invalid_request", "Identity not found"))
    );
}
