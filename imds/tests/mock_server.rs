//! The IMDS client and the scheduled-events watcher against a stand-in for
//! Microsoft's scheduled-events mock server
//! (`Azure-Samples/scheduled-events-mock-server`, `main.py`): `NotBefore` in
//! ISO 8601, a new `EventId` whenever the event changes status, `POST`
//! `StartRequests` moving a scheduled event on, and, in front of it, IMDS's
//! 410 while it is being updated.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use drover_imds::{
    EventStatus, EventType, EventsUpdate, ImdsClient, ImdsConfig, RetryPolicy, parse_event_time,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const VM: &str = "vmss_vm1";

#[derive(Default)]
struct Mock {
    incarnation: i64,
    /// (EventId, EventStatus, EventType, NotBefore) of the one event, as the
    /// mock keeps a single `last_event`.
    event: Option<(String, &'static str, &'static str, String)>,
    /// 410 Gone to every request until then.
    gone_until: Option<Instant>,
    /// The bodies of `POST`s, as JSON.
    posts: Vec<Value>,
    renamed: u32,
}

impl Mock {
    fn document(&self) -> Value {
        let events: Vec<Value> = self
            .event
            .iter()
            .map(|(id, status, kind, not_before)| {
                json!({
                    "EventId": id,
                    "EventStatus": status,
                    "EventType": kind,
                    "ResourceType": "VirtualMachine",
                    "Resources": [VM],
                    "EventSource": "User",
                    "NotBefore": if *status == "Started" { "" } else { not_before.as_str() },
                    "Description": "Virtual machine is going to be restarted as requested by authorized user.",
                    "DurationInSeconds": -1,
                })
            })
            .collect();
        json!({ "DocumentIncarnation": self.incarnation, "Events": events })
    }

    /// `generate-event`: a new event, a new id, a new incarnation.
    fn schedule(&mut self, kind: &'static str, not_before: SystemTime) -> String {
        let id = format!("{:08x}-0000-4000-8000-000000000000", self.incarnation + 1);
        let iso = iso(not_before);
        self.event = Some((id.clone(), "Scheduled", kind, iso));
        self.incarnation += 1;
        id
    }
}

/// `%Y-%m-%dT%H:%M:%SZ`, as the mock writes `NotBefore`.
fn iso(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after epoch")
        .as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

type Shared = Arc<Mutex<Mock>>;

fn gone(mock: &Mock) -> Option<Response> {
    mock.gone_until.filter(|t| Instant::now() < *t).map(|_| {
        (
            StatusCode::GONE,
            Json(json!({"error": "the service is being updated"})),
        )
            .into_response()
    })
}

async fn events_get(State(mock): State<Shared>) -> Response {
    let mock = mock.lock().expect("lock");
    gone(&mock).unwrap_or_else(|| Json(mock.document()).into_response())
}

/// The mock's `POST`: the first `StartRequests` entry naming the scheduled
/// event moves it to `Started` under a new `EventId`.
async fn events_post(State(mock): State<Shared>, body: axum::body::Bytes) -> Response {
    let mut mock = mock.lock().expect("lock");
    if let Some(r) = gone(&mock) {
        return r;
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "Invalid JSON"})),
        )
            .into_response();
    };
    mock.posts.push(request.clone());
    let asked = request["StartRequests"][0]["EventId"]
        .as_str()
        .map(str::to_owned);
    let renamed = mock.renamed + 1;
    if let Some((id, status, ..)) = &mut mock.event
        && asked.as_deref() == Some(id.as_str())
        && *status == "Scheduled"
    {
        *id = format!("{renamed:08x}-ffff-4000-8000-000000000000");
        *status = "Started";
        mock.renamed = renamed;
        mock.incarnation += 1;
    }
    Json(mock.document()).into_response()
}

