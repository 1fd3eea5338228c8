//! The IMDS client against the IMDS emulator over real loopback HTTP.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use drover_imds::{
    EventStatus, EventType, Identity, ImdsClient, ImdsConfig, Priority, RateLimits, RequestError,
    RetryPolicy,
};
use drover_imds_emulator::{
    Emulator, EmulatorConfig, Endpoint, EventSpec, EventType as EmuEventType, Fault, FaultKind,
    FaultLimit, ManagedIdentity, Priority as EmuPriority, RunningEmulator, VmSpec,
};
use tokio_util::sync::CancellationToken;

const ARM: &str = "https://management.azure.com/";

/// Microsoft's schedule, scaled down 100×: tries at 0, 20, 60, 140, 300 ms.
fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        delays: [20, 40, 80, 160]
            .into_iter()
            .map(Duration::from_millis)
            .collect(),
        gone_budget: Duration::from_secs(3),
        max_retry_after: Duration::from_secs(5),
    }
}

async fn emulator(config: EmulatorConfig, vm: VmSpec) -> RunningEmulator {
    let emulator = Emulator::new(config);
    emulator.add_vm(vm).expect("add vm");
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

fn client(server: &RunningEmulator) -> ImdsClient {
    ImdsClient::new(ImdsConfig {
        base_url: server.base_url(),
        retry: fast_retry(),
        ..ImdsConfig::default()
    })
    .expect("client")
}

#[tokio::test]
async fn instance_metadata_is_typed() {
    let mut vm = VmSpec::new("gpu-node-3");
    vm.vm_size = "Standard_NC24ads_A100_v4".into();
    vm.priority = EmuPriority::Spot;
    vm.eviction_policy = "Delete".into();
    vm.tags = vec![
        ("drover-cluster".into(), "gpu".into()),
        ("url".into(), "http://x:1;y".into()),
    ];
    vm.user_data = "#cloud-config\n".into();
    vm.private_ip = "10.2.0.9".into();
    vm.vm_scale_set_name = "gpu-vmss".into();
    let server = emulator(unlimited(), vm.clone()).await;
    let md = client(&server).instance_metadata().await.expect("metadata");
    assert_eq!(md.compute.name, "gpu-node-3");
    assert_eq!(md.compute.vm_id, vm.vm_id);
    assert_eq!(md.compute.vm_size, "Standard_NC24ads_A100_v4");
    assert_eq!(md.compute.priority(), Priority::Spot);
    assert!(md.compute.priority().is_preemptible());
    assert_eq!(md.compute.eviction_policy, "Delete");
    assert_eq!(md.compute.vm_scale_set_name, "gpu-vmss");
    assert_eq!(md.compute.resource_id, vm.resource_id());
    assert_eq!(
        md.compute.tag_map().get("url").map(String::as_str),
        Some("http://x:1;y")
    );
    assert_eq!(
        md.compute.user_data().as_deref(),
        Some(&b"#cloud-config\n"[..])
    );
    assert_eq!(
        md.private_ipv4(),
        vec![IpAddr::V4(Ipv4Addr::new(10, 2, 0, 9))]
    );
}

#[tokio::test]
async fn throttled_then_successful() {
    let server = emulator(unlimited(), VmSpec::new("vm0")).await;
    server
        .emulator()
        .inject_fault(Fault::status_times(429, 2, Some(Endpoint::Instance)));
    let md = client(&server)
        .instance_metadata()
        .await
        .expect("third try succeeds");
    assert_eq!(md.compute.name, "vm0");
    assert_eq!(server.emulator().stats().instance, 3);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let server = emulator(unlimited(), VmSpec::new("vm0")).await;
    server.emulator().inject_fault(Fault {
        kind: FaultKind::StatusRetryAfter(429, 1),
        limit: FaultLimit::Requests(1),
        endpoint: None,
    });
    let start = Instant::now();
    client(&server)
        .instance_metadata()
        .await
        .expect("second try succeeds");
    // The schedule alone would retry after 20 ms.
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

/// IMDS answers 410 while it is updated; Microsoft says keep retrying for up
/// to 70 s, longer than the five-try schedule lasts.
#[tokio::test]
async fn gone_for_a_while_then_successful() {
    let server = emulator(unlimited(), VmSpec::new("vm0")).await;
    // Outlasts the scaled schedule (300 ms), within the scaled 410 budget.
    server
        .emulator()
        .inject_fault(Fault::status_for(410, Duration::from_millis(700), None));
    let start = Instant::now();
    let events = client(&server)
        .scheduled_events()
        .await
        .expect("succeeds once 410 stops");
    assert!(start.elapsed() >= Duration::from_millis(700));
    assert_eq!(events.document_incarnation, 1);
    assert!(
        server.emulator().stats().scheduled_events > 5,
        "more than five tries for 410"
    );
}

#[tokio::test]
async fn server_errors_give_up_after_five_tries() {
    let server = emulator(unlimited(), VmSpec::new("vm0")).await;
    server
        .emulator()
        .inject_fault(Fault::status_times(500, 100, None));
    let err = client(&server)
        .instance_metadata()
        .await
        .expect_err("keeps failing");
    match err.request_error() {
        Some(RequestError::RetriesExhausted { attempts, .. }) => assert_eq!(*attempts, 5),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(server.emulator().stats().instance, 5);
}

#[tokio::test]
async fn timeouts_are_retried() {
    let server = emulator(unlimited(), VmSpec::new("vm0")).await;
    server
        .emulator()
        .inject_fault(Fault::slow_times(Duration::from_millis(800), 1, None));
    let client = ImdsClient::new(ImdsConfig {
        base_url: server.base_url(),
        request_timeout: Duration::from_millis(200),
        retry: fast_retry(),
        ..ImdsConfig::default()
    })
    .expect("client");
    client
        .instance_metadata()
        .await
        .expect("second try is fast");
    assert_eq!(server.emulator().stats().instance, 2);
}

#[tokio::test]
async fn unknown_identity_is_not_retried_and_reads_clearly() {
    let server = emulator(unlimited(), VmSpec::new("vm0")).await;
    let identity = Identity::ClientId("7f1bd8a3-0000-4000-8000-000000000000".into());
    let err = client(&server)
        .token(ARM, &identity)
        .await
        .expect_err("no such identity");
    assert_eq!(
        err.rejection(),
        Some(("invalid_request", "Identity not found"))
    );
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    assert_eq!(
        chain,
        "get token for https://management.azure.com/ (identity with client_id 7f1bd8a3-0000-4000-8000-000000000000): \
         imds rejected the request (400): invalid_request: Identity not found"
    );
    assert_eq!(
        server.emulator().stats().identity,
        1,
        "a 400 is never retried"
    );
}

#[tokio::test]
async fn tokens_for_each_identity_kind() {
    let mut vm = VmSpec::new("vm0");
    let user = ManagedIdentity::user_assigned(&vm.subscription_id, &vm.resource_group, "uami");
    vm.user_identities.push(user.clone());
    let server = emulator(unlimited(), vm).await;
    let system_client_id = server.emulator().vms()[0]
        .system_identity
        .clone()
        .expect("system")
        .client_id;
    let client = client(&server);
    let t = client.token(ARM, &Identity::System).await.expect("system");
    assert_eq!(t.client_id, system_client_id);
    assert_eq!(t.resource, ARM);
    assert_eq!(t.token_type, "Bearer");
    let lifetime = t
        .expires_on
        .duration_since(t.not_before)
        .expect("expires after issue");
    assert_eq!(lifetime, Duration::from_secs(86400));
    for identity in [
        Identity::ClientId(user.client_id.clone()),
        Identity::ObjectId(user.object_id.clone()),
        Identity::ResourceId(user.resource_id.clone()),
    ] {
        let t = client.token(ARM, &identity).await.expect("user-assigned");
        assert_eq!(t.client_id, user.client_id, "{identity}");
    }
    // Four keys, four requests; asking again hits the cache.
    client.token(ARM, &Identity::System).await.expect("cached");
    assert_eq!(server.emulator().stats().identity, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_is_single_flight() {
    let server = emulator(EmulatorConfig::default(), VmSpec::new("vm0")).await;
    // A slow answer keeps the first request in flight while the others arrive.
    server
        .emulator()
        .inject_fault(Fault::slow_times(Duration::from_millis(200), 1, None));
    let client = client(&server);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.token(ARM, &Identity::System).await })
        })
        .collect();
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.push(task.await.expect("join").expect("token"));
    }
    assert!(
        tokens.iter().all(|t| Arc::ptr_eq(t, &tokens[0])),
        "all callers share one token"
    );
    assert_eq!(
        server.emulator().stats().identity,
        1,
        "100 callers, one IMDS request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_refreshes_before_expiry() {
    // 2 s tokens: refreshed at half-life, 1 s after issue.
    let config = EmulatorConfig {
        token_lifetime: Duration::from_secs(2),
        ..EmulatorConfig::default()
    };
    let server = emulator(config, VmSpec::new("vm0")).await;
    let client = client(&server);
    let asked = Instant::now();
    let first = client.token(ARM, &Identity::System).await.expect("token");
    assert!(!first.needs_refresh());
    let again = client.token(ARM, &Identity::System).await.expect("token");
    assert!(Arc::ptr_eq(&first, &again));
    assert_eq!(server.emulator().stats().identity, 1);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(first.needs_refresh());
    // Due for refresh but still valid: 50 concurrent callers get the current
    // token without waiting, while exactly one background request (slowed
    // to 300 ms here) replaces it.
    server
        .emulator()
        .inject_fault(Fault::slow_times(Duration::from_millis(300), 1, None));
    let handles: Vec<_> = (0..50)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let token = client.token(ARM, &Identity::System).await;
                (token, t.elapsed())
            })
        })
        .collect();
    for h in handles {
        let (token, waited) = h.await.expect("join");
        assert!(Arc::ptr_eq(&token.expect("token"), &first));
        assert!(
            waited < Duration::from_millis(250),
            "caller waited {waited:?} for the refresh"
        );
    }
    let deadline = asked + Duration::from_millis(1900);
    let fresh = loop {
        let t = client.token(ARM, &Identity::System).await.expect("token");
        if !Arc::ptr_eq(&t, &first) {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "no refresh before the old token expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // (`expires_on` has whole seconds; measure against the 2 s lifetime instead.)
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "refreshed before expiry"
    );
    assert_ne!(fresh.token, first.token);
    assert_eq!(server.emulator().stats().identity, 2, "one refresh request");
}

#[tokio::test]
async fn client_never_trips_the_rate_limit() {
    // The emulator enforces Azure's 5 req/s; the client limits itself to match.
    let server = emulator(EmulatorConfig::default(), VmSpec::new("vm0")).await;
    let client = ImdsClient::new(ImdsConfig {
        base_url: server.base_url(),
        retry: RetryPolicy {
            delays: vec![],
            ..fast_retry()
        },
        rate_limits: Some(RateLimits::default()),
        ..ImdsConfig::default()
    })
    .expect("client");
    let start = Instant::now();
    let calls: Vec<_> = (0..11)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.scheduled_events().await })
        })
        .collect();
    for call in calls {
        call.await
            .expect("join")
            .expect("no 429 (and no retry allowed)");
    }
    assert_eq!(server.emulator().stats().throttled, 0);
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "11 requests at 5/s take over 2 s"
    );
}

#[tokio::test]
async fn scheduled_events_incarnations_and_acknowledgement() {
    let mut me = VmSpec::new("node-a");
    me.source_addr = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let server = emulator(unlimited(), me).await;
    server
        .emulator()
        .add_vm(VmSpec::new("node-b"))
        .expect("other vm");
    // Without the client's limiter, whose 5 req/s would stretch this test's timing.
    let client = ImdsClient::new(ImdsConfig {
        base_url: server.base_url(),
        retry: fast_retry(),
        rate_limits: None,
        ..ImdsConfig::default()
    })
    .expect("client");
    let mut watcher = client.scheduled_events_watcher("node-a");

    let first = watcher
        .poll()
        .await
        .expect("poll")
        .expect("first poll reports");
    assert_eq!((first.incarnation, first.events.len()), (1, 0));
    assert_eq!(
        watcher.poll().await.expect("poll"),
        None,
        "same incarnation: nothing new"
    );

    // An event for another VM changes the document but concerns us not.
    server
        .emulator()
        .schedule_event(EventSpec::new(
            EmuEventType::Reboot,
            "node-b",
            Duration::from_secs(900),
        ))
        .expect("schedule");
    let update = watcher
        .poll()
        .await
        .expect("poll")
        .expect("new incarnation");
    assert_eq!((update.incarnation, update.events.len()), (2, 0));

    let mut spec = EventSpec::new(EmuEventType::Preempt, "node-a", Duration::from_secs(30));
    spec.started_for = Duration::from_secs(1);
    let id = server.emulator().schedule_event(spec).expect("schedule");
    let update = watcher
        .poll()
        .await
        .expect("poll")
        .expect("new incarnation");
    assert_eq!(update.incarnation, 3);
    let [event] = update.events.as_slice() else {
        panic!("one event for node-a: {update:?}")
    };
    assert_eq!(event.event_id, id);
    assert_eq!(event.event_type, EventType::Preempt);
    assert_eq!(event.event_status, EventStatus::Scheduled);
    let notice = event
        .not_before_time()
        .expect("NotBefore")
        .expect("scheduled: has one")
        .duration_since(SystemTime::now())
        .expect("future");
    assert!(
        notice > Duration::from_secs(25),
        "Preempt gives at least 30 s notice"
    );

    client
        .acknowledge_events(std::slice::from_ref(&id))
        .await
        .expect("ack");
    let update = watcher
        .poll()
        .await
        .expect("poll")
        .expect("acknowledged: new incarnation");
    assert_eq!(update.events.len(), 1, "{update:?}");
    assert_eq!(update.events[0].event_status, EventStatus::Started);
    assert_eq!(update.events[0].not_before_time(), Ok(None));

    tokio::time::sleep(Duration::from_millis(1050)).await;
    let update = watcher
        .poll()
        .await
        .expect("poll")
        .expect("event over: new incarnation");
    assert!(
        update.events.is_empty(),
        "the preemption happened and is gone"
    );

    // Acknowledging an unknown event is a 400 and is not retried.
    let before = server.emulator().stats().scheduled_events;
    let err = client
        .acknowledge_events(&["nope".to_owned()])
        .await
        .expect_err("unknown id");
    assert!(err.rejection().is_some(), "{err:?}");
    assert_eq!(server.emulator().stats().scheduled_events, before + 1);
}

#[tokio::test]
async fn watcher_task_sends_updates_until_shut_down() {
    let server = emulator(unlimited(), VmSpec::new("vm0")).await;
    let client = client(&server);
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(client.scheduled_events_watcher("vm0").run(
        Duration::from_millis(20),
        tx,
        shutdown.clone(),
    ));
    assert_eq!(rx.recv().await.expect("initial").incarnation, 1);
    let id = server
        .emulator()
        .schedule_event(EventSpec::new(
            EmuEventType::Terminate,
            "vm0",
            Duration::from_secs(300),
        ))
        .expect("schedule");
    let update = tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .expect("in time")
        .expect("update");
    assert_eq!(update.events[0].event_id, id);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("stops")
        .expect("join");
}