async fn serve(mock: Shared) -> String {
    let app = axum::Router::new()
        .route(
            "/metadata/scheduledevents",
            get(events_get).post(events_post),
        )
        .with_state(mock);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn mock() -> Shared {
    Arc::new(Mutex::new(Mock {
        incarnation: 1,
        ..Mock::default()
    }))
}

#[test]
fn the_stub_writes_dates_as_the_mock_does() {
    let t = parse_event_time("2026-12-01T20:04:21Z").expect("date");
    assert_eq!(iso(t), "2026-12-01T20:04:21Z");
}

/// A Reboot as the mock sends it: its ISO `NotBefore` is read (not taken as
/// "now"), acknowledging sends `{"StartRequests":[{"EventId":…}]}`, and the
/// started event comes back under a new id with no `NotBefore`.
#[tokio::test]
async fn a_mock_reboot_is_read_acknowledged_and_renamed() {
    let mock = mock();
    let client = ImdsClient::new(ImdsConfig {
        base_url: serve(mock.clone()).await,
        ..ImdsConfig::default()
    })
    .expect("client");
    let not_before = SystemTime::now() + Duration::from_secs(15 * 60);
    let id = mock.lock().expect("lock").schedule("Reboot", not_before);
    let mut watcher = client.scheduled_events_watcher(VM);
    let update = watcher.poll().await.expect("poll").expect("first poll");
    let [event] = update.events.as_slice() else {
        panic!("one event: {update:?}")
    };
    assert_eq!(
        (&event.event_id, &event.event_type, &event.event_status),
        (&id, &EventType::Reboot, &EventStatus::Scheduled)
    );
    let at = event
        .not_before_time()
        .expect("ISO 8601")
        .expect("scheduled: has one");
    let left = at.duration_since(SystemTime::now()).expect("in the future");
    assert!(left > Duration::from_secs(14 * 60), "{left:?} left");

    client
        .acknowledge_events(std::slice::from_ref(&id))
        .await
        .expect("ack");
    assert_eq!(
        mock.lock().expect("lock").posts,
        vec![json!({"StartRequests": [{"EventId": id}]})]
    );
    let update = watcher
        .poll()
        .await
        .expect("poll")
        .expect("renamed: new incarnation");
    let [started] = update.events.as_slice() else {
        panic!("one event: {update:?}")
    };
    assert_eq!(started.event_status, EventStatus::Started);
    assert_ne!(started.event_id, id, "a new EventId once started");
    assert_eq!(started.not_before_time(), Ok(None));
}

/// After an outage (410 here) the watcher reports within about one poll
/// interval of IMDS answering again, not at the end of the client's
/// backoff step.
#[tokio::test]
async fn the_watcher_catches_up_within_an_interval_after_an_outage() {
    let mock = mock();
    let outage = Duration::from_millis(700);
    mock.lock().expect("lock").gone_until = Some(Instant::now() + outage);
    let started = Instant::now();
    // Microsoft's schedule scaled down 10×: tries at 0, 200, 600, 1400 ms,
    // so an unbounded backoff would first see the document at 1.4 s.
    let client = ImdsClient::new(ImdsConfig {
        base_url: serve(mock.clone()).await,
        retry: RetryPolicy {
            delays: [200, 400, 800, 1600]
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            gone_budget: Duration::from_secs(7),
            max_retry_after: Duration::from_secs(6),
        },
        // At a 50 ms cadence the client's 5 req/s would be the bottleneck;
        // at the real 1 s it never is.
        rate_limits: None,
        ..ImdsConfig::default()
    })
    .expect("client");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<EventsUpdate>(4);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(client.scheduled_events_watcher(VM).run(
        Duration::from_millis(50),
        tx,
        shutdown.clone(),
    ));
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("in time")
        .expect("update");
    let seen = started.elapsed();
    assert_eq!(first.incarnation, 1);
    assert!(seen >= outage, "{seen:?}");
    assert!(
        seen < outage + Duration::from_millis(300),
        "seen {:?} after IMDS recovered",
        seen - outage
    );
    // And at the poll cadence from then on.
    let id = mock
        .lock()
        .expect("lock")
        .schedule("Preempt", SystemTime::now() + Duration::from_secs(30));
    let asked = Instant::now();
    let update = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("in time")
        .expect("update");
    assert_eq!(update.events[0].event_id, id);
    assert!(
        asked.elapsed() < Duration::from_millis(300),
        "{:?}",
        asked.elapsed()
    );
    shutdown.cancel();
    task.await.expect("join");
}
